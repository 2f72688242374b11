//! What the engine and its lanes share: the context every lane works with, a file on its way
//! to its lane, what the engine reports as it works, and what `status` shows of a lane. It
//! sits below both, so a lane never imports the engine that runs it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use tokio::sync::{Semaphore, broadcast};

use crate::alerts::Alerts;
use crate::apply::freshness::Freshness;
use crate::batch::BatchFile;
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
    /// Each table's newest applied change, against its freshness objective.
    pub freshness: Arc<Freshness>,
    /// Causes alerted once per worker process, across the lanes' lives (a lane retires
    /// when its table is idle and a new one starts with the next file).
    pub alerted: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ApplyContext {
    /// True the first time this process sees `cause`.
    pub fn first_time(&self, cause: String) -> bool {
        self.alerted.lock().expect("alerted causes").insert(cause)
    }
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
    /// S3's `eventTime` of its notification: the upload (a full-load file's freshness,
    /// and the `s3_to_sqs` stage). None for files found in the S3 listing.
    pub event_time: Option<SystemTime>,
    /// The engine's count of files waiting, when this file was submitted to it (files
    /// found in the S3 listing were not).
    pub waiting: Option<Arc<AtomicUsize>>,
}

impl std::fmt::Debug for PendingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingFile")
            .field("table", &self.table)
            .field("key", &self.file.key)
            .field("etag", &self.file.etag)
            .field("messages", &self.messages.len())
            .finish()
    }
}

impl PendingFile {
    /// A file found in the table's S3 listing: no message announced it (yet).
    pub fn listed(table: &str, source: SourceTable, dms: DmsKey, file: BatchFile) -> Self {
        Self {
            table: table.to_string(),
            source,
            dms,
            file,
            messages: Vec::new(),
            arrived: Instant::now(),
            event_time: None,
            waiting: None,
        }
    }

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

/// A lane's state as `status` and `/metrics` show it.
#[derive(Debug, Clone, Default)]
pub struct LaneInfo {
    pub pending_files: usize,
    pub held: Option<String>,
    pub consecutive_failures: u32,
    pub oldest_pending: Option<Instant>,
    /// The file every later file of the table waits behind, when one failed.
    pub blocked_by: Option<String>,
    /// The last applied file of the table by DMS order (S3 key), once the lane knows it.
    pub last_applied: Option<String>,
    /// How the lane's last commit loaded the table (merge on its key columns, or append).
    pub mode: Option<crate::batch::LoadMode>,
    /// The table's generation (1, and one more per DMS reload), once the lane knows it.
    pub generation: Option<u32>,
    /// A reload in progress, in words.
    pub reload: Option<String>,
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
