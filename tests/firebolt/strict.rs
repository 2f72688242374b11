//! The protocol test server refuses what Firebolt refuses, and the worker's statements pass
//! it: the SQL rules (audit B1, B3, T2), the transaction state machine (T1, T9, M14),
//! hosts, accounts and databases (B4, T3-T5), session headers and error bodies (T8, W6),
//! the feature floor (B2), statements cancelled when the client gives up (W5), and every
//! column type through create, describe and plan (W1).

use std::collections::BTreeMap;
use std::time::Duration;

use cdc_worker::apply::plan::{Decision, PlanInput, plan};
use cdc_worker::batch::{
    ApplyPlan, BatchFile, KeyColumn, LoadColumn, LoadExpr, LoadMode, TargetTable,
};
use cdc_worker::schema::dialect::Dialect;
use cdc_worker::schema::policy::PolicyPreset;
use cdc_worker::schema::types::{Column, ColumnType, FileSchema, TableSchema};
use cdc_worker::warehouse::firebolt::client::{Statement, Target};
use cdc_worker::warehouse::firebolt::error::FireboltError;
use cdc_worker::warehouse::firebolt::run::Runner;
use cdc_worker::warehouse::firebolt::sql::{self, CopySource, S3Credentials};
use cdc_worker::warehouse::merge;
use cdc_worker::warehouse::{Warehouse, WarehouseError};

use crate::fbsql;
use crate::server::{CONFLICT_TEXT, ProtocolServer, Reply, default_reply};
use crate::support::{client, cloud_config, core_config, warehouse, warehouse_with};

fn file(key: &str) -> BatchFile {
    BatchFile {
        bucket: "dms".into(),
        key: key.into(),
        size: 10,
        etag: "e".into(),
        order_key: key.into(),
        full_load: false,
    }
}

fn plan_for(mode: LoadMode, ordering: Option<&str>) -> ApplyPlan {
    let staged = vec![
        Column::new("ID", ColumnType::Int64),
        Column::new("na\"me", ColumnType::String),
        Column::new("seq", ColumnType::String),
        Column::new("big", ColumnType::UInt64),
    ];
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
                expr: LoadExpr::Column("ID".into()),
            },
            LoadColumn {
                target: "na\"me".into(),
                expr: LoadExpr::TryCast {
                    column: "na\"me".into(),
                    to: ColumnType::Int64,
                },
            },
            LoadColumn {
                target: "seq".into(),
                expr: LoadExpr::Column("seq".into()),
            },
            LoadColumn {
                target: "big".into(),
                expr: LoadExpr::Column("big".into()),
            },
        ],
        mode,
        op_column: Some("Op".into()),
        ordering_column: ordering.map(str::to_string),
        staged_columns: staged,
        files: vec![file("t/1.parquet"), file("t/it's 2.parquet")],
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

fn accepted(sql: &str) {
    if let Err(e) = fbsql::parse(sql) {
        panic!("refused: {e}\n{sql}");
    }
}

/// Every statement the Firebolt apply renders (DDL, staging, COPY of each credential
/// kind, check, MERGE with and without tombstones, append, ledger, fence, describe,
/// rebuild, history tables) parses and passes the documented rules. Long on purpose: the
/// statements listed are the test's data.
#[test]
fn every_statement_the_worker_renders_is_accepted() {
    let stage = "\"public\".\"_cdc_worker_stage__1_00000001_b1\"";
    let target = "\"public\".\"orders\"";
    let tombs = "\"public\".\"_cdc_worker_deleted__orders\"";
    for p in [
        plan_for(keyed(), None),
        plan_for(keyed(), Some("seq")),
        plan_for(LoadMode::Append, None),
    ] {
        accepted(&sql::create_staging(stage, &p));
        for source in [
            CopySource::Direct(None),
            CopySource::Direct(Some(S3Credentials::Role {
                arn: "arn:aws:iam::1:role/r".into(),
                external_id: Some("x".into()),
            })),
            CopySource::Direct(Some(S3Credentials::Keys {
                access_key_id: "ASIA".into(),
                secret_access_key: cdc_worker::config::Secret::new("s"),
                session_token: Some(cdc_worker::config::Secret::new("t")),
            })),
            CopySource::Location("dms".into()),
        ] {
            for (copy, _) in sql::copy_statements(stage, &p, &p.files, &source) {
                accepted(&copy);
            }
        }
        accepted(&sql::check_query(&p, stage, &p.files).0);
        let rows = sql::staged_rows(stage, &p, &p.files);
        match &p.mode {
            LoadMode::Merge { .. } => {
                accepted(&merge::merge_statement(
                    Dialect::Firebolt,
                    target,
                    &p,
                    &rows,
                    Some(tombs),
                ));
                if let Some((create, record)) =
                    merge::tombstone_statements(target, tombs, &p, &rows)
                {
                    accepted(&create);
                    accepted(&record);
                }
            }
            LoadMode::Append => accepted(&merge::append_statement(
                Dialect::Firebolt,
                target,
                &p,
                &rows,
            )),
        }
        accepted(&sql::ledger_insert("\"public\".\"_cdc_worker_ledger\"", &p));
        if let LoadMode::Merge { .. } = &p.mode {
            accepted(&cdc_worker::warehouse::history::history_statement(
                Dialect::Firebolt,
                target,
                &p,
                &rows,
                &["na\"me".into(), "big".into()],
            ));
        }
    }
    let columns = vec![
        Column {
            name: "id".into(),
            ty: ColumnType::Int64,
            nullable: false,
        },
        Column::new(
            "n",
            ColumnType::Decimal {
                precision: 40,
                scale: 2,
            },
        ),
    ];
    for sql in [
        sql::create_table(target, &columns, &["id".into()], true),
        sql::create_table(
            target,
            &[
                columns.clone(),
                vec![
                    Column::new("__valid_from", ColumnType::Timestamp),
                    Column::new("__valid_to", ColumnType::Timestamp),
                    Column::new("__is_current", ColumnType::Boolean),
                    Column::new("__op", ColumnType::String),
                ],
            ]
            .concat(),
            &["id".into()],
            true,
        ),
        sql::add_column(target, &Column::new("x", ColumnType::TimestampTz)),
        sql::create_ledger("\"public\".\"_cdc_worker_ledger\""),
        sql::create_fence("\"public\".\"_cdc_worker_fence\""),
        sql::fence_select("\"f\"", "t"),
        sql::fence_insert("\"f\"", "t", 1, "w"),
        sql::fence_update("\"f\"", "t", 1, "w"),
        sql::applied_query("\"l\"", "t", &["a".into(), "b'".into()]),
        sql::last_applied_query("\"l\"", "t"),
        sql::ledger_summary_query("\"l\""),
        sql::status_insert("\"l\"", "t", &[file("k")], "rejected", "bad"),
        sql::ledger_entries_query("\"l\"", "t", 50),
        sql::describe_query("public", &["orders".into(), "x".into()], true),
        sql::describe_query("public", &["orders".into()], false),
        sql::describe_columns_query("public", &["orders".into()], true),
        sql::staging_tables_query("public"),
        sql::rebuild_copy("\"c\"", target, &columns, &["n".into()]),
        sql::rename_table("\"public\".\"c\"", "orders"),
        cdc_worker::warehouse::history::reload_statement(
            target,
            "\"public\".\"_cdc_worker_g00000002__orders\"",
            &cdc_worker::batch::HistoryReload {
                key: vec!["id".into()],
                columns: vec!["id".into(), "n".into()],
                add_columns: vec![],
                tracked: vec!["n".into()],
                ordering: Some("n".into()),
                // 2026-12-01 10:30:00 UTC
                at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_121_000),
            },
        ),
        sql::row_counts(target, "\"c\""),
        sql::drop_table(target),
        "BEGIN TRANSACTION".into(),
        "COMMIT".into(),
        "ROLLBACK".into(),
        "SELECT version()".into(),
    ] {
        accepted(&sql);
    }
}

/// Audit B3 and B1: what Firebolt refuses, the server refuses.
#[test]
fn a_null_safe_join_key_and_a_nullable_primary_index_are_refused() {
    let refusal = fbsql::parse(
        "MERGE INTO t AS t USING s AS s ON t.\"id\" IS NOT DISTINCT FROM s.\"id\" WHEN MATCHED THEN DELETE",
    )
    .unwrap_err();
    assert!(refusal.contains("no equality predicate"), "{refusal}");
    let refusal = fbsql::parse(
        "SELECT s.a FROM s LEFT JOIN d ON d.k IS NOT DISTINCT FROM s.k WHERE d.k IS NULL",
    )
    .unwrap_err();
    assert!(refusal.contains("no equality predicate"), "{refusal}");
    // One equality predicate is enough, whatever else the condition holds.
    accepted("SELECT s.a FROM s LEFT JOIN d ON d.k = s.k AND d.x IS NOT DISTINCT FROM s.x");

    let refusal =
        fbsql::parse("CREATE TABLE t (\"id\" BIGINT NULL, v TEXT NULL) PRIMARY INDEX \"id\"")
            .unwrap_err();
    assert!(refusal.contains("nullable column `id`"), "{refusal}");
    let refusal = fbsql::parse("CREATE TABLE t (id BIGINT, v TEXT) PRIMARY INDEX id").unwrap_err();
    assert!(
        refusal.contains("nullable"),
        "the current default is NULL: {refusal}"
    );
    accepted("CREATE TABLE t (id BIGINT NOT NULL, v TEXT NULL) PRIMARY INDEX id");

    // Types Firebolt does not have, and COPY options it does not document.
    for (sql, why) in [
        ("CREATE TABLE t (a UBIGINT NULL)", "does not exist"),
        ("CREATE TABLE t (a NUMERIC(40, 2) NULL)", "between 1 and 38"),
        ("SELECT CAST(a AS TINYINT) FROM t", "does not exist"),
        (
            "COPY INTO t (a) FROM 's3://b/k' WITH TYPE = PARQUET AUTO_CREATE = FALSE ON_ERROR = 'skip'",
            "unknown COPY option",
        ),
        (
            "COPY INTO t (a) FROM 's3://b/k' WITH CREDENTIALS = (AWS_KEY_ID = 'a' AWS_SECRET_KEY = 'b')",
            "unknown CREDENTIALS key",
        ),
        (
            "COPY INTO t (a $source_file_path) FROM 's3://b/k' WITH TYPE = PARQUET",
            "unknown COPY metadata",
        ),
        ("SELECT 1; SELECT 2", "one statement per request"),
        ("SELEC 1", "syntax error"),
    ] {
        let refusal = fbsql::parse(sql).unwrap_err();
        assert!(refusal.contains(why), "{sql}: {refusal}");
    }
}

/// The same two rules on the wire: the worker's MERGE of an older rendering is refused by
/// the server, the current one accepted.
#[tokio::test]
async fn the_server_refuses_them_on_the_wire_too() {
    let server = ProtocolServer::core().await;
    let c = client(core_config(&server));
    let refused = c
        .execute(&Statement::new(
            "create-table",
            "l",
            "CREATE TABLE \"orders\" (\"id\" BIGINT NULL) PRIMARY INDEX \"id\"",
        ))
        .await
        .unwrap_err();
    assert!(
        refused
            .sql_description()
            .is_some_and(|d| d.contains("cannot be used in a primary index")),
        "{refused}"
    );
    assert!(server.table("public", "orders").is_none());
}

fn runner_statement(kind: &'static str, sql: &str) -> Statement {
    Statement::new(kind, format!("t:{kind}"), sql)
}

/// Audit T1 and T9: BEGIN inside a transaction, COMMIT/ROLLBACK outside one, a statement
/// after a failed one, a conflict at COMMIT; sequence ids advance.
#[tokio::test]
async fn transactions_follow_firebolt_s_rules() {
    let server = ProtocolServer::core().await;
    server.execute("CREATE TABLE t (a INTEGER NOT NULL) PRIMARY INDEX a");
    let c = client(core_config(&server));

    let err = c
        .execute(&runner_statement("commit", "COMMIT"))
        .await
        .unwrap_err();
    assert!(
        err.sql_description()
            .is_some_and(|d| d.contains("no transaction is in progress")),
        "{err}"
    );

    let mut run = Runner::new(&c, "t1").await.unwrap();
    run.begin().await.unwrap();
    run.run("insert", "INSERT INTO t (a) VALUES (1)".into())
        .await
        .unwrap();
    run.run("insert", "INSERT INTO t (a) VALUES (2)".into())
        .await
        .unwrap();
    let err = run.run("begin", "BEGIN".into()).await.unwrap_err();
    assert!(
        err.sql_description()
            .is_some_and(|d| d.contains("already in progress")),
        "{err}"
    );
    // The failed BEGIN aborted the transaction: the next statement is refused, COMMIT fails
    // and is followed by a ROLLBACK (M14).
    let err = run
        .run("insert", "INSERT INTO t (a) VALUES (3)".into())
        .await
        .unwrap_err();
    assert!(
        err.sql_description().is_some_and(|d| d.contains("aborted")),
        "{err}"
    );
    assert!(run.commit().await.is_err());
    let statements = server.statements();
    let kinds: Vec<_> = statements.iter().map(|s| s.kind().unwrap_or("")).collect();
    assert_eq!(
        &kinds[kinds.len() - 2..],
        ["commit", "rollback"],
        "a failed COMMIT is followed by a ROLLBACK"
    );
    let sequences: Vec<_> = statements
        .iter()
        .filter(|s| s.kind() == Some("insert"))
        .map(|s| s.param("transaction_sequence_id").unwrap_or("").to_string())
        .collect();
    assert_eq!(sequences, ["0", "1", "2"], "the sequence id advances");
    assert_eq!(server.open_transactions(), 0);

    // Two writers of one table: the later COMMIT conflicts, with Firebolt's text, and the
    // worker reads it as a conflict (retried), not a SQL error.
    let mut first = Runner::new(&c, "w1").await.unwrap();
    let mut second = Runner::new(&c, "w2").await.unwrap();
    first.begin().await.unwrap();
    second.begin().await.unwrap();
    for run in [&mut first, &mut second] {
        run.run("insert", "INSERT INTO t (a) VALUES (9)".into())
            .await
            .unwrap();
    }
    first.commit().await.unwrap();
    let err = second.commit().await.unwrap_err();
    assert!(err.to_string().contains(&CONFLICT_TEXT[..30]), "{err}");
    assert!(matches!(
        WarehouseError::from(err),
        WarehouseError::Conflict(_)
    ));

    // DDL inside a transaction is private until COMMIT, and gone after ROLLBACK.
    let mut run = Runner::new(&c, "ddl").await.unwrap();
    run.begin().await.unwrap();
    run.run(
        "create-table",
        "CREATE TABLE u (a INTEGER NOT NULL) PRIMARY INDEX a".into(),
    )
    .await
    .unwrap();
    assert!(server.table("public", "u").is_none());
    run.rollback().await;
    assert!(server.table("public", "u").is_none());
}

/// Audit B4, T3, T4, T5: the account as the SDKs send it, hosts not paths, and a database
/// that does not exist.
#[tokio::test]
async fn accounts_hosts_and_databases_are_checked() {
    let server = ProtocolServer::cloud().await;
    server.script(|s| s.account = "my-account_1.x".into());
    let mut config = cloud_config(&server);
    if let Target::Cloud { account, .. } = &mut config.target {
        *account = "my-account_1.x".into();
    }
    let c = client(config.clone());
    c.execute(&Statement::new("select", "l", "SELECT 1"))
        .await
        .unwrap();
    assert!(
        server
            .seen()
            .iter()
            .any(|s| s.path == "/web/v3/account/my-account_1.x/engineUrl"),
        "sent raw"
    );

    let server = ProtocolServer::cloud().await;
    let mut config = cloud_config(&server);
    config.database = "nope".into();
    let err = client(config)
        .execute(&Statement::new("select", "l", "SELECT 1"))
        .await
        .unwrap_err();
    assert_eq!(err.step(), "USE DATABASE");
    assert!(err.to_string().contains("'nope' does not exist"), "{err}");
}

/// Audit T8 and W6: a reply that resets the session keeps what USE set; a 500 that wraps
/// an upstream 401 re-authenticates once, as the Python SDK does.
#[tokio::test]
async fn reset_session_and_a_wrapped_401() {
    let server = ProtocolServer::cloud().await;
    let c = client(cloud_config(&server));
    c.execute(&Statement::new("select", "l", "SELECT 1"))
        .await
        .unwrap();
    let mut session = c.session().await.unwrap();
    server.fault(
        Reply::empty()
            .header("Firebolt-Reset-Session", "")
            .header("Firebolt-Update-Parameters", "a=1")
            .header("Firebolt-Update-Parameters", "b=2"),
    );
    session.params.insert("some_setting".into(), "x".into());
    c.execute_in(&mut session, &Statement::new("select", "l", "SELECT 1"))
        .await
        .unwrap();
    assert_eq!(
        session.params.keys().collect::<Vec<_>>(),
        ["a", "b", "database", "engine"]
    );

    server.fault(Reply::status(
        500,
        "Received error from remote server /core/v1/accounts/acc-1/engines. HTTP status code: 401 Unauthorized, body: failed to verify JWT token: \"exp\" not satisfied",
    ));
    server.clear();
    c.execute(&Statement::new("select", "l", "SELECT 1"))
        .await
        .unwrap();
    let tokens = server
        .seen()
        .iter()
        .filter(|s| s.path == "/oauth/token")
        .count();
    assert_eq!(tokens, 1, "one new token after the wrapped 401");
}

/// Audit B2: an engine older than the floor is refused, naming both versions, in
/// check-connection (ping) and before the first batch (prepare).
#[tokio::test]
async fn an_engine_below_the_feature_floor_is_refused() {
    let server = ProtocolServer::core().await;
    server.script(|s| s.version = "4.7.3".into());
    let wh = warehouse(&server);
    let err = wh
        .ping(Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step 4/4 (engine version)")
            && err.contains("version 4.7.3")
            && err.contains("older than 4.28"),
        "{err}"
    );
    let err = wh.prepare().await.unwrap_err().to_string();
    assert!(err.contains("older than 4.28"), "{err}");
    assert!(server.table("public", "_cdc_worker_ledger").is_none());

    // An upgraded engine is accepted on the next check; an unreadable version is not refused.
    server.script(|s| s.version = "4.30.1".into());
    wh.ping(Duration::from_secs(5)).await.unwrap();
    let server = ProtocolServer::core().await;
    server.respond(|s| match s.kind() {
        Some("version") => Reply::error(400, "function version() does not exist"),
        _ => default_reply(s),
    });
    warehouse(&server).prepare().await.unwrap();
}

/// Audit W5: a statement the client gave up on (timeout) is cancelled on the server
/// because the worker asks for it; without the setting it would run on.
#[tokio::test]
async fn a_statement_the_client_gives_up_on_is_cancelled_on_the_server() {
    let server = ProtocolServer::core().await;
    server.execute("CREATE TABLE t (a INTEGER NOT NULL) PRIMARY INDEX a");
    let mut config = core_config(&server);
    config.request_timeout = Duration::from_millis(300);
    let c = client(config);
    server.fault(Reply::empty().delayed(Duration::from_secs(2)));
    let mut run = Runner::new(&c, "b1").await.unwrap();
    let err = run
        .run("merge", "INSERT INTO t (a) VALUES (1)".into())
        .await
        .unwrap_err();
    assert!(matches!(err, FireboltError::Timeout { .. }), "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.cancelled(), ["INSERT INTO t (a) VALUES (1)"]);
    assert_eq!(
        server.statements()[0].param("cancel_query_on_connection_drop"),
        Some("ALL")
    );

    // The same statement without the setting runs on after the client is gone.
    server.fault(Reply::empty().delayed(Duration::from_secs(2)));
    let err = c
        .execute(&Statement::new(
            "insert",
            "l",
            "INSERT INTO t (a) VALUES (2)",
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, FireboltError::Timeout { .. }), "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.completed_after_drop(),
        ["INSERT INTO t (a) VALUES (2)"]
    );
}

/// Audit W1: every source type, created by the worker on the strict server, described
/// back and planned again, is unchanged: no DDL (no rebuild), no cast.
#[tokio::test]
async fn every_column_type_round_trips_through_create_describe_and_plan() {
    let server = ProtocolServer::core().await;
    let wh = warehouse_with(core_config(&server), CopySource::Direct(None));
    wh.prepare().await.unwrap();
    let types = [
        ColumnType::Boolean,
        ColumnType::Int8,
        ColumnType::Int16,
        ColumnType::Int32,
        ColumnType::Int64,
        ColumnType::UInt8,
        ColumnType::UInt16,
        ColumnType::UInt32,
        ColumnType::UInt64,
        ColumnType::Float32,
        ColumnType::Float64,
        ColumnType::Decimal {
            precision: 20,
            scale: 0,
        },
        ColumnType::Decimal {
            precision: 12,
            scale: 2,
        },
        ColumnType::Decimal {
            precision: 40,
            scale: 4,
        },
        ColumnType::String,
        ColumnType::Binary,
        ColumnType::Date,
        ColumnType::Timestamp,
        ColumnType::TimestampTz,
    ];
    let mut columns = vec![Column::new("id", ColumnType::Int64)];
    columns.extend(
        types
            .iter()
            .enumerate()
            .map(|(i, t)| Column::new(format!("c{i}"), t.clone())),
    );
    let file = FileSchema {
        table: TableSchema::new(columns),
        op: Some("Op".into()),
        rows: 1,
        timestamp_max: vec![],
    };
    let key = vec!["id".to_string()];
    let name = |s: &str| wh.column_name(s);
    let resolutions = BTreeMap::new();
    let decide = |target: Option<&TargetTable>| {
        plan(&PlanInput {
            target,
            file: &file,
            policy: PolicyPreset::Strict.policy(),
            source_changes: &[],
            resolutions: &resolutions,
            key: &key,
            column_name: &name,
            history: false,
            tracked: None,
        })
    };
    let Decision::Apply { ddl, .. } = decide(None) else {
        panic!("a new table is created")
    };
    let cdc_worker::batch::Ddl::CreateTable {
        columns,
        primary_key,
    } = &ddl[0]
    else {
        panic!("{ddl:?}")
    };
    let c = client(core_config(&server));
    c.execute(&Statement::new(
        "create-table",
        "l",
        sql::create_table("\"public\".\"all_types\"", columns, primary_key, false),
    ))
    .await
    .unwrap();
    let described = wh.describe("all_types").await.unwrap().expect("created");
    assert_eq!(described.primary_key, ["id"]);
    match decide(Some(&described)) {
        Decision::Apply { ddl, load, .. } => {
            assert!(ddl.is_empty(), "{ddl:?}");
            assert!(
                load.iter().all(|l| matches!(l.expr, LoadExpr::Column(_))),
                "{load:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}
