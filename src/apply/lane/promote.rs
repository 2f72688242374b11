//! A DMS reload of one table, the effects: where a reload stands after a restart (read
//! from the warehouse), starting one when a table's full load arrives again, the swap of
//! the new generation for the live table once it is complete (or a person accepted it),
//! and the holds of the destructive-change guard. What is decided without IO lives in
//! `reload.rs`; docs/reloads.md tells the story for operators.

use std::time::{Instant, SystemTime};

use super::Lane;
use super::reload::{Building, Found, deleted_by_full_load};
use crate::alerts::{Alert, AlertKind, Severity};
use crate::apply::context::{EngineEvent, PendingFile};
use crate::apply::failure::ApplyError;
use crate::batch::{
    HISTORY_COLUMNS, HistoryReload, LedgerRecord, TargetTable, is_change_order_key, split_order_key,
};
use crate::config::ReloadPolicy;
use crate::dms::{KeyClass, classify_key};
use crate::schema::store::{GuardedBy, TableStatus};
use crate::schema::types::Column;
use crate::storage::bare_etag;
use crate::telemetry::{FileSkipped, SkipKind};
use crate::warehouse::{WarehouseError, generation_table};

/// A swap that found the table leased elsewhere is tried again after this long.
const LEASE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A failed swap is tried again after this long.
const PROMOTE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl Lane {
    /// Where the table's generations stand, from its newest ledger entry and the tables a
    /// reload builds; returns the last applied file of the current generation (its order
    /// key without the generation), None when that generation has nothing applied yet.
    pub(super) async fn load_generations(
        &mut self,
        last: Option<(String, String)>,
    ) -> Result<Option<(String, String)>, ApplyError> {
        let (generation, dms_key) = last
            .as_ref()
            .map_or((1, ""), |(order, _)| split_order_key(order));
        let exists = |g: u32| {
            let warehouse = self.ctx.warehouse.clone();
            let table = generation_table(&self.table, g);
            async move { warehouse.describe(&table).await.map(|t| t.is_some()) }
        };
        let describing = ApplyError::warehouse("looking for a reload's table");
        let next_exists = exists(generation + 1).await.map_err(describing)?;
        let this_exists = if generation >= 2 && !next_exists {
            let describing = ApplyError::warehouse("looking for a reload's table");
            exists(generation).await.map_err(describing)?
        } else {
            false
        };
        let found = Found {
            ledger_generation: generation,
            ledger_has_changes: is_change_order_key(dms_key),
            next_exists,
            this_exists,
        };
        let (mut generations, own) =
            super::reload::Generations::found(&self.table, found, Instant::now());
        // Found again after a re-read (another task committed): what this process saw of
        // the reload stays for its alert.
        if let (Some(old), Some(new)) = (
            self.cache.generations.building.take(),
            generations.building.as_mut(),
        ) && old.generation == new.generation
        {
            let complete = new.complete;
            *new = Building {
                complete: complete || old.complete,
                ..old
            };
        }
        generations.gone_before_start =
            std::mem::take(&mut self.cache.generations.gone_before_start);
        self.cache.generations = generations;
        Ok(last
            .filter(|_| own)
            .map(|(order, key)| (split_order_key(&order).1.to_string(), key)))
    }

    /// An object's ETag now (None: it no longer exists), for a notification that may be
    /// older than the object's content.
    pub(super) async fn current_etag(&self, f: &PendingFile) -> Result<Option<String>, ApplyError> {
        self.ctx
            .store
            .current_etag(&f.file.bucket, &f.file.key)
            .await
            .map_err(ApplyError::Listing)
    }

    /// Whether the lane follows the table's reloads (`dms.reload` is not "alert").
    pub(super) fn follows_reloads(&self) -> bool {
        self.ctx.config.reload_policy(&self.table) != ReloadPolicy::Alert
    }

    /// Whether a full-load file was uploaded after the current generation's last applied
    /// change file was written: then a new full-load file is a reload, not a late file of
    /// this generation's load. A file without an upload time (found in a listing) is not.
    pub(super) fn loaded_after_changes(&self, f: &PendingFile) -> bool {
        let Some((order, _)) = self.state.last_applied() else {
            return false;
        };
        if !is_change_order_key(order) {
            return false;
        }
        match (f.event_time, crate::dms::change_time_of_sort_key(order)) {
            (Some(uploaded), Some(changed)) => uploaded > changed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// A full-load file that starts a reload: the lane starts building the next generation
    /// (and returns the file to apply to it), or, with `dms.reload = "alert"`, does what it
    /// did before reloads were followed. None when the file was dealt with.
    pub(super) async fn reload_or_refuse(
        &mut self,
        f: PendingFile,
        record: Option<&LedgerRecord>,
    ) -> Option<PendingFile> {
        if !self.follows_reloads() {
            return match record.filter(|r| r.etag != f.file.etag) {
                Some(r) => {
                    let ledger_etag = r.etag.clone();
                    self.skip_replaced(f, &ledger_etag).await;
                    None
                }
                // A new full-load file after changes: refused as late, as before.
                None => Some(f),
            };
        }
        let at = f.event_time.unwrap_or_else(SystemTime::now);
        let abandoned = self
            .cache
            .generations
            .start_reload(&self.table, Instant::now(), at);
        if let Some(table) = abandoned {
            // A second reload before the first was complete: its table goes. Failing to
            // drop it leaves a stray table, not wrong rows; the next start drops it too.
            if let Err(e) = self.ctx.warehouse.discard(&table).await {
                tracing::warn!(table = %self.table, abandoned = %table, error = %e, "could not drop an abandoned reload's table");
            }
        }
        let g = self.cache.generations.current;
        tracing::warn!(table = %self.table, generation = g, file = %f.file.key, "DMS reload: the table's full load arrived again; building the next generation beside the live table");
        metrics::counter!("cdc_worker_reloads_total", "table" => self.table.clone(), "outcome" => "started")
            .increment(1);
        self.state.set_last_applied(None);
        self.cache.target = None;
        self.cache.listing = None;
        Some(f)
    }

    /// A file announced but gone from S3 because a reload of the table deleted it with
    /// its earlier generation: counted for the reload's alert instead of alerted alone.
    pub(super) fn deleted_by_reload(&mut self, f: &PendingFile) -> bool {
        let Some(b) = self.cache.generations.building.as_mut() else {
            return false;
        };
        let before_reload = match (b.started, f.event_time) {
            (Some(started), Some(uploaded)) => uploaded <= started,
            // Found in progress after a restart, or a listed file: a file missing now
            // while a reload builds is the earlier generation's (DMS deletes only then).
            _ => true,
        };
        if before_reload {
            b.gone.push(f.file.key.clone());
        }
        before_reload
    }

    /// A file announced but gone from S3, uploaded before the table's newest full-load
    /// file was written: deleted by a reload that swapped in already (its alert went out)
    /// or whose full load is not announced here yet (then counted for its alert). When the
    /// full-load files cannot be listed the file is alerted as any missing file.
    pub(super) async fn deleted_by_earlier_reload(&mut self, f: &PendingFile) -> bool {
        let Some(uploaded) = f.event_time.filter(|_| self.follows_reloads()) else {
            return false;
        };
        let Some((key, etag, written)) = self.newest_full_load(f).await else {
            return false;
        };
        if !deleted_by_full_load(uploaded, written) {
            return false;
        }
        let applied = self
            .ctx
            .warehouse
            .applied(&self.table, std::slice::from_ref(&key))
            .await;
        let reload_applied = applied.is_ok_and(|m| m.get(&key).is_some_and(|r| r.etag == etag));
        if !reload_applied {
            self.cache
                .generations
                .gone_before_start
                .push(f.file.key.clone());
        }
        true
    }

    /// The table's newest full-load file in S3 (key, ETag, when written), from the folders
    /// DMS writes them in (`LOAD…` and `SEGMENTn_LOAD…` at the table's top).
    async fn newest_full_load(&self, f: &PendingFile) -> Option<(String, String, SystemTime)> {
        let mut listed = Vec::new();
        for start in ["LOAD", "SEGMENT"] {
            let folder = format!("{}{start}", f.dms.table_prefix);
            match self.ctx.store.list(&f.file.bucket, &folder, None).await {
                Ok(objects) => listed.extend(objects),
                Err(e) => {
                    tracing::warn!(table = %self.table, error = %e, "could not list the table's full-load files");
                    return None;
                }
            }
        }
        let prefix = &self.ctx.config.source.prefix;
        listed
            .into_iter()
            .filter(|o| matches!(classify_key(prefix, &o.key), Ok(KeyClass::Dms(k)) if k.is_load()))
            .filter_map(|o| Some((o.last_modified?, o)))
            .max_by_key(|(written, _)| *written)
            .map(|(written, o)| {
                let etag = bare_etag(&o.etag).to_string();
                (o.key, etag, written)
            })
    }

    /// A change file written before the reload being built started: the earlier
    /// generation's (left in S3 under `TargetTablePrepMode = DO_NOTHING`), which must not
    /// apply on top of the new full load. Skipped and counted for the reload's alert.
    pub(super) fn skip_if_superseded(&mut self, f: &PendingFile) -> bool {
        let Some(b) = self.cache.generations.building.as_mut() else {
            return false;
        };
        let (Some(started), Some(written)) = (b.started, f.dms.cdc_time()) else {
            return false;
        };
        if written >= started {
            return false;
        }
        b.gone.push(f.file.key.clone());
        FileSkipped {
            table: &self.table,
            key: &f.file.key,
            kind: SkipKind::Replaced,
            reason: "a change file of the table's earlier generation, written before its reload",
        }
        .emit();
        self.state.settled(f);
        true
    }

    /// When the lane must look at its reload again though no file comes.
    pub(super) fn reload_due(&self, now: Instant) -> Option<std::time::Instant> {
        let b = self.cache.generations.building.as_ref()?;
        if self.state.held().is_some() {
            return None;
        }
        if b.complete {
            return Some(b.retry_at.unwrap_or(now).max(now));
        }
        self.cache
            .generations
            .settles_at(self.ctx.config.dms.reload_settle)
    }

    /// Swaps the new generation in once it is complete, unless the policy or the guard
    /// holds it for a person.
    pub(super) async fn advance_reload(&mut self) {
        let now = Instant::now();
        let waiting = self.state.snapshot().pending_files > 0;
        let settle = self.ctx.config.dms.reload_settle;
        if !self.cache.generations.settled(now, settle, waiting) || self.state.held().is_some() {
            return;
        }
        let Some(b) = self.cache.generations.building.clone() else {
            return;
        };
        if b.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let accepted = self
            .cache
            .stored
            .as_ref()
            .is_some_and(|s| s.current.released.reload == Some(b.generation));
        if !accepted && self.ctx.config.reload_policy(&self.table) == ReloadPolicy::Hold {
            let reason = format!(
                "generation {} of the table (a DMS reload) is complete in `{}` and waits to replace it (dms.reload = \"hold\")",
                b.generation, b.table
            );
            self.hold_for_person(
                GuardedBy::Reload {
                    generation: b.generation,
                },
                &reason,
                AlertKind::ReloadWaiting,
            )
            .await;
            return;
        }
        match self.promote(&b, accepted).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(table = %self.table, generation = b.generation, error = %e, "could not replace the table by its new generation; retrying");
                if let Some(b) = self.cache.generations.building.as_mut() {
                    b.retry_at = Some(Instant::now() + PROMOTE_RETRY);
                }
            }
        }
    }

    /// The guard's look at a complete generation, then the swap and its alert.
    async fn promote(&mut self, b: &Building, accepted: bool) -> Result<(), ApplyError> {
        let warehouse = self.ctx.warehouse.clone();
        let counting = ApplyError::warehouse("counting the rows of a reload");
        let live = warehouse.describe(&self.table).await.map_err(counting)?;
        let source = self.source_columns();
        // A history table keeps its versions: the reload closes some, removes none.
        let history = live.as_ref().filter(|t| t.is_history(&source));
        let before = match &live {
            Some(_) => {
                let counting = ApplyError::warehouse("counting the rows of a reload");
                warehouse.row_count(&self.table).await.map_err(counting)?
            }
            None => 0,
        };
        let after = warehouse
            .row_count(&b.table)
            .await
            .map_err(ApplyError::warehouse("counting the rows of a reload"))?;
        let removed = before.saturating_sub(after);
        if !accepted
            && history.is_none()
            && let Some(guard) = self.ctx.config.guard.delete_guard()
            && guard.holds(removed, before)
        {
            let reason = format!(
                "generation {} of the table (a DMS reload) has {after} rows where the table has {before}: it would remove {removed} rows, more than guard.max_delete_fraction = {} of them",
                b.generation, guard.max_fraction
            );
            self.hold_for_person(
                GuardedBy::Reload {
                    generation: b.generation,
                },
                &reason,
                AlertKind::DestructiveChangeHeld,
            )
            .await;
            return Ok(());
        }
        // The lease keeps another task from committing to the generation meanwhile.
        if self.lease_for(&[]).await?.is_none() {
            if let Some(b) = self.cache.generations.building.as_mut() {
                b.retry_at = Some(Instant::now() + LEASE_RETRY);
            }
            return Ok(());
        }
        let swapped = match history {
            Some(live) => match self.history_reload(b, live, &source).await {
                Ok(reload) => {
                    warehouse
                        .merge_generation(&self.table, &b.table, &reload)
                        .await
                }
                Err(e) => Err(e),
            },
            None => warehouse.promote(&self.table, &b.table).await,
        };
        let history = history.is_some();
        self.release_lease().await;
        swapped.map_err(ApplyError::warehouse(
            "replacing the table by its new generation",
        ))?;
        self.cache.generations.promoted();
        self.cache.target = None;
        metrics::counter!("cdc_worker_reloads_total", "table" => self.table.clone(), "outcome" => "promoted")
            .increment(1);
        let how = if history {
            "its new generation was merged into its history"
        } else {
            "the table was replaced by its new generation"
        };
        tracing::warn!(table = %self.table, generation = b.generation, rows_before = before, rows_after = after, gone = b.gone.len(), "DMS reload applied: {how}");
        self.alert_reloaded(b, before, after, history).await;
        if accepted {
            self.clear_release(|r| r.reload = None).await;
        }
        Ok(())
    }

    /// The source's columns as last accepted (empty before any).
    fn source_columns(&self) -> Vec<Column> {
        self.cache
            .stored
            .as_ref()
            .map(|s| s.current.columns.clone())
            .unwrap_or_default()
    }

    /// How a history table's new generation merges into its history: the generation's
    /// columns (those the live table lacks added), the key, the tracked columns, and the
    /// reload's time (when this process saw it start, else now).
    async fn history_reload(
        &self,
        b: &Building,
        live: &TargetTable,
        source: &[Column],
    ) -> Result<HistoryReload, WarehouseError> {
        let warehouse = &self.ctx.warehouse;
        let next = warehouse.describe(&b.table).await?.ok_or_else(|| {
            WarehouseError::Sql(format!(
                "cannot merge the reload: `{}` does not exist",
                b.table
            ))
        })?;
        let is_history = |name: &str| HISTORY_COLUMNS.iter().any(|h| h.eq_ignore_ascii_case(name));
        // The source's columns as the new full load has them: the generation was created
        // with the live table's, so a column the source removed is there too, all NULL, and
        // would make every key a change. Variant columns (`price__v_string`, apply/plan.rs)
        // hold source values too.
        let source: Vec<String> = source
            .iter()
            .map(|c| warehouse.column_name(&c.name))
            .collect();
        let in_source = |name: &str| {
            name.contains("__v_")
                || source.is_empty()
                || source.iter().any(|c| c.eq_ignore_ascii_case(name))
        };
        let generation: Vec<_> = next
            .columns
            .iter()
            .filter(|c| !is_history(&c.name) && in_source(&c.name))
            .collect();
        let has = |name: &str| {
            live.columns
                .iter()
                .any(|c| c.name.eq_ignore_ascii_case(name))
        };
        let columns: Vec<String> = generation.iter().map(|c| c.name.clone()).collect();
        let key: Vec<String> = self
            .cache
            .stored
            .as_ref()
            .and_then(|s| s.current.key.clone())
            .unwrap_or_default()
            .iter()
            .map(|k| warehouse.column_name(k))
            .collect();
        if key.is_empty() {
            return Err(WarehouseError::Sql(format!(
                "cannot merge the reload of history table `{}`: its key is not known",
                self.table
            )));
        }
        let ordering = self
            .ctx
            .config
            .ordering_column(&self.table)
            .map(|o| warehouse.column_name(&o))
            .filter(|o| columns.iter().any(|c| c.eq_ignore_ascii_case(o)));
        Ok(HistoryReload {
            tracked: self.tracked_columns(&columns, &key, ordering.as_deref()),
            add_columns: generation
                .iter()
                .filter(|c| !has(&c.name))
                .map(|c| (*c).clone())
                .collect(),
            key,
            columns,
            ordering,
            at: b.started.unwrap_or_else(SystemTime::now),
        })
    }

    async fn alert_reloaded(&mut self, b: &Building, before: u64, after: u64, history: bool) {
        let mut message = if history {
            format!(
                "DMS reloaded the table: generation {} ({after} versions, {} files applied to it by this worker) was merged into its history ({before} versions before): keys the new full load lacks were closed, changed keys got a version",
                b.generation, b.files
            )
        } else {
            format!(
                "DMS reloaded the table: generation {} replaced it ({before} rows before, {after} after; {} files applied to it by this worker)",
                b.generation, b.files
            )
        };
        if !b.gone.is_empty() {
            let shown: Vec<&str> = b.gone.iter().take(5).map(String::as_str).collect();
            let more = b.gone.len().saturating_sub(shown.len());
            message.push_str(&format!(
                "; {} files of the earlier generation were deleted or superseded by the reload before they were applied ({}{})",
                b.gone.len(),
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ));
        }
        if !b.schema_changes.is_empty() {
            message.push_str(&format!(
                "; the new full load changed the schema: {}",
                b.schema_changes.join("; ")
            ));
        }
        let alert = Alert::new(
            AlertKind::TableReloaded,
            Severity::Info,
            &self.table,
            message,
        );
        self.ctx.alerts.publish(&alert).await;
    }

    /// The destructive-change guard stopped a batch from this file on: the table waits.
    pub(super) async fn hold_for_deletes(&mut self, first: &PendingFile, deletes: u64, rows: u64) {
        let reason = format!(
            "a batch from {} on deletes {deletes} rows of a table of {rows} rows, more than guard.max_delete_fraction = {} of it",
            first.file.key, self.ctx.config.guard.max_delete_fraction
        );
        let hold = GuardedBy::Deletes {
            file: first.file.key.clone(),
        };
        self.hold_for_person(hold, &reason, AlertKind::DestructiveChangeHeld)
            .await;
    }

    /// Records a hold that waits for a person in the schema store (so every worker and a
    /// restart see it), holds the lane, and alerts with the command that releases it.
    async fn hold_for_person(&mut self, hold: GuardedBy, reason: &str, kind: AlertKind) {
        let t = self.table.clone();
        let (command, guard_kind) = match &hold {
            GuardedBy::Reload { .. } if kind == AlertKind::ReloadWaiting => (
                format!("cdc-worker table accept-reload {t}"),
                "reload_policy",
            ),
            GuardedBy::Reload { .. } => (format!("cdc-worker table accept-reload {t}"), "reload"),
            GuardedBy::Deletes { .. } => (format!("cdc-worker table release-guard {t}"), "deletes"),
        };
        let status = TableStatus::Guarded {
            hold,
            reason: reason.to_string(),
            since: chrono::Utc::now().to_rfc3339(),
        };
        let recorded = self
            .ctx
            .schemas
            .update(&t, |c| c.status = status.clone())
            .await;
        match recorded {
            Ok(stored) => self.cache.stored = Some(stored),
            // Held in this process all the same; a restart sees the files again and the
            // guard holds them again.
            Err(e) => {
                tracing::warn!(table = %t, error = %e, "could not record the hold in the schema store")
            }
        }
        self.state.hold(reason, Vec::new(), Instant::now());
        metrics::counter!("cdc_worker_guard_holds_total", "table" => t.clone(), "kind" => guard_kind)
            .increment(1);
        let _ = self.ctx.events.send(EngineEvent::TableHeld {
            table: t.clone(),
            reason: reason.to_string(),
        });
        tracing::warn!(table = %t, reason, "table held for a person: `{command}` releases it");
        let mut alert = Alert::new(kind, Severity::Warning, &t, reason.to_string());
        alert.held = true;
        alert.next_steps = Some(match kind {
            AlertKind::ReloadWaiting => format!(
                "Check the new generation (`SELECT count(*) FROM` the table named above), then run `{command}` to swap it in. The live table keeps its rows meanwhile, and the table's new files wait until then."
            ),
            _ => format!(
                "Check the source: a mass delete or a much smaller reload is usually a mistake upstream (a truncated source table, a wrong key, a task pointed at the wrong database). If it is intended, run `{command}`: the held change applies once. To hold nothing for this table, raise guard.max_delete_fraction (0 turns the guard off). See docs/reloads.md#the-destructive-change-guard."
            ),
        });
        self.ctx.alerts.publish(&alert).await;
    }

    /// Forgets a release once it was used, so the next destructive change is held again.
    pub(super) async fn clear_release(
        &mut self,
        clear: impl Fn(&mut crate::schema::store::Released),
    ) {
        match self
            .ctx
            .schemas
            .update(&self.table, |c| clear(&mut c.released))
            .await
        {
            Ok(stored) => self.cache.stored = Some(stored),
            Err(e) => {
                tracing::warn!(table = %self.table, error = %e, "could not clear a used release in the schema store")
            }
        }
    }
}
