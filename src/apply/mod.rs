//! The apply engine: routes files to one lane per table, and each lane applies its table's
//! files one batch at a time, in DMS order. Lanes of different tables run in parallel,
//! bounded by `worker.max_parallel_batches`.

pub mod context;
pub mod failure;
pub mod freshness;
mod lane;
pub mod plan;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use context::{ApplyContext, EngineEvent, LaneInfo, PendingFile, new_batch_id};

use crate::queue::FileOutcome;
use lane::{Exit, Lane};

/// A lane's mailbox, with what `status` shows about it.
struct LaneEntry {
    sender: mpsc::UnboundedSender<PendingFile>,
    info: Arc<Mutex<LaneInfo>>,
}

/// Routes files to their table's lane, starting lanes on demand and retiring idle ones.
pub struct Engine {
    ctx: Arc<ApplyContext>,
    lanes: Mutex<HashMap<String, LaneEntry>>,
    tasks: TaskTracker,
    /// Cancelled on shutdown: lanes finish their running batch and release the rest.
    stop: CancellationToken,
    waiting: Arc<AtomicUsize>,
}

impl Engine {
    pub fn new(ctx: ApplyContext) -> Arc<Self> {
        Arc::new(Self {
            ctx: Arc::new(ctx),
            lanes: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            waiting: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.ctx.events.subscribe()
    }

    /// Hands a file to its table's lane, starting the lane if needed.
    pub fn submit(self: &Arc<Self>, mut file: PendingFile) {
        self.waiting
            .fetch_add(file.messages.len(), Ordering::AcqRel);
        file.waiting = Some(self.waiting.clone());
        if self.stop.is_cancelled() {
            file.resolve(FileOutcome::Requeue);
            return;
        }
        let mut lanes = self.lanes.lock().expect("lanes lock");
        let table = file.table.clone();
        let file = match lanes.get(&table) {
            Some(entry) => match entry.sender.send(file) {
                Ok(()) => return,
                // The lane is gone (it exited between our lookup and now): start anew.
                Err(mpsc::error::SendError(file)) => file,
            },
            None => file,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let info = Arc::new(Mutex::new(LaneInfo::default()));
        tx.send(file).expect("fresh channel");
        lanes.insert(
            table.clone(),
            LaneEntry {
                sender: tx,
                info: info.clone(),
            },
        );
        let lane = Lane::new(table, self.ctx.clone(), rx, info, self.stop.clone());
        self.tasks.spawn(run_lane(lane, Arc::downgrade(self)));
    }

    /// Called when a lane went idle: removes it if no file arrived meanwhile. Holding the
    /// lanes lock while checking the mailbox means no file can be sent to a lane that exits.
    fn retire(
        &self,
        table: &str,
        rx: &mut mpsc::UnboundedReceiver<PendingFile>,
    ) -> Option<PendingFile> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        match rx.try_recv() {
            Ok(file) => Some(file),
            Err(_) => {
                lanes.remove(table);
                None
            }
        }
    }

    /// Files submitted and not yet resolved, for the receivers' backpressure.
    pub fn waiting_files(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// The configuration the lanes work with.
    pub fn config(&self) -> &crate::config::Config {
        &self.ctx.config
    }

    /// Each table's newest applied change (for `/metrics` and `/status`).
    pub fn freshness(&self) -> &freshness::Freshness {
        &self.ctx.freshness
    }

    /// Checks the tables' freshness objectives every [`freshness::CHECK_EVERY`] until the
    /// engine stops: a table that nothing arrives for breaks its objective without a
    /// commit to notice it (and its lane may have retired long ago). First the ledger's
    /// last applied files seed what this worker has not applied itself.
    pub fn start_freshness_checks(self: &Arc<Self>) {
        let ctx = self.ctx.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            // A hanging ledger query must not hold up shutdown.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = seed_freshness(&ctx) => {}
            }
            let mut tick = tokio::time::interval(freshness::CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for round in 0u64.. {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Other tasks commit these tables too: what they applied counts. One query
                // per table, so once a minute rather than every check.
                if ctx.config.lease.enabled && round.is_multiple_of(LEDGER_REFRESH_ROUNDS) {
                    let tables = ctx.freshness.snapshot(std::time::SystemTime::now());
                    let refresh = refresh_from_ledger(&ctx, tables.into_iter().map(|(t, ..)| t));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = refresh => {}
                    }
                }
                let now = std::time::SystemTime::now();
                let verdicts = ctx
                    .freshness
                    .check_all(now, |t| ctx.config.freshness_objective(t));
                for verdict in verdicts {
                    ctx.alerts.publish(&verdict.alert()).await;
                }
            }
        });
    }

    /// Lanes as `status` shows them.
    pub fn lanes(&self) -> Vec<(String, LaneInfo)> {
        let lanes = self.lanes.lock().expect("lanes lock");
        let mut out: Vec<_> = lanes
            .iter()
            .map(|(t, e)| (t.clone(), e.info.lock().expect("lane info").clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Stops the lanes: running batches finish, waiting files are released at once.
    /// Returns false if `budget` ran out first.
    pub async fn shutdown(&self, budget: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(budget, self.tasks.wait())
            .await
            .is_ok()
    }
}

/// Freshness checks between two reads of the ledger by a worker with leases (a minute).
const LEDGER_REFRESH_ROUNDS: u64 = 4;

/// The tables in the ledger, with the DMS time of their last applied file: a restarted
/// worker knows how fresh its tables are before it commits anything.
async fn seed_freshness(ctx: &ApplyContext) {
    match ctx.warehouse.ledger_summary().await {
        Ok(entries) => refresh_from_ledger(ctx, entries.into_iter().map(|e| e.table)).await,
        Err(e) => tracing::warn!(error = %e, "cannot read the ledger for the tables' freshness"),
    }
}

/// Raises each table's newest change to the DMS time of its last applied CDC file.
async fn refresh_from_ledger(ctx: &ApplyContext, tables: impl Iterator<Item = String>) {
    for table in tables {
        let Ok(Some((_, key))) = ctx.warehouse.last_applied(&table).await else {
            continue;
        };
        if let Ok(crate::dms::KeyClass::Dms(dms)) =
            crate::dms::classify_key(&ctx.config.source.prefix, &key)
            && let Some(at) = dms.cdc_time()
        {
            // Alone, this worker speaks for every table; with leases, for those it commits.
            let now = std::time::SystemTime::now();
            ctx.freshness
                .observed(&table, at, now, !ctx.config.lease.enabled);
        }
    }
}

/// Runs a lane until it stops, retiring it when it goes idle unless a file arrived.
async fn run_lane(mut lane: Lane, engine: Weak<Engine>) {
    loop {
        match lane.run().await {
            Exit::Stopped => return,
            Exit::Idle(mut idle) => {
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                if !idle.retire_or_resume(|table, rx| engine.retire(table, rx)) {
                    return;
                }
                lane = *idle;
            }
        }
    }
}
