//! The Linux backend's map-count guard: merging stops short of `vm.max_map_count` with a
//! typed, counted reason. In a test binary of its own: the guard counts every mapping of
//! the process, so other tests running beside it (their own mappings come and go) would
//! make its room, and its outcome, vary. Skips, with the reason printed, where userfaultfd
//! write-protect is unavailable.
#![cfg(feature = "linux")]

use std::sync::atomic::{AtomicU64, Ordering};

use page_memory::linux::{LinuxConfig, LinuxMemory};
use page_memory::{DomainId, MergeOutcome, PageError, PageId, PageMemory, RegionId, PAGE_WORDS};

/// The memory these tests use: they write guest memory from user space only, so a
/// process that may not have kernel faults (CI's unprivileged run) falls back to a
/// user-mode-only userfaultfd.
fn memory_with(config: LinuxConfig) -> Option<LinuxMemory> {
    match LinuxMemory::with_config(config.with_require_kernel_faults(false)) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("SKIPPED: no userfaultfd write-protect here: {e}");
            None
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Guest write of the page with contents `seed` to `page`.
fn fill(mem: &LinuxMemory, page: PageId, seed: u64) {
    let base = mem.page_ptr(page).unwrap().cast::<u64>();
    for i in 0..PAGE_WORDS {
        // SAFETY: word `i` of a page of a live region of `mem`, aligned; guest memory is
        // only accessed atomically here.
        let w = unsafe { AtomicU64::from_ptr(base.add(i)) };
        w.store(
            splitmix(seed.wrapping_mul(PAGE_WORDS as u64) + i as u64) | 1,
            Ordering::Relaxed,
        );
    }
}

fn pages(r: RegionId, range: std::ops::Range<u32>) -> Vec<PageId> {
    range.map(|i| PageId::new(r, i)).collect()
}

/// Merging stops short of vm.max_map_count, with a typed, counted reason.
#[test]
fn merging_stops_before_the_map_count_limit() {
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(65_530);
    let now = std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count() as u64)
        .unwrap_or(0);
    // Leave room for about 300 more mappings.
    let Some(mem) = memory_with(
        LinuxConfig::default().with_map_count_reserve(Some(limit.saturating_sub(now + 300))),
    ) else {
        return;
    };
    const N: u32 = 1000;
    const HALF: u32 = N / 2;
    let r = mem.add_region(N, DomainId(0)).unwrap();
    for i in 0..N {
        // Pages HALF.. duplicate pages 0..HALF in reverse order: no run coalesces.
        let seed = if i < HALF { i } else { N - 1 - i };
        fill(&mem, PageId::new(r, i), seed as u64 + 1);
    }
    let t: Vec<_> = mem
        .protect(&pages(r, 0..N))
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Canonical pages in order coalesce into one mapping: no trouble with the limit.
    let frames: Vec<_> = (0..HALF)
        .map(|i| mem.canonicalize(PageId::new(r, i), t[i as usize]).unwrap())
        .collect();
    // Every other duplicate, each in a mapping of its own between two others: two more
    // mappings per merge.
    let mut refused = 0;
    for i in (HALF..N).step_by(2) {
        let canon = &frames[(N - 1 - i) as usize];
        match mem.merge(PageId::new(r, i), t[i as usize], canon) {
            Ok(MergeOutcome::Merged) => {}
            Err(PageError::MapCountLimit { limit: l, mappings }) => {
                assert_eq!(l, limit);
                assert!(mappings < limit);
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let s = mem.stats();
    let u = mem.usage().unwrap();
    eprintln!(
        "map-count guard: {refused} of {} merges refused; region mappings {}; {s:?}",
        HALF / 2,
        u.region_mappings
    );
    assert!(refused > 0);
    assert_eq!(s.map_limit_refusals, refused);
    assert!(s.merges >= 50);
    let shown = PageError::MapCountLimit { limit, mappings: 1 }.to_string();
    assert!(shown.contains("sysctl -w vm.max_map_count"));
}
