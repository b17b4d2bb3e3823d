//! The guard-taking API, usable without `std`.
//!
//! Every operation takes a [`Guard`] pinned in the tree's [`Collector`]; references the
//! tree hands out live as long as that guard. This is crossbeam-skiplist's `base` split:
//! the types at the crate root wrap these and pin for you (with `std`).
//!
//! Two front ends share one algorithm (the private `raw` module):
//! - [`SdTree`] stores small integer *handles* and reads each handle's key in place
//!   through a [`KeySource`] you supply (for pages: a page id, read from guest memory).
//! - [`SdMap`] owns its keys and values (`K: AsRef<[u8]>`), one heap entry per key.
//!
//! # Guards
//! Every method taking a [`Guard`] panics unless the guard is pinned in the tree's own
//! collector ([`SdTree::collector`], [`SdMap::collector`]): `collector.register().pin()`,
//! or [`epoch::pin`](crossbeam_epoch::pin) for a tree built on
//! [`epoch::default_collector`](crossbeam_epoch::default_collector).
//!
//! In particular [`epoch::unprotected`](crossbeam_epoch::unprotected) is refused, by every
//! method, reads included. Under that guard crossbeam runs deferred destruction at once,
//! which this API cannot be sound with: [`SdMap::remove`] would return a reference into
//! the entry it had just freed, an update that helps finish another removal would go on
//! to read the nodes it had just unlinked and freed, and a reference a read returned
//! under it is protected by no pin at all, so a later removal by the same thread could
//! free the entry under it. Refusing it keeps every returned reference and every
//! internal read protected by a real pin. (Tearing a tree down needs no guard: dropping
//! it frees everything, with `&mut` access.)
//!
//! ```
//! use sdtree::{base, epoch};
//!
//! let collector = epoch::Collector::new();
//! let map = base::SdMap::new(collector.clone());
//! let handle = collector.register();
//! let guard = handle.pin();
//! let _ = map.insert_or_get("k", 1, &guard);
//! let removed = map.remove("k", &guard).unwrap(); // the entry is retired, not freed:
//! assert_eq!(*removed, 1); // it stays readable for as long as `guard` is held
//!
//! // An unprotected guard is refused (a panic), never used.
//! let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
//!     // SAFETY: no other thread uses the map (the guard is refused anyway).
//!     map.get("k", unsafe { epoch::unprotected() }).is_some()
//! }));
//! assert!(refused.is_err());
//! ```

use core::fmt;
use core::marker::PhantomData;

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use crossbeam_epoch::{Collector, Guard};

use crate::raw::{Cursor, Insert, Leaves, Raw, SearchStats};

/// Where an [`SdTree`] reads the key bytes of a handle.
///
/// The tree never copies keys: every search reads the stored keys it needs through this
/// trait. For 4 KiB pages the handle is a page id and `key` returns the page.
///
/// # Contract
/// While a handle is in the tree, and until every guard pinned before its removal has
/// been dropped, `key` must return a readable slice, and should return the same bytes.
/// If the bytes change anyway (a page written behind the tree's back), the tree stays
/// memory-safe and every operation terminates, but searches may miss entries (crate docs,
/// "Consistency"). A panic in `key` propagates out of the operation and leaves the tree
/// consistent.
///
/// # Examples
/// ```
/// use sdtree::KeySource;
///
/// /// Pages in one arena, addressed by index.
/// struct Pages(Vec<[u8; 4096]>);
///
/// impl KeySource for Pages {
///     fn key(&self, handle: usize) -> &[u8] {
///         &self.0[handle]
///     }
/// }
/// ```
pub trait KeySource {
    /// The key bytes of `handle`.
    fn key(&self, handle: usize) -> &[u8];
}

impl<T: AsRef<[u8]>> KeySource for [T] {
    /// Handle `i` is the `i`-th element. Panics on a handle out of range.
    fn key(&self, handle: usize) -> &[u8] {
        self[handle].as_ref()
    }
}

impl<T: AsRef<[u8]>> KeySource for Vec<T> {
    /// Handle `i` is the `i`-th element. Panics on a handle out of range.
    fn key(&self, handle: usize) -> &[u8] {
        self[handle].as_ref()
    }
}

impl<S: KeySource + ?Sized> KeySource for &S {
    fn key(&self, handle: usize) -> &[u8] {
        (**self).key(handle)
    }
}

impl<S: KeySource + ?Sized> KeySource for Box<S> {
    fn key(&self, handle: usize) -> &[u8] {
        (**self).key(handle)
    }
}

impl<S: KeySource + ?Sized> KeySource for Arc<S> {
    fn key(&self, handle: usize) -> &[u8] {
        (**self).key(handle)
    }
}

/// Leaves whose keys a [`KeySource`] supplies; handles are the user's, so nothing is freed.
struct Sourced<'s, S: ?Sized>(&'s S);

// SAFETY: `key` returns a slice borrowed from the source, valid for the borrow; `retire`
// frees nothing (handles belong to the user).
unsafe impl<S: KeySource + ?Sized> Leaves for Sourced<'_, S> {
    unsafe fn key(&self, handle: usize) -> &[u8] {
        self.0.key(handle)
    }
    unsafe fn retire(&self, _handle: usize, _guard: &Guard) {}
}

/// A lock-free index of handles ordered by keys read in place (guard-taking API).
///
/// See the crate docs for the algorithm and its guarantees, and [`crate::SdTree`] for the
/// version that pins for you. Every method taking a guard panics unless it is a pin of
/// the tree's collector; the unprotected guard is refused (module docs, "Guards").
///
/// # Examples
/// ```
/// use sdtree::{base, epoch, Insert};
///
/// let pages: Vec<[u8; 64]> = vec![[1; 64], [2; 64], [1; 64]];
/// let collector = epoch::Collector::new();
/// let tree = base::SdTree::new(&pages, collector.clone());
/// let handle = collector.register();
/// let guard = handle.pin();
/// assert_eq!(tree.insert_or_get(0, &guard), Insert::Inserted);
/// assert_eq!(tree.insert_or_get(1, &guard), Insert::Inserted);
/// // Page 2 has the same contents as page 0: the tree answers with page 0.
/// assert_eq!(tree.insert_or_get(2, &guard), Insert::Present(0));
/// assert_eq!(tree.get(&[2; 64], &guard), Some(1));
/// ```
pub struct SdTree<S> {
    raw: Raw,
    source: S,
}

impl<S: KeySource> SdTree<S> {
    /// An empty tree that reads keys from `source` and reclaims nodes in `collector`.
    pub fn new(source: S, collector: Collector) -> Self {
        SdTree {
            raw: Raw::new(collector),
            source,
        }
    }

    /// The key source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The collector every guard passed to this tree must come from.
    pub fn collector(&self) -> &Collector {
        self.raw.collector()
    }

    fn leaves(&self) -> Sourced<'_, S> {
        Sourced(&self.source)
    }

    /// Inserts `handle` unless a key equal to its key is present, in which case the
    /// present handle is returned and nothing changes: the deduplication primitive.
    ///
    /// Reads `handle`'s key through the key source.
    ///
    /// # Panics
    /// If `handle > MAX_HANDLE`, or if `guard` is not a pin of the tree's collector (as
    /// every method here: module docs, "Guards").
    pub fn insert_or_get(&self, handle: usize, guard: &Guard) -> Insert {
        self.raw.check_guard(guard);
        let key = self.source.key(handle);
        self.raw.insert_or_get(&self.leaves(), key, handle, guard)
    }

    /// The handle stored under a key equal to `key`.
    pub fn get(&self, key: &[u8], guard: &Guard) -> Option<usize> {
        self.raw.check_guard(guard);
        self.raw.get_metered(&self.leaves(), key, guard, &mut ())
    }

    /// [`get`](Self::get), also reporting what the search cost.
    pub fn get_with_stats(&self, key: &[u8], guard: &Guard) -> (Option<usize>, SearchStats) {
        self.raw.check_guard(guard);
        let mut stats = SearchStats::default();
        let found = self.raw.get_metered(&self.leaves(), key, guard, &mut stats);
        (found, stats)
    }

    /// Removes the entry stored under `key`; returns its handle.
    ///
    /// The handle's key may still be read by operations pinned before this call returned:
    /// keep it readable until they unpin (e.g. release it with `guard.defer`).
    pub fn remove(&self, key: &[u8], guard: &Guard) -> Option<usize> {
        self.raw.check_guard(guard);
        self.raw.remove(&self.leaves(), key, |_| true, guard)
    }

    /// Removes `handle` if it is the entry stored under its key (and not another handle
    /// with an equal key). Returns whether it was removed.
    pub fn remove_handle(&self, handle: usize, guard: &Guard) -> bool {
        self.raw.check_guard(guard);
        let key = self.source.key(handle);
        self.raw
            .remove(&self.leaves(), key, |h| h == handle, guard)
            .is_some()
    }

    /// The handles in key order (byte-lexicographic; a prefix sorts first).
    ///
    /// Weakly consistent: every entry present for the whole iteration is yielded once;
    /// entries inserted or removed meanwhile may or may not be.
    pub fn iter<'g>(&'g self, guard: &'g Guard) -> Iter<'g> {
        self.raw.check_guard(guard);
        Iter {
            cursor: self.raw.cursor(),
            _guard: guard,
        }
    }

    /// A cursor over the handles; the caller keeps a pin of the tree's collector taken
    /// before this call for as long as it uses the cursor.
    #[cfg(all(feature = "std", not(sdtree_loom)))]
    pub(crate) fn raw_cursor(&self) -> crate::raw::Cursor {
        self.raw.cursor()
    }

    /// The number of entries (exact when no update is in flight).
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether the tree has no entries (exact when no update is in flight).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S> fmt::Debug for SdTree<S> {
    /// The entry count; the entries themselves are behind the epoch and not printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SdTree")
            .field("len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl<S> Drop for SdTree<S> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no other thread can use the tree. Handles are the user's.
        unsafe { self.raw.destroy(|_| {}) };
    }
}

/// An iterator over an [`SdTree`]'s handles in key order ([`SdTree::iter`]), valid while
/// the guard it borrows lives.
///
/// ```
/// use sdtree::{base, epoch};
///
/// let keys = vec!["b", "a"];
/// let collector = epoch::Collector::new();
/// let tree = base::SdTree::new(&keys, collector.clone());
/// let handle = collector.register();
/// let guard = handle.pin();
/// let _ = (tree.insert_or_get(0, &guard), tree.insert_or_get(1, &guard));
/// let iter: base::Iter<'_> = tree.iter(&guard);
/// assert_eq!(iter.collect::<Vec<_>>(), [1, 0]);
/// ```
pub struct Iter<'g> {
    cursor: Cursor,
    _guard: &'g Guard,
}

impl fmt::Debug for Iter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter").finish_non_exhaustive()
    }
}

impl Iterator for Iter<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        // SAFETY: `_guard` was pinned before the cursor was made and outlives `self`.
        unsafe { self.cursor.next() }
    }
}

/// One owned key and value, the leaf of an [`SdMap`]. Aligned so its address fits a
/// handle (`address >> 3`).
#[repr(align(8))]
struct Entry<K, V> {
    key: K,
    value: V,
}

fn entry_ptr<K, V>(handle: usize) -> *mut Entry<K, V> {
    (handle << 3) as *mut Entry<K, V>
}

/// Leaves of an [`SdMap`]: handles are entry addresses.
struct Entries<K, V>(PhantomData<Box<Entry<K, V>>>);

// SAFETY: a handle in the map is the address of a live `Entry`, freed only through the
// guard once unlinked (`retire`), or when the map is dropped, so `key` reads live memory
// for as long as the caller stays pinned.
unsafe impl<K: AsRef<[u8]>, V> Leaves for Entries<K, V> {
    unsafe fn key(&self, handle: usize) -> &[u8] {
        // SAFETY: the caller read `handle` from the map while pinned; the entry is freed
        // no earlier than every such pin ends.
        unsafe { (*entry_ptr::<K, V>(handle)).key.as_ref() }
    }
    unsafe fn retire(&self, handle: usize, guard: &Guard) {
        let p = entry_ptr::<K, V>(handle);
        // SAFETY: the entry is unlinked and retired once; it is dropped after every pin
        // that could have read it has ended. `K`/`V: Send` (bounds on the map's updating
        // methods) lets the drop run on another thread.
        unsafe { guard.defer_unchecked(move || drop(Box::from_raw(p))) };
    }
}

/// A lock-free ordered map from owned byte-string keys to values (guard-taking API).
///
/// References it returns live as long as the guard. Every method taking a guard panics
/// unless it is a pin of the map's collector; the unprotected guard is refused (module
/// docs, "Guards").
///
/// # Examples
/// ```
/// use sdtree::{base, epoch};
///
/// let collector = epoch::Collector::new();
/// let map = base::SdMap::new(collector.clone());
/// let handle = collector.register();
/// let guard = handle.pin();
/// map.insert_or_get("apple".to_string(), 1, &guard);
/// map.insert_or_get("app".to_string(), 2, &guard);
/// assert_eq!(map.get("app", &guard), Some(&2));
/// let keys: Vec<&str> = map.iter(&guard).map(|(k, _)| k.as_str()).collect();
/// assert_eq!(keys, ["app", "apple"]);
/// ```
pub struct SdMap<K, V> {
    raw: Raw,
    entries: Entries<K, V>,
}

// SAFETY: the map owns its entries; sending it sends them (`K`, `V: Send`), and readers on
// other threads share `&K`/`&V` (`Sync`).
unsafe impl<K: Send + Sync, V: Send + Sync> Send for SdMap<K, V> {}
// SAFETY: shared use hands out `&K`/`&V` across threads (`Sync`) and may drop entries on
// another thread (`Send`).
unsafe impl<K: Send + Sync, V: Send + Sync> Sync for SdMap<K, V> {}

/// What [`SdMap::insert_or_get`] did. Rejected keys and values are handed back.
#[derive(Debug)]
#[must_use]
pub enum MapInsert<'g, K, V> {
    /// The entry was inserted; this is its value in the map.
    Inserted(&'g V),
    /// An equal key was present with value `existing`; `key` and `value` were not stored.
    Present {
        /// The value already in the map.
        existing: &'g V,
        /// The rejected key.
        key: K,
        /// The rejected value.
        value: V,
    },
    /// Nothing was inserted (see [`Insert::Refused`]); cannot happen while every key's
    /// `as_ref` keeps returning the same bytes.
    Refused {
        /// The rejected key.
        key: K,
        /// The rejected value.
        value: V,
    },
}

impl<K, V> SdMap<K, V>
where
    K: AsRef<[u8]> + Send + 'static,
    V: Send + 'static,
{
    /// An empty map reclaiming memory in `collector`.
    pub fn new(collector: Collector) -> Self {
        SdMap {
            raw: Raw::new(collector),
            entries: Entries(PhantomData),
        }
    }

    /// The collector every guard passed to this map must come from.
    pub fn collector(&self) -> &Collector {
        self.raw.collector()
    }

    /// Inserts `key` → `value` unless an equal key is present.
    ///
    /// # Panics
    /// If `guard` is not a pin of the map's collector (module docs, "Guards").
    pub fn insert_or_get<'g>(&'g self, key: K, value: V, guard: &'g Guard) -> MapInsert<'g, K, V> {
        self.raw.check_guard(guard);
        let entry = Box::into_raw(Box::new(Entry { key, value }));
        let handle = entry as usize >> 3;
        // SAFETY: `entry` is ours until the insert publishes it.
        let probe = unsafe { (*entry).key.as_ref() };
        match self.raw.insert_or_get(&self.entries, probe, handle, guard) {
            // SAFETY: now in the map; freed only after `guard` is dropped.
            Insert::Inserted => MapInsert::Inserted(unsafe { &(*entry).value }),
            Insert::Present(h) => {
                // SAFETY: not published: still ours.
                let Entry { key, value } = *unsafe { Box::from_raw(entry) };
                MapInsert::Present {
                    // SAFETY: read from the map under `guard`.
                    existing: unsafe { &(*entry_ptr::<K, V>(h)).value },
                    key,
                    value,
                }
            }
            Insert::Refused => {
                // SAFETY: not published: still ours.
                let Entry { key, value } = *unsafe { Box::from_raw(entry) };
                MapInsert::Refused { key, value }
            }
        }
    }

    /// The value stored under `key`.
    pub fn get<'g>(&'g self, key: impl AsRef<[u8]>, guard: &'g Guard) -> Option<&'g V> {
        self.get_entry(key, guard).map(|(_, v)| v)
    }

    /// The key and value stored under `key`.
    pub fn get_entry<'g>(
        &'g self,
        key: impl AsRef<[u8]>,
        guard: &'g Guard,
    ) -> Option<(&'g K, &'g V)> {
        self.raw.check_guard(guard);
        let h = self
            .raw
            .get_metered(&self.entries, key.as_ref(), guard, &mut ())?;
        // SAFETY: read from the map under `guard`.
        let e = unsafe { &*entry_ptr::<K, V>(h) };
        Some((&e.key, &e.value))
    }

    /// Removes the entry under `key`; its value stays readable while `guard` lives.
    ///
    /// The entry is retired through `guard` and dropped only once every pin that could
    /// have read it (this one included) has ended: the returned reference never dangles.
    /// That needs a real pin, hence the refused unprotected guard (module docs, "Guards").
    pub fn remove<'g>(&'g self, key: impl AsRef<[u8]>, guard: &'g Guard) -> Option<&'g V> {
        self.remove_if(key, |_| true, guard)
    }

    /// Removes the entry under `key` only if `pred` accepts its value (checked on the
    /// entry that the removal then unlinks; use it to remove one specific value). The
    /// returned value stays readable while `guard` lives, as with [`SdMap::remove`].
    pub fn remove_if<'g>(
        &'g self,
        key: impl AsRef<[u8]>,
        mut pred: impl FnMut(&V) -> bool,
        guard: &'g Guard,
    ) -> Option<&'g V> {
        self.raw.check_guard(guard);
        let h = self.raw.remove(
            &self.entries,
            key.as_ref(),
            // SAFETY: `h` is read from the map under `guard`.
            |h| pred(unsafe { &(*entry_ptr::<K, V>(h)).value }),
            guard,
        )?;
        // SAFETY: removed, but retired through `guard` (`retire` defers the drop), which
        // `check_guard` above proved is a real pin of this map's collector, not
        // `unprotected` (which would run the drop at once): the entry stays live until
        // `guard` and every other pin older than the unlink have ended.
        Some(unsafe { &(*entry_ptr::<K, V>(h)).value })
    }

    /// Entries in key order; weakly consistent, like [`SdTree::iter`].
    pub fn iter<'g>(&'g self, guard: &'g Guard) -> MapIter<'g, K, V> {
        self.raw.check_guard(guard);
        MapIter {
            cursor: self.raw.cursor(),
            _guard: guard,
            _entries: PhantomData,
        }
    }

    /// The number of entries (exact when no update is in flight).
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether the map has no entries (exact when no update is in flight).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K, V> fmt::Debug for SdMap<K, V> {
    /// The entry count; the entries themselves are behind the epoch and not printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SdMap")
            .field("len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

impl<K, V> Drop for SdMap<K, V> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no other thread can use the map. Each linked entry is
        // passed once and was allocated by `insert_or_get` with `Box`.
        unsafe {
            self.raw
                .destroy(|h| drop(Box::from_raw(entry_ptr::<K, V>(h))))
        };
    }
}

/// An iterator over an [`SdMap`]'s entries in key order ([`SdMap::iter`]), yielding
/// references valid while the guard it borrows lives.
///
/// ```
/// use sdtree::{base, epoch};
///
/// let collector = epoch::Collector::new();
/// let map = base::SdMap::new(collector.clone());
/// let handle = collector.register();
/// let guard = handle.pin();
/// let _ = map.insert_or_get("b", 2, &guard);
/// let _ = map.insert_or_get("a", 1, &guard);
/// let iter: base::MapIter<'_, &str, i32> = map.iter(&guard);
/// assert_eq!(iter.map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), [("a", 1), ("b", 2)]);
/// ```
pub struct MapIter<'g, K, V> {
    cursor: Cursor,
    _guard: &'g Guard,
    _entries: PhantomData<&'g Entry<K, V>>,
}

impl<K, V> fmt::Debug for MapIter<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapIter").finish_non_exhaustive()
    }
}

impl<'g, K: 'g, V: 'g> Iterator for MapIter<'g, K, V> {
    type Item = (&'g K, &'g V);
    fn next(&mut self) -> Option<Self::Item> {
        // SAFETY: `_guard` was pinned before the cursor was made and outlives `self`.
        let h = unsafe { self.cursor.next() }?;
        // SAFETY: read under `_guard`; entries are freed only after it is dropped.
        let e = unsafe { &*entry_ptr::<K, V>(h) };
        Some((&e.key, &e.value))
    }
}
