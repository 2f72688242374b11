//! Freshness and the stage histograms as an operator sees them: a `cdc-worker run` child
//! process (its `/metrics` are its own, not shared with the tests running beside this
//! one), files whose DMS time is two hours old, then a current one.

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use cdc_worker::devkit::resources::ReceivedAlert;

use crate::first_hour::{cli, config_file, free_port};
use crate::harness::{Env, i, s};

const CDC: &[(&str, &str)] = &[("Op", "VARCHAR"), ("id", "BIGINT"), ("v", "VARCHAR")];

/// `20261124-101500123.parquet` for the UTC time `at`.
fn dms_name(at: SystemTime) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from(at);
    format!("{}.parquet", t.format("%Y%m%d-%H%M%S%3f"))
}

/// The worker as its own process, on `port`.
struct Child {
    process: tokio::process::Child,
    base: String,
}

impl Child {
    async fn start(config: &std::path::Path, port: u16) -> Child {
        let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdc-worker"))
            .args(["run", "--config"])
            .arg(config)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("cdc-worker run");
        let child = Child {
            process,
            base: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..240 {
            if child.get("/healthz").await.is_some() {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("the worker's /healthz did not answer within 60 s");
    }

    async fn get(&self, path: &str) -> Option<String> {
        let r = reqwest::get(format!("{}{path}", self.base)).await.ok()?;
        r.status().is_success().then_some(r.text().await.ok()?)
    }

    /// The value of one series of its `/metrics`.
    async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.get("/metrics").await?;
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    async fn until_metric(&self, series: &str, value: f64) {
        for _ in 0..240 {
            if self.metric(series).await == Some(value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{series} is {:?}, not {value}, after 60 s",
            self.metric(series).await
        );
    }

    async fn stop(mut self) {
        let pid = self.process.id().expect("running").to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.process.wait()).await;
    }
}

/// Alerts of `kind` for `orders` among everything received so far (the inbox is drained
/// by each read, so the reads accumulate).
async fn alerts_of(env: &Env, seen: &mut Vec<ReceivedAlert>, kind: &str) -> usize {
    seen.extend(env.alerts().await);
    seen.iter()
        .filter(|a| a.body["alert"] == kind && a.body["table"] == "orders")
        .count()
}

/// Waits (20 s at most) until one alert of `kind` arrived.
async fn until_alerts(env: &Env, seen: &mut Vec<ReceivedAlert>, kind: &str) {
    for _ in 0..20 {
        if alerts_of(env, seen, kind).await >= 1 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("no {kind} alert within 20 s; received: {seen:#?}");
}

// Long on purpose: one worker's story (old changes, the breach, a tick, recovery, the
// stages) read top to bottom; its steps share the worker and the alerts seen so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_changes_miss_the_objective_once_and_a_current_one_recovers_once() {
    let env = Env::new("freshness", |_| {}).await;
    let port = free_port();
    let config = config_file(
        &env,
        "worker.toml",
        &format!(
            "[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[tables.orders]\nkey = \"id\"\nfreshness_objective = \"30m\"\n[batch]\nlinger = \"500ms\"\n"
        ),
    );
    let worker = Child::start(&config, port).await;
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    for (n, at) in [two_hours_ago - Duration::from_secs(60), two_hours_ago]
        .into_iter()
        .enumerate()
    {
        let row = vec![s("I"), i(n as i64 + 1), s("old")];
        env.put_parquet(&env.key("orders", &dms_name(at)), CDC, &[row])
            .await;
    }
    worker
        .until_metric("cdc_worker_files_applied_total{table=\"orders\"}", 2.0)
        .await;

    // /metrics: about two hours behind (the newest change is the second file's).
    let freshness = worker
        .metric("cdc_worker_table_freshness_seconds{table=\"orders\"}")
        .await
        .expect("a freshness series for orders");
    assert!((7200.0..7260.0).contains(&freshness), "{freshness}");
    // /status and `cdc-worker status` say the same.
    let status: serde_json::Value =
        serde_json::from_str(&worker.get("/status").await.expect("/status")).unwrap();
    let orders = status
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "orders")
        .unwrap_or_else(|| panic!("{status}"));
    let seconds = orders["freshness_s"].as_f64().expect("freshness_s");
    assert!((7200.0..7260.0).contains(&seconds), "{orders}");
    assert_eq!(orders["freshness_objective_s"], 1800.0, "{orders}");
    let shown = cli(
        env.dir.path(),
        &["status", "--config", config.to_str().unwrap()],
        &[],
    );
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let row = shown
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("orders "))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(row.contains(" 2h 0m "), "{}", shown.stdout);
    assert!(
        row.contains("freshness objective 30m missed: the newest applied change is from "),
        "{}",
        shown.stdout
    );

    // The objective alert comes once, however many checks (every 15 s) see the breach.
    let mut seen = Vec::new();
    until_alerts(&env, &mut seen, "freshness_objective_missed").await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(
        alerts_of(&env, &mut seen, "freshness_objective_missed").await,
        1
    );
    let missed = seen
        .iter()
        .find(|a| a.body["alert"] == "freshness_objective_missed")
        .unwrap();
    assert_eq!(
        missed.subject,
        "[cdc-worker] orders: freshness objective missed"
    );
    assert_eq!(missed.body["severity"], "warning");
    let message = missed.body["message"].as_str().unwrap();
    assert!(
        message
            .starts_with("orders is 2h 0m behind its source: its newest applied change is from ")
            && message.ends_with(" (objective 30m)"),
        "{message}"
    );

    // A current change: back within the objective, reported once.
    let row = vec![s("U"), i(1), s("new")];
    env.put_parquet(
        &env.key("orders", &dms_name(SystemTime::now())),
        CDC,
        &[row],
    )
    .await;
    worker
        .until_metric("cdc_worker_files_applied_total{table=\"orders\"}", 3.0)
        .await;
    let freshness = worker
        .metric("cdc_worker_table_freshness_seconds{table=\"orders\"}")
        .await
        .unwrap();
    assert!(freshness < 60.0, "{freshness}");
    until_alerts(&env, &mut seen, "freshness_recovered").await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(alerts_of(&env, &mut seen, "freshness_recovered").await, 1);
    assert_eq!(
        alerts_of(&env, &mut seen, "freshness_objective_missed").await,
        1
    );

    // Where the time went: every stage has one observation per file (one file per
    // message, so the deletions count the same).
    for stage in [
        "s3_to_sqs",
        "sqs_to_receive",
        "receive_to_batch",
        "batch_to_commit",
        "commit_to_delete",
    ] {
        let series = format!("cdc_worker_stage_seconds_count{{stage=\"{stage}\"}}");
        worker.until_metric(&series, 3.0).await;
        let le = format!("cdc_worker_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}}");
        assert_eq!(worker.metric(&le).await, Some(3.0), "{le}");
        // Seconds, plausible ones: three files of a test take well under a minute each
        // way (milliseconds read as seconds, or a copy's clock, would not).
        let sum = format!("cdc_worker_stage_seconds_sum{{stage=\"{stage}\"}}");
        let total = worker.metric(&sum).await.unwrap_or(-1.0);
        assert!((0.0..60.0).contains(&total), "{sum} = {total}");
    }
    let batch = worker
        .metric("cdc_worker_stage_seconds_sum{stage=\"batch_to_commit\"}")
        .await
        .unwrap_or(0.0);
    assert!(batch > 0.0, "a commit takes some time: {batch}");
    let text = worker.get("/metrics").await.unwrap();
    assert!(
        text.contains("# HELP cdc_worker_stage_seconds ")
            && text.contains("# HELP cdc_worker_table_freshness_seconds "),
        "{text}"
    );
    worker.stop().await;
}
