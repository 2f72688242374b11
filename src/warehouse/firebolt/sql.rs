//! The SQL text of each Firebolt step that is not shared with DuckDB (the dedupe, MERGE
//! and append come from `warehouse::merge`): staging, COPY, the batch check, the ledger,
//! fences, DDL and the widening rebuild. Every name goes through `sql::ident` and every
//! value through `sql::literal`; numbers are formatted from Rust integers.
//!
//! Items the reference marks UNCONFIRMED are isolated here, each with a comment.

use crate::batch::{ApplyPlan, BatchFile, LoadExpr, LoadMode, STATUS_APPLIED};
use crate::config::Secret;
use crate::schema::dialect::Dialect;
use crate::schema::types::{Column, ColumnType};
use crate::warehouse::merge::StagedRows;
use crate::warehouse::sql::{ident, ident_list, literal};

/// The staging column that receives `$source_file_name`.
pub const SOURCE_FILE_COLUMN: &str = "__cdc_source_file";
/// Staging tables: `_cdc_worker_stage__<unix seconds>_<nonce>_<batch>`. The reserved
/// `_cdc_worker` prefix keeps source tables from ever routing to one.
pub const STAGE_PREFIX: &str = "_cdc_worker_stage__";
/// The full copy of a table being widened, and the marker that says the copy is complete.
pub const REBUILD_PREFIX: &str = "_cdc_worker_rebuild__";
pub const REBUILT_MARKER_PREFIX: &str = "_cdc_worker_rebuilt__";

const D: Dialect = Dialect::Firebolt;

/// A staging table name unique to one apply attempt; it starts with its creation time so
/// that `prepare()` can tell a crashed worker's leftovers from a running batch's table.
pub fn stage_table_name(batch_id: &str, created_unix: u64, nonce: u32) -> String {
    let batch: String = batch_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    format!("{STAGE_PREFIX}{created_unix}_{nonce:08x}_{batch}")
}

/// The creation time encoded in a staging table name.
pub fn stage_created_at(name: &str) -> Option<u64> {
    name.strip_prefix(STAGE_PREFIX)?
        .split('_')
        .next()?
        .parse()
        .ok()
}

pub fn rebuild_table(table: &str) -> String {
    format!("{REBUILD_PREFIX}{table}")
}

pub fn rebuilt_marker(table: &str) -> String {
    format!("{REBUILT_MARKER_PREFIX}{table}")
}

fn column_defs(columns: &[Column], primary_index: &[String]) -> String {
    columns
        .iter()
        .map(|c| {
            // Default nullability differs between Firebolt versions: always say it. A
            // primary index column is NOT NULL whatever the column says: "Nullable columns
            // cannot be used in Firebolt primary or aggregating indexes" (CREATE TABLE
            // reference, 2024 and 2025 docs).
            let nullable = c.nullable && !primary_index.contains(&c.name);
            format!(
                "{} {} {}",
                ident(&c.name),
                D.type_name(&c.ty),
                if nullable { "NULL" } else { "NOT NULL" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `CREATE TABLE [IF NOT EXISTS] t (...) [PRIMARY INDEX ...]`; `target` already quoted.
pub fn create_table(
    target: &str,
    columns: &[Column],
    primary_index: &[String],
    if_not_exists: bool,
) -> String {
    let mut sql = format!(
        "CREATE TABLE {}{target} ({})",
        if if_not_exists { "IF NOT EXISTS " } else { "" },
        column_defs(columns, primary_index)
    );
    if !primary_index.is_empty() {
        sql.push_str(&format!(
            " PRIMARY INDEX {}",
            ident_list(primary_index.iter().map(String::as_str))
        ));
    }
    sql
}

/// One column per statement, as Firebolt requires.
pub fn add_column(target: &str, column: &Column) -> String {
    format!(
        "ALTER TABLE {target} ADD COLUMN IF NOT EXISTS {} {} NULL",
        ident(&column.name),
        D.type_name(&column.ty)
    )
}

/// The type a source column is staged as. Firebolt documents no Parquet conversion for
/// the unsigned integer annotations, so a uint32 is staged as the INTEGER and a uint64 as
/// the BIGINT Parquet physically stores them in, and [`unsigned_conversions`] corrects the
/// sign on the way to the target: right whether the reader honours the annotation or not,
/// and a reader that honours it but cannot fit a value fails the COPY loudly, never
/// silently. (uint8 and uint16 fit INTEGER either way.)
pub fn staging_type(ty: &ColumnType) -> ColumnType {
    match ty {
        ColumnType::UInt32 => ColumnType::Int32,
        ColumnType::UInt64 => ColumnType::Int64,
        other => other.clone(),
    }
}

/// The sign corrections of [`staging_type`], as (column, expression over the staging
/// table): a negative staged value is the unsigned value minus 2^32 (2^64).
pub fn unsigned_conversions(plan: &ApplyPlan) -> Vec<(String, String)> {
    plan.staged_columns
        .iter()
        .filter_map(|c| {
            let col = ident(&c.name);
            let (wide, modulus) = match c.ty {
                ColumnType::UInt32 => (D.type_name(&ColumnType::UInt32), "4294967296"),
                ColumnType::UInt64 => (D.type_name(&ColumnType::UInt64), "18446744073709551616"),
                _ => return None,
            };
            Some((
                c.name.clone(),
                format!(
                    "CASE WHEN {col} < 0 THEN CAST(CAST({col} AS {wide}) + CAST({} AS {wide}) AS {wide}) ELSE CAST({col} AS {wide}) END",
                    literal(modulus)
                ),
            ))
        })
        .collect()
}

/// Columns of the staging table: the segment's source columns, the operation column, and
/// the source file. All nullable: a full-load file may lack the operation column.
pub fn staging_columns(plan: &ApplyPlan) -> Vec<Column> {
    let mut columns: Vec<Column> = plan
        .staged_columns
        .iter()
        .map(|c| Column {
            name: c.name.clone(),
            ty: staging_type(&c.ty),
            nullable: true,
        })
        .collect();
    if let Some(op) = &plan.op_column {
        columns.push(Column::new(op.clone(), ColumnType::String));
    }
    columns.push(Column::new(SOURCE_FILE_COLUMN, ColumnType::String));
    columns
}

/// The staging table, created from the footers' schema (never inferred by COPY).
pub fn create_staging(stage: &str, plan: &ApplyPlan) -> String {
    create_table(stage, &staging_columns(plan), &[], false)
}

/// S3 credentials Firebolt uses to read the DMS bucket.
#[derive(Debug, Clone)]
pub enum S3Credentials {
    Role {
        arn: String,
        external_id: Option<String>,
    },
    Keys {
        access_key_id: String,
        secret_access_key: Secret,
        /// Temporary (STS) keys, as the default credential chain gives them.
        session_token: Option<Secret>,
    },
}

/// How COPY reaches the files.
#[derive(Debug, Clone)]
pub enum CopySource {
    /// `FROM 's3://bucket/key', ...` with optional credentials (none: the bucket is
    /// readable by the engine itself).
    Direct(Option<S3Credentials>),
    /// A `LOCATION` created beforehand whose URL is the bucket root (`s3://bucket/`):
    /// each file is addressed by `PATTERN = '<key>'`.
    Location(String),
}

impl CopySource {
    /// The secrets COPY statements carry (masked in logs and errors).
    pub fn secrets(&self) -> Vec<Secret> {
        match self {
            CopySource::Direct(Some(S3Credentials::Keys {
                secret_access_key,
                session_token,
                ..
            })) => std::iter::once(secret_access_key.clone())
                .chain(session_token.clone())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// The `CREDENTIALS = (...)` clause, and the same with secrets masked for logs:
/// `{ AWS_ACCESS_KEY_ID = '..' AWS_SECRET_ACCESS_KEY = '..' [ AWS_SESSION_TOKEN = '..' ] |
/// AWS_ROLE_ARN = '..' [ AWS_ROLE_EXTERNAL_ID = '..' ] }` (COPY FROM reference, 2025 docs;
/// the 2024 docs spelled the keys AWS_KEY_ID / AWS_SECRET_KEY).
fn credentials_clause(credentials: &S3Credentials) -> (String, String) {
    match credentials {
        S3Credentials::Role { arn, external_id } => {
            let mut c = format!("CREDENTIALS = (AWS_ROLE_ARN = {}", literal(arn));
            if let Some(id) = external_id {
                c.push_str(&format!(" AWS_ROLE_EXTERNAL_ID = {}", literal(id)));
            }
            c.push(')');
            (c.clone(), c)
        }
        S3Credentials::Keys {
            access_key_id,
            secret_access_key,
            session_token,
        } => {
            let key = literal(access_key_id);
            let mut sql = format!(
                "CREDENTIALS = (AWS_ACCESS_KEY_ID = {key} AWS_SECRET_ACCESS_KEY = {}",
                literal(secret_access_key.expose())
            );
            let mut logged =
                format!("CREDENTIALS = (AWS_ACCESS_KEY_ID = {key} AWS_SECRET_ACCESS_KEY = '****'");
            if let Some(token) = session_token {
                sql.push_str(&format!(" AWS_SESSION_TOKEN = {}", literal(token.expose())));
                logged.push_str(" AWS_SESSION_TOKEN = '****'");
            }
            sql.push(')');
            logged.push(')');
            (sql, logged)
        }
    }
}

/// The COPY column list: each loadable source column by name (COPY maps Parquet columns
/// to same-named table columns), and `$source_file_name` into [`SOURCE_FILE_COLUMN`].
/// Unsupported (nested) columns stay NULL: the plan never loads them.
fn copy_columns(plan: &ApplyPlan) -> String {
    let mut cols: Vec<String> = plan
        .staged_columns
        .iter()
        .filter(|c| !matches!(c.ty, ColumnType::Unsupported(_)))
        .map(|c| ident(&c.name))
        .collect();
    if let Some(op) = &plan.op_column {
        cols.push(ident(op));
    }
    cols.push(format!("{} $source_file_name", ident(SOURCE_FILE_COLUMN)));
    cols.join(", ")
}

/// Options shared by every COPY. AUTO_CREATE = FALSE: the staging table exists, and a
/// typo must not create another. MAX_ERRORS_PER_FILE = 0 (the documented default, said so
/// that nothing depends on it): a row that does not load fails the batch instead of
/// vanishing. CASE_SENSITIVE_COLUMN_MAPPING = TRUE: the staging columns carry the Parquet
/// names exactly, and the default (FALSE since 2024) would let two columns that differ
/// only in case land in one. ALLOW_COLUMN_MISMATCH keeps its documented default (TRUE), so
/// a full-load file without the operation column loads it as NULL.
const COPY_OPTIONS: &str = "TYPE = PARQUET AUTO_CREATE = FALSE MAX_ERRORS_PER_FILE = 0 CASE_SENSITIVE_COLUMN_MAPPING = TRUE";

/// The COPY statements of a batch, as (sql, sql for logs). Direct: one statement for all
/// files. Location: one per file (a PATTERN names one object).
pub fn copy_statements(
    stage: &str,
    plan: &ApplyPlan,
    files: &[BatchFile],
    source: &CopySource,
) -> Vec<(String, String)> {
    let columns = copy_columns(plan);
    match source {
        CopySource::Direct(credentials) => {
            let urls = files
                .iter()
                .map(|f| literal(&f.uri()))
                .collect::<Vec<_>>()
                .join(", ");
            let base = format!("COPY INTO {stage} ({columns}) FROM {urls} WITH {COPY_OPTIONS}");
            match credentials {
                None => vec![(base.clone(), base)],
                Some(c) => {
                    let (clause, masked) = credentials_clause(c);
                    vec![(format!("{base} {clause}"), format!("{base} {masked}"))]
                }
            }
        }
        CopySource::Location(location) => files
            .iter()
            .map(|f| {
                // UNCONFIRMED: PATTERN is a glob relative to the LOCATION's URL; DMS keys
                // contain no glob characters.
                let sql = format!(
                    "COPY INTO {stage} ({columns}) FROM {} WITH PATTERN = {} {COPY_OPTIONS}",
                    ident(location),
                    literal(&f.key)
                );
                (sql.clone(), sql)
            })
            .collect(),
    }
}

/// What `$source_file_name` holds for a file: the path without the bucket.
/// UNCONFIRMED whether a leading `/` is ever included; the batch check counts rows whose
/// file is not recognised and fails the batch rather than misorder it.
pub fn source_file_value(file: &BatchFile) -> String {
    file.key.clone()
}

/// The file's position in the batch (DMS order), from the staged source file name:
/// Firebolt has no row ordinal, so this and the ordering column decide which change wins.
pub fn file_ordinal(files: &[BatchFile]) -> String {
    let arms: Vec<String> = files
        .iter()
        .enumerate()
        .map(|(i, f)| format!("WHEN {} THEN {i}", literal(&source_file_value(f))))
        .collect();
    format!("CASE {} {} END", ident(SOURCE_FILE_COLUMN), arms.join(" "))
}

/// The staged rows as the shared MERGE/append statements read them.
pub fn staged_rows(stage: &str, plan: &ApplyPlan, files: &[BatchFile]) -> StagedRows {
    StagedRows {
        relation: stage.to_string(),
        file_ordinal: file_ordinal(files),
        row_ordinal: None,
        converted: unsigned_conversions(plan),
    }
}

/// Positions of the values the batch check returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLayout {
    /// Column 0: rows staged. Column 1: rows whose source file is not in the batch.
    /// Rows whose key has a NULL (skipped by the MERGE).
    pub null_keys: Option<usize>,
    /// Distinct non-NULL keys.
    pub distinct_keys: Option<usize>,
    pub ambiguous_keys: Option<usize>,
    pub deletes: Option<usize>,
    /// (target column, position) of each TRY_CAST's failure count.
    pub cast_failures: Vec<(String, usize)>,
}

fn count_if(condition: &str) -> String {
    // SUM(CASE ..) rather than count(*) FILTER (..): FILTER is not in the reference.
    format!("SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)")
}

/// One query, one round trip, before anything touches the target: how many rows COPY
/// loaded (checked against the footers), rows from unknown files, distinct keys, keys
/// changed more than once in one file with no ordering column to decide, delete rows (a
/// keyless table cannot apply them; the guard weighs a keyed table's), and values that will
/// not cast.
pub fn check_query(plan: &ApplyPlan, stage: &str, files: &[BatchFile]) -> (String, CheckLayout) {
    let mut exprs = vec![
        "count(*)".to_string(),
        count_if(&format!("{} IS NULL", file_ordinal(files))),
    ];
    let mut layout = CheckLayout {
        null_keys: None,
        distinct_keys: None,
        ambiguous_keys: None,
        deletes: None,
        cast_failures: Vec::new(),
    };
    match &plan.mode {
        LoadMode::Merge { key } => {
            let keys = ident_list(key.iter().map(|k| k.source.as_str()));
            let null_key = key
                .iter()
                .map(|k| format!("{} IS NULL", ident(&k.source)))
                .collect::<Vec<_>>()
                .join(" OR ");
            layout.null_keys = Some(exprs.len());
            exprs.push(count_if(&null_key));
            layout.distinct_keys = Some(exprs.len());
            exprs.push(format!(
                "(SELECT count(*) FROM (SELECT 1 AS one FROM {stage} WHERE NOT ({null_key}) GROUP BY {keys}) AS k)"
            ));
            // Changes of a key in one file that nothing orders: no ordering column, or the
            // same ordering value (Firebolt cannot see their row order).
            let tie = match &plan.ordering_column {
                Some(ord) => format!(", {}", ident(ord)),
                None => String::new(),
            };
            layout.ambiguous_keys = Some(exprs.len());
            exprs.push(format!(
                "(SELECT count(*) FROM (SELECT 1 AS one FROM {stage} WHERE NOT ({null_key}) GROUP BY {keys}, {}{tie} HAVING count(*) > 1) AS a)",
                ident(SOURCE_FILE_COLUMN)
            ));
        }
        LoadMode::Append => {}
    }
    // A keyless table cannot apply them; a keyed one's are what the guard weighs.
    if let Some(op) = &plan.op_column {
        layout.deletes = Some(exprs.len());
        exprs.push(count_if(&format!("s.{} = {}", ident(op), literal("D"))));
    }
    let conversions = unsigned_conversions(plan);
    for l in &plan.load {
        if let LoadExpr::TryCast { column, to } = &l.expr {
            layout.cast_failures.push((l.target.clone(), exprs.len()));
            // The value as the MERGE reads it (sign-corrected where staged signed).
            let value = conversions
                .iter()
                .find(|(c, _)| c == column)
                .map(|(_, e)| format!("({e})"))
                .unwrap_or_else(|| format!("s.{}", ident(column)));
            exprs.push(count_if(&format!(
                "{value} IS NOT NULL AND TRY_CAST({value} AS {t}) IS NULL",
                t = D.type_name(to)
            )));
        }
    }
    (
        format!("SELECT {} FROM {stage} AS s", exprs.join(", ")),
        layout,
    )
}

/// Ledger and fence tables (same columns as DuckDB's).
pub fn create_ledger(ledger: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ledger} (table_name TEXT NOT NULL, s3_key TEXT NOT NULL, etag TEXT NULL, \
         size_bytes BIGINT NULL, batch_id TEXT NULL, order_key TEXT NULL, status TEXT NULL, detail TEXT NULL, \
         applied_at TIMESTAMPTZ NULL) PRIMARY INDEX table_name, s3_key"
    )
}

pub fn create_fence(fence: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {fence} (table_name TEXT NOT NULL, token BIGINT NOT NULL, holder TEXT NULL) \
         PRIMARY INDEX table_name"
    )
}

fn ledger_row(
    table: &str,
    f: &BatchFile,
    batch_id: Option<&str>,
    status: &str,
    detail: Option<&str>,
) -> String {
    format!(
        "({}, {}, {}, {}, {}, {}, {}, {}, CURRENT_TIMESTAMP)",
        literal(table),
        literal(&f.key),
        literal(&f.etag),
        f.size,
        batch_id.map(literal).unwrap_or_else(|| "NULL".into()),
        literal(&f.order_key),
        literal(status),
        detail.map(literal).unwrap_or_else(|| "NULL".into()),
    )
}

const LEDGER_COLUMNS: &str =
    "(table_name, s3_key, etag, size_bytes, batch_id, order_key, status, detail, applied_at)";

/// One INSERT for all files of the batch.
pub fn ledger_insert(ledger: &str, plan: &ApplyPlan) -> String {
    let rows: Vec<String> = plan
        .files
        .iter()
        .map(|f| ledger_row(&plan.table, f, Some(&plan.batch_id), STATUS_APPLIED, None))
        .collect();
    format!(
        "INSERT INTO {ledger} {LEDGER_COLUMNS} VALUES {}",
        rows.join(", ")
    )
}

/// Files recorded with a status outside a batch (rejected, or an operator's skip or
/// forget).
pub fn status_insert(
    ledger: &str,
    table: &str,
    files: &[BatchFile],
    status: &str,
    reason: &str,
) -> String {
    let rows: Vec<String> = files
        .iter()
        .map(|f| ledger_row(table, f, None, status, Some(reason)))
        .collect();
    format!(
        "INSERT INTO {ledger} {LEDGER_COLUMNS} VALUES {}",
        rows.join(", ")
    )
}

/// A table's ledger entries, newest first.
pub fn ledger_entries_query(ledger: &str, table: &str, limit: usize) -> String {
    format!(
        "SELECT s3_key, etag, size_bytes, batch_id, CAST(applied_at AS TEXT), status, detail FROM {ledger} \
         WHERE table_name = {} ORDER BY applied_at DESC LIMIT {limit}",
        literal(table)
    )
}

/// The newest ledger entry per key. ROW_NUMBER rather than an arg_max-style aggregate:
/// only window functions the MERGE already needs.
pub fn applied_query(ledger: &str, table: &str, keys: &[String]) -> String {
    format!(
        "SELECT s3_key, etag, status, order_key FROM (SELECT s3_key, etag, status, order_key, ROW_NUMBER() OVER (PARTITION BY s3_key ORDER BY applied_at DESC) AS rn \
         FROM {ledger} WHERE table_name = {} AND s3_key IN ({})) AS newest WHERE rn = 1",
        literal(table),
        keys.iter()
            .map(|k| literal(k))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub fn last_applied_query(ledger: &str, table: &str) -> String {
    format!(
        "SELECT order_key, s3_key FROM {ledger} WHERE table_name = {} AND status = {} ORDER BY order_key DESC LIMIT 1",
        literal(table),
        literal(STATUS_APPLIED)
    )
}

pub fn ledger_summary_query(ledger: &str) -> String {
    format!(
        "SELECT table_name, s3_key, etag, size_bytes, batch_id, CAST(applied_at AS TEXT) FROM (SELECT table_name, s3_key, etag, size_bytes, batch_id, applied_at, \
         ROW_NUMBER() OVER (PARTITION BY table_name ORDER BY applied_at DESC) AS rn FROM {ledger} WHERE status = {}) AS newest WHERE rn = 1 ORDER BY table_name",
        literal(STATUS_APPLIED)
    )
}

pub fn fence_select(fence: &str, table: &str) -> String {
    format!(
        "SELECT token, holder FROM {fence} WHERE table_name = {}",
        literal(table)
    )
}

pub fn fence_insert(fence: &str, table: &str, token: u64, holder: &str) -> String {
    format!(
        "INSERT INTO {fence} (table_name, token, holder) VALUES ({}, {token}, {})",
        literal(table),
        literal(holder)
    )
}

pub fn fence_update(fence: &str, table: &str, token: u64, holder: &str) -> String {
    format!(
        "UPDATE {fence} SET token = {token}, holder = {} WHERE table_name = {}",
        literal(holder),
        literal(table)
    )
}

/// Columns and primary index of `tables` (a target and its rebuild leftovers) in one
/// round trip, both filtered by schema: the columns in declared order (`ordinal_position`),
/// the primary index from `information_schema.tables.primary_index`, "an ordered array of
/// the column names comprising the primary index definition" (information schema
/// reference, tables), whose `table_schema` is the schema.
/// `ordered = false` leaves `ordinal_position` out, for a server that lacks it (it is on no
/// Firebolt columns page; a real DMS loader orders by it).
pub fn describe_query(schema: &str, tables: &[String], ordered: bool) -> String {
    format!(
        "SELECT kind, table_name, name, data_type, is_nullable, is_in_primary_index FROM ({} UNION ALL \
         SELECT 'index' AS kind, table_name, CAST(primary_index AS TEXT) AS name, '' AS data_type, '' AS is_nullable, '' AS is_in_primary_index, 0 AS position \
         FROM information_schema.tables WHERE table_schema = {} AND table_name IN ({})) AS described ORDER BY table_name, position",
        columns_part(schema, tables, ordered),
        literal(schema),
        name_list(tables)
    )
}

/// The columns alone (`is_in_primary_index` gives the key), for a server whose
/// `information_schema.tables` has no `primary_index`.
pub fn describe_columns_query(schema: &str, tables: &[String], ordered: bool) -> String {
    format!(
        "SELECT kind, table_name, name, data_type, is_nullable, is_in_primary_index FROM ({}) AS described ORDER BY table_name, position",
        columns_part(schema, tables, ordered)
    )
}

fn name_list(tables: &[String]) -> String {
    tables
        .iter()
        .map(|t| literal(t))
        .collect::<Vec<_>>()
        .join(", ")
}

fn columns_part(schema: &str, tables: &[String], ordered: bool) -> String {
    format!(
        "SELECT 'column' AS kind, table_name, column_name AS name, data_type, CAST(is_nullable AS TEXT) AS is_nullable, \
         CAST(is_in_primary_index AS TEXT) AS is_in_primary_index, {} AS position \
         FROM information_schema.columns WHERE table_schema = {} AND table_name IN ({})",
        if ordered { "ordinal_position" } else { "1" },
        literal(schema),
        name_list(tables)
    )
}

/// Staging tables of any worker in the schema (the caller keeps the stale ones).
/// `_` is a LIKE wildcard: the pattern over-matches and the caller checks the prefix.
pub fn staging_tables_query(schema: &str) -> String {
    format!(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = {} AND table_name LIKE {}",
        literal(schema),
        literal(&format!("{STAGE_PREFIX}%"))
    )
}

pub fn drop_table(table: &str) -> String {
    format!("DROP TABLE IF EXISTS {table}")
}

/// Copying a table into its rebuild with widened columns: `INSERT INTO copy SELECT
/// CAST(..) FROM t`. `columns` are the new columns; `widened` names those that change.
pub fn rebuild_copy(copy: &str, target: &str, columns: &[Column], widened: &[String]) -> String {
    let names = ident_list(columns.iter().map(|c| c.name.as_str()));
    let values = columns
        .iter()
        .map(|c| {
            if widened.contains(&c.name) {
                format!(
                    "CAST({} AS {}) AS {}",
                    ident(&c.name),
                    D.type_name(&c.ty),
                    ident(&c.name)
                )
            } else {
                ident(&c.name)
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("INSERT INTO {copy} ({names}) SELECT {values} FROM {target}")
}

pub fn row_counts(a: &str, b: &str) -> String {
    format!("SELECT (SELECT count(*) FROM {a}), (SELECT count(*) FROM {b})")
}

/// `ALTER TABLE t RENAME TO new`: the new name is unqualified, the table stays in its
/// schema (ALTER TABLE reference, 2025 docs: RENAME TO, 4.10 and later).
pub fn rename_table(table: &str, new_name: &str) -> String {
    format!("ALTER TABLE {table} RENAME TO {}", ident(new_name))
}

/// Parses `information_schema.tables.primary_index` into column names.
/// UNCONFIRMED format (an "ordered array" as text): accepts `{a,b}`, `[a, b]`, `(a, b)`,
/// `a, b`, with or without double quotes.
pub fn parse_index_definition(definition: &str) -> Vec<String> {
    let inner = definition
        .trim()
        .trim_start_matches(['[', '(', '{'])
        .trim_end_matches([']', ')', '}']);
    let mut names = Vec::new();
    let mut current = String::new();
    let mut chars = inner.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                current.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => names.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    names.push(current);
    names
        .into_iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{KeyColumn, LoadColumn};

    const HOSTILE: &str = "x\"; DROP TABLE x; --";

    fn file(key: &str) -> BatchFile {
        BatchFile {
            bucket: "dms-bucket".into(),
            key: key.into(),
            size: 1234,
            etag: "e'1".into(),
            order_key: "0001".into(),
            full_load: false,
        }
    }

    fn plan(mode: LoadMode, ordering: Option<&str>) -> ApplyPlan {
        ApplyPlan {
            into: None,
            guard: None,
            history: None,
            batch_id: "b1".into(),
            table: "Ordérs\"x".into(),
            ddl: vec![],
            load: vec![
                LoadColumn {
                    target: "id".into(),
                    expr: LoadExpr::Column("ID".into()),
                },
                LoadColumn {
                    target: "amount".into(),
                    expr: LoadExpr::TryCast {
                        column: HOSTILE.into(),
                        to: ColumnType::Int64,
                    },
                },
            ],
            mode,
            op_column: Some("Op".into()),
            ordering_column: ordering.map(str::to_string),
            staged_columns: vec![
                Column::new("ID", ColumnType::Int64),
                Column::new(HOSTILE, ColumnType::String),
                Column::new("tags", ColumnType::Unsupported("list".into())),
            ],
            files: vec![file("dms/t/1.parquet"), file("dms/t/it's 2.parquet")],
            fence: None,
        }
    }

    fn keyed() -> LoadMode {
        LoadMode::Merge {
            key: vec![KeyColumn {
                target: "id".into(),
                source: "ID".into(),
            }],
        }
    }

    #[test]
    fn staging_is_created_from_the_footer_schema() {
        let p = plan(keyed(), None);
        assert_eq!(
            create_staging("\"public\".\"stage\"", &p),
            "CREATE TABLE \"public\".\"stage\" (\"ID\" BIGINT NULL, \"x\"\"; DROP TABLE x; --\" TEXT NULL, \"tags\" TEXT NULL, \"Op\" TEXT NULL, \"__cdc_source_file\" TEXT NULL)"
        );
    }

    #[test]
    fn copy_golden_for_each_credential_kind() {
        let p = plan(keyed(), None);
        let files = p.files.clone();
        let cols = "(\"ID\", \"x\"\"; DROP TABLE x; --\", \"Op\", \"__cdc_source_file\" $source_file_name)";
        let direct = copy_statements("\"s\".\"st\"", &p, &files, &CopySource::Direct(None));
        assert_eq!(
            direct,
            vec![(
                format!(
                    "COPY INTO \"s\".\"st\" {cols} FROM 's3://dms-bucket/dms/t/1.parquet', 's3://dms-bucket/dms/t/it''s 2.parquet' WITH TYPE = PARQUET AUTO_CREATE = FALSE MAX_ERRORS_PER_FILE = 0 CASE_SENSITIVE_COLUMN_MAPPING = TRUE"
                ),
                format!(
                    "COPY INTO \"s\".\"st\" {cols} FROM 's3://dms-bucket/dms/t/1.parquet', 's3://dms-bucket/dms/t/it''s 2.parquet' WITH TYPE = PARQUET AUTO_CREATE = FALSE MAX_ERRORS_PER_FILE = 0 CASE_SENSITIVE_COLUMN_MAPPING = TRUE"
                ),
            )]
        );
        let role = copy_statements(
            "\"st\"",
            &p,
            &files,
            &CopySource::Direct(Some(S3Credentials::Role {
                arn: "arn:aws:iam::1:role/r'".into(),
                external_id: Some("ext-1".into()),
            })),
        );
        assert!(
            role[0].0.ends_with(
                "CREDENTIALS = (AWS_ROLE_ARN = 'arn:aws:iam::1:role/r''' AWS_ROLE_EXTERNAL_ID = 'ext-1')"
            ),
            "{}",
            role[0].0
        );
        let keys = copy_statements(
            "\"st\"",
            &p,
            &files,
            &CopySource::Direct(Some(S3Credentials::Keys {
                access_key_id: "AKIA".into(),
                secret_access_key: Secret::new("hunter2"),
                session_token: None,
            })),
        );
        assert!(keys[0].0.ends_with(
            "CREDENTIALS = (AWS_ACCESS_KEY_ID = 'AKIA' AWS_SECRET_ACCESS_KEY = 'hunter2')"
        ));
        assert!(
            !keys[0].1.contains("hunter2"),
            "the logged form hides the secret"
        );
        let temporary = CopySource::Direct(Some(S3Credentials::Keys {
            access_key_id: "ASIA".into(),
            secret_access_key: Secret::new("hunter2"),
            session_token: Some(Secret::new("tok'en")),
        }));
        let keys = copy_statements("\"st\"", &p, &files, &temporary);
        assert!(keys[0].0.ends_with(
            "CREDENTIALS = (AWS_ACCESS_KEY_ID = 'ASIA' AWS_SECRET_ACCESS_KEY = 'hunter2' AWS_SESSION_TOKEN = 'tok''en')"
        ));
        assert!(keys[0].1.ends_with("AWS_SESSION_TOKEN = '****')"));
        assert_eq!(temporary.secrets().len(), 2, "both are masked in errors");
        let location = copy_statements(
            "\"st\"",
            &p,
            &files,
            &CopySource::Location("dms \"loc\"".into()),
        );
        assert_eq!(location.len(), 2);
        assert_eq!(
            location[1].0,
            format!(
                "COPY INTO \"st\" {cols} FROM \"dms \"\"loc\"\"\" WITH PATTERN = 'dms/t/it''s 2.parquet' TYPE = PARQUET AUTO_CREATE = FALSE MAX_ERRORS_PER_FILE = 0 CASE_SENSITIVE_COLUMN_MAPPING = TRUE"
            )
        );
    }

    #[test]
    fn check_query_golden() {
        let p = plan(keyed(), None);
        let (sql, layout) = check_query(&p, "\"st\"", &p.files);
        assert_eq!(
            sql,
            "SELECT count(*), SUM(CASE WHEN CASE \"__cdc_source_file\" WHEN 'dms/t/1.parquet' THEN 0 WHEN 'dms/t/it''s 2.parquet' THEN 1 END IS NULL THEN 1 ELSE 0 END), \
             SUM(CASE WHEN \"ID\" IS NULL THEN 1 ELSE 0 END), \
             (SELECT count(*) FROM (SELECT 1 AS one FROM \"st\" WHERE NOT (\"ID\" IS NULL) GROUP BY \"ID\") AS k), \
             (SELECT count(*) FROM (SELECT 1 AS one FROM \"st\" WHERE NOT (\"ID\" IS NULL) GROUP BY \"ID\", \"__cdc_source_file\" HAVING count(*) > 1) AS a), \
             SUM(CASE WHEN s.\"Op\" = 'D' THEN 1 ELSE 0 END), \
             SUM(CASE WHEN s.\"x\"\"; DROP TABLE x; --\" IS NOT NULL AND TRY_CAST(s.\"x\"\"; DROP TABLE x; --\" AS BIGINT) IS NULL THEN 1 ELSE 0 END) FROM \"st\" AS s"
        );
        assert_eq!(layout.null_keys, Some(2));
        assert_eq!(layout.distinct_keys, Some(3));
        assert_eq!(layout.ambiguous_keys, Some(4));
        assert_eq!(
            layout.deletes,
            Some(5),
            "the guard weighs a keyed table's deletes"
        );
        assert_eq!(layout.cast_failures, vec![("amount".to_string(), 6)]);
        let (sql, _) = check_query(&plan(keyed(), Some("seq")), "\"st\"", &p.files);
        assert!(
            sql.contains("GROUP BY \"ID\", \"__cdc_source_file\", \"seq\" HAVING count(*) > 1"),
            "an ordering column decides, unless its values tie: {sql}"
        );
        let (sql, layout) = check_query(&plan(LoadMode::Append, None), "\"st\"", &p.files);
        assert_eq!(layout.deletes, Some(2));
        assert!(
            sql.contains("SUM(CASE WHEN s.\"Op\" = 'D' THEN 1 ELSE 0 END)"),
            "{sql}"
        );
    }

    #[test]
    fn ledger_fence_and_ddl_golden() {
        let p = plan(keyed(), None);
        assert_eq!(
            ledger_insert("\"s\".\"_cdc_worker_ledger\"", &p),
            "INSERT INTO \"s\".\"_cdc_worker_ledger\" (table_name, s3_key, etag, size_bytes, batch_id, order_key, status, detail, applied_at) VALUES \
             ('Ordérs\"x', 'dms/t/1.parquet', 'e''1', 1234, 'b1', '0001', 'applied', NULL, CURRENT_TIMESTAMP), \
             ('Ordérs\"x', 'dms/t/it''s 2.parquet', 'e''1', 1234, 'b1', '0001', 'applied', NULL, CURRENT_TIMESTAMP)"
        );
        assert!(status_insert("\"l\"", HOSTILE, &p.files[..1], "rejected", "bad'footer").contains("('x\"; DROP TABLE x; --', 'dms/t/1.parquet', 'e''1', 1234, NULL, '0001', 'rejected', 'bad''footer', CURRENT_TIMESTAMP)"));
        assert_eq!(
            fence_update("\"f\"", "t'", 7, "w'1"),
            "UPDATE \"f\" SET token = 7, holder = 'w''1' WHERE table_name = 't'''"
        );
        assert_eq!(
            create_table(
                "\"s\".\"Ordérs\"\"x\"",
                &[
                    Column::new("id", ColumnType::Int64),
                    Column {
                        name: HOSTILE.into(),
                        ty: ColumnType::Decimal {
                            precision: 40,
                            scale: 2
                        },
                        nullable: false
                    }
                ],
                &["id".to_string()],
                true
            ),
            "CREATE TABLE IF NOT EXISTS \"s\".\"Ordérs\"\"x\" (\"id\" BIGINT NOT NULL, \"x\"\"; DROP TABLE x; --\" NUMERIC(38, 2) NOT NULL) PRIMARY INDEX \"id\""
        );
        assert_eq!(
            add_column(
                "\"t\"",
                &Column::new("naïve \"col\"", ColumnType::TimestampTz)
            ),
            "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"naïve \"\"col\"\"\" TIMESTAMPTZ NULL"
        );
        assert_eq!(
            applied_query("\"l\"", "t", &["a'".into(), "b".into()]),
            "SELECT s3_key, etag, status, order_key FROM (SELECT s3_key, etag, status, order_key, ROW_NUMBER() OVER (PARTITION BY s3_key ORDER BY applied_at DESC) AS rn \
             FROM \"l\" WHERE table_name = 't' AND s3_key IN ('a''', 'b')) AS newest WHERE rn = 1"
        );
    }

    #[test]
    fn rebuild_golden() {
        let columns = vec![
            Column::new("id", ColumnType::Int64),
            Column::new("n\"", ColumnType::Int64),
        ];
        assert_eq!(
            rebuild_copy("\"c\"", "\"t\"", &columns, &["n\"".to_string()]),
            "INSERT INTO \"c\" (\"id\", \"n\"\"\") SELECT \"id\", CAST(\"n\"\"\" AS BIGINT) AS \"n\"\"\" FROM \"t\""
        );
        assert_eq!(
            rename_table("\"s\".\"c\"", "t\""),
            "ALTER TABLE \"s\".\"c\" RENAME TO \"t\"\"\""
        );
    }

    #[test]
    fn names_and_index_definitions() {
        let name = stage_table_name("b18f3Ap12n3; DROP", 1_700_000_000, 0xabc);
        assert_eq!(
            name,
            "_cdc_worker_stage__1700000000_00000abc_b18f3ap12n3__drop"
        );
        assert_eq!(stage_created_at(&name), Some(1_700_000_000));
        assert_eq!(stage_created_at("_cdc_worker_stage_x"), None);
        assert!(crate::warehouse::is_reserved_table(&name));
        assert!(crate::warehouse::is_reserved_table(&rebuild_table("t")));
        assert_eq!(parse_index_definition("[id, name]"), vec!["id", "name"]);
        assert_eq!(
            parse_index_definition("(\"a,\"\"b\", c)"),
            vec!["a,\"b", "c"]
        );
        assert_eq!(parse_index_definition("id"), vec!["id"]);
        assert_eq!(parse_index_definition("{a,\"B c\"}"), vec!["a", "B c"]);
        assert!(parse_index_definition("").is_empty());
    }
}
