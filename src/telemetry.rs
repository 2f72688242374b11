//! Logs and metrics. Every notable thing the worker does is one internal event below: a
//! struct whose `emit` writes one log line and updates the matching metrics, so logs and
//! `/metrics` never disagree.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::batch::ApplyStats;
use crate::config::{LogFormat, TelemetryConfig};

/// Installs the log subscriber once; later calls are no-ops (tests start many workers).
pub fn init_logging(config: &TelemetryConfig) {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
        let json = match config.log_format {
            LogFormat::Json => true,
            LogFormat::Pretty => false,
            LogFormat::Auto => !std::io::stdout().is_terminal(),
        };
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = if json {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .try_init()
        } else {
            builder.compact().try_init()
        };
    });
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            )
            .expect("valid buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!("a metrics recorder was already installed");
        }
        handle
    })
}

/// `hostname/pid`, naming this worker in alerts, leases and logs.
pub fn worker_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "localhost".into());
        format!("{host}/{}", std::process::id())
    })
}

/// A message body the worker cannot parse; it stays for the redrive policy.
pub struct MessageUnparseable<'a> {
    pub message_id: &'a str,
    pub receive_count: u32,
    pub reason: &'a str,
}

impl MessageUnparseable<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            message_id = self.message_id,
            receive_count = self.receive_count,
            reason = self.reason,
            "message body cannot be parsed; leaving it for the queue's redrive policy (DLQ)"
        );
        metrics::counter!("cdc_worker_messages_failed_total", "reason" => "unparseable")
            .increment(1);
    }
}

/// A notification the worker has no business with.
pub struct NotificationIgnored<'a> {
    pub message_id: &'a str,
    pub key: Option<&'a str>,
    pub reason: &'a str,
}

impl NotificationIgnored<'_> {
    pub fn emit(&self) {
        tracing::debug!(
            message_id = self.message_id,
            key = self.key,
            reason = self.reason,
            "notification ignored"
        );
        metrics::counter!("cdc_worker_notifications_ignored_total").increment(1);
    }
}

/// A batch committed.
pub struct BatchApplied<'a> {
    pub table: &'a str,
    pub batch_id: &'a str,
    /// Files committed (their keys are in the batch's span and its debug line).
    pub files: usize,
    pub stats: &'a ApplyStats,
    pub elapsed: Duration,
}

impl BatchApplied<'_> {
    pub fn emit(&self) {
        tracing::info!(
            table = self.table,
            batch_id = self.batch_id,
            files = self.files,
            rows_staged = self.stats.rows_staged,
            rows_merged = self.stats.rows_merged,
            rows_appended = self.stats.rows_appended,
            statements = self.stats.statements,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "batch applied"
        );
        let table = self.table.to_string();
        metrics::counter!("cdc_worker_files_applied_total", "table" => table.clone())
            .increment(self.files as u64);
        metrics::counter!("cdc_worker_rows_applied_total", "table" => table.clone())
            .increment(self.stats.rows_staged);
        metrics::counter!("cdc_worker_batches_total", "table" => table.clone(), "outcome" => "committed")
            .increment(1);
        metrics::counter!("cdc_worker_warehouse_statements_total")
            .increment(self.stats.statements as u64);
        metrics::histogram!("cdc_worker_batch_duration_seconds").record(self.elapsed.as_secs_f64());
        if self.stats.deletes_ignored > 0 {
            tracing::warn!(
                table = self.table,
                batch_id = self.batch_id,
                deletes = self.stats.deletes_ignored,
                "deletes ignored: the table has no key (configure one to apply deletes)"
            );
            metrics::counter!("cdc_worker_deletes_ignored_total", "table" => table.clone())
                .increment(self.stats.deletes_ignored);
        }
        for (column, n) in &self.stats.cast_failures {
            tracing::warn!(
                table = self.table,
                batch_id = self.batch_id,
                column,
                values = n,
                "values did not cast to the column's type and were loaded as NULL"
            );
            metrics::counter!("cdc_worker_cast_failures_total", "table" => table.clone())
                .increment(*n);
        }
    }
}

/// A batch (or segment) that failed: its files wait in the lane and are retried with
/// backoff, or, when their data is refused, go back to the queue.
pub struct BatchFailed<'a> {
    pub table: &'a str,
    pub batch_id: &'a str,
    pub error: &'a str,
    /// "poison" (the data is refused) or "transient".
    pub disposition: &'static str,
    pub consecutive_failures: u32,
}

impl BatchFailed<'_> {
    pub fn emit(&self) {
        let fate = if self.disposition == "poison" {
            "batch failed: its data is refused; the file at fault goes back to the queue and later files wait"
        } else {
            "batch failed; its files wait in the lane and are retried with backoff"
        };
        tracing::warn!(
            table = self.table,
            batch_id = self.batch_id,
            error = self.error,
            disposition = self.disposition,
            consecutive_failures = self.consecutive_failures,
            "{fate}"
        );
        metrics::counter!("cdc_worker_batches_total", "table" => self.table.to_string(), "outcome" => "failed")
            .increment(1);
        metrics::counter!("cdc_worker_batch_failures_total", "table" => self.table.to_string(), "disposition" => self.disposition)
            .increment(1);
    }
}

/// Why a file is skipped: the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// In the ledger with the same ETag (a redelivery or a re-upload).
    AlreadyApplied,
    /// In the ledger with another ETag: the object was rewritten after it was applied.
    Replaced,
    /// The object is gone.
    Missing,
    /// The table's policy ignores it.
    TableIgnored,
    /// The key is not a DMS file of a table.
    Unroutable,
    /// The target table's name cannot be used.
    UnusableName,
}

impl SkipKind {
    pub fn label(self) -> &'static str {
        match self {
            SkipKind::AlreadyApplied => "already_applied",
            SkipKind::Replaced => "replaced",
            SkipKind::Missing => "missing",
            SkipKind::TableIgnored => "table_ignored",
            SkipKind::Unroutable => "unroutable",
            SkipKind::UnusableName => "unusable_name",
        }
    }
}

/// A file that will not be applied; the message is acknowledged.
pub struct FileSkipped<'a> {
    pub table: &'a str,
    pub key: &'a str,
    pub kind: SkipKind,
    pub reason: &'a str,
}

impl FileSkipped<'_> {
    pub fn emit(&self) {
        if self.kind == SkipKind::AlreadyApplied {
            // Redeliveries are routine; the metric counts them.
            tracing::debug!(
                table = self.table,
                key = self.key,
                reason = self.reason,
                "file skipped"
            );
        } else {
            tracing::info!(
                table = self.table,
                key = self.key,
                reason = self.reason,
                "file skipped"
            );
        }
        metrics::counter!("cdc_worker_files_skipped_total", "reason" => self.kind.label())
            .increment(1);
    }
}

/// A message received (one per message).
pub fn message_received() {
    metrics::counter!("cdc_worker_messages_received_total").increment(1);
}

/// How long the oldest unapplied file of a table has waited.
pub fn record_lag(table: &str, lag: Duration) {
    metrics::gauge!("cdc_worker_table_lag_seconds", "table" => table.to_string())
        .set(lag.as_secs_f64());
}
