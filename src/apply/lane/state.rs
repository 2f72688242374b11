//! A lane's schedule as plain data and plain functions: which files form the next batch,
//! what waits behind a failed file or a hold, when to try again, and when a failing table is
//! reported. No IO and no clock of its own: the time is an argument, so every rule is unit
//! tested. The lane's effects (`mod.rs`, `batch.rs`, `segment.rs`) act on these decisions.
//!
//! The rules:
//! - Files wait in DMS order; a batch takes them from the front, up to the batch limits, once
//!   the limits are reached or the oldest has lingered long enough.
//! - A failed file blocks the table: no later file is applied before it.
//! - A transient failure (the warehouse, S3, the disk or the network) keeps every file in the
//!   lane, its message's visibility kept alive, and retries with a capped backoff: an outage
//!   of any length consumes no receive counts, so nothing healthy reaches the dead-letter
//!   queue.
//! - A poison file (its data is refused) goes back to the queue with the queue's backoff and,
//!   after its maximum receives, to the dead-letter queue; later files wait behind it. When a
//!   batch of several files is refused, the lane tries them one at a time to find the one at
//!   fault.
//! - A fenced batch (another worker holds the table) waits briefly and is tried again,
//!   without counting as a failure.
//! - A table failing `failing_after` times in a row is reported once, then reminded at
//!   growing intervals, and its recovery is reported once.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::apply::context::PendingFile;
use crate::apply::failure::Disposition;
use crate::batch::is_change_order_key;
use crate::dms::DmsOrder;

/// How often a table held by its schema policy re-reads its status (released by
/// `cdc-worker schema accept`); the first re-check of a table held by a condition of its
/// files (a key column missing, unusable names, repeated key values), which doubles up to
/// [`CONDITION_RECHECK_MAX`]: the condition is checked again by trying the batch.
pub const HOLD_RECHECK: Duration = Duration::from_secs(10);
const CONDITION_RECHECK_MAX: Duration = Duration::from_secs(300);

/// With files waiting behind a file that is not in the lane (back in the queue, or in the
/// dead-letter queue), how often the lane asks the ledger whether an operator skipped it.
const BLOCKER_CHECK_EVERY: Duration = Duration::from_secs(30);

/// How a lane batches and retries.
#[derive(Debug, Clone)]
pub struct LanePolicy {
    pub max_files: usize,
    pub max_bytes: u64,
    pub linger: Duration,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Consecutive failures before the table is reported failing.
    pub failing_after: u32,
    /// The first reminder while a table keeps failing; each later one waits twice as long.
    pub failing_reminder: Duration,
}

impl LanePolicy {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_files: config.batch.max_files,
            max_bytes: config.batch.max_bytes.as_u64(),
            linger: config.batch.linger,
            retry_backoff: config.queue.retry_backoff,
            retry_backoff_max: config.queue.retry_backoff_max,
            failing_after: config.alerts.table_failing_after,
            failing_reminder: config.alerts.table_failing_reminder,
        }
    }

    /// The wait before attempt `failures + 1`: the base doubling per failure, capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        self.retry_backoff
            .saturating_mul(1u32 << exp)
            .min(self.retry_backoff_max)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PendingKey {
    order: DmsOrder,
    key: String,
    etag: String,
}

impl PendingKey {
    fn of(file: &PendingFile) -> Self {
        Self {
            order: file.dms.order(),
            key: file.file.key.clone(),
            etag: file.file.etag.clone(),
        }
    }
}

/// What the lane does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// No file waits.
    Idle,
    /// Apply a batch now.
    Batch,
    /// Re-read the held table's status now.
    RecheckHold,
    /// Ask the ledger about the file the table waits behind (`cdc-worker ledger skip`).
    CheckBlocker,
    /// Nothing to do before this instant, unless a file arrives.
    Wait(Instant),
}

#[derive(Debug, Clone)]
struct Hold {
    reason: String,
    /// When to re-read the status (policy) or try the files again (condition).
    due: Instant,
    /// Held by a condition of the files, not by the schema policy: nothing to accept, the
    /// lane tries again once the cause may be fixed.
    condition: bool,
}

/// A run of failures of the table.
#[derive(Debug, Clone)]
pub struct Failing {
    pub since: Instant,
    pub consecutive: u32,
    pub last_error: String,
    /// Alerts sent about this run's current cause (0: not reported yet).
    pub alerts_sent: u32,
    /// The kind of the last failure: a new kind (an outage that turns into a poison file)
    /// is reported anew, since it asks for another action.
    pub disposition: Disposition,
    next_reminder: Option<Instant>,
}

/// What to tell people after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailingAlert {
    /// The table has just passed `failing_after` consecutive failures.
    First,
    /// It still fails.
    Reminder { failing_for: Duration },
}

/// A table that was reported failing and has committed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub failing_for: Duration,
    pub failures: u32,
}

/// What the lane's effects must do after a failure.
#[derive(Debug, Default)]
pub struct AfterFailure {
    /// Files whose messages go back to the queue now, with the queue's backoff (poison:
    /// after its maximum receives a message moves to the dead-letter queue).
    pub release: Vec<PendingFile>,
    pub alert: Option<FailingAlert>,
}

/// What `status` and `/metrics` show of a lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub pending_files: usize,
    pub held: Option<String>,
    pub consecutive_failures: u32,
    pub oldest_pending: Option<Instant>,
    /// The file every later file waits behind, when one failed.
    pub blocked_by: Option<String>,
}

/// The schedule of one lane.
#[derive(Debug)]
pub struct LaneState {
    policy: LanePolicy,
    pending: BTreeMap<PendingKey, PendingFile>,
    /// The earliest file of a failed batch, and its S3 key: later files wait for it.
    blocked_from: Option<(DmsOrder, String)>,
    /// After a refused batch of several files: one file per batch up to this one.
    isolate_through: Option<DmsOrder>,
    not_before: Option<Instant>,
    hold: Option<Hold>,
    failing: Option<Failing>,
    /// The last applied file by DMS order: (order key, S3 key).
    last_applied: Option<(String, String)>,
    /// Files the lane failed itself: they may come back after later files were held.
    retrying: HashSet<String>,
    /// Causes already alerted about, so each is alerted once per lane.
    alerted: HashSet<String>,
    /// The last condition that held the table and how many times in a row it did.
    condition_streak: Option<(String, u32)>,
    /// When the ledger was last asked about the blocking file.
    blocker_checked: Option<Instant>,
}

impl LaneState {
    pub fn new(policy: LanePolicy) -> Self {
        Self {
            policy,
            pending: BTreeMap::new(),
            blocked_from: None,
            isolate_through: None,
            not_before: None,
            hold: None,
            failing: None,
            last_applied: None,
            retrying: HashSet::new(),
            alerted: HashSet::new(),
            condition_streak: None,
            blocker_checked: None,
        }
    }

    pub fn policy(&self) -> &LanePolicy {
        &self.policy
    }

    /// Adds a file. The same file announced again (a duplicate delivery, or the late
    /// notification of a file the listing found) is applied once and all its messages are
    /// acknowledged together.
    pub fn add(&mut self, file: PendingFile) {
        match self.pending.get_mut(&PendingKey::of(&file)) {
            Some(existing) => {
                existing.messages.extend(file.messages);
                if existing.waiting.is_none() {
                    existing.waiting = file.waiting;
                }
            }
            None => {
                self.pending.insert(PendingKey::of(&file), file);
            }
        }
    }

    pub fn add_all(&mut self, files: impl IntoIterator<Item = PendingFile>) {
        for f in files {
            self.add(f);
        }
    }

    /// Files that may be applied now: in DMS order, up to the file that blocks the table.
    fn eligible(&self) -> impl Iterator<Item = &PendingFile> {
        let blocked = self.blocked_from.as_ref().map(|(order, _)| order.clone());
        self.pending
            .iter()
            .take_while(move |(k, _)| blocked.as_ref().is_none_or(|b| k.order <= *b))
            .map(|(_, f)| f)
    }

    fn full_batch_waits(&self) -> bool {
        let (mut files, mut bytes) = (0usize, 0u64);
        for f in self.eligible() {
            files += 1;
            bytes += f.file.size;
            if files >= self.policy.max_files || bytes >= self.policy.max_bytes {
                return true;
            }
        }
        false
    }

    /// The lane's next step at `now`.
    pub fn next(&self, now: Instant) -> Next {
        if self.pending.is_empty() {
            return Next::Idle;
        }
        if let Some(hold) = &self.hold {
            let due = hold.due;
            return if due <= now {
                Next::RecheckHold
            } else {
                Next::Wait(due)
            };
        }
        if let Some(until) = self.not_before.filter(|u| *u > now) {
            return Next::Wait(until);
        }
        let Some(oldest) = self.eligible().map(|f| f.arrived).min() else {
            // Everything waits behind a file that is back in the queue.
            let due = self
                .blocker_checked
                .map_or(now, |checked| checked + BLOCKER_CHECK_EVERY);
            return if due <= now {
                Next::CheckBlocker
            } else {
                Next::Wait(due)
            };
        };
        let due = oldest + self.policy.linger;
        if self.full_batch_waits() || due <= now || self.isolating() {
            Next::Batch
        } else {
            Next::Wait(due)
        }
    }

    fn isolating(&self) -> bool {
        let (Some(through), Some((first, _))) =
            (&self.isolate_through, self.pending.first_key_value())
        else {
            return false;
        };
        first.order <= *through
    }

    /// Takes the next batch: files from the front in DMS order, up to the batch limits and
    /// the blocking file; a single file while a refused batch is being narrowed down.
    pub fn take_batch(&mut self) -> Vec<PendingFile> {
        let limit = if self.isolating() {
            1
        } else {
            self.policy.max_files
        };
        let mut bytes = 0u64;
        let mut keys = Vec::new();
        for (k, f) in self.pending.iter() {
            if self
                .blocked_from
                .as_ref()
                .is_some_and(|(order, _)| k.order > *order)
            {
                break;
            }
            if !keys.is_empty()
                && (keys.len() >= limit || bytes + f.file.size > self.policy.max_bytes)
            {
                break;
            }
            bytes += f.file.size;
            keys.push(k.clone());
        }
        keys.iter().filter_map(|k| self.pending.remove(k)).collect()
    }

    /// Every waiting file, for the release at shutdown.
    pub fn drain(&mut self) -> Vec<PendingFile> {
        std::mem::take(&mut self.pending).into_values().collect()
    }

    pub fn last_applied(&self) -> Option<&(String, String)> {
        self.last_applied.as_ref()
    }

    pub fn set_last_applied(&mut self, last: Option<(String, String)>) {
        self.last_applied = last;
    }

    /// A file ordered before the last applied one, that the lane did not fail itself:
    /// applying it would rewind newer changes unless an ordering column decides. Full-load
    /// files are never late among themselves: each holds rows no other one does (DMS's
    /// parallel segments split the table), and segments write side by side, so
    /// `SEGMENT2_LOAD00000005` can come after `SEGMENT1_LOAD0000000B`.
    pub fn is_late(&self, file: &PendingFile) -> bool {
        let Some((last, _)) = self.last_applied.as_ref() else {
            return false;
        };
        if file.dms.is_load() && !is_change_order_key(last) {
            return false;
        }
        file.dms.order().sort_key() < *last && !self.retrying.contains(&file.file.key)
    }

    /// True the first time a cause is seen by this lane (alert once per cause).
    pub fn first_time(&mut self, cause: String) -> bool {
        self.alerted.insert(cause)
    }

    pub fn held(&self) -> Option<&str> {
        self.hold.as_ref().map(|h| h.reason.as_str())
    }

    /// Holds the table by its schema policy: its files wait in the lane until
    /// `cdc-worker schema accept` releases it.
    pub fn hold(&mut self, reason: &str, files: Vec<PendingFile>, now: Instant) {
        self.hold = Some(Hold {
            reason: reason.to_string(),
            due: now + HOLD_RECHECK,
            condition: false,
        });
        self.add_all(files);
    }

    /// Holds the table because of its files (a key column missing, unusable names,
    /// repeated key values): they wait, and the lane tries them again now and then, less
    /// often the longer the same cause lasts, until it is fixed.
    pub fn hold_for_condition(&mut self, reason: &str, files: Vec<PendingFile>, now: Instant) {
        let times = match &self.condition_streak {
            Some((last, n)) if last == reason => n + 1,
            _ => 0,
        };
        self.condition_streak = Some((reason.to_string(), times));
        let wait = HOLD_RECHECK.saturating_mul(1u32 << times.min(8));
        self.hold = Some(Hold {
            reason: reason.to_string(),
            due: now + wait.min(CONDITION_RECHECK_MAX),
            condition: true,
        });
        self.add_all(files);
    }

    /// Whether the hold is a condition to try again (rather than a status to re-read).
    pub fn held_by_condition(&self) -> bool {
        self.hold.as_ref().is_some_and(|h| h.condition)
    }

    /// A re-check found the table still held by its policy.
    pub fn hold_checked(&mut self, now: Instant) {
        if let Some(hold) = &mut self.hold {
            hold.due = now + HOLD_RECHECK;
        }
    }

    pub fn release_hold(&mut self) {
        self.hold = None;
    }

    /// Files go back to wait, to be tried again at `at` (another worker holds the table, or
    /// its state must be read again): not a failure.
    pub fn retry_at(&mut self, files: Vec<PendingFile>, at: Instant) {
        self.not_before = Some(at);
        self.add_all(files);
    }

    /// Files that were committed: the table moves on.
    pub fn committed(&mut self, files: &[PendingFile], now: Instant) -> Option<Recovered> {
        for f in files {
            let order = f.dms.order().sort_key();
            if self.last_applied.as_ref().is_none_or(|(l, _)| order > *l) {
                self.last_applied = Some((order, f.file.key.clone()));
            }
            self.retrying.remove(&f.file.key);
        }
        let last = files.iter().map(|f| f.dms.order()).max();
        if let (Some((blocked, _)), Some(last)) = (&self.blocked_from, &last)
            && last >= blocked
        {
            self.blocked_from = None;
        }
        if let (Some(through), Some(last)) = (&self.isolate_through, &last)
            && last >= through
        {
            self.isolate_through = None;
        }
        self.not_before = None;
        self.condition_streak = None;
        let failing = self.failing.take()?;
        (failing.alerts_sent > 0).then(|| Recovered {
            failing_for: now.saturating_duration_since(failing.since),
            failures: failing.consecutive,
        })
    }

    /// The file every later file waits behind, when it is not in the lane.
    pub fn blocker(&self) -> Option<&str> {
        self.blocked_from.as_ref().map(|(_, key)| key.as_str())
    }

    /// The ledger was asked about the blocking file: `settled` when an operator skipped it
    /// (or another worker applied it), which unblocks the table.
    pub fn blocker_checked(&mut self, settled: bool, now: Instant) {
        self.blocker_checked = Some(now);
        if settled {
            self.blocked_from = None;
        }
    }

    /// Files that were resolved without being applied (skipped, rejected): a file blocking
    /// the table that is no longer in the lane's hands unblocks it.
    pub fn settled(&mut self, file: &PendingFile) {
        self.retrying.remove(&file.file.key);
        if self
            .blocked_from
            .as_ref()
            .is_some_and(|(_, key)| *key == file.file.key)
        {
            self.blocked_from = None;
        }
    }

    /// A batch (or the part of it from the failed file on) failed. Decides what waits, what
    /// goes back to the queue, when to try again and whether to alert.
    pub fn failed(
        &mut self,
        mut files: Vec<PendingFile>,
        disposition: Disposition,
        error: &str,
        now: Instant,
    ) -> AfterFailure {
        files.sort_by_key(|f| f.dms.order());
        let Some(first) = files.first() else {
            return AfterFailure::default();
        };
        if disposition == Disposition::Fenced {
            let wait = Duration::from_millis(500 + fastrand::u64(..1500));
            self.retry_at(files, now + wait);
            return AfterFailure::default();
        }
        let order = first.dms.order();
        if self
            .blocked_from
            .as_ref()
            .is_none_or(|(blocked, _)| order < *blocked)
        {
            self.blocked_from = Some((order, first.file.key.clone()));
        }
        self.retrying.insert(first.file.key.clone());
        let alert = self.count_failure(disposition, error, now);
        let mut after = AfterFailure {
            release: Vec::new(),
            alert,
        };
        let consecutive = self.failing.as_ref().map_or(1, |f| f.consecutive);
        match disposition {
            Disposition::Poison if files.len() > 1 => {
                // Which file is at fault? Try them one by one, starting now.
                self.isolate_through = files.last().map(|f| f.dms.order());
                self.not_before = None;
                self.add_all(files);
            }
            Disposition::Poison => {
                let file = files.pop().expect("one file");
                if file.messages.is_empty() {
                    // Found in the S3 listing: no message brings it back, the lane retries.
                    self.not_before = Some(now + self.policy.backoff(consecutive));
                    self.add(file);
                } else {
                    after.release.push(file);
                }
            }
            Disposition::Transient | Disposition::Fenced => {
                self.not_before = Some(now + self.policy.backoff(consecutive));
                self.add_all(files);
            }
        }
        after
    }

    fn count_failure(
        &mut self,
        disposition: Disposition,
        error: &str,
        now: Instant,
    ) -> Option<FailingAlert> {
        let policy = &self.policy;
        let failing = self.failing.get_or_insert_with(|| Failing {
            since: now,
            consecutive: 0,
            last_error: String::new(),
            alerts_sent: 0,
            disposition,
            next_reminder: None,
        });
        failing.consecutive += 1;
        failing.last_error = error.to_string();
        if failing.alerts_sent > 0 && failing.disposition != disposition {
            failing.disposition = disposition;
            failing.alerts_sent = 1;
            failing.next_reminder = Some(now + policy.failing_reminder);
            return Some(FailingAlert::First);
        }
        failing.disposition = disposition;
        if failing.alerts_sent == 0 {
            if failing.consecutive < policy.failing_after {
                return None;
            }
            failing.alerts_sent = 1;
            failing.next_reminder = Some(now + policy.failing_reminder);
            return Some(FailingAlert::First);
        }
        let due = failing.next_reminder.is_some_and(|at| at <= now);
        if !due {
            return None;
        }
        let interval = policy
            .failing_reminder
            .saturating_mul(1u32 << failing.alerts_sent.min(16));
        failing.alerts_sent += 1;
        failing.next_reminder = Some(now + interval);
        Some(FailingAlert::Reminder {
            failing_for: now.saturating_duration_since(failing.since),
        })
    }

    /// `take_batch` once the schedule says a batch is due at `now`.
    #[cfg(test)]
    fn take_batch_at(&mut self, now: Instant) -> Vec<PendingFile> {
        assert_eq!(self.next(now), Next::Batch, "a batch is due");
        self.take_batch()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            pending_files: self.pending.len(),
            held: self.hold.as_ref().map(|h| h.reason.clone()),
            consecutive_failures: self.failing.as_ref().map_or(0, |f| f.consecutive),
            oldest_pending: self.pending.values().map(|f| f.arrived).min(),
            blocked_by: self.blocked_from.as_ref().map(|(_, key)| key.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The lane's rules with no IO: files are plain data, time is an argument.
    use std::time::{Duration, Instant};

    use super::*;
    use crate::apply::failure::Disposition;
    use crate::apply::lane::verdicts::{
        KeyTransition, LedgerVerdict, Listing, generation_verdict, join_gaps, key_transition,
        ledger_verdict, needs_current_etag, still_to_apply,
    };
    use crate::batch::{BatchFile, LedgerRecord, LedgerStatus};
    use crate::dms::{KeyClass, classify_key};

    fn policy() -> LanePolicy {
        LanePolicy {
            max_files: 3,
            max_bytes: 1_000,
            linger: Duration::from_secs(1),
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(10),
            failing_after: 3,
            failing_reminder: Duration::from_secs(60),
        }
    }

    /// A CDC file of table t, arrived at `at`, with `size` bytes.
    fn file_at(name: &str, at: Instant, size: u64) -> PendingFile {
        let key = format!("dms/public/t/{name}");
        let Ok(KeyClass::Dms(dms)) = classify_key("dms", &key) else {
            panic!("{key} is a DMS key");
        };
        let file = BatchFile {
            bucket: "b".into(),
            key,
            size,
            etag: "e1".into(),
            order_key: dms.order().sort_key(),
            full_load: dms.is_load(),
        };
        let mut f = PendingFile::listed("t", dms.source.clone(), dms, file);
        f.arrived = at;
        f
    }

    fn cdc(n: u32, at: Instant) -> PendingFile {
        file_at(&format!("20261124-1000{n:02}000.parquet"), at, 10)
    }

    fn names(files: &[PendingFile]) -> Vec<String> {
        files.iter().map(|f| f.dms.file_name.clone()).collect()
    }

    #[test]
    fn files_are_batched_in_dms_order_up_to_the_limits_after_the_linger() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        assert_eq!(lane.next(t0), Next::Idle);
        lane.add(cdc(2, t0));
        lane.add(file_at("LOAD00000001.parquet", t0, 10));
        // Two files: not full, the oldest lingers until t0 + 1s.
        assert_eq!(lane.next(t0), Next::Wait(t0 + Duration::from_secs(1)));
        assert_eq!(lane.next(t0 + Duration::from_secs(1)), Next::Batch);
        lane.add(cdc(1, t0));
        lane.add(cdc(3, t0));
        // Three files reach max_files: due at once.
        assert_eq!(lane.next(t0), Next::Batch);
        let batch = lane.take_batch();
        assert_eq!(
            names(&batch),
            [
                "LOAD00000001.parquet",
                "20261124-100001000.parquet",
                "20261124-100002000.parquet"
            ],
            "the full load first, then CDC by time, at most max_files"
        );
        assert_eq!(names(&lane.take_batch()), ["20261124-100003000.parquet"]);
    }

    #[test]
    fn a_batch_stops_before_the_byte_limit_but_always_takes_one_file() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(file_at("20261124-100001000.parquet", t0, 600));
        lane.add(file_at("20261124-100002000.parquet", t0, 600));
        lane.add(file_at("20261124-100003000.parquet", t0, 5_000));
        assert_eq!(lane.take_batch().len(), 1, "600 + 600 is over 1000 bytes");
        assert_eq!(lane.take_batch().len(), 1);
        assert_eq!(
            lane.take_batch().len(),
            1,
            "a file over the limit still goes alone"
        );
    }

    #[test]
    fn duplicate_announcements_become_one_file() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        lane.add(cdc(1, t0));
        assert_eq!(lane.snapshot().pending_files, 1);
    }

    #[test]
    fn a_transient_failure_keeps_every_file_and_backs_off_with_a_cap() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        for n in 1..=3 {
            lane.add(cdc(n, t0));
        }
        let mut now = t0;
        let mut waits = Vec::new();
        for attempt in 0..5 {
            let batch = lane.take_batch();
            // The first try takes all three; retries take the failed file, the rest wait
            // behind it.
            assert_eq!(batch.len(), if attempt == 0 { 3 } else { 1 });
            let after = lane.failed(batch, Disposition::Transient, "disk full", now);
            assert!(after.release.is_empty(), "nothing goes back to the queue");
            let Next::Wait(until) = lane.next(now) else {
                panic!("waits for the backoff");
            };
            waits.push(until - now);
            now = until;
            assert_eq!(lane.next(now), Next::Batch);
        }
        let secs: Vec<u64> = waits.iter().map(|w| w.as_secs()).collect();
        assert_eq!(
            secs,
            [2, 4, 8, 10, 10],
            "doubling from retry_backoff, capped"
        );
        assert_eq!(lane.snapshot().pending_files, 3);
    }

    #[test]
    fn a_failed_file_blocks_later_files_until_it_is_applied() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        let first = lane.take_batch();
        lane.add(cdc(2, t0));
        lane.add(cdc(3, t0));
        // A poison file with a message goes back to the queue; later ones wait for it.
        let mut poison = first;
        poison[0].messages = Vec::new();
        let after = lane.failed(poison, Disposition::Transient, "down", t0);
        assert!(after.release.is_empty());
        assert_eq!(
            lane.snapshot().blocked_by.as_deref(),
            Some("dms/public/t/20261124-100001000.parquet")
        );
        let later = t0 + Duration::from_secs(60);
        let batch = lane.take_batch();
        assert_eq!(
            names(&batch),
            ["20261124-100001000.parquet"],
            "only the failed file is eligible"
        );
        assert!(
            lane.committed(&batch, later).is_none(),
            "not reported yet: no recovery alert"
        );
        assert_eq!(lane.snapshot().blocked_by, None);
        assert_eq!(
            lane.take_batch().len(),
            2,
            "later files follow once it is applied"
        );
    }

    #[test]
    fn a_refused_batch_is_narrowed_to_the_file_at_fault() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        for n in 1..=3 {
            lane.add(cdc(n, t0));
        }
        let batch = lane.take_batch();
        let after = lane.failed(batch, Disposition::Poison, "Constraint Error", t0);
        assert!(
            after.release.is_empty(),
            "not yet known which file is at fault"
        );
        assert_eq!(lane.next(t0), Next::Batch, "tries again at once");
        let one = lane.take_batch();
        assert_eq!(
            names(&one),
            ["20261124-100001000.parquet"],
            "one file at a time"
        );
        lane.committed(&one, t0);
        let two = lane.take_batch();
        assert_eq!(names(&two), ["20261124-100002000.parquet"]);
        // This one is at fault: its message goes back to the queue (and to the DLQ after its
        // receives); the file after it waits.
        let mut two = two;
        two[0].messages = vec![];
        let after = lane.failed(two, Disposition::Poison, "Constraint Error", t0);
        assert!(
            after.release.is_empty(),
            "a listed file has no message: the lane keeps it"
        );
        assert_eq!(
            lane.snapshot().blocked_by.as_deref(),
            Some("dms/public/t/20261124-100002000.parquet")
        );
        let retry_at = match lane.next(t0) {
            Next::Wait(at) => at,
            other => panic!("backs off, got {other:?}"),
        };
        assert_eq!(
            names(&lane.take_batch_at(retry_at)),
            ["20261124-100002000.parquet"]
        );
    }

    #[test]
    fn a_fence_is_retried_soon_and_is_not_a_failure() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        let batch = lane.take_batch();
        lane.failed(batch, Disposition::Fenced, "token 4 > 3", t0);
        assert_eq!(lane.snapshot().consecutive_failures, 0);
        assert_eq!(lane.snapshot().blocked_by, None);
        let Next::Wait(at) = lane.next(t0) else {
            panic!("waits")
        };
        assert!(at - t0 >= Duration::from_millis(500) && at - t0 <= Duration::from_secs(2));
    }

    #[test]
    fn a_failing_table_is_reported_once_then_reminded_at_growing_intervals_then_recovers() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        let mut alerts = Vec::new();
        // A failure every 10 s for 10 minutes.
        for s in (0..600).step_by(10) {
            let now = t0 + Duration::from_secs(s);
            let batch = lane.take_batch();
            if let Some(alert) = lane
                .failed(batch, Disposition::Transient, "down", now)
                .alert
            {
                alerts.push((s, alert));
            }
        }
        let at: Vec<u64> = alerts.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            at,
            [20, 80, 200, 440],
            "after 3 failures, then 1, 2 and 4 minutes later"
        );
        assert_eq!(alerts[0].1, FailingAlert::First);
        assert_eq!(
            alerts[1].1,
            FailingAlert::Reminder {
                failing_for: Duration::from_secs(80)
            }
        );
        let batch = lane.take_batch();
        let recovered = lane.committed(&batch, t0 + Duration::from_secs(600));
        assert_eq!(
            recovered,
            Some(Recovered {
                failing_for: Duration::from_secs(600),
                failures: 60
            })
        );
        assert_eq!(lane.snapshot().consecutive_failures, 0);
        lane.add(cdc(2, t0));
        let batch = lane.take_batch();
        assert_eq!(
            lane.committed(&batch, t0),
            None,
            "recovery is reported once"
        );
    }

    #[test]
    fn a_short_failure_is_neither_reported_nor_recovered() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        let batch = lane.take_batch();
        assert_eq!(
            lane.failed(batch, Disposition::Transient, "blip", t0).alert,
            None
        );
        let batch = lane.take_batch();
        assert_eq!(lane.committed(&batch, t0), None);
    }

    #[test]
    fn a_held_table_waits_and_rechecks_its_status() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        lane.hold("type change", vec![cdc(2, t0)], t0);
        assert_eq!(lane.held(), Some("type change"));
        assert_eq!(lane.next(t0), Next::Wait(t0 + HOLD_RECHECK));
        assert_eq!(lane.next(t0 + HOLD_RECHECK), Next::RecheckHold);
        lane.hold_checked(t0 + HOLD_RECHECK);
        assert_eq!(
            lane.next(t0 + HOLD_RECHECK),
            Next::Wait(t0 + HOLD_RECHECK * 2)
        );
        lane.release_hold();
        assert_eq!(lane.next(t0 + HOLD_RECHECK * 2), Next::Batch);
        assert_eq!(lane.take_batch().len(), 2, "every waiting file applies");
    }

    #[test]
    fn a_table_held_by_a_condition_is_tried_again_less_often_until_it_applies() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let batch = lane.take_batch();
            lane.hold_for_condition("key column `id` is not in the file", batch, now);
            assert!(lane.held_by_condition());
            let Next::Wait(due) = lane.next(now) else {
                panic!("waits");
            };
            waits.push((due - now).as_secs());
            assert_eq!(lane.next(due), Next::RecheckHold);
            lane.release_hold();
            now = due;
        }
        assert_eq!(
            waits,
            [10, 20, 40, 80, 160, 300, 300],
            "doubling to five minutes"
        );
        let batch = lane.take_batch();
        lane.committed(&batch, now);
        lane.add(cdc(2, now));
        let batch = lane.take_batch();
        lane.hold_for_condition("key column `id` is not in the file", batch, now);
        assert_eq!(
            lane.next(now),
            Next::Wait(now + HOLD_RECHECK),
            "a new streak after a commit"
        );
    }

    #[test]
    fn late_files_are_those_before_the_last_applied_file_that_the_lane_did_not_fail() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.set_last_applied(Some((cdc(5, t0).dms.order().sort_key(), "k5".into())));
        assert!(lane.is_late(&cdc(4, t0)));
        assert!(!lane.is_late(&cdc(6, t0)));
        // A file the lane failed itself comes back after later ones were applied: not late.
        lane.add(cdc(4, t0));
        let batch = lane.take_batch();
        lane.failed(batch, Disposition::Transient, "down", t0);
        assert!(!lane.is_late(&cdc(4, t0)));
    }

    #[test]
    fn full_load_files_of_parallel_segments_are_not_late_among_themselves() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        let last = file_at("SEGMENT1_LOAD0000000B.parquet", t0, 10);
        lane.set_last_applied(Some((last.dms.order().sort_key(), "k".into())));
        assert!(!lane.is_late(&file_at("SEGMENT2_LOAD00000005.parquet", t0, 10)));
        // Once a change file is applied, an earlier full-load file is late.
        lane.set_last_applied(Some((cdc(5, t0).dms.order().sort_key(), "k5".into())));
        assert!(lane.is_late(&file_at("SEGMENT2_LOAD00000005.parquet", t0, 10)));
    }

    #[test]
    fn a_blocking_file_that_is_settled_otherwise_unblocks_the_table() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        let batch = lane.take_batch();
        lane.failed(batch.clone(), Disposition::Transient, "down", t0);
        lane.add(cdc(2, t0));
        // The failed file turns out to be applied by another worker.
        let again = lane.take_batch_at(t0 + Duration::from_secs(5));
        assert_eq!(names(&again), ["20261124-100001000.parquet"]);
        lane.settled(&again[0]);
        assert_eq!(lane.snapshot().blocked_by, None);
        assert_eq!(names(&lane.take_batch()), ["20261124-100002000.parquet"]);
    }

    #[test]
    fn a_full_load_file_counts_as_applied_only_in_its_own_generation() {
        let t0 = Instant::now();
        let load = file_at("LOAD00000001.parquet", t0, 10).file;
        let change = cdc(1, t0).file;
        let record = |etag: &str, generation: u32, dms: &str| LedgerRecord {
            etag: etag.into(),
            status: LedgerStatus::Applied,
            order_key: crate::batch::generation_order_key(generation, dms),
        };
        let load_in = |g| record("e1", g, &load.order_key);
        // The same bytes again in generation 1: a redelivery.
        assert_eq!(
            generation_verdict(&load, Some(&load_in(1)), 1, false),
            LedgerVerdict::AlreadyApplied
        );
        // DMS wrote the key again (new ETag): the table's reload.
        let rewritten = record("e0", 1, &load.order_key);
        assert!(needs_current_etag(&load, Some(&rewritten), 1));
        assert_eq!(
            generation_verdict(&load, Some(&rewritten), 1, false),
            LedgerVerdict::Reload
        );
        // A new full-load key uploaded after the generation's changes: a reload; before
        // them (not `loaded_after_changes`): a late file of this load.
        assert_eq!(
            generation_verdict(&load, None, 1, true),
            LedgerVerdict::Reload
        );
        assert_eq!(
            generation_verdict(&load, None, 1, false),
            LedgerVerdict::Fresh
        );
        // In generation 2, generation 1's entry of the key does not count: the key holds
        // the new load now (its current ETag is read first, the notification may be old).
        assert!(needs_current_etag(&load, Some(&load_in(1)), 2));
        assert_eq!(
            generation_verdict(&load, Some(&load_in(1)), 2, false),
            LedgerVerdict::Fresh
        );
        assert_eq!(
            generation_verdict(&load, Some(&load_in(2)), 2, false),
            LedgerVerdict::AlreadyApplied
        );
        // A change file is never rewritten: applied in any generation is applied.
        let change_in_1 = record("e1", 1, &change.order_key);
        assert_eq!(
            generation_verdict(&change, Some(&change_in_1), 2, false),
            LedgerVerdict::AlreadyApplied
        );
        assert!(!needs_current_etag(&change, Some(&change_in_1), 2));
        // A listing brings a rewritten full-load file in only when reloads are followed.
        assert!(still_to_apply(&load, Some(&rewritten), 1, true));
        assert!(!still_to_apply(&load, Some(&rewritten), 1, false));
        assert!(!still_to_apply(&change, Some(&change_in_1), 2, true));
    }

    #[test]
    fn the_ledger_verdict_tells_redeliveries_rewrites_and_rejected_files_apart() {
        let t0 = Instant::now();
        let f = cdc(1, t0).file;
        let record = |etag: &str, rejected: bool| LedgerRecord {
            etag: etag.into(),
            status: if rejected {
                LedgerStatus::Rejected
            } else {
                LedgerStatus::Applied
            },
            order_key: String::new(),
        };
        assert_eq!(ledger_verdict(&f, None), LedgerVerdict::Fresh);
        assert_eq!(
            ledger_verdict(&f, Some(&record("e1", false))),
            LedgerVerdict::AlreadyApplied
        );
        assert_eq!(
            ledger_verdict(&f, Some(&record("", false))),
            LedgerVerdict::AlreadyApplied
        );
        assert_eq!(
            ledger_verdict(&f, Some(&record("e0", false))),
            LedgerVerdict::Replaced {
                ledger_etag: "e0".into()
            }
        );
        assert_eq!(
            ledger_verdict(&f, Some(&record("e1", true))),
            LedgerVerdict::StillRejected
        );
        assert_eq!(
            ledger_verdict(&f, Some(&record("e0", true))),
            LedgerVerdict::Fresh,
            "a rejected file replaced by new content is applied"
        );
    }

    #[test]
    fn earlier_listed_files_join_a_batch_in_order_within_the_limits() {
        let t0 = Instant::now();
        let mut listing = Listing {
            through: Some(cdc(9, t0).dms.order()),
            unapplied: (1..=9)
                .map(|n| (cdc(n, t0).dms.order(), cdc(n, t0)))
                .collect(),
        };
        assert!(listing.covers(&cdc(9, t0).dms.order()));
        assert!(!listing.covers(&cdc(10, t0).dms.order()));
        let batch = vec![cdc(5, t0), cdc(6, t0)];
        let in_batch = batch.iter().map(|f| f.file.key.clone()).collect();
        let gaps = listing.gaps_before(&cdc(6, t0).dms.order(), &in_batch);
        assert_eq!(gaps.len(), 4, "files 1-4 are before the batch's last file");
        let joined = join_gaps(batch, gaps, &policy());
        assert_eq!(
            names(&joined.batch),
            [
                "20261124-100001000.parquet",
                "20261124-100002000.parquet",
                "20261124-100003000.parquet"
            ],
            "the earliest files first, max_files at most"
        );
        assert_eq!(
            names(&joined.deferred),
            ["20261124-100005000.parquet", "20261124-100006000.parquet"],
            "the batch's own files wait"
        );
        assert_eq!((joined.joined, joined.left), (3, 1));
    }

    #[test]
    fn key_transitions_compare_the_recorded_key_with_the_resolved_one() {
        let k = |c: &[&str]| -> Vec<String> { c.iter().map(|s| s.to_string()).collect() };
        let none: &[String] = &[];
        assert_eq!(
            key_transition(None, &k(&["id"]), true),
            KeyTransition::Same,
            "nothing recorded"
        );
        assert_eq!(
            key_transition(Some(none), &k(&["id"]), false),
            KeyTransition::Same,
            "a new table has no past"
        );
        assert_eq!(
            key_transition(Some(&k(&["ID"])), &k(&["id"]), true),
            KeyTransition::Same,
            "case aside"
        );
        assert_eq!(
            key_transition(Some(none), &k(&["id"]), true),
            KeyTransition::Appeared { key: k(&["id"]) }
        );
        assert_eq!(
            key_transition(Some(&k(&["id"])), &[], true),
            KeyTransition::Dropped { was: k(&["id"]) }
        );
        assert_eq!(
            key_transition(Some(&k(&["id"])), &k(&["id", "line"]), true),
            KeyTransition::Changed {
                was: k(&["id"]),
                key: k(&["id", "line"])
            }
        );
    }

    #[test]
    fn a_table_blocked_by_a_file_back_in_the_queue_asks_the_ledger_now_and_then() {
        let t0 = Instant::now();
        let mut lane = LaneState::new(policy());
        lane.add(cdc(1, t0));
        let batch = lane.take_batch();
        let after = lane.failed(batch, Disposition::Poison, "Constraint Error", t0);
        assert!(after.release.is_empty());
        // Its message went back to the queue (simulated: the lane no longer holds it).
        let _gone = lane.take_batch();
        let t1 = t0 + Duration::from_secs(5);
        lane.add(cdc(2, t1));
        lane.add(cdc(3, t1));
        assert_eq!(lane.next(t1), Next::CheckBlocker);
        assert_eq!(
            lane.blocker(),
            Some("dms/public/t/20261124-100001000.parquet")
        );
        lane.blocker_checked(false, t1);
        assert_eq!(lane.next(t1), Next::Wait(t1 + Duration::from_secs(30)));
        // An operator skipped it (`cdc-worker ledger skip`): the table goes on.
        let later = t1 + Duration::from_secs(30);
        assert_eq!(lane.next(later), Next::CheckBlocker);
        lane.blocker_checked(true, later);
        assert_eq!(lane.next(later), Next::Batch);
        assert_eq!(names(&lane.take_batch()).len(), 2);
    }
}
