//! History tables (`history = "scd2"`, slowly changing dimension type 2): the one MERGE
//! that writes a segment's changes as versions, shared by both warehouses as the latest-row
//! MERGE is (`merge.rs`).
//!
//! Each version of a key is a row with `__valid_from`, `__valid_to` (NULL while current),
//! `__is_current` and `__op`. A segment's changes are *events* of their key at a version
//! time (`version_time`). The MERGE rebuilds, for each key the segment touches, the *tail*
//! of its history (the versions still valid at or after the segment's first change of that
//! key, usually just the current one) from the tail's own events and the new ones, in
//! version order: each version ends where the next event begins, and a delete event ends
//! the version before it with `__op = 'D'`. A late change therefore lands in its place in
//! the history, not at the end. Versions are matched on (key, `__valid_from`), so applying
//! the rebuilt tail only updates the versions it closes and inserts the new ones: existing
//! versions are never removed. Exactly-once is the ledger's, in the same transaction.

use crate::batch::{
    ApplyPlan, BatchFile, HISTORY_OP, HistoryReload, IS_CURRENT, LoadMode, VALID_FROM, VALID_TO,
};
use crate::schema::dialect::Dialect;
use crate::schema::types::ColumnType;

use super::merge::{
    FILE_ORDINAL_COLUMN, ROW_ORDINAL_COLUMN, StagedRows, load_expr, null_key, ordering,
    staged_select,
};
use super::sql::{ident, literal};

/// The event columns the statement adds, under the reserved prefix.
const VT: &str = "__cdc_vt";
const OP: &str = "__cdc_op";
const ORD: &str = "__cdc_ord";
const SRC: &str = "__cdc_src";
const NEXT_VT: &str = "__cdc_next_vt";
const NEXT_OP: &str = "__cdc_next_op";
const NOOP: &str = "__cdc_noop";
const GROUP: &str = "__cdc_version";
const GROUP_VT: &str = "__cdc_version_at";
const GROUP_OP: &str = "__cdc_version_op";
const SEQ: &str = "__cdc_seq";
/// 1 for a key of a reload's generation with a full-load version, else 0.
const LOADED: &str = "__cdc_loaded";
const VERSION_END: &str = "__cdc_version_end";
const VERSION_END_OP: &str = "__cdc_version_end_op";
const RANK: &str = "__cdc_rank";

/// The version time of rows of full-load files when no ordering column says better: a full
/// load does not say when each row last changed, so its rows are valid from the start.
pub const FULL_LOAD_TIME: &str = "1970-01-01 00:00:00";

fn full_load_time() -> String {
    format!("TIMESTAMP {}", literal(FULL_LOAD_TIME))
}

/// The largest row offset added to a change file's time.
const MAX_ROW_OFFSET_MICROS: u32 = 999;

/// `TIMESTAMP '...'` of the time DMS wrote each change file of the segment, by its position
/// (NULL for full-load files).
fn file_time(plan: &ApplyPlan, file_ordinal: &str) -> String {
    let arms: Vec<String> = plan
        .files
        .iter()
        .enumerate()
        .filter_map(|(i, f)| Some((i, written(f)?)))
        .map(|(i, at)| format!(" WHEN {i} THEN {at}"))
        .collect();
    if arms.is_empty() {
        return "CAST(NULL AS TIMESTAMP)".into();
    }
    format!("CASE {file_ordinal}{} END", arms.concat())
}

fn written(file: &BatchFile) -> Option<String> {
    crate::dms::change_file_time(&file.key).map(timestamp)
}

/// `TIMESTAMP 'yyyy-mm-dd hh:mm:ss.ffffff'` (UTC) of a time.
fn timestamp(at: std::time::SystemTime) -> String {
    let at = chrono::DateTime::<chrono::Utc>::from(at);
    format!(
        "TIMESTAMP {}",
        literal(&at.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
    )
}

/// The ordering column, when its values may be a time (DMS `TimestampColumnName` writes
/// `yyyy-MM-dd HH:mm:ss.SSSSSS` strings); `AR_H_CHANGE_SEQ` digits do not cast and fall
/// back to the file's time, the column still ordering events of the same time.
fn time_ordering(plan: &ApplyPlan) -> Option<&str> {
    let ord = plan.ordering_column.as_deref()?;
    let column = plan.staged_columns.iter().find(|c| c.name == ord)?;
    matches!(
        column.ty,
        ColumnType::String | ColumnType::Timestamp | ColumnType::TimestampTz | ColumnType::Date
    )
    .then_some(ord)
}

/// A staged row's version time (alias `s`): the ordering column as a timestamp where it is
/// one, else the time DMS wrote its file plus its row position in microseconds, up to
/// [`MAX_ROW_OFFSET_MICROS`] (DuckDB only: Firebolt cannot see a row's position in its
/// file), else [`FULL_LOAD_TIME`].
fn version_time(d: Dialect, plan: &ApplyPlan, rows: &StagedRows) -> String {
    let mut from_file = file_time(plan, &format!("s.{}", ident(FILE_ORDINAL_COLUMN)));
    // At most 999 µs: file names have millisecond resolution, so a file's rows never reach
    // the time of the next file (later rows of a file share its last microsecond, and keep
    // their order by row position).
    if d == Dialect::Duckdb && rows.row_ordinal.is_some() {
        from_file = format!(
            "{from_file} + to_microseconds(LEAST(CAST(s.{} AS BIGINT), {MAX_ROW_OFFSET_MICROS}))",
            ident(ROW_ORDINAL_COLUMN)
        );
    }
    let fallback = format!("COALESCE({from_file}, {})", full_load_time());
    let time = match time_ordering(plan) {
        Some(ord) => format!(
            "COALESCE(TRY_CAST(s.{} AS TIMESTAMP), {fallback})",
            ident(ord)
        ),
        None => fallback,
    };
    // A reload's generation times its full-load rows at FULL_LOAD_TIME whatever the
    // ordering column says (DMS's transfer time, later for each load file): that is how
    // `reload_statement` tells the keys of the new full load, and times them itself.
    let loads: Vec<String> = plan
        .files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.full_load)
        .map(|(i, _)| i.to_string())
        .collect();
    if plan.into.is_none() || loads.is_empty() {
        return time;
    }
    format!(
        "CASE WHEN s.{} IN ({}) THEN {} ELSE {time} END",
        ident(FILE_ORDINAL_COLUMN),
        loads.join(", "),
        full_load_time()
    )
}

/// `a."c1", a."c2", ...`
fn columns_of(alias: &str, columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| format!("{alias}.{}", ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A history table as the statements see it, in target names.
struct Shape<'a> {
    key: Vec<&'a str>,
    /// Every column an event carries, the key's included.
    values: Vec<&'a str>,
    /// The ordering column, loaded as it is.
    ord: Option<String>,
    tracked: &'a [String],
}

impl<'a> Shape<'a> {
    fn of(plan: &'a ApplyPlan, tracked: &'a [String]) -> Self {
        let LoadMode::Merge { key } = &plan.mode else {
            panic!("a history statement on a plan without a key");
        };
        Self {
            key: key.iter().map(|k| k.target.as_str()).collect(),
            values: plan.load.iter().map(|l| l.target.as_str()).collect(),
            ord: ordering(plan).map(|(target, _)| target),
            tracked,
        }
    }

    fn on_key(&self, left: &str, right: &str) -> String {
        self.key
            .iter()
            .map(|k| format!("{left}.{k} = {right}.{k}", k = ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn partition(&self, alias: &str) -> String {
        columns_of(alias, &self.key)
    }

    /// The events of each key numbered once in their order (`SEQ`): version time, then the
    /// ordering column, then existing versions before new events, then file and row
    /// position. Every later window orders by that number alone, so events that tie on all
    /// of these (changes of a key in one Firebolt file, which has no row position) are in
    /// the same order in each window.
    fn sequenced(&self, events: &str) -> String {
        let order: Vec<String> = [VT, ORD, SRC, FILE_ORDINAL_COLUMN, ROW_ORDINAL_COLUMN]
            .iter()
            .filter(|c| self.ord.is_some() || **c != ORD)
            .map(|c| {
                let nulls = if *c == ORD { " NULLS FIRST" } else { "" };
                format!("e.{}{nulls}", ident(c))
            })
            .collect();
        format!(
            "SELECT e.*, ROW_NUMBER() OVER (PARTITION BY {} ORDER BY {}) AS {} FROM ({events}) AS e",
            self.partition("e"),
            order.join(", "),
            ident(SEQ)
        )
    }

    fn over(&self, alias: &str) -> String {
        format!(
            "OVER (PARTITION BY {} ORDER BY {alias}.{})",
            self.partition(alias),
            ident(SEQ)
        )
    }

    /// `x.v1, x.v2, ...`: an event's values from a table aliased `x`.
    fn values_of(&self, alias: &str) -> String {
        columns_of(alias, &self.values)
    }

    /// `, x.ord AS __cdc_ord`, when there is an ordering column.
    fn ord_of(&self, alias: &str) -> String {
        self.ord
            .as_ref()
            .map(|o| format!(", {alias}.{} AS {}", ident(o), ident(ORD)))
            .unwrap_or_default()
    }

    /// Versions of the query `table` (alias `x`) as events: each opens at its `__valid_from` (or at
    /// `opened`), and one a delete closed also gives that delete at its `__valid_to`
    /// (after a version opened and deleted at the same time, before any other).
    fn version_events(&self, table: &str, src: u8, opened: &str, opened_row: &str) -> String {
        let event = |vt: &str, op: &str, row: &str| {
            format!(
                "SELECT {}, {vt} AS {}, {op} AS {}{}, {src} AS {}, -1 AS {}, {row} AS {} FROM ({table}) AS x",
                self.values_of("x"),
                ident(VT),
                ident(OP),
                self.ord_of("x"),
                ident(SRC),
                ident(FILE_ORDINAL_COLUMN),
                ident(ROW_ORDINAL_COLUMN),
            )
        };
        let op = ident(HISTORY_OP);
        let (from, to) = (ident(VALID_FROM), ident(VALID_TO));
        let opened = event(
            opened,
            &format!("CASE WHEN x.{op} = 'D' THEN 'U' ELSE x.{op} END"),
            opened_row,
        );
        let deleted = event(
            &format!("x.{to}"),
            "'D'",
            &format!("CASE WHEN x.{from} = x.{to} THEN 1 ELSE -2 END"),
        );
        format!("{opened} UNION ALL {deleted} WHERE x.{op} = 'D'")
    }

    /// The versions of `target` that `new_events` may end or follow: still valid at the
    /// key's first new event.
    fn tail(&self, target: &str, new_events: &str) -> String {
        format!(
            "SELECT t.* FROM {target} AS t JOIN (SELECT {p}, MIN(n.{vt}) AS {vt} FROM ({new_events}) AS n GROUP BY {p}) AS f ON {on} WHERE t.{to} IS NULL OR t.{to} >= f.{vt}",
            p = self.partition("n"),
            vt = ident(VT),
            on = self.on_key("t", "f"),
            to = ident(VALID_TO),
        )
    }

    /// The events of each key in order, each with the version it belongs to (`GVT`, when
    /// that version opened, and `GOP`, the operation that opened it): a new update that
    /// changes no tracked column of the event before it opens no version, it updates the
    /// version before it in place, as AUTO CDC's `TRACK HISTORY ON` does.
    fn grouped(&self, events: &str) -> String {
        let over = self.over("e");
        let mut same = vec![format!(
            "e.{src} = 1 AND e.{op} <> 'D' AND LAG(e.{op}) {over} <> 'D'",
            src = ident(SRC),
            op = ident(OP)
        )];
        same.extend(
            self.tracked
                .iter()
                .map(|c| format!("e.{c} IS NOT DISTINCT FROM LAG(e.{c}) {over}", c = ident(c))),
        );
        let flagged = format!(
            "SELECT e.*, CASE WHEN {} THEN 1 ELSE 0 END AS {} FROM ({}) AS e",
            same.join(" AND "),
            ident(NOOP),
            self.sequenced(events),
        );
        let numbered = format!(
            "SELECT q.*, SUM(1 - q.{noop}) OVER (PARTITION BY {} ORDER BY q.{seq} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS {grp} FROM ({flagged}) AS q",
            self.partition("q"),
            seq = ident(SEQ),
            noop = ident(NOOP),
            grp = ident(GROUP),
        );
        let version = format!("PARTITION BY {}, g.{}", self.partition("g"), ident(GROUP));
        format!(
            "SELECT g.*, MIN(g.{vt}) OVER ({version}) AS {gvt}, MAX(CASE WHEN g.{noop} = 0 THEN g.{op} END) OVER ({version}) AS {gop} FROM ({numbered}) AS g",
            vt = ident(VT),
            noop = ident(NOOP),
            op = ident(OP),
            gvt = ident(GROUP_VT),
            gop = ident(GROUP_OP),
        )
    }

    /// `MERGE INTO target` of the versions that `new_events` (existing versions are
    /// `SRC` 0, new events 1) open and close, over the tail of each key's history.
    fn merge(&self, target: &str, new_events: &str) -> String {
        let tail = self.tail(target, new_events);
        let events = format!(
            "{new_events} UNION ALL {}",
            self.version_events(&tail, 0, &format!("x.{}", ident(VALID_FROM)), "-1")
        );
        let over = self.over("e");
        let chain = format!(
            "SELECT e.*, LEAD(e.{vt}) {over} AS {nvt}, LEAD(e.{op}) {over} AS {nop} FROM ({}) AS e",
            self.grouped(&events),
            vt = ident(VT),
            op = ident(OP),
            nvt = ident(NEXT_VT),
            nop = ident(NEXT_OP),
        );
        // One version per (key, time). Its values: its newest event by the ordering column
        // (a late update of untracked columns does not undo a newer one), else its last;
        // its end: where the event after its last one begins.
        let version = format!(
            "PARTITION BY {}, c.{}",
            self.partition("c"),
            ident(GROUP_VT)
        );
        let newest = match &self.ord {
            Some(_) => format!("c.{} DESC NULLS LAST, ", ident(ORD)),
            None => String::new(),
        };
        let last = format!("ORDER BY c.{} DESC", ident(SEQ));
        let versions = format!(
            "SELECT * FROM (SELECT c.*, ROW_NUMBER() OVER ({version} ORDER BY {newest}c.{seq} DESC) AS {rank}, FIRST_VALUE(c.{nvt}) OVER ({version} {last}) AS {vnvt}, FIRST_VALUE(c.{nop}) OVER ({version} {last}) AS {vnop} FROM ({chain}) AS c WHERE c.{op} <> 'D') AS v WHERE v.{rank} = 1",
            seq = ident(SEQ),
            nvt = ident(NEXT_VT),
            nop = ident(NEXT_OP),
            vnvt = ident(VERSION_END),
            vnop = ident(VERSION_END_OP),
            op = ident(OP),
            rank = ident(RANK),
        );
        let meta = [
            (VALID_TO, format!("s.{}", ident(VERSION_END))),
            (IS_CURRENT, format!("s.{} IS NULL", ident(VERSION_END))),
            (
                HISTORY_OP,
                format!(
                    "CASE WHEN s.{} = 'D' THEN 'D' ELSE s.{} END",
                    ident(VERSION_END_OP),
                    ident(GROUP_OP)
                ),
            ),
        ];
        let updates: Vec<String> = self
            .values
            .iter()
            .filter(|c| !self.key.contains(c))
            .map(|c| format!("{c} = s.{c}", c = ident(c)))
            .chain(meta.iter().map(|(c, v)| format!("{} = {v}", ident(c))))
            .collect();
        let mut insert_cols: Vec<String> = self.values.iter().map(|c| ident(c)).collect();
        let mut insert_vals: Vec<String> = insert_cols.iter().map(|c| format!("s.{c}")).collect();
        insert_cols.push(ident(VALID_FROM));
        insert_vals.push(format!("s.{}", ident(GROUP_VT)));
        for (c, v) in &meta {
            insert_cols.push(ident(c));
            insert_vals.push(v.clone());
        }
        format!(
            "MERGE INTO {target} AS t USING ({versions}) AS s ON {} AND t.{} = s.{} WHEN MATCHED THEN UPDATE SET {} WHEN NOT MATCHED THEN INSERT ({}) VALUES ({})",
            self.on_key("t", "s"),
            ident(VALID_FROM),
            ident(GROUP_VT),
            updates.join(", "),
            insert_cols.join(", "),
            insert_vals.join(", ")
        )
    }
}

/// The segment's changes as events, under target names (rows with a NULL key left out).
fn new_events(d: Dialect, plan: &ApplyPlan, rows: &StagedRows) -> String {
    let LoadMode::Merge { key } = &plan.mode else {
        panic!("a history statement on a plan without a key");
    };
    let mut cols: Vec<String> = plan
        .load
        .iter()
        .map(|l| format!("{} AS {}", load_expr(d, &l.expr, "s"), ident(&l.target)))
        .collect();
    cols.push(format!("{} AS {}", version_time(d, plan, rows), ident(VT)));
    let op = match &plan.op_column {
        Some(op) => format!("COALESCE(s.{}, 'I')", ident(op)),
        None => "'I'".into(),
    };
    cols.push(format!("{op} AS {}", ident(OP)));
    if let Some((_, source)) = ordering(plan) {
        cols.push(format!("s.{} AS {}", ident(&source), ident(ORD)));
    }
    cols.push(format!("1 AS {}", ident(SRC)));
    cols.push(format!("s.{f} AS {f}", f = ident(FILE_ORDINAL_COLUMN)));
    let row = match rows.row_ordinal {
        Some(_) => format!("s.{}", ident(ROW_ORDINAL_COLUMN)),
        None => "0".into(),
    };
    cols.push(format!("{row} AS {}", ident(ROW_ORDINAL_COLUMN)));
    let source_key: Vec<String> = key.iter().map(|k| k.source.clone()).collect();
    format!(
        "SELECT {} FROM ({}) AS s WHERE NOT ({})",
        cols.join(", "),
        staged_select(plan, rows),
        null_key(&source_key, "s")
    )
}

/// `MERGE INTO target` of the versions a segment opens and closes; `target` is already
/// quoted. `tracked`: the columns whose change opens a version.
pub fn history_statement(
    d: Dialect,
    target: &str,
    plan: &ApplyPlan,
    rows: &StagedRows,
    tracked: &[String],
) -> String {
    Shape::of(plan, tracked).merge(target, &new_events(d, plan, rows))
}

/// A reload of a history table: the versions of its new generation `next` (built from
/// the new full load and the changes after it) merged into the live history `target`, as
/// events of the reload. Both names already quoted. The new full load's rows happen at the
/// reload's time (`reload.at`, or the generation's first change if earlier), so a key whose
/// values did not change gets no version; a key the new full load lacks is closed then
/// (`D`); the generation's later changes keep their own times.
pub fn reload_statement(target: &str, next: &str, reload: &HistoryReload) -> String {
    let shape = Shape {
        key: reload.key.iter().map(String::as_str).collect(),
        values: reload.columns.iter().map(String::as_str).collect(),
        ord: reload.ordering.clone(),
        tracked: &reload.tracked,
    };
    let from = ident(VALID_FROM);
    let start = full_load_time();
    let first_change = format!("(SELECT MIN(g.{from}) FROM {next} AS g WHERE g.{from} <> {start})");
    // The earlier of the two, without LEAST (not found in the Firebolt function reference we checked).
    let at = format!(
        "COALESCE(CASE WHEN {first_change} < {at} THEN {first_change} END, {at})",
        at = timestamp(reload.at)
    );
    let full_load = format!("x.{from} = {start}");
    let opened = format!("CASE WHEN {full_load} THEN {at} ELSE x.{from} END");
    // A full-load row comes before a change of its key at the same time.
    let opened_row = format!("CASE WHEN {full_load} THEN -3 ELSE -1 END");
    let generation =
        shape.version_events(&format!("SELECT * FROM {next}"), 1, &opened, &opened_row);
    // A key of the live table absent from the new full load (no version of the generation
    // at FULL_LOAD_TIME) is closed at the reload's time, or before the generation's first
    // change of it if that is earlier (a change DMS cached during the load), and never
    // before its current version began. Row -4: before a generation event at that time.
    let first = format!("k.{}", ident(VT));
    let closed_at = format!(
        "CASE WHEN x.{from} > {at} THEN x.{from} WHEN {first} IS NOT NULL AND {first} < {at} AND {first} >= x.{from} THEN {first} ELSE {at} END"
    );
    let absent = format!(
        "SELECT {}, {closed_at} AS {}, 'D' AS {}{}, 1 AS {}, -1 AS {}, -4 AS {} FROM {target} AS x LEFT JOIN (SELECT {p}, MIN(g.{from}) AS {vt}, MAX(CASE WHEN g.{from} = {start} THEN 1 ELSE 0 END) AS {loaded} FROM {next} AS g GROUP BY {p}) AS k ON {} WHERE x.{} AND (k.{} IS NULL OR k.{loaded} = 0)",
        shape.values_of("x"),
        ident(VT),
        ident(OP),
        shape.ord_of("x"),
        ident(SRC),
        ident(FILE_ORDINAL_COLUMN),
        ident(ROW_ORDINAL_COLUMN),
        shape.on_key("x", "k"),
        ident(IS_CURRENT),
        ident(shape.key[0]),
        p = shape.partition("g"),
        vt = ident(VT),
        loaded = ident(LOADED),
    );
    shape.merge(target, &format!("{generation} UNION ALL {absent}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{KeyColumn, LoadColumn, LoadExpr};
    use crate::schema::types::Column;

    type Version = (i64, String, String, Option<String>, bool, String);
    /// (op, id, v, ts) rows of one file.
    type FileRows<'a> = (&'a str, &'a [(&'a str, i64, &'a str, &'a str)]);

    fn change_file(name: &str) -> BatchFile {
        BatchFile {
            bucket: "b".into(),
            key: format!("dbo/t/{name}"),
            size: 1,
            etag: name.into(),
            order_key: name.into(),
            full_load: name.starts_with("LOAD"),
        }
    }

    fn plan(ordering: Option<&str>) -> ApplyPlan {
        let columns = ["id", "v", "ts"];
        ApplyPlan {
            batch_id: "b".into(),
            table: "t".into(),
            ddl: vec![],
            load: columns
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
            op_column: Some("Op".into()),
            ordering_column: ordering.map(str::to_string),
            staged_columns: vec![
                Column::new("id", ColumnType::Int64),
                Column::new("v", ColumnType::String),
                Column::new("ts", ColumnType::String),
            ],
            files: vec![],
            fence: None,
            into: None,
            guard: None,
            history: None,
        }
    }

    fn database() -> duckdb::Connection {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id BIGINT, v VARCHAR, ts VARCHAR, __valid_from TIMESTAMP, __valid_to TIMESTAMP, __is_current BOOLEAN, __op VARCHAR)",
        )
        .unwrap();
        conn
    }

    /// Applies files of (op, id, v, ts) rows as one segment to the plan's table, in both
    /// renderings' terms:
    /// `firebolt` leaves out the row position, as Firebolt's staging table has none.
    fn apply(conn: &duckdb::Connection, p: &ApplyPlan, files: &[FileRows<'_>], firebolt: bool) {
        conn.execute_batch("DROP TABLE IF EXISTS stage; CREATE TABLE stage (\"Op\" VARCHAR, id BIGINT, v VARCHAR, ts VARCHAR, f INTEGER, r BIGINT)").unwrap();
        for (f, (_, rows)) in files.iter().enumerate() {
            for (r, (op, id, v, ts)) in rows.iter().enumerate() {
                conn.execute(
                    "INSERT INTO stage VALUES (?, ?, ?, ?, ?, ?)",
                    duckdb::params![op, id, v, ts, f as i32, r as i64],
                )
                .unwrap();
            }
        }
        let plan = ApplyPlan {
            files: files.iter().map(|(name, _)| change_file(name)).collect(),
            ..p.clone()
        };
        let staged = StagedRows {
            relation: "stage".into(),
            file_ordinal: "f".into(),
            row_ordinal: (!firebolt).then(|| "r".into()),
            converted: Vec::new(),
        };
        let d = if firebolt {
            Dialect::Firebolt
        } else {
            Dialect::Duckdb
        };
        let sql = history_statement(d, plan.target_table(), &plan, &staged, &["v".to_string()]);
        conn.execute(&sql, [])
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
    }

    fn versions(conn: &duckdb::Connection) -> Vec<Version> {
        let mut stmt = conn
            .prepare("SELECT id, v, strftime(__valid_from, '%H:%M:%S.%f'), strftime(__valid_to, '%H:%M:%S.%f'), __is_current, __op FROM t ORDER BY id, __valid_from")
            .unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    fn v(id: i64, val: &str, from: &str, to: Option<&str>, op: &str) -> Version {
        (
            id,
            val.into(),
            from.into(),
            to.map(str::to_string),
            to.is_none(),
            op.into(),
        )
    }

    /// The table as of `at` (a time of 2026-12-01): the docs' as-of query.
    fn as_of(conn: &duckdb::Connection, at: &str) -> Vec<(i64, String)> {
        let sql = format!(
            "SELECT id, v FROM t WHERE __valid_from <= TIMESTAMP '2026-12-01 {at}' AND (__valid_to IS NULL OR __valid_to > TIMESTAMP '2026-12-01 {at}') ORDER BY id"
        );
        let mut stmt = conn.prepare(&sql).unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    const EPOCH: &str = "00:00:00.000000";

    #[test]
    fn updates_deletes_and_reinserts_become_versions_in_file_and_row_order() {
        let conn = database();
        let p = plan(None);
        apply(
            &conn,
            &p,
            &[(
                "LOAD00000001.parquet",
                &[("I", 1, "a", ""), ("I", 2, "b", ""), ("I", 3, "c", "")],
            )],
            false,
        );
        apply(
            &conn,
            &p,
            &[
                (
                    "20261201-100000000.parquet",
                    &[
                        ("U", 1, "a2", ""),
                        ("U", 1, "a3", ""),
                        ("D", 2, "b", ""),
                        ("U", 3, "c", ""),
                    ],
                ),
                (
                    "20261201-100100000.parquet",
                    &[("I", 2, "b2", ""), ("I", 4, "d", ""), ("D", 4, "d", "")],
                ),
            ],
            false,
        );
        apply(
            &conn,
            &p,
            &[(
                "20261201-100200000.parquet",
                &[("D", 1, "a3", ""), ("U", 3, "c", "")],
            )],
            false,
        );
        assert_eq!(
            versions(&conn),
            vec![
                v(1, "a", EPOCH, Some("10:00:00.000000"), "I"),
                v(1, "a2", "10:00:00.000000", Some("10:00:00.000001"), "U"),
                v(1, "a3", "10:00:00.000001", Some("10:02:00.000000"), "D"),
                v(2, "b", EPOCH, Some("10:00:00.000002"), "D"),
                v(2, "b2", "10:01:00.000000", None, "I"),
                v(3, "c", EPOCH, None, "I"),
                v(4, "d", "10:01:00.000001", Some("10:01:00.000002"), "D"),
            ]
        );
        assert_eq!(
            as_of(&conn, "09:00:00"),
            vec![(1, "a".into()), (2, "b".into()), (3, "c".into())]
        );
        assert_eq!(
            as_of(&conn, "10:00:30"),
            vec![(1, "a3".into()), (3, "c".into())]
        );
        assert_eq!(
            as_of(&conn, "10:03:00"),
            vec![(2, "b2".into()), (3, "c".into())]
        );
    }

    #[test]
    fn a_late_change_with_an_ordering_column_lands_in_its_place() {
        for firebolt in [false, true] {
            let conn = database();
            let p = plan(Some("ts"));
            let t = |hm: &str| format!("2026-12-01 {hm}:00.000000");
            let (t0, t5, t9) = (t("10:00"), t("10:05"), t("10:09"));
            apply(
                &conn,
                &p,
                &[(
                    "20261201-101000000.parquet",
                    &[("I", 1, "x", &t0), ("U", 1, "z", &t5), ("U", 1, "zz", &t9)],
                )],
                firebolt,
            );
            // A late file: an update between x and z, a delete after it, one before all.
            let (t2, t3) = (t("10:02"), t("10:03"));
            apply(
                &conn,
                &p,
                &[(
                    "20261201-100400000.parquet",
                    &[
                        ("U", 1, "y", &t2),
                        ("D", 1, "y", &t3),
                        ("I", 2, "early", &t2),
                    ],
                )],
                firebolt,
            );
            assert_eq!(
                versions(&conn),
                vec![
                    v(1, "x", "10:00:00.000000", Some("10:02:00.000000"), "I"),
                    v(1, "y", "10:02:00.000000", Some("10:03:00.000000"), "D"),
                    v(1, "z", "10:05:00.000000", Some("10:09:00.000000"), "U"),
                    v(1, "zz", "10:09:00.000000", None, "U"),
                    v(2, "early", "10:02:00.000000", None, "I"),
                ],
                "firebolt rendering: {firebolt}"
            );
            assert_eq!(as_of(&conn, "10:04:00"), vec![(2, "early".into())]);
        }
    }

    #[test]
    fn a_reload_merges_its_generation_into_the_history() {
        let conn = database();
        conn.execute_batch("CREATE TABLE g AS SELECT * FROM t")
            .unwrap();
        let p = plan(None);
        let load: &[(&str, i64, &str, &str)] =
            &[("I", 1, "a", ""), ("I", 2, "b", ""), ("I", 3, "c", "")];
        apply(&conn, &p, &[("LOAD00000001.parquet", load)], false);
        apply(
            &conn,
            &p,
            &[("20261201-100000000.parquet", &[("U", 1, "a2", "")])],
            false,
        );
        // The new generation: 1 as it is, 2 changed, 3 gone, 4 new; then a change of 4.
        let generation = ApplyPlan {
            into: Some("g".into()),
            ..p.clone()
        };
        let new_load: &[(&str, i64, &str, &str)] =
            &[("I", 1, "a2", ""), ("I", 2, "b2", ""), ("I", 4, "d", "")];
        apply(
            &conn,
            &generation,
            &[("LOAD00000001.parquet", new_load)],
            false,
        );
        // 3 is not in the new full load but inserted again after it.
        let after: &[(&str, i64, &str, &str)] = &[("U", 4, "d2", ""), ("I", 3, "c", "")];
        apply(
            &conn,
            &generation,
            &[("20261201-110000000.parquet", after)],
            false,
        );
        let reload = HistoryReload {
            key: vec!["id".into()],
            columns: vec!["id".into(), "v".into(), "ts".into()],
            add_columns: vec![],
            tracked: vec!["v".into()],
            ordering: None,
            // 2026-12-01 10:30:00 UTC
            at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_121_000),
        };
        conn.execute(&reload_statement("t", "g", &reload), [])
            .unwrap();
        assert_eq!(
            versions(&conn),
            vec![
                v(1, "a", EPOCH, Some("10:00:00.000000"), "I"),
                v(1, "a2", "10:00:00.000000", None, "U"),
                v(2, "b", EPOCH, Some("10:30:00.000000"), "I"),
                v(2, "b2", "10:30:00.000000", None, "I"),
                v(3, "c", EPOCH, Some("10:30:00.000000"), "D"),
                v(3, "c", "11:00:00.000001", None, "I"),
                v(4, "d", "10:30:00.000000", Some("11:00:00.000000"), "I"),
                v(4, "d2", "11:00:00.000000", None, "U"),
            ]
        );
    }

    /// `ts` is not tracked: an update that changes only it opens no version but updates the
    /// version before it in place.
    #[test]
    fn an_update_of_untracked_columns_only_updates_its_version_in_place() {
        let conn = database();
        let p = plan(None);
        apply(
            &conn,
            &p,
            &[(
                "20261201-100000000.parquet",
                &[
                    ("I", 1, "a", "t1"),
                    ("I", 2, "x", "s1"),
                    ("U", 2, "x", "s2"),
                ],
            )],
            false,
        );
        apply(
            &conn,
            &p,
            &[(
                "20261201-100100000.parquet",
                &[("U", 1, "a", "t2"), ("U", 1, "b", "t3")],
            )],
            false,
        );
        assert_eq!(
            versions(&conn),
            vec![
                v(1, "a", "10:00:00.000000", Some("10:01:00.000001"), "I"),
                v(1, "b", "10:01:00.000001", None, "U"),
                v(2, "x", "10:00:00.000001", None, "I"),
            ]
        );
        assert_eq!(
            ts_values(&conn),
            ["t2", "t3", "s2"],
            "untracked values updated in place"
        );
    }

    /// `ts` of every version, in the order of [`versions`].
    fn ts_values(conn: &duckdb::Connection) -> Vec<String> {
        conn.prepare("SELECT ts FROM t ORDER BY id, __valid_from")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Changes of a key that tie on every order column (one Firebolt file, one commit time)
    /// are ordered once for all windows: the key keeps exactly one current version.
    #[test]
    fn changes_that_tie_in_a_firebolt_file_leave_one_current_version() {
        for _ in 0..5 {
            let conn = database();
            let p = plan(Some("ts"));
            let t = |hm: &str| format!("2026-12-01 {hm}:00.000000");
            let (t0, t5) = (t("10:00"), t("10:05"));
            let first: &[(&str, i64, &str, &str)] = &[("I", 1, "x", &t0)];
            apply(&conn, &p, &[("20261201-100000000.parquet", first)], true);
            let tied: &[(&str, i64, &str, &str)] = &[("U", 1, "a", &t5), ("U", 1, "b", &t5)];
            apply(&conn, &p, &[("20261201-100500000.parquet", tied)], true);
            let current: Vec<Version> = versions(&conn).into_iter().filter(|v| v.4).collect();
            assert_eq!(current.len(), 1, "{:?}", versions(&conn));
            assert_eq!(current[0].2, "10:05:00.000000");
        }
    }

    /// A file's row offsets stop short of the next file's time (names have millisecond
    /// resolution), so the next file's change stays the later one.
    #[test]
    fn row_offsets_never_reach_the_next_file() {
        let conn = database();
        let p = plan(None);
        let mut big: Vec<(&str, i64, &str, &str)> =
            (0..1499).map(|n| ("I", 100 + n, "o", "")).collect();
        big.push(("U", 1, "old", ""));
        let next: &[(&str, i64, &str, &str)] = &[("U", 1, "new", "")];
        apply(
            &conn,
            &p,
            &[
                ("20261201-100000000.parquet", &big),
                ("20261201-100000001.parquet", next),
            ],
            false,
        );
        let one: Vec<Version> = versions(&conn).into_iter().filter(|v| v.0 == 1).collect();
        assert_eq!(
            one,
            vec![
                v(1, "old", "10:00:00.000999", Some("10:00:00.001000"), "U"),
                v(1, "new", "10:00:00.001000", None, "U"),
            ]
        );
    }

    /// A late update of untracked columns only does not undo a newer one.
    #[test]
    fn a_late_untracked_update_keeps_the_newer_values() {
        let conn = database();
        let p = plan(Some("ts"));
        let t = |hm: &str| format!("2026-12-01 {hm}:00.000000");
        let (t0, t2, t4) = (t("10:00"), t("10:02"), t("10:04"));
        let on_time: &[(&str, i64, &str, &str)] = &[("I", 1, "x", &t0), ("U", 1, "x", &t4)];
        apply(&conn, &p, &[("20261201-100500000.parquet", on_time)], false);
        let late: &[(&str, i64, &str, &str)] = &[("U", 1, "x", &t2)];
        apply(&conn, &p, &[("20261201-100300000.parquet", late)], false);
        assert_eq!(
            ts_values(&conn),
            vec![t4],
            "one version, with the newest ts"
        );
    }

    /// With a time ordering column, a generation's full-load rows carry DMS's transfer
    /// times, later for each load file: the generation times them at FULL_LOAD_TIME, so the
    /// keys of the new full load are told by that, not by their times.
    #[test]
    fn a_reload_with_a_time_ordering_column_tells_its_full_load_keys_by_their_files() {
        let conn = database();
        conn.execute_batch("CREATE TABLE g AS SELECT * FROM t")
            .unwrap();
        let p = plan(Some("ts"));
        let t = |hm: &str| format!("2026-12-01 {hm}:00.000000");
        let load: &[(&str, i64, &str, &str)] = &[
            ("I", 1, "a", &t("09:00")),
            ("I", 2, "b", &t("09:00")),
            ("I", 4, "d", &t("09:00")),
        ];
        apply(&conn, &p, &[("LOAD00000001.parquet", load)], false);
        let generation = ApplyPlan {
            into: Some("g".into()),
            ..p.clone()
        };
        let (t10_20, t10_40) = (t("10:20"), t("10:40"));
        // 1 as it is, in the second load file (transferred after the reload's time); 2 and 4
        // gone from the load; 4 and 3 inserted by changes DMS cached during it.
        let second: &[(&str, i64, &str, &str)] = &[("I", 1, "a", &t10_40)];
        let cached: &[(&str, i64, &str, &str)] = &[("I", 4, "d2", &t10_20), ("I", 3, "c", &t10_20)];
        let gen_files = [
            ("LOAD00000001.parquet", &[][..]),
            ("LOAD00000002.parquet", second),
            ("20261201-110000000.parquet", cached),
        ];
        apply(&conn, &generation, &gen_files, false);
        let reload = HistoryReload {
            key: vec!["id".into()],
            columns: vec!["id".into(), "v".into(), "ts".into()],
            add_columns: vec![],
            tracked: vec!["v".into()],
            ordering: Some("ts".into()),
            // 2026-12-01 10:30:00 UTC
            at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_121_000),
        };
        conn.execute(&reload_statement("t", "g", &reload), [])
            .unwrap();
        let nine = "09:00:00.000000";
        assert_eq!(
            versions(&conn),
            vec![
                v(1, "a", nine, None, "I"),
                v(2, "b", nine, Some("10:20:00.000000"), "D"),
                v(3, "c", "10:20:00.000000", None, "I"),
                v(4, "d", nine, Some("10:20:00.000000"), "D"),
                v(4, "d2", "10:20:00.000000", None, "I"),
            ]
        );
    }
}
