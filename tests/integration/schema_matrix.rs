//! Schema evolution, every change kind under each policy, through the worker on LocalStack
//! and DuckDB: the target's columns, types and rows, the history in S3, the alert, and
//! `schema accept` releasing held tables.

use std::time::{Duration, Instant};

use cdc_worker::config::{Config, KeySpec, TableConfig, TableSchemaConfig};
use cdc_worker::devkit::resources::ReceivedAlert;
use cdc_worker::schema::policy::{
    IncompatiblePolicy, NewColumnPolicy, NewTablePolicy, PolicyPreset,
};
use cdc_worker::schema::store::{SchemaStore, TableStatus};
use cdc_worker::worker::Worker;
use duckdb::types::Value;

use crate::harness::{Env, i, null, parquet_with_columns, s};

type Cols = &'static [(&'static str, &'static str)];

fn policy(c: &mut Config, table: &str, schema: TableSchemaConfig) {
    c.tables.insert(
        table.into(),
        TableConfig {
            key: Some(KeySpec::One("id".into())),
            schema: Some(schema),
            ..Default::default()
        },
    );
}

fn preset(p: PolicyPreset) -> TableSchemaConfig {
    TableSchemaConfig {
        preset: Some(p),
        ..Default::default()
    }
}

/// Strict, but creating new tables (so the other change kinds can be held).
fn strict_existing() -> TableSchemaConfig {
    TableSchemaConfig {
        preset: Some(PolicyPreset::Strict),
        new_table: Some(NewTablePolicy::Create),
        ..Default::default()
    }
}

const ID_V: Cols = &[("id", "BIGINT"), ("v", "VARCHAR")];
const CDC_ID_V: Cols = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];
const CDC_EXTRA: Cols = &[
    ("Op", "VARCHAR"),
    ("id", "BIGINT"),
    ("v", "VARCHAR"),
    ("extra", "VARCHAR"),
];
const ID_V_GONE: Cols = &[("id", "BIGINT"), ("v", "VARCHAR"), ("gone", "VARCHAR")];
const ID_INT: Cols = &[("id", "BIGINT"), ("n", "INTEGER")];
const CDC_ID_BIG: Cols = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("n", "BIGINT")];
const ID_BIG: Cols = &[("id", "BIGINT"), ("n", "BIGINT")];
const CDC_ID_INT: Cols = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("n", "INTEGER")];
const CDC_ID_TEXT: Cols = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("n", "VARCHAR")];

async fn put(env: &Env, table: &str, file: &str, cols: Cols, rows: &[Vec<Value>]) {
    env.put_parquet(&env.key(table, file), cols, rows).await;
}

/// Waits until nothing is visible in the queue and every lane is idle or held.
async fn settle(env: &Env, worker: &Worker) {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the worker did not settle"
        );
        let attrs = env
            .aws
            .sqs
            .get_queue_attributes()
            .queue_url(&env.res.queue_url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .send()
            .await
            .unwrap();
        let visible: u64 = attrs
            .attributes()
            .and_then(|a| a.get(&A::ApproximateNumberOfMessages))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let idle = worker
            .engine()
            .lanes()
            .iter()
            .all(|(_, l)| l.pending_files == 0 || l.held.is_some());
        if visible == 0 && idle {
            if quiet_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(3) {
                return;
            }
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn rows(env: &Env, table: &str, columns: &[&str]) -> Vec<Vec<Option<String>>> {
    env.rows(table, columns)
}

fn r(cells: &[Option<&str>]) -> Vec<Option<String>> {
    cells.iter().map(|c| c.map(str::to_string)).collect()
}

fn types(env: &Env, table: &str) -> Vec<(String, String)> {
    env.columns(table)
}

/// The one alert of a schema version: several files, batches or retries must not repeat it.
fn alert_for<'a>(alerts: &'a [ReceivedAlert], table: &str, version: u64) -> &'a ReceivedAlert {
    let matching: Vec<&ReceivedAlert> = alerts
        .iter()
        .filter(|a| a.body["table"] == table && a.body["schema_version"] == version)
        .collect();
    match matching[..] {
        [one] => one,
        [] => panic!("no alert for {table} v{version}: {alerts:#?}"),
        _ => panic!(
            "{} alerts for {table} v{version}: {matching:#?}",
            matching.len()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_change_kind_under_every_policy() {
    let env = Env::with_receives("schema", 50, |c| {
        c.batch.linger = Duration::from_secs(2);
        policy(c, "new_table_evolve", preset(PolicyPreset::Evolve));
        policy(c, "new_table_strict", preset(PolicyPreset::Strict));
        policy(
            c,
            "new_table_ignore",
            TableSchemaConfig {
                new_table: Some(NewTablePolicy::Ignore),
                ..Default::default()
            },
        );
        policy(c, "new_column_add", preset(PolicyPreset::Evolve));
        policy(
            c,
            "new_column_ignore",
            TableSchemaConfig {
                new_column: Some(NewColumnPolicy::Ignore),
                ..Default::default()
            },
        );
        policy(c, "new_column_fail", strict_existing());
        policy(c, "removed_keep", preset(PolicyPreset::Evolve));
        policy(c, "removed_fail", strict_existing());
        policy(c, "widening_widen", preset(PolicyPreset::Evolve));
        policy(c, "widening_fail", strict_existing());
        policy(c, "narrowing", strict_existing());
        policy(c, "incompatible_variant", preset(PolicyPreset::Evolve));
        policy(c, "incompatible_cast", preset(PolicyPreset::Lenient));
        policy(
            c,
            "incompatible_ignore",
            TableSchemaConfig {
                incompatible: Some(IncompatiblePolicy::Ignore),
                ..Default::default()
            },
        );
        policy(c, "incompatible_fail", strict_existing());
        policy(c, "probable_rename", preset(PolicyPreset::Evolve));
        policy(c, "nullability", strict_existing());
        policy(c, "case_collision", preset(PolicyPreset::Evolve));
    })
    .await;
    let worker = env.start().await;

    for t in ["new_table_evolve", "new_table_strict", "new_table_ignore"] {
        put(&env, t, "LOAD00000001.parquet", ID_V, &[vec![i(1), s("a")]]).await;
    }
    // New column, in one batch with files of the old schema (the batch is split).
    for t in ["new_column_add", "new_column_ignore", "new_column_fail"] {
        put(
            &env,
            t,
            "LOAD00000001.parquet",
            ID_V,
            &[vec![i(1), s("a")], vec![i(2), s("b")]],
        )
        .await;
        if t == "new_column_fail" {
            env.eventually("loaded", Duration::from_secs(30), || async {
                worker.warehouse().row_count(t).await.unwrap_or(0) == 2
            })
            .await;
        }
        put(
            &env,
            t,
            "20261124-100000000.parquet",
            CDC_ID_V,
            &[vec![s("U"), i(2), s("b2")]],
        )
        .await;
        put(
            &env,
            t,
            "20261124-100100000.parquet",
            CDC_EXTRA,
            &[
                vec![s("U"), i(1), s("a2"), s("x")],
                vec![s("I"), i(3), s("c"), s("y")],
            ],
        )
        .await;
        put(
            &env,
            t,
            "20261124-100200000.parquet",
            CDC_EXTRA,
            &[vec![s("I"), i(4), s("d"), null()]],
        )
        .await;
    }
    for t in ["removed_keep", "removed_fail"] {
        put(
            &env,
            t,
            "LOAD00000001.parquet",
            ID_V_GONE,
            &[vec![i(1), s("a"), s("g1")], vec![i(2), s("b"), s("g2")]],
        )
        .await;
        env.eventually("loaded", Duration::from_secs(30), || async {
            worker.warehouse().row_count(t).await.unwrap_or(0) == 2
        })
        .await;
        put(
            &env,
            t,
            "20261124-100000000.parquet",
            CDC_ID_V,
            &[vec![s("U"), i(1), s("a2")], vec![s("I"), i(3), s("c")]],
        )
        .await;
    }
    for t in ["widening_widen", "widening_fail"] {
        put(
            &env,
            t,
            "LOAD00000001.parquet",
            ID_INT,
            &[vec![i(1), Value::Int(5)]],
        )
        .await;
        env.eventually("loaded", Duration::from_secs(30), || async {
            worker.warehouse().row_count(t).await.unwrap_or(0) == 1
        })
        .await;
        put(
            &env,
            t,
            "20261124-100000000.parquet",
            CDC_ID_BIG,
            &[vec![s("I"), i(2), i(5_000_000_000)]],
        )
        .await;
    }
    put(
        &env,
        "narrowing",
        "LOAD00000001.parquet",
        ID_BIG,
        &[vec![i(1), i(5_000_000_000)]],
    )
    .await;
    put(
        &env,
        "narrowing",
        "20261124-100000000.parquet",
        CDC_ID_INT,
        &[vec![s("I"), i(2), Value::Int(7)]],
    )
    .await;
    for t in [
        "incompatible_variant",
        "incompatible_cast",
        "incompatible_ignore",
        "incompatible_fail",
    ] {
        put(&env, t, "LOAD00000001.parquet", ID_BIG, &[vec![i(1), i(5)]]).await;
        env.eventually("loaded", Duration::from_secs(30), || async {
            worker.warehouse().row_count(t).await.unwrap_or(0) == 1
        })
        .await;
        put(
            &env,
            t,
            "20261124-100000000.parquet",
            CDC_ID_TEXT,
            &[vec![s("I"), i(2), s("123")], vec![s("I"), i(3), s("abc")]],
        )
        .await;
    }
    put(
        &env,
        "probable_rename",
        "LOAD00000001.parquet",
        &[("id", "BIGINT"), ("old_name", "VARCHAR")],
        &[vec![i(1), s("a")]],
    )
    .await;
    put(
        &env,
        "probable_rename",
        "20261124-100000000.parquet",
        &[("Op", "VARCHAR"), ("id", "BIGINT"), ("new_name", "VARCHAR")],
        &[vec![s("I"), i(2), s("b")]],
    )
    .await;
    // REQUIRED columns first, then a file where `v` is optional and NULL.
    env.put_bytes(
        &env.key("nullability", "LOAD00000001.parquet"),
        parquet_with_columns(&["id", "v"], &[1, 10]),
    )
    .await;
    env.eventually("loaded", Duration::from_secs(30), || async {
        worker
            .warehouse()
            .row_count("nullability")
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    put(
        &env,
        "nullability",
        "20261124-100000000.parquet",
        &[("Op", "VARCHAR"), ("id", "INTEGER"), ("v", "INTEGER")],
        &[vec![s("I"), Value::Int(2), null()]],
    )
    .await;
    let colliding = parquet_with_columns(&["id", "Amount", "amount"], &[1, 1, 2]);
    env.put_bytes(
        &env.key("case_collision", "LOAD00000001.parquet"),
        colliding,
    )
    .await;

    settle(&env, &worker).await;
    let held: Vec<String> = worker
        .engine()
        .lanes()
        .into_iter()
        .filter(|(_, l)| l.held.is_some())
        .map(|(t, _)| t)
        .collect();
    let alerts = env.alerts().await;
    worker.shutdown().await;

    let mut expected_held = vec![
        "case_collision",
        "incompatible_fail",
        "new_column_fail",
        "new_table_strict",
        "removed_fail",
        "widening_fail",
    ];
    expected_held.sort();
    assert_eq!(held, expected_held, "held tables");
    let schemas = SchemaStore::new(env.store.clone(), &env.res.bucket, "cdc-worker");

    // New table.
    assert_eq!(
        rows(&env, "new_table_evolve", &["id", "v"]),
        vec![r(&[Some("1"), Some("a")])]
    );
    let a = alert_for(&alerts, "new_table_evolve", 1);
    assert_eq!(a.body["changes"][0]["kind"], "new_table");
    assert_eq!(a.body["held"], false);
    assert!(
        types(&env, "new_table_strict").is_empty(),
        "held: not created"
    );
    let a = alert_for(&alerts, "new_table_strict", 1);
    assert_eq!(a.body["held"], true);
    assert_eq!(a.body["severity"], "error");
    assert!(
        a.body["next_steps"]
            .as_str()
            .unwrap()
            .contains("cdc-worker schema accept new_table_strict")
    );
    assert_eq!(a.attributes["held"]["Value"], "true");
    assert!(
        types(&env, "new_table_ignore").is_empty(),
        "ignored: not created"
    );
    let a = alert_for(&alerts, "new_table_ignore", 1);
    assert_eq!(a.body["actions"][0]["action"], "ignored_table");
    let history = schemas.history("new_table_ignore").await.unwrap();
    assert!(matches!(history[0].status, TableStatus::Ignored { .. }));

    // New column.
    assert_eq!(
        types(&env, "new_column_add"),
        vec![
            ("id".into(), "BIGINT".into()),
            ("v".into(), "VARCHAR".into()),
            ("extra".into(), "VARCHAR".into())
        ]
    );
    assert_eq!(
        rows(&env, "new_column_add", &["id", "v", "extra"]),
        vec![
            r(&[Some("1"), Some("a2"), Some("x")]),
            r(&[Some("2"), Some("b2"), None]),
            r(&[Some("3"), Some("c"), Some("y")]),
            r(&[Some("4"), Some("d"), None]),
        ],
        "a change inside a multi-file batch loses nothing"
    );
    let a = alert_for(&alerts, "new_column_add", 2);
    assert_eq!(a.body["changes"][0]["kind"], "new_column");
    assert_eq!(a.body["actions"][0]["action"], "added_column");
    assert!(
        a.attributes["change_kinds"]["Value"]
            .as_str()
            .unwrap()
            .contains("new_column")
    );
    assert_eq!(
        types(&env, "new_column_ignore").len(),
        2,
        "ignored column not added"
    );
    assert_eq!(
        rows(&env, "new_column_ignore", &["id", "v"]),
        vec![
            r(&[Some("1"), Some("a2")]),
            r(&[Some("2"), Some("b2")]),
            r(&[Some("3"), Some("c")]),
            r(&[Some("4"), Some("d")])
        ]
    );
    assert_eq!(
        alert_for(&alerts, "new_column_ignore", 2).body["actions"][0]["action"],
        "ignored_column"
    );
    assert_eq!(
        rows(&env, "new_column_fail", &["id", "v"]),
        vec![r(&[Some("1"), Some("a")]), r(&[Some("2"), Some("b2")])],
        "held at the change: the file before it is applied, the change and after wait"
    );

    // Removed column: kept; inserted rows NULL, updated rows keep their last value.
    assert_eq!(
        rows(&env, "removed_keep", &["id", "v", "gone"]),
        vec![
            r(&[Some("1"), Some("a2"), Some("g1")]),
            r(&[Some("2"), Some("b"), Some("g2")]),
            r(&[Some("3"), Some("c"), None])
        ]
    );
    assert_eq!(
        alert_for(&alerts, "removed_keep", 2).body["actions"][0]["action"],
        "kept_column"
    );
    assert_eq!(
        rows(&env, "removed_fail", &["id", "v", "gone"]),
        vec![
            r(&[Some("1"), Some("a"), Some("g1")]),
            r(&[Some("2"), Some("b"), Some("g2")])
        ],
        "held: the full load only"
    );

    // Widening.
    assert_eq!(
        types(&env, "widening_widen")[1],
        ("n".into(), "BIGINT".into())
    );
    assert_eq!(
        rows(&env, "widening_widen", &["id", "n"]),
        vec![
            r(&[Some("1"), Some("5")]),
            r(&[Some("2"), Some("5000000000")])
        ]
    );
    assert_eq!(
        alert_for(&alerts, "widening_widen", 2).body["changes"][0]["change"],
        "widening"
    );
    assert_eq!(
        types(&env, "widening_fail")[1],
        ("n".into(), "INTEGER".into())
    );
    assert_eq!(
        rows(&env, "widening_fail", &["id", "n"]),
        vec![r(&[Some("1"), Some("5")])],
        "held: the full load only"
    );

    // Every held table says so once, as an error, with the command that releases it.
    for t in [
        "new_column_fail",
        "removed_fail",
        "widening_fail",
        "incompatible_fail",
    ] {
        let a = alert_for(&alerts, t, 2);
        assert_eq!(a.body["held"], true, "{t}: {:#}", a.body);
        assert_eq!(a.body["severity"], "error", "{t}");
        assert!(
            a.body["next_steps"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("cdc-worker schema accept {t}")),
            "{t}: {:#}",
            a.body
        );
    }

    // Narrowing: no DDL, a lossless cast, even under strict.
    assert_eq!(types(&env, "narrowing")[1], ("n".into(), "BIGINT".into()));
    assert_eq!(
        rows(&env, "narrowing", &["id", "n"]),
        vec![
            r(&[Some("1"), Some("5000000000")]),
            r(&[Some("2"), Some("7")])
        ]
    );
    let a = alert_for(&alerts, "narrowing", 2);
    assert_eq!(a.body["changes"][0]["change"], "narrowing");
    assert_eq!(a.body["held"], false);

    // Incompatible.
    assert_eq!(
        types(&env, "incompatible_variant"),
        vec![
            ("id".into(), "BIGINT".into()),
            ("n".into(), "BIGINT".into()),
            ("n__v_string".into(), "VARCHAR".into())
        ]
    );
    assert_eq!(
        rows(&env, "incompatible_variant", &["id", "n", "n__v_string"]),
        vec![
            r(&[Some("1"), Some("5"), None]),
            r(&[Some("2"), Some("123"), None]),
            r(&[Some("3"), None, Some("abc")])
        ]
    );
    assert_eq!(
        alert_for(&alerts, "incompatible_variant", 2).body["actions"][0]["action"],
        "added_variant_column"
    );
    assert_eq!(types(&env, "incompatible_cast").len(), 2);
    assert_eq!(
        rows(&env, "incompatible_cast", &["id", "n"]),
        vec![
            r(&[Some("1"), Some("5")]),
            r(&[Some("2"), Some("123")]),
            r(&[Some("3"), None])
        ]
    );
    assert_eq!(
        rows(&env, "incompatible_ignore", &["id", "n"]),
        vec![
            r(&[Some("1"), Some("5")]),
            r(&[Some("2"), None]),
            r(&[Some("3"), None])
        ]
    );
    assert_eq!(
        rows(&env, "incompatible_fail", &["id", "n"]),
        vec![r(&[Some("1"), Some("5")])]
    );

    // Probable rename: reported as such, applied as add + keep.
    assert_eq!(
        rows(&env, "probable_rename", &["id", "old_name", "new_name"]),
        vec![
            r(&[Some("1"), Some("a"), None]),
            r(&[Some("2"), None, Some("b")])
        ]
    );
    let a = alert_for(&alerts, "probable_rename", 2);
    assert_eq!(a.body["changes"][0]["kind"], "probable_rename");
    assert_eq!(a.body["changes"][0]["from"], "old_name");

    // Nullability: reported, nothing to do, not held even under strict.
    assert_eq!(
        rows(&env, "nullability", &["id", "v"]),
        vec![r(&[Some("1"), Some("10")]), r(&[Some("2"), None])]
    );
    let a = alert_for(&alerts, "nullability", 2);
    assert_eq!(a.body["changes"][0]["kind"], "nullability");
    assert_eq!(a.body["held"], false);

    // Names that collide once case is folded: held, the message names both.
    assert!(types(&env, "case_collision").is_empty());
    let a = alerts
        .iter()
        .find(|a| a.body["table"] == "case_collision")
        .expect("collision alert");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("`Amount` and `amount`"),
        "{:#}",
        a.body
    );

    // History: one version per change, with the file that introduced it.
    let h = schemas.history("new_column_add").await.unwrap();
    assert_eq!(h.len(), 2);
    assert!(
        h[1].file
            .as_deref()
            .unwrap()
            .ends_with("20261124-100100000.parquet")
    );
    assert!(h[1].columns.iter().any(|c| c.name == "extra"));

    // Accepting releases held tables: their waiting files are applied as evolve would.
    for t in [
        "new_table_strict",
        "new_column_fail",
        "widening_fail",
        "removed_fail",
    ] {
        cdc_worker::commands::schema_accept(&env.config, t, None)
            .await
            .unwrap();
    }
    cdc_worker::commands::schema_accept(&env.config, "incompatible_fail", Some("cast"))
        .await
        .unwrap();
    let worker = env.start().await;
    settle(&env, &worker).await;
    let lanes = worker.engine().lanes();
    let still_held: Vec<String> = lanes
        .iter()
        .filter(|(_, l)| l.held.is_some())
        .map(|(t, _)| t.clone())
        .collect();
    worker.shutdown().await;
    assert_eq!(still_held, vec!["case_collision".to_string()], "{lanes:#?}");
    assert_eq!(
        rows(&env, "new_table_strict", &["id", "v"]),
        vec![r(&[Some("1"), Some("a")])]
    );
    assert_eq!(
        rows(&env, "new_column_fail", &["id", "v", "extra"]),
        vec![
            r(&[Some("1"), Some("a2"), Some("x")]),
            r(&[Some("2"), Some("b2"), None]),
            r(&[Some("3"), Some("c"), Some("y")]),
            r(&[Some("4"), Some("d"), None]),
        ]
    );
    assert_eq!(
        types(&env, "widening_fail")[1],
        ("n".into(), "BIGINT".into())
    );
    assert_eq!(
        rows(&env, "widening_fail", &["id", "n"]),
        vec![
            r(&[Some("1"), Some("5")]),
            r(&[Some("2"), Some("5000000000")])
        ],
        "the waiting file is applied once widened"
    );
    assert_eq!(
        rows(&env, "removed_fail", &["id", "v", "gone"]),
        vec![
            r(&[Some("1"), Some("a2"), Some("g1")]),
            r(&[Some("2"), Some("b"), Some("g2")]),
            r(&[Some("3"), Some("c"), None])
        ],
        "kept column: the updated row keeps its value, the inserted one has NULL"
    );
    assert_eq!(
        rows(&env, "incompatible_fail", &["id", "n"]),
        vec![
            r(&[Some("1"), Some("5")]),
            r(&[Some("2"), Some("123")]),
            r(&[Some("3"), None])
        ]
    );
}
