//! The Linux backend's map-count guard: merging stops short of `vm.max_map_count` with a
//! typed, counted reason. In a test binary of its own: the guard counts every mapping of
//! the process, so other tests running beside it (their own mappings come and go) would
//! make its room, and its outcome, vary. Skips, with the reason printed, where userfaultfd
//! write-protect is unavailable.
#![cfg(feature = "linux")]

use page_memory::linux::test_util::*;
use page_memory::linux::LinuxConfig;
use page_memory::{DomainId, MergeOutcome, PageError, PageId, PageMemory};

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
