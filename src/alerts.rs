//! Alerts: things a person should know about (schema changes, held tables, skipped or
//! rejected files, tables that keep failing), logged always and published to SNS when a
//! topic is configured.
//!
//! The JSON body has a stable, documented shape (docs/alerts.md); the subject is short
//! ASCII for email; message attributes (`alert`, `table`, `severity`, `change_kinds`) let
//! subscriptions filter.

use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_sns::types::MessageAttributeValue;
use serde::Serialize;

use crate::schema::diff::{ChangeKind, SchemaChange};
use crate::schema::policy::SchemaPolicy;
use crate::telemetry;

/// Version of the alert body shape; bumped only on incompatible changes.
pub const ALERT_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A new schema version of a table.
    SchemaChange,
    /// A file was not applied and will not be (gone, or a hostile key); the table goes on.
    FileSkipped,
    /// A file cannot be read (corrupt, not Parquet); it goes to the dead-letter queue.
    FileRejected,
    /// A file arrived after later files of its table were applied and cannot be applied
    /// safely; it is held (dead-letter queue).
    FileOutOfOrder,
    /// A table keeps failing to apply; its files wait and are retried with backoff.
    TableFailing,
    /// A table that was reported failing applies again.
    TableRecovered,
    /// A held table's files are waiting for `cdc-worker schema accept`.
    TableHeld,
    /// Two source tables route to one target.
    RoutingCollision,
    /// A key changed more than once in one file and nothing says which change is last
    /// (Firebolt cannot see row order without an ordering column).
    AmbiguousOrder,
    /// Notifications reach the queue for another bucket or outside `source.prefix`: a
    /// setup mistake until proven otherwise. Once per cause.
    NotificationIgnored,
    /// A startup check found something that keeps files from arriving or failing files
    /// from reaching a dead-letter queue (bucket, notification, redrive policy).
    SetupProblem,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::SchemaChange => "schema_change",
            AlertKind::FileSkipped => "file_skipped",
            AlertKind::FileRejected => "file_rejected",
            AlertKind::FileOutOfOrder => "file_out_of_order",
            AlertKind::TableFailing => "table_failing",
            AlertKind::TableRecovered => "table_recovered",
            AlertKind::TableHeld => "table_held",
            AlertKind::RoutingCollision => "routing_collision",
            AlertKind::AmbiguousOrder => "ambiguous_order",
            AlertKind::NotificationIgnored => "notification_ignored",
            AlertKind::SetupProblem => "setup_problem",
        }
    }
}

/// One alert. Optional fields are omitted from the JSON when empty.
#[derive(Debug, Clone, Serialize)]
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<SchemaChange>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
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

/// Where alerts go.
#[derive(Clone, Debug)]
pub struct Alerts {
    sns: Option<(aws_sdk_sns::Client, String)>,
}

impl Alerts {
    pub fn new(sns: aws_sdk_sns::Client, topic_arn: Option<String>) -> Self {
        Self {
            sns: topic_arn.filter(|t| !t.is_empty()).map(|t| (sns, t)),
        }
    }

    /// Only logs.
    pub fn disabled() -> Self {
        Self { sns: None }
    }

    /// Logs the alert and publishes it; a publish failure is logged, never fatal.
    pub async fn publish(&self, alert: &Alert) {
        let body = serde_json::to_string(alert).unwrap_or_default();
        match alert.severity {
            Severity::Info => {
                tracing::info!(alert = alert.alert.as_str(), table = %alert.table, message = %alert.message, "alert")
            }
            Severity::Warning => {
                tracing::warn!(alert = alert.alert.as_str(), table = %alert.table, message = %alert.message, "alert")
            }
            Severity::Error => {
                tracing::error!(alert = alert.alert.as_str(), table = %alert.table, message = %alert.message, "alert")
            }
        }
        metrics::counter!("cdc_worker_alerts_total", "alert" => alert.alert.as_str(), "severity" => alert.severity.as_str()).increment(1);
        let Some((client, topic)) = &self.sns else {
            return;
        };
        let kinds: Vec<&str> = alert.change_kinds().iter().map(|k| k.as_str()).collect();
        let string = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .expect("string attribute")
        };
        let mut request = client
            .publish()
            .topic_arn(topic)
            .subject(alert.subject())
            .message(body)
            .message_attributes("alert", string(alert.alert.as_str()))
            .message_attributes("severity", string(alert.severity.as_str()))
            .message_attributes("held", string(if alert.held { "true" } else { "false" }));
        if !alert.table.is_empty() {
            request = request.message_attributes("table", string(&alert.table));
        }
        if !kinds.is_empty() {
            request = request.message_attributes(
                "change_kinds",
                MessageAttributeValue::builder()
                    .data_type("String.Array")
                    .string_value(serde_json::to_string(&kinds).unwrap_or_default())
                    .build()
                    .expect("array attribute"),
            );
        }
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=3 {
            match request.clone().send().await {
                Ok(_) => return,
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %aws_sdk_sns::error::DisplayErrorContext(&e), attempt, "alert publish failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                Err(e) => {
                    metrics::counter!("cdc_worker_alert_publish_failures_total").increment(1);
                    tracing::error!(error = %aws_sdk_sns::error::DisplayErrorContext(&e), alert = alert.alert.as_str(), table = %alert.table, "could not publish alert to SNS");
                }
            }
        }
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
}
