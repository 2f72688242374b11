//! One run of the worker: LocalStack resources, the files uploaded (all first, or at a
//! rate while it runs), a `cdc-worker run` child process writing to its own DuckDB file,
//! and what it did. Progress and totals come from the worker's `/metrics`; when each file
//! was committed comes from the warehouse's ledger (`_cdc_worker_ledger.applied_at`),
//! read once the worker has stopped. Nothing is read from its log, which is kept only for
//! a person to read when a run fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;

use cdc_worker::aws::AwsClients;
use cdc_worker::config::AwsConfig;
use cdc_worker::devkit::resources::{self, ResourceSpec};
use cdc_worker::storage::{ObjectStore, WriteCondition};

use super::stages::{self, StageHistogram};
use super::sys;
use super::workload::GenFile;

/// How the worker is configured for a run, and how files arrive.
pub struct Phase<'a> {
    pub name: &'a str,
    pub concurrency: usize,
    pub parallel_batches: usize,
    pub max_files: usize,
    pub linger: &'a str,
    /// None: upload everything first, then measure the drain; Some(rate): upload at this
    /// rate while the worker runs and measure upload-to-commit latency.
    pub rate: Option<f64>,
    /// `warehouse.duckdb.memory_limit`, when set.
    pub memory_limit: Option<&'a str>,
    /// `history.default = "scd2"`: every table keeps its versions.
    pub history: bool,
}

/// What one worker run measured.
#[derive(Debug, Default)]
pub struct Measured {
    pub files: usize,
    pub changes: u64,
    /// Bytes of Parquet uploaded.
    pub bytes: u64,
    /// From the worker's /metrics.
    pub rows_applied: u64,
    pub statements: u64,
    /// From the worker being ready to the last commit in the ledger.
    pub elapsed: Duration,
    /// Upload to commit, per file (runs with a rate only).
    pub latencies: Vec<Duration>,
    pub peak_rss_kib: u64,
    /// Worker CPU (user + system) from ready to the last commit.
    pub cpu: Duration,
    pub localstack_cpu: Option<Duration>,
    /// The worker's database, for checking its tables.
    pub db: PathBuf,
    /// The worker's stage histograms once every message was deleted.
    pub stages: Vec<StageHistogram>,
}

impl Measured {
    pub fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() as f64 - 1.0) * p).round() as usize]
    }
}

fn epoch_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as i64
}

/// LocalStack resources of a run, with a table key file naming `id` the key of every table.
async fn setup(
    endpoint: &str,
    name: &str,
    files: &[GenFile],
) -> anyhow::Result<(AwsClients, ObjectStore, String)> {
    let aws_config = AwsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.to_string()),
        force_path_style: true,
        access_key_id: Some("test".into()),
        secret_access_key: Some(cdc_worker::config::Secret::new("test")),
        session_token: None,
    };
    let aws = AwsClients::new(&aws_config).await;
    let store = ObjectStore::new(aws.s3.clone());
    let spec = ResourceSpec {
        bucket: name.to_string(),
        prefix: "dms".into(),
        queue: name.to_string(),
        topic: name.to_string(),
        max_receive_count: 10,
        visibility_timeout_s: 60,
    };
    let resources = resources::ensure_resources(&aws, &spec).await?;
    let keys: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|f| (f.table.clone(), serde_json::Value::from("id")))
        .collect();
    store
        .put(
            name,
            &cdc_worker::config::MetadataConfig::default().table_keys_key(),
            Bytes::from(serde_json::to_vec(&keys)?),
            "application/json",
            WriteCondition::Unconditional,
        )
        .await?;
    Ok((aws, store, resources.queue_url))
}

fn config_text(
    endpoint: &str,
    queue: &str,
    bucket: &str,
    phase: &Phase,
    port: u16,
    db: &Path,
) -> String {
    let memory_limit = phase
        .memory_limit
        .map(|l| format!("memory_limit = \"{l}\"\n"))
        .unwrap_or_default();
    let history = if phase.history {
        "[history]\ndefault = \"scd2\"\n"
    } else {
        ""
    };
    format!(
        r#"[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
force_path_style = true
[queue]
url = "{queue}"
wait_time = "1s"
[source]
bucket = "{bucket}"
prefix = "dms"
[worker]
concurrency = {concurrency}
max_parallel_batches = {parallel_batches}
[batch]
max_files = {max_files}
linger = "{linger}"
[warehouse.duckdb]
path = "{db}"
{memory_limit}{history}[telemetry]
log_format = "json"
log_level = "info,aws=warn"
listen = "127.0.0.1:{port}"
"#,
        concurrency = phase.concurrency,
        parallel_batches = phase.parallel_batches,
        max_files = phase.max_files,
        linger = phase.linger,
        db = db.display(),
    )
}

fn object_key(f: &GenFile) -> String {
    format!("dms/public/{}/{}", f.table, f.name)
}

async fn upload(
    store: &ObjectStore,
    bucket: &str,
    f: &GenFile,
) -> anyhow::Result<(String, SystemTime)> {
    let body = tokio::fs::read(&f.path).await?;
    let key = object_key(f);
    store
        .put(
            bucket,
            &key,
            Bytes::from(body),
            "application/octet-stream",
            WriteCondition::Unconditional,
        )
        .await?;
    Ok((key, SystemTime::now()))
}

/// A backlog: each table's files in order, tables in parallel; returns once S3 has
/// notified every file (the drain is not timed against notification delivery).
async fn upload_backlog(
    aws: &AwsClients,
    store: &ObjectStore,
    bucket: &str,
    queue: &str,
    files: &[GenFile],
) -> anyhow::Result<()> {
    let mut by_table: std::collections::BTreeMap<&str, Vec<&GenFile>> = Default::default();
    for f in files {
        by_table.entry(&f.table).or_default().push(f);
    }
    let results = futures::future::join_all(by_table.values().map(|fs| async move {
        for f in fs {
            upload(store, bucket, f).await?;
        }
        anyhow::Ok(())
    }))
    .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while cdc_worker::devkit::queue_depth(aws, queue).await? < files.len() as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "S3 notifications did not all reach the queue within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The sum of a Prometheus counter over its labels, in the text exposition format.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A running worker process and its endpoint.
struct Child {
    process: tokio::process::Child,
    pid: u32,
    http: reqwest::Client,
    base: String,
    log: PathBuf,
}

impl Child {
    async fn spawn(binary: &Path, config: &Path, port: u16, log: PathBuf) -> anyhow::Result<Self> {
        let process = tokio::process::Command::new(binary)
            .args(["run", "--config"])
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = process.id().context("worker pid")?;
        Ok(Self {
            process,
            pid,
            http: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    fn exited(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.process.try_wait()? {
            anyhow::bail!("the worker exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }

    /// Waits until /healthz answers: the receivers run from then on.
    async fn ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.exited()?;
            let url = format!("{}/healthz", self.base);
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the worker's /healthz did not answer within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Polls /metrics until `files` files are applied; returns the last scrape.
    async fn until_applied(&mut self, files: usize, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.exited()?;
            let text = self.metrics().await?;
            let applied = metric_sum(&text, "cdc_worker_files_applied_total");
            if applied >= files as u64 {
                return Ok(text);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} of {files} files applied after {} s; see {}",
                applied,
                timeout.as_secs(),
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Scrapes /metrics once every message is deleted (the last stage is the deletion),
    /// or after 10 s.
    async fn after_deletes(&self, messages: usize) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics().await?;
            let deleted = metric_sum(&text, "cdc_worker_messages_deleted_total");
            if deleted >= messages as u64 || Instant::now() > deadline {
                return Ok(text);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.process.wait()).await;
    }
}

/// Commit time (epoch µs) of every applied file, from the stopped worker's ledger.
fn ledger_times(db: &Path) -> anyhow::Result<HashMap<String, i64>> {
    let conn = cdc_worker::warehouse::duckdb::open_read_only(db)?;
    let mut stmt = conn.prepare(
        "SELECT s3_key, epoch_us(applied_at) FROM _cdc_worker_ledger WHERE status = 'applied'",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the worker over `files` as `phase` says and measures it.
pub async fn run(
    endpoint: &str,
    binary: &Path,
    phase: &Phase<'_>,
    files: &[GenFile],
    work: &Path,
) -> anyhow::Result<Measured> {
    let name = format!(
        "bench-{}-{}-{}",
        phase.name,
        std::process::id(),
        fastrand::u32(..)
    );
    let (aws, store, queue) = setup(endpoint, &name, files).await?;
    let dir = work.join(&name);
    std::fs::create_dir_all(&dir)?;
    let (port, db) = (free_port()?, dir.join("warehouse.duckdb"));
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        config_text(endpoint, &queue, &name, phase, port, &db),
    )?;
    if phase.rate.is_none() {
        upload_backlog(&aws, &store, &name, &queue, files).await?;
    }
    let mut child = Child::spawn(binary, &config, port, dir.join("worker.log")).await?;
    child.ready().await?;
    let ready_at = SystemTime::now();
    let cpu_ready = sys::cpu_time(child.pid);
    let localstack = sys::localstack_pid().map(|p| (p, sys::cpu_time(p)));
    let mut uploaded = HashMap::new();
    if let Some(rate) = phase.rate {
        let started = Instant::now();
        let gap = Duration::from_secs_f64(1.0 / rate);
        for (n, f) in files.iter().enumerate() {
            tokio::time::sleep_until((started + gap * n as u32).into()).await;
            let (key, at) = upload(&store, &name, f).await?;
            uploaded.insert(key, at);
        }
    }
    let scrape = child
        .until_applied(files.len(), Duration::from_secs(900))
        .await?;
    let mut m = Measured {
        files: files.len(),
        changes: files.iter().map(|f| f.rows).sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        rows_applied: metric_sum(&scrape, "cdc_worker_rows_applied_total"),
        statements: metric_sum(&scrape, "cdc_worker_warehouse_statements_total"),
        peak_rss_kib: sys::peak_rss_kib(child.pid),
        cpu: sys::cpu_time(child.pid).saturating_sub(cpu_ready),
        localstack_cpu: localstack.map(|(p, before)| sys::cpu_time(p).saturating_sub(before)),
        db: db.clone(),
        stages: stages::parse(&child.after_deletes(files.len()).await?),
        ..Measured::default()
    };
    child.stop().await;
    let committed = ledger_times(&db).context("reading the worker's ledger")?;
    let missing = files
        .iter()
        .filter(|f| !committed.contains_key(&object_key(f)))
        .count();
    anyhow::ensure!(
        missing == 0 && committed.len() == files.len(),
        "the ledger holds {} files, {missing} of the {} uploaded missing",
        committed.len(),
        files.len()
    );
    let last = committed.values().copied().max().unwrap_or_default();
    m.elapsed = Duration::from_micros((last - epoch_us(ready_at)).max(0) as u64);
    for (key, at) in &uploaded {
        let latency = committed[key] - epoch_us(*at);
        m.latencies
            .push(Duration::from_micros(latency.max(0) as u64));
    }
    Ok(m)
}
