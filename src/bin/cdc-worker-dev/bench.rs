//! The benchmark: generates DMS output at scale, pushes it through LocalStack and a worker
//! process, and prints files/s, rows/s, upload-to-commit latency, the worker's peak RSS and
//! warehouse statements per file, next to two references on the same files: per-file mode
//! (batch size 1, concurrency 1: what a one-file-per-invocation Lambda does) and the floor
//! (DuckDB loading the files with a plain `INSERT ... SELECT * FROM read_parquet(...)`).
//!
//! The worker runs as a separate `cdc-worker run` process so that its memory is its own;
//! commit times come from its JSON log lines ("batch applied" carries the file keys).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};

use cdc_worker::aws::AwsClients;
use cdc_worker::config::AwsConfig;
use cdc_worker::devkit::resources::{self, ResourceSpec};
use cdc_worker::storage::{ObjectStore, WriteCondition};
use cdc_worker::warehouse::sql::{ident, literal};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// LocalStack (or AWS) endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4566")]
    pub endpoint: String,
    /// Source tables.
    #[arg(long, default_value_t = 20)]
    pub tables: usize,
    /// CDC files in all (spread over the tables).
    #[arg(long, default_value_t = 2000)]
    pub files: usize,
    /// Changes per file.
    #[arg(long, default_value_t = 500)]
    pub rows: usize,
    /// Share of inserts/updates/deletes, in percent.
    #[arg(long, default_value = "60/30/10")]
    pub mix: String,
    /// worker.concurrency of the batched run.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// worker.max_parallel_batches of the batched and steady runs (0: the worker's default).
    #[arg(long, default_value_t = 0)]
    pub parallel_batches: usize,
    /// Files for the per-file reference (its rate is measured on the first ones).
    #[arg(long, default_value_t = 300)]
    pub per_file_files: usize,
    /// Steady phase: files per second, and for how long.
    #[arg(long, default_value_t = 20.0)]
    pub steady_rate: f64,
    #[arg(long, default_value_t = 30)]
    pub steady_seconds: u64,
    /// Phases to run: batched, per-file, floor, steady.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "batched,per-file,floor,steady"
    )]
    pub phases: Vec<String>,
    /// The worker binary (default: `cdc-worker` beside this executable).
    #[arg(long)]
    pub worker: Option<PathBuf>,
    /// Keep generated files, worker configs and logs here (default: a temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

struct GenFile {
    table: String,
    name: String,
    path: PathBuf,
    rows: usize,
    bytes: u64,
}

/// Writes the CDC files: file `i` belongs to table `i % tables`, named by its sequence
/// within the table so that names sort in DMS order.
fn generate(args: &BenchArgs, dir: &Path) -> anyhow::Result<Vec<GenFile>> {
    let mix: Vec<u32> = args
        .mix
        .split('/')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .context("--mix is I/U/D percentages, e.g. 60/30/10")?;
    anyhow::ensure!(
        mix.len() == 3 && mix.iter().sum::<u32>() == 100,
        "--mix must be three percentages adding up to 100"
    );
    let (inserts, updates) = (mix[0], mix[0] + mix[1]);
    let conn = duckdb::Connection::open_in_memory()?;
    let per_table = args.files.div_ceil(args.tables).max(1);
    // Updates and deletes land on keys earlier files inserted.
    let key_space = (per_table * args.rows / 2).max(args.rows) as u64;
    let mut files = Vec::with_capacity(args.files);
    for i in 0..args.files {
        let table = format!("t{:02}", i % args.tables);
        let seq = i / args.tables;
        let name = format!(
            "20261124-{:02}{:02}{:02}{:03}.parquet",
            10 + seq / 3600,
            (seq / 60) % 60,
            seq % 60,
            i % 1000
        );
        let path = dir.join(format!("{table}-{seq:06}.parquet"));
        conn.execute_batch(&format!(
            "COPY (SELECT CASE WHEN h < {inserts} THEN 'I' WHEN h < {updates} THEN 'U' ELSE 'D' END AS \"Op\",
                          CAST(({seq} * {rows} + n) % {key_space} AS BIGINT) AS id,
                          'customer-' || (n % 977) AS name,
                          CAST((n % 100000) / 100.0 AS DECIMAL(12,2)) AS amount,
                          CAST(n % 50 AS INTEGER) AS qty,
                          TIMESTAMP '2026-11-24 10:00:00' + to_seconds(n + {seq}) AS updated_at
                   FROM (SELECT range AS n, hash(range * 7919 + {i}) % 100 AS h FROM range({rows})))
             TO {} (FORMAT PARQUET)",
            literal(&path.to_string_lossy()),
            rows = args.rows,
        ))?;
        let bytes = std::fs::metadata(&path)?.len();
        files.push(GenFile {
            table,
            name,
            path,
            rows: args.rows,
            bytes,
        });
    }
    Ok(files)
}

/// What one worker run measured.
#[derive(Default, Debug)]
struct Measured {
    files: usize,
    rows: u64,
    elapsed: Duration,
    statements: u64,
    latencies: Vec<Duration>,
    peak_rss_kib: u64,
    /// CPU time (user + system) the worker process used.
    cpu: Duration,
    /// CPU time LocalStack used meanwhile (when its pid file is found).
    localstack_cpu: Option<Duration>,
}

impl Measured {
    fn files_per_s(&self) -> f64 {
        self.files as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() as f64 - 1.0) * p).round() as usize]
    }
}

/// What the worker's JSON log says, as far as the benchmark cares.
enum LogEvent {
    Started(SystemTime),
    Commit {
        keys: Vec<String>,
        at: SystemTime,
        statements: u64,
        rows: u64,
    },
}

fn parse_log_line(line: &str) -> Option<LogEvent> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let at = SystemTime::from(chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str()?).ok()?);
    match v["message"].as_str()? {
        "cdc-worker started" => Some(LogEvent::Started(at)),
        "batch applied" => Some(LogEvent::Commit {
            // A JSON array (older workers wrote the list as a string).
            keys: match &v["file_keys"] {
                serde_json::Value::Array(keys) => keys
                    .iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect(),
                serde_json::Value::String(text) => serde_json::from_str(text).ok()?,
                _ => return None,
            },
            at,
            statements: v["statements"].as_u64().unwrap_or(0),
            rows: v["rows_staged"].as_u64().unwrap_or(0),
        }),
        _ => None,
    }
}

/// User plus system CPU time of a process so far (from /proc; Linux clock ticks are 1/100 s).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The pid of the LocalStack that deploy/localstack/start.sh started, if it runs.
fn localstack_pid() -> Option<u32> {
    let cache = std::env::var("CDC_WORKER_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache/cdc-worker")))
        .ok()?;
    let pid: u32 = std::fs::read_to_string(cache.join("localstack.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

struct Phase<'a> {
    name: &'a str,
    concurrency: usize,
    parallel_batches: usize,
    max_files: usize,
    linger: &'a str,
    /// None: upload everything first, then measure the drain; Some(rate): upload at this
    /// rate while the worker runs and measure upload-to-commit latency.
    rate: Option<f64>,
}

async fn run_phase(
    args: &BenchArgs,
    phase: &Phase<'_>,
    files: &[GenFile],
    work: &Path,
) -> anyhow::Result<Measured> {
    let aws_config = AwsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(args.endpoint.clone()),
        force_path_style: true,
        access_key_id: Some("test".into()),
        secret_access_key: Some(cdc_worker::config::Secret::new("test")),
        session_token: None,
    };
    let aws = AwsClients::new(&aws_config).await;
    let store = ObjectStore::new(aws.s3.clone());
    let name = format!(
        "bench-{}-{}-{}",
        phase.name,
        std::process::id(),
        fastrand::u32(..)
    );
    let resources = resources::ensure_resources(
        &aws,
        &ResourceSpec {
            bucket: name.clone(),
            prefix: "dms".into(),
            queue: name.clone(),
            topic: name.clone(),
            max_receive_count: 10,
            visibility_timeout_s: 60,
        },
    )
    .await?;
    let keys: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|f| (f.table.clone(), serde_json::Value::from("id")))
        .collect();
    store
        .put(
            &name,
            &cdc_worker::config::MetadataConfig::default().table_keys_key(),
            Bytes::from(serde_json::to_vec(&keys)?),
            "application/json",
            WriteCondition::Unconditional,
        )
        .await?;
    let dir = work.join(&name);
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("worker.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
force_path_style = true
[queue]
url = "{queue}"
wait_time = "1s"
[source]
bucket = "{name}"
prefix = "dms"
[worker]
concurrency = {concurrency}
max_parallel_batches = {parallel_batches}
[batch]
max_files = {max_files}
linger = "{linger}"
[warehouse.duckdb]
path = "{db}"
[telemetry]
log_format = "json"
log_level = "info,aws=warn"
"#,
            endpoint = args.endpoint,
            queue = resources.queue_url,
            concurrency = phase.concurrency,
            parallel_batches = phase.parallel_batches,
            max_files = phase.max_files,
            linger = phase.linger,
            db = dir.join("warehouse.duckdb").display(),
        ),
    )?;

    let upload = |f: &GenFile| {
        let store = store.clone();
        let bucket = name.clone();
        let key = format!("dms/public/{}/{}", f.table, f.name);
        let path = f.path.clone();
        async move {
            let body = tokio::fs::read(&path).await?;
            store
                .put(
                    &bucket,
                    &key,
                    Bytes::from(body),
                    "application/octet-stream",
                    WriteCondition::Unconditional,
                )
                .await?;
            anyhow::Ok((key, SystemTime::now()))
        }
    };
    let mut uploaded: HashMap<String, SystemTime> = HashMap::new();
    if phase.rate.is_none() {
        // A backlog: each table's files in order, tables in parallel.
        let mut by_table: std::collections::BTreeMap<&str, Vec<&GenFile>> = Default::default();
        for f in files {
            by_table.entry(&f.table).or_default().push(f);
        }
        let results = futures::future::join_all(by_table.values().map(|fs| async move {
            let mut done = Vec::new();
            for f in fs {
                done.push(upload(f).await?);
            }
            anyhow::Ok(done)
        }))
        .await;
        for r in results {
            uploaded.extend(r?);
        }
        // S3 notifies asynchronously: measure the drain only once the whole backlog is in
        // the queue, or the worker would be timed against notification delivery.
        let deadline = Instant::now() + Duration::from_secs(120);
        while cdc_worker::devkit::queue_depth(&aws, &resources.queue_url).await?
            < files.len() as u64
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "S3 notifications did not all reach the queue within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let binary = match &args.worker {
        Some(p) => p.clone(),
        None => daemon_binary()?,
    };
    let mut child = tokio::process::Command::new(&binary)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id().context("worker pid")?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let (tx, mut commits) = tokio::sync::mpsc::unbounded_channel();
    let log_path = dir.join("worker.log");
    tokio::spawn(async move {
        let mut log = tokio::fs::File::create(&log_path).await.ok();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(event) = parse_log_line(&line) {
                let _ = tx.send(event);
            }
            if let Some(f) = log.as_mut() {
                use tokio::io::AsyncWriteExt;
                let _ = f.write_all(line.as_bytes()).await;
                let _ = f.write_all(b"\n").await;
            }
        }
    });
    let started = Instant::now();
    let mut start_wall = SystemTime::now();
    let localstack = localstack_pid().map(|p| (p, cpu_time(p)));

    if let Some(rate) = phase.rate {
        let gap = Duration::from_secs_f64(1.0 / rate);
        let total = files.len();
        let store_uploads = async {
            let mut done = HashMap::new();
            for (n, f) in files.iter().enumerate() {
                tokio::time::sleep_until((started + gap * n as u32).into()).await;
                let (k, t) = upload(f).await?;
                done.insert(k, t);
            }
            anyhow::Ok(done)
        };
        uploaded = store_uploads.await?;
        anyhow::ensure!(uploaded.len() == total, "uploads incomplete");
    }

    let mut m = Measured::default();
    let mut last_commit = start_wall;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut pending: std::collections::HashSet<String> = uploaded.keys().cloned().collect();
    while !pending.is_empty() {
        let event = tokio::time::timeout_at(deadline.into(), commits.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} files not applied after 10 minutes; see {}",
                    pending.len(),
                    dir.join("worker.log").display()
                )
            })?
            .context("the worker exited")?;
        let (keys, at) = match event {
            // A backlog is measured from the moment the worker is up.
            LogEvent::Started(at) if phase.rate.is_none() => {
                start_wall = at;
                continue;
            }
            LogEvent::Started(_) => continue,
            LogEvent::Commit {
                keys,
                at,
                statements,
                rows,
            } => {
                m.statements += statements;
                m.rows += rows;
                (keys, at)
            }
        };
        for k in keys {
            if pending.remove(&k) {
                m.files += 1;
                // Latency means upload-to-commit only when uploads run alongside.
                if let (Some(up), Some(_)) = (uploaded.get(&k), phase.rate) {
                    m.latencies.push(at.duration_since(*up).unwrap_or_default());
                }
            }
        }
        last_commit = last_commit.max(at);
    }
    m.elapsed = last_commit.duration_since(start_wall).unwrap_or_default();
    m.peak_rss_kib = peak_rss_kib(pid);
    m.cpu = cpu_time(pid);
    m.localstack_cpu = localstack.map(|(p, before)| cpu_time(p).saturating_sub(before));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    Ok(m)
}

/// The floor: DuckDB loading the same files with a plain INSERT per table.
fn floor(files: &[GenFile], work: &Path) -> anyhow::Result<(Duration, u64)> {
    let db = work.join("floor.duckdb");
    let conn = duckdb::Connection::open(&db)?;
    let mut by_table: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for f in files {
        by_table
            .entry(&f.table)
            .or_default()
            .push(literal(&f.path.to_string_lossy()));
    }
    let started = Instant::now();
    let mut rows = 0u64;
    for (table, paths) in &by_table {
        conn.execute_batch(&format!(
            "CREATE TABLE {t} AS SELECT * FROM read_parquet({first}) LIMIT 0",
            t = ident(table),
            first = paths[0]
        ))?;
        rows += conn.execute(
            &format!(
                "INSERT INTO {} SELECT * FROM read_parquet([{}])",
                ident(table),
                paths.join(", ")
            ),
            [],
        )? as u64;
    }
    Ok((started.elapsed(), rows))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn report(label: &str, m: &Measured) {
    let latency = if m.latencies.is_empty() {
        "latency -".to_string()
    } else {
        format!(
            "latency p50 {:.2} s p99 {:.2} s",
            m.percentile(0.50).as_secs_f64(),
            m.percentile(0.99).as_secs_f64()
        )
    };
    println!(
        "{label:<10} {:>6} files in {:>7.2} s = {:>8.1} files/s, {:>10.0} rows/s; statements/file {:.2}; {latency}; worker CPU {:.1} ms/file; worker peak RSS {:.0} MiB",
        m.files,
        m.elapsed.as_secs_f64(),
        m.files_per_s(),
        m.rows_per_s(),
        m.statements as f64 / m.files.max(1) as f64,
        m.cpu.as_secs_f64() * 1000.0 / m.files.max(1) as f64,
        mib(m.peak_rss_kib),
    );
    if let Some(cpu) = m.localstack_cpu {
        println!(
            "{:<10} LocalStack CPU {:.1} ms/file ({:.0}% of one core over the run)",
            "",
            cpu.as_secs_f64() * 1000.0 / m.files.max(1) as f64,
            100.0 * cpu.as_secs_f64() / m.elapsed.as_secs_f64().max(1e-9)
        );
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    cdc_worker::telemetry::init_logging(&cdc_worker::config::TelemetryConfig {
        log_level: "warn".into(),
        ..Default::default()
    });
    if cfg!(debug_assertions) {
        println!(
            "note: a debug build; figures for BENCHMARKS.md come from `cargo build --release`"
        );
    }
    let temp = tempfile::Builder::new().prefix("cdc-bench").tempdir()?;
    let work_path = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let work = work_path.as_path();
    println!(
        "== cdc-worker bench: {} tables, {} CDC files x {} changes (I/U/D {}), worker.concurrency {}",
        args.tables, args.files, args.rows, args.mix, args.concurrency
    );
    let started = Instant::now();
    let files = generate(&args, work)?;
    let total_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let total_rows: usize = files.iter().map(|f| f.rows).sum();
    println!(
        "generated  {} files, {} rows, {:.1} MiB in {:.1} s",
        files.len(),
        total_rows,
        total_bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let wants = |p: &str| args.phases.iter().any(|x| x == p);
    let mut batched = None;
    let mut per_file = None;
    let mut floor_rate = None;
    if wants("batched") {
        let m = run_phase(
            &args,
            &Phase {
                name: "batched",
                concurrency: args.concurrency,
                parallel_batches: args.parallel_batches,
                max_files: 100,
                linger: "1s",
                rate: None,
            },
            &files,
            work,
        )
        .await?;
        report("batched", &m);
        batched = Some(m);
    }
    if wants("per-file") {
        let subset = &files[..args.per_file_files.min(files.len())];
        let m = run_phase(
            &args,
            &Phase {
                name: "per-file",
                concurrency: 1,
                parallel_batches: 1,
                max_files: 1,
                linger: "0s",
                rate: None,
            },
            subset,
            work,
        )
        .await?;
        report("per-file", &m);
        per_file = Some(m);
    }
    if wants("floor") {
        let (elapsed, rows) = floor(&files, work)?;
        let rate = rows as f64 / elapsed.as_secs_f64().max(1e-9);
        println!(
            "floor      {rows:>6} rows in {:>7.2} s = {rate:>10.0} rows/s (plain INSERT ... SELECT * FROM read_parquet, local files)",
            elapsed.as_secs_f64()
        );
        floor_rate = Some(rate);
    }
    if wants("steady") {
        let n = ((args.steady_rate * args.steady_seconds as f64) as usize)
            .min(files.len())
            .max(1);
        let m = run_phase(
            &args,
            &Phase {
                name: "steady",
                concurrency: args.concurrency,
                parallel_batches: args.parallel_batches,
                max_files: 100,
                linger: "1s",
                rate: Some(args.steady_rate),
            },
            &files[..n],
            work,
        )
        .await?;
        report(&format!("steady {:.0}/s", args.steady_rate), &m);
    }
    if let (Some(b), Some(p)) = (&batched, &per_file) {
        println!(
            "ratio      batched / per-file files/s = {:.1}x (target >= 10x); worker CPU per file per-file / batched = {:.1}x",
            b.files_per_s() / p.files_per_s().max(1e-9),
            (p.cpu.as_secs_f64() / p.files.max(1) as f64)
                / (b.cpu.as_secs_f64() / b.files.max(1) as f64).max(1e-9)
        );
    }
    if let (Some(b), Some(f)) = (&batched, floor_rate) {
        println!(
            "ratio      batched merged rows/s / floor rows/s = {:.0}% (target >= 40%)",
            100.0 * b.rows_per_s() / f
        );
    }
    Ok(())
}

/// The daemon built beside this development binary (cargo puts both in one directory).
fn daemon_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let daemon = me.with_file_name("cdc-worker");
    anyhow::ensure!(
        daemon.exists(),
        "{} not found: build it with `cargo build --bins` (or pass --worker)",
        daemon.display()
    );
    Ok(daemon)
}
