//! Linux KSM through its sysfs knobs (`/sys/kernel/mm/ksm`), for running the guests under
//! KSM beside the dynamic-vm engines (the examples): claiming it for a run (no other
//! user, the knobs saved and written back), marking guest RAM mergeable, counting its
//! full scans for a [`RoundBarrier`](crate::barrier::RoundBarrier), unmerging.
//!
//! Writing the knobs needs root.

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::Worker;

/// Where KSM's knobs are.
pub const SYSFS: &str = "/sys/kernel/mm/ksm";

/// The knobs a run changes, saved by [`claim`] and written back.
pub const KNOBS: [&str; 4] = ["run", "sleep_millisecs", "pages_to_scan", "use_zero_pages"];

/// Knob `knob`, trimmed (empty if it cannot be read).
pub fn read(knob: &str) -> String {
    fs::read_to_string(format!("{SYSFS}/{knob}"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Knob `knob` as a number (0 if it cannot be read or parsed).
pub fn num(knob: &str) -> u64 {
    read(knob).parse().unwrap_or(0)
}

/// Writes `value` to knob `knob`.
pub fn write(knob: &str, value: &str) -> std::io::Result<()> {
    fs::write(format!("{SYSFS}/{knob}"), value)
}

/// [`write()`], its error saying which knob (and that it needs root).
pub fn set(knob: &str, value: &str) -> Result<(), String> {
    write(knob, value).map_err(|e| format!("KSM's {knob} (needs root): {e}"))
}

/// The pid of ksmd, or why there is none.
pub fn ksmd() -> Result<u32, String> {
    fs::read_dir("/proc")
        .ok()
        .and_then(|d| {
            d.flatten().find_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "ksmd")
                    .then_some(pid)
            })
        })
        .ok_or_else(|| "no ksmd (a kernel without KSM)".to_string())
}

/// KSM's knobs as they were; written back (in reverse order) on drop.
#[derive(Debug)]
pub struct Restore(Vec<(&'static str, String)>);

impl Restore {
    /// Saves `knobs`.
    pub fn save(knobs: &[&'static str]) -> Self {
        Restore(knobs.iter().map(|&k| (k, read(k))).collect())
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (k, v) in self.0.iter().rev() {
            let _ = write(k, v);
        }
    }
}

/// Claims KSM for a run over `ranges` (host address ranges, `[start, end)`, of memory
/// this process owns): refuses if someone else uses it (`run` not 0 or pages merged),
/// saves [`KNOBS`] to be written back when the returned guard drops, and marks the
/// ranges `MADV_MERGEABLE`. The caller then sets the knobs ([`set`]) and `run` to 1.
pub fn claim(ranges: &[(usize, usize)]) -> Result<Restore, String> {
    if num("run") != 0 || num("pages_sharing") != 0 {
        return Err("KSM is in use by someone else (run != 0 or pages merged)".into());
    }
    let restore = Restore::save(&KNOBS);
    for &(base, end) in ranges {
        // SAFETY: memory of this process's own (the caller's ranges); MADV_MERGEABLE
        // only lets ksmd merge it, which keeps its contents.
        if unsafe { libc::madvise(base as *mut libc::c_void, end - base, libc::MADV_MERGEABLE) }
            != 0
        {
            return Err(format!(
                "MADV_MERGEABLE: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(restore)
}

/// A thread keeping `progress` at the full scans ksmd completed since now (polled every
/// 5 ms).
pub fn count_full_scans(progress: Arc<AtomicU64>) -> std::io::Result<Worker<()>> {
    let scans0 = num("full_scans");
    Worker::spawn("ksm-scans", (), move |_| {
        progress.store(num("full_scans").saturating_sub(scans0), Ordering::Release);
        std::thread::sleep(Duration::from_millis(5));
    })
}

/// Unmerges everything (`run` = 2) and waits until no page is merged (at most `limit`).
pub fn unmerge(limit: Duration) {
    let _ = write("run", "2");
    let t = Instant::now();
    while num("pages_shared") + num("pages_sharing") > 0 && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
}
