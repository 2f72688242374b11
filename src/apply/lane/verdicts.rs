//! What the lane concludes about the files of a batch from what it has read, as plain
//! functions: the ledger's verdict on each file, and which earlier files from the table's S3
//! listing join the batch. No IO: `batch.rs` reads the ledger and the listing and acts on
//! these verdicts.

use std::collections::{BTreeMap, HashSet};

use super::state::LanePolicy;
use crate::apply::context::PendingFile;
use crate::batch::{BatchFile, LedgerRecord, LedgerStatus};
use crate::dms::DmsOrder;

/// The ledger's verdict on a file of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerVerdict {
    /// Not in the ledger, or a rejected file replaced by new content: apply it.
    Fresh,
    /// Applied before with the same content (a redelivery, an identical re-upload).
    AlreadyApplied,
    /// Rejected before and still the same bytes: back to the dead-letter queue, quietly.
    StillRejected,
    /// Applied before, and the object now has other content.
    Replaced { ledger_etag: String },
    /// Skipped by an operator (`cdc-worker ledger skip`), still the same bytes.
    SkippedByOperator,
    /// A full-load file that starts the table's next generation: a DMS reload.
    Reload,
}

pub fn ledger_verdict(file: &BatchFile, record: Option<&LedgerRecord>) -> LedgerVerdict {
    let Some(record) = record else {
        return LedgerVerdict::Fresh;
    };
    // An unknown ETag on either side cannot tell the contents apart: same file.
    let same = record.etag.is_empty() || file.etag.is_empty() || record.etag == file.etag;
    match (record.status, same) {
        // New content for a file that never took effect is applied.
        (LedgerStatus::Forgotten, _)
        | (LedgerStatus::Rejected, false)
        | (LedgerStatus::Skipped, false) => LedgerVerdict::Fresh,
        (LedgerStatus::Rejected, true) => LedgerVerdict::StillRejected,
        (LedgerStatus::Skipped, true) => LedgerVerdict::SkippedByOperator,
        (LedgerStatus::Applied, true) => LedgerVerdict::AlreadyApplied,
        (LedgerStatus::Applied, false) => LedgerVerdict::Replaced {
            ledger_etag: record.etag.clone(),
        },
    }
}

/// The ledger's verdict on a file applied to generation `generation` of its table.
/// `loaded_after_changes`: a change file of that generation is applied already and this
/// file was uploaded after that change file was written.
///
/// A change file is never written twice, so its entries count whatever their generation. A
/// full-load file belongs to one generation: an entry of an older one does not count (the
/// key holds the new full load's content now), and a full-load file that replaces one
/// applied in this generation, or that is new and uploaded after the generation's changes,
/// is a reload. (A new full-load file uploaded before them is a late file of this load.)
pub fn generation_verdict(
    file: &BatchFile,
    record: Option<&LedgerRecord>,
    generation: u32,
    loaded_after_changes: bool,
) -> LedgerVerdict {
    if !file.full_load {
        return ledger_verdict(file, record);
    }
    let record = record.filter(|r| r.generation() >= generation);
    match ledger_verdict(file, record) {
        LedgerVerdict::Fresh if loaded_after_changes => LedgerVerdict::Reload,
        LedgerVerdict::Replaced { .. } => LedgerVerdict::Reload,
        verdict => verdict,
    }
}

/// Whether a full-load file's notification may be older than the object's content, so the
/// object's current ETag is read before the verdict: its key is in the ledger with another
/// ETag, or from an older generation (a late notification of the content a reload replaced).
pub fn needs_current_etag(
    file: &BatchFile,
    record: Option<&LedgerRecord>,
    generation: u32,
) -> bool {
    file.full_load && record.is_some_and(|r| r.etag != file.etag || r.generation() < generation)
}

/// Whether a listed file still has to be applied to generation `generation`, as far as its
/// ledger record says. A full-load file rewritten since it was applied is one when the lane
/// follows reloads: its batch starts the reload, even when a change file of the new
/// generation was announced before it.
pub fn still_to_apply(
    file: &BatchFile,
    record: Option<&LedgerRecord>,
    generation: u32,
    follow_reloads: bool,
) -> bool {
    match generation_verdict(file, record, generation, false) {
        LedgerVerdict::Fresh => true,
        LedgerVerdict::Reload => follow_reloads,
        _ => false,
    }
}

/// How the key a segment is applied with compares with the one the table was applied with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyTransition {
    /// The same key, or nothing is known about the earlier one.
    Same,
    /// The table was appended (no key) and now has a key: its earlier rows may repeat a key.
    Appeared { key: Vec<String> },
    /// The table was merged by a key and now has none: from here on rows are appended and
    /// deletes ignored.
    Dropped { was: Vec<String> },
    /// Merged by another key than before.
    Changed { was: Vec<String>, key: Vec<String> },
}

/// `recorded` is the key the table's schema history says it is applied with (`None`: not
/// recorded yet), `key` the one resolved now; a table that does not exist yet has no past.
pub fn key_transition(
    recorded: Option<&[String]>,
    key: &[String],
    target_exists: bool,
) -> KeyTransition {
    let Some(was) = recorded.filter(|_| target_exists) else {
        return KeyTransition::Same;
    };
    let fold = |k: &[String]| -> Vec<String> { k.iter().map(|c| c.to_lowercase()).collect() };
    if fold(was) == fold(key) {
        return KeyTransition::Same;
    }
    match (was.is_empty(), key.is_empty()) {
        (true, false) => KeyTransition::Appeared { key: key.to_vec() },
        (false, true) => KeyTransition::Dropped { was: was.to_vec() },
        _ => KeyTransition::Changed {
            was: was.to_vec(),
            key: key.to_vec(),
        },
    }
}

/// What the last S3 listing of the table showed: every file up to `through`, and those not
/// applied when it was taken. DMS writes a table's files one after the other, so no file
/// appears later before one already listed: a batch that ends within the listing needs no
/// new one.
#[derive(Debug, Default)]
pub struct Listing {
    pub through: Option<DmsOrder>,
    pub unapplied: BTreeMap<DmsOrder, PendingFile>,
}

impl Listing {
    /// Whether the listing shows every file up to `last`.
    pub fn covers(&self, last: &DmsOrder) -> bool {
        self.through.as_ref().is_some_and(|t| t >= last)
    }

    /// Unapplied listed files ordered before `last` that are not in the batch already.
    pub fn gaps_before(&mut self, last: &DmsOrder, in_batch: &HashSet<String>) -> Vec<PendingFile> {
        // The batch's own files are accounted for from here on.
        self.unapplied
            .retain(|_, g| !in_batch.contains(&g.file.key));
        self.unapplied
            .range(..last.clone())
            .map(|(_, g)| g.clone())
            .collect()
    }

    /// Files that are applied now (by this lane or another worker) leave the listing.
    pub fn forget<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        let keys: HashSet<&str> = keys.into_iter().collect();
        self.unapplied
            .retain(|_, g| !keys.contains(g.file.key.as_str()));
    }
}

/// A batch with the earlier files found in the listing joined to it.
#[derive(Debug, Default)]
pub struct Joined {
    /// The batch to apply, in DMS order, within the batch limits.
    pub batch: Vec<PendingFile>,
    /// The batch's own files that no longer fit: they wait in the lane.
    pub deferred: Vec<PendingFile>,
    /// Listed files that joined.
    pub joined: usize,
    /// Listed files that did not fit (they stay in the listing and come later, in order).
    pub left: usize,
}

/// Joins unannounced earlier files to a batch, in DMS order and within the batch limits:
/// after an outage the listing can hold most of a backlog.
pub fn join_gaps(batch: Vec<PendingFile>, gaps: Vec<PendingFile>, policy: &LanePolicy) -> Joined {
    let own: HashSet<String> = batch.iter().map(|f| f.file.key.clone()).collect();
    let mut files: Vec<PendingFile> = batch.into_iter().chain(gaps).collect();
    files.sort_by_key(|f| f.dms.order());
    let later = files.split_off(batch_cut(&files, policy));
    let joined = files.iter().filter(|f| !own.contains(&f.file.key)).count();
    let (deferred, left): (Vec<_>, Vec<_>) =
        later.into_iter().partition(|f| own.contains(&f.file.key));
    Joined {
        batch: files,
        deferred,
        joined,
        left: left.len(),
    }
}

/// How many of `files` (in DMS order) one batch takes: up to the limits, and always the first.
fn batch_cut(files: &[PendingFile], policy: &LanePolicy) -> usize {
    let mut bytes = 0u64;
    for (i, f) in files.iter().enumerate() {
        if i > 0 && (i >= policy.max_files || bytes + f.file.size > policy.max_bytes) {
            return i;
        }
        bytes += f.file.size;
    }
    files.len()
}
