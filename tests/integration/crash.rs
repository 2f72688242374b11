//! Crash safety: the worker process is killed with SIGKILL at random points while it
//! applies a multi-table CDC stream, restarted, killed again; after a last clean run the
//! tables equal the expected state exactly, appended tables included.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cdc_worker::config::{KeySpec, TableConfig};

use crate::harness::Env;
use crate::model::{Stream, TableModel};

const KEYED: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];
const PAIRS: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("a", "BIGINT"),
    ("b", "BIGINT"),
    ("v", "VARCHAR"),
];
const EVENTS: &[(&str, &str)] = &[("Op", "VARCHAR"), ("n", "BIGINT"), ("v", "VARCHAR")];

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A random CDC file for a keyed table: inserts of new keys, updates and deletes of live ones.
fn keyed_rows(
    rng: &mut fastrand::Rng,
    live: &mut BTreeSet<i64>,
    next: &mut i64,
    pair: bool,
) -> Vec<Vec<Option<&'static str>>> {
    let mut rows = Vec::new();
    for _ in 0..rng.usize(20..80) {
        let pick = live.iter().nth(rng.usize(..live.len().max(1))).copied();
        let (op, key) = match (rng.u8(..10), pick) {
            (0..=3, _) | (_, None) => {
                *next += 1;
                live.insert(*next);
                ("I", *next)
            }
            (4..=7, Some(k)) => ("U", k),
            (_, Some(k)) => {
                live.remove(&k);
                ("D", k)
            }
        };
        let v = leak(format!("v{}", rng.u32(..1_000_000)));
        let mut row = vec![Some(op)];
        if pair {
            row.push(Some(leak((key / 10).to_string())));
            row.push(Some(leak((key % 10).to_string())));
        } else {
            row.push(Some(leak(key.to_string())));
        }
        row.push(Some(v));
        rows.push(row);
    }
    rows
}

async fn upload_stream(stream: &mut Stream<'_>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut live_a, mut live_b) = (BTreeSet::new(), BTreeSet::new());
    let (mut next_a, mut next_b) = (0i64, 1000i64);
    for minute in 0..15 {
        let name = format!("20261124-10{minute:02}00000.parquet");
        let rows = keyed_rows(&mut rng, &mut live_a, &mut next_a, false);
        stream.file("accounts", &name, KEYED, &rows).await;
        let rows = keyed_rows(&mut rng, &mut live_b, &mut next_b, true);
        stream.file("pairs", &name, PAIRS, &rows).await;
        let rows: Vec<Vec<Option<&str>>> = (0..rng.usize(10..40))
            .map(|_| {
                vec![
                    Some("I"),
                    Some(leak(rng.u32(..100).to_string())),
                    Some(leak(format!("e{}", rng.u32(..1000)))),
                ]
            })
            .collect();
        stream.file("events", &name, EVENTS, &rows).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
    }
}

struct Process {
    child: tokio::process::Child,
}

impl Process {
    fn start(binary: &str, config: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = tokio::process::Command::new(binary)
            .args(["run", "--config"])
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info,aws=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("worker process starts");
        Self { child }
    }

    async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    async fn terminate(mut self) {
        let pid = self.child.id().expect("running") as i32;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "clean exit after SIGTERM: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_leave_no_lost_or_duplicated_rows() {
    let env = Env::with_receives("crash", 100, |c| {
        c.queue.visibility_timeout = Duration::from_secs(3);
        c.queue.retry_backoff = Duration::from_secs(1);
        c.queue.retry_backoff_max = Duration::from_secs(2);
        c.batch.linger = Duration::from_millis(300);
        c.batch.max_files = 4;
        for (table, key) in [
            ("accounts", KeySpec::One("id".into())),
            ("pairs", KeySpec::Many(vec!["a".into(), "b".into()])),
        ] {
            c.tables.insert(
                table.into(),
                TableConfig {
                    key: Some(key),
                    ..Default::default()
                },
            );
        }
    })
    .await;
    // The child process reads the same config from a file, credentials from its environment.
    let mut child_config = env.config.clone();
    child_config.aws.access_key_id = None;
    child_config.aws.secret_access_key = None;
    let config_path = env.dir.path().join("worker.toml");
    std::fs::write(&config_path, toml::to_string(&child_config).unwrap()).unwrap();
    let log = env.dir.path().join("worker.log");
    let binary = env!("CARGO_BIN_EXE_cdc-worker");

    let seed = fastrand::u64(..);
    println!("crash test seed {seed}");
    let mut stream = Stream::new(&env);
    stream.table("accounts", TableModel::keyed(&["id"]));
    stream.table("pairs", TableModel::keyed(&["a", "b"]));
    stream.table("events", TableModel::append_only());

    let killer = async {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
        let mut kills = 0;
        let started = Instant::now();
        while kills < 8 || started.elapsed() < Duration::from_secs(6) {
            let worker = Process::start(binary, &config_path, &log);
            tokio::time::sleep(Duration::from_millis(rng.u64(300..1800))).await;
            worker.kill9().await;
            kills += 1;
        }
        kills
    };
    let ((), kills) = tokio::join!(upload_stream(&mut stream, seed), killer);

    // A last run, to the end.
    let worker = Process::start(binary, &config_path, &log);
    let mut quiet_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while quiet_since.is_none_or(|q| q.elapsed() < Duration::from_secs(5)) {
        assert!(
            Instant::now() < deadline,
            "the worker did not drain the queue; log: {}",
            log.display()
        );
        if env.depths().await == (0, 0) {
            quiet_since.get_or_insert_with(Instant::now);
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    worker.terminate().await;

    println!("{kills} SIGKILLs, {} files", stream.uploaded.len());
    assert!(kills >= 8);
    stream.assert_tables();
    assert_eq!(
        env.ledger_keys(),
        stream.uploaded_keys(),
        "every file recorded exactly once"
    );
}

/// A worker killed between writing a table's first schema version and its current document
/// leaves the version alone in S3: the next worker completes it instead of failing on it
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_version_without_its_current_document_is_completed() {
    use crate::harness::{i, s};
    let env = Env::new("orphan-version", |_| {}).await;
    let worker = env.start().await;
    env.put_parquet(
        &env.key("orphans", "20261124-100000000.parquet"),
        KEYED,
        &[vec![s("I"), i(1), s("a")]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    let schemas =
        cdc_worker::schema::store::SchemaStore::from_config(&env.config, env.store.clone());
    let current = schemas.current_key("orphans");
    env.store
        .delete(schemas.bucket(), &current)
        .await
        .expect("delete the current document");
    assert!(schemas.load("orphans").await.unwrap().is_none());
    // As after the crash: v1 in the history, no current document.
    let worker = env.start().await;
    env.put_parquet(
        &env.key("orphans", "20261124-100100000.parquet"),
        KEYED,
        &[vec![s("I"), i(2), s("b")]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    assert_eq!(env.rows("orphans", &["id"]).len(), 2, "the table goes on");
    let stored = schemas.load("orphans").await.unwrap().expect("completed");
    assert_eq!(stored.current.version, 1);
    assert_eq!(env.depths().await, (0, 0));
}
