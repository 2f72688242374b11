//! The SNS side of alerts: the per-protocol message an alert becomes, and the background
//! task that publishes it, so that no batch or receiver ever waits for SNS.
//!
//! Defined fates:
//! - The queue between callers and the task holds [`QUEUE_CAPACITY`] alerts. When it is
//!   full (SNS slow or down for a long time), the new alert is dropped: it stays in the
//!   log, a WARN line says so and `cdc_worker_alerts_dropped_total{reason="queue_full"}`
//!   counts it.
//! - A publish is tried [`ATTEMPTS`] times (200 ms, then 800 ms apart), each attempt
//!   bounded by [`ATTEMPT_TIMEOUT`]; errors SNS will repeat (no such topic, no
//!   permission) are not retried. A final failure is an ERROR line naming the topic and
//!   `cdc_worker_alert_publish_failures_total`.
//! - At shutdown, [`Publisher::flush`] waits for the queue within what is left of the
//!   budget; what is still unsent is counted as `reason="shutdown"`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sns::config::retry::RetryConfig;
use aws_sdk_sns::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sns::types::MessageAttributeValue;
use tokio::sync::{mpsc, watch};

use super::{Alert, AlertKind, email_text};

/// Alerts waiting for SNS at most; a burst of alerts is far smaller.
pub const QUEUE_CAPACITY: usize = 1000;
/// Attempts per alert (the first and two retries).
pub const ATTEMPTS: u32 = 3;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// One attempt waits at most this long for SNS (the SDK has no read timeout of its own).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// SNS refuses messages over 256 KiB (body and attributes); the structure stays below.
const MAX_MESSAGE_BYTES: usize = 250 * 1024;

/// A publish that failed for good.
#[derive(Debug, Clone, thiserror::Error)]
#[error("could not publish alert to SNS topic {topic} after {attempts} attempt(s): {cause}")]
pub struct PublishError {
    pub topic: String,
    pub attempts: u32,
    pub cause: String,
}

/// What a publisher has done since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishStats {
    pub published: u64,
    pub failed: u64,
    pub dropped: u64,
    /// Queued or being published now.
    pub queued: usize,
    /// The last failure, as logged.
    pub last_error: Option<String>,
}

/// One message attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: &'static str,
    pub data_type: &'static str,
    pub value: String,
}

/// An alert as SNS gets it.
#[derive(Debug, Clone)]
pub struct SnsMessage {
    pub kind: AlertKind,
    pub table: String,
    pub subject: String,
    /// The `Message` parameter: the per-protocol structure, or the JSON body alone.
    pub message: String,
    /// Whether `message` is a per-protocol structure (`MessageStructure=json`).
    pub structured: bool,
    pub attributes: Vec<Attribute>,
}

impl SnsMessage {
    /// `{"default": <JSON body>, "email": <text>}`: SNS gives `email` subscribers the
    /// text and every other protocol (SQS, Lambda, HTTP/S, email-json, ...) `default`,
    /// which is the JSON body exactly as published before per-protocol messages.
    pub fn of(alert: &Alert) -> Self {
        let body = serde_json::to_string(alert).unwrap_or_default();
        let structure = serde_json::json!({"default": body, "email": email_text(alert)});
        let structure = serde_json::to_string(&structure).unwrap_or_default();
        let (message, structured) = if structure.len() <= MAX_MESSAGE_BYTES {
            (structure, true)
        } else {
            // Only a huge body (thousands of columns) gets here: mail gets the JSON.
            tracing::warn!(alert = alert.alert.as_str(), table = %alert.table, bytes = structure.len(), "alert too large for a per-protocol message; email subscribers get the JSON body");
            (body, false)
        };
        Self {
            kind: alert.alert,
            table: alert.table.clone(),
            subject: alert.subject(),
            message,
            structured,
            attributes: attributes(alert),
        }
    }
}

fn attributes(alert: &Alert) -> Vec<Attribute> {
    let string = |name, value: &str| Attribute {
        name,
        data_type: "String",
        value: value.to_string(),
    };
    let mut out = vec![
        string("alert", alert.alert.as_str()),
        string("severity", alert.severity.as_str()),
        string("held", if alert.held { "true" } else { "false" }),
    ];
    if !alert.table.is_empty() {
        out.push(string("table", &alert.table));
    }
    let kinds: Vec<&str> = alert.change_kinds().iter().map(|k| k.as_str()).collect();
    if !kinds.is_empty() {
        out.push(Attribute {
            name: "change_kinds",
            data_type: "String.Array",
            value: serde_json::to_string(&kinds).unwrap_or_default(),
        });
    }
    out
}

/// The handle callers enqueue into; clones share one background task, which ends when
/// the last clone is dropped and the queue is empty.
#[derive(Clone)]
pub struct Publisher {
    topic: Arc<str>,
    queue: mpsc::Sender<SnsMessage>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

struct Shared {
    /// Alerts enqueued and not yet done (published or failed).
    pending: watch::Sender<usize>,
    published: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn add_pending(&self, delta: isize) {
        self.pending
            .send_modify(|n| *n = n.saturating_add_signed(delta));
        metrics::gauge!("cdc_worker_alerts_queued").set(*self.pending.borrow() as f64);
    }
}

impl Publisher {
    /// Spawns the background task on the current Tokio runtime.
    pub fn start(client: aws_sdk_sns::Client, topic: String, capacity: usize) -> Self {
        // Registered at zero so that rate() and increase() see the first failure.
        metrics::counter!("cdc_worker_alert_publish_failures_total").increment(0);
        for reason in ["queue_full", "shutdown"] {
            metrics::counter!("cdc_worker_alerts_dropped_total", "reason" => reason).increment(0);
        }
        let (queue, receiver) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            pending: watch::Sender::new(0),
            published: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let topic: Arc<str> = topic.into();
        tokio::spawn(run(client, topic.clone(), receiver, shared.clone()));
        Self {
            topic,
            queue,
            shared,
        }
    }

    /// Queues a message without waiting; drops it (logged, counted) when the queue is full.
    pub fn enqueue(&self, message: SnsMessage) {
        // Counted before it is visible to the task, so `flush` never sees zero early.
        self.shared.add_pending(1);
        if let Err(e) = self.queue.try_send(message) {
            self.shared.add_pending(-1);
            let (reason, message) = match e {
                mpsc::error::TrySendError::Full(m) => ("queue_full", m),
                mpsc::error::TrySendError::Closed(m) => ("shutdown", m),
            };
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("cdc_worker_alerts_dropped_total", "reason" => reason).increment(1);
            tracing::warn!(
                alert = message.kind.as_str(),
                table = %message.table,
                topic = %self.topic,
                reason,
                "alert not published to SNS: the publish queue is full (SNS slow or unreachable); the alert is only in this log"
            );
        }
    }

    /// Waits until nothing is queued, at most `within`; returns how many are left.
    pub async fn flush(&self, within: Duration) -> usize {
        let mut pending = self.shared.pending.subscribe();
        let _ = tokio::time::timeout(within, pending.wait_for(|n| *n == 0)).await;
        let left = *self.shared.pending.borrow();
        if left > 0 {
            metrics::counter!("cdc_worker_alerts_dropped_total", "reason" => "shutdown")
                .increment(left as u64);
            tracing::warn!(
                left,
                topic = %self.topic,
                within_ms = within.as_millis() as u64,
                "alerts not published to SNS before the end of the shutdown budget; they are only in the log"
            );
        }
        left
    }

    pub fn stats(&self) -> PublishStats {
        PublishStats {
            published: self.shared.published.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            queued: *self.shared.pending.borrow(),
            last_error: self
                .shared
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

async fn run(
    client: aws_sdk_sns::Client,
    topic: Arc<str>,
    mut queue: mpsc::Receiver<SnsMessage>,
    shared: Arc<Shared>,
) {
    while let Some(message) = queue.recv().await {
        match send(&client, &topic, &message).await {
            Ok(()) => {
                shared.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("cdc_worker_alert_publish_failures_total").increment(1);
                tracing::error!(
                    alert = message.kind.as_str(),
                    table = %message.table,
                    topic = %topic,
                    error = %e,
                    "alert not published to SNS; it is only in this log"
                );
                *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
        shared.add_pending(-1);
    }
}

/// Publishes one message with retries.
async fn send(
    client: &aws_sdk_sns::Client,
    topic: &str,
    message: &SnsMessage,
) -> Result<(), PublishError> {
    let mut request = client
        .publish()
        .topic_arn(topic)
        .subject(&message.subject)
        .message(&message.message);
    if message.structured {
        request = request.message_structure("json");
    }
    for a in &message.attributes {
        let value = MessageAttributeValue::builder()
            .data_type(a.data_type)
            .string_value(&a.value)
            .build()
            .expect("data type and value are set");
        request = request.message_attributes(a.name, value);
    }
    let mut delay = FIRST_RETRY_DELAY;
    let mut attempt = 1;
    loop {
        // The SDK's own retries are off: the attempts and delays are the ones documented.
        let attempt_once = request
            .clone()
            .customize()
            .config_override(
                aws_sdk_sns::config::Builder::default().retry_config(RetryConfig::disabled()),
            )
            .send();
        let (cause, permanent) = match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt_once).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => describe(&e),
            Err(_) => (format!("no answer within {ATTEMPT_TIMEOUT:?}"), false),
        };
        if permanent || attempt == ATTEMPTS {
            return Err(PublishError {
                topic: topic.to_string(),
                attempts: attempt,
                cause,
            });
        }
        tracing::debug!(topic, attempt, cause, "alert publish failed; retrying");
        tokio::time::sleep(delay).await;
        delay *= 4;
        attempt += 1;
    }
}

/// The cause in one line, and whether SNS would answer the same again (a client error
/// other than throttling: no such topic, no permission, an invalid parameter).
fn describe(e: &SdkError<aws_sdk_sns::operation::publish::PublishError>) -> (String, bool) {
    match e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or("error");
            let text = err.message().unwrap_or_default();
            let status = service.raw().status().as_u16();
            let permanent =
                (400..500).contains(&status) && status != 429 && !code.contains("Throttl");
            (format!("{code}: {text}"), permanent)
        }
        SdkError::TimeoutError(_) => ("timed out".into(), false),
        SdkError::DispatchFailure(_) => (
            format!("cannot reach SNS ({})", DisplayErrorContext(e)),
            false,
        ),
        other => (DisplayErrorContext(other).to_string(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Severity;
    use crate::schema::diff::SchemaChange;
    use crate::schema::types::ColumnType;

    fn schema_change() -> Alert {
        let mut alert = Alert::new(
            AlertKind::SchemaChange,
            Severity::Warning,
            "orders",
            "orders: new column coupon string",
        );
        alert.schema_version = Some(2);
        alert.changes = vec![SchemaChange::NewColumn {
            column: "coupon".into(),
            ty: ColumnType::String,
        }];
        alert
    }

    #[test]
    fn every_protocol_but_email_gets_the_json_body_unchanged() {
        let alert = schema_change();
        let m = SnsMessage::of(&alert);
        assert!(m.structured);
        let structure: serde_json::Value = serde_json::from_str(&m.message).unwrap();
        let keys: Vec<&String> = structure.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["default", "email"]);
        assert_eq!(
            structure["default"].as_str().unwrap(),
            serde_json::to_string(&alert).unwrap(),
            "the JSON body, byte for byte"
        );
        assert_eq!(structure["email"].as_str().unwrap(), email_text(&alert));
        assert_eq!(m.subject, "[cdc-worker] orders: schema v2: new column");
    }

    #[test]
    fn attributes_let_subscriptions_filter() {
        let m = SnsMessage::of(&schema_change());
        let attrs: Vec<(&str, &str, &str)> = m
            .attributes
            .iter()
            .map(|a| (a.name, a.data_type, a.value.as_str()))
            .collect();
        assert_eq!(
            attrs,
            [
                ("alert", "String", "schema_change"),
                ("severity", "String", "warning"),
                ("held", "String", "false"),
                ("table", "String", "orders"),
                ("change_kinds", "String.Array", "[\"new_column\"]"),
            ]
        );
    }

    #[test]
    fn a_message_too_large_for_sns_goes_out_as_the_json_body_alone() {
        // The headline of a file alert is its message: twice 150 KiB with the JSON body.
        let alert = Alert::new(
            AlertKind::FileSkipped,
            Severity::Warning,
            "orders",
            "x".repeat(150 * 1024),
        );
        let m = SnsMessage::of(&alert);
        assert!(!m.structured);
        assert_eq!(m.message, serde_json::to_string(&alert).unwrap());
    }

    #[test]
    fn the_publish_error_names_the_topic() {
        let e = PublishError {
            topic: "arn:aws:sns:eu-west-1:123456789012:cdc-alerts".into(),
            attempts: 1,
            cause: "NotFound: Topic does not exist".into(),
        };
        assert_eq!(
            e.to_string(),
            "could not publish alert to SNS topic arn:aws:sns:eu-west-1:123456789012:cdc-alerts after 1 attempt(s): NotFound: Topic does not exist"
        );
    }
}
