//! CPU time of this process's threads, per thread, as the kernel accounts it.
//!
//! The engines run on threads they name themselves (`ksmd-baseline`, `pageone-daemon`,
//! `pageone-worker-N`, the Linux backend's `page-memory-uffd-N`). We read each thread's
//! name from `/proc/self/task/<tid>/comm` and its CPU time from
//! `/proc/self/task/<tid>/schedstat` (nanoseconds on the CPU), falling back to `utime +
//! stime` of `/proc/self/task/<tid>/stat` (clock ticks of 10 ms) where schedstat is not
//! compiled into the kernel. Two snapshots give each thread's CPU time over a window.

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

/// One thread's CPU time so far.
#[derive(Clone, Debug)]
pub struct ThreadTime {
    /// Its name (the kernel keeps the first 15 bytes).
    pub name: String,
    /// CPU time since it started.
    pub cpu: Duration,
}

/// The CPU time of every thread of this process, by thread id; empty where `/proc` is not
/// available.
pub fn snapshot() -> HashMap<u32, ThreadTime> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let Ok(name) = fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if let Some(cpu) = cpu_time(&path) {
            out.insert(
                tid,
                ThreadTime {
                    name: name.trim_end().to_string(),
                    cpu,
                },
            );
        }
    }
    out
}

fn cpu_time(task: &std::path::Path) -> Option<Duration> {
    if let Ok(s) = fs::read_to_string(task.join("schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(Duration::from_nanos(ns));
        }
    }
    // `stat`: the name (field 2) is in parentheses and may hold spaces; utime and stime
    // are fields 14 and 15, in USER_HZ ticks (100 per second on Linux).
    let stat = fs::read_to_string(task.join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time each thread whose name starts with one of `prefixes` spent between two
/// snapshots, as `(name, cpu time)`, sorted by name. Threads that started or ended
/// inside the window count from or up to the snapshot that saw them.
pub fn spent(
    before: &HashMap<u32, ThreadTime>,
    after: &HashMap<u32, ThreadTime>,
    prefixes: &[&str],
) -> Vec<(String, Duration)> {
    let wanted = |name: &str| prefixes.iter().any(|p| name.starts_with(p));
    let mut out: Vec<(String, Duration)> = after
        .iter()
        .filter(|(_, t)| wanted(&t.name))
        .map(|(tid, t)| {
            let start = before.get(tid).map_or(Duration::ZERO, |b| b.cpu);
            (t.name.clone(), t.cpu.saturating_sub(start))
        })
        .collect();
    out.sort();
    out
}
