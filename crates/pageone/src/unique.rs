//! Unique pages: stable pages with no twin yet, indexed where they are.
//!
//! A stable page that matches no canonical page is not copied anywhere. It stays in the
//! guest's own memory, write-protected, and is entered in this index under a *print* of
//! its contents (a seeded 64-bit fingerprint, tagged with the page's tree group). Only
//! when a second stable page with the same print comes along do both pages pay for
//! sharing: the newcomer is made canonical (a copy into the backend's store and a remap)
//! and the indexed page is handed that canonical page, through its chunk's list of twins,
//! to merge with. A page
//! without a twin so costs one read and one index entry, never a copy or a mapping
//! (Linux KSM's unstable tree, in spirit).
//!
//! # Why a print, not the page read in place
//! The SD tree can index keys read in place, and guest pages are mapped in the engine's
//! process; but a key read in place is read *whenever* a search passes by, long after the
//! page was indexed. The Linux backend reads guest memory only through
//! `process_vm_readv`, under its checks that the page is still the region's, because a
//! VMM may unmap guest memory at any time: a search reading an unmapped page in place
//! would fault the whole VMM. A print is read once, while the page is protected, and is
//! the engine's own memory from then on.
//!
//! # Consistency
//! A print is a hint, never a proof. Two pages with equal prints are *candidates*; the
//! merge itself is verified as every merge is: the newcomer becomes canonical only if it
//! is still protected under its token, and the indexed page merges with it only if the
//! backend finds it protected, unwritten and equal in full at the switch. Equal prints of
//! different contents (a collision: about one in 2⁶⁴ per pair, and the seed is random per
//! engine, so a guest cannot aim for one) cost one needless canonicalization; the indexed
//! page then finds no equal canonical page and is indexed again.
//!
//! An entry is removed when its page is written (the engine notices at its next pass over
//! the page), when a twin takes it (under the shard's lock, so one twin takes it once),
//! and by `unmerge_all`. An entry whose page was written but not yet noticed is
//! recognized by its stale token and replaced.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

use page_memory::{PageId, ProtectToken, PAGE_SIZE};

/// An indexed unique page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UniqueRef {
    pub(crate) page: PageId,
    pub(crate) token: ProtectToken,
}

/// What [`Uniques::pair`] did.
pub(crate) enum Pair {
    /// No twin: the page is indexed now.
    Indexed,
    /// No twin, and the page was not to be indexed.
    Alone,
    /// An indexed page with the same print, taken out of the index: the caller's page
    /// becomes canonical, and the twin is told to merge with it.
    Twin(UniqueRef),
}

/// Keys are prints already: hash them as they are.
#[derive(Clone, Copy, Default)]
pub(crate) struct PrintHasher(u64);

impl Hasher for PrintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Clone, Copy, Default)]
pub(crate) struct BuildPrintHasher;

impl BuildHasher for BuildPrintHasher {
    type Hasher = PrintHasher;
    fn build_hasher(&self) -> PrintHasher {
        PrintHasher(0)
    }
}

type Shard = HashMap<u64, UniqueRef, BuildPrintHasher>;

/// The index of unique pages: prints to pages, in shards locked separately (a lookup
/// holds one shard for a hash probe).
pub(crate) struct Uniques {
    shards: Box<[Mutex<Shard>]>,
    seed: u64,
}

impl Uniques {
    const SHARDS: usize = 64;

    pub(crate) fn new() -> Self {
        // A seed nobody outside the engine knows, so a guest cannot aim for collisions.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64);
        Uniques {
            shards: (0..Self::SHARDS)
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            seed,
        }
    }

    /// The print of a page's contents in tree group `group`: equal contents in one group
    /// have equal prints. Never 0.
    pub(crate) fn print(&self, bytes: &[u8], group: usize) -> u64 {
        fingerprint(
            bytes,
            self.seed ^ (group as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ) | 1
    }

    fn shard(&self, print: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(print >> 58) as usize % Self::SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Indexes `me` under `print` (if `index`), unless a live page is indexed there
    /// already: that one is taken out and returned. `live` tells whether an indexed page's
    /// token still holds (an entry whose page was written is replaced).
    pub(crate) fn pair(
        &self,
        print: u64,
        me: UniqueRef,
        index: bool,
        live: impl FnOnce(&UniqueRef) -> bool,
    ) -> Pair {
        let mut shard = self.shard(print);
        match shard.get(&print) {
            Some(other) if other.page != me.page && live(other) => {
                let other = *other;
                shard.remove(&print);
                Pair::Twin(other)
            }
            _ if index => {
                shard.insert(print, me);
                Pair::Indexed
            }
            _ => Pair::Alone,
        }
    }

    /// Takes `page`'s entry under `print` out of the index, if it is still there.
    pub(crate) fn remove(&self, print: u64, page: PageId) {
        let mut shard = self.shard(print);
        if shard.get(&print).is_some_and(|r| r.page == page) {
            shard.remove(&print);
        }
    }

    /// Bytes of index per entry (key, value, and the table's slack at its usual load).
    pub(crate) fn entry_bytes() -> usize {
        (std::mem::size_of::<(u64, UniqueRef)>() + 1) * 8 / 7
    }
}

/// A seeded 64-bit fingerprint of a page (every word counts): equal pages have equal
/// ones.
pub(crate) fn fingerprint(bytes: &[u8], seed: u64) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    debug_assert!(bytes.len() <= PAGE_SIZE);
    let mut lanes = [
        seed ^ 1,
        seed ^ 2,
        seed.rotate_left(17) ^ 3,
        seed.rotate_left(41) ^ 4,
    ];
    for c in bytes.chunks_exact(32) {
        for (l, w) in lanes.iter_mut().zip(c.chunks_exact(8)) {
            let w = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            *l = (*l ^ w).wrapping_mul(K).rotate_left(29);
        }
    }
    lanes
        .iter()
        .fold(seed, |h, &l| (h ^ l).wrapping_mul(K).rotate_left(31))
}

#[cfg(test)]
mod tests {
    use super::*;
    use page_memory::RegionId;

    fn page(i: u32) -> UniqueRef {
        UniqueRef {
            page: PageId::new(RegionId(0), i),
            token: ProtectToken(i as u64),
        }
    }

    #[test]
    fn a_twin_is_taken_once_and_a_dead_entry_is_replaced() {
        let u = Uniques::new();
        let p = u.print(&[7u8; PAGE_SIZE], 0);
        assert!(matches!(u.pair(p, page(1), true, |_| true), Pair::Indexed));
        // Indexing the same page again only refreshes its entry.
        assert!(matches!(u.pair(p, page(1), true, |_| true), Pair::Indexed));
        assert!(matches!(u.pair(p, page(2), true, |_| true), Pair::Twin(r) if r == page(1)));
        // Taken: the next page with that print is indexed.
        assert!(matches!(u.pair(p, page(3), true, |_| true), Pair::Indexed));
        // A written (dead) entry is replaced, not paired.
        assert!(matches!(u.pair(p, page(4), true, |_| false), Pair::Indexed));
        u.remove(p, page(3).page); // not there any more: nothing happens
        assert!(matches!(u.pair(p, page(5), true, |_| true), Pair::Twin(r) if r == page(4)));
        // Not to be indexed (mappings scarce): a page finds a twin indexed before, or none
        // and leaves nothing behind.
        assert!(matches!(u.pair(p, page(6), false, |_| true), Pair::Alone));
        assert!(matches!(u.pair(p, page(7), true, |_| true), Pair::Indexed));
        assert!(matches!(u.pair(p, page(8), false, |_| true), Pair::Twin(r) if r == page(7)));
    }

    #[test]
    fn prints_depend_on_contents_and_group() {
        let u = Uniques::new();
        let mut a = [0u8; PAGE_SIZE];
        let b = a;
        a[PAGE_SIZE - 1] = 1;
        assert_ne!(u.print(&a, 0), u.print(&b, 0));
        assert_ne!(u.print(&a, 0), u.print(&a, 1));
        assert_eq!(u.print(&a, 1), u.print(&a, 1));
    }
}
