//! Alerts: things a person should know about (schema changes, held tables, skipped or
//! rejected files, tables that keep failing), logged always and published to SNS when a
//! topic is configured.
//!
//! Each alert goes to SNS as a per-protocol message (`MessageStructure=json`): email
//! subscribers get a plain-text body a person reads at a glance ([`email_text`]), every
//! other protocol (SQS, Lambda, HTTPS, ...) the JSON body with its stable, documented
//! shape (docs/alerts.md). The subject is short ASCII; message attributes (`alert`,
//! `table`, `severity`, `held`, `change_kinds`) let subscriptions filter.

mod email;
mod publisher;

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use email::email_text;
pub use publisher::{PublishError, PublishStats};

use crate::schema::diff::{ChangeKind, SchemaChange};
use crate::schema::policy::SchemaPolicy;
use crate::telemetry;

/// Version of the alert body shape; bumped only on incompatible changes.
pub const ALERT_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// Declares the alert kinds once: the enum, its wire names and [`AlertKind::ALL`] (which
/// the golden tests walk, so a new kind cannot go without its email text).
macro_rules! alert_kinds {
    ($($(#[$doc:meta])* $kind:ident => $name:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum AlertKind {
            $($(#[$doc])* $kind,)*
        }

        impl AlertKind {
            /// Every kind, in declaration order.
            pub const ALL: &[AlertKind] = &[$(AlertKind::$kind),*];

            /// The wire name: the body's `alert` field and the `alert` attribute.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(AlertKind::$kind => $name,)*
                }
            }
        }
    };
}

// A new kind: add it here, then the compiler points at its email text
// (`email::guide`) and its golden test fixture; document it in docs/alerts.md and its
// runbook entry in docs/operations.md.
alert_kinds! {
    /// A new schema version of a table.
    SchemaChange => "schema_change",
    /// A file was not applied and will not be (gone, or a hostile key); the table goes on.
    FileSkipped => "file_skipped",
    /// A file cannot be read (corrupt, not Parquet); it goes to the dead-letter queue.
    FileRejected => "file_rejected",
    /// A file arrived after later files of its table were applied and cannot be applied
    /// safely; it is held (dead-letter queue).
    FileOutOfOrder => "file_out_of_order",
    /// A table keeps failing to apply; its files wait and are retried with backoff.
    TableFailing => "table_failing",
    /// A table that was reported failing applies again.
    TableRecovered => "table_recovered",
    /// A held table's files are waiting for `cdc-worker schema accept`.
    TableHeld => "table_held",
    /// Two source tables route to one target.
    RoutingCollision => "routing_collision",
    /// A key changed more than once in one file and nothing says which change is last
    /// (Firebolt cannot see row order without an ordering column).
    AmbiguousOrder => "ambiguous_order",
    /// Rows of an applied file were skipped: their key has a NULL, so they change no row.
    RowsSkipped => "rows_skipped",
    /// A CDC file has no `Op` column: its rows were applied as inserts, deletes unseen.
    /// Once per table per worker process.
    OpColumnMissing => "op_column_missing",
    /// Notifications reach the queue for another bucket or outside `source.prefix`: a
    /// setup mistake until proven otherwise. Once per cause.
    NotificationIgnored => "notification_ignored",
    /// A startup check found something that keeps files from arriving or failing files
    /// from reaching a dead-letter queue (bucket, notification, redrive policy).
    SetupProblem => "setup_problem",
    /// A table's key appeared, changed or went away; held when the table repeats a key.
    KeyChanged => "key_changed",
    /// An operator skipped or forgot a file with `cdc-worker ledger`.
    LedgerEdited => "ledger_edited",
    /// A table's newest applied change is older than its freshness objective. Once per
    /// breach.
    FreshnessObjectiveMissed => "freshness_objective_missed",
    /// A table that missed its freshness objective is within it again.
    FreshnessRecovered => "freshness_recovered",
    /// A DMS reload's new generation replaced the table (one alert per reload, with the
    /// rows before and after, the old generation's files it made obsolete and the schema
    /// changes it brought).
    TableReloaded => "table_reloaded",
    /// A reload's new generation is built and waits for `cdc-worker table accept-reload`
    /// (`dms.reload = "hold"`).
    ReloadWaiting => "reload_waiting",
    /// The destructive-change guard held a table: a batch deleting, or a reload removing,
    /// a large part of its rows waits for a person.
    DestructiveChangeHeld => "destructive_change_held",
}

/// One alert. Optional fields are omitted from the JSON when empty. It deserializes from
/// the JSON body too (for subscribers written in Rust, and the tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alert {
    pub format_version: u32,
    pub alert: AlertKind,
    pub severity: Severity,
    pub table: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// One sentence a person can read.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<SchemaChange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<SchemaPolicy>,
    /// The file that introduced the change or failed (s3://bucket/key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Whether the table is held (nothing applies until released).
    pub held: bool,
    /// What to do now, when something is expected of a person.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_steps: Option<String>,
    pub detected_at: String,
    pub worker: String,
}

impl Alert {
    pub fn new(
        alert: AlertKind,
        severity: Severity,
        table: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            format_version: ALERT_FORMAT_VERSION,
            alert,
            severity,
            table: table.to_string(),
            source: None,
            message: message.into(),
            schema_version: None,
            changes: Vec::new(),
            actions: Vec::new(),
            policy: None,
            file: None,
            held: false,
            next_steps: None,
            detected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            worker: telemetry::worker_id().to_string(),
        }
    }

    pub fn change_kinds(&self) -> BTreeSet<ChangeKind> {
        self.changes.iter().map(|c| c.kind()).collect()
    }

    /// A subject under 100 ASCII characters, as SNS requires and email clients show.
    pub fn subject(&self) -> String {
        let what = match self.alert {
            AlertKind::SchemaChange => {
                let kinds: Vec<&str> = self.change_kinds().iter().map(|k| k.as_str()).collect();
                format!(
                    "schema v{}: {}",
                    self.schema_version.unwrap_or(0),
                    kinds.join(", ").replace('_', " ")
                )
            }
            other => other.as_str().replace('_', " "),
        };
        let held = if self.held { " (HELD)" } else { "" };
        if self.table.is_empty() {
            return subject_text(&format!("[cdc-worker] {what}{held}"));
        }
        subject_text(&format!("[cdc-worker] {}: {what}{held}", self.table))
    }
}

/// Makes any text a valid SNS subject: printable ASCII, under 100 characters.
pub fn subject_text(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if out.len() > 99 {
        out.truncate(96);
        out.push_str("...");
    }
    out
}

/// Where alerts go: the log always, and the SNS topic when one is configured.
///
/// Publishing never waits for SNS: [`Alerts::publish`] logs and counts the alert, renders
/// the SNS message and hands it to a background task through a bounded queue (see
/// [`publisher`] for what happens when the queue is full or SNS is down).
#[derive(Clone, Debug)]
pub struct Alerts {
    sns: Option<publisher::Publisher>,
}

impl Alerts {
    /// Starts the background publisher when `topic_arn` is set; call it inside the Tokio
    /// runtime that will run the worker.
    pub fn new(sns: aws_sdk_sns::Client, topic_arn: Option<String>) -> Self {
        Self::with_queue_capacity(sns, topic_arn, publisher::QUEUE_CAPACITY)
    }

    /// Like [`Alerts::new`], with room for `capacity` alerts waiting for SNS.
    pub fn with_queue_capacity(
        sns: aws_sdk_sns::Client,
        topic_arn: Option<String>,
        capacity: usize,
    ) -> Self {
        Self {
            sns: topic_arn
                .filter(|t| !t.is_empty())
                .map(|t| publisher::Publisher::start(sns, t, capacity)),
        }
    }

    /// Only logs.
    pub fn disabled() -> Self {
        Self { sns: None }
    }

    /// Logs the alert and queues it for SNS. Returns at once: a slow, failing or
    /// unreachable SNS never delays the caller (a batch, a receiver).
    pub async fn publish(&self, alert: &Alert) {
        // One `message` (the alert's sentence); `alert` names the kind, for searches.
        let (kind, table, text) = (alert.alert.as_str(), &alert.table, &alert.message);
        match alert.severity {
            Severity::Info => tracing::info!(alert = kind, %table, "{text}"),
            Severity::Warning => tracing::warn!(alert = kind, %table, "{text}"),
            Severity::Error => tracing::error!(alert = kind, %table, "{text}"),
        }
        metrics::counter!("cdc_worker_alerts_total", "alert" => alert.alert.as_str(), "severity" => alert.severity.as_str()).increment(1);
        if let Some(sns) = &self.sns {
            sns.enqueue(publisher::SnsMessage::of(alert));
        }
    }

    /// Waits until every queued alert is published (or has failed), at most `within`: at
    /// shutdown, with what is left of the shutdown budget. Returns how many were still
    /// unsent when the time ran out (they are in the log; none is retried later).
    pub async fn flush(&self, within: Duration) -> usize {
        match &self.sns {
            Some(sns) => sns.flush(within).await,
            None => 0,
        }
    }

    /// What the publisher has done so far (all zero without a topic).
    pub fn stats(&self) -> PublishStats {
        self.sns
            .as_ref()
            .map(publisher::Publisher::stats)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::types::ColumnType;

    #[test]
    fn subjects_are_short_ascii() {
        let mut alert = Alert::new(
            AlertKind::SchemaChange,
            Severity::Warning,
            "comandes_é",
            "x",
        );
        alert.schema_version = Some(2);
        alert.changes = vec![SchemaChange::NewColumn {
            column: "email".into(),
            ty: ColumnType::String,
        }];
        assert_eq!(
            alert.subject(),
            "[cdc-worker] comandes_?: schema v2: new column"
        );
        alert.table = "t".repeat(300);
        let s = alert.subject();
        assert!(s.len() < 100 && s.is_ascii(), "{s}");
    }

    #[test]
    fn body_has_the_documented_fields() {
        let alert = Alert::new(AlertKind::FileSkipped, Severity::Warning, "orders", "gone");
        let v: serde_json::Value = serde_json::to_value(&alert).unwrap();
        for field in [
            "format_version",
            "alert",
            "severity",
            "table",
            "message",
            "held",
            "detected_at",
            "worker",
        ] {
            assert!(v.get(field).is_some(), "{field} missing: {v}");
        }
        assert_eq!(v["alert"], "file_skipped");
    }

    #[test]
    fn every_kind_has_one_wire_name() {
        let mut seen = std::collections::HashSet::new();
        for &kind in AlertKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
            assert!(seen.insert(kind.as_str()), "{kind:?} twice");
        }
    }
}
