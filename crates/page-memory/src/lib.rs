//! The page-memory contract the engines run over, and an in-process simulated memory.
//!
//! PageONE (deduplication) and the Per Page Recycler never touch guest RAM directly: they
//! call a [`PageMemory`]. Two backends implement it: [`sim::SimMemory`], an in-process
//! memory of refcounted 4 KiB frames with real copy-on-write (tests, benchmarks, no
//! privileges), and `linux::LinuxMemory` (feature `linux`), over a VM's anonymous memory
//! in this process (userfaultfd write-protect, a memfd canonical store, `MADV_DONTNEED`).
//!
//! # The contract
//! - **Regions.** Guest memory is a set of regions ([`RegionInfo`]) of 4 KiB pages, each
//!   with a trust domain ([`DomainId`]). Pages are named by [`PageId`] (region, index).
//! - **Protection and tokens.** [`PageMemory::protect`] write-protects pages and returns a
//!   [`ProtectToken`] per page. A guest write to a protected page is never lost and never
//!   blocked for long: it lands in a private copy of the page (copy-on-write), and the
//!   page's token becomes stale. [`PageMemory::written_since`] tells whether that
//!   happened. Tokens are the engines' only way to know a page stayed unchanged.
//! - **Canonical frames.** [`PageMemory::canonicalize`] turns a protected, unchanged page
//!   into an immutable [`PageMemory::Frame`]: bytes that never change while any clone of
//!   the frame lives, so a search tree can read them in place. The page stays protected
//!   and keeps those contents.
//! - **Merging.** [`PageMemory::merge`] makes a duplicate page share a canonical frame. It
//!   happens only if the duplicate is still protected under its token *and* compares
//!   equal to the frame, both checked atomically with the switch; otherwise it reports
//!   why and changes nothing. A merged page is read-only; its next write breaks the
//!   sharing into a private copy.
//! - **Batches.** [`PageMemory::canonicalize_batch`] and [`PageMemory::merge_batch`] do
//!   the same as one call per page, in order (their default implementations are those
//!   calls); a backend may do runs of pages at once, and an engine should use them.
//! - **Recycling.** [`PageMemory::recycle`] makes pages read as zeros (their old contents
//!   are dropped): the Per Page Recycler's end of a freed page.
//! - **Unmerging.** [`PageMemory::unmerge`] gives a page a private, writable copy of its
//!   contents again.
//! - **Dirty hook.** Every page a backend changes on the engine's behalf (merge, recycle,
//!   unmerge, canonicalize where it remaps) is reported to the [`DirtyHook`], so a VMM's
//!   live-migration bitmap stays correct.
//! - **Errors.** Nothing panics on a page that went away or a bad id: every operation
//!   returns a typed [`PageError`].
//!
//! # Scan hooks
//! [`ScanHook`] is how a deduplication engine (PageONE) lets another component look at
//! the pages it scans: the Per Page Recycler's host side implements it. It lives here, below
//! both, so neither depends on the other.
//!
//! # Features
//! - `linux`: the Linux backend (`linux::LinuxMemory`).
//! - `vm-memory`: the vm-memory adapter (`vmm`).
//! - `test-util`: inspection helpers of [`sim::SimMemory`] that only tests need
//!   (`is_protected`, `shares_frame`, `is_zero_mapped`).

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::fmt;
use std::sync::Arc;

#[cfg(feature = "linux")]
#[cfg_attr(docsrs, doc(cfg(feature = "linux")))]
pub mod linux;
pub mod sim;
#[cfg(feature = "vm-memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
pub mod vmm;

/// Bytes in a page.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words in a page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;

/// A region of guest memory (one VM's RAM, or one slot of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u32);

/// A trust domain. Pages of different domains are never merged unless the embedder joins
/// the domains (see the engines' configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DomainId(pub u32);

/// A page: a region and the page's index in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageId {
    /// The region.
    pub region: RegionId,
    /// The page's index in the region.
    pub index: u32,
}

impl PageId {
    /// Page `index` of `region`.
    pub const fn new(region: RegionId, index: u32) -> Self {
        PageId { region, index }
    }
}

impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {} of region {}", self.index, self.region.0)
    }
}

/// What an engine needs to know of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region.
    pub id: RegionId,
    /// Its size in pages.
    pub pages: u32,
    /// Its trust domain.
    pub domain: DomainId,
}

/// Proof of a page's protection: valid until the page is next written or unprotected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProtectToken(pub u64);

/// Why a merge did not happen (the call itself succeeded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The page now shares the canonical frame.
    Merged,
    /// The page was written (or unprotected) since its token: nothing changed.
    Changed,
    /// The page's contents differ from the canonical frame: nothing changed.
    Differs,
}

/// Errors of page-memory operations.
///
/// More reasons may be added in later versions: match with a wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PageError {
    /// The region does not exist (or was removed).
    NoSuchRegion(RegionId),
    /// The page index is beyond the region's end.
    NoSuchPage(PageId),
    /// The page was written or unprotected since the token was issued.
    Stale(PageId),
    /// The backend cannot do this here; the string says what and why.
    Unsupported(&'static str),
    /// The region's memory is no longer mapped: its owner unmapped it while in use.
    Unmapped(RegionId),
    /// Merging stopped short of `vm.max_map_count`: the change could need mappings (VMAs)
    /// the process may not have. Raise the limit (`sysctl -w vm.max_map_count=N`).
    MapCountLimit {
        /// `vm.max_map_count`.
        limit: u64,
        /// The process's mappings at the last count.
        mappings: u64,
    },
    /// The page is, or may be, pinned (device DMA, an io_uring fixed buffer, vhost,
    /// RDMA): a write through the pin would bypass the page tables, so the backend does
    /// not protect, merge or recycle it. (The Linux backend refuses a page the embedder
    /// declared pinned, and every page while the process holds pins nobody declared.)
    Pinned(PageId),
    /// An operating-system call failed.
    Os {
        /// The operation that failed.
        op: &'static str,
        /// The OS error number.
        errno: i32,
    },
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageError::NoSuchRegion(r) => write!(f, "no region {}", r.0),
            PageError::NoSuchPage(p) => write!(f, "no {p}: index beyond the region's end"),
            PageError::Stale(p) => write!(f, "{p} was written or unprotected since its token"),
            PageError::Unsupported(what) => write!(f, "not supported by this backend: {what}"),
            PageError::Unmapped(r) => write!(
                f,
                "region {} is no longer mapped: its owner unmapped it while in use",
                r.0
            ),
            PageError::MapCountLimit { limit, mappings } => write!(
                f,
                "merging stopped short of vm.max_map_count ({limit}; the process has {mappings} \
                 mappings): raise it with `sysctl -w vm.max_map_count=N`"
            ),
            PageError::Pinned(p) => write!(
                f,
                "{p} is or may be pinned (DMA, io_uring fixed buffers): not protected, merged \
                 or recycled"
            ),
            PageError::Os { op, errno } => write!(
                f,
                "{op} failed: {} (OS error {errno})",
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for PageError {}

/// Called with every page a backend changes on an engine's behalf.
pub type DirtyHook = Arc<dyn Fn(PageId) + Send + Sync>;

/// Guest memory as the engines see it. See the crate docs for the contract.
pub trait PageMemory: Send + Sync {
    /// An immutable page of contents: canonical copies and the zero page. Its bytes never
    /// change while any clone of it lives.
    type Frame: AsRef<[u8]> + Clone + Send + Sync + 'static;

    /// The regions, with their sizes and trust domains.
    fn regions(&self) -> Vec<RegionInfo>;

    /// Copies `page`'s current contents into `buf`. A page written concurrently may be
    /// seen half-written; a protected page is seen exactly.
    fn read_page(&self, page: PageId, buf: &mut [u8; PAGE_SIZE]) -> Result<(), PageError>;

    /// [`read_page`](Self::read_page) of each of `pages` into the buffer of the same
    /// index in `out` (which must be at least as long); one result per page, in order,
    /// exactly as if `read_page` were called on each in turn (the default does that). A
    /// backend may read runs of consecutive pages at once: the Linux backend reads each run
    /// with one `process_vm_readv` and proves it is still the region's with one check
    /// before and one after, instead of per page. The buffer of a page that fails holds
    /// nothing of use.
    ///
    /// # Panics
    /// If `out` is shorter than `pages`.
    fn read_pages(
        &self,
        pages: &[PageId],
        out: &mut [[u8; PAGE_SIZE]],
    ) -> Vec<Result<(), PageError>> {
        assert!(
            out.len() >= pages.len(),
            "read_pages: fewer buffers than pages"
        );
        pages
            .iter()
            .zip(out.iter_mut())
            .map(|(&page, buf)| self.read_page(page, buf))
            .collect()
    }

    /// Reads `out.len()` 64-bit words (native endian) from the start of `page`, each word
    /// read atomically: what a scanner needs to look for a mark in a freed page.
    fn read_words(&self, page: PageId, out: &mut [u64]) -> Result<(), PageError>;

    /// Write-protects `pages`; one result per page, in order.
    fn protect(&self, pages: &[PageId]) -> Vec<Result<ProtectToken, PageError>>;

    /// Removes write protection from `pages` (their tokens become stale).
    fn unprotect(&self, pages: &[PageId]) -> Vec<Result<(), PageError>>;

    /// Whether `page` was written or unprotected since `token` was issued.
    fn written_since(&self, page: PageId, token: ProtectToken) -> Result<bool, PageError>;

    /// The contents of a protected, unchanged page as an immutable frame, which the page
    /// keeps mapping (still protected). [`PageError::Stale`] if written since `token`.
    fn canonicalize(&self, page: PageId, token: ProtectToken) -> Result<Self::Frame, PageError>;

    /// Makes `dup` share `canonical` if `dup` is still protected under `token` and equal
    /// to it, both checked atomically with the switch.
    fn merge(
        &self,
        dup: PageId,
        token: ProtectToken,
        canonical: &Self::Frame,
    ) -> Result<MergeOutcome, PageError>;

    /// [`canonicalize`](Self::canonicalize) of each `(page, token)`; one result per item,
    /// in order, exactly as if `canonicalize` were called on each in turn (the default
    /// does that). A backend may do runs of consecutive pages at once: the Linux backend
    /// copies and remaps each run with one system call of each kind.
    fn canonicalize_batch(
        &self,
        pages: &[(PageId, ProtectToken)],
    ) -> Vec<Result<Self::Frame, PageError>> {
        pages
            .iter()
            .map(|&(page, token)| self.canonicalize(page, token))
            .collect()
    }

    /// [`merge`](Self::merge) of each `(dup, token, canonical)`; one result per item, in
    /// order, exactly as if `merge` were called on each in turn (the default does that).
    /// A backend may do runs at once: the Linux backend maps a run of consecutive pages
    /// whose canonical frames lie at consecutive offsets of its store with one `mmap`.
    /// Callers get the most out of it by passing pages in address order.
    fn merge_batch(
        &self,
        items: &[(PageId, ProtectToken, &Self::Frame)],
    ) -> Vec<Result<MergeOutcome, PageError>> {
        items
            .iter()
            .map(|&(dup, token, canonical)| self.merge(dup, token, canonical))
            .collect()
    }

    /// The shared all-zero frame: merging a page with it makes the page a zero page.
    fn zero_frame(&self) -> Self::Frame;

    /// The limit on the mappings the backend's merges spend, read now (`vm.max_map_count`
    /// for the Linux backend), or `None` if the backend has none (the default). An engine
    /// that was refused with [`PageError::MapCountLimit`] reads it to learn that the limit
    /// was raised, and retries at once rather than after its back-off.
    fn mapping_limit(&self) -> Option<u64> {
        None
    }

    /// How many mappings count against [`mapping_limit`](Self::mapping_limit) now, as an
    /// upper bound, or `None` if the backend has no limit (the default). Cheap unless
    /// `recount` is set, which asks for an exact count (the Linux backend then reads
    /// `/proc/self/maps`, milliseconds for tens of thousands of mappings): an engine calls
    /// it cheaply per batch and recounts at most once per pass. An engine uses it to spend
    /// mappings carefully before the limit refuses it anything.
    fn mappings_in_use(&self, recount: bool) -> Option<u64> {
        let _ = recount;
        None
    }

    /// The mapping budget that merges of `region`'s pages spend. Regions with the same
    /// budget share one limit: the mappings of one process (`vm.max_map_count` is per
    /// process). The default puts every region in budget 0, the whole memory's
    /// ([`mapping_limit`](Self::mapping_limit)); a backend over the memory of several
    /// processes (the `pageoned` service's) gives each process a budget of its own, so an
    /// engine that one process refuses for its limit goes on merging the others' pages.
    fn mapping_budget(&self, region: RegionId) -> u64 {
        let _ = region;
        0
    }

    /// [`mapping_limit`](Self::mapping_limit) of one budget (see
    /// [`mapping_budget`](Self::mapping_budget)); the default is the whole memory's.
    fn budget_limit(&self, budget: u64) -> Option<u64> {
        let _ = budget;
        self.mapping_limit()
    }

    /// [`mappings_in_use`](Self::mappings_in_use) of one budget (see
    /// [`mapping_budget`](Self::mapping_budget)); the default is the whole memory's.
    fn budget_in_use(&self, budget: u64, recount: bool) -> Option<u64> {
        let _ = budget;
        self.mappings_in_use(recount)
    }

    /// Makes `pages` read as zeros, dropping their contents; one result per page.
    fn recycle(&self, pages: &[PageId]) -> Vec<Result<(), PageError>>;

    /// Gives `page` a private, writable copy of its contents (no-op if it has one).
    fn unmerge(&self, page: PageId) -> Result<(), PageError>;

    /// Installs (or, with `None`, removes) the hook told of every page the backend
    /// changes on the engine's behalf.
    fn set_dirty_hook(&self, hook: Option<DirtyHook>);
}

/// Something that looks at the pages an engine scans, before the engine does: the Per Page
/// Recycler's host side plugs into PageONE's passes here.
///
/// An engine calls [`examine_batch`](Self::examine_batch) (by default
/// [`examine`](Self::examine) per page) from its work threads, concurrently, for pages
/// that changed recently (volatile, unprotected); a page the hook takes is left alone for
/// the rest of that pass.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use page_memory::sim::SimMemory;
/// use page_memory::{DomainId, PageId, PageMemory, ScanHook};
///
/// /// Takes (recycles) every page whose first word is `0xdead`.
/// #[derive(Debug, Default)]
/// struct Reaper {
///     taken: AtomicU64,
/// }
///
/// impl<M: PageMemory> ScanHook<M> for Reaper {
///     fn examine(&self, memory: &M, page: PageId) -> bool {
///         let mut w = [0u64; 1];
///         if memory.read_words(page, &mut w).is_err() || w[0] != 0xdead {
///             return false;
///         }
///         let took = matches!(memory.recycle(&[page]).pop(), Some(Ok(())));
///         if took {
///             self.taken.fetch_add(1, Ordering::Relaxed);
///         }
///         took
///     }
/// }
///
/// let mem = SimMemory::new();
/// let r = mem.add_region(2, DomainId(0));
/// mem.write_word(PageId::new(r, 1), 0, 0xdead).unwrap();
/// let hook = Reaper::default();
/// assert!(!hook.examine(&mem, PageId::new(r, 0)));
/// assert!(hook.examine(&mem, PageId::new(r, 1)));
/// assert_eq!(mem.read_word(PageId::new(r, 1), 0).unwrap(), 0); // recycled: zeros
/// ```
pub trait ScanHook<M: PageMemory + ?Sized>: Send + Sync {
    /// Examines `page`, which is volatile (changed recently, unprotected). Returns `true`
    /// if the hook took the page (for instance recycled it), so the engine leaves it
    /// alone this pass.
    fn examine(&self, memory: &M, page: PageId) -> bool;

    /// Examines `pages` (volatile, of one region, in order) at once: sets `taken[i]` to
    /// what [`examine`](Self::examine) would return for `pages[i]`. An engine calls this
    /// once per batch of volatile pages; a hook whose pages live across a round trip (the
    /// `pageoned` service's, which asks each VMM's agent) answers a whole batch with one.
    /// The default calls [`examine`](Self::examine) for each page.
    ///
    /// `taken` has at least `pages.len()` entries; entries past them are left alone.
    fn examine_batch(&self, memory: &M, pages: &[PageId], taken: &mut [bool]) {
        for (&page, t) in pages.iter().zip(taken.iter_mut()) {
            *t = self.examine(memory, page);
        }
    }
}

/// Splits `pages` into runs of consecutive pages of one region (in order): what a
/// backend does at once where it batches ([`PageMemory::read_pages`] and the like).
///
/// ```
/// use page_memory::{consecutive_runs, PageId, RegionId};
///
/// let (a, b) = (RegionId(0), RegionId(1));
/// let pages = [PageId::new(a, 3), PageId::new(a, 4), PageId::new(b, 5), PageId::new(b, 7)];
/// let runs: Vec<usize> = consecutive_runs(&pages).map(|r| r.len()).collect();
/// assert_eq!(runs, [2, 1, 1]);
/// ```
pub fn consecutive_runs(pages: &[PageId]) -> impl Iterator<Item = &[PageId]> {
    pages.chunk_by(|a, b| a.region == b.region && b.index == a.index.wrapping_add(1))
}

/// Whether a page of bytes is all zeros (word at a time).
pub fn is_zero_page(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; `align_to` only reinterprets the
        // aligned middle of the slice.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
