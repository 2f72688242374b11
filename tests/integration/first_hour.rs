//! A new user's first hour (issue 11): each mistake people make, and what they see —
//! the rows, the alert, the exit code and the message text. The command line is run as
//! the built binary, in an empty directory and environment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cdc_worker::config::{KeySpec, TableConfig};

use crate::harness::{ENDPOINT, Env};
use crate::model::{Stream, TableModel};

const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];

fn keyed(table: &str) -> impl FnOnce(&mut cdc_worker::config::Config) + '_ {
    move |c| {
        c.tables.insert(
            table.into(),
            TableConfig {
                key: Some(KeySpec::One("id".into())),
                ..Default::default()
            },
        );
    }
}

/// What a command printed and how it exited.
pub(crate) struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `cdc-worker` binary in `dir` with nothing of this process's environment
/// (no AWS_* or CDC_WORKER__* variables, no profile), plus `vars`.
pub(crate) fn cli(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-worker"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        // No instance metadata here: without it the SDK's chain ends at once.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(vars.iter().copied())
        .output()
        .expect("run cdc-worker");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A config file for the binary: the test environment's settings, then `extra` (TOML,
/// merged over them).
pub(crate) fn config_file(env: &Env, name: &str, extra: &str) -> PathBuf {
    let c = &env.config;
    let base = format!(
        r#"
        [aws]
        region = "us-east-1"
        endpoint_url = "{ENDPOINT}"
        force_path_style = true
        access_key_id = "test"
        secret_access_key = "test"
        [queue]
        url = "{queue}"
        wait_time = "1s"
        [source]
        bucket = "{bucket}"
        prefix = "{prefix}"
        [warehouse.duckdb]
        path = "{db}"
        [alerts]
        sns_topic_arn = "{topic}"
        # The test files are named for 2026-11-24: a test that checks freshness sets its own
        # objective.
        freshness_objective = "0s"
        "#,
        queue = c.queue.url,
        bucket = c.source.bucket,
        prefix = c.source.prefix,
        db = c.warehouse.duckdb.path.display(),
        topic = env.res.topic_arn,
    );
    let mut table: toml::Table = base.parse().expect("base config");
    merge(&mut table, extra.parse().expect("extra config"));
    let path = env.dir.path().join(name);
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    path
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The current value of a metric series in this process's recorder (0 when absent).
fn metric(series: &str) -> f64 {
    cdc_worker::telemetry::metrics_handle()
        .render()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Mistake 1: a file that is not a DMS name is skipped with an alert naming it, from a
/// notification and from the lane's S3 listing alike; the table goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stray_file_is_skipped_by_name_and_never_blocks_its_table() {
    let env = Env::new("stray", keyed("customers")).await;
    let worker = env.start().await;
    let mut stream = Stream::new(&env);
    stream.table("customers", TableModel::keyed(&["id"]));
    let one =
        |op: &'static str, id: &'static str, v: &'static str| vec![Some(op), Some(id), Some(v)];
    stream
        .file(
            "customers",
            "LOAD00000001.parquet",
            CDC,
            &[one("I", "1", "a"), one("I", "2", "b")],
        )
        .await;
    stream
        .file(
            "customers",
            "20261124-100000000.parquet",
            CDC,
            &[one("U", "1", "a2")],
        )
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    // The stray upload: DMS-looking data under a name DMS never writes (it would sort
    // after every CDC file, and every later real file would be "out of order").
    let stray = env.key("customers", "part-0001.parquet");
    env.put_parquet(
        &stray,
        CDC,
        &[vec![
            crate::harness::s("D"),
            crate::harness::i(2),
            crate::harness::s("b"),
        ]],
    )
    .await;
    stream
        .file(
            "customers",
            "20261124-100100000.parquet",
            CDC,
            &[one("I", "3", "c")],
        )
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;

    // Another stray and a real file land unannounced (as if their messages were lost);
    // the next announced file makes the lane list the folder: the real one joins in
    // order, the stray does not.
    let saved = env.pause_notifications().await;
    let stray_listed = env.key("customers", "2026/11/24/export.parquet");
    env.put_parquet(
        &stray_listed,
        CDC,
        &[vec![
            crate::harness::s("D"),
            crate::harness::i(1),
            crate::harness::s("a2"),
        ]],
    )
    .await;
    stream
        .file(
            "customers",
            "20261124-100200000.parquet",
            CDC,
            &[one("U", "3", "c2")],
        )
        .await;
    env.resume_notifications(saved).await;
    stream
        .file(
            "customers",
            "20261124-100300000.parquet",
            CDC,
            &[one("I", "4", "d")],
        )
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let alerts = env.alerts().await;
    worker.shutdown().await;

    stream.assert_tables();
    assert_eq!(
        env.ledger_keys(),
        stream.uploaded_keys(),
        "every real file once, no stray"
    );
    assert_eq!(
        env.depths().await,
        (0, 0),
        "acknowledged, nothing in the DLQ"
    );
    let skipped: Vec<&serde_json::Value> = alerts
        .iter()
        .map(|a| &a.body)
        .filter(|b| b["alert"] == "file_skipped")
        .collect();
    assert_eq!(
        skipped.len(),
        1,
        "one alert, for the announced stray: {skipped:?}"
    );
    let location = format!("s3://{}/{stray}", env.res.bucket);
    assert_eq!(skipped[0]["file"], location.as_str());
    assert_eq!(skipped[0]["table"], "customers");
    assert_eq!(
        skipped[0]["message"],
        format!("{location}: `part-0001.parquet` is not a DMS file name (full load: LOAD00000001.parquet, optionally SEGMENTn_; CDC: 20261124-101500123.parquet); files of other names are never applied").as_str()
    );
    assert!(
        skipped[0]["next_steps"]
            .as_str()
            .unwrap()
            .starts_with("Nothing was loaded from it and `customers` goes on."),
        "{}",
        skipped[0]
    );
    assert!(
        !alerts
            .iter()
            .any(|a| a.body["alert"] == "file_out_of_order"),
        "no real file is ever out of order because of a stray"
    );
}

/// Mistakes 2 and 7: notifications of another bucket or outside `source.prefix` are a
/// WARN, a reason-labelled metric and one alert per cause; a source bucket that does not
/// exist is a startup WARN and alert; dev-setup's filter is the prefix folder and
/// `.parquet`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_that_cannot_be_ours_are_counted_and_alerted_once_per_cause() {
    let env = Env::new("typo", |_| {}).await;
    let filter = env
        .aws
        .s3
        .get_bucket_notification_configuration()
        .bucket(&env.res.bucket)
        .send()
        .await
        .unwrap();
    let rules: Vec<(String, String)> = filter.queue_configurations()[0]
        .filter()
        .and_then(|f| f.key())
        .unwrap()
        .filter_rules()
        .iter()
        .map(|r| {
            (
                r.name().unwrap().as_str().to_lowercase(),
                r.value().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        rules.contains(&("prefix".into(), "dms/".into())),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("suffix".into(), ".parquet".into())),
        "{rules:?}"
    );

    let worker = env.start().await;
    let other_before = metric("cdc_worker_notifications_ignored_total{reason=\"other_bucket\"}");
    let outside_before =
        metric("cdc_worker_notifications_ignored_total{reason=\"outside_prefix\"}");
    let not_parquet_before =
        metric("cdc_worker_notifications_ignored_total{reason=\"not_parquet\"}");
    let typo = format!("{}-typo", env.res.bucket);
    let about = |bucket: &str, key: &str| {
        env.notification(key, "e1", 10).replace(
            &format!("\"name\":\"{}\"", env.res.bucket),
            &format!("\"name\":\"{bucket}\""),
        )
    };
    for n in 0..3 {
        env.send(&about(
            &typo,
            &format!("dms/public/t/20261124-10000{n}000.parquet"),
        ))
        .await;
    }
    env.send(&env.notification("cdc/public/t/20261124-100000000.parquet", "e1", 10))
        .await;
    env.send(&env.notification("cdc/public/u/20261124-100000000.parquet", "e1", 10))
        .await;
    env.send(&env.notification("dms/public/t/notes.txt", "e1", 10))
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let alerts = env.alerts().await;
    worker.shutdown().await;

    assert_eq!(
        env.depths().await,
        (0, 0),
        "acknowledged, not left to the DLQ"
    );
    assert!(
        metric("cdc_worker_notifications_ignored_total{reason=\"other_bucket\"}") - other_before
            >= 3.0
    );
    assert!(
        metric("cdc_worker_notifications_ignored_total{reason=\"outside_prefix\"}")
            - outside_before
            >= 2.0
    );
    assert!(
        metric("cdc_worker_notifications_ignored_total{reason=\"not_parquet\"}")
            - not_parquet_before
            >= 1.0
    );
    let ignored: Vec<&serde_json::Value> = alerts
        .iter()
        .map(|a| &a.body)
        .filter(|b| b["alert"] == "notification_ignored")
        .collect();
    assert_eq!(
        ignored.len(),
        2,
        "one alert per cause (bucket, folder): {ignored:?}"
    );
    let bucket = env.res.bucket.as_str();
    let of = |needle: &str| {
        *ignored
            .iter()
            .find(|b| b["file"].as_str().is_some_and(|f| f.contains(needle)))
            .unwrap_or_else(|| panic!("no alert about {needle}: {ignored:?}"))
    };
    let (other, outside) = (of(&typo), of("/cdc/"));
    assert_eq!(
        other["message"],
        format!("notifications for bucket `{typo}` are ignored: source.bucket is `{bucket}` (reported once per bucket)").as_str()
    );
    assert_eq!(
        other["file"],
        format!("s3://{typo}/dms/public/t/20261124-100000000.parquet").as_str()
    );
    assert_eq!(
        other["next_steps"],
        format!("If DMS writes to `{typo}`, set source.bucket = \"{typo}\" and restart; otherwise remove this queue from that bucket's event notifications.").as_str()
    );
    assert_eq!(
        outside["message"],
        "notifications for files under `cdc/` are ignored: source.prefix is `dms` (reported once per folder)"
    );

    // The typo in the config itself: the worker starts (the queue is fine), and says
    // at once that the bucket does not exist.
    let mut config = env.config.clone();
    config.source.bucket = typo.clone();
    let worker = cdc_worker::worker::Worker::start(config)
        .await
        .expect("starts");
    worker.shutdown().await;
    let setup: Vec<String> = env
        .alerts()
        .await
        .iter()
        .filter(|a| a.body["alert"] == "setup_problem")
        .map(|a| a.body["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        setup.iter().any(|m| m.starts_with(&format!(
            "source bucket: S3 bucket `{typo}` (source.bucket): does not exist"
        ))),
        "{setup:?}"
    );
}

/// Mistake 4: a wrong queue URL stops the worker at startup; a queue that goes away fails
/// `/healthz` and `cdc-worker health` after `worker.unhealthy_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_queue_stops_startup_and_a_lost_queue_fails_health() {
    let port = free_port();
    let env = Env::new("queue", |c| {
        c.telemetry.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.worker.unhealthy_after = Duration::from_secs(2);
    })
    .await;
    let wrong = format!("{}-nope", env.config.queue.url);
    let file = config_file(
        &env,
        "wrong-queue.toml",
        &format!("[queue]\nurl = \"{wrong}\"\n"),
    );
    let run = cli(
        env.dir.path(),
        &["run", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("error: cannot start: queue: SQS queue {wrong}: does not exist (AWS.SimpleQueueService.NonExistentQueue")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("queue.url must be the URL of the queue the bucket notifies")
    );
    assert!(
        !env.config.warehouse.duckdb.path.exists(),
        "nothing created before the queue check"
    );

    let worker = env.start().await;
    let listen = format!("[telemetry]\nlisten = \"127.0.0.1:{port}\"\n");
    let file = config_file(&env, "health.toml", &listen);
    let health = |file: &Path| {
        cli(
            env.dir.path(),
            &["health", "--config", file.to_str().unwrap()],
            &[],
        )
    };
    assert_eq!(health(&file).code, 0);
    env.aws
        .sqs
        .delete_queue()
        .queue_url(&env.res.queue_url)
        .send()
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/healthz");
    env.eventually("/healthz fails", Duration::from_secs(30), || async {
        reqwest::get(&url).await.is_ok_and(|r| r.status() == 503)
    })
    .await;
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(
        body.starts_with("unhealthy: no receive from the queue has succeeded for ")
            && body.contains("(worker.unhealthy_after = 2s): receiving from "),
        "{body}"
    );
    let run = health(&file);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.starts_with(&format!(
            "error: GET {url}: 503 Service Unavailable: unhealthy: "
        )),
        "{}",
        run.stderr
    );
    worker.shutdown().await;
}

/// Mistake 5: the README's smallest config, no `[aws]`: one line that says what to set,
/// no SDK struct dumps; an endpoint that does not answer names `aws.endpoint_url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_errors_say_what_to_set_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let smallest = dir.path().join("my.toml");
    std::fs::write(
        &smallest,
        "[queue]\nurl = \"https://sqs.eu-west-1.amazonaws.com/123456789012/dms-files\"\n[source]\nbucket = \"my-dms-bucket\"\nprefix = \"dms\"\n[alerts]\nsns_topic_arn = \"arn:aws:sns:eu-west-1:123456789012:cdc-alerts\"\n",
    )
    .unwrap();
    let path = smallest.to_str().unwrap();
    let run = cli(dir.path(), &["check-connection", "--config", path], &[]);
    assert_eq!(run.code, 1);
    let first = run.stdout.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        "FAIL  aws: no AWS region is configured; set aws.region in the config (or AWS_REGION), and credentials if not done yet"
    );
    let run = cli(
        dir.path(),
        &["check-connection", "--config", path],
        &[("AWS_REGION", "eu-west-1")],
    );
    assert!(
        run.stdout
            .starts_with("FAIL  aws: no AWS credentials found")
            && run
                .stdout
                .contains("set aws.access_key_id and aws.secret_access_key"),
        "{}",
        run.stdout
    );
    let run = cli(dir.path(), &["run", "--config", path], &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("error: cannot start: aws: no AWS region is configured"),
        "{}",
        run.stderr
    );
    // A LocalStack config whose endpoint does not answer.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let local = dir.path().join("local.toml");
    std::fs::write(
        &local,
        format!("[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{closed}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n[queue]\nurl = \"{closed}/000000000000/q\"\n[source]\nbucket = \"my-dms-bucket\"\n"),
    )
    .unwrap();
    let run = cli(
        dir.path(),
        &["check-connection", "--config", local.to_str().unwrap()],
        &[],
    );
    let queue = run
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL  queue"))
        .unwrap_or_default()
        .to_string();
    assert!(
        queue.starts_with(&format!("FAIL  queue: SQS queue {closed}/000000000000/q: cannot connect: "))
            && queue.ends_with("; check aws.endpoint_url (LocalStack: http://127.0.0.1:4566), aws.region and the network"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains('{'), "no SDK structs: {}", run.stdout);
    assert!(
        run.stdout.lines().all(|l| l.len() < 400),
        "one short line per problem: {}",
        run.stdout
    );
    assert!(!run.stderr.contains("DispatchFailure"), "{}", run.stderr);
    assert!(
        !dir.path().join("cdc-worker.duckdb").exists(),
        "check-connection creates nothing"
    );
}

/// Mistake 6: `status` asks the running worker (DuckDB admits one process per file) and
/// reads the warehouse when none runs; `check-connection` does not call a held file a
/// failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_asks_the_running_worker_then_reads_the_warehouse() {
    let port = free_port();
    let env = Env::new("status", |c| {
        keyed("accounts")(c);
        c.telemetry.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    env.put_table_keys(serde_json::json!({"events": null}))
        .await;
    let worker = env.start().await;
    let mut stream = Stream::new(&env);
    stream.table("accounts", TableModel::keyed(&["id"]));
    stream.table("events", TableModel::append_only());
    stream
        .file(
            "accounts",
            "LOAD00000001.parquet",
            CDC,
            &[vec![Some("I"), Some("1"), Some("a")]],
        )
        .await;
    stream
        .file(
            "accounts",
            "20261124-100000000.parquet",
            CDC,
            &[vec![Some("U"), Some("1"), Some("b")]],
        )
        .await;
    stream
        .file(
            "events",
            "20261124-100000000.parquet",
            CDC,
            &[vec![Some("I"), Some("7"), Some("x")]],
        )
        .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let file = config_file(
        &env,
        "status.toml",
        &format!("[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[tables.accounts]\nkey = \"id\"\n"),
    );
    let file = file.to_str().unwrap();
    let accounts_last = env.key("accounts", "20261124-100000000.parquet");
    let events_last = env.key("events", "20261124-100000000.parquet");
    let row = |out: &str, table: &str| -> String {
        out.lines()
            .find(|l| l.starts_with(&format!("{table} ")))
            .unwrap_or_default()
            .to_string()
    };

    let live = cli(env.dir.path(), &["status", "--config", file], &[]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    assert!(
        live.stdout
            .starts_with("tables, as the running worker reports it:"),
        "{}",
        live.stdout
    );
    let accounts = row(&live.stdout, "accounts");
    assert!(
        accounts.contains("merge (id)") && accounts.contains(&accounts_last),
        "{}",
        live.stdout
    );
    let events = row(&live.stdout, "events");
    assert!(
        events.contains("append (no key)") && events.contains(&events_last),
        "{}",
        live.stdout
    );
    let check = cli(env.dir.path(), &["check-connection", "--config", file], &[]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    let line = check
        .stdout
        .lines()
        .find(|l| l.contains("warehouse (duckdb)"))
        .unwrap();
    assert!(
        line.starts_with("ok    warehouse (duckdb): ")
            && line.contains("is in use by a running worker"),
        "{line}"
    );
    worker.shutdown().await;

    let after = cli(env.dir.path(), &["status", "--config", file], &[]);
    assert_eq!(after.code, 0, "{}", after.stderr);
    assert!(
        after.stdout.starts_with(&format!(
            "tables, from the warehouse (no worker answers on http://127.0.0.1:{port}/status):"
        )),
        "{}",
        after.stdout
    );
    assert!(
        row(&after.stdout, "accounts").contains("merge (id)"),
        "{}",
        after.stdout
    );
    assert!(
        row(&after.stdout, "accounts").contains(&accounts_last),
        "{}",
        after.stdout
    );
    assert!(
        row(&after.stdout, "events").contains("append (no key)"),
        "{}",
        after.stdout
    );
    stream.assert_tables();
}

/// Mistake 8: `replay` sends in DMS order, after a key or a file name; a `--table` that
/// matches nothing lists the tables it knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_follows_dms_order_and_names_the_known_tables() {
    let env = Env::new("replay-order", |_| {}).await;
    // No worker runs: the queue holds only what replay sends.
    env.pause_notifications().await;
    let files = [
        "LOAD00000001.parquet",
        "LOAD00000002.parquet",
        "2026/11/24/20261124-100000000.parquet",
        "2026/11/24/20261124-100100000.parquet",
    ];
    for f in files {
        env.put_parquet(&env.key("customers", f), CDC, &[]).await;
    }
    env.put_parquet(&env.key("orders", "LOAD00000001.parquet"), CDC, &[])
        .await;
    env.put_parquet(&env.key("customers", "part-0001.parquet"), CDC, &[])
        .await;
    let names = |fs: &[&str]| {
        fs.iter()
            .map(|f| f.rsplit('/').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        replayed(&env, None).await,
        names(&files),
        "DMS order, the stray left out"
    );
    let load1 = env.key("customers", "LOAD00000001.parquet");
    assert_eq!(
        replayed(&env, Some(&load1)).await,
        names(&files[1..]),
        "after a LOAD key: later loads and every CDC file"
    );
    assert_eq!(
        replayed(&env, Some("20261124-100000000.parquet")).await,
        names(&files[3..]),
        "after a CDC file name, whatever its date folders"
    );

    let err = cdc_worker::commands::replay(&env.config, "public.customers", None, true)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "no DMS files of table `public.customers` under s3://{}/dms/; --table takes the target table's name: source table public.customers is `customers` (routing.table_name = \"{{table}}\"); tables: customers, orders",
            env.res.bucket
        )
    );
}

/// Runs `replay` for `customers` and returns the file names it sent, in order.
async fn replayed(env: &Env, since: Option<&str>) -> Vec<String> {
    cdc_worker::commands::replay(&env.config, "customers", since, false)
        .await
        .unwrap();
    let out = env
        .aws
        .sqs
        .receive_message()
        .queue_url(&env.res.queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let mut names = Vec::new();
    for m in out.messages() {
        let body: serde_json::Value = serde_json::from_str(m.body().unwrap()).unwrap();
        for r in body["Records"].as_array().into_iter().flatten() {
            let key = r["s3"]["object"]["key"].as_str().unwrap();
            names.push(key.rsplit('/').next().unwrap().to_string());
        }
        env.aws
            .sqs
            .delete_message()
            .queue_url(&env.res.queue_url)
            .receipt_handle(m.receipt_handle().unwrap())
            .send()
            .await
            .unwrap();
    }
    names
}

/// Mistake 9: config errors name the key, the file or environment variable, the valid
/// values and an example; an `s3://` bucket is refused with the name to write.
#[test]
fn config_errors_say_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my.toml");
    let write = |extra: &str| {
        std::fs::write(
            &file,
            format!("[queue]\nurl = \"https://sqs.eu-west-1.amazonaws.com/123456789012/dms-files\"\n[source]\nbucket = \"my-dms-bucket\"\n{extra}"),
        )
        .unwrap()
    };
    let path = file.to_str().unwrap();
    write("[warehouse]\nkind = \"snowflake\"\n");
    let run = cli(dir.path(), &["check-config", "--config", path], &[]);
    assert_eq!(run.code, 2);
    assert_eq!(
        run.stderr.trim(),
        format!(
            "invalid configuration: `warehouse.kind` (in {path}): `snowflake` is not a valid value; valid values: duckdb, firebolt (example: kind = \"duckdb\")"
        )
    );
    write("");
    let run = cli(
        dir.path(),
        &["check-config", "--config", path],
        &[("CDC_WORKER__BATCH__LINGER", "2")],
    );
    assert_eq!(
        run.stderr.trim(),
        "invalid configuration: `batch.linger` (set by the environment variable CDC_WORKER__BATCH__LINGER): `2` is not a duration; write a number with a unit: ms, s, m or h (example: linger = \"2s\")"
    );
    std::fs::write(&file, "[queue]\nurl = \"https://sqs.eu-west-1.amazonaws.com/1/q\"\n[source]\nbucket = \"s3://my-dms-bucket/dms\"\n").unwrap();
    let run = cli(dir.path(), &["check-config", "--config", path], &[]);
    assert_eq!(run.code, 2);
    assert_eq!(
        run.stderr.trim(),
        format!(
            "invalid configuration: `source.bucket` (in {path}): `s3://my-dms-bucket/dms` is a location, not a bucket name; write the name alone: bucket = \"my-dms-bucket\" and the folder in source.prefix: prefix = \"dms\""
        )
    );
}

/// Mistake 10: `check-connection` finds a missing metadata bucket, a bucket that does
/// not notify the queue or filters the wrong prefix, and a queue without redrive policy,
/// creating nothing; the worker says the same at startup with a WARN and an alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connection_finds_the_setup_mistakes_and_creates_nothing() {
    let env = Env::new("checks", |_| {}).await;
    let dir = env.dir.path();
    let run = |name: &str, extra: &str| {
        let file = config_file(&env, name, extra);
        cli(
            dir,
            &["check-connection", "--config", file.to_str().unwrap()],
            &[],
        )
    };
    let line = |out: &str, check: &str| -> String {
        out.lines()
            .find(|l| {
                l.get(6..)
                    .is_some_and(|r| r.starts_with(&format!("{check}:")))
            })
            .unwrap_or_default()
            .to_string()
    };
    let good = run("good.toml", "");
    assert_eq!(good.code, 0, "{}", good.stdout);
    assert!(
        good.stdout.lines().all(|l| l.starts_with("ok ")),
        "{}",
        good.stdout
    );
    assert_eq!(
        line(&good.stdout, "bucket notification"),
        "ok    bucket notification: s3:ObjectCreated:* to this queue, prefix `dms/`, suffix `.parquet`"
    );
    assert!(
        !env.config.warehouse.duckdb.path.exists(),
        "the DuckDB file is not created"
    );

    let missing = format!("{}-meta", env.res.bucket);
    let out = run(
        "meta.toml",
        &format!("[metadata]\nbucket = \"{missing}\"\n"),
    );
    assert_eq!(out.code, 1);
    assert!(
        line(&out.stdout, "metadata bucket").starts_with(&format!(
            "FAIL  metadata bucket: S3 bucket `{missing}` (metadata.bucket): does not exist"
        )),
        "{}",
        out.stdout
    );

    // A queue without a redrive policy, which the bucket notifies with a prefix filter
    // that misses source.prefix.
    let bare = env
        .aws
        .sqs
        .create_queue()
        .queue_name(format!("{}-bare", env.res.bucket))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let bare_arn = env
        .aws
        .sqs
        .get_queue_attributes()
        .queue_url(&bare)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .and_then(|a| {
            a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                .cloned()
        })
        .unwrap();
    let filter = cdc_worker::devkit::resources::notification_filter("cdc");
    env.aws
        .s3
        .put_bucket_notification_configuration()
        .bucket(&env.res.bucket)
        .notification_configuration(
            aws_sdk_s3::types::NotificationConfiguration::builder()
                .queue_configurations(
                    aws_sdk_s3::types::QueueConfiguration::builder()
                        .queue_arn(&bare_arn)
                        .events(aws_sdk_s3::types::Event::S3ObjectCreated)
                        .filter(filter)
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let out = run("bare.toml", &format!("[queue]\nurl = \"{bare}\"\n"));
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        line(&out.stdout, "dead-letter queue")
            .starts_with("WARN  dead-letter queue: the queue has no redrive policy"),
        "{}",
        out.stdout
    );
    assert_eq!(
        line(&out.stdout, "bucket notification"),
        "FAIL  bucket notification: the notification to this queue has prefix filter `cdc/`, which matches nothing under source.prefix `dms/`: no file will reach the worker; set the prefix to `dms/` (or source.prefix to DMS's BucketFolder)"
    );
    let out = run("other.toml", "");
    assert!(
        line(&out.stdout, "bucket notification").starts_with(&format!("FAIL  bucket notification: the bucket notifies {bare_arn} but not this queue: no file will reach the worker;")),
        "{}",
        out.stdout
    );

    // At startup: the worker runs, with one WARN and one alert per problem.
    let mut config = env.config.clone();
    config.queue.url = bare.clone();
    let worker = cdc_worker::worker::Worker::start(config)
        .await
        .expect("starts");
    worker.shutdown().await;
    let setup: Vec<(String, String)> = env
        .alerts()
        .await
        .iter()
        .filter(|a| a.body["alert"] == "setup_problem")
        .map(|a| {
            (
                a.body["severity"].as_str().unwrap().to_string(),
                a.body["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(setup.len(), 2, "{setup:?}");
    let has = |severity: &str, start: &str| {
        setup
            .iter()
            .any(|(s, m)| s == severity && m.starts_with(start))
    };
    assert!(
        has(
            "warning",
            "dead-letter queue: the queue has no redrive policy"
        ),
        "{setup:?}"
    );
    assert!(
        has(
            "error",
            "bucket notification: the notification to this queue has prefix filter `cdc/`"
        ),
        "{setup:?}"
    );
}

/// Mistake 11 (part): `/metrics` describes every series; a port in use is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_described_and_a_busy_port_is_named() {
    let port = free_port();
    let env = Env::new("metrics", |c| {
        c.telemetry.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    let worker = env.start().await;
    env.put_parquet(
        &env.key("described", "LOAD00000001.parquet"),
        &[("id", "BIGINT")],
        &[vec![crate::harness::i(1)]],
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let families: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("cdc_worker_"))
        .map(|l| {
            let name = l.split(['{', ' ']).next().unwrap();
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n))
        })
        .collect();
    assert!(families.len() > 5, "{metrics}");
    for family in &families {
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "no # HELP for {family}:\n{metrics}"
        );
    }
    // Its own DuckDB file: one process must never open a file twice.
    let mut second = env.config.clone();
    second.warehouse.duckdb.path = env.dir.path().join("second.duckdb");
    let busy = cdc_worker::worker::Worker::start(second)
        .await
        .err()
        .expect("the port is taken");
    assert_eq!(
        busy.to_string(),
        format!(
            "cannot listen on 127.0.0.1:{port} (telemetry.listen): Address already in use (os error 98); choose a free port, or another address"
        )
    );
    worker.shutdown().await;
}

/// Mistake 11, the `Op` column: a writer that lower-cases names still deletes (the column
/// is found in any case and never stored), and a CDC file without an operation column is
/// applied as inserts, with one alert for the table naming the first such file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_op_column_is_found_in_any_case_and_a_cdc_file_without_one_is_reported() {
    use crate::harness::{i, s};
    let env = Env::new("opcase", keyed("customers")).await;
    let worker = env.start().await;
    let data = &[("id", "BIGINT"), ("v", "VARCHAR")];
    let lower = &[("op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];
    let load = env.key("customers", "LOAD00000001.parquet");
    let rows = [vec![i(1), s("a")], vec![i(2), s("b")], vec![i(3), s("c")]];
    env.put_parquet(&load, data, &rows).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let cased = env.key("customers", "20261124-100000000.parquet");
    let changes = [vec![s("D"), i(1), s("a")], vec![s("U"), i(2), s("b2")]];
    env.put_parquet(&cased, lower, &changes).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let without = env.key("customers", "20261124-100100000.parquet");
    env.put_parquet(&without, data, &[vec![i(4), s("d")], vec![i(2), s("b3")]])
        .await;
    let later = env.key("customers", "20261124-100200000.parquet");
    env.put_parquet(&later, data, &[vec![i(5), s("e")]]).await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let alerts = env.alerts().await;
    worker.shutdown().await;

    let text = |id: &str, v: &str| vec![Some(id.to_string()), Some(v.to_string())];
    assert_eq!(
        env.rows("customers", &["id", "v"]),
        vec![
            text("2", "b3"),
            text("3", "c"),
            text("4", "d"),
            text("5", "e")
        ],
        "the lower-case `op` deleted 1 and updated 2; the files without one inserted and updated"
    );
    let columns: Vec<String> = env.columns("customers").into_iter().map(|c| c.0).collect();
    assert_eq!(columns, ["id", "v"], "the operation column is never stored");
    assert_eq!(env.depths().await, (0, 0), "every file acknowledged");
    let missing: Vec<&serde_json::Value> = alerts
        .iter()
        .map(|a| &a.body)
        .filter(|b| b["alert"] == "op_column_missing")
        .collect();
    assert_eq!(missing.len(), 1, "one alert for the table: {missing:?}");
    let location = format!("s3://{}/{without}", env.res.bucket);
    assert_eq!(missing[0]["file"], location.as_str());
    assert_eq!(missing[0]["severity"], "warning");
    assert!(
        missing[0]["next_steps"]
            .as_str()
            .unwrap()
            .contains("CdcInsertsOnly"),
        "{}",
        missing[0]
    );
}

/// Mistake 1's way out: a table blocked by a file that can never be applied. `status`
/// names the blocking file, `ledger skip` (with the worker stopped: DuckDB admits one
/// process) records it and alerts, and the table's later files go on after the restart.
/// Long on purpose: one operator's way out, step by step, with what each step shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_blocked_by_a_poison_file_goes_on_after_ledger_skip() {
    use crate::harness::{i, s};
    let port = free_port();
    let env = Env::new("ledger-skip", |c| {
        keyed("fragile")(c);
        c.telemetry.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        // The queue's whole backoff budget is a few seconds.
        c.queue.retry_backoff = Duration::from_secs(1);
        c.queue.retry_backoff_max = Duration::from_secs(2);
        c.queue.visibility_timeout = Duration::from_secs(3);
    })
    .await;
    // A target whose CHECK constraint one file's data violates: that file is poison.
    env.db()
        .execute_batch("CREATE TABLE fragile (id BIGINT, v VARCHAR CHECK (length(v) < 5))")
        .unwrap();
    let worker = env.start().await;
    let poison_name = "20261124-100000000.parquet";
    let poison = env.key("fragile", poison_name);
    env.put_parquet(&poison, CDC, &[vec![s("I"), i(1), s("far too long")]])
        .await;
    let behind = env.key("fragile", "20261124-100100000.parquet");
    env.put_parquet(&behind, CDC, &[vec![s("I"), i(2), s("ok")]])
        .await;
    env.eventually(
        "the poison file reaches the DLQ",
        Duration::from_secs(90),
        || async { env.depths().await.1 == 1 },
    )
    .await;
    let file = config_file(
        &env,
        "skip.toml",
        &format!("[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[tables.fragile]\nkey = \"id\"\n"),
    );
    let file = file.to_str().unwrap();
    let status = cli(env.dir.path(), &["status", "--config", file], &[]);
    assert!(
        status.stdout.contains(&format!("blocked by: {poison}")),
        "status names the blocking file: {}",
        status.stdout
    );
    worker.shutdown().await;

    let reason = "its value is too long for the target";
    let args = ["ledger", "skip", "fragile", poison_name, "--reason", reason];
    let skip = cli(
        env.dir.path(),
        &[&args[..], &["--config", file]].concat(),
        &[],
    );
    assert_eq!(skip.code, 0, "{}{}", skip.stdout, skip.stderr);
    let worker = env.start().await;
    env.eventually(
        "the file behind the skipped one is applied",
        Duration::from_secs(60),
        || async { worker.warehouse().row_count("fragile").await.unwrap_or(0) == 1 },
    )
    .await;
    env.settle(&worker, Duration::from_secs(30)).await;
    let alerts = env.alerts().await;
    worker.shutdown().await;

    assert_eq!(
        env.rows("fragile", &["id", "v"]),
        vec![vec![Some("2".to_string()), Some("ok".to_string())]],
        "the later file applied, the skipped one never"
    );
    let edited: Vec<&serde_json::Value> = alerts
        .iter()
        .map(|a| &a.body)
        .filter(|b| b["alert"] == "ledger_edited")
        .collect();
    assert_eq!(edited.len(), 1, "{edited:?}");
    let location = format!("s3://{}/{poison}", env.res.bucket);
    assert_eq!(edited[0]["file"], location.as_str());
    assert!(
        edited[0]["message"].as_str().unwrap().contains(reason),
        "{}",
        edited[0]
    );
    let show = cli(
        env.dir.path(),
        &["ledger", "show", "fragile", "--config", file],
        &[],
    );
    assert_eq!(show.code, 0, "{}", show.stderr);
    let line = show
        .stdout
        .lines()
        .find(|l| l.contains(&poison))
        .unwrap_or_default();
    assert!(line.contains("skipped"), "{}", show.stdout);
    assert_eq!(
        env.depths().await,
        (0, 1),
        "the later file acknowledged; the skipped file's message rests in the DLQ"
    );
}
