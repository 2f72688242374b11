//! Applying one segment (staged files that share a schema): the schema policy's decision,
//! a new schema version when the segment brings one, the table's lease, and the commit of
//! the plan with its ledger entries.

use std::time::{Duration, Instant};

use super::Lane;
use super::verdicts::{KeyTransition, key_transition};
use crate::alerts::{AlertKind, Severity};
use crate::apply::context::{EngineEvent, PendingFile};
use crate::apply::failure::ApplyError;
use crate::apply::plan::{self, Decision, PlanInput};
use crate::batch::{
    ApplyPlan, ApplyStats, Ddl, DeleteGuard, Fence, History, LoadColumn, LoadExpr, LoadMode,
    StagedFile, TargetTable, generation_order_key, split_order_key, tracked_columns,
};
use crate::dms::SourceTable;
use crate::queue::FileOutcome;
use crate::schema::diff::{SchemaChange, diff, folding_collision};
use crate::schema::policy::SchemaPolicy;
use crate::schema::types::{FileSchema, TableSchema};
use crate::telemetry::BatchApplied;
use crate::warehouse::WarehouseError;

/// What a batch committed, for [`EngineEvent::BatchFinished`].
#[derive(Default)]
pub(super) struct Tally {
    pub keys: Vec<String>,
    pub statements: u32,
    pub rows: u64,
}

/// Conflicts retried in place before a segment counts as failed.
const CONFLICT_RETRIES: u32 = 3;

pub(super) enum SegmentOutcome {
    Done,
    /// Not applied now (held, or the table is leased elsewhere): the files wait in the lane.
    Waiting(Vec<PendingFile>),
    Failed(ApplyError, Vec<PendingFile>),
}

/// What the schema policy decided for a segment, with what it compared.
pub(super) struct Decided {
    pub decision: Decision,
    pub changes: Vec<SchemaChange>,
    pub policy: SchemaPolicy,
    /// The key the segment is applied with (source column names; empty: appended).
    pub key: Vec<String>,
    /// How that key compares with the one the table was applied with.
    pub key_transition: KeyTransition,
    /// Key values repeated in the table when a key appears or changes.
    pub repeated_keys: u64,
    /// The segment goes into a history table (`Config::keeps_history`).
    pub history: bool,
}

/// The plan's parts a segment is applied with.
struct Applying {
    ddl: Vec<Ddl>,
    load: Vec<LoadColumn>,
    mode: LoadMode,
    history: bool,
}

impl Lane {
    /// Plans one segment, records a new schema version when it brings one, and commits it.
    pub(super) async fn apply_segment(
        &mut self,
        batch_id: &str,
        segment: Vec<(PendingFile, StagedFile)>,
        tally: &mut Tally,
    ) -> SegmentOutcome {
        let started = Instant::now();
        let schema: FileSchema = segment[0].1.schema.clone();
        let source = segment[0].0.source.clone();
        let (files, staged): (Vec<PendingFile>, Vec<StagedFile>) = segment.into_iter().unzip();

        if let Some(reason) = self.unusable_names(&schema) {
            self.wait_for_condition(&files, &reason).await;
            return SegmentOutcome::Waiting(files);
        }
        let decided = match self.decide(&schema, &source).await {
            Ok(d) => d,
            Err(e) => return SegmentOutcome::Failed(e, files),
        };
        let decided = match self.check_key_transition(decided).await {
            Ok(d) => d,
            Err(e) => return SegmentOutcome::Failed(e, files),
        };
        if let Decision::Wait { reason } = &decided.decision {
            // Nothing is recorded: the condition is checked again with the files.
            if decided.key_transition == KeyTransition::Same {
                self.wait_for_condition(&files, reason).await;
            } else {
                self.alert_key_transition(&decided, &files[0]).await;
                self.state
                    .hold_for_condition(reason, Vec::new(), Instant::now());
            }
            return SegmentOutcome::Waiting(files);
        }
        if let Some(b) = self.cache.generations.building.as_mut() {
            b.schema_changes
                .extend(decided.changes.iter().map(|c| c.describe()));
        }
        let key_moved = decided.key_transition != KeyTransition::Same;
        if (!decided.changes.is_empty() || self.cache.stored.is_none() || key_moved)
            && let Err(e) = self
                .record_version(&source, &schema, &decided, &files[0])
                .await
        {
            return SegmentOutcome::Failed(e, files);
        }
        if key_moved {
            self.alert_key_transition(&decided, &files[0]).await;
        }
        let applying = match decided.decision {
            Decision::Ignore => {
                self.cache.ignored = true;
                self.skip_ignored(&files);
                return SegmentOutcome::Done;
            }
            Decision::Hold { reason, .. } => {
                self.policy_hold(&reason, files.len());
                return SegmentOutcome::Waiting(files);
            }
            Decision::Wait { .. } => unreachable!("handled above"),
            Decision::Apply {
                ddl, load, mode, ..
            } => Applying {
                ddl,
                load,
                mode,
                history: decided.history,
            },
        };
        let fence = match self.lease_for(&files).await {
            Ok(Some(fence)) => fence,
            Ok(None) => return SegmentOutcome::Waiting(files),
            Err(e) => return SegmentOutcome::Failed(e, files),
        };
        let plan = self.plan(batch_id, &schema, &staged, applying, fence);
        self.commit(&plan, &staged, files, started, tally).await
    }

    fn plan(
        &self,
        batch_id: &str,
        schema: &FileSchema,
        staged: &[StagedFile],
        applying: Applying,
        fence: Option<Fence>,
    ) -> ApplyPlan {
        let ordering = self.ctx.config.ordering_column(&self.table).and_then(|o| {
            schema
                .table
                .columns
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(&o))
                .map(|c| c.name.clone())
        });
        let history = self.history(&applying, ordering.as_deref());
        let generation = self.cache.generations.current;
        let files = staged
            .iter()
            .map(|s| {
                let mut file = s.file.clone();
                file.order_key = generation_order_key(generation, &file.order_key);
                file
            })
            .collect();
        ApplyPlan {
            batch_id: batch_id.to_string(),
            table: self.table.clone(),
            ddl: applying.ddl,
            load: applying.load,
            mode: applying.mode,
            op_column: staged.iter().find_map(|s| s.schema.op.clone()),
            ordering_column: ordering,
            staged_columns: schema.table.columns.clone(),
            files,
            fence,
            into: self
                .cache
                .generations
                .building
                .as_ref()
                .map(|b| b.table.clone()),
            // A history table's deletes close versions and remove none.
            guard: self
                .delete_guard(&staged[0].file.key)
                .filter(|_| history.is_none()),
            history,
        }
    }

    /// How a history table's versions are written; None for a latest-row table.
    fn history(&self, applying: &Applying, ordering: Option<&str>) -> Option<History> {
        if !applying.history {
            return None;
        }
        let LoadMode::Merge { key } = &applying.mode else {
            return None;
        };
        let columns: Vec<String> = applying.load.iter().map(|l| l.target.clone()).collect();
        let key: Vec<String> = key.iter().map(|k| k.target.clone()).collect();
        Some(History {
            tracked: self.tracked_columns(&columns, &key, ordering),
        })
    }

    /// [`tracked_columns`] of this table, from target names and its config.
    pub(super) fn tracked_columns(
        &self,
        columns: &[String],
        key: &[String],
        ordering: Option<&str>,
    ) -> Vec<String> {
        let name = |c: &String| self.ctx.warehouse.column_name(c);
        let configured: Option<Vec<String>> = self
            .ctx
            .config
            .table(&self.table)
            .track_history_columns
            .map(|cs| cs.iter().map(name).collect());
        let ordering = ordering.map(|o| self.ctx.warehouse.column_name(o));
        tracked_columns(columns, key, ordering.as_deref(), configured.as_deref())
    }

    /// The destructive-change guard for a segment from `first` on: none while a reload
    /// builds a generation (the swap is weighed instead), nor for the batch a person
    /// released with `cdc-worker table release-guard`.
    fn delete_guard(&self, first: &str) -> Option<DeleteGuard> {
        if self.cache.generations.building.is_some() || self.guard_released(first) {
            return None;
        }
        self.ctx.config.guard.delete_guard()
    }

    fn guard_released(&self, first: &str) -> bool {
        self.cache
            .stored
            .as_ref()
            .and_then(|s| s.current.released.deletes_from.as_deref())
            == Some(first)
    }

    /// The schema policy held the table: its files wait until `schema accept`.
    fn policy_hold(&mut self, reason: &str, files: usize) {
        self.state.hold(reason, Vec::new(), Instant::now());
        let _ = self.ctx.events.send(EngineEvent::TableHeld {
            table: self.table.clone(),
            reason: reason.to_string(),
        });
        tracing::warn!(table = %self.table, reason, files, "table held by schema policy");
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
    ) -> Result<Decided, ApplyError> {
        let mut target = self
            .target()
            .await
            .map_err(ApplyError::warehouse("describing the target table"))?;
        // A reload's first segment: the new generation starts as the live table's columns
        // (what the schema policies decided so far), and the segment is planned against them.
        let mut create_like_live = None;
        if target.is_none() && self.cache.generations.building.is_some() {
            target = self
                .ctx
                .warehouse
                .describe(&self.table)
                .await
                .map_err(ApplyError::warehouse("describing the live table"))?;
            create_like_live = target.clone();
        }
        let key = self
            .ctx
            .keys
            .resolve(&self.table, source, target.as_ref())
            .await?;
        let table_config = self.ctx.config.table(&self.table);
        let policy = self.ctx.config.schema.resolve(table_config.schema.as_ref());
        let changes = self.source_changes(target.as_ref(), schema);
        let resolutions = self
            .cache
            .stored
            .as_ref()
            .map(|s| s.current.resolutions.clone())
            .unwrap_or_default();
        let recorded_key = self
            .cache
            .stored
            .as_ref()
            .and_then(|s| s.current.key.clone());
        let transition = key_transition(recorded_key.as_deref(), &key.columns, target.is_some());
        let warehouse = self.ctx.warehouse.clone();
        let column_name = move |s: &str| warehouse.column_name(s);
        let history = self.ctx.config.keeps_history(
            &self.table,
            target.as_ref().map(|t| t.is_history(&schema.table.columns)),
            !key.columns.is_empty(),
        );
        let mut decision = plan::plan(&PlanInput {
            target: target.as_ref(),
            file: schema,
            policy,
            source_changes: &changes,
            resolutions: &resolutions,
            key: &key.columns,
            column_name: &column_name,
            history,
            tracked: table_config.track_history_columns.as_deref(),
        });
        if let (Some(live), Decision::Apply { ddl, .. }) = (create_like_live, &mut decision) {
            ddl.insert(
                0,
                Ddl::CreateTable {
                    columns: live.columns,
                    primary_key: live.primary_key,
                },
            );
        }
        Ok(Decided {
            decision,
            changes,
            policy,
            key: key.columns,
            key_transition: transition,
            repeated_keys: 0,
            history,
        })
    }

    /// The segment's changes against the last accepted schema, else what the target has.
    /// A column becoming nullable is reported (once: the recorded schema keeps it nullable);
    /// a file that happens to mark a column REQUIRED is not a change.
    fn source_changes(
        &self,
        target: Option<&TargetTable>,
        schema: &FileSchema,
    ) -> Vec<SchemaChange> {
        let baseline = self
            .cache
            .stored
            .as_ref()
            .map(|s| s.current.schema())
            .or_else(|| target.map(|t| TableSchema::new(t.columns.clone())));
        diff(baseline.as_ref(), &schema.table)
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
            .collect()
    }

    /// A key that appears (or changes) on a table that exists: the rows appended before
    /// may repeat a key value, which a MERGE cannot apply a change to. Repeated values hold
    /// the table until someone removes them; none let the table go on, merged by key.
    async fn check_key_transition(&mut self, mut decided: Decided) -> Result<Decided, ApplyError> {
        let (KeyTransition::Appeared { key } | KeyTransition::Changed { key, .. }) =
            &decided.key_transition
        else {
            return Ok(decided);
        };
        if !matches!(decided.decision, Decision::Apply { .. }) {
            return Ok(decided);
        }
        if decided.history {
            // Its versions repeat every key: counting them would say nothing, and removing
            // "repeated" rows would delete history.
            decided.decision = Decision::Wait {
                reason: format!(
                    "the key of this history table is now ({}): its versions are kept per key, so a new key needs a new history; rebuild the table (docs/history.md) or set the key back",
                    key.join(", ")
                ),
            };
            return Ok(decided);
        }
        let columns: Vec<String> = key
            .iter()
            .map(|k| self.ctx.warehouse.column_name(k))
            .collect();
        decided.repeated_keys = self
            .ctx
            .warehouse
            .repeated_keys(self.physical_table(), &columns)
            .await
            .map_err(ApplyError::warehouse(
                "checking the new key for repeated values",
            ))?;
        if decided.repeated_keys > 0 {
            decided.decision = Decision::Wait {
                reason: format!(
                    "the table now has a key ({}), but {} key values appear more than once among its rows: a change could not tell which row it is for",
                    key.join(", "),
                    decided.repeated_keys
                ),
            };
        }
        Ok(decided)
    }

    /// The table's lease, when leases are on: `Ok(Some(fence))` to go on (no fence with
    /// leases off), `Ok(None)` when another worker holds the table or committed to it
    /// meanwhile (the files wait and the lane tries again shortly).
    pub(super) async fn lease_for(
        &mut self,
        files: &[PendingFile],
    ) -> Result<Option<Option<Fence>>, ApplyError> {
        let Some(leases) = &self.ctx.leases else {
            return Ok(Some(None));
        };
        let Some(fence) = leases.acquire(&self.table).await? else {
            // Keep the files here (their visibility kept alive): releasing them to the
            // queue would count a receive each time and, with several tasks, could push
            // healthy files into the dead-letter queue. Whoever applies next includes every
            // earlier file from the S3 listing.
            let wait = Duration::from_millis(500 + fastrand::u64(..1500));
            self.state.retry_at(Vec::new(), Instant::now() + wait);
            metrics::counter!("cdc_worker_lease_busy_total", "table" => self.table.clone())
                .increment(1);
            tracing::debug!(table = %self.table, wait_ms = wait.as_millis() as u64, "table leased by another worker; retrying shortly");
            return Ok(None);
        };
        match self.moved_while_unleased(files).await {
            Ok(false) => Ok(Some(Some(fence))),
            Ok(true) => {
                // Start again from fresh state: the ledger check, the order check and the
                // gap listing all see what the other task committed.
                self.release_lease().await;
                tracing::info!(table = %self.table, "another task applied this table meanwhile; re-reading its state");
                self.cache.loaded = false;
                self.cache.listing = None;
                Ok(None)
            }
            Err(e) => {
                self.release_lease().await;
                Err(e)
            }
        }
    }

    /// With several tasks, another one may have applied this table between this lane's
    /// ledger check and its taking the lease: it read state without the lease, so it
    /// compares that state with the warehouse again now that it holds it.
    async fn moved_while_unleased(&self, files: &[PendingFile]) -> Result<bool, ApplyError> {
        let keys: Vec<String> = files.iter().map(|f| f.file.key.clone()).collect();
        let warehouse = &self.ctx.warehouse;
        let recorded = warehouse
            .applied(&self.table, &keys)
            .await
            .map_err(ApplyError::warehouse("reading the ledger"))?;
        // A rejected file's fixed re-upload (new ETag) is still ours to apply.
        let taken = files.iter().any(|f| {
            recorded
                .get(&f.file.key)
                .is_some_and(|r| !r.rejected() || r.etag == f.file.etag)
        });
        let last = warehouse
            .last_applied(&self.table)
            .await
            .map_err(ApplyError::warehouse("reading the last applied file"))?;
        let current = self.cache.generations.current;
        let ledger_generation = last.as_ref().map_or(1, |(o, _)| split_order_key(o).0);
        let moved = match &last {
            // Nothing applied to this generation yet (a reload's start): as expected
            // while this lane has nothing applied either.
            Some(_) if ledger_generation < current => self.state.last_applied().is_some(),
            Some((order, key)) if ledger_generation == current => {
                let last = (split_order_key(order).1.to_string(), key.clone());
                Some(&last) != self.state.last_applied()
            }
            Some(_) => true,
            None => self.state.last_applied().is_some(),
        };
        Ok(taken || moved || self.reload_swapped_elsewhere(ledger_generation).await?)
    }

    /// Whether another task replaced the table by the generation this lane builds: the
    /// generation has commits but its table is gone.
    async fn reload_swapped_elsewhere(&self, ledger_generation: u32) -> Result<bool, ApplyError> {
        let Some(b) = &self.cache.generations.building else {
            return Ok(false);
        };
        if ledger_generation < b.generation {
            return Ok(false);
        }
        let table = self
            .ctx
            .warehouse
            .describe(&b.table)
            .await
            .map_err(ApplyError::warehouse("looking for a reload's table"))?;
        Ok(table.is_none())
    }

    pub(super) async fn release_lease(&self) {
        if let Some(leases) = &self.ctx.leases {
            leases.release(&self.table).await;
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
        tally: &mut Tally,
    ) -> SegmentOutcome {
        let result = self.run_plan(plan, staged).await;
        self.release_lease().await;
        let stats = match result {
            Ok(stats) => stats,
            Err(WarehouseError::Guarded { deletes, rows }) => {
                self.hold_for_deletes(&files[0], deletes, rows).await;
                return SegmentOutcome::Waiting(files);
            }
            Err(e) => {
                self.cache.target = None;
                return SegmentOutcome::Failed(
                    ApplyError::warehouse("applying the batch")(e),
                    files,
                );
            }
        };
        let keys: Vec<String> = files.iter().map(|f| f.file.key.clone()).collect();
        let variants = variant_columns(plan);
        BatchApplied {
            table: &self.table,
            batch_id: &plan.batch_id,
            files: keys.len(),
            variants: &variants,
            stats: &stats,
            elapsed: started.elapsed(),
        }
        .emit();
        if !plan.ddl.is_empty() {
            self.cache.target = None;
        }
        self.cache.mode = Some(plan.mode.clone());
        let order_keys = staged.iter().map(|s| s.file.order_key.as_str());
        self.cache.generations.committed(order_keys, Instant::now());
        if self.guard_released(&files[0].file.key) {
            self.clear_release(|r| r.deletes_from = None).await;
        }
        if let Some(recovered) = self.state.committed(&files, Instant::now()) {
            self.alert_recovered(&recovered, &files[0]).await;
        }
        // Before the files resolve: the last resolution starts the message's deletion,
        // the stage after the ones recorded here.
        self.record_commit(&files, staged).await;
        for f in &files {
            f.resolve(FileOutcome::Committed);
        }
        self.report_stats(&stats, &files[0]).await;
        self.report_missing_op(staged, &files).await;
        tally.keys.extend(keys);
        tally.statements += stats.statements;
        tally.rows += stats.rows_staged;
        SegmentOutcome::Done
    }

    async fn run_plan(
        &self,
        plan: &ApplyPlan,
        staged: &[StagedFile],
    ) -> Result<ApplyStats, WarehouseError> {
        let mut attempt = 0;
        loop {
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
                other => return other,
            }
        }
    }

    /// What the statistics of a commit tell people: rows skipped for a NULL key, and keys
    /// whose last change no ordering column decides.
    async fn report_stats(&mut self, stats: &ApplyStats, first: &PendingFile) {
        if stats.null_key_rows > 0 {
            self.report_null_keys(stats.null_key_rows, first).await;
        }
        if stats.ambiguous_keys == 0 {
            return;
        }
        let keys = match stats.ambiguous_keys {
            1 => "1 key".to_string(),
            n => format!("{n} keys"),
        };
        let ordered = self.ctx.config.ordering_column(&self.table).is_some();
        let why = if ordered {
            "with the same ordering value"
        } else {
            "and no ordering column decides which change is last"
        };
        let reason = format!(
            "{keys} changed more than once inside one file {why}; the result for those keys may not be the latest change"
        );
        tracing::warn!(table = %self.table, ambiguous_keys = stats.ambiguous_keys, "{reason}");
        // A table without an ordering column stays that way: one alert per table and process.
        let cause = format!("{}/{}", AlertKind::AmbiguousOrder.as_str(), self.table);
        if self.ctx.first_time(cause) {
            let steps = if ordered {
                "The ordering column ties for these changes (TimestampColumnName is the commit time, shared by a transaction's changes): add an AR_H_CHANGE_SEQ column, unique per change, and order by it."
            } else {
                "Enable a DMS TimestampColumnName or an AR_H_CHANGE_SEQ column and set dms.ordering_column."
            };
            self.alert_file(
                AlertKind::AmbiguousOrder,
                Severity::Warning,
                first,
                &reason,
                Some(steps),
            )
            .await;
        }
    }

    /// A CDC file without the operation column: its rows were applied as inserts, so the
    /// source's deletes cannot be seen. Documented for `CdcInsertsOnly`, a surprise
    /// otherwise: one alert per table, naming the first such file.
    async fn report_missing_op(&mut self, staged: &[StagedFile], files: &[PendingFile]) {
        let Some(missing) = staged
            .iter()
            .find(|s| !s.file.full_load && s.schema.op.is_none())
        else {
            return;
        };
        let Some(file) = files.iter().find(|f| f.file.key == missing.file.key) else {
            return;
        };
        let op = &self.ctx.config.dms.op_column;
        let reason = format!(
            "a CDC file without an `{op}` column (by that name, or in another case as the first column): its rows were applied as inserts and updates; deletes of the source cannot be seen"
        );
        // A CdcInsertsOnly table has no Op in any file: said once, not at every batch.
        let cause = format!("{}/{}", AlertKind::OpColumnMissing.as_str(), self.table);
        if !self.ctx.first_time(cause) {
            tracing::debug!(table = %self.table, file = %file.file.key, "{reason}");
            return;
        }
        tracing::warn!(table = %self.table, file = %file.file.key, "{reason}");
        let steps = format!(
            "DMS leaves `Op` out only with CdcInsertsOnly: if the table's deletes matter, turn it off on the endpoint and reload the table; if the column has another name, set dms.op_column (now `{op}`)."
        );
        self.alert_file(
            AlertKind::OpColumnMissing,
            Severity::Warning,
            file,
            &reason,
            Some(&steps),
        )
        .await;
    }

    /// Rows whose key has a NULL were skipped (a DMS key is a primary key, so such a row
    /// changes no row): counted, logged, and alerted once per file.
    async fn report_null_keys(&mut self, rows: u64, first: &PendingFile) {
        metrics::counter!("cdc_worker_null_key_rows_total", "table" => self.table.clone())
            .increment(rows);
        let rows_text = match rows {
            1 => "1 row".to_string(),
            n => format!("{n} rows"),
        };
        let reason = format!(
            "{rows_text} with a NULL in the key column(s) were skipped (a key identifies a row; a NULL key changes none)"
        );
        tracing::warn!(table = %self.table, null_key_rows = rows, "{reason}");
        let steps = "Check the table's key ([tables.NAME] key, table_keys.json): a DMS key is the source's primary key and is never NULL. If the source key is right, the rows were not changes of any row.";
        self.alert_file(
            AlertKind::RowsSkipped,
            Severity::Warning,
            first,
            &reason,
            Some(steps),
        )
        .await;
    }
}

/// The plan's (target column, variant column) pairs: values of the column that do not cast
/// to its type are loaded into the variant column.
fn variant_columns(plan: &ApplyPlan) -> Vec<(String, String)> {
    plan.load
        .iter()
        .filter_map(|variant| match &variant.expr {
            LoadExpr::Variant { column, .. } => plan
                .load
                .iter()
                .find(|l| matches!(&l.expr, LoadExpr::TryCast { column: c, .. } if c == column))
                .map(|l| (l.target.clone(), variant.target.clone())),
            _ => None,
        })
        .collect()
}
