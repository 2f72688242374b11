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
    // Mid-stream files, so that applying one again would show: a keyed table would rewind
    // (or the file would go to the DLQ as out of order), an append-only one would double.
    let mut events = worker.engine().subscribe();
    for table in ["orders", "audit_log"] {
        let (key, _, _) = stream
            .uploaded
            .iter()
            .find(|(k, _, _)| k.contains(&format!("/{table}/")) && !k.contains("LOAD"))
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
    // Both re-uploads reach their lanes (notifications are asynchronous) before settling.
    let mut seen = std::collections::HashSet::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen.len() < 2 {
            if let Ok(cdc_worker::apply::EngineEvent::BatchFinished { table, .. }) =
                events.recv().await
            {
                seen.insert(table);
            }
        }
    })
    .await
    .expect("both re-uploads were handled");
    env.settle(&worker, Duration::from_secs(60)).await;
    let (queue, dlq) = env.depths().await;
    worker.shutdown().await;

    stream.assert_tables();
    assert_eq!(
        (queue, dlq),
        (0, 0),
        "every message, duplicates included, was acknowledged"
    );
    assert_eq!(
        env.ledger_keys(),
        stream.uploaded_keys(),
        "each file is recorded once"
    );
}
