//! Unique pages: stable pages with no twin yet, indexed where they are.
//!
//! A stable page that matches no canonical page is not copied anywhere. It stays in the
//! guest's own memory, write-protected, and is entered in this index under a *print* of
//! its contents (a keyed 64-bit fingerprint, tagged with the page's tree group). Only
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
//! different contents (a collision) cost work, never a wrong merge: one needless
//! canonicalization, after which the indexed page, found different at the switch, is read
//! and looked up by its contents at the next pass (in the SD tree, not by print) and
//! merged or indexed again.
//!
//! The print is XXH3 keyed with a secret of 192 random bytes per engine
//! (`xxh3_64_with_secret`: its long-input rounds are an NH-style universal hash of the
//! data XORed with the secret), tagged with the tree group. It is not a cryptographic
//! MAC: it makes collisions unlikely for contents chosen without the secret, which no
//! guest sees, and a collision found anyway only costs work as above.
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
struct PrintHasher(u64);

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
struct BuildPrintHasher;

impl BuildHasher for BuildPrintHasher {
    type Hasher = PrintHasher;
    fn build_hasher(&self) -> PrintHasher {
        PrintHasher(0)
    }
}

/// Values keyed by prints, in shards locked separately (a lookup holds one shard for a
/// hash probe): the index of unique pages, and the canonical pages by print
/// (`canon.rs`).
pub(crate) struct PrintMap<V> {
    shards: Box<[Mutex<HashMap<u64, V, BuildPrintHasher>>]>,
}

impl<V> PrintMap<V> {
    const SHARDS: usize = 64;

    pub(crate) fn new() -> Self {
        PrintMap {
            shards: (0..Self::SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
        }
    }

    /// The shard that holds `print`, locked.
    pub(crate) fn shard(
        &self,
        print: u64,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, V, impl BuildHasher>> {
        self.shards[(print >> 58) as usize % Self::SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes per entry (key, value, and the table's slack at its usual load).
    pub(crate) fn entry_bytes() -> usize {
        (std::mem::size_of::<(u64, V)>() + 1) * 8 / 7
    }
}

/// The index of unique pages: prints to pages.
pub(crate) struct Uniques {
    map: PrintMap<UniqueRef>,
    /// The print's key ([`fingerprint`]).
    secret: Box<[u8; SECRET_BYTES]>,
    /// The fingerprint of the all-zero page (before its group's tag).
    zeros: u64,
    /// Test hook: prints are masked to this many bits (+1) to force collisions.
    mask: u64,
}

/// Bytes of the print's secret (XXH3's default secret size).
const SECRET_BYTES: usize = 192;

impl Uniques {
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::with_mask(u64::MAX)
    }

    /// An index whose prints keep only the bits of `mask` (all: `u64::MAX`); tests make
    /// prints collide with a small mask.
    pub(crate) fn with_mask(mask: u64) -> Self {
        // A secret nobody outside the engine knows (std's per-process random keys).
        let keys = std::collections::hash_map::RandomState::new();
        let mut secret = Box::new([0u8; SECRET_BYTES]);
        for (i, chunk) in secret.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&keys.hash_one(i as u64).to_le_bytes());
        }
        let zeros = fingerprint(&[0u8; PAGE_SIZE], &secret);
        Uniques {
            map: PrintMap::new(),
            secret,
            zeros,
            mask,
        }
    }

    /// The print of a page's contents in tree group `group`: equal contents in one group
    /// have equal prints. Never 0.
    pub(crate) fn print(&self, bytes: &[u8], group: usize) -> u64 {
        self.tagged(fingerprint(bytes, &self.secret), group)
    }

    /// The print of the all-zero page in tree group `group` (computed once).
    pub(crate) fn zero_print(&self, group: usize) -> u64 {
        self.tagged(self.zeros, group)
    }

    fn tagged(&self, fingerprint: u64, group: usize) -> u64 {
        (fingerprint ^ group_tag(group)) & self.mask | 1
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
        let mut shard = self.map.shard(print);
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
        let mut shard = self.map.shard(print);
        if shard.get(&print).is_some_and(|r| r.page == page) {
            shard.remove(&print);
        }
    }

    /// Bytes of index per entry (key, value, and the table's slack at its usual load).
    pub(crate) fn entry_bytes() -> usize {
        PrintMap::<UniqueRef>::entry_bytes()
    }
}

/// A keyed 64-bit fingerprint of a page: equal pages have equal ones (see the module
/// docs for what else it promises).
fn fingerprint(bytes: &[u8], secret: &[u8; SECRET_BYTES]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_secret(bytes, secret)
}

/// What tells prints of different tree groups apart (a bijective mix of the group).
fn group_tag(group: usize) -> u64 {
    let mut x = (group as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
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

    /// The old fingerprint's differential (bit 63 of word j against bit 28 of word j + 4,
    /// which collided for every seed) does not collide.
    #[test]
    fn a_known_differential_does_not_collide() {
        let u = Uniques::new();
        let a: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 31 + 7) as u8).collect();
        let mut b = a.clone();
        b[7] ^= 0x80;
        b[35] ^= 0x10;
        assert_ne!(u.print(&a, 0), u.print(&b, 0));
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
