//! The lock-free crit-bit trie itself, generic over how a leaf's key is read.
//!
//! Everything unsafe about the tree lives in this module; [`crate::base`] wraps it for
//! handles read through a [`crate::KeySource`] and for owned keys. The crate-level docs
//! hold the essay (layout, invariants, linearization points, orderings); this module's
//! comments refer to it by section.
//!
//! # Words
//! Every edge of the trie is one `AtomicUsize` word:
//!
//! | bits    | meaning                                                                 |
//! |---------|-------------------------------------------------------------------------|
//! | `0`     | `FLAG`: the leaf under this edge is being removed (set by `remove`)     |
//! | `1`     | `TAG`: the node owning this edge is being removed (set by cleanup)      |
//! | `2`     | `LEAF`: the rest of the word is a handle (`word >> 3`), not a node      |
//! | `3..`   | a node pointer (8-aligned) or a handle                                   |
//!
//! The word `0` (`EMPTY`) only ever appears in the head edge, for an empty tree.

use core::ptr;

use alloc::boxed::Box;
use alloc::vec::Vec;
use crossbeam_epoch::{Collector, Guard};
use smallvec::SmallVec;

use crate::key::{diff, Diff, Pos, Probe};
use crate::sync::{AtomicIsize, AtomicUsize, Ordering};

const FLAG: usize = 0b001;
const TAG: usize = 0b010;
const MARKS: usize = FLAG | TAG;
const LEAF: usize = 0b100;
const LOW_BITS: usize = 0b111;
const EMPTY: usize = 0;

/// The largest handle a tree can store: handles live in the top bits of a word.
pub const MAX_HANDLE: usize = usize::MAX >> 3;

/// An internal node: a bit position and the two edges below it.
///
/// Invariants (essay, "Invariants"): both edges are non-empty; every key below the node
/// agrees on all bits before `pos`; keys under `child[b]` have bit `pos` equal to `b`;
/// a child node's `pos` is greater than this one's. `pos` never changes.
#[repr(C, align(8))]
pub(crate) struct Node {
    child: [AtomicUsize; 2],
    pos: Pos,
}

/// Bytes of tree metadata per stored key: one internal node per key beyond the first.
pub const NODE_BYTES: usize = core::mem::size_of::<Node>();

#[inline(always)]
fn leaf_word(handle: usize) -> usize {
    (handle << 3) | LEAF
}

#[inline(always)]
fn is_leaf(word: usize) -> bool {
    word & LEAF != 0
}

#[inline(always)]
fn handle_of(word: usize) -> usize {
    word >> 3
}

/// The node a non-leaf, non-empty word points to.
///
/// # Safety
/// `word` must have been read from an edge of a tree while the calling thread was pinned,
/// and the pin must still be held: nodes are only freed after every thread pinned at the
/// time of their unlinking has unpinned.
#[inline(always)]
unsafe fn node<'g>(word: usize) -> &'g Node {
    debug_assert!(!is_leaf(word) && word & !LOW_BITS != 0);
    // SAFETY: the caller holds a pin taken before the word was read, so the node it names
    // has not been freed (it is retired through the same collector and only freed once
    // every pin older than the unlink is gone).
    unsafe { &*((word & !LOW_BITS) as *const Node) }
}

/// How a tree reads the key of a leaf, and what it does with a leaf it unlinks.
///
/// # Safety
/// Implementations must return, for a handle, a slice that stays valid while the caller
/// stays pinned, and `retire` must only schedule the leaf's storage for release through `guard` (never free
/// it at once), because other pinned threads may still read the key.
pub(crate) unsafe trait Leaves {
    /// The key bytes of `handle`.
    ///
    /// # Safety
    /// `handle` was read from this tree while the caller was pinned, and still is.
    unsafe fn key(&self, handle: usize) -> &[u8];

    /// `handle`'s leaf was unlinked from the tree; called exactly once per removed leaf.
    ///
    /// # Safety
    /// The leaf is no longer reachable from the tree; `guard` is pinned.
    unsafe fn retire(&self, handle: usize, guard: &Guard);
}

/// What one search cost, as reported by `get_with_stats`.
///
/// Non-exhaustive: more counters may be added; start from `SearchStats::default()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SearchStats {
    /// Internal nodes visited (each tests one bit of the probe key).
    pub nodes_visited: usize,
    /// Bytes of *stored* keys read, final comparison included (rounded up to the 8-byte
    /// word in which the comparison stopped).
    pub stored_key_bytes: usize,
}

/// Counting hooks; `()` counts nothing and compiles away.
pub(crate) trait Meter {
    /// Whether this meter counts bytes (then the final comparison must report them).
    const COUNTS: bool = false;
    fn node(&mut self) {}
    fn stored(&mut self, _bytes: usize) {}
}

impl Meter for () {}

impl Meter for SearchStats {
    const COUNTS: bool = true;
    fn node(&mut self) {
        self.nodes_visited += 1;
    }
    fn stored(&mut self, bytes: usize) {
        self.stored_key_bytes += bytes;
    }
}

/// What `insert_or_get` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Insert<V = usize> {
    /// The new entry was linked into the tree.
    Inserted,
    /// An equal key was already present, with this value; nothing changed.
    Present(V),
    /// Nothing was inserted: a stored key changed while in the tree and now occupies the
    /// bit position the new key needs (see the crate docs, "Consistency"). Cannot happen
    /// while stored keys stay unchanged.
    Refused,
}

/// One edge on a search path: whose edge it is, which of its two, and the word read.
#[derive(Clone, Copy)]
struct Step {
    /// The node owning the edge; null for the tree's head edge.
    owner: *const Node,
    dir: usize,
    word: usize,
}

/// A search path from the head edge down. Inline up to 48 steps; deeper paths spill to
/// the heap. A 1M-key tree of random-tailed pages is searched in about 22 steps, but real
/// pages go deeper (34 on average and up to 61 in issue 15's measurement, up to 240 over
/// the pages of `/usr/lib` in `tests/search_cost.rs`), so the spill does happen.
type Path = SmallVec<[Step; 48]>;

/// Keeps a hot word on its own cache lines (two, for the adjacent-line prefetcher), so
/// that updates of `len` do not evict the head edge every operation reads first.
#[repr(align(128))]
struct Padded<T>(T);

/// The lock-free trie. Keys are read through a [`Leaves`] passed to every call.
pub(crate) struct Raw {
    head: Padded<AtomicUsize>,
    /// Inserts minus removes. Signed: a remove may decrement before the insert it undoes
    /// has incremented.
    len: Padded<AtomicIsize>,
    collector: Collector,
}

impl Raw {
    pub(crate) fn new(collector: Collector) -> Self {
        Raw {
            head: Padded(AtomicUsize::new(EMPTY)),
            len: Padded(AtomicIsize::new(0)),
            collector,
        }
    }

    pub(crate) fn collector(&self) -> &Collector {
        &self.collector
    }

    /// Panics unless `guard` is a pin of this tree's collector.
    ///
    /// `epoch::unprotected()` is refused: under it crossbeam runs deferred destruction at
    /// once, so a node or [`SdMap`](crate::base::SdMap) entry an operation unlinks would be
    /// freed while that operation, or a reference it returns, still reads it
    /// ([`crate::base`], "Guards").
    #[inline]
    pub(crate) fn check_guard(&self, guard: &Guard) {
        match guard.collector() {
            Some(c) => assert!(
                c == &self.collector,
                "sdtree: the guard was pinned in a different collector than the tree's"
            ),
            None => panic!(
                "sdtree: the unprotected guard is not accepted (it frees unlinked nodes and \
                 entries at once); pin the tree's collector instead"
            ),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.0.load(Ordering::Relaxed).max(0) as usize
    }

    #[inline(always)]
    fn edge(&self, step: &Step) -> &AtomicUsize {
        if step.owner.is_null() {
            &self.head.0
        } else {
            // SAFETY: `owner` was read from the tree under the pin every operation holds
            // for its whole run (see `node`).
            unsafe { &(*step.owner).child[step.dir] }
        }
    }

    /// Looks `probe` up; returns the handle stored under an equal key.
    ///
    /// Tests one probe bit per node and reads one stored key, once, at the leaf.
    #[inline]
    pub(crate) fn get_metered<L: Leaves, M: Meter>(
        &self,
        leaves: &L,
        probe: &[u8],
        _guard: &Guard,
        meter: &mut M,
    ) -> Option<usize> {
        let probe = &Probe::new(probe);
        let mut w = self.head.0.load(Ordering::Acquire);
        while !is_leaf(w) {
            if w == EMPTY {
                return None;
            }
            // SAFETY: `w` was read from the tree under `_guard`.
            let n = unsafe { node(w) };
            meter.node();
            w = n.child[probe.bit(n.pos)].load(Ordering::Acquire);
        }
        // Linearization point of a lookup: the load of the leaf's edge. A flagged leaf was
        // already removed (its remove linearized at the flag).
        if w & FLAG != 0 {
            return None;
        }
        let h = handle_of(w);
        // SAFETY: `h` was read from the tree under `_guard`.
        let stored = unsafe { leaves.key(h) };
        if !M::COUNTS {
            // A lookup needs only equality: the library's `memcmp` (vectorized) beats
            // locating the first differing bit, which only updates need.
            return (probe.bytes() == stored).then_some(h);
        }
        let (d, read) = diff(probe, stored);
        meter.stored(read);
        (d == Diff::Equal).then_some(h)
    }

    /// Extends `path` from its last step down to a leaf word (or the empty head).
    #[inline]
    fn descend<M: Meter>(&self, path: &mut Path, probe: &Probe<'_>, meter: &mut M) {
        loop {
            let Some(last) = path.last() else { return };
            let w = last.word;
            if is_leaf(w) || w == EMPTY {
                return;
            }
            // SAFETY: `w` was read from the tree under the caller's guard.
            let n = unsafe { node(w) };
            meter.node();
            let dir = probe.bit(n.pos);
            let word = n.child[dir].load(Ordering::Acquire);
            path.push(Step {
                owner: n as *const Node,
                dir,
                word,
            });
        }
    }

    /// After a failed CAS: drops the stale tail of `path`, keeping the deepest step whose
    /// edge still holds an unmarked word (its owner is then still linked: essay,
    /// "Local retry"), with that word refreshed.
    fn backtrack(&self, path: &mut Path) {
        while path.len() > 1 {
            let last = path.len() - 1;
            let w = self.edge(&path[last]).load(Ordering::Acquire);
            if w & MARKS == 0 {
                path[last].word = w;
                return;
            }
            path.pop();
        }
        path[0].word = self.head.0.load(Ordering::Acquire);
    }

    fn start(&self) -> Path {
        let mut path = Path::new();
        path.push(Step {
            owner: ptr::null(),
            dir: 0,
            word: self.head.0.load(Ordering::Acquire),
        });
        path
    }

    /// Inserts `handle` (whose key is `probe`) unless an equal key is present.
    pub(crate) fn insert_or_get<L: Leaves>(
        &self,
        leaves: &L,
        probe: &[u8],
        handle: usize,
        guard: &Guard,
    ) -> Insert {
        assert!(
            handle <= MAX_HANDLE,
            "sdtree: handle {handle:#x} is above MAX_HANDLE ({MAX_HANDLE:#x})"
        );
        let probe = &Probe::new(probe);
        let new_leaf = leaf_word(handle);
        // The node this insert will publish, allocated once and reused across retries.
        let mut spare: Option<Box<Node>> = None;
        let mut path = self.start();
        loop {
            self.descend(&mut path, probe, &mut ());
            let last = path.len() - 1;
            let w = path[last].word;
            if w == EMPTY {
                // Only the head edge is ever empty.
                if self.cas(&path[last], EMPTY, new_leaf) {
                    self.len.0.fetch_add(1, Ordering::Relaxed);
                    return Insert::Inserted;
                }
                self.backtrack(&mut path);
                continue;
            }
            let h = handle_of(w);
            // SAFETY: `h` was read from the tree under `guard`.
            let (d, _) = diff(probe, unsafe { leaves.key(h) });
            let d = match d {
                Diff::Equal if w & FLAG == 0 => return Insert::Present(h),
                Diff::Equal => {
                    // An equal key whose remove is in progress: finish it, then retry.
                    self.help(&path, last, guard, leaves);
                    self.backtrack(&mut path);
                    continue;
                }
                Diff::At(d) => d,
            };
            // The edge to replace: the last one on the path whose owner tests a bit before
            // `d` (the head tests none). Everything under it differs from `probe` at `d`.
            let mut j = last;
            while j > 0 {
                // SAFETY: `owner` was read from the tree under `guard`.
                if unsafe { (*path[j].owner).pos } < d {
                    break;
                }
                j -= 1;
            }
            if j < last {
                // SAFETY: as above.
                let below = unsafe { (*path[j + 1].owner).pos };
                if below == d {
                    // Only possible if a stored key changed under the tree (essay,
                    // "Consistency"): there is no free position for the new key.
                    return Insert::Refused;
                }
            }
            let expected = path[j].word;
            if expected & MARKS != 0 {
                self.help(&path, j, guard, leaves);
                path.truncate(j + 1);
                self.backtrack(&mut path);
                continue;
            }
            let side = probe.bit(d);
            let n = spare.get_or_insert_with(|| {
                Box::new(Node {
                    child: [AtomicUsize::new(EMPTY), AtomicUsize::new(EMPTY)],
                    pos: 0,
                })
            });
            n.pos = d;
            // Private until the CAS below publishes it: Relaxed stores suffice.
            n.child[side].store(new_leaf, Ordering::Relaxed);
            n.child[side ^ 1].store(expected, Ordering::Relaxed);
            let raw = &**n as *const Node as usize;
            // Linearization point of a successful insert: this CAS (Release publishes the
            // node's fields written above).
            if self.cas(&path[j], expected, raw) {
                // The node is now owned by the tree.
                core::mem::forget(spare.take());
                self.len.0.fetch_add(1, Ordering::Relaxed);
                return Insert::Inserted;
            }
            let now = self.edge(&path[j]).load(Ordering::Acquire);
            if now & MARKS != 0 {
                self.help(&path, j, guard, leaves);
            }
            path.truncate(j + 1);
            self.backtrack(&mut path);
        }
    }

    #[inline(always)]
    fn cas(&self, step: &Step, expected: usize, new: usize) -> bool {
        self.edge(step)
            .compare_exchange(expected, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Removes the leaf stored under a key equal to `probe`, if `accept` takes its handle.
    /// Returns the removed handle.
    pub(crate) fn remove<L: Leaves>(
        &self,
        leaves: &L,
        probe: &[u8],
        mut accept: impl FnMut(usize) -> bool,
        guard: &Guard,
    ) -> Option<usize> {
        let probe = &Probe::new(probe);
        let mut path = self.start();
        let h = loop {
            self.descend(&mut path, probe, &mut ());
            let last = path.len() - 1;
            let w = path[last].word;
            if w == EMPTY || w & FLAG != 0 {
                // Absent, or already removed (linearized at its flag).
                return None;
            }
            let h = handle_of(w);
            // SAFETY: `h` was read from the tree under `guard`.
            if diff(probe, unsafe { leaves.key(h) }).0 != Diff::Equal || !accept(h) {
                return None;
            }
            if w & TAG != 0 {
                // The edge is frozen by a sibling's removal: finish that one first.
                self.help(&path, last, guard, leaves);
                self.backtrack(&mut path);
                continue;
            }
            // Linearization point of a successful remove: the CAS that flags the leaf.
            if self.cas(&path[last], w, w | FLAG) {
                path[last].word = w | FLAG;
                self.len.0.fetch_sub(1, Ordering::Relaxed);
                break h;
            }
            let now = self.edge(&path[last]).load(Ordering::Acquire);
            if now & MARKS != 0 {
                self.help(&path, last, guard, leaves);
            }
            self.backtrack(&mut path);
        };
        // Physical unlink. Anyone who meets the flag may finish it for us; we stop once our
        // flagged leaf is no longer on `probe`'s path.
        loop {
            let last = path.len() - 1;
            if self.help(&path, last, guard, leaves) {
                return Some(h);
            }
            self.backtrack(&mut path);
            self.descend(&mut path, probe, &mut ());
            let w = path[path.len() - 1].word;
            if !(is_leaf(w) && handle_of(w) == h && w & FLAG != 0) {
                return Some(h);
            }
        }
    }

    /// Helps the removal that marked the edge of `path[j]`. Returns whether this call
    /// unlinked it (a `false` may mean someone else did, or the path was stale).
    fn help<L: Leaves>(&self, path: &Path, j: usize, guard: &Guard, leaves: &L) -> bool {
        if j == 0 {
            // A flagged leaf hanging from the head: the tree becomes empty.
            let w = self.head.0.load(Ordering::Acquire);
            if is_leaf(w) && w & FLAG != 0 && self.cas(&path[0], w, EMPTY) {
                // SAFETY: the leaf is unreachable now; we won the unlink, so we are the
                // only one to retire it.
                unsafe { leaves.retire(handle_of(w), guard) };
                return true;
            }
            return false;
        }
        // The removal's parent is `path[j].owner`; its ancestor is the owner of the last
        // edge above it that was not tagged when read (the head edge never is).
        let mut i = j - 1;
        while i > 0 && path[i].word & TAG != 0 {
            i -= 1;
        }
        // SAFETY: read from the tree under `guard`.
        let parent = unsafe { &*path[j].owner };
        let ours = parent.child[path[j].dir].load(Ordering::Acquire);
        if ours & MARKS == 0 {
            return false;
        }
        // If our edge is flagged, its leaf goes and the other child survives; otherwise
        // our edge is tagged, so the other edge holds the flagged leaf (essay, "Removal").
        let sib_dir = if ours & FLAG != 0 {
            path[j].dir ^ 1
        } else {
            path[j].dir
        };
        // Freeze the survivor's edge so no insert can change it under the splice.
        let sib = parent.child[sib_dir].fetch_or(TAG, Ordering::AcqRel) | TAG;
        // Splice the survivor (keeping its FLAG, if it is itself a leaf being removed) into
        // the ancestor's edge, unlinking every node from the successor down to the parent.
        if !self.cas(&path[i], path[i].word, sib & !TAG) {
            return false;
        }
        // We unlinked path[i+1..=j]'s owners. Each one but the parent has its path edge
        // tagged and its other edge holding a flagged leaf; the parent's other edge
        // (not the survivor's) holds the flagged leaf being removed.
        for (k, step) in path.iter().enumerate().take(j + 1).skip(i + 1) {
            let gone = if k == j { sib_dir ^ 1 } else { step.dir ^ 1 };
            // SAFETY: read from the tree under `guard`; unlinked by us just now.
            let owner = unsafe { &*step.owner };
            let w = owner.child[gone].load(Ordering::Acquire);
            debug_assert!(is_leaf(w) && w & FLAG != 0, "unlinked a live subtree");
            if is_leaf(w) {
                // SAFETY: the leaf went out with its parent; we won the unlink.
                unsafe { leaves.retire(handle_of(w), guard) };
            }
            let owner = step.owner as *mut Node;
            // SAFETY: the node is unreachable and retired exactly once (only the winner of
            // the splice gets here). It is freed after every current pin is released.
            unsafe { guard.defer_unchecked(move || drop(Box::from_raw(owner))) };
        }
        true
    }

    /// A cursor for ordered iteration under a guard.
    pub(crate) fn cursor(&self) -> Cursor {
        Cursor {
            stack: alloc::vec![self.head.0.load(Ordering::Acquire)],
        }
    }

    /// Frees every node and passes every leaf still linked to `release`, once.
    ///
    /// # Safety
    /// No other thread may use the tree, now or later.
    pub(crate) unsafe fn destroy(&mut self, mut release: impl FnMut(usize)) {
        let mut stack: Vec<usize> = alloc::vec![self.head.0.load(Ordering::Relaxed)];
        while let Some(w) = stack.pop() {
            if w == EMPTY {
                continue;
            }
            if is_leaf(w) {
                release(handle_of(w));
                continue;
            }
            let p = (w & !LOW_BITS) as *mut Node;
            // SAFETY: a linked node, owned by the tree, reached once (it is a tree), and no
            // other thread can reach it any more.
            let n = unsafe { Box::from_raw(p) };
            stack.push(n.child[0].load(Ordering::Relaxed));
            stack.push(n.child[1].load(Ordering::Relaxed));
        }
        self.head = Padded(AtomicUsize::new(EMPTY));
    }
}

/// A depth-first walk over the words of a tree, yielding handles in key order.
pub(crate) struct Cursor {
    stack: Vec<usize>,
}

impl Cursor {
    /// The next live handle.
    ///
    /// # Safety
    /// Every call must be made under a pin of the tree's collector taken before the cursor
    /// was created and held since.
    pub(crate) unsafe fn next(&mut self) -> Option<usize> {
        while let Some(w) = self.stack.pop() {
            if w == EMPTY {
                continue;
            }
            if is_leaf(w) {
                if w & FLAG == 0 {
                    return Some(handle_of(w));
                }
                continue;
            }
            // SAFETY: the caller holds the pin under which `w` was read.
            let n = unsafe { node(w) };
            self.stack.push(n.child[1].load(Ordering::Acquire));
            self.stack.push(n.child[0].load(Ordering::Acquire));
        }
        None
    }
}
