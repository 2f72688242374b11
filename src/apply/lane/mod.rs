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
//! 5. A failed segment releases its earliest file with backoff; later files wait in the
//!    lane behind it until it is applied.
//!
//! This module is the mailbox and the batching loop; `batch` applies a batch, `outcome`
//! records schema versions and handles holds, failures and alerts.

mod batch;
mod outcome;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ApplyContext, Engine, LaneInfo, PendingFile};
use crate::batch::TargetTable;
use crate::dms::DmsOrder;
use crate::queue::FileOutcome;
use crate::schema::store::{Stored, TableStatus};
use crate::telemetry::{FileSkipped, SkipKind};
use crate::warehouse::WarehouseError;

/// How often a held table re-reads its status from S3.
const HOLD_RECHECK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PendingKey {
    order: DmsOrder,
    key: String,
    etag: String,
}

/// What the last S3 listing of the table showed: every file up to `through`, and those not
/// applied when it was taken. DMS writes a table's files one after the other, so no file
/// appears later before one already listed: a batch that ends within the listing needs no
/// new one (in real S3 a listing is cheap, but one per batch adds up).
struct Listing {
    through: DmsOrder,
    unapplied: BTreeMap<DmsOrder, PendingFile>,
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
    /// How the last commit loaded the table, for `/status`.
    mode: Option<crate::batch::LoadMode>,
    listing: Option<Listing>,
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
            // The same file announced again (duplicate delivery, or the late notification
            // of a file the listing found): one apply, all acked, and the engine's count
            // of waiting messages goes down for every one of them.
            Some(existing) => {
                existing.messages.extend(file.messages);
                if existing.waiting.is_none() {
                    existing.waiting = file.waiting;
                }
            }
            None => {
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
        info.last_applied = self.state.last_applied.as_ref().map(|(_, key)| key.clone());
        info.mode = self.state.mode.clone();
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

    /// `new_table = "ignore"`: the table's files are acknowledged and dropped.
    fn skip_ignored(&self, files: &[PendingFile]) {
        for f in files {
            FileSkipped {
                table: &self.table,
                key: &f.file.key,
                kind: SkipKind::TableIgnored,
                reason: "table ignored by policy",
            }
            .emit();
            f.resolve(FileOutcome::Skipped);
        }
    }

    async fn target(&mut self) -> Result<Option<TargetTable>, WarehouseError> {
        if let Some(t) = &self.state.target {
            return Ok(t.clone());
        }
        let t = self.ctx.warehouse.describe(&self.table).await?;
        self.state.target = Some(t.clone());
        Ok(t)
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
