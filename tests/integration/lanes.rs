//! The per-table lock: batches of one table never overlap; different tables run at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cdc_worker::apply::EngineEvent;

use crate::harness::{Env, i, parquet_bytes, s};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_table_serial_many_tables_parallel() {
    let env = Env::new("lanes", |c| {
        c.batch.max_files = 2;
        c.batch.linger = Duration::from_millis(200);
        c.worker.max_parallel_batches = 4;
    })
    .await;
    let worker = env.start().await;
    let mut events = worker.engine().subscribe();
    let columns = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("payload", "VARCHAR")];
    let tables = ["alpha", "beta", "gamma"];
    let files_per_table = 10;
    // Written first, then uploaded table by table in parallel (each table's files in DMS
    // order, as DMS writes them), so every lane has work at once.
    let bodies: Vec<Vec<u8>> = (0..files_per_table)
        .map(|n| {
            let rows: Vec<_> = (0..3000)
                .map(|r| vec![s("I"), i(n * 10_000 + r), s("some payload text")])
                .collect();
            parquet_bytes(columns, &rows)
        })
        .collect();
    let (env_ref, bodies_ref) = (&env, &bodies);
    futures::future::join_all(tables.iter().map(|t| async move {
        for (n, body) in bodies_ref.iter().enumerate() {
            env_ref
                .put_bytes(
                    &env_ref.key(t, &format!("20261124-10{n:02}00000.parquet")),
                    body.clone(),
                )
                .await;
        }
    }))
    .await;
    // Collect batch intervals until every file is committed.
    let mut open: HashMap<String, (String, Instant)> = HashMap::new();
    let mut intervals: Vec<(String, Instant, Instant)> = Vec::new();
    let mut committed = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed < files_per_table as usize * tables.len() {
        let event = tokio::time::timeout_at(deadline.into(), events.recv())
            .await
            .expect("batches finish")
            .expect("events");
        match event {
            EngineEvent::BatchStarted {
                table,
                batch_id,
                at,
                ..
            } => {
                open.insert(batch_id, (table, at));
            }
            EngineEvent::BatchFinished {
                batch_id,
                committed: c,
                at,
                ..
            } => {
                committed += c.len();
                let (table, started) = open.remove(&batch_id).expect("started before finished");
                intervals.push((table, started, at));
            }
            EngineEvent::TableHeld { table, reason } => panic!("{table} held: {reason}"),
        }
    }
    worker.shutdown().await;

    let overlaps =
        |a: &(String, Instant, Instant), b: &(String, Instant, Instant)| a.1 < b.2 && b.1 < a.2;
    for (x, a) in intervals.iter().enumerate() {
        for b in &intervals[x + 1..] {
            if a.0 == b.0 {
                assert!(!overlaps(a, b), "two batches of {} overlapped", a.0);
            }
        }
    }
    let cross = intervals.iter().enumerate().any(|(x, a)| {
        intervals[x + 1..]
            .iter()
            .any(|b| a.0 != b.0 && overlaps(a, b))
    });
    assert!(cross, "batches of different tables ran concurrently");
    assert!(
        intervals.len() >= tables.len() * 2,
        "several batches per table"
    );
    // Every row once: a file applied twice or not at all shows in the distinct count
    // and the id range, not only in the row count.
    let expected_rows = files_per_table * 3000;
    for t in tables {
        assert_eq!(
            id_summary(&env, t),
            (
                expected_rows,
                expected_rows,
                0,
                (files_per_table - 1) * 10_000 + 2999
            ),
            "{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_waits_in_the_queue_not_in_memory() {
    let env = Env::new("backpressure", |c| {
        c.batch.max_files = 5;
        c.batch.linger = Duration::from_millis(100);
        c.worker.max_waiting_files = 10;
        c.worker.concurrency = 2;
        c.queue.max_messages = 10;
    })
    .await;
    let columns = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("payload", "VARCHAR")];
    // The backlog is there before the worker starts, as after an outage.
    for n in 0..60 {
        let rows: Vec<_> = (0..50)
            .map(|r| vec![s("I"), i(n * 100 + r), s("x")])
            .collect();
        env.put_parquet(
            &env.key(
                &format!("t{}", n % 3),
                &format!("20261124-10{n:02}00000.parquet"),
            ),
            columns,
            &rows,
        )
        .await;
    }
    let worker = env.start().await;
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while env.depths().await != (0, 0) || worker.engine().waiting_files() > 0 {
        peak = peak.max(worker.engine().waiting_files());
        assert!(Instant::now() < deadline, "the backlog did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiting = worker.engine().waiting_files();
    worker.shutdown().await;
    // Each receiver may overshoot by one receive of max_messages.
    assert!(peak <= 10 + 2 * 10, "{peak} files waited in memory");
    assert!(peak > 0);
    assert_eq!(waiting, 0, "every submitted file was accounted for");
    for t in 0..3 {
        assert_eq!(
            id_summary(&env, &format!("t{t}")),
            (20 * 50, 20 * 50, t * 100, (57 + t) * 100 + 49),
            "t{t}"
        );
    }
}

/// (rows, distinct ids, min id, max id) of a table.
fn id_summary(env: &Env, table: &str) -> (i64, i64, i64, i64) {
    env.db()
        .query_row(
            &format!("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {table}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
}
