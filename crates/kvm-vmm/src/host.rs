//! Host-side figures from `/proc` and the clock, for measuring the guests and the engines
//! beside them (the examples).

use std::fs;
use std::time::Duration;

/// This process's CPU time (all threads, user and system).
pub fn process_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The run time in a `schedstat` file (`/proc/<pid>/schedstat`,
/// `/proc/self/task/<tid>/schedstat`); zero if it cannot be read.
pub fn schedstat(path: &str) -> Duration {
    let ns = fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// The run time of process `pid` ([`schedstat`] of `/proc/<pid>/schedstat`).
pub fn process_run_time(pid: u32) -> Duration {
    schedstat(&format!("/proc/{pid}/schedstat"))
}

/// `Pss` (bytes) of this process's mappings that overlap `ranges` (`[start, end)`), from
/// `/proc/self/smaps` (a page shared by several mappings, as a KSM page, counted once in
/// all).
pub fn pss(ranges: &[(usize, usize)]) -> u64 {
    let text = fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut total, mut inside) = (0, false);
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let first = f.next().unwrap_or("");
        if !first.ends_with(':') {
            if let Some((s, e)) = first.split_once('-') {
                let s = usize::from_str_radix(s, 16).unwrap_or(0);
                let e = usize::from_str_radix(e, 16).unwrap_or(0);
                inside = ranges.iter().any(|&(a, b)| s < b && e > a);
            }
        } else if inside && first == "Pss:" {
            total += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        }
    }
    total
}

/// The load average line of `/proc/loadavg`, trimmed (empty if it cannot be read).
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}
