//! PageONE over the Linux backend (feature `linux`): the engine deduplicates real memory,
//! unmerges it all again, and survives a region unmapped under it. (page-memory's own
//! tests drive the backend directly; these are the engine-over-Linux ones.) Tests skip,
//! with the reason printed, where userfaultfd write-protect is unavailable.
#![cfg(feature = "linux")]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use page_memory::linux::test_util::*;
use page_memory::linux::{Backing, LinuxMemory};
use page_memory::{is_zero_page, DomainId, PageError, PageId, PageMemory, RegionId, PAGE_SIZE};
use pageone::{Config, PageOne};

const PAGE: u64 = PAGE_SIZE as u64;

/// PageONE over `mem` with its daemon running fast (2 work threads, passes every few
/// milliseconds), once it has merged at least 100 pages (asserted, within 5 s).
fn merging_engine(mem: &Arc<LinuxMemory>) -> PageOne<LinuxMemory> {
    let engine = PageOne::new(
        mem.clone(),
        Config::default()
            .work_threads(2)
            .merge_period(Duration::from_millis(4))
            .base_period(Duration::from_millis(2))
            .stable_periods(1),
    )
    .expect("the engine's threads");
    engine.start().expect("the engine's daemon thread");
    let t0 = Instant::now();
    while engine.stats().pages_sharing < 100 && t0.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(2));
    }
    assert!(engine.stats().pages_sharing >= 100);
    engine
}

fn fill_duplicates(mem: &LinuxMemory, regions: &[RegionId], pages_each: u32, distinct: u64) {
    for (n, &r) in regions.iter().enumerate() {
        for i in 0..pages_each {
            let p = PageId::new(r, i);
            // Two thirds of the regions are copies of the first third, page for page; one
            // page in 16 is zeros.
            if i % 16 == 15 {
                continue;
            }
            let base = (n % (regions.len().div_ceil(3))) as u64 * pages_each as u64;
            fill(mem, p, 1 + (base + i as u64) % distinct);
        }
    }
}

/// PageONE on real memory: merges, frees the memory, survives writes, unmerges all.
#[test]
fn pageone_deduplicates_real_memory_and_unmerge_all_restores_every_page() {
    let Some(mem) = memory() else { return };
    let mem = Arc::new(mem);
    const PAGES: u32 = 1024;
    let regions: Vec<RegionId> = (0..6)
        .map(|_| mem.add_region(PAGES, DomainId(0)).unwrap())
        .collect();
    let distinct = u64::MAX; // every page of a region distinct
    fill_duplicates(&mem, &regions, PAGES, distinct);
    let expect = |n: usize, i: u32| -> Option<u64> {
        (i % 16 != 15).then(|| 1 + ((n % 2) as u64 * PAGES as u64 + i as u64))
    };
    let before = mem.usage().unwrap();
    show("pageone: before", &before);
    let engine =
        PageOne::new(mem.clone(), Config::default().work_threads(2)).expect("the engine's threads");
    let t0 = Instant::now();
    // Merged by the third pass, but with two threads a content both claimed at once may
    // wait a pass: run passes until one changes nothing and leaves nothing pending.
    let passes = (1..=8)
        .find(|_| engine.merge_pass().quiet())
        .expect("quiet within 8 merge passes");
    assert!(passes >= 3);
    let elapsed = t0.elapsed();
    let s = engine.stats();
    let nonzero = PAGES as u64 * 15 / 16;
    // 2 distinct regions' worth of non-zero contents; 6 regions.
    assert_eq!(s.pages_shared + s.pages_unshared, 2 * nonzero);
    assert_eq!(s.pages_sharing, 4 * nonzero);
    assert_eq!(s.zero_pages, 6 * PAGES as u64 / 16);
    let merged = mem.usage().unwrap();
    show("pageone: merged", &merged);
    eprintln!(
        "pageone: {passes} merge passes over {} pages in {:?}; backend {:?}",
        6 * PAGES,
        elapsed,
        mem.stats()
    );
    assert_eq!(merged.region_anonymous, 0);
    assert_eq!(merged.store_bytes, 2 * nonzero * PAGE);
    // The zero pages were never written, so they held no memory to free.
    assert_eq!(
        before.total_bytes() - merged.total_bytes(),
        4 * nonzero * PAGE
    );
    // Same layouts: each run of 15 merged pages is one mapping (the zero page between two
    // runs is another), not one per page.
    assert_eq!(merged.region_mappings, 6 * 2 * (PAGES as u64 / 16));
    for (n, &r) in regions.iter().enumerate() {
        for i in 0..PAGES {
            match expect(n, i) {
                Some(seed) => assert!(holds(&mem, PageId::new(r, i), seed)),
                None => assert_eq!(mem.backing(PageId::new(r, i)).unwrap(), Backing::Zero),
            }
        }
    }
    // The guest writes some merged pages; the next pass notices.
    for i in 0..10 {
        word(&mem, PageId::new(regions[3], i), 0).store(i as u64, Ordering::Relaxed);
    }
    engine.merge_pass();
    assert_eq!(engine.stats().cow_breaks, 10);
    // Unmerge all: every page private again, with its contents.
    engine.unmerge_all();
    // The engine's trees retire canonical frames through an epoch: let it free them.
    let t0 = Instant::now();
    while mem.stats().store_slots > 0 && t0.elapsed() < Duration::from_secs(5) {
        engine.collect_garbage();
        thread::sleep(Duration::from_millis(5));
    }
    drop(engine);
    for (n, &r) in regions.iter().enumerate() {
        for i in 0..PAGES {
            let p = PageId::new(r, i);
            let b = mem.backing(p).unwrap();
            assert!(
                matches!(b, Backing::Private | Backing::PrivateCopy),
                "{p}: {b:?}"
            );
            if n == 3 && i < 10 {
                assert_eq!(word(&mem, p, 0).load(Ordering::Relaxed), i as u64);
            } else {
                match expect(n, i) {
                    Some(seed) => assert!(holds(&mem, p, seed)),
                    None => {
                        let mut buf = [1u8; PAGE_SIZE];
                        mem.read_page(p, &mut buf).unwrap();
                        assert!(is_zero_page(&buf));
                    }
                }
            }
        }
    }
    let after = mem.usage().unwrap();
    show("pageone: unmerged all", &after);
    assert_eq!(after.store_bytes, 0, "every store page freed");
    assert_eq!(mem.stats().store_slots, 0);
    assert_eq!(after.region_anonymous, 6 * PAGES as u64 * PAGE);
}

/// An embedder unmaps a region under a running engine: errors, no crash.
#[test]
fn a_region_unmapped_under_a_running_engine_yields_errors() {
    let Some(mem) = memory() else { return };
    let mem = Arc::new(mem);
    const PAGES: usize = 512;
    let len = PAGES * PAGE_SIZE;
    let base = embedder_mmap(len);
    // SAFETY: the mapping just made: private, anonymous, page-aligned, ours.
    let r = unsafe { mem.adopt_region(base, len, DomainId(0)) }.unwrap();
    let keep = mem.add_region(64, DomainId(0)).unwrap();
    for i in 0..PAGES as u32 {
        fill(&mem, PageId::new(r, i), 1 + (i % 8) as u64);
    }
    for i in 0..64 {
        fill(&mem, PageId::new(keep, i), 1 + (i % 8) as u64);
    }
    let engine = merging_engine(&mem);
    // The embedder unmaps the region behind the engine's back (the address stays reserved,
    // so that no other test's mapping can land where the memory still has a region).
    unmap_keeping_the_address(base, len);
    thread::sleep(Duration::from_millis(100));
    let passes = engine.stats().full_scans;
    thread::sleep(Duration::from_millis(50));
    assert!(
        engine.stats().full_scans > passes,
        "the engine keeps running"
    );
    engine.stop();
    // Every operation on the region fails cleanly once the backend has noticed.
    let mut buf = [0u8; PAGE_SIZE];
    let reads: Vec<_> = (0..PAGES as u32)
        .map(|i| mem.read_page(PageId::new(r, i), &mut buf))
        .collect();
    assert!(reads
        .iter()
        .any(|r| matches!(r, Err(PageError::Unmapped(_)))));
    let p = PageId::new(r, 3);
    assert_eq!(mem.protect(&[p])[0], Err(PageError::Unmapped(r)));
    assert_eq!(mem.recycle(&[p])[0], Err(PageError::Unmapped(r)));
    assert_eq!(mem.unmerge(p), Err(PageError::Unmapped(r)));
    assert!(mem.usage().is_ok());
    // The other region is fine.
    assert!(holds(&mem, PageId::new(keep, 9), 2));
    drop(engine);
    drop(mem);
    // SAFETY: the reservation made above; no memory refers to the range any more.
    unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
}

/// A balloon discards guest pages and the embedder declares a pinned range while PageONE
/// runs: discarded pages read zeros, pinned pages are never merged (the engine's protect
/// calls are refused and counted), every other page keeps its contents, and none of the
/// backend's own remaps is taken for the embedder's.
#[test]
fn discards_and_declared_pins_under_a_running_engine() {
    let Some(mem) = memory() else { return };
    let mem = Arc::new(mem);
    const PAGES: u32 = 256;
    let regions: Vec<RegionId> = (0..3)
        .map(|_| mem.add_region(PAGES, DomainId(0)).unwrap())
        .collect();
    fill_duplicates(&mem, &regions, PAGES, u64::MAX);
    // Three regions: each a copy of the first (see `fill_duplicates`).
    let expect = |i: u32| -> Option<u64> { (i % 16 != 15).then(|| 1 + i as u64) };
    // Region 0's first 16 pages are pinned before the engine starts.
    mem.declare_pinned(regions[0], 0..16).unwrap();
    let engine = merging_engine(&mem);
    // The balloon takes region 1's first 64 pages (merged ones among them).
    let balloon: Vec<PageId> = (0..64).map(|i| PageId::new(regions[1], i)).collect();
    let out = mem.discard(&balloon);
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    thread::sleep(Duration::from_millis(100));
    engine.stop();
    for (n, &r) in regions.iter().enumerate() {
        for i in 0..PAGES {
            let p = PageId::new(r, i);
            if n == 1 && i < 64 {
                let mut buf = [1u8; PAGE_SIZE];
                mem.read_page(p, &mut buf).unwrap();
                assert!(is_zero_page(&buf), "{p} discarded, yet not zeros");
                continue;
            }
            if n == 0 && i < 16 {
                let b = mem.backing(p).unwrap();
                assert!(
                    matches!(b, Backing::Private),
                    "{p} is declared pinned, yet {b:?}"
                );
                assert!(!mem.is_protected(p).unwrap());
            }
            match expect(i) {
                Some(seed) => assert!(holds(&mem, p, seed), "{p}"),
                None => {
                    let mut buf = [1u8; PAGE_SIZE];
                    mem.read_page(p, &mut buf).unwrap();
                    assert!(is_zero_page(&buf), "{p}");
                }
            }
        }
    }
    let st = mem.stats();
    eprintln!("backend after the balloon and the pins: {st:?}");
    assert!(st.pin_refusals > 0, "the engine never met the pinned pages");
    assert_eq!(st.discarded, 64);
    assert_eq!((st.foreign_unmaps, st.foreign_removes), (0, 0));
    drop(engine);
}
