//! [`sdtree::base::SdMap`] and [`sdtree::base::SdTree`], each on a crossbeam-epoch
//! collector of its own and pinned per operation, with the convenience API of
//! [`sdtree::SdMap`] and [`sdtree::SdTree`] (which pin the default collector).
//!
//! Used by the differential checkers that the fuzz targets run (`differential.rs`,
//! `short_keys.rs`, each including this file with `#[path = "private.rs"]`). A private
//! collector frees every retired node and entry when the program's map or tree is dropped,
//! so each input frees all it allocated: libFuzzer's leak check (LeakSanitizer, which it
//! runs after every input whose mallocs outnumber its frees) then stays idle, where with
//! the default collector's deferred garbage it scanned the heap on nearly every input
//! (`differential_short`: 70 executions per second instead of thousands).

// Each includer uses a part of this file.
#![allow(dead_code)]

use sdtree::base::{self, KeySource, MapInsert};
use sdtree::epoch::{Collector, LocalHandle};
use sdtree::Insert;

/// `base::SdMap` on a collector of its own.
pub struct SdMap<K, V> {
    // Dropped before the handle and the collector: then the collector, dropped last, runs
    // the map's deferred frees.
    map: base::SdMap<K, V>,
    handle: LocalHandle,
}

impl<K, V> SdMap<K, V>
where
    K: AsRef<[u8]> + Send + 'static,
    V: Copy + Send + 'static,
{
    pub fn new() -> Self {
        let collector = Collector::new();
        let handle = collector.register();
        SdMap {
            map: base::SdMap::new(collector),
            handle,
        }
    }

    pub fn insert_or_get(&self, key: K, value: V) -> Insert<V> {
        match self.map.insert_or_get(key, value, &self.handle.pin()) {
            MapInsert::Inserted(_) => Insert::Inserted,
            MapInsert::Present { existing, .. } => Insert::Present(*existing),
            MapInsert::Refused { .. } => Insert::Refused,
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<V> {
        self.map.get(key, &self.handle.pin()).copied()
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    pub fn remove(&self, key: &[u8]) -> Option<V> {
        self.map.remove(key, &self.handle.pin()).copied()
    }

    pub fn remove_if(&self, key: &[u8], pred: impl FnMut(&V) -> bool) -> Option<V> {
        self.map.remove_if(key, pred, &self.handle.pin()).copied()
    }

    /// Every entry in key order, under one pin.
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for (k, v) in self.map.iter(&self.handle.pin()) {
            f(k, v);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// `base::SdTree` on a collector of its own.
pub struct SdTree<S> {
    // Dropped before the handle and the collector, as in `SdMap`.
    tree: base::SdTree<S>,
    handle: LocalHandle,
}

impl<S: KeySource> SdTree<S> {
    pub fn new(source: S) -> Self {
        let collector = Collector::new();
        let handle = collector.register();
        SdTree {
            tree: base::SdTree::new(source, collector),
            handle,
        }
    }

    pub fn source(&self) -> &S {
        self.tree.source()
    }

    pub fn insert_or_get(&self, handle: usize) -> Insert {
        self.tree.insert_or_get(handle, &self.handle.pin())
    }

    pub fn get(&self, key: &[u8]) -> Option<usize> {
        self.tree.get(key, &self.handle.pin())
    }

    pub fn remove(&self, key: &[u8]) -> Option<usize> {
        self.tree.remove(key, &self.handle.pin())
    }

    pub fn remove_handle(&self, handle: usize) -> bool {
        self.tree.remove_handle(handle, &self.handle.pin())
    }

    /// Every handle in key order, under one pin.
    pub fn for_each(&self, mut f: impl FnMut(usize)) {
        for h in self.tree.iter(&self.handle.pin()) {
            f(h);
        }
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }
}
