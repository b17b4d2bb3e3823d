//! PageONE over the simulated memory: merges only identical pages, never loses a write,
//! keeps trust domains apart, unmerges cleanly, and keeps its counters exact.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, RegionId, PAGE_SIZE};
use pageone::{Config, PageOne};
use proptest::prelude::*;

fn config(threads: usize) -> Config {
    Config::default()
        .work_threads(threads)
        .merge_period(Duration::from_millis(5))
        .base_period(Duration::from_millis(5))
}

/// A page whose contents are determined by `seed` (0 = all zeros), with a long shared
/// prefix so the tree's work is not trivial.
fn content(seed: u64) -> Vec<u8> {
    common::content_at(2000, seed)
}

/// Runs merge passes until one finds the memory quiet; returns how many it ran. With two
/// work threads a page whose contents another thread was making canonical at the same
/// time is put off by a pass (a claim lost), so convergence may take a pass more than
/// `stable_periods + 1`.
fn settle<M: page_memory::PageMemory + 'static>(engine: &PageOne<M>) -> u64 {
    for n in 1..=4 {
        if engine.merge_pass().quiet() {
            return n;
        }
    }
    panic!("not quiet after 4 more passes: {:?}", engine.stats());
}

fn read(mem: &SimMemory, p: PageId) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    mem.read(p, 0, &mut buf).unwrap();
    buf
}

/// Every page holds its shadow contents, and pages share a frame only if equal.
fn check_against_shadow(mem: &SimMemory, shadow: &HashMap<PageId, Vec<u8>>) {
    let mut by_content: HashMap<&[u8], Vec<PageId>> = HashMap::new();
    for (p, want) in shadow {
        assert_eq!(&read(mem, *p), want, "{p} lost its contents");
        by_content.entry(want.as_slice()).or_default().push(*p);
    }
    let pages: Vec<PageId> = shadow.keys().copied().collect();
    for (i, a) in pages.iter().enumerate() {
        for b in &pages[i + 1..] {
            if mem.shares_frame(*a, *b).unwrap() {
                assert_eq!(shadow[a], shadow[b], "{a} and {b} share a frame but differ");
            }
        }
    }
}

fn fill(
    mem: &SimMemory,
    r: RegionId,
    pages: u32,
    seed_of: impl Fn(u32) -> u64,
) -> HashMap<PageId, Vec<u8>> {
    common::fill_with(mem, r, pages, |i| content(seed_of(i)))
}

#[test]
fn converges_to_one_frame_per_content_and_zero_pages_take_the_zero_frame() {
    let mem = Arc::new(SimMemory::new());
    let mut shadow = HashMap::new();
    for vm in 0..4 {
        let r = mem.add_region(300, DomainId(0));
        // Seeds 0..50: seed 0 is the zero page; every content appears in every VM.
        shadow.extend(fill(&mem, r, 300, |i| (i as u64 * 7 + vm) % 50));
    }
    let engine = PageOne::new(mem.clone(), config(2)).unwrap();
    for _ in 0..3 {
        engine.merge_pass();
    }
    let settled = settle(&engine);
    let acc = mem.accounting();
    let stats = engine.stats();
    // 49 non-zero contents, each in 24 pages; 24 zero pages.
    assert_eq!(acc.frames, 49);
    assert_eq!(stats.pages_shared, 49);
    assert_eq!(stats.pages_sharing, 49 * 23);
    assert_eq!(stats.zero_pages, 24);
    assert_eq!(stats.pages_sharing, acc.pages_sharing);
    assert_eq!(stats.canonical_indexed, 49);
    assert_eq!(stats.full_scans, 3 + settled);
    assert_eq!(stats.canonicalized, 49);
    assert_eq!(stats.insert_races, 0);
    assert!(stats.general_profit > 0);
    check_against_shadow(&mem, &shadow);
    // Both threads did work.
    assert!(stats.workers.iter().all(|w| w.pages_scanned > 0));
}

#[test]
fn writes_break_sharing_and_are_kept() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(64, DomainId(0));
    let mut shadow = fill(&mem, r, 64, |i| 1 + (i % 2) as u64);
    let engine = PageOne::new(mem.clone(), config(1)).unwrap();
    for _ in 0..3 {
        engine.merge_pass();
    }
    assert_eq!(mem.accounting().frames, 2);
    for i in (0..64).step_by(3) {
        let p = PageId::new(r, i);
        let c = content(1000 + i as u64);
        mem.write(p, 0, &c).unwrap();
        shadow.insert(p, c);
    }
    check_against_shadow(&mem, &shadow);
    engine.merge_pass();
    let stats = engine.stats();
    assert_eq!(stats.cow_breaks, 22);
    assert_eq!(stats.pages_sharing, mem.accounting().pages_sharing);
    // The rewritten pages are volatile, backed off, and merge again once stable.
    for _ in 0..8 {
        engine.merge_pass();
    }
    check_against_shadow(&mem, &shadow);
    assert_eq!(engine.stats().pages_sharing, mem.accounting().pages_sharing);
}

#[test]
fn trust_domains_are_never_merged_unless_joined() {
    for joined in [false, true] {
        let mem = Arc::new(SimMemory::new());
        let a = mem.add_region(16, DomainId(1));
        let b = mem.add_region(16, DomainId(2));
        let mut shadow = fill(&mem, a, 16, |_| 7);
        shadow.extend(fill(&mem, b, 16, |_| 7));
        let mut cfg = config(2);
        if joined {
            cfg.joined_domains = vec![vec![DomainId(1), DomainId(2)]];
        }
        let engine = PageOne::new(mem.clone(), cfg).unwrap();
        for _ in 0..3 {
            engine.merge_pass();
        }
        settle(&engine);
        check_against_shadow(&mem, &shadow);
        let across = mem
            .shares_frame(PageId::new(a, 0), PageId::new(b, 0))
            .unwrap();
        assert_eq!(across, joined, "joined = {joined}");
        assert_eq!(mem.accounting().frames, if joined { 1 } else { 2 });
    }
}

#[test]
fn unmerge_all_restores_private_pages_with_their_contents() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(200, DomainId(0));
    let shadow = fill(&mem, r, 200, |i| (i % 5) as u64);
    let engine = PageOne::new(mem.clone(), config(2)).unwrap();
    for _ in 0..3 {
        engine.merge_pass();
    }
    assert!(engine.stats().pages_sharing > 0);
    engine.unmerge_all();
    // Retired canonical frames are freed once no thread can read them (other tests'
    // threads may hold the epoch back for a while on a loaded machine): wait for that
    // state, however long it takes, rather than for a number of milliseconds.
    while mem.accounting().frames != 200 {
        engine.collect_garbage();
        thread::sleep(Duration::from_millis(1));
    }
    let acc = mem.accounting();
    let stats = engine.stats();
    assert_eq!(acc.pages_sharing, 0);
    assert_eq!(acc.pages_shared, 0);
    assert_eq!(
        (
            stats.pages_sharing,
            stats.pages_shared,
            stats.pages_unshared
        ),
        (0, 0, 0)
    );
    assert_eq!(stats.zero_pages, 0);
    assert_eq!(stats.canonical_indexed, 0, "the trees still index pages");
    check_against_shadow(&mem, &shadow);
    // Every page is private and writable again.
    assert_eq!(acc.frames, 200);
    for i in 0..200 {
        assert!(!mem.is_protected(PageId::new(r, i)).unwrap());
    }
}

#[test]
fn max_page_sharing_caps_one_canonical_page() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(100, DomainId(0));
    let shadow = fill(&mem, r, 100, |_| 9);
    let cfg = config(1).max_page_sharing(10);
    let engine = PageOne::new(mem.clone(), cfg).unwrap();
    for _ in 0..3 {
        engine.merge_pass();
    }
    check_against_shadow(&mem, &shadow);
    // 100 identical pages in groups of at most 10 sharers.
    assert_eq!(mem.accounting().frames, 10);
    assert_eq!(engine.stats().pages_sharing, 90);
}

#[test]
fn concurrent_guest_writers_never_lose_or_tear_a_write() {
    // Writers rewrite their own pages (toggling between duplicate contents, so merges keep
    // happening) and verify every write, while the daemon merges every few milliseconds.
    // Each page is rewritten about every 25 ms, so it is often merged before its next write.
    // They stop once the engine has merged pages and writes have broken merges, and every
    // writer has done a few rounds: decided by counts, however slow the machine is.
    const ROUNDS: u64 = 4;
    let mem = Arc::new(SimMemory::new());
    let regions: Vec<RegionId> = (0..4).map(|_| mem.add_region(256, DomainId(0))).collect();
    for &r in &regions {
        fill(&mem, r, 256, |i| (i % 8) as u64 + 1);
    }
    let engine = PageOne::new(mem.clone(), config(2)).unwrap();
    engine.start().unwrap();
    let stop = AtomicBool::new(false);
    let rounds: [AtomicU64; 2] = Default::default();
    thread::scope(|s| {
        let writers: Vec<_> = regions
            .iter()
            .enumerate()
            .take(2)
            .map(|(w, &r)| {
                let (mem, stop, rounds) = (&mem, &stop, &rounds);
                s.spawn(move || {
                    let mut round = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        round += 1;
                        for i in (w as u32..256).step_by(5) {
                            let p = PageId::new(r, i);
                            // Whole-page write of a duplicate-rich content, then a marker word.
                            let c = content((round + i as u64) % 8 + 1);
                            mem.write(p, 0, &c).unwrap();
                            mem.write_word(p, 100, round).unwrap();
                            let got = read(mem, p);
                            assert_eq!(&got[..800], &c[..800], "torn write on {p}");
                            assert_eq!(&got[808..], &c[808..], "torn write on {p}");
                            assert_eq!(mem.read_word(p, 100).unwrap(), round, "lost write on {p}");
                            thread::sleep(Duration::from_micros(500));
                        }
                        rounds[w].store(round, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        loop {
            let stats = engine.stats();
            let done = stats.merges > 0
                && stats.cow_breaks > 0
                && rounds.iter().all(|r| r.load(Ordering::Relaxed) >= ROUNDS);
            if done || writers.iter().any(|w| w.is_finished()) {
                break; // (a finished writer panicked: the scope reports it)
            }
            thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
    });
    engine.stop();
    let stats = engine.stats();
    assert!(stats.merges > 0, "the engine never merged: {stats:?}");
    assert!(
        stats.cow_breaks > 0,
        "no write ever hit a merged page: {stats:?}"
    );
    // Quiescent: counters agree with the memory's own accounting.
    engine.merge_pass();
    assert_eq!(engine.stats().pages_sharing, mem.accounting().pages_sharing);
}

#[test]
fn budget_spreads_a_full_scan_over_several_passes() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(4096, DomainId(0));
    fill(&mem, r, 4096, |i| (i % 3) as u64 + 1);
    let cfg = config(2).max_page_sharing(10_000);
    let engine = PageOne::new(mem.clone(), cfg).unwrap();
    engine.set_pages_per_pass(Some(1024));
    let mut passes = 0;
    while engine.stats().full_scans < 3 {
        let report = engine.merge_pass();
        assert!(report.pages <= 1024);
        passes += 1;
    }
    assert_eq!(passes, 12);
    assert_eq!(mem.accounting().frames, 3, "{:?}", engine.stats());
}

#[test]
fn stress_millions_of_pages() {
    let pages: u32 = 2_000_000;
    // Most pages are never touched (zero-mapped); one in eight holds data, two thirds of
    // it duplicated.
    let mem = Arc::new(SimMemory::new());
    let per_vm = pages / 4;
    let mut written = 0u64;
    for _ in 0..4 {
        let r = mem.add_region(per_vm, DomainId(0));
        for i in (0..per_vm).step_by(8) {
            let seed = (i as u64 / 8) % (per_vm as u64 / 24) + 1;
            mem.write(PageId::new(r, i), 0, &content(seed)).unwrap();
            written += 1;
        }
    }
    let before = mem.accounting().frames;
    assert_eq!(before, written);
    // Written once before the engine starts: reading every page twice before protecting
    // it (`unchanged_before_protect`) adds nothing to what this test checks but time.
    let engine = PageOne::new(mem.clone(), config(2).unchanged_before_protect(false)).unwrap();
    for _ in 0..3 {
        engine.merge_pass();
    }
    settle(&engine);
    let acc = mem.accounting();
    let distinct = per_vm as u64 / 24;
    assert_eq!(acc.frames, distinct);
    assert_eq!(engine.stats().pages_sharing, written - distinct);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random guest writes interleaved with passes: contents always match a shadow copy,
    /// sharing only joins equal pages, and counters match the memory's accounting.
    #[test]
    fn life_cycle_keeps_contents_and_counters(
        steps in prop::collection::vec(
            prop_oneof![
                3 => (0u32..24, 0u64..4).prop_map(|(p, s)| (Some((p, s)), false)),
                2 => Just((None, true)),
                1 => Just((None, false)),
            ],
            1..60,
        )
    ) {
        let mem = Arc::new(SimMemory::new());
        let r = mem.add_region(24, DomainId(0));
        let mut shadow = fill(&mem, r, 24, |i| (i % 3) as u64);
        let engine = PageOne::new(mem.clone(), config(2).stable_periods(1).max_backoff(1)).unwrap();
        for (write, unmerge) in steps {
            match (write, unmerge) {
                (Some((i, seed)), _) => {
                    let p = PageId::new(r, i);
                    let c = content(seed);
                    mem.write(p, 0, &c).unwrap();
                    shadow.insert(p, c);
                }
                (None, true) => { engine.merge_pass(); }
                (None, false) => { engine.unmerge_all(); }
            }
            check_against_shadow(&mem, &shadow);
        }
        engine.merge_pass();
        let stats = engine.stats();
        prop_assert_eq!(stats.pages_sharing, mem.accounting().pages_sharing);
        prop_assert_eq!(stats.pages_shared, mem.accounting().pages_shared);
    }
}

#[test]
fn dropping_a_running_engine_stops_its_threads() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(128, DomainId(0));
    fill(&mem, r, 128, |i| (i % 4) as u64);
    let engine = PageOne::new(mem.clone(), config(3)).unwrap();
    engine.start().unwrap();
    assert!(engine.is_running());
    // Drop it while the daemon works: after its first merge pass.
    while engine.stats().full_scans == 0 {
        thread::sleep(Duration::from_millis(1));
    }
    drop(engine);
    // The memory is usable and consistent afterwards.
    mem.write(PageId::new(r, 0), 0, b"after").unwrap();
}
