//! Delivery faults: a table that keeps failing, files that arrive late, and messages whose
//! work outlasts their visibility timeout.

use std::sync::Arc;
use std::time::Duration;

use cdc_worker::config::{KeySpec, TableConfig};
use cdc_worker::queue::{FileOutcome, Queue, SqsQueue, Tracker};

use crate::harness::{Env, i, s};

const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];

fn keyed(c: &mut cdc_worker::config::Config, table: &str) {
    c.tables.insert(
        table.into(),
        TableConfig {
            key: Some(KeySpec::One("id".into())),
            ..Default::default()
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_table_blocks_only_itself() {
    let env = Env::with_receives("fail", 4, |c| {
        c.queue.retry_backoff = Duration::from_secs(1);
        c.queue.retry_backoff_max = Duration::from_secs(1);
    })
    .await;
    // A target whose CHECK constraint the first file violates: every apply of it fails.
    {
        let db = env.db();
        db.execute_batch("CREATE TABLE fragile (id BIGINT, v VARCHAR CHECK (length(v) < 5))")
            .unwrap();
    }
    let worker = env.start().await;
    env.put_parquet(
        &env.key("fragile", "20261124-100000000.parquet"),
        CDC,
        &[vec![s("I"), i(1), s("far too long")]],
    )
    .await;
    env.put_parquet(
        &env.key("fragile", "20261124-100100000.parquet"),
        CDC,
        &[vec![s("I"), i(2), s("ok")]],
    )
    .await;
    for n in 0..3 {
        env.put_parquet(
            &env.key("steady", &format!("20261124-10{n:02}00000.parquet")),
            CDC,
            &[vec![s("I"), i(n), s("fine")]],
        )
        .await;
    }
    // The failing file goes to the DLQ after its receives; the later file waits behind it.
    env.eventually(
        "the failing file reaches the DLQ",
        Duration::from_secs(60),
        || async { env.depths().await.1 == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = env.alerts().await;
    let (queue, dlq) = env.depths().await;
    worker.shutdown().await;

    assert_eq!(dlq, 1);
    assert_eq!(
        queue, 1,
        "the later file of the failing table waits (in flight), it is not applied past the failure"
    );
    assert_eq!(
        env.rows("fragile", &["id"]),
        Vec::<Vec<Option<String>>>::new(),
        "nothing of the failing table is applied"
    );
    assert_eq!(
        env.rows("steady", &["id", "v"]),
        (0..3)
            .map(|n| vec![Some(n.to_string()), Some("fine".to_string())])
            .collect::<Vec<_>>(),
        "other tables go on"
    );
    assert!(
        alerts.iter().any(|a| a.body["alert"] == "table_failing"
            && a.body["table"] == "fragile"
            && a.body["next_steps"].as_str().is_some()),
        "{alerts:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_files_are_held_without_an_ordering_column() {
    let env = Env::with_receives("late", 2, |c| {
        c.queue.visibility_timeout = Duration::from_secs(2);
        c.queue.retry_backoff = Duration::from_secs(1);
        c.queue.retry_backoff_max = Duration::from_secs(1);
        keyed(c, "accounts");
    })
    .await;
    let worker = env.start().await;
    env.put_parquet(
        &env.key("accounts", "20261124-100000000.parquet"),
        CDC,
        &[vec![s("I"), i(1), s("a")]],
    )
    .await;
    env.put_parquet(
        &env.key("accounts", "20261124-100300000.parquet"),
        CDC,
        &[vec![s("U"), i(1), s("c")]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    // An older file shows up after a newer one was applied.
    env.put_parquet(
        &env.key("accounts", "20261124-100200000.parquet"),
        CDC,
        &[vec![s("U"), i(1), s("b")]],
    )
    .await;
    env.eventually(
        "the late file reaches the DLQ",
        Duration::from_secs(40),
        || async { env.depths().await == (0, 1) },
    )
    .await;
    let alerts = env.alerts().await;
    worker.shutdown().await;

    assert_eq!(
        env.rows("accounts", &["id", "v"]),
        vec![vec![Some("1".into()), Some("c".into())]]
    );
    assert!(
        alerts.iter().any(|a| a.body["alert"] == "file_out_of_order"
            && a.body["file"]
                .as_str()
                .unwrap()
                .ends_with("20261124-100200000.parquet")),
        "{alerts:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_files_are_applied_safely_with_an_ordering_column() {
    let env = Env::new("ordered", |c| {
        c.dms.ordering_column = Some("seq".into());
        keyed(c, "accounts");
    })
    .await;
    let columns = &[
        ("Op", "VARCHAR"),
        ("seq", "VARCHAR"),
        ("id", "BIGINT"),
        ("v", "VARCHAR"),
    ];
    let worker = env.start().await;
    env.put_parquet(
        &env.key("accounts", "20261124-100000000.parquet"),
        columns,
        &[
            vec![s("I"), s("0001"), i(1), s("a")],
            vec![s("I"), s("0002"), i(2), s("x")],
        ],
    )
    .await;
    env.put_parquet(
        &env.key("accounts", "20261124-100300000.parquet"),
        columns,
        &[
            vec![s("U"), s("0030"), i(1), s("c")],
            vec![s("D"), s("0031"), i(2), s("x")],
        ],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    // A late file: older changes to both keys, and a key nobody touched since.
    env.put_parquet(
        &env.key("accounts", "20261124-100200000.parquet"),
        columns,
        &[
            vec![s("U"), s("0020"), i(1), s("b")],
            vec![s("U"), s("0021"), i(2), s("zombie")],
            vec![s("I"), s("0022"), i(3), s("late but new")],
        ],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let (queue, dlq) = env.depths().await;
    worker.shutdown().await;

    assert_eq!((queue, dlq), (0, 0), "the late file was applied, not held");
    assert_eq!(
        env.rows("accounts", &["id", "v"]),
        vec![
            vec![Some("1".into()), Some("c".into())],
            vec![Some("3".into()), Some("late but new".into())],
        ],
        "no row is rewound and no deleted row comes back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_is_kept_alive_while_work_runs() {
    let env = Env::new("keepalive", |c| {
        c.queue.visibility_timeout = Duration::from_secs(2)
    })
    .await;
    let queue: Arc<dyn Queue> = Arc::new(SqsQueue::new(env.aws.sqs.clone(), &env.res.queue_url));
    // S3 sent an s3:TestEvent when the notification was set up: take it out of the way.
    for m in queue
        .receive(10, Duration::from_secs(1), Duration::from_secs(30))
        .await
        .unwrap()
    {
        queue.delete(&[m.receipt_handle]).await.unwrap();
    }
    env.send("{\"work\": \"long\"}").await;
    let messages = queue
        .receive(1, Duration::from_secs(2), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(messages.len(), 1);
    assert!(messages[0].body.contains("long"));
    let (tracker, acker) = Tracker::new(queue.clone(), &env.config.queue);
    let acker = tokio::spawn(acker);
    let handle = tracker.track(&messages[0], 1);
    // Three visibility timeouts later, nobody else has seen it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let others = queue
        .receive(10, Duration::from_secs(1), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        others.is_empty(),
        "the message stayed invisible while in work"
    );
    handle.resolve(FileOutcome::Committed);
    drop(handle);
    drop(tracker);
    acker.await.unwrap();
    assert_eq!(env.depths().await, (0, 0), "deleted once its work was done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unannounced_earlier_files_are_applied_in_order_within_batch_limits() {
    let env = Env::new("gaps", |c| {
        keyed(c, "gappy");
        c.batch.max_files = 2;
        c.batch.linger = Duration::from_millis(200);
    })
    .await;
    let worker = env.start().await;
    let mut events = worker.engine().subscribe();
    // Five files land without notifications (lost or late messages); id 1 is updated by
    // each, so applying them out of order would leave the wrong value.
    let saved = env.pause_notifications().await;
    for n in 1..=5 {
        env.put_parquet(
            &env.key("gappy", &format!("20261124-10{n:02}00000.parquet")),
            CDC,
            &[
                vec![s(if n == 1 { "I" } else { "U" }), i(1), s(&format!("v{n}"))],
                vec![s("I"), i(10 + n), s("x")],
            ],
        )
        .await;
    }
    env.resume_notifications(saved).await;
    // The sixth is announced: its lane finds the five earlier ones in the S3 listing.
    env.put_parquet(
        &env.key("gappy", "20261124-100600000.parquet"),
        CDC,
        &[vec![s("U"), i(1), s("v6")]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;

    let mut committed = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let cdc_worker::apply::EngineEvent::BatchFinished {
            committed: files, ..
        } = event
        {
            assert!(files.len() <= 2, "batch.max_files holds: {files:?}");
            committed.extend(files);
        }
    }
    let expected: Vec<String> = (1..=6)
        .map(|n| env.key("gappy", &format!("20261124-10{n:02}00000.parquet")))
        .collect();
    assert_eq!(committed, expected, "every file once, in DMS order");
    assert_eq!(
        env.rows("gappy", &["id", "v"]),
        vec![
            vec![Some("1".into()), Some("v6".into())],
            vec![Some("11".into()), Some("x".into())],
            vec![Some("12".into()), Some("x".into())],
            vec![Some("13".into()), Some("x".into())],
            vec![Some("14".into()), Some("x".into())],
            vec![Some("15".into()), Some("x".into())],
        ]
    );
    assert_eq!(env.depths().await, (0, 0));
}
