//! The dedupe, MERGE and append statements, shared by both warehouses: they differ only
//! in type names and in where the staged rows come from (DuckDB reads the downloaded
//! files directly, Firebolt a staging table filled by COPY). A test runs the Firebolt
//! rendering on DuckDB, so the logic is checked on a real engine.

use crate::batch::{ApplyPlan, KeyColumn, LoadExpr, LoadMode};
use crate::schema::dialect::Dialect;

use super::sql::{ident, ident_list, literal};

/// Name of the rank column the dedupe adds; source columns may not use the `__cdc_` prefix.
pub const RANK_COLUMN: &str = "__cdc_rank";
pub const FILE_ORDINAL_COLUMN: &str = "__cdc_file";
pub const ROW_ORDINAL_COLUMN: &str = "__cdc_row";
pub const RESERVED_PREFIX: &str = "__cdc_";

/// Where the staged rows of a segment come from.
#[derive(Debug, Clone)]
pub struct StagedRows {
    /// A relation in a FROM clause: `read_parquet([...], union_by_name = true)` or a table.
    pub relation: String,
    /// Expression of a row's file position in the batch (DMS order).
    pub file_ordinal: String,
    /// Expression of a row's position inside its file, where the warehouse has one.
    pub row_ordinal: Option<String>,
    /// Staged columns read through an expression instead of as they are: (column,
    /// expression over the relation's columns). Firebolt stages unsigned integers as the
    /// signed type Parquet stores them in and corrects the sign here (`firebolt::sql`).
    pub converted: Vec<(String, String)>,
}

impl StagedRows {
    fn column(&self, name: &str) -> String {
        match self.converted.iter().find(|(c, _)| c == name) {
            Some((_, expr)) => format!("{expr} AS {}", ident(name)),
            None => ident(name),
        }
    }
}

/// `s."col"`, cast as the plan says.
pub fn load_expr(d: Dialect, expr: &LoadExpr, alias: &str) -> String {
    let col = |c: &str| format!("{alias}.{}", ident(c));
    match expr {
        LoadExpr::Column(c) => col(c),
        LoadExpr::Cast { column, to } => format!("CAST({} AS {})", col(column), d.type_name(to)),
        LoadExpr::TryCast { column, to } => {
            format!("TRY_CAST({} AS {})", col(column), d.type_name(to))
        }
        LoadExpr::Variant { column, fits } => format!(
            "CASE WHEN {c} IS NOT NULL AND TRY_CAST({c} AS {t}) IS NULL THEN {c} END",
            c = col(column),
            t = d.type_name(fits)
        ),
    }
}

fn not_delete(plan: &ApplyPlan, alias: &str) -> Option<String> {
    plan.op_column.as_ref().map(|op| {
        let op = format!("{alias}.{}", ident(op));
        format!("({op} IS NULL OR {op} <> 'D')")
    })
}

/// `k1 IS NULL OR k2 IS NULL ...`: a staged row whose key has a NULL. DMS keys are primary
/// keys, so such a row changes no row of the target: it is skipped and counted, and key
/// matching can use plain equality (Firebolt needs an equality predicate to join on).
pub(super) fn null_key(key: &[String], alias: &str) -> String {
    key.iter()
        .map(|k| format!("{alias}.{} IS NULL", ident(k)))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// For a keyed plan: how many staged rows have a NULL in a key column (skipped).
pub fn null_key_rows_query(plan: &ApplyPlan, rows: &StagedRows) -> Option<String> {
    let LoadMode::Merge { key } = &plan.mode else {
        return None;
    };
    let source_key: Vec<String> = key.iter().map(|k| k.source.clone()).collect();
    Some(format!(
        "SELECT count(*) FROM ({}) AS s WHERE {}",
        staged_select(plan, rows),
        null_key(&source_key, "s")
    ))
}

/// The staged rows reduced to one row per key: the latest change wins, by ordering
/// column, then file position, then row position. Rows with a NULL key are left out.
pub fn latest_per_key(plan: &ApplyPlan, rows: &StagedRows, key: &[String]) -> String {
    let mut order = Vec::new();
    if let Some(ord) = &plan.ordering_column {
        order.push(format!("{} DESC NULLS LAST", ident(ord)));
    }
    order.push(format!("{} DESC", ident(FILE_ORDINAL_COLUMN)));
    if rows.row_ordinal.is_some() {
        order.push(format!("{} DESC", ident(ROW_ORDINAL_COLUMN)));
    }
    format!(
        "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {} ORDER BY {}) AS {} FROM ({}) AS staged WHERE NOT ({})) AS ranked WHERE {} = 1",
        ident_list(key.iter().map(String::as_str)),
        order.join(", "),
        ident(RANK_COLUMN),
        staged_select(plan, rows),
        null_key(key, "staged"),
        ident(RANK_COLUMN),
    )
}

/// The staged columns plus the ordinals, under fixed names.
pub fn staged_select(plan: &ApplyPlan, rows: &StagedRows) -> String {
    let mut cols: Vec<String> = plan
        .staged_columns
        .iter()
        .map(|c| rows.column(&c.name))
        .collect();
    if let Some(op) = &plan.op_column {
        cols.push(ident(op));
    }
    cols.push(format!(
        "{} AS {}",
        rows.file_ordinal,
        ident(FILE_ORDINAL_COLUMN)
    ));
    if let Some(row) = &rows.row_ordinal {
        cols.push(format!("{row} AS {}", ident(ROW_ORDINAL_COLUMN)));
    }
    format!("SELECT {} FROM {}", cols.join(", "), rows.relation)
}

/// The table that remembers deleted keys of `table` with the ordering value of the delete,
/// so a late insert or update cannot bring back a row a newer change deleted.
pub fn tombstone_table(table: &str) -> String {
    format!("_cdc_worker_deleted__{table}")
}

/// The ordering column as (target name, source name), when the plan orders by one and
/// loads it into the target (only then can the target's value be compared).
pub(super) fn ordering(plan: &ApplyPlan) -> Option<(String, String)> {
    let source = plan.ordering_column.as_ref()?;
    plan.load
        .iter()
        .find(|l| matches!(&l.expr, LoadExpr::Column(c) if c == source))
        .map(|l| (l.target.clone(), source.clone()))
}

/// Whether this plan keeps tombstones (ordering column loaded, deletes possible, a key,
/// and no history: a history table keeps its deleted versions instead).
pub fn uses_tombstones(plan: &ApplyPlan) -> bool {
    matches!(plan.mode, LoadMode::Merge { .. })
        && plan.history.is_none()
        && plan.op_column.is_some()
        && ordering(plan).is_some()
}

fn key_match(key: &[KeyColumn], left: &str, right: &str, right_is_source: bool) -> String {
    key.iter()
        .map(|k| {
            let r = if right_is_source {
                &k.source
            } else {
                &k.target
            };
            // Plain equality: Firebolt joins need one equality predicate between the sides
            // (release notes 4.3/4.4); keys are never NULL here (`latest_per_key`).
            format!("{left}.{} = {right}.{}", ident(&k.target), ident(r))
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `MERGE INTO target USING (latest per key) ON key ...`; `target` is already quoted.
///
/// With an ordering column loaded into the target, a change only overwrites or deletes a
/// row whose ordering value is not newer, and the source skips keys whose tombstone is
/// newer: late files then leave every row at its latest change. `tombstones` is the
/// quoted [`tombstone_table`] (required when [`uses_tombstones`]).
pub fn merge_statement(
    d: Dialect,
    target: &str,
    plan: &ApplyPlan,
    rows: &StagedRows,
    tombstones: Option<&str>,
) -> String {
    let LoadMode::Merge { key } = &plan.mode else {
        panic!("merge_statement on an append plan");
    };
    let source_key: Vec<String> = key.iter().map(|k| k.source.clone()).collect();
    let on = key_match(key, "t", "s", true);
    let latest = latest_per_key(plan, rows, &source_key);
    let order = ordering(plan);
    let source = match (&order, tombstones.filter(|_| uses_tombstones(plan))) {
        (Some((t_ord, s_ord)), Some(tomb)) => format!(
            "SELECT s.* FROM ({latest}) AS s LEFT JOIN {tomb} AS d ON {} WHERE d.{t} IS NULL OR s.{s} IS NULL OR s.{s} > d.{t}",
            key_match(key, "d", "s", true),
            t = ident(t_ord),
            s = ident(s_ord),
        ),
        _ => latest,
    };
    let newer = order.as_ref().map(|(t_ord, s_ord)| {
        format!(
            " AND (t.{t} IS NULL OR s.{s} IS NULL OR s.{s} >= t.{t})",
            t = ident(t_ord),
            s = ident(s_ord)
        )
    });
    let newer = newer.as_deref().unwrap_or("");
    let mut sql = format!("MERGE INTO {target} AS t USING ({source}) AS s ON {on}");
    if let Some(op) = &plan.op_column {
        sql.push_str(&format!(
            " WHEN MATCHED AND s.{} = {}{newer} THEN DELETE",
            ident(op),
            literal("D")
        ));
    }
    let updates: Vec<String> = plan
        .load
        .iter()
        .filter(|l| !key.iter().any(|k| k.target == l.target))
        .map(|l| format!("{} = {}", ident(&l.target), load_expr(d, &l.expr, "s")))
        .collect();
    if !updates.is_empty() {
        sql.push_str(&format!(
            " WHEN MATCHED{newer} THEN UPDATE SET {}",
            updates.join(", ")
        ));
    }
    let insert_cols: Vec<String> = plan.load.iter().map(|l| ident(&l.target)).collect();
    let insert_vals: Vec<String> = plan
        .load
        .iter()
        .map(|l| load_expr(d, &l.expr, "s"))
        .collect();
    sql.push_str(" WHEN NOT MATCHED");
    if let Some(cond) = not_delete(plan, "s") {
        sql.push_str(&format!(" AND {cond}"));
    }
    sql.push_str(&format!(
        " THEN INSERT ({}) VALUES ({})",
        insert_cols.join(", "),
        insert_vals.join(", ")
    ));
    sql
}

/// Creating the tombstone table (before the MERGE) and recording this batch's deletes in
/// it (after the MERGE), for plans that [`uses_tombstones`]. Both names already quoted.
pub fn tombstone_statements(
    target: &str,
    tombstones: &str,
    plan: &ApplyPlan,
    rows: &StagedRows,
) -> Option<(String, String)> {
    if !uses_tombstones(plan) {
        return None;
    }
    let (LoadMode::Merge { key }, Some(op), Some((t_ord, s_ord))) =
        (&plan.mode, &plan.op_column, ordering(plan))
    else {
        return None;
    };
    let key_targets: Vec<String> = key.iter().map(|k| ident(&k.target)).collect();
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {tombstones} AS SELECT {}, {} FROM {target} WHERE 1 = 0",
        key_targets.join(", "),
        ident(&t_ord)
    );
    let source_key: Vec<String> = key.iter().map(|k| k.source.clone()).collect();
    let deletes = format!(
        "SELECT {}, x.{} AS {} FROM ({}) AS x WHERE x.{} = {}",
        key.iter()
            .map(|k| format!("x.{} AS {}", ident(&k.source), ident(&k.target)))
            .collect::<Vec<_>>()
            .join(", "),
        ident(&s_ord),
        ident(&t_ord),
        latest_per_key(plan, rows, &source_key),
        ident(op),
        literal("D"),
    );
    let record = format!(
        "MERGE INTO {tombstones} AS t USING ({deletes}) AS s ON {} WHEN MATCHED AND (t.{o} IS NULL OR s.{o} > t.{o}) THEN UPDATE SET {o} = s.{o} WHEN NOT MATCHED THEN INSERT ({}, {o}) VALUES ({}, s.{o})",
        key_match(key, "t", "s", false),
        key_targets.join(", "),
        key.iter()
            .map(|k| format!("s.{}", ident(&k.target)))
            .collect::<Vec<_>>()
            .join(", "),
        o = ident(&t_ord),
    );
    Some((create, record))
}

/// `INSERT INTO target (columns) SELECT values FROM {from} AS s`, without the delete rows;
/// `target` is already quoted.
fn insert_rows_from(d: Dialect, target: &str, plan: &ApplyPlan, from: &str) -> String {
    let cols: Vec<String> = plan.load.iter().map(|l| ident(&l.target)).collect();
    let vals: Vec<String> = plan
        .load
        .iter()
        .map(|l| load_expr(d, &l.expr, "s"))
        .collect();
    let mut sql = format!(
        "INSERT INTO {target} ({}) SELECT {} FROM {from} AS s",
        cols.join(", "),
        vals.join(", ")
    );
    if let Some(cond) = not_delete(plan, "s") {
        sql.push_str(&format!(" WHERE {cond}"));
    }
    sql
}

/// `INSERT INTO target SELECT ...` of every non-delete row, in file and row order.
pub fn append_statement(d: Dialect, target: &str, plan: &ApplyPlan, rows: &StagedRows) -> String {
    let mut order = vec![ident(FILE_ORDINAL_COLUMN)];
    if rows.row_ordinal.is_some() {
        order.push(ident(ROW_ORDINAL_COLUMN));
    }
    let from = format!("({})", staged_select(plan, rows));
    let mut sql = insert_rows_from(d, target, plan, &from);
    sql.push_str(&format!(
        " ORDER BY {}",
        order
            .iter()
            .map(|o| format!("s.{o}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    sql
}

/// The name of the temporary table [`delete_insert_statements`] dedupes into.
pub const LATEST_TABLE: &str = "__cdc_latest";

/// DuckDB's cheaper equivalent of [`merge_statement`] for plans without an ordering
/// column: the latest change per key into a temporary table, then a DELETE of every key it
/// holds and an INSERT of its non-delete rows. DuckDB updates a row column by column,
/// which costs more than deleting it and appending it again (a quarter of a CDC batch's
/// apply, measured on DuckDB 2.0). It gives the MERGE's rows only where the plan loads
/// every column of the target (a MERGE's UPDATE keeps the others' values): the caller
/// checks that. Returns (dedupe, delete, insert, drop); `target` is already quoted.
pub fn delete_insert_statements(
    d: Dialect,
    target: &str,
    plan: &ApplyPlan,
    rows: &StagedRows,
) -> Option<[String; 4]> {
    let LoadMode::Merge { key } = &plan.mode else {
        return None;
    };
    if plan.ordering_column.is_some() {
        return None;
    }
    let latest = ident(LATEST_TABLE);
    let source_key: Vec<String> = key.iter().map(|k| k.source.clone()).collect();
    let dedupe = format!(
        "CREATE TEMPORARY TABLE {latest} AS {}",
        latest_per_key(plan, rows, &source_key)
    );
    let delete = format!(
        "DELETE FROM {target} AS t USING {latest} AS s WHERE {}",
        key_match(key, "t", "s", true)
    );
    let insert = insert_rows_from(d, target, plan, &latest);
    Some([dedupe, delete, insert, format!("DROP TABLE {latest}")])
}

/// Whether a segment may take the full-load fast path at all: a keyed plan whose files are
/// all DMS full-load files. Whether it does is decided in the transaction, by
/// [`fast_load_blockers`].
pub fn fast_load_candidate(plan: &ApplyPlan) -> bool {
    matches!(plan.mode, LoadMode::Merge { .. })
        && !plan.files.is_empty()
        && plan.files.iter().all(|f| f.full_load)
}

/// One row, one count: what forbids inserting the segment's rows as they are. A plain
/// INSERT gives the merge path's rows exactly when every staged row is the only change of
/// its key: no key repeats or is NULL in the segment, and none is in the target (or its
/// tombstones, `tombstones` already quoted) yet. Then no dedupe and no MERGE are needed.
/// A DMS full load holds each key once, so this is true of a first load (an empty
/// target) and of its later batches alike; when it is not, the merge path runs.
pub fn fast_load_blockers(
    target: &str,
    tombstones: Option<&str>,
    plan: &ApplyPlan,
    rows: &StagedRows,
) -> String {
    let LoadMode::Merge { key } = &plan.mode else {
        panic!("fast_load_blockers on an append plan");
    };
    let source_key = ident_list(key.iter().map(|k| k.source.as_str()));
    let null_key = key
        .iter()
        .map(|k| format!("{} IS NULL", ident(&k.source)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let repeated = format!(
        "SELECT 1 FROM {} GROUP BY {source_key} HAVING count(*) > 1 OR {null_key} LIMIT 1",
        rows.relation
    );
    let present = |table: &str| {
        format!(
            "SELECT 1 FROM {} AS s JOIN {table} AS t ON {} LIMIT 1",
            rows.relation,
            key_match(key, "t", "s", true)
        )
    };
    let mut parts = vec![repeated, present(target)];
    if let Some(tomb) = tombstones.filter(|_| uses_tombstones(plan)) {
        parts.push(present(tomb));
    }
    format!(
        "SELECT {}",
        parts
            .iter()
            .enumerate()
            .map(|(i, q)| format!("(SELECT count(*) FROM ({q}) AS b{i})"))
            .collect::<Vec<_>>()
            .join(" + ")
    )
}

/// The fast path's statement: `INSERT INTO target SELECT ...` of every non-delete row,
/// in no particular order (each key has one row). Only after [`fast_load_blockers`] found
/// nothing.
pub fn insert_new_rows_statement(
    d: Dialect,
    target: &str,
    plan: &ApplyPlan,
    rows: &StagedRows,
) -> String {
    insert_rows_from(d, target, plan, &rows.relation)
}

/// How many of the staged rows are deletes: for a table without a key, those that cannot be
/// applied; for a keyed one, what the destructive-change guard weighs (at most the rows the
/// segment deletes).
pub fn delete_rows_query(plan: &ApplyPlan, rows: &StagedRows) -> Option<String> {
    let op = plan.op_column.as_ref()?;
    Some(format!(
        "SELECT count(*) FROM ({}) AS s WHERE s.{} = 'D'",
        staged_select(plan, rows),
        ident(op)
    ))
}

/// One row: for each TRY_CAST column, how many non-NULL values did not cast.
pub fn cast_failures_query(
    d: Dialect,
    plan: &ApplyPlan,
    rows: &StagedRows,
) -> Option<(Vec<String>, String)> {
    let casts: Vec<(String, String)> = plan
        .load
        .iter()
        .filter_map(|l| match &l.expr {
            LoadExpr::TryCast { column, to } => Some((
                l.target.clone(),
                format!(
                    "count(*) FILTER (WHERE s.{c} IS NOT NULL AND TRY_CAST(s.{c} AS {t}) IS NULL)",
                    c = ident(column),
                    t = d.type_name(to)
                ),
            )),
            _ => None,
        })
        .collect();
    if casts.is_empty() {
        return None;
    }
    let names = casts.iter().map(|(n, _)| n.clone()).collect();
    let exprs: Vec<String> = casts.into_iter().map(|(_, e)| e).collect();
    Some((
        names,
        format!(
            "SELECT {} FROM ({}) AS s",
            exprs.join(", "),
            staged_select(plan, rows)
        ),
    ))
}

/// Reading one segment's files with `read_parquet` (DuckDB): union by name, with the file
/// position in the batch and the row position in the file.
pub fn duckdb_read_parquet(paths: &[String]) -> StagedRows {
    duckdb_read_parquet_files(paths, true)
}

/// [`duckdb_read_parquet`], by name only where files differ in their columns. DuckDB
/// matches columns by name either way (and refuses a file that lacks one), but
/// `union_by_name` opens every file to bind the query, before opening each again to scan
/// it: a cost per file that files of one shape do not need.
pub fn duckdb_read_parquet_files(paths: &[String], union_by_name: bool) -> StagedRows {
    let list = paths
        .iter()
        .map(|p| literal(p))
        .collect::<Vec<_>>()
        .join(", ");
    let options = if union_by_name {
        ", union_by_name = true"
    } else {
        ""
    };
    StagedRows {
        relation: format!("read_parquet([{list}]{options})"),
        file_ordinal: "file_index".into(),
        row_ordinal: Some("file_row_number".into()),
        converted: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::types::ColumnType;

    #[test]
    fn names_derived_from_the_longest_table_name_fit() {
        use crate::warehouse::firebolt::sql::{rebuild_table, rebuilt_marker};
        let t = "t".repeat(crate::warehouse::MAX_TABLE_NAME_LEN);
        for derived in [tombstone_table(&t), rebuild_table(&t), rebuilt_marker(&t)] {
            assert!(derived.len() <= 255, "{} bytes", derived.len());
        }
    }
    use crate::batch::{KeyColumn, LoadColumn};
    use crate::schema::types::Column;

    pub(crate) fn sample_plan(mode: LoadMode) -> ApplyPlan {
        ApplyPlan {
            into: None,
            guard: None,
            history: None,
            batch_id: "b1".into(),
            table: "orders".into(),
            ddl: vec![],
            load: vec![
                LoadColumn {
                    target: "id".into(),
                    expr: LoadExpr::Column("id".into()),
                },
                LoadColumn {
                    target: "na\"me".into(),
                    expr: LoadExpr::TryCast {
                        column: "na\"me".into(),
                        to: ColumnType::Int64,
                    },
                },
            ],
            mode,
            op_column: Some("Op".into()),
            ordering_column: None,
            staged_columns: vec![
                Column::new("id", ColumnType::Int64),
                Column::new("na\"me", ColumnType::String),
            ],
            files: vec![],
            fence: None,
        }
    }

    #[test]
    fn merge_sql_golden() {
        let plan = sample_plan(LoadMode::Merge {
            key: vec![KeyColumn {
                target: "id".into(),
                source: "id".into(),
            }],
        });
        let rows = duckdb_read_parquet(&["/tmp/b/000000.parquet".into()]);
        let sql = merge_statement(Dialect::Duckdb, "\"main\".\"orders\"", &plan, &rows, None);
        assert_eq!(
            sql,
            "MERGE INTO \"main\".\"orders\" AS t USING (SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY \"id\" ORDER BY \"__cdc_file\" DESC, \"__cdc_row\" DESC) AS \"__cdc_rank\" FROM (SELECT \"id\", \"na\"\"me\", \"Op\", file_index AS \"__cdc_file\", file_row_number AS \"__cdc_row\" FROM read_parquet(['/tmp/b/000000.parquet'], union_by_name = true)) AS staged WHERE NOT (staged.\"id\" IS NULL)) AS ranked WHERE \"__cdc_rank\" = 1) AS s ON t.\"id\" = s.\"id\" WHEN MATCHED AND s.\"Op\" = 'D' THEN DELETE WHEN MATCHED THEN UPDATE SET \"na\"\"me\" = TRY_CAST(s.\"na\"\"me\" AS BIGINT) WHEN NOT MATCHED AND (s.\"Op\" IS NULL OR s.\"Op\" <> 'D') THEN INSERT (\"id\", \"na\"\"me\") VALUES (s.\"id\", TRY_CAST(s.\"na\"\"me\" AS BIGINT))"
        );
    }

    #[test]
    fn append_sql_golden() {
        let plan = sample_plan(LoadMode::Append);
        let rows = duckdb_read_parquet(&["/x/it's.parquet".into()]);
        let sql = append_statement(Dialect::Duckdb, "\"t\"", &plan, &rows);
        assert!(
            sql.starts_with("INSERT INTO \"t\" (\"id\", \"na\"\"me\") SELECT s.\"id\""),
            "{sql}"
        );
        assert!(sql.contains("read_parquet(['/x/it''s.parquet'], union_by_name = true)"));
        assert!(sql.ends_with(
            "WHERE (s.\"Op\" IS NULL OR s.\"Op\" <> 'D') ORDER BY s.\"__cdc_file\", s.\"__cdc_row\""
        ));
    }

    /// Runs a merge plan against a staging table on in-memory DuckDB.
    fn merge_rows(conn: &duckdb::Connection, plan: &ApplyPlan, rows: &[(&str, i64, &str, &str)]) {
        conn.execute_batch("DROP TABLE IF EXISTS stage; CREATE TABLE stage (\"Op\" VARCHAR, id BIGINT, seq VARCHAR, val VARCHAR, f INTEGER, r INTEGER)").unwrap();
        for (n, (op, id, seq, val)) in rows.iter().enumerate() {
            conn.execute(
                "INSERT INTO stage VALUES (?, ?, ?, ?, 0, ?)",
                duckdb::params![op, id, seq, val, n as i32],
            )
            .unwrap();
        }
        let staged = StagedRows {
            relation: "stage".into(),
            file_ordinal: "f".into(),
            row_ordinal: Some("r".into()),
            converted: Vec::new(),
        };
        let (create, record) = tombstone_statements("t", "tomb", plan, &staged).unwrap();
        conn.execute_batch(&create).unwrap();
        conn.execute(
            &merge_statement(Dialect::Duckdb, "t", plan, &staged, Some("tomb")),
            [],
        )
        .unwrap();
        conn.execute(&record, []).unwrap();
    }

    #[test]
    fn late_changes_never_rewind_rows_with_an_ordering_column() {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (id BIGINT, seq VARCHAR, val VARCHAR)")
            .unwrap();
        let plan = ApplyPlan {
            into: None,
            guard: None,
            history: None,
            load: ["id", "seq", "val"]
                .iter()
                .map(|c| LoadColumn {
                    target: c.to_string(),
                    expr: LoadExpr::Column(c.to_string()),
                })
                .collect(),
            ordering_column: Some("seq".into()),
            staged_columns: vec![
                Column::new("id", ColumnType::Int64),
                Column::new("seq", ColumnType::String),
                Column::new("val", ColumnType::String),
            ],
            ..sample_plan(LoadMode::Merge {
                key: vec![KeyColumn {
                    target: "id".into(),
                    source: "id".into(),
                }],
            })
        };
        // The current state: 1 at seq 05; 2 inserted at 02 and deleted at 06.
        merge_rows(
            &conn,
            &plan,
            &[
                ("I", 1, "05", "new"),
                ("I", 2, "02", "x"),
                ("D", 2, "06", "x"),
            ],
        );
        // A late file: older changes for 1 and 2, and a key never seen.
        merge_rows(
            &conn,
            &plan,
            &[
                ("U", 1, "03", "old"),
                ("I", 2, "04", "zombie"),
                ("I", 3, "01", "fresh"),
            ],
        );
        // A newer file: re-inserting 2 after its delete is a real change.
        merge_rows(
            &conn,
            &plan,
            &[("U", 1, "07", "newest"), ("I", 3, "00", "older than 01")],
        );
        let mut stmt = conn
            .prepare("SELECT id, seq, val FROM t ORDER BY id")
            .unwrap();
        let rows: Vec<(i64, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            rows,
            vec![
                (1, "07".into(), "newest".into()),
                (3, "01".into(), "fresh".into())
            ]
        );
        merge_rows(&conn, &plan, &[("I", 2, "08", "reborn")]);
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM t WHERE id = 2 AND val = 'reborn'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "a change newer than the delete brings the row back");
    }

    /// Applies `batches` of (op, id, val) rows with the MERGE on one table and with the
    /// delete-and-insert on another; both tables' rows must be equal after every batch.
    /// Long on purpose: the batches are the test's data, read top to bottom as a story.
    #[test]
    fn delete_and_insert_gives_the_merges_rows() {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE m (id BIGINT, v VARCHAR); CREATE TABLE r (id BIGINT, v VARCHAR)",
        )
        .unwrap();
        let plan = ApplyPlan {
            into: None,
            guard: None,
            history: None,
            load: ["id", "v"]
                .iter()
                .map(|c| LoadColumn {
                    target: c.to_string(),
                    expr: LoadExpr::Column(c.to_string()),
                })
                .collect(),
            staged_columns: vec![
                Column::new("id", ColumnType::Int64),
                Column::new("v", ColumnType::String),
            ],
            ..sample_plan(LoadMode::Merge {
                key: vec![KeyColumn {
                    target: "id".into(),
                    source: "id".into(),
                }],
            })
        };
        let staged = StagedRows {
            relation: "stage".into(),
            file_ordinal: "f".into(),
            row_ordinal: Some("r".into()),
            converted: Vec::new(),
        };
        let batches: [&[(&str, i64, &str)]; 3] = [
            &[
                ("I", 1, "a"),
                ("I", 2, "b"),
                ("I", 3, "c"),
                ("U", 1, "a2"),
                ("D", 9, ""),
            ],
            // Update, delete, delete then re-insert, insert then delete, a NULL-free new key.
            &[
                ("U", 2, "b2"),
                ("D", 3, ""),
                ("D", 1, ""),
                ("I", 1, "a3"),
                ("I", 4, "d"),
                ("D", 4, ""),
            ],
            &[("U", 5, "e"), ("U", 5, "e2"), ("D", 2, ""), ("I", 2, "b3")],
        ];
        for batch in batches {
            conn.execute_batch("DROP TABLE IF EXISTS stage; CREATE TABLE stage (\"Op\" VARCHAR, id BIGINT, v VARCHAR, f INTEGER, r INTEGER)")
                .unwrap();
            for (n, (op, id, v)) in batch.iter().enumerate() {
                conn.execute(
                    "INSERT INTO stage VALUES (?, ?, ?, ?, ?)",
                    duckdb::params![op, id, v, (n / 2) as i32, n as i32],
                )
                .unwrap();
            }
            conn.execute(
                &merge_statement(Dialect::Duckdb, "m", &plan, &staged, None),
                [],
            )
            .unwrap();
            for sql in delete_insert_statements(Dialect::Duckdb, "r", &plan, &staged).unwrap() {
                conn.execute_batch(&sql).unwrap();
            }
            let rows = |t: &str| -> Vec<(i64, String)> {
                let mut stmt = conn
                    .prepare(&format!("SELECT id, v FROM {t} ORDER BY id"))
                    .unwrap();
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            };
            assert_eq!(rows("m"), rows("r"), "after {batch:?}");
        }
        let final_rows: Vec<(i64, String)> = {
            let mut stmt = conn.prepare("SELECT id, v FROM r ORDER BY id").unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(
            final_rows,
            vec![(1, "a3".into()), (2, "b3".into()), (5, "e2".into())]
        );
        let ordered = ApplyPlan {
            into: None,
            guard: None,
            history: None,
            ordering_column: Some("v".into()),
            ..plan
        };
        assert!(
            delete_insert_statements(Dialect::Duckdb, "r", &ordered, &staged).is_none(),
            "an ordering column keeps the MERGE (its conditions compare with the target)"
        );
    }
}
