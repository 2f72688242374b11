//! The benchmark: generates DMS output, pushes it through LocalStack (S3 -> SQS) and a
//! `cdc-worker run` child process writing to DuckDB, and prints what it measured beside
//! its peers on the same files: the floor (DuckDB's plain CTAS from local disk) and dlt.
//! Every result is compared with the source row by row.
//!
//! Workloads (`--phases`):
//! - a CDC backlog (`batched`), with the same files one at a time (`per-file`, a
//!   one-file-per-invocation Lambda) and arriving at a steady rate (`steady`);
//! - a full load of large tables plus a little CDC (`full-load`);
//! - one 1 GiB LOAD file under `warehouse.duckdb.memory_limit` (`big-load`);
//! - the CDC backlog into history tables (`history = "scd2"`, `history`, on request).
//!
//! `floor` and `dlt` run the peers on the CDC backlog and, with `full-load`, on the full
//! load. The steady run also prints where its files' time went: the p50 and p99 of each
//! stage (`cdc_worker_stage_seconds`). Figures for BENCHMARKS.md come from a release build.

mod peers;
mod report;
mod stages;
mod sys;
mod verify;
mod worker_run;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

pub use peers::floor_child;
use peers::{Manifest, PeerRun};
use report::{Figures, Outcome};
use verify::Verifier;
use worker_run::Phase;
use workload::{ChangeSpec, Workload};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// LocalStack (or AWS) endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4566")]
    pub endpoint: String,
    /// Source tables of the CDC backlog.
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
    /// worker.concurrency of the batched, steady and load runs.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// worker.max_parallel_batches of those runs (0: the worker's default).
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
    /// Full load: tables, rows per table (one LOAD file each), then CDC files in all.
    #[arg(long, default_value_t = 2)]
    pub load_tables: usize,
    #[arg(long, default_value_t = 2_000_000)]
    pub load_rows: u64,
    #[arg(long, default_value_t = 20)]
    pub load_cdc_files: usize,
    /// Big load: the LOAD file's size, and the worker's warehouse.duckdb.memory_limit.
    #[arg(long, default_value_t = 1024)]
    pub big_load_mib: u64,
    #[arg(long, default_value = "512MiB")]
    pub big_load_memory_limit: String,
    /// Runs of each peer; the least of each figure is reported.
    #[arg(long, default_value_t = 3)]
    pub peer_runs: usize,
    /// Phases: batched, per-file, steady, floor, dlt, full-load, big-load, and history (the
    /// batched run into history tables; not in the default set).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "batched,per-file,steady,floor,dlt,full-load,big-load"
    )]
    pub phases: Vec<String>,
    /// The worker binary (default: `cdc-worker` beside this executable).
    #[arg(long)]
    pub worker: Option<PathBuf>,
    /// The dlt peer (default: scripts/bench-peers of this source tree).
    #[arg(long)]
    pub peers_script: Option<PathBuf>,
    /// Keep generated files, worker configs, logs and databases here (default: a
    /// temporary directory, removed at the end).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

impl BenchArgs {
    fn wants(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    fn change_spec(&self, tables: usize, files: usize) -> anyhow::Result<ChangeSpec> {
        let mix: Vec<u32> = self
            .mix
            .split('/')
            .map(|p| p.trim().parse())
            .collect::<Result<_, _>>()
            .context("--mix is I/U/D percentages, e.g. 60/30/10")?;
        anyhow::ensure!(
            mix.len() == 3 && mix.iter().sum::<u32>() == 100,
            "--mix must be three percentages adding up to 100"
        );
        Ok(ChangeSpec {
            tables,
            files,
            rows: self.rows,
            inserts: mix[0],
            updates: mix[1],
            widen: true,
        })
    }

    fn phase<'a>(&self, name: &'a str) -> Phase<'a> {
        Phase {
            name,
            concurrency: self.concurrency,
            parallel_batches: self.parallel_batches,
            max_files: 100,
            linger: "1s",
            rate: None,
            memory_limit: None,
            history: false,
        }
    }
}

/// Where the binaries and the dlt script are.
struct Tools {
    worker: PathBuf,
    peers_script: PathBuf,
}

impl Tools {
    fn find(args: &BenchArgs) -> anyhow::Result<Self> {
        let worker = match &args.worker {
            Some(p) => p.clone(),
            None => {
                let daemon = std::env::current_exe()?.with_file_name("cdc-worker");
                anyhow::ensure!(
                    daemon.exists(),
                    "{} not found: build it with `cargo build --bins` (or pass --worker)",
                    daemon.display()
                );
                daemon
            }
        };
        let peers_script = args
            .peers_script
            .clone()
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-peers"));
        Ok(Self {
            worker,
            peers_script,
        })
    }
}

fn generated(label: &str, w: &Workload, started: Instant) {
    println!(
        "generated  {label}: {} files, {} changes, {:.1} MiB in {:.1} s",
        w.files.len(),
        w.changes(),
        w.bytes() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
}

/// The peers on a workload's files, as the phases ask.
async fn peers(
    args: &BenchArgs,
    tools: &Tools,
    w: &Workload,
    verifier: &Verifier,
    dir: &Path,
    figures: &mut Figures,
    cdc: bool,
) -> anyhow::Result<()> {
    let manifest = dir.join("manifest.json");
    Manifest::new(&w.files).write(&manifest)?;
    if args.wants("floor") {
        let (runs, _) = peers::floor(&manifest, dir, args.peer_runs).await?;
        let run = PeerRun::least(&runs);
        report::peer(
            "floor",
            &run,
            w.changes(),
            "n/a (copies every change: no CDC semantics)",
        );
        figures.floor = Some(run);
    }
    if args.wants("dlt") {
        let (runs, out) =
            peers::dlt(&tools.peers_script, &manifest, dir, args.peer_runs, true).await?;
        let run = PeerRun::least(&runs);
        let verdict = match &run.error {
            Some(e) => format!("failed: {e}"),
            None => verifier.check(|t| {
                format!(
                    "read_parquet({})",
                    cdc_worker::warehouse::sql::literal(
                        &out.join("result")
                            .join(format!("{t}.parquet"))
                            .to_string_lossy()
                    )
                )
            }),
        };
        report::peer("dlt", &run, w.changes(), &verdict);
        figures.dlt = Some(Outcome { run, verdict });
        if cdc {
            let (runs, _) = peers::dlt(&tools.peers_script, &manifest, dir, 1, false).await?;
            let outcome = match &runs[0].error {
                Some(e) => format!("fails: {e}"),
                None => "loads".into(),
            };
            println!("dlt        without the int64 cast: {outcome}");
            figures.dlt_without_cast = Some(outcome);
        }
    }
    Ok(())
}

/// The CDC backlog and its references.
async fn cdc_backlog(args: &BenchArgs, tools: &Tools, work: &Path) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let dir = work.join("cdc");
    std::fs::create_dir_all(&dir)?;
    let w = workload::changes(&args.change_spec(args.tables, args.files)?, "t", 0, &dir, 7)?;
    generated("CDC backlog", &w, started);
    let verifier = Verifier::new(&w)?;
    let mut figures = Figures {
        changes: w.changes(),
        ..Figures::default()
    };
    if args.wants("batched") {
        let m = worker_run::run(
            &args.endpoint,
            &tools.worker,
            &args.phase("batched"),
            &w.files,
            work,
        )
        .await?;
        verifier.attach(&m.db, "batched")?;
        let verdict =
            verifier.check(|t| format!("batched.main.{}", cdc_worker::warehouse::sql::ident(t)));
        report::worker("batched", &m, &verdict);
        figures.worker = Some((m, verdict));
    }
    if args.wants("history") {
        let phase = Phase {
            history: true,
            ..args.phase("history")
        };
        let m = worker_run::run(&args.endpoint, &tools.worker, &phase, &w.files, work).await?;
        verifier.attach(&m.db, "history")?;
        // Its current versions must be the source's rows.
        let verdict = verifier.check(|t| {
            format!(
                "(SELECT * FROM history.main.{} WHERE __is_current)",
                cdc_worker::warehouse::sql::ident(t)
            )
        });
        report::worker("history", &m, &verdict);
    }
    if args.wants("per-file") {
        let subset = &w.files[..args.per_file_files.min(w.files.len())];
        let phase = Phase {
            concurrency: 1,
            parallel_batches: 1,
            max_files: 1,
            linger: "0s",
            ..args.phase("per-file")
        };
        let m = worker_run::run(&args.endpoint, &tools.worker, &phase, subset, work).await?;
        report::worker("per-file", &m, "-");
        figures.per_file = Some(m);
    }
    if args.wants("steady") {
        let n = ((args.steady_rate * args.steady_seconds as f64) as usize).clamp(1, w.files.len());
        let phase = Phase {
            rate: Some(args.steady_rate),
            ..args.phase("steady")
        };
        let m = worker_run::run(&args.endpoint, &tools.worker, &phase, &w.files[..n], work).await?;
        report::worker(&format!("steady {:.0}/s", args.steady_rate), &m, "-");
        report::stages(&m);
        figures.steady = Some(m);
    }
    peers(args, tools, &w, &verifier, &dir, &mut figures, true).await?;
    Ok(figures)
}

/// The full load (large LOAD files, then a little CDC) and its references.
async fn full_load(args: &BenchArgs, tools: &Tools, work: &Path) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let dir = work.join("full-load");
    std::fs::create_dir_all(&dir)?;
    let spec = ChangeSpec {
        widen: false,
        ..args.change_spec(args.load_tables, args.load_cdc_files)?
    };
    let w = workload::full_load(args.load_tables, args.load_rows, &spec, "f", &dir, 11)?;
    generated("full load", &w, started);
    let verifier = Verifier::new(&w)?;
    let mut figures = Figures {
        changes: w.changes(),
        ..Figures::default()
    };
    let m = worker_run::run(
        &args.endpoint,
        &tools.worker,
        &args.phase("full-load"),
        &w.files,
        work,
    )
    .await?;
    verifier.attach(&m.db, "full_load")?;
    let verdict =
        verifier.check(|t| format!("full_load.main.{}", cdc_worker::warehouse::sql::ident(t)));
    report::worker("full load", &m, &verdict);
    figures.worker = Some((m, verdict));
    peers(args, tools, &w, &verifier, &dir, &mut figures, false).await?;
    Ok(figures)
}

/// One LOAD file of about `--big-load-mib` under a memory limit.
async fn big_load(
    args: &BenchArgs,
    tools: &Tools,
    work: &Path,
) -> anyhow::Result<(worker_run::Measured, String)> {
    let started = Instant::now();
    let dir = work.join("big-load");
    std::fs::create_dir_all(&dir)?;
    let rows =
        (args.big_load_mib as f64 * (1 << 20) as f64 / workload::load_bytes_per_row(&dir)?) as u64;
    let spec = ChangeSpec {
        files: 0,
        ..args.change_spec(1, 0)?
    };
    let w = workload::full_load(1, rows, &spec, "g", &dir, 13)?;
    generated("big load", &w, started);
    let verifier = Verifier::new(&w)?;
    let phase = Phase {
        memory_limit: Some(&args.big_load_memory_limit),
        ..args.phase("big-load")
    };
    let m = worker_run::run(&args.endpoint, &tools.worker, &phase, &w.files, work).await?;
    verifier.attach(&m.db, "big_load")?;
    let verdict =
        verifier.check(|t| format!("big_load.main.{}", cdc_worker::warehouse::sql::ident(t)));
    report::worker("big load", &m, &verdict);
    Ok((m, verdict))
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
    let tools = Tools::find(&args)?;
    let temp = tempfile::Builder::new().prefix("cdc-bench").tempdir()?;
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    println!(
        "== cdc-worker bench: {} tables, {} CDC files x {} changes (I/U/D {}), worker.concurrency {}; load average {}",
        args.tables,
        args.files,
        args.rows,
        args.mix,
        args.concurrency,
        sys::load_average()
    );
    let cdc_phases = ["batched", "per-file", "steady", "floor", "dlt"];
    let cdc = if cdc_phases.iter().any(|p| args.wants(p)) {
        Some(cdc_backlog(&args, &tools, &work).await?)
    } else {
        None
    };
    let load = if args.wants("full-load") {
        Some(full_load(&args, &tools, &work).await?)
    } else {
        None
    };
    let big = if args.wants("big-load") {
        Some(big_load(&args, &tools, &work).await?)
    } else {
        None
    };
    report::targets(
        cdc.as_ref(),
        load.as_ref(),
        big.as_ref(),
        &args.big_load_memory_limit,
    );
    // The worker's tables must equal the source, whatever the figures: a failed check
    // fails the benchmark (and the CI smoke run).
    let verdicts = [cdc, load]
        .into_iter()
        .flatten()
        .filter_map(|f| f.worker.map(|(_, v)| v))
        .chain(big.map(|(_, v)| v));
    let wrong: Vec<String> = verdicts.filter(|v| v != "yes").collect();
    anyhow::ensure!(
        wrong.is_empty(),
        "the worker's tables differ from the source: {}",
        wrong.join("; ")
    );
    Ok(())
}
