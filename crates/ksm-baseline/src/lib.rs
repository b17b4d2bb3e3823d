//! A single-threaded re-implementation of Linux KSM (`mm/ksm.c`) over a [`PageMemory`]:
//! the baseline PageONE's benchmarks run next to, on the same simulated memory.
//!
//! It exists for benchmarks only. It follows KSM's algorithm step for step, so that what
//! a benchmark measures against it is KSM's design (one scanner, two `memcmp`-ordered
//! red-black trees, a checksum to skip volatile pages) and not a strawman; where the
//! page-memory contract forces a difference, the list below says so.
//!
//! # The algorithm (as in `mm/ksm.c`)
//! One scanner ([`Ksm::scan`], KSM's `ksm_do_scan`) walks a cursor over every page of
//! every region, `pages_to_scan` pages per call; reaching the end completes a *full scan*
//! (`full_scans`, KSM's `ksm_scan.seqnr`). Each page has an *rmap item* ([`RMAP_ITEM_BYTES`]
//! = 32 bytes, KSM's is 64: old checksum, unstable-tree links or stable dup, protect
//! token, smart-scan age); each canonical frame a stable node and dup
//! ([`stable_node_bytes`], 48 bytes over [`page_memory::sim::SimMemory`]). For each
//! page (`cmp_and_merge_page`):
//! 1. A page that is still merged (its protect token is valid: no write since the merge)
//!    needs nothing. One that was written since (copy-on-write broke the sharing) leaves
//!    its stable node: `pages_sharing` or `pages_shared` drops (KSM's
//!    `remove_rmap_item_from_tree`); a frame nobody maps any more is dropped.
//! 2. With `smart_scan`, a page that has failed to merge for a while is skipped for 1, 2,
//!    4 or 8 scans depending on its age (`should_skip_rmap_item`, `skip_age`).
//! 3. The page is read, and its 32-bit checksum (xxHash64 with seed 0, truncated to 32
//!    bits: what `calc_checksum()` computes on 64-bit kernels) is compared with the one
//!    from the previous scan. A changed checksum means a volatile page: record it and
//!    move on.
//! 4. With `use_zero_pages`, a page whose checksum is that of a zero page is merged with
//!    the shared zero frame (`try_to_merge_with_zero_page`); `ksm_zero_pages` counts them.
//!    If that merge fails (the page changed, or only its checksum matched), the page goes
//!    on to step 5 like any other.
//! 5. The **stable tree** (canonical frames, never changing, ordered by `memcmp`) is
//!    searched. On a hit with room (fewer than `max_page_sharing` sharers; otherwise a new
//!    dup of a *stable node chain* is needed), the page is write-protected and merged:
//!    [`PageMemory::merge`] re-compares under protection, as `try_to_merge_one_page` does
//!    (`write_protect_page`, `pages_identical`, `replace_page`). If it was written or
//!    differs, the scanner just moves on.
//! 6. Otherwise the **unstable tree** (pages whose checksum did not change since the last
//!    scan, ordered by `memcmp` of their *current* contents, read live, so the tree may be
//!    inconsistent; it is emptied at the start of every full scan) is searched, and the
//!    page inserted if not found (`pages_unshared`). On a hit both pages merge
//!    (`try_to_merge_two_pages`): the scanned page is protected and becomes the canonical
//!    frame ([`PageMemory::canonicalize`]), the tree page is protected and merged into it,
//!    and a new stable node is inserted (`stable_tree_insert`, another `memcmp` walk; if
//!    an equal node exists because all its dups are full, the frame becomes a new dup of
//!    its chain). If the tree page's merge fails, the canonical page gets a private copy
//!    again (`break_cow`).
//!
//! Equality is only ever decided by a full compare, never by the checksum.
//!
//! # Driving it
//! ```
//! use std::sync::Arc;
//! use ksm_baseline::{Ksm, KsmConfig};
//! use page_memory::sim::SimMemory;
//! use page_memory::{DomainId, PageId};
//!
//! let mem = Arc::new(SimMemory::new());
//! let r = mem.add_region(4, DomainId(0));
//! for i in 0..4 {
//!     // Pages 0 and 2 are equal, and so are 1 and 3.
//!     mem.write(PageId::new(r, i), 0, &[1 + (i % 2) as u8; 64]).unwrap();
//! }
//! let mut ksm = Ksm::new(mem.clone(), KsmConfig::default());
//! let run = ksm.run_until_converged(10);
//! assert!(run.converged);
//! let stats = ksm.stats();
//! assert_eq!((stats.pages_shared, stats.pages_sharing), (2, 2));
//! assert_eq!(mem.accounting().pages_sharing, 2);
//! ```
//! [`Ksm::scan`] is KSM's batch (`pages_to_scan`); [`KsmThread`] runs batches on a
//! background thread with a sleep between them, like `ksmd` (`pages_to_scan`,
//! `sleep_millisecs`).
//!
//! # Where it differs from `mm/ksm.c`
//! - **Pages are named directly.** There are no `mm_slot`s, VMAs, page-table walks,
//!   `anon_vma`s or reverse-map walks: a page is a [`PageId`]. The rmap items form one
//!   dense table with an item for every page of every region (KSM allocates one per
//!   mapped anonymous page and frees it when the page goes), and a stable dup counts its
//!   sharers instead of listing their rmap items (KSM needs the list for rmap walks:
//!   migration, swap, memory failure, none of which exist here).
//! - **"Is it still a KSM page?"** is a protect-token check
//!   ([`PageMemory::written_since`]) instead of `PageKsm` on the mapped page.
//! - **The scanned page is read once into a buffer** ([`PageMemory::read_page`]): the
//!   checksum and every comparison on the way down both trees use that copy, where KSM
//!   hashes and compares the mapped page in place (one extra 4 KiB copy per page that
//!   gets past step 1). Unstable-tree pages are read live, in growing stages, at every
//!   level ([`PageMemory::read_words`]), so a difference near the start stays cheap, as
//!   with `memcmp`. Canonical frames are compared in place.
//! - **Stable nodes with no sharer left are removed at once** (KSM removes them when it
//!   next meets the freed KSM page, `get_ksm_page` finding it stale), and a chain with a
//!   single dup left stops counting as a chain at once (KSM collapses it in its next
//!   2-second pruning pass). Chain dups are picked as KSM does when not pruning: the first
//!   below the limit, moved to the head.
//! - **Zero pages**: `ksm_zero_pages` drops when the scanner next meets the written page
//!   (KSM: at the write fault). A page already mapping the backend's zero frame (never
//!   written) looks like any page of zeros here; Linux never scans never-touched pages.
//! - **Trust domains** have no KSM counterpart; with `merge_across_domains = false` each
//!   domain gets its own stable and unstable tree, as KSM's `merge_across_nodes = 0` gives
//!   each NUMA node its own. There is no NUMA, THP, swap, migration, fork, advisor
//!   (`pages_to_scan` is the caller's) or `madvise` here, and `max_page_sharing` is fixed
//!   when the scanner is made.
//! - **Counters** keep KSM's meaning. `general_profit` is KSM's formula
//!   (`(pages_sharing + ksm_zero_pages) * 4096 - rmap_items * sizeof(rmap_item)`) with
//!   this crate's item size; [`KsmStats::metadata_bytes`] is the real total, dense table
//!   and stable nodes included.

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

mod cmp;
mod rbtree;
mod stable;
mod thread;

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_memory::{DomainId, MergeOutcome, PageId, PageMemory, ProtectToken, RegionId, PAGE_SIZE};

use crate::cmp::{CmpCost, LiveScratch};
use crate::rbtree::{RbArena, RbLinks, NIL};
use crate::stable::StableTrees;

pub use crate::thread::KsmThread;

/// KSM's default `max_page_sharing`.
pub const DEFAULT_MAX_PAGE_SHARING: usize = 256;
/// KSM's default `pages_to_scan`.
pub const DEFAULT_PAGES_TO_SCAN: usize = 100;
/// KSM's default `sleep_millisecs`.
pub const DEFAULT_SLEEP: Duration = Duration::from_millis(20);

/// Bytes of per-page metadata (one rmap item per page; KSM's `struct ksm_rmap_item` is 64
/// bytes on 64-bit kernels).
pub const RMAP_ITEM_BYTES: usize = std::mem::size_of::<RmapItem>();

/// Bytes of one stable tree node plus one dup holding a frame of type `F` (KSM's
/// `struct ksm_stable_node` is 64 bytes; a chain costs one more for the chain head).
pub fn stable_node_bytes<F>() -> usize {
    std::mem::size_of::<stable::StableNode>() + std::mem::size_of::<Option<stable::Dup<F>>>()
}

/// The scanner's settings: KSM's sysfs knobs that change what it merges.
///
/// Start from [`KsmConfig::default`] (KSM's defaults) and change what you need with the
/// setters, named like the fields; more knobs may be added in later versions (hence
/// `#[non_exhaustive]`).
///
/// ```
/// use ksm_baseline::KsmConfig;
///
/// let config = KsmConfig::default().use_zero_pages(true).max_page_sharing(16);
/// assert!(config.use_zero_pages);
/// assert!(config.smart_scan); // the default
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KsmConfig {
    /// Most pages that may share one canonical frame (KSM's `max_page_sharing`, default
    /// 256, at least 2). Beyond it, another frame of the same content is made (a dup of a
    /// stable node chain).
    pub max_page_sharing: usize,
    /// Merge pages of zeros with the shared zero frame instead of building stable nodes
    /// for them (KSM's `use_zero_pages`, default off).
    pub use_zero_pages: bool,
    /// Skip pages that keep failing to merge (KSM's `smart_scan`, on by default since
    /// Linux 6.7; the measurements in `anchors.md` §1 were taken with it off).
    pub smart_scan: bool,
    /// Merge pages of different trust domains (default, as KSM knows no domains). When
    /// off, each domain has its own pair of trees (like KSM's `merge_across_nodes = 0`
    /// per NUMA node).
    pub merge_across_domains: bool,
}

impl Default for KsmConfig {
    fn default() -> Self {
        KsmConfig {
            max_page_sharing: DEFAULT_MAX_PAGE_SHARING,
            use_zero_pages: false,
            smart_scan: true,
            merge_across_domains: true,
        }
    }
}

impl KsmConfig {
    /// Sets the `max_page_sharing` field.
    #[must_use]
    pub fn max_page_sharing(mut self, pages: usize) -> Self {
        self.max_page_sharing = pages;
        self
    }

    /// Sets the `use_zero_pages` field.
    #[must_use]
    pub fn use_zero_pages(mut self, on: bool) -> Self {
        self.use_zero_pages = on;
        self
    }

    /// Sets the `smart_scan` field.
    #[must_use]
    pub fn smart_scan(mut self, on: bool) -> Self {
        self.smart_scan = on;
        self
    }

    /// Sets the `merge_across_domains` field.
    #[must_use]
    pub fn merge_across_domains(mut self, on: bool) -> Self {
        self.merge_across_domains = on;
        self
    }
}

/// A snapshot of the scanner's counters. Fields named like KSM's sysfs files
/// (`/sys/kernel/mm/ksm/`) mean what those mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KsmStats {
    /// Pages processed by the scanner, all time (skipped pages not included).
    pub pages_scanned: u64,
    /// Canonical frames in the stable trees that pages map (KSM counts a frame here while
    /// at least one page maps it).
    pub pages_shared: u64,
    /// Pages mapping a canonical frame beyond its first: pages saved.
    pub pages_sharing: u64,
    /// Pages in the unstable tree (unchanged since the last scan, no partner found yet).
    pub pages_unshared: u64,
    /// Tracked pages in none of the above: changing too fast to be considered.
    pub pages_volatile: u64,
    /// Pages skipped by `smart_scan`, all time.
    pub pages_skipped: u64,
    /// Completed full scans (KSM's `ksm_scan.seqnr`; [`Ksm::unmerge_all`] resets it).
    pub full_scans: u64,
    /// Stable nodes with two or more canonical frames (`max_page_sharing` reached).
    pub stable_node_chains: u64,
    /// Canonical frames in those chains.
    pub stable_node_dups: u64,
    /// Pages merged with the zero frame (`use_zero_pages`).
    pub ksm_zero_pages: u64,
    /// KSM's formula: `(pages_sharing + ksm_zero_pages) * 4096 - rmap_items *
    /// RMAP_ITEM_BYTES`.
    pub general_profit: i64,
    /// Pages with a live rmap item (scanned at least once, not a zero page): KSM's
    /// `ksm_rmap_items`.
    pub rmap_items: u64,
    /// Successful merges (stable-tree hits, pairs from the unstable tree, zero pages),
    /// all time: each saved one page when it happened.
    pub merges: u64,
    /// Merges abandoned because the page was written or differed under protection.
    pub merge_failures: u64,
    /// Merged pages found written since (copy-on-write broke the sharing), all time.
    pub cow_breaks: u64,
    /// Pages whose checksum had changed since the previous scan, all time.
    pub checksum_changes: u64,
    /// `memcmp` comparisons made walking the trees, all time (the re-compare inside
    /// [`PageMemory::merge`] is the backend's and not counted).
    pub comparisons: u64,
    /// Bytes those comparisons examined (common prefix plus the differing byte, or the
    /// whole page when equal).
    pub bytes_compared: u64,
    /// Time spent inside [`Ksm::scan`] (the scanner is single-threaded: its CPU time,
    /// unless the OS preempted it).
    pub busy: Duration,
    /// Per-page metadata in bytes ([`RMAP_ITEM_BYTES`]).
    pub metadata_bytes_per_page: usize,
    /// All metadata in bytes: the rmap table and the stable nodes (allocated capacity).
    pub metadata_bytes: u64,
}

impl KsmStats {
    /// Bytes of guest memory freed by merging (sharing plus zero pages).
    pub fn bytes_saved(&self) -> u64 {
        (self.pages_sharing + self.ksm_zero_pages) * PAGE_SIZE as u64
    }

    /// Pages saved (sharing plus zero pages) per second of scanner time.
    pub fn pages_merged_per_busy_second(&self) -> f64 {
        let s = self.busy.as_secs_f64();
        if s > 0.0 {
            (self.pages_sharing + self.ksm_zero_pages) as f64 / s
        } else {
            0.0
        }
    }
}

/// What one completed full scan did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FullScanSummary {
    /// Pages processed.
    pub pages_scanned: u64,
    /// Pages skipped by `smart_scan`.
    pub pages_skipped: u64,
    /// Successful merges.
    pub merges: u64,
    /// Abandoned merges.
    pub merge_failures: u64,
    /// Merged pages found written.
    pub cow_breaks: u64,
    /// Pages whose checksum changed.
    pub checksum_changes: u64,
    /// Tree comparisons.
    pub comparisons: u64,
    /// Bytes they examined.
    pub bytes_compared: u64,
}

impl FullScanSummary {
    /// Whether the scan changed nothing and saw no change: no merge (or failed merge), no
    /// broken sharing, no changed checksum. Another scan of unchanged memory would find
    /// nothing more.
    pub fn is_quiet(&self) -> bool {
        self.merges == 0
            && self.merge_failures == 0
            && self.cow_breaks == 0
            && self.checksum_changes == 0
    }
}

/// What one [`Ksm::scan`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanReport {
    /// Pages processed (at most the `pages_to_scan` asked for).
    pub pages_scanned: usize,
    /// Whether the call reached the end of a full scan (it stops there, as `ksm_do_scan`
    /// does).
    pub full_scan_completed: bool,
}

/// What [`Ksm::run_until_converged`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Convergence {
    /// Full scans it completed.
    pub full_scans: u64,
    /// Whether the last of them was quiet ([`FullScanSummary::is_quiet`]).
    pub converged: bool,
    /// Scanner time it took.
    pub busy: Duration,
}

/// What [`Ksm::unmerge_all`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnmergeReport {
    /// Pages given back a private copy (merged pages and zero pages).
    pub pages_unmerged: u64,
    /// Pages the backend could not unmerge (they went away).
    pub errors: u64,
}

/// Where a page stands with the scanner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// Never scanned (or forgotten): KSM has no rmap item for it.
    Fresh,
    /// Scanned; in no tree.
    Idle,
    /// A node of the unstable tree of scan `seqnr` (possibly a stale one).
    Unstable,
    /// Maps stable dup `links.left`, under protect token `token`.
    Stable,
    /// Maps the zero frame, under protect token `token`.
    Zero,
}

/// Per-page metadata: KSM's `struct ksm_rmap_item` without what naming pages directly
/// makes unnecessary (`mm`, `address`, `rmap_list`, `anon_vma`, the stable hlist).
#[derive(Clone, Copy, Debug)]
struct RmapItem {
    /// Protect token of a merged page (stable or zero).
    token: u64,
    /// Unstable-tree links; when stable, `left` is the dup the page maps.
    links: RbLinks,
    /// The checksum from the previous scan (`oldchecksum`).
    oldchecksum: u32,
    state: State,
    /// Low bits of the scan that put it in the unstable tree (KSM's `SEQNR_MASK` bits).
    seqnr: u8,
    /// Scans without merging (smart scan's `age`).
    age: u8,
    /// Scans still to skip (smart scan's `remaining_skips`).
    remaining_skips: u8,
}

impl RmapItem {
    /// A fresh item, zeroed as `alloc_rmap_item` zeroes it.
    const FRESH: RmapItem = RmapItem {
        token: 0,
        links: RbLinks::UNLINKED,
        oldchecksum: 0,
        state: State::Fresh,
        seqnr: 0,
        age: 0,
        remaining_skips: 0,
    };
}

/// The rmap table as the unstable trees' node arena.
struct Items(Vec<RmapItem>);

impl RbArena for Items {
    fn links(&self, n: u32) -> &RbLinks {
        &self.0[n as usize].links
    }
    fn links_mut(&mut self, n: u32) -> &mut RbLinks {
        &mut self.0[n as usize].links
    }
}

/// A region as the scanner tracks it: its items are `base..base + pages`.
#[derive(Clone, Copy, Debug)]
struct RegionSlot {
    id: RegionId,
    base: u32,
    pages: u32,
    /// The pair of trees its pages go into.
    tree: u32,
}

/// Gauges and all-time counters.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    pages_scanned: u64,
    pages_skipped: u64,
    pages_shared: u64,
    pages_sharing: u64,
    pages_unshared: u64,
    ksm_zero_pages: u64,
    rmap_items: u64,
    merges: u64,
    merge_failures: u64,
    cow_breaks: u64,
    checksum_changes: u64,
    cost: CmpCost,
}

impl Counters {
    fn summary_since(&self, start: &Counters) -> FullScanSummary {
        FullScanSummary {
            pages_scanned: self.pages_scanned - start.pages_scanned,
            pages_skipped: self.pages_skipped - start.pages_skipped,
            merges: self.merges - start.merges,
            merge_failures: self.merge_failures - start.merge_failures,
            cow_breaks: self.cow_breaks - start.cow_breaks,
            checksum_changes: self.checksum_changes - start.checksum_changes,
            comparisons: self.cost.comparisons - start.cost.comparisons,
            bytes_compared: self.cost.bytes - start.cost.bytes,
        }
    }
}

/// Most full scans in a row that `smart_scan` skips a page (KSM's `skip_age` of old pages).
pub const SMART_SCAN_MAX_SKIPS: u8 = 8;

/// Smart scan: how many scans to skip a page of this age (`skip_age`).
fn skip_age(age: u8) -> u8 {
    match age {
        0..=3 => 1,
        4..=5 => 2,
        6..=8 => 4,
        _ => SMART_SCAN_MAX_SKIPS,
    }
}

/// KSM's `calc_checksum`: xxHash64 (seed 0) of the page, truncated to 32 bits.
fn checksum(page: &[u8; PAGE_SIZE]) -> u32 {
    xxhash_rust::xxh64::xxh64(page, 0) as u32
}

/// The KSM-faithful scanner over a memory `M`. See the crate docs.
pub struct Ksm<M: PageMemory> {
    mem: Arc<M>,
    config: KsmConfig,
    /// `max_page_sharing` as a sharer limit.
    max_sharing: u32,
    regions: Vec<RegionSlot>,
    /// Trust domain of each tree pair (when domains are not merged across).
    tree_domains: Vec<DomainId>,
    items: Items,
    /// Unstable tree root per tree pair.
    unstable_roots: Vec<u32>,
    stable: StableTrees<M::Frame>,
    zero: M::Frame,
    zero_checksum: u32,
    /// Next item to scan.
    cursor: u32,
    /// Region slot of the cursor.
    cursor_slot: usize,
    /// Whether a full scan is under way.
    in_scan: bool,
    /// Completed full scans (KSM's `ksm_scan.seqnr`).
    seqnr: u64,
    counters: Counters,
    /// Counters when the current full scan started.
    scan_start: Counters,
    last_scan: Option<FullScanSummary>,
    busy: Duration,
    page_buf: Box<[u8; PAGE_SIZE]>,
    live: LiveScratch,
}

impl<M: PageMemory> std::fmt::Debug for Ksm<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ksm")
            .field("config", &self.config)
            .field("pages", &self.items.0.len())
            .field("full_scans", &self.seqnr)
            .field("in_scan", &self.in_scan)
            .finish_non_exhaustive()
    }
}

impl<M: PageMemory> Ksm<M> {
    /// A scanner over `mem`'s regions (regions added later join at the next full scan).
    /// `max_page_sharing` below 2 is taken as 2, as KSM refuses smaller values.
    pub fn new(mem: Arc<M>, config: KsmConfig) -> Self {
        let zero = mem.zero_frame();
        let zero_checksum = checksum(&[0; PAGE_SIZE]);
        let max_sharing = config.max_page_sharing.clamp(2, u32::MAX as usize) as u32;
        Ksm {
            mem,
            config: KsmConfig {
                max_page_sharing: max_sharing as usize,
                ..config
            },
            max_sharing,
            regions: Vec::new(),
            tree_domains: Vec::new(),
            items: Items(Vec::new()),
            unstable_roots: Vec::new(),
            stable: StableTrees::new(),
            zero,
            zero_checksum,
            cursor: 0,
            cursor_slot: 0,
            in_scan: false,
            seqnr: 0,
            counters: Counters::default(),
            scan_start: Counters::default(),
            last_scan: None,
            busy: Duration::ZERO,
            page_buf: Box::new([0; PAGE_SIZE]),
            live: LiveScratch::new(),
        }
    }

    /// The memory it scans.
    pub fn memory(&self) -> &Arc<M> {
        &self.mem
    }

    /// Its settings.
    pub fn config(&self) -> &KsmConfig {
        &self.config
    }

    /// Turns `use_zero_pages` on or off (takes effect for the next pages scanned).
    pub fn set_use_zero_pages(&mut self, on: bool) {
        self.config.use_zero_pages = on;
    }

    /// Turns `smart_scan` on or off.
    pub fn set_smart_scan(&mut self, on: bool) {
        self.config.smart_scan = on;
    }

    /// Processes up to `pages_to_scan` pages from where the last call stopped, stopping
    /// early at the end of a full scan: KSM's `ksm_do_scan(pages_to_scan)`. Pages that
    /// map the zero frame by the scanner's doing and pages `smart_scan` skips do not count.
    pub fn scan(&mut self, pages_to_scan: usize) -> ScanReport {
        let start = Instant::now();
        let mut report = ScanReport::default();
        while report.pages_scanned < pages_to_scan {
            if !self.in_scan && !self.start_full_scan() {
                break;
            }
            if self.cursor as usize >= self.items.0.len() {
                self.end_full_scan();
                report.full_scan_completed = true;
                break;
            }
            let i = self.cursor;
            self.cursor += 1;
            while i >= self.regions[self.cursor_slot].base + self.regions[self.cursor_slot].pages {
                self.cursor_slot += 1;
            }
            let slot = self.regions[self.cursor_slot];
            let page = PageId::new(slot.id, i - slot.base);
            if self.cmp_and_merge_page(i, page, slot.tree) {
                report.pages_scanned += 1;
                self.counters.pages_scanned += 1;
            }
        }
        self.busy += start.elapsed();
        report
    }

    /// Runs full scans (finishing the current one first) until the memory is converged or
    /// `max_full_scans` have completed. Converged means a quiet full scan
    /// ([`FullScanSummary::is_quiet`]) that looked at every page: one that skipped none, or,
    /// with `smart_scan`, the last of [`SMART_SCAN_MAX_SKIPS`]` + 1` quiet scans in a row
    /// (no page is skipped that many times running). On memory that no one writes and
    /// that has no smart-scan history, duplicates are all merged after two full scans (the
    /// first records checksums, the second merges) and the third is quiet.
    ///
    /// Pages that were volatile for a while keep a high smart-scan age (KSM never lowers
    /// it), so with `smart_scan` on they are looked at only once in up to nine scans, and
    /// two such duplicates whose cycles never line up never meet in the same unstable
    /// tree (in KSM too): "converged" then means no progress over a whole skip cycle, with
    /// such pairs left unmerged. Measure convergence with `smart_scan` off, as
    /// `anchors.md` §1 did.
    pub fn run_until_converged(&mut self, max_full_scans: u64) -> Convergence {
        let busy0 = self.busy;
        let mut run = Convergence::default();
        let mut quiet_streak = 0u64;
        while run.full_scans < max_full_scans {
            let report = self.scan(usize::MAX);
            if !report.full_scan_completed {
                // No pages at all: nothing to converge.
                run.converged = report.pages_scanned == 0 && self.items.0.is_empty();
                break;
            }
            run.full_scans += 1;
            match self.last_scan {
                Some(s) if s.is_quiet() => {
                    quiet_streak += 1;
                    if s.pages_skipped == 0 || quiet_streak > SMART_SCAN_MAX_SKIPS as u64 {
                        run.converged = true;
                        break;
                    }
                }
                _ => quiet_streak = 0,
            }
        }
        run.busy = self.busy - busy0;
        run
    }

    /// What the last completed full scan did.
    pub fn last_full_scan(&self) -> Option<FullScanSummary> {
        self.last_scan
    }

    /// The counters now.
    pub fn stats(&self) -> KsmStats {
        let c = &self.counters;
        let volatile = c
            .rmap_items
            .saturating_sub(c.pages_shared + c.pages_sharing + c.pages_unshared);
        let profit = ((c.pages_sharing + c.ksm_zero_pages) * PAGE_SIZE as u64) as i64
            - (c.rmap_items * RMAP_ITEM_BYTES as u64) as i64;
        KsmStats {
            pages_scanned: c.pages_scanned,
            pages_shared: c.pages_shared,
            pages_sharing: c.pages_sharing,
            pages_unshared: c.pages_unshared,
            pages_volatile: volatile,
            pages_skipped: c.pages_skipped,
            full_scans: self.seqnr,
            stable_node_chains: self.stable.chains,
            stable_node_dups: self.stable.chain_dups,
            ksm_zero_pages: c.ksm_zero_pages,
            general_profit: profit,
            rmap_items: c.rmap_items,
            merges: c.merges,
            merge_failures: c.merge_failures,
            cow_breaks: c.cow_breaks,
            checksum_changes: c.checksum_changes,
            comparisons: c.cost.comparisons,
            bytes_compared: c.cost.bytes,
            busy: self.busy,
            metadata_bytes_per_page: RMAP_ITEM_BYTES,
            metadata_bytes: (self.items.0.capacity() * RMAP_ITEM_BYTES
                + self.stable.metadata_bytes()
                + self.regions.capacity() * std::mem::size_of::<RegionSlot>()
                + self.unstable_roots.capacity() * 4) as u64,
        }
    }

    /// Gives every merged page and every zero page the scanner made a private copy of
    /// its contents again, and forgets everything (rmap items, both trees, counters
    /// except the all-time ones, `full_scans`): KSM's `run = 2`
    /// (`unmerge_and_remove_all_rmap_items`). Scanning again starts from scratch.
    pub fn unmerge_all(&mut self) -> UnmergeReport {
        let start = Instant::now();
        let mut report = UnmergeReport::default();
        let mut slot = 0;
        for i in 0..self.items.0.len() as u32 {
            while i >= self.regions[slot].base + self.regions[slot].pages {
                slot += 1;
            }
            let item = self.items.0[i as usize];
            if matches!(item.state, State::Stable | State::Zero) {
                let page = PageId::new(self.regions[slot].id, i - self.regions[slot].base);
                // A page written since has its own copy already (break_ksm finds no KSM
                // page there).
                if let Ok(false) = self.mem.written_since(page, ProtectToken(item.token)) {
                    match self.mem.unmerge(page) {
                        Ok(()) => report.pages_unmerged += 1,
                        Err(_) => report.errors += 1,
                    }
                }
            }
            self.items.0[i as usize] = RmapItem::FRESH;
        }
        self.stable.clear();
        for r in &mut self.unstable_roots {
            *r = NIL;
        }
        let c = &mut self.counters;
        c.pages_shared = 0;
        c.pages_sharing = 0;
        c.pages_unshared = 0;
        c.ksm_zero_pages = 0;
        c.rmap_items = 0;
        self.seqnr = 0;
        self.in_scan = false;
        self.cursor = 0;
        self.cursor_slot = 0;
        self.last_scan = None;
        self.busy += start.elapsed();
        report
    }

    /// Starts a full scan: picks up new regions and empties the unstable trees. `false`
    /// if there is nothing to scan.
    fn start_full_scan(&mut self) -> bool {
        self.refresh_regions();
        if self.items.0.is_empty() {
            return false;
        }
        for r in &mut self.unstable_roots {
            *r = NIL;
        }
        self.cursor = 0;
        self.cursor_slot = 0;
        self.in_scan = true;
        self.scan_start = self.counters;
        true
    }

    fn end_full_scan(&mut self) {
        self.seqnr += 1;
        self.in_scan = false;
        self.last_scan = Some(self.counters.summary_since(&self.scan_start));
    }

    /// Adds the regions the memory has that the scanner does not know yet.
    fn refresh_regions(&mut self) {
        for info in self.mem.regions() {
            if self.regions.iter().any(|r| r.id == info.id) {
                continue;
            }
            let base = self.items.0.len() as u64;
            if base + info.pages as u64 >= NIL as u64 {
                // More pages than the 31-bit item indices can name: not tracked.
                continue;
            }
            let tree = if self.config.merge_across_domains {
                0
            } else {
                match self.tree_domains.iter().position(|&d| d == info.domain) {
                    Some(t) => t as u32,
                    None => {
                        self.tree_domains.push(info.domain);
                        (self.tree_domains.len() - 1) as u32
                    }
                }
            };
            while self.unstable_roots.len() <= tree as usize {
                self.unstable_roots.push(NIL);
            }
            self.stable.ensure_tree(tree);
            self.regions.push(RegionSlot {
                id: info.id,
                base: base as u32,
                pages: info.pages,
                tree,
            });
            self.items
                .0
                .resize(base as usize + info.pages as usize, RmapItem::FRESH);
        }
    }

    /// The page of item `i` (any item, not only the cursor's).
    fn page_of(&self, i: u32) -> PageId {
        let k = self.regions.partition_point(|r| r.base <= i) - 1;
        let r = &self.regions[k];
        PageId::new(r.id, i - r.base)
    }

    /// Protects one page; its token, or `None` if the page went away.
    fn protect_one(&self, page: PageId) -> Option<ProtectToken> {
        self.mem.protect(&[page]).into_iter().next()?.ok()
    }

    /// KSM's `cmp_and_merge_page` for item `i` (plus the skipping done by its caller).
    /// Returns whether the page counts as scanned.
    fn cmp_and_merge_page(&mut self, i: u32, page: PageId, tree: u32) -> bool {
        let item = self.items.0[i as usize];
        match item.state {
            State::Stable => match self.mem.written_since(page, ProtectToken(item.token)) {
                // Still the KSM page it was merged into: nothing to do.
                Ok(false) => return true,
                // Copy-on-write broke the sharing; the page is an ordinary page again.
                Ok(true) => self.counters.cow_breaks += 1,
                Err(_) => {
                    self.forget(i);
                    return false;
                }
            },
            State::Zero => match self.mem.written_since(page, ProtectToken(item.token)) {
                // Maps the zero page: KSM's walk never stops on it.
                Ok(false) => return false,
                Ok(true) => {
                    // Written: an anonymous page again, which gets a new rmap item.
                    self.counters.cow_breaks += 1;
                    self.counters.ksm_zero_pages -= 1;
                    self.items.0[i as usize] = RmapItem::FRESH;
                }
                Err(_) => {
                    self.forget(i);
                    return false;
                }
            },
            _ => {}
        }
        if self.items.0[i as usize].state == State::Fresh {
            // get_next_rmap_item: a new, zeroed rmap item.
            self.items.0[i as usize].state = State::Idle;
            self.counters.rmap_items += 1;
        }
        if self.should_skip(i) {
            self.remove_from_tree(i);
            self.counters.pages_skipped += 1;
            return false;
        }
        self.remove_from_tree(i);

        if self.mem.read_page(page, &mut self.page_buf).is_err() {
            self.forget(i);
            return false;
        }
        let sum = checksum(&self.page_buf);
        if self.items.0[i as usize].oldchecksum != sum {
            self.items.0[i as usize].oldchecksum = sum;
            self.counters.checksum_changes += 1;
            return true;
        }
        if self.config.use_zero_pages && sum == self.zero_checksum && self.merge_with_zero(i, page)
        {
            return true;
        }

        if let Some(dup) = self.stable_tree_search(tree) {
            if let Some(token) = self.protect_one(page) {
                match self.mem.merge(page, token, &self.stable.dup(dup).frame) {
                    Ok(MergeOutcome::Merged) => {
                        self.counters.merges += 1;
                        self.stable_tree_append(i, dup, token);
                    }
                    _ => self.counters.merge_failures += 1,
                }
            }
            return true;
        }

        if let Some(tree_item) = self.unstable_tree_search_insert(i, tree) {
            self.merge_two_pages(i, page, tree_item, tree);
        }
        true
    }

    /// Smart scan (`should_skip_rmap_item`): whether to skip non-KSM page `i` this time.
    fn should_skip(&mut self, i: u32) -> bool {
        if !self.config.smart_scan {
            return false;
        }
        let item = &mut self.items.0[i as usize];
        let age = item.age;
        if age != u8::MAX {
            item.age += 1;
        }
        if age < 3 {
            return false;
        }
        if item.remaining_skips == 0 {
            item.remaining_skips = skip_age(age);
            return false;
        }
        item.remaining_skips -= 1;
        true
    }

    /// `remove_rmap_item_from_tree`: takes item `i` out of the stable node it maps or the
    /// unstable tree it is in.
    fn remove_from_tree(&mut self, i: u32) {
        let item = &mut self.items.0[i as usize];
        match item.state {
            State::Stable => {
                let dup = item.links.left;
                item.state = State::Idle;
                item.links = RbLinks::UNLINKED;
                if self.stable.remove_sharer(dup) {
                    self.counters.pages_shared -= 1;
                } else {
                    self.counters.pages_sharing -= 1;
                }
            }
            State::Unstable => {
                // Only an item inserted during this scan is in the current tree; older
                // ones were dropped with the tree.
                let current = item.seqnr == self.seqnr as u8;
                item.state = State::Idle;
                if current {
                    let slot = self.regions.partition_point(|r| r.base <= i) - 1;
                    let t = self.regions[slot].tree as usize;
                    let mut root = self.unstable_roots[t];
                    rbtree::erase(&mut self.items, &mut root, i);
                    self.unstable_roots[t] = root;
                } else {
                    self.items.0[i as usize].links = RbLinks::UNLINKED;
                }
                self.counters.pages_unshared -= 1;
            }
            _ => {}
        }
    }

    /// Drops item `i` (its page went away), as KSM frees an rmap item.
    fn forget(&mut self, i: u32) {
        self.remove_from_tree(i);
        let item = &mut self.items.0[i as usize];
        match item.state {
            State::Zero => self.counters.ksm_zero_pages -= 1,
            State::Fresh => {}
            _ => self.counters.rmap_items -= 1,
        }
        *item = RmapItem::FRESH;
    }

    /// `try_to_merge_with_zero_page`: whether page `i` now maps the zero frame.
    fn merge_with_zero(&mut self, i: u32, page: PageId) -> bool {
        let Some(token) = self.protect_one(page) else {
            return false;
        };
        match self.mem.merge(page, token, &self.zero) {
            Ok(MergeOutcome::Merged) => {
                let item = &mut self.items.0[i as usize];
                item.state = State::Zero;
                item.token = token.0;
                self.counters.merges += 1;
                self.counters.ksm_zero_pages += 1;
                // The page is no longer anonymous: its rmap item goes.
                self.counters.rmap_items -= 1;
                true
            }
            _ => {
                self.counters.merge_failures += 1;
                false
            }
        }
    }

    /// `stable_tree_search`: a dup with room whose frame equals the page read into
    /// `page_buf`, comparing down stable tree `tree`.
    fn stable_tree_search(&mut self, tree: u32) -> Option<u32> {
        let mut cur = self.stable.roots[tree as usize];
        while cur != NIL {
            let frame = self.stable.node_frame(cur);
            let ord = cmp::memcmp(&self.page_buf[..], frame.as_ref(), &mut self.counters.cost);
            let node = &self.stable.nodes.v[cur as usize];
            cur = match ord {
                Ordering::Less => node.links.left,
                Ordering::Greater => node.links.right,
                // All dups full: the page must pair up in the unstable tree to start a
                // new dup of this chain.
                Ordering::Equal => return self.stable.candidate(cur, self.max_sharing),
            };
        }
        None
    }

    /// `stable_tree_insert`: adds `frame` to stable tree `tree` (as a new node, or as a new
    /// dup of the chain of an equal node) and returns its dup.
    fn stable_tree_insert(&mut self, tree: u32, frame: M::Frame) -> u32 {
        let (mut cur, mut parent, mut go_left) = (self.stable.roots[tree as usize], NIL, false);
        while cur != NIL {
            let ord = cmp::memcmp(
                frame.as_ref(),
                self.stable.node_frame(cur).as_ref(),
                &mut self.counters.cost,
            );
            parent = cur;
            let node = &self.stable.nodes.v[cur as usize];
            match ord {
                Ordering::Less => {
                    go_left = true;
                    cur = node.links.left;
                }
                Ordering::Greater => {
                    go_left = false;
                    cur = node.links.right;
                }
                Ordering::Equal => return self.stable.add_dup(cur, frame),
            }
        }
        self.stable.insert_node(tree, frame, parent, go_left)
    }

    /// `stable_tree_append`: item `i` now maps dup `dup` under `token`.
    fn stable_tree_append(&mut self, i: u32, dup: u32, token: ProtectToken) {
        if self.stable.add_sharer(dup) {
            self.counters.pages_shared += 1;
        } else {
            self.counters.pages_sharing += 1;
        }
        let item = &mut self.items.0[i as usize];
        item.state = State::Stable;
        item.token = token.0;
        item.links = RbLinks::holding(dup);
    }

    /// `unstable_tree_search_insert`: an item of unstable tree `tree` whose page now equals
    /// `page_buf`, or else inserts item `i` (`None`). Tree pages are read live.
    fn unstable_tree_search_insert(&mut self, i: u32, tree: u32) -> Option<u32> {
        let (mut cur, mut parent, mut go_left) = (self.unstable_roots[tree as usize], NIL, false);
        while cur != NIL {
            let tree_page = self.page_of(cur);
            let ord = cmp::memcmp_live(
                &*self.mem,
                &self.page_buf,
                tree_page,
                &mut self.live,
                &mut self.counters.cost,
            )?;
            parent = cur;
            let links = self.items.0[cur as usize].links;
            match ord {
                Ordering::Less => {
                    go_left = true;
                    cur = links.left;
                }
                Ordering::Greater => {
                    go_left = false;
                    cur = links.right;
                }
                Ordering::Equal => return Some(cur),
            }
        }
        let mut root = self.unstable_roots[tree as usize];
        rbtree::link(&mut self.items, &mut root, i, parent, go_left);
        self.unstable_roots[tree as usize] = root;
        let item = &mut self.items.0[i as usize];
        item.state = State::Unstable;
        item.seqnr = self.seqnr as u8;
        self.counters.pages_unshared += 1;
        None
    }

    /// `try_to_merge_two_pages` and what follows it: page `i` becomes the canonical frame,
    /// unstable-tree item `tree_item`'s page merges into it, and both join a new stable
    /// dup.
    fn merge_two_pages(&mut self, i: u32, page: PageId, tree_item: u32, tree: u32) {
        let Some(token) = self.protect_one(page) else {
            self.counters.merge_failures += 1;
            return;
        };
        let Ok(frame) = self.mem.canonicalize(page, token) else {
            self.counters.merge_failures += 1;
            return;
        };
        let tree_page = self.page_of(tree_item);
        let merged = match self.protect_one(tree_page) {
            Some(tree_token) => match self.mem.merge(tree_page, tree_token, &frame) {
                Ok(MergeOutcome::Merged) => Some(tree_token),
                _ => None,
            },
            None => None,
        };
        let Some(tree_token) = merged else {
            // A canonical page only one page maps: break it (break_cow).
            self.counters.merge_failures += 1;
            drop(frame);
            let _ = self.mem.unmerge(page);
            return;
        };
        self.counters.merges += 1;
        self.remove_from_tree(tree_item);
        let dup = self.stable_tree_insert(tree, frame);
        self.stable_tree_append(tree_item, dup, tree_token);
        self.stable_tree_append(i, dup, token);
    }

    /// Checks the scanner's structures against each other (tests).
    #[cfg(test)]
    fn check_invariants(&self) -> Result<(), String> {
        let mut sharers = std::collections::HashMap::<u32, u32>::new();
        let (mut unshared, mut zero, mut rmap) = (0, 0, 0);
        for item in &self.items.0 {
            match item.state {
                State::Stable => *sharers.entry(item.links.left).or_default() += 1,
                State::Unstable => unshared += 1,
                State::Zero => zero += 1,
                _ => {}
            }
            if !matches!(item.state, State::Fresh | State::Zero) {
                rmap += 1;
            }
        }
        for (&d, &n) in &sharers {
            if self.stable.dup(d).sharers != n {
                return Err(format!(
                    "dup {d}: {} sharers recorded, {n} items",
                    self.stable.dup(d).sharers
                ));
            }
        }
        let shared = sharers.len() as u64;
        let sharing: u64 = sharers.values().map(|&n| n as u64 - 1).sum();
        let c = &self.counters;
        if (
            c.pages_shared,
            c.pages_sharing,
            c.pages_unshared,
            c.ksm_zero_pages,
            c.rmap_items,
        ) != (shared, sharing, unshared, zero, rmap)
        {
            return Err(format!(
                "counters {:?} vs recount {:?}",
                (
                    c.pages_shared,
                    c.pages_sharing,
                    c.pages_unshared,
                    c.ksm_zero_pages,
                    c.rmap_items
                ),
                (shared, sharing, unshared, zero, rmap)
            ));
        }
        let (_, live_dups) = self.stable.live();
        if live_dups != sharers.len() {
            return Err(format!(
                "{live_dups} live dups, {} with sharers",
                sharers.len()
            ));
        }
        for &root in &self.stable.roots {
            rbtree::check(&self.stable.nodes, root)?;
        }
        for &root in &self.unstable_roots {
            rbtree::check(&self.items, root)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
