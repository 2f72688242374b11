//! The daemon: a pool of receivers long-polling SQS, turning notifications into files for
//! the apply engine, and the orderly shutdown that releases what cannot finish.

use std::sync::Arc;
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
use crate::dms::{KeyClass, TableRouter, classify_key};
use crate::event::{Notification, parse_body};
use crate::keys::KeyResolver;
use crate::lease::LeaseManager;
use crate::queue::{FileOutcome, Queue, RawMessage, SqsQueue, Tracker};
use crate::schema::store::SchemaStore;
use crate::storage::ObjectStore;
use crate::telemetry::{self, FileSkipped, MessageUnparseable, NotificationIgnored, SkipKind};
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
            let object = match n {
                Notification::Test => {
                    NotificationIgnored {
                        message_id: &raw.message_id,
                        key: None,
                        reason: "s3:TestEvent",
                    }
                    .emit();
                    continue;
                }
                Notification::Other(name) => {
                    NotificationIgnored {
                        message_id: &raw.message_id,
                        key: None,
                        reason: &format!("event {name}"),
                    }
                    .emit();
                    continue;
                }
                Notification::Created(o) => o,
            };
            if object.bucket != self.config.source.bucket {
                NotificationIgnored {
                    message_id: &raw.message_id,
                    key: Some(&object.key),
                    reason: "other bucket",
                }
                .emit();
                continue;
            }
            let dms = match classify_key(&self.config.source.prefix, &object.key) {
                Ok(KeyClass::Ignored(reason)) => {
                    NotificationIgnored {
                        message_id: &raw.message_id,
                        key: Some(&object.key),
                        reason,
                    }
                    .emit();
                    continue;
                }
                Ok(KeyClass::Dms(dms)) => dms,
                Err(e) => {
                    let reason = e.to_string();
                    FileSkipped {
                        table: "",
                        key: &object.key,
                        kind: SkipKind::Unroutable,
                        reason: &reason,
                    }
                    .emit();
                    let mut alert = Alert::new(
                        AlertKind::FileSkipped,
                        Severity::Warning,
                        "",
                        format!(
                            "s3://{}/{}: {reason}",
                            object.bucket,
                            object.key.escape_debug()
                        ),
                    );
                    alert.file = Some(format!(
                        "s3://{}/{}",
                        object.bucket,
                        object.key.escape_debug()
                    ));
                    self.alerts.publish(&alert).await;
                    continue;
                }
            };
            let table = match self.router.route(&dms.source) {
                Ok(t) => t,
                Err(collision) => {
                    let mut alert = Alert::new(
                        AlertKind::RoutingCollision,
                        Severity::Error,
                        &collision.target,
                        collision.to_string(),
                    );
                    alert.source = Some(collision.second.to_string());
                    alert.next_steps = Some("Change routing.table_name so each source table has its own target; these files go to the dead-letter queue meanwhile.".into());
                    self.alerts.publish(&alert).await;
                    retries += 1;
                    continue;
                }
            };
            let unusable = if warehouse::is_reserved_table(&table) {
                Some("reserved for cdc-worker's own tables".to_string())
            } else {
                warehouse::sql::check_name(&table, warehouse::MAX_TABLE_NAME_LEN)
                    .err()
                    .map(|e| e.to_string())
            };
            if let Some(why) = unusable {
                let reason = format!(
                    "target table name `{}` is unusable: {why}",
                    table.escape_debug()
                );
                FileSkipped {
                    table: &table,
                    key: &object.key,
                    kind: SkipKind::UnusableName,
                    reason: &reason,
                }
                .emit();
                let alert = Alert::new(AlertKind::FileSkipped, Severity::Warning, &table, reason);
                self.alerts.publish(&alert).await;
                continue;
            }
            files.push(PendingFile {
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
                waiting: None,
            });
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
    /// Connects to AWS and the warehouse and starts receiving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let aws = AwsClients::new(&config.aws).await;
        let store = ObjectStore::new(aws.s3.clone());
        let warehouse = open_warehouse(&config, store.clone()).await?;
        let queue: Arc<dyn Queue> = Arc::new(SqsQueue::new(aws.sqs.clone(), &config.queue.url));
        let alerts = Alerts::new(aws.sns.clone(), config.alerts.sns_topic_arn.clone());
        let leases = config
            .lease
            .enabled
            .then(|| LeaseManager::from_config(&config, store.clone()));
        let (events, _) = broadcast::channel(4096);
        let engine = Engine::new(ApplyContext {
            config: config.clone(),
            warehouse: warehouse.clone(),
            store: store.clone(),
            schemas: SchemaStore::from_config(&config, store.clone()),
            keys: KeyResolver::new(&config, store.clone()),
            alerts: alerts.clone(),
            leases,
            permits: Arc::new(Semaphore::new(config.parallel_batches())),
            events,
        });
        let (tracker, acker) = Tracker::new(queue.clone(), &config.queue);
        let acker = tokio::spawn(acker);
        let ingest = Arc::new(Ingest {
            config: config.clone(),
            router: TableRouter::new(&config.routing),
            tracker,
            engine: engine.clone(),
            alerts,
        });
        let stop_receiving = CancellationToken::new();
        let receivers = TaskTracker::new();
        for n in 0..config.worker.concurrency {
            receivers.spawn(receive_loop(
                n,
                queue.clone(),
                ingest.clone(),
                config.clone(),
                stop_receiving.clone(),
            ));
        }
        receivers.close();
        let http = match config.telemetry.listen {
            Some(addr) => {
                let stop_serving = CancellationToken::new();
                let task = crate::health::serve(
                    addr,
                    queue.clone(),
                    warehouse.clone(),
                    engine.clone(),
                    stop_serving.clone(),
                )
                .await
                .context("starting the health and metrics endpoint")?;
                Some((stop_serving, task))
            }
            None => None,
        };
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
    config: Arc<Config>,
    stop: CancellationToken,
) {
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
                backoff = Duration::from_millis(500);
                for m in messages {
                    ingest.handle(m).await;
                }
            }
            Err(e) => {
                tracing::warn!(receiver = n, error = %e, retry_in_ms = backoff.as_millis() as u64, "receive failed");
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
