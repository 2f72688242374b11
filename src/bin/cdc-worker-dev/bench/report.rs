//! What the benchmark prints: a line per run as it finishes, then every target of the
//! benchmark with its figure, its ratio and whether it is met.

use super::peers::PeerRun;
use super::worker_run::Measured;

/// A peer's run and whether its result equals the source.
pub struct Outcome {
    pub run: PeerRun,
    pub verdict: String,
}

/// Everything measured on one workload.
#[derive(Default)]
pub struct Figures {
    pub changes: u64,
    /// The worker's run (batched) and whether its tables equal the source.
    pub worker: Option<(Measured, String)>,
    pub per_file: Option<Measured>,
    pub steady: Option<Measured>,
    pub floor: Option<PeerRun>,
    pub dlt: Option<Outcome>,
    pub dlt_without_cast: Option<String>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn us_per(seconds: f64, n: u64) -> f64 {
    seconds * 1e6 / n.max(1) as f64
}

pub fn worker(label: &str, m: &Measured, verdict: &str) {
    let secs = m.elapsed.as_secs_f64().max(1e-9);
    let latency = if m.latencies.is_empty() {
        String::new()
    } else {
        format!(
            "; latency p50 {:.2} s p99 {:.2} s",
            m.percentile(0.50).as_secs_f64(),
            m.percentile(0.99).as_secs_f64()
        )
    };
    println!(
        "{label:<10} {} files in {secs:.2} s = {:.1} files/s, {:.0} changes/s; worker CPU {:.2} µs/change ({:.2} ms/file); peak RSS {:.0} MiB; statements/file {:.2}{latency}; equals source: {verdict}",
        m.files,
        m.files as f64 / secs,
        m.changes as f64 / secs,
        us_per(m.cpu.as_secs_f64(), m.changes),
        m.cpu.as_secs_f64() * 1e3 / m.files.max(1) as f64,
        mib(m.peak_rss_kib),
        m.statements as f64 / m.files.max(1) as f64,
    );
    if m.rows_applied != m.changes {
        println!(
            "{:<10} note: the worker's /metrics count {} rows applied, the files hold {}",
            "", m.rows_applied, m.changes
        );
    }
    if let Some(cpu) = m.localstack_cpu {
        println!(
            "{:<10} LocalStack CPU {:.2} ms/file ({:.0}% of one core over the run)",
            "",
            cpu.as_secs_f64() * 1e3 / m.files.max(1) as f64,
            100.0 * cpu.as_secs_f64() / secs
        );
    }
}

/// Where the time of a run's files went: each stage's p50 and p99 (from the worker's
/// `cdc_worker_stage_seconds`).
pub fn stages(m: &Measured) {
    if m.stages.is_empty() {
        println!("{:<10} stages: none recorded", "");
    } else {
        println!("{:<10} stages: {}", "", super::stages::summary(&m.stages));
    }
}

pub fn peer(label: &str, run: &PeerRun, changes: u64, verdict: &str) {
    if let Some(e) = &run.error {
        println!("{label:<10} failed: {e}");
        return;
    }
    println!(
        "{label:<10} {changes} changes in {:.2} s; CPU {:.2} µs/change; peak RSS {:.0} MiB (least of each over its runs); equals source: {verdict}",
        run.wall_s,
        us_per(run.cpu_s, changes),
        mib(run.peak_rss_kib),
    );
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn cdc_targets(f: &Figures) {
    let Some((w, _)) = &f.worker else { return };
    let worker_cpu = us_per(w.cpu.as_secs_f64(), f.changes);
    if let Some(floor) = &f.floor {
        let ratio = worker_cpu / us_per(floor.cpu_s, f.changes).max(1e-9);
        println!(
            "CDC        worker CPU per change / floor's = {worker_cpu:.2} / {:.2} µs = {ratio:.2}x (target <= 2x): {}",
            us_per(floor.cpu_s, f.changes),
            verdict(ratio <= 2.0)
        );
    }
    if let Some(dlt) = f.dlt.as_ref().filter(|d| d.run.error.is_none()) {
        let ratio = dlt.run.wall_s / w.elapsed.as_secs_f64().max(1e-9);
        println!(
            "CDC        dlt wall / worker wall = {:.2} / {:.2} s = {ratio:.2}x (target >= 1.5x): {}; dlt equals source: {}",
            dlt.run.wall_s,
            w.elapsed.as_secs_f64(),
            verdict(ratio >= 1.5),
            dlt.verdict
        );
    }
    println!(
        "CDC        worker peak RSS, {} files, 16 receivers = {:.0} MiB (target < 200 MiB): {}",
        w.files,
        mib(w.peak_rss_kib),
        verdict(mib(w.peak_rss_kib) < 200.0)
    );
    if let Some(p) = &f.per_file {
        let rate = |m: &Measured| m.files as f64 / m.elapsed.as_secs_f64().max(1e-9);
        println!(
            "CDC        batched / per-file files/s = {:.1}x",
            rate(w) / rate(p).max(1e-9)
        );
    }
    if let Some(s) = &f.steady {
        println!(
            "CDC        steady upload-to-commit latency p99 = {:.2} s",
            s.percentile(0.99).as_secs_f64()
        );
    }
}

fn load_targets(f: &Figures) {
    let (Some((w, _)), Some(floor)) = (&f.worker, &f.floor) else {
        return;
    };
    let speed = floor.wall_s / w.elapsed.as_secs_f64().max(1e-9);
    println!(
        "full load  floor wall / worker wall = {:.2} / {:.2} s = {:.0}% of the floor's speed (target >= 70%): {}",
        floor.wall_s,
        w.elapsed.as_secs_f64(),
        100.0 * speed,
        verdict(speed >= 0.7)
    );
    let rss = w.peak_rss_kib as f64 / floor.peak_rss_kib.max(1) as f64;
    println!(
        "full load  worker peak RSS / floor's = {:.0} / {:.0} MiB = {rss:.2}x (target <= 1.2x): {}",
        mib(w.peak_rss_kib),
        mib(floor.peak_rss_kib),
        verdict(rss <= 1.2)
    );
    if let Some(dlt) = f.dlt.as_ref().filter(|d| d.run.error.is_none()) {
        println!(
            "full load  dlt wall / worker wall = {:.2}x; dlt peak RSS {:.0} MiB",
            dlt.run.wall_s / w.elapsed.as_secs_f64().max(1e-9),
            mib(dlt.run.peak_rss_kib)
        );
    }
}

/// Every target with its figure and ratio.
pub fn targets(
    cdc: Option<&Figures>,
    load: Option<&Figures>,
    big: Option<&(Measured, String)>,
    memory_limit: &str,
) {
    println!("== targets (ratios within this run)");
    if let Some(f) = cdc {
        cdc_targets(f);
    }
    if let Some(f) = load {
        load_targets(f);
    }
    if let Some((m, _)) = big {
        println!(
            "big load   peak RSS with memory_limit {memory_limit} = {:.0} MiB for a {:.0} MiB LOAD file of {} rows, loaded in {:.1} s",
            mib(m.peak_rss_kib),
            m.bytes as f64 / (1 << 20) as f64,
            m.changes,
            m.elapsed.as_secs_f64()
        );
    }
}
