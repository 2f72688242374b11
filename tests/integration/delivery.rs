//! At-least-once delivery: every notification twice, and applied files uploaded again,
//! leave the target exactly as one delivery would.

use std::time::Duration;

use crate::end_to_end::scenario;
use crate::harness::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_notifications_and_reuploads_change_nothing() {
    let env = Env::new("dup", |c| {
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
    // Every notification a second time (S3 delivers at least once).
    for (key, etag, size) in &stream.uploaded {
        env.send(&env.notification(key, etag, *size)).await;
    }
    env.settle(&worker, Duration::from_secs(90)).await;

    // Applied files uploaded again, unchanged: one keyed table, one append-only table.
    for table in ["orders", "audit_log"] {
        let (key, _, _) = stream
            .uploaded
            .iter()
            .rev()
            .find(|(k, _, _)| k.contains(&format!("/{table}/")))
            .unwrap();
        let body = env
            .store
            .get(&env.res.bucket, key)
            .await
            .unwrap()
            .unwrap()
            .body;
        env.put_bytes(key, body.to_vec()).await;
    }
    env.settle(&worker, Duration::from_secs(60)).await;
    let (queue, dlq) = env.depths().await;
    worker.shutdown().await;

    stream.assert_tables();
    assert_eq!(
        (queue, dlq),
        (0, 0),
        "every message, duplicates included, was acknowledged"
    );
    let ledger: i64 = env
        .db()
        .query_row("SELECT count(*) FROM _cdc_worker_ledger", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        ledger as usize,
        stream.uploaded.len(),
        "each file is recorded once"
    );
}
