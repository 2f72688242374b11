//! In-flight messages: a message's files travel to their table lanes holding a
//! [`MessageHandle`]; while any is unresolved a keep-alive task extends the message's
//! visibility. The last file to resolve decides its fate: deleted when all were committed
//! or skipped, released with a backoff when one must be retried. A handle dropped without
//! being resolved stops its keep-alive, so the message simply reappears later.
//!
//! SQS keeps a received message in flight at most 12 hours. Work that outlasts that (a
//! table waiting out a long outage) hands the message over before: a fresh copy is sent and
//! the old one deleted, so waiting costs no receive count however long it lasts. The copy
//! reaches the same lane, where it joins the waiting file (the ledger skips it if the file
//! was applied meanwhile).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::{Queue, RawMessage};
use crate::config::QueueConfig;

/// What became of one file of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOutcome {
    /// Applied and recorded in the ledger.
    Committed,
    /// Will never be applied (already applied, gone, outside the layout): acknowledged.
    Skipped,
    /// Must be tried again. `None` backs off by the message's receive count; `Some(d)`
    /// releases it after exactly `d`.
    Retry(Option<Duration>),
    /// Not applied in this run (the worker stops) through no fault of the file: the message
    /// is replaced by a fresh copy that another worker takes at once, so stopping (a deploy,
    /// a scale-in) never spends a receive count and never pushes a waiting file toward the
    /// dead-letter queue.
    Requeue,
}

/// A message whose files are being applied.
pub struct InFlight {
    pub message_id: String,
    pub receipt_handle: String,
    pub receive_count: u32,
    remaining: AtomicUsize,
    retry: Mutex<Option<Duration>>,
    tracker: Tracker,
    keepalive: Mutex<Option<(DropGuard, tokio::task::JoinHandle<()>)>>,
    /// A copy of the message took over (see the module's comment): this one is deleted.
    handed_over: Arc<AtomicBool>,
    /// A file of the message was requeued ([`FileOutcome::Requeue`]).
    requeue: AtomicBool,
    /// The message as received, for its copy.
    message: RawMessage,
    /// When the last of its files was committed, for the `commit_to_delete` stage.
    committed_at: Mutex<Option<Instant>>,
}

pub type MessageHandle = Arc<InFlight>;

/// SQS keeps a received message in flight at most this long, whatever the extensions.
const MAX_IN_FLIGHT: Duration = Duration::from_secs(12 * 3600);

impl InFlight {
    /// When SQS got the message and handed it out, and when we received it.
    pub fn times(&self) -> super::MessageTimes {
        self.message.times
    }

    /// Records one file's outcome; the last one deletes or releases the message.
    pub fn resolve(&self, outcome: FileOutcome) {
        match outcome {
            FileOutcome::Retry(delay) => {
                let delay = delay.unwrap_or_else(|| self.tracker.backoff(self.receive_count));
                let mut retry = self.retry.lock().expect("retry lock");
                *retry = Some(retry.map_or(delay, |d| d.max(delay)));
            }
            FileOutcome::Requeue => self.requeue.store(true, Ordering::Release),
            FileOutcome::Committed => {
                *self.committed_at.lock().expect("commit time") = Some(Instant::now());
            }
            FileOutcome::Skipped => {}
        }
        let before = self.remaining.fetch_sub(1, Ordering::AcqRel);
        if before != 1 {
            return;
        }
        // Last file: stop the keep-alive. A release must wait for it to end, or an
        // extension still in flight could land after the release and hide the message.
        let keepalive =
            self.keepalive
                .lock()
                .expect("keepalive lock")
                .take()
                .map(|(guard, task)| {
                    drop(guard);
                    task
                });
        if self.handed_over.load(Ordering::Acquire) {
            // Its copy is in the queue and has a fate of its own.
            return;
        }
        let retry = *self.retry.lock().expect("retry lock");
        match retry {
            Some(delay) => self.tracker.release_after(
                keepalive,
                self.message_id.clone(),
                self.receipt_handle.clone(),
                delay,
            ),
            None if self.requeue.load(Ordering::Acquire) => {
                self.tracker.requeue(keepalive, self.message.clone())
            }
            None => {
                let committed = *self.committed_at.lock().expect("commit time");
                self.tracker
                    .delete_committed(self.receipt_handle.clone(), committed)
            }
        }
    }
}

/// Creates [`InFlight`] messages and carries out their fate.
#[derive(Clone)]
pub struct Tracker {
    queue: Arc<dyn Queue>,
    visibility: Duration,
    backoff: Duration,
    backoff_max: Duration,
    /// Receipt handles to delete, with when their last file was committed (if one was).
    deletes: mpsc::UnboundedSender<(String, Option<Instant>)>,
    /// Visibility changes in flight, so shutdown can wait for them: a release that never
    /// reached SQS leaves the message hidden until its visibility times out.
    releases: TaskTracker,
}

impl Tracker {
    /// The tracker and the task that batches deletes (run it until the sender side is
    /// dropped; it drains what is left).
    pub fn new(
        queue: Arc<dyn Queue>,
        config: &QueueConfig,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::unbounded_channel();
        let acker = run_acker(queue.clone(), rx);
        (
            Self {
                queue,
                visibility: config.visibility_timeout,
                backoff: config.retry_backoff,
                backoff_max: config.retry_backoff_max,
                deletes: tx,
                releases: TaskTracker::new(),
            },
            acker,
        )
    }

    /// Starts tracking a message with `files` files to resolve.
    pub fn track(&self, raw: &RawMessage, files: usize) -> MessageHandle {
        assert!(files > 0, "a tracked message has files");
        let token = CancellationToken::new();
        let handed_over = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(keep_alive(
            self.queue.clone(),
            raw.clone(),
            self.visibility,
            token.clone(),
            handed_over.clone(),
        ));
        Arc::new(InFlight {
            message_id: raw.message_id.clone(),
            receipt_handle: raw.receipt_handle.clone(),
            receive_count: raw.receive_count,
            remaining: AtomicUsize::new(files),
            retry: Mutex::new(None),
            tracker: self.clone(),
            keepalive: Mutex::new(Some((token.drop_guard(), task))),
            handed_over,
            requeue: AtomicBool::new(false),
            message: raw.clone(),
            committed_at: Mutex::new(None),
        })
    }

    /// Deletes a message (acknowledged: nothing more to do for it).
    pub fn delete(&self, receipt_handle: String) {
        self.delete_committed(receipt_handle, None);
    }

    /// Deletes a message whose files were committed at `committed` (for the stage
    /// histogram of the time from the commit to the deletion).
    fn delete_committed(&self, receipt_handle: String, committed: Option<Instant>) {
        if self.deletes.send((receipt_handle, committed)).is_err() {
            tracing::warn!("delete requested after shutdown; the message will be redelivered");
        }
    }

    /// Makes a message visible again after `delay`, once `first` (the message's
    /// keep-alive) has ended, so a late extension cannot undo the release.
    fn release_after(
        &self,
        first: Option<tokio::task::JoinHandle<()>>,
        message_id: String,
        receipt_handle: String,
        delay: Duration,
    ) {
        let queue = self.queue.clone();
        metrics::counter!("cdc_worker_messages_released_total").increment(1);
        self.releases.spawn(async move {
            if let Some(task) = first {
                let _ = task.await;
            }
            if let Err(e) = queue.set_visibility(&receipt_handle, delay).await {
                tracing::warn!(message_id, error = %e, "could not release message; it reappears when its visibility times out");
            } else {
                tracing::debug!(message_id, delay_s = delay.as_secs(), "message released for redelivery");
            }
        });
    }

    /// Replaces a message by a fresh copy once `first` (its keep-alive) has ended.
    fn requeue(&self, first: Option<tokio::task::JoinHandle<()>>, message: RawMessage) {
        let queue = self.queue.clone();
        self.releases.spawn(async move {
            if let Some(task) = first {
                let _ = task.await;
            }
            if !hand_over(queue.as_ref(), &message).await {
                // No copy: release it instead, as before (one receive spent).
                if let Err(e) = queue.set_visibility(&message.receipt_handle, Duration::ZERO).await {
                    tracing::warn!(message_id = message.message_id, error = %e, "could not requeue a message; it reappears when its visibility times out");
                }
            }
        });
    }

    /// Waits for the releases under way (at shutdown).
    pub async fn flush_releases(&self) {
        self.releases.close();
        self.releases.wait().await;
        self.releases.reopen();
    }

    /// The delay before the `receive_count`-th delivery is tried again.
    pub fn backoff(&self, receive_count: u32) -> Duration {
        let exp = receive_count.saturating_sub(1).min(16);
        self.backoff
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max)
    }
}

async fn keep_alive(
    queue: Arc<dyn Queue>,
    message: RawMessage,
    visibility: Duration,
    stop: CancellationToken,
    handed_over: Arc<AtomicBool>,
) {
    let received = Instant::now();
    let every = (visibility / 2).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if received.elapsed() + visibility + every >= MAX_IN_FLIGHT {
            if hand_over(queue.as_ref(), &message).await {
                handed_over.store(true, Ordering::Release);
                return;
            }
            continue;
        }
        match queue
            .set_visibility(&message.receipt_handle, visibility)
            .await
        {
            Ok(()) => metrics::counter!("cdc_worker_visibility_extensions_total").increment(1),
            Err(e) => {
                tracing::warn!(message_id = message.message_id, error = %e, "could not extend visibility")
            }
        }
    }
}

/// Replaces a message near SQS's in-flight limit by a fresh copy; true once the old one
/// is deleted (until then it stays in flight and is tried again at the next extension).
async fn hand_over(queue: &dyn Queue, message: &RawMessage) -> bool {
    if let Err(e) = queue.send(&message.body).await {
        tracing::warn!(message_id = message.message_id, error = %e, "could not send a fresh copy of a long-waiting message; trying again");
        return false;
    }
    match queue
        .delete(std::slice::from_ref(&message.receipt_handle))
        .await
    {
        Ok(failed) if failed.is_empty() => {
            metrics::counter!("cdc_worker_messages_handed_over_total").increment(1);
            tracing::info!(
                message_id = message.message_id,
                "message in work for nearly 12 hours handed over to a fresh copy"
            );
            true
        }
        // The copy is sent: a duplicate is harmless (the ledger skips it), a lost
        // deletion only means the old message reappears once.
        _ => {
            tracing::warn!(
                message_id = message.message_id,
                "could not delete a message after sending its copy; it reappears once and is skipped"
            );
            true
        }
    }
}

async fn run_acker(
    queue: Arc<dyn Queue>,
    mut rx: mpsc::UnboundedReceiver<(String, Option<Instant>)>,
) {
    let mut batch = Vec::with_capacity(10);
    while rx.recv_many(&mut batch, 10).await > 0 {
        let handles: Vec<String> = batch.iter().map(|(h, _)| h.clone()).collect();
        match queue.delete(&handles).await {
            Ok(failed) => {
                metrics::counter!("cdc_worker_messages_deleted_total")
                    .increment((batch.len() - failed.len()) as u64);
                for (handle, committed) in &batch {
                    if let Some(at) = committed.filter(|_| !failed.contains(handle)) {
                        crate::telemetry::record_stage(
                            crate::telemetry::Stage::CommitToDelete,
                            at.elapsed(),
                        );
                    }
                }
                if !failed.is_empty() {
                    tracing::warn!(
                        count = failed.len(),
                        "some deletes failed; those messages will be redelivered and skipped by the ledger"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "delete failed; the messages will be redelivered and skipped by the ledger")
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    //! The queue's side of the lane's rules, on the in-memory queue with paused time.
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::queue::memory::MemoryQueue;

    fn config() -> QueueConfig {
        QueueConfig {
            visibility_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(4),
            ..QueueConfig::default()
        }
    }

    async fn receive(queue: &MemoryQueue) -> Vec<RawMessage> {
        queue
            .receive(10, Duration::ZERO, Duration::from_secs(10))
            .await
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_in_work_stays_hidden_however_long_the_work_takes() {
        let queue = Arc::new(MemoryQueue::new(5));
        queue.push("file");
        let (tracker, acker) = Tracker::new(queue.clone(), &config());
        let acker = tokio::spawn(acker);
        let message = receive(&queue).await.pop().unwrap();
        let handle = tracker.track(&message, 1);
        // Eleven hours: the keep-alive extends the visibility all along.
        tokio::time::sleep(Duration::from_secs(11 * 3600)).await;
        assert!(receive(&queue).await.is_empty(), "nobody else sees it");
        assert_eq!(queue.receive_counts(), [("file".to_string(), 1)]);
        // Past SQS's 12 hours in flight, a fresh copy has taken over, unreceived.
        tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
        assert_eq!(
            queue.receive_counts(),
            [("file".to_string(), 0)],
            "no receive spent"
        );
        // The worker receives the copy (its file joins the one waiting in the lane) and
        // commits both.
        let copy = receive(&queue).await.pop().unwrap();
        let copy_handle = tracker.track(&copy, 1);
        handle.resolve(FileOutcome::Committed);
        copy_handle.resolve(FileOutcome::Committed);
        drop((handle, copy_handle, tracker));
        acker.await.unwrap();
        assert_eq!(
            queue.depths(),
            (0, 0),
            "deleted once committed, nothing in the DLQ"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_message_backs_off_and_reaches_the_dlq_after_its_receives() {
        let queue = Arc::new(MemoryQueue::new(3));
        queue.push("poison");
        let (tracker, _acker) = Tracker::new(queue.clone(), &config());
        let mut waits = Vec::new();
        let mut last = tokio::time::Instant::now();
        loop {
            let Some(message) = receive(&queue).await.pop() else {
                if queue.depths() == (0, 1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            waits.push((tokio::time::Instant::now() - last).as_secs());
            last = tokio::time::Instant::now();
            tracker.track(&message, 1).resolve(FileOutcome::Retry(None));
            tracker.flush_releases().await;
        }
        assert_eq!(
            waits,
            [0, 1, 2],
            "released after 1 s, then 2 s (doubling per receive)"
        );
        assert_eq!(
            queue.depths(),
            (0, 1),
            "in the dead-letter queue after 3 receives"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_requeued_at_shutdown_comes_back_as_a_fresh_copy() {
        let queue = Arc::new(MemoryQueue::new(2));
        queue.push("file");
        let (tracker, _acker) = Tracker::new(queue.clone(), &config());
        // Five restarts in a row, each stopping before the file could be applied.
        for _ in 0..5 {
            let message = receive(&queue).await.pop().expect("the file comes back");
            tracker.track(&message, 1).resolve(FileOutcome::Requeue);
            tracker.flush_releases().await;
        }
        assert_eq!(queue.receive_counts(), [("file".to_string(), 0)]);
        assert_eq!(queue.depths(), (1, 0), "never in the dead-letter queue");
    }
}
