//! loom models of every CAS protocol in the tree, with crossbeam-epoch model-checked too.
//!
//! Run with:
//! `RUSTFLAGS="--cfg sdtree_loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p sdtree --test loom --release`
//! (about 95 s on two cores: the three-thread models below are cut off, see there).
//!
//! Each model starts from a small tree built on one thread, races two threads (or a
//! thread and the main thread), and checks the outcome against what some serial order of
//! the operations allows.
#![cfg(sdtree_loom)]

use loom::sync::Arc;
use loom::thread;
use sdtree::base::SdTree;
use sdtree::epoch::Collector;
use sdtree::Insert;

type Keys = std::sync::Arc<Vec<Vec<u8>>>;
type Tree = SdTree<Keys>;

/// A tree over `keys` holding the handles in `initial`.
fn tree(keys: &[&[u8]], initial: &[usize]) -> (Arc<Tree>, Collector) {
    let collector = Collector::new();
    let keys: Keys = std::sync::Arc::new(keys.iter().map(|k| k.to_vec()).collect());
    let tree = Arc::new(SdTree::new(keys, collector.clone()));
    let handle = collector.register();
    let guard = handle.pin();
    for &h in initial {
        assert_eq!(tree.insert_or_get(h, &guard), Insert::Inserted);
    }
    drop(guard);
    (tree, collector)
}

/// Runs `f(tree, collector-handle)` on a new loom thread.
fn spawn<T: Send + 'static>(
    tree: &Arc<Tree>,
    collector: &Collector,
    f: impl FnOnce(&Tree, &sdtree::epoch::Guard) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let (tree, collector) = (tree.clone(), collector.clone());
    thread::spawn(move || {
        let handle = collector.register();
        let guard = handle.pin();
        f(&tree, &guard)
    })
}

/// The handles in key order, on the calling thread.
fn contents(tree: &Tree, collector: &Collector) -> Vec<usize> {
    let handle = collector.register();
    let guard = handle.pin();
    let all: Vec<usize> = tree.iter(&guard).collect();
    // Every listed handle is also found by lookup, and len agrees.
    for &h in &all {
        assert_eq!(tree.get(&tree.source()[h], &guard), Some(h));
    }
    assert_eq!(tree.len(), all.len());
    all
}

#[test]
fn insert_insert_same_crit_bit() {
    // 0x80 and 0xC0 both first differ from 0x10 at the top data bit of byte 0.
    loom::model(|| {
        let (t, c) = tree(&[&[0x10], &[0x80], &[0xC0]], &[0]);
        let a = spawn(&t, &c, |t, g| t.insert_or_get(1, g));
        let b = spawn(&t, &c, |t, g| t.insert_or_get(2, g));
        assert_eq!(a.join().unwrap(), Insert::Inserted);
        assert_eq!(b.join().unwrap(), Insert::Inserted);
        assert_eq!(contents(&t, &c), [0, 1, 2]);
    });
}

#[test]
fn insert_insert_equal_keys_one_wins() {
    loom::model(|| {
        let (t, c) = tree(&[b"k", b"k", b"j"], &[2]);
        let a = spawn(&t, &c, |t, g| t.insert_or_get(0, g));
        let b = spawn(&t, &c, |t, g| t.insert_or_get(1, g));
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        let winner = match (ra, rb) {
            (Insert::Inserted, Insert::Present(0)) => 0,
            (Insert::Present(1), Insert::Inserted) => 1,
            other => panic!("not exactly one winner: {other:?}"),
        };
        assert_eq!(contents(&t, &c), [2, winner]);
    });
}

#[test]
fn insert_remove_siblings() {
    // 0 and 1 are siblings; 2 lands next to 0 while 1 is removed.
    loom::model(|| {
        let (t, c) = tree(&[&[0x10], &[0xFF], &[0x11]], &[0, 1]);
        let a = spawn(&t, &c, |t, g| t.insert_or_get(2, g));
        let b = spawn(&t, &c, |t, g| t.remove(&[0xFF], g));
        assert_eq!(a.join().unwrap(), Insert::Inserted);
        assert_eq!(b.join().unwrap(), Some(1));
        assert_eq!(contents(&t, &c), [0, 2]);
    });
}

#[test]
fn remove_remove_siblings() {
    // Removing both children of one node: the unlinks chain through each other.
    loom::model(|| {
        let (t, c) = tree(&[&[0x10], &[0x11], &[0xFF]], &[0, 1, 2]);
        let a = spawn(&t, &c, |t, g| t.remove(&[0x10], g));
        let b = spawn(&t, &c, |t, g| t.remove(&[0x11], g));
        assert_eq!(a.join().unwrap(), Some(0));
        assert_eq!(b.join().unwrap(), Some(1));
        assert_eq!(contents(&t, &c), [2]);
    });
}

#[test]
fn remove_remove_last_two() {
    // Both leaves of a two-key tree: the tree must end empty, through the head edge.
    loom::model(|| {
        let (t, c) = tree(&[&[0x10], &[0xFF]], &[0, 1]);
        let a = spawn(&t, &c, |t, g| t.remove(&[0x10], g));
        let b = spawn(&t, &c, |t, g| t.remove(&[0xFF], g));
        assert_eq!(a.join().unwrap(), Some(0));
        assert_eq!(b.join().unwrap(), Some(1));
        assert_eq!(contents(&t, &c), Vec::<usize>::new());
    });
}

#[test]
fn remove_remove_same_key_one_wins() {
    loom::model(|| {
        let (t, c) = tree(&[b"a", b"b"], &[0, 1]);
        let a = spawn(&t, &c, |t, g| t.remove(b"a", g));
        let b = spawn(&t, &c, |t, g| t.remove(b"a", g));
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        assert!(
            matches!((ra, rb), (Some(0), None) | (None, Some(0))),
            "{ra:?} {rb:?}"
        );
        assert_eq!(contents(&t, &c), [1]);
    });
}

#[test]
fn remove_races_insert_or_get_of_same_key() {
    loom::model(|| {
        // Handles 0 and 2 share the key "a".
        let (t, c) = tree(&[b"a", b"b", b"a"], &[0, 1]);
        let a = spawn(&t, &c, |t, g| t.remove(b"a", g));
        let b = spawn(&t, &c, |t, g| t.insert_or_get(2, g));
        assert_eq!(a.join().unwrap(), Some(0));
        match b.join().unwrap() {
            // Ran before the remove: the remove then took handle 0 out.
            Insert::Present(0) => assert_eq!(contents(&t, &c), [1]),
            // Ran after it: handle 2 is now the entry for "a".
            Insert::Inserted => assert_eq!(contents(&t, &c), [2, 1]),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn reader_during_split() {
    loom::model(|| {
        let (t, c) = tree(&[&[0x10], &[0x11], &[0x90]], &[0, 2]);
        let w = spawn(&t, &c, |t, g| t.insert_or_get(1, g));
        let r = spawn(&t, &c, |t, g| {
            let old = t.get(&[0x10], g);
            let new = t.get(&[0x11], g);
            let order: Vec<usize> = t.iter(g).collect();
            (old, new, order)
        });
        assert_eq!(w.join().unwrap(), Insert::Inserted);
        let (old, new, order) = r.join().unwrap();
        assert_eq!(old, Some(0), "a key present throughout was missed");
        assert!(matches!(new, None | Some(1)));
        assert!(order == [0, 2] || order == [0, 1, 2], "{order:?}");
        assert_eq!(contents(&t, &c), [0, 1, 2]);
    });
}

#[test]
fn reader_during_unlink() {
    loom::model(|| {
        let (t, c) = tree(&[&[0x10], &[0x11], &[0x90]], &[0, 1, 2]);
        let w = spawn(&t, &c, |t, g| t.remove(&[0x11], g));
        let r = spawn(&t, &c, |t, g| {
            let kept = (t.get(&[0x10], g), t.get(&[0x90], g));
            let order: Vec<usize> = t.iter(g).collect();
            (kept, order)
        });
        assert_eq!(w.join().unwrap(), Some(1));
        let (kept, order) = r.join().unwrap();
        assert_eq!(
            kept,
            (Some(0), Some(2)),
            "a key present throughout was missed"
        );
        assert!(order == [0, 1, 2] || order == [0, 2], "{order:?}");
        assert_eq!(contents(&t, &c), [0, 2]);
    });
}

#[test]
fn remove_remove_nested_unlinks_a_chain() {
    // 0xFF hangs off the root; 0x10 off the root's other child. Removing both can leave
    // a chain of two frozen nodes that one splice unlinks.
    loom::model(|| {
        let (t, c) = tree(&[&[0x10], &[0x11], &[0xFF]], &[0, 1, 2]);
        let a = spawn(&t, &c, |t, g| t.remove(&[0xFF], g));
        let b = spawn(&t, &c, |t, g| t.remove(&[0x10], g));
        assert_eq!(a.join().unwrap(), Some(2));
        assert_eq!(b.join().unwrap(), Some(0));
        assert_eq!(contents(&t, &c), [1]);
    });
}

#[test]
fn map_entries_are_retired_through_the_collector() {
    use sdtree::base::{MapInsert, SdMap};
    loom::model(|| {
        let collector = Collector::new();
        let map = Arc::new(SdMap::new(collector.clone()));
        {
            let h = collector.register();
            let g = h.pin();
            assert!(matches!(
                map.insert_or_get(vec![1u8], 10u32, &g),
                MapInsert::Inserted(&10)
            ));
            assert!(matches!(
                map.insert_or_get(vec![2u8], 20u32, &g),
                MapInsert::Inserted(&20)
            ));
        }
        let (m, c) = (map.clone(), collector.clone());
        let remover = thread::spawn(move || {
            let h = c.register();
            let g = h.pin();
            m.remove([1u8], &g).copied()
        });
        let (m, c) = (map.clone(), collector.clone());
        let reader = thread::spawn(move || {
            let h = c.register();
            let g = h.pin();
            // A value borrowed under a pin stays readable even if removed meanwhile.
            m.get([1u8], &g).copied()
        });
        assert_eq!(remover.join().unwrap(), Some(10));
        assert!(matches!(reader.join().unwrap(), None | Some(10)));
        let h = collector.register();
        let g = h.pin();
        assert_eq!(map.get([1u8], &g), None);
        assert_eq!(map.get([2u8], &g), Some(&20));
        assert_eq!(map.len(), 1);
    });
}

// ---------------------------------------------------------------------------------------
// Three-thread models. Each races three operations (two spawned threads and the main
// thread, or three spawned threads), so that one operation can meet another's pending
// removal (a flagged leaf edge or a tagged sibling edge) and complete it: helping.
// `LOOM_MAX_PREEMPTIONS=2` bounds the exploration; the key sets are three or four keys.
//
// Even so, three threads that each register with and pin crossbeam-epoch (whose own
// atomics loom also explores) give far more executions than fit the run's time budget:
// `three_threads_keys_change_while_stored` is explored exhaustively (within the preemption
// bound), but the other three are cut off after `BOUNDED` executions each (`model3`), the
// first ones of loom's depth-first order. They are bounded model checks, not proofs.
// Set `LOOM_MAX_PERMUTATIONS` to explore further (or `0` for no cut-off: an exhaustive
// run with two preemptions takes far longer than an hour on two cores).
// ---------------------------------------------------------------------------------------

/// Executions explored per cut-off three-thread model (about 20 s each on two cores).
const BOUNDED: usize = 100_000;

/// `loom::model`, cut off after [`BOUNDED`] executions unless `LOOM_MAX_PERMUTATIONS`
/// says otherwise (`0`: no cut-off).
fn model3(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.max_permutations = match builder.max_permutations {
        None => Some(BOUNDED),
        Some(0) => None,
        Some(n) => Some(n),
    };
    // loom only looks at the cut-off every `checkpoint_interval` executions (20 000 by
    // default); look every time, so the bound is exact.
    builder.checkpoint_interval = 1;
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    builder.check(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    eprintln!(
        "{name}: {} executions explored",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn three_threads_insert_helps_sibling_removals() {
    // Root tests bit 0: child[0] = node(bit 7: 0x10, 0x11), child[1] = 0xFF.
    // Thread a removes 0x11, thread b removes 0x10 (siblings: their unlinks chain), and
    // the main thread inserts 0x12, which needs the edge those unlinks rewrite (a new node
    // at bit 6 above 0x10/0x11), so whenever it finds a flag or tag on its path it must
    // help the pending removal before it can link its node.
    model3("three_threads_insert_helps_sibling_removals", || {
        let (t, c) = tree(&[&[0x10], &[0x11], &[0xFF], &[0x12]], &[0, 1, 2]);
        let a = spawn(&t, &c, |t, g| t.remove(&[0x11], g));
        let b = spawn(&t, &c, |t, g| t.remove(&[0x10], g));
        let inserted = {
            let h = c.register();
            let g = h.pin();
            t.insert_or_get(3, &g)
        };
        assert_eq!(inserted, Insert::Inserted);
        assert_eq!(a.join().unwrap(), Some(1));
        assert_eq!(b.join().unwrap(), Some(0));
        assert_eq!(contents(&t, &c), [3, 2]);
    });
}

#[test]
fn three_threads_reader_sees_helped_removal() {
    // Thread a removes 0x11; thread b removes 0x90 (its unlink tags the edge a's splice
    // needs, or the reverse, so one completes the other's); the main thread looks up the
    // surviving key 0x10 and iterates. A key present throughout must always be found, and
    // the iteration must be one of the orders some serialization allows.
    model3("three_threads_reader_sees_helped_removal", || {
        let (t, c) = tree(&[&[0x10], &[0x11], &[0x90]], &[0, 1, 2]);
        let a = spawn(&t, &c, |t, g| t.remove(&[0x11], g));
        let b = spawn(&t, &c, |t, g| t.remove(&[0x90], g));
        let (kept, order) = {
            let h = c.register();
            let g = h.pin();
            let kept = t.get(&[0x10], &g);
            let order: Vec<usize> = t.iter(&g).collect();
            (kept, order)
        };
        assert_eq!(kept, Some(0), "a key present throughout was missed");
        assert!(
            [&[0, 1, 2][..], &[0, 2], &[0, 1], &[0]].contains(&order.as_slice()),
            "{order:?}"
        );
        assert_eq!(a.join().unwrap(), Some(1));
        assert_eq!(b.join().unwrap(), Some(2));
        assert_eq!(contents(&t, &c), [0]);
    });
}

#[test]
fn three_threads_chain_unlink_races_insert() {
    // Same shape as `remove_remove_nested_unlinks_a_chain` (root bit 0 over node(bit 7:
    // 0x10, 0x11) and 0xFF): removing 0xFF tags the root's edge to node(bit 7); removing
    // 0x10 then cannot splice that tagged edge and unlinks the chain root → node(bit 7)
    // with one CAS on the head. Meanwhile an insert of 0x12 wants to replace the very edge
    // the chain runs through (the root's child[0], or after the unlinks the head edge).
    model3("three_threads_chain_unlink_races_insert", || {
        let (t, c) = tree(&[&[0x10], &[0x11], &[0xFF], &[0x12]], &[0, 1, 2]);
        let a = spawn(&t, &c, |t, g| t.remove(&[0xFF], g));
        let b = spawn(&t, &c, |t, g| t.remove(&[0x10], g));
        let i = spawn(&t, &c, |t, g| t.insert_or_get(3, g));
        assert_eq!(a.join().unwrap(), Some(2));
        assert_eq!(b.join().unwrap(), Some(0));
        assert_eq!(i.join().unwrap(), Insert::Inserted);
        assert_eq!(contents(&t, &c), [1, 3]);
    });
}

/// Keys that change while stored: handle `h` reads `a[h]` or `b[h]` as the loom atomic
/// `which[h]` says. A switch is one atomic store, so loom explores it against every step
/// of the tree's operations (a real page changes byte by byte; the tree never assumes
/// anything of a key's bytes beyond what it reads, so a whole-key switch at any point of
/// an operation is the interesting interleaving).
struct Switching {
    a: Vec<Vec<u8>>,
    b: Vec<Vec<u8>>,
    which: Vec<loom::sync::atomic::AtomicUsize>,
}

impl sdtree::KeySource for Switching {
    fn key(&self, h: usize) -> &[u8] {
        if self.which[h].load(loom::sync::atomic::Ordering::Relaxed) == 0 {
            &self.a[h]
        } else {
            &self.b[h]
        }
    }
}

#[test]
fn three_threads_keys_change_while_stored() {
    // Handle 1's key switches from 0x11 to 0x90 while one thread inserts handle 2 (0x12,
    // next to 0x10/0x11 before the switch) and another removes 0x11. Nothing here is
    // guaranteed about what the searches find once a stored key has changed (crate docs,
    // "Consistency"); what is checked is that every operation terminates (loom fails a
    // model whose execution exceeds its branch bound, so a livelock on the changed key
    // fails), that nothing crashes or trips loom's checks of the atomics and of epoch
    // reclamation, that every answer names a handle whose key equals the probe under one of
    // its two versions, and that the tree stays a tree afterwards: iteration yields each
    // handle at most once, agrees with `len`, and a further insert and remove work.
    type SwTree = SdTree<std::sync::Arc<Switching>>;
    loom::model(|| {
        let collector = Collector::new();
        let keys = std::sync::Arc::new(Switching {
            a: vec![vec![0x10], vec![0x11], vec![0x12], vec![0xFF]],
            b: vec![vec![0x10], vec![0x90], vec![0x12], vec![0xFF]],
            which: (0..4)
                .map(|_| loom::sync::atomic::AtomicUsize::new(0))
                .collect(),
        });
        let t: Arc<SwTree> = Arc::new(SdTree::new(keys.clone(), collector.clone()));
        {
            let h = collector.register();
            let g = h.pin();
            assert_eq!(t.insert_or_get(0, &g), Insert::Inserted);
            assert_eq!(t.insert_or_get(1, &g), Insert::Inserted);
        }
        let run = |f: fn(&SwTree, &sdtree::epoch::Guard) -> Option<usize>| {
            let (t, c) = (t.clone(), collector.clone());
            thread::spawn(move || {
                let h = c.register();
                let g = h.pin();
                f(&t, &g)
            })
        };
        let ins = run(|t, g| match t.insert_or_get(2, g) {
            Insert::Inserted => None,
            Insert::Present(p) => Some(p),
            // Allowed once stored keys change (there may be no free bit position).
            Insert::Refused => None,
        });
        let rem = run(|t, g| t.remove(&[0x11], g));
        keys.which[1].store(1, loom::sync::atomic::Ordering::Relaxed);

        // An insert of 0x12 can only find a handle whose key is (or was) 0x12: none.
        assert_eq!(ins.join().unwrap(), None);
        // A remove of 0x11 can only take handle 1, while it still read 0x11.
        assert!(matches!(rem.join().unwrap(), None | Some(1)));

        let h = collector.register();
        let g = h.pin();
        let all: Vec<usize> = t.iter(&g).collect();
        let mut set = all.clone();
        set.sort_unstable();
        set.dedup();
        assert_eq!(set.len(), all.len(), "a handle was yielded twice: {all:?}");
        assert!(all.iter().all(|&x| x < 3), "{all:?}");
        assert!(
            all.contains(&0),
            "an unchanged, never-removed key vanished: {all:?}"
        );
        assert_eq!(t.len(), all.len());
        // Still a working tree: 0xFF goes in and comes out again.
        assert_eq!(t.insert_or_get(3, &g), Insert::Inserted);
        assert_eq!(t.get(&[0xFF], &g), Some(3));
        assert_eq!(t.remove(&[0xFF], &g), Some(3));
    });
}
