//! DMS table reloads and the destructive-change guard, as a user sees them: DMS deletes a
//! table's objects and writes its full load again (then new changes); the target ends equal
//! to the source, one `table_reloaded` alert says so, and no generation table is left. A
//! mass delete is held until `cdc-worker table release-guard`, a reload under
//! `dms.reload = "hold"` until `cdc-worker table accept-reload`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cdc_worker::config::{Config, KeySpec, ReloadPolicy, TableConfig};
use cdc_worker::devkit::resources::ReceivedAlert;
use cdc_worker::worker::Worker;

use crate::harness::Env;
use crate::model::{Stream, TableModel};

const LOAD: &[(&str, &str)] = &[("id", "BIGINT"), ("v", "VARCHAR")];
/// A full-load file written with `includeOpForFullLoad = true`.
const LOAD_OP: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];
const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];

type Row = Vec<Option<&'static str>>;

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Full-load rows `id, v` for `ids`, `v` = `{tag}{id}`.
fn load_rows(ids: impl IntoIterator<Item = i64>, tag: &str) -> Vec<Row> {
    ids.into_iter()
        .map(|id| vec![Some(leak(id.to_string())), Some(leak(format!("{tag}{id}")))])
        .collect()
}

/// The same with `Op` = `I` first.
fn load_rows_op(ids: impl IntoIterator<Item = i64>, tag: &str) -> Vec<Row> {
    load_rows(ids, tag)
        .into_iter()
        .map(|mut r| {
            r.insert(0, Some("I"));
            r
        })
        .collect()
}

fn change(op: &'static str, id: i64, v: &str) -> Row {
    vec![
        Some(op),
        Some(leak(id.to_string())),
        Some(leak(v.to_string())),
    ]
}

/// A change file's name as DMS writes it now (its time in the name, UTC): the files after
/// a reload are written after its full load was uploaded.
pub(crate) fn now_name() -> String {
    std::thread::sleep(Duration::from_millis(3));
    chrono::Utc::now()
        .format("%Y%m%d-%H%M%S%3f.parquet")
        .to_string()
}

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

/// Deletes every object of `table` (what DMS does first on a reload).
pub(crate) async fn delete_table_objects(env: &Env, table: &str) -> usize {
    let prefix = env.key(table, "");
    let out = env
        .aws
        .s3
        .list_objects_v2()
        .bucket(&env.res.bucket)
        .prefix(&prefix)
        .send()
        .await
        .expect("list the table's objects");
    let keys: Vec<String> = out
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect();
    for key in &keys {
        env.store
            .delete(&env.res.bucket, key)
            .await
            .expect("delete an object");
    }
    keys.len()
}

/// Uploads a file with notifications off, then deletes it: (key, etag, size) for a
/// notification sent later (an old generation's file DMS deleted before it was applied).
async fn gone_file(env: &Env, table: &str, file: &str, rows: &[Row]) -> (String, String, u64) {
    let saved = env.pause_notifications().await;
    let key = env.key(table, file);
    let data: Vec<_> = rows.iter().map(|r| crate::model::values(r)).collect();
    let body = crate::harness::parquet_bytes(CDC, &data);
    let size = body.len() as u64;
    let etag = env.put_bytes(&key, body).await;
    env.store
        .delete(&env.res.bucket, &key)
        .await
        .expect("delete");
    env.resume_notifications(saved).await;
    (key, etag, size)
}

/// Every alert read so far (reading the inbox drains it).
#[derive(Default)]
struct Inbox {
    seen: Vec<ReceivedAlert>,
}

impl Inbox {
    async fn poll(&mut self, env: &Env) {
        self.seen.extend(env.alerts().await);
    }

    fn of(&self, kind: &str, table: &str) -> Vec<&ReceivedAlert> {
        self.seen
            .iter()
            .filter(|a| a.body["alert"] == kind && a.body["table"] == table)
            .collect()
    }

    fn kind(&self, kind: &str) -> Vec<&ReceivedAlert> {
        self.seen
            .iter()
            .filter(|a| a.body["alert"] == kind)
            .collect()
    }

    fn summary(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|a| {
                format!(
                    "{} {}: {}",
                    a.body["alert"], a.body["table"], a.body["message"]
                )
            })
            .collect()
    }

    async fn wait(&mut self, env: &Env, kind: &str, table: &str, timeout: Duration) {
        let started = Instant::now();
        while self.of(kind, table).is_empty() {
            assert!(
                started.elapsed() < timeout,
                "no {kind} alert for {table} after {}s; alerts: {:#?}",
                timeout.as_secs(),
                self.summary()
            );
            self.poll(env).await;
        }
    }
}

async fn rows_now(worker: &Worker, table: &str) -> u64 {
    worker
        .warehouse()
        .row_count(table)
        .await
        .unwrap_or(u64::MAX)
}

/// Waits until the worker holds as many rows as the models expect, for every table.
async fn counts_match(env: &Env, worker: &Worker, stream: &Stream<'_>, timeout: Duration) {
    let expected: Vec<(String, u64)> = stream
        .models
        .iter()
        .map(|(t, m)| (t.clone(), m.rows().len() as u64))
        .collect();
    env.eventually("row counts equal the source", timeout, || async {
        for (t, n) in &expected {
            if rows_now(worker, t).await != *n {
                return false;
            }
        }
        true
    })
    .await;
}

/// The tables a reload builds, left in the warehouse (after the worker stopped).
fn generation_tables(env: &Env) -> Vec<String> {
    let conn = env.db();
    let mut stmt = conn
        .prepare("SELECT table_name FROM information_schema.tables")
        .unwrap();
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names
        .into_iter()
        .filter(|n| n.starts_with("_cdc_worker_g"))
        .collect()
}

fn assert_columns(env: &Env, table: &str) {
    let names: Vec<String> = env.columns(table).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["id", "v"], "columns of {table}");
}

/// The config the CLI and worker processes read (credentials from their environment).
pub(crate) fn config_file(env: &Env) -> std::path::PathBuf {
    let mut child = env.config.clone();
    child.aws.access_key_id = None;
    child.aws.secret_access_key = None;
    let path = env.dir.path().join("worker.toml");
    std::fs::write(&path, toml::to_string(&child).unwrap()).unwrap();
    path
}

const BINARY: &str = env!("CARGO_BIN_EXE_cdc-worker");

/// `cdc-worker table <action> <table> --config FILE`.
async fn table_command(env: &Env, action: &str, table: &str) {
    let config = config_file(env);
    let out = tokio::process::Command::new(BINARY)
        .args(["table", action, table, "--config"])
        .arg(&config)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("cdc-worker runs");
    assert!(
        out.status.success(),
        "cdc-worker table {action} {table}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Gen 1 of `table`: two full-load files (ids 1..=60) and two change files.
async fn first_generation(s: &mut Stream<'_>, table: &str) {
    s.file(table, "LOAD00000001.parquet", LOAD, &load_rows(1..=30, "a"))
        .await;
    s.file(
        table,
        "LOAD00000002.parquet",
        LOAD,
        &load_rows(31..=60, "a"),
    )
    .await;
    s.file(
        table,
        "20261202-100000000.parquet",
        CDC,
        &[
            change("U", 1, "a1-u"),
            change("I", 61, "a61"),
            change("D", 2, "a2"),
        ],
    )
    .await;
    s.file(
        table,
        "20261202-100100000.parquet",
        CDC,
        &[change("U", 3, "a3-u"), change("D", 4, "a4")],
    )
    .await;
}

/// The drifted source of `table` as a new full load of three files: ids 1..=70 without
/// 5..=9, new values (the target never saw these changes).
async fn new_full_load(s: &mut Stream<'_>, table: &str) {
    s.table(table, TableModel::keyed(&["id"]));
    s.file(
        table,
        "LOAD00000001.parquet",
        LOAD,
        &load_rows((1..=25).filter(|i| !(5..=9).contains(i)), "r"),
    )
    .await;
    s.file(
        table,
        "LOAD00000002.parquet",
        LOAD,
        &load_rows(26..=50, "r"),
    )
    .await;
    s.file(
        table,
        "LOAD00000003.parquet",
        LOAD,
        &load_rows(51..=70, "r"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_mid_stream_replaces_the_table_with_the_new_full_load() {
    let env = Env::new("reload-mid", |c| keyed(c, &["accounts", "branches"])).await;
    let worker = env.start().await;
    let mut inbox = Inbox::default();
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    s.table("branches", TableModel::keyed(&["id"]));
    first_generation(&mut s, "accounts").await;
    s.file(
        "branches",
        "LOAD00000001.parquet",
        LOAD,
        &load_rows(1..=10, "b"),
    )
    .await;
    s.file(
        "branches",
        "20261202-100000000.parquet",
        CDC,
        &[change("U", 1, "b1-u")],
    )
    .await;
    env.settle(&worker, Duration::from_secs(40)).await;
    counts_match(&env, &worker, &s, Duration::from_secs(20)).await;

    // Changes DMS wrote before the reload and deleted with the table's objects before the
    // worker applied them: their notifications arrive after the new full load.
    let gone = [
        gone_file(
            &env,
            "accounts",
            "20261202-100200000.parquet",
            &[change("U", 12, "lost")],
        )
        .await,
        gone_file(
            &env,
            "accounts",
            "20261202-100300000.parquet",
            &[change("D", 13, "lost")],
        )
        .await,
    ];
    // The reload: DMS deletes the table's objects, writes the full load again, then changes.
    assert_eq!(delete_table_objects(&env, "accounts").await, 4);
    new_full_load(&mut s, "accounts").await;
    for (key, etag, size) in &gone {
        env.send(&env.notification(key, etag, *size)).await;
    }
    s.file("branches", &now_name(), CDC, &[change("I", 11, "b11")])
        .await;
    s.file(
        "accounts",
        &now_name(),
        CDC,
        &[
            change("U", 10, "r10-u"),
            change("D", 11, "r11"),
            change("I", 100, "r100"),
        ],
    )
    .await;
    s.file("branches", &now_name(), CDC, &[change("D", 2, "b2")])
        .await;

    inbox
        .wait(&env, "table_reloaded", "accounts", Duration::from_secs(45))
        .await;
    counts_match(&env, &worker, &s, Duration::from_secs(30)).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    inbox.poll(&env).await;

    s.assert_tables();
    assert_columns(&env, "accounts");
    assert_eq!(
        inbox.of("table_reloaded", "accounts").len(),
        1,
        "one reload alert: {:#?}",
        inbox.summary()
    );
    let reloaded = &inbox.of("table_reloaded", "accounts")[0].body;
    assert!(
        reloaded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("2 files of the earlier generation were deleted"),
        "the reload's alert counts the deleted files: {reloaded:#}"
    );
    assert!(
        inbox.of("table_reloaded", "branches").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert!(
        inbox.kind("file_skipped").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert!(
        inbox.kind("destructive_change_held").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(generation_tables(&env), Vec::<String>::new());
    assert_eq!(env.depths().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_with_no_later_changes_completes_after_its_quiet_period() {
    let env = Env::new("reload-quiet", |c| {
        keyed(c, &["accounts"]);
        c.dms.reload_settle = Duration::from_secs(2);
    })
    .await;
    let worker = env.start().await;
    let mut inbox = Inbox::default();
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    first_generation(&mut s, "accounts").await;
    env.settle(&worker, Duration::from_secs(40)).await;
    counts_match(&env, &worker, &s, Duration::from_secs(20)).await;

    delete_table_objects(&env, "accounts").await;
    new_full_load(&mut s, "accounts").await;

    inbox
        .wait(&env, "table_reloaded", "accounts", Duration::from_secs(45))
        .await;
    counts_match(&env, &worker, &s, Duration::from_secs(30)).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    inbox.poll(&env).await;

    s.assert_tables();
    assert_eq!(
        inbox.of("table_reloaded", "accounts").len(),
        1,
        "{:#?}",
        inbox.summary()
    );
    assert!(
        inbox.kind("file_skipped").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(generation_tables(&env), Vec::<String>::new());
}

/// The notification of an old generation's change file, deleted by the reload before it was
/// applied, arrives only after the swap (a worker that was down during the reload reads
/// its queue in no particular order; SQS standard queues do not keep order).
// Ignored: fails on the current feature. The late notification gets a `file_skipped`
// alert ("the object no longer exists ...") though docs/reloads.md says the earlier
// generation's deleted files are not alerted one by one; after the swap the lane no longer
// has the reload it could count the file in.
/// Old-generation files DMS deleted before they were applied, announced late: one before
/// the new full load is announced, one after the swap. Neither is alerted on its own; the
/// reload's alert names the first (the second comes after that alert went out).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_generation_files_announced_late_are_not_alerted_alone() {
    let env = Env::new("reload-late-gone", |c| {
        keyed(c, &["accounts"]);
        c.dms.reload_settle = Duration::from_secs(2);
    })
    .await;
    let worker = env.start().await;
    let mut inbox = Inbox::default();
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    first_generation(&mut s, "accounts").await;
    env.settle(&worker, Duration::from_secs(40)).await;
    let lost = [change("U", 12, "lost")];
    let early = gone_file(&env, "accounts", "20261202-100200000.parquet", &lost).await;
    let late = gone_file(&env, "accounts", "20261202-100300000.parquet", &lost).await;
    delete_table_objects(&env, "accounts").await;
    let saved = env.pause_notifications().await;
    let written_before = s.uploaded.len();
    new_full_load(&mut s, "accounts").await;
    // The new generation's first change file: the swap, after which the late file sorts
    // before the last applied one.
    s.file("accounts", &now_name(), CDC, &[change("U", 5, "g2")])
        .await;
    env.send(&env.notification(&early.0, &early.1, early.2))
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    env.resume_notifications(saved).await;
    for (key, etag, size) in s.uploaded[written_before..].iter().cloned() {
        env.send(&env.notification(&key, &etag, size)).await;
    }
    inbox
        .wait(&env, "table_reloaded", "accounts", Duration::from_secs(45))
        .await;
    env.send(&env.notification(&late.0, &late.1, late.2)).await;
    counts_match(&env, &worker, &s, Duration::from_secs(30)).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    inbox.poll(&env).await;
    s.assert_tables();
    assert!(
        inbox.kind("file_skipped").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert!(
        inbox.kind("file_out_of_order").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    let reloaded = inbox.of("table_reloaded", "accounts");
    assert_eq!(reloaded.len(), 1, "{:#?}", inbox.summary());
    let message = reloaded[0].body["message"].as_str().unwrap_or_default();
    assert!(message.contains(&early.0), "{message}");
}

pub(crate) struct Process {
    child: tokio::process::Child,
}

impl Process {
    pub(crate) fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = tokio::process::Command::new(BINARY)
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

    pub(crate) async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    pub(crate) async fn terminate(mut self) {
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

/// The worker log's last WARN and ERROR lines, for a failure message (the log's folder
/// is gone once the test has failed).
fn last_warnings(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until both queues stay empty for `quiet`.
pub(crate) async fn drained(env: &Env, quiet: Duration, timeout: Duration, log: &std::path::Path) {
    let mut quiet_since: Option<Instant> = None;
    let deadline = Instant::now() + timeout;
    while quiet_since.is_none_or(|q| q.elapsed() < quiet) {
        assert!(
            Instant::now() < deadline,
            "the worker did not drain the queue (depths {:?}); its last warnings:\n{}",
            env.depths().await,
            last_warnings(log)
        );
        if env.depths().await == (0, 0) {
            quiet_since.get_or_insert_with(Instant::now);
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_survives_kills_and_duplicated_notifications() {
    let env = Env::with_receives("reload-kills", 100, |c| {
        keyed(c, &["accounts", "branches"]);
        c.queue.visibility_timeout = Duration::from_secs(3);
        c.batch.linger = Duration::from_millis(300);
        c.batch.max_files = 2;
        c.dms.reload_settle = Duration::from_secs(3);
    })
    .await;
    let config = config_file(&env);
    let log = env.dir.path().join("worker.log");
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    s.table("branches", TableModel::keyed(&["id"]));

    let worker = Process::start(&config, &log);
    first_generation(&mut s, "accounts").await;
    s.file(
        "branches",
        "LOAD00000001.parquet",
        LOAD,
        &load_rows(1..=10, "b"),
    )
    .await;
    drained(&env, Duration::from_secs(3), Duration::from_secs(60), &log).await;
    worker.kill9().await;
    // Changes DMS wrote before the reload and deleted with the table's objects before the
    // worker applied them: their notifications arrive after the new full load.
    let gone = [
        gone_file(
            &env,
            "accounts",
            "20261202-100200000.parquet",
            &[change("U", 12, "lost")],
        )
        .await,
        gone_file(
            &env,
            "accounts",
            "20261202-100300000.parquet",
            &[change("D", 13, "lost")],
        )
        .await,
    ];

    let killer = async {
        let mut rng = fastrand::Rng::new();
        let mut kills = 0;
        let started = Instant::now();
        while kills < 5 || started.elapsed() < Duration::from_secs(8) {
            let worker = Process::start(&config, &log);
            tokio::time::sleep(Duration::from_millis(rng.u64(400..2000))).await;
            worker.kill9().await;
            kills += 1;
        }
        kills
    };
    let reload = async {
        delete_table_objects(&env, "accounts").await;
        new_full_load(&mut s, "accounts").await;
        for (key, etag, size) in &gone {
            env.send(&env.notification(key, etag, *size)).await;
        }
        // Every notification of the new load again.
        let dups: Vec<_> = s.uploaded[s.uploaded.len() - 3..].to_vec();
        for (key, etag, size) in &dups {
            env.send(&env.notification(key, etag, *size)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.file("branches", &now_name(), CDC, &[change("I", 11, "b11")])
            .await;
        s.file(
            "accounts",
            &now_name(),
            CDC,
            &[
                change("U", 10, "r10-u"),
                change("D", 11, "r11"),
                change("I", 100, "r100"),
            ],
        )
        .await;
        let (key, etag, size) = s.uploaded.last().unwrap().clone();
        env.send(&env.notification(&key, &etag, size)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.file("accounts", &now_name(), CDC, &[change("U", 20, "r20-u")])
            .await;
        s.file("branches", &now_name(), CDC, &[change("D", 2, "b2")])
            .await;
        for (key, etag, size) in &dups {
            env.send(&env.notification(key, etag, *size)).await;
        }
    };
    let ((), kills) = tokio::join!(reload, killer);

    let worker = Process::start(&config, &log);
    drained(&env, Duration::from_secs(6), Duration::from_secs(90), &log).await;
    worker.terminate().await;
    let mut inbox = Inbox::default();
    inbox.poll(&env).await;
    println!("{kills} SIGKILLs; alerts: {:#?}", inbox.summary());

    s.assert_tables();
    assert_columns(&env, "accounts");
    assert_eq!(generation_tables(&env), Vec::<String>::new());
    assert!(
        inbox.kind("file_skipped").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert!(
        inbox.of("table_reloaded", "accounts").len() <= 1,
        "{:#?}",
        inbox.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_loads_with_many_files_segments_and_op_columns() {
    let env = Env::new("reload-segments", |c| keyed(c, &["accounts"])).await;
    let worker = env.start().await;
    let mut inbox = Inbox::default();
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    // Generation 1: a parallel load in two segments, with Op = I.
    s.file(
        "accounts",
        "SEGMENT1_LOAD00000001.parquet",
        LOAD_OP,
        &load_rows_op(1..=10, "a"),
    )
    .await;
    s.file(
        "accounts",
        "SEGMENT2_LOAD00000001.parquet",
        LOAD_OP,
        &load_rows_op(11..=20, "a"),
    )
    .await;
    s.file(
        "accounts",
        "SEGMENT1_LOAD00000002.parquet",
        LOAD_OP,
        &load_rows_op(21..=30, "a"),
    )
    .await;
    s.file(
        "accounts",
        "20261202-100000000.parquet",
        CDC,
        &[change("U", 1, "a1-u")],
    )
    .await;
    env.settle(&worker, Duration::from_secs(40)).await;
    counts_match(&env, &worker, &s, Duration::from_secs(20)).await;

    // The reload: 18 full-load files, the counter past 9 (hex), two segments, Op = I.
    delete_table_objects(&env, "accounts").await;
    s.table("accounts", TableModel::keyed(&["id"]));
    let mut id = 0i64;
    for (segment, files) in [(1, 11u32), (2, 7)] {
        for n in 1..=files {
            let name = format!("SEGMENT{segment}_LOAD{n:08X}.parquet");
            let rows = load_rows_op(id + 1..=id + 3, &format!("s{segment}n{n}-"));
            id += 3;
            s.file("accounts", &name, LOAD_OP, &rows).await;
        }
    }
    // Changes to rows of the last files (LOAD0000000A, LOAD0000000B of segment 1, the last
    // of segment 2): applied before those files, the load would undo them.
    s.file(
        "accounts",
        &now_name(),
        CDC,
        &[
            change("U", 28, "c28"),
            change("D", 31, "c31"),
            change("U", 33, "c33"),
            change("U", id, "clast"),
            change("I", 1000, "c1000"),
        ],
    )
    .await;

    inbox
        .wait(&env, "table_reloaded", "accounts", Duration::from_secs(45))
        .await;
    counts_match(&env, &worker, &s, Duration::from_secs(30)).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    inbox.poll(&env).await;

    s.assert_tables();
    assert_columns(&env, "accounts");
    assert_eq!(
        inbox.of("table_reloaded", "accounts").len(),
        1,
        "{:#?}",
        inbox.summary()
    );
    assert!(
        inbox.kind("file_skipped").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert!(
        inbox.kind("file_out_of_order").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(generation_tables(&env), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mass_delete_is_held_until_released() {
    let env = Env::new("guard-deletes", |c| {
        keyed(c, &["accounts", "branches"]);
        c.guard.min_rows = 10;
    })
    .await;
    let worker = env.start().await;
    let mut inbox = Inbox::default();
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    s.table("branches", TableModel::keyed(&["id"]));
    s.file(
        "accounts",
        "LOAD00000001.parquet",
        LOAD,
        &load_rows(1..=200, "a"),
    )
    .await;
    s.file(
        "branches",
        "LOAD00000001.parquet",
        LOAD,
        &load_rows(1..=10, "b"),
    )
    .await;
    env.settle(&worker, Duration::from_secs(40)).await;
    counts_match(&env, &worker, &s, Duration::from_secs(20)).await;

    // 90% of the table deleted in one change file.
    let mut deletes: Vec<Row> = (1..=180).map(|i| change("D", i, "x")).collect();
    deletes.push(change("U", 190, "a190-u"));
    s.file("accounts", "20261202-100000000.parquet", CDC, &deletes)
        .await;
    inbox
        .wait(
            &env,
            "destructive_change_held",
            "accounts",
            Duration::from_secs(30),
        )
        .await;
    // Other tables go on.
    s.file(
        "branches",
        "20261202-100100000.parquet",
        CDC,
        &[change("I", 11, "b11")],
    )
    .await;
    env.eventually("branches applies", Duration::from_secs(30), || async {
        rows_now(&worker, "branches").await == 11
    })
    .await;
    assert_eq!(rows_now(&worker, "accounts").await, 200, "held: unchanged");
    let held = inbox.of("destructive_change_held", "accounts")[0]
        .body
        .clone();
    assert_eq!(held["held"], true, "{held:#}");
    assert!(
        held["next_steps"]
            .as_str()
            .unwrap_or_default()
            .contains("cdc-worker table release-guard accounts"),
        "{held:#}"
    );

    table_command(&env, "release-guard", "accounts").await;
    env.eventually(
        "the held batch applies",
        Duration::from_secs(30),
        || async { rows_now(&worker, "accounts").await == 20 },
    )
    .await;
    // A later change to the released table applies as usual.
    s.file(
        "accounts",
        "20261202-100200000.parquet",
        CDC,
        &[change("U", 200, "a200-u")],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    inbox.poll(&env).await;

    s.assert_tables();
    assert_eq!(
        inbox.of("destructive_change_held", "accounts").len(),
        1,
        "held once: {:#?}",
        inbox.summary()
    );
    assert!(
        inbox.of("destructive_change_held", "branches").is_empty(),
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(env.depths().await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_reload_waits_for_accept_reload() {
    let env = Env::new("reload-hold", |c| {
        keyed(c, &["accounts"]);
        c.dms.reload = ReloadPolicy::Hold;
        c.dms.reload_settle = Duration::from_secs(2);
    })
    .await;
    let worker = env.start().await;
    let mut inbox = Inbox::default();
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    first_generation(&mut s, "accounts").await;
    env.settle(&worker, Duration::from_secs(40)).await;
    counts_match(&env, &worker, &s, Duration::from_secs(20)).await;
    let before = rows_now(&worker, "accounts").await;

    delete_table_objects(&env, "accounts").await;
    new_full_load(&mut s, "accounts").await;
    s.file(
        "accounts",
        &now_name(),
        CDC,
        &[change("U", 10, "r10-u"), change("I", 100, "r100")],
    )
    .await;
    inbox
        .wait(&env, "reload_waiting", "accounts", Duration::from_secs(45))
        .await;
    // The table's new files wait too.
    s.file("accounts", &now_name(), CDC, &[change("D", 12, "r12")])
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        rows_now(&worker, "accounts").await,
        before,
        "the live table waits"
    );
    assert!(inbox.of("table_reloaded", "accounts").is_empty());
    let waiting = inbox.of("reload_waiting", "accounts")[0].body.clone();
    assert_eq!(waiting["held"], true, "{waiting:#}");

    table_command(&env, "accept-reload", "accounts").await;
    inbox
        .wait(&env, "table_reloaded", "accounts", Duration::from_secs(30))
        .await;
    counts_match(&env, &worker, &s, Duration::from_secs(30)).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    inbox.poll(&env).await;

    s.assert_tables();
    assert_eq!(
        inbox.of("table_reloaded", "accounts").len(),
        1,
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(
        inbox.of("reload_waiting", "accounts").len(),
        1,
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(generation_tables(&env), Vec::<String>::new());
}

// Ignored: fails on the current feature. After `table accept-reload` the reload is not
// swapped in (no `table_reloaded` within 30 s) while no file of the table waits: a held lane
// with no pending file is idle (`LaneState::next` returns `Idle` before looking at the
// hold, and `reload_due` returns None while held), so it never re-reads its status and
// retires after `worker.lane_idle_timeout`; only the table's next file brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_shrinks_the_table_is_held_until_accepted() {
    let env = Env::new("reload-shrink", |c| {
        keyed(c, &["accounts"]);
        c.guard.min_rows = 10;
        c.dms.reload_settle = Duration::from_secs(2);
    })
    .await;
    let worker = env.start().await;
    let mut inbox = Inbox::default();
    let mut s = Stream::new(&env);
    s.table("accounts", TableModel::keyed(&["id"]));
    s.file(
        "accounts",
        "LOAD00000001.parquet",
        LOAD,
        &load_rows(1..=200, "a"),
    )
    .await;
    s.file(
        "accounts",
        "20261202-100000000.parquet",
        CDC,
        &[change("U", 1, "a1-u")],
    )
    .await;
    env.settle(&worker, Duration::from_secs(40)).await;
    counts_match(&env, &worker, &s, Duration::from_secs(20)).await;

    // The source lost most of its rows: the reload would remove 180 of 200.
    delete_table_objects(&env, "accounts").await;
    s.table("accounts", TableModel::keyed(&["id"]));
    s.file(
        "accounts",
        "LOAD00000001.parquet",
        LOAD,
        &load_rows(1..=10, "r"),
    )
    .await;
    s.file(
        "accounts",
        "LOAD00000002.parquet",
        LOAD,
        &load_rows(11..=20, "r"),
    )
    .await;
    inbox
        .wait(
            &env,
            "destructive_change_held",
            "accounts",
            Duration::from_secs(45),
        )
        .await;
    assert_eq!(
        rows_now(&worker, "accounts").await,
        200,
        "the live table keeps its rows"
    );
    let held = inbox.of("destructive_change_held", "accounts")[0]
        .body
        .clone();
    assert_eq!(held["held"], true, "{held:#}");
    assert!(
        held["next_steps"]
            .as_str()
            .unwrap_or_default()
            .contains("cdc-worker table accept-reload accounts"),
        "{held:#}"
    );
    assert!(inbox.of("table_reloaded", "accounts").is_empty());

    table_command(&env, "accept-reload", "accounts").await;
    inbox
        .wait(&env, "table_reloaded", "accounts", Duration::from_secs(30))
        .await;
    s.file("accounts", &now_name(), CDC, &[change("U", 5, "r5-u")])
        .await;
    counts_match(&env, &worker, &s, Duration::from_secs(30)).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    worker.shutdown().await;
    inbox.poll(&env).await;

    s.assert_tables();
    assert_eq!(
        inbox.of("table_reloaded", "accounts").len(),
        1,
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(
        inbox.of("destructive_change_held", "accounts").len(),
        1,
        "{:#?}",
        inbox.summary()
    );
    assert_eq!(generation_tables(&env), Vec::<String>::new());
}
