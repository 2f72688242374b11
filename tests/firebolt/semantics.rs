//! The Firebolt-dialect statements executed on DuckDB wherever the syntax is common, so
//! the dedupe/MERGE logic Firebolt runs is checked on a real engine: a DuckDB table shaped
//! like the Firebolt staging table (created by the same CREATE), filled with rows and
//! source file names, then the exact MERGE/append/check/ledger SQL the Firebolt apply
//! sends. Only `PRIMARY INDEX` (Firebolt's sort key) is cut, as DuckDB has none.

use cdc_worker::batch::{ApplyPlan, BatchFile, KeyColumn, LoadColumn, LoadExpr, LoadMode};
use cdc_worker::schema::dialect::Dialect;
use cdc_worker::schema::types::{Column, ColumnType};
use cdc_worker::warehouse::LEDGER_TABLE;
use cdc_worker::warehouse::firebolt::sql;
use cdc_worker::warehouse::merge;
use duckdb::Connection;

const STAGE: &str = "\"main\".\"_cdc_worker_stage__1_00000001_b1\"";
const TARGET: &str = "\"main\".\"Orders \"\"x\"\"\"";

fn without_primary_index(sql: &str) -> String {
    match sql.find(" PRIMARY INDEX ") {
        Some(i) => sql[..i].to_string(),
        None => sql.to_string(),
    }
}

fn file(key: &str, order: &str) -> BatchFile {
    BatchFile {
        bucket: "dms".into(),
        key: key.into(),
        size: 10,
        etag: format!("e{order}"),
        order_key: order.into(),
        full_load: false,
    }
}

/// A source with a hostile column name, keyed on `ID`.
fn plan(mode: LoadMode, ordering: Option<&str>, files: &[BatchFile]) -> ApplyPlan {
    let staged_columns = vec![
        Column::new("ID", ColumnType::Int64),
        Column::new("na\"me; --", ColumnType::String),
        Column::new("seq", ColumnType::String),
    ];
    ApplyPlan {
        into: None,
        guard: None,
        history: None,
        batch_id: "b1".into(),
        table: "Orders \"x\"".into(),
        ddl: vec![],
        load: vec![
            LoadColumn {
                target: "id".into(),
                expr: LoadExpr::Column("ID".into()),
            },
            LoadColumn {
                target: "na\"me; --".into(),
                expr: LoadExpr::Column("na\"me; --".into()),
            },
            LoadColumn {
                target: "seq".into(),
                expr: LoadExpr::Column("seq".into()),
            },
        ],
        mode,
        op_column: Some("Op".into()),
        ordering_column: ordering.map(str::to_string),
        staged_columns,
        files: files.to_vec(),
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

fn target_columns() -> Vec<Column> {
    vec![
        Column::new("id", ColumnType::Int64),
        Column::new("na\"me; --", ColumnType::String),
        Column::new("seq", ColumnType::String),
    ]
}

/// Creates the staging table with the Firebolt CREATE and fills it as COPY would:
/// (file key, Op, ID, name, seq) per row.
fn stage(conn: &Connection, p: &ApplyPlan, rows: &[(&str, &str, i64, &str, &str)]) {
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {STAGE}"))
        .unwrap();
    conn.execute_batch(&sql::create_staging(STAGE, p)).unwrap();
    for (key, op, id, name, seq) in rows {
        conn.execute(
            &format!("INSERT INTO {STAGE} (\"ID\", \"na\"\"me; --\", \"seq\", \"Op\", \"__cdc_source_file\") VALUES (?, ?, ?, ?, ?)"),
            duckdb::params![id, name, seq, op, key],
        )
        .unwrap();
    }
}

/// The statements the Firebolt apply sends after COPY, in order (check, tombstones, MERGE or
/// append, tombstone record, ledger), on DuckDB. Returns the check row.
fn apply(conn: &Connection, p: &ApplyPlan) -> Vec<i64> {
    let rows = sql::staged_rows(STAGE, p, &p.files);
    let (check, layout) = sql::check_query(p, STAGE, &p.files);
    let width = 2
        + [
            layout.null_keys,
            layout.distinct_keys,
            layout.ambiguous_keys,
            layout.deletes,
        ]
        .iter()
        .flatten()
        .count()
        + layout.cast_failures.len();
    let counts: Vec<i64> = conn
        .query_row(&check, [], |r| {
            (0..width)
                .map(|i| r.get::<_, Option<i64>>(i).map(|v| v.unwrap_or(0)))
                .collect()
        })
        .unwrap();
    let tombstones =
        cdc_worker::warehouse::sql::qualified("main", &merge::tombstone_table(&p.table));
    let tomb = merge::tombstone_statements(TARGET, &tombstones, p, &rows);
    if let Some((create, _)) = &tomb {
        conn.execute_batch(create).unwrap();
    }
    match &p.mode {
        LoadMode::Merge { .. } => conn
            .execute_batch(&merge::merge_statement(
                Dialect::Firebolt,
                TARGET,
                p,
                &rows,
                Some(&tombstones),
            ))
            .unwrap(),
        LoadMode::Append => conn
            .execute_batch(&merge::append_statement(
                Dialect::Firebolt,
                TARGET,
                p,
                &rows,
            ))
            .unwrap(),
    }
    if let Some((_, record)) = &tomb {
        conn.execute_batch(record).unwrap();
    }
    conn.execute_batch(&sql::ledger_insert(
        &cdc_worker::warehouse::sql::qualified("main", LEDGER_TABLE),
        p,
    ))
    .unwrap();
    counts
}

fn setup() -> Connection {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(&without_primary_index(&sql::create_table(
        TARGET,
        &target_columns(),
        &["id".into()],
        true,
    )))
    .unwrap();
    conn.execute_batch(&without_primary_index(&sql::create_ledger(
        &cdc_worker::warehouse::sql::qualified("main", LEDGER_TABLE),
    )))
    .unwrap();
    conn
}

fn target_rows(conn: &Connection) -> Vec<(i64, String, String)> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT id, \"na\"\"me; --\", seq FROM {TARGET} ORDER BY id"
        ))
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn the_latest_change_per_key_wins_by_file_order_without_an_ordering_column() {
    let conn = setup();
    let files = vec![
        file("t/1.parquet", "0001"),
        file("t/it's 2.parquet", "0002"),
    ];
    let p = plan(keyed(), None, &files);
    stage(
        &conn,
        &p,
        &[
            // Staging rows arrive in no particular order: only the file decides.
            ("t/it's 2.parquet", "U", 1, "one v2", "s2"),
            ("t/1.parquet", "I", 1, "one v1", "s1"),
            ("t/1.parquet", "I", 2, "two", "s1"),
            ("t/it's 2.parquet", "D", 2, "two", "s2"),
            ("t/it's 2.parquet", "I", 3, "three", "s2"),
        ],
    );
    let counts = apply(&conn, &p);
    // staged rows, rows from unknown files, NULL keys, distinct keys, keys changed twice
    // in one file, delete rows (for the destructive-change guard).
    assert_eq!(counts, vec![5, 0, 0, 3, 0, 1]);
    assert_eq!(
        target_rows(&conn),
        vec![
            (1, "one v2".into(), "s2".into()),
            (3, "three".into(), "s2".into())
        ]
    );
}

#[test]
fn several_changes_of_a_key_in_one_file_are_detected() {
    let conn = setup();
    let files = vec![file("t/1.parquet", "0001")];
    let p = plan(keyed(), None, &files);
    stage(
        &conn,
        &p,
        &[
            ("t/1.parquet", "I", 1, "a", "s1"),
            ("t/1.parquet", "U", 1, "b", "s2"),
            ("t/1.parquet", "I", 2, "c", "s1"),
            ("t/other.parquet", "I", 9, "?", "s1"),
        ],
    );
    let counts = apply(&conn, &p);
    assert_eq!(
        counts[1], 1,
        "a row from a file outside the batch is flagged"
    );
    assert_eq!(counts[4], 1, "key 1 changed twice in one file");
}

#[test]
fn an_ordering_column_decides_inside_a_file_and_late_files_never_rewind() {
    let conn = setup();
    let files = vec![file("t/1.parquet", "0001")];
    let p = plan(keyed(), Some("seq"), &files);
    stage(
        &conn,
        &p,
        &[
            ("t/1.parquet", "U", 1, "newest", "05"),
            ("t/1.parquet", "I", 1, "older", "04"),
            ("t/1.parquet", "I", 2, "x", "02"),
            ("t/1.parquet", "D", 2, "x", "06"),
        ],
    );
    let counts = apply(&conn, &p);
    assert_eq!(
        counts[4], 0,
        "with an ordering column only changes with the same value are ambiguous"
    );
    assert_eq!(target_rows(&conn), vec![(1, "newest".into(), "05".into())]);

    // A late file with older changes, including a zombie insert of deleted key 2.
    let files = vec![file("t/0.parquet", "0000")];
    let p = plan(keyed(), Some("seq"), &files);
    stage(
        &conn,
        &p,
        &[
            ("t/0.parquet", "U", 1, "stale", "03"),
            ("t/0.parquet", "I", 2, "zombie", "04"),
        ],
    );
    apply(&conn, &p);
    assert_eq!(target_rows(&conn), vec![(1, "newest".into(), "05".into())]);
}

#[test]
fn append_inserts_non_deletes_and_counts_deletes() {
    let conn = setup();
    let files = vec![file("t/1.parquet", "0001"), file("t/2.parquet", "0002")];
    let p = plan(LoadMode::Append, None, &files);
    stage(
        &conn,
        &p,
        &[
            ("t/2.parquet", "I", 3, "c", "s"),
            ("t/1.parquet", "I", 1, "a", "s"),
            ("t/1.parquet", "D", 1, "a", "s"),
            ("t/2.parquet", "U", 1, "b", "s"),
        ],
    );
    let counts = apply(&conn, &p);
    assert_eq!(counts, vec![4, 0, 1], "4 staged, 0 unknown, 1 delete");
    // Without a key every non-delete row is a row; the delete cannot apply.
    assert_eq!(
        target_rows(&conn),
        vec![
            (1, "a".into(), "s".into()),
            (1, "b".into(), "s".into()),
            (3, "c".into(), "s".into())
        ]
    );
}

#[test]
fn cast_failures_are_counted_with_try_cast() {
    let conn = setup();
    let files = vec![file("t/1.parquet", "0001")];
    let mut p = plan(keyed(), None, &files);
    p.load[2].expr = LoadExpr::TryCast {
        column: "seq".into(),
        to: ColumnType::Int64,
    };
    stage(
        &conn,
        &p,
        &[
            ("t/1.parquet", "I", 1, "a", "12"),
            ("t/1.parquet", "I", 2, "b", "twelve"),
        ],
    );
    let (check, layout) = sql::check_query(&p, STAGE, &p.files);
    let (_, at) = layout.cast_failures[0].clone();
    let failures: i64 = conn.query_row(&check, [], |r| r.get(at)).unwrap();
    assert_eq!(failures, 1);
}

#[test]
fn ledger_queries_return_the_newest_entry_per_key() {
    let conn = setup();
    let ledger = cdc_worker::warehouse::sql::qualified("main", LEDGER_TABLE);
    let f = file("t/1.parquet", "0001");
    conn.execute_batch(&sql::status_insert(
        &ledger,
        "orders",
        std::slice::from_ref(&f),
        "rejected",
        "bad",
    ))
    .unwrap();
    // A later fixed upload of the same key, applied.
    let mut p = plan(
        keyed(),
        None,
        &[file("t/1.parquet", "0001"), file("t/2.parquet", "0002")],
    );
    p.table = "orders".into();
    p.files[0].etag = "fixed".into();
    std::thread::sleep(std::time::Duration::from_millis(5));
    conn.execute_batch(&sql::ledger_insert(&ledger, &p))
        .unwrap();
    let mut stmt = conn
        .prepare(&sql::applied_query(
            &ledger,
            "orders",
            &["t/1.parquet".into(), "t/2.parquet".into()],
        ))
        .unwrap();
    let mut rows: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("t/1.parquet".into(), "fixed".into(), "applied".into()),
            ("t/2.parquet".into(), "e0002".into(), "applied".into())
        ]
    );
    let last: (String, String) = conn
        .query_row(&sql::last_applied_query(&ledger, "orders"), [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(last, ("0002".into(), "t/2.parquet".into()));
    let summary: (String, String) = conn
        .query_row(&sql::ledger_summary_query(&ledger), [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(summary.0, "orders");
}

#[test]
fn the_rebuild_statements_widen_without_losing_rows() {
    let conn = Connection::open_in_memory().unwrap();
    let old = vec![
        Column::new("id", ColumnType::Int64),
        Column::new("n\"", ColumnType::Int32),
    ];
    conn.execute_batch(&sql::create_table("\"t\"", &old, &[], false))
        .unwrap();
    conn.execute_batch("INSERT INTO \"t\" VALUES (1, 2147483647), (2, NULL)")
        .unwrap();
    let new = vec![
        Column::new("id", ColumnType::Int64),
        Column::new("n\"", ColumnType::Int64),
    ];
    conn.execute_batch(&sql::create_table("\"c\"", &new, &[], false))
        .unwrap();
    conn.execute_batch(&sql::rebuild_copy("\"c\"", "\"t\"", &new, &["n\"".into()]))
        .unwrap();
    let counts: (i64, i64) = conn
        .query_row(&sql::row_counts("\"t\"", "\"c\""), [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(counts, (2, 2));
    conn.execute_batch(&sql::drop_table("\"t\"")).unwrap();
    conn.execute_batch(&sql::rename_table("\"c\"", "t"))
        .unwrap();
    conn.execute_batch("UPDATE \"t\" SET \"n\"\"\" = \"n\"\"\" + 1 WHERE id = 1")
        .unwrap();
    let n: i64 = conn
        .query_row("SELECT \"n\"\"\" FROM \"t\" WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2_147_483_648, "the column holds values beyond int32 now");
}

/// Audit B1's fate on Firebolt's rendering: staged rows whose key is NULL are counted by
/// the check and skipped by the MERGE (a DMS key is a primary key: such a row changes no
/// row), the other rows are applied.
#[test]
fn rows_with_a_null_key_are_counted_and_skipped() {
    let conn = setup();
    let files = vec![file("t/1.parquet", "0001")];
    let p = plan(keyed(), None, &files);
    stage(&conn, &p, &[("t/1.parquet", "I", 1, "one", "s1")]);
    for name in ["null a", "null b"] {
        conn.execute(
            &format!("INSERT INTO {STAGE} (\"ID\", \"na\"\"me; --\", \"seq\", \"Op\", \"__cdc_source_file\") VALUES (NULL, ?, 's1', 'I', 't/1.parquet')"),
            duckdb::params![name],
        )
        .unwrap();
    }
    let counts = apply(&conn, &p);
    // staged, unknown files, NULL keys, distinct (non-NULL) keys, ambiguous keys, deletes.
    assert_eq!(counts, vec![3, 0, 2, 1, 0, 0]);
    assert_eq!(target_rows(&conn), vec![(1, "one".into(), "s1".into())]);
}

/// Audit W2: unsigned integers are staged as the signed type Parquet stores them in; a
/// reader that ignores the unsigned annotation stages 4294967295 as -1, and the MERGE
/// loads the unsigned value.
#[test]
fn unsigned_integers_get_their_sign_back() {
    let conn = Connection::open_in_memory().unwrap();
    let target = "\"main\".\"u\"";
    let columns = vec![
        Column::new("id", ColumnType::Int64),
        Column::new("u32", ColumnType::UInt32),
        Column::new("u64", ColumnType::UInt64),
    ];
    conn.execute_batch(&without_primary_index(&sql::create_table(
        target,
        &columns,
        &["id".into()],
        false,
    )))
    .unwrap();
    let files = vec![file("t/1.parquet", "0001")];
    let p = ApplyPlan {
        into: None,
        guard: None,
        history: None,
        batch_id: "b1".into(),
        table: "u".into(),
        ddl: vec![],
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
        files: files.clone(),
        fence: None,
    };
    let create = sql::create_staging(STAGE, &p);
    assert!(
        create.contains("\"u32\" INTEGER NULL, \"u64\" BIGINT NULL"),
        "staged as the physical type: {create}"
    );
    conn.execute_batch(&create).unwrap();
    conn.execute_batch(&format!(
        "INSERT INTO {STAGE} VALUES (1, -1, -1, 'I', 't/1.parquet'), (2, 7, 9, 'I', 't/1.parquet')"
    ))
    .unwrap();
    let rows = sql::staged_rows(STAGE, &p, &files);
    conn.execute_batch(&merge::merge_statement(
        Dialect::Firebolt,
        target,
        &p,
        &rows,
        None,
    ))
    .unwrap();
    let got: Vec<(i64, i64, String)> = conn
        .prepare(&format!(
            "SELECT id, u32, CAST(u64 AS VARCHAR) FROM {target} ORDER BY id"
        ))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 4_294_967_295, "18446744073709551615".into()),
            (2, 7, "9".into())
        ]
    );
}

/// The Firebolt fast path's check and INSERT on DuckDB: full-load files with unique, new
/// keys insert the merge path's rows; a key repeated in the load is a blocker.
#[test]
fn the_full_load_fast_path_inserts_what_the_merge_would_and_refuses_a_repeated_key() {
    let load = |key: &str, order: &str| BatchFile {
        full_load: true,
        ..file(key, order)
    };
    let files = vec![
        load("t/LOAD1.parquet", "0/1"),
        load("t/LOAD2.parquet", "0/2"),
    ];
    let p = plan(keyed(), None, &files);
    let rows = sql::staged_rows(STAGE, &p, &p.files);
    let staged = [
        ("t/LOAD2.parquet", "I", 3, "three", "s0"),
        ("t/LOAD1.parquet", "I", 1, "one", "s0"),
        ("t/LOAD1.parquet", "I", 2, "two", "s0"),
    ];
    let (fast, merged) = (setup(), setup());
    for conn in [&fast, &merged] {
        stage(conn, &p, &staged);
    }
    assert!(merge::fast_load_candidate(&p));
    let blockers = |conn: &Connection| -> i64 {
        conn.query_row(
            &merge::fast_load_blockers(TARGET, None, &p, &rows),
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(blockers(&fast), 0);
    fast.execute_batch(&merge::insert_new_rows_statement(
        Dialect::Firebolt,
        TARGET,
        &p,
        &rows,
    ))
    .unwrap();
    apply(&merged, &p);
    assert_eq!(target_rows(&fast), target_rows(&merged));
    assert_eq!(target_rows(&fast).len(), 3);
    // The same keys again: each is in the target now.
    assert!(blockers(&fast) > 0, "keys already in the target");
    // A key twice within the load.
    let conn = setup();
    stage(
        &conn,
        &p,
        &[
            ("t/LOAD1.parquet", "I", 1, "a", "s0"),
            ("t/LOAD2.parquet", "I", 1, "b", "s0"),
        ],
    );
    assert!(blockers(&conn) > 0, "a repeated key");
}

/// A history table's MERGE as the Firebolt apply renders it (the staging table COPY fills,
/// version times from the file names, no row position), on DuckDB. With an ordering
/// column that is not a time (`AR_H_CHANGE_SEQ`), changes of a key in one file share the
/// file's time: the last one by the column is that time's version. Long because the
/// staged rows and the expected versions are spelled out.
#[test]
fn a_history_batch_writes_versions_at_the_times_of_its_files() {
    let conn = Connection::open_in_memory().unwrap();
    let mut columns = target_columns();
    columns.extend([
        Column::new("__valid_from", ColumnType::Timestamp),
        Column::new("__valid_to", ColumnType::Timestamp),
        Column::new("__is_current", ColumnType::Boolean),
        Column::new("__op", ColumnType::String),
    ]);
    conn.execute_batch(&without_primary_index(&sql::create_table(
        TARGET,
        &columns,
        &["id".into()],
        true,
    )))
    .unwrap();
    let (f1, f2) = (
        "t/20261201-100000000.parquet",
        "t/20261201-100100000.parquet",
    );
    let files = vec![file(f1, "0001"), file(f2, "0002")];
    let p = ApplyPlan {
        history: Some(cdc_worker::batch::History {
            tracked: vec!["na\"me; --".into()],
        }),
        ..plan(keyed(), Some("seq"), &files)
    };
    stage(
        &conn,
        &p,
        &[
            (f1, "U", 1, "b", "0002"),
            (f1, "U", 1, "a", "0001"),
            (f1, "I", 2, "x", "0003"),
            (f2, "D", 2, "x", "0004"),
            (f2, "U", 1, "c", "0005"),
        ],
    );
    let rows = sql::staged_rows(STAGE, &p, &p.files);
    let statement = cdc_worker::warehouse::history::history_statement(
        Dialect::Firebolt,
        TARGET,
        &p,
        &rows,
        &p.history.as_ref().unwrap().tracked,
    );
    conn.execute_batch(&statement).unwrap();
    let mut stmt = conn
        .prepare(&format!("SELECT id, \"na\"\"me; --\", strftime(__valid_from, '%H:%M'), strftime(__valid_to, '%H:%M'), __is_current, __op FROM {TARGET} ORDER BY id, __valid_from"))
        .unwrap();
    let versions: Vec<(i64, String, String, Option<String>, bool, String)> = stmt
        .query_map([], |r| {
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
        .collect();
    let v = |id, name: &str, from: &str, to: Option<&str>, op: &str| {
        (
            id,
            name.to_string(),
            from.to_string(),
            to.map(str::to_string),
            to.is_none(),
            op.to_string(),
        )
    };
    assert_eq!(
        versions,
        vec![
            v(1, "b", "10:00", Some("10:01"), "U"),
            v(1, "c", "10:01", None, "U"),
            v(2, "x", "10:00", Some("10:01"), "D"),
        ]
    );
}

/// With an ordering column, changes of a key in one file that share its value cannot be
/// ordered on Firebolt either: the check counts them.
#[test]
fn ties_of_the_ordering_column_in_one_file_are_counted_as_ambiguous() {
    let conn = setup();
    let files = vec![file("t/1.parquet", "0001")];
    let p = plan(keyed(), Some("seq"), &files);
    stage(
        &conn,
        &p,
        &[
            ("t/1.parquet", "U", 1, "a", "05"),
            ("t/1.parquet", "U", 1, "b", "05"),
            ("t/1.parquet", "U", 2, "c", "05"),
            ("t/1.parquet", "U", 2, "d", "06"),
        ],
    );
    let counts = apply(&conn, &p);
    assert_eq!(counts[4], 1, "key 1 ties, key 2 is ordered: {counts:?}");
}
