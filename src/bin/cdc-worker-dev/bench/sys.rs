//! What the benchmark reads about processes from Linux's /proc: CPU time, peak RSS, and
//! where LocalStack runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// User plus system CPU time of a process so far (Linux clock ticks are 1/100 s).
pub fn cpu_time(pid: u32) -> Duration {
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

/// The most resident memory the process has had (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
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

/// The cache directory the project's scripts use (`CDC_WORKER_CACHE`, else ~/.cache/cdc-worker).
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var("CDC_WORKER_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache/cdc-worker")))
        .ok()
}

/// The pid of the LocalStack that deploy/localstack/start.sh started, if it runs.
pub fn localstack_pid() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(cache_dir()?.join("localstack.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The 1-minute load average, to print beside figures taken on a shared machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
