//! `/healthz` (the process is alive), `/readyz` (queue and warehouse answer),
//! `/metrics` (Prometheus text) and `/status` (the lanes, as JSON, for `cdc-worker status`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::apply::Engine;
use crate::queue::Queue;
use crate::telemetry;
use crate::warehouse::Warehouse;

#[derive(Clone)]
struct Probes {
    queue: Arc<dyn Queue>,
    warehouse: Arc<dyn Warehouse>,
    engine: Arc<Engine>,
}

/// Binds `addr` and serves until `stop` is cancelled. The returned task ends only after
/// every connection has closed, so nothing the probes hold (the warehouse above all)
/// outlives the worker's shutdown.
pub async fn serve(
    addr: SocketAddr,
    queue: Arc<dyn Queue>,
    warehouse: Arc<dyn Warehouse>,
    engine: Arc<Engine>,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(Probes {
            queue,
            warehouse,
            engine,
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

/// One lane as `/status` shows it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct LaneStatus {
    pub table: String,
    pub pending_files: usize,
    pub held: Option<String>,
    pub consecutive_failures: u32,
    /// Seconds the oldest waiting file has waited.
    pub oldest_pending_s: Option<f64>,
}

async fn status(State(p): State<Probes>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let lanes: Vec<LaneStatus> = p
        .engine
        .lanes()
        .into_iter()
        .map(|(table, l)| LaneStatus {
            table,
            pending_files: l.pending_files,
            held: l.held,
            consecutive_failures: l.consecutive_failures,
            oldest_pending_s: l.oldest_pending.map(|t| t.elapsed().as_secs_f64()),
        })
        .collect();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&lanes).unwrap_or_default(),
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
    telemetry::metrics_handle().render()
}
