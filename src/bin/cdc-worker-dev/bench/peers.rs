//! The peers the worker is measured against, on the same files from local disk: the floor
//! (DuckDB's plain `CREATE TABLE AS SELECT * FROM read_parquet(every file)`: no S3, no
//! queue, no CDC semantics, the fastest these rows can enter DuckDB) and dlt
//! (`scripts/bench-peers`). Each runs as its own process, so that its CPU and peak RSS are
//! its own; each reports its figures as one JSON line when it is done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use cdc_worker::warehouse::sql::{ident, literal};

use super::sys;
use super::workload::GenFile;

/// Each table's files in DMS order: what a peer loads.
#[derive(Serialize, Deserialize)]
pub struct Manifest {
    pub tables: BTreeMap<String, Vec<PathBuf>>,
}

impl Manifest {
    pub fn new(files: &[GenFile]) -> Self {
        let mut tables: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for f in files {
            tables
                .entry(f.table.clone())
                .or_default()
                .push(f.path.clone());
        }
        Self { tables }
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec(self)?)?;
        Ok(())
    }
}

/// What a peer process reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRun {
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
    pub error: Option<String>,
}

impl PeerRun {
    /// The least of each figure over several runs (the machine is shared: noise only ever
    /// adds), or the first failure.
    pub fn least(runs: &[PeerRun]) -> PeerRun {
        if let Some(failed) = runs.iter().find(|r| r.error.is_some()) {
            return failed.clone();
        }
        let min = |f: fn(&PeerRun) -> f64| runs.iter().map(f).fold(f64::INFINITY, f64::min);
        PeerRun {
            wall_s: min(|r| r.wall_s),
            cpu_s: min(|r| r.cpu_s),
            peak_rss_kib: runs.iter().map(|r| r.peak_rss_kib).min().unwrap_or(0),
            error: None,
        }
    }
}

/// Runs a peer command and reads the JSON line it prints last.
async fn run_peer(command: &mut tokio::process::Command, what: &str) -> anyhow::Result<PeerRun> {
    let out = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("starting {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match line {
        Some(l) if out.status.success() => Ok(serde_json::from_str(l)?),
        _ => anyhow::bail!("{what} failed ({}): {stdout}", out.status),
    }
}

/// The floor, `runs` times, each into a new database `work/floor-N.duckdb`; returns the
/// runs and the last database.
pub async fn floor(
    manifest: &Path,
    work: &Path,
    runs: usize,
) -> anyhow::Result<(Vec<PeerRun>, PathBuf)> {
    let me = std::env::current_exe()?;
    let mut results = Vec::new();
    let mut db = PathBuf::new();
    for n in 0..runs.max(1) {
        db = work.join(format!("floor-{n}.duckdb"));
        let _ = std::fs::remove_file(&db);
        let mut command = tokio::process::Command::new(&me);
        command
            .arg("bench-floor")
            .arg("--manifest")
            .arg(manifest)
            .arg("--db")
            .arg(&db);
        results.push(run_peer(&mut command, "the floor").await?);
    }
    Ok((results, db))
}

/// The floor's process (`cdc-worker-dev bench-floor`): one CTAS per table, timed from the
/// first statement to the last.
pub fn floor_child(manifest: &Path, db: &Path) -> anyhow::Result<()> {
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(manifest)?)?;
    let conn = duckdb::Connection::open(db)?;
    let me = std::process::id();
    let (started, cpu0) = (Instant::now(), sys::cpu_time(me));
    for (table, paths) in &manifest.tables {
        let list: Vec<String> = paths
            .iter()
            .map(|p| literal(&p.to_string_lossy()))
            .collect();
        conn.execute_batch(&format!(
            "CREATE TABLE {} AS SELECT * FROM read_parquet([{}], union_by_name = true)",
            ident(table),
            list.join(", ")
        ))?;
    }
    conn.execute_batch("CHECKPOINT")?;
    let run = PeerRun {
        wall_s: started.elapsed().as_secs_f64(),
        cpu_s: sys::cpu_time(me).saturating_sub(cpu0).as_secs_f64(),
        peak_rss_kib: sys::peak_rss_kib(me),
        error: None,
    };
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}

/// dlt through `script`, `runs` times into `work/dlt-N/`; returns the runs and the last
/// run's directory (its tables are in `result/<table>.parquet`).
pub async fn dlt(
    script: &Path,
    manifest: &Path,
    work: &Path,
    runs: usize,
    int64_cast: bool,
) -> anyhow::Result<(Vec<PeerRun>, PathBuf)> {
    let mut results = Vec::new();
    let mut out = PathBuf::new();
    for n in 0..runs.max(1) {
        out = work.join(format!(
            "dlt-{}{n}",
            if int64_cast { "" } else { "nocast-" }
        ));
        let _ = std::fs::remove_dir_all(&out);
        let mut command = tokio::process::Command::new(script);
        command
            .arg("--manifest")
            .arg(manifest)
            .arg("--out")
            .arg(&out);
        if !int64_cast {
            command.arg("--no-int64-cast");
        }
        let run = run_peer(&mut command, "scripts/bench-peers").await?;
        let failed = run.error.is_some();
        results.push(run);
        if failed {
            break;
        }
    }
    Ok((results, out))
}
