//! An in-memory [`Queue`] with SQS's delivery rules, for tests without IO: a received message
//! is hidden for its visibility timeout and counts a receive; a message received more than
//! `max_receive_count` times moves to the dead-letter queue instead (SQS redrive policy); a
//! receipt handle is valid until the message is received again; a message stays in flight
//! at most 12 hours after it was received. Time is tokio's, so tests run it paused.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{MessageTimes, Queue, QueueError, RawMessage};

#[derive(Debug, Clone)]
struct Message {
    id: String,
    body: String,
    receive_count: u32,
    visible_at: Instant,
    received_at: Instant,
    receipt: Option<String>,
}

/// SQS keeps a received message in flight at most this long, whatever the extensions.
const MAX_IN_FLIGHT: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Default)]
struct Messages {
    queue: Vec<Message>,
    dead: Vec<Message>,
    sent: u64,
    receipts: u64,
}

/// A queue and its dead-letter queue, in memory.
#[derive(Debug)]
pub struct MemoryQueue {
    max_receive_count: u32,
    messages: Mutex<Messages>,
}

impl MemoryQueue {
    pub fn new(max_receive_count: u32) -> Self {
        Self {
            max_receive_count,
            messages: Mutex::new(Messages::default()),
        }
    }

    pub fn push(&self, body: &str) {
        let mut m = self.messages.lock().expect("queue lock");
        m.sent += 1;
        let id = format!("m{}", m.sent);
        m.queue.push(Message {
            id,
            body: body.to_string(),
            receive_count: 0,
            visible_at: Instant::now(),
            received_at: Instant::now(),
            receipt: None,
        });
    }

    /// Messages in the queue (visible or in flight) and in the dead-letter queue.
    pub fn depths(&self) -> (usize, usize) {
        let m = self.messages.lock().expect("queue lock");
        (m.queue.len(), m.dead.len())
    }

    /// How often each message still in the queue was received, by body.
    pub fn receive_counts(&self) -> Vec<(String, u32)> {
        let m = self.messages.lock().expect("queue lock");
        m.queue
            .iter()
            .map(|q| (q.body.clone(), q.receive_count))
            .collect()
    }

    fn take_visible(&self, max: usize, visibility: Duration) -> Vec<RawMessage> {
        let now = Instant::now();
        let mut guard = self.messages.lock().expect("queue lock");
        let m = &mut *guard;
        let mut out = Vec::new();
        let mut i = 0;
        while i < m.queue.len() && out.len() < max {
            if m.queue[i].visible_at > now {
                i += 1;
                continue;
            }
            if m.queue[i].receive_count >= self.max_receive_count {
                let dead = m.queue.remove(i);
                m.dead.push(dead);
                continue;
            }
            m.receipts += 1;
            let receipt = format!("r{}", m.receipts);
            let msg = &mut m.queue[i];
            msg.receive_count += 1;
            msg.visible_at = now + visibility;
            msg.received_at = now;
            msg.receipt = Some(receipt.clone());
            out.push(RawMessage {
                message_id: msg.id.clone(),
                receipt_handle: receipt,
                body: msg.body.clone(),
                receive_count: msg.receive_count,
                times: MessageTimes::received_now(None, None, false),
            });
            i += 1;
        }
        out
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn receive(
        &self,
        max: i32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<RawMessage>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self.take_visible(max.max(1) as usize, visibility);
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn delete(&self, receipt_handles: &[String]) -> Result<Vec<String>, QueueError> {
        let mut m = self.messages.lock().expect("queue lock");
        let mut failed = Vec::new();
        for handle in receipt_handles {
            match m
                .queue
                .iter()
                .position(|q| q.receipt.as_deref() == Some(handle))
            {
                Some(i) => {
                    m.queue.remove(i);
                }
                None => failed.push(handle.clone()),
            }
        }
        Ok(failed)
    }

    async fn set_visibility(
        &self,
        receipt_handle: &str,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        let mut m = self.messages.lock().expect("queue lock");
        match m
            .queue
            .iter_mut()
            .find(|q| q.receipt.as_deref() == Some(receipt_handle))
        {
            Some(q) if Instant::now() + timeout <= q.received_at + MAX_IN_FLIGHT => {
                q.visible_at = Instant::now() + timeout;
                Ok(())
            }
            Some(_) => Err(QueueError::Visibility {
                queue: "memory".into(),
                message: "the total visibility timeout would exceed 12 hours".into(),
            }),
            None => Err(QueueError::Visibility {
                queue: "memory".into(),
                message: format!("receipt handle {receipt_handle} is no longer valid"),
            }),
        }
    }

    async fn send(&self, body: &str) -> Result<(), QueueError> {
        self.push(body);
        Ok(())
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}
