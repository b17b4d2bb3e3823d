//! The Per Page Recycler's host side: it finds the pages a guest freed, proves they are
//! free with the PIP protocol ([`pip`]), and recycles them (the guest then reads zeros).
//!
//! For each scanned page the [`Recycler`] reads the page's first two words (the mark). A
//! page whose first word is not its pool's secret indicator costs one read and nothing
//! else. A marked page is validated against the pool (frame in range, pool id, slot index
//! in range, slot holding exactly this page's frame), its slot is claimed with a CAS, and
//! only then is the page recycled through [`PageMemory::recycle`]; if the recycle fails the
//! claim is restored, so the guest is never left waiting. Nothing read from guest memory
//! is trusted: every bad value is counted by reason ([`Stats::invalid`]) and skipped,
//! never a panic, an out-of-bounds access, or a recycle of a page whose slot does not
//! name it.
//!
//! It runs two ways:
//! - **inside a deduplication engine's scan** ([`page_memory::ScanHook`], which PageONE
//!   takes in `PageOne::with_hook`): every pass offers each volatile page to the recycler
//!   first, so a page found marked is recycled instead of being deduplicated, with one
//!   daemon and shared work threads;
//! - **standalone** ([`Recycler::scan_pass`], [`RecyclerThread`]) with its own reclaim
//!   period.
//!
//! This crate depends only on the protocol ([`pip`]) and the memory contract
//! ([`page_memory`]). Feature `test-util` adds `SimGuestPage`, a guest page over the
//! simulated memory for tests, simulations and benchmarks (the example below uses it).
//!
//! ```
//! use std::sync::Arc;
//! use page_memory::sim::SimMemory;
//! use page_memory::{DomainId, PageMemory};
//! use pip::PoolStorage;
//! use ppr_guest::{GuestPage, Hooks, PageAllocator};
//! use ppr_host::{Recycler, SimGuestPage};
//!
//! let mem = Arc::new(SimMemory::new());
//! let region = mem.add_region(16, DomainId(0));
//! let info = mem.regions()[0];
//! // The guest sets up its pool; the host registers it for this region's frames.
//! let pool = Arc::new(PoolStorage::<1, 64>::new());
//! let view = pool.init().unwrap();
//! let mut recycler = Recycler::new();
//! recycler.register(pool.clone(), 7, 0x5eed_f00d_dead_beef, info, 1).unwrap();
//! // The guest's allocator over its 16 pages (frames 1..=16) starts with every page
//! // free (and offered); it uses one page and frees it again.
//! let pages = SimGuestPage::region(&mem, region, 16);
//! let mut alloc = PageAllocator::new(Hooks::attach(view).unwrap(), &pages, 1);
//! let (frame, page) = alloc.alloc(0).unwrap();
//! page.fill(42);
//! assert!(!mem.is_zero_mapped(page.id()).unwrap()); // it uses memory now
//! alloc.free(0, frame).unwrap();
//! // One pass recycles every free page: the used one is the zero page again.
//! recycler.scan_pass(&*mem);
//! assert_eq!(recycler.stats().recycled, 16);
//! assert!(mem.is_zero_mapped(page.id()).unwrap());
//! assert_eq!(mem.accounting().frames, 0);
//! ```

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "test-util")]
mod guest_page;
mod thread;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use page_memory::{PageId, PageMemory, RegionId, RegionInfo, ScanHook, PAGE_SIZE};
use pip::{HostPool, Invalid, Mark, PoolStorage, PoolView, RegisterError, Reject, Release};

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use crate::guest_page::SimGuestPage;
pub use crate::thread::RecyclerThread;

/// Memory holding a PIP pool, shared with the guest.
///
/// In a VMM this is guest RAM the guest reserved for its pool (build the view with
/// [`PoolView::from_raw`]); in tests and simulations a [`PoolStorage`].
pub trait PoolMemory: Send + Sync {
    /// The pool, validated; `None` if its header does not describe a valid layout (a
    /// hostile or broken guest).
    fn view(&self) -> Option<PoolView<'_>>;
}

impl<const SHARDS: usize, const SLOTS: usize> PoolMemory for PoolStorage<SHARDS, SLOTS> {
    fn view(&self) -> Option<PoolView<'_>> {
        PoolStorage::view(self).ok()
    }
}

/// One registered pool: the guest's pool memory and the host's private facts about it.
struct Pool {
    memory: Arc<dyn PoolMemory>,
    pool_id: u32,
    indicator: u64,
    region: RegionInfo,
    /// Guest frame number of the region's page 0.
    first_frame: u64,
}

impl Pool {
    fn frame_limit(&self) -> u64 {
        self.first_frame + self.region.pages as u64
    }
}

/// What the recycler did, all time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Pages whose mark was read.
    pub pages_scanned: u64,
    /// Pages whose first word carried a pool's indicator.
    pub marks_seen: u64,
    /// Pages recycled (the guest now reads zeros).
    pub recycled: u64,
    /// Marks rejected, by [`Invalid`] reason ([`Invalid::index`] order).
    pub invalid: [u64; Invalid::COUNT],
    /// Marked pages whose pool header no longer describes a valid layout.
    pub invalid_pool: u64,
    /// Claims lost to the guest (it took the page back first).
    pub claims_lost: u64,
    /// Claims restored because the recycle failed.
    pub recycle_failures: u64,
    /// Claims whose slot the guest had changed while claimed (counted; the slot is still
    /// released).
    pub tampered: u64,
    /// Bytes returned to the host.
    pub bytes_returned: u64,
    /// Wall time of the last complete standalone pass: a freed page waits at most one
    /// reclaim period plus this.
    pub scan_lag: Duration,
    /// Standalone passes completed ([`Recycler::scan_pass`], [`RecyclerThread`]). A page
    /// offered before a pass starts is recycled by the end of it, so once this has grown
    /// by two since a page was offered, the page is back.
    pub passes: u64,
}

impl Stats {
    /// Marks rejected, all reasons together.
    pub fn invalid_marks(&self) -> u64 {
        self.invalid.iter().sum::<u64>() + self.invalid_pool
    }
}

#[derive(Default)]
struct Counters {
    pages_scanned: AtomicU64,
    marks_seen: AtomicU64,
    recycled: AtomicU64,
    invalid: [AtomicU64; Invalid::COUNT],
    invalid_pool: AtomicU64,
    claims_lost: AtomicU64,
    recycle_failures: AtomicU64,
    tampered: AtomicU64,
    scan_lag_ns: AtomicU64,
    passes: AtomicU64,
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Why [`Recycler::register`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisterPoolError {
    /// The pool's header does not describe a valid layout.
    Layout,
    /// The pool refused registration (see [`RegisterError`]).
    Pool(RegisterError),
    /// Another pool already covers this region.
    RegionTaken,
    /// The frame range overflows.
    Frames,
}

impl std::fmt::Display for RegisterPoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterPoolError::Layout => write!(f, "the pool's header is not a valid layout"),
            RegisterPoolError::Pool(e) => write!(f, "the pool refused registration: {e}"),
            RegisterPoolError::RegionTaken => write!(f, "another pool covers this region"),
            RegisterPoolError::Frames => write!(f, "the region's frame numbers overflow"),
        }
    }
}

impl std::error::Error for RegisterPoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegisterPoolError::Pool(e) => Some(e),
            _ => None,
        }
    }
}

/// The host side of the Per Page Recycler: pools, and the scan of pages for marks.
#[derive(Default)]
pub struct Recycler {
    pools: Vec<Pool>,
    counters: Counters,
    /// Serializes standalone passes.
    pass: Mutex<()>,
}

impl std::fmt::Debug for Recycler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pools' ids, indicators and frames are the host's secrets: not printed.
        f.debug_struct("Recycler")
            .field("pools", &self.pools.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Recycler {
    /// A recycler with no pools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the guest's pool for `region`, whose page `i` is guest frame
    /// `first_frame + i`, with the pool id and secret indicator the host chose and told
    /// the guest. The pool's header moves to `REGISTERED`, which lets the guest attach.
    pub fn register(
        &mut self,
        memory: Arc<dyn PoolMemory>,
        pool_id: u32,
        indicator: u64,
        region: RegionInfo,
        first_frame: u64,
    ) -> Result<(), RegisterPoolError> {
        if self.pools.iter().any(|p| p.region.id == region.id) {
            return Err(RegisterPoolError::RegionTaken);
        }
        let limit = first_frame
            .checked_add(region.pages as u64)
            .filter(|&l| l <= pip::MAX_FRAME + 1 && first_frame > 0)
            .ok_or(RegisterPoolError::Frames)?;
        {
            let view = memory.view().ok_or(RegisterPoolError::Layout)?;
            HostPool::register(view, pool_id, indicator, limit).map_err(RegisterPoolError::Pool)?;
        }
        self.pools.push(Pool {
            memory,
            pool_id,
            indicator,
            region,
            first_frame,
        });
        Ok(())
    }

    /// Drops the pool registered for `region` (its region went away): the recycler
    /// lets go of the pool's memory and never touches it again. Returns whether there
    /// was one.
    pub fn unregister(&mut self, region: RegionId) -> bool {
        let before = self.pools.len();
        self.pools.retain(|p| p.region.id != region);
        self.pools.len() != before
    }

    /// The regions that have a pool, in registration order.
    pub fn pooled_regions(&self) -> Vec<RegionId> {
        self.pools.iter().map(|p| p.region.id).collect()
    }

    fn pool_for(&self, page: PageId) -> Option<&Pool> {
        self.pools
            .iter()
            .find(|p| p.region.id == page.region && page.index < p.region.pages)
    }

    /// Looks at one page: recycles it if its mark proves the guest freed it. Returns
    /// whether it was recycled.
    pub fn examine<M: PageMemory + ?Sized>(&self, memory: &M, page: PageId) -> bool {
        let Some(pool) = self.pool_for(page) else {
            return false;
        };
        let c = &self.counters;
        let mut words = [0u64; pip::MARK_WORDS];
        if memory.read_words(page, &mut words).is_err() {
            return false;
        }
        bump(&c.pages_scanned);
        // Little-endian words (pip's layout), as read natively on little-endian hosts.
        let mark = Mark {
            indicator: u64::from_le(words[pip::INDICATOR]),
            location: u64::from_le(words[pip::LOCATION]),
        };
        if mark.indicator != pool.indicator {
            return false;
        }
        bump(&c.marks_seen);
        let Some(view) = pool.memory.view() else {
            bump(&c.invalid_pool);
            return false;
        };
        let host = HostPool::new(view, pool.pool_id, pool.indicator, pool.frame_limit());
        let frame = pool.first_frame + page.index as u64;
        let offer = match host.validate_mark(frame, mark) {
            Ok(offer) => offer,
            Err(Reject::NotMarked) => return false,
            Err(Reject::Invalid(why)) => {
                bump(&c.invalid[why.index()]);
                return false;
            }
        };
        // The claim decides the page's fate; from here the guest cannot take it back.
        let Ok(claim) = host.claim(offer) else {
            bump(&c.claims_lost);
            return false;
        };
        let recycled = matches!(memory.recycle(&[page]).pop(), Some(Ok(())));
        let release = if recycled {
            bump(&c.recycled);
            claim.complete()
        } else {
            bump(&c.recycle_failures);
            claim.restore()
        };
        if release == Release::Tampered {
            bump(&c.tampered);
        }
        recycled
    }

    /// One standalone pass over every page of every registered region; returns the pages
    /// it recycled.
    pub fn scan_pass<M: PageMemory + ?Sized>(&self, memory: &M) -> u64 {
        let _one_at_a_time = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let mut recycled = 0;
        for pool in &self.pools {
            for i in 0..pool.region.pages {
                if self.examine(memory, PageId::new(pool.region.id, i)) {
                    recycled += 1;
                }
            }
        }
        self.counters
            .scan_lag_ns
            .store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        bump(&self.counters.passes);
        recycled
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let recycled = get(&c.recycled);
        Stats {
            pages_scanned: get(&c.pages_scanned),
            marks_seen: get(&c.marks_seen),
            recycled,
            invalid: std::array::from_fn(|i| get(&c.invalid[i])),
            invalid_pool: get(&c.invalid_pool),
            claims_lost: get(&c.claims_lost),
            recycle_failures: get(&c.recycle_failures),
            tampered: get(&c.tampered),
            bytes_returned: recycled * PAGE_SIZE as u64,
            scan_lag: Duration::from_nanos(get(&c.scan_lag_ns)),
            passes: get(&c.passes),
        }
    }
}

impl<M: PageMemory + ?Sized> ScanHook<M> for Recycler {
    fn examine(&self, memory: &M, page: PageId) -> bool {
        Recycler::examine(self, memory, page)
    }
}

// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
