//! The apply engine: routes files to one lane per table, and each lane applies its table's
//! files one batch at a time, in DMS order. Lanes of different tables run in parallel,
//! bounded by `worker.max_parallel_batches`.

mod lane;
pub mod plan;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::Alerts;
use crate::batch::{BatchFile, LoadMode};
use crate::config::Config;
use crate::dms::{DmsKey, SourceTable};
use crate::keys::KeyResolver;
use crate::lease::LeaseManager;
use crate::queue::{FileOutcome, MessageHandle};
use crate::schema::store::SchemaStore;
use crate::storage::ObjectStore;
use crate::warehouse::Warehouse;

/// Everything a lane needs, shared by all lanes.
pub struct ApplyContext {
    pub config: Arc<Config>,
    pub warehouse: Arc<dyn Warehouse>,
    pub store: ObjectStore,
    pub schemas: SchemaStore,
    pub keys: KeyResolver,
    pub alerts: Alerts,
    pub leases: Option<LeaseManager>,
    /// Bounds the batches applying at once across tables.
    pub permits: Arc<Semaphore>,
    pub events: broadcast::Sender<EngineEvent>,
}

/// A file on its way to its table's lane.
#[derive(Clone)]
pub struct PendingFile {
    pub table: String,
    pub source: SourceTable,
    pub dms: DmsKey,
    pub file: BatchFile,
    /// The messages that announced it (more than one after duplicate deliveries).
    pub messages: Vec<MessageHandle>,
    pub arrived: Instant,
    /// The engine's count of files waiting, when this file was submitted to it (files
    /// found in the S3 listing were not).
    pub waiting: Option<Arc<AtomicUsize>>,
}

impl PendingFile {
    /// Gives every message that announced this file its outcome. Call once per file.
    pub fn resolve(&self, outcome: FileOutcome) {
        for m in &self.messages {
            m.resolve(outcome.clone());
        }
        if let Some(waiting) = &self.waiting {
            // One submission per message: duplicates merged into this file carry theirs.
            let n = self.messages.len();
            let _ = waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some(w.saturating_sub(n))
            });
        }
    }
}

/// What the engine reports as it works: for tests, the benchmark and `status`.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    BatchStarted {
        table: String,
        batch_id: String,
        files: usize,
        at: Instant,
    },
    BatchFinished {
        table: String,
        batch_id: String,
        committed: Vec<String>,
        ok: bool,
        statements: u32,
        rows: u64,
        at: Instant,
    },
    TableHeld {
        table: String,
        reason: String,
    },
}

/// A lane's mailbox, with what `status` shows about it.
struct LaneEntry {
    sender: mpsc::UnboundedSender<PendingFile>,
    info: Arc<Mutex<LaneInfo>>,
}

/// A lane's state as `status` and `/metrics` show it.
#[derive(Debug, Clone, Default)]
pub struct LaneInfo {
    pub pending_files: usize,
    pub held: Option<String>,
    pub consecutive_failures: u32,
    pub oldest_pending: Option<Instant>,
    /// The last applied file of the table by DMS order (S3 key), once the lane knows it.
    pub last_applied: Option<String>,
    /// How the lane's last commit loaded the table (merge on its key columns, or append).
    pub mode: Option<LoadMode>,
}

pub struct Engine {
    ctx: Arc<ApplyContext>,
    lanes: Mutex<HashMap<String, LaneEntry>>,
    tasks: TaskTracker,
    /// Cancelled on shutdown: lanes finish their running batch and release the rest.
    stop: CancellationToken,
    waiting: Arc<AtomicUsize>,
}

static BATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A batch id unique across restarts and workers: start time, process and counter.
pub fn new_batch_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        format!("b{millis:x}p{:x}", std::process::id())
    });
    format!("{prefix}n{}", BATCH_COUNTER.fetch_add(1, Ordering::Relaxed))
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
            file.resolve(FileOutcome::Retry(Some(Duration::ZERO)));
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
        let lane = lane::Lane::new(
            table,
            self.ctx.clone(),
            rx,
            info,
            Arc::downgrade(self),
            self.stop.clone(),
        );
        self.tasks.spawn(lane.run());
    }

    /// Called by an idle lane: removes it if no file arrived meanwhile. Holding the lanes
    /// lock while checking the mailbox means no file can be sent to a lane that exits.
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
