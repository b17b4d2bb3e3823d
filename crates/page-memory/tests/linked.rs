//! A canonical store shared by several memories (`linux::shared`): pages of two memories
//! (two VMMs, here in one process: the kernel does not care) share one page of one memfd,
//! every hold is reported, and the owner punches a slot only when no holder is left.
#![cfg(feature = "linux")]

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use page_memory::linux::shared::{
    ClientId, HoldError, HoldEvent, HoldKind, SharedStore, StoreLink,
};
use page_memory::linux::test_util::*;
use page_memory::linux::{Backing, LinuxConfig, LinuxMemory};
use page_memory::{DomainId, MergeOutcome, PageError, PageId, PageMemory, PAGE_SIZE};

/// A memory linked to `store` whose holds land in the returned queue (`None` where the
/// backend cannot run here; the reason printed).
fn linked(store: &SharedStore) -> Option<(LinuxMemory, Arc<Mutex<Vec<HoldEvent>>>)> {
    memory()?; // prints why not, where the backend cannot run
    let queue = Arc::new(Mutex::new(Vec::new()));
    let q = queue.clone();
    let link = StoreLink {
        fd: store.fd().try_clone_to_owned().unwrap(),
        slots: store.slots(),
        sink: Arc::new(move |e| q.lock().unwrap().push(e)),
    };
    let config = LinuxConfig::default().with_require_kernel_faults(false);
    let mem = LinuxMemory::with_linked_store(config, link).unwrap();
    Some((mem, queue))
}

/// Hands `client`'s queued hold events to the store, as a service would.
fn deliver(store: &SharedStore, client: ClientId, queue: &Mutex<Vec<HoldEvent>>) {
    let events: Vec<HoldEvent> = std::mem::take(&mut *queue.lock().unwrap());
    store.apply(client, &events).unwrap();
}

#[test]
fn pages_of_two_memories_share_one_page_of_the_store() {
    let store = SharedStore::new(1 << 12).unwrap();
    let Some((a, qa)) = linked(&store) else {
        return;
    };
    let (b, qb) = linked(&store).unwrap();
    let (ca, cb) = (ClientId(1), ClientId(2));
    let ra = a.add_region(4, DomainId(0)).unwrap();
    let rb = b.add_region(4, DomainId(0)).unwrap();
    let (pa, pb) = (PageId::new(ra, 1), PageId::new(rb, 2));
    fill(&a, pa, 7);
    fill(&b, pb, 7);

    // Plain canonicalize is refused: the owner names the slots.
    let ta = a.protect(&[pa]).pop().unwrap().unwrap();
    assert!(matches!(
        a.canonicalize(pa, ta),
        Err(PageError::Unsupported(_))
    ));

    let home = store.reserve_home(4).unwrap();
    let frame = store.allocate(home + 1).unwrap();
    let slot = frame.slot().unwrap();
    let fa = a.canonicalize_at(&[(pa, ta, slot)]).pop().unwrap().unwrap();
    assert_eq!(fa.store_offset(), Some(slot * PAGE_SIZE as u64));
    deliver(&store, ca, &qa);
    assert_eq!(frame.as_ref(), fa.as_ref(), "the owner reads what A copied");
    assert!(holds(&a, pa, 7));

    let tb = b.protect(&[pb]).pop().unwrap().unwrap();
    let fb = b.frame_at(slot).unwrap();
    assert_eq!(b.merge(pb, tb, &fb).unwrap(), MergeOutcome::Merged);
    drop(fb);
    deliver(&store, cb, &qb);
    assert_eq!(
        a.backing(pa).unwrap(),
        Backing::Store {
            offset: slot * PAGE_SIZE as u64
        }
    );
    assert_eq!(a.backing(pa).unwrap(), b.backing(pb).unwrap());
    assert!(holds(&b, pb, 7));

    // A write to B's page breaks only B's sharing.
    word(&b, pb, 0).store(99, std::sync::atomic::Ordering::Relaxed);
    assert!(holds(&a, pa, 7));
    assert_eq!(
        word(&b, pb, 0).load(std::sync::atomic::Ordering::Relaxed),
        99
    );
    // (The fault thread notes the change just after it woke the writer.)
    let mut stale = Vec::new();
    let t0 = std::time::Instant::now();
    while !stale.iter().any(|&(i, _)| i == 2) && t0.elapsed().as_secs() < 5 {
        stale.extend(b.take_unprotected(rb).unwrap());
    }
    assert!(
        stale.iter().any(|&(i, gen)| i == 2 && gen > tb.0),
        "{stale:?}"
    );
    assert!(b.take_unprotected(rb).unwrap().is_empty(), "reported once");

    // A and the owner still hold the slot: not punched.
    drop(fa);
    deliver(&store, ca, &qa);
    deliver(&store, cb, &qb);
    assert!(holds(&a, pa, 7));
    assert_eq!(store.stats().unwrap().live, 1);
}

#[test]
fn a_slot_is_punched_only_when_no_process_holds_it() {
    let store = SharedStore::new(1 << 12).unwrap();
    let Some((a, qa)) = linked(&store) else {
        return;
    };
    let ca = ClientId(1);
    let ra = a.add_region(2, DomainId(0)).unwrap();
    let pa = PageId::new(ra, 0);
    fill(&a, pa, 3);
    let t = a.protect(&[pa]).pop().unwrap().unwrap();
    let frame = store.allocate(0).unwrap();
    let slot = frame.slot().unwrap();
    let fa = a.canonicalize_at(&[(pa, t, slot)]).pop().unwrap().unwrap();
    drop(fa);
    deliver(&store, ca, &qa);
    assert_eq!(
        store.client_holds(ca),
        (1, 1),
        "the page holds slot and offset"
    );

    // The owner lets go: the page still maps the slot, so its contents stay.
    drop(frame);
    assert_eq!(store.stats().unwrap().punched, 0);
    assert!(holds(&a, pa, 3));

    // The page is written: its copy-on-write break lets go of the slot, which is punched;
    // the offset stays taken while the page's address lies in the store mapping.
    word(&a, pa, 0).store(5, std::sync::atomic::Ordering::Relaxed);
    // (The fault thread lets go of the slot just after it woke the writer.)
    let t0 = std::time::Instant::now();
    while store.stats().unwrap().punched == 0 && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
        deliver(&store, ca, &qa);
    }
    assert_eq!(store.stats().unwrap().punched, 1);
    assert_eq!(store.client_holds(ca), (0, 1));

    // The VMM's process goes: everything it held is let go; the offset is free again.
    store.drop_client(ca);
    assert_eq!(store.client_holds(ca), (0, 0));
    assert_eq!(store.stats().unwrap().slots, 0);
    drop(a);
}

#[test]
fn hostile_hold_events_are_refused_and_change_nothing() {
    let store = SharedStore::new(16).unwrap();
    let frame = store.allocate(0).unwrap();
    let slot = frame.slot().unwrap();
    let c = ClientId(9);
    let ev = |slot, kind, acquire| HoldEvent {
        slot,
        kind,
        acquire,
    };
    // Beyond the end; a release never taken; an acquire of a slot nobody holds.
    let r = store.apply(
        c,
        &[
            ev(1 << 40, HoldKind::Slot, true),
            ev(slot, HoldKind::Slot, false),
            ev(slot, HoldKind::Tomb, false),
            ev(5, HoldKind::Slot, true),
        ],
    );
    assert_eq!(
        r.unwrap_err(),
        vec![
            HoldError::NoSuchSlot(1 << 40),
            HoldError::NotYours(slot),
            HoldError::NotYours(slot),
            HoldError::NotHeld(5),
        ]
    );
    assert_eq!(store.client_holds(c), (0, 0));
    // The owner's frame still holds the slot.
    assert_eq!(store.stats().unwrap().live, 1);
    drop(frame);
    assert_eq!(store.stats().unwrap().slots, 0);
    // A memfd handed out is the same file.
    assert!(store.fd().as_fd().try_clone_to_owned().is_ok());
}

/// One step of the model test below.
#[derive(Clone, Debug)]
enum Step {
    /// The owner allocates a slot (home slot `home`), fills it with a pattern and holds it.
    Allocate(u64),
    /// The owner takes another frame of the `k`th slot it knows.
    Frame(usize),
    /// The owner drops its `k`th frame.
    Drop(usize),
    /// Client `c` reports taking (`true`) or letting go of a hold of `kind` on the `k`th
    /// slot known (or on a slot never handed out, for `k` beyond them).
    Hold(u64, usize, bool, bool),
    /// Client `c`'s process is gone.
    Gone(u64),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0u64..8).prop_map(Step::Allocate),
        (0usize..8).prop_map(Step::Frame),
        (0usize..8).prop_map(Step::Drop),
        (0u64..3, 0usize..10, any::<bool>(), any::<bool>())
            .prop_map(|(c, k, tomb, acquire)| Step::Hold(c, k, tomb, acquire)),
        (0u64..3).prop_map(Step::Gone),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// The shared store against a model of its holds: a slot's contents stay while any
    /// frame or client holds them and read as zeros once none does; a slot is handed out
    /// again only when no hold of either kind is left; a release of a hold never taken
    /// and an acquire of contents nobody holds are refused and change nothing.
    #[test]
    fn shared_store_holds_match_a_model(steps in proptest::collection::vec(step(), 1..80)) {
        use std::collections::HashMap;
        use std::os::unix::fs::FileExt;

        let store = SharedStore::new(4).unwrap(); // 8 slots
        let file = std::fs::File::from(store.fd().try_clone_to_owned().unwrap());
        let pattern = |slot: u64, gen: u64| -> Vec<u8> {
            let v = (slot << 32 | gen) | 1;
            (0..PAGE_SIZE / 8).flat_map(|_| v.to_le_bytes()).collect()
        };
        let mut frames: Vec<page_memory::linux::shared::SharedFrame> = Vec::new();
        // The model: per slot, (owner frames, client slot holds, client tomb holds), and
        // the pattern written when it was allocated.
        let mut known: Vec<u64> = Vec::new();
        let mut contents: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut holds: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
        let mut gen = 0;
        let slot_holds = |frames: &[page_memory::linux::shared::SharedFrame],
                          holds: &HashMap<(u64, u64), (u64, u64)>,
                          s: u64| {
            frames.iter().filter(|f| f.slot() == Some(s)).count() as u64
                + holds.iter().filter(|((_, x), _)| *x == s).map(|(_, h)| h.0).sum::<u64>()
        };
        let tomb_holds = |holds: &HashMap<(u64, u64), (u64, u64)>, s: u64| {
            holds.iter().filter(|((_, x), _)| *x == s).map(|(_, h)| h.1).sum::<u64>()
        };
        for st in steps {
            match st {
                Step::Allocate(home) => {
                    let Ok(f) = store.allocate(home) else { continue };
                    let s = f.slot().unwrap();
                    // Never a slot anything still holds.
                    proptest::prop_assert_eq!(slot_holds(&frames, &holds, s), 0);
                    proptest::prop_assert_eq!(tomb_holds(&holds, s), 0);
                    gen += 1;
                    let p = pattern(s, gen);
                    file.write_all_at(&p, s * PAGE_SIZE as u64).unwrap();
                    contents.insert(s, p);
                    if !known.contains(&s) {
                        known.push(s);
                    }
                    frames.push(f);
                }
                Step::Frame(k) => {
                    let Some(&s) = known.get(k) else { continue };
                    let held = slot_holds(&frames, &holds, s) > 0;
                    let f = store.frame(s);
                    proptest::prop_assert_eq!(f.is_some(), held);
                    frames.extend(f);
                }
                Step::Drop(k) => {
                    if k < frames.len() {
                        frames.remove(k);
                    }
                }
                Step::Hold(c, k, tomb, acquire) => {
                    let s = known.get(k).copied().unwrap_or(7 - (k as u64 % 2));
                    let kind = if tomb { HoldKind::Tomb } else { HoldKind::Slot };
                    let mine = holds.get(&(c, s)).copied().unwrap_or((0, 0));
                    let ok = if acquire {
                        slot_holds(&frames, &holds, s) > 0
                    } else if tomb {
                        mine.1 > 0
                    } else {
                        mine.0 > 0
                    };
                    let r = store.apply(ClientId(c), &[HoldEvent { slot: s, kind, acquire }]);
                    proptest::prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
                    if ok {
                        let h = holds.entry((c, s)).or_default();
                        let n = if tomb { &mut h.1 } else { &mut h.0 };
                        if acquire { *n += 1 } else { *n -= 1 }
                    }
                }
                Step::Gone(c) => {
                    store.drop_client(ClientId(c));
                    holds.retain(|(x, _), _| *x != c);
                }
            }
            // Contents held read as written; contents nobody holds read as zeros.
            for &s in &known {
                let mut buf = vec![0u8; PAGE_SIZE];
                file.read_exact_at(&mut buf, s * PAGE_SIZE as u64).unwrap();
                if slot_holds(&frames, &holds, s) > 0 {
                    proptest::prop_assert!(buf == contents[&s], "slot {} lost its contents", s);
                } else {
                    proptest::prop_assert!(buf.iter().all(|&b| b == 0), "slot {} not punched", s);
                }
            }
            for f in &frames {
                let s = f.slot().unwrap();
                proptest::prop_assert!(f.as_ref() == &contents[&s][..], "frame of slot {}", s);
            }
        }
    }
}
