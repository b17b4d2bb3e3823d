//! Real threads: guest vCPUs allocate pages, write a pattern, check it, and free them, in
//! a loop, while a host thread scans every page and recycles the offered ones (zeroing
//! them in place, and sometimes failing and restoring). No allocated page may ever lose
//! its pattern; when the guests stop, one host pass recycles every freed page.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use pip::{HostPool, Invalid, PoolStorage, Release, Scan};
use ppr_guest::{GuestPage, Hooks, PageAllocator, SimPage};

const VCPUS: usize = 4;
const PAGES_PER_VCPU: usize = 48;
const SLOTS: usize = 1024; // 4 shards of 256 for 48 pages each: sparse probe windows
const ROUNDS: usize = if cfg!(debug_assertions) { 600 } else { 6000 };
const FIRST: u64 = 0x10_0000;
const SECRET: u64 = 0x0ddb_a11c_afe0_0042;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Default, Debug)]
struct HostStats {
    passes: AtomicU64,
    recycled: AtomicU64,
    restored: AtomicU64,
    lost: AtomicU64,
    not_offered: AtomicU64,
    /// Torn reads of a mark being cleared or overwritten by its allocating guest.
    invalid_other: AtomicU64,
}

/// One pass of the host over every page; a recycle fails one time in `fail_one_in`.
fn host_pass(
    host: &HostPool,
    pages: &[SimPage],
    rng: &mut Rng,
    fail_one_in: u64,
    stats: &HostStats,
) {
    for (i, page) in pages.iter().enumerate() {
        let fail = fail_one_in != 0 && rng.next() % fail_one_in == 0;
        let got = host.scan(FIRST + i as u64, page, || {
            if fail {
                return false;
            }
            page.zero();
            true
        });
        let counter = match got {
            Scan::NotMarked => continue,
            Scan::Recycled(Release::Clean) => &stats.recycled,
            Scan::Restored(Release::Clean) => &stats.restored,
            Scan::Lost => &stats.lost,
            Scan::Invalid(Invalid::NotOffered) => &stats.not_offered,
            Scan::Invalid(_) => &stats.invalid_other,
            other => panic!("page {i}: {other:?}"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    stats.passes.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn guests_and_host_race_without_corruption() {
    let pool = Box::new(PoolStorage::<VCPUS, SLOTS>::new());
    let view = pool.init().unwrap();
    let n = VCPUS * PAGES_PER_VCPU;
    let host = HostPool::register(view, 1, SECRET, FIRST + n as u64).unwrap();
    let hooks = Hooks::attach(view).unwrap();
    let pages: Vec<SimPage> = (0..n).map(|_| SimPage::new()).collect();
    let stop = AtomicBool::new(false);
    let stats = HostStats::default();
    let corrupted = AtomicU64::new(0);

    thread::scope(|s| {
        let host_thread = s.spawn(|| {
            let mut rng = Rng(0x1234_5678);
            while !stop.load(Ordering::Relaxed) {
                host_pass(&host, &pages, &mut rng, 8, &stats);
            }
        });
        let guests: Vec<_> = (0..VCPUS)
            .map(|cpu| {
                let (pages, corrupted) = (&pages, &corrupted);
                s.spawn(move || {
                    let mine = cpu * PAGES_PER_VCPU..(cpu + 1) * PAGES_PER_VCPU;
                    let mut alloc = PageAllocator::with_free(hooks, pages, FIRST, cpu, mine);
                    let mut rng = Rng(0x9E37_79B9 + cpu as u64);
                    let mut held: Vec<(u64, u64)> = Vec::new();
                    for round in 0..ROUNDS {
                        // Allocate a few pages (on a neighbour's shard now and then, so
                        // cancels cross shards), write them, check them, free them.
                        let want = 1 + rng.next() as usize % 6;
                        let on = if round % 3 == 0 {
                            (cpu + 1) % VCPUS
                        } else {
                            cpu
                        };
                        while held.len() < want {
                            let Some((frame, page)) = alloc.alloc(on) else {
                                break;
                            };
                            let seed = rng.next();
                            page.fill(seed);
                            held.push((frame, seed));
                        }
                        thread::yield_now(); // let the host run over them
                        let keep = rng.next() as usize % (held.len() + 1);
                        for (frame, seed) in held.drain(keep..) {
                            if !alloc.page(frame).unwrap().verify(seed) {
                                corrupted.fetch_add(1, Ordering::Relaxed);
                            }
                            alloc.free(cpu, frame).unwrap();
                        }
                    }
                    for (frame, seed) in held.drain(..) {
                        if !alloc.page(frame).unwrap().verify(seed) {
                            corrupted.fetch_add(1, Ordering::Relaxed);
                        }
                        alloc.free(cpu, frame).unwrap();
                    }
                    alloc.stats()
                })
            })
            .collect();
        let guest_stats: Vec<_> = guests.into_iter().map(|g| g.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        host_thread.join().unwrap();

        assert_eq!(
            corrupted.load(Ordering::Relaxed),
            0,
            "corrupted allocations"
        );
        let allocs: u64 = guest_stats.iter().map(|s| s.allocs).sum();
        let busy: u64 = guest_stats.iter().map(|s| s.busy).sum();
        let not_offered: u64 = guest_stats.iter().map(|s| s.not_offered).sum();
        assert_eq!(not_offered, 0, "an offer found its probe window full");
        assert!(allocs >= ROUNDS as u64);
        eprintln!("guests: {allocs} allocations, {busy} busy; host: {stats:?}");
    });

    // Every page is free now and (its shard never full) offered or already recycled:
    // one reclaim period recycles the rest, with no recycle failing.
    let mut rng = Rng(7);
    host_pass(&host, &pages, &mut rng, 0, &stats);
    assert_eq!(view.occupied(), 0, "a freed page was left unrecycled");
    for (i, page) in pages.iter().enumerate() {
        assert!(page.is_zero(), "page {i} not recycled");
    }
    assert!(stats.recycled.load(Ordering::Relaxed) > 0);
    let c = view.counters();
    assert_eq!(c.full + c.refused + c.stale, 0);
}
