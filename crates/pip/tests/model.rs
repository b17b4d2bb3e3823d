//! proptest model test: random sequences of guest frees and allocations and host scans,
//! claims, completes and restores on one thread, checked step by step against a simple
//! model of the slot and page state machines (crate docs, "The protocol").

use pip::{
    Alloc, Claim, Free, Guest, GuestCounters, HostPool, Invalid, PoolStorage, Release, Scan,
    CLAIMED,
};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 2;
const SHARD_SLOTS: usize = 3;
const SLOTS: usize = SHARDS * SHARD_SLOTS;
const PAGES: usize = 8;
const POOL_ID: u32 = 4;
const SECRET: u64 = 0x0123_4567_89ab_cdef;
const FRAME_LIMIT: u64 = 1 << 20;

/// Page `p`'s frame number.
fn frame(p: usize) -> u64 {
    0x100 + p as u64
}

/// The pattern a guest writes into page `p` while it uses it.
fn data(p: usize, i: usize) -> u64 {
    (0xD000_0000 + p as u64) << 8 | i as u64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    InUse,
    /// Offered in this slot.
    Offered(usize),
    /// Claimed by the host through this slot (a held [`Claim`]).
    Claimed(usize),
    /// Free without an offer (slot exhaustion, or recycled).
    Unmarked,
}

#[derive(Clone, Debug)]
enum Op {
    Free(usize, usize),
    Alloc(usize, usize),
    Scan(usize, bool),
    Claim(usize),
    Complete(usize),
    Restore(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0..PAGES, 0..5usize).prop_map(|(p, c)| Op::Free(p, c)),
        4 => (0..PAGES, 0..5usize).prop_map(|(p, c)| Op::Alloc(p, c)),
        3 => (0..PAGES, any::<bool>()).prop_map(|(p, ok)| Op::Scan(p, ok)),
        2 => (0..PAGES).prop_map(Op::Claim),
        1 => (0..4usize).prop_map(Op::Complete),
        1 => (0..4usize).prop_map(Op::Restore),
    ];
    prop::collection::vec(op, 0..120)
}

struct Model {
    pages: [Page; PAGES],
    slots: [Option<usize>; SLOTS],
    cursors: [usize; SHARDS],
    counters: GuestCounters,
}

impl Model {
    /// The slot an offer from `cpu` takes: the first empty one from the cursor.
    fn offer(&mut self, cpu: usize, p: usize) -> Option<usize> {
        let s = cpu % SHARDS;
        for k in 0..SHARD_SLOTS.min(pip::PROBES) {
            let at = (self.cursors[s] + k) % SHARD_SLOTS;
            let i = s * SHARD_SLOTS + at;
            if self.slots[i].is_none() {
                self.slots[i] = Some(p);
                self.cursors[s] = (at + 1) % SHARD_SLOTS;
                return Some(i);
            }
        }
        let window = SHARD_SLOTS.min(pip::PROBES);
        self.cursors[s] = (self.cursors[s] + window) % SHARD_SLOTS;
        None
    }
}

fn run(ops: &[Op]) {
    let pool = Box::new(PoolStorage::<SHARDS, SLOTS>::new());
    let view = pool.init().unwrap();
    let host = HostPool::register(view, POOL_ID, SECRET, FRAME_LIMIT).unwrap();
    let guest = Guest::attach(view).unwrap().with_spins(2);
    let pages: Vec<[AtomicU64; 4]> = (0..PAGES).map(|_| Default::default()).collect();
    let write_data = |p: usize| {
        for (i, w) in pages[p].iter().enumerate() {
            w.store(data(p, i), Ordering::Relaxed);
        }
    };
    for p in 0..PAGES {
        write_data(p);
    }
    let mut m = Model {
        pages: [Page::InUse; PAGES],
        slots: [None; SLOTS],
        cursors: [0; SHARDS],
        counters: GuestCounters::default(),
    };
    let mut claims: Vec<(usize, Claim<'_>)> = Vec::new();
    let zero = |p: usize| {
        for w in pages[p].iter().rev() {
            w.store(0, Ordering::Release);
        }
    };

    for op in ops {
        match *op {
            Op::Free(p, cpu) => {
                if m.pages[p] != Page::InUse {
                    continue; // a guest frees only pages in use
                }
                let got = guest.on_free(cpu, frame(p), &pages[p]);
                match m.offer(cpu, p) {
                    Some(i) => {
                        assert_eq!(got, Free::Offered(i as u32));
                        m.pages[p] = Page::Offered(i);
                        m.counters.offered += 1;
                    }
                    None => {
                        assert_eq!(got, Free::Full);
                        m.pages[p] = Page::Unmarked;
                        m.counters.full += 1;
                    }
                }
            }
            Op::Alloc(p, cpu) => {
                if m.pages[p] == Page::InUse {
                    continue; // a guest allocates only free pages
                }
                let got = guest.on_alloc(cpu, frame(p), &pages[p]);
                match m.pages[p] {
                    Page::InUse => unreachable!(),
                    Page::Offered(i) => {
                        assert_eq!(got, Alloc::Cancelled);
                        m.slots[i] = None;
                        m.counters.cancelled += 1;
                    }
                    Page::Claimed(_) => {
                        assert_eq!(got, Alloc::Busy);
                        m.counters.busy += 1;
                        continue;
                    }
                    Page::Unmarked => assert_eq!(got, Alloc::Unmarked),
                }
                m.pages[p] = Page::InUse;
                write_data(p);
            }
            Op::Scan(p, ok) => {
                let mut called = false;
                let got = host.scan(frame(p), &pages[p], || {
                    called = true;
                    assert!(
                        matches!(m.pages[p], Page::Offered(_)),
                        "recycling a page not offered"
                    );
                    if ok {
                        zero(p);
                    }
                    ok
                });
                match m.pages[p] {
                    Page::Offered(i) if ok => {
                        assert_eq!(got, Scan::Recycled(Release::Clean));
                        m.pages[p] = Page::Unmarked;
                        m.slots[i] = None;
                    }
                    Page::Offered(_) => assert_eq!(got, Scan::Restored(Release::Clean)),
                    Page::Claimed(_) => {
                        assert_eq!(got, Scan::Invalid(Invalid::NotOffered));
                        assert!(!called);
                    }
                    Page::InUse | Page::Unmarked => {
                        assert_eq!(got, Scan::NotMarked);
                        assert!(!called);
                    }
                }
            }
            Op::Claim(p) => {
                let got = host.validate(frame(p), &pages[p]);
                match m.pages[p] {
                    Page::Offered(i) => {
                        let offer = got.unwrap();
                        assert_eq!((offer.frame(), offer.slot()), (frame(p), i as u32));
                        claims.push((p, host.claim(offer).unwrap()));
                        m.pages[p] = Page::Claimed(i);
                    }
                    Page::Claimed(_) => {
                        assert_eq!(got, Err(pip::Reject::Invalid(Invalid::NotOffered)))
                    }
                    _ => assert_eq!(got, Err(pip::Reject::NotMarked)),
                }
            }
            Op::Complete(k) | Op::Restore(k) => {
                if claims.is_empty() {
                    continue;
                }
                let (p, claim) = claims.remove(k % claims.len());
                let Page::Claimed(i) = m.pages[p] else {
                    unreachable!()
                };
                assert_eq!(claim.frame(), frame(p));
                assert_eq!(claim.slot(), i as u32);
                if matches!(op, Op::Complete(_)) {
                    zero(p);
                    assert_eq!(claim.complete(), Release::Clean);
                    m.pages[p] = Page::Unmarked;
                    m.slots[i] = None;
                } else {
                    assert_eq!(claim.restore(), Release::Clean);
                    m.pages[p] = Page::Offered(i);
                }
            }
        }
        check(&m, view.slots(), &pages);
    }
    assert_eq!(view.counters(), m.counters);
    // Every held claim restores when dropped.
    for (p, claim) in claims.drain(..) {
        drop(claim);
        let Page::Claimed(i) = m.pages[p] else {
            unreachable!()
        };
        m.pages[p] = Page::Offered(i);
    }
    check(&m, view.slots(), &pages);
}

/// The pool and the pages agree with the model.
fn check(m: &Model, slots: &[AtomicU64], pages: &[[AtomicU64; 4]]) {
    for (i, slot) in slots.iter().enumerate() {
        let want = match m.slots[i] {
            None => 0,
            Some(p) if m.pages[p] == Page::Claimed(i) => frame(p) | CLAIMED,
            Some(p) => {
                assert_eq!(m.pages[p], Page::Offered(i));
                frame(p)
            }
        };
        assert_eq!(slot.load(Ordering::Relaxed), want, "slot {i}");
    }
    for (p, page) in pages.iter().enumerate() {
        let w = |i: usize| page[i].load(Ordering::Relaxed);
        match m.pages[p] {
            Page::InUse => (0..4).for_each(|i| assert_eq!(w(i), data(p, i), "page {p} lost data")),
            Page::Offered(i) | Page::Claimed(i) => {
                assert_eq!((w(0), w(1)), (SECRET, pip::location(POOL_ID, i as u32)))
            }
            Page::Unmarked => assert_ne!(w(0), SECRET),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn protocol_matches_model(ops in ops()) {
        run(&ops);
    }
}

#[test]
fn exhaustion_is_counted() {
    // Fill shard 0 (vCPUs 0, 2, 4 share it), then one more free is `full`.
    let mut ops: Vec<Op> = (0..SHARD_SLOTS).map(|p| Op::Free(p, 2 * p)).collect();
    ops.push(Op::Free(SHARD_SLOTS, 0));
    // The other shard still has room.
    ops.push(Op::Free(SHARD_SLOTS + 1, 1));
    run(&ops);
}
