//! One table's lane: collects the table's files in DMS order, coalesces them into batches
//! and applies one batch at a time. Being the only task that applies its table (per
//! process; the S3 lease extends that across processes), the lane is the per-table lock.
//!
//! Rules, in the order they apply to a batch:
//! 1. Files already in the ledger are acknowledged (redeliveries, identical re-uploads).
//! 2. A file ordered before the last applied file of its table is held and alerted
//!    (applying it would rewind rows), unless it is one the lane itself failed earlier.
//! 3. Files are staged; a missing object is skipped (alert), an unreadable one rejected
//!    (alert, message left for the DLQ); a transient failure stops the batch there.
//! 4. The staged files are split where their schema changes; each segment is planned
//!    (schema policy, DDL, casts) and applied with its ledger entries in one commit.
//! 5. A failed segment releases its files, and every later file of the table, with
//!    backoff; the lane then holds later files until the failed ones are applied.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::plan::{self, ApplyPlan, Decision, PlanInput};
use super::{ApplyContext, Engine, EngineEvent, LaneInfo, PendingFile, new_batch_id};
use crate::alerts::{Alert, AlertKind, Severity};
use crate::dms::{DmsOrder, KeyClass, SourceTable, classify_key};
use crate::queue::FileOutcome;
use crate::schema::diff::{SchemaChange, diff, folding_collision};
use crate::schema::store::{Recorded, SchemaVersion, Stored, TableStatus};
use crate::schema::types::FileSchema;
use crate::storage::bare_etag;
use crate::telemetry::{BatchApplied, BatchFailed, FileSkipped};
use crate::warehouse::{
    BatchFile, LedgerRecord, StageError, StagedFile, TargetTable, WarehouseError,
};

/// How often a held table re-reads its status from S3.
const HOLD_RECHECK: Duration = Duration::from_secs(10);
/// Consecutive failures after which a table is reported as failing.
const FAILING_AFTER: u32 = 3;
/// Conflicts retried in place before a batch counts as failed.
const CONFLICT_RETRIES: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PendingKey {
    order: DmsOrder,
    key: String,
    etag: String,
}

#[derive(Default)]
struct TableState {
    loaded: bool,
    stored: Option<Stored>,
    /// `None`: not described yet (or invalidated by a failure).
    target: Option<Option<TargetTable>>,
    held: Option<String>,
    held_checked: Option<Instant>,
    ignored: bool,
    consecutive_failures: u32,
    failing_alerted: bool,
    /// The earliest file of a failed batch: later files wait until it is applied.
    blocked_from: Option<DmsOrder>,
    /// The last applied file by DMS order, (order key, S3 key); from the ledger at start.
    last_applied: Option<(String, String)>,
    /// Files the lane itself failed: they may come back after later files were held.
    retrying: HashSet<String>,
    /// Files already alerted about (rejected, out of order), to alert once per file.
    alerted: HashSet<String>,
    /// Not before this instant (lease held elsewhere, or a lane-level retry backoff).
    not_before: Option<Instant>,
}

pub(super) struct Lane {
    table: String,
    ctx: Arc<ApplyContext>,
    rx: mpsc::UnboundedReceiver<PendingFile>,
    info: Arc<Mutex<LaneInfo>>,
    engine: Weak<Engine>,
    stop: CancellationToken,
    pending: BTreeMap<PendingKey, PendingFile>,
    state: TableState,
    source: Option<SourceTable>,
}

impl Lane {
    pub(super) fn new(
        table: String,
        ctx: Arc<ApplyContext>,
        rx: mpsc::UnboundedReceiver<PendingFile>,
        info: Arc<Mutex<LaneInfo>>,
        engine: Weak<Engine>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            table,
            ctx,
            rx,
            info,
            engine,
            stop,
            pending: BTreeMap::new(),
            state: TableState::default(),
            source: None,
        }
    }

    pub(super) async fn run(mut self) {
        let idle = self.ctx.config.worker.lane_idle_timeout;
        loop {
            self.publish_info();
            if self.pending.is_empty() {
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => break,
                    file = self.rx.recv() => match file {
                        Some(f) => self.add(f),
                        None => break,
                    },
                    _ = tokio::time::sleep(idle) => {
                        let Some(engine) = self.engine.upgrade() else { break };
                        match engine.retire(&self.table, &mut self.rx) {
                            Some(f) => self.add(f),
                            None => return,
                        }
                    }
                }
                continue;
            }
            // Recomputed after every arrival: a file coming back can make a batch due.
            loop {
                let wait_until = self.next_attempt();
                if self.batch_ready() || Instant::now() >= wait_until {
                    break;
                }
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => break,
                    file = self.rx.recv() => match file {
                        Some(f) => self.add(f),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(wait_until.into()) => break,
                }
            }
            if self.stop.is_cancelled() {
                break;
            }
            if self.state.held.is_some() && !self.recheck_hold().await {
                continue;
            }
            let batch = self.take_batch();
            if batch.is_empty() {
                continue;
            }
            let permit = tokio::select! {
                p = self.ctx.permits.clone().acquire_owned() => p.expect("semaphore open"),
                _ = self.stop.cancelled() => {
                    self.put_back(batch);
                    break;
                }
            };
            self.apply_batch(batch).await;
            drop(permit);
        }
        self.release_all();
    }

    fn add(&mut self, file: PendingFile) {
        let key = PendingKey {
            order: file.dms.order(),
            key: file.file.key.clone(),
            etag: file.file.etag.clone(),
        };
        match self.pending.get_mut(&key) {
            // The same file announced again (duplicate delivery): one apply, all acked.
            Some(existing) => existing.messages.extend(file.messages),
            None => {
                if self.source.is_none() {
                    self.source = Some(file.source.clone());
                }
                self.pending.insert(key, file);
            }
        }
    }

    fn put_back(&mut self, files: Vec<PendingFile>) {
        for f in files {
            self.add(f);
        }
    }

    fn eligible(&self) -> impl Iterator<Item = &PendingFile> {
        let blocked = self.state.blocked_from.clone();
        self.pending
            .iter()
            .take_while(move |(k, _)| blocked.as_ref().is_none_or(|b| k.order <= *b))
            .map(|(_, f)| f)
    }

    fn batch_ready(&self) -> bool {
        let waiting = self.state.not_before.is_some_and(|u| u > Instant::now());
        if self.state.held.is_some() || waiting {
            return false;
        }
        let cfg = &self.ctx.config.batch;
        let (mut files, mut bytes) = (0usize, 0u64);
        for f in self.eligible() {
            files += 1;
            bytes += f.file.size;
            if files >= cfg.max_files || bytes >= cfg.max_bytes.as_u64() {
                return true;
            }
        }
        false
    }

    /// When to try a batch: after the linger time of the oldest eligible file, or at the
    /// next hold re-check.
    fn next_attempt(&self) -> Instant {
        let now = Instant::now();
        if let Some(checked) = self
            .state
            .held_checked
            .filter(|_| self.state.held.is_some())
        {
            return (checked + HOLD_RECHECK).max(now);
        }
        if let Some(until) = self.state.not_before.filter(|u| *u > now) {
            return until;
        }
        match self.eligible().map(|f| f.arrived).min() {
            Some(oldest) => oldest + self.ctx.config.batch.linger,
            // Everything waits behind a failed file: wake up now and then to report.
            None => now + Duration::from_secs(30),
        }
    }

    fn take_batch(&mut self) -> Vec<PendingFile> {
        let cfg = &self.ctx.config.batch;
        let keys: Vec<PendingKey> = {
            let blocked = self.state.blocked_from.clone();
            let mut bytes = 0u64;
            let mut keys = Vec::new();
            for (k, f) in &self.pending {
                if blocked.as_ref().is_some_and(|b| k.order > *b) {
                    break;
                }
                if !keys.is_empty()
                    && (keys.len() >= cfg.max_files || bytes + f.file.size > cfg.max_bytes.as_u64())
                {
                    break;
                }
                bytes += f.file.size;
                keys.push(k.clone());
            }
            keys
        };
        keys.iter().filter_map(|k| self.pending.remove(k)).collect()
    }

    /// On shutdown: every waiting file goes back to the queue at once.
    fn release_all(&mut self) {
        self.rx.close();
        while let Ok(f) = self.rx.try_recv() {
            self.add(f);
        }
        let count = self.pending.len();
        for (_, f) in std::mem::take(&mut self.pending) {
            f.resolve(FileOutcome::Retry(Some(Duration::ZERO)));
        }
        if count > 0 {
            tracing::info!(table = %self.table, files = count, "lane stopped; waiting files released for redelivery");
        }
        self.publish_info();
    }

    fn publish_info(&self) {
        let mut info = self.info.lock().expect("lane info");
        info.pending_files = self.pending.len();
        info.held = self.state.held.clone();
        info.consecutive_failures = self.state.consecutive_failures;
        info.oldest_pending = self.pending.values().map(|f| f.arrived).min();
        if let Some(oldest) = info.oldest_pending {
            crate::telemetry::record_lag(&self.table, oldest.elapsed());
        } else {
            crate::telemetry::record_lag(&self.table, Duration::ZERO);
        }
        metrics::gauge!("cdc_worker_table_held", "table" => self.table.clone())
            .set(if self.state.held.is_some() { 1.0 } else { 0.0 });
    }

    /// Re-reads a held table's status; true when it was released.
    async fn recheck_hold(&mut self) -> bool {
        self.state.held_checked = Some(Instant::now());
        match self.ctx.schemas.load(&self.table).await {
            Ok(Some(stored)) if !matches!(stored.current.status, TableStatus::Held { .. }) => {
                tracing::info!(table = %self.table, "table released; applying its waiting files");
                self.state.held = None;
                self.state.ignored = matches!(stored.current.status, TableStatus::Ignored { .. });
                self.state.stored = Some(stored);
                self.state.target = None;
                true
            }
            Ok(_) => {
                tracing::info!(table = %self.table, files = self.pending.len(), reason = ?self.state.held, "table held; waiting for `cdc-worker schema accept`");
                false
            }
            Err(e) => {
                tracing::warn!(table = %self.table, error = %e, "cannot read the table's schema status");
                false
            }
        }
    }

    /// Loads what the lane needs to know about its table once: stored schema, status,
    /// last applied file.
    async fn load_state(&mut self) -> Result<(), String> {
        if self.state.loaded {
            return Ok(());
        }
        let stored = self
            .ctx
            .schemas
            .load(&self.table)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(s) = &stored {
            match &s.current.status {
                TableStatus::Held { reason, .. } => {
                    self.state.held = Some(reason.clone());
                    self.state.held_checked = Some(Instant::now());
                }
                TableStatus::Ignored { .. } => self.state.ignored = true,
                TableStatus::Active => {}
            }
        }
        self.state.stored = stored;
        self.state.last_applied = self
            .ctx
            .warehouse
            .last_applied(&self.table)
            .await
            .map_err(|e| e.to_string())?;
        self.state.loaded = true;
        Ok(())
    }

    /// Adds files of this table that S3 already holds, ordered before the batch's last
    /// file, and neither applied nor announced yet: notifications arrive out of order, but
    /// DMS writes a table's files one after the other, so an earlier file in the listing is
    /// one whose notification is late. Its notification, when it comes, finds it in the
    /// ledger.
    async fn fill_gaps(&mut self, batch: &mut Vec<PendingFile>) -> Result<(), String> {
        let Some(last) = batch.iter().map(|f| f.dms.order()).max() else {
            return Ok(());
        };
        let (bucket, folder, source) = {
            let f = &batch[0];
            (
                f.file.bucket.clone(),
                f.dms.table_prefix.clone(),
                f.source.clone(),
            )
        };
        let prefix = &self.ctx.config.source.prefix;
        let start_after = self
            .state
            .last_applied
            .as_ref()
            .and_then(|(_, key)| match classify_key(prefix, key) {
                Ok(KeyClass::Dms(k)) if k.key_order_is_dms_order() => Some(key.clone()),
                _ => None,
            });
        let listed = self
            .ctx
            .store
            .list(&bucket, &folder, start_after.as_deref())
            .await
            .map_err(|e| format!("listing s3://{bucket}/{folder}: {e}"))?;
        let known: HashSet<String> = batch.iter().map(|f| f.file.key.clone()).collect();
        let mut gaps = Vec::new();
        for object in listed {
            if known.contains(&object.key) {
                continue;
            }
            let Ok(KeyClass::Dms(dms)) = classify_key(prefix, &object.key) else {
                continue;
            };
            let order = dms.order();
            let after_last_applied = self
                .state
                .last_applied
                .as_ref()
                .is_none_or(|(l, _)| order.sort_key() > *l);
            if dms.source != source || order >= last || !after_last_applied {
                continue;
            }
            gaps.push(PendingFile {
                table: self.table.clone(),
                source: source.clone(),
                file: BatchFile {
                    bucket: bucket.clone(),
                    key: object.key,
                    size: object.size,
                    etag: bare_etag(&object.etag).to_string(),
                    order_key: order.sort_key(),
                },
                dms,
                messages: vec![],
                arrived: Instant::now(),
            });
        }
        if gaps.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = gaps.iter().map(|g| g.file.key.clone()).collect();
        let applied = self
            .ctx
            .warehouse
            .applied(&self.table, &keys)
            .await
            .map_err(|e| e.to_string())?;
        // Anything in the ledger (applied, or rejected as unreadable) is no gap.
        gaps.retain(|g| !applied.contains_key(&g.file.key));
        if gaps.is_empty() {
            return Ok(());
        }
        tracing::info!(
            table = %self.table,
            files = gaps.len(),
            first = %gaps[0].file.key,
            "earlier files found in the S3 listing before their notifications; applying them in order"
        );
        metrics::counter!("cdc_worker_gap_files_total", "table" => self.table.clone())
            .increment(gaps.len() as u64);
        batch.extend(gaps);
        batch.sort_by_key(|f| f.dms.order());
        Ok(())
    }

    async fn target(&mut self) -> Result<Option<TargetTable>, WarehouseError> {
        if let Some(t) = &self.state.target {
            return Ok(t.clone());
        }
        let t = self.ctx.warehouse.describe(&self.table).await?;
        self.state.target = Some(t.clone());
        Ok(t)
    }

    async fn apply_batch(&mut self, batch: Vec<PendingFile>) {
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
    async fn apply_batch_inner(
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
            for f in &batch {
                FileSkipped {
                    table: &self.table,
                    key: &f.file.key,
                    reason: "table ignored by policy",
                }
                .emit();
                f.resolve(FileOutcome::Skipped);
            }
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
                        reason: "already applied (ledger)",
                    }
                    .emit();
                    f.resolve(FileOutcome::Skipped);
                }
                Some(LedgerRecord { etag, .. }) => {
                    let reason = format!(
                        "replaced after it was applied (ledger ETag {etag}, now {}); not applied again: use `cdc-worker replay --force` if the new content must be loaded",
                        f.file.etag
                    );
                    FileSkipped {
                        table: &self.table,
                        key: &f.file.key,
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
    async fn apply_segments(
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

    async fn apply_segment(
        &mut self,
        batch_id: &str,
        segment: Vec<(PendingFile, StagedFile)>,
        committed: &mut Tally,
    ) -> SegmentOutcome {
        let schema: FileSchema = segment[0].1.schema.clone();
        let source = segment[0].0.source.clone();
        let started = Instant::now();
        let files: Vec<PendingFile> = segment.iter().map(|(f, _)| f.clone()).collect();

        if let Some((a, b)) = folding_collision(&schema.table) {
            let reason = format!(
                "columns `{a}` and `{b}` are the same column once case is folded; rename one at the source or with a DMS transformation rule"
            );
            return self.hold(files, &reason, vec![]).await;
        }
        if let Some(bad) = schema.table.columns.iter().find_map(|c| {
            crate::warehouse::sql::check_name(&c.name, self.ctx.warehouse.max_identifier_len())
                .err()
        }) {
            let reason = format!("a column name cannot be used: {bad}");
            return self.hold(files, &reason, vec![]).await;
        }

        let target = match self.target().await {
            Ok(t) => t,
            Err(e) => return self.segment_failed(batch_id, files, &e.to_string()).await,
        };
        let key = match self
            .ctx
            .keys
            .resolve(&self.table, &source, target.as_ref())
            .await
        {
            Ok(k) => k,
            Err(e) => return self.segment_failed(batch_id, files, &e.to_string()).await,
        };
        let table_config = self.ctx.config.table(&self.table);
        let policy = self.ctx.config.schema.resolve(table_config.schema.as_ref());

        // Source changes: against the last accepted schema, else what the target has.
        let baseline = self
            .state
            .stored
            .as_ref()
            .map(|s| s.current.schema())
            .or_else(|| {
                target
                    .as_ref()
                    .map(|t| crate::schema::types::TableSchema::new(t.columns.clone()))
            });
        // A column becoming nullable is reported (once: the recorded schema keeps it
        // nullable); a file that happens to mark a column REQUIRED is not a change.
        let changes: Vec<SchemaChange> = match &baseline {
            Some(b) => diff(Some(b), &schema.table)
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
                .collect(),
            None => diff(None, &schema.table),
        };
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
            file: &schema,
            policy,
            source_changes: &changes,
            resolutions: &resolutions,
            key: &key.columns,
            column_name: &column_name,
        });

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
                for f in &files {
                    FileSkipped {
                        table: &self.table,
                        key: &f.file.key,
                        reason: "table ignored by policy",
                    }
                    .emit();
                    f.resolve(FileOutcome::Skipped);
                }
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

        let fence = match &self.ctx.leases {
            Some(leases) => match leases.acquire(&self.table).await {
                Ok(Some(fence)) => Some(fence),
                Ok(None) => {
                    // Another worker is applying this table. Keep the files here (their
                    // visibility kept alive) and try again shortly: releasing them to the
                    // queue would count a receive each time and, with several tasks,
                    // could push healthy files into the dead-letter queue. Whoever applies
                    // next includes every earlier file from the S3 listing.
                    let wait = Duration::from_millis(500 + fastrand::u64(..1500));
                    self.state.not_before = Some(Instant::now() + wait);
                    metrics::counter!("cdc_worker_lease_busy_total", "table" => self.table.clone())
                        .increment(1);
                    tracing::debug!(table = %self.table, wait_ms = wait.as_millis() as u64, "table leased by another worker; retrying shortly");
                    return SegmentOutcome::Stop(StopKind::Held(files));
                }
                Err(e) => return self.segment_failed(batch_id, files, &e.to_string()).await,
            },
            None => None,
        };

        let op_column = schema
            .has_op
            .then(|| self.ctx.config.dms.op_column.clone())
            .or_else(|| {
                segment
                    .iter()
                    .any(|(_, s)| s.schema.has_op)
                    .then(|| self.ctx.config.dms.op_column.clone())
            });
        let ordering = self.ctx.config.ordering_column(&self.table).and_then(|o| {
            schema
                .table
                .columns
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(&o))
                .map(|c| c.name.clone())
        });
        let apply_plan = ApplyPlan {
            batch_id: batch_id.to_string(),
            table: self.table.clone(),
            ddl,
            load,
            mode,
            op_column,
            ordering_column: ordering,
            staged_columns: schema.table.columns.clone(),
            files: segment.iter().map(|(_, s)| s.file.clone()).collect(),
            fence,
        };
        let staged: Vec<StagedFile> = segment.iter().map(|(_, s)| s.clone()).collect();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let lease_guard = self.ctx.leases.as_ref().map(|l| l.keep_alive(&self.table));
            let result = self.ctx.warehouse.apply(&apply_plan, &staged).await;
            drop(lease_guard);
            match result {
                Err(WarehouseError::Conflict(e)) if attempt < CONFLICT_RETRIES => {
                    tracing::debug!(table = %self.table, batch_id, error = %e, "transaction conflict; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
                other => break other,
            }
        };
        if let Some(leases) = &self.ctx.leases {
            leases.release(&self.table).await;
        }
        match result {
            Ok(stats) => {
                let keys: Vec<String> = files.iter().map(|f| f.file.key.clone()).collect();
                BatchApplied {
                    table: &self.table,
                    batch_id,
                    files: &keys,
                    stats: &stats,
                    elapsed: started.elapsed(),
                }
                .emit();
                if !apply_plan.ddl.is_empty() {
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
                    self.alert_file(AlertKind::TableFailing, Severity::Warning, &files[0], &reason, Some("Enable a DMS TimestampColumnName or an AR_H_CHANGE_SEQ column and set dms.ordering_column.")).await;
                }
                committed.keys.extend(keys);
                committed.statements += stats.statements;
                committed.rows += stats.rows_staged;
                SegmentOutcome::Done
            }
            Err(e) => {
                self.state.target = None;
                self.segment_failed(batch_id, files, &e.to_string()).await
            }
        }
    }

    async fn record_version(
        &mut self,
        source: &SourceTable,
        schema: &FileSchema,
        changes: &[SchemaChange],
        decision: &Decision,
        policy: crate::schema::policy::SchemaPolicy,
        first: &PendingFile,
    ) -> Result<(), String> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (status, actions, held_reason) = match decision {
            Decision::Apply { actions, .. } => (TableStatus::Active, actions.clone(), None),
            Decision::Hold { reason, kinds } => (
                TableStatus::Held {
                    version: 0,
                    reason: reason.clone(),
                    since: now.clone(),
                    kinds: kinds.clone(),
                },
                vec![plan::Action::Held {
                    reason: reason.clone(),
                }],
                Some(reason.clone()),
            ),
            Decision::Ignore => (
                TableStatus::Ignored { since: now.clone() },
                vec![plan::Action::IgnoredTable],
                None,
            ),
        };
        let previous = self.state.stored.clone();
        // Nullability only ever relaxes in the record.
        let mut columns = schema.table.columns.clone();
        if let Some(p) = &previous {
            for c in &mut columns {
                if p.current.columns.iter().any(|o| {
                    crate::schema::diff::fold(&o.name) == crate::schema::diff::fold(&c.name)
                        && o.nullable
                }) {
                    c.nullable = true;
                }
            }
        }
        let mut version = SchemaVersion {
            table: self.table.clone(),
            version: 0,
            source: Some(source.to_string()),
            columns,
            changes: changes.to_vec(),
            actions: actions
                .iter()
                .map(|a| serde_json::to_value(a).unwrap_or_default())
                .collect(),
            policy: Some(policy),
            file: Some(first.file.uri()),
            detected_at: now,
            status,
        };
        if let TableStatus::Held { version: v, .. } = &mut version.status {
            *v = previous.as_ref().map(|p| p.current.version).unwrap_or(0) + 1;
        }
        let recorded = self
            .ctx
            .schemas
            .record(previous.as_ref(), version.clone())
            .await
            .map_err(|e| e.to_string())?;
        match recorded {
            Recorded::Created(stored) => {
                let number = stored.current.version;
                self.state.stored = Some(stored);
                if changes.is_empty() {
                    // First sight of a table that already existed: a baseline, no alert.
                    return Ok(());
                }
                let mut alert = Alert::new(
                    AlertKind::SchemaChange,
                    if held_reason.is_some() {
                        Severity::Error
                    } else if changes
                        .iter()
                        .any(|c| matches!(c, SchemaChange::NewTable { .. }))
                    {
                        Severity::Info
                    } else {
                        Severity::Warning
                    },
                    &self.table,
                    format!(
                        "{}: {}",
                        self.table,
                        changes
                            .iter()
                            .map(|c| c.describe())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                );
                alert.source = Some(source.to_string());
                alert.schema_version = Some(number);
                alert.changes = changes.to_vec();
                alert.actions = actions
                    .iter()
                    .map(|a| {
                        let mut v = serde_json::to_value(a).unwrap_or_default();
                        if let Some(obj) = v.as_object_mut() {
                            obj.insert("description".into(), a.describe().into());
                        }
                        v
                    })
                    .collect();
                alert.policy = Some(policy);
                alert.file = Some(first.file.uri());
                alert.held = held_reason.is_some();
                if held_reason.is_some() {
                    alert.next_steps = Some(format!(
                        "Files of `{t}` wait (nothing is lost). Review the change, then run `cdc-worker schema accept {t}` to apply it as the evolve preset would (add `--incompatible cast|variant|ignore` for type changes), or change the table's policy in the config and accept.",
                        t = self.table
                    ));
                }
                self.ctx.alerts.publish(&alert).await;
                metrics::counter!("cdc_worker_schema_changes_total", "table" => self.table.clone())
                    .increment(1);
            }
            Recorded::Lost(current) => {
                // Another worker recorded it (and alerted); adopt its view.
                if let Some(c) = &current
                    && let TableStatus::Held { reason, .. } = &c.current.status
                {
                    self.state.held = Some(reason.clone());
                    self.state.held_checked = Some(Instant::now());
                }
                self.state.stored = current;
            }
        }
        Ok(())
    }

    async fn hold(
        &mut self,
        files: Vec<PendingFile>,
        reason: &str,
        _kinds: Vec<crate::schema::diff::ChangeKind>,
    ) -> SegmentOutcome {
        if self.state.alerted.insert(format!("hold:{reason}")) {
            let mut alert = Alert::new(
                AlertKind::TableHeld,
                Severity::Error,
                &self.table,
                reason.to_string(),
            );
            alert.held = true;
            alert.file = files.first().map(|f| f.file.uri());
            alert.next_steps = Some(format!(
                "Files of `{}` wait in the queue (nothing is lost). Fix the cause, then restart the worker or run `cdc-worker schema accept {}`.",
                self.table, self.table
            ));
            self.ctx.alerts.publish(&alert).await;
        }
        self.state.held = Some(reason.to_string());
        self.state.held_checked = Some(Instant::now());
        let _ = self.ctx.events.send(EngineEvent::TableHeld {
            table: self.table.clone(),
            reason: reason.to_string(),
        });
        SegmentOutcome::Stop(StopKind::Held(files))
    }

    async fn segment_failed(
        &mut self,
        batch_id: &str,
        files: Vec<PendingFile>,
        error: &str,
    ) -> SegmentOutcome {
        self.fail(batch_id, files, error).await;
        SegmentOutcome::Stop(StopKind::Failed)
    }

    /// Releases files with backoff and blocks later files of the table behind them.
    async fn fail(&mut self, batch_id: &str, files: Vec<PendingFile>, error: &str) -> bool {
        self.state.consecutive_failures += 1;
        let keys: Vec<String> = files.iter().map(|f| f.file.key.clone()).collect();
        BatchFailed {
            table: &self.table,
            batch_id,
            files: &keys,
            error,
            consecutive_failures: self.state.consecutive_failures,
        }
        .emit();
        if self.state.consecutive_failures >= FAILING_AFTER && !self.state.failing_alerted {
            self.state.failing_alerted = true;
            let mut alert = Alert::new(
                AlertKind::TableFailing,
                Severity::Error,
                &self.table,
                format!(
                    "{} consecutive batches failed; last error: {error}",
                    self.state.consecutive_failures
                ),
            );
            alert.file = files.first().map(|f| f.file.uri());
            alert.next_steps = Some("The table's files are retried with backoff and later files wait behind them; after the queue's maximum receives they reach the dead-letter queue. Fix the cause, then redrive the DLQ or run `cdc-worker replay --table TABLE`.".into());
            self.ctx.alerts.publish(&alert).await;
        }
        self.retry_later(files);
        false
    }

    /// After a failure: the earliest file goes back to the queue with backoff (and, after
    /// the queue's maximum receives, to the DLQ); every later file waits in the lane behind
    /// it, its visibility kept alive. Repeated failures thus narrow down to the one file
    /// that fails, and no healthy file is pushed into the DLQ with it.
    fn retry_later(&mut self, mut files: Vec<PendingFile>) {
        files.sort_by_key(|f| f.dms.order());
        let mut files = files.into_iter();
        let Some(first) = files.next() else {
            return;
        };
        let order = first.dms.order();
        if self.state.blocked_from.as_ref().is_none_or(|b| &order < b) {
            self.state.blocked_from = Some(order);
        }
        self.state.retrying.insert(first.file.key.clone());
        if first.messages.is_empty() {
            // Found in the S3 listing: no message will bring it back, so the lane retries.
            let backoff = self.retry_backoff();
            self.state.not_before = Some(Instant::now() + backoff);
            self.add(first);
        } else {
            first.resolve(FileOutcome::Retry(None));
        }
        for f in files {
            self.add(f);
        }
    }

    /// The lane's own backoff for files without a message, like the queue's.
    fn retry_backoff(&self) -> Duration {
        let q = &self.ctx.config.queue;
        let exp = self.state.consecutive_failures.saturating_sub(1).min(16);
        q.retry_backoff
            .saturating_mul(1u32 << exp)
            .min(q.retry_backoff_max)
    }

    async fn routing_collision(
        &mut self,
        batch: Vec<PendingFile>,
        first: &str,
        second: &SourceTable,
    ) -> bool {
        let reason = format!(
            "source tables {first} and {second} both map to target table `{}`",
            self.table
        );
        if self.state.alerted.insert(format!("collision:{second}")) {
            let mut alert = Alert::new(
                AlertKind::RoutingCollision,
                Severity::Error,
                &self.table,
                reason.clone(),
            );
            alert.source = Some(second.to_string());
            alert.next_steps = Some("Change routing.table_name (for example to \"{schema}_{table}\") so each source table has its own target. The files of the second source go to the dead-letter queue.".into());
            self.ctx.alerts.publish(&alert).await;
        }
        tracing::error!(table = %self.table, reason, "routing collision; files not applied");
        for f in batch {
            f.resolve(FileOutcome::Retry(None));
        }
        false
    }

    async fn alert_file(
        &mut self,
        kind: AlertKind,
        severity: Severity,
        file: &PendingFile,
        reason: &str,
        next_steps: Option<&str>,
    ) {
        if !self
            .state
            .alerted
            .insert(format!("{}:{}", kind.as_str(), file.file.key))
        {
            return;
        }
        let mut alert = Alert::new(
            kind,
            severity,
            &self.table,
            format!("{}: {reason}", file.file.uri()),
        );
        alert.source = Some(file.source.to_string());
        alert.file = Some(file.file.uri());
        alert.next_steps = next_steps.map(str::to_string);
        self.ctx.alerts.publish(&alert).await;
    }
}

/// What a batch committed, for [`EngineEvent::BatchFinished`].
#[derive(Default)]
struct Tally {
    keys: Vec<String>,
    statements: u32,
    rows: u64,
}

enum StopKind {
    /// The table is held: these files wait in the lane.
    Held(Vec<PendingFile>),
    /// The segment failed: its files were released.
    Failed,
}

enum SegmentOutcome {
    Done,
    Stop(StopKind),
}
