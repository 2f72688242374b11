//! The embedded DuckDB warehouse: downloads a batch's objects to a temporary directory,
//! reads them with `read_parquet`, and runs DDL, MERGE (or append) and the ledger insert
//! in one transaction. A crash at any point leaves either everything or nothing.
//!
//! Target tables get no PRIMARY KEY constraint: DuckDB's ART indexes slow every MERGE and
//! reject some valid update sequences inside one transaction; the worker enforces one row
//! per key itself. A key declared on a table you create yourself is still honoured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use duckdb::{Connection, params_from_iter};
use futures::StreamExt;

use crate::batch::{
    ApplyPlan, ApplyStats, BatchFile, Ddl, DeleteGuard, HistoryReload, LedgerEntry, LedgerRecord,
    LedgerStatus, LoadMode, StageError, Staged, StagedFile, TargetTable,
};
use crate::config::DuckdbConfig;
use crate::schema::parquet;
use crate::storage::{ObjectStore, StorageError, bare_etag};

use crate::schema::dialect::Dialect;

use super::history;
use super::merge::{self, RESERVED_PREFIX};
use super::sql::{ident, literal, qualified};
use super::{FENCE_TABLE, LEDGER_TABLE, Warehouse, WarehouseError};

/// Column names DuckDB's `read_parquet` uses for its virtual columns: a source column of
/// that name would shadow them.
const VIRTUAL_COLUMNS: [&str; 3] = ["file_index", "file_row_number", "filename"];

/// How many objects of one batch download at once.
const DOWNLOAD_CONCURRENCY: usize = 8;

pub struct DuckdbWarehouse {
    schema: String,
    op_column: String,
    download_dir: Option<PathBuf>,
    store: ObjectStore,
    /// Idle connections; each apply borrows one (a DuckDB connection is not `Sync`).
    pool: Mutex<Vec<Connection>>,
    /// Kept so new connections can be cloned from the open database.
    primary: Mutex<Connection>,
}

/// DuckDB names the kind of every error it raises in the message's first words
/// (`ExceptionType` in DuckDB's `exception.hpp`): the data kinds are the rows' fault.
const DATA_ERRORS: [&str; 3] = [
    "Constraint Error",
    "Conversion Error",
    "Invalid Input Error",
];

fn sql_err(e: duckdb::Error) -> WarehouseError {
    let text = e.to_string();
    if text.contains("onflict") {
        WarehouseError::Conflict(text)
    } else if DATA_ERRORS.iter().any(|kind| text.starts_with(kind)) {
        WarehouseError::Data(text)
    } else {
        WarehouseError::Sql(text)
    }
}

impl DuckdbWarehouse {
    /// Opens (or creates) the database file.
    pub fn open(
        config: &DuckdbConfig,
        op_column: &str,
        store: ObjectStore,
    ) -> Result<Self, WarehouseError> {
        Self::open_with(config, op_column, store, duckdb::AccessMode::ReadWrite)
    }

    fn open_with(
        config: &DuckdbConfig,
        op_column: &str,
        store: ObjectStore,
        access: duckdb::AccessMode,
    ) -> Result<Self, WarehouseError> {
        let read_only = matches!(access, duckdb::AccessMode::ReadOnly);
        if let Some(parent) = config
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty() && !read_only)
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                WarehouseError::Other(format!("creating {}: {e}", parent.display()))
            })?;
        }
        let mut db_config = duckdb::Config::default()
            .access_mode(access)
            .map_err(sql_err)?;
        if config.threads > 0 {
            db_config = db_config.threads(config.threads as i64).map_err(sql_err)?;
        }
        if let Some(limit) = config.memory_limit.as_deref().filter(|l| !l.is_empty()) {
            db_config = db_config.max_memory(limit).map_err(sql_err)?;
        }
        let conn = Connection::open_with_flags(&config.path, db_config).map_err(|e| {
            WarehouseError::Other(format!("opening {}: {e}", config.path.display()))
        })?;
        Ok(Self {
            schema: config.schema.clone(),
            op_column: op_column.to_string(),
            download_dir: config.download_dir.clone(),
            store,
            pool: Mutex::new(Vec::new()),
            primary: Mutex::new(conn),
        })
    }

    fn checkout(&self) -> Result<Connection, WarehouseError> {
        if let Some(conn) = self.pool.lock().expect("pool lock").pop() {
            return Ok(conn);
        }
        self.primary
            .lock()
            .expect("primary lock")
            .try_clone()
            .map_err(sql_err)
    }

    fn checkin(&self, conn: Connection) {
        self.pool.lock().expect("pool lock").push(conn);
    }

    /// Runs `f` on a pooled connection on the blocking thread pool.
    async fn with_conn<T, F>(self: &Arc<Self>, f: F) -> Result<T, WarehouseError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &str) -> Result<T, WarehouseError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.checkout()?;
            let result = f(&conn, &this.schema);
            this.checkin(conn);
            result
        })
        .await
        .map_err(|e| WarehouseError::Other(format!("DuckDB task failed: {e}")))?
    }

    fn ledger(schema: &str) -> String {
        qualified(schema, LEDGER_TABLE)
    }
}

/// `Arc` wrapper so the blocking closures can own the warehouse.
pub struct Duckdb(pub Arc<DuckdbWarehouse>);

impl Duckdb {
    pub fn open(
        config: &DuckdbConfig,
        op_column: &str,
        store: ObjectStore,
    ) -> Result<Self, WarehouseError> {
        Ok(Self(Arc::new(DuckdbWarehouse::open(
            config, op_column, store,
        )?)))
    }

    /// Opens an existing database file read-only, creating nothing (for `status` and
    /// `check-connection` while no worker holds the file).
    pub fn open_read_only(
        config: &DuckdbConfig,
        op_column: &str,
        store: ObjectStore,
    ) -> Result<Self, WarehouseError> {
        Ok(Self(Arc::new(DuckdbWarehouse::open_with(
            config,
            op_column,
            store,
            duckdb::AccessMode::ReadOnly,
        )?)))
    }
}

fn ddl_sql(schema: &str, table: &str, ddl: &Ddl) -> String {
    let target = qualified(schema, table);
    let d = Dialect::Duckdb;
    match ddl {
        Ddl::CreateTable { columns, .. } => format!(
            "CREATE TABLE IF NOT EXISTS {target} ({})",
            columns
                .iter()
                .map(|c| format!("{} {}", ident(&c.name), d.type_name(&c.ty)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Ddl::AddColumn { column } => format!(
            "ALTER TABLE {target} ADD COLUMN IF NOT EXISTS {} {}",
            ident(&column.name),
            d.type_name(&column.ty)
        ),
        Ddl::WidenColumn { column, to, .. } => format!(
            "ALTER TABLE {target} ALTER COLUMN {} SET DATA TYPE {}",
            ident(column),
            d.type_name(to)
        ),
    }
}

/// Refuses source columns that would collide with the staging query's own names.
fn check_stage_names(plan: &ApplyPlan) -> Result<(), WarehouseError> {
    for c in &plan.staged_columns {
        let lower = c.name.to_lowercase();
        if lower.starts_with(RESERVED_PREFIX) || VIRTUAL_COLUMNS.contains(&lower.as_str()) {
            return Err(WarehouseError::Sql(format!(
                "source column `{}` collides with a name the DuckDB loader reserves ({}*, {}); rename it in DMS with a transformation rule",
                c.name,
                RESERVED_PREFIX,
                VIRTUAL_COLUMNS.join(", ")
            )));
        }
    }
    Ok(())
}

/// Whether a full-load segment takes the fast path (a plain INSERT): decided here, in the
/// transaction, so that no other writer can add a key between the check and the insert.
fn no_fast_load_blockers(
    conn: &Connection,
    target: &str,
    tombstones: &str,
    plan: &ApplyPlan,
    rows: &merge::StagedRows,
) -> Result<bool, WarehouseError> {
    let blockers: i64 = conn
        .query_row(
            &merge::fast_load_blockers(target, Some(tombstones), plan, rows),
            [],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    tracing::debug!(table = %plan.table, fast = blockers == 0, "full-load segment");
    Ok(blockers == 0)
}

/// A keyed segment: the full-load fast path, else DuckDB's delete-and-insert where it
/// gives the MERGE's rows, else the MERGE; tombstones around them.
fn merge_segment(
    conn: &Connection,
    schema: &str,
    target: &str,
    plan: &ApplyPlan,
    rows: &merge::StagedRows,
    stats: &mut ApplyStats,
) -> Result<(), WarehouseError> {
    let d = Dialect::Duckdb;
    if let Some(history) = &plan.history {
        count_null_keys(conn, plan, rows, stats)?;
        let sql = history::history_statement(d, target, plan, rows, &history.tracked);
        stats.rows_merged += conn.execute(&sql, []).map_err(sql_err)? as u64;
        return Ok(());
    }
    let tombstones = qualified(schema, &merge::tombstone_table(plan.target_table()));
    let tombstone_sql = merge::tombstone_statements(target, &tombstones, plan, rows);
    if let Some((create, _)) = &tombstone_sql {
        conn.execute_batch(create).map_err(sql_err)?;
        stats.statements += 1;
    }
    count_null_keys(conn, plan, rows, stats)?;
    let mut fast = false;
    if merge::fast_load_candidate(plan) {
        fast = no_fast_load_blockers(conn, target, &tombstones, plan, rows)?;
        stats.fast_load |= fast;
        stats.statements += 1;
    }
    let replace = match merge::delete_insert_statements(d, target, plan, rows) {
        Some(statements) if !fast && loads_every_column(conn, schema, plan)? => {
            stats.statements += 1;
            Some(statements)
        }
        _ => None,
    };
    if fast {
        let sql = merge::insert_new_rows_statement(d, target, plan, rows);
        stats.rows_merged += conn.execute(&sql, []).map_err(sql_err)? as u64;
    } else if let Some([dedupe, delete, insert, drop]) = replace {
        stats.rows_merged += conn.execute(&dedupe, []).map_err(sql_err)? as u64;
        conn.execute(&delete, []).map_err(sql_err)?;
        conn.execute(&insert, []).map_err(sql_err)?;
        conn.execute_batch(&drop).map_err(sql_err)?;
        stats.statements += 3;
    } else {
        let sql = merge::merge_statement(d, target, plan, rows, Some(&tombstones));
        stats.rows_merged += conn.execute(&sql, []).map_err(sql_err)? as u64;
    }
    if let Some((_, record)) = &tombstone_sql {
        conn.execute(record, []).map_err(sql_err)?;
        stats.statements += 1;
    }
    Ok(())
}

/// Rows whose key has a NULL are skipped by every keyed path; counted for the report.
fn count_null_keys(
    conn: &Connection,
    plan: &ApplyPlan,
    rows: &merge::StagedRows,
    stats: &mut ApplyStats,
) -> Result<(), WarehouseError> {
    if let Some(q) = merge::null_key_rows_query(plan, rows) {
        stats.null_key_rows += conn
            .query_row(&q, [], |r| r.get::<_, i64>(0))
            .map_err(sql_err)? as u64;
        stats.statements += 1;
    }
    Ok(())
}

/// Runs `work` in one transaction: committed if it succeeds, rolled back if not.
fn in_transaction<T>(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, WarehouseError>,
) -> Result<T, WarehouseError> {
    conn.execute_batch("BEGIN TRANSACTION").map_err(sql_err)?;
    match work(conn) {
        Ok(value) => {
            conn.execute_batch("COMMIT").map_err(sql_err)?;
            Ok(value)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Whether the plan fills every column of the target (a column it does not load keeps
/// its values under a MERGE's UPDATE, and would lose them to a delete-and-insert).
fn loads_every_column(
    conn: &Connection,
    schema: &str,
    plan: &ApplyPlan,
) -> Result<bool, WarehouseError> {
    let columns: i64 = conn
        .query_row(
            "SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database()
             AND schema_name = ? AND lower(table_name) = lower(?)",
            duckdb::params![schema, plan.target_table()],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    Ok(columns as usize == plan.load.len())
}

fn apply_in_transaction(
    conn: &Connection,
    schema: &str,
    plan: &ApplyPlan,
    parts: &[(ApplyPlan, merge::StagedRows)],
) -> Result<ApplyStats, WarehouseError> {
    let target = qualified(schema, plan.target_table());
    let mut stats = ApplyStats::default();

    if let Some(fence) = &plan.fence {
        let fence_table = qualified(schema, FENCE_TABLE);
        conn.execute(
            &format!("INSERT INTO {fence_table} (table_name, token, holder) SELECT ?, 0, '' WHERE NOT EXISTS (SELECT 1 FROM {fence_table} WHERE table_name = ?)"),
            duckdb::params![plan.table, plan.table],
        )
        .map_err(sql_err)?;
        let updated = conn
            .execute(
                &format!("UPDATE {fence_table} SET token = ?, holder = ? WHERE table_name = ? AND token <= ?"),
                duckdb::params![fence.token as i64, fence.holder, plan.table, fence.token as i64],
            )
            .map_err(sql_err)?;
        stats.statements += 2;
        if updated != 1 {
            return Err(WarehouseError::Fenced(format!(
                "a newer lease holder has committed `{}`; lease token {} is stale",
                plan.table, fence.token
            )));
        }
    }
    for ddl in &plan.ddl {
        conn.execute_batch(&ddl_sql(schema, plan.target_table(), ddl))
            .map_err(sql_err)?;
        stats.statements += 1;
    }
    if let Some(guard) = &plan.guard {
        check_delete_guard(conn, &target, plan, parts, guard)?;
        stats.statements += 2;
    }
    for (part, rows) in parts {
        load_part(conn, schema, &target, part, rows, &mut stats)?;
    }
    conn.execute_batch(&ledger_insert(schema, plan))
        .map_err(sql_err)?;
    stats.statements += 1;
    Ok(stats)
}

/// The destructive-change guard, before anything is written: the segment's delete rows
/// against the rows of the table (only a keyed segment deletes).
fn check_delete_guard(
    conn: &Connection,
    target: &str,
    plan: &ApplyPlan,
    parts: &[(ApplyPlan, merge::StagedRows)],
    guard: &DeleteGuard,
) -> Result<(), WarehouseError> {
    if !matches!(plan.mode, LoadMode::Merge { .. }) {
        return Ok(());
    }
    let mut deletes = 0u64;
    for (part, rows) in parts {
        if let Some(q) = merge::delete_rows_query(part, rows) {
            deletes += conn
                .query_row(&q, [], |r| r.get::<_, i64>(0))
                .map_err(sql_err)? as u64;
        }
    }
    let rows = conn
        .query_row(&format!("SELECT count(*) FROM {target}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sql_err)? as u64;
    if guard.holds(deletes, rows) {
        return Err(WarehouseError::Guarded { deletes, rows });
    }
    Ok(())
}

/// Loads one part of a segment (its files and how they are read) into the target.
fn load_part(
    conn: &Connection,
    schema: &str,
    target: &str,
    plan: &ApplyPlan,
    rows: &merge::StagedRows,
    stats: &mut ApplyStats,
) -> Result<(), WarehouseError> {
    let d = Dialect::Duckdb;
    match &plan.mode {
        LoadMode::Merge { .. } => merge_segment(conn, schema, target, plan, rows, stats)?,
        LoadMode::Append => {
            let sql = merge::append_statement(d, target, plan, rows);
            stats.rows_appended += conn.execute(&sql, []).map_err(sql_err)? as u64;
            if let Some(q) = merge::delete_rows_query(plan, rows) {
                stats.deletes_ignored += conn
                    .query_row(&q, [], |r| r.get::<_, i64>(0))
                    .map_err(sql_err)? as u64;
                stats.statements += 1;
            }
        }
    }
    stats.statements += 1;
    if let Some((names, q)) = merge::cast_failures_query(d, plan, rows) {
        let counts: Vec<i64> = conn
            .query_row(&q, [], |r| (0..names.len()).map(|i| r.get(i)).collect())
            .map_err(sql_err)?;
        stats.statements += 1;
        for (column, n) in names.into_iter().zip(counts).filter(|(_, n)| *n > 0) {
            match stats.cast_failures.iter_mut().find(|(c, _)| *c == column) {
                Some((_, total)) => *total += n as u64,
                None => stats.cast_failures.push((column, n as u64)),
            }
        }
    }
    Ok(())
}

/// How a segment's files are read, in parts applied one after the other: the leading
/// full-load files apart from the change files that follow them, so that the full load can
/// take the fast path (the lane keeps both in one segment when only the operation column
/// differs). Only without an ordering column: then the change files' MERGE over the loaded
/// rows is exactly the MERGE of all of them (file order decides); with one, a change whose
/// ordering value is NULL would rank differently, so the segment stays whole.
fn parts(
    plan: &ApplyPlan,
    files: &[StagedFile],
    paths: &[String],
) -> Vec<(ApplyPlan, merge::StagedRows)> {
    let loads = files.iter().take_while(|f| f.file.full_load).count();
    let split = matches!(plan.mode, LoadMode::Merge { .. })
        && plan.ordering_column.is_none()
        && loads > 0
        && loads < files.len();
    let bounds = if split {
        vec![(0, loads), (loads, files.len())]
    } else {
        vec![(0, files.len())]
    };
    bounds
        .into_iter()
        .map(|(start, end)| start..end)
        .map(|range| {
            let part = &files[range.clone()];
            let has_op = |f: &StagedFile| f.schema.op.is_some();
            // By name where files differ in the operation column, which full-load
            // files may lack (the lane splits segments where other columns change).
            let union_by_name = part.iter().any(|f| has_op(f) != has_op(&part[0]));
            let part_plan = ApplyPlan {
                files: part.iter().map(|f| f.file.clone()).collect(),
                op_column: plan.op_column.clone().filter(|_| part.iter().any(has_op)),
                ..plan.clone()
            };
            let rows = merge::duckdb_read_parquet_files(&paths[range], union_by_name);
            (part_plan, rows)
        })
        .collect()
}

/// The ledger rows of a segment, one statement whatever the file count (a statement per
/// file cost more than the MERGE of a small file). `applied_at` is the time of this insert,
/// the transaction's last statement, rather than DuckDB's `current_timestamp` (the
/// transaction's start): it says when the files' changes became visible, within the commit.
fn ledger_insert(schema: &str, plan: &ApplyPlan) -> String {
    let applied_at =
        literal(&chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    let rows: Vec<String> = plan
        .files
        .iter()
        .map(|f| {
            format!(
                "({}, {}, {}, {}, {}, {}, CAST({applied_at} AS TIMESTAMPTZ))",
                literal(&plan.table),
                literal(&f.key),
                literal(&f.etag),
                f.size,
                literal(&plan.batch_id),
                literal(&f.order_key)
            )
        })
        .collect();
    format!(
        "INSERT INTO {} (table_name, s3_key, etag, size_bytes, batch_id, order_key, applied_at) VALUES {}",
        DuckdbWarehouse::ledger(schema),
        rows.join(", ")
    )
}

#[async_trait]
impl Warehouse for Duckdb {
    fn name(&self) -> &'static str {
        "duckdb"
    }

    fn max_identifier_len(&self) -> usize {
        // DuckDB has no limit; keep names portable to Firebolt.
        255
    }

    fn column_name(&self, source: &str) -> String {
        source.to_string()
    }

    async fn prepare(&self) -> Result<(), WarehouseError> {
        self.0
            .with_conn(|conn, schema| {
                conn.execute_batch(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {s};
                     CREATE TABLE IF NOT EXISTS {ledger} (
                         table_name VARCHAR NOT NULL,
                         s3_key VARCHAR NOT NULL,
                         etag VARCHAR,
                         size_bytes BIGINT,
                         batch_id VARCHAR,
                         order_key VARCHAR,
                         status VARCHAR DEFAULT 'applied',
                         detail VARCHAR,
                         applied_at TIMESTAMPTZ DEFAULT current_timestamp);
                     -- Ledgers written before statuses existed hold applied files only.
                     ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS status VARCHAR DEFAULT 'applied';
                     ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS detail VARCHAR;
                     CREATE TABLE IF NOT EXISTS {fence} (
                         table_name VARCHAR NOT NULL,
                         token BIGINT NOT NULL,
                         holder VARCHAR);",
                    s = ident(schema),
                    ledger = DuckdbWarehouse::ledger(schema),
                    fence = qualified(schema, FENCE_TABLE),
                ))
                .map_err(sql_err)
            })
            .await
    }

    async fn describe(&self, table: &str) -> Result<Option<TargetTable>, WarehouseError> {
        let table = table.to_string();
        self.0
            .with_conn(move |conn, schema| {
                let mut stmt = conn
                    .prepare(
                        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns
                         WHERE table_schema = ? AND lower(table_name) = lower(?) ORDER BY ordinal_position",
                    )
                    .map_err(sql_err)?;
                let rows = stmt
                    .query_map(duckdb::params![schema, table], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    })
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                let Some((name, ..)) = rows.first().cloned() else {
                    return Ok(None);
                };
                let columns = rows
                    .into_iter()
                    .map(|(_, c, t, n)| crate::schema::types::Column {
                        name: c,
                        ty: Dialect::Duckdb.parse_type(&t),
                        nullable: n == "YES",
                    })
                    .collect();
                let mut pk_stmt = conn
                    .prepare(
                        "SELECT unnest(constraint_column_names) FROM duckdb_constraints()
                         WHERE schema_name = ? AND lower(table_name) = lower(?) AND constraint_type = 'PRIMARY KEY'",
                    )
                    .map_err(sql_err)?;
                let primary_key = pk_stmt
                    .query_map(duckdb::params![schema, name], |r| r.get::<_, String>(0))
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                Ok(Some(TargetTable {
                    name,
                    columns,
                    primary_key,
                    dialect: Dialect::Duckdb,
                }))
            })
            .await
    }

    async fn applied(
        &self,
        table: &str,
        keys: &[String],
    ) -> Result<HashMap<String, LedgerRecord>, WarehouseError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let table = table.to_string();
        let keys = keys.to_vec();
        self.0
            .with_conn(move |conn, schema| {
                let mut found = HashMap::new();
                for chunk in keys.chunks(500) {
                    let placeholders = vec!["?"; chunk.len()].join(", ");
                    // The newest entry per key: a fixed re-upload follows its rejection.
                    let sql = format!(
                        "SELECT s3_key, arg_max(etag, applied_at), arg_max(status, applied_at), arg_max(order_key, applied_at) FROM {}
                         WHERE table_name = ? AND s3_key IN ({placeholders}) GROUP BY s3_key",
                        DuckdbWarehouse::ledger(schema)
                    );
                    let mut stmt = conn.prepare(&sql).map_err(sql_err)?;
                    let params = std::iter::once(table.as_str()).chain(chunk.iter().map(String::as_str));
                    let rows = stmt
                        .query_map(params_from_iter(params), |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, Option<String>>(1)?,
                                r.get::<_, Option<String>>(2)?,
                                r.get::<_, Option<String>>(3)?,
                            ))
                        })
                        .map_err(sql_err)?;
                    for row in rows {
                        let (k, etag, status, order_key) = row.map_err(sql_err)?;
                        found.insert(
                            k,
                            LedgerRecord {
                                etag: etag.unwrap_or_default(),
                                status: LedgerStatus::parse(status.as_deref()),
                                order_key: order_key.unwrap_or_default(),
                            },
                        );
                    }
                }
                Ok(found)
            })
            .await
    }

    async fn record_status(
        &self,
        table: &str,
        files: &[BatchFile],
        status: LedgerStatus,
        reason: &str,
    ) -> Result<(), WarehouseError> {
        let (table, files, reason) = (table.to_string(), files.to_vec(), reason.to_string());
        self.0
            .with_conn(move |conn, schema| {
                let mut insert = conn
                    .prepare(&format!(
                        "INSERT INTO {} (table_name, s3_key, etag, size_bytes, order_key, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        DuckdbWarehouse::ledger(schema)
                    ))
                    .map_err(sql_err)?;
                for f in &files {
                    insert
                        .execute(duckdb::params![
                            table,
                            f.key,
                            f.etag,
                            f.size as i64,
                            f.order_key,
                            status.as_str(),
                            reason
                        ])
                        .map_err(sql_err)?;
                }
                Ok(())
            })
            .await
    }

    async fn last_applied(&self, table: &str) -> Result<Option<(String, String)>, WarehouseError> {
        let table = table.to_string();
        self.0
            .with_conn(move |conn, schema| {
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT order_key, s3_key FROM {} WHERE table_name = ? AND status = 'applied' ORDER BY order_key DESC LIMIT 1",
                        DuckdbWarehouse::ledger(schema)
                    ))
                    .map_err(sql_err)?;
                let mut rows = stmt
                    .query_map(duckdb::params![table], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(sql_err)?;
                rows.next().transpose().map_err(sql_err)
            })
            .await
    }

    async fn stage(&self, batch_id: &str, files: Vec<BatchFile>) -> Staged {
        let dir = match &self.0.download_dir {
            Some(dir) => std::fs::create_dir_all(dir)
                .and_then(|_| tempfile::Builder::new().prefix(batch_id).tempdir_in(dir)),
            None => tempfile::Builder::new().prefix(batch_id).tempdir(),
        };
        let dir = match dir {
            Ok(dir) => dir,
            Err(e) => {
                let reason = format!("cannot create a download directory: {e}");
                return Staged {
                    files: files
                        .into_iter()
                        .map(|_| Err(StageError::Transient(reason.clone())))
                        .collect(),
                    workspace: None,
                };
            }
        };
        let root = dir.path().to_path_buf();
        let op_column = self.0.op_column.clone();
        let store = self.0.store.clone();
        let results = futures::stream::iter(files.into_iter().enumerate())
            .map(|(i, file)| {
                let path = root.join(format!("{i:06}.parquet"));
                let store = store.clone();
                let op_column = op_column.clone();
                async move { download_one(&store, file, path, &op_column).await }
            })
            .buffered(DOWNLOAD_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        Staged {
            files: results,
            workspace: Some(dir),
        }
    }

    async fn apply(
        &self,
        plan: &ApplyPlan,
        files: &[StagedFile],
    ) -> Result<ApplyStats, WarehouseError> {
        check_stage_names(plan)?;
        let paths: Vec<String> = files
            .iter()
            .map(|f| {
                f.local_path
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned())
                    .ok_or_else(|| WarehouseError::Other("DuckDB needs downloaded files".into()))
            })
            .collect::<Result<_, _>>()?;
        let rows_staged: u64 = files.iter().map(|f| f.schema.rows).sum();
        let parts = parts(plan, files, &paths);
        let plan = plan.clone();
        let mut stats = self
            .0
            .with_conn(move |conn, schema| {
                in_transaction(conn, |conn| {
                    apply_in_transaction(conn, schema, &plan, &parts)
                })
            })
            .await?;
        stats.rows_staged = rows_staged;
        stats.statements += 2;
        Ok(stats)
    }

    async fn row_count(&self, table: &str) -> Result<u64, WarehouseError> {
        let Some(found) = self.describe(table).await? else {
            return Ok(0);
        };
        self.0
            .with_conn(move |conn, schema| {
                conn.query_row(
                    &format!("SELECT count(*) FROM {}", qualified(schema, &found.name)),
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n as u64)
                .map_err(sql_err)
            })
            .await
    }

    async fn repeated_keys(&self, table: &str, key: &[String]) -> Result<u64, WarehouseError> {
        let Some(found) = self.describe(table).await? else {
            return Ok(0);
        };
        let key = key.to_vec();
        self.0
            .with_conn(move |conn, schema| {
                let sql = super::sql::repeated_keys_query(&qualified(schema, &found.name), &key);
                conn.query_row(&sql, [], |r| r.get::<_, i64>(0))
                    .map(|n| n as u64)
                    .map_err(sql_err)
            })
            .await
    }

    async fn ledger_entries(
        &self,
        table: &str,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, WarehouseError> {
        let table = table.to_string();
        self.0
            .with_conn(move |conn, schema| {
                let sql = format!(
                    "SELECT s3_key, etag, size_bytes, batch_id, CAST(applied_at AS VARCHAR), status, detail
                     FROM {} WHERE table_name = ? ORDER BY applied_at DESC LIMIT {limit}",
                    DuckdbWarehouse::ledger(schema)
                );
                let mut stmt = conn.prepare(&sql).map_err(sql_err)?;
                let rows = stmt
                    .query_map([&table], |r| {
                        Ok(LedgerEntry {
                            table: table.clone(),
                            key: r.get(0)?,
                            etag: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                            size: r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                            batch_id: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                            applied_at: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                            status: r
                                .get::<_, Option<String>>(5)?
                                .unwrap_or_else(|| "applied".into()),
                            detail: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        })
                    })
                    .map_err(sql_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
            })
            .await
    }

    async fn ledger_summary(&self) -> Result<Vec<LedgerEntry>, WarehouseError> {
        self.0
            .with_conn(|conn, schema| {
                let sql = format!(
                    "SELECT table_name, arg_max(s3_key, applied_at), arg_max(etag, applied_at), arg_max(size_bytes, applied_at),
                            arg_max(batch_id, applied_at), CAST(max(applied_at) AS VARCHAR)
                     FROM {} WHERE status = 'applied' GROUP BY table_name ORDER BY table_name",
                    DuckdbWarehouse::ledger(schema)
                );
                let mut stmt = conn.prepare(&sql).map_err(sql_err)?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok(LedgerEntry {
                            table: r.get(0)?,
                            key: r.get(1)?,
                            etag: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                            size: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                            batch_id: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                            applied_at: r.get(5)?,
                            status: "applied".into(),
                            detail: String::new(),
                        })
                    })
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                Ok(rows)
            })
            .await
    }

    async fn promote(&self, table: &str, next: &str) -> Result<(), WarehouseError> {
        let (table, next) = (table.to_string(), next.to_string());
        self.0
            .with_conn(move |conn, schema| {
                in_transaction(conn, |conn| {
                    promote_in_transaction(conn, schema, &table, &next)
                })
            })
            .await
    }

    async fn merge_generation(
        &self,
        table: &str,
        next: &str,
        reload: &HistoryReload,
    ) -> Result<(), WarehouseError> {
        let (table, next, reload) = (table.to_string(), next.to_string(), reload.clone());
        self.0
            .with_conn(move |conn, schema| {
                let mut statements: Vec<String> = reload
                    .add_columns
                    .iter()
                    .map(|c| ddl_sql(schema, &table, &Ddl::AddColumn { column: c.clone() }))
                    .collect();
                let (live, generation) = (qualified(schema, &table), qualified(schema, &next));
                statements.push(history::reload_statement(&live, &generation, &reload));
                statements.push(format!("DROP TABLE {generation}"));
                in_transaction(conn, |conn| {
                    statements
                        .iter()
                        .try_for_each(|sql| conn.execute_batch(sql).map_err(sql_err))
                })
            })
            .await
    }

    async fn discard(&self, next: &str) -> Result<(), WarehouseError> {
        let next = next.to_string();
        self.0
            .with_conn(move |conn, schema| {
                conn.execute_batch(&format!(
                    "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}",
                    qualified(schema, &next),
                    qualified(schema, &merge::tombstone_table(&next))
                ))
                .map_err(sql_err)
            })
            .await
    }

    async fn ping(&self, _timeout: Duration) -> Result<(), WarehouseError> {
        self.0
            .with_conn(|conn, _| {
                conn.query_row("SELECT 1", [], |r| r.get::<_, i32>(0))
                    .map(|_| ())
                    .map_err(sql_err)
            })
            .await
    }
}

/// The swap of a reload: DROP the live table, RENAME the next generation to its name, and
/// the same for their deleted-keys tables. DuckDB runs DDL inside the transaction, so a
/// crash anywhere leaves the old table or the new one.
fn promote_in_transaction(
    conn: &Connection,
    schema: &str,
    table: &str,
    next: &str,
) -> Result<(), WarehouseError> {
    let exists = |name: &str| -> Result<bool, WarehouseError> {
        conn.query_row(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database()
             AND schema_name = ? AND table_name = ?",
            duckdb::params![schema, name],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(sql_err)
    };
    if !exists(next)? {
        return Err(WarehouseError::Sql(format!(
            "cannot replace `{table}` by `{next}`: `{next}` does not exist"
        )));
    }
    let rename = |from: &str, to: &str| {
        format!(
            "DROP TABLE IF EXISTS {}; ALTER TABLE {} RENAME TO {}",
            qualified(schema, to),
            qualified(schema, from),
            ident(to)
        )
    };
    conn.execute_batch(&rename(next, table)).map_err(sql_err)?;
    let (tombstones, next_tombstones) =
        (merge::tombstone_table(table), merge::tombstone_table(next));
    if exists(&next_tombstones)? {
        conn.execute_batch(&rename(&next_tombstones, &tombstones))
            .map_err(sql_err)?;
    } else {
        conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {}",
            qualified(schema, &tombstones)
        ))
        .map_err(sql_err)?;
    }
    Ok(())
}

/// Objects up to this size are read into memory and written out with their footer read
/// in one blocking task; larger ones stream to disk (memory stays bounded by this times
/// the downloads in flight).
const IN_MEMORY_DOWNLOAD: u64 = 1 << 20;

async fn download_one(
    store: &ObjectStore,
    mut file: BatchFile,
    path: PathBuf,
    op_column: &str,
) -> Result<StagedFile, StageError> {
    let op = op_column.to_string();
    let schema = if file.size > 0 && file.size <= IN_MEMORY_DOWNLOAD {
        // One GET; the body is written and its footer decoded in one blocking task.
        let object = match store.get(&file.bucket, &file.key).await {
            Ok(Some(object)) => object,
            Ok(None) => return Err(StageError::Missing),
            Err(e) => return Err(StageError::Transient(e.to_string())),
        };
        if !object.etag.is_empty() {
            file.etag = bare_etag(&object.etag).to_string();
        }
        let write_path = path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::write(&write_path, &object.body).map_err(|e| {
                StageError::Transient(format!("writing {}: {e}", write_path.display()))
            })?;
            match parquet::decode_tail(&object.body, object.body.len() as u64, &op) {
                Ok(parquet::Tail::Decoded(schema)) => Ok(schema),
                Ok(parquet::Tail::NeedBytes(n)) => {
                    Err(StageError::Poison(parquet::ParquetError::Corrupt(format!(
                        "footer claims {n} bytes in an object of {}",
                        object.body.len()
                    ))))
                }
                Err(e) => Err(StageError::Poison(e)),
            }
        })
        .await
        .map_err(|e| StageError::Transient(format!("footer task failed: {e}")))?
    } else {
        match store.download(&file.bucket, &file.key, &path).await {
            // The object's own ETag is what the ledger records.
            Ok((_, etag)) if !etag.is_empty() => file.etag = bare_etag(&etag).to_string(),
            Ok(_) => {}
            Err(StorageError::NotFound { .. }) => return Err(StageError::Missing),
            Err(e) => return Err(StageError::Transient(e.to_string())),
        }
        let read_path = path.clone();
        tokio::task::spawn_blocking(move || parquet::read_local(&read_path, &op))
            .await
            .map_err(|e| StageError::Transient(format!("footer task failed: {e}")))?
            .map_err(StageError::Poison)
    }?;
    Ok(StagedFile {
        file,
        schema,
        local_path: Some(path),
    })
}

/// For tests and tools: a direct query on the database file.
pub fn open_read_only(path: &Path) -> duckdb::Result<Connection> {
    let config = duckdb::Config::default().access_mode(duckdb::AccessMode::ReadOnly)?;
    Connection::open_with_flags(path, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{KeyColumn, LoadColumn, LoadExpr};
    use crate::schema::types::{Column, ColumnType};
    fn offline_store() -> ObjectStore {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .build();
        ObjectStore::new(aws_sdk_s3::Client::from_conf(conf))
    }
    #[tokio::test]
    async fn a_ledger_from_before_statuses_keeps_its_files_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.duckdb");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE _cdc_worker_ledger (table_name VARCHAR NOT NULL, s3_key VARCHAR NOT NULL,
                     etag VARCHAR, size_bytes BIGINT, batch_id VARCHAR, order_key VARCHAR,
                     applied_at TIMESTAMPTZ DEFAULT current_timestamp);
                 INSERT INTO _cdc_worker_ledger (table_name, s3_key, etag, size_bytes, batch_id, order_key)
                     VALUES ('orders', 'dms/public/orders/a.parquet', 'e1', 10, 'b1', '1|a.parquet');",
            )
            .unwrap();
        }
        let config = DuckdbConfig {
            path,
            ..DuckdbConfig::default()
        };
        let wh = Duckdb::open(&config, "Op", offline_store()).unwrap();
        wh.prepare().await.unwrap();
        let key = "dms/public/orders/a.parquet".to_string();
        let found = wh
            .applied("orders", std::slice::from_ref(&key))
            .await
            .unwrap();
        assert_eq!(found[&key].etag, "e1");
        assert!(!found[&key].rejected(), "old entries are applied files");
        assert_eq!(
            wh.last_applied("orders").await.unwrap(),
            Some(("1|a.parquet".to_string(), key))
        );
    }
    /// Audit B1's fate on DuckDB: staged rows whose key has a NULL are skipped (never
    /// merged, never matched) and counted in `ApplyStats::null_key_rows`.
    /// Long on purpose: one scenario (create, NULL-key batch, rows and counters) read at once.
    #[tokio::test]
    async fn rows_with_a_null_key_are_skipped_and_counted() {
        use crate::batch::{KeyColumn, LoadColumn, LoadExpr, LoadMode};
        use crate::schema::types::{Column, ColumnType, FileSchema, TableSchema};
        use duckdb::types::Value;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.parquet");
        let cols: Vec<(String, String)> = [("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")]
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        let text = |s: &str| Value::Text(s.into());
        crate::devkit::parquet::write_parquet(
            &path,
            &cols,
            &[
                vec![text("I"), Value::BigInt(1), text("one")],
                vec![text("I"), Value::Null, text("no key")],
                vec![text("U"), Value::Null, text("no key either")],
                vec![text("I"), Value::BigInt(2), text("two")],
            ],
        )
        .unwrap();
        let config = DuckdbConfig {
            path: dir.path().join("w.duckdb"),
            ..DuckdbConfig::default()
        };
        let wh = Duckdb::open(&config, "Op", offline_store()).unwrap();
        wh.prepare().await.unwrap();
        let columns = vec![
            Column::new("id", ColumnType::Int64),
            Column::new("v", ColumnType::String),
        ];
        let file = BatchFile {
            bucket: "b".into(),
            key: "dms/t/1.parquet".into(),
            size: 1,
            etag: "e".into(),
            order_key: "1".into(),
            full_load: false,
        };
        let plan = ApplyPlan {
            into: None,
            guard: None,
            history: None,
            batch_id: "b1".into(),
            table: "t".into(),
            ddl: vec![Ddl::CreateTable {
                columns: columns.clone(),
                primary_key: vec!["id".into()],
            }],
            load: columns
                .iter()
                .map(|c| LoadColumn {
                    target: c.name.clone(),
                    expr: LoadExpr::Column(c.name.clone()),
                })
                .collect(),
            mode: LoadMode::Merge {
                key: vec![KeyColumn {
                    target: "id".into(),
                    source: "id".into(),
                }],
            },
            op_column: Some("Op".into()),
            ordering_column: None,
            staged_columns: columns.clone(),
            files: vec![file.clone()],
            fence: None,
        };
        let staged = StagedFile {
            file,
            schema: FileSchema {
                table: TableSchema::new(columns),
                op: Some("Op".into()),
                rows: 4,
                timestamp_max: vec![],
            },
            local_path: Some(path),
        };
        let stats = wh.apply(&plan, &[staged]).await.unwrap();
        assert_eq!(stats.null_key_rows, 2);
        assert_eq!(stats.rows_merged, 2);
        let conn = open_read_only(&config.path).unwrap();
        let rows: Vec<(i64, String)> = conn
            .prepare("SELECT id, v FROM main.t ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows, vec![(1, "one".into()), (2, "two".into())]);
    }

    /// Writes a Parquet file of `(id, v)` rows, with DMS's `Op` column first when given.
    fn parquet(dir: &Path, name: &str, rows: &[(Option<&str>, Option<i64>, &str)]) -> PathBuf {
        let path = dir.join(name);
        let with_op = rows.iter().any(|(op, ..)| op.is_some());
        let values: Vec<String> = rows
            .iter()
            .map(|(op, id, v)| {
                let id = id.map_or("NULL".to_string(), |i| i.to_string());
                let op = op.map(|o| format!("{}, ", literal(o))).unwrap_or_default();
                format!("({op}{id}, {})", literal(v))
            })
            .collect();
        let cols = if with_op { "\"Op\", id, v" } else { "id, v" };
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&format!(
            "COPY (SELECT * FROM (VALUES {}) AS t({cols})) TO {} (FORMAT PARQUET)",
            values.join(", "),
            literal(&path.to_string_lossy())
        ))
        .unwrap();
        path
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("id", ColumnType::Int64),
            Column::new("v", ColumnType::String),
        ]
    }

    /// One segment of `files` (name, full load?) as the lane would stage and plan it.
    fn segment(
        dir: &Path,
        batch: &str,
        files: &[(&str, bool)],
        create: bool,
    ) -> (ApplyPlan, Vec<StagedFile>) {
        let staged: Vec<StagedFile> = files
            .iter()
            .map(|(name, full_load)| {
                let path = dir.join(name);
                let schema = parquet::read_local(&path, "Op").unwrap();
                StagedFile {
                    file: BatchFile {
                        bucket: "b".into(),
                        key: format!("dms/public/t/{name}"),
                        size: 1,
                        etag: "e".into(),
                        order_key: name.to_string(),
                        full_load: *full_load,
                    },
                    schema,
                    local_path: Some(path),
                }
            })
            .collect();
        let plan = ApplyPlan {
            into: None,
            guard: None,
            history: None,
            batch_id: batch.into(),
            table: "t".into(),
            ddl: if create {
                vec![Ddl::CreateTable {
                    columns: columns(),
                    primary_key: vec![],
                }]
            } else {
                vec![]
            },
            load: ["id", "v"]
                .iter()
                .map(|c| LoadColumn {
                    target: c.to_string(),
                    expr: LoadExpr::Column(c.to_string()),
                })
                .collect(),
            mode: LoadMode::Merge {
                key: vec![KeyColumn {
                    target: "id".into(),
                    source: "id".into(),
                }],
            },
            op_column: staged
                .iter()
                .any(|s| s.schema.op.is_some())
                .then(|| "Op".into()),
            ordering_column: None,
            staged_columns: columns(),
            files: staged.iter().map(|s| s.file.clone()).collect(),
            fence: None,
        };
        (plan, staged)
    }

    fn rows(wh: &Duckdb) -> Vec<(Option<i64>, String)> {
        let conn = wh.0.checkout().unwrap();
        let mut stmt = conn
            .prepare("SELECT id, v FROM t ORDER BY id NULLS FIRST, v")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn open(dir: &Path, name: &str) -> Duckdb {
        let config = DuckdbConfig {
            path: dir.join(name),
            ..DuckdbConfig::default()
        };
        Duckdb::open(&config, "Op", offline_store()).unwrap()
    }

    /// Applies the segments twice, once as DMS names them (full-load files marked) and once
    /// with every file treated as a change file into a table that forces the MERGE;
    /// returns both databases' rows and which segments took the fast path.
    async fn both_paths(
        dir: &Path,
        segments: &[&[(&str, bool)]],
    ) -> (
        Vec<(Option<i64>, String)>,
        Vec<(Option<i64>, String)>,
        Vec<bool>,
    ) {
        let (fast, merged) = (open(dir, "fast.duckdb"), open(dir, "merge.duckdb"));
        fast.prepare().await.unwrap();
        merged.prepare().await.unwrap();
        // A column no plan loads keeps the MERGE on this side (delete-and-insert would
        // lose its values): the fast path and the delete-and-insert are compared with it.
        merged
            .0
            .checkout()
            .unwrap()
            .execute_batch("CREATE TABLE t (id BIGINT, v VARCHAR, kept INTEGER)")
            .unwrap();
        let mut took_fast_path = Vec::new();
        for (n, files) in segments.iter().enumerate() {
            let batch = format!("b{n}");
            let (plan, staged) = segment(dir, &batch, files, n == 0);
            took_fast_path.push(fast.apply(&plan, &staged).await.unwrap().fast_load);
            let as_changes: Vec<(&str, bool)> = files.iter().map(|(f, _)| (*f, false)).collect();
            let (plan, staged) = segment(dir, &batch, &as_changes, n == 0);
            let stats = merged.apply(&plan, &staged).await.unwrap();
            assert!(!stats.fast_load, "change files always merge");
        }
        (rows(&fast), rows(&merged), took_fast_path)
    }

    #[tokio::test]
    async fn the_full_load_fast_path_gives_the_merge_paths_rows() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        parquet(
            d,
            "LOAD00000001.parquet",
            &[(None, Some(1), "a"), (None, Some(2), "b")],
        );
        parquet(d, "LOAD00000002.parquet", &[(None, Some(3), "c")]);
        // A later batch of the same full load: new keys, the target no longer empty.
        parquet(
            d,
            "LOAD00000003.parquet",
            &[(None, Some(4), "d"), (None, Some(5), "e")],
        );
        let cdc = [
            (Some("U"), Some(1), "a2"),
            (Some("D"), Some(2), ""),
            (Some("I"), Some(6), "f"),
        ];
        parquet(d, "20261124-101500000.parquet", &cdc);
        let (fast, merged, took) = both_paths(
            d,
            &[
                &[
                    ("LOAD00000001.parquet", true),
                    ("LOAD00000002.parquet", true),
                ],
                &[("LOAD00000003.parquet", true)],
                &[("20261124-101500000.parquet", false)],
            ],
        )
        .await;
        assert_eq!(fast, merged);
        assert_eq!(
            fast,
            [(1, "a2"), (3, "c"), (4, "d"), (5, "e"), (6, "f")]
                .map(|(i, v)| (Some(i), v.to_string()))
        );
        assert_eq!(took, [true, true, false]);
    }

    /// Full-load files and the change files after them in one segment (they differ only in
    /// the operation column): the load takes the fast path, the changes merge over it.
    #[tokio::test]
    async fn a_segment_of_a_full_load_and_its_changes_loads_fast_then_merges() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        parquet(
            d,
            "LOAD00000001.parquet",
            &[(None, Some(1), "a"), (None, Some(2), "b")],
        );
        let cdc = [
            (Some("U"), Some(1), "a2"),
            (Some("D"), Some(2), ""),
            (Some("I"), Some(3), "c"),
        ];
        parquet(d, "20261124-101500000.parquet", &cdc);
        let (fast, merged, took) = both_paths(
            d,
            &[&[
                ("LOAD00000001.parquet", true),
                ("20261124-101500000.parquet", false),
            ]],
        )
        .await;
        assert_eq!(fast, merged);
        assert_eq!(
            fast,
            [(1, "a2"), (3, "c")].map(|(i, v)| (Some(i), v.to_string()))
        );
        assert_eq!(took, [true]);
    }

    #[tokio::test]
    async fn a_full_load_with_a_repeated_null_or_present_key_falls_back_to_the_merge() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Key 2 twice in one file (the later row wins), key 3 in two files of a segment.
        parquet(
            d,
            "LOAD00000001.parquet",
            &[
                (None, Some(1), "a"),
                (None, Some(2), "old"),
                (None, Some(2), "new"),
            ],
        );
        parquet(d, "LOAD00000002.parquet", &[(None, Some(3), "c")]);
        parquet(
            d,
            "LOAD00000003.parquet",
            &[(None, Some(3), "c2"), (None, Some(4), "d")],
        );
        // A NULL key; then a key the target already holds.
        parquet(
            d,
            "LOAD00000004.parquet",
            &[(None, None, "n"), (None, Some(5), "e")],
        );
        parquet(
            d,
            "LOAD00000005.parquet",
            &[(None, Some(1), "a2"), (None, Some(6), "f")],
        );
        parquet(d, "LOAD00000006.parquet", &[(None, Some(7), "g")]);
        let (fast, merged, took) = both_paths(
            d,
            &[
                &[("LOAD00000001.parquet", true)],
                &[
                    ("LOAD00000002.parquet", true),
                    ("LOAD00000003.parquet", true),
                ],
                &[("LOAD00000004.parquet", true)],
                &[("LOAD00000005.parquet", true)],
                &[("LOAD00000006.parquet", true)],
            ],
        )
        .await;
        assert_eq!(fast, merged);
        assert!(fast.contains(&(Some(2), "new".to_string())), "{fast:?}");
        assert!(fast.contains(&(Some(3), "c2".to_string())), "{fast:?}");
        assert!(fast.contains(&(Some(1), "a2".to_string())), "{fast:?}");
        assert_eq!(took, [false, false, false, false, true]);
    }

    #[tokio::test]
    async fn a_column_no_plan_loads_keeps_its_values_through_updates() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        parquet(
            d,
            "LOAD00000001.parquet",
            &[(None, Some(1), "a"), (None, Some(2), "b")],
        );
        parquet(
            d,
            "20261124-101500000.parquet",
            &[(Some("U"), Some(1), "a2"), (Some("D"), Some(2), "")],
        );
        let wh = open(d, "kept.duckdb");
        wh.prepare().await.unwrap();
        let (plan, staged) = segment(d, "b0", &[("LOAD00000001.parquet", true)], true);
        assert!(wh.apply(&plan, &staged).await.unwrap().fast_load);
        let conn = wh.0.checkout().unwrap();
        conn.execute_batch("ALTER TABLE t ADD COLUMN kept INTEGER; UPDATE t SET kept = 7")
            .unwrap();
        let (plan, staged) = segment(d, "b1", &[("20261124-101500000.parquet", false)], false);
        wh.apply(&plan, &staged).await.unwrap();
        let kept: Vec<(i64, String, i32)> = conn
            .prepare("SELECT id, v, kept FROM t ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(kept, vec![(1, "a2".to_string(), 7)]);
    }
}
