//! Applying one batch: the ledger, earlier files from the S3 listing, out-of-order
//! files, staging, and each segment planned and committed in order.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{Lane, Listing, SegmentOutcome, StopKind, Tally};
use crate::alerts::{AlertKind, Severity};
use crate::apply::plan::{self, Decision, PlanInput};
use crate::apply::{EngineEvent, PendingFile, new_batch_id};
use crate::batch::{ApplyPlan, BatchFile, LedgerRecord, StageError, StagedFile};
use crate::dms::{KeyClass, SourceTable, classify_key};
use crate::queue::FileOutcome;
use crate::schema::diff::{SchemaChange, diff, folding_collision};
use crate::schema::policy::SchemaPolicy;
use crate::schema::types::{FileSchema, TableSchema};
use crate::storage::bare_etag;
use crate::telemetry::{BatchApplied, FileSkipped, SkipKind};
use crate::warehouse::WarehouseError;

/// Conflicts retried in place before a batch counts as failed.
const CONFLICT_RETRIES: u32 = 3;

/// Whether this worker may apply the table now.
enum Lease {
    /// Yes; with the fencing token when leases are on.
    Held(Option<crate::batch::Fence>),
    /// Another worker is applying it.
    Busy,
}

impl Lane {
    pub(super) async fn apply_batch(&mut self, batch: Vec<PendingFile>) {
        let batch_id = new_batch_id();
        let source = batch[0].source.clone();
        let _ = self.ctx.events.send(EngineEvent::BatchStarted {
            table: self.table.clone(),
            batch_id: batch_id.clone(),
            files: batch.len(),
            at: Instant::now(),
        });
        // Every log line about this batch carries the table, batch id and file keys.
        let keys: Vec<&str> = batch.iter().map(|f| f.file.key.as_str()).collect();
        let span = tracing::info_span!("batch", table = %self.table, batch_id = %batch_id, file_keys = ?keys);
        let mut tally = Tally::default();
        let ok = self
            .apply_batch_inner(&batch_id, &source, batch, &mut tally)
            .instrument(span)
            .await;
        let _ = self.ctx.events.send(EngineEvent::BatchFinished {
            table: self.table.clone(),
            batch_id,
            committed: tally.keys,
            ok,
            statements: tally.statements,
            rows: tally.rows,
            at: Instant::now(),
        });
        self.publish_info();
    }

    /// Returns whether every file reached a final outcome (nothing failed).
    pub(super) async fn apply_batch_inner(
        &mut self,
        batch_id: &str,
        source: &SourceTable,
        batch: Vec<PendingFile>,
        committed: &mut Tally,
    ) -> bool {
        if let Err(e) = self.load_state().await {
            return self.fail(batch_id, batch, &e).await;
        }
        if self.state.ignored {
            self.skip_ignored(&batch);
            return true;
        }
        if self.state.held.is_some() {
            self.put_back(batch);
            return true;
        }
        if let Some(stored_source) = self
            .state
            .stored
            .as_ref()
            .and_then(|s| s.current.source.clone())
            && stored_source != source.to_string()
        {
            return self.routing_collision(batch, &stored_source, source).await;
        }

        // 1. The ledger.
        let keys: Vec<String> = batch.iter().map(|f| f.file.key.clone()).collect();
        let applied = match self.ctx.warehouse.applied(&self.table, &keys).await {
            Ok(a) => a,
            Err(e) => return self.fail(batch_id, batch, &e.to_string()).await,
        };
        let mut fresh = Vec::with_capacity(batch.len());
        for f in batch {
            let same = |r: &LedgerRecord| {
                r.etag.is_empty() || r.etag == f.file.etag || f.file.etag.is_empty()
            };
            match applied.get(&f.file.key) {
                // Rejected before and still the same bytes: back to the DLQ, quietly.
                Some(r) if r.rejected && same(r) => f.resolve(FileOutcome::Retry(None)),
                // Rejected before, now replaced: apply the new content.
                Some(r) if r.rejected => fresh.push(f),
                Some(r) if same(r) => {
                    FileSkipped {
                        table: &self.table,
                        key: &f.file.key,
                        kind: SkipKind::AlreadyApplied,
                        reason: "already applied (ledger)",
                    }
                    .emit();
                    f.resolve(FileOutcome::Skipped);
                }
                Some(LedgerRecord { etag, .. }) => {
                    let reason = format!(
                        "replaced after it was applied (ledger ETag {etag}, now {}); not applied again (DMS never rewrites a file): to load the new content, upload it under a new name that sorts after the table's last applied file",
                        f.file.etag
                    );
                    FileSkipped {
                        table: &self.table,
                        key: &f.file.key,
                        kind: SkipKind::Replaced,
                        reason: &reason,
                    }
                    .emit();
                    self.alert_file(AlertKind::FileSkipped, Severity::Warning, &f, &reason, None)
                        .await;
                    f.resolve(FileOutcome::Skipped);
                }
                None => fresh.push(f),
            }
        }

        // Earlier files S3 has but no notification brought yet join the batch.
        if let Err(e) = self.fill_gaps(&mut fresh).await {
            return self.fail(batch_id, fresh, &e).await;
        }

        // 2. Out of order: older than what is applied, and not a file we failed ourselves.
        let ordering = self.ctx.config.ordering_column(&self.table);
        let mut in_order = Vec::with_capacity(fresh.len());
        for f in fresh {
            let late = self
                .state
                .last_applied
                .as_ref()
                .is_some_and(|(last, _)| f.dms.order().sort_key() < *last)
                && !self.state.retrying.contains(&f.file.key);
            if late && ordering.is_none() {
                let reason = format!(
                    "arrived after later files of `{}` were applied; applying it now would overwrite newer changes",
                    self.table
                );
                let steps = "Configure dms.ordering_column (DMS TimestampColumnName or AR_H_CHANGE_SEQ) so late files can be applied safely, or rebuild the table with `cdc-worker replay`. The message goes to the dead-letter queue.";
                self.alert_file(
                    AlertKind::FileOutOfOrder,
                    Severity::Error,
                    &f,
                    &reason,
                    Some(steps),
                )
                .await;
                f.resolve(FileOutcome::Retry(None));
            } else {
                in_order.push(f);
            }
        }
        if in_order.is_empty() {
            return true;
        }

        // 3. Stage.
        let files: Vec<_> = in_order.iter().map(|f| f.file.clone()).collect();
        let staged = self.ctx.warehouse.stage(batch_id, files).await;
        let mut ready: Vec<(PendingFile, StagedFile)> = Vec::new();
        let mut failed_from: Option<(usize, String)> = None;
        let mut pending_iter = in_order.into_iter().enumerate();
        let mut results = staged.files.into_iter();
        for (i, f) in pending_iter.by_ref() {
            match results.next() {
                Some(Ok(s)) => ready.push((f, s)),
                Some(Err(StageError::Missing)) => {
                    let reason = "the object no longer exists (deleted after the notification, or a DMS TRUNCATE)";
                    FileSkipped {
                        table: &self.table,
                        key: &f.file.key,
                        kind: SkipKind::Missing,
                        reason,
                    }
                    .emit();
                    self.alert_file(AlertKind::FileSkipped, Severity::Warning, &f, reason, None)
                        .await;
                    f.resolve(FileOutcome::Skipped);
                }
                Some(Err(StageError::Poison(e))) => {
                    let reason = format!("cannot be read as Parquet: {e}");
                    if let Err(e) = self
                        .ctx
                        .warehouse
                        .record_rejected(&self.table, std::slice::from_ref(&f.file), &reason)
                        .await
                    {
                        tracing::warn!(table = %self.table, key = %f.file.key, error = %e, "could not record the rejected file in the ledger");
                    }
                    let steps = "The file is left in the queue and reaches the dead-letter queue after its maximum receives. Replace it in S3 and redrive the DLQ (or run `cdc-worker replay`); the table goes on meanwhile.";
                    self.alert_file(
                        AlertKind::FileRejected,
                        Severity::Error,
                        &f,
                        &reason,
                        Some(steps),
                    )
                    .await;
                    metrics::counter!("cdc_worker_files_rejected_total", "table" => self.table.clone()).increment(1);
                    f.resolve(FileOutcome::Retry(None));
                }
                Some(Err(StageError::Transient(e))) => {
                    failed_from = Some((i, e));
                    // This file and every later one retry: nothing passes a failed file.
                    let mut rest = vec![f];
                    rest.extend(pending_iter.by_ref().map(|(_, f)| f));
                    let reason = failed_from
                        .as_ref()
                        .map(|(_, e)| e.clone())
                        .unwrap_or_default();
                    // Apply what staged before the failure first.
                    let ok = self
                        .apply_segments(batch_id, std::mem::take(&mut ready), committed)
                        .await;
                    if ok {
                        self.fail(batch_id, rest, &reason).await;
                    } else {
                        // Already blocked by an earlier failure: these wait behind it.
                        for f in rest {
                            self.add(f);
                        }
                    }
                    return false;
                }
                None => {
                    failed_from = Some((i, "staging returned fewer files than asked".into()));
                    f.resolve(FileOutcome::Retry(None));
                }
            }
        }
        let ok = self.apply_segments(batch_id, ready, committed).await;
        drop(staged.workspace);
        ok && failed_from.is_none()
    }

    /// Splits staged files where the schema changes and applies each segment in order.
    pub(super) async fn apply_segments(
        &mut self,
        batch_id: &str,
        ready: Vec<(PendingFile, StagedFile)>,
        committed: &mut Tally,
    ) -> bool {
        let mut segments: Vec<Vec<(PendingFile, StagedFile)>> = Vec::new();
        for item in ready {
            match segments.last_mut() {
                Some(seg) if seg[0].1.schema.table.same_shape(&item.1.schema.table) => {
                    // The segment's schema (its first file's) is nullable where any file is.
                    for (c, other) in seg[0]
                        .1
                        .schema
                        .table
                        .columns
                        .iter_mut()
                        .zip(&item.1.schema.table.columns)
                    {
                        c.nullable |= other.nullable;
                    }
                    seg.push(item);
                }
                _ => segments.push(vec![item]),
            }
        }
        let mut segments = segments.into_iter();
        while let Some(segment) = segments.next() {
            match self.apply_segment(batch_id, segment, committed).await {
                SegmentOutcome::Done => {}
                SegmentOutcome::Stop(rest) => {
                    // Held or failed: later segments wait (held) or retry (failed).
                    let later: Vec<PendingFile> = segments.flatten().map(|(f, _)| f).collect();
                    match rest {
                        StopKind::Held(files) => {
                            self.put_back(files);
                            self.put_back(later);
                            return true;
                        }
                        StopKind::Failed => {
                            // Later segments wait behind the failed one.
                            for f in later {
                                self.add(f);
                            }
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    /// Plans one segment (files sharing a schema), records a new schema version when it
    /// brings one, and commits it.
    pub(super) async fn apply_segment(
        &mut self,
        batch_id: &str,
        segment: Vec<(PendingFile, StagedFile)>,
        committed: &mut Tally,
    ) -> SegmentOutcome {
        let started = Instant::now();
        let schema: FileSchema = segment[0].1.schema.clone();
        let source = segment[0].0.source.clone();
        let (files, staged): (Vec<PendingFile>, Vec<StagedFile>) = segment.into_iter().unzip();

        if let Some(reason) = self.unusable_names(&schema) {
            return self.hold(files, &reason).await;
        }
        let (decision, changes, policy) = match self.decide(&schema, &source).await {
            Ok(d) => d,
            Err(e) => return self.segment_failed(batch_id, files, &e).await,
        };
        if (!changes.is_empty() || self.state.stored.is_none())
            && let Err(e) = self
                .record_version(&source, &schema, &changes, &decision, policy, &files[0])
                .await
        {
            return self.segment_failed(batch_id, files, &e).await;
        }
        let (ddl, load, mode) = match decision {
            Decision::Ignore => {
                self.state.ignored = true;
                self.skip_ignored(&files);
                return SegmentOutcome::Done;
            }
            Decision::Hold { reason, .. } => {
                self.state.held = Some(reason.clone());
                self.state.held_checked = Some(Instant::now());
                let _ = self.ctx.events.send(EngineEvent::TableHeld {
                    table: self.table.clone(),
                    reason: reason.clone(),
                });
                tracing::warn!(table = %self.table, reason, files = files.len(), "table held by schema policy");
                return SegmentOutcome::Stop(StopKind::Held(files));
            }
            Decision::Apply {
                ddl, load, mode, ..
            } => (ddl, load, mode),
        };
        let fence = match self.take_lease().await {
            Ok(Lease::Held(fence)) => fence,
            Ok(Lease::Busy) => return SegmentOutcome::Stop(StopKind::Held(files)),
            Err(e) => return self.segment_failed(batch_id, files, &e).await,
        };
        if fence.is_some() {
            match self.moved_while_unleased(&files).await {
                Ok(false) => {}
                Ok(true) => {
                    // Start the batch again from fresh state: the ledger check, the order
                    // check and the gap listing all see what the other task committed.
                    self.release_lease().await;
                    tracing::info!(table = %self.table, "another task applied this table meanwhile; re-reading its state");
                    self.state.loaded = false;
                    self.state.listing = None;
                    return SegmentOutcome::Stop(StopKind::Held(files));
                }
                Err(e) => {
                    self.release_lease().await;
                    return self.segment_failed(batch_id, files, &e).await;
                }
            }
        }
        let op = &self.ctx.config.dms.op_column;
        let ordering = self.ctx.config.ordering_column(&self.table).and_then(|o| {
            schema
                .table
                .columns
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(&o))
                .map(|c| c.name.clone())
        });
        let plan = ApplyPlan {
            batch_id: batch_id.to_string(),
            table: self.table.clone(),
            ddl,
            load,
            mode,
            op_column: staged.iter().any(|s| s.schema.has_op).then(|| op.clone()),
            ordering_column: ordering,
            staged_columns: schema.table.columns.clone(),
            files: staged.iter().map(|s| s.file.clone()).collect(),
            fence,
        };
        self.commit(&plan, &staged, files, started, committed).await
    }

    /// A reason to hold the table when the segment's column names cannot be created.
    fn unusable_names(&self, schema: &FileSchema) -> Option<String> {
        if let Some((a, b)) = folding_collision(&schema.table) {
            return Some(format!(
                "columns `{a}` and `{b}` are the same column once case is folded; rename one at the source or with a DMS transformation rule"
            ));
        }
        let max = self.ctx.warehouse.max_identifier_len();
        schema
            .table
            .columns
            .iter()
            .find_map(|c| crate::warehouse::sql::check_name(&c.name, max).err())
            .map(|bad| format!("a column name cannot be used: {bad}"))
    }

    /// Compares the segment with the last accepted schema and plans it against the target.
    async fn decide(
        &mut self,
        schema: &FileSchema,
        source: &SourceTable,
    ) -> Result<(Decision, Vec<SchemaChange>, SchemaPolicy), String> {
        let target = self.target().await.map_err(|e| e.to_string())?;
        let key = self
            .ctx
            .keys
            .resolve(&self.table, source, target.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let table_config = self.ctx.config.table(&self.table);
        let policy = self.ctx.config.schema.resolve(table_config.schema.as_ref());
        // Against the last accepted schema, else what the target has.
        let baseline = self
            .state
            .stored
            .as_ref()
            .map(|s| s.current.schema())
            .or_else(|| target.as_ref().map(|t| TableSchema::new(t.columns.clone())));
        // A column becoming nullable is reported (once: the recorded schema keeps it
        // nullable); a file that happens to mark a column REQUIRED is not a change.
        let changes: Vec<SchemaChange> = diff(baseline.as_ref(), &schema.table)
            .into_iter()
            .filter(|c| {
                !matches!(
                    c,
                    SchemaChange::Nullability {
                        nullable: false,
                        ..
                    }
                )
            })
            .collect();
        let resolutions = self
            .state
            .stored
            .as_ref()
            .map(|s| s.current.resolutions.clone())
            .unwrap_or_default();
        let warehouse = self.ctx.warehouse.clone();
        let column_name = move |s: &str| warehouse.column_name(s);
        let decision = plan::plan(&PlanInput {
            target: target.as_ref(),
            file: schema,
            policy,
            source_changes: &changes,
            resolutions: &resolutions,
            key: &key.columns,
            column_name: &column_name,
        });
        Ok((decision, changes, policy))
    }

    /// The table's lease, when leases are on.
    /// With several tasks, another one may have applied this table between this lane's
    /// ledger check and its taking the lease: it read state without the lease, so it
    /// compares that state with the warehouse again now that it holds it.
    async fn moved_while_unleased(&self, files: &[PendingFile]) -> Result<bool, String> {
        let keys: Vec<String> = files.iter().map(|f| f.file.key.clone()).collect();
        let warehouse = &self.ctx.warehouse;
        let recorded = warehouse
            .applied(&self.table, &keys)
            .await
            .map_err(|e| e.to_string())?;
        // A rejected file's fixed re-upload (new ETag) is still ours to apply.
        let taken = files.iter().any(|f| {
            recorded
                .get(&f.file.key)
                .is_some_and(|r| !r.rejected || r.etag == f.file.etag)
        });
        let last = warehouse
            .last_applied(&self.table)
            .await
            .map_err(|e| e.to_string())?;
        Ok(taken || last != self.state.last_applied)
    }

    async fn release_lease(&self) {
        if let Some(leases) = &self.ctx.leases {
            leases.release(&self.table).await;
        }
    }

    async fn take_lease(&mut self) -> Result<Lease, String> {
        let Some(leases) = &self.ctx.leases else {
            return Ok(Lease::Held(None));
        };
        match leases
            .acquire(&self.table)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(fence) => Ok(Lease::Held(Some(fence))),
            None => {
                // Another worker is applying this table. Keep the files here (their
                // visibility kept alive) and try again shortly: releasing them to the
                // queue would count a receive each time and, with several tasks, could push
                // healthy files into the dead-letter queue. Whoever applies next includes
                // every earlier file from the S3 listing.
                let wait = Duration::from_millis(500 + fastrand::u64(..1500));
                self.state.not_before = Some(Instant::now() + wait);
                metrics::counter!("cdc_worker_lease_busy_total", "table" => self.table.clone())
                    .increment(1);
                tracing::debug!(table = %self.table, wait_ms = wait.as_millis() as u64, "table leased by another worker; retrying shortly");
                Ok(Lease::Busy)
            }
        }
    }

    /// Runs the plan (conflicts retried in place, the lease renewed meanwhile) and gives
    /// every file its outcome.
    async fn commit(
        &mut self,
        plan: &ApplyPlan,
        staged: &[StagedFile],
        files: Vec<PendingFile>,
        started: Instant,
        committed: &mut Tally,
    ) -> SegmentOutcome {
        let batch_id = plan.batch_id.as_str();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let renewing = self.ctx.leases.as_ref().map(|l| l.keep_alive(&self.table));
            let result = self.ctx.warehouse.apply(plan, staged).await;
            if let Some(renewing) = renewing {
                renewing.stop().await;
            }
            match result {
                Err(WarehouseError::Conflict(e)) if attempt < CONFLICT_RETRIES => {
                    tracing::debug!(error = %e, "transaction conflict; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
                other => break other,
            }
        };
        self.release_lease().await;
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                self.state.target = None;
                return self.segment_failed(batch_id, files, &e.to_string()).await;
            }
        };
        let keys: Vec<String> = files.iter().map(|f| f.file.key.clone()).collect();
        BatchApplied {
            table: &self.table,
            batch_id,
            files: &keys,
            stats: &stats,
            elapsed: started.elapsed(),
        }
        .emit();
        if !plan.ddl.is_empty() {
            self.state.target = None;
        }
        for f in &files {
            let order = f.dms.order().sort_key();
            if self
                .state
                .last_applied
                .as_ref()
                .is_none_or(|(l, _)| &order > l)
            {
                self.state.last_applied = Some((order, f.file.key.clone()));
            }
            self.state.retrying.remove(&f.file.key);
            f.resolve(FileOutcome::Committed);
        }
        if let Some(blocked) = &self.state.blocked_from
            && files.iter().any(|f| &f.dms.order() >= blocked)
        {
            self.state.blocked_from = None;
        }
        self.state.consecutive_failures = 0;
        self.state.failing_alerted = false;
        if stats.ambiguous_keys > 0 {
            let reason = format!(
                "{} keys changed more than once inside one file and no ordering column decides which change is last; the result for those keys may not be the latest change",
                stats.ambiguous_keys
            );
            tracing::warn!(table = %self.table, ambiguous_keys = stats.ambiguous_keys, "{reason}");
            // A table without an ordering column stays that way: one alert per lane,
            // not one per batch.
            let first_for_lane = self
                .state
                .alerted
                .insert(AlertKind::AmbiguousOrder.as_str().to_string());
            if first_for_lane {
                let steps = "Enable a DMS TimestampColumnName or an AR_H_CHANGE_SEQ column and set dms.ordering_column.";
                self.alert_file(
                    AlertKind::AmbiguousOrder,
                    Severity::Warning,
                    &files[0],
                    &reason,
                    Some(steps),
                )
                .await;
            }
        }
        committed.keys.extend(keys);
        committed.statements += stats.statements;
        committed.rows += stats.rows_staged;
        SegmentOutcome::Done
    }

    /// Adds files of this table that S3 already holds, ordered before the batch's last
    /// file, and neither applied nor announced yet: notifications arrive out of order, but
    /// DMS writes a table's files one after the other, so an earlier file in the listing is
    /// one whose notification is late. Its notification, when it comes, finds it in the
    /// ledger.
    pub(super) async fn fill_gaps(&mut self, batch: &mut Vec<PendingFile>) -> Result<(), String> {
        let Some(last) = batch.iter().map(|f| f.dms.order()).max() else {
            return Ok(());
        };
        let covered = self
            .state
            .listing
            .as_ref()
            .is_some_and(|l| l.through >= last);
        if !covered {
            self.refresh_listing(&batch[0]).await?;
        }
        let in_batch: HashSet<String> = batch.iter().map(|f| f.file.key.clone()).collect();
        let Some(listing) = self.state.listing.as_mut() else {
            return Ok(());
        };
        // The batch's own files are accounted for from here on.
        listing
            .unapplied
            .retain(|_, g| !in_batch.contains(&g.file.key));
        let mut gaps: Vec<PendingFile> = listing
            .unapplied
            .range(..last)
            .map(|(_, g)| g.clone())
            .collect();
        if gaps.is_empty() {
            return Ok(());
        }
        // Another worker may have applied some since an earlier listing (a fresh one was
        // just checked against the ledger).
        if covered {
            let keys: Vec<String> = gaps.iter().map(|g| g.file.key.clone()).collect();
            let applied = self
                .ctx
                .warehouse
                .applied(&self.table, &keys)
                .await
                .map_err(|e| e.to_string())?;
            gaps.retain(|g| !applied.contains_key(&g.file.key));
            listing
                .unapplied
                .retain(|_, g| !applied.contains_key(&g.file.key));
        }
        if gaps.is_empty() {
            return Ok(());
        }
        // Earlier files join the batch, within the batch limits: after an outage the
        // listing can hold most of a backlog. What does not fit comes later, in order: the
        // batch's own files wait in the lane, the gaps found now stay in the listing.
        let mut files: Vec<PendingFile> = std::mem::take(batch).into_iter().chain(gaps).collect();
        files.sort_by_key(|f| f.dms.order());
        let later = files.split_off(batch_cut(&files, &self.ctx.config.batch));
        let mut joined = 0usize;
        for f in files.iter_mut().filter(|f| !in_batch.contains(&f.file.key)) {
            listing.unapplied.remove(&f.dms.order());
            f.arrived = Instant::now();
            joined += 1;
        }
        if joined > 0 {
            tracing::info!(
                table = %self.table,
                files = joined,
                deferred = later.len(),
                "earlier files found in the S3 listing before their notifications; applying them in order"
            );
            metrics::counter!("cdc_worker_gap_files_total", "table" => self.table.clone())
                .increment(joined as u64);
        }
        *batch = files;
        let own: Vec<PendingFile> = later
            .into_iter()
            .filter(|f| in_batch.contains(&f.file.key))
            .collect();
        self.put_back(own);
        Ok(())
    }

    /// Lists the table's folder from the last applied file on, and remembers every file
    /// it shows that the ledger does not hold.
    async fn refresh_listing(&mut self, sample: &PendingFile) -> Result<(), String> {
        let bucket = sample.file.bucket.clone();
        let folder = sample.dms.table_prefix.clone();
        let prefix = self.ctx.config.source.prefix.clone();
        let start_after =
            self.state.last_applied.as_ref().and_then(|(_, key)| {
                match classify_key(&prefix, key) {
                    Ok(KeyClass::Dms(k)) if k.key_order_is_dms_order() => Some(key.clone()),
                    _ => None,
                }
            });
        let listed = self
            .ctx
            .store
            .list(&bucket, &folder, start_after.as_deref())
            .await
            .map_err(|e| format!("listing s3://{bucket}/{folder}: {e}"))?;
        let mut files = BTreeMap::new();
        let mut through = None;
        for object in listed {
            let Ok(KeyClass::Dms(dms)) = classify_key(&prefix, &object.key) else {
                continue;
            };
            let order = dms.order();
            let after_last_applied = self
                .state
                .last_applied
                .as_ref()
                .is_none_or(|(l, _)| order.sort_key() > *l);
            if dms.source != sample.source || !after_last_applied {
                continue;
            }
            if through.as_ref().is_none_or(|t| order > *t) {
                through = Some(order.clone());
            }
            files.insert(
                order.clone(),
                PendingFile {
                    table: self.table.clone(),
                    source: sample.source.clone(),
                    file: BatchFile {
                        bucket: bucket.clone(),
                        key: object.key,
                        size: object.size,
                        etag: bare_etag(&object.etag).to_string(),
                        order_key: order.sort_key(),
                        full_load: dms.is_load(),
                    },
                    dms,
                    messages: vec![],
                    arrived: Instant::now(),
                    waiting: None,
                },
            );
        }
        let keys: Vec<String> = files.values().map(|f| f.file.key.clone()).collect();
        let applied = self
            .ctx
            .warehouse
            .applied(&self.table, &keys)
            .await
            .map_err(|e| e.to_string())?;
        files.retain(|_, f| !applied.contains_key(&f.file.key));
        self.state.listing = through.map(|through| Listing {
            through,
            unapplied: files,
        });
        Ok(())
    }
}

/// How many of `files` (in DMS order) one batch takes: up to `max_files` and
/// `max_bytes`, and always the first.
pub(super) fn batch_cut(files: &[PendingFile], limits: &crate::config::BatchConfig) -> usize {
    let mut bytes = 0u64;
    for (i, f) in files.iter().enumerate() {
        if i > 0 && (i >= limits.max_files || bytes + f.file.size > limits.max_bytes.as_u64()) {
            return i;
        }
        bytes += f.file.size;
    }
    files.len()
}
