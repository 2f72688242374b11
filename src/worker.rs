//! The daemon: a pool of receivers long-polling SQS, turning notifications into files for
//! the apply engine, and the orderly shutdown that releases what cannot finish.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::{Alert, AlertKind, Alerts, Severity};
use crate::apply::{ApplyContext, Engine, PendingFile};
use crate::aws::AwsClients;
use crate::batch::BatchFile;
use crate::config::{Config, WarehouseKind};
use crate::dms::{
    DmsKey, KeyClass, KeyIgnored, LayoutError, RoutingCollision, TableRouter, classify_key,
};
use crate::event::{Notification, ObjectCreated, parse_body};
use crate::health::ReceiveHealth;
use crate::keys::KeyResolver;
use crate::lease::LeaseManager;
use crate::preflight;
use crate::queue::{FileOutcome, Queue, RawMessage, SqsQueue, Tracker};
use crate::schema::store::SchemaStore;
use crate::storage::ObjectStore;
use crate::telemetry::{
    self, FileSkipped, IgnoredReason, MessageUnparseable, NotificationIgnored, ReceiveFailed,
    SkipKind,
};
use crate::warehouse::{self, Warehouse};

/// Builds the configured warehouse and creates its bookkeeping tables.
/// The configured warehouse, without touching it (for checks and read-only tools).
pub fn connect_warehouse(
    config: &Config,
    store: ObjectStore,
) -> anyhow::Result<Arc<dyn Warehouse>> {
    Ok(match config.warehouse.kind {
        WarehouseKind::Duckdb => Arc::new(
            warehouse::duckdb::Duckdb::open(&config.warehouse.duckdb, &config.dms.op_column, store)
                .context("opening the DuckDB warehouse")?,
        ),
        WarehouseKind::Firebolt => Arc::new(
            warehouse::firebolt::Firebolt::open(
                &config.warehouse.firebolt,
                &config.dms.op_column,
                store,
            )
            .context("configuring the Firebolt warehouse")?,
        ),
    })
}

/// The configured warehouse, with its bookkeeping tables created (for the worker).
pub async fn open_warehouse(
    config: &Config,
    store: ObjectStore,
) -> anyhow::Result<Arc<dyn Warehouse>> {
    let warehouse = connect_warehouse(config, store)?;
    warehouse
        .prepare()
        .await
        .with_context(|| format!("preparing the {} warehouse", warehouse.name()))?;
    Ok(warehouse)
}

/// Turns SQS messages into files for the engine.
struct Ingest {
    config: Arc<Config>,
    router: TableRouter,
    tracker: Tracker,
    engine: Arc<Engine>,
    alerts: Alerts,
    /// Causes already alerted (ignored notifications, routing collisions): one alert each
    /// per process, not one per notification or redelivery.
    alerted: Mutex<HashSet<String>>,
}

/// What one notification of a message comes to.
enum Routed {
    File(Box<PendingFile>),
    /// Nothing to apply: acknowledged.
    Done,
    /// Cannot be applied now: the message comes back (and, if it keeps coming back,
    /// reaches the dead-letter queue).
    Retry,
}

impl Ingest {
    async fn handle(&self, raw: RawMessage) {
        telemetry::message_received();
        let notifications = match parse_body(&raw.body) {
            Ok(n) => n,
            Err(e) => {
                MessageUnparseable {
                    message_id: &raw.message_id,
                    receive_count: raw.receive_count,
                    reason: &e.to_string(),
                }
                .emit();
                return;
            }
        };
        let mut files = Vec::new();
        let mut retries = 0usize;
        for n in notifications {
            match self.route(&raw, n).await {
                Routed::File(f) => files.push(*f),
                Routed::Done => {}
                Routed::Retry => retries += 1,
            }
        }
        if files.is_empty() && retries == 0 {
            // Nothing to apply: acknowledge.
            self.tracker.delete(raw.receipt_handle);
            return;
        }
        for f in &files {
            tracing::debug!(message_id = %raw.message_id, receive_count = raw.receive_count, table = %f.table, key = %f.file.key, "file routed");
        }
        let handle = self.tracker.track(&raw, files.len() + retries);
        for _ in 0..retries {
            handle.resolve(FileOutcome::Retry(None));
        }
        for mut f in files {
            f.messages.push(handle.clone());
            self.engine.submit(f);
        }
    }

    /// True the first time a cause is seen.
    fn first_time(&self, cause: String) -> bool {
        self.alerted.lock().expect("alerted causes").insert(cause)
    }

    async fn route(&self, raw: &RawMessage, n: Notification) -> Routed {
        let object = match n {
            Notification::Test => {
                self.ignore(
                    raw,
                    None,
                    IgnoredReason::TestEvent,
                    "s3:TestEvent (S3 sends one when a notification is configured)".into(),
                    false,
                );
                return Routed::Done;
            }
            Notification::Other(name) => {
                self.ignore(
                    raw,
                    None,
                    IgnoredReason::OtherEvent,
                    format!("event {name}, not an object creation"),
                    false,
                );
                return Routed::Done;
            }
            Notification::Created(o) => o,
        };
        if object.bucket != self.config.source.bucket {
            self.other_bucket(raw, &object).await;
            return Routed::Done;
        }
        let dms = match classify_key(&self.config.source.prefix, &object.key) {
            Ok(KeyClass::Dms(dms)) => dms,
            Ok(KeyClass::Ignored(KeyIgnored::OutsidePrefix)) => {
                self.outside_prefix(raw, &object).await;
                return Routed::Done;
            }
            Ok(KeyClass::Ignored(KeyIgnored::NotParquet)) => {
                let location = location(&object);
                self.ignore(
                    raw,
                    Some(&location),
                    IgnoredReason::NotParquet,
                    "not a .parquet file".into(),
                    false,
                );
                return Routed::Done;
            }
            Err(e) => {
                self.not_a_dms_file(&object, &e).await;
                return Routed::Done;
            }
        };
        let table = match self.router.route(&dms.source) {
            Ok(t) => t,
            Err(collision) => {
                self.routing_collision(&collision).await;
                return Routed::Retry;
            }
        };
        if let Some(reason) = unusable_table_name(&table) {
            FileSkipped {
                table: &table,
                key: &object.key,
                kind: SkipKind::UnusableName,
                reason: &reason,
            }
            .emit();
            let alert = Alert::new(AlertKind::FileSkipped, Severity::Warning, &table, reason);
            self.alerts.publish(&alert).await;
            return Routed::Done;
        }
        Routed::File(Box::new(pending_file(table, dms, object)))
    }

    fn ignore(
        &self,
        raw: &RawMessage,
        object: Option<&str>,
        reason: IgnoredReason,
        detail: String,
        first_of_cause: bool,
    ) {
        NotificationIgnored {
            message_id: &raw.message_id,
            object,
            reason,
            detail: &detail,
            first_of_cause,
        }
        .emit();
    }

    /// A notification about another bucket: a typo in `source.bucket`, or a queue shared
    /// with another bucket. Alerted once per bucket.
    async fn other_bucket(&self, raw: &RawMessage, object: &ObjectCreated) {
        let configured = &self.config.source.bucket;
        let location = location(object);
        let detail = format!(
            "the notification is about bucket `{}`, but source.bucket is `{configured}`",
            object.bucket
        );
        let first = self.first_time(format!("other_bucket/{}", object.bucket));
        self.ignore(
            raw,
            Some(&location),
            IgnoredReason::OtherBucket,
            detail.clone(),
            first,
        );
        if first {
            let mut alert = Alert::new(
                AlertKind::NotificationIgnored,
                Severity::Warning,
                "",
                format!(
                    "notifications for bucket `{}` are ignored: source.bucket is `{configured}` (reported once per bucket)",
                    object.bucket
                ),
            );
            alert.file = Some(location);
            alert.next_steps = Some(format!(
                "If DMS writes to `{}`, set source.bucket = \"{}\" and restart; otherwise remove this queue from that bucket's event notifications.",
                object.bucket, object.bucket
            ));
            self.alerts.publish(&alert).await;
        }
    }

    /// A key outside `source.prefix`: DMS writing under another BucketFolder, or a bucket
    /// notification without a prefix filter. Alerted once per folder.
    async fn outside_prefix(&self, raw: &RawMessage, object: &ObjectCreated) {
        let prefix = self.config.source.prefix.trim_end_matches('/');
        let folder = folder_beside(prefix, &object.key);
        let location = location(object);
        let detail = format!("the key is under `{folder}`, outside source.prefix `{prefix}/`");
        let first = self.first_time(format!("outside_prefix/{}/{folder}", object.bucket));
        self.ignore(
            raw,
            Some(&location),
            IgnoredReason::OutsidePrefix,
            detail,
            first,
        );
        if first {
            let mut alert = Alert::new(
                AlertKind::NotificationIgnored,
                Severity::Warning,
                "",
                format!(
                    "notifications for files under `{folder}` are ignored: source.prefix is `{prefix}` (reported once per folder)"
                ),
            );
            alert.file = Some(location);
            alert.next_steps = Some(format!(
                "If DMS writes under `{folder}` (its BucketFolder), set source.prefix = \"{}\" and restart; otherwise give the bucket notification the prefix filter `{prefix}/`.",
                folder.trim_end_matches('/')
            ));
            self.alerts.publish(&alert).await;
        }
    }

    /// A key inside the prefix that is not a DMS file of a table: never applied, never
    /// ordered with the table's files; acknowledged with an alert naming it.
    async fn not_a_dms_file(&self, object: &ObjectCreated, e: &LayoutError) {
        let reason = e.to_string();
        let table = e
            .source()
            .map(|s| self.router.render(s))
            .unwrap_or_default();
        let kind = match e {
            LayoutError::NotDmsName { .. } => SkipKind::NotDmsName,
            _ => SkipKind::Unroutable,
        };
        FileSkipped {
            table: &table,
            key: &object.key,
            kind,
            reason: &reason,
        }
        .emit();
        let location = location(object);
        let mut alert = Alert::new(
            AlertKind::FileSkipped,
            Severity::Warning,
            &table,
            format!("{location}: {reason}"),
        );
        alert.file = Some(location);
        if kind == SkipKind::NotDmsName {
            alert.next_steps = Some(format!(
                "Nothing was loaded from it and `{table}` goes on. If it holds data for the table, upload it under a DMS name that sorts after the table's last applied file (`cdc-worker status` shows it); otherwise delete it."
            ));
        }
        self.alerts.publish(&alert).await;
    }

    /// Two sources for one target: the message comes back until it reaches the DLQ; the
    /// alert is sent once per pair, not once per delivery.
    async fn routing_collision(&self, collision: &RoutingCollision) {
        let cause = format!("routing/{}/{}", collision.target, collision.second);
        if !self.first_time(cause) {
            tracing::debug!(table = %collision.target, source = %collision.second, "routing collision (alerted before)");
            return;
        }
        let mut alert = Alert::new(
            AlertKind::RoutingCollision,
            Severity::Error,
            &collision.target,
            collision.to_string(),
        );
        alert.source = Some(collision.second.to_string());
        alert.next_steps = Some("Change routing.table_name so each source table has its own target; these files go to the dead-letter queue meanwhile.".into());
        self.alerts.publish(&alert).await;
    }
}

fn pending_file(table: String, dms: DmsKey, object: ObjectCreated) -> PendingFile {
    let event_time = object.event_at();
    PendingFile {
        table,
        source: dms.source.clone(),
        file: BatchFile {
            bucket: object.bucket,
            key: object.key,
            size: object.size,
            etag: object.etag.unwrap_or_default(),
            order_key: dms.order().sort_key(),
            full_load: dms.is_load(),
        },
        dms,
        messages: Vec::new(),
        arrived: Instant::now(),
        event_time,
        waiting: None,
    }
}

/// `s3://bucket/key`, control characters escaped (keys can be hostile).
fn location(object: &ObjectCreated) -> String {
    format!("s3://{}/{}", object.bucket, object.key.escape_debug())
}

/// The folder of `key` at the depth of `prefix`: what a user would put in
/// `source.prefix` instead (`cdc/` for `cdc/public/t/x.parquet` beside prefix `dms`).
fn folder_beside(prefix: &str, key: &str) -> String {
    let depth = if prefix.is_empty() {
        1
    } else {
        prefix.split('/').count()
    };
    let parts: Vec<&str> = key.split('/').collect();
    if parts.len() <= depth {
        return "/ (the bucket's root)".into();
    }
    format!("{}/", parts[..depth].join("/").escape_debug())
}

/// Why a target table name cannot be used, if it cannot.
fn unusable_table_name(table: &str) -> Option<String> {
    let why = if warehouse::is_reserved_table(table) {
        Some("reserved for cdc-worker's own tables".to_string())
    } else {
        warehouse::sql::check_name(table, warehouse::MAX_TABLE_NAME_LEN)
            .err()
            .map(|e| e.to_string())
    };
    why.map(|why| {
        format!(
            "target table name `{}` is unusable: {why}",
            table.escape_debug()
        )
    })
}

/// The startup checks: an error when the worker cannot work at all, else each problem
/// logged and alerted.
async fn check_setup(config: &Config, aws: &AwsClients, alerts: &Alerts) -> anyhow::Result<()> {
    let report = preflight::run(config, aws).await;
    if let Some(fatal) = report.fatal() {
        anyhow::bail!(fatal);
    }
    report.announce(alerts).await;
    Ok(())
}

fn new_engine(
    config: &Arc<Config>,
    warehouse: &Arc<dyn Warehouse>,
    store: &ObjectStore,
    alerts: &Alerts,
) -> Arc<Engine> {
    let leases = config
        .lease
        .enabled
        .then(|| LeaseManager::from_config(config, store.clone()));
    let (events, _) = broadcast::channel(4096);
    Engine::new(ApplyContext {
        config: config.clone(),
        warehouse: warehouse.clone(),
        store: store.clone(),
        schemas: SchemaStore::from_config(config, store.clone()),
        keys: KeyResolver::new(config, store.clone()),
        alerts: alerts.clone(),
        leases,
        permits: Arc::new(Semaphore::new(config.parallel_batches())),
        events,
        freshness: Default::default(),
        alerted: Default::default(),
    })
}

/// A running worker.
pub struct Worker {
    config: Arc<Config>,
    engine: Arc<Engine>,
    queue: Arc<dyn Queue>,
    warehouse: Arc<dyn Warehouse>,
    stop_receiving: CancellationToken,
    receivers: TaskTracker,
    acker: tokio::task::JoinHandle<()>,
    ingest: Option<Arc<Ingest>>,
    http: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Worker {
    /// Checks the setup ([`crate::preflight`]), connects to the warehouse and starts
    /// receiving. A queue that cannot be used is an error (nothing would ever arrive, and
    /// nothing is created, not even the DuckDB file); other setup problems are a WARN and
    /// an alert each.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let aws = AwsClients::new(&config.aws).await;
        let alerts = Alerts::new(aws.sns.clone(), config.alerts.sns_topic_arn.clone());
        check_setup(&config, &aws, &alerts).await?;
        let warehouse = open_warehouse(&config, ObjectStore::new(aws.s3.clone())).await?;
        Self::launch(Arc::new(config), aws, alerts, warehouse).await
    }

    /// Starts receiving into a warehouse opened (and prepared) by the caller, after the
    /// same setup checks.
    pub async fn start_with_warehouse(
        config: Config,
        warehouse: Arc<dyn Warehouse>,
    ) -> anyhow::Result<Self> {
        let aws = AwsClients::new(&config.aws).await;
        let alerts = Alerts::new(aws.sns.clone(), config.alerts.sns_topic_arn.clone());
        check_setup(&config, &aws, &alerts).await?;
        Self::launch(Arc::new(config), aws, alerts, warehouse).await
    }

    async fn launch(
        config: Arc<Config>,
        aws: AwsClients,
        alerts: Alerts,
        warehouse: Arc<dyn Warehouse>,
    ) -> anyhow::Result<Self> {
        let store = ObjectStore::new(aws.s3.clone());
        let queue: Arc<dyn Queue> = Arc::new(SqsQueue::new(aws.sqs.clone(), &config.queue.url));
        let engine = new_engine(&config, &warehouse, &store, &alerts);
        engine.start_freshness_checks();
        let (tracker, acker) = Tracker::new(queue.clone(), &config.queue);
        let acker = tokio::spawn(acker);
        let ingest = Arc::new(Ingest {
            config: config.clone(),
            router: TableRouter::new(&config.routing),
            tracker,
            engine: engine.clone(),
            alerts,
            alerted: Mutex::new(HashSet::new()),
        });
        let receiving = ReceiveHealth::new(config.worker.unhealthy_after);
        let http = match config.telemetry.listen {
            Some(addr) => {
                let stop_serving = CancellationToken::new();
                let task = crate::health::serve(
                    addr,
                    queue.clone(),
                    warehouse.clone(),
                    engine.clone(),
                    receiving.clone(),
                    stop_serving.clone(),
                )
                .await?;
                Some((stop_serving, task))
            }
            None => None,
        };
        let stop_receiving = CancellationToken::new();
        let receivers = TaskTracker::new();
        for n in 0..config.worker.concurrency {
            receivers.spawn(receive_loop(
                n,
                queue.clone(),
                ingest.clone(),
                receiving.clone(),
                stop_receiving.clone(),
            ));
        }
        receivers.close();
        tracing::info!(
            queue = %config.queue.url,
            warehouse = warehouse.name(),
            concurrency = config.worker.concurrency,
            "cdc-worker started"
        );
        Ok(Self {
            config,
            engine,
            queue,
            warehouse,
            stop_receiving,
            receivers,
            acker,
            ingest: Some(ingest),
            http,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn warehouse(&self) -> &Arc<dyn Warehouse> {
        &self.warehouse
    }

    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.queue
    }

    /// Stops receiving, lets running batches finish within the shutdown budget,
    /// releases everything else for redelivery, and flushes pending deletes.
    pub async fn shutdown(mut self) {
        let started = Instant::now();
        tracing::info!("shutting down: no new receives");
        self.stop_receiving.cancel();
        let budget = self.config.worker.shutdown_timeout;
        // Lanes finish their running batch and release waiting files while the receivers
        // complete their last poll (which returns anything it gets).
        let (finished, ()) = tokio::join!(self.engine.shutdown(budget), self.receivers.wait());
        if !finished {
            tracing::warn!(
                budget_s = budget.as_secs(),
                "batches still running at the end of the shutdown budget; their messages reappear when their visibility times out"
            );
        }
        // Releases first (waiting files go back at once), then deletes: dropping the last
        // tracker closes the delete channel and the acker drains it.
        if let Some(ingest) = self.ingest.take() {
            let remaining = budget
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(2));
            let unsent = ingest.alerts.flush(remaining).await;
            if unsent > 0 {
                tracing::warn!(alerts = unsent, "alerts not published before shutdown");
            }
            let remaining = budget
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(2));
            let _ = tokio::time::timeout(remaining, ingest.tracker.flush_releases()).await;
        }
        let remaining = budget
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(2));
        let _ = tokio::time::timeout(remaining, &mut self.acker).await;
        // The endpoint serves until the end so probes see the drain; waiting for it means
        // the warehouse is closed (DuckDB's file released) when `shutdown` returns.
        if let Some((stop_serving, task)) = self.http.take() {
            stop_serving.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cdc-worker stopped"
        );
    }
}

async fn receive_loop(
    n: usize,
    queue: Arc<dyn Queue>,
    ingest: Arc<Ingest>,
    receiving: Arc<ReceiveHealth>,
    stop: CancellationToken,
) {
    let config = ingest.config.clone();
    let q = &config.queue;
    let mut backoff = Duration::from_millis(500);
    while !stop.is_cancelled() {
        // Backpressure: a backlog stays in the queue, not in memory.
        if ingest.engine.waiting_files() >= config.worker.max_waiting_files {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        // A long poll is never abandoned: SQS would still hand messages to it (even the
        // ones shutdown releases), and they would stay hidden until their visibility timed
        // out. It ends within `wait_time`; what it brings after the stop goes straight back.
        let received = queue
            .receive(q.max_messages, q.wait_time, q.visibility_timeout)
            .await;
        match received {
            Ok(messages) if stop.is_cancelled() => {
                for m in messages {
                    if let Err(e) = queue
                        .set_visibility(&m.receipt_handle, Duration::ZERO)
                        .await
                    {
                        tracing::warn!(message_id = m.message_id, error = %e, "could not release a message received during shutdown");
                    }
                }
            }
            Ok(messages) => {
                receiving.succeeded();
                backoff = Duration::from_millis(500);
                for m in messages {
                    ingest.handle(m).await;
                }
            }
            Err(e) => {
                let error = e.to_string();
                ReceiveFailed {
                    receiver: n,
                    error: &error,
                    retry_in: backoff,
                    failing_for: receiving.failed(&error),
                }
                .emit();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Runs until SIGINT or SIGTERM, then shuts down.
pub async fn run_until_signal(config: Config) -> anyhow::Result<()> {
    let worker = Worker::start(config).await?;
    wait_for_signal().await;
    worker.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
