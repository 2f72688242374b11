//! History tables (`history = "scd2"`) through the worker: every version of a key, with its
//! validity, equal to a model computed here from the files the test wrote; the as-of query
//! of docs/history.md gives the source's state at several times; the same under SIGKILLs
//! and duplicated notifications, and with a late file placed by its ordering column.

use std::collections::BTreeMap;
use std::time::Duration;

use cdc_worker::config::{Config, HistoryMode, KeySpec, TableConfig};

use crate::harness::Env;
use crate::model::values;
use crate::reload::{Process, config_file, drained};

type Row = Vec<Option<&'static str>>;

/// One version as the test reads it: key, values, valid from, valid to, current, op.
type Version = (
    String,
    Vec<Option<String>>,
    String,
    Option<String>,
    bool,
    String,
);

/// What a full load's rows are valid from (docs/history.md).
const START: &str = "1970-01-01 00:00:00.000000";

/// The expected history, built from the changes in order, independently of the worker:
/// an update of a value closes the current version and opens one, a delete closes it
/// (`D`), an update that changes nothing opens none.
#[derive(Default)]
struct HistoryModel {
    columns: Vec<String>,
    versions: BTreeMap<i64, Vec<Version>>,
}

impl HistoryModel {
    /// Applies a file's rows (`Op` first where `columns` has it) at times `at(row)`.
    fn apply(&mut self, columns: &[&str], rows: &[Row], at: impl Fn(usize) -> String) {
        for c in columns.iter().filter(|c| !["Op", "id", "ts"].contains(c)) {
            if !self.columns.iter().any(|m| m == c) {
                self.columns.push(c.to_string());
                for v in self.versions.values_mut().flatten() {
                    v.1.push(None);
                }
            }
        }
        let pos = |name: &str| columns.iter().position(|c| *c == name);
        for (n, row) in rows.iter().enumerate() {
            let op = pos("Op").and_then(|i| row[i]).unwrap_or("I").to_string();
            let id: i64 = row[pos("id").unwrap()].unwrap().parse().unwrap();
            let values: Vec<Option<String>> = self
                .columns
                .iter()
                .map(|c| pos(c).and_then(|i| row[i]).map(str::to_string))
                .collect();
            let time = at(n);
            let chain = self.versions.entry(id).or_default();
            let current = chain.last_mut().filter(|v| v.4);
            match (op.as_str(), current) {
                ("D", Some(cur)) => close(cur, &time, "D"),
                ("D", None) => {}
                (_, Some(cur)) if cur.1 == values => {}
                (_, current) => {
                    if let Some(cur) = current {
                        let op = cur.5.clone();
                        close(cur, &time, &op);
                    }
                    chain.push((id.to_string(), values, time, None, true, op));
                }
            }
        }
    }

    /// Applies a file at the times its name gives (a full load's: [`START`]).
    fn apply_file(&mut self, name: &str, columns: &[(&str, &str)], rows: &[Row]) {
        let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
        if name.starts_with("LOAD") {
            self.apply(&names, rows, |_| START.to_string());
        } else {
            self.apply(&names, rows, file_time(name));
        }
    }

    fn versions(&self) -> Vec<Version> {
        self.versions.values().flatten().cloned().collect()
    }
}

fn close(v: &mut Version, at: &str, op: &str) {
    v.3 = Some(at.to_string());
    v.4 = false;
    v.5 = op.to_string();
}

/// The version time of row `n` of change file `name`: its name's time plus `n` µs.
fn file_time(name: &str) -> impl Fn(usize) -> String {
    let at = chrono::NaiveDateTime::parse_from_str(&name[..18], "%Y%m%d-%H%M%S%3f").unwrap();
    move |n| {
        (at + chrono::Duration::microseconds(n as i64))
            .format("%Y-%m-%d %H:%M:%S%.6f")
            .to_string()
    }
}

fn history_config(c: &mut Config, table: &str, ordering: Option<&str>) {
    c.tables.insert(
        table.into(),
        TableConfig {
            key: Some(KeySpec::One("id".into())),
            history: Some(HistoryMode::Scd2),
            ordering_column: ordering.map(str::to_string),
            ..Default::default()
        },
    );
}

/// Uploads files and keeps the expected history in step.
struct HistoryStream<'a> {
    env: &'a Env,
    table: &'static str,
    model: HistoryModel,
    uploaded: Vec<(String, String, u64)>,
}

impl<'a> HistoryStream<'a> {
    fn new(env: &'a Env, table: &'static str) -> Self {
        Self {
            env,
            table,
            model: HistoryModel::default(),
            uploaded: Vec::new(),
        }
    }

    async fn file(&mut self, name: &str, columns: &[(&str, &str)], rows: &[Row]) {
        let key = self.env.key(self.table, name);
        let data: Vec<_> = rows.iter().map(|r| values(r)).collect();
        let body = crate::harness::parquet_bytes(columns, &data);
        let size = body.len() as u64;
        let etag = self.env.put_bytes(&key, body).await;
        self.model.apply_file(name, columns, rows);
        self.uploaded.push((key, etag, size));
    }
}

/// The table's versions, ordered by key and time (after the worker stopped).
fn versions(env: &Env, table: &str, columns: &[String]) -> Vec<Version> {
    let conn = env.db();
    let values: String = columns
        .iter()
        .map(|c| format!(", CAST({c} AS VARCHAR)"))
        .collect();
    let sql = format!(
        "SELECT CAST(id AS VARCHAR){values}, strftime(__valid_from, '%Y-%m-%d %H:%M:%S.%f'), strftime(__valid_to, '%Y-%m-%d %H:%M:%S.%f'), __is_current, __op FROM {table} ORDER BY id, __valid_from"
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    let n = columns.len();
    stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            (1..=n).map(|i| r.get(i)).collect::<Result<_, _>>()?,
            r.get(n + 1)?,
            r.get(n + 2)?,
            r.get(n + 3)?,
            r.get(n + 4)?,
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The docs' "as of" query: (id, v) of the versions valid at `at`.
fn as_of(env: &Env, table: &str, at: &str) -> Vec<(String, String)> {
    let sql = format!(
        "SELECT CAST(id AS VARCHAR), v FROM {table} WHERE __valid_from <= TIMESTAMP '{at}' AND (__valid_to IS NULL OR __valid_to > TIMESTAMP '{at}') ORDER BY id"
    );
    let conn = env.db();
    let mut stmt = conn.prepare(&sql).unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn pairs(rows: &[(i64, &str)]) -> Vec<(String, String)> {
    rows.iter()
        .map(|(i, v)| (i.to_string(), v.to_string()))
        .collect()
}

const LOAD: &[(&str, &str)] = &[("id", "BIGINT"), ("v", "VARCHAR")];
const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];
const CDC_TIER: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("id", "BIGINT"),
    ("v", "VARCHAR"),
    ("tier", "VARCHAR"),
];

fn c(op: &'static str, id: &'static str, v: &'static str) -> Row {
    vec![Some(op), Some(id), Some(v)]
}

type File = (
    &'static str,
    &'static [(&'static str, &'static str)],
    Vec<Row>,
);

/// The story the stream tests write: a full load; several changes of a key in one file, a
/// delete, an update that changes nothing, an insert; a re-insert after a delete; a delete
/// and re-insert in one file; then a new column (NULL in the older versions).
fn story() -> Vec<File> {
    let load: Vec<Row> = ["1", "2", "3", "4", "5"]
        .iter()
        .zip(["a1", "a2", "a3", "a4", "a5"])
        .map(|(id, v)| vec![Some(*id), Some(v)])
        .collect();
    vec![
        ("LOAD00000001.parquet", LOAD, load),
        (
            "20261201-100000000.parquet",
            CDC,
            vec![
                c("U", "1", "b1"),
                c("U", "1", "c1"),
                c("D", "2", "a2"),
                c("U", "3", "a3"),
                c("I", "6", "a6"),
            ],
        ),
        (
            "20261201-100100000.parquet",
            CDC,
            vec![
                c("I", "2", "b2"),
                c("D", "6", "a6"),
                c("U", "1", "d1"),
                c("U", "4", "b4"),
            ],
        ),
        (
            "20261201-100200000.parquet",
            CDC,
            vec![c("D", "1", "d1"), c("I", "1", "e1"), c("D", "5", "a5")],
        ),
        (
            "20261201-100300000.parquet",
            CDC_TIER,
            vec![
                vec![Some("U"), Some("3"), Some("a3"), Some("gold")],
                vec![Some("U"), Some("4"), Some("b4"), None],
            ],
        ),
    ]
}

async fn write_story(s: &mut HistoryStream<'_>) {
    for (name, columns, rows) in story() {
        s.file(name, columns, &rows).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_history_table_keeps_every_version_and_answers_as_of_queries() {
    let env = Env::new("history", |c| history_config(c, "customers", None)).await;
    let worker = env.start().await;
    let mut s = HistoryStream::new(&env, "customers");
    write_story(&mut s).await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;

    let expected = s.model.versions();
    assert_eq!(versions(&env, "customers", &s.model.columns), expected);
    // Spelled out once, so the model itself is checked: key 1's versions.
    let one: Vec<_> = expected
        .iter()
        .filter(|v| v.0 == "1")
        .map(|v| (v.1[0].clone().unwrap(), v.3.clone(), v.5.clone()))
        .collect();
    assert_eq!(
        one,
        [
            (
                "a1".into(),
                Some("2026-12-01 10:00:00.000000".into()),
                "I".into()
            ),
            (
                "b1".into(),
                Some("2026-12-01 10:00:00.000001".into()),
                "U".into()
            ),
            (
                "c1".into(),
                Some("2026-12-01 10:01:00.000002".into()),
                "U".into()
            ),
            (
                "d1".into(),
                Some("2026-12-01 10:02:00.000000".into()),
                "D".into()
            ),
            ("e1".into(), None, "I".into()),
        ]
    );
    assert_eq!(
        as_of(&env, "customers", "2026-12-01 09:00:00"),
        pairs(&[(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4"), (5, "a5")])
    );
    assert_eq!(
        as_of(&env, "customers", "2026-12-01 10:00:30"),
        pairs(&[(1, "c1"), (3, "a3"), (4, "a4"), (5, "a5"), (6, "a6")])
    );
    assert_eq!(
        as_of(&env, "customers", "2026-12-01 10:01:30"),
        pairs(&[(1, "d1"), (2, "b2"), (3, "a3"), (4, "b4"), (5, "a5")])
    );
    assert_eq!(
        as_of(&env, "customers", "2026-12-01 10:05:00"),
        pairs(&[(1, "e1"), (2, "b2"), (3, "a3"), (4, "b4")])
    );
    let current = env.rows("customers", &["id", "v", "tier", "__is_current"]);
    assert!(
        current.contains(&vec![
            Some("3".into()),
            Some("a3".into()),
            Some("gold".into()),
            Some("true".into())
        ]),
        "{current:?}"
    );
}

/// A random stream of change files over a few keys (updates that change nothing among
/// them), the same for every run of the test.
fn random_changes(rng: &mut fastrand::Rng, files: usize) -> Vec<(String, Vec<Row>)> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    (0..files)
        .map(|f| {
            let name = format!("20261201-11{:02}00000.parquet", f);
            let rows = (0..rng.usize(3..9))
                .map(|_| {
                    let op = ["I", "U", "U", "U", "D"][rng.usize(..5)];
                    let id = leak(rng.u32(1..12).to_string());
                    let v = leak(format!("v{}", rng.u32(0..3)));
                    c(op, id, v)
                })
                .collect();
            (name, rows)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_survives_kills_and_duplicated_notifications() {
    let env = Env::with_receives("history-kills", 100, |c| {
        history_config(c, "customers", None);
        c.queue.visibility_timeout = Duration::from_secs(3);
        c.batch.linger = Duration::from_millis(300);
        c.batch.max_files = 2;
    })
    .await;
    let config = config_file(&env);
    let log = env.dir.path().join("worker.log");
    let mut s = HistoryStream::new(&env, "customers");
    let mut rng = fastrand::Rng::with_seed(14);
    let changes = random_changes(&mut rng, 14);

    let killer = async {
        let mut rng = fastrand::Rng::new();
        let mut kills = 0;
        let started = std::time::Instant::now();
        while kills < 5 || started.elapsed() < Duration::from_secs(10) {
            let worker = Process::start(&config, &log);
            tokio::time::sleep(Duration::from_millis(rng.u64(400..2000))).await;
            worker.kill9().await;
            kills += 1;
        }
        kills
    };
    let writer = async {
        write_story(&mut s).await;
        for (name, rows) in &changes {
            s.file(name, CDC, rows).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Every third file's notification again, and an earlier one.
            if s.uploaded.len().is_multiple_of(3) {
                let (key, etag, size) = s.uploaded[s.uploaded.len() / 2].clone();
                env.send(&env.notification(&key, &etag, size)).await;
            }
        }
    };
    let ((), kills) = tokio::join!(writer, killer);
    let worker = Process::start(&config, &log);
    drained(&env, Duration::from_secs(6), Duration::from_secs(90), &log).await;
    worker.terminate().await;
    println!("{kills} SIGKILLs");
    assert_eq!(
        versions(&env, "customers", &s.model.columns),
        s.model.versions()
    );
}

const CDC_TS: &[(&str, &str)] = &[
    ("Op", "VARCHAR"),
    ("id", "BIGINT"),
    ("v", "VARCHAR"),
    ("ts", "VARCHAR"),
];

fn ct(op: &'static str, id: &'static str, v: &'static str, ts: &'static str) -> Row {
    vec![Some(op), Some(id), Some(v), Some(ts)]
}

/// DMS `TimestampColumnName` as the ordering column: a file announced after later files
/// were applied lands in its place in the history, and the current rows stay the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_file_with_an_ordering_column_lands_in_its_place() {
    let env = Env::new("history-late", |c| {
        history_config(c, "customers", Some("ts"))
    })
    .await;
    let worker = env.start().await;
    let load = [
        ct("I", "1", "a1", "2026-12-01 09:00:00.000000"),
        ct("I", "2", "a2", "2026-12-01 09:00:00.000000"),
    ];
    let on_time = [
        ct("U", "1", "c1", "2026-12-01 10:04:00.000000"),
        ct("U", "2", "c2", "2026-12-01 10:04:30.000000"),
    ];
    let late = [
        ct("U", "1", "b1", "2026-12-01 10:01:00.000000"),
        ct("D", "2", "a2", "2026-12-01 10:02:00.000000"),
        ct("I", "3", "b3", "2026-12-01 10:03:00.000000"),
    ];
    let mut s = HistoryStream::new(&env, "customers");
    s.file("LOAD00000001.parquet", CDC_TS, &load).await;
    s.file("20261201-100500000.parquet", CDC_TS, &on_time).await;
    env.settle(&worker, Duration::from_secs(60)).await;
    s.file("20261201-100300000.parquet", CDC_TS, &late).await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;

    // The model takes the changes in the order of their times.
    let mut model = HistoryModel::default();
    let names = ["Op", "id", "v", "ts"];
    let mut all: Vec<Row> = [&load[..], &on_time, &late].concat();
    all.sort_by_key(|r| r[3]);
    let times: Vec<String> = all.iter().map(|r| r[3].unwrap().to_string()).collect();
    model.apply(&names, &all, |n| times[n].clone());
    assert_eq!(
        versions(&env, "customers", &model.columns),
        model.versions()
    );
    assert_eq!(
        as_of(&env, "customers", "2026-12-01 10:02:30"),
        pairs(&[(1, "b1")])
    );
    assert_eq!(
        as_of(&env, "customers", "2026-12-01 10:05:00"),
        pairs(&[(1, "c1"), (2, "c2"), (3, "b3")])
    );
    let alerts = env.alerts().await;
    assert!(
        alerts
            .iter()
            .all(|a| a.body["alert"] != "file_out_of_order"),
        "{alerts:?}"
    );
}

impl HistoryModel {
    /// A reload at `at`: the new full load's rows as inserts then, and the keys it lacks
    /// closed (`D`) then.
    fn reload(&mut self, rows: &[Row], at: &str) {
        self.apply(&["id", "v"], rows, |_| at.to_string());
        let present: Vec<&str> = rows.iter().map(|r| r[0].unwrap()).collect();
        for (id, chain) in &mut self.versions {
            if let Some(cur) = chain.last_mut().filter(|v| v.4)
                && !present.contains(&id.to_string().as_str())
            {
                close(cur, at, "D");
            }
        }
    }
}

/// A DMS reload of a history table keeps its history: keys the new full load lacks are
/// closed at the reload, changed ones get a version then, unchanged ones none, and the
/// changes after the reload follow; no generation table is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_of_a_history_table_closes_absent_keys_and_keeps_the_history() {
    let env = Env::new("history-reload", |c| {
        history_config(c, "customers", None);
        c.dms.reload_settle = Duration::from_secs(3);
    })
    .await;
    let worker = env.start().await;
    let mut s = HistoryStream::new(&env, "customers");
    write_story(&mut s).await;
    env.settle(&worker, Duration::from_secs(60)).await;

    crate::reload::delete_table_objects(&env, "customers").await;
    let before = chrono::Utc::now().naive_utc();
    // 1 and 2 as they are, 3 changed, 4 gone, 7 new (5 and 6 were deleted before).
    let load: Vec<Row> = vec![
        vec![Some("1"), Some("e1")],
        vec![Some("2"), Some("b2")],
        vec![Some("3"), Some("r3")],
        vec![Some("7"), Some("r7")],
    ];
    let key = env.key("customers", "LOAD00000001.parquet");
    let data: Vec<_> = load.iter().map(|r| values(r)).collect();
    env.put_parquet(&key, LOAD, &data).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_name = crate::reload::now_name();
    s.file(&after_name, CDC, &[c("U", "7", "r7-u")]).await;
    env.settle(&worker, Duration::from_secs(60)).await;
    env.eventually("the reload is merged", Duration::from_secs(30), || async {
        worker
            .warehouse()
            .describe(&cdc_worker::warehouse::generation_table("customers", 2))
            .await
            .ok()
            .flatten()
            .is_none()
    })
    .await;
    worker.shutdown().await;

    // The reload's time, as the worker chose it: when key 4 was closed.
    let conn = env.db();
    let at: String = conn
        .query_row("SELECT strftime(__valid_to, '%Y-%m-%d %H:%M:%S.%f') FROM customers WHERE id = 4 AND __op = 'D'", [], |r| r.get(0))
        .expect("key 4 closed by the reload");
    let at_time = chrono::NaiveDateTime::parse_from_str(&at, "%Y-%m-%d %H:%M:%S%.6f").unwrap();
    let after =
        chrono::NaiveDateTime::parse_from_str(&file_time(&after_name)(0), "%Y-%m-%d %H:%M:%S%.6f")
            .unwrap();
    assert!(
        before <= at_time && at_time <= after,
        "reload at {at}, between {before} and {after}"
    );
    // The model: the story, the reload at its time, the change after it.
    let mut expected = HistoryModel::default();
    for (name, columns, rows) in story() {
        expected.apply_file(name, columns, &rows);
    }
    expected.reload(&load, &at);
    expected.apply_file(&after_name, CDC, &[c("U", "7", "r7-u")]);
    let tables: Vec<String> = {
        let mut stmt = conn.prepare("SELECT table_name FROM information_schema.tables WHERE table_name LIKE '_cdc_worker_g%'").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(tables.is_empty(), "{tables:?}");
    assert_eq!(
        versions(&env, "customers", &expected.columns),
        expected.versions()
    );
}

/// A typo in `track_history_columns` would make every update open no version: the table
/// waits instead, with a `table_held` alert naming the unknown column, and nothing loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tracked_column_the_files_lack_holds_the_table_with_an_alert() {
    let env = Env::new("history-typo", |c| {
        history_config(c, "customers", None);
        c.tables.get_mut("customers").unwrap().track_history_columns = Some(vec!["vv".into()]);
    })
    .await;
    let worker = env.start().await;
    let mut s = HistoryStream::new(&env, "customers");
    s.file("LOAD00000001.parquet", LOAD, &[vec![Some("1"), Some("a1")]])
        .await;
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    while !seen
        .iter()
        .any(|a: &cdc_worker::devkit::resources::ReceivedAlert| a.body["alert"] == "table_held")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no table_held alert: {seen:?}"
        );
        seen.extend(env.alerts().await);
    }
    let held = seen
        .iter()
        .find(|a| a.body["alert"] == "table_held")
        .unwrap();
    let message = held.body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("track_history_columns") && message.contains("vv"),
        "{message}"
    );
    assert_eq!(worker.warehouse().row_count("customers").await.unwrap(), 0);
    worker.shutdown().await;
}

/// A user who turns `history = "scd2"` on for a table already loaded as a latest table:
/// its files wait with a `table_held` alert saying how to start the history, and the rows
/// already there are left as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turning_history_on_for_an_existing_latest_table_holds_it_with_an_alert() {
    let env = Env::new("history-switch", |c| {
        c.tables.insert(
            "customers".into(),
            TableConfig {
                key: Some(KeySpec::One("id".into())),
                ..Default::default()
            },
        );
    })
    .await;
    let worker = env.start().await;
    let mut s = HistoryStream::new(&env, "customers");
    s.file("LOAD00000001.parquet", LOAD, &[vec![Some("1"), Some("a1")]])
        .await;
    env.settle(&worker, Duration::from_secs(60)).await;
    worker.shutdown().await;
    let before = env.rows("customers", &["id", "v"]);

    let mut config = env.config.clone();
    history_config(&mut config, "customers", None);
    let worker = cdc_worker::worker::Worker::start(config)
        .await
        .expect("worker starts");
    s.file("20261201-100000000.parquet", CDC, &[c("U", "1", "b1")])
        .await;
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    while !seen
        .iter()
        .any(|a: &cdc_worker::devkit::resources::ReceivedAlert| a.body["alert"] == "table_held")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no table_held alert: {seen:?}"
        );
        seen.extend(env.alerts().await);
    }
    worker.shutdown().await;
    let held = seen
        .iter()
        .find(|a| a.body["alert"] == "table_held")
        .unwrap();
    let message = held.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("docs/history.md"), "{message}");
    assert_eq!(
        env.rows("customers", &["id", "v"]),
        before,
        "the loaded rows are left alone"
    );
}
