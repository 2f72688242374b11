//! A key set on a table that was appended without one: the worker notices, checks the
//! table's rows for repeated key values, and either merges by the key from then on (with a
//! warning) or holds the table until the repeats are gone and `schema accept` releases it.

use std::time::Duration;

use cdc_worker::config::{Config, KeySpec, TableConfig};

use crate::harness::{Env, i, s};

const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];

fn keyed(c: &mut Config, tables: &[&str]) {
    for t in tables {
        c.tables.insert(
            t.to_string(),
            TableConfig {
                key: Some(KeySpec::One("id".into())),
                ..Default::default()
            },
        );
    }
}

fn row(id: i64, v: &str) -> Vec<Option<String>> {
    vec![Some(id.to_string()), Some(v.to_string())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_set_later_is_checked_for_repeats_before_the_table_is_merged() {
    let mut env = Env::new("key-later", |_| {}).await;
    // Appended without a key: `clean` has distinct ids, `repeats` has id 1 twice.
    let worker = env.start().await;
    env.put_parquet(
        &env.key("clean", "20261124-100000000.parquet"),
        CDC,
        &[vec![s("I"), i(1), s("a")], vec![s("I"), i(2), s("b")]],
    )
    .await;
    env.put_parquet(
        &env.key("repeats", "20261124-100000000.parquet"),
        CDC,
        &[vec![s("I"), i(1), s("a")], vec![s("I"), i(1), s("b")]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    let _ = env.alerts().await;

    // The key is configured, and the next files update and delete by it.
    keyed(&mut env.config, &["clean", "repeats"]);
    let worker = env.start().await;
    env.put_parquet(
        &env.key("clean", "20261124-100100000.parquet"),
        CDC,
        &[vec![s("U"), i(1), s("new")], vec![s("D"), i(2), s("b")]],
    )
    .await;
    env.put_parquet(
        &env.key("repeats", "20261124-100100000.parquet"),
        CDC,
        &[vec![s("U"), i(1), s("c")]],
    )
    .await;
    env.eventually(
        "the held table's file waits, the other is applied",
        Duration::from_secs(60),
        || async { env.depths().await == (1, 0) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = env.alerts().await;
    worker.shutdown().await;
    assert_eq!(
        env.rows("clean", &["id", "v"]),
        vec![row(1, "new")],
        "merged by the new key"
    );
    assert_eq!(
        env.rows("repeats", &["id", "v"]),
        vec![row(1, "a"), row(1, "b")],
        "nothing applied to the held table"
    );
    let key_alerts: Vec<_> = alerts
        .iter()
        .filter(|a| a.body["alert"] == "key_changed")
        .collect();
    assert_eq!(key_alerts.len(), 2, "one per table: {alerts:?}");
    let clean = key_alerts
        .iter()
        .find(|a| a.body["table"] == "clean")
        .unwrap();
    assert_eq!(clean.body["severity"], "warning");
    assert_eq!(clean.body["held"], false);
    let held = key_alerts
        .iter()
        .find(|a| a.body["table"] == "repeats")
        .unwrap();
    assert_eq!(held.body["severity"], "error");
    assert_eq!(held.body["held"], true);
    assert!(
        held.body["message"]
            .as_str()
            .unwrap()
            .contains("1 key values appear more than once"),
        "{}",
        held.body["message"]
    );

    // Someone removes the repeat and releases the table: the waiting file applies.
    env.db()
        .execute_batch("DELETE FROM repeats WHERE v = 'b'")
        .unwrap();
    cdc_worker::commands::schema_accept(&env.config, "repeats", None)
        .await
        .expect("the held table is released");
    let worker = env.start().await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    assert_eq!(env.rows("repeats", &["id", "v"]), vec![row(1, "c")]);
    assert_eq!(env.depths().await, (0, 0));
}
