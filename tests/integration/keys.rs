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

    // `schema accept` cannot release it (nothing in the schema policy holds it) and says
    // what does; it changes nothing.
    let refused = cdc_worker::commands::schema_accept(&env.config, "repeats", None)
        .await
        .expect_err("nothing to accept");
    assert!(
        refused
            .to_string()
            .contains("not held by its schema policy")
            && refused.to_string().contains("key values that repeat"),
        "{refused}"
    );
    // Someone removes the repeat: the worker applies the waiting file by itself.
    env.db()
        .execute_batch("DELETE FROM repeats WHERE v = 'b'")
        .unwrap();
    let worker = env.start().await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    assert_eq!(env.rows("repeats", &["id", "v"]), vec![row(1, "c")]);
    assert_eq!(env.depths().await, (0, 0));
    let merged = env.alerts().await;
    assert!(
        merged.iter().any(|a| a.body["alert"] == "key_changed"
            && a.body["table"] == "repeats"
            && a.body["held"] == false),
        "the release is announced: {merged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_column_missing_from_the_files_holds_the_table_until_the_key_is_fixed() {
    // The configured key names a column the files do not have (a typo).
    let mut env = Env::new("key-missing", |c| keyed_by(c, "customers", "customer_id")).await;
    let worker = env.start().await;
    env.put_parquet(
        &env.key("customers", "20261124-100000000.parquet"),
        CDC,
        &[vec![s("I"), i(1), s("a")]],
    )
    .await;
    env.eventually("the table is held", Duration::from_secs(30), || async {
        worker
            .engine()
            .lanes()
            .iter()
            .any(|(t, l)| t == "customers" && l.held.is_some())
    })
    .await;
    let refused = cdc_worker::commands::schema_accept(&env.config, "customers", None).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let still_held = worker
        .engine()
        .lanes()
        .iter()
        .any(|(t, l)| t == "customers" && l.held.is_some());
    let depths = env.depths().await;
    let alerts = env.alerts().await;
    worker.shutdown().await;
    assert!(
        refused.is_err(),
        "schema accept refuses: there is nothing to accept"
    );
    assert!(
        still_held,
        "held after a re-check, not flipping between held and released"
    );
    assert_eq!(depths, (1, 0), "the file waits in flight, not in the DLQ");
    let held: Vec<_> = alerts
        .iter()
        .filter(|a| a.body["alert"] == "table_held")
        .collect();
    assert_eq!(held.len(), 1, "one alert for the cause: {alerts:?}");
    assert!(
        held[0].body["message"]
            .as_str()
            .unwrap()
            .contains("key column `customer_id` is not in the file")
    );
    // The key is fixed in the config: after a restart the waiting file applies.
    keyed_by(&mut env.config, "customers", "id");
    let worker = env.start().await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    assert_eq!(env.rows("customers", &["id", "v"]), vec![row(1, "a")]);
    assert_eq!(env.depths().await, (0, 0));
}

fn keyed_by(c: &mut Config, table: &str, column: &str) {
    c.tables.insert(
        table.to_string(),
        TableConfig {
            key: Some(KeySpec::One(column.into())),
            ..Default::default()
        },
    );
}
