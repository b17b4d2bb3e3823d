//! The hooks and the user-space allocator on one thread, with the host's moves made by
//! hand in between.

use pip::{HostPool, PoolStorage, Release, Scan};
use ppr_guest::{Alloc, Free, FreeError, GuestPage, Hooks, PageAllocator, SimPage};

const SECRET: u64 = 0x5151_7272_9393_b4b5;
const FIRST: u64 = 0x4000;

fn pages(n: usize) -> Vec<SimPage> {
    (0..n).map(|_| SimPage::new()).collect()
}

#[test]
fn disabled_hooks_do_nothing() {
    let hooks = Hooks::disabled();
    assert!(!hooks.is_enabled());
    let page = SimPage::new();
    page.fill(1);
    assert_eq!(hooks.on_free(0, 9, &page), None);
    assert_eq!(hooks.on_alloc(0, 9, &page), Alloc::Unmarked);
    assert!(page.verify(1));

    let pages = pages(3);
    let mut a = PageAllocator::new(hooks, &pages, FIRST);
    let (f, p) = a.alloc(0).unwrap();
    p.fill(f);
    a.free(0, f).unwrap();
    assert!(p.verify(f), "a disabled free writes nothing");
}

#[test]
fn free_offers_and_alloc_cancels() {
    let pool = PoolStorage::<2, 16>::new();
    let view = pool.init().unwrap();
    let host = HostPool::register(view, 1, SECRET, 1 << 20).unwrap();
    let hooks = Hooks::attach(view).unwrap();
    let pages = pages(4);
    let mut a = PageAllocator::new(hooks, &pages, FIRST);
    assert_eq!(view.occupied(), 4);
    assert_eq!(a.stats().offered, 4);

    // LIFO: the last page freed comes first; its offer is withdrawn.
    let (f, p) = a.alloc(1).unwrap();
    assert_eq!(f, FIRST + 3);
    assert_eq!(a.stats().cancelled, 1);
    assert_eq!(view.occupied(), 3);
    p.fill(7);
    // The host finds nothing on a page in use.
    assert_eq!(host.scan(f, p, || unreachable!()), Scan::NotMarked);
    assert!(p.verify(7));

    assert_eq!(a.free(0, f), Ok(()));
    assert_eq!(a.free(0, f), Err(FreeError::NotAllocated(f)));
    assert_eq!(a.free(0, FIRST + 4), Err(FreeError::NotOurs(FIRST + 4)));
    assert_eq!(a.free(0, 3), Err(FreeError::NotOurs(3)));
    let err: &dyn std::error::Error = &FreeError::NotAllocated(f);
    assert_eq!(
        err.to_string(),
        format!("frame {f:#x} is not allocated (a double free)")
    );
    assert_eq!(view.occupied(), 4);
}

#[test]
fn recycled_pages_come_back_zeroed() {
    let pool = PoolStorage::<1, 8>::new();
    let view = pool.init().unwrap();
    let host = HostPool::register(view, 2, SECRET, 1 << 20).unwrap();
    let pages = pages(4);
    let mut a = PageAllocator::new(Hooks::attach(view).unwrap(), &pages, FIRST);
    for (i, p) in pages.iter().enumerate() {
        let got = host.scan(FIRST + i as u64, p, || {
            p.zero();
            true
        });
        assert_eq!(got, Scan::Recycled(Release::Clean));
    }
    assert_eq!(view.occupied(), 0);
    for _ in 0..4 {
        let (_, p) = a.alloc(0).unwrap();
        assert!(p.is_zero());
    }
    assert_eq!(a.stats().unmarked, 4);
    assert!(a.alloc(0).is_none());
}

#[test]
fn busy_pages_are_deferred_and_come_back() {
    let pool = PoolStorage::<1, 8>::new();
    let view = pool.init().unwrap();
    let host = HostPool::register(view, 3, SECRET, 1 << 20).unwrap();
    let guest = pip::Guest::attach(view).unwrap().with_spins(4);
    let pages = pages(2);
    let mut a = PageAllocator::new(Hooks::from_guest(guest), &pages, FIRST);

    // The host claims both pages and holds the claims (mid-recycle).
    let c1 = host
        .claim(host.validate(FIRST + 1, &pages[1]).unwrap())
        .unwrap();
    let c0 = host
        .claim(host.validate(FIRST, &pages[0]).unwrap())
        .unwrap();
    assert!(a.alloc(0).is_none());
    assert_eq!(a.deferred_pages(), 2);
    assert_eq!(a.free_pages(), 0);
    assert!(a.stats().busy >= 2);
    assert_eq!(view.counters().busy, a.stats().busy);

    // Page 1's recycle fails: restored, so the guest withdraws the offer.
    assert_eq!(c1.restore(), Release::Clean);
    let (f, p) = a.alloc(0).unwrap();
    assert_eq!(f, FIRST + 1);
    p.fill(1);
    // Page 0 is recycled: it comes back zeroed.
    pages[0].zero();
    assert_eq!(c0.complete(), Release::Clean);
    let (f, p) = a.alloc(0).unwrap();
    assert_eq!(f, FIRST);
    assert!(p.is_zero());
    assert!(pages[1].verify(1));
    let s = a.stats();
    assert_eq!((s.allocs, s.cancelled, s.unmarked, s.failed), (2, 1, 1, 1));
    assert_eq!(a.deferred_pages(), 0);
}

#[test]
fn slot_exhaustion_is_counted() {
    let pool = PoolStorage::<2, 4>::new(); // 2 slots per shard
    let view = pool.init().unwrap();
    HostPool::register(view, 4, SECRET, 1 << 20).unwrap();
    let hooks = Hooks::attach(view).unwrap();
    let pages = pages(3);
    let a = PageAllocator::new(hooks, &pages, FIRST); // all three freed on vCPU 0
    assert_eq!((a.stats().offered, a.stats().not_offered), (2, 1));
    assert_eq!(view.counters().full, 1);
    // The page that found no slot carries no mark; the other shard still has room.
    assert_eq!(pip::MarkWords::load(&pages[2], pip::INDICATOR), 0);
    let other = SimPage::new();
    assert_eq!(hooks.on_free(1, FIRST + 9, &other), Some(Free::Offered(2)));
}
