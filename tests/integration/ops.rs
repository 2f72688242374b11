//! Operations: `replay` re-drives a table from the S3 listing through the queue, and the
//! HTTP endpoints report health, readiness, lanes and the documented metric series.

use std::time::Duration;

use cdc_worker::config::{KeySpec, TableConfig};

use crate::harness::Env;
use crate::model::{Stream, TableModel};

/// The endpoints test's table: no other test of this binary uses it, so its metric series
/// are this test's alone.
const T: &str = "ops_endpoints";

const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];

fn keyed(c: &mut cdc_worker::config::Config) {
    c.tables.insert(
        "orders".into(),
        TableConfig {
            key: Some(KeySpec::One("id".into())),
            ..Default::default()
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_redrives_a_table_from_the_listing() {
    let env = Env::new("replay", keyed).await;
    let worker = env.start().await;
    let mut stream = Stream::new(&env);
    stream.table("orders", TableModel::keyed(&["id"]));
    stream
        .file(
            "orders",
            "20261124-100000000.parquet",
            CDC,
            &[
                vec![Some("I"), Some("1"), Some("a")],
                vec![Some("I"), Some("2"), Some("b")],
            ],
        )
        .await;
    stream
        .file(
            "orders",
            "20261124-100100000.parquet",
            CDC,
            &[vec![Some("U"), Some("1"), Some("a2")]],
        )
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;

    // The last file lands while notifications are off (as if its message were lost).
    let saved = env.pause_notifications().await;
    stream
        .file(
            "orders",
            "20261124-100200000.parquet",
            CDC,
            &[
                vec![Some("D"), Some("2"), Some("b")],
                vec![Some("I"), Some("3"), Some("c")],
            ],
        )
        .await;
    env.resume_notifications(saved).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let lost = env.key("orders", "20261124-100200000.parquet");
    assert!(
        worker
            .warehouse()
            .applied("orders", std::slice::from_ref(&lost))
            .await
            .unwrap()
            .is_empty(),
        "the lost file is not applied before the replay"
    );
    assert_eq!(
        worker
            .warehouse()
            .last_applied("orders")
            .await
            .unwrap()
            .map(|(_, key)| key),
        Some(env.key("orders", "20261124-100100000.parquet"))
    );

    // Replay the whole table: applied files are skipped by the ledger, the lost one lands.
    cdc_worker::commands::replay(&env.config, "orders", None, false)
        .await
        .unwrap();
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;

    stream.assert_tables();
    assert_eq!(
        env.ledger_keys(),
        [
            "20261124-100000000.parquet",
            "20261124-100100000.parquet",
            "20261124-100200000.parquet"
        ]
        .map(|f| env.key("orders", f))
        .to_vec(),
        "each file applied once"
    );
    assert_eq!(env.depths().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoints_expose_health_readiness_lanes_and_metrics() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::new("ops", |c| {
        c.tables.insert(
            T.into(),
            TableConfig {
                key: Some(KeySpec::One("id".into())),
                ..Default::default()
            },
        );
        c.telemetry.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.lease.enabled = true;
        c.lease.ttl = Duration::from_secs(10);
    })
    .await;
    let worker = env.start().await;
    let mut stream = Stream::new(&env);
    stream.table(T, TableModel::keyed(&["id"]));
    stream
        .file(
            T,
            "20261124-100000000.parquet",
            CDC,
            &[vec![Some("I"), Some("1"), Some("a")]],
        )
        .await;
    stream
        .file(
            T,
            "20261124-100100000.parquet",
            &[
                ("Op", "VARCHAR"),
                ("id", "BIGINT"),
                ("v", "VARCHAR"),
                ("w", "VARCHAR"),
            ],
            &[vec![Some("I"), Some("2"), Some("b"), Some("new")]],
        )
        .await;
    env.send("not a notification").await;
    env.eventually("both files applied", Duration::from_secs(30), || async {
        worker.warehouse().row_count(T).await.unwrap_or(0) == 2
    })
    .await;

    let get = |path: &str| {
        let url = format!("http://127.0.0.1:{port}{path}");
        async move {
            let r = reqwest::get(&url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(get("/readyz").await.0, 200);
    let (code, lanes) = get("/status").await;
    assert_eq!(code, 200);
    let lanes: serde_json::Value = serde_json::from_str(&lanes).unwrap();
    let lane = lanes
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["table"] == T)
        .unwrap_or_else(|| panic!("no lane for {T}: {lanes}"));
    assert_eq!(lane["pending_files"], 0, "{lane}");
    assert!(lane["held"].is_null(), "{lane}");
    let (code, metrics) = get("/metrics").await;
    assert_eq!(code, 200);
    // The recorder is process-wide and other tests run alongside: per-table series are
    // asserted by value on a table only this test uses, global ones by presence.
    let value = |series: &str| -> Option<f64> {
        metrics.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    };
    let table_series = |name: &str| format!("{name}{{table=\"{T}\"}}");
    for (name, expected) in [
        ("cdc_worker_files_applied_total", 2.0),
        ("cdc_worker_rows_applied_total", 2.0),
        // v1 (new table) and v2 (new column `w`).
        ("cdc_worker_schema_changes_total", 2.0),
        ("cdc_worker_table_held", 0.0),
    ] {
        let series = table_series(name);
        assert_eq!(value(&series), Some(expected), "{series} in:\n{metrics}");
    }
    assert!(
        value(&table_series("cdc_worker_table_lag_seconds")).is_some(),
        "lag series for {T}:\n{metrics}"
    );
    for series in [
        "cdc_worker_messages_received_total",
        "cdc_worker_messages_deleted_total",
        "cdc_worker_messages_failed_total",
        "cdc_worker_batch_duration_seconds_bucket",
        "cdc_worker_tables_held",
        "cdc_worker_lease_events_total{event=\"acquired\"}",
        "cdc_worker_warehouse_statements_total",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }
    worker.shutdown().await;
    stream.assert_tables();
}

/// A DMS reload, which the worker does not follow yet: the rewritten full load is skipped
/// with an alert that says it was a reload and points at the runbook, and the runbook's
/// rebuild (worker stopped, table and ledger rows dropped, then `replay`) ends with exactly
/// the reloaded source's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_reload_alert_a_dms_reload_is_alerted_and_the_rebuild_by_hand_gives_the_source_s_rows()
{
    use crate::harness::{i, s};
    let env = Env::new("reload-by-hand", |c| {
        keyed(c);
        c.dms.reload = cdc_worker::config::ReloadPolicy::Alert;
    })
    .await;
    let worker = env.start().await;
    let data = &[("id", "BIGINT"), ("v", "VARCHAR")];
    let load = env.key("orders", "LOAD00000001.parquet");
    let rows = [vec![i(1), s("a")], vec![i(2), s("b")], vec![i(3), s("c")]];
    env.put_parquet(&load, data, &rows).await;
    let old_cdc = env.key("orders", "20261124-100000000.parquet");
    env.put_parquet(&old_cdc, CDC, &[vec![s("U"), i(1), s("a2")]])
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;

    // The reload (TargetTablePrepMode DROP_AND_CREATE): the table's objects deleted, the
    // full load written again under the same key with today's rows, then new changes.
    env.store.delete(&env.res.bucket, &old_cdc).await.unwrap();
    let reloaded = [vec![i(1), s("x")], vec![i(3), s("c")], vec![i(4), s("d")]];
    env.put_parquet(&load, data, &reloaded).await;
    let new_cdc = env.key("orders", "20261124-110000000.parquet");
    env.put_parquet(&new_cdc, CDC, &[vec![s("U"), i(3), s("c2")]])
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let alerts = env.alerts().await;
    worker.shutdown().await;
    let location = format!("s3://{}/{load}", env.res.bucket);
    let skipped = alerts
        .iter()
        .map(|a| &a.body)
        .find(|b| b["alert"] == "file_skipped" && b["file"] == location.as_str())
        .expect("the rewritten full load is alerted");
    let steps = skipped["next_steps"].as_str().unwrap();
    assert!(
        steps.contains("reload") && steps.contains("docs/reloads.md"),
        "{skipped}"
    );

    // The runbook's rebuild.
    env.db()
        .execute_batch(&format!(
            "DROP TABLE orders; DELETE FROM {} WHERE table_name = 'orders';",
            cdc_worker::warehouse::LEDGER_TABLE
        ))
        .unwrap();
    let worker = env.start().await;
    cdc_worker::commands::replay(&env.config, "orders", None, false)
        .await
        .unwrap();
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    let row = |id: &str, v: &str| vec![Some(id.to_string()), Some(v.to_string())];
    assert_eq!(
        env.rows("orders", &["id", "v"]),
        vec![row("1", "x"), row("3", "c2"), row("4", "d")],
        "the reloaded source's rows: 2 gone, 1 changed without a change file, 4 new, 3 changed after"
    );
    assert_eq!(env.depths().await, (0, 0));
}
