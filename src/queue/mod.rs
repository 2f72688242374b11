//! The queue that announces new files. A message moves through typed stages:
//! [`RawMessage`] (received) -> parsed notifications -> [`InFlight`] (files handed to
//! table lanes, visibility kept alive) -> deleted once every file is committed, or released
//! with a backoff when one failed.

pub mod memory;
mod sqs;
mod tracker;

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

pub use sqs::SqsQueue;
pub use tracker::{FileOutcome, InFlight, MessageHandle, Tracker};

/// A message as received, before its body is looked at.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    /// How many times SQS has handed this message out (1 on first delivery).
    pub receive_count: u32,
    /// When SQS got it and first handed it out, and when we received it: the stage
    /// histograms (`cdc_worker_stage_seconds`).
    pub times: MessageTimes,
}

/// The moments of a message's way to the worker.
#[derive(Debug, Clone, Copy)]
pub struct MessageTimes {
    /// SQS's `SentTimestamp`: when the queue accepted the message.
    pub sent: Option<SystemTime>,
    /// SQS's `ApproximateFirstReceiveTimestamp`: when it was first handed out (to any
    /// consumer; a redelivery keeps the first).
    pub first_receive: Option<SystemTime>,
    /// This receive, on our monotonic clock.
    pub received: Instant,
    /// A copy the worker sent itself (a hand-over or a requeue): its `sent` is the copy's,
    /// not the notification's.
    pub copy: bool,
}

/// The message attribute that marks the copies the worker sends of its own messages.
pub const COPY_ATTRIBUTE: &str = "cdc-worker-copy";

impl MessageTimes {
    /// Received now, with what SQS said (epoch milliseconds, as its attributes spell them).
    pub fn received_now(sent_ms: Option<&str>, first_receive_ms: Option<&str>, copy: bool) -> Self {
        let at = |ms: Option<&str>| {
            let ms: u64 = ms?.parse().ok()?;
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
        };
        Self {
            sent: at(sent_ms),
            first_receive: at(first_receive_ms),
            received: Instant::now(),
            copy,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("receiving from {queue}: {message}")]
    Receive { queue: String, message: String },
    #[error("deleting from {queue}: {message}")]
    Delete { queue: String, message: String },
    #[error("changing visibility on {queue}: {message}")]
    Visibility { queue: String, message: String },
    #[error("sending to {queue}: {message}")]
    Send { queue: String, message: String },
}

/// The few operations the worker needs from a queue.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Long-polls for up to `max` messages, hiding them for `visibility`.
    async fn receive(
        &self,
        max: i32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<RawMessage>, QueueError>;

    /// Deletes messages by receipt handle (at most 10); returns the handles that failed.
    async fn delete(&self, receipt_handles: &[String]) -> Result<Vec<String>, QueueError>;

    /// Hides (or with zero, releases) a message for `timeout`.
    async fn set_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError>;

    /// Sends a message (a fresh copy of one whose work outlasts SQS's 12 hours in flight).
    async fn send(&self, body: &str) -> Result<(), QueueError>;

    /// A cheap call that proves the queue is reachable (for `/readyz`).
    async fn ping(&self) -> Result<(), QueueError>;
}
