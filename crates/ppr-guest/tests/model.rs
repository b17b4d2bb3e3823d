//! proptest: random allocator operations interleaved with the host's scans, held claims,
//! completes and restores, on one thread. The allocator must never hand out a page the
//! host holds claimed, never hand out a page twice, never let a page in use change, and
//! lose no page: once the host lets go, every page can be allocated again.

use std::collections::BTreeMap;

use pip::{Claim, HostPool, PoolStorage, Release, Scan};
use ppr_guest::{GuestPage, Hooks, PageAllocator, SimPage};
use proptest::prelude::*;

const PAGES: usize = 10;
const FIRST: u64 = 0x800;
const SECRET: u64 = 0x7a7a_0b0b_3c3c_4d4d;

#[derive(Clone, Debug)]
enum Op {
    Alloc(usize),
    Free(usize, usize),
    Scan(usize, bool),
    Claim(usize),
    End(usize, bool),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0..4usize).prop_map(Op::Alloc),
        3 => (0..PAGES, 0..4usize).prop_map(|(k, c)| Op::Free(k, c)),
        2 => (0..PAGES, any::<bool>()).prop_map(|(p, ok)| Op::Scan(p, ok)),
        2 => (0..PAGES).prop_map(Op::Claim),
        2 => (0..PAGES, any::<bool>()).prop_map(|(k, c)| Op::End(k, c)),
    ];
    prop::collection::vec(op, 0..150)
}

fn run(ops: &[Op]) {
    let pool = PoolStorage::<2, 16>::new();
    let view = pool.init().unwrap();
    let host = HostPool::register(view, 1, SECRET, FIRST + PAGES as u64).unwrap();
    let guest = pip::Guest::attach(view).unwrap().with_spins(1);
    let pages: Vec<SimPage> = (0..PAGES).map(|_| SimPage::new()).collect();
    let mut a = PageAllocator::new(Hooks::from_guest(guest), &pages, FIRST);
    let mut held: BTreeMap<u64, u64> = BTreeMap::new(); // frame -> seed
    let mut claims: Vec<Claim<'_>> = Vec::new();
    let mut seed = 1u64;

    for op in ops {
        match *op {
            Op::Alloc(cpu) => {
                if let Some((frame, page)) = a.alloc(cpu) {
                    assert!(
                        !held.contains_key(&frame),
                        "frame {frame:#x} handed out twice"
                    );
                    assert!(
                        claims.iter().all(|c| c.frame() != frame),
                        "frame {frame:#x} handed out while the host holds it"
                    );
                    seed += 1;
                    page.fill(seed);
                    held.insert(frame, seed);
                }
            }
            Op::Free(k, cpu) => {
                if let Some(&frame) = held.keys().nth(k % held.len().max(1)) {
                    held.remove(&frame);
                    a.free(cpu, frame).unwrap();
                }
            }
            Op::Scan(p, ok) => {
                let frame = FIRST + p as u64;
                let got = host.scan(frame, &pages[p], || {
                    assert!(!held.contains_key(&frame), "recycling a page in use");
                    if ok {
                        pages[p].zero();
                    }
                    ok
                });
                if held.contains_key(&frame) {
                    assert_eq!(got, Scan::NotMarked);
                }
            }
            Op::Claim(p) => {
                let frame = FIRST + p as u64;
                if let Ok(offer) = host.validate(frame, &pages[p]) {
                    assert!(!held.contains_key(&frame), "a page in use validates");
                    claims.push(host.claim(offer).unwrap());
                }
            }
            Op::End(k, complete) => {
                if claims.is_empty() {
                    continue;
                }
                let claim = claims.remove(k % claims.len());
                let p = (claim.frame() - FIRST) as usize;
                if complete {
                    pages[p].zero();
                    assert_eq!(claim.complete(), Release::Clean);
                } else {
                    assert_eq!(claim.restore(), Release::Clean);
                }
            }
        }
        for (&frame, &s) in &held {
            assert!(
                a.page(frame).unwrap().verify(s),
                "page {frame:#x} changed in use"
            );
        }
    }

    // The host lets go; the guest frees everything; every page allocates again.
    claims.clear();
    for (frame, _) in std::mem::take(&mut held) {
        a.free(0, frame).unwrap();
    }
    let mut seen = Vec::new();
    while let Some((frame, _)) = a.alloc(1) {
        seen.push(frame);
    }
    seen.sort();
    let all: Vec<u64> = (0..PAGES as u64).map(|i| FIRST + i).collect();
    assert_eq!(seen, all, "pages lost");
    assert_eq!(a.deferred_pages(), 0);
    assert_eq!(view.occupied(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn allocator_with_host_matches_model(ops in ops()) {
        run(&ops);
    }
}
