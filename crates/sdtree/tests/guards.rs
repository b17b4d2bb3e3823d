//! Guards the guard-taking API accepts, and the ones it refuses (issue 15).
//!
//! `epoch::unprotected()` used to be accepted: crossbeam runs deferred destruction at once
//! under it, so `base::SdMap::remove` freed the entry and then returned a reference into
//! it (a use-after-free that Miri or ASan reports on the read below). Every method now
//! refuses it with a panic before touching the tree, and a value returned by `remove`
//! under a real pin stays alive until that pin ends.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sdtree::base::{MapInsert, SdMap, SdTree};
use sdtree::epoch::{self, Collector, Guard};
use sdtree::Insert;

/// A value that counts its drops.
#[derive(Debug)]
struct Tracked {
    value: u64,
    drops: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn unprotected() -> &'static Guard {
    // SAFETY: every test here runs on one thread, and the guard is refused before the
    // tree reads anything through it.
    unsafe { epoch::unprotected() }
}

/// Runs `f`, expecting the panic that refuses the unprotected guard.
fn refused<T>(what: &str, f: impl FnOnce() -> T) {
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("{what}: the unprotected guard was accepted"),
        Err(err) => err,
    };
    let msg = err
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(
        msg.contains("unprotected"),
        "{what}: unexpected panic {msg:?}"
    );
}

/// A map holding "k" → `Tracked { value: 7 }`, and its drop counter.
fn map_with_one_entry(collector: &Collector) -> (SdMap<Vec<u8>, Tracked>, Arc<AtomicUsize>) {
    let map = SdMap::new(collector.clone());
    let drops = Arc::new(AtomicUsize::new(0));
    let handle = collector.register();
    let guard = handle.pin();
    let value = Tracked {
        value: 7,
        drops: drops.clone(),
    };
    assert!(matches!(
        map.insert_or_get(b"k".to_vec(), value, &guard),
        MapInsert::Inserted(_)
    ));
    (map, drops)
}

#[test]
fn map_refuses_the_unprotected_guard_and_frees_nothing() {
    let collector = Collector::new();
    let (map, drops) = map_with_one_entry(&collector);

    // The use-after-free of issue 15: the value is read from the returned reference.
    refused("remove", || {
        map.remove(b"k", unprotected()).map(|v| v.value)
    });
    refused("remove_if", || {
        map.remove_if(b"k", |_| true, unprotected())
            .map(|v| v.value)
    });
    refused("insert_or_get", || {
        let value = Tracked {
            value: 8,
            drops: drops.clone(),
        };
        matches!(
            map.insert_or_get(b"j".to_vec(), value, unprotected()),
            MapInsert::Inserted(_)
        )
    });
    refused("get", || map.get(b"k", unprotected()).map(|v| v.value));
    refused("get_entry", || map.get_entry(b"k", unprotected()).is_some());
    refused("iter", || map.iter(unprotected()).count());

    // Nothing was removed or dropped (the rejected insert's value was never moved in: it
    // was dropped with the closure, once).
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    let handle = collector.register();
    let guard = handle.pin();
    assert_eq!(map.get(b"k", &guard).map(|v| v.value), Some(7));
    assert_eq!(map.len(), 1);
    drop(guard);
    drop(map);
    assert_eq!(drops.load(Ordering::SeqCst), 2);
}

#[test]
fn removed_value_lives_until_the_guard_is_dropped() {
    let collector = Collector::new();
    let (map, drops) = map_with_one_entry(&collector);
    let handle = collector.register();
    let guard = handle.pin();
    let removed = map.remove(b"k", &guard).expect("present");
    assert!(map.is_empty());
    // Other threads' pins come and go and try to collect; the entry is retired, not freed,
    // while `guard` lives.
    for _ in 0..64 {
        let other = collector.register();
        other.pin().flush();
    }
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    assert_eq!(removed.value, 7);
    drop(guard);
    drop(handle);
    // Once every pin has ended, tearing the collector down runs the deferred drop.
    drop(map);
    drop(collector);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn remove_if_value_lives_until_the_guard_is_dropped() {
    let collector = Collector::new();
    let (map, drops) = map_with_one_entry(&collector);
    let handle = collector.register();
    let guard = handle.pin();
    assert!(map.remove_if(b"k", |v| v.value == 8, &guard).is_none());
    let removed = map
        .remove_if(b"k", |v| v.value == 7, &guard)
        .expect("present");
    for _ in 0..64 {
        let other = collector.register();
        other.pin().flush();
    }
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    assert_eq!(removed.value, 7);
    drop(guard);
    drop(handle);
    drop(map);
    drop(collector);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn tree_refuses_the_unprotected_guard() {
    let keys = vec![b"a".to_vec(), b"b".to_vec()];
    let collector = Collector::new();
    let tree = SdTree::new(&keys, collector.clone());
    {
        let handle = collector.register();
        let guard = handle.pin();
        assert_eq!(tree.insert_or_get(0, &guard), Insert::Inserted);
    }
    refused("insert_or_get", || tree.insert_or_get(1, unprotected()));
    refused("get", || tree.get(b"a", unprotected()));
    refused("get_with_stats", || {
        tree.get_with_stats(b"a", unprotected())
    });
    refused("remove", || tree.remove(b"a", unprotected()));
    refused("remove_handle", || tree.remove_handle(0, unprotected()));
    refused("iter", || tree.iter(unprotected()).count());
    assert_eq!(tree.len(), 1);
    let handle = collector.register();
    assert_eq!(tree.iter(&handle.pin()).collect::<Vec<_>>(), [0]);
}

#[test]
fn a_guard_of_another_collector_is_refused() {
    let keys = vec![b"a".to_vec()];
    let tree = SdTree::new(&keys, Collector::new());
    let other = Collector::new();
    let handle = other.register();
    let guard = handle.pin();
    let result = catch_unwind(AssertUnwindSafe(|| tree.insert_or_get(0, &guard)));
    assert!(result.is_err());
    assert!(tree.is_empty());
}
