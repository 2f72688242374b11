//! Warehouses: the one trait where DuckDB and Firebolt differ (how batch data reaches the
//! engine, DDL, transactions), and the pieces they share (the plan they execute, SQL
//! quoting, the dedupe/MERGE statements).

pub mod duckdb;
pub mod firebolt;
pub mod history;
pub mod merge;
pub mod sql;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::batch::{
    ApplyPlan, ApplyStats, BatchFile, HistoryReload, LedgerEntry, LedgerRecord, LedgerStatus,
    Staged, StagedFile, TargetTable,
};

/// Bookkeeping tables live beside the targets under these reserved names; a source table
/// that would route to one of them is refused.
pub const LEDGER_TABLE: &str = "_cdc_worker_ledger";
pub const FENCE_TABLE: &str = "_cdc_worker_fence";

/// Longest name of a target table: tables derived from it (tombstones
/// `_cdc_worker_deleted__<t>`, Firebolt's rebuild copy `_cdc_worker_rebuild__<t>` and
/// marker `_cdc_worker_rebuilt__<t>`, each also of a reload's next generation
/// `_cdc_worker_gNNNNNNNN__<t>`) must fit the 255-character identifier limit too.
pub const MAX_TABLE_NAME_LEN: usize =
    255 - "_cdc_worker_rebuilt__".len() - "_cdc_worker_g00000000__".len();

/// The table a reload builds generation `generation` of `table` in, beside the live one.
pub fn generation_table(table: &str, generation: u32) -> String {
    format!("_cdc_worker_g{generation:08}__{table}")
}

pub fn is_reserved_table(name: &str) -> bool {
    name.to_lowercase().starts_with("_cdc_worker")
}

#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    /// Another transaction touched the same data; retrying is safe.
    #[error("transaction conflict: {0}")]
    Conflict(String),
    /// The warehouse is unreachable, stopped or rate limiting; retry later.
    #[error("warehouse unavailable: {0}")]
    Unavailable(String),
    /// Credentials were refused.
    #[error("warehouse authentication failed: {0}")]
    Auth(String),
    /// A statement failed because of values in the batch's data (a constraint the rows
    /// violate, a value that cannot be read or converted): the files, not the warehouse or
    /// the statement, are at fault, so applying them again cannot succeed.
    #[error("the batch's data was refused: {0}")]
    Data(String),
    /// A statement failed for another reason (the catalog changed under it, or the
    /// statement itself); the message is the warehouse's.
    #[error("SQL error: {0}")]
    Sql(String),
    /// A fencing check failed: another worker holds this table now.
    #[error("fenced out: {0}")]
    Fenced(String),
    /// The destructive-change guard stopped the apply before it wrote anything: the
    /// segment's `deletes` delete rows weigh too much against the table's `rows` rows.
    #[error(
        "held by the destructive-change guard: {deletes} delete rows against {rows} rows in the table"
    )]
    Guarded { deletes: u64, rows: u64 },
    #[error("{0}")]
    Other(String),
}

impl WarehouseError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            WarehouseError::Conflict(_) | WarehouseError::Unavailable(_)
        )
    }
}

/// Where the warehouses differ. Everything else (planning, dedupe logic, ledger rules)
/// is shared and lives in the apply engine.
#[async_trait]
pub trait Warehouse: Send + Sync + 'static {
    /// "duckdb" or "firebolt", for logs and metrics.
    fn name(&self) -> &'static str;

    /// Longest identifier the warehouse accepts, in bytes.
    fn max_identifier_len(&self) -> usize;

    /// The name a source column gets in this warehouse (Firebolt folds to lower case).
    fn column_name(&self, source: &str) -> String;

    /// Creates bookkeeping tables (ledger, fences) when missing.
    async fn prepare(&self) -> Result<(), WarehouseError>;

    /// Describes a target table; `None` if it does not exist.
    async fn describe(&self, table: &str) -> Result<Option<TargetTable>, WarehouseError>;

    /// What the ledger holds for these keys of `table` (the newest entry per key).
    async fn applied(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<HashMap<String, LedgerRecord>, WarehouseError>;

    /// Records a verdict on files outside a batch: rejected (unreadable Parquet, not fetched
    /// again; a fixed upload with a new ETag is applied normally), or an operator's skip or
    /// forget (`cdc-worker ledger`). The newest entry of a key decides.
    async fn record_status(
        &self,
        table: &str,
        files: &[BatchFile],
        status: LedgerStatus,
        reason: &str,
    ) -> Result<(), WarehouseError>;

    /// A table's ledger, newest entry first, at most `limit` entries (`cdc-worker ledger
    /// show`).
    async fn ledger_entries(
        &self,
        table: &str,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, WarehouseError>;

    /// The last applied file of `table` by DMS order: (order key, S3 key).
    async fn last_applied(&self, table: &str) -> Result<Option<(String, String)>, WarehouseError>;

    /// Makes the batch's files readable to [`Warehouse::apply`] and reads their schemas.
    async fn stage(&self, batch_id: &str, files: Vec<BatchFile>) -> Staged;

    /// Runs a plan: DDL, load, dedupe, MERGE or append, ledger, all committed together
    /// where the warehouse allows (see each implementation for its crash story).
    async fn apply(
        &self,
        plan: &ApplyPlan,
        files: &[StagedFile],
    ) -> Result<ApplyStats, WarehouseError>;

    /// Rows in a target table (0 when it does not exist).
    async fn row_count(&self, table: &str) -> Result<u64, WarehouseError>;

    /// How many values of `key` (target column names) appear in more than one row of the
    /// table: a table appended without a key can repeat one.
    async fn repeated_keys(&self, table: &str, key: &[String]) -> Result<u64, WarehouseError>;

    /// The newest ledger entries, for `cdc-worker status`.
    async fn ledger_summary(&self) -> Result<Vec<LedgerEntry>, WarehouseError>;

    /// Replaces `table` by `next` (a reload's new generation) in one transaction: readers
    /// see the old table or the new one, never neither. `next`'s deleted-keys table, when
    /// it has one, replaces `table`'s; `table`'s own goes.
    async fn promote(&self, table: &str, next: &str) -> Result<(), WarehouseError>;

    /// A reload of a history table: the versions of its next generation `next` merged into
    /// `table` (which keeps its history) and `next` dropped, in one transaction.
    async fn merge_generation(
        &self,
        table: &str,
        next: &str,
        reload: &HistoryReload,
    ) -> Result<(), WarehouseError>;

    /// Drops a reload's abandoned generation table `next` and its deleted-keys table (a
    /// second reload started before the first was complete).
    async fn discard(&self, next: &str) -> Result<(), WarehouseError>;

    /// A cheap round trip, for `/readyz` and `check-connection`.
    async fn ping(&self, timeout: Duration) -> Result<(), WarehouseError>;
}
