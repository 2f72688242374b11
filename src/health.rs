//! `/healthz` (the worker can do its job: alive, and receiving from the queue), `/readyz`
//! (queue and warehouse answer), `/metrics` (Prometheus text) and `/status` (each table:
//! its lane, last applied file, key and mode, as JSON, for `cdc-worker status`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::apply::Engine;
use crate::batch::LoadMode;
use crate::queue::Queue;
use crate::telemetry;
use crate::warehouse::Warehouse;

/// Whether the receivers can reach the queue. A worker that has been unable to receive
/// for longer than `bound` (`worker.unhealthy_after`) is unhealthy: restarting it (what a
/// container health check does) is the only thing that can help, and it makes the
/// problem visible.
#[derive(Debug)]
pub struct ReceiveHealth {
    bound: Duration,
    /// Since when every receive failed, and the last error.
    failing: Mutex<Option<(Instant, String)>>,
}

impl ReceiveHealth {
    pub fn new(bound: Duration) -> Arc<Self> {
        Arc::new(Self {
            bound,
            failing: Mutex::new(None),
        })
    }

    pub fn succeeded(&self) {
        *self.failing.lock().expect("receive health") = None;
    }

    /// Records a failed receive; returns how long receiving has failed.
    pub fn failed(&self, error: &str) -> Duration {
        let mut failing = self.failing.lock().expect("receive health");
        let since = failing.as_ref().map_or_else(Instant::now, |(s, _)| *s);
        *failing = Some((since, error.to_string()));
        since.elapsed()
    }

    /// `Err` with the reason once receiving has failed for longer than the bound.
    pub fn check(&self) -> Result<(), String> {
        match &*self.failing.lock().expect("receive health") {
            Some((since, error)) if since.elapsed() > self.bound => Err(format!(
                "no receive from the queue has succeeded for {}s (worker.unhealthy_after = {}): {error}",
                since.elapsed().as_secs(),
                humantime::format_duration(self.bound)
            )),
            _ => Ok(()),
        }
    }
}

#[derive(Clone)]
struct Probes {
    queue: Arc<dyn Queue>,
    warehouse: Arc<dyn Warehouse>,
    engine: Arc<Engine>,
    receiving: Arc<ReceiveHealth>,
}

/// Binds `addr` and serves until `stop` is cancelled. The returned task ends only after
/// every connection has closed, so nothing the probes hold (the warehouse above all)
/// outlives the worker's shutdown.
pub async fn serve(
    addr: SocketAddr,
    queue: Arc<dyn Queue>,
    warehouse: Arc<dyn Warehouse>,
    engine: Arc<Engine>,
    receiving: Arc<ReceiveHealth>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} (telemetry.listen): {e}; choose a free port, or another address"
        )
    })?;
    tracing::info!(%addr, "serving /healthz, /readyz, /status and /metrics");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(Probes {
            queue,
            warehouse,
            engine,
            receiving,
        });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health endpoint stopped");
        }
    }))
}

async fn healthz(State(p): State<Probes>) -> (StatusCode, String) {
    match p.receiving.check() {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
    }
}

async fn ready(State(p): State<Probes>) -> (StatusCode, String) {
    let timeout = Duration::from_secs(5);
    let queue = tokio::time::timeout(timeout, p.queue.ping()).await;
    let warehouse = p.warehouse.ping(timeout).await;
    match (queue, warehouse) {
        (Ok(Ok(())), Ok(())) => (StatusCode::OK, "ready\n".into()),
        (q, w) => {
            let q = match q {
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".into(),
            };
            let w = w
                .map(|_| "ok".to_string())
                .unwrap_or_else(|e| e.to_string());
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready\nqueue: {q}\nwarehouse: {w}\n"),
            )
        }
    }
}

/// One table as `/status` shows it: its lane (when one runs), and from the ledger and the
/// lane the last applied file, key and mode.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Default, PartialEq)]
pub struct TableReport {
    pub table: String,
    /// Whether a lane runs for the table (lanes idle for `worker.lane_idle_timeout` stop).
    pub lane: bool,
    pub pending_files: usize,
    pub held: Option<String>,
    pub consecutive_failures: u32,
    /// The file every later file of the table waits behind (S3 key), when one failed:
    /// `cdc-worker ledger skip` is the way past it when it can never be applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    /// Seconds the oldest waiting file has waited.
    pub oldest_pending_s: Option<f64>,
    /// The last applied file by DMS order (S3 key).
    pub last_applied_file: Option<String>,
    /// When the newest ledger entry of the table was committed.
    pub last_applied_at: Option<String>,
    /// The key columns of the last commit (empty: no key).
    pub key: Option<Vec<String>>,
    /// "merge" (keyed) or "append" (no key), as of the last commit of this worker.
    pub mode: Option<String>,
    /// The time of the newest change this worker applied to the table (RFC 3339).
    #[serde(default)]
    pub newest_change_at: Option<String>,
    /// Seconds since then: the table's freshness. None before its first commit.
    #[serde(default)]
    pub freshness_s: Option<f64>,
    /// The table's freshness objective in seconds, when it has one.
    #[serde(default)]
    pub freshness_objective_s: Option<f64>,
    /// The table's generation: 1, and one more per DMS reload (docs/reloads.md).
    #[serde(default)]
    pub generation: Option<u32>,
    /// A reload in progress, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<String>,
}

impl TableReport {
    fn set_mode(&mut self, mode: &LoadMode) {
        match mode {
            LoadMode::Merge { key } => {
                self.mode = Some("merge".into());
                self.key = Some(key.iter().map(|k| k.target.clone()).collect());
            }
            LoadMode::Append => {
                self.mode = Some("append".into());
                self.key = Some(vec![]);
            }
        }
    }
}

/// Every table the worker knows: its lanes, and the tables in the ledger.
async fn tables(p: &Probes) -> Vec<TableReport> {
    let mut tables: BTreeMap<String, TableReport> = BTreeMap::new();
    match p.warehouse.ledger_summary().await {
        Ok(entries) => {
            for e in entries {
                tables.insert(
                    e.table.clone(),
                    TableReport {
                        table: e.table,
                        last_applied_at: Some(e.applied_at),
                        ..Default::default()
                    },
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "/status: cannot read the ledger"),
    }
    for (table, lane) in p.engine.lanes() {
        let report = tables.entry(table.clone()).or_insert_with(|| TableReport {
            table,
            ..Default::default()
        });
        report.lane = true;
        report.pending_files = lane.pending_files;
        report.held = lane.held;
        report.consecutive_failures = lane.consecutive_failures;
        report.blocked_by = lane.blocked_by;
        report.oldest_pending_s = lane.oldest_pending.map(|t| t.elapsed().as_secs_f64());
        if lane.last_applied.is_some() {
            report.last_applied_file = lane.last_applied;
        }
        if let Some(mode) = &lane.mode {
            report.set_mode(mode);
        }
        report.generation = lane.generation;
        report.reload = lane.reload;
    }
    add_freshness(&p.engine, &mut tables);
    // The ledger's newest entry is by commit time; the last file by DMS order is the
    // lane's (or, without a lane, the warehouse's own answer).
    for report in tables
        .values_mut()
        .filter(|r| r.last_applied_file.is_none())
    {
        if let Ok(Some((order, key))) = p.warehouse.last_applied(&report.table).await {
            report.last_applied_file = Some(key);
            report.generation = Some(crate::batch::split_order_key(&order).0);
        }
    }
    tables.into_values().collect()
}

/// Each table's freshness as of now, and its objective.
fn add_freshness(engine: &Engine, tables: &mut BTreeMap<String, TableReport>) {
    let now = std::time::SystemTime::now();
    for (table, newest, age) in engine.freshness().snapshot(now) {
        let report = tables.entry(table.clone()).or_insert_with(|| TableReport {
            table,
            ..Default::default()
        });
        report.newest_change_at = Some(crate::apply::freshness::rfc3339(newest));
        report.freshness_s = Some(age.as_secs_f64());
    }
    for report in tables.values_mut() {
        report.freshness_objective_s = engine
            .config()
            .freshness_objective(&report.table)
            .map(|o| o.as_secs_f64());
    }
}

async fn status(State(p): State<Probes>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&tables(&p).await).unwrap_or_default(),
    )
}

async fn metrics(State(p): State<Probes>) -> String {
    let held = p
        .engine
        .lanes()
        .iter()
        .filter(|(_, l)| l.held.is_some())
        .count();
    metrics::gauge!("cdc_worker_tables_held").set(held as f64);
    // Freshness is computed now, so it grows while nothing arrives.
    let now = std::time::SystemTime::now();
    for (table, _, age) in p.engine.freshness().snapshot(now) {
        telemetry::record_freshness(&table, age);
    }
    telemetry::metrics_handle().render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiving_fails_health_only_after_the_bound() {
        let health = ReceiveHealth::new(Duration::from_millis(50));
        assert!(health.check().is_ok());
        health.failed("receiving from q: does not exist");
        assert!(health.check().is_ok(), "within the bound");
        std::thread::sleep(Duration::from_millis(80));
        health.failed("receiving from q: does not exist");
        let why = health.check().unwrap_err();
        assert!(
            why.starts_with("no receive from the queue has succeeded for 0s (worker.unhealthy_after = 50ms): receiving from q: does not exist"),
            "{why}"
        );
        health.succeeded();
        assert!(health.check().is_ok());
    }
}
