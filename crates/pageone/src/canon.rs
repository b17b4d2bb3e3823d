//! Canonical pages and the SD trees that index them, one tree per trust-domain group.
//!
//! # Two indexes, one authority
//! Each canonical page is indexed twice: in its group's SD tree under its contents (the
//! frame, read in place), and in a table under its *print* (the engine's keyed
//! fingerprint of the frame, tagged with the group: see [`Uniques`](crate::unique)).
//! The tree is the authority: `insert_or_get` on it decides which of two equal pages
//! becomes canonical, and a page whose contents were read is looked up there. The table
//! lets a stable page whose print is already known (computed when it was protected: see
//! *Page life cycle* in the crate docs) find its canonical page without being read again.
//! A print is a hint: a merge found through it is verified in full by the backend at the
//! switch, like every merge, and a page that turns out to differ (a collision of prints)
//! is looked up by its contents at the next pass. Of two canonical pages with equal
//! prints the one entered first keeps the table's entry while it has sharers; a table hit
//! of another group's page (equal tagged prints of equal contents: possible only by a
//! collision) is ignored, so the table never merges across trust domains.
//!
//! # Consistency
//! A canonical page enters the table just after the tree and leaves it when it leaves the
//! tree (its last sharer gone, or full), each under the table shard's lock, removing only
//! the entry that is still the same canonical page (`Arc::ptr_eq`). Between the two steps
//! a lookup by print may miss a page the tree holds (the page is then made canonical, and
//! its insert into the tree finds the other: an insert race, counted) or find one the tree
//! has just let go (merging with it is still correct: its frame lives while any sharer
//! holds it; it is only not found by later pages).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use page_memory::DomainId;
use sdtree::{Insert, SdMap};

use crate::stats::Counters;
use crate::unique::PrintMap;

/// A canonical page: an immutable frame and the pages that map it.
pub(crate) struct Canon<F> {
    pub(crate) frame: F,
    /// Pages mapping this frame (the page it came from included).
    pub(crate) sharers: AtomicU32,
    /// The frame's print in its group (its key in [`Prints`]).
    print: u64,
    /// Its tree's group: a page of another group never takes it from the table.
    group: usize,
}

/// Canonical pages by print.
struct Prints<F> {
    map: PrintMap<Arc<Canon<F>>>,
}

impl<F> Prints<F> {
    fn new() -> Self {
        Prints {
            map: PrintMap::new(),
        }
    }

    fn get(&self, print: u64) -> Option<Arc<Canon<F>>> {
        self.map.shard(print).get(&print).cloned()
    }

    /// Enters `canon` under its print, unless a canonical page that still has sharers is
    /// there (equal prints of other contents: the one entered first keeps the entry, and
    /// pages of `canon`'s contents find it in the tree by their contents, see
    /// `MergeOutcome::Differs` in `flush`).
    fn insert(&self, canon: &Arc<Canon<F>>) {
        let mut shard = self.map.shard(canon.print);
        match shard.get(&canon.print) {
            Some(live) if live.sharers.load(Ordering::Relaxed) > 0 => {}
            _ => {
                shard.insert(canon.print, canon.clone());
            }
        }
    }

    /// Takes `canon` out, if it is still the page under its print.
    fn remove(&self, canon: &Arc<Canon<F>>) {
        let mut shard = self.map.shard(canon.print);
        if shard
            .get(&canon.print)
            .is_some_and(|c| Arc::ptr_eq(c, canon))
        {
            shard.remove(&canon.print);
        }
    }
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
    /// Every tree's pages by print (prints are tagged with their group).
    prints: Arc<Prints<F>>,
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
            prints: Arc::new(Prints::new()),
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
            prints: self.prints.clone(),
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
                self.retire_full(tree, &full);
                Found::Vacant
            }
            None => Found::Vacant,
        }
    }

    /// Looks up the canonical page whose print is `print` (tagged with `domain`'s group),
    /// as [`find`](Self::find) does by contents. A hint: the page found may differ from
    /// the caller's (a collision of prints), which the backend's merge finds out.
    pub(crate) fn find_print(&self, domain: DomainId, print: u64) -> Found<F> {
        let group = self.group(domain);
        match self.prints.get(print) {
            Some(c) if c.group != group || c.sharers.load(Ordering::Relaxed) == 0 => Found::Vacant,
            Some(c) if c.sharers.load(Ordering::Relaxed) < self.max_sharing => Found::Existing(c),
            Some(full) => {
                self.retire_full(self.tree(domain), &full);
                Found::Vacant
            }
            None => Found::Vacant,
        }
    }

    /// A full canonical page leaves both indexes (it keeps its sharers).
    fn retire_full(&self, tree: &Tree<F>, full: &Arc<Canon<F>>) {
        tree.remove_if(full.frame.as_ref(), |v| Arc::ptr_eq(v, full));
        self.prints.remove(full);
    }

    /// Whether `canon` can take `more` more sharers without passing `max_page_sharing`.
    pub(crate) fn has_room(&self, canon: &Canon<F>, more: u32) -> bool {
        canon.sharers.load(Ordering::Relaxed).saturating_add(more) <= self.max_sharing
    }

    /// Makes `frame` (whose print in `domain`'s group is `print`) canonical in `domain`'s
    /// tree unless an equal page got there first.
    pub(crate) fn insert(
        &self,
        domain: DomainId,
        frame: F,
        print: u64,
        counters: &Counters,
    ) -> Result<Arc<Canon<F>>, Arc<Canon<F>>> {
        let canon = Arc::new(Canon {
            frame: frame.clone(),
            sharers: AtomicU32::new(1),
            print,
            group: self.group(domain),
        });
        match self
            .tree(domain)
            .insert_or_get(FrameKey(frame), canon.clone())
        {
            Insert::Inserted => {
                self.prints.insert(&canon);
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
            self.prints.remove(canon);
        }
    }

    /// Canonical pages indexed, over all trees.
    pub(crate) fn indexed(&self) -> usize {
        self.trees.iter().map(|t| t.len()).sum()
    }
}

/// Bytes of the table by print per canonical page.
pub(crate) fn print_entry_bytes<F>() -> usize {
    PrintMap::<Arc<Canon<F>>>::entry_bytes()
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
