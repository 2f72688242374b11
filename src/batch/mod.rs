//! The vocabulary of a batch, shared by the apply engine and the warehouses: the files of
//! a batch and their staged form, the target table as a warehouse describes it, the plan a
//! warehouse executes, the fence it commits under, the ledger's records and what an apply
//! did. It sits below both, so neither imports the other's types.

use std::path::PathBuf;

use serde::Serialize;

use crate::schema::dialect::Dialect;
use crate::schema::parquet::ParquetError;
use crate::schema::types::{Column, ColumnType, FileSchema};

/// One S3 object of a batch, in DMS order within the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFile {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    /// [`crate::dms::DmsOrder::sort_key`] of the file within its table.
    pub order_key: String,
    /// A DMS full-load file (`LOAD*.parquet`): a snapshot holding each key once, written
    /// before any change file of its table. Segments of such files may be inserted without
    /// the per-key dedupe and MERGE (see `warehouse::merge::fast_load_blockers`).
    pub full_load: bool,
}

impl BatchFile {
    pub fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// A file whose schema is known and whose data the warehouse can read.
#[derive(Debug, Clone)]
pub struct StagedFile {
    pub file: BatchFile,
    pub schema: FileSchema,
    /// DuckDB downloads the object; Firebolt reads it from S3 (None).
    pub local_path: Option<PathBuf>,
}

/// Why a file of a batch could not be staged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StageError {
    /// The object is gone (deleted, or a DMS TRUNCATE removed the folder).
    #[error("object no longer exists")]
    Missing,
    /// The object is not a readable Parquet file: retrying cannot help.
    #[error("unreadable Parquet: {0}")]
    Poison(#[from] ParquetError),
    /// S3 or disk trouble that may pass.
    #[error("{0}")]
    Transient(String),
}

/// The outcome of staging a batch: per file, in batch order. Dropping it removes
/// whatever was downloaded.
#[derive(Debug, Default)]
pub struct Staged {
    pub files: Vec<Result<StagedFile, StageError>>,
    pub workspace: Option<tempfile::TempDir>,
}

/// A target table as the warehouse describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTable {
    pub name: String,
    pub columns: Vec<Column>,
    /// Declared primary key (DuckDB) or primary index (Firebolt) columns.
    pub primary_key: Vec<String>,
    /// The dialect whose type names the column types were read from: two types that
    /// render to the same name in it are the same column type there (Firebolt's NUMERIC(20, 0)
    /// holds a uint64 and a decimal(20,0) alike), so the planner compares rendered names.
    pub dialect: Dialect,
}

/// What a committed apply did, for logs, metrics and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Rows read from the batch's files.
    pub rows_staged: u64,
    /// Rows left after reducing to one change per key (keyed tables).
    pub rows_merged: u64,
    pub rows_deleted: u64,
    /// Rows appended (tables without a key).
    pub rows_appended: u64,
    /// Deletes that cannot apply to a table without a key (counted, not applied).
    pub deletes_ignored: u64,
    /// Values that did not cast to their column's type and were loaded as NULL, per column.
    pub cast_failures: Vec<(String, u64)>,
    /// Keys changed more than once in one file with no ordering column to decide
    /// (Firebolt cannot see row order).
    pub ambiguous_keys: u64,
    /// Staged rows of a keyed table whose key has a NULL: DMS keys are primary keys, so
    /// such a row is not a change of any row; it is skipped, never merged, and counted here.
    pub null_key_rows: u64,
    pub statements: u32,
    /// The segment took the full-load fast path: inserted as it is, without the per-key
    /// dedupe and MERGE (its keys were unique and new to the table).
    pub fast_load: bool,
}

/// A ledger entry's verdict on a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRecord {
    pub etag: String,
    pub status: LedgerStatus,
    /// The entry's order key: the file's generation and its place in DMS order.
    pub order_key: String,
}

impl LedgerRecord {
    /// Rejected as unreadable rather than applied.
    pub fn rejected(&self) -> bool {
        self.status == LedgerStatus::Rejected
    }

    /// The generation of the table the entry belongs to.
    pub fn generation(&self) -> u32 {
        split_order_key(&self.order_key).0
    }
}

/// Each DMS full load of a table starts a generation of it: 1 for the first, one more for
/// each reload. The ledger's order key of a file is its generation then its DMS order, so
/// that the newest generation sorts last and the first one keeps the keys written before
/// generations (no prefix): `g00000002/0/00000001/...`.
pub fn generation_order_key(generation: u32, dms_order_key: &str) -> String {
    if generation <= 1 {
        dms_order_key.to_string()
    } else {
        format!("g{generation:08}/{dms_order_key}")
    }
}

/// The generation and the DMS order key of a ledger order key.
pub fn split_order_key(order_key: &str) -> (u32, &str) {
    order_key
        .strip_prefix('g')
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(n, rest)| Some((n.parse().ok()?, rest)))
        .unwrap_or((1, order_key))
}

/// Whether a DMS order key is a change file's (full-load files sort first, `0/`).
pub fn is_change_order_key(dms_order_key: &str) -> bool {
    dms_order_key.starts_with("1/")
}

/// What the newest ledger entry of a file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerStatus {
    /// Applied by a batch.
    Applied,
    /// Unreadable: never fetched again while the same bytes come back.
    Rejected,
    /// Skipped by an operator (`cdc-worker ledger skip`): acknowledged, never applied.
    Skipped,
    /// Forgotten by an operator (`cdc-worker ledger forget`): as if it had never been seen.
    Forgotten,
}

impl LedgerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerStatus::Applied => STATUS_APPLIED,
            LedgerStatus::Rejected => STATUS_REJECTED,
            LedgerStatus::Skipped => STATUS_SKIPPED,
            LedgerStatus::Forgotten => STATUS_FORGOTTEN,
        }
    }

    /// The status column's text; entries from before statuses (no text) are applied files.
    pub fn parse(text: Option<&str>) -> Self {
        match text {
            Some(STATUS_REJECTED) => LedgerStatus::Rejected,
            Some(STATUS_SKIPPED) => LedgerStatus::Skipped,
            Some(STATUS_FORGOTTEN) => LedgerStatus::Forgotten,
            _ => LedgerStatus::Applied,
        }
    }
}

/// Ledger statuses, as stored.
pub const STATUS_APPLIED: &str = "applied";
pub const STATUS_REJECTED: &str = "rejected";
pub const STATUS_SKIPPED: &str = "skipped";
pub const STATUS_FORGOTTEN: &str = "forgotten";

/// A ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerEntry {
    pub table: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    pub batch_id: String,
    pub applied_at: String,
    /// "applied", "rejected", "skipped" or "forgotten" (see [`LedgerStatus`]).
    pub status: String,
    /// Why it was rejected, skipped or forgotten.
    pub detail: String,
}

/// A statement that changes the target's shape, run before the load in the same
/// transaction where the warehouse allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "ddl", rename_all = "snake_case")]
pub enum Ddl {
    CreateTable {
        columns: Vec<Column>,
        /// Firebolt's primary index; DuckDB declares no constraint (see its module).
        primary_key: Vec<String>,
    },
    AddColumn {
        column: Column,
    },
    WidenColumn {
        column: String,
        from: ColumnType,
        to: ColumnType,
    },
}

/// How one target column is filled from the staged batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadExpr {
    /// The source column as it is.
    Column(String),
    /// A cast that cannot fail (the file's type is narrower than the column's).
    Cast { column: String, to: ColumnType },
    /// A cast that may fail: such values load as NULL and are counted.
    TryCast { column: String, to: ColumnType },
    /// The source value only where it does not cast to `fits` (a variant column).
    Variant { column: String, fits: ColumnType },
}

impl LoadExpr {
    pub fn source_column(&self) -> &str {
        match self {
            LoadExpr::Column(c)
            | LoadExpr::Cast { column: c, .. }
            | LoadExpr::TryCast { column: c, .. }
            | LoadExpr::Variant { column: c, .. } => c,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadColumn {
    pub target: String,
    pub expr: LoadExpr,
}

/// A key column: its name in the target and in the staged files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    pub target: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadMode {
    /// One row per key, the latest change winning; `D` deletes.
    Merge { key: Vec<KeyColumn> },
    /// No key: every non-delete row is appended in file and row order.
    Append,
}

/// Everything a warehouse needs to apply one segment.
#[derive(Debug, Clone)]
pub struct ApplyPlan {
    pub batch_id: String,
    pub table: String,
    pub ddl: Vec<Ddl>,
    pub load: Vec<LoadColumn>,
    pub mode: LoadMode,
    /// The operation column, when at least one file carries it.
    pub op_column: Option<String>,
    /// The ordering column (source name), when configured and present.
    pub ordering_column: Option<String>,
    /// All source columns of the segment, in order: the staging table's shape.
    pub staged_columns: Vec<Column>,
    /// The files to record in the ledger, in DMS order.
    pub files: Vec<BatchFile>,
    /// The lease token this apply runs under; the ledger commit checks it.
    pub fence: Option<Fence>,
    /// The table the rows go into when it is not `table`: the next generation being built
    /// during a reload. The ledger and the fence stay `table`'s.
    pub into: Option<String>,
    /// The destructive-change guard: the apply stops before it writes when the segment
    /// deletes more of the table than it allows (`WarehouseError::Guarded`).
    pub guard: Option<DeleteGuard>,
    /// `history = "scd2"`: the target keeps every version of a key (`warehouse::history`).
    pub history: Option<History>,
}

/// The columns a history table (`history = "scd2"`) adds to the source's: when a version
/// became valid, when it stopped (NULL while current), whether it is current, and the
/// operation that opened it (`D` once a delete closed it). Source columns may not use them.
pub const VALID_FROM: &str = "__valid_from";
pub const VALID_TO: &str = "__valid_to";
pub const IS_CURRENT: &str = "__is_current";
pub const HISTORY_OP: &str = "__op";
pub const HISTORY_COLUMNS: [&str; 4] = [VALID_FROM, VALID_TO, IS_CURRENT, HISTORY_OP];

/// A reload of a history table: its new generation's versions merged into the live
/// history instead of replacing it (`warehouse::history::reload_statement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryReload {
    /// Key columns (target names).
    pub key: Vec<String>,
    /// The generation's columns besides the history columns, the key's included; the live
    /// table has them all (`add_columns` adds those it lacked).
    pub columns: Vec<String>,
    /// Columns of the generation the live table lacks, added first.
    pub add_columns: Vec<Column>,
    pub tracked: Vec<String>,
    /// The ordering column (target name), when loaded.
    pub ordering: Option<String>,
    /// When the reload started: the new full load's rows and the closing of keys it lacks
    /// happen then.
    pub at: std::time::SystemTime,
}

/// The columns of a history table whose change opens a version (target names): the
/// `configured` ones, else all but the key and the ordering column (DMS stamps that one on
/// every change, so it alone would make every update a version).
pub fn tracked_columns(
    columns: &[String],
    key: &[String],
    ordering: Option<&str>,
    configured: Option<&[String]>,
) -> Vec<String> {
    let named = |c: &str, names: &[String]| names.iter().any(|n| n.eq_ignore_ascii_case(c));
    columns
        .iter()
        .filter(|c| match configured {
            Some(names) => named(c, names),
            None => !named(c, key) && !ordering.is_some_and(|o| o.eq_ignore_ascii_case(c)),
        })
        .cloned()
        .collect()
}

impl TargetTable {
    /// Whether this is a history table (`history = "scd2"`) of a source with `source`
    /// columns: it has the history columns, and the source does not (a latest table may
    /// have them as source columns).
    pub fn is_history(&self, source: &[Column]) -> bool {
        let has = |columns: &[Column], name: &str| {
            columns.iter().any(|c| c.name.eq_ignore_ascii_case(name))
        };
        [VALID_FROM, IS_CURRENT]
            .iter()
            .all(|h| has(&self.columns, h))
            && !has(source, VALID_FROM)
    }
}

/// How a history table's versions are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Target columns whose change opens a new version (`track_history_columns`); an
    /// update that changes none of them creates no version.
    pub tracked: Vec<String>,
}

impl ApplyPlan {
    /// The table the rows are written to.
    pub fn target_table(&self) -> &str {
        self.into.as_deref().unwrap_or(&self.table)
    }
}

/// `guard.*`: how much of a table one batch may delete.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeleteGuard {
    pub max_fraction: f64,
    pub min_rows: u64,
}

impl DeleteGuard {
    /// Whether `deletes` delete rows against a table of `rows` rows are held. A batch
    /// removes at most the table's rows, so a small table is never held, however many
    /// deletes (of keys it lacks) a batch carries.
    pub fn holds(&self, deletes: u64, rows: u64) -> bool {
        let removed = deletes.min(rows);
        self.max_fraction > 0.0
            && removed > self.min_rows
            && removed as f64 > self.max_fraction * rows as f64
    }
}

/// Fencing: the commit succeeds only if no newer lease holder has committed this table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub token: u64,
    pub holder: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_carry_the_generation_and_sort_newest_generation_last() {
        let load = "0/00000001/00000000/";
        let change = "1/20261202-101500000.parquet/";
        assert_eq!(
            generation_order_key(1, change),
            change,
            "generation 1 keeps old keys"
        );
        let again = generation_order_key(2, load);
        assert_eq!(again, "g00000002/0/00000001/00000000/");
        assert_eq!(split_order_key(&again), (2, load));
        assert_eq!(split_order_key(change), (1, change));
        // The ledger's newest entry (max of order_key) is the newest generation's.
        assert!(again.as_str() > change && generation_order_key(3, load) > again);
        assert!(is_change_order_key(change) && !is_change_order_key(load));
        assert_eq!(
            crate::dms::change_time_of_sort_key(change).map(chrono::DateTime::<chrono::Utc>::from),
            Some("2026-12-02T10:15:00Z".parse().unwrap())
        );
    }

    #[test]
    fn the_guard_holds_a_large_share_of_a_large_table_only() {
        let guard = DeleteGuard {
            max_fraction: 0.5,
            min_rows: 10_000,
        };
        assert!(guard.holds(90_000, 100_000));
        assert!(!guard.holds(40_000, 100_000), "less than half");
        assert!(!guard.holds(9_000, 10_000), "not more than min_rows");
        // Deletes of keys the table lacks remove nothing: weighed at the table's rows.
        assert!(!guard.holds(50_000, 5_000));
        assert!(guard.holds(50_000, 20_000));
        let off = DeleteGuard {
            max_fraction: 0.0,
            ..guard
        };
        assert!(!off.holds(100_000, 100_000));
    }
}
