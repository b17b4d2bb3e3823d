//! Convergence and the mapping budget, decided by counts: what each merge pass reports,
//! how many passes a quiet memory needs, pages refused for the mapping limit parked (not
//! retried every pass) and retried when the limit is raised or after a back-off, the
//! embedder told once per episode, and one canonicalization per content with two threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use page_memory::sim::{SimFrame, SimMemory};
use page_memory::{
    DirtyHook, DomainId, MergeOutcome, PageError, PageId, PageMemory, ProtectToken, RegionId,
    RegionInfo, PAGE_SIZE,
};
use pageone::{Config, Event, PageOne};

/// A page whose contents are determined by `seed` (0 = all zeros).
fn content(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if seed != 0 {
        p[100..108].copy_from_slice(&seed.to_le_bytes());
        p[PAGE_SIZE - 8..].copy_from_slice(&(seed * 31).to_le_bytes());
    }
    p
}

fn fill(mem: &SimMemory, r: RegionId, pages: u32, seed_of: impl Fn(u32) -> u64) {
    for i in 0..pages {
        mem.write(PageId::new(r, i), 0, &content(seed_of(i)))
            .unwrap();
    }
}

/// A memory whose merges and canonicalizations spend a budget of mappings, one each, and
/// are refused with `MapCountLimit` once it is spent (the way the Linux backend refuses
/// near `vm.max_map_count`); pages in `pinned` are refused protection as pinned. It counts
/// what the engine asks of it.
struct Budgeted {
    sim: SimMemory,
    /// Mappings left.
    budget: AtomicU64,
    /// The limit reported (raised by the test).
    limit: AtomicU64,
    pinned: Mutex<Vec<PageId>>,
    /// Pages offered to merge or canonicalize (refused ones included).
    offered: AtomicU64,
    /// If set, region `i` spends its own budget `i` (as pageoned's memory gives each VMM
    /// process its own), of these mappings left, instead of `budget`.
    per_region: Option<Vec<AtomicU64>>,
    /// Protect calls for pinned pages.
    pinned_protects: AtomicU64,
}

impl Budgeted {
    fn new(budget: u64) -> Self {
        Budgeted {
            sim: SimMemory::new(),
            budget: AtomicU64::new(budget),
            limit: AtomicU64::new(1000),
            pinned: Mutex::new(Vec::new()),
            offered: AtomicU64::new(0),
            pinned_protects: AtomicU64::new(0),
            per_region: None,
        }
    }

    /// Region `i` has budget `i` of `budgets[i]` mappings.
    fn per_region(budgets: &[u64]) -> Self {
        Budgeted {
            per_region: Some(budgets.iter().map(|&b| AtomicU64::new(b)).collect()),
            ..Budgeted::new(0)
        }
    }

    /// What `budget` has left.
    fn left(&self, budget: u64) -> &AtomicU64 {
        match &self.per_region {
            Some(b) => &b[budget as usize],
            None => &self.budget,
        }
    }

    /// Takes one mapping from `page`'s budget, or refuses.
    fn spend(&self, page: PageId) -> Result<(), PageError> {
        self.offered.fetch_add(1, Ordering::Relaxed);
        self.left(self.mapping_budget(page.region))
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .map(|_| ())
            .map_err(|_| PageError::MapCountLimit {
                limit: self.limit.load(Ordering::Relaxed),
                mappings: self.limit.load(Ordering::Relaxed) - 10,
            })
    }
}

impl PageMemory for Budgeted {
    type Frame = SimFrame;

    fn regions(&self) -> Vec<RegionInfo> {
        self.sim.regions()
    }
    fn read_page(&self, page: PageId, buf: &mut [u8; PAGE_SIZE]) -> Result<(), PageError> {
        self.sim.read_page(page, buf)
    }
    fn read_words(&self, page: PageId, out: &mut [u64]) -> Result<(), PageError> {
        self.sim.read_words(page, out)
    }
    fn protect(&self, pages: &[PageId]) -> Vec<Result<ProtectToken, PageError>> {
        let pinned = self.pinned.lock().unwrap().clone();
        pages
            .iter()
            .map(|p| {
                if pinned.contains(p) {
                    self.pinned_protects.fetch_add(1, Ordering::Relaxed);
                    Err(PageError::Pinned(*p))
                } else {
                    self.sim.protect(&[*p]).pop().unwrap()
                }
            })
            .collect()
    }
    fn unprotect(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        self.sim.unprotect(pages)
    }
    fn written_since(&self, page: PageId, token: ProtectToken) -> Result<bool, PageError> {
        self.sim.written_since(page, token)
    }
    fn canonicalize(&self, page: PageId, token: ProtectToken) -> Result<SimFrame, PageError> {
        self.spend(page)?;
        self.sim.canonicalize(page, token)
    }
    fn merge(
        &self,
        dup: PageId,
        token: ProtectToken,
        canonical: &SimFrame,
    ) -> Result<MergeOutcome, PageError> {
        // Zero merges drop the page: no mapping spent.
        if canonical.as_ref() != self.sim.zero_frame().as_ref() {
            self.spend(dup)?;
        }
        self.sim.merge(dup, token, canonical)
    }
    fn zero_frame(&self) -> SimFrame {
        self.sim.zero_frame()
    }
    fn mapping_limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::Relaxed))
    }
    fn mappings_in_use(&self, _recount: bool) -> Option<u64> {
        self.budget_in_use(0, false)
    }
    fn mapping_budget(&self, region: RegionId) -> u64 {
        match self.per_region {
            Some(_) => region.0 as u64,
            None => 0,
        }
    }
    fn budget_in_use(&self, budget: u64, _recount: bool) -> Option<u64> {
        let limit = self.limit.load(Ordering::Relaxed);
        Some(limit.saturating_sub(self.left(budget).load(Ordering::Relaxed)))
    }
    fn recycle(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        self.sim.recycle(pages)
    }
    fn unmerge(&self, page: PageId) -> Result<(), PageError> {
        self.sim.unmerge(page)
    }
    fn set_dirty_hook(&self, hook: Option<DirtyHook>) {
        self.sim.set_dirty_hook(hook)
    }
}

/// A quiet memory needs `stable_periods + 2` merge passes: protect, watch
/// (`stable_periods - 1` passes), merge, and one that finds nothing to do; each pass
/// reports what it changed. With `unchanged_before_protect` (the default) the first pass
/// reads the pages instead and the second protects those it finds unchanged, which
/// counts as their first stable period: the same number of passes for
/// `stable_periods >= 2`, one more for 1.
#[test]
fn a_quiet_memory_needs_stable_periods_plus_two_passes() {
    for unchanged in [false, true] {
        for stable in 1..=3u8 {
            let mem = Arc::new(SimMemory::new());
            let r = mem.add_region(100, DomainId(0));
            // 10 contents, each in 9 pages; 10 zero pages.
            fill(&mem, r, 100, |i| (i % 11) as u64);
            let config = Config::default()
                .work_threads(1)
                .stable_periods(stable)
                .unchanged_before_protect(unchanged);
            let engine = PageOne::new(mem.clone(), config).unwrap();
            let first = engine.merge_pass();
            let watching = if unchanged {
                assert_eq!((first.protected, first.watching), (0, 100));
                assert!(!first.quiet());
                let second = engine.merge_pass();
                assert_eq!((second.protected, second.watching), (100, 100));
                stable.saturating_sub(2)
            } else {
                assert_eq!((first.protected, first.watching), (100, 100));
                stable - 1
            };
            for _ in 0..watching {
                let watch = engine.merge_pass();
                assert_eq!((watch.protected, watch.watching, watch.merged), (0, 100, 0));
                assert!(!watch.quiet() && !engine.is_quiet());
            }
            let merge = engine.merge_pass();
            assert_eq!(merge.canonicalized, 10);
            assert_eq!(merge.merged, 80);
            assert_eq!(merge.zero_merged, 10);
            assert_eq!((merge.refused(), merge.deferred, merge.watching), (0, 0, 0));
            assert!(!merge.quiet());
            let last = engine.merge_pass();
            assert!(last.quiet(), "stable_periods {stable}: {last:?}");
            assert!(engine.is_quiet());
            assert_eq!(mem.accounting().frames, 10);
            let s = engine.stats();
            assert_eq!((s.canonicalized, s.insert_races, s.merges), (10, 0, 90));
        }
    }
}

/// A write makes the memory busy again: the pass that sees it reports it, and the
/// memory is quiet again once the page has been through its back-off, watch and merge.
#[test]
fn a_write_is_reported_and_the_memory_settles_again() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(64, DomainId(0));
    fill(&mem, r, 64, |i| (i % 4) as u64 + 1);
    let engine = PageOne::new(mem.clone(), Config::default().work_threads(1)).unwrap();
    let passes = (0..4).map(|_| engine.merge_pass()).collect::<Vec<_>>();
    assert!(passes[3].quiet());
    mem.write(PageId::new(r, 5), 0, &content(2)).unwrap(); // same contents, but a write
    let seen = engine.merge_pass();
    assert_eq!((seen.written, seen.unmerged, seen.backing_off), (1, 1, 1));
    assert!(!seen.quiet() && !engine.is_quiet());
    // The pass that saw the write skipped it (back-off 1); then read it, protect it
    // (found unchanged: its first stable period), merge, quiet.
    let rest: Vec<_> = (0..4).map(|_| engine.merge_pass()).collect();
    assert_eq!((rest[0].protected, rest[1].protected), (0, 1));
    assert_eq!(rest[2].merged, 1);
    assert!(rest[3].quiet());
    assert_eq!(mem.accounting().frames, 4);
}

/// Pages refused for the mapping limit are parked: not offered to the backend again while
/// the gate is closed (back-off doubling per refusal in a row), counted by reason, the
/// embedder told once; raising the limit lets them merge at the next pass.
#[test]
fn map_count_refusals_are_parked_reported_once_and_retried_when_the_limit_rises() {
    let mem = Arc::new(Budgeted::new(20));
    let r = mem.sim.add_region(200, DomainId(0));
    // 50 contents, each in 4 scattered pages.
    fill(&mem.sim, r, 200, |i| (i * 37 % 50) as u64 + 1);
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let engine = PageOne::new(
        mem.clone(),
        Config::default()
            .work_threads(1)
            .on_event(move |e: &Event| log.lock().unwrap().push(*e)),
    )
    .unwrap();
    for _ in 0..2 {
        engine.merge_pass();
    }
    let hit = engine.merge_pass();
    // 20 mappings spent (canonical pages and merges), the rest of the 200 refused.
    assert_eq!(hit.canonicalized + hit.merged, 20);
    assert!(hit.refused_map_count > 0);
    assert_eq!(hit.refused_changed + hit.refused_errors, 0);
    assert_eq!(hit.parked, 200 - 20);
    assert!(!hit.quiet());
    let s = engine.stats();
    assert_eq!(s.refused_map_count, hit.refused_map_count);
    assert_eq!(s.merge_races, 0);
    assert_eq!((s.map_count_limit, s.map_count_mappings), (1000, 990));
    assert_eq!(s.map_count_parked, 180);
    assert_eq!(
        *events.lock().unwrap(),
        vec![Event::MapCountLimit {
            limit: 1000,
            mappings: 990
        }]
    );
    // 60 passes at the limit: the parked pages are offered again only on back-off
    // expiry (after 1, 2, 4, 8, 16, 32 passes), each time refused at the first page of
    // each chunk... and the event is not repeated.
    let offered = mem.offered.load(Ordering::Relaxed);
    let mut retries = 0;
    for _ in 0..60 {
        let p = engine.merge_pass();
        if p.refused_map_count > 0 {
            retries += 1;
        }
        assert_eq!(p.canonicalized + p.merged, 0);
    }
    assert!(retries <= 6, "{retries} retries in 60 passes");
    let per_retry = 180; // every parked page is offered once per retry
    assert!(mem.offered.load(Ordering::Relaxed) - offered <= retries * per_retry);
    assert_eq!(events.lock().unwrap().len(), 1);
    assert_eq!(engine.stats().map_count_events, 1);
    // The limit is raised: the next pass retries at once and everything merges.
    mem.budget.store(1000, Ordering::Relaxed);
    mem.limit.store(100_000, Ordering::Relaxed);
    let after = engine.merge_pass();
    assert_eq!(after.refused_map_count, 0);
    assert_eq!(after.parked, 0);
    assert_eq!(mem.sim.accounting().frames, 50);
    assert!(engine.merge_pass().quiet());
    assert_eq!(engine.stats().map_count_parked, 0);
}

/// A page the backend refuses as pinned is counted as such and tried again only after a
/// back-off, not every pass; the memory is not quiet while it is refused.
#[test]
fn pinned_refusals_are_counted_and_backed_off() {
    let mem = Arc::new(Budgeted::new(1000));
    let r = mem.sim.add_region(16, DomainId(0));
    fill(&mem.sim, r, 16, |i| (i % 2) as u64 + 1);
    mem.pinned.lock().unwrap().push(PageId::new(r, 3));
    let engine = PageOne::new(
        mem.clone(),
        Config::default().work_threads(1).max_backoff(4),
    )
    .unwrap();
    let mut refused = 0;
    for _ in 0..20 {
        let p = engine.merge_pass();
        refused += p.refused_pinned;
        assert!(!p.quiet());
    }
    let tries = mem.pinned_protects.load(Ordering::Relaxed);
    assert_eq!(refused, tries);
    assert_eq!(engine.stats().refused_pinned, tries);
    // Back-off 1, 2, 4, 4...: 1 + 2 + 4 + 4 + ... passes between tries.
    assert!((4..=6).contains(&tries), "{tries} tries in 20 passes");
    assert_eq!(mem.sim.accounting().frames, 3); // 2 canonical + the pinned page
}

/// Two threads, eight VMs with the same contents: each content is made canonical once
/// (claims), no canonicalization is lost to an insert race, and the memory converges.
#[test]
fn each_content_is_canonicalized_once_with_two_threads() {
    let mem = Arc::new(SimMemory::new());
    for _ in 0..8 {
        let r = mem.add_region(1024, DomainId(0));
        fill(&mem, r, 1024, |i| i as u64 % 700 + 1);
    }
    let engine = PageOne::new(mem.clone(), Config::default().work_threads(2)).unwrap();
    let mut passes = 0;
    let mut deferred = 0;
    loop {
        let p = engine.merge_pass();
        passes += 1;
        deferred += p.deferred;
        if p.quiet() {
            break;
        }
        assert!(passes < 10, "not quiet after {passes} passes: {p:?}");
    }
    let s = engine.stats();
    assert_eq!(s.canonicalized, 700);
    assert_eq!(s.insert_races, 0);
    assert_eq!(s.claim_deferrals, deferred);
    assert_eq!(mem.accounting().frames, 700);
    assert_eq!(s.pages_sharing, 8 * 1024 - 700);
    // Each deferral costs one pass at most.
    assert!(passes <= 4 + usize::from(deferred > 0));
}

/// With a budget (`pages_per_pass`), no single pass sees every page, so no report is
/// quiet; the engine is quiet once the last pass over each chunk was, and a write makes
/// it busy again at the next pass over the written chunk.
#[test]
fn is_quiet_works_with_a_budget() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(2048, DomainId(0)); // 4 chunks of 512 pages
    fill(&mem, r, 2048, |i| (i % 64) as u64 + 1);
    let engine = PageOne::new(
        mem.clone(),
        Config::default().work_threads(1).pages_per_pass(Some(1024)),
    )
    .unwrap();
    // Two passes per round of the chunks; quiet after stable_periods + 2 = 4 rounds.
    for pass in 1..=8 {
        let p = engine.merge_pass();
        assert!(!p.quiet() && !p.every_page);
        assert_eq!(engine.is_quiet(), pass == 8, "after pass {pass}");
    }
    assert_eq!(mem.accounting().frames, 64);
    mem.write(PageId::new(r, 1500), 0, &content(9)).unwrap();
    engine.merge_pass(); // chunks 0 and 1: the write is not seen yet
    assert!(engine.is_quiet());
    let p = engine.merge_pass(); // chunks 2 and 3
    assert_eq!(p.written, 1);
    assert!(!engine.is_quiet());
}

/// While mappings are plentiful, stable pages without a twin are indexed in place (no
/// mapping spent); once more than a quarter of the limit is in use, they are made
/// canonical at once (laid out in runs, they cost a backend like Linux's no mappings).
#[test]
fn unique_pages_are_made_canonical_at_once_when_mappings_are_scarce() {
    for (budget, canonical) in [(1000, 0), (100, 16)] {
        let mem = Arc::new(Budgeted::new(budget));
        let r = mem.sim.add_region(16, DomainId(0));
        fill(&mem.sim, r, 16, |i| 100 + i as u64);
        let engine = PageOne::new(mem.clone(), Config::default().work_threads(1)).unwrap();
        for _ in 0..4 {
            engine.merge_pass();
        }
        let s = engine.stats();
        assert_eq!(s.canonicalized, canonical, "budget {budget}");
        assert_eq!(s.pages_unique, 16 - canonical, "budget {budget}");
        assert_eq!(s.pages_unshared, 16);
    }
}

/// A page indexed in place while mappings were plentiful still merges with a twin that
/// comes along after they became scarce (the twin is made canonical, not indexed).
#[test]
fn a_twin_found_when_mappings_are_scarce_still_merges_with_an_indexed_page() {
    let mem = Arc::new(Budgeted::new(1000));
    let r = mem.sim.add_region(17, DomainId(0));
    fill(&mem.sim, r, 17, |i| 100 + i as u64);
    let engine = PageOne::new(mem.clone(), Config::default().work_threads(1)).unwrap();
    for _ in 0..5 {
        engine.merge_pass();
    }
    assert_eq!(engine.stats().pages_unique, 17);
    // Mappings become scarce; page 16 takes page 0's contents.
    mem.budget.store(100, Ordering::Relaxed);
    mem.sim.write(PageId::new(r, 16), 0, &content(100)).unwrap();
    for _ in 0..8 {
        engine.merge_pass();
    }
    let s = engine.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 1));
    assert_eq!(s.pages_unique, 15);
    assert_eq!(mem.sim.accounting().frames, 16);
}

/// Each budget has its own gate: the mappings of one process spent (its region refused for
/// the limit) park only that region's pages, while a region of another budget (another
/// VMM process under `pageoned`) goes on merging. With one gate for the whole memory, the
/// first region's refusal at the start of each retry pass closed it for the second region
/// too.
#[test]
fn a_budget_at_its_limit_does_not_stop_the_others() {
    let mem = Arc::new(Budgeted::per_region(&[4, 1000]));
    let a = mem.sim.add_region(128, DomainId(0));
    let b = mem.sim.add_region(128, DomainId(0));
    // 32 contents, each in 4 scattered pages of one region (different in each region).
    fill(&mem.sim, a, 128, |i| (i * 37 % 32) as u64 + 1);
    fill(&mem.sim, b, 128, |i| (i * 37 % 32) as u64 + 101);
    let engine = PageOne::new(mem.clone(), Config::default().work_threads(1)).unwrap();
    let mut parked = 0;
    for _ in 0..12 {
        parked = engine.merge_pass().parked;
    }
    // Region b: every duplicate merged (32 canonical pages, 96 merges); region a: the 4
    // mappings it had, the rest parked.
    let protected = |r: RegionId| {
        (0..128)
            .filter(|&i| mem.sim.is_protected(PageId::new(r, i)).unwrap())
            .count()
    };
    assert_eq!(protected(b), 128);
    let s = engine.stats();
    assert_eq!((s.pages_sharing, s.pages_unshared), (96, 4), "{s:?}");
    assert_eq!(parked, 128 - 4);
    assert_eq!((s.map_count_limit, s.map_count_events), (1000, 1));
    // Region b's pages read as written.
    for i in 0..128 {
        let mut buf = [0u8; PAGE_SIZE];
        mem.sim.read_page(PageId::new(b, i), &mut buf).unwrap();
        assert_eq!(buf.to_vec(), content((i * 37 % 32) as u64 + 101));
    }
}
