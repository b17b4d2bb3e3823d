//! loom models of the PIP protocol: guest offers and cancels racing host claims.
//!
//! Run with:
//! `RUSTFLAGS="--cfg pip_loom" cargo test -p pip --test loom --release`
//! (no preemption bound needed: every model explores all its interleavings in well under
//! a second; `.ci/run` runs them so).
//!
//! A page is four atomics: the two mark words and two data words. The host's recycle
//! "zeroes" it by storing zeros, the indicator word last (the contract in
//! [`pip::Claim::complete`]). A guest that `on_alloc` calls usable marks the page in use
//! (a ghost flag) and writes a pattern into all four words; after the threads join, the
//! pattern must still be there. Every model checks:
//! - a page is recycled only if it was free at the claim's linearization point (the
//!   recycle asserts the ghost flag is clear, before and after zeroing);
//! - a page the guest was told it may use is never zeroed behind its back (the pattern
//!   survives);
//! - nobody waits forever: every call returns (loom would report a deadlock or exceed
//!   its branch limit otherwise), and once the host is done, `on_alloc` is never busy.
#![cfg(pip_loom)]

// The atomics pip is built on in a loom build: pages made of them implement
// `pip::MarkWords`.
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use pip::{Alloc, Free, Guest, HostPool, Invalid, PoolStorage, Release, Scan, CLAIMED};

const POOL_ID: u32 = 3;
const SECRET: u64 = 0xA5A5_5A5A_0123_4567;
const FRAME_LIMIT: u64 = 100;
const FRAMES: [u64; 2] = [5, 6];
/// The pattern a guest writes into a page it uses: `DATA + word index`.
const DATA: u64 = 0xDA7A_0000;
/// `on_alloc`'s wait bound in the models: one re-read before reporting busy.
const SPINS: u32 = 1;

type Page = [AtomicU64; 4];

/// One pool of one shard of `SLOTS` slots, two pages and their ghost "in use" flags.
struct World<const SLOTS: usize> {
    pool: PoolStorage<1, SLOTS>,
    pages: [Page; 2],
    in_use: [AtomicBool; 2],
}

impl<const SLOTS: usize> World<SLOTS> {
    /// A registered pool; both pages in use by the guest (not yet freed).
    fn new() -> Arc<Self> {
        let world = World {
            pool: PoolStorage::new(),
            pages: Default::default(),
            in_use: [AtomicBool::new(true), AtomicBool::new(true)],
        };
        let view = world.pool.init().unwrap();
        HostPool::register(view, POOL_ID, SECRET, FRAME_LIMIT).unwrap();
        Arc::new(world)
    }

    fn guest(&self) -> Guest<'_> {
        Guest::attach(self.pool.view().unwrap())
            .unwrap()
            .with_spins(SPINS)
    }

    fn host(&self) -> HostPool<'_> {
        HostPool::new(self.pool.view().unwrap(), POOL_ID, SECRET, FRAME_LIMIT)
    }

    fn slot(&self, i: usize) -> u64 {
        self.pool.view().unwrap().slots()[i].load(Ordering::SeqCst)
    }

    fn word(&self, p: usize, i: usize) -> u64 {
        self.pages[p][i].load(Ordering::SeqCst)
    }

    /// The guest frees page `p` on vCPU `cpu`.
    fn free(&self, cpu: usize, p: usize) -> Free {
        self.in_use[p].store(false, Ordering::SeqCst);
        self.guest().on_free(cpu, FRAMES[p], &self.pages[p])
    }

    /// The guest allocates page `p` on vCPU `cpu`; if told it may, uses it.
    fn alloc(&self, cpu: usize, p: usize) -> Alloc {
        let a = self.guest().on_alloc(cpu, FRAMES[p], &self.pages[p]);
        if a.is_usable() {
            self.in_use[p].store(true, Ordering::SeqCst);
            for (i, w) in self.pages[p].iter().enumerate() {
                w.store(DATA + i as u64, Ordering::Relaxed);
            }
        }
        a
    }

    /// The guest's data in page `p` survived.
    fn check_data(&self, p: usize) {
        for i in 0..4 {
            assert_eq!(self.word(p, i), DATA + i as u64, "page {p} word {i} lost");
        }
    }

    /// The host's recycle of page `p`: zero it (indicator last) if `ok`, else touch nothing.
    fn recycle(&self, p: usize, ok: bool) -> bool {
        assert!(
            !self.in_use[p].load(Ordering::SeqCst),
            "claimed a page in use"
        );
        if ok {
            for i in (1..4).rev() {
                self.pages[p][i].store(0, Ordering::Release);
            }
            assert!(
                !self.in_use[p].load(Ordering::SeqCst),
                "page taken while zeroing"
            );
            self.pages[p][0].store(0, Ordering::Release);
        }
        ok
    }

    /// The host scans page `p`; its recycle succeeds if `ok`.
    fn scan(&self, p: usize, ok: bool) -> Scan {
        self.host()
            .scan(FRAMES[p], &self.pages[p], || self.recycle(p, ok))
    }

    /// Page `p` reads zeros.
    fn is_zero(&self, p: usize) -> bool {
        (0..4).all(|i| self.word(p, i) == 0)
    }
}

fn spawn<const S: usize, T: Send + 'static>(
    w: &Arc<World<S>>,
    f: impl FnOnce(&World<S>) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let w = w.clone();
    thread::spawn(move || f(&w))
}

#[test]
fn guest_free_races_host_scan() {
    loom::model(|| {
        let w = World::<1>::new();
        let g = spawn(&w, |w| w.free(0, 0));
        let h = spawn(&w, |w| w.scan(0, true));
        assert_eq!(g.join().unwrap(), Free::Offered(0));
        match h.join().unwrap() {
            Scan::Recycled(Release::Clean) => {
                assert!(w.is_zero(0));
                assert_eq!(w.slot(0), 0);
            }
            Scan::NotMarked => {
                // Scanned before the indicator landed: the offer is intact; the next
                // scan takes it.
                assert_eq!(w.slot(0), FRAMES[0]);
                assert_eq!(w.scan(0, true), Scan::Recycled(Release::Clean));
            }
            other => panic!("unexpected scan {other:?}"),
        }
        // Either way the page is now recycled and allocates as unmarked.
        assert_eq!(w.alloc(0, 0), Alloc::Unmarked);
        w.check_data(0);
    });
}

/// Page 0 offered; the guest allocates it while the host scans it.
fn realloc_races_claim(recycle_ok: bool) {
    loom::model(move || {
        let w = World::<1>::new();
        assert_eq!(w.free(0, 0), Free::Offered(0));
        let g = spawn(&w, |w| w.alloc(1, 0));
        let h = spawn(&w, move |w| w.scan(0, recycle_ok));
        let a = g.join().unwrap();
        let s = h.join().unwrap();
        match s {
            Scan::Recycled(Release::Clean) => {
                // The host won: the guest waited, then saw zeros, or gave up (busy).
                assert!(matches!(a, Alloc::Unmarked | Alloc::Busy), "{a:?}");
            }
            Scan::Restored(Release::Clean) => {
                assert!(matches!(a, Alloc::Cancelled | Alloc::Busy), "{a:?}");
            }
            Scan::Lost | Scan::NotMarked | Scan::Invalid(Invalid::Pool | Invalid::NotOffered) => {
                assert_eq!(a, Alloc::Cancelled);
            }
            other => panic!("unexpected scan {other:?}"),
        }
        let a = if a == Alloc::Busy {
            // The host is done now: the retry never waits.
            let again = w.alloc(1, 0);
            if recycle_ok {
                assert_eq!(again, Alloc::Unmarked);
            } else {
                assert_eq!(again, Alloc::Cancelled);
            }
            again
        } else {
            a
        };
        assert!(a.is_usable());
        w.check_data(0);
        assert_eq!(w.slot(0), 0);
    });
}

#[test]
fn guest_realloc_races_host_claim_recycle_succeeds() {
    realloc_races_claim(true);
}

#[test]
fn guest_realloc_races_host_claim_recycle_fails_and_restores() {
    realloc_races_claim(false);
}

/// The guest frees and at once re-allocates page 0 while the host scans it.
#[test]
fn free_then_realloc_races_scan() {
    loom::model(|| {
        let w = World::<1>::new();
        let g = spawn(&w, |w| {
            assert_eq!(w.free(0, 0), Free::Offered(0));
            w.alloc(0, 0)
        });
        let h = spawn(&w, |w| w.scan(0, true));
        let a = g.join().unwrap();
        let s = h.join().unwrap();
        if a == Alloc::Busy {
            assert!(matches!(s, Scan::Recycled(_)));
            assert_eq!(w.alloc(0, 0), Alloc::Unmarked);
        }
        if matches!(s, Scan::Recycled(_)) {
            assert_ne!(a, Alloc::Cancelled);
        }
        w.check_data(0);
        assert_eq!(w.slot(0), 0);
    });
}

/// Two vCPUs free two pages into one shard of two slots: both offered, in distinct slots,
/// each mark naming its own.
#[test]
fn two_vcpus_free_into_one_shard() {
    loom::model(|| {
        let w = World::<2>::new();
        let a = spawn(&w, |w| w.free(0, 0));
        let b = spawn(&w, |w| w.free(1, 1));
        let (Free::Offered(i), Free::Offered(j)) = (a.join().unwrap(), b.join().unwrap()) else {
            panic!("an offer failed with a free slot");
        };
        assert_ne!(i, j);
        assert_eq!(w.slot(i as usize), FRAMES[0]);
        assert_eq!(w.slot(j as usize), FRAMES[1]);
        assert_eq!(w.word(0, 1), pip::location(POOL_ID, i));
        assert_eq!(w.word(1, 1), pip::location(POOL_ID, j));
        for p in 0..2 {
            assert_eq!(w.scan(p, true), Scan::Recycled(Release::Clean));
        }
    });
}

/// Two vCPUs race for the only slot: one offers, the other counts exhaustion and leaves
/// its page unmarked; the host claims exactly the offered one.
#[test]
fn two_vcpus_race_for_one_slot() {
    loom::model(|| {
        let w = World::<1>::new();
        let a = spawn(&w, |w| w.free(0, 0));
        let b = spawn(&w, |w| w.free(1, 1));
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        let (won, lost) = match (ra, rb) {
            (Free::Offered(0), Free::Full) => (0, 1),
            (Free::Full, Free::Offered(0)) => (1, 0),
            other => panic!("unexpected frees {other:?}"),
        };
        let counters = w.pool.view().unwrap().counters();
        assert_eq!((counters.offered, counters.full), (1, 1));
        assert_eq!(w.slot(0), FRAMES[won]);
        assert_eq!(w.word(lost, 0), 0);
        assert_eq!(w.scan(lost, true), Scan::NotMarked);
        assert_eq!(w.scan(won, true), Scan::Recycled(Release::Clean));
    });
}

/// The host holds page 0's only slot claimed, fails its recycle and restores, while the
/// guest allocates page 0 and another vCPU frees page 1 into the same slot: the claimed
/// slot cannot be taken, so the restore cannot fail and the guest is never misled.
#[test]
fn claimed_slot_is_not_reused() {
    loom::model(|| {
        let w = World::<1>::new();
        assert_eq!(w.free(0, 0), Free::Offered(0));
        let offer = w.host().validate(FRAMES[0], &w.pages[0]).unwrap();
        let claim = w.host().claim(offer).unwrap();
        assert_eq!(w.slot(0), FRAMES[0] | CLAIMED);
        let g = spawn(&w, |w| w.alloc(1, 0));
        let f = spawn(&w, |w| w.free(2, 1));
        assert_eq!(claim.restore(), Release::Clean);
        let a = g.join().unwrap();
        let fr = f.join().unwrap();
        let a = if a == Alloc::Busy { w.alloc(1, 0) } else { a };
        assert_eq!(a, Alloc::Cancelled);
        w.check_data(0);
        match fr {
            Free::Offered(0) => assert_eq!(w.slot(0), FRAMES[1]),
            Free::Full => assert_eq!(w.slot(0), 0),
            other => panic!("unexpected free {other:?}"),
        }
    });
}
