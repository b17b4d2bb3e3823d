//! [`SdMap`]: owned keys and values, pinning crossbeam-epoch's default collector.

use core::fmt;

use crossbeam_epoch as epoch;

use crate::base::{self, MapInsert};
use crate::raw::Insert;

/// A lock-free ordered map from owned byte-string keys to values, pinning for you.
///
/// A thin wrapper over [`base::SdMap`] on crossbeam-epoch's default collector. Values are
/// returned by clone, since the pin ends with each call; use [`SdMap::base`] with a guard
/// to borrow them instead.
///
/// ```
/// use sdtree::{Insert, SdMap};
///
/// let map = SdMap::new();
/// assert_eq!(map.insert_or_get(b"page".to_vec(), 1), Insert::Inserted);
/// assert_eq!(map.insert_or_get(b"page".to_vec(), 2), Insert::Present(1));
/// assert_eq!(map.get(b"page"), Some(1));
/// assert_eq!(map.remove(b"page"), Some(1));
/// assert!(map.is_empty());
/// ```
pub struct SdMap<K, V> {
    inner: base::SdMap<K, V>,
}

impl<K, V> fmt::Debug for SdMap<K, V> {
    /// The entry count, as the guard-taking type underneath prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl<K, V> Default for SdMap<K, V>
where
    K: AsRef<[u8]> + Send + 'static,
    V: Clone + Send + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> SdMap<K, V>
where
    K: AsRef<[u8]> + Send + 'static,
    V: Clone + Send + 'static,
{
    /// An empty map.
    pub fn new() -> Self {
        SdMap {
            inner: base::SdMap::new(epoch::default_collector().clone()),
        }
    }

    /// The guard-taking map underneath.
    pub fn base(&self) -> &base::SdMap<K, V> {
        &self.inner
    }

    /// Inserts `key` → `value` unless an equal key is present; then returns that key's
    /// value and drops the arguments. See [`base::SdMap::insert_or_get`].
    pub fn insert_or_get(&self, key: K, value: V) -> Insert<V> {
        match self.inner.insert_or_get(key, value, &epoch::pin()) {
            MapInsert::Inserted(_) => Insert::Inserted,
            MapInsert::Present { existing, .. } => Insert::Present(existing.clone()),
            MapInsert::Refused { .. } => Insert::Refused,
        }
    }

    /// The value stored under `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<V> {
        self.inner.get(key, &epoch::pin()).cloned()
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> bool {
        self.inner.get(key, &epoch::pin()).is_some()
    }

    /// Removes `key`'s entry; returns its value.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Option<V> {
        self.inner.remove(key, &epoch::pin()).cloned()
    }

    /// Removes `key`'s entry only if `pred` accepts its value; returns the value.
    pub fn remove_if(&self, key: impl AsRef<[u8]>, pred: impl FnMut(&V) -> bool) -> Option<V> {
        self.inner.remove_if(key, pred, &epoch::pin()).cloned()
    }

    /// Calls `f` on every entry in key order, under one pin; weakly consistent.
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        let guard = epoch::pin();
        for (k, v) in self.inner.iter(&guard) {
            f(k, v);
        }
    }

    /// The number of entries (exact when no update is in flight).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the map has no entries (exact when no update is in flight).
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}
