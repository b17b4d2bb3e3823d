//! [`SdTree`]: handles with in-place keys, pinning crossbeam-epoch's default collector.

use core::fmt;

use crossbeam_epoch as epoch;

use crate::base;
use crate::raw::{Insert, SearchStats};
use crate::KeySource;

/// A lock-free index of handles ordered by keys read in place, pinning for you.
///
/// A thin wrapper over [`base::SdTree`] on crossbeam-epoch's default collector; every
/// method pins for its own duration. See the crate docs for guarantees.
///
/// ```
/// use sdtree::{Insert, SdTree};
///
/// let keys = vec!["b", "a", "ab", "a"];
/// let tree = SdTree::new(keys);
/// for h in 0..4 {
///     let _ = tree.insert_or_get(h);
/// }
/// assert_eq!(tree.insert_or_get(3), Insert::Present(1)); // "a" is handle 1
/// assert_eq!(tree.iter().collect::<Vec<_>>(), [1, 2, 0]); // "a" < "ab" < "b"
/// ```
pub struct SdTree<S> {
    inner: base::SdTree<S>,
}

impl<S: KeySource> SdTree<S> {
    /// An empty tree that reads keys from `source`.
    pub fn new(source: S) -> Self {
        SdTree {
            inner: base::SdTree::new(source, epoch::default_collector().clone()),
        }
    }

    /// The guard-taking tree underneath, for batching many operations under one pin.
    pub fn base(&self) -> &base::SdTree<S> {
        &self.inner
    }

    /// The key source.
    pub fn source(&self) -> &S {
        self.inner.source()
    }

    /// See [`base::SdTree::insert_or_get`].
    ///
    /// # Panics
    /// If `handle > MAX_HANDLE`.
    pub fn insert_or_get(&self, handle: usize) -> Insert {
        self.inner.insert_or_get(handle, &epoch::pin())
    }

    /// See [`base::SdTree::get`].
    pub fn get(&self, key: &[u8]) -> Option<usize> {
        self.inner.get(key, &epoch::pin())
    }

    /// See [`base::SdTree::get_with_stats`].
    pub fn get_with_stats(&self, key: &[u8]) -> (Option<usize>, SearchStats) {
        self.inner.get_with_stats(key, &epoch::pin())
    }

    /// See [`base::SdTree::remove`].
    pub fn remove(&self, key: &[u8]) -> Option<usize> {
        self.inner.remove(key, &epoch::pin())
    }

    /// See [`base::SdTree::remove_handle`].
    pub fn remove_handle(&self, handle: usize) -> bool {
        self.inner.remove_handle(handle, &epoch::pin())
    }

    /// The handles in key order, weakly consistent (see [`base::SdTree::iter`]). The
    /// iterator ([`Iter`]) holds a pin until it is dropped.
    pub fn iter(&self) -> Iter<'_, S> {
        let guard = epoch::pin();
        // The pin is taken before the cursor reads the head.
        let cursor = self.inner.raw_cursor();
        Iter {
            _guard: guard,
            cursor,
            _tree: core::marker::PhantomData,
        }
    }

    /// The number of entries (exact when no update is in flight).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the tree has no entries (exact when no update is in flight).
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

impl<S> fmt::Debug for SdTree<S> {
    /// The entry count, as the guard-taking type underneath prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

/// An iterator over an [`SdTree`]'s handles in key order ([`SdTree::iter`]), holding its
/// own pin of crossbeam-epoch's default collector until it is dropped (keep it short-lived:
/// a pin held long delays every thread's reclamation).
///
/// ```
/// use sdtree::SdTree;
///
/// let tree = SdTree::new(vec!["b", "a"]);
/// let _ = (tree.insert_or_get(0), tree.insert_or_get(1));
/// let iter: sdtree::Iter<'_, Vec<&str>> = tree.iter();
/// assert_eq!(iter.collect::<Vec<_>>(), [1, 0]);
/// ```
pub struct Iter<'t, S> {
    _guard: epoch::Guard,
    cursor: crate::raw::Cursor,
    _tree: core::marker::PhantomData<&'t SdTree<S>>,
}

impl<S> fmt::Debug for Iter<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter").finish_non_exhaustive()
    }
}

impl<S> Iterator for Iter<'_, S> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        // SAFETY: `_guard` was pinned before the cursor was made and lives as long as it.
        unsafe { self.cursor.next() }
    }
}
