//! loom models of every CAS protocol in the tree, with crossbeam-epoch model-checked too.
//!
//! Run with:
//! `RUSTFLAGS="--cfg sdtree_loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p sdtree --test loom --release`
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
