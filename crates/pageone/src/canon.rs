//! Canonical pages and the SD trees that index them, one tree per trust-domain group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use page_memory::DomainId;
use sdtree::{Insert, SdMap};

use crate::stats::Counters;

/// A canonical page: an immutable frame and the pages that map it.
pub(crate) struct Canon<F> {
    pub(crate) frame: F,
    /// Pages mapping this frame (the page it came from included).
    pub(crate) sharers: AtomicU32,
}

/// The tree key: a frame, read in place by the tree (never copied).
pub(crate) struct FrameKey<F>(pub(crate) F);

impl<F: AsRef<[u8]>> AsRef<[u8]> for FrameKey<F> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

type Tree<F> = SdMap<FrameKey<F>, Arc<Canon<F>>>;

/// The trees of canonical pages, one per group of joined trust domains. A domain that
/// appears later (a region added by `refresh_regions`) gets a tree of its own through
/// [`Canons::with_domains`], which shares the existing trees.
pub(crate) struct Canons<F: AsRef<[u8]> + Send + Sync + 'static> {
    trees: Vec<Arc<Tree<F>>>,
    group_of: HashMap<DomainId, usize>,
    max_sharing: u32,
}

/// What [`Canons::find_or_insert`] found.
pub(crate) enum Found<F> {
    /// An equal canonical page with room for another sharer.
    Existing(Arc<Canon<F>>),
    /// None: the caller's page becomes canonical.
    Vacant,
}

impl<F: AsRef<[u8]> + Clone + Send + Sync + 'static> Canons<F> {
    /// Trees for `domains`, joining the groups in `joined`.
    pub(crate) fn new(domains: &[DomainId], joined: &[Vec<DomainId>], max_sharing: u32) -> Self {
        let mut group_of = HashMap::new();
        let mut groups = 0;
        for set in joined {
            for d in set {
                group_of.insert(*d, groups);
            }
            groups += 1;
        }
        for d in domains {
            group_of.entry(*d).or_insert_with(|| {
                groups += 1;
                groups - 1
            });
        }
        Canons {
            trees: (0..groups).map(|_| Arc::new(SdMap::new())).collect(),
            group_of,
            max_sharing: max_sharing.max(1),
        }
    }

    /// If some of `domains` have no group yet: these trees (shared, not copied) and one
    /// new tree for each new domain, which joins no other (domains joined by the
    /// configuration have their groups from the start). `None` if every domain has one.
    pub(crate) fn with_domains(&self, domains: &[DomainId]) -> Option<Self> {
        if domains.iter().all(|d| self.group_of.contains_key(d)) {
            return None;
        }
        let mut trees = self.trees.clone();
        let mut group_of = self.group_of.clone();
        for d in domains {
            group_of.entry(*d).or_insert_with(|| {
                trees.push(Arc::new(SdMap::new()));
                trees.len() - 1
            });
        }
        Some(Canons {
            trees,
            group_of,
            max_sharing: self.max_sharing,
        })
    }

    /// The tree for `domain`'s group.
    fn tree(&self, domain: DomainId) -> &Tree<F> {
        &self.trees[self.group(domain)]
    }

    /// The index of `domain`'s group (of its tree).
    pub(crate) fn group(&self, domain: DomainId) -> usize {
        self.group_of.get(&domain).copied().unwrap_or(0)
    }

    /// Looks `bytes` up in `domain`'s tree. A canonical page that is full (reached
    /// `max_page_sharing`) is taken out of the tree: it keeps its sharers, and the
    /// caller's page will start a new canonical page (KSM's stable-node chains, flat).
    pub(crate) fn find(&self, domain: DomainId, bytes: &[u8]) -> Found<F> {
        let tree = self.tree(domain);
        match tree.get(bytes) {
            Some(c) if c.sharers.load(Ordering::Relaxed) < self.max_sharing => Found::Existing(c),
            Some(full) => {
                tree.remove_if(bytes, |v| Arc::ptr_eq(v, &full));
                Found::Vacant
            }
            None => Found::Vacant,
        }
    }

    /// Whether `canon` can take `more` more sharers without passing `max_page_sharing`.
    pub(crate) fn has_room(&self, canon: &Canon<F>, more: u32) -> bool {
        canon.sharers.load(Ordering::Relaxed).saturating_add(more) <= self.max_sharing
    }

    /// Makes `frame` canonical in `domain`'s tree unless an equal page got there first.
    pub(crate) fn insert(
        &self,
        domain: DomainId,
        frame: F,
        counters: &Counters,
    ) -> Result<Arc<Canon<F>>, Arc<Canon<F>>> {
        let canon = Arc::new(Canon {
            frame: frame.clone(),
            sharers: AtomicU32::new(1),
        });
        match self
            .tree(domain)
            .insert_or_get(FrameKey(frame), canon.clone())
        {
            Insert::Inserted => {
                counters.pages_unshared.fetch_add(1, Ordering::Relaxed);
                Ok(canon)
            }
            Insert::Present(other) => Err(other),
            // Frames are immutable, so stored keys never change: cannot happen. Treat the
            // page as unique and unindexed rather than fail.
            Insert::Refused => {
                counters.pages_unshared.fetch_add(1, Ordering::Relaxed);
                Ok(canon)
            }
        }
    }

    /// Records that one more page maps `canon`.
    pub(crate) fn add_sharer(&self, canon: &Canon<F>, counters: &Counters) {
        let old = canon.sharers.fetch_add(1, Ordering::Relaxed);
        adjust_on_change(old, old + 1, counters);
    }

    /// Records that a page stopped mapping `canon`; the last one takes it out of the tree.
    pub(crate) fn drop_sharer(&self, domain: DomainId, canon: &Arc<Canon<F>>, counters: &Counters) {
        let old = canon.sharers.fetch_sub(1, Ordering::Relaxed);
        adjust_on_change(old, old - 1, counters);
        if old == 1 {
            self.tree(domain)
                .remove_if(canon.frame.as_ref(), |v| Arc::ptr_eq(v, canon));
        }
    }

    /// Canonical pages indexed, over all trees.
    pub(crate) fn indexed(&self) -> usize {
        self.trees.iter().map(|t| t.len()).sum()
    }
}

/// Keeps `pages_shared` / `pages_sharing` / `pages_unshared` exact across one change of a
/// canonical page's sharer count.
fn adjust_on_change(old: u32, new: u32, c: &Counters) {
    let weight = |n: u32| -> (i64, i64, i64) {
        // (shared, sharing, unshared) contributed by a canonical page with n sharers.
        match n {
            0 => (0, 0, 0),
            1 => (0, 0, 1),
            n => (1, n as i64 - 1, 0),
        }
    };
    let (a, b) = (weight(old), weight(new));
    add(&c.pages_shared, b.0 - a.0);
    add(&c.pages_sharing, b.1 - a.1);
    add(&c.pages_unshared, b.2 - a.2);
}

fn add(a: &AtomicI64, d: i64) {
    if d != 0 {
        a.fetch_add(d, Ordering::Relaxed);
    }
}

/// Claims on contents being made canonical: a fixed, lock-free table of fingerprints
/// (tagged with the tree's group), so that of the threads that find the same contents
/// vacant at the same time only one canonicalizes them (see *Convergence* in the crate
/// docs). A claim is a hint, never a proof: equal fingerprints of different contents only
/// put a page off by one pass, and a full bucket lets the page go unclaimed (as before
/// claims: it may lose an insert race, which is counted).
pub(crate) struct Claims {
    slots: Box<[AtomicU64]>,
}

/// What [`Claims::claim`] got.
pub(crate) enum Claim {
    /// The caller holds the claim in this slot; it must [`Claims::release`] it.
    Held(usize),
    /// Another thread holds a claim on the same key: put the page off.
    Lost,
    /// No free slot in the key's bucket: go on without a claim.
    Full,
}

impl Claims {
    /// Slots per bucket: a key is only ever claimed in its bucket.
    const BUCKET: usize = 8;
    const BUCKETS: usize = 1024;

    pub(crate) fn new() -> Self {
        Claims {
            slots: (0..Self::BUCKETS * Self::BUCKET)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// The key of a page with fingerprint `print` in group `group`: never 0 (a free slot).
    pub(crate) fn key(print: u64, group: usize) -> u64 {
        (print ^ (group as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
    }

    /// Claims `key`. Sequentially consistent, Dekker-style: a thread writes its claim,
    /// then looks for another on the same key; of two threads that claim one key at the
    /// same time, at least one sees the other's claim and yields, so two never both hold
    /// it.
    pub(crate) fn claim(&self, key: u64) -> Claim {
        let start = (key as usize >> 1) % Self::BUCKETS * Self::BUCKET;
        let bucket = &self.slots[start..start + Self::BUCKET];
        if bucket.iter().any(|s| s.load(Ordering::SeqCst) == key) {
            return Claim::Lost;
        }
        let Some(mine) = bucket.iter().position(|s| {
            s.compare_exchange(0, key, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        }) else {
            return Claim::Full;
        };
        let other = bucket
            .iter()
            .enumerate()
            .any(|(i, s)| i != mine && s.load(Ordering::SeqCst) == key);
        if other {
            bucket[mine].store(0, Ordering::SeqCst);
            return Claim::Lost;
        }
        Claim::Held(start + mine)
    }

    /// Waits (yielding) until nobody holds a claim on `key`, or until `deadline`.
    pub(crate) fn wait_released(&self, key: u64, deadline: std::time::Instant) {
        let start = (key as usize >> 1) % Self::BUCKETS * Self::BUCKET;
        let bucket = &self.slots[start..start + Self::BUCKET];
        while bucket.iter().any(|s| s.load(Ordering::SeqCst) == key)
            && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
    }

    /// Gives up the claim in `slot` (after the page's insert, or its failure): the
    /// release publishes the insert to whoever claims the key next.
    pub(crate) fn release(&self, slot: usize) {
        self.slots[slot].store(0, Ordering::SeqCst);
    }
}
