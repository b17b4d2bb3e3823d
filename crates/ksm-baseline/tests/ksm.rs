//! The KSM baseline over the simulated memory: it merges exactly the duplicates, never
//! anything else, and keeps every guest write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ksm_baseline::{Ksm, KsmConfig, KsmThread, RMAP_ITEM_BYTES};
use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, PageMemory, RegionId, PAGE_SIZE};

/// Page contents number `id`: random bytes, never all zero.
fn content(id: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5);
    let mut buf = vec![0u8; PAGE_SIZE];
    rng.fill(&mut buf);
    buf[0] |= 1;
    buf
}

/// A simulated memory and what every page must read as.
struct World {
    mem: Arc<SimMemory>,
    shadow: HashMap<PageId, Vec<u8>>,
}

impl World {
    fn new(regions: usize, pages: u32) -> Self {
        let mem = Arc::new(SimMemory::new());
        for _ in 0..regions {
            mem.add_region(pages, DomainId(0));
        }
        World {
            mem,
            shadow: HashMap::new(),
        }
    }

    fn pages(&self) -> Vec<PageId> {
        let mut v: Vec<PageId> = self
            .mem
            .regions()
            .iter()
            .flat_map(|r| (0..r.pages).map(move |i| PageId::new(r.id, i)))
            .collect();
        v.sort();
        v
    }

    fn write(&mut self, page: PageId, bytes: Vec<u8>) {
        self.mem.write(page, 0, &bytes).unwrap();
        self.shadow.insert(page, bytes);
    }

    fn read(&self, page: PageId) -> Vec<u8> {
        let mut buf = [0u8; PAGE_SIZE];
        self.mem.read_page(page, &mut buf).unwrap();
        buf.to_vec()
    }

    /// Every page reads exactly as its shadow copy (zeros if never written).
    fn check_contents(&self) {
        for page in self.pages() {
            let expected = self
                .shadow
                .get(&page)
                .cloned()
                .unwrap_or_else(|| vec![0; PAGE_SIZE]);
            assert!(self.read(page) == expected, "{page} lost its contents");
        }
    }

    /// Checks that written pages share a frame only if their shadows are equal.
    fn check_sharing_only_between_equals(&self) {
        let pages: Vec<PageId> = self.shadow.keys().copied().collect();
        for (k, &a) in pages.iter().enumerate() {
            for &b in &pages[k + 1..] {
                if self.mem.shares_frame(a, b).unwrap() {
                    assert!(
                        self.shadow[&a] == self.shadow[&b],
                        "{a} and {b} share a frame but differ"
                    );
                }
            }
        }
    }
}

fn config() -> KsmConfig {
    KsmConfig::default().smart_scan(false)
}

#[test]
fn converges_to_exactly_the_expected_sharing() {
    let mut w = World::new(4, 200);
    let mut rng = fastrand::Rng::with_seed(1);
    let mut groups: HashMap<u64, Vec<PageId>> = HashMap::new();
    for page in w.pages() {
        let id = rng.u64(0..500);
        groups.entry(id).or_default().push(page);
        w.write(page, content(id));
    }
    let pages = w.pages().len() as u64;
    let distinct = groups.len() as u64;
    let dup_groups = groups.values().filter(|g| g.len() > 1).count() as u64;

    for smart_scan in [false, true] {
        let mut ksm = Ksm::new(w.mem.clone(), KsmConfig::default().smart_scan(smart_scan));
        let run = ksm.run_until_converged(10);
        // One scan records checksums, one merges, one finds nothing more to do.
        assert!(run.converged);
        assert_eq!(run.full_scans, 3);
        let s = ksm.stats();
        assert_eq!(s.pages_shared, dup_groups);
        assert_eq!(s.pages_sharing, pages - distinct);
        assert_eq!(s.pages_unshared, distinct - dup_groups);
        assert_eq!(s.pages_volatile, 0);
        assert_eq!(s.ksm_zero_pages, 0);
        assert_eq!(s.merges, pages - distinct);
        assert_eq!(s.rmap_items, pages);
        assert_eq!(s.full_scans, 3);
        assert_eq!(s.pages_scanned, 3 * pages);
        assert_eq!(s.metadata_bytes_per_page, RMAP_ITEM_BYTES);
        assert_eq!(
            s.general_profit,
            ((pages - distinct) * PAGE_SIZE as u64) as i64
                - (pages * RMAP_ITEM_BYTES as u64) as i64
        );
        let acc = w.mem.accounting();
        assert_eq!(acc.frames, distinct);
        assert_eq!(acc.pages_shared, dup_groups);
        assert_eq!(acc.pages_sharing, pages - distinct);
        for g in groups.values() {
            for &p in &g[1..] {
                assert!(w.mem.shares_frame(g[0], p).unwrap());
            }
        }
        w.check_contents();
        w.check_sharing_only_between_equals();
        // Start the second round from private pages again.
        let report = ksm.unmerge_all();
        assert_eq!(report.pages_unmerged, pages - distinct + dup_groups);
        assert_eq!(w.mem.accounting().frames, pages);
    }
}

#[test]
fn scan_batches_stop_at_the_end_of_a_full_scan() {
    let mut w = World::new(2, 125);
    for (k, page) in w.pages().into_iter().enumerate() {
        w.write(page, content(k as u64));
    }
    let mut ksm = Ksm::new(w.mem.clone(), config());
    let batches: Vec<_> = (0..4)
        .map(|_| {
            let r = ksm.scan(100);
            (r.pages_scanned, r.full_scan_completed)
        })
        .collect();
    assert_eq!(
        batches,
        [(100, false), (100, false), (50, true), (100, false)]
    );
    assert_eq!(ksm.stats().full_scans, 1);
    assert_eq!(ksm.stats().pages_scanned, 350);
    assert_eq!(ksm.stats().checksum_changes, 250);
    assert_eq!(ksm.last_full_scan().unwrap().pages_scanned, 250);
}

#[test]
fn empty_memory_is_trivially_converged() {
    let mem = Arc::new(SimMemory::new());
    let mut ksm = Ksm::new(mem, config());
    assert_eq!(ksm.scan(100).pages_scanned, 0);
    assert!(ksm.run_until_converged(5).converged);
    assert_eq!(ksm.stats().full_scans, 0);
}

#[test]
fn pages_differing_only_at_their_end_never_merge_and_cost_whole_pages() {
    // KSM's pathological case: every comparison runs to the end of the page.
    let mut tail = World::new(1, 256);
    let base = content(42);
    let mut order: Vec<u16> = (0..256).collect();
    fastrand::Rng::with_seed(5).shuffle(&mut order);
    for (k, page) in tail.pages().into_iter().enumerate() {
        let mut bytes = base.clone();
        bytes[PAGE_SIZE - 2..].copy_from_slice(&order[k].to_be_bytes());
        tail.write(page, bytes);
    }
    let mut ksm = Ksm::new(tail.mem.clone(), config());
    assert!(ksm.run_until_converged(10).converged);
    let s = ksm.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (0, 0));
    assert_eq!(s.pages_unshared, 256);
    assert_eq!(tail.mem.accounting().pages_sharing, 0);
    tail.check_contents();
    let per_cmp_tail = s.bytes_compared as f64 / s.comparisons as f64;
    assert!(per_cmp_tail > 4000.0, "{per_cmp_tail} bytes per comparison");

    // Random pages differ in their first bytes: comparisons stop at once.
    let mut random = World::new(1, 256);
    for (k, page) in random.pages().into_iter().enumerate() {
        random.write(page, content(1000 + k as u64));
    }
    let mut ksm = Ksm::new(random.mem.clone(), config());
    assert!(ksm.run_until_converged(10).converged);
    let r = ksm.stats();
    let per_cmp_random = r.bytes_compared as f64 / r.comparisons as f64;
    assert!(
        per_cmp_random < 2.0,
        "{per_cmp_random} bytes per comparison"
    );
    // About log2(256) comparisons per page in both cases: the difference is their length.
    assert!(r.comparisons.abs_diff(s.comparisons) * 10 < s.comparisons);
}

#[test]
fn max_page_sharing_builds_stable_node_chains() {
    let mut w = World::new(3, 200);
    for page in w.pages() {
        w.write(page, content(7));
    }
    let mut ksm = Ksm::new(w.mem.clone(), config());
    assert!(ksm.run_until_converged(10).converged);
    let s = ksm.stats();
    // 600 pages, at most 256 per frame: frames of 256, 256 and 88.
    assert_eq!((s.pages_shared, s.pages_sharing), (3, 597));
    assert_eq!((s.stable_node_chains, s.stable_node_dups), (1, 3));
    let acc = w.mem.accounting();
    assert_eq!(
        (acc.frames, acc.pages_shared, acc.pages_sharing),
        (3, 3, 597)
    );
    w.check_contents();

    // The smallest limit: frames shared by two pages; the fifth page waits in the
    // unstable tree for a partner.
    let mut w = World::new(1, 5);
    for page in w.pages() {
        w.write(page, content(8));
    }
    let mut ksm = Ksm::new(
        w.mem.clone(),
        config().max_page_sharing(0), // taken as 2, KSM's minimum
    );
    assert_eq!(ksm.config().max_page_sharing, 2);
    assert!(ksm.run_until_converged(10).converged);
    let s = ksm.stats();
    assert_eq!(
        (s.pages_shared, s.pages_sharing, s.pages_unshared),
        (2, 2, 1)
    );
    assert_eq!((s.stable_node_chains, s.stable_node_dups), (1, 2));
    assert_eq!(w.mem.accounting().pages_sharing, 2);
}

#[test]
fn written_pages_are_unshared_and_keep_their_writes() {
    let mut w = World::new(2, 100);
    let pages = w.pages();
    for (k, &page) in pages.iter().enumerate() {
        w.write(page, content((k % 10) as u64)); // 10 groups of 20
    }
    let mut ksm = Ksm::new(w.mem.clone(), config());
    assert!(ksm.run_until_converged(10).converged);
    assert_eq!(ksm.stats().pages_sharing, 190);
    assert_eq!(w.mem.accounting().pages_sharing, 190);

    // Writes to merged pages: a few bytes into some, whole new pages into others, and
    // some become copies of another group.
    let mut rng = fastrand::Rng::with_seed(3);
    for (k, &page) in pages.iter().enumerate().filter(|(k, _)| k % 3 == 0) {
        let mut bytes = w.shadow[&page].clone();
        match k % 4 {
            0 => bytes[rng.usize(0..PAGE_SIZE)] ^= 0xFF,
            1 => bytes = content(5000 + k as u64),
            _ => bytes = content(((k / 3) % 10) as u64),
        }
        w.write(page, bytes.clone());
        // The write is visible at once, and the rest of its group is untouched.
        assert!(w.read(page) == bytes);
    }
    w.check_contents();
    assert!(w.mem.accounting().cow_faults > 0);

    assert!(ksm.run_until_converged(10).converged);
    w.check_contents();
    w.check_sharing_only_between_equals();
    let mut count: HashMap<&[u8], u64> = HashMap::new();
    for bytes in w.shadow.values() {
        *count.entry(bytes).or_default() += 1;
    }
    let expected_sharing: u64 = count.values().map(|n| n - 1).sum();
    let s = ksm.stats();
    assert_eq!(s.pages_sharing, expected_sharing);
    assert_eq!(w.mem.accounting().pages_sharing, expected_sharing);
    assert!(s.cow_breaks > 0);
    assert_eq!(s.pages_volatile, 0);
}

#[test]
fn volatile_pages_are_never_merged() {
    let mut w = World::new(1, 10);
    let pages = w.pages();
    for &page in &pages {
        w.write(page, content(1)); // all equal...
    }
    for smart_scan in [false, true] {
        let mut ksm = Ksm::new(w.mem.clone(), KsmConfig::default().smart_scan(smart_scan));
        for round in 0..12u64 {
            // ...but pages 0 and 1 change before every scan (staying equal to each other).
            for &page in &pages[..2] {
                w.write(page, content(100 + round));
            }
            ksm.scan(usize::MAX);
        }
        let s = ksm.stats();
        assert_eq!(s.pages_sharing, 7);
        assert_eq!(s.pages_volatile, 2);
        assert!(!w.mem.shares_frame(pages[0], pages[1]).unwrap());
        if smart_scan {
            assert!(s.pages_skipped > 0);
        } else {
            assert_eq!(s.pages_skipped, 0);
        }
        w.check_contents();
        ksm.unmerge_all();
    }
}

#[test]
fn zero_pages_go_to_the_zero_frame() {
    let mut w = World::new(2, 50);
    let pages = w.pages();
    for (k, &page) in pages.iter().enumerate() {
        // Written pages with data; every fourth then zeroed again by the guest.
        w.write(page, content(k as u64 % 5));
        if k % 4 == 0 {
            w.write(page, vec![0; PAGE_SIZE]);
        }
    }
    let zeros = pages.len() as u64 / 4;
    let acc = w.mem.accounting();
    assert_eq!(acc.zero_pages, 0);

    let mut ksm = Ksm::new(w.mem.clone(), config().use_zero_pages(true));
    assert!(ksm.run_until_converged(10).converged);
    let s = ksm.stats();
    assert_eq!(s.ksm_zero_pages, zeros);
    assert_eq!(w.mem.accounting().zero_pages, zeros);
    for (k, &page) in pages.iter().enumerate() {
        assert_eq!(w.mem.is_zero_mapped(page).unwrap(), k % 4 == 0);
    }
    // The rest shares as usual: 5 contents among 75 pages.
    assert_eq!((s.pages_shared, s.pages_sharing), (5, 70));
    assert_eq!(s.rmap_items, pages.len() as u64 - zeros);
    assert_eq!(
        s.general_profit,
        ((70 + zeros) * PAGE_SIZE as u64) as i64
            - ((pages.len() as u64 - zeros) * RMAP_ITEM_BYTES as u64) as i64
    );
    // Zero pages the scanner made are not rescanned.
    let before = s.pages_scanned;
    ksm.scan(usize::MAX);
    assert_eq!(
        ksm.stats().pages_scanned - before,
        pages.len() as u64 - zeros
    );

    // A write to a zero page gives it its own frame again; the scanner notices.
    w.write(pages[0], content(77));
    assert!(!w.mem.is_zero_mapped(pages[0]).unwrap());
    assert!(ksm.run_until_converged(10).converged);
    assert_eq!(ksm.stats().ksm_zero_pages, zeros - 1);
    w.check_contents();

    // Without use_zero_pages, pages of zeros share one stable node like any content.
    let report = ksm.unmerge_all();
    assert_eq!(report.errors, 0);
    assert_eq!(w.mem.accounting().zero_pages, 0);
    let mut ksm = Ksm::new(w.mem.clone(), config());
    assert!(ksm.run_until_converged(10).converged);
    let s = ksm.stats();
    assert_eq!(s.ksm_zero_pages, 0);
    // Six contents: the five, and zeros (page 0 has a unique content now).
    assert_eq!((s.pages_shared, s.pages_sharing), (6, 93));
    w.check_contents();
}

#[test]
fn unmerge_all_restores_private_pages() {
    let mut w = World::new(3, 64);
    let pages = w.pages();
    for (k, &page) in pages.iter().enumerate() {
        w.write(page, content(k as u64 % 7));
        if k % 9 == 0 {
            w.write(page, vec![0; PAGE_SIZE]);
        }
    }
    let mut ksm = Ksm::new(w.mem.clone(), KsmConfig::default().use_zero_pages(true));
    assert!(ksm.run_until_converged(10).converged);
    let merged = ksm.stats();
    assert!(merged.pages_sharing > 0 && merged.ksm_zero_pages > 0);

    let report = ksm.unmerge_all();
    assert_eq!(report.errors, 0);
    assert_eq!(
        report.pages_unmerged,
        merged.pages_shared + merged.pages_sharing + merged.ksm_zero_pages
    );
    let acc = w.mem.accounting();
    assert_eq!(
        (
            acc.frames,
            acc.pages_shared,
            acc.pages_sharing,
            acc.zero_pages
        ),
        (pages.len() as u64, 0, 0, 0)
    );
    for &page in &pages {
        assert!(!w.mem.is_protected(page).unwrap());
    }
    w.check_contents();
    let s = ksm.stats();
    assert_eq!(
        (
            s.pages_shared,
            s.pages_sharing,
            s.pages_unshared,
            s.ksm_zero_pages,
            s.rmap_items,
            s.full_scans,
            s.stable_node_chains
        ),
        (0, 0, 0, 0, 0, 0, 0)
    );
    // Pages written after the unmerge are plain private pages.
    w.write(pages[1], content(99));
    w.check_contents();
    // And scanning again merges the same way.
    assert!(ksm.run_until_converged(10).converged);
    let again = ksm.stats();
    assert_eq!(again.ksm_zero_pages, merged.ksm_zero_pages);
    w.check_contents();
    w.check_sharing_only_between_equals();
}

#[test]
fn trust_domains_stay_apart_when_asked() {
    let mem = Arc::new(SimMemory::new());
    let a = mem.add_region(10, DomainId(1));
    let b = mem.add_region(10, DomainId(2));
    for r in [a, b] {
        for i in 0..10 {
            mem.write(PageId::new(r, i), 0, &content(3)).unwrap();
        }
    }
    let mut apart = Ksm::new(mem.clone(), config().merge_across_domains(false));
    assert!(apart.run_until_converged(10).converged);
    assert_eq!(
        (apart.stats().pages_shared, apart.stats().pages_sharing),
        (2, 18)
    );
    assert!(!mem
        .shares_frame(PageId::new(a, 0), PageId::new(b, 0))
        .unwrap());
    apart.unmerge_all();

    let mut together = Ksm::new(mem.clone(), config());
    assert!(together.run_until_converged(10).converged);
    assert_eq!(
        (
            together.stats().pages_shared,
            together.stats().pages_sharing
        ),
        (1, 19)
    );
    assert!(mem
        .shares_frame(PageId::new(a, 0), PageId::new(b, 9))
        .unwrap());
}

#[test]
fn regions_added_later_join_at_the_next_full_scan() {
    let mut w = World::new(1, 20);
    for page in w.pages() {
        w.write(page, content(1));
    }
    let mut ksm = Ksm::new(w.mem.clone(), config());
    assert!(ksm.run_until_converged(10).converged);
    let r = w.mem.add_region(20, DomainId(0));
    for i in 0..20 {
        w.write(PageId::new(r, i), content(1));
    }
    assert!(ksm.run_until_converged(10).converged);
    assert_eq!(ksm.stats().pages_sharing, 39);
    assert_eq!(w.mem.accounting().frames, 1);
    w.check_contents();
}

#[test]
fn background_scanner_with_racing_guest_writers() {
    const REGIONS: usize = 4;
    const PAGES: u32 = 48;
    let mem = Arc::new(SimMemory::new());
    let regions: Vec<RegionId> = (0..REGIONS)
        .map(|_| mem.add_region(PAGES, DomainId(0)))
        .collect();
    // Same contents at the same index in every region: duplicates across "VMs".
    for &r in &regions {
        for i in 0..PAGES {
            mem.write(PageId::new(r, i), 0, &content(i as u64 % 16))
                .unwrap();
        }
    }
    let ksmd = KsmThread::spawn(
        Ksm::new(mem.clone(), KsmConfig::default().use_zero_pages(true)),
        32,
        Duration::ZERO,
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let total_writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = regions
        .iter()
        .enumerate()
        .map(|(t, &r)| {
            let (mem, stop, total_writes) = (mem.clone(), stop.clone(), total_writes.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t as u64);
                let mut mine: Vec<Vec<u8>> = (0..PAGES).map(|i| content(i as u64 % 16)).collect();
                let mut buf = [0u8; PAGE_SIZE];
                let mut writes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.u32(0..PAGES);
                    let page = PageId::new(r, i);
                    // Small writes, whole pages of a shared content, or zeros.
                    match rng.u8(0..4) {
                        0 => {
                            let at = rng.usize(0..PAGE_SIZE - 8);
                            let v = rng.u64(..).to_ne_bytes();
                            mem.write(page, at, &v).unwrap();
                            mine[i as usize][at..at + 8].copy_from_slice(&v);
                        }
                        1 => {
                            let c = content(rng.u64(0..16));
                            mem.write(page, 0, &c).unwrap();
                            mine[i as usize] = c;
                        }
                        2 => {
                            mem.write(page, 0, &[0; PAGE_SIZE]).unwrap();
                            mine[i as usize] = vec![0; PAGE_SIZE];
                        }
                        _ => {}
                    }
                    writes += 1;
                    total_writes.fetch_add(1, Ordering::Relaxed);
                    // Every page of this writer still reads as it was last written.
                    let j = rng.u32(0..PAGES);
                    mem.read_page(PageId::new(r, j), &mut buf).unwrap();
                    assert!(
                        buf[..] == mine[j as usize][..],
                        "writer {t}: page {j} changed"
                    );
                    mem.read_page(page, &mut buf).unwrap();
                    assert!(
                        buf[..] == mine[i as usize][..],
                        "writer {t}: lost write to {i}"
                    );
                    if writes % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                mine
            })
        })
        .collect();
    // The writers run until the scanner has merged pages under them and has completed
    // full scans while they wrote: decided by counts, however slow the machine.
    const WRITES: u64 = 20_000;
    const FULL_SCANS: u64 = 5;
    let mut during = ksmd.stats();
    while during.merges == 0
        || during.full_scans < FULL_SCANS
        || total_writes.load(Ordering::Relaxed) < WRITES
    {
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "a writer stopped early (it panicked)"
        );
        std::thread::sleep(Duration::from_millis(1));
        during = ksmd.stats();
    }
    stop.store(true, Ordering::Relaxed);
    let finals: Vec<Vec<Vec<u8>>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        during.merges > 0,
        "the scanner merged nothing while writers ran"
    );
    let mut ksm = ksmd.stop();

    // Quiet memory now: the scanner converges to exactly the duplicates left. Smart scan
    // goes off first: after the write storm many pages are old enough to be skipped 8
    // scans in 9, and two such duplicates whose cycles never line up would never meet in
    // the same unstable tree (in KSM too).
    ksm.set_smart_scan(false);
    assert!(ksm.run_until_converged(20).converged);
    let mut count: HashMap<&[u8], u64> = HashMap::new();
    let mut zeros = 0;
    for (t, pages) in finals.iter().enumerate() {
        for (i, bytes) in pages.iter().enumerate() {
            let mut buf = [0u8; PAGE_SIZE];
            mem.read_page(PageId::new(regions[t], i as u32), &mut buf)
                .unwrap();
            assert!(
                buf[..] == bytes[..],
                "page {i} of writer {t} lost its contents"
            );
            if bytes.iter().all(|&b| b == 0) {
                zeros += 1;
            } else {
                *count.entry(bytes).or_default() += 1;
            }
        }
    }
    // Pages of zeros go to the zero frame, except where that merge lost a race with a
    // writer: then, as in KSM, the page went on to the trees and may have formed a stable
    // node of zeros, which stays.
    let zero_frames: Vec<PageId> = finals
        .iter()
        .enumerate()
        .flat_map(|(t, pages)| {
            let r = regions[t];
            pages.iter().enumerate().filter_map(move |(i, b)| {
                b.iter()
                    .all(|&x| x == 0)
                    .then_some(PageId::new(r, i as u32))
            })
        })
        .filter(|&p| !mem.is_zero_mapped(p).unwrap())
        .collect();
    let mut clusters: Vec<PageId> = Vec::new();
    for &p in &zero_frames {
        if !clusters.iter().any(|&q| mem.shares_frame(p, q).unwrap()) {
            clusters.push(p);
        }
    }
    let expected_sharing: u64 =
        count.values().map(|n| n - 1).sum::<u64>() + (zero_frames.len() - clusters.len()) as u64;
    let s = ksm.stats();
    assert_eq!(s.ksm_zero_pages, zeros - zero_frames.len() as u64);
    assert_eq!(s.pages_sharing, expected_sharing);
    let acc = mem.accounting();
    assert_eq!(acc.zero_pages, s.ksm_zero_pages);
    assert_eq!(acc.pages_sharing, expected_sharing);
    assert_eq!(acc.frames, (count.len() + clusters.len()) as u64);
    eprintln!(
        "racing writers: {} merges while they ran, {} zero pages left in stable nodes",
        during.merges,
        zero_frames.len()
    );
}
