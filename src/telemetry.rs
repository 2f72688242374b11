//! Logs and metrics. Every notable thing the worker does is one internal event below: a
//! struct whose `emit` writes one log line and updates the matching metrics, so logs and
//! `/metrics` never disagree. [`METRICS`] describes every metric the worker exports (the
//! `# HELP` lines of `/metrics`, and the README's list).

mod json;

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::batch::ApplyStats;
use crate::config::{LogFormat, TelemetryConfig};

/// The log filter: the configured level, with the AWS SDK's credential and region chain
/// quiet below ERROR. It logs a WARN with a struct dump for every provider it tries and
/// fails (instance metadata on a laptop, say); the call that needed them fails anyway,
/// and that error is explained where it is reported.
pub fn log_filter(level: &str) -> EnvFilter {
    if let Ok(from_env) = EnvFilter::try_from_default_env() {
        return from_env;
    }
    if level.contains("aws_config") {
        EnvFilter::new(level)
    } else {
        EnvFilter::new(format!("{level},aws_config=error"))
    }
}

/// Installs the log subscriber once; later calls are no-ops (tests start many workers).
pub fn init_logging(config: &TelemetryConfig) {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let json = match config.log_format {
            LogFormat::Json => true,
            LogFormat::Pretty => false,
            LogFormat::Auto => !std::io::stdout().is_terminal(),
        };
        let builder = tracing_subscriber::fmt()
            .with_env_filter(log_filter(&config.log_level))
            .with_writer(std::io::stderr);
        let _ = if json {
            builder
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(json::JsonLines)
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
            .expect("valid buckets")
            // A stage can take hours (a backlog waiting in the queue): buckets up to one,
            // with the alerting rule's 2-minute threshold among them.
            .set_buckets_for_metric(
                Matcher::Full("cdc_worker_stage_seconds".into()),
                &[
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0, 3600.0,
                ],
            )
            .expect("valid buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!("a metrics recorder was already installed");
        }
        describe_metrics();
        handle
    })
}

/// What a metric is, for its `# HELP` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the worker exports: name, kind, labels and help text. Most are updated by
/// the events of this module; the others by the module named in the comment beside them.
/// A test keeps the README's list in step with this one.
pub const METRICS: &[(&str, MetricKind, &str, &str)] = &[
    (
        "cdc_worker_messages_received_total",
        MetricKind::Counter,
        "",
        "SQS messages received.",
    ),
    // queue::tracker
    (
        "cdc_worker_messages_deleted_total",
        MetricKind::Counter,
        "",
        "SQS messages deleted after all their files were committed or skipped.",
    ),
    // queue::tracker
    (
        "cdc_worker_messages_released_total",
        MetricKind::Counter,
        "",
        "SQS messages released for redelivery (a file failed, or shutdown).",
    ),
    (
        "cdc_worker_messages_failed_total",
        MetricKind::Counter,
        "reason",
        "SQS messages left for the redrive policy (reason: unparseable).",
    ),
    // queue::tracker
    (
        "cdc_worker_messages_handed_over_total",
        MetricKind::Counter,
        "",
        "Messages in work for nearly 12 hours (SQS's in-flight limit) replaced by a fresh copy.",
    ),
    // queue::tracker
    (
        "cdc_worker_visibility_extensions_total",
        MetricKind::Counter,
        "",
        "Visibility extensions of in-flight messages (the keep-alive).",
    ),
    (
        "cdc_worker_notifications_ignored_total",
        MetricKind::Counter,
        "reason",
        "Notifications acknowledged without a file to apply (reason: other_bucket, outside_prefix, not_parquet, test_event, other_event).",
    ),
    (
        "cdc_worker_receive_failures_total",
        MetricKind::Counter,
        "",
        "ReceiveMessage calls that failed (the queue is unreachable or missing).",
    ),
    (
        "cdc_worker_files_applied_total",
        MetricKind::Counter,
        "table",
        "Files committed to the table.",
    ),
    (
        "cdc_worker_rows_applied_total",
        MetricKind::Counter,
        "table",
        "Rows staged from committed files of the table.",
    ),
    (
        "cdc_worker_files_skipped_total",
        MetricKind::Counter,
        "reason",
        "Files acknowledged without applying them (reason: already_applied, replaced, missing, table_ignored, unroutable, not_dms_name, unusable_name).",
    ),
    // apply::lane
    (
        "cdc_worker_reloads_total",
        MetricKind::Counter,
        "table, outcome",
        "DMS reloads of a table: started (its full load arrived again) and promoted (the new generation replaced the table).",
    ),
    (
        "cdc_worker_table_generation",
        MetricKind::Gauge,
        "table",
        "The table's generation: 1 for its first full load, one more per DMS reload.",
    ),
    (
        "cdc_worker_guard_holds_total",
        MetricKind::Counter,
        "table, kind",
        "Tables held for a person by the destructive-change guard (kind deletes, reload) or the reload policy (reload_policy).",
    ),
    (
        "cdc_worker_files_rejected_total",
        MetricKind::Counter,
        "table",
        "Files that cannot be read as Parquet (left for the dead-letter queue).",
    ),
    // apply::lane
    (
        "cdc_worker_gap_files_total",
        MetricKind::Counter,
        "table",
        "Files found in the S3 listing before their notification arrived, applied in order.",
    ),
    (
        "cdc_worker_batches_total",
        MetricKind::Counter,
        "table, outcome",
        "Batches by outcome (committed, failed).",
    ),
    (
        "cdc_worker_batch_failures_total",
        MetricKind::Counter,
        "table, disposition",
        "Failed batches by disposition (transient: retried; poison: the data is refused).",
    ),
    (
        "cdc_worker_batch_duration_seconds",
        MetricKind::Histogram,
        "",
        "Time to apply one batch, from staging to commit.",
    ),
    (
        "cdc_worker_warehouse_statements_total",
        MetricKind::Counter,
        "",
        "Statements sent to the warehouse by committed batches.",
    ),
    // apply::lane (segment)
    (
        "cdc_worker_null_key_rows_total",
        MetricKind::Counter,
        "table",
        "Rows skipped because their key has a NULL (they change no row).",
    ),
    (
        "cdc_worker_deletes_ignored_total",
        MetricKind::Counter,
        "table",
        "Deletes not applied because the table has no key.",
    ),
    (
        "cdc_worker_cast_failures_total",
        MetricKind::Counter,
        "table",
        "Values that did not cast to the column's type.",
    ),
    // health (at scrape time, from apply::freshness)
    (
        "cdc_worker_table_freshness_seconds",
        MetricKind::Gauge,
        "table",
        "Age of the newest change applied to the table (now minus its DMS time); absent until the table applies one.",
    ),
    // apply::lane (segment) and queue::tracker
    (
        "cdc_worker_stage_seconds",
        MetricKind::Histogram,
        "stage",
        "Time of each stage of a file's way (stage: s3_to_sqs, sqs_to_receive, receive_to_batch, batch_to_commit, commit_to_delete).",
    ),
    (
        "cdc_worker_table_lag_seconds",
        MetricKind::Gauge,
        "table",
        "Age of the table's oldest waiting file (0 when none waits).",
    ),
    // apply::lane
    (
        "cdc_worker_table_held",
        MetricKind::Gauge,
        "table",
        "1 while a schema policy holds the table, else 0.",
    ),
    // health
    (
        "cdc_worker_tables_held",
        MetricKind::Gauge,
        "",
        "Tables held by a schema policy.",
    ),
    // apply::lane (outcome)
    (
        "cdc_worker_schema_changes_total",
        MetricKind::Counter,
        "table",
        "Schema versions recorded for the table.",
    ),
    // lease
    (
        "cdc_worker_lease_events_total",
        MetricKind::Counter,
        "event",
        "Lease events (acquired, taken_over, renewed, released, busy, lost, lost_race).",
    ),
    // apply::lane
    (
        "cdc_worker_lease_busy_total",
        MetricKind::Counter,
        "table",
        "Batches that waited because another worker held the table's lease.",
    ),
    // alerts
    (
        "cdc_worker_alerts_total",
        MetricKind::Counter,
        "alert, severity",
        "Alerts raised, by kind and severity.",
    ),
    // alerts
    (
        "cdc_worker_alert_publish_failures_total",
        MetricKind::Counter,
        "",
        "Alerts that could not be published to SNS (they are still logged).",
    ),
    // alerts::publisher
    (
        "cdc_worker_alerts_dropped_total",
        MetricKind::Counter,
        "reason",
        "Alerts not published to SNS, only logged (reason: queue_full, shutdown).",
    ),
    // alerts::publisher
    (
        "cdc_worker_alerts_queued",
        MetricKind::Gauge,
        "",
        "Alerts waiting to be published to SNS.",
    ),
];

/// Hands every description to the recorder, so `/metrics` prints `# HELP` for each.
fn describe_metrics() {
    for (name, kind, _, help) in METRICS {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(*name, *help),
            MetricKind::Gauge => metrics::describe_gauge!(*name, *help),
            MetricKind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
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

/// Why a notification brings no file to apply: the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IgnoredReason {
    /// `s3:TestEvent`, sent when a notification is configured.
    TestEvent,
    /// Not an object creation (deletes, restores, SNS subscription messages).
    OtherEvent,
    /// About a bucket other than `source.bucket`: a typo, or a shared queue.
    OtherBucket,
    /// A key outside `source.prefix`.
    OutsidePrefix,
    /// Not a `.parquet` file.
    NotParquet,
}

impl IgnoredReason {
    pub fn label(self) -> &'static str {
        match self {
            IgnoredReason::TestEvent => "test_event",
            IgnoredReason::OtherEvent => "other_event",
            IgnoredReason::OtherBucket => "other_bucket",
            IgnoredReason::OutsidePrefix => "outside_prefix",
            IgnoredReason::NotParquet => "not_parquet",
        }
    }

    /// Whether it can mean a setup mistake (files that should be applied and are not).
    pub fn may_be_a_mistake(self) -> bool {
        matches!(
            self,
            IgnoredReason::OtherBucket | IgnoredReason::OutsidePrefix
        )
    }
}

/// A notification the worker has no business with. A possible setup mistake is a WARN
/// the first time per cause (`first_of_cause`), DEBUG after that; the metric counts all.
pub struct NotificationIgnored<'a> {
    pub message_id: &'a str,
    /// `s3://bucket/key`, when the notification is about an object.
    pub object: Option<&'a str>,
    pub reason: IgnoredReason,
    /// One sentence: why, and what would change it.
    pub detail: &'a str,
    pub first_of_cause: bool,
}

impl NotificationIgnored<'_> {
    pub fn emit(&self) {
        if self.reason.may_be_a_mistake() && self.first_of_cause {
            tracing::warn!(
                message_id = self.message_id,
                object = self.object,
                reason = self.reason.label(),
                detail = self.detail,
                "notification ignored (logged once per cause; cdc_worker_notifications_ignored_total counts every one)"
            );
        } else {
            tracing::debug!(
                message_id = self.message_id,
                object = self.object,
                reason = self.reason.label(),
                detail = self.detail,
                "notification ignored"
            );
        }
        metrics::counter!("cdc_worker_notifications_ignored_total", "reason" => self.reason.label())
            .increment(1);
    }
}

/// A batch committed.
pub struct BatchApplied<'a> {
    pub table: &'a str,
    pub batch_id: &'a str,
    /// Files committed (their keys are in the batch's span and its debug line).
    pub files: usize,
    /// (column, its variant column) of the plan: values that do not cast go there.
    pub variants: &'a [(String, String)],
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
            match self.variants.iter().find(|(c, _)| c == column) {
                Some((_, variant)) => tracing::warn!(
                    table = self.table,
                    batch_id = self.batch_id,
                    column,
                    variant_column = variant,
                    values = n,
                    "values did not fit the column's type: they were loaded into its variant column (NULL in the column)"
                ),
                None => tracing::warn!(
                    table = self.table,
                    batch_id = self.batch_id,
                    column,
                    values = n,
                    "values did not cast to the column's type and were loaded as NULL"
                ),
            }
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
    /// In a table's folder, but not named as DMS names its files (a stray upload).
    NotDmsName,
    /// The target table's name cannot be used.
    UnusableName,
    /// An operator skipped it (`cdc-worker ledger skip`).
    SkippedByOperator,
}

impl SkipKind {
    pub fn label(self) -> &'static str {
        match self {
            SkipKind::AlreadyApplied => "already_applied",
            SkipKind::Replaced => "replaced",
            SkipKind::Missing => "missing",
            SkipKind::TableIgnored => "table_ignored",
            SkipKind::Unroutable => "unroutable",
            SkipKind::NotDmsName => "not_dms_name",
            SkipKind::UnusableName => "unusable_name",
            SkipKind::SkippedByOperator => "skipped_by_operator",
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

/// A ReceiveMessage call that failed; the receiver retries with backoff, and `/healthz`
/// fails once no receive has succeeded for `worker.unhealthy_after`.
pub struct ReceiveFailed<'a> {
    pub receiver: usize,
    pub error: &'a str,
    pub retry_in: Duration,
    pub failing_for: Duration,
}

impl ReceiveFailed<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            receiver = self.receiver,
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            failing_for_s = self.failing_for.as_secs(),
            "cannot receive from the queue"
        );
        metrics::counter!("cdc_worker_receive_failures_total").increment(1);
    }
}

/// A message received (one per message).
pub fn message_received() {
    metrics::counter!("cdc_worker_messages_received_total").increment(1);
}

/// One stage of a file's way from its upload to the deletion of its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// S3's `eventTime` to SQS's `SentTimestamp` (S3's, or SNS's, delivery).
    S3ToSqs,
    /// `SentTimestamp` to `ApproximateFirstReceiveTimestamp` (waiting in the queue).
    SqsToReceive,
    /// Our receive to the start of the batch that applies the file (lane, linger, permit).
    ReceiveToBatch,
    /// Batch start to the commit of the file's segment.
    BatchToCommit,
    /// The commit of a message's last file to its deletion from the queue (one per message).
    CommitToDelete,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::S3ToSqs,
        Stage::SqsToReceive,
        Stage::ReceiveToBatch,
        Stage::BatchToCommit,
        Stage::CommitToDelete,
    ];

    /// The `stage` label (the dashboard and the alerting rules use these).
    pub fn label(self) -> &'static str {
        match self {
            Stage::S3ToSqs => "s3_to_sqs",
            Stage::SqsToReceive => "sqs_to_receive",
            Stage::ReceiveToBatch => "receive_to_batch",
            Stage::BatchToCommit => "batch_to_commit",
            Stage::CommitToDelete => "commit_to_delete",
        }
    }
}

/// Records how long a stage took for one file (or message).
pub fn record_stage(stage: Stage, took: Duration) {
    metrics::histogram!("cdc_worker_stage_seconds", "stage" => stage.label())
        .record(took.as_secs_f64());
}

/// How old the newest applied change of a table is.
pub fn record_freshness(table: &str, age: Duration) {
    metrics::gauge!("cdc_worker_table_freshness_seconds", "table" => table.to_string())
        .set(age.as_secs_f64());
}

/// How long the oldest unapplied file of a table has waited.
pub fn record_lag(table: &str, lag: Duration) {
    metrics::gauge!("cdc_worker_table_lag_seconds", "table" => table.to_string())
        .set(lag.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the code emits is described (so `/metrics` has its `# HELP`).
    #[test]
    fn every_emitted_metric_is_described() {
        fn sources(dir: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        let mut texts = Vec::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut texts,
        );
        let mut emitted = std::collections::BTreeSet::new();
        for text in &texts {
            for macro_name in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                for part in text.split(macro_name).skip(1) {
                    if let Some(name) = part
                        .split('"')
                        .next()
                        .filter(|n| n.starts_with("cdc_worker_"))
                    {
                        emitted.insert(name.to_string());
                    }
                }
            }
        }
        assert!(emitted.len() > 20, "{emitted:?}");
        for name in emitted {
            assert!(
                METRICS.iter().any(|(n, ..)| *n == name),
                "{name} is emitted but not in telemetry::METRICS"
            );
        }
    }

    /// The README lists every metric with its type, labels and help text.
    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!("../README.md");
        for (name, kind, labels, help) in METRICS {
            let kind = format!("{kind:?}").to_lowercase();
            let labels: Vec<String> = labels
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| format!("`{l}`"))
                .collect();
            let row = format!("| `{name}` | {kind} | {} | {help} |", labels.join(", "));
            assert!(readme.contains(&row), "README.md lacks the row:\n{row}");
        }
    }
}
