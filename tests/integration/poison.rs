//! Bad input: the worker keeps running, and each message meets its documented fate.

use std::time::Duration;

use crate::harness::{Env, i, s};

const COLUMNS: &[(&str, &str)] = &[("id", "BIGINT"), ("name", "VARCHAR")];

async fn dlq_bodies(env: &Env) -> Vec<String> {
    let out = env
        .aws
        .sqs
        .receive_message()
        .queue_url(&env.res.dlq_url)
        .max_number_of_messages(10)
        .visibility_timeout(30)
        .send()
        .await
        .unwrap();
    out.messages()
        .iter()
        .filter_map(|m| m.body().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_messages_and_files_meet_their_fate() {
    let env = Env::with_receives("poison", 2, |c| {
        c.queue.visibility_timeout = Duration::from_secs(2);
        c.queue.retry_backoff = Duration::from_secs(1);
        c.queue.retry_backoff_max = Duration::from_secs(1);
    })
    .await;
    let worker = env.start().await;

    // A malformed body: left for the redrive policy.
    env.send("this is not a notification {").await;
    // A test event: acknowledged and dropped.
    env.send(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-24T10:00:00Z","Bucket":"x"}"#).await;
    // A key that is not Parquet: acknowledged and ignored.
    env.put_bytes(&env.key("notes", "readme.txt"), b"hello".to_vec())
        .await;
    // A missing object: skipped with an alert, acknowledged.
    let ghost = env.key("ghost", "20261124-100000000.parquet");
    env.send(&env.notification(&ghost, "0123", 100)).await;
    // A corrupt Parquet file: rejected with an alert, left for the DLQ.
    env.put_bytes(
        &env.key("broken", "20261124-100000000.parquet"),
        b"PAR1 definitely not parquet PAR1".to_vec(),
    )
    .await;
    // A hostile key: skipped.
    env.send(&env.notification("dms/public/../../etc/20261124-100000000.parquet", "1", 1))
        .await;
    // A good file alongside.
    env.put_parquet(
        &env.key("good", "LOAD00000001.parquet"),
        COLUMNS,
        &[vec![i(1), s("one")]],
    )
    .await;

    env.eventually(
        "both poison messages reach the DLQ",
        Duration::from_secs(60),
        || async { env.depths().await == (0, 2) },
    )
    .await;
    // Still running: a later file of the good table is applied.
    env.put_parquet(
        &env.key("good", "LOAD00000002.parquet"),
        COLUMNS,
        &[vec![i(2), s("two")]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let alerts = env.alerts().await;
    worker.shutdown().await;

    assert_eq!(
        env.rows("good", &["id", "name"]),
        vec![
            vec![Some("1".into()), Some("one".into())],
            vec![Some("2".into()), Some("two".into())]
        ]
    );
    let dlq = dlq_bodies(&env).await;
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert!(
        dlq.iter()
            .any(|b| b.starts_with("this is not a notification"))
    );
    assert!(dlq.iter().any(|b| b.contains("broken")));
    let kinds: Vec<(String, String)> = alerts
        .iter()
        .map(|a| {
            (
                a.body["alert"].as_str().unwrap_or("").to_string(),
                a.body["file"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        kinds
            .iter()
            .any(|(k, f)| k == "file_skipped" && f.contains("ghost")),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|(k, f)| k == "file_rejected" && f.contains("broken")),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|(k, f)| k == "file_skipped" && f.contains("etc")),
        "{kinds:?}"
    );
    // Nothing was created for the bad tables.
    assert!(env.columns("broken").is_empty() && env.columns("ghost").is_empty());
}
