//! Linux KSM through its sysfs knobs (`/sys/kernel/mm/ksm`), for running the guests under
//! KSM beside the dynamic-vm engines (the examples): claiming it for a run (no other
//! user, the knobs saved and written back), marking guest RAM mergeable, counting its
//! full scans for a [`RoundBarrier`](crate::barrier::RoundBarrier), unmerging. The knobs
//! themselves (reading, writing, ksmd, [`Restore`]) are page-memory's
//! [`page_memory::linux::test_util::ksm`], re-exported here.
//!
//! Writing the knobs needs root.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use page_memory::linux::test_util::ksm::{ksmd, num, read, set, write, Restore, SYSFS};

use crate::harness::Worker;

/// The knobs a run changes, saved by [`claim`] and written back.
pub const KNOBS: [&str; 4] = ["run", "sleep_millisecs", "pages_to_scan", "use_zero_pages"];

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
