//! PageONE: a multithreaded page-deduplication engine (KSM's job, done by N threads over
//! the lock-free SD tree).
//!
//! ```
//! use std::sync::Arc;
//! use page_memory::sim::SimMemory;
//! use page_memory::{DomainId, PageId};
//! use pageone::{Config, PageOne};
//!
//! let mem = Arc::new(SimMemory::new());
//! let vm = mem.add_region(64, DomainId(0));
//! for i in 0..64 {
//!     mem.write(PageId::new(vm, i), 0, &[(i % 4) as u8 + 1; 4096]).unwrap();
//! }
//! let engine = PageOne::new(mem.clone(), Config::default().work_threads(2))?;
//! // Passes until the memory is quiet (or engine.start() for the periodic daemon).
//! while !engine.merge_pass().quiet() {}
//! assert_eq!(engine.stats().pages_sharing, 60); // 64 pages, 4 distinct contents
//! assert_eq!(mem.accounting().frames, 4);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Page life cycle
//! Every page starts **volatile**. A merge pass reads volatile pages, and keeps
//! write-protected (**watches**) those whose contents are what the previous pass read
//! (Linux KSM's checksum test: [`Config::unchanged_before_protect`], on by default; off,
//! every volatile page is protected at once). The second read is done under protection:
//! the page is protected, read, and unprotected if it changed once its chunk's pages are
//! read, so its **print** (a keyed 64-bit fingerprint of its contents, see *Unique
//! pages*) is exact for as long as its protection holds. A page the guest keeps writing
//! is then read unprotected, once a pass, until a read finds it unchanged, so it is
//! protected only while one chunk is read and costs its guest no fault unless written in
//! that moment. A page that stays
//! unwritten for [`Config::stable_periods`] merge passes (two, as in the original:
//! "observe for two periods, merge in the third"; the unchanged period before protection
//! counts as the first) is merged, **without being read again** when its print is known:
//! - all zeros (its print is the zero page's, or its contents read so): it is mapped to
//!   the shared zero frame (no tree);
//! - otherwise it is looked up by print among the canonical pages of its trust-domain
//!   group (each canonical page is indexed in the group's SD tree under its contents, the
//!   frame read in place, and in a table under its print; the tree is the authority, see
//!   `canon.rs`). A page protected without a read (`unchanged_before_protect` off) is read
//!   (runs of pages at once, [`PageMemory::read_pages`]) and looked up in the SD tree.
//!   An equal canonical page is merged with it through [`PageMemory::merge`], which
//!   re-checks protection and compares the page in full atomically with the switch, so a
//!   print only ever saves work: a page found by a colliding print differs at the switch,
//!   stays watched, and is read and looked up in the SD tree by its contents at the next
//!   pass (test `colliding_prints_cost_work_not_merges`, with prints cut to a few bits);
//! - if there is none, and no *unique* page has the same contents, the page is **unique**:
//!   it stays where it is, protected, and is indexed (see *Unique pages*);
//! - if a unique page has the same contents (its **twin**), this page becomes canonical
//!   ([`PageMemory::canonicalize`]) and is inserted with `insert_or_get` (if another
//!   thread inserted an equal page first, it is merged with that one instead; see *One
//!   canonicalization per content* below for why that is rare), and the twin merges with
//!   it in the same pass.
//!
//! # Unique pages
//! Most pages of real guests have no twin. Making each of them canonical as soon as it is
//! stable, as the first version did, costs the backend a copy and a remap per page (on
//! Linux a store slot, an `mmap(MAP_FIXED)` and its round trip to the fault thread) that
//! Linux KSM never pays. Instead a stable page with no canonical match is entered in an
//! index of unique pages under a *print* of its contents (a 64-bit fingerprint keyed with
//! a random secret per engine, tagged with the page's tree group) and left alone: protected, its
//! own memory, no mapping spent. Only when a second stable page with the same print comes
//! along do both pay: the newcomer is made canonical, and the indexed page (its twin) is
//! flagged in its chunk and merged with it, by the thread that holds that chunk, either
//! before that thread lets the chunk go or in a short sweep at the end of the pass over
//! the flagged chunks only. A print is a hint: every merge is verified in full by the
//! backend, and a collision (rare for contents chosen without the engine's secret, which
//! no guest sees) costs work: one needless canonicalization, after which the page is
//! looked up by its contents. A write to a unique page takes it out of the
//! index at the next pass. The index is keyed by prints rather than by the pages read in
//! place because a key read in place is read by every later search that passes by it, and
//! a VMM may unmap guest memory at any time (the Linux backend reads guest memory only
//! through `process_vm_readv` for that reason). [`Config::unique_in_place`] off restores
//! the first version's behaviour; [`Stats::pages_unique`] counts the pages indexed, and
//! [`PassReport::indexed`] those a pass indexed.
//!
//! A guest write to a watched, canonical, merged or zero page breaks the protection (copy
//! on write in the backend): the next pass sees the token stale, drops the page's
//! reference to its canonical page (the last reference takes the canonical page out of the
//! tree), and makes it volatile again, to be skipped for 1, 2, 4, ... passes, doubling
//! each time it changed in a row (up to [`Config::max_backoff`]), like KSM's smart scan:
//! a page written again soon after each protection costs its guest a fault per
//! protection and cannot merge, so hot pages are protected rarely.
//!
//! # Convergence
//! Every merge pass returns a [`PassReport`] of what it changed (pages merged, zero-merged,
//! made canonical, found written, unmerged, protected), what the backend refused, by
//! reason (the mapping limit, pinned, changed or different at the switch, lost insert
//! races, other errors), and what is still on its way (pages watched, parked for the
//! mapping limit, deferred, backing off). [`PassReport::quiet`]: a pass over every page
//! changed nothing, was refused nothing and left nothing waiting; [`PageOne::is_quiet`]:
//! the last merge pass over each chunk was quiet (with a `pages_per_pass` budget too).
//!
//! **How many passes a quiet memory needs.** With no guest writes, a page goes through
//! one pass that reads it, one that protects and reads it (together its first stable
//! period; one
//! pass that protects it without `unchanged_before_protect`), `stable_periods - 2` passes
//! that watch it (`stable_periods - 1` without) and one that
//! merges it (or makes it canonical, or indexes it as unique: its twin, found later in
//! the same pass, merges it before the pass returns), so memory that no pass has seen yet
//! is merged by pass `stable_periods + 1` and reported quiet by pass `stable_periods + 2`
//! (4 with the default two stable periods; one more with `stable_periods` 1 and
//! `unchanged_before_protect`; with a budget, that many full rounds of chunks). A page
//! written meanwhile starts again after its back-off (1 to [`Config::max_backoff`]
//! passes); a page whose contents another thread was making canonical waits for it within
//! the pass, or (if that takes longer than a second) merges a pass later; a page refused
//! for the mapping limit waits for the gate below. Tests:
//! `tests/convergence.rs`.
//!
//! # One canonicalization per content
//! Making a page canonical costs the backend a copy and a remap (on Linux a store slot and
//! an `mmap`), so when two work threads find the same contents vacant at once, only one
//! should pay. Before canonicalizing, a thread *claims* the contents: a fingerprint of the
//! page (tagged with its tree) in a fixed, lock-free table of claims (compare-and-swap; a
//! thread that finds another's claim on the same key yields). The winner looks the page
//! up again holding the claim (catching an equal page inserted by the claim's previous
//! holder), canonicalizes, inserts, then releases the claim. A loser finishes its own
//! batch first (releasing its claims), waits for the winner's claim to be released — a
//! waiting thread holds no claim, so no two threads wait for each other — and looks its
//! page up again: it then merges with the winner's page. A claim is only a hint: a full
//! bucket lets a page go unclaimed, and an equal fingerprint of other contents only makes
//! a page wait; equality is still verified by the tree and by the backend under
//! protection. Lost insert races are counted in [`Stats::insert_races`].
//!
//! # The mapping budget
//! A backend may refuse a merge or canonicalization because it would spend mappings the
//! process may not have ([`page_memory::PageError::MapCountLimit`]; the Linux backend
//! stops short of `vm.max_map_count`). Such a page is not retried every pass: it stays
//! write-protected and watched (its token good) and is **parked**, and the engine closes
//! the gate of the page's **budget** for 1 merge pass, then 2, 4, ... up to 32 for each
//! retry in a row that is refused again; while a gate is closed, the parked pages of its
//! budget are not read, looked up or offered to the backend (a pass then costs about what
//! a pass over merged pages costs), and its newly stable pages that would need the tree
//! are parked too (zero pages still merge). A budget is the mappings of one process
//! ([`PageMemory::mapping_budget`]): one for the whole memory by default, one per VMM
//! process under the `pageoned` service, whose other VMMs' pages go on merging while one
//! VMM is at its limit. A gate opens early when [`PageMemory::budget_limit`] reports a
//! higher limit than at the refusal (`sysctl -w vm.max_map_count=N`); a retry pass that
//! meets no refusal ends the budget's episode. Refusals are counted by reason in [`Stats`]
//! (`refused_map_count`, `refused_pinned`, `refused_errors`, `merge_races`,
//! `insert_races`), the parked pages in `map_count_parked`, and the embedder hears of the
//! limit as [`Stats::map_count_limit`] / [`Stats::map_count_mappings`] and, once per
//! episode, as an [`Event::MapCountLimit`] sent to [`Config::on_event`].
//!
//! What merging costs in mappings (on Linux, VMAs): a page remapped to a store page is
//! its own mapping unless its neighbours map the neighbouring store pages, so a merged
//! page that lies alone costs up to two mappings (it splits the mapping it lies in), and
//! a run of merged pages whose canonical pages lie at consecutive store offsets (VMs
//! booted from one image: their pages' twins come in runs, and canonical pages go to
//! consecutive offsets) costs that much for the whole run. With unique pages indexed in
//! place, a content's canonical page is remapped too (before, every page was remapped
//! into the store in order, so canonical pages cost nothing and only duplicates did):
//! duplicates scattered at random cost up to twice the mappings they did, while memory
//! whose duplicates come in runs costs about the same. A process limited to
//! `vm.max_map_count` mappings can hold at most about half that many merged pages that
//! lie alone, whichever way they are laid out (`docs/benchmarks.md`, "PageONE:
//! convergence, the mapping budget and insert races"). So the engine spends mappings
//! carefully once they get scarce: when more than a quarter of the backend's limit is in
//! use ([`PageMemory::budget_in_use`]: a cheap upper bound before each chunk, an exact
//! count at the start of a pass, at most every 16 passes while they stay scarce), stable
//! pages without a canonical match are made canonical at once instead of being indexed in
//! place, as in the first version: laid out at their home offsets in runs, they cost no
//! mappings, and a scattered duplicate then costs two rather than four. Memory whose
//! mappings stay plentiful (duplicates in runs) never gets there. Where scattered
//! duplicates meet the limit, raise it (`sysctl -w vm.max_map_count=N`), or turn
//! [`Config::unique_in_place`] off from the start. Not done yet:
//! the engine does not know what a merge costs, so it cannot prefer merges that cost none
//! when the budget runs low; every refused page of a budget waits for its gate (and the Linux
//! backend's guard charges every remap two mappings, so it would have to admit by cost
//! too).
//!
//! # Regions
//! The engine takes on the memory's regions ([`PageMemory::regions`]) when it is made,
//! and again at every [`PageOne::refresh_regions`]: call it when the embedder adds or
//! removes guest memory (a VM started or stopped, memory hot-plugged), and the engine
//! takes on the new regions (their pages start volatile, and merge with the pages of the
//! other regions of their trust-domain group) and lets go of the regions that are gone,
//! dropping every state their pages held as if each page had been written (a merged page
//! releases its canonical page; a canonical page whose own page is gone stays valid for
//! the pages merged with it), without asking the memory about them. It waits for a running
//! pass, and no pass runs meanwhile; each pass works on the regions it found at its start
//! ([`RegionChange`] says what a refresh changed). An engine that is never refreshed works
//! on the regions it was made with; pages of a region that vanishes without a refresh fail
//! their operations, go volatile and are retried after their back-off, each failure
//! counted in [`Stats::refused_errors`], until a refresh lets them go.
//!
//! # Threads
//! A daemon thread ([`PageOne::start`]) wakes every base period and, every merge period,
//! runs a merge pass; on the other ticks it runs a base pass that only notices writes and
//! offers volatile pages to the [`ScanHook`] (the Per Page Recycler; the trait is
//! [`page_memory::ScanHook`], re-exported here). Passes are split in
//! chunks of 512 pages of one region; a region's chunks are queued on one work thread
//! (so a VM's merges stay together), and a thread whose queue is empty steals from the
//! back of another's. The daemon only schedules.
//!
//! # Consistency
//! - Only identical pages are merged: the tree verifies equality against the page's
//!   snapshot, and the backend re-verifies it under protection as it switches mappings.
//! - A guest write is never lost: it lands in a private copy (the backend's contract).
//! - Counters (`pages_shared`, `pages_sharing`, `pages_unshared`, `zero_pages`) are exact
//!   when no pass is running; gauges (`pages_volatile`, `pages_watched`) are as of the
//!   last merge pass over each chunk.
//!
//! # Security
//! Pages of different trust domains ([`page_memory::DomainId`]) are indexed in different
//! trees and never merged, unless [`Config::joined_domains`] puts their domains in one
//! group: cross-tenant merging opens deduplication side channels (CAIN, Flip Feng Shui),
//! so it is off by default.

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

mod budget;
mod canon;
mod config;
mod page;
mod pool;
mod stats;
mod unique;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use page_memory::{DomainId, PageMemory, RegionId, RegionInfo};

use crate::budget::Gates;
use crate::canon::{Canon, Canons, Claims};
use crate::config::Knobs;
use crate::page::{Chunk, Ctx, PassKind, Tally, CHUNK_PAGES};
use crate::pool::Pool;
use crate::stats::{get, Counters};
use crate::unique::Uniques;

pub use crate::config::{Config, Event, EventHook};
pub use crate::stats::{Stats, WorkerStats};
/// Something that looks at volatile pages during every pass before the engine does (the
/// Per Page Recycler's host side plugs in here): [`page_memory::ScanHook`], re-exported.
pub use page_memory::ScanHook;

/// What one pass did: what it changed, what the backend refused (by reason), and what is
/// still on its way. See *Convergence* in the crate docs.
///
/// ```
/// use std::sync::Arc;
/// use page_memory::sim::SimMemory;
/// use page_memory::{DomainId, PageId};
/// use pageone::{Config, PageOne};
///
/// let mem = Arc::new(SimMemory::new());
/// let vm = mem.add_region(8, DomainId(0));
/// for i in 0..8 {
///     mem.write(PageId::new(vm, i), 0, &[(i % 2) as u8 + 1; 4096]).unwrap();
/// }
/// let engine = PageOne::new(mem, Config::default().work_threads(1))?;
/// let read = engine.merge_pass(); // reads the 8 pages (KSM's checksum test)
/// assert_eq!((read.protected, read.watching), (0, 8));
/// let protect = engine.merge_pass(); // unchanged since: protected (one stable period)
/// assert_eq!((protect.protected, protect.watching), (8, 8));
/// let merge = engine.merge_pass(); // stable: 2 become canonical, 6 merge with them
/// assert_eq!((merge.canonicalized, merge.merged), (2, 6));
/// assert!(!merge.quiet());
/// assert!(engine.merge_pass().quiet()); // stable_periods + 2 passes in all
/// assert!(engine.is_quiet());
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PassReport {
    /// Pages examined.
    pub pages: u64,
    /// Whether the pass completed a full scan of all pages.
    pub full_scan: bool,
    /// Whether it examined every page (a merge pass without a budget, or with one at least
    /// as large as the memory).
    pub every_page: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// Pages merged with an equal canonical page.
    pub merged: u64,
    /// Pages merged with the zero page.
    pub zero_merged: u64,
    /// Pages made canonical (new canonical pages): each the first of its contents to
    /// meet a twin.
    pub canonicalized: u64,
    /// Stable pages with no twin, indexed where they are (not copied or remapped; see
    /// *Unique pages* in the crate docs).
    pub indexed: u64,
    /// Pages found written since their token (watched, merged, canonical or zero pages):
    /// volatile again.
    pub written: u64,
    /// Of those, merged, canonical or zero pages whose sharing a write broke.
    pub unmerged: u64,
    /// Volatile pages write-protected (now watched).
    pub protected: u64,
    /// Volatile pages a scan hook took.
    pub recycled: u64,
    /// Refused by the backend for the mapping limit (the pages are parked).
    pub refused_map_count: u64,
    /// Refused by the backend because the page is or may be pinned.
    pub refused_pinned: u64,
    /// Found changed by the backend as it merged (a write raced with the merge).
    pub refused_changed: u64,
    /// Found different from the canonical page by the backend (a write it saw first).
    pub refused_differs: u64,
    /// Canonicalizations wasted on a lost insert race.
    pub insert_races: u64,
    /// Refused for another error.
    pub refused_errors: u64,
    /// Stable pages put off to the next pass: another thread was making an equal page
    /// canonical.
    pub deferred: u64,
    /// Pages parked for the mapping limit at the end of the pass.
    pub parked: u64,
    /// Pages watched at the end of the pass, on their way to a merge (parked ones not
    /// counted).
    pub watching: u64,
    /// Volatile pages this pass skipped because they changed recently (back-off).
    pub backing_off: u64,
}

impl PassReport {
    /// Every refusal, all reasons together.
    pub fn refused(&self) -> u64 {
        self.refused_map_count
            + self.refused_pinned
            + self.refused_changed
            + self.refused_differs
            + self.insert_races
            + self.refused_errors
    }

    /// Whether the pass examined every page and found the memory quiet: it changed
    /// nothing, the backend refused nothing, and nothing is waiting to happen by itself
    /// (no page watched, parked, deferred or backing off). The next pass will do nothing
    /// either unless the guest writes. With a budget (`pages_per_pass`), use
    /// [`PageOne::is_quiet`].
    pub fn quiet(&self) -> bool {
        self.every_page && self.tally().quiet()
    }

    fn tally(&self) -> Tally {
        Tally {
            merged: self.merged,
            zero_merged: self.zero_merged,
            canonicalized: self.canonicalized,
            indexed: self.indexed,
            written: self.written,
            unmerged: self.unmerged,
            protected: self.protected,
            recycled: self.recycled,
            map_count: self.refused_map_count,
            pinned: self.refused_pinned,
            changed: self.refused_changed,
            differs: self.refused_differs,
            insert_races: self.insert_races,
            errors: self.refused_errors,
            deferred: self.deferred,
            parked: self.parked,
            watching: self.watching,
            backing_off: self.backing_off,
        }
    }

    fn set_tally(&mut self, t: &Tally) {
        self.merged = t.merged;
        self.zero_merged = t.zero_merged;
        self.canonicalized = t.canonicalized;
        self.indexed = t.indexed;
        self.written = t.written;
        self.unmerged = t.unmerged;
        self.protected = t.protected;
        self.recycled = t.recycled;
        self.refused_map_count = t.map_count;
        self.refused_pinned = t.pinned;
        self.refused_changed = t.changed;
        self.refused_differs = t.differs;
        self.insert_races = t.insert_races;
        self.refused_errors = t.errors;
        self.deferred = t.deferred;
        self.parked = t.parked;
        self.watching = t.watching;
        self.backing_off = t.backing_off;
    }
}

/// What [`PageOne::refresh_regions`] changed: the regions whose pages the engine took
/// on, and those whose pages it let go (merged pages released their canonical pages,
/// unique and zero pages are no longer counted). A region whose id came back with another
/// size or trust domain is in both lists (let go, then taken on afresh).
///
/// More fields may be added in later versions (hence `#[non_exhaustive]`).
///
/// ```
/// use std::sync::Arc;
/// use page_memory::sim::SimMemory;
/// use page_memory::DomainId;
/// use pageone::{Config, PageOne, RegionChange};
///
/// let mem = Arc::new(SimMemory::new());
/// let old = mem.add_region(4, DomainId(0));
/// let engine = PageOne::new(mem.clone(), Config::default().work_threads(1))?;
/// let new = mem.add_region(4, DomainId(0));
/// mem.remove_region(old).unwrap();
/// let change = engine.refresh_regions();
/// assert_eq!((change.added, change.removed), (vec![new], vec![old]));
/// assert_eq!(engine.refresh_regions(), RegionChange::default()); // nothing new
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegionChange {
    /// Regions the engine took on (in the memory's order): their pages start volatile.
    pub added: Vec<RegionId>,
    /// Regions the engine let go (in the order it had them).
    pub removed: Vec<RegionId>,
}

impl RegionChange {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The regions the engine works on and their chunks, with the trees for their trust
/// domains: built by `new` and replaced as a whole by [`PageOne::refresh_regions`]
/// (under the pass lock, so never while a pass runs). Each pass takes the current layout
/// at its start and uses only that one: its work threads get it with the pass (for the
/// chunks they run and for `Ctx::chunks`/`first_chunk`, where twin flags go), so chunk
/// indices are consistent within a pass.
///
/// Chunks of removed regions are dropped from the list, not kept as tombstones: the
/// indices of later chunks then change from one layout to the next, which is safe
/// because no chunk index outlives a pass. The work queues hold indices only while a pass
/// runs; a twin flag is kept in the chunk itself, relative to the chunk (a chunk that
/// survives a refresh is the same `Arc`, flags and all); `first_chunk` is looked up in
/// the pass's own layout; and the one index kept between passes, the budgeted pass's
/// `Cursor`, is moved by the refresh to the same surviving chunk (or the next one that
/// survives). Tombstones would instead make every pass and `stats` walk dead chunks for
/// as long as the engine runs, which in a service with VMs coming and going grows
/// without bound.
pub(crate) struct Layout<M: PageMemory> {
    /// The regions taken on, in order (ids distinct).
    regions: Vec<RegionInfo>,
    chunks: Vec<Arc<Chunk<M::Frame>>>,
    /// The index in `chunks` of each region's first chunk.
    first_chunk: HashMap<RegionId, usize>,
    /// Home work thread of each chunk.
    home: Vec<usize>,
    canons: Arc<Canons<M::Frame>>,
}

impl<M: PageMemory> Layout<M> {
    /// The layout of `regions` (duplicate ids after the first are ignored), each region's
    /// chunks homed on work thread `ordinal % threads` (as the engine always did).
    fn initial(regions: &[RegionInfo], canons: Canons<M::Frame>, threads: usize) -> Self {
        let mut layout = Layout {
            regions: Vec::new(),
            chunks: Vec::new(),
            first_chunk: HashMap::new(),
            home: Vec::new(),
            canons: Arc::new(canons),
        };
        for r in regions {
            if !layout.first_chunk.contains_key(&r.id) {
                let home = layout.regions.len() % threads;
                layout.push(r, home);
            }
        }
        layout
    }

    /// Appends region `r`'s chunks, homed on work thread `home`.
    fn push(&mut self, r: &RegionInfo, home: usize) {
        self.regions.push(*r);
        self.first_chunk.insert(r.id, self.chunks.len());
        let mut first = 0;
        while first < r.pages {
            let len = CHUNK_PAGES.min(r.pages - first);
            self.chunks
                .push(Arc::new(Chunk::new(r.id, r.domain, first, len)));
            self.home.push(home);
            first += len;
        }
    }

    /// The layout for the memory's regions now (`regions`): the regions still there (same
    /// id, size and domain) keep their chunks (the same `Arc`s, in the same order) and
    /// homes; new ones are appended, each homed on the work thread with the fewest pages
    /// homed so far.
    fn refreshed(&self, regions: &[RegionInfo], threads: usize) -> Refreshed<M> {
        let now: HashMap<RegionId, &RegionInfo> = regions.iter().rev().map(|r| (r.id, r)).collect();
        let keep = |r: &RegionInfo| now.get(&r.id).is_some_and(|n| *n == r);
        let mut change = RegionChange::default();
        let canons = self
            .canons
            .with_domains(&regions.iter().map(|r| r.domain).collect::<Vec<_>>())
            .map_or_else(|| self.canons.clone(), Arc::new);
        let mut next = Layout {
            regions: Vec::new(),
            chunks: Vec::new(),
            first_chunk: HashMap::new(),
            home: Vec::new(),
            canons,
        };
        let mut retired = Vec::new();
        let mut moved = vec![None; self.chunks.len()];
        for r in &self.regions {
            let first = self.first_chunk.get(&r.id).copied().unwrap_or(0);
            let count = r.pages.div_ceil(CHUNK_PAGES) as usize;
            let old = first..(first + count).min(self.chunks.len());
            if keep(r) {
                next.regions.push(*r);
                next.first_chunk.insert(r.id, next.chunks.len());
                for c in old {
                    moved[c] = Some(next.chunks.len());
                    next.chunks.push(self.chunks[c].clone());
                    next.home.push(self.home[c]);
                }
            } else {
                change.removed.push(r.id);
                retired.extend(self.chunks[old].iter().cloned());
            }
        }
        let mut load = vec![0u64; threads];
        for (c, &h) in next.chunks.iter().zip(&next.home) {
            load[h % threads] += c.len() as u64;
        }
        let mut seen = HashSet::new();
        for r in regions {
            if !seen.insert(r.id) || next.first_chunk.contains_key(&r.id) {
                continue;
            }
            let home = (0..threads).min_by_key(|&t| load[t]).unwrap_or(0);
            load[home] += r.pages as u64;
            next.push(r, home);
            change.added.push(r.id);
        }
        Refreshed {
            next,
            change,
            retired,
            moved,
        }
    }
}

/// What [`Layout::refreshed`] makes of a layout.
struct Refreshed<M: PageMemory> {
    /// The new layout.
    next: Layout<M>,
    /// What changed.
    change: RegionChange,
    /// The chunks of the regions let go, to retire.
    retired: Vec<Arc<Chunk<M::Frame>>>,
    /// For each chunk of the old layout, its index in the new one (`None`: retired).
    moved: Vec<Option<usize>>,
}

/// State shared by the engine handle, the daemon and the work threads.
pub(crate) struct Shared<M: PageMemory> {
    memory: Arc<M>,
    /// The current regions, chunks and trees; each pass works on the one it took at its
    /// start (see [`Layout`]).
    layout: RwLock<Arc<Layout<M>>>,
    /// Unique pages indexed in place.
    uniques: Uniques,
    counters: Counters,
    knobs: Knobs,
    hook: Option<Arc<dyn ScanHook<M>>>,
    zero: M::Frame,
    config: Config,
    /// The mapping budgets' gates.
    gates: Gates,
    /// Claims on contents being made canonical.
    claims: Claims,
    /// What the current pass did so far (chunks add to it as they finish).
    pass_tally: Mutex<Tally>,
    /// Serializes passes (daemon and callers) and region refreshes.
    pass_lock: Mutex<Cursor>,
    /// Wakes the daemon early (stop, knob changes).
    daemon_wake: (Mutex<bool>, Condvar),
}

/// Where the next budgeted merge pass starts.
struct Cursor {
    /// An index in the current layout's chunks (moved by `refresh_regions` to the same
    /// chunk in the new layout).
    chunk: usize,
}

impl<M: PageMemory + 'static> Shared<M> {
    /// The current layout.
    pub(crate) fn layout(&self) -> Arc<Layout<M>> {
        self.layout
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What a work thread needs to run a chunk of a pass over `layout`.
    pub(crate) fn ctx<'a>(
        &'a self,
        worker: &'a stats::WorkerCounters,
        layout: &'a Layout<M>,
    ) -> Ctx<'a, M> {
        Ctx {
            memory: &self.memory,
            canons: &layout.canons,
            counters: &self.counters,
            worker,
            hook: self.hook.as_deref(),
            zero: &self.zero,
            stable_periods: self.config.stable_periods.max(1),
            max_backoff: self.config.max_backoff,
            gates: &self.gates,
            gate: None,
            claims: &self.claims,
            on_event: self.config.on_event.as_ref(),
            uniques: &self.uniques,
            unchanged_first: self.config.unchanged_before_protect,
            alone: self.config.work_threads.max(1) == 1,
            in_place: self.config.unique_in_place,
            chunks: &layout.chunks,
            first_chunk: &layout.first_chunk,
        }
    }
}

/// A running deduplication engine over a [`PageMemory`]. Dropping it stops its threads
/// (the daemon and the work threads).
#[must_use = "dropping the engine stops its threads"]
pub struct PageOne<M: PageMemory + 'static> {
    shared: Arc<Shared<M>>,
    pool: Pool<M>,
    daemon: Mutex<Option<JoinHandle<()>>>,
}

impl<M: PageMemory + 'static> std::fmt::Debug for PageOne<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageOne")
            .field("config", &self.shared.config)
            .field("chunks", &self.shared.layout().chunks.len())
            .field("hook", &self.shared.hook.is_some())
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl<M: PageMemory + 'static> PageOne<M> {
    /// An engine over `memory`'s current regions, with its work threads started. The
    /// periodic daemon starts with [`start`](Self::start); passes can also be run by hand.
    ///
    /// # Errors
    /// If a work thread cannot be spawned (the threads already started are stopped).
    pub fn new(memory: Arc<M>, config: Config) -> std::io::Result<Self> {
        Self::build(memory, config, None)
    }

    /// Like [`new`](Self::new), with a hook that sees volatile pages first.
    ///
    /// # Errors
    /// If a work thread cannot be spawned (the threads already started are stopped).
    pub fn with_hook(
        memory: Arc<M>,
        config: Config,
        hook: Arc<dyn ScanHook<M>>,
    ) -> std::io::Result<Self> {
        Self::build(memory, config, Some(hook))
    }

    fn build(
        memory: Arc<M>,
        config: Config,
        hook: Option<Arc<dyn ScanHook<M>>>,
    ) -> std::io::Result<Self> {
        let threads = config.work_threads.max(1);
        let regions = memory.regions();
        let domains: Vec<DomainId> = regions.iter().map(|r| r.domain).collect();
        let canons = Canons::new(&domains, &config.joined_domains, config.max_page_sharing);
        let layout = Layout::initial(&regions, canons, threads);
        let zero = memory.zero_frame();
        let shared = Arc::new(Shared {
            memory,
            layout: RwLock::new(Arc::new(layout)),
            uniques: Uniques::with_mask(config.print_mask()),
            counters: Counters::default(),
            knobs: Knobs::new(&config),
            hook,
            zero,
            gates: Gates::new(),
            claims: Claims::new(),
            pass_tally: Mutex::new(Tally::default()),
            pass_lock: Mutex::new(Cursor { chunk: 0 }),
            daemon_wake: (Mutex::new(false), Condvar::new()),
            config,
        });
        let pool = Pool::start(shared.clone(), threads)?;
        Ok(PageOne {
            shared,
            pool,
            daemon: Mutex::new(None),
        })
    }

    /// The memory the engine works on.
    pub fn memory(&self) -> &Arc<M> {
        &self.shared.memory
    }

    /// Reads the memory's regions again ([`PageMemory::regions`]) and takes on the
    /// regions added since (their pages start volatile, like every page of a new engine,
    /// and merge with the pages of every other region of their trust-domain group over
    /// the next passes) and lets go of the regions that are gone. A region whose id is
    /// listed again with another size or trust domain is let go and taken on afresh.
    /// Waits for a running pass to end, and no pass runs while it works; the daemon
    /// ([`start`](Self::start)) goes on afterwards with the new regions. Call it whenever
    /// the embedder adds or removes guest memory (a VM started or stopped, memory
    /// hot-plugged). An engine never refreshed works on the regions it was made with.
    /// Not to be called from a [`ScanHook`] or [`Config::on_event`] (they run inside a
    /// pass, which it would wait for).
    ///
    /// Letting go of a region drops every state the engine holds for its pages as if each
    /// had been written, without asking the memory about them (they are gone): a merged or
    /// canonical page releases its reference on its canonical page, which leaves the tree
    /// with its last sharer (a canonical page whose own page is gone stays valid: the
    /// engine holds its frame, and the other pages merged with it stay merged); a unique
    /// page leaves the index; a zero page is no longer counted. [`Stats`] are exact
    /// afterwards. A new trust domain gets a tree of its own (unless
    /// [`Config::joined_domains`] joined it), so it never merges with other domains' pages.
    ///
    /// A region that vanishes from the memory without a refresh is no danger either: its
    /// pages' operations fail, so each goes volatile once and is then retried only after
    /// its back-off (each failure counted in [`Stats::refused_errors`]) until a refresh
    /// lets it go.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use page_memory::sim::SimMemory;
    /// use page_memory::{DomainId, PageId};
    /// use pageone::{Config, PageOne};
    ///
    /// let mem = Arc::new(SimMemory::new());
    /// let fill = |vm, pages| {
    ///     for i in 0..pages {
    ///         mem.write(PageId::new(vm, i), 0, &[7; 4096]).unwrap();
    ///     }
    /// };
    /// let first = mem.add_region(8, DomainId(0));
    /// fill(first, 8);
    /// let engine = PageOne::new(mem.clone(), Config::default().work_threads(1))?;
    /// // A VM starts: its memory is taken on at the next refresh.
    /// let second = mem.add_region(8, DomainId(0));
    /// fill(second, 8);
    /// assert_eq!(engine.refresh_regions().added, [second]);
    /// while !engine.merge_pass().quiet() {}
    /// assert_eq!(engine.stats().pages_sharing, 15); // 16 pages, one frame
    /// // The first VM stops: its pages let go of the frame they shared.
    /// mem.remove_region(first).unwrap();
    /// assert_eq!(engine.refresh_regions().removed, [first]);
    /// assert_eq!(engine.stats().pages_sharing, 7);
    /// assert!(engine.merge_pass().quiet());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn refresh_regions(&self) -> RegionChange {
        let s = &self.shared;
        let mut cursor = s.pass_lock.lock().unwrap_or_else(|e| e.into_inner());
        let regions = s.memory.regions();
        let old = s.layout();
        let threads = s.config.work_threads.max(1);
        let Refreshed {
            next,
            change,
            retired,
            moved,
        } = old.refreshed(&regions, threads);
        if change.is_empty() && Arc::ptr_eq(&next.canons, &old.canons) {
            return change;
        }
        for chunk in &retired {
            chunk.retire(&old.canons, &s.uniques, &s.counters);
        }
        // The gates of budgets no region spends any more (a VMM process gone) go.
        let budgets: Vec<u64> = regions
            .iter()
            .map(|r| s.memory.mapping_budget(r.id))
            .collect();
        s.gates.retain(&budgets);
        // The budgeted pass's cursor: the same chunk, or the next one that survives.
        let at = cursor.chunk.min(moved.len());
        cursor.chunk = moved[at..].iter().find_map(|&m| m).unwrap_or(0);
        *s.layout.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        drop(cursor);
        // Canonical pages the retired pages took out of the trees: freed once no thread
        // can still read them.
        sdtree::epoch::pin().flush();
        change
    }

    /// Starts the periodic daemon (no-op if running).
    ///
    /// # Errors
    /// If the daemon thread cannot be spawned (the engine stays stopped; passes can still
    /// be run by hand).
    pub fn start(&self) -> std::io::Result<()> {
        let mut daemon = self.daemon.lock().unwrap_or_else(|e| e.into_inner());
        if daemon.is_some() {
            return Ok(());
        }
        self.shared.knobs.run.store(true, Ordering::Relaxed);
        *self
            .shared
            .daemon_wake
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = false;
        let shared = self.shared.clone();
        let pool = self.pool.handle();
        match std::thread::Builder::new()
            .name("pageone-daemon".into())
            .spawn(move || daemon_loop(&shared, &pool))
        {
            Ok(handle) => {
                *daemon = Some(handle);
                Ok(())
            }
            Err(e) => {
                self.shared.knobs.run.store(false, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Stops the daemon after its current pass (merged pages stay merged).
    pub fn stop(&self) {
        self.shared.knobs.run.store(false, Ordering::Relaxed);
        {
            let (lock, cv) = &self.shared.daemon_wake;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let handle = self.daemon.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Whether the daemon is running.
    pub fn is_running(&self) -> bool {
        self.shared.knobs.run.load(Ordering::Relaxed)
    }

    /// Runs one merge pass now, on the work threads, and waits for it.
    pub fn merge_pass(&self) -> PassReport {
        run_pass(&self.shared, &self.pool.handle(), PassKind::Merge)
    }

    /// Runs one base pass now (notice writes, offer volatile pages to the hook).
    pub fn base_pass(&self) -> PassReport {
        run_pass(&self.shared, &self.pool.handle(), PassKind::Base)
    }

    /// Stops the daemon and gives every merged page a private copy of its contents again.
    pub fn unmerge_all(&self) -> PassReport {
        self.stop();
        run_pass(&self.shared, &self.pool.handle(), PassKind::Unmerge)
    }

    /// Frees the canonical pages the engine has retired (taken out of its trees) as soon
    /// as no thread can still read them. The work threads do this after every chunk; call
    /// it to get memory back promptly after [`unmerge_all`](Self::unmerge_all).
    pub fn collect_garbage(&self) {
        for _ in 0..4 {
            sdtree::epoch::pin().flush();
        }
    }

    /// Sets the merge period (takes effect at the daemon's next tick).
    pub fn set_merge_period(&self, period: Duration) {
        let k = &self.shared.knobs;
        k.merge_period_ns
            .store(period.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Sets the base period (takes effect at the daemon's next tick).
    pub fn set_base_period(&self, period: Duration) {
        let k = &self.shared.knobs;
        k.base_period_ns
            .store(period.as_nanos().max(1) as u64, Ordering::Relaxed);
    }

    /// Sets the CPU budget: the most pages one merge pass examines (`None`: all).
    pub fn set_pages_per_pass(&self, pages: Option<u64>) {
        self.shared
            .knobs
            .pages_per_pass
            .store(pages.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether the memory is quiet: the last merge pass over every chunk changed nothing,
    /// was refused nothing and left nothing waiting (see [`PassReport::quiet`]). It works
    /// with a budget too (`pages_per_pass`): each chunk counts as of its own last merge
    /// pass. False before every chunk had a merge pass, and after a base pass saw a write.
    pub fn is_quiet(&self) -> bool {
        self.shared
            .layout()
            .chunks
            .iter()
            .all(|c| c.quiet.load(Ordering::Relaxed))
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        let c = &s.counters;
        let layout = s.layout();
        let (mut volatile, mut watched, mut parked, mut pages) = (0u64, 0u64, 0u64, 0u64);
        for ch in &layout.chunks {
            let (v, w, p) = ch.gauges();
            volatile += v as u64;
            watched += w as u64;
            parked += p as u64;
            pages += ch.len() as u64;
        }
        let canonical_indexed = layout.canons.indexed() as u64;
        let per_page = page::entry_bytes::<M::Frame>();
        // Per canonical page: its record (behind an Arc: two counters), the tree's map
        // entry (key + value), one tree node, and its entry in the table by print.
        let per_canon = std::mem::size_of::<Canon<M::Frame>>()
            + 2 * std::mem::size_of::<usize>()
            + std::mem::size_of::<(canon::FrameKey<M::Frame>, Arc<Canon<M::Frame>>)>()
            + sdtree::NODE_BYTES
            + canon::print_entry_bytes::<M::Frame>();
        let canon_records = get(&c.pages_shared) + get(&c.pages_unshared);
        let metadata_bytes = pages * per_page as u64
            + canon_records * per_canon as u64
            + get(&c.pages_unique) * Uniques::entry_bytes() as u64;
        let mut stats = Stats {
            pages_scanned: 0,
            pages_shared: get(&c.pages_shared),
            pages_sharing: get(&c.pages_sharing),
            pages_unshared: get(&c.pages_unshared) + get(&c.pages_unique),
            pages_unique: get(&c.pages_unique),
            pages_volatile: volatile,
            pages_watched: watched,
            full_scans: c.full_scans.load(Ordering::Relaxed),
            zero_pages: get(&c.zero_pages),
            merges: c.merges.load(Ordering::Relaxed),
            merge_races: c.merge_races.load(Ordering::Relaxed),
            cow_breaks: c.cow_breaks.load(Ordering::Relaxed),
            recycled: c.recycled.load(Ordering::Relaxed),
            canonicalized: c.canonicalized.load(Ordering::Relaxed),
            pages_read: c.pages_read.load(Ordering::Relaxed),
            insert_races: c.insert_races.load(Ordering::Relaxed),
            claim_deferrals: c.claim_deferrals.load(Ordering::Relaxed),
            refused_map_count: c.refused_map_count.load(Ordering::Relaxed),
            refused_pinned: c.refused_pinned.load(Ordering::Relaxed),
            refused_errors: c.refused_errors.load(Ordering::Relaxed),
            map_count_parked: parked,
            map_count_events: c.map_count_events.load(Ordering::Relaxed),
            map_count_limit: c.map_count_limit.load(Ordering::Relaxed),
            map_count_mappings: c.map_count_mappings.load(Ordering::Relaxed),
            canonical_indexed,
            metadata_bytes_per_page: per_page,
            metadata_bytes,
            general_profit: 0,
            workers: self.pool.worker_stats(),
        };
        stats.pages_scanned = stats.workers.iter().map(|w| w.pages_scanned).sum();
        stats.general_profit = stats.bytes_saved() as i64 - metadata_bytes as i64;
        stats
    }
}

impl<M: PageMemory + 'static> Drop for PageOne<M> {
    fn drop(&mut self) {
        self.stop();
        self.pool.shutdown();
    }
}

/// Runs one pass of `kind` over the scheduled chunks and waits for it.
fn run_pass<M: PageMemory + 'static>(
    shared: &Arc<Shared<M>>,
    pool: &pool::PoolHandle<M>,
    kind: PassKind,
) -> PassReport {
    let start = Instant::now();
    let mut cursor = shared.pass_lock.lock().unwrap_or_else(|e| e.into_inner());
    // The pass's layout: `refresh_regions` replaces it only under the pass lock.
    let layout = shared.layout();
    let n = layout.chunks.len();
    let budget = Knobs::get(&shared.knobs.pages_per_pass);
    let mut chosen = Vec::new();
    let mut pages = 0u64;
    let mut full_scan = false;
    if kind != PassKind::Merge || budget == u64::MAX {
        chosen.extend(0..n);
        pages = layout.chunks.iter().map(|c| c.len() as u64).sum();
        full_scan = kind == PassKind::Merge;
    } else {
        let mut i = cursor.chunk.min(n);
        while pages < budget.max(1) && chosen.len() < n {
            if i == n {
                i = 0;
            }
            chosen.push(i);
            pages += layout.chunks[i].len() as u64;
            i += 1;
            if i == n {
                full_scan = true;
            }
        }
        cursor.chunk = i % n.max(1);
    }
    if kind == PassKind::Merge {
        for gate in shared.gates.all() {
            gate.start_pass(&*shared.memory, shared.config.unique_in_place);
        }
    }
    *shared.pass_tally.lock().unwrap_or_else(|e| e.into_inner()) = Tally::default();
    pool.run(kind, &layout, &chosen);
    if kind == PassKind::Merge {
        // Unique pages (of chunks already done) whose twins this pass made canonical merge
        // in this pass too. Merging one can flag another only in rare races: a few rounds.
        for _ in 0..4 {
            let flagged: Vec<usize> = (0..n).filter(|&i| layout.chunks[i].has_twins()).collect();
            if flagged.is_empty() {
                break;
            }
            pool.run(PassKind::Twins, &layout, &flagged);
        }
    }
    let tally = *shared.pass_tally.lock().unwrap_or_else(|e| e.into_inner());
    if kind == PassKind::Merge {
        for gate in shared.gates.all() {
            gate.end_pass();
        }
    }
    if full_scan {
        shared.counters.full_scans.fetch_add(1, Ordering::Relaxed);
    }
    let mut report = PassReport {
        pages,
        full_scan,
        every_page: kind == PassKind::Merge && chosen.len() == n,
        elapsed: start.elapsed(),
        ..PassReport::default()
    };
    report.set_tally(&tally);
    report
}

fn daemon_loop<M: PageMemory + 'static>(shared: &Arc<Shared<M>>, pool: &pool::PoolHandle<M>) {
    let mut last_merge = Instant::now();
    let (lock, cv) = &shared.daemon_wake;
    loop {
        let base = Duration::from_nanos(Knobs::get(&shared.knobs.base_period_ns));
        {
            let stop = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (stop, _) = cv
                .wait_timeout_while(stop, base, |stop| !*stop)
                .unwrap_or_else(|e| e.into_inner());
            if *stop || !shared.knobs.run.load(Ordering::Relaxed) {
                return;
            }
        }
        let merge = Duration::from_nanos(Knobs::get(&shared.knobs.merge_period_ns));
        if last_merge.elapsed() + base / 2 >= merge {
            last_merge = Instant::now();
            run_pass(shared, pool, PassKind::Merge);
        } else if shared.hook.is_some() {
            run_pass(shared, pool, PassKind::Base);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use page_memory::sim::SimMemory;

    fn region(id: u32, pages: u32, domain: u32) -> RegionInfo {
        RegionInfo {
            id: RegionId(id),
            pages,
            domain: DomainId(domain),
        }
    }

    fn layout(regions: &[RegionInfo], threads: usize) -> Layout<SimMemory> {
        let domains: Vec<DomainId> = regions.iter().map(|r| r.domain).collect();
        Layout::initial(regions, Canons::new(&domains, &[], 256), threads)
    }

    #[test]
    fn a_region_listed_again_with_another_size_or_domain_is_removed_and_added() {
        let old = layout(
            &[region(0, 1024, 0), region(1, 600, 0), region(2, 10, 0)],
            2,
        );
        assert_eq!(old.chunks.len(), 2 + 2 + 1);
        assert_eq!(old.home, [0, 0, 1, 1, 0]);
        // Region 0 unchanged, 1 grew, 2 moved to another domain, 3 is new.
        let now = [
            region(3, 100, 0),
            region(2, 10, 1),
            region(0, 1024, 0),
            region(1, 700, 0),
        ];
        let Refreshed {
            next,
            change,
            retired,
            moved,
        } = old.refreshed(&now, 2);
        assert_eq!(change.removed, [RegionId(1), RegionId(2)]);
        assert_eq!(change.added, [RegionId(3), RegionId(2), RegionId(1)]);
        assert_eq!(retired.len(), 3);
        // Region 0's chunks are kept, the same ones, first; the others follow.
        assert_eq!(moved, [Some(0), Some(1), None, None, None]);
        assert!(Arc::ptr_eq(&next.chunks[0], &old.chunks[0]));
        assert_eq!(next.chunks.len(), 2 + 1 + 1 + 2);
        assert_eq!(next.first_chunk[&RegionId(3)], 2);
        assert_eq!(next.first_chunk[&RegionId(2)], 3);
        assert_eq!(next.first_chunk[&RegionId(1)], 4);
        assert_eq!(next.chunks[3].domain, DomainId(1));
        // Homes: thread 1 had none of the kept pages, so it gets the first new region;
        // then the thread with the fewest pages each time.
        assert_eq!(next.home, [0, 0, 1, 1, 1, 1]);
        // Domain 1 is new: a tree of its own.
        assert!(!Arc::ptr_eq(&next.canons, &old.canons));
        assert_ne!(
            next.canons.group(DomainId(1)),
            next.canons.group(DomainId(0))
        );
        // Listing the same regions again changes nothing.
        let again = next.refreshed(&now, 2);
        assert!(again.change.is_empty() && again.retired.is_empty());
        assert!(Arc::ptr_eq(&again.next.canons, &next.canons));
        assert_eq!(again.next.home, next.home);
    }
}

// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
