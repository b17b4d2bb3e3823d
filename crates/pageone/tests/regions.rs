//! PageONE over memory whose regions come and go (`PageOne::refresh_regions`): regions
//! added after the engine was made merge with the old ones, removed regions release what
//! their pages held (counters exact, the other pages stay merged and readable), and a
//! region that vanishes without a refresh does not upset a pass. Counts and contents
//! only, never timing.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageError, PageId, RegionId, PAGE_SIZE};
use pageone::{Config, PageOne, RegionChange};
use proptest::prelude::*;

fn config(threads: usize) -> Config {
    Config::default().work_threads(threads)
}

/// A page whose contents are determined by `seed` (0 = all zeros).
fn content(seed: u64) -> Vec<u8> {
    common::content_at(1000, seed)
}

/// Writes page `i` of `r` with `content(seed_of(i))`; returns what each page holds.
fn fill(
    mem: &SimMemory,
    r: RegionId,
    pages: u32,
    seed_of: impl Fn(u32) -> u64,
) -> HashMap<PageId, Vec<u8>> {
    common::fill_with(mem, r, pages, |i| content(seed_of(i)))
}

fn read(mem: &SimMemory, p: PageId) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    mem.read(p, 0, &mut buf).unwrap();
    buf
}

/// Merge passes until one finds the memory quiet (at most `stable_periods + 2` plus a few
/// for passes put off by a claim another thread held); returns how many ran.
fn settle(engine: &PageOne<SimMemory>) -> u32 {
    for n in 1..=8 {
        if engine.merge_pass().quiet() {
            return n;
        }
    }
    panic!("not quiet after 8 passes: {:?}", engine.stats());
}

/// The engine's sharing counters agree with the memory's.
fn check_counters(engine: &PageOne<SimMemory>, mem: &SimMemory) {
    let stats = engine.stats();
    let acc = mem.accounting();
    assert_eq!(stats.pages_shared, acc.pages_shared, "{stats:?} {acc:?}");
    assert_eq!(stats.pages_sharing, acc.pages_sharing, "{stats:?} {acc:?}");
    assert_eq!(stats.zero_pages, acc.zero_pages, "{stats:?} {acc:?}");
}

/// Every page holds what `shadow` says.
fn check_contents(mem: &SimMemory, shadow: &HashMap<PageId, Vec<u8>>) {
    for (p, want) in shadow {
        assert_eq!(&read(mem, *p), want, "{p} lost its contents");
    }
}

#[test]
fn a_region_added_after_new_merges_with_the_old_ones() {
    for threads in [1, 2] {
        let mem = Arc::new(SimMemory::new());
        let old = mem.add_region(600, DomainId(0));
        let mut shadow = fill(&mem, old, 600, |i| u64::from(i % 40) + 1);
        let engine = PageOne::new(mem.clone(), config(threads)).unwrap();
        settle(&engine);
        assert_eq!(engine.stats().pages_sharing, 560);
        let new = mem.add_region(700, DomainId(0));
        shadow.extend(fill(&mem, new, 700, |i| u64::from(i % 50) + 1));
        // Not taken on until a refresh.
        assert!(engine.merge_pass().quiet());
        assert_eq!(mem.accounting().frames, 40 + 700);
        let change = engine.refresh_regions();
        assert_eq!(change.added, [new]);
        assert!(change.removed.is_empty());
        assert!(!engine.is_quiet(), "the new pages have had no pass");
        assert_eq!(engine.stats().pages_volatile, 700);
        settle(&engine);
        assert!(engine.is_quiet());
        // 50 contents: 40 of them in both regions, 10 in the new one only.
        assert_eq!(mem.accounting().frames, 50, "threads = {threads}");
        let stats = engine.stats();
        assert_eq!(stats.pages_shared, 50);
        assert_eq!(stats.pages_sharing, 1300 - 50);
        check_counters(&engine, &mem);
        for i in 0..40 {
            assert!(mem
                .shares_frame(PageId::new(old, i), PageId::new(new, i))
                .unwrap());
        }
        check_contents(&mem, &shadow);
        // A second refresh finds nothing new.
        assert_eq!(engine.refresh_regions(), RegionChange::default());
    }
}

/// Three regions with the same 16 contents, merged: 16 frames, each shared by 3 pages.
fn three_merged_regions(threads: usize) -> (Arc<SimMemory>, PageOne<SimMemory>, [RegionId; 3]) {
    let mem = Arc::new(SimMemory::new());
    let regions = [0, 1, 2].map(|_| mem.add_region(16, DomainId(0)));
    for &r in &regions {
        fill(&mem, r, 16, |i| u64::from(i) + 1);
    }
    let engine = PageOne::new(mem.clone(), config(threads)).unwrap();
    settle(&engine);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (16, 32));
    assert_eq!(mem.accounting().frames, 16);
    (mem, engine, regions)
}

#[test]
fn a_removed_region_releases_its_sharers() {
    // Removing each of the three in turn: one of them holds the canonical pages.
    for threads in [1, 2] {
        for gone in 0..3 {
            let (mem, engine, regions) = three_merged_regions(threads);
            let [a, b] = [0, 1, 2]
                .into_iter()
                .filter(|&n| n != gone)
                .map(|n| regions[n])
                .collect::<Vec<_>>()[..]
            else {
                unreachable!()
            };
            mem.remove_region(regions[gone]).unwrap();
            let change = engine.refresh_regions();
            assert_eq!(change.removed, [regions[gone]]);
            assert!(change.added.is_empty());
            // What the remaining two regions alone give.
            let stats = engine.stats();
            assert_eq!(stats.pages_shared, 16, "threads {threads}, gone {gone}");
            assert_eq!(stats.pages_sharing, 16);
            assert_eq!(stats.pages_unshared, 0);
            assert_eq!(stats.pages_unique, 0);
            assert_eq!(stats.zero_pages, 0);
            assert_eq!(stats.canonical_indexed, 16);
            assert_eq!(stats.pages_volatile + stats.pages_watched, 0);
            check_counters(&engine, &mem);
            assert_eq!(mem.accounting().frames, 16);
            // The other two still share one frame per content, whichever held it, and
            // read back their contents.
            for i in 0..16 {
                let (pa, pb) = (PageId::new(a, i), PageId::new(b, i));
                assert!(mem.shares_frame(pa, pb).unwrap());
                assert_eq!(read(&mem, pa), content(u64::from(i) + 1));
                assert_eq!(read(&mem, pb), content(u64::from(i) + 1));
            }
            // Nothing for the passes to do, and nothing asked of the gone pages.
            assert!(engine.merge_pass().quiet());
            assert_eq!(engine.stats().refused_errors, 0);
            assert!(engine.is_quiet());
            // A write to one of them is kept, and breaks only its own sharing.
            mem.write(PageId::new(a, 3), 0, b"new").unwrap();
            engine.merge_pass();
            assert_eq!(engine.stats().pages_sharing, 15);
            assert_eq!(read(&mem, PageId::new(b, 3)), content(4));
            check_counters(&engine, &mem);
        }
    }
}

#[test]
fn a_canonical_page_whose_region_is_gone_still_takes_new_sharers() {
    for threads in [1, 2] {
        for gone in 0..3 {
            let (mem, engine, regions) = three_merged_regions(threads);
            mem.remove_region(regions[gone]).unwrap();
            engine.refresh_regions();
            // A new VM with the same contents merges with the frames the others share.
            let new = mem.add_region(16, DomainId(0));
            fill(&mem, new, 16, |i| u64::from(i) + 1);
            assert_eq!(engine.refresh_regions().added, [new]);
            settle(&engine);
            let stats = engine.stats();
            assert_eq!((stats.pages_shared, stats.pages_sharing), (16, 32));
            assert_eq!(stats.canonicalized, 16, "no new canonical page");
            assert_eq!(mem.accounting().frames, 16);
            check_counters(&engine, &mem);
            let other = regions[(gone + 1) % 3];
            for i in 0..16 {
                assert!(mem
                    .shares_frame(PageId::new(other, i), PageId::new(new, i))
                    .unwrap());
            }
        }
    }
}

#[test]
fn removing_every_sharer_retires_the_canonical_pages() {
    let (mem, engine, regions) = three_merged_regions(2);
    for (n, &r) in regions.iter().enumerate() {
        mem.remove_region(r).unwrap();
        assert_eq!(engine.refresh_regions().removed, [r]);
        let stats = engine.stats();
        let left = 2 - n as u64;
        // Two regions left: shared; one: each canonical page mapped by one page; none:
        // the canonical pages left the tree and their frames are freed.
        assert_eq!(stats.pages_shared, if left >= 2 { 16 } else { 0 });
        assert_eq!(stats.pages_sharing, if left >= 2 { 16 } else { 0 });
        assert_eq!(stats.pages_unshared, if left == 1 { 16 } else { 0 });
        assert_eq!(stats.canonical_indexed, if left > 0 { 16 } else { 0 });
        check_counters(&engine, &mem);
    }
    engine.collect_garbage();
    assert_eq!(mem.accounting().frames, 0);
    assert_eq!(mem.accounting().pages, 0);
    // An engine with no regions left runs empty passes.
    let report = engine.merge_pass();
    assert_eq!(report.pages, 0);
    assert!(report.quiet());
}

#[test]
fn unique_zero_and_watched_pages_of_a_removed_region_are_let_go() {
    let mem = Arc::new(SimMemory::new());
    let keep = mem.add_region(64, DomainId(0));
    let gone = mem.add_region(64, DomainId(0));
    // `keep`: 32 distinct (unique) pages and 32 zero pages. `gone`: 16 unique pages and
    // 48 zero pages, 32 of which are written again (volatile or watched when it goes).
    fill(
        &mem,
        keep,
        64,
        |i| if i < 32 { u64::from(i) + 1 } else { 0 },
    );
    fill(
        &mem,
        gone,
        64,
        |i| if i < 16 { u64::from(i) + 1000 } else { 0 },
    );
    let engine = PageOne::new(mem.clone(), config(2)).unwrap();
    settle(&engine);
    let stats = engine.stats();
    assert_eq!(stats.pages_unique, 48);
    assert_eq!(stats.zero_pages, 80);
    for i in 32..64 {
        mem.write(PageId::new(gone, i), 0, &content(5000 + u64::from(i)))
            .unwrap();
    }
    for _ in 0..2 {
        engine.merge_pass();
    }
    let stats = engine.stats();
    assert_eq!(stats.pages_unique, 48);
    assert_eq!(stats.zero_pages, 48);
    assert!(stats.pages_volatile + stats.pages_watched > 0);
    mem.remove_region(gone).unwrap();
    assert_eq!(engine.refresh_regions().removed, [gone]);
    let stats = engine.stats();
    assert_eq!(stats.pages_unique, 32);
    assert_eq!(stats.pages_unshared, 32);
    assert_eq!(stats.zero_pages, 32);
    assert_eq!((stats.pages_volatile, stats.pages_watched), (0, 0));
    assert_eq!((stats.pages_shared, stats.pages_sharing), (0, 0));
    check_counters(&engine, &mem);
    assert!(engine.merge_pass().quiet());
    // A new region with the contents of `keep`'s unique pages pairs with them.
    let new = mem.add_region(32, DomainId(0));
    fill(&mem, new, 32, |i| u64::from(i) + 1);
    engine.refresh_regions();
    settle(&engine);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (32, 32));
    assert_eq!(stats.pages_unique, 0);
    check_counters(&engine, &mem);
}

#[test]
fn a_region_removed_without_a_refresh_does_not_upset_a_pass() {
    for threads in [1, 2] {
        let (mem, engine, regions) = three_merged_regions(threads);
        mem.remove_region(regions[0]).unwrap();
        // The next pass finds the gone pages "written" (their tokens cannot be checked)
        // and drops their sharing; the others stay merged.
        let report = engine.merge_pass();
        assert_eq!(report.written, 16);
        assert_eq!(report.unmerged, 16);
        let stats = engine.stats();
        assert_eq!((stats.pages_shared, stats.pages_sharing), (16, 16));
        check_counters(&engine, &mem);
        // Later passes try the gone pages only after their back-off, each at most once a
        // pass, counting each failure once.
        let mut errors = 0;
        for _ in 0..16 {
            let before = engine.stats().refused_errors;
            let report = engine.merge_pass();
            assert!(report.refused_errors <= 16, "{report:?}");
            assert_eq!(
                engine.stats().refused_errors - before,
                report.refused_errors
            );
            errors += report.refused_errors;
        }
        assert!(errors > 0);
        assert!(errors <= 16 * 5, "back-off: {errors} failures in 16 passes");
        for i in 0..16 {
            let (pb, pc) = (PageId::new(regions[1], i), PageId::new(regions[2], i));
            assert!(mem.shares_frame(pb, pc).unwrap());
            assert_eq!(read(&mem, pb), content(u64::from(i) + 1));
        }
        // The refresh lets the region go, and the passes are quiet again.
        assert_eq!(engine.refresh_regions().removed, [regions[0]]);
        assert!(engine.merge_pass().quiet());
        check_counters(&engine, &mem);
    }
}

#[test]
fn a_region_of_a_new_trust_domain_gets_a_tree_of_its_own() {
    // An engine made over no regions at all takes them on too.
    let mem = Arc::new(SimMemory::new());
    let engine = PageOne::new(mem.clone(), config(2)).unwrap();
    assert!(engine.merge_pass().quiet());
    let a = mem.add_region(16, DomainId(1));
    fill(&mem, a, 16, |_| 7);
    assert_eq!(engine.refresh_regions().added, [a]);
    settle(&engine);
    let b = mem.add_region(16, DomainId(2));
    fill(&mem, b, 16, |_| 7);
    assert_eq!(engine.refresh_regions().added, [b]);
    settle(&engine);
    // Equal contents, different domains: never merged.
    assert!(!mem
        .shares_frame(PageId::new(a, 0), PageId::new(b, 0))
        .unwrap());
    assert!(mem
        .shares_frame(PageId::new(b, 0), PageId::new(b, 15))
        .unwrap());
    assert_eq!(mem.accounting().frames, 2);
    assert_eq!(engine.stats().canonical_indexed, 2);
    check_counters(&engine, &mem);
}

#[test]
fn joined_domains_added_later_merge() {
    let mem = Arc::new(SimMemory::new());
    let a = mem.add_region(16, DomainId(1));
    fill(&mem, a, 16, |_| 7);
    let mut cfg = config(1);
    cfg.joined_domains = vec![vec![DomainId(1), DomainId(2)]];
    let engine = PageOne::new(mem.clone(), cfg).unwrap();
    settle(&engine);
    let b = mem.add_region(16, DomainId(2));
    fill(&mem, b, 16, |_| 7);
    engine.refresh_regions();
    settle(&engine);
    assert!(mem
        .shares_frame(PageId::new(a, 0), PageId::new(b, 0))
        .unwrap());
    assert_eq!(mem.accounting().frames, 1);
}

#[test]
fn a_budgeted_pass_goes_on_over_the_refreshed_chunks() {
    // Regions of 2 chunks each; a budget of 3 chunks a pass, so the cursor stands inside
    // the list when regions go and come.
    let mem = Arc::new(SimMemory::new());
    let mut regions: Vec<RegionId> = (0..4).map(|_| mem.add_region(1024, DomainId(0))).collect();
    for &r in &regions {
        fill(&mem, r, 1024, |i| u64::from(i % 8) + 1);
    }
    let engine = PageOne::new(mem.clone(), config(2).max_page_sharing(100_000)).unwrap();
    engine.set_pages_per_pass(Some(3 * 512));
    for round in 0..6 {
        engine.merge_pass();
        let gone = regions.remove(round % regions.len());
        mem.remove_region(gone).unwrap();
        let new = mem.add_region(1024, DomainId(0));
        fill(&mem, new, 1024, |i| u64::from(i % 8) + 1);
        regions.push(new);
        let change = engine.refresh_regions();
        assert_eq!((change.added, change.removed), (vec![new], vec![gone]));
        check_counters(&engine, &mem);
    }
    let mut passes = 0;
    while !engine.is_quiet() {
        let report = engine.merge_pass();
        assert!(report.pages <= 3 * 512);
        passes += 1;
        assert!(passes <= 40, "{:?}", engine.stats());
    }
    assert_eq!(mem.accounting().frames, 8);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (8, 4 * 1024 - 8));
    check_counters(&engine, &mem);
}

#[test]
fn unmerge_all_after_a_refresh_covers_the_current_regions() {
    let (mem, engine, regions) = three_merged_regions(2);
    mem.remove_region(regions[1]).unwrap();
    engine.refresh_regions();
    let new = mem.add_region(16, DomainId(0));
    fill(&mem, new, 16, |i| u64::from(i) + 1);
    engine.refresh_regions();
    settle(&engine);
    engine.unmerge_all();
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (0, 0));
    check_counters(&engine, &mem);
    assert_eq!(stats.refused_errors, 0);
    for r in [regions[0], regions[2], new] {
        for i in 0..16 {
            assert_eq!(read(&mem, PageId::new(r, i)), content(u64::from(i) + 1));
        }
    }
    assert_eq!(
        mem.read(PageId::new(regions[1], 0), 0, &mut [0u8; 8]),
        Err(PageError::NoSuchRegion(regions[1]))
    );
}

#[test]
fn the_daemon_goes_on_over_refreshed_regions() {
    // Refreshes while the daemon runs: each waits for the running pass. Counts are
    // checked once the daemon is stopped and the memory settled by hand.
    let mem = Arc::new(SimMemory::new());
    let first = mem.add_region(64, DomainId(0));
    fill(&mem, first, 64, |i| u64::from(i % 4) + 1);
    let engine = PageOne::new(
        mem.clone(),
        config(2)
            .merge_period(std::time::Duration::from_millis(1))
            .base_period(std::time::Duration::from_millis(1)),
    )
    .unwrap();
    engine.start().unwrap();
    let mut live = vec![first];
    for n in 0..20 {
        let r = mem.add_region(64, DomainId(0));
        fill(&mem, r, 64, |i| u64::from(i % 4) + 1);
        live.push(r);
        if n % 2 == 1 {
            let gone = live.remove(0);
            mem.remove_region(gone).unwrap();
        }
        engine.refresh_regions();
    }
    engine.stop();
    settle(&engine);
    engine.collect_garbage();
    assert_eq!(mem.accounting().frames, 4);
    let stats = engine.stats();
    assert_eq!(stats.pages_sharing, live.len() as u64 * 64 - 4);
    check_counters(&engine, &mem);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Regions added and removed between passes, some removed only from the memory for a
    /// while: once every removal is refreshed and the memory settled, the counters agree
    /// with the memory and every page holds its contents.
    #[test]
    fn counters_stay_exact_as_regions_come_and_go(
        steps in proptest::collection::vec((0u8..4, 1u32..40, 0u64..6), 1..10),
        threads in 1usize..3,
    ) {
        let mem = Arc::new(SimMemory::new());
        let engine = PageOne::new(mem.clone(), config(threads)).unwrap();
        let mut live: Vec<(RegionId, u32, u64)> = Vec::new();
        for (op, pages, seed) in steps {
            match op {
                // Add a region whose pages cycle through a few contents (0: zero pages).
                0 | 1 => {
                    let r = mem.add_region(pages, DomainId(0));
                    fill(&mem, r, pages, |i| (u64::from(i) + seed) % 5);
                    live.push((r, pages, seed));
                }
                // Remove the oldest region (the refresh comes later or never).
                2 if !live.is_empty() => {
                    let (r, _, _) = live.remove(0);
                    mem.remove_region(r).unwrap();
                }
                _ => {}
            }
            if seed % 2 == 0 {
                engine.refresh_regions();
            }
            engine.merge_pass();
        }
        engine.refresh_regions();
        settle(&engine);
        check_counters(&engine, &mem);
        let stats = engine.stats();
        let pages: u64 = live.iter().map(|l| u64::from(l.1)).sum();
        prop_assert_eq!(stats.pages_volatile + stats.pages_watched, 0);
        prop_assert_eq!(
            stats.pages_sharing + stats.pages_shared + stats.pages_unshared + stats.zero_pages,
            pages
        );
        for (r, pages, seed) in live {
            for i in 0..pages {
                prop_assert_eq!(
                    read(&mem, PageId::new(r, i)),
                    content((u64::from(i) + seed) % 5)
                );
            }
        }
    }
}
