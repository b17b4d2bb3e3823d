//! The mark: the first [`MARK_WORDS`] little-endian `u64` words of a freed page.

use crate::sync::{AtomicU64, Ordering};

/// How many `u64` words the mark occupies at the start of a page.
pub const MARK_WORDS: usize = 2;
/// How many bytes the mark occupies at the start of a page.
pub const MARK_BYTES: usize = MARK_WORDS * 8;
/// Index of the indicator word (the pool's secret) in the mark.
pub const INDICATOR: usize = 0;
/// Index of the location word (`pool_id << 32 | slot`) in the mark.
pub const LOCATION: usize = 1;

/// Atomic access to the first [`MARK_WORDS`] words of one page.
///
/// Guest and host touch a freed page's first words at the same time, so they must be
/// read and written as whole atomic `u64`s, never byte by byte and never through a plain
/// reference. Words are little-endian: on a big-endian target an implementation over raw
/// bytes must byte-swap.
///
/// Contract for implementations:
/// - `load(i)` is an atomic load with (at least) `Acquire` ordering;
/// - `store(i, v)` is an atomic store with (at least) `Release` ordering;
/// - `i < MARK_WORDS` on every call the protocol makes; an implementation may panic
///   otherwise.
///
/// pip implements it for `[AtomicU64; N]` (`N >= MARK_WORDS`; `core`'s `AtomicU64`, or
/// loom's in a `--cfg pip_loom` build) so that tests and models can play a page with a few
/// atomics; a page-memory backend implements it for a page of guest memory.
pub trait MarkWords {
    /// Atomically loads word `i` of the page (`Acquire`).
    fn load(&self, i: usize) -> u64;
    /// Atomically stores `v` into word `i` of the page (`Release`).
    fn store(&self, i: usize, v: u64);
}

impl<const N: usize> MarkWords for [AtomicU64; N] {
    #[inline]
    fn load(&self, i: usize) -> u64 {
        const {
            assert!(
                N >= MARK_WORDS,
                "a page must hold at least MARK_WORDS words"
            )
        };
        self[i].load(Ordering::Acquire)
    }

    #[inline]
    fn store(&self, i: usize, v: u64) {
        const {
            assert!(
                N >= MARK_WORDS,
                "a page must hold at least MARK_WORDS words"
            )
        };
        self[i].store(v, Ordering::Release)
    }
}

impl<T: MarkWords + ?Sized> MarkWords for &T {
    #[inline]
    fn load(&self, i: usize) -> u64 {
        (**self).load(i)
    }

    #[inline]
    fn store(&self, i: usize, v: u64) {
        (**self).store(i, v)
    }
}

/// A copy of a page's mark words, as read by the host (or a test).
///
/// Nothing in it is trusted: it may be arbitrary page contents. [`Mark::read`] loads the
/// indicator first (`Acquire`), so when the indicator is a guest's fresh offer, the
/// location written before it is seen too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mark {
    /// Word 0: the pool's secret indicator, if this is a mark at all.
    pub indicator: u64,
    /// Word 1: `pool_id << 32 | slot`.
    pub location: u64,
}

impl Mark {
    /// Reads the mark words of `page`: the indicator first, then the location.
    #[inline]
    pub fn read<P: MarkWords + ?Sized>(page: &P) -> Mark {
        let indicator = page.load(INDICATOR);
        let location = page.load(LOCATION);
        Mark {
            indicator,
            location,
        }
    }

    /// The pool id the location word names (its high 32 bits).
    #[inline]
    pub fn pool_id(&self) -> u32 {
        (self.location >> 32) as u32
    }

    /// The slot index the location word names (its low 32 bits).
    #[inline]
    pub fn slot(&self) -> u32 {
        self.location as u32
    }
}

/// The location word for `slot` of pool `pool_id`: `pool_id << 32 | slot`. Pool ids
/// start at 1, so a location word is never 0.
#[inline]
pub const fn location(pool_id: u32, slot: u32) -> u64 {
    (pool_id as u64) << 32 | slot as u64
}
