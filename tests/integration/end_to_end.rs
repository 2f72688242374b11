//! The foundation acceptance test: real S3 -> SQS notifications from LocalStack through the
//! running worker into DuckDB, for a full load plus a dozen CDC files over four tables.

use std::time::Duration;

use cdc_worker::schema::store::SchemaStore;

use crate::harness::Env;
use crate::model::{Stream, TableModel};

const ORDERS: &[(&str, &str)] = &[
    ("id", "BIGINT"),
    ("customer", "VARCHAR"),
    ("amount", "DECIMAL(10,2)"),
    ("status", "VARCHAR"),
];
const ORDERS_CDC: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("id", "BIGINT"),
    ("customer", "VARCHAR"),
    ("amount", "DECIMAL(10,2)"),
    ("status", "VARCHAR"),
];
const ORDERS_CDC_V2: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("id", "BIGINT"),
    ("customer", "VARCHAR"),
    ("amount", "DECIMAL(10,2)"),
    ("status", "VARCHAR"),
    ("coupon", "VARCHAR"),
];
const ITEMS: &[(&str, &str)] = &[
    ("order_id", "BIGINT"),
    ("line_no", "INTEGER"),
    ("sku", "VARCHAR"),
    ("qty", "INTEGER"),
];
const ITEMS_CDC: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("order_id", "BIGINT"),
    ("line_no", "INTEGER"),
    ("sku", "VARCHAR"),
    ("qty", "INTEGER"),
];
const AUDIT: &[(&str, &str)] = &[("event", "VARCHAR"), ("detail", "VARCHAR")];
const AUDIT_CDC: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("event", "VARCHAR"),
    ("detail", "VARCHAR"),
];
const REFUNDS_CDC: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("id", "BIGINT"),
    ("order_id", "BIGINT"),
    ("amount", "DECIMAL(10,2)"),
];

fn order(op: Option<&'static str>, id: &str, status: &str) -> Vec<Option<&'static str>> {
    let id: &'static str = Box::leak(id.to_string().into_boxed_str());
    let status: &'static str = Box::leak(status.to_string().into_boxed_str());
    let mut row = vec![];
    if let Some(op) = op {
        row.push(Some(op));
    }
    row.extend([Some(id), Some("acme"), Some("10.50"), Some(status)]);
    row
}

/// Writes the whole scenario; returns the stream with its expected state.
pub async fn scenario(env: &Env) -> Stream<'_> {
    env.put_table_keys(serde_json::json!({
        "order_items": ["order_id", "line_no"],
        "audit_log": null,
        "refunds": "id"
    }))
    .await;
    let mut s = Stream::new(env);
    s.table("orders", TableModel::keyed(&["id"]));
    s.table("order_items", TableModel::keyed(&["order_id", "line_no"]));
    s.table("audit_log", TableModel::append_only());
    s.table("refunds", TableModel::keyed(&["id"]));

    // Full load.
    let load1: Vec<_> = (1..=20)
        .map(|i| order(None, &i.to_string(), "new"))
        .collect();
    let load2: Vec<_> = (21..=40)
        .map(|i| order(None, &i.to_string(), "new"))
        .collect();
    s.file("orders", "LOAD00000001.parquet", ORDERS, &load1)
        .await;
    s.file("orders", "LOAD00000002.parquet", ORDERS, &load2)
        .await;
    let items: Vec<Vec<Option<&str>>> = (1..=10)
        .flat_map(|o| (1..=2).map(move |l| (o, l)))
        .map(|(o, l)| {
            let o: &'static str = Box::leak(o.to_string().into_boxed_str());
            let l: &'static str = Box::leak(l.to_string().into_boxed_str());
            vec![Some(o), Some(l), Some("SKU"), Some("1")]
        })
        .collect();
    s.file("order_items", "LOAD00000001.parquet", ITEMS, &items)
        .await;
    s.file(
        "audit_log",
        "LOAD00000001.parquet",
        AUDIT,
        &[
            vec![Some("boot"), Some("a")],
            vec![Some("boot"), Some("b")],
            vec![Some("boot"), Some("b")],
        ],
    )
    .await;

    // CDC.
    s.file(
        "orders",
        "2026/11/24/20261124-100100000.parquet",
        ORDERS_CDC,
        &[
            order(Some("U"), "1", "paid"),
            order(Some("I"), "41", "new"),
            order(Some("D"), "2", "new"),
        ],
    )
    .await;
    // Several changes to one key inside one file: the last one wins.
    s.file(
        "orders",
        "2026/11/24/20261124-100200000.parquet",
        ORDERS_CDC,
        &[
            order(Some("I"), "42", "new"),
            order(Some("U"), "42", "paid"),
            order(Some("U"), "42", "shipped"),
            order(Some("U"), "3", "paid"),
            order(Some("U"), "3", "refunded"),
            order(Some("I"), "45", "new"),
            order(Some("D"), "45", "new"),
        ],
    )
    .await;
    s.file(
        "order_items",
        "20261124-100200000.parquet",
        ITEMS_CDC,
        &[
            vec![Some("U"), Some("1"), Some("1"), Some("SKU"), Some("5")],
            vec![Some("D"), Some("1"), Some("2"), Some("SKU"), Some("1")],
            vec![Some("I"), Some("11"), Some("1"), Some("SKU-11"), Some("1")],
        ],
    )
    .await;
    s.file(
        "audit_log",
        "20261124-100200000.parquet",
        AUDIT_CDC,
        &[
            vec![Some("I"), Some("login"), Some("x")],
            vec![Some("I"), Some("login"), Some("x")],
            vec![Some("D"), Some("boot"), Some("a")],
            vec![Some("I"), Some("logout"), Some("y")],
        ],
    )
    .await;
    // A row inserted, then deleted by the next file (uploaded back to back: one batch).
    s.file(
        "orders",
        "2026/11/24/20261124-100300000.parquet",
        ORDERS_CDC,
        &[order(Some("I"), "43", "new")],
    )
    .await;
    s.file(
        "orders",
        "2026/11/24/20261124-100300500.parquet",
        ORDERS_CDC,
        &[order(Some("D"), "43", "new"), order(Some("U"), "4", "paid")],
    )
    .await;
    // The source adds a column.
    let with_coupon =
        |op: &'static str, id: &'static str, status: &'static str, coupon: Option<&'static str>| {
            vec![
                Some(op),
                Some(id),
                Some("acme"),
                Some("10.50"),
                Some(status),
                coupon,
            ]
        };
    s.file(
        "orders",
        "2026/11/24/20261124-100400000.parquet",
        ORDERS_CDC_V2,
        &[
            with_coupon("I", "44", "new", Some("X")),
            with_coupon("U", "5", "paid", Some("Y")),
        ],
    )
    .await;
    // A table seen for the first time in CDC.
    s.file(
        "refunds",
        "20261124-100400000.parquet",
        REFUNDS_CDC,
        &[
            vec![Some("I"), Some("1"), Some("1"), Some("10.50")],
            vec![Some("I"), Some("2"), Some("3"), Some("5.00")],
        ],
    )
    .await;
    s.file(
        "order_items",
        "20261124-100500000.parquet",
        ITEMS_CDC,
        &[
            vec![Some("I"), Some("11"), Some("2"), Some("SKU-11"), Some("2")],
            vec![Some("U"), Some("11"), Some("1"), Some("SKU-11b"), Some("1")],
        ],
    )
    .await;
    s.file(
        "orders",
        "2026/11/24/20261124-100500000.parquet",
        ORDERS_CDC_V2,
        &[
            with_coupon("U", "1", "paid", Some("Z")),
            with_coupon("D", "44", "new", Some("X")),
        ],
    )
    .await;
    s.file(
        "refunds",
        "20261124-100600000.parquet",
        REFUNDS_CDC,
        &[
            vec![Some("U"), Some("1"), Some("1"), Some("7.25")],
            vec![Some("D"), Some("2"), Some("3"), Some("5.00")],
        ],
    )
    .await;
    s.file(
        "audit_log",
        "20261124-100600000.parquet",
        AUDIT_CDC,
        &[
            vec![Some("I"), Some("shutdown"), None],
            vec![Some("I"), Some("shutdown"), None],
        ],
    )
    .await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dms_stream_reaches_duckdb_exactly() {
    let env = Env::new("e2e", |c| {
        c.batch.linger = Duration::from_secs(2);
        c.tables.insert(
            "orders".into(),
            cdc_worker::config::TableConfig {
                key: Some(cdc_worker::config::KeySpec::One("id".into())),
                ..Default::default()
            },
        );
    })
    .await;
    let worker = env.start().await;
    let stream = scenario(&env).await;
    assert_eq!(
        stream.uploaded.len(),
        16,
        "4 full-load files and 12 CDC files"
    );
    env.settle(&worker, Duration::from_secs(90)).await;
    assert_eq!(
        worker.engine().waiting_files(),
        0,
        "every announced file was accounted for (the receivers' backpressure count)"
    );
    worker.shutdown().await;

    // Every table equals the independently computed state, row by row.
    stream.assert_tables();
    // The operation column is bookkeeping, never a target column.
    assert!(env.columns("orders").iter().all(|(c, _)| c != "Op"));
    assert!(env.columns("orders").iter().any(|(c, _)| c == "coupon"));

    // The schema change was announced once, with its JSON and filterable attributes.
    let alerts = env.alerts().await;
    let coupon: Vec<_> = alerts
        .iter()
        .filter(|a| {
            a.body["alert"] == "schema_change"
                && a.body["table"] == "orders"
                && a.body["schema_version"] == 2
        })
        .collect();
    assert_eq!(coupon.len(), 1, "one alert for orders v2: {alerts:#?}");
    let a = &coupon[0];
    assert_eq!(a.body["changes"][0]["kind"], "new_column");
    assert_eq!(a.body["changes"][0]["column"], "coupon");
    assert_eq!(a.body["changes"][0]["type"], "string");
    assert_eq!(a.body["actions"][0]["action"], "added_column");
    assert!(
        a.body["file"]
            .as_str()
            .unwrap()
            .ends_with("20261124-100400000.parquet")
    );
    assert!(a.body["detected_at"].as_str().is_some());
    assert_eq!(a.attributes["table"]["Value"], "orders");
    assert!(
        a.attributes["change_kinds"]["Value"]
            .as_str()
            .unwrap()
            .contains("new_column")
    );
    assert!(
        a.subject.len() < 100 && a.subject.contains("orders"),
        "{}",
        a.subject
    );
    assert!(
        alerts
            .iter()
            .any(|a| a.body["table"] == "refunds" && a.body["changes"][0]["kind"] == "new_table"),
        "the table first seen in CDC is announced"
    );

    // The S3 schema object holds the new schema.
    let schemas = SchemaStore::new(env.store.clone(), &env.res.bucket, "cdc-worker");
    let stored = schemas
        .load("orders")
        .await
        .unwrap()
        .expect("orders schema");
    assert_eq!(stored.current.version, 2);
    assert!(stored.current.columns.iter().any(|c| c.name == "coupon"));
    assert_eq!(stored.current.source.as_deref(), Some("public.orders"));
    let raw = env
        .store
        .get(
            &env.res.bucket,
            "cdc-worker/schema_metadata/orders_schema.json",
        )
        .await
        .unwrap()
        .expect("seed-layout key");
    let json: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    assert!(
        json["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "coupon")
    );
}
