//! One table's lane: the task that collects the table's files and applies them one batch at
//! a time, in DMS order. Being the only task that applies its table (per process; the S3
//! lease extends that across processes), the lane is the per-table lock.
//!
//! The lane is a pure schedule (`state.rs`: what to apply next, what waits, when to retry)
//! and pure verdicts (`verdicts.rs`: the ledger's and the listing's), beside the effects:
//! this module's loop, `batch.rs` (the ledger, the listing, late files, staging), `segment.rs`
//! (the schema policy, the lease and the commit of each segment) and `notify.rs` (alerts).
//! A batch moves through typed stages; a failure carries its [`Disposition`] to
//! [`LaneState::failed`], which decides what waits and what goes back to the queue.
//!
//! [`Disposition`]: crate::apply::failure::Disposition

mod batch;
mod notify;
mod promote;
pub(crate) mod reload;
mod segment;
pub(crate) mod state;
mod timing;
pub(crate) mod verdicts;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::apply::context::{ApplyContext, LaneInfo, PendingFile};
use crate::batch::{LedgerStatus, TargetTable};
use crate::queue::FileOutcome;
use crate::schema::store::{Stored, TableStatus};
use crate::warehouse::WarehouseError;
use state::{LanePolicy, LaneState, Next};
use verdicts::Listing;

/// What the lane has read about its table, cached between batches and dropped when it may
/// be stale (after a failure, a DDL or another worker's commit).
#[derive(Default)]
struct TableCache {
    loaded: bool,
    stored: Option<Stored>,
    /// `None`: not described yet.
    target: Option<Option<TargetTable>>,
    ignored: bool,
    listing: Option<Listing>,
    /// How the last commit loaded the table, for `/status`.
    mode: Option<crate::batch::LoadMode>,
    /// The table's generations: the live one, and the next while a reload builds it.
    generations: reload::Generations,
}

/// How often a lane whose held reload has no file waiting reads the table's status again.
const HELD_RELOAD_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) struct Lane {
    table: String,
    ctx: Arc<ApplyContext>,
    rx: mpsc::UnboundedReceiver<PendingFile>,
    info: Arc<Mutex<LaneInfo>>,
    stop: CancellationToken,
    state: LaneState,
    cache: TableCache,
    /// When the running batch started, for the stage histograms.
    batch_started: Option<Instant>,
}

/// Why [`Lane::run`] returned.
pub(super) enum Exit {
    /// No file came for `worker.lane_idle_timeout`: the engine may retire the lane.
    Idle(Box<Lane>),
    /// The engine stops; waiting files were released.
    Stopped,
}

impl Lane {
    pub(super) fn new(
        table: String,
        ctx: Arc<ApplyContext>,
        rx: mpsc::UnboundedReceiver<PendingFile>,
        info: Arc<Mutex<LaneInfo>>,
        stop: CancellationToken,
    ) -> Self {
        let state = LaneState::new(LanePolicy::from_config(&ctx.config));
        Self {
            table,
            ctx,
            rx,
            info,
            stop,
            state,
            cache: TableCache::default(),
            batch_started: None,
        }
    }

    pub(super) async fn run(mut self) -> Exit {
        let idle = self.ctx.config.worker.lane_idle_timeout;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            if self.cache.generations.building.is_some() {
                self.advance_reload().await;
            }
            self.publish_info();
            let now = Instant::now();
            // A reload completes by its quiet period even when no file comes.
            let settles = self.reload_due(now);
            let wake = match self.state.next(now) {
                // A held reload waits for `accept-reload` with no file pending.
                Next::Idle
                    if self.state.held().is_some() && self.cache.generations.building.is_some() =>
                {
                    self.recheck_hold().await;
                    now + HELD_RELOAD_RECHECK
                }
                Next::Idle if settles.is_none() => match self.wait_idle(idle).await {
                    Some(true) => continue,
                    Some(false) => return Exit::Idle(Box::new(self)),
                    None => break,
                },
                Next::Idle => settles.unwrap_or(now),
                Next::Wait(until) => settles.map_or(until, |s| s.min(until)),
                Next::RecheckHold => {
                    self.recheck_hold().await;
                    continue;
                }
                Next::CheckBlocker => {
                    self.check_blocker().await;
                    continue;
                }
                Next::Batch => {
                    self.apply_next().await;
                    continue;
                }
            };
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                file = self.rx.recv() => match file {
                    Some(f) => self.state.add(f),
                    None => break,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        self.release_all();
        Exit::Stopped
    }

    /// With no file waiting: Some(true) when one arrives, Some(false) after `idle` without
    /// one, None when the engine stops.
    async fn wait_idle(&mut self, idle: Duration) -> Option<bool> {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            file = self.rx.recv() => file.map(|f| {
                self.state.add(f);
                true
            }),
            _ = tokio::time::sleep(idle) => Some(false),
        }
    }

    /// After going idle: `retire` removes the lane from the engine unless a file arrived
    /// meanwhile, which the lane then takes on. True when the lane goes on.
    pub(super) fn retire_or_resume(
        &mut self,
        retire: impl FnOnce(&str, &mut mpsc::UnboundedReceiver<PendingFile>) -> Option<PendingFile>,
    ) -> bool {
        match retire(&self.table, &mut self.rx) {
            Some(f) => {
                self.state.add(f);
                true
            }
            None => false,
        }
    }

    /// Applies the next batch under a permit of the engine's bound on parallel batches
    /// (when the engine stops meanwhile, the files wait to be released).
    async fn apply_next(&mut self) {
        let batch = self.state.take_batch();
        if batch.is_empty() {
            return;
        }
        let permit = tokio::select! {
            p = self.ctx.permits.clone().acquire_owned() => p.expect("semaphore open"),
            _ = self.stop.cancelled() => {
                self.state.add_all(batch);
                return;
            }
        };
        self.apply_batch(batch).await;
        drop(permit);
    }

    /// On shutdown: every waiting file goes back to the queue at once.
    fn release_all(&mut self) {
        self.rx.close();
        while let Ok(f) = self.rx.try_recv() {
            self.state.add(f);
        }
        let files = self.state.drain();
        let count = files.len();
        for f in files {
            f.resolve(FileOutcome::Requeue);
        }
        if count > 0 {
            tracing::info!(table = %self.table, files = count, "lane stopped; waiting files requeued as fresh messages for the next worker");
        }
        self.publish_info();
    }

    fn publish_info(&self) {
        let snapshot = self.state.snapshot();
        let lag = snapshot
            .oldest_pending
            .map_or(Duration::ZERO, |oldest| oldest.elapsed());
        crate::telemetry::record_lag(&self.table, lag);
        metrics::gauge!("cdc_worker_table_held", "table" => self.table.clone())
            .set(if snapshot.held.is_some() { 1.0 } else { 0.0 });
        let mut info = self.info.lock().expect("lane info");
        info.pending_files = snapshot.pending_files;
        info.held = snapshot.held;
        info.consecutive_failures = snapshot.consecutive_failures;
        info.oldest_pending = snapshot.oldest_pending;
        info.blocked_by = snapshot.blocked_by;
        info.last_applied = self.state.last_applied().map(|(_, key)| key.clone());
        info.mode = self.cache.mode.clone();
        info.generation = self.cache.loaded.then_some(self.cache.generations.current);
        info.reload = self.cache.generations.building.as_ref().map(|b| {
            let stage = if b.complete { "complete" } else { "building" };
            format!(
                "generation {} {stage} in {} ({} files applied)",
                b.generation, b.table, b.files
            )
        });
        metrics::gauge!("cdc_worker_table_generation", "table" => self.table.clone())
            .set(f64::from(self.cache.generations.current));
    }

    /// Re-reads a held table's status; a released table applies its waiting files.
    async fn recheck_hold(&mut self) {
        if self.state.held_by_condition() {
            // The files are tried again: they hold the table anew if the cause remains.
            self.state.release_hold();
            self.cache.target = None;
            return;
        }
        let now = Instant::now();
        match self.ctx.schemas.load(&self.table).await {
            Ok(Some(stored))
                if !matches!(
                    stored.current.status,
                    TableStatus::Held { .. } | TableStatus::Guarded { .. }
                ) =>
            {
                tracing::info!(table = %self.table, "table released; applying its waiting files");
                self.state.release_hold();
                self.cache.ignored = matches!(stored.current.status, TableStatus::Ignored { .. });
                self.cache.stored = Some(stored);
                self.cache.target = None;
            }
            Ok(_) => {
                self.state.hold_checked(now);
                tracing::info!(table = %self.table, files = self.state.snapshot().pending_files, reason = self.state.held().unwrap_or_default(), "table held; waiting for a person (`cdc-worker schema accept`, `table accept-reload` or `table release-guard`, as the reason says)");
            }
            Err(e) => {
                self.state.hold_checked(now);
                tracing::warn!(table = %self.table, error = %e, "cannot read the table's schema status");
            }
        }
    }

    /// Asks the ledger about the file the table waits behind: skipped by an operator
    /// (`cdc-worker ledger skip`) or applied by another worker, it no longer blocks.
    async fn check_blocker(&mut self) {
        let now = Instant::now();
        let Some(key) = self.state.blocker().map(str::to_string) else {
            return;
        };
        let settled = match self
            .ctx
            .warehouse
            .applied(&self.table, std::slice::from_ref(&key))
            .await
        {
            Ok(found) => found
                .get(&key)
                .is_some_and(|r| matches!(r.status, LedgerStatus::Applied | LedgerStatus::Skipped)),
            Err(e) => {
                tracing::warn!(table = %self.table, error = %e, "cannot ask the ledger about the file the table waits behind");
                false
            }
        };
        if settled {
            tracing::info!(table = %self.table, key, "the file the table waited behind is settled in the ledger; going on");
            self.cache.loaded = false;
            self.cache.listing = None;
        } else {
            tracing::info!(table = %self.table, key, files = self.state.snapshot().pending_files, "files wait behind a file that is back in the queue (or in the dead-letter queue); `cdc-worker ledger skip` releases them");
        }
        self.state.blocker_checked(settled, now);
    }

    /// The table the lane writes to: the live one, or the generation a reload builds.
    fn physical_table(&self) -> &str {
        self.cache
            .generations
            .building
            .as_ref()
            .map_or(&self.table, |b| &b.table)
    }

    /// The table the lane writes to, as the warehouse describes it.
    async fn target(&mut self) -> Result<Option<TargetTable>, WarehouseError> {
        if let Some(t) = &self.cache.target {
            return Ok(t.clone());
        }
        let t = self.ctx.warehouse.describe(self.physical_table()).await?;
        self.cache.target = Some(t.clone());
        Ok(t)
    }
}
