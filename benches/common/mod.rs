//! Shared by `benches/sdtree.rs` and `examples/sdtree_bytes_read.rs`: the page arena, the
//! four data sets, the page-reference newtype and the structures under test behind one
//! trait ([`PageSet`]).
//!
//! Every key is a 4 KiB page in one [`Arena`]; no structure copies a key. Structures that
//! need an owned key get a [`PageRef`] (a pointer into the arena, ordered by `memcmp` of
//! the page, hashed with xxh3). The SD tree reads pages through [`ArenaKeys`], a
//! [`sdtree::KeySource`] over the same arena.

// Each includer uses a different subset of this module.
#![allow(dead_code)]

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::marker::PhantomData;
use std::sync::RwLock;

use intrusive_collections::rbtree::{AtomicLink, Entry as RbEntry, RBTree};
use intrusive_collections::{intrusive_adapter, KeyAdapter};
use sdtree::{Insert, KeySource};

/// Bytes in a page.
pub const PAGE: usize = 4096;

/// One page, page-aligned like guest memory.
#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE]);

/// All the pages of one run: keys, probes and fresh pages, generated from fixed seeds.
pub struct Arena {
    pages: Vec<Page>,
}

impl Arena {
    /// `count` pages, each filled by `fill(index, page)`, generated on all cores.
    pub fn generate(count: usize, fill: impl Fn(usize, &mut [u8; PAGE]) + Sync) -> Arena {
        let mut pages: Vec<Page> = Vec::with_capacity(count);
        pages.resize_with(count, || Page([0; PAGE]));
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = count.div_ceil(workers).max(1);
        std::thread::scope(|s| {
            for (c, part) in pages.chunks_mut(chunk).enumerate() {
                let fill = &fill;
                s.spawn(move || {
                    for (k, p) in part.iter_mut().enumerate() {
                        fill(c * chunk + k, &mut p.0);
                    }
                });
            }
        });
        Arena { pages }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the arena holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Page `i`.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.pages[i].0
    }

    /// A reference to page `i` for structures that need owned keys.
    pub fn page_ref(&self, i: usize) -> PageRef {
        PageRef(&self.pages[i] as *const Page)
    }

    /// The SD tree's key source over this arena.
    pub fn keys(&self) -> ArenaKeys<'_> {
        ArenaKeys {
            base: self.pages.as_ptr(),
            len: self.pages.len(),
            _arena: PhantomData,
        }
    }
}

/// The SD tree's [`KeySource`]: handle `i` is page `i` of the arena.
#[derive(Clone, Copy)]
pub struct ArenaKeys<'a> {
    base: *const Page,
    len: usize,
    _arena: PhantomData<&'a Arena>,
}

// SAFETY: `ArenaKeys` is a shared borrow of an `Arena` (plain bytes, never written while
// borrowed), which is `Send + Sync`.
unsafe impl Send for ArenaKeys<'_> {}
// SAFETY: as above.
unsafe impl Sync for ArenaKeys<'_> {}

impl KeySource for ArenaKeys<'_> {
    #[inline(always)]
    fn key(&self, handle: usize) -> &[u8] {
        assert!(handle < self.len, "page {handle} is outside the arena");
        // SAFETY: `handle < len`, and the arena outlives `'a` (the lifetime of the borrow
        // this was made from) and is not written while borrowed.
        unsafe { &(*self.base.add(handle)).0 }
    }
}

/// A page of the arena, as an owned key: ordered and compared by `memcmp` of the page,
/// hashed by xxh3-64 of the page.
///
/// Structures holding `PageRef`s must be dropped before the arena; the adapters below
/// borrow the arena for their whole life to make the compiler check it.
#[derive(Clone, Copy)]
pub struct PageRef(*const Page);

// SAFETY: a `PageRef` only reads a page of an arena that is alive and not written while
// any structure holding `PageRef`s exists (see the type's docs).
unsafe impl Send for PageRef {}
// SAFETY: as above.
unsafe impl Sync for PageRef {}

impl PageRef {
    /// The page's bytes.
    #[inline(always)]
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: made by `Arena::page_ref` from a live page; the arena outlives every
        // structure holding `PageRef`s (see the type's docs).
        unsafe { &(*self.0).0 }
    }
}

impl PartialEq for PageRef {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}
impl Eq for PageRef {}
impl PartialOrd for PageRef {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PageRef {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        self.bytes().cmp(other.bytes())
    }
}
impl Hash for PageRef {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(xxhash_rust::xxh3::xxh3_64(self.bytes()));
    }
}

/// Passes the xxh3 value written by [`PageRef`]'s `Hash` through unchanged.
#[derive(Clone, Copy, Default)]
pub struct Xxh3Build;

/// The hasher of [`Xxh3Build`].
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `PageRef`; fold anything else in so the hasher stays total.
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl BuildHasher for Xxh3Build {
    type Hasher = PassThrough;
    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

// ---------------------------------------------------------------------------------------
// Data sets
// ---------------------------------------------------------------------------------------

/// The four data sets of issue 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSet {
    /// 1: random pages (differences in the first 8 bytes).
    Random,
    /// 2: a random run of 0–256 zero bytes (mean 128), then random bytes.
    ZeroPrefix,
    /// 3: one shared random page; each page differs only in its last 64 bytes.
    Tail64,
    /// 4: zero pages with 1–4 random non-zero 64-bit words at random word offsets.
    Sparse,
}

impl DataSet {
    /// All four, in order.
    pub const ALL: [DataSet; 4] = [
        DataSet::Random,
        DataSet::ZeroPrefix,
        DataSet::Tail64,
        DataSet::Sparse,
    ];

    /// Its number in the issue (1–4).
    pub fn number(self) -> usize {
        match self {
            DataSet::Random => 1,
            DataSet::ZeroPrefix => 2,
            DataSet::Tail64 => 3,
            DataSet::Sparse => 4,
        }
    }

    /// Its label in benchmark ids.
    pub fn label(self) -> &'static str {
        match self {
            DataSet::Random => "ds1_random",
            DataSet::ZeroPrefix => "ds2_zeroprefix",
            DataSet::Tail64 => "ds3_tail64",
            DataSet::Sparse => "ds4_sparse",
        }
    }

    /// Fills `page` with the content numbered `content` of this data set. Distinct numbers
    /// give distinct pages except with negligible probability (checked when structures are
    /// built).
    pub fn fill(self, content: usize, page: &mut [u8; PAGE]) {
        const SEED: u64 = 0x5d7e_e000_0000_0003;
        let mut rng = fastrand::Rng::with_seed(mix(SEED ^ self.number() as u64, content as u64));
        match self {
            DataSet::Random => rng.fill(page),
            DataSet::ZeroPrefix => {
                let run = rng.usize(0..=256);
                page[..run].fill(0);
                rng.fill(&mut page[run..]);
            }
            DataSet::Tail64 => {
                // The shared 4032 bytes come from one fixed seed.
                let mut base = fastrand::Rng::with_seed(SEED ^ 0xba5e);
                base.fill(&mut page[..PAGE - 64]);
                rng.fill(&mut page[PAGE - 64..]);
            }
            DataSet::Sparse => {
                page.fill(0);
                for _ in 0..rng.usize(1..=4) {
                    let word = rng.usize(0..PAGE / 8);
                    let value = rng.u64(1..);
                    page[word * 8..word * 8 + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
        }
    }
}

/// SplitMix64 finalizer of `a` and `b`: one independent seed per page.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_add(b.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where everything lives in the arena of one (data set, size) run.
///
/// | range              | pages | content                                        |
/// |--------------------|-------|------------------------------------------------|
/// | `keys`             | n     | the n distinct keys stored in every structure  |
/// | `hits`             | h     | copies of keys `0..h` (lookups that hit; the duplicates of the insert stream) |
/// | `misses`           | h     | contents stored nowhere (lookups that miss)    |
/// | `fresh`            | x     | new contents, inserted by the insert stream    |
///
/// with `h = min(n, 100_000)` and `x = max(n / 10, 1)`.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Keys stored in every structure.
    pub n: usize,
    /// Hit probes (copies of keys `0..h`) and miss probes, each.
    pub h: usize,
    /// Fresh keys of the insert stream.
    pub x: usize,
}

/// Probes are capped so the 1M run fits in memory; 100k probes (400 MB) are already far
/// out of cache.
pub const MAX_PROBES: usize = 100_000;

impl Layout {
    /// The layout for `n` stored keys.
    pub fn new(n: usize) -> Layout {
        Layout {
            n,
            h: n.min(MAX_PROBES),
            x: (n / 10).max(1),
        }
    }
    /// First hit probe.
    pub fn hits(&self) -> usize {
        self.n
    }
    /// First miss probe.
    pub fn misses(&self) -> usize {
        self.n + self.h
    }
    /// First fresh page.
    pub fn fresh(&self) -> usize {
        self.n + 2 * self.h
    }
    /// Pages in the arena.
    pub fn pages(&self) -> usize {
        self.n + 2 * self.h + self.x
    }

    /// The arena of data set `ds` with this layout.
    pub fn arena(&self, ds: DataSet) -> Arena {
        let l = *self;
        Arena::generate(self.pages(), move |i, page| {
            // Content numbers: keys 0..n, misses n..n+h, fresh n+h..; a hit probe is a copy
            // of a key's content.
            let content = if i < l.hits() {
                i
            } else if i < l.misses() {
                i - l.hits()
            } else {
                i - l.h
            };
            ds.fill(content, page);
        })
    }
}

// ---------------------------------------------------------------------------------------
// The structures under test
// ---------------------------------------------------------------------------------------

/// One structure under test, holding page indices of an arena keyed by page contents.
///
/// Every probe is a page of the arena, named by its index, so no structure copies a key.
pub trait PageSet: Send + Sync {
    /// Inserts page `page` unless an equal page is stored; returns the stored page then.
    fn insert_or_get(&self, page: usize) -> Option<usize>;
    /// The stored page equal to page `probe`.
    fn get(&self, probe: usize) -> Option<usize>;
    /// Removes the stored page equal to page `probe`; returns whether there was one.
    fn remove(&self, probe: usize) -> bool;
}

/// The structures, by benchmark name.
pub const STRUCTURES: [&str; 6] = [
    "sdtree",
    "rbtree_ksm",
    "btreemap_rwlock",
    "skipmap",
    "scc_treeindex",
    "papaya_xxh3",
];

/// An empty structure named `name` over `arena`, sized for about `n` keys where that
/// applies.
pub fn make<'a>(name: &str, arena: &'a Arena, n: usize) -> Box<dyn PageSet + 'a> {
    match name {
        "sdtree" => Box::new(SdTreeSet {
            tree: sdtree::SdTree::new(arena.keys()),
        }),
        "rbtree_ksm" => Box::new(RbTreeSet {
            tree: RwLock::new(RBTree::new(RbAdapter::new())),
            arena,
        }),
        "btreemap_rwlock" => Box::new(BTreeSet {
            map: RwLock::new(BTreeMap::new()),
            arena,
        }),
        "skipmap" => Box::new(SkipMapSet {
            map: crossbeam_skiplist::SkipMap::new(),
            arena,
        }),
        "scc_treeindex" => Box::new(SccSet {
            map: scc::TreeIndex::new(),
            arena,
        }),
        "papaya_xxh3" => Box::new(PapayaSet {
            map: papaya::HashMap::builder()
                .capacity(n)
                .hasher(Xxh3Build)
                .build(),
            arena,
        }),
        other => panic!("unknown structure {other:?}; known: {STRUCTURES:?}"),
    }
}

/// The SD tree, auto-pinning crossbeam-epoch's default collector per operation.
pub struct SdTreeSet<'a> {
    tree: sdtree::SdTree<ArenaKeys<'a>>,
}

impl PageSet for SdTreeSet<'_> {
    #[inline]
    fn insert_or_get(&self, page: usize) -> Option<usize> {
        match self.tree.insert_or_get(page) {
            Insert::Inserted => None,
            Insert::Present(h) => Some(h),
            Insert::Refused => panic!("sdtree refused page {page}: keys are never written"),
        }
    }
    #[inline]
    fn get(&self, probe: usize) -> Option<usize> {
        self.tree.get(self.tree.source().key(probe))
    }
    #[inline]
    fn remove(&self, probe: usize) -> bool {
        self.tree.remove(self.tree.source().key(probe)).is_some()
    }
}

/// A red-black tree node: KSM's `rmap_item`/`stable_node` reduced to a key and a handle.
pub struct RbNode<K> {
    link: AtomicLink,
    key: K,
    handle: usize,
}

intrusive_adapter!(pub RbAdapter<K> = Box<RbNode<K>>: RbNode<K> { link: AtomicLink });

impl<'n, K: Copy + Ord + 'n> KeyAdapter<'n> for RbAdapter<K> {
    type Key = K;
    #[inline]
    fn get_key(&self, node: &'n RbNode<K>) -> K {
        node.key
    }
}

/// KSM's structure: a red-black tree ordered by `memcmp` of the page
/// (`intrusive-collections`), behind an `RwLock`: lookups share it, updates hold it
/// exclusively for their whole search, as KSM holds its mutex.
pub struct RbTreeSet<'a> {
    tree: RwLock<RBTree<RbAdapter<PageRef>>>,
    arena: &'a Arena,
}

/// Inserts `(key, handle)` into `tree` unless an equal key is there.
pub fn rb_insert_or_get<K: Copy + Ord + 'static>(
    tree: &mut RBTree<RbAdapter<K>>,
    key: K,
    handle: usize,
) -> Option<usize> {
    match tree.entry(&key) {
        RbEntry::Occupied(c) => c.get().map(|n| n.handle),
        RbEntry::Vacant(v) => {
            v.insert(Box::new(RbNode {
                link: AtomicLink::new(),
                key,
                handle,
            }));
            None
        }
    }
}

/// The handle stored in `tree` under `key`.
pub fn rb_get<K: Copy + Ord + 'static>(tree: &RBTree<RbAdapter<K>>, key: &K) -> Option<usize> {
    tree.find(key).get().map(|n| n.handle)
}

impl PageSet for RbTreeSet<'_> {
    #[inline]
    fn insert_or_get(&self, page: usize) -> Option<usize> {
        let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
        rb_insert_or_get(&mut tree, self.arena.page_ref(page), page)
    }
    #[inline]
    fn get(&self, probe: usize) -> Option<usize> {
        let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
        rb_get(&tree, &self.arena.page_ref(probe))
    }
    #[inline]
    fn remove(&self, probe: usize) -> bool {
        let mut tree = self.tree.write().unwrap_or_else(|e| e.into_inner());
        tree.find_mut(&self.arena.page_ref(probe))
            .remove()
            .is_some()
    }
}

/// `std::collections::BTreeMap` behind an `RwLock`.
pub struct BTreeSet<'a> {
    map: RwLock<BTreeMap<PageRef, usize>>,
    arena: &'a Arena,
}

impl PageSet for BTreeSet<'_> {
    #[inline]
    fn insert_or_get(&self, page: usize) -> Option<usize> {
        use std::collections::btree_map::Entry;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        match map.entry(self.arena.page_ref(page)) {
            Entry::Occupied(o) => Some(*o.get()),
            Entry::Vacant(v) => {
                v.insert(page);
                None
            }
        }
    }
    #[inline]
    fn get(&self, probe: usize) -> Option<usize> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&self.arena.page_ref(probe)).copied()
    }
    #[inline]
    fn remove(&self, probe: usize) -> bool {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&self.arena.page_ref(probe)).is_some()
    }
}

/// `crossbeam-skiplist`'s lock-free `SkipMap`.
pub struct SkipMapSet<'a> {
    map: crossbeam_skiplist::SkipMap<PageRef, usize>,
    arena: &'a Arena,
}

impl PageSet for SkipMapSet<'_> {
    #[inline]
    fn insert_or_get(&self, page: usize) -> Option<usize> {
        let stored = *self
            .map
            .get_or_insert(self.arena.page_ref(page), page)
            .value();
        (stored != page).then_some(stored)
    }
    #[inline]
    fn get(&self, probe: usize) -> Option<usize> {
        self.map
            .get(&self.arena.page_ref(probe))
            .map(|e| *e.value())
    }
    #[inline]
    fn remove(&self, probe: usize) -> bool {
        self.map.remove(&self.arena.page_ref(probe)).is_some()
    }
}

/// `scc::TreeIndex` (B+-tree with lock-free reads). It has no insert-or-get, so
/// `insert_or_get` looks first (2/3 of the stream are duplicates), then inserts.
pub struct SccSet<'a> {
    map: scc::TreeIndex<PageRef, usize>,
    arena: &'a Arena,
}

impl PageSet for SccSet<'_> {
    #[inline]
    fn insert_or_get(&self, page: usize) -> Option<usize> {
        let key = self.arena.page_ref(page);
        loop {
            if let Some(h) = self.map.peek_with(&key, |_, v| *v) {
                return Some(h);
            }
            if self.map.insert(key, page).is_ok() {
                return None;
            }
            // Lost a race with an insert of an equal page: look again.
        }
    }
    #[inline]
    fn get(&self, probe: usize) -> Option<usize> {
        self.map.peek_with(&self.arena.page_ref(probe), |_, v| *v)
    }
    #[inline]
    fn remove(&self, probe: usize) -> bool {
        self.map.remove(&self.arena.page_ref(probe))
    }
}

/// `papaya::HashMap` keyed by the page, hashed with xxh3-64 of the page; a hit is
/// confirmed by a full `memcmp` (`PageRef`'s `Eq`). The exact-match floor: unordered.
pub struct PapayaSet<'a> {
    map: papaya::HashMap<PageRef, usize, Xxh3Build>,
    arena: &'a Arena,
}

impl PageSet for PapayaSet<'_> {
    #[inline]
    fn insert_or_get(&self, page: usize) -> Option<usize> {
        let map = self.map.pin();
        let stored = *map.get_or_insert(self.arena.page_ref(page), page);
        (stored != page).then_some(stored)
    }
    #[inline]
    fn get(&self, probe: usize) -> Option<usize> {
        self.map.pin().get(&self.arena.page_ref(probe)).copied()
    }
    #[inline]
    fn remove(&self, probe: usize) -> bool {
        self.map.pin().remove(&self.arena.page_ref(probe)).is_some()
    }
}

/// Builds structure `name` over `arena` with keys `0..layout.n` and checks it: every key
/// is new, hit probes find their key and miss probes find nothing (`check` probes of
/// each, from the start).
pub fn build<'a>(
    name: &str,
    arena: &'a Arena,
    layout: Layout,
    check: usize,
) -> Box<dyn PageSet + 'a> {
    let s = make(name, arena, layout.n);
    for i in 0..layout.n {
        if let Some(h) = s.insert_or_get(i) {
            panic!("{name}: page {i} equals page {h}: the data set has a duplicate key");
        }
    }
    for i in 0..check.min(layout.h) {
        assert_eq!(s.get(layout.hits() + i), Some(i), "{name}: hit probe {i}");
        assert_eq!(s.get(layout.misses() + i), None, "{name}: miss probe {i}");
    }
    s
}

// ---------------------------------------------------------------------------------------
// Counting what a red-black tree search reads
// ---------------------------------------------------------------------------------------

thread_local! {
    static COUNTS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A [`PageRef`] whose comparisons count themselves and the bytes of the *stored* key
/// they read: up to and including the 8-byte word holding the first difference (the
/// SD tree's [`sdtree::SearchStats::stored_key_bytes`] rounds the same way).
#[derive(Clone, Copy)]
pub struct CountingRef(pub PageRef);

impl CountingRef {
    /// Resets this thread's counters.
    pub fn reset() {
        COUNTS.with(|c| c.set((0, 0)));
    }
    /// This thread's (comparisons, stored-key bytes) since the last reset.
    pub fn counts() -> (u64, u64) {
        COUNTS.with(|c| c.get())
    }
}

impl PartialEq for CountingRef {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for CountingRef {}
impl PartialOrd for CountingRef {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for CountingRef {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.0.bytes(), other.0.bytes());
        let words = a.chunks_exact(8).zip(b.chunks_exact(8));
        let lcp = 8 * words.take_while(|(x, y)| x == y).count();
        let lcp = lcp
            + a[lcp..]
                .iter()
                .zip(&b[lcp..])
                .take_while(|(x, y)| x == y)
                .count();
        let read = ((lcp / 8 + 1) * 8).min(a.len().max(b.len()));
        COUNTS.with(|c| {
            let (n, bytes) = c.get();
            c.set((n + 1, bytes + read as u64));
        });
        a.cmp(b)
    }
}
