//! The Firebolt warehouse's apply path, describe, ledger, prepare and ping against the
//! protocol test server: the statements sent, in order, with their session parameters,
//! and what happens when a step fails. Footers are read from a minimal S3.

use cdc_worker::batch::{
    ApplyPlan, BatchFile, Ddl, Fence, KeyColumn, LoadColumn, LoadExpr, LoadMode, StageError,
    StagedFile,
};
use cdc_worker::schema::types::{Column, ColumnType, FileSchema, TableSchema};
use cdc_worker::warehouse::firebolt::sql::CopySource;
use cdc_worker::warehouse::{Warehouse, WarehouseError};
use serde_json::json;

use crate::s3::FakeS3;
use crate::server::{ProtocolServer, Reply, Seen, default_reply};
use crate::support::{cloud_config, warehouse, warehouse_with};

fn columns() -> Vec<Column> {
    vec![
        Column::new("ID", ColumnType::Int64),
        Column::new("n", ColumnType::Int32),
        Column::new("seq", ColumnType::String),
    ]
}

fn batch_file(key: &str, order: &str) -> BatchFile {
    BatchFile {
        bucket: "dms".into(),
        key: key.into(),
        size: 100,
        etag: format!("etag-{order}"),
        order_key: order.into(),
        full_load: false,
    }
}

fn staged(key: &str, order: &str, rows: u64) -> StagedFile {
    StagedFile {
        file: batch_file(key, order),
        schema: FileSchema {
            table: TableSchema::new(columns()),
            op: Some("Op".into()),
            rows,
            timestamp_max: vec![],
        },
        local_path: None,
    }
}

fn plan(files: &[StagedFile], mode: LoadMode) -> ApplyPlan {
    ApplyPlan {
        into: None,
        guard: None,
        history: None,
        batch_id: "b1".into(),
        table: "orders".into(),
        ddl: vec![],
        load: [("id", "ID"), ("n", "n"), ("seq", "seq")]
            .iter()
            .map(|(t, s)| LoadColumn {
                target: t.to_string(),
                expr: LoadExpr::Column(s.to_string()),
            })
            .collect(),
        mode,
        op_column: Some("Op".into()),
        ordering_column: None,
        staged_columns: columns(),
        files: files.iter().map(|f| f.file.clone()).collect(),
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

fn two_files() -> Vec<StagedFile> {
    vec![
        staged("t/1.parquet", "0001", 3),
        staged("t/2.parquet", "0002", 2),
    ]
}

fn by_kind(server: &ProtocolServer, kind: &str) -> Vec<Seen> {
    server
        .statements()
        .into_iter()
        .filter(|s| s.kind() == Some(kind))
        .collect()
}

/// The first transaction id the protocol test server hands out.
const TX1: &str = "0000000000000000000000000000000000000001";

const ORDERS: &str = "CREATE TABLE \"public\".\"orders\" (\"id\" BIGINT NOT NULL, \"n\" INTEGER NULL, \"seq\" TEXT NULL) PRIMARY INDEX \"id\"";

/// A warehouse whose bookkeeping tables (its own `prepare()`) and `orders` target exist
/// on the server; the requests so far are forgotten.
async fn ready(server: &ProtocolServer) -> cdc_worker::warehouse::firebolt::Firebolt {
    ready_with(
        server,
        crate::support::core_config(server),
        CopySource::Direct(None),
    )
    .await
}

async fn ready_with(
    server: &ProtocolServer,
    config: cdc_worker::warehouse::firebolt::client::ClientConfig,
    source: CopySource,
) -> cdc_worker::warehouse::firebolt::Firebolt {
    let wh = warehouse_with(config, source);
    wh.prepare().await.unwrap();
    server.execute(ORDERS);
    server.clear();
    wh
}

/// Answers the batch check with `counts`, everything else as an empty engine would.
fn check_answers(server: &ProtocolServer, counts: &'static [u64]) {
    server.respond(move |s| match s.kind() {
        Some("check") => Reply::counts(counts),
        _ => default_reply(s),
    });
}

#[tokio::test]
async fn a_keyed_batch_runs_the_documented_steps_in_one_transaction() {
    let server = ProtocolServer::core().await;
    // 5 rows staged, none from an unknown file, 4 keys, 1 key changed twice in one file.
    check_answers(&server, &[5, 0, 0, 4, 1]);
    let wh = ready(&server).await;
    let files = two_files();
    let stats = wh.apply(&plan(&files, keyed()), &files).await.unwrap();

    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "begin",
            "merge",
            "ledger",
            "commit",
            "drop-stage"
        ]
    );
    assert_eq!(stats.statements, 8, "every round trip is counted");
    assert_eq!(
        (stats.rows_staged, stats.rows_merged, stats.ambiguous_keys),
        (5, 4, 1)
    );

    let st = server.statements();
    for (i, s) in st.iter().enumerate() {
        assert_eq!(
            s.param("query_label").unwrap(),
            format!("b1:{:02}:{}", i + 1, s.kind().unwrap()),
            "labels tie statements to the batch"
        );
    }
    let create = &st[0].body;
    assert!(
        create.starts_with("CREATE TABLE \"public\".\"_cdc_worker_stage__"),
        "{create}"
    );
    assert!(create.contains("(\"ID\" BIGINT NULL, \"n\" INTEGER NULL, \"seq\" TEXT NULL, \"Op\" TEXT NULL, \"__cdc_source_file\" TEXT NULL)"), "{create}");
    let stage = create
        .trim_start_matches("CREATE TABLE ")
        .split(" (")
        .next()
        .unwrap();
    assert_eq!(
        st[1].body,
        format!(
            "COPY INTO {stage} (\"ID\", \"n\", \"seq\", \"Op\", \"__cdc_source_file\" $source_file_name) FROM 's3://dms/t/1.parquet', 's3://dms/t/2.parquet' WITH TYPE = PARQUET AUTO_CREATE = FALSE MAX_ERRORS_PER_FILE = 0 CASE_SENSITIVE_COLUMN_MAPPING = TRUE"
        ),
        "one COPY for the whole batch"
    );
    assert!(
        st[4]
            .body
            .starts_with("MERGE INTO \"public\".\"orders\" AS t USING"),
        "{}",
        st[4].body
    );
    assert!(st[4].body.contains("CASE \"__cdc_source_file\" WHEN 't/1.parquet' THEN 0 WHEN 't/2.parquet' THEN 1 END AS \"__cdc_file\""));
    assert!(
        st[5]
            .body
            .contains("'t/2.parquet', 'etag-0002', 100, 'b1', '0002', 'applied'"),
        "{}",
        st[5].body
    );
    // The transaction lives in the session: BEGIN's Firebolt-Update-Parameters are sent
    // with the statements inside it, and COMMIT's Remove-Parameters drop them.
    for s in &st[4..7] {
        assert_eq!(s.param("transaction_id"), Some(TX1), "{:?}", s.kind());
    }
    for s in [&st[0], &st[3], &st[7]] {
        assert_eq!(s.param("transaction_id"), None, "{:?}", s.kind());
    }
    assert_eq!(st[7].body, format!("DROP TABLE IF EXISTS {stage}"));
}

/// A history table's batch: one MERGE of versions inside the transaction, no tombstones,
/// and the statement the server accepts writes the history columns.
#[tokio::test]
async fn a_history_batch_merges_versions_in_one_transaction_without_tombstones() {
    let server = ProtocolServer::core().await;
    check_answers(&server, &[5, 0, 0, 4, 0]);
    let wh = ready(&server).await;
    server.execute("CREATE TABLE \"public\".\"orders_h\" (\"id\" BIGINT NOT NULL, \"n\" INTEGER NULL, \"seq\" TEXT NULL, \"__valid_from\" TIMESTAMP NULL, \"__valid_to\" TIMESTAMP NULL, \"__is_current\" BOOLEAN NULL, \"__op\" TEXT NULL) PRIMARY INDEX \"id\"");
    server.clear();
    let files = vec![
        staged("t/20261201-100000000.parquet", "0001", 3),
        staged("t/20261201-100100000.parquet", "0002", 2),
    ];
    let p = ApplyPlan {
        table: "orders_h".into(),
        ordering_column: Some("seq".into()),
        history: Some(cdc_worker::batch::History {
            tracked: vec!["n".into()],
        }),
        ..plan(&files, keyed())
    };
    wh.apply(&p, &files).await.unwrap();
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "begin",
            "history-merge",
            "ledger",
            "commit",
            "drop-stage"
        ]
    );
    let merge = &by_kind(&server, "history-merge")[0];
    assert_eq!(merge.param("transaction_id"), Some(TX1));
    assert!(
        merge.body.contains("WHEN 0 THEN TIMESTAMP '2026-12-01 10:00:00.000000' WHEN 1 THEN TIMESTAMP '2026-12-01 10:01:00.000000'"),
        "version times come from the file names: {}",
        merge.body
    );
}

#[tokio::test]
async fn statements_after_commit_never_carry_the_finished_transaction() {
    let server = ProtocolServer::core().await;
    // A server whose COMMIT reply lacks Firebolt-Remove-Parameters.
    server.respond(|s| match s.kind() {
        Some("check") => Reply::counts(&[5, 0, 0, 4, 0]),
        Some("commit") => Reply::empty(),
        _ => default_reply(s),
    });
    let wh = ready(&server).await;
    let files = two_files();
    wh.apply(&plan(&files, keyed()), &files).await.unwrap();
    assert_eq!(
        by_kind(&server, "commit")[0].param("transaction_id"),
        Some(TX1)
    );
    assert_eq!(
        by_kind(&server, "drop-stage")[0].param("transaction_id"),
        None
    );
}

#[tokio::test]
async fn an_append_batch_counts_deletes_and_ddl_runs_before_the_transaction() {
    let server = ProtocolServer::core().await;
    // 5 rows, none unknown, 2 deletes.
    check_answers(&server, &[5, 0, 2]);
    let wh = ready(&server).await;
    let files = two_files();
    let mut p = plan(&files, LoadMode::Append);
    p.ddl = vec![
        Ddl::CreateTable {
            columns: vec![Column::new("id", ColumnType::Int64)],
            primary_key: vec![],
        },
        Ddl::AddColumn {
            column: Column::new("extra", ColumnType::String),
        },
    ];
    let stats = wh.apply(&p, &files).await.unwrap();
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "create-table",
            "add-column",
            "begin",
            "append",
            "ledger",
            "commit",
            "drop-stage"
        ]
    );
    assert_eq!(
        (stats.rows_appended, stats.deletes_ignored, stats.statements),
        (3, 2, 10)
    );
    let add = &by_kind(&server, "add-column")[0];
    assert_eq!(
        add.body,
        "ALTER TABLE \"public\".\"orders\" ADD COLUMN IF NOT EXISTS \"extra\" TEXT NULL"
    );
    assert!(
        by_kind(&server, "append")[0]
            .body
            .starts_with("INSERT INTO \"public\".\"orders\" (\"id\", \"n\", \"seq\") SELECT")
    );
}

#[tokio::test]
async fn copy_reads_through_a_location_one_file_per_statement_and_hides_keys() {
    let server = ProtocolServer::core().await;
    check_answers(&server, &[5, 0, 0, 4, 0]);
    let wh = ready_with(
        &server,
        crate::support::core_config(&server),
        CopySource::Location("dms_bucket".into()),
    )
    .await;
    let files = two_files();
    wh.apply(&plan(&files, keyed()), &files).await.unwrap();
    let copies = by_kind(&server, "copy");
    assert_eq!(copies.len(), 2);
    assert!(
        copies[1]
            .body
            .contains("FROM \"dms_bucket\" WITH PATTERN = 't/2.parquet' TYPE = PARQUET"),
        "{}",
        copies[1].body
    );
}

#[tokio::test]
async fn copy_credentials_never_reach_errors() {
    let server = ProtocolServer::core().await;
    // A server that quotes the failing statement back, credentials included.
    server.respond(|s| match s.kind() {
        Some("copy") => Reply::error(200, &format!("Access denied while running: {}", s.body)),
        _ => default_reply(s),
    });
    let source = CopySource::Direct(Some(
        cdc_worker::warehouse::firebolt::sql::S3Credentials::Keys {
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: cdc_worker::config::Secret::new("s3-secret-do-not-print"),
            session_token: None,
        },
    ));
    let wh = ready_with(&server, crate::support::core_config(&server), source).await;
    let files = two_files();
    let err = wh.apply(&plan(&files, keyed()), &files).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("Access denied while running: COPY INTO"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("s3-secret-do-not-print")
            && !format!("{err:?}").contains("s3-secret-do-not-print"),
        "{err}"
    );
    assert!(
        by_kind(&server, "copy")[0]
            .body
            .contains("AWS_SECRET_ACCESS_KEY = 's3-secret-do-not-print'"),
        "the server got it"
    );
}

#[tokio::test]
async fn a_row_count_that_differs_from_the_footers_stops_before_the_target() {
    let server = ProtocolServer::core().await;
    check_answers(&server, &[4, 0, 0, 4, 0]);
    let wh = ready(&server).await;
    let files = two_files();
    let err = wh.apply(&plan(&files, keyed()), &files).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("COPY loaded 4 rows but the files' footers hold 5"),
        "{err}"
    );
    assert_eq!(
        server.kinds(),
        ["create-stage", "copy", "check", "drop-stage"],
        "nothing touched the target"
    );

    server.clear();
    check_answers(&server, &[5, 2, 0, 4, 0]);
    let err = wh.apply(&plan(&files, keyed()), &files).await.unwrap_err();
    assert!(err.to_string().contains("$source_file_name"), "{err}");
}

#[tokio::test]
async fn a_failure_inside_the_transaction_rolls_back_and_drops_the_stage() {
    let server = ProtocolServer::core().await;
    server.respond(|s| match s.kind() {
        Some("check") => Reply::counts(&[5, 0, 0, 4, 0]),
        Some("merge") => Reply::error(200, "MERGE failed: something"),
        _ => default_reply(s),
    });
    let wh = ready(&server).await;
    let files = two_files();
    let err = wh.apply(&plan(&files, keyed()), &files).await.unwrap_err();
    assert!(
        matches!(err, WarehouseError::Sql(ref m) if m.contains("MERGE failed: something")),
        "{err}"
    );
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "begin",
            "merge",
            "rollback",
            "drop-stage"
        ]
    );
    let rollback = &by_kind(&server, "rollback")[0];
    assert_eq!(
        rollback.param("transaction_id"),
        Some(TX1),
        "the rollback is for the open transaction"
    );
    assert_eq!(by_kind(&server, "ledger").len(), 0);
}

#[tokio::test]
async fn a_newer_fence_refuses_the_commit() {
    let server = ProtocolServer::core().await;
    server.respond(|s| match s.kind() {
        Some("check") => Reply::counts(&[5, 0, 0, 4, 0]),
        Some("fence-read") => Reply::rows(
            &[("token", "long"), ("holder", "text")],
            vec![vec![json!(5), json!("w2")]],
        ),
        _ => default_reply(s),
    });
    let wh = ready(&server).await;
    let files = two_files();
    let mut p = plan(&files, keyed());
    p.fence = Some(Fence {
        token: 3,
        holder: "w1".into(),
    });
    let err = wh.apply(&p, &files).await.unwrap_err();
    assert!(matches!(err, WarehouseError::Fenced(_)), "{err}");
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "begin",
            "fence-read",
            "rollback",
            "drop-stage"
        ]
    );

    // An older or missing fence is taken inside the transaction.
    server.clear();
    check_answers(&server, &[5, 0, 0, 4, 0]);
    wh.apply(&p, &files).await.unwrap();
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "begin",
            "fence-read",
            "fence-init",
            "merge",
            "ledger",
            "commit",
            "drop-stage"
        ]
    );
    assert!(
        by_kind(&server, "fence-init")[0]
            .body
            .ends_with("VALUES ('orders', 3, 'w1')")
    );
}

#[tokio::test]
async fn tombstones_are_created_once_and_recorded_inside_the_transaction() {
    let server = ProtocolServer::core().await;
    check_answers(&server, &[5, 0, 0, 4]);
    let wh = ready(&server).await;
    let files = two_files();
    let mut p = plan(&files, keyed());
    p.ordering_column = Some("seq".into());
    wh.apply(&p, &files).await.unwrap();
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "create-tombstones",
            "begin",
            "merge",
            "record-tombstones",
            "ledger",
            "commit",
            "drop-stage"
        ]
    );
    assert_eq!(
        by_kind(&server, "record-tombstones")[0].param("transaction_id"),
        Some(TX1)
    );
    server.clear();
    wh.apply(&p, &files).await.unwrap();
    assert!(
        by_kind(&server, "create-tombstones").is_empty(),
        "known tables are not created again"
    );
}

#[tokio::test]
async fn widening_rebuilds_the_table_in_one_transaction_and_renames_the_copy() {
    let server = ProtocolServer::core().await;
    server.respond(|s| match s.kind() {
        Some("check") => Reply::counts(&[5, 0, 0, 4, 0]),
        Some("rebuild-verify") => Reply::counts(&[10, 10]),
        _ => default_reply(s),
    });
    let wh = ready(&server).await;
    let files = two_files();
    let mut p = plan(&files, keyed());
    p.ddl = vec![Ddl::WidenColumn {
        column: "n".into(),
        from: ColumnType::Int32,
        to: ColumnType::Int64,
    }];
    wh.apply(&p, &files).await.unwrap();
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "describe",
            "begin",
            "rebuild-drop-copy",
            "rebuild-create-copy",
            "rebuild-fill-copy",
            "rebuild-verify",
            "rebuild-drop",
            "rebuild-rename",
            "commit",
            "begin",
            "merge",
            "ledger",
            "commit",
            "drop-stage"
        ]
    );
    assert_eq!(
        by_kind(&server, "rebuild-create-copy")[0].body,
        "CREATE TABLE \"public\".\"_cdc_worker_rebuild__orders\" (\"id\" BIGINT NOT NULL, \"n\" BIGINT NULL, \"seq\" TEXT NULL) PRIMARY INDEX \"id\""
    );
    assert!(
        by_kind(&server, "rebuild-fill-copy")[0]
            .body
            .contains("CAST(\"n\" AS BIGINT) AS \"n\"")
    );
    for s in by_kind(&server, "rebuild-rename")
        .iter()
        .chain(&by_kind(&server, "rebuild-drop"))
    {
        assert!(s.param("transaction_id").is_some(), "{}", s.body);
    }
    // What Firebolt now holds: the table, widened, with its primary index; no copy.
    let (columns, index) = server.table("public", "orders").unwrap();
    assert_eq!(columns[1], ("n".into(), "BIGINT".into(), true));
    assert_eq!(index, ["id"]);
    assert!(
        server
            .table("public", "_cdc_worker_rebuild__orders")
            .is_none()
    );

    // Planned again against what it is now, nothing is rebuilt: the types are the same.
    server.clear();
    wh.apply(&p, &files).await.unwrap();
    assert!(by_kind(&server, "rebuild-create-copy").is_empty());

    // A copy that does not hold every row stops the rebuild: rolled back, the table
    // untouched, never missing.
    server.clear();
    p.ddl = vec![Ddl::WidenColumn {
        column: "seq".into(),
        from: ColumnType::String,
        to: ColumnType::Int64,
    }];
    server.respond(|s| match s.kind() {
        Some("check") => Reply::counts(&[5, 0, 0, 4, 0]),
        Some("rebuild-verify") => Reply::counts(&[10, 9]),
        _ => default_reply(s),
    });
    let err = wh.apply(&p, &files).await.unwrap_err().to_string();
    assert!(err.contains("10") && err.contains('9'), "{err}");
    let kinds = server.kinds();
    assert!(
        kinds.iter().any(|k| k == "rollback")
            && !kinds.iter().any(|k| k == "rebuild-drop" || k == "merge"),
        "{kinds:?}"
    );
    assert_eq!(server.table("public", "orders").unwrap().0[2].1, "TEXT");
    assert!(
        server
            .table("public", "_cdc_worker_rebuild__orders")
            .is_none()
    );
    assert_eq!(server.open_transactions(), 0);
}

#[tokio::test]
async fn an_interrupted_rebuild_of_an_older_worker_is_finished_from_its_complete_copy() {
    let server = ProtocolServer::core().await;
    check_answers(&server, &[5, 0, 0, 4, 0]);
    let wh = ready(&server).await;
    // A crash after the marker: the old table, the complete copy (n widened), the marker.
    server.execute("CREATE TABLE \"public\".\"_cdc_worker_rebuild__orders\" (\"id\" BIGINT NOT NULL, \"n\" BIGINT NULL, \"seq\" TEXT NULL) PRIMARY INDEX \"id\"");
    server
        .execute("CREATE TABLE \"public\".\"_cdc_worker_rebuilt__orders\" (rebuilt BOOLEAN NULL)");
    let described = wh.describe("orders").await.unwrap().unwrap();
    assert_eq!(
        described
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.ty.clone()))
            .collect::<Vec<_>>(),
        [
            ("id", ColumnType::Int64),
            ("n", ColumnType::Int64),
            ("seq", ColumnType::String)
        ],
        "the copy is what the table will be"
    );
    assert_eq!(described.name, "orders");
    server.clear();
    let files = two_files();
    wh.apply(&plan(&files, keyed()), &files).await.unwrap();
    assert_eq!(
        server.kinds(),
        [
            "create-stage",
            "copy",
            "check",
            "describe",
            "begin",
            "rebuild-drop",
            "rebuild-rename",
            "rebuild-cleanup",
            "commit",
            "begin",
            "merge",
            "ledger",
            "commit",
            "drop-stage"
        ]
    );
    assert_eq!(server.table("public", "orders").unwrap().0[1].1, "BIGINT");
    assert!(
        server
            .table("public", "_cdc_worker_rebuilt__orders")
            .is_none()
    );

    // A copy without its marker was never authoritative: the table stays, the copy goes.
    server.execute("CREATE TABLE \"public\".\"_cdc_worker_rebuild__orders\" (\"id\" BIGINT NOT NULL) PRIMARY INDEX \"id\"");
    assert_eq!(
        wh.describe("orders").await.unwrap().unwrap().columns.len(),
        3
    );
    server.clear();
    wh.apply(&plan(&files, keyed()), &files).await.unwrap();
    let cleanup = by_kind(&server, "rebuild-cleanup");
    assert_eq!(cleanup.len(), 1);
    assert_eq!(
        cleanup[0].body,
        "DROP TABLE IF EXISTS \"public\".\"_cdc_worker_rebuild__orders\""
    );
    assert!(
        server
            .table("public", "_cdc_worker_rebuild__orders")
            .is_none()
    );
}

#[tokio::test]
async fn describe_reads_the_schema_s_primary_index_in_order_and_copes_without_it() {
    let server = ProtocolServer::core().await;
    let wh = ready(&server).await;
    server.execute("CREATE TABLE \"public\".\"regions\" (\"id\" BIGINT NOT NULL, \"name\" TEXT NULL, \"region\" TEXT NOT NULL) PRIMARY INDEX \"region\", \"id\"");
    // The same name in another schema must not lend its columns or index.
    server.execute("CREATE SCHEMA other");
    server.execute("CREATE TABLE other.regions (x INTEGER NOT NULL) PRIMARY INDEX x");
    let t = wh.describe("regions").await.unwrap().unwrap();
    assert_eq!(t.primary_key, vec!["region", "id"], "the index's order");
    assert_eq!(
        t.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["id", "name", "region"],
        "declared order"
    );
    assert!(!t.columns[0].nullable && t.columns[1].nullable);
    assert!(
        server.statements()[0]
            .body
            .contains("information_schema.tables")
    );
    assert_eq!(wh.describe("missing").await.unwrap(), None);

    let server = ProtocolServer::core().await;
    server.respond(|s| {
        if s.body.contains("information_schema.tables") && s.kind() == Some("describe") {
            Reply::error(400, "column \"primary_index\" does not exist")
        } else {
            default_reply(s)
        }
    });
    let wh = ready(&server).await;
    server.execute("CREATE TABLE \"public\".\"regions\" (\"id\" BIGINT NOT NULL, \"region\" TEXT NULL) PRIMARY INDEX \"id\"");
    assert_eq!(
        wh.describe("regions").await.unwrap().unwrap().primary_key,
        vec!["id"],
        "is_in_primary_index"
    );
    server.clear();
    wh.describe("regions").await.unwrap();
    assert_eq!(
        server.statements().len(),
        1,
        "the missing column is remembered"
    );

    // A server without ordinal_position: the columns come in its own order.
    let server = ProtocolServer::core().await;
    server.respond(|s| {
        if s.body.contains("ordinal_position") {
            Reply::error(400, "column \"ordinal_position\" does not exist")
        } else {
            default_reply(s)
        }
    });
    let wh = ready(&server).await;
    server.execute("CREATE TABLE \"public\".\"regions\" (\"id\" BIGINT NOT NULL, \"region\" TEXT NULL) PRIMARY INDEX \"id\"");
    let t = wh.describe("regions").await.unwrap().unwrap();
    assert_eq!(
        (t.columns.len(), t.primary_key.clone()),
        (2, vec!["id".to_string()])
    );
}

#[tokio::test]
async fn ledger_lookups_parse_the_newest_entries() {
    let server = ProtocolServer::core().await;
    server.respond(|s| match s.kind() {
        Some("applied") => Reply::rows(
            &[
                ("s3_key", "text"),
                ("etag", "text null"),
                ("status", "text null"),
            ],
            vec![
                vec![json!("t/1.parquet"), json!("e1"), json!("applied")],
                vec![json!("t/2.parquet"), json!("e2"), json!("rejected")],
            ],
        ),
        Some("last-applied") => Reply::rows(
            &[("order_key", "text"), ("s3_key", "text")],
            vec![vec![json!("0002"), json!("t/2.parquet")]],
        ),
        _ => default_reply(s),
    });
    let wh = ready(&server).await;
    let keys: Vec<String> = (0..1001).map(|i| format!("t/{i}.parquet")).collect();
    let found = wh.applied("orders", &keys).await.unwrap();
    assert_eq!(found["t/1.parquet"].etag, "e1");
    assert!(!found["t/1.parquet"].rejected() && found["t/2.parquet"].rejected());
    assert_eq!(
        by_kind(&server, "applied").len(),
        3,
        "keys are looked up 500 at a time"
    );
    assert_eq!(
        wh.last_applied("orders").await.unwrap(),
        Some(("0002".into(), "t/2.parquet".into()))
    );
    wh.record_status(
        "orders",
        &[batch_file("t/9.parquet", "0009")],
        cdc_worker::batch::LedgerStatus::Rejected,
        "bad footer",
    )
    .await
    .unwrap();
    assert!(
        by_kind(&server, "ledger-status")[0]
            .body
            .contains("'rejected', 'bad footer'")
    );
}

#[tokio::test]
async fn prepare_creates_bookkeeping_and_drops_only_stale_staging_tables() {
    let server = ProtocolServer::core().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = format!("_cdc_worker_stage__{now}_00000002_b2");
    server.respond(move |s| match s.kind() {
        Some("list-stages") => Reply::rows(
            &[("table_name", "text")],
            vec![
                vec![json!("_cdc_worker_stage__1000_00000001_b1")],
                vec![json!(fresh)],
            ],
        ),
        _ => default_reply(s),
    });
    let wh = warehouse(&server);
    wh.prepare().await.unwrap();
    assert_eq!(
        server.kinds(),
        [
            "version",
            "create-ledger",
            "create-fence",
            "list-stages",
            "drop-stale-stage"
        ]
    );
    assert_eq!(
        by_kind(&server, "drop-stale-stage")[0].body,
        "DROP TABLE IF EXISTS \"public\".\"_cdc_worker_stage__1000_00000001_b1\""
    );
    assert!(
        by_kind(&server, "create-ledger")[0]
            .body
            .contains("PRIMARY INDEX table_name, s3_key")
    );
}

#[tokio::test]
async fn ping_names_the_step_that_failed() {
    let server = ProtocolServer::cloud().await;
    let wh = warehouse_with(cloud_config(&server), CopySource::Direct(None));
    wh.ping(std::time::Duration::from_secs(5)).await.unwrap();

    let server = ProtocolServer::cloud().await;
    server.script(|s| s.client_secret = "rotated".into());
    let err = warehouse_with(cloud_config(&server), CopySource::Direct(None))
        .ping(std::time::Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WarehouseError::Auth(ref m) if m.starts_with("step 1/4 (authentication)")),
        "{err}"
    );

    let server = ProtocolServer::cloud().await;
    server.script(|s| s.account = "other".into());
    let err = warehouse_with(cloud_config(&server), CopySource::Direct(None))
        .ping(std::time::Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("warehouse authentication failed: step 2/4 (engine resolution)"),
        "{err}"
    );
    assert!(
        err.to_string().contains("account `acme` does not exist"),
        "{err}"
    );

    let server = ProtocolServer::cloud().await;
    server.script(|s| s.engine_stopped = true);
    let err = warehouse_with(cloud_config(&server), CopySource::Direct(None))
        .ping(std::time::Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WarehouseError::Unavailable(ref m) if m.starts_with("step 3/4 (SELECT 1)") && m.contains("is stopped")),
        "{err}"
    );
}

fn parquet(columns: &[(&str, &str)], rows: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.parquet");
    let cols: Vec<(String, String)> = columns
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    let data: Vec<Vec<duckdb::types::Value>> = (0..rows)
        .map(|i| {
            cols.iter()
                .map(|(_, t)| {
                    if t == "BIGINT" {
                        duckdb::types::Value::BigInt(i as i64)
                    } else {
                        duckdb::types::Value::Text(format!("v{i}"))
                    }
                })
                .collect()
        })
        .collect();
    cdc_worker::devkit::parquet::write_parquet(&path, &cols, &data).unwrap();
    std::fs::read(path).unwrap()
}

#[tokio::test]
async fn stage_reads_only_footers_with_range_requests() {
    let s3 = FakeS3::start().await;
    let small = parquet(
        &[("Op", "VARCHAR"), ("id", "BIGINT"), ("name", "VARCHAR")],
        3,
    );
    // A footer longer than the first 64 KiB read: many long column names.
    let wide_columns: Vec<(String, &str)> = (0..1200)
        .map(|i| {
            (
                format!("a_rather_long_column_name_for_a_wide_table_{i:04}"),
                "VARCHAR",
            )
        })
        .collect();
    let wide_refs: Vec<(&str, &str)> = wide_columns.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let wide = parquet(&wide_refs, 1);
    s3.put("dms", "t/small.parquet", small.clone());
    s3.put("dms", "t/wide.parquet", wide.clone());
    s3.put(
        "dms",
        "t/garbage.parquet",
        b"this is not parquet at all, not even close".to_vec(),
    );
    let server = ProtocolServer::core().await;
    let wh = cdc_worker::warehouse::firebolt::Firebolt::with_client(
        crate::support::client(crate::support::core_config(&server)),
        "public",
        "Op",
        s3.store(),
        CopySource::Direct(None),
    );
    let file = |key: &str, size: usize| BatchFile {
        bucket: "dms".into(),
        key: key.into(),
        size: size as u64,
        etag: "e".into(),
        order_key: key.into(),
        full_load: false,
    };
    let staged = wh
        .stage(
            "b1",
            vec![
                file("t/small.parquet", small.len()),
                file("t/wide.parquet", wide.len()),
                file("t/gone.parquet", 100),
                file("t/garbage.parquet", 42),
            ],
        )
        .await;
    assert!(staged.workspace.is_none(), "nothing is downloaded");
    let small_file = staged.files[0].as_ref().unwrap();
    assert_eq!(small_file.schema.rows, 3);
    assert!(small_file.schema.op.is_some());
    assert_eq!(
        small_file.schema.table.names().collect::<Vec<_>>(),
        ["id", "name"]
    );
    assert!(small_file.local_path.is_none());
    let wide_file = staged.files[1].as_ref().unwrap();
    assert_eq!(wide_file.schema.table.columns.len(), 1200);
    assert!(matches!(staged.files[2], Err(StageError::Missing)));
    assert!(matches!(staged.files[3], Err(StageError::Poison(_))));

    let requests = s3.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.method == "GET"
                && r.range.as_deref().is_some_and(|r| r.starts_with("bytes=-"))),
        "{requests:?}"
    );
    let wide_reads: Vec<_> = requests
        .iter()
        .filter(|r| r.path == "/dms/t/wide.parquet")
        .collect();
    assert_eq!(
        wide_reads.len(),
        2,
        "a long footer takes a second, longer tail read"
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.path == "/dms/t/small.parquet")
            .count(),
        1
    );
    assert!(wide.len() > 65_536);
}

/// A segment of full-load files: the check inside the transaction decides, an INSERT
/// replaces the MERGE when nothing blocks it, and the MERGE runs when something does (or
/// when the answer has no row).
#[tokio::test]
async fn a_full_load_segment_is_inserted_without_merge_when_its_keys_are_new() {
    for (blockers, expected) in [(Some(0), "insert"), (Some(2), "merge"), (None, "merge")] {
        let server = ProtocolServer::core().await;
        server.respond(move |s| match s.kind() {
            Some("check") => Reply::counts(&[5, 0, 5, 0]),
            Some("fast-load-check") => match blockers {
                Some(n) => Reply::counts(if n == 0 { &[0] } else { &[2] }),
                None => Reply::rows(&[("x", "long")], vec![]),
            },
            _ => default_reply(s),
        });
        let wh = ready(&server).await;
        let files: Vec<StagedFile> = two_files()
            .into_iter()
            .map(|mut f| {
                f.file.full_load = true;
                f
            })
            .collect();
        let stats = wh.apply(&plan(&files, keyed()), &files).await.unwrap();
        assert_eq!(
            server.kinds(),
            [
                "create-stage",
                "copy",
                "check",
                "begin",
                "fast-load-check",
                expected,
                "ledger",
                "commit",
                "drop-stage"
            ]
        );
        assert_eq!(stats.fast_load, expected == "insert");
        if expected == "insert" {
            let insert = &by_kind(&server, "insert")[0].body;
            assert!(
                insert.starts_with(
                    "INSERT INTO \"public\".\"orders\" (\"id\", \"n\", \"seq\") SELECT"
                ),
                "{insert}"
            );
        }
    }
}

#[tokio::test]
async fn a_reload_builds_its_generation_beside_the_table_and_swaps_it_in_one_transaction() {
    let server = ProtocolServer::core().await;
    check_answers(&server, &[5, 0, 0, 4, 0, 0]);
    let wh = ready(&server).await;
    let next = cdc_worker::warehouse::generation_table("orders", 2);
    // The reload's first batch creates the generation as the live table's columns and
    // loads into it; the ledger stays the table's.
    let files = two_files();
    let mut p = plan(&files, keyed());
    p.into = Some(next.clone());
    p.ddl = vec![Ddl::CreateTable {
        columns: vec![
            Column {
                nullable: false,
                ..Column::new("id", ColumnType::Int64)
            },
            Column::new("n", ColumnType::Int32),
            Column::new("seq", ColumnType::String),
        ],
        primary_key: vec!["id".into()],
    }];
    wh.apply(&p, &files).await.unwrap();
    let merge = &by_kind(&server, "merge")[0].body;
    assert!(merge.contains(&format!("\"public\".\"{next}\"")), "{merge}");
    let ledger = &by_kind(&server, "ledger")[0].body;
    assert!(ledger.contains("'orders'"), "{ledger}");
    assert!(server.table("public", "orders").is_some());

    server.clear();
    wh.promote("orders", &next).await.unwrap();
    let kinds = server.kinds();
    let begin = kinds
        .iter()
        .position(|k| k == "begin")
        .expect("a transaction");
    assert_eq!(
        kinds[begin..],
        [
            "begin",
            "promote-drop",
            "promote-rename",
            "promote-drop-tombstones",
            "commit"
        ]
    );
    for s in by_kind(&server, "promote-rename")
        .iter()
        .chain(&by_kind(&server, "promote-drop"))
    {
        assert!(s.param("transaction_id").is_some(), "{}", s.body);
    }
    // What Firebolt now holds: the generation under the table's name, nothing beside it.
    let (columns, index) = server.table("public", "orders").expect("the table");
    assert_eq!(columns.len(), 3);
    assert_eq!(index, ["id"]);
    assert!(server.table("public", &next).is_none());
}

/// A history table's reload: the generation's new column added to the live table, its
/// versions merged in and the generation dropped, all inside one transaction the server
/// accepts; the live table stays, with the column.
#[tokio::test]
async fn a_history_reload_merges_its_generation_into_the_live_table_in_one_transaction() {
    let server = ProtocolServer::core().await;
    let wh = ready(&server).await;
    let history = "\"__valid_from\" TIMESTAMP NULL, \"__valid_to\" TIMESTAMP NULL, \"__is_current\" BOOLEAN NULL, \"__op\" TEXT NULL";
    let next = cdc_worker::warehouse::generation_table("orders_h", 2);
    server.execute(&format!("CREATE TABLE \"public\".\"orders_h\" (\"id\" BIGINT NOT NULL, \"n\" INTEGER NULL, {history}) PRIMARY INDEX \"id\""));
    server.execute(&format!("CREATE TABLE \"public\".\"{next}\" (\"id\" BIGINT NOT NULL, \"n\" INTEGER NULL, \"tier\" TEXT NULL, {history}) PRIMARY INDEX \"id\""));
    server.clear();
    let reload = cdc_worker::batch::HistoryReload {
        key: vec!["id".into()],
        columns: vec!["id".into(), "n".into(), "tier".into()],
        add_columns: vec![Column::new("tier", ColumnType::String)],
        tracked: vec!["n".into(), "tier".into()],
        ordering: None,
        // 2026-12-01 10:30:00 UTC
        at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_121_000),
    };
    wh.merge_generation("orders_h", &next, &reload)
        .await
        .unwrap();
    assert_eq!(
        server.kinds(),
        [
            "begin",
            "reload-add-column",
            "reload-history-merge",
            "reload-drop-generation",
            "commit"
        ]
    );
    for kind in [
        "reload-add-column",
        "reload-history-merge",
        "reload-drop-generation",
    ] {
        assert_eq!(
            by_kind(&server, kind)[0].param("transaction_id"),
            Some(TX1),
            "{kind}"
        );
    }
    let (columns, _) = server
        .table("public", "orders_h")
        .expect("the live table stays");
    assert!(columns.iter().any(|c| c.0 == "tier"), "{columns:?}");
    assert!(server.table("public", &next).is_none());
}
