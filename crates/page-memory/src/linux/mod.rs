//! [`LinuxMemory`]: the [`PageMemory`] contract over real anonymous memory of this
//! process (a VMM's guest RAM), with userfaultfd write-protect and a memfd canonical
//! store. No kernel patch: everything here is stock Linux (5.7+; 6.7+ for all of it).
//!
//! # Regions
//! Guest RAM is a set of private anonymous mappings: allocated by the backend
//! ([`LinuxMemory::add_region`]) or adopted from an embedder by address and length
//! ([`LinuxMemory::adopt_region`]). Each is registered with the backend's userfaultfd in
//! write-protect mode. [`LinuxMemory::region_ptr`] gives the base address: vCPUs and
//! device models read and write guest memory there directly, never through the backend.
//! Allocated regions get `MADV_NOHUGEPAGE`: a recycled or merged 4 KiB piece of a
//! transparent huge page is not freed until the kernel splits the huge page.
//!
//! # Write protection: synchronous userfaultfd write-protect
//! [`PageMemory::protect`] write-protects pages with `UFFDIO_WRITEPROTECT` (one call per
//! run of consecutive pages). A guest write to a protected page stops in the kernel and
//! is sent to the backend's **fault thread**, which takes the page's lock (so it waits for
//! at most the one merge that may hold it), removes the protection, records the write (the
//! page's generation moves on, so every token of it is stale) and wakes the writer, whose
//! write then lands in the page it sees. Nothing is lost and nothing waits for more than
//! one operation on that page. Writes made by the kernel on the guest's behalf (KVM
//! faulting in guest pages, `read(2)` into guest memory) are handled the same way, so the
//! userfaultfd is created without `UFFD_USER_MODE_ONLY`: that needs root, `CAP_SYS_PTRACE`,
//! access to `/dev/userfaultfd`, or `vm.unprivileged_userfaultfd = 1`
//! ([`LinuxConfig::kernel_faults`] turns it off for embedders that only write from user
//! space).
//!
//! # Dirty tracking: what "written since the token" means here
//! Because every first write to a protected page goes through the fault thread,
//! [`PageMemory::written_since`] is exact and costs no system call: it compares the
//! token with the page's generation ([`DirtyTracking::UffdWriteProtect`]). Asynchronous
//! write-protect (`UFFD_FEATURE_WP_ASYNC`, read back with `PAGEMAP_SCAN`) would spare a
//! guest the round trip to the fault thread on the first write after each protection, but
//! it cannot be used here: the kernel resolves asynchronous write faults itself, so a
//! write could land between a merge's comparison and its remap and be lost, and a
//! userfaultfd (hence a mapping) is either synchronous or asynchronous, never both.
//! Checksums (KSM's way) only tell a merge candidate, not a safe merge, so they are no
//! fallback either: without userfaultfd write-protect nothing is merged (see *Failures*).
//! `PAGEMAP_SCAN` does serve the backend, in the remap windows below and in accounting.
//!
//! # Merging: the canonical store
//! Canonical contents live once each in a memfd, the canonical store (layout and slot
//! lifetime: *The canonical store* below).
//! - [`PageMemory::canonicalize`] copies the protected page into a free store slot and
//!   maps that slot over the page with `MAP_PRIVATE | MAP_FIXED`: the page reads the same
//!   bytes, its own anonymous memory is freed, and the frame the engine keeps is the store
//!   page (read through a read-only view of the memfd).
//! - [`PageMemory::merge`] takes the duplicate's lock, checks its token (a write since
//!   then means [`MergeOutcome::Changed`]), compares the duplicate with the frame in full
//!   while the page is write-protected (a writer now waits in the fault thread), and maps
//!   the store page over it. A later write to a merged page is first seen by the fault
//!   thread, which breaks the sharing itself with `MADV_POPULATE_WRITE` (the kernel copies
//!   the page, as any copy-on-write) before waking the writer: the backend then knows for
//!   certain that the page no longer maps the store page, which may then be freed.
//! - A fresh mapping is not yet registered with userfaultfd: the backend registers it and
//!   write-protects it right after the remap. A write in that window of a few system calls
//!   is not lost (it lands in a private copy, as any copy-on-write), and the backend
//!   catches it afterwards by asking `PAGEMAP_SCAN` whether the page still maps the store
//!   (or, for the zero page, still maps the kernel's zero page); without `PAGEMAP_SCAN`
//!   (Linux before 6.7) it compares the page's contents instead. Such a write is counted
//!   in [`LinuxStats::window_writes`] and makes the page's tokens stale.
//! - Zero pages: merging with [`PageMemory::zero_frame`] drops the page with
//!   `MADV_DONTNEED` (the next read maps the kernel's zero page) and write-protects the
//!   empty entry (`UFFD_FEATURE_WP_UNPOPULATED`, 6.4; before, the zero page is faulted in
//!   first). A page that maps the store gets fresh anonymous memory mapped over it instead
//!   (`MADV_DONTNEED` on a private file mapping would bring the file's page back).
//!
//! # The canonical store
//! The memfd is sparse: a page of it uses memory only once written, so offsets are free.
//! Each region gets a *home*, a run of store slots as long as the region: page `i`, when
//! it becomes canonical, goes to home slot `home + i` if that slot is free (else to the
//! overflow area, in order). Consecutive canonical pages of a region so sit at consecutive
//! offsets, and so do the pages merged with them when duplicates are laid out in the same
//! order (VMs booted from one image): their mappings are contiguous in address and in
//! file offset, and the kernel joins them into one VMA. A slot is held by the engine's
//! frames ([`LinuxFrame`]) and by every page whose entry may still map it; when the last
//! holder lets go, the slot is punched out of the memfd (`fallocate(PUNCH_HOLE)`, the
//! memory goes back to the system) and is free again. A page lets go only when it is
//! certain not to map the slot any more (the fault thread completes copy-on-write breaks
//! itself for that reason): punching a page still mapped would change what it reads.
//! Frames are read through one read-only shared view of the whole memfd.
//!
//! # Recycling and unmerging
//! [`PageMemory::recycle`] is `MADV_DONTNEED` (runs of pages in one call), or a fresh
//! anonymous mapping over a page that maps the store. [`PageMemory::unmerge`] breaks the
//! sharing with `MADV_POPULATE_WRITE`, which gives the page a private copy (a zero-merged
//! page gets a private zero page). The page stays inside a mapping of the store, which is
//! harmless while the backend manages it (it never drops such a page with
//! `MADV_DONTNEED`); when an adopted region is given back ([`LinuxMemory::remove_region`],
//! drop), every run of such pages is copied into fresh anonymous memory and moved over the
//! run with `mremap`, atomically, so the embedder gets plain anonymous memory back.
//!
//! # The map-count limit
//! Every store mapping that does not coalesce with its neighbours is a VMA, and a
//! process may have at most `vm.max_map_count` of them (65,530 by default); past it,
//! `mmap` fails and so would the VMM's own allocations. Canonical pages are laid out so
//! that runs of duplicates map consecutive store offsets and coalesce into one VMA (see
//! *The canonical store*), but random sharing still costs up to two VMAs per
//! merged page. The backend keeps an upper bound of the mappings it may have added,
//! recounts `/proc/self/maps` when the bound nears the limit, and stops merging
//! [`LinuxConfig::map_count_reserve`] mappings short of it: such a merge returns
//! [`PageError::MapCountLimit`] and is counted in [`LinuxStats::map_limit_refusals`].
//! Raise the limit with `sysctl -w vm.max_map_count=1048576` (or a file in
//! `/etc/sysctl.d/`); the backend rereads it at every recount, so it takes effect at
//! once. Each VMA costs the kernel about 200 bytes.
//!
//! Zero pages interleaved with merged runs cost mappings too: a zero-merged page keeps its
//! anonymous mapping, between two store mappings.
//!
//! # Costs (measured on the project's 2-core Linux 6.18 VM, release build)
//! `written_since` 18 ns; `protect` 0.2–0.5 µs per page (one call per run); `read_page`
//! 1.5–2.3 µs (`process_vm_readv`); `canonicalize` and `merge` 11–18 µs per page, most of
//! it the kernel's `mmap(MAP_FIXED)` (splitting and joining mappings, freeing the old page
//! with a TLB flush) and the userfaultfd register/protect calls that follow; `unmerge`
//! 4–6 µs. A guest's first write to a protected page waits about 7 µs (median) for the
//! fault thread, 12 µs on a merged page (the copy included). With one fault thread, a
//! write may also wait for the faults queued before it ([`LinuxConfig::fault_threads`]).
//!
//! # Batches: runs of pages with one system call each
//! Those per-page costs are mostly fixed costs of the calls, so
//! [`PageMemory::canonicalize_batch`] and [`PageMemory::merge_batch`] work on runs: a run
//! of consecutive pages of one region (at most [`LinuxConfig::max_run_pages`], default 64)
//! is locked together and read with one `process_vm_readv` to compare it; pages going to
//! consecutive store slots (canonical pages go to their home slots, so the duplicates of a
//! run of canonical pages laid out in the same order do too) are copied into the store
//! with one `pwrite` and mapped with one `mmap`, then registered, write-protected and
//! checked for window writes (`PAGEMAP_SCAN`) with one call each. Pages of a run that
//! are stale, differ or already merged only split it. PageONE calls them per chunk: its
//! merge passes then cost about 6–7 µs of CPU per page on this machine, against about
//! 15 µs page by page (`docs/benchmarks.md`, "PageONE vs Linux KSM on real memory").
//! A writer to a page of a run waits for that run, at most `max_run_pages` pages.
//!
//! # Accounting
//! [`LinuxMemory::usage`] reads the real figures: `Rss`, `Pss`, `Anonymous` and `Swap`
//! of the regions' mappings from `/proc/self/smaps`, the memory the store holds from the
//! memfd's allocated blocks, and (with `PAGEMAP_SCAN`) a page-by-page census of what each
//! guest page maps. The memory guest RAM really uses is the regions' anonymous memory
//! plus the store ([`LinuxUsage::total_bytes`]); `Rss` counts a store page once per
//! mapping, as it does for KSM pages.
//!
//! # Failures
//! Nothing panics. No userfaultfd, or one without write-protect (Linux before 5.7, a
//! seccomp filter, no privilege for kernel faults): [`LinuxMemory::new`] fails with
//! [`PageError::Unsupported`] and a message that says which, unless
//! [`LinuxConfig::require_userfaultfd`] is off, in which case the memory works without
//! protection: `protect` fails with `Unsupported` for every page (an engine then merges
//! nothing and keeps running), `recycle` and the accounting still work
//! ([`DirtyTracking::Unavailable`]). A failed system call is [`PageError::Os`] with the
//! call and errno (`ENOMEM` included). A region its owner unmapped while in use is found
//! out by the next operation that touches it (guest memory is only ever read through
//! `process_vm_readv` and `pwrite`, which fail with `EFAULT` instead of faulting, and
//! write-protect calls fail with `ENOENT`): the region is marked and every later
//! operation on it returns [`PageError::Unmapped`]. An unmap that races a remap of the
//! same page within its few microseconds can leave one page of fresh mapping at the old
//! address; embedders should call [`LinuxMemory::remove_region`] before unmapping.
//!
//! # Not supported
//! `fork` (the child shares nothing of this state), hugetlbfs or shared guest memory
//! (only private anonymous memory is adopted), more than one `LinuxMemory` over the same
//! memory.

mod config;
mod error;
mod probe;
mod store;
mod sys;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use sys::Advice;

use crate::{
    is_zero_page, DirtyHook, DomainId, MergeOutcome, PageError, PageId, PageMemory, ProtectToken,
    RegionId, RegionInfo, PAGE_SIZE, PAGE_WORDS,
};

pub use config::LinuxConfig;
pub use error::{KernelFeature, LinuxError};
pub use store::LinuxFrame;
use store::{Slot, Store};
use sys::uffd::Uffd;
pub use sys::uffd::UffdSource;

/// How [`PageMemory::written_since`] knows whether a page was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Synchronous userfaultfd write-protect: the fault thread sees the first write to
    /// every protected page and records it, so `written_since` is exact and needs no
    /// system call.
    UffdWriteProtect,
    /// No userfaultfd write-protect: nothing can be protected, every page reads as
    /// written, and nothing is merged.
    Unavailable,
}

/// How a write in the window between a remap and its write-protection is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowCheck {
    /// `PAGEMAP_SCAN` (Linux 6.7): whether the page still maps the store page (or the
    /// zero page) it was given.
    PagemapScan,
    /// The page is read back and compared with what it was given (a write of the same
    /// bytes goes unseen until the page's next write, which is harmless).
    Contents,
}

/// What the kernel offered when the memory was made (see [`KernelFeature`] for what
/// each feature is needed for).
#[derive(Clone, Debug)]
pub struct LinuxCaps {
    /// Why userfaultfd write-protect is unavailable (`None`: it works). Set only with
    /// [`LinuxConfig::require_userfaultfd`] off (on, [`LinuxMemory::new`] fails instead).
    pub userfaultfd_error: Option<LinuxError>,
    /// How the userfaultfd was created (`None`: there is none).
    pub source: Option<UffdSource>,
    /// Whether writes made by the kernel to protected pages are handled. `false` with
    /// [`LinuxConfig::kernel_faults`] on means this process may not have kernel faults and
    /// the memory fell back to a user-mode-only userfaultfd: a write the kernel makes to
    /// a protected page (KVM, `read(2)` into guest memory) then fails with `EFAULT`.
    pub kernel_faults: bool,
    /// userfaultfd write-protect on anonymous memory (Linux 5.7) works.
    pub uffd_wp_anon: bool,
    /// userfaultfd write-protect on a private mapping of a memfd (Linux 5.19) works.
    pub uffd_wp_shmem: bool,
    /// `MADV_POPULATE_WRITE` (Linux 5.14) works.
    pub populate_write: bool,
    /// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4) is on.
    pub wp_unpopulated: bool,
    /// `PAGEMAP_SCAN` (Linux 6.7) works.
    pub pagemap_scan: bool,
    /// `vm.max_map_count` when the memory was made.
    pub max_map_count: u64,
}

/// Counters of a [`LinuxMemory`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinuxStats {
    /// Guest writes to protected pages resolved by the fault thread.
    pub write_faults: u64,
    /// Of which broke a store mapping (copy-on-write of a merged or canonical page).
    pub cow_breaks: u64,
    /// Pages made canonical (copied into the store and remapped).
    pub canonicalized: u64,
    /// Pages merged with a store page.
    pub merges: u64,
    /// Pages merged with the zero page.
    pub zero_merges: u64,
    /// Pages recycled.
    pub recycled: u64,
    /// Pages given a private copy again by `unmerge`.
    pub unmerged: u64,
    /// Writes caught in the window between a remap and its protection.
    pub window_writes: u64,
    /// Merges (and canonicalizations) refused to stay below `vm.max_map_count`.
    pub map_limit_refusals: u64,
    /// Times `/proc/self/maps` was counted.
    pub map_recounts: u64,
    /// Mappings of the process at the last count.
    pub mappings_counted: u64,
    /// `vm.max_map_count` at the last count.
    pub max_map_count: u64,
    /// Store slots in use (canonical contents held).
    pub store_slots: u64,
    /// Store pages punched out (memory given back) since the start.
    pub store_punched: u64,
    /// Punch-hole calls that failed.
    pub store_punch_errors: u64,
}

/// Real memory figures of the regions and the store (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinuxUsage {
    /// `Rss` of the regions' mappings: resident pages, a store page counted once per
    /// mapping of it.
    pub region_rss: u64,
    /// `Pss` of the regions' mappings: shared pages divided among their mappings.
    pub region_pss: u64,
    /// `Anonymous` of the regions' mappings: private memory of guest pages (copies made
    /// by copy-on-write included; the kernel's zero page excluded).
    pub region_anonymous: u64,
    /// `Swap` of the regions' mappings.
    pub region_swap: u64,
    /// Mappings (VMAs) the regions are made of now.
    pub region_mappings: u64,
    /// Memory the canonical store holds (the memfd's allocated blocks).
    pub store_bytes: u64,
    /// Page-by-page census of the regions (with `PAGEMAP_SCAN`).
    pub census: Option<PageCensus>,
}

impl LinuxUsage {
    /// The memory guest RAM really uses: private memory of the regions (resident or
    /// swapped) plus the canonical store.
    pub fn total_bytes(&self) -> u64 {
        self.region_anonymous + self.region_swap + self.store_bytes
    }
}

/// What the pages of the regions map, counted from their page tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCensus {
    /// Pages with private memory of their own, resident.
    pub private: u64,
    /// Pages mapping a page of the canonical store.
    pub store: u64,
    /// Pages mapping the kernel's zero page.
    pub zero: u64,
    /// Pages with no resident page mapped: never touched, dropped (recycled or
    /// zero-merged) and not read since, remapped and not read since, or swapped out.
    pub not_present: u64,
}

/// What a guest page is backed by now (see [`LinuxMemory::backing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Its own anonymous memory (or none yet).
    Private,
    /// Nothing: zero-merged or recycled; reads see the kernel's zero page.
    Zero,
    /// A page of the canonical store, at this offset of the memfd.
    Store {
        /// Offset in the store's memfd.
        offset: u64,
    },
    /// Its own private copy, inside a mapping of the store (after a copy-on-write break).
    PrivateCopy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Anonymous mapping, the page's own memory (or none yet).
    Anon,
    /// Anonymous mapping, dropped by a zero merge or a recycle.
    Zero,
    /// Store mapping; the entry maps the slot's file page (always write-protected, so the
    /// fault thread sees the copy-on-write break).
    Store,
    /// Store mapping; the entry holds a private copy (or, if `slot` is still set, may
    /// still map the file page until the writer's copy-on-write completes).
    StoreCow,
}

struct PageState {
    /// Moves on whenever the page is written while protected, or unprotected.
    gen: u64,
    /// The store slot whose page the entry may map.
    slot: Option<Arc<Slot>>,
    kind: Kind,
    /// Protected for the engine (tokens are valid while this holds and `gen` is equal).
    protected: bool,
    /// The page's mapping is registered with the userfaultfd.
    registered: bool,
}

struct Region {
    info: RegionInfo,
    base: usize,
    owned: bool,
    /// First home slot in the store.
    home: u64,
    /// `false` once removed; operations hold it shared, removal exclusively.
    live: RwLock<bool>,
    /// Its owner unmapped it while in use.
    unmapped: AtomicBool,
    pages: Box<[Mutex<PageState>]>,
}

impl Region {
    fn addr(&self, index: u32) -> usize {
        self.base + index as usize * PAGE_SIZE
    }

    fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, PageState> {
        self.pages[index].lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Counters {
    write_faults: AtomicU64,
    cow_breaks: AtomicU64,
    canonicalized: AtomicU64,
    merges: AtomicU64,
    zero_merges: AtomicU64,
    recycled: AtomicU64,
    unmerged: AtomicU64,
    window_writes: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Keeps the process below `vm.max_map_count` (see the module docs).
struct MapGuard {
    limit: AtomicU64,
    reserve: Option<u64>,
    /// Upper bound of the process's mappings: the last count plus two per remap since.
    estimate: AtomicU64,
    counted: AtomicU64,
    last_count: Mutex<Instant>,
    refusals: AtomicU64,
    recounts: AtomicU64,
}

impl MapGuard {
    /// Minimum time between two counts while refusing.
    const RECOUNT_EVERY: Duration = Duration::from_millis(20);

    fn new(reserve: Option<u64>) -> MapGuard {
        let limit = sys::max_map_count().unwrap_or(65_530);
        let count = sys::count_mappings().unwrap_or(0);
        MapGuard {
            limit: AtomicU64::new(limit),
            reserve,
            estimate: AtomicU64::new(count),
            counted: AtomicU64::new(count),
            last_count: Mutex::new(Instant::now()),
            refusals: AtomicU64::new(0),
            recounts: AtomicU64::new(1),
        }
    }

    fn ceiling(&self) -> u64 {
        let limit = self.limit.load(Ordering::Relaxed);
        let reserve = self.reserve.unwrap_or((limit / 16).max(256));
        limit.saturating_sub(reserve)
    }

    /// Admits one remap (which may add two mappings), or refuses it.
    fn admit(&self) -> Result<(), PageError> {
        if self.estimate.fetch_add(2, Ordering::Relaxed) + 2 <= self.ceiling() {
            return Ok(());
        }
        self.estimate.fetch_sub(2, Ordering::Relaxed);
        let mut last = self.last_count.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have counted while we waited for the lock. Count again if the
        // last count left room (the estimate only grew pessimistic: merged runs coalesce),
        // and near the limit at most every RECOUNT_EVERY (a count reads every mapping).
        let room = self
            .ceiling()
            .saturating_sub(self.counted.load(Ordering::Relaxed));
        if self.estimate.load(Ordering::Relaxed) + 2 > self.ceiling()
            && (room >= 32 || last.elapsed() >= Self::RECOUNT_EVERY)
        {
            if let Some(limit) = sys::max_map_count() {
                self.limit.store(limit, Ordering::Relaxed);
            }
            if let Some(count) = sys::count_mappings() {
                self.counted.store(count, Ordering::Relaxed);
                self.estimate.store(count, Ordering::Relaxed);
            }
            self.recounts.fetch_add(1, Ordering::Relaxed);
            *last = Instant::now();
        }
        drop(last);
        if self.estimate.fetch_add(2, Ordering::Relaxed) + 2 <= self.ceiling() {
            return Ok(());
        }
        self.estimate.fetch_sub(2, Ordering::Relaxed);
        self.refusals.fetch_add(1, Ordering::Relaxed);
        Err(PageError::MapCountLimit {
            limit: self.limit.load(Ordering::Relaxed),
            mappings: self.counted.load(Ordering::Relaxed),
        })
    }
}

struct Inner {
    uffd: Option<Uffd>,
    caps: LinuxCaps,
    config: LinuxConfig,
    pid: i32,
    regions: RwLock<Vec<Arc<Region>>>,
    store: Arc<Store>,
    /// `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
    pagemap: Option<OwnedFd>,
    guard: MapGuard,
    hook: RwLock<Option<DirtyHook>>,
    counters: Counters,
}

/// Guest memory of this process for the engines; see the module docs.
///
/// ```no_run
/// use page_memory::linux::LinuxMemory;
/// use page_memory::{DomainId, MergeOutcome, PageId, PageMemory};
///
/// let mem = LinuxMemory::new().expect("userfaultfd write-protect");
/// let r = mem.add_region(2, DomainId(0)).unwrap();
/// let base = mem.region_ptr(r).unwrap();
/// // SAFETY: the region is two pages of memory this process owns.
/// unsafe { std::ptr::write_bytes(base, 7, 2 * 4096) };
/// let (a, b) = (PageId::new(r, 0), PageId::new(r, 1));
/// let t = mem.protect(&[a, b]);
/// let canon = mem.canonicalize(a, t[0].clone().unwrap()).unwrap();
/// assert_eq!(mem.merge(b, t[1].clone().unwrap(), &canon).unwrap(), MergeOutcome::Merged);
/// ```
pub struct LinuxMemory {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    stop: Option<Arc<OwnedFd>>,
}

impl std::fmt::Debug for LinuxMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxMemory")
            .field("regions", &self.live_regions().len())
            .field("dirty_tracking", &self.dirty_tracking())
            .field("fault_threads", &self.threads.len())
            .field("caps", &self.inner.caps)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// A reusable buffer for reading runs of guest pages (kept between calls, so a run's
    /// read allocates nothing).
    static RUN_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The message of every protect-type operation when there is no userfaultfd.
const NO_UFFD: &str =
    "userfaultfd write-protect is unavailable (see LinuxMemory::caps for why): pages cannot be protected or merged";

impl LinuxMemory {
    /// A memory with the default [`LinuxConfig`] (userfaultfd write-protect required).
    pub fn new() -> Result<LinuxMemory, LinuxError> {
        Self::with_config(LinuxConfig::default())
    }

    /// A memory set up by `config`, with no regions; probes the kernel (see
    /// [`KernelFeature`]) and starts the fault thread(s). Fails with
    /// [`LinuxError::Missing`] where the kernel lacks a feature the backend needs (unless
    /// [`LinuxConfig::require_userfaultfd`] is off).
    pub fn with_config(config: LinuxConfig) -> Result<LinuxMemory, LinuxError> {
        let store = Store::new(config.home_slots)?;
        let guard = MapGuard::new(config.map_count_reserve);
        let probe::Kernel {
            uffd,
            pagemap,
            caps,
        } = probe::probe(&config, guard.limit.load(Ordering::Relaxed))?;
        let inner = Arc::new(Inner {
            uffd,
            caps,
            pid: std::process::id() as i32,
            regions: RwLock::new(Vec::new()),
            store,
            pagemap,
            guard,
            hook: RwLock::new(None),
            counters: Counters::default(),
            config,
        });
        let mut mem = LinuxMemory {
            inner,
            threads: Vec::new(),
            stop: None,
        };
        if mem.inner.uffd.is_some() {
            let stop = Arc::new(
                rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(
                    |e| PageError::Os {
                        op: "eventfd (fault thread stop)",
                        errno: e.raw_os_error(),
                    },
                )?,
            );
            for n in 0..mem.inner.config.fault_threads.max(1) {
                let (inner, stop2) = (mem.inner.clone(), stop.clone());
                let t = std::thread::Builder::new()
                    .name(format!("page-memory-uffd-{n}"))
                    .spawn(move || fault_loop(&inner, &stop2))
                    .map_err(|e| PageError::Os {
                        op: "spawn the userfaultfd fault thread",
                        errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
                    })?;
                mem.threads.push(t);
            }
            mem.stop = Some(stop);
        }
        Ok(mem)
    }

    /// What the kernel offered.
    pub fn caps(&self) -> &LinuxCaps {
        &self.inner.caps
    }

    /// How writes to protected pages are tracked.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        if self.inner.uffd.is_some() {
            DirtyTracking::UffdWriteProtect
        } else {
            DirtyTracking::Unavailable
        }
    }

    /// How writes in a remap's window are caught.
    pub fn window_check(&self) -> WindowCheck {
        if self.inner.pagemap.is_some() {
            WindowCheck::PagemapScan
        } else {
            WindowCheck::Contents
        }
    }

    /// Allocates a region of `pages` zero pages (a private anonymous mapping, registered
    /// with the userfaultfd) in trust domain `domain`.
    pub fn add_region(&self, pages: u32, domain: DomainId) -> Result<RegionId, PageError> {
        if pages == 0 {
            return Err(PageError::Unsupported("a region of no pages"));
        }
        let len = pages as usize * PAGE_SIZE;
        let base = sys::map_fresh_anon(len).map_err(|e| PageError::Os {
            op: "mmap (allocate a region)",
            errno: e.raw_os_error(),
        })?;
        // SAFETY: the range is the mapping just made; the advice only changes how the
        // kernel backs it (no huge pages), not its contents.
        let _ = unsafe { sys::madvise(base, len, Advice::LinuxNoHugepage) };
        match self.insert_region(base, pages, domain, true) {
            Ok(id) => Ok(id),
            Err(e) => {
                // SAFETY: the mapping made above, which nothing else knows of.
                let _ = unsafe { sys::munmap(base, len) };
                Err(e)
            }
        }
    }

    /// Adopts `len` bytes of guest memory at `base`, mapped by the caller, as a region in
    /// trust domain `domain`.
    ///
    /// # Safety
    /// - `[base, base + len)` is page-aligned and made of private anonymous readable and
    ///   writable mappings of this process (this is checked), owned by the caller.
    /// - It stays mapped until [`remove_region`](Self::remove_region) returns or this
    ///   memory is dropped, and meanwhile the caller does not `mmap`, `mremap`, `munmap`,
    ///   `mprotect` or `madvise` over it, nor register it with another userfaultfd: the
    ///   backend remaps pages inside it. (Unmapping it anyway is detected and reported as
    ///   [`PageError::Unmapped`], but see the module docs for the race that remains.)
    /// - Guest code may read and write it at any time; nothing else in the process may
    ///   hold Rust references to it.
    ///
    /// On removal or drop, pages of the range that map the canonical store are given
    /// private copies (the memory stays the caller's, with the same contents).
    pub unsafe fn adopt_region(
        &self,
        base: *mut u8,
        len: usize,
        domain: DomainId,
    ) -> Result<RegionId, PageError> {
        let start = base as usize;
        if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(PageError::Unsupported(
                "adopted regions must be page-aligned and not empty",
            ));
        }
        let pages = u32::try_from(len / PAGE_SIZE)
            .map_err(|_| PageError::Unsupported("a region of more than 2^32 pages"))?;
        let end = start
            .checked_add(len)
            .ok_or(PageError::Unsupported("region wraps around"))?;
        if let Some(why) = sys::check_anonymous_private(start, end) {
            return Err(PageError::Unsupported(why));
        }
        let overlaps = self
            .live_regions()
            .iter()
            .any(|r| r.base < end && start < r.base + r.len());
        if overlaps {
            return Err(PageError::Unsupported("the range overlaps a region"));
        }
        self.insert_region(start, pages, domain, false)
    }

    fn insert_region(
        &self,
        base: usize,
        pages: u32,
        domain: DomainId,
        owned: bool,
    ) -> Result<RegionId, PageError> {
        let len = pages as usize * PAGE_SIZE;
        if let Some(uffd) = &self.inner.uffd {
            uffd.register_wp(base, len).map_err(|e| PageError::Os {
                op: "UFFDIO_REGISTER (write-protect mode) of a region",
                errno: e.raw_os_error(),
            })?;
        }
        let home = match self.inner.store.reserve_home(pages) {
            Ok(h) => h,
            Err(e) => {
                if let Some(uffd) = &self.inner.uffd {
                    let _ = uffd.unregister(base, len);
                }
                return Err(e);
            }
        };
        let mut regions = self
            .inner
            .regions
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let id = RegionId(regions.len() as u32);
        regions.push(Arc::new(Region {
            info: RegionInfo { id, pages, domain },
            base,
            owned,
            home,
            live: RwLock::new(true),
            unmapped: AtomicBool::new(false),
            pages: (0..pages)
                .map(|_| {
                    Mutex::new(PageState {
                        gen: 0,
                        slot: None,
                        kind: Kind::Anon,
                        protected: false,
                        registered: self.inner.uffd.is_some(),
                    })
                })
                .collect(),
        }));
        Ok(id)
    }

    /// Removes a region: its pages that map the store get private copies, the range is
    /// unregistered from the userfaultfd, and an allocated region is unmapped (an adopted
    /// one stays the caller's, mapped, with the same contents).
    pub fn remove_region(&self, id: RegionId) -> Result<(), PageError> {
        let region = self.inner.region(id)?;
        let mut live = region.live.write().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return Err(PageError::NoSuchRegion(id));
        }
        *live = false;
        self.inner.retire(&region);
        Ok(())
    }

    /// The base address of region `id`: guest memory, to be read and written directly.
    pub fn region_ptr(&self, id: RegionId) -> Result<*mut u8, PageError> {
        let r = self.inner.live_region(id)?;
        Ok(r.base as *mut u8)
    }

    /// The address of `page`.
    pub fn page_ptr(&self, page: PageId) -> Result<*mut u8, PageError> {
        let r = self.inner.live_region(page.region)?;
        if page.index >= r.info.pages {
            return Err(PageError::NoSuchPage(page));
        }
        Ok(r.addr(page.index) as *mut u8)
    }

    /// What `page` is backed by now.
    pub fn backing(&self, page: PageId) -> Result<Backing, PageError> {
        self.inner.with_page(page, |_, _, s| {
            Ok(match s.kind {
                Kind::Anon => Backing::Private,
                Kind::Zero => Backing::Zero,
                Kind::Store => Backing::Store {
                    offset: s.slot.as_ref().map_or(0, |x| x.offset()),
                },
                Kind::StoreCow => Backing::PrivateCopy,
            })
        })
    }

    /// Whether `page` is protected (for the engine).
    pub fn is_protected(&self, page: PageId) -> Result<bool, PageError> {
        self.inner.with_page(page, |_, _, s| Ok(s.protected))
    }

    /// Whether `a` and `b` map the same page of the canonical store.
    pub fn shares_frame(&self, a: PageId, b: PageId) -> Result<bool, PageError> {
        let slot = |p| {
            self.inner.with_page(p, |_, _, s| {
                Ok(match (s.kind, &s.slot) {
                    (Kind::Store, Some(x)) => Some(x.index),
                    _ => None,
                })
            })
        };
        Ok(matches!((slot(a)?, slot(b)?), (Some(x), Some(y)) if x == y))
    }

    /// Counters since the start.
    pub fn stats(&self) -> LinuxStats {
        let i = &self.inner;
        let c = &i.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinuxStats {
            write_faults: g(&c.write_faults),
            cow_breaks: g(&c.cow_breaks),
            canonicalized: g(&c.canonicalized),
            merges: g(&c.merges),
            zero_merges: g(&c.zero_merges),
            recycled: g(&c.recycled),
            unmerged: g(&c.unmerged),
            window_writes: g(&c.window_writes),
            map_limit_refusals: g(&i.guard.refusals),
            map_recounts: g(&i.guard.recounts),
            mappings_counted: g(&i.guard.counted),
            max_map_count: g(&i.guard.limit),
            store_slots: g(&i.store.live),
            store_punched: g(&i.store.punched),
            store_punch_errors: g(&i.store.punch_errors),
        }
    }

    /// The real memory the regions and the store use now (reads `/proc/self/smaps`: a
    /// few milliseconds per thousand mappings).
    pub fn usage(&self) -> Result<LinuxUsage, PageError> {
        let ranges: Vec<(usize, usize)> = self
            .live_regions()
            .iter()
            .filter(|r| !r.unmapped.load(Ordering::Relaxed))
            .map(|r| (r.base, r.base + r.len()))
            .collect();
        let t = sys::smaps_totals(&ranges).map_err(|e| PageError::Os {
            op: "read /proc/self/smaps",
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
        let census = match &self.inner.pagemap {
            Some(fd) => Some(census(fd.as_fd(), &ranges)?),
            None => None,
        };
        Ok(LinuxUsage {
            region_rss: t.rss,
            region_pss: t.pss,
            region_anonymous: t.anonymous,
            region_swap: t.swap,
            region_mappings: t.mappings,
            store_bytes: self.inner.store.bytes()?,
            census,
        })
    }

    fn live_regions(&self) -> Vec<Arc<Region>> {
        self.inner
            .regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| *r.live.read().unwrap_or_else(|e| e.into_inner()))
            .cloned()
            .collect()
    }
}

impl Drop for LinuxMemory {
    fn drop(&mut self) {
        // Retire the regions while the fault threads still run (a writer may be waiting).
        let regions: Vec<Arc<Region>> = self
            .inner
            .regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for region in regions {
            let mut live = region.live.write().unwrap_or_else(|e| e.into_inner());
            if *live {
                *live = false;
                self.inner.retire(&region);
            }
        }
        if let Some(stop) = &self.stop {
            let _ = rustix::io::write(stop.as_fd(), &1u64.to_ne_bytes());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Counts what the pages of `ranges` map.
fn census(
    pagemap: std::os::fd::BorrowedFd<'_>,
    ranges: &[(usize, usize)],
) -> Result<PageCensus, PageError> {
    use sys::{PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT};
    let mut c = PageCensus::default();
    let mut out = vec![sys::PageRegion::default(); 512];
    for &(start, end) in ranges {
        let total = ((end - start) / PAGE_SIZE) as u64;
        let mut at = start;
        let mut present = 0u64;
        while at < end {
            let ret = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO;
            let (n, walk_end) = sys::pagemap_scan(pagemap, at, end, PAGE_IS_PRESENT, ret, &mut out)
                .map_err(|e| PageError::Os {
                    op: "PAGEMAP_SCAN (census)",
                    errno: e.raw_os_error(),
                })?;
            for r in &out[..n] {
                let pages = (r.end - r.start) / PAGE_SIZE as u64;
                present += pages;
                if r.categories & PAGE_IS_PFNZERO != 0 {
                    c.zero += pages;
                } else if r.categories & PAGE_IS_FILE != 0 {
                    c.store += pages;
                } else {
                    c.private += pages;
                }
            }
            if walk_end <= at {
                break;
            }
            at = walk_end;
        }
        c.not_present += total - present.min(total);
    }
    Ok(c)
}

/// The fault thread: resolves write faults until `stop` is signalled.
fn fault_loop(inner: &Inner, stop: &OwnedFd) {
    let Some(uffd) = &inner.uffd else { return };
    let mut buf = Uffd::msg_buffer(64);
    loop {
        let mut fds = [
            PollFd::new(uffd, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        // EAGAIN: another fault thread took the messages.
        let Ok(msgs) = uffd.read_msgs(&mut buf) else {
            continue;
        };
        // Only page faults are asked for (no UFFD_FEATURE_EVENT_*); anything else is
        // ignored. Every fault on a write-protect-only registration is a write to a
        // protected page (UFFD_PAGEFAULT_FLAG_WP).
        for fault in msgs.iter().filter_map(|m| m.pagefault()) {
            inner.on_fault(fault.address as usize);
        }
    }
}

/// Why a guest-address operation failed: the region is gone, or the call failed.
fn gone_or(region: &Region, op: &'static str, e: Errno, gone: &[Errno]) -> PageError {
    if gone.contains(&e) {
        region.unmapped.store(true, Ordering::Relaxed);
        PageError::Unmapped(region.info.id)
    } else {
        PageError::Os {
            op,
            errno: e.raw_os_error(),
        }
    }
}

fn uffd_gone_or(region: &Region, op: &'static str, e: Errno) -> PageError {
    gone_or(region, op, e, &[Errno::NOENT, Errno::FAULT])
}

impl Inner {
    fn uffd(&self) -> Result<&Uffd, PageError> {
        self.uffd.as_ref().ok_or(PageError::Unsupported(NO_UFFD))
    }

    fn region(&self, id: RegionId) -> Result<Arc<Region>, PageError> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id.0 as usize)
            .cloned()
            .ok_or(PageError::NoSuchRegion(id))
    }

    fn live_region(&self, id: RegionId) -> Result<Arc<Region>, PageError> {
        let r = self.region(id)?;
        let live = *r.live.read().unwrap_or_else(|e| e.into_inner());
        if !live {
            return Err(PageError::NoSuchRegion(id));
        }
        if r.unmapped.load(Ordering::Relaxed) {
            return Err(PageError::Unmapped(id));
        }
        Ok(r)
    }

    /// Runs `f` on `page` with its region held live and the page locked.
    fn with_page<R>(
        &self,
        page: PageId,
        f: impl FnOnce(&Region, usize, &mut PageState) -> Result<R, PageError>,
    ) -> Result<R, PageError> {
        let region = self.region(page.region)?;
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return Err(PageError::NoSuchRegion(page.region));
        }
        if region.unmapped.load(Ordering::Relaxed) {
            return Err(PageError::Unmapped(page.region));
        }
        if page.index >= region.info.pages {
            return Err(PageError::NoSuchPage(page));
        }
        let mut st = region.lock(page.index as usize);
        let r = f(&region, region.addr(page.index), &mut st);
        drop(st);
        drop(live);
        r
    }

    fn dirty(&self, page: PageId) {
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(page);
        }
    }

    /// Copies the guest page at `addr` into `buf`.
    fn read_guest(&self, region: &Region, addr: usize, buf: &mut [u8]) -> Result<(), PageError> {
        if self.config.checked_access {
            sys::read_guest(self.pid, addr, buf).map_err(|e| {
                gone_or(
                    region,
                    "process_vm_readv (read guest page)",
                    e,
                    &[Errno::FAULT, Errno::NOMEM],
                )
            })
        } else {
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                // SAFETY: with `checked_access` off the embedder keeps regions mapped until
                // removed (see `LinuxConfig::checked_access`), and `addr + 8 * i` is an
                // aligned word inside the page. Guest writes race with this read, so it is
                // an atomic load.
                let w =
                    unsafe { std::sync::atomic::AtomicU64::from_ptr((addr + 8 * i) as *mut u64) }
                        .load(Ordering::Relaxed);
                chunk.copy_from_slice(&w.to_ne_bytes()[..chunk.len()]);
            }
            Ok(())
        }
    }

    /// Registers the page at `addr` (a fresh mapping) with the userfaultfd.
    fn register(&self, addr: usize) -> Result<(), PageError> {
        self.uffd()?
            .register_wp(addr, PAGE_SIZE)
            .map_err(|e| PageError::Os {
                op: "UFFDIO_REGISTER of a remapped page",
                errno: e.raw_os_error(),
            })
    }

    /// Write-protects `len` bytes at `addr`.
    fn wp(&self, region: &Region, addr: usize, len: usize) -> Result<(), PageError> {
        if !self.caps.wp_unpopulated {
            // Without markers an empty entry cannot be protected: fault the zero page in.
            // SAFETY: the range is guest memory of a live region; reading it in changes no
            // contents.
            let _ = unsafe { sys::madvise(addr, len, Advice::LinuxPopulateRead) };
        }
        self.uffd()?
            .writeprotect(addr, len, true, false)
            .map_err(|e| uffd_gone_or(region, "UFFDIO_WRITEPROTECT", e))
    }

    /// Removes write protection from `len` bytes at `addr`, waking waiting writers if
    /// `wake`.
    fn unwp(&self, region: &Region, addr: usize, len: usize, wake: bool) -> Result<(), PageError> {
        self.uffd()?
            .writeprotect(addr, len, false, wake)
            .map_err(|e| uffd_gone_or(region, "UFFDIO_WRITEPROTECT (remove)", e))
    }

    /// Whether a write landed in the page at `addr` since it was given `expect` (a store
    /// page, or the zero page for `None`) and protected.
    ///
    /// A write leaves a present entry with a private page; an empty entry, or one that
    /// maps the store page or the zero page, saw no write. (`PAGEMAP_SCAN` reports the
    /// markers that protect empty entries as "swapped", so swap entries are not taken for
    /// writes: a private copy made and swapped out within the window's microseconds would
    /// be missed, and would only delay freeing the store page until the page is remapped.)
    fn written_in_window(&self, region: &Region, addr: usize, expect: Option<&Slot>) -> bool {
        if let Some(fd) = &self.pagemap {
            if let Ok(k) = sys::page_categories(fd.as_fd(), addr) {
                use sys::{PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT};
                let private = match expect {
                    Some(_) => k & PAGE_IS_FILE == 0,
                    None => k & PAGE_IS_PFNZERO == 0,
                };
                return k & PAGE_IS_PRESENT != 0 && private;
            }
        }
        let mut buf = [0u8; PAGE_SIZE];
        if self.read_guest(region, addr, &mut buf).is_err() {
            return false;
        }
        match expect {
            Some(slot) => buf[..] != *slot.bytes(),
            None => !is_zero_page(&buf),
        }
    }

    /// After a remap of the page at `addr` to `slot` (or to nothing, for `None`):
    /// registers and protects it, and catches a write made in between.
    fn settle(&self, region: &Region, addr: usize, st: &mut PageState) {
        st.registered = self.register(addr).is_ok();
        let protected = st.registered && self.wp(region, addr, PAGE_SIZE).is_ok();
        if !protected {
            // Untracked until registered again (protect retries): the page's tokens die.
            st.protected = false;
            st.gen += 1;
            return;
        }
        self.check_window(region, addr, st);
    }

    /// The page at `addr` is write-protected now: if a write reached it since it was given
    /// the contents its `kind` says (a store page, or zeros), record what it maps now.
    /// Returns whether there was such a write.
    fn reconcile(&self, region: &Region, addr: usize, st: &mut PageState) -> bool {
        let expect = match st.kind {
            Kind::Store => st.slot.clone(),
            Kind::Zero => None,
            Kind::Anon | Kind::StoreCow => return false,
        };
        if !self.written_in_window(region, addr, expect.as_deref()) {
            return false;
        }
        bump(&self.counters.window_writes);
        if st.kind == Kind::Store {
            // The write made a private copy: the page no longer maps the slot.
            st.kind = Kind::StoreCow;
            st.slot = None;
        } else {
            st.kind = Kind::Anon;
        }
        true
    }

    /// Catches a write made between a remap of the page at `addr` and its protection:
    /// such a page is unprotected and its tokens stale.
    fn check_window(&self, region: &Region, addr: usize, st: &mut PageState) {
        if self.reconcile(region, addr, st) {
            let _ = self.unwp(region, addr, PAGE_SIZE, true);
            st.protected = false;
            st.gen += 1;
        }
    }

    /// Maps store slot `slot` over the (protected, equal) page at `addr`.
    fn map_slot(
        &self,
        region: &Region,
        addr: usize,
        st: &mut PageState,
        slot: &Arc<Slot>,
    ) -> Result<(), PageError> {
        self.guard.admit()?;
        // SAFETY: `addr` is a page of a live region, which this backend may remap (the
        // embedder promised so for adopted regions), locked by us. The new mapping has the
        // page's exact current contents (the slot was compared equal, or copied from it,
        // while the page was write-protected), so no reader sees a change; writers are
        // held by the protection or land in a copy. `slot` stays allocated while the page
        // maps it (`st.slot` holds it).
        let r = unsafe { sys::map_file_fixed(addr, PAGE_SIZE, self.store.fd(), slot.offset()) };
        if let Err(e) = r {
            return Err(self.mmap_error("mmap of a store page over a guest page", e));
        }
        st.kind = Kind::Store;
        st.slot = Some(slot.clone());
        self.settle(region, addr, st);
        Ok(())
    }

    /// Maps the store slots `slots` (consecutive offsets) over as many consecutive pages of
    /// `region` at `addr` (locked in `sts`, protected, equal to the slots) with one `mmap`,
    /// then registers, protects and checks them as one range.
    fn map_slots_run(
        &self,
        region: &Region,
        addr: usize,
        sts: &mut [MutexGuard<'_, PageState>],
        slots: &[Arc<Slot>],
    ) -> Result<(), PageError> {
        debug_assert_eq!(sts.len(), slots.len());
        self.guard.admit()?;
        // SAFETY: as in `map_slot`, for each page of the run: pages of a live region that
        // this backend may remap, locked by us, protected, and each mapped to a slot with
        // its exact current contents (compared, or copied from it, while protected). The
        // slots are consecutive in the memfd, so one mapping covers them all; each page's
        // `st.slot` keeps its slot allocated while the page maps it.
        let r = unsafe {
            sys::map_file_fixed(
                addr,
                slots.len() * PAGE_SIZE,
                self.store.fd(),
                slots[0].offset(),
            )
        };
        if let Err(e) = r {
            return Err(self.mmap_error("mmap of store pages over guest pages", e));
        }
        for (st, slot) in sts.iter_mut().zip(slots) {
            st.kind = Kind::Store;
            st.slot = Some(slot.clone());
        }
        self.settle_run(region, addr, sts);
        Ok(())
    }

    /// [`settle`](Self::settle) for a run of freshly remapped pages at `addr`: one
    /// register, one protect, one `PAGEMAP_SCAN` for the whole run where they work.
    fn settle_run(&self, region: &Region, addr: usize, sts: &mut [MutexGuard<'_, PageState>]) {
        let len = sts.len() * PAGE_SIZE;
        let registered = self
            .uffd()
            .ok()
            .and_then(|u| u.register_wp(addr, len).ok())
            .is_some();
        if !registered || self.wp(region, addr, len).is_err() {
            // Page by page, as a single remap would.
            for (k, st) in sts.iter_mut().enumerate() {
                self.settle(region, addr + k * PAGE_SIZE, st);
            }
            return;
        }
        for st in sts.iter_mut() {
            st.registered = true;
        }
        // A write in the window left a private page: present and not a file page (or not
        // the zero page). Only those pages are looked at again, one by one.
        let suspects = self.present_private(addr, addr + len);
        match suspects {
            Some(pages) => {
                for k in pages {
                    self.check_window(region, addr + k * PAGE_SIZE, &mut sts[k]);
                }
            }
            None => {
                for (k, st) in sts.iter_mut().enumerate() {
                    self.check_window(region, addr + k * PAGE_SIZE, st);
                }
            }
        }
    }

    /// The pages of `[start, end)` (as indices from `start`) that are present and map
    /// neither a file page nor the zero page, by `PAGEMAP_SCAN`; `None` without it.
    fn present_private(&self, start: usize, end: usize) -> Option<Vec<usize>> {
        use sys::{PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT};
        let fd = self.pagemap.as_ref()?;
        let mut out = [sys::PageRegion::default(); 32];
        let mut found = Vec::new();
        let mut at = start;
        while at < end {
            let ret = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO;
            let (n, walk_end) =
                sys::pagemap_scan(fd.as_fd(), at, end, PAGE_IS_PRESENT, ret, &mut out).ok()?;
            for r in &out[..n] {
                if r.categories & (PAGE_IS_FILE | PAGE_IS_PFNZERO) == 0 {
                    let (a, b) = (r.start as usize, r.end as usize);
                    found.extend((a - start) / PAGE_SIZE..(b - start) / PAGE_SIZE);
                }
            }
            if walk_end <= at {
                break;
            }
            at = walk_end;
        }
        Some(found)
    }

    /// Locks `run` (consecutive pages of one live region, in bounds) and gives its region,
    /// or pushes an error for each page and returns `None`.
    fn lock_run<'r, T>(
        &self,
        region: &'r Region,
        run_len: usize,
        first: u32,
        out: &mut Vec<Result<T, PageError>>,
    ) -> Option<Vec<MutexGuard<'r, PageState>>> {
        let e = if region.unmapped.load(Ordering::Relaxed) {
            PageError::Unmapped(region.info.id)
        } else {
            let f = first as usize;
            return Some((f..f + run_len).map(|i| region.lock(i)).collect());
        };
        out.extend((0..run_len).map(|_| Err(e.clone())));
        None
    }

    /// `merge` of a run of consecutive pages whose frames are consecutive store slots.
    /// Pushes one result per item; returns which pages changed (for the dirty hook).
    fn merge_run(
        &self,
        items: &[(PageId, ProtectToken, &LinuxFrame)],
        out: &mut Vec<Result<MergeOutcome, PageError>>,
    ) -> Vec<bool> {
        let n = items.len();
        let pages: Vec<PageId> = items.iter().map(|i| i.0).collect();
        let mut changed = vec![false; n];
        let Some(region) = self.run_region(&pages, out) else {
            return changed;
        };
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live {
            out.extend((0..n).map(|_| Err(PageError::NoSuchRegion(region.info.id))));
            return changed;
        }
        let Some(mut guards) = self.lock_run(&region, n, pages[0].index, out) else {
            return changed;
        };
        let mut res: Vec<Option<Result<MergeOutcome, PageError>>> = vec![None; n];
        for (k, (g, &(_, token, frame))) in guards.iter().zip(items).enumerate() {
            if !g.protected || g.gen != token.0 {
                res[k] = Some(Ok(MergeOutcome::Changed));
            } else if let (Kind::Store, Some(s), Some(c)) = (g.kind, &g.slot, &frame.0) {
                if Arc::ptr_eq(s, c) {
                    res[k] = Some(Ok(MergeOutcome::Merged));
                }
            }
        }
        // Protected: no write can land while we compare and remap. One read for the run.
        let addr = region.addr(pages[0].index);
        RUN_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            buf.resize(n * PAGE_SIZE, 0);
            if let Err(e) = self.read_guest(&region, addr, &mut buf[..]) {
                for r in res.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(Err(e.clone()));
                }
                return;
            }
            for (k, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                if res[k].is_none() && page != items[k].2.as_ref() {
                    res[k] = Some(Ok(MergeOutcome::Differs));
                }
            }
        });
        let mut k = 0;
        while k < n {
            if res[k].is_some() {
                k += 1;
                continue;
            }
            let mut j = k;
            while j < n && res[j].is_none() {
                j += 1;
            }
            let slots: Vec<Arc<Slot>> = items[k..j].iter().filter_map(|i| i.2 .0.clone()).collect();
            let r = self.map_slots_run(
                &region,
                region.addr(pages[k].index),
                &mut guards[k..j],
                &slots,
            );
            for (x, c) in res[k..j].iter_mut().zip(&mut changed[k..j]) {
                *x = Some(r.clone().map(|()| MergeOutcome::Merged));
                *c = r.is_ok();
            }
            if r.is_ok() {
                self.counters
                    .merges
                    .fetch_add((j - k) as u64, Ordering::Relaxed);
            }
            k = j;
        }
        drop(guards);
        drop(live);
        out.extend(
            res.into_iter()
                .map(|r| r.unwrap_or(Ok(MergeOutcome::Changed))),
        );
        changed
    }

    /// `canonicalize` of a run of consecutive pages: each page goes to its home slot where
    /// free, and each sub-run of consecutive slots is copied with one `pwrite` and mapped
    /// with one `mmap`. Pushes one result per page; returns which pages changed.
    fn canonicalize_run(
        &self,
        run: &[(PageId, ProtectToken)],
        out: &mut Vec<Result<LinuxFrame, PageError>>,
    ) -> Vec<bool> {
        let n = run.len();
        let pages: Vec<PageId> = run.iter().map(|i| i.0).collect();
        let mut changed = vec![false; n];
        let Some(region) = self.run_region(&pages, out) else {
            return changed;
        };
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live {
            out.extend((0..n).map(|_| Err(PageError::NoSuchRegion(region.info.id))));
            return changed;
        }
        let Some(mut guards) = self.lock_run(&region, n, pages[0].index, out) else {
            return changed;
        };
        let mut res: Vec<Option<Result<LinuxFrame, PageError>>> = vec![None; n];
        let mut slots: Vec<Option<Arc<Slot>>> = vec![None; n];
        for (k, (g, &(page, token))) in guards.iter().zip(run).enumerate() {
            res[k] = if !g.protected || g.gen != token.0 {
                Some(Err(PageError::Stale(page)))
            } else {
                match (g.kind, &g.slot) {
                    (Kind::Store, Some(slot)) => Some(Ok(LinuxFrame(Some(slot.clone())))),
                    (Kind::Zero, _) => Some(Ok(LinuxFrame(None))),
                    _ => match self.store.allocate(region.home + page.index as u64) {
                        Ok(s) => {
                            slots[k] = Some(s);
                            None
                        }
                        Err(e) => Some(Err(e)),
                    },
                }
            };
        }
        let mut k = 0;
        while k < n {
            let Some(s0) = slots[k].as_ref().map(|s| s.index) else {
                k += 1;
                continue;
            };
            let mut j = k + 1;
            while j < n && slots[j].as_ref().map(|s| s.index) == Some(s0 + (j - k) as u64) {
                j += 1;
            }
            let addr = region.addr(pages[k].index);
            let run_slots: Vec<Arc<Slot>> =
                slots[k..j].iter_mut().filter_map(Option::take).collect();
            let r = sys::pwrite_from_guest(
                self.store.fd(),
                addr,
                (j - k) * PAGE_SIZE,
                run_slots[0].offset(),
            )
            .map_err(|e| {
                gone_or(
                    &region,
                    "pwrite (copy pages into the store)",
                    e,
                    &[Errno::FAULT],
                )
            })
            .and_then(|()| self.map_slots_run(&region, addr, &mut guards[k..j], &run_slots));
            for (i, slot) in (k..j).zip(run_slots) {
                res[i] = Some(r.clone().map(|()| LinuxFrame(Some(slot))));
                changed[i] = r.is_ok();
            }
            if r.is_ok() {
                self.counters
                    .canonicalized
                    .fetch_add((j - k) as u64, Ordering::Relaxed);
            }
            k = j;
        }
        drop(guards);
        drop(live);
        out.extend(
            res.into_iter()
                .map(|r| r.unwrap_or(Err(PageError::Unsupported("unreachable")))),
        );
        changed
    }

    /// Maps fresh anonymous memory (zeros) over the page at `addr`, which maps the store.
    fn map_anon(&self, region: &Region, addr: usize, st: &mut PageState) -> Result<(), PageError> {
        // Make sure the page is still ours (its mapping is still registered) first. The
        // probe protects (never unprotects): a write racing the remap must wait for it.
        if let Err(e) = self.uffd()?.writeprotect(addr, PAGE_SIZE, true, false) {
            return Err(uffd_gone_or(region, "UFFDIO_WRITEPROTECT (probe)", e));
        }
        self.guard.admit()?;
        // SAFETY: as in `map_slot`: a locked page of a live region that this backend may
        // remap; callers only do this where the page's contents are to read as zeros
        // (they are zeros already, or the page is being recycled).
        let r = unsafe { sys::map_anon_fixed(addr, PAGE_SIZE) };
        if let Err(e) = r {
            return Err(self.mmap_error("mmap of anonymous memory over a guest page", e));
        }
        st.kind = Kind::Zero;
        st.slot = None;
        st.registered = self.register(addr).is_ok();
        Ok(())
    }

    fn mmap_error(&self, op: &'static str, e: Errno) -> PageError {
        if e == Errno::NOMEM {
            let count = sys::count_mappings().unwrap_or(0);
            let limit = sys::max_map_count().unwrap_or(u64::MAX);
            if count + 8 >= limit {
                self.guard.refusals.fetch_add(1, Ordering::Relaxed);
                return PageError::MapCountLimit {
                    limit,
                    mappings: count,
                };
            }
        }
        PageError::Os {
            op,
            errno: e.raw_os_error(),
        }
    }

    /// A write fault at `addr`: unprotect the page, record the write, wake the writer.
    fn on_fault(&self, addr: usize) {
        let page_addr = addr & !(PAGE_SIZE - 1);
        bump(&self.counters.write_faults);
        let region = {
            let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
            regions
                .iter()
                .find(|r| r.base <= page_addr && page_addr < r.base + r.len())
                .cloned()
        };
        if let Some(region) = region {
            let live = region.live.read().unwrap_or_else(|e| e.into_inner());
            if *live {
                let mut st = region.lock((page_addr - region.base) / PAGE_SIZE);
                self.resolve_write(&region, page_addr, &mut st);
                return;
            }
        }
        if let Some(uffd) = &self.uffd {
            let _ = uffd.wake(page_addr, PAGE_SIZE);
        }
    }

    fn resolve_write(&self, region: &Region, addr: usize, st: &mut PageState) {
        let Some(uffd) = &self.uffd else { return };
        if st.kind == Kind::Store {
            // Break the sharing here, so that we know when the page stops mapping the slot.
            let freed = self.break_store(region, addr, st);
            bump(&self.counters.cow_breaks);
            let _ = uffd.wake(addr, PAGE_SIZE);
            // Free the slot (a punch-hole call) only after the writer is on its way.
            drop(freed);
        } else {
            if uffd.writeprotect(addr, PAGE_SIZE, false, true).is_err() {
                let _ = uffd.wake(addr, PAGE_SIZE);
            }
            if st.kind == Kind::Zero {
                st.kind = Kind::Anon;
            }
        }
        if st.protected {
            st.protected = false;
            st.gen += 1;
        }
    }

    /// Gives a page that maps the store a private copy (`MADV_POPULATE_WRITE`: the kernel's
    /// copy-on-write), without waking writers. Once that is certain the page no longer
    /// maps its slot: the slot is returned, for the caller to drop (which may free it)
    /// when it is done with the page.
    fn break_store(
        &self,
        region: &Region,
        addr: usize,
        st: &mut PageState,
    ) -> Result<Option<Arc<Slot>>, PageError> {
        self.unwp(region, addr, PAGE_SIZE, false)?;
        st.kind = Kind::StoreCow;
        // SAFETY: a page of a live region, locked by us, no longer write-protected (so the
        // populate cannot wait on our own fault thread). Populating for write copies the
        // page's contents into a private page; no contents change.
        let r = unsafe { sys::madvise(addr, PAGE_SIZE, Advice::LinuxPopulateWrite) };
        match r {
            Ok(()) => Ok(st.slot.take()),
            // The writer's own copy-on-write will break it; keep the slot until we know.
            Err(e) => Err(gone_or(
                region,
                "MADV_POPULATE_WRITE",
                e,
                &[Errno::NOMEM, Errno::FAULT],
            )),
        }
    }

    /// Unregisters a region being removed, gives its store-mapping pages private copies
    /// (adopted regions) and unmaps it (allocated ones). Called with `live` held
    /// exclusively and set to `false`.
    fn retire(&self, region: &Region) {
        let gone = region.unmapped.load(Ordering::Relaxed) || !self.still_mapped(region);
        if !gone && !region.owned {
            self.give_back(region);
        }
        if let (Some(uffd), false) = (&self.uffd, gone) {
            // Also wakes writers waiting on pages still registered; the fault thread wakes
            // the others once we are done (the region is no longer live).
            let _ = uffd.unregister(region.base, region.len());
        }
        if region.owned && !gone {
            // SAFETY: the region's mapping, made by `add_region`, still laid out as we left
            // it (so still ours); no operation runs on it (`live` is held).
            let _ = unsafe { sys::munmap(region.base, region.len()) };
        }
        for i in 0..region.pages.len() {
            let mut st = region.lock(i);
            if region.owned || gone || !matches!(st.kind, Kind::Store | Kind::StoreCow) {
                st.slot = None;
            }
        }
    }

    /// Turns every run of pages of an adopted region that lie in store mappings back into
    /// plain anonymous memory with the same contents: the run is write-protected (writers
    /// wait), copied into a fresh anonymous mapping, and that mapping is moved over it with
    /// `mremap`, which replaces the old mappings atomically. (A private mapping of the store
    /// left in the embedder's memory would show store contents again after an
    /// `MADV_DONTNEED`.) A run that fails is left as it is, its slots kept.
    fn give_back(&self, region: &Region) {
        let n = region.pages.len();
        let mut guards: Vec<MutexGuard<'_, PageState>> = (0..n).map(|i| region.lock(i)).collect();
        let in_store = |g: &PageState| matches!(g.kind, Kind::Store | Kind::StoreCow);
        let mut k = 0;
        while k < n {
            if !in_store(&guards[k]) {
                k += 1;
                continue;
            }
            let mut j = k;
            while j < n && in_store(&guards[j]) {
                j += 1;
            }
            let (addr, len) = (region.addr(k as u32), (j - k) * PAGE_SIZE);
            if self.move_anon_over(region, addr, len).is_ok() {
                for g in &mut guards[k..j] {
                    g.kind = Kind::Anon;
                    g.slot = None;
                    g.protected = false;
                    g.gen += 1;
                }
            }
            k = j;
        }
    }

    /// Replaces `[addr, addr + len)` (pages of `region`, locked) by anonymous memory with
    /// the same contents.
    fn move_anon_over(&self, region: &Region, addr: usize, len: usize) -> Result<(), PageError> {
        self.wp(region, addr, len)?;
        let scratch = sys::map_fresh_anon(len).map_err(|e| PageError::Os {
            op: "mmap (anonymous copy of a region given back)",
            errno: e.raw_os_error(),
        })?;
        // SAFETY: `scratch` is our fresh mapping of `len` bytes; nothing else refers to it.
        let copy = unsafe { std::slice::from_raw_parts_mut(scratch as *mut u8, len) };
        let r = sys::read_guest(self.pid, addr, copy)
            .map_err(|e| gone_or(region, "process_vm_readv (copy)", e, &[Errno::FAULT]))
            .and_then(|()| {
                // SAFETY: moves our scratch mapping over pages of a live region locked by us
                // and write-protected (no write can land meanwhile), with their exact
                // contents: no reader sees a change. The destination's old mappings are
                // replaced atomically.
                unsafe { sys::mremap_over(scratch, addr, len) }.map_err(|e| PageError::Os {
                    op: "mremap (give a region back as anonymous memory)",
                    errno: e.raw_os_error(),
                })
            });
        if r.is_err() {
            // SAFETY: the scratch mapping, not moved: still ours alone.
            let _ = unsafe { sys::munmap(scratch, len) };
        }
        r
    }

    /// Whether the region's range is still mapped the way this backend left it: no hole,
    /// and only anonymous memory or store pages (a region its owner unmapped is not).
    fn still_mapped(&self, region: &Region) -> bool {
        sys::range_is_ours(region.base, region.base + region.len())
    }
}

impl PageMemory for LinuxMemory {
    type Frame = LinuxFrame;

    fn regions(&self) -> Vec<RegionInfo> {
        self.live_regions().iter().map(|r| r.info).collect()
    }

    fn read_page(&self, page: PageId, buf: &mut [u8; PAGE_SIZE]) -> Result<(), PageError> {
        self.inner.with_page(page, |region, addr, _| {
            self.inner.read_guest(region, addr, &mut buf[..])
        })
    }

    fn read_words(&self, page: PageId, out: &mut [u64]) -> Result<(), PageError> {
        if out.len() > PAGE_WORDS {
            return Err(PageError::Unsupported("more words than a page holds"));
        }
        let mut bytes = [0u8; PAGE_SIZE];
        let n = out.len() * 8;
        self.inner.with_page(page, |region, addr, _| {
            self.inner.read_guest(region, addr, &mut bytes[..n])
        })?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *o = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        }
        Ok(())
    }

    fn protect(&self, pages: &[PageId]) -> Vec<Result<ProtectToken, PageError>> {
        let mut out = Vec::with_capacity(pages.len());
        for run in runs(pages) {
            self.inner.protect_run(run, &mut out);
        }
        out
    }

    fn unprotect(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        let mut out = Vec::with_capacity(pages.len());
        for run in runs(pages) {
            self.inner.unprotect_run(run, &mut out);
        }
        out
    }

    fn written_since(&self, page: PageId, token: ProtectToken) -> Result<bool, PageError> {
        let tracked = self.inner.uffd.is_some();
        self.inner.with_page(page, |_, _, s| {
            Ok(!tracked || !s.protected || s.gen != token.0)
        })
    }

    fn canonicalize(&self, page: PageId, token: ProtectToken) -> Result<LinuxFrame, PageError> {
        let inner = &self.inner;
        inner.uffd()?;
        let frame = inner.with_page(page, |region, addr, st| {
            if !st.protected || st.gen != token.0 {
                return Err(PageError::Stale(page));
            }
            match (st.kind, &st.slot) {
                // Already maps a store page (merged, or canonical before): that is its frame.
                (Kind::Store, Some(slot)) => return Ok((LinuxFrame(Some(slot.clone())), false)),
                (Kind::Zero, _) => return Ok((LinuxFrame(None), false)),
                _ => {}
            }
            let slot = inner.store.allocate(region.home + page.index as u64)?;
            sys::pwrite_from_guest(inner.store.fd(), addr, PAGE_SIZE, slot.offset()).map_err(
                |e| {
                    gone_or(
                        region,
                        "pwrite (copy a page into the store)",
                        e,
                        &[Errno::FAULT],
                    )
                },
            )?;
            inner.map_slot(region, addr, st, &slot)?;
            bump(&inner.counters.canonicalized);
            Ok((LinuxFrame(Some(slot)), true))
        })?;
        if frame.1 {
            inner.dirty(page);
        }
        Ok(frame.0)
    }

    fn merge(
        &self,
        dup: PageId,
        token: ProtectToken,
        canonical: &LinuxFrame,
    ) -> Result<MergeOutcome, PageError> {
        let inner = &self.inner;
        inner.uffd()?;
        if let Some(slot) = &canonical.0 {
            if !Arc::ptr_eq(&slot.store, &inner.store) {
                return Err(PageError::Unsupported("a frame of another LinuxMemory"));
            }
        }
        let outcome = inner.with_page(dup, |region, addr, st| {
            if !st.protected || st.gen != token.0 {
                return Ok((MergeOutcome::Changed, false));
            }
            match (&canonical.0, st.kind, &st.slot) {
                (None, Kind::Zero, _) => return Ok((MergeOutcome::Merged, false)),
                (Some(c), Kind::Store, Some(s)) if Arc::ptr_eq(c, s) => {
                    return Ok((MergeOutcome::Merged, false))
                }
                _ => {}
            }
            // Protected: no write can land while we compare and remap.
            let mut buf = [0u8; PAGE_SIZE];
            inner.read_guest(region, addr, &mut buf)?;
            if buf[..] != *canonical.as_ref() {
                return Ok((MergeOutcome::Differs, false));
            }
            match &canonical.0 {
                Some(slot) => {
                    inner.map_slot(region, addr, st, slot)?;
                    bump(&inner.counters.merges);
                }
                None => {
                    inner.zero_page(region, addr, st)?;
                    bump(&inner.counters.zero_merges);
                }
            }
            Ok((MergeOutcome::Merged, true))
        })?;
        if outcome.1 {
            inner.dirty(dup);
        }
        Ok(outcome.0)
    }

    fn canonicalize_batch(
        &self,
        pages: &[(PageId, ProtectToken)],
    ) -> Vec<Result<LinuxFrame, PageError>> {
        let mut out = Vec::with_capacity(pages.len());
        let max = self.inner.config.max_run_pages.max(1);
        let mut k = 0;
        while k < pages.len() {
            let first = pages[k].0;
            let mut j = k + 1;
            while j < pages.len()
                && j - k < max
                && pages[j].0.region == first.region
                && pages[j].0.index as u64 == first.index as u64 + (j - k) as u64
            {
                j += 1;
            }
            if j - k == 1 || self.inner.uffd.is_none() {
                out.extend(pages[k..j].iter().map(|&(p, t)| self.canonicalize(p, t)));
            } else {
                let done = out.len();
                let changed = self.inner.canonicalize_run(&pages[k..j], &mut out);
                for (&(p, _), c) in pages[k..j].iter().zip(&changed) {
                    if *c {
                        self.inner.dirty(p);
                    }
                }
                debug_assert_eq!(out.len(), done + (j - k));
            }
            k = j;
        }
        out
    }

    fn merge_batch(
        &self,
        items: &[(PageId, ProtectToken, &LinuxFrame)],
    ) -> Vec<Result<MergeOutcome, PageError>> {
        let inner = &self.inner;
        let mut out = Vec::with_capacity(items.len());
        let max = inner.config.max_run_pages.max(1);
        // The store slot of a frame of this memory (`None`: the zero frame, or foreign).
        let slot = |f: &LinuxFrame| -> Option<u64> {
            f.0.as_ref()
                .filter(|s| Arc::ptr_eq(&s.store, &inner.store))
                .map(|s| s.index)
        };
        let mut k = 0;
        while k < items.len() {
            let (first, _, frame) = items[k];
            let mut j = k + 1;
            if let (Some(s0), true) = (slot(frame), inner.uffd.is_some()) {
                while j < items.len() && j - k < max {
                    let (p, _, f) = items[j];
                    let d = (j - k) as u64;
                    if p.region != first.region
                        || p.index as u64 != first.index as u64 + d
                        || slot(f) != Some(s0 + d)
                    {
                        break;
                    }
                    j += 1;
                }
            }
            if j - k == 1 {
                out.push(self.merge(first, items[k].1, frame));
            } else {
                let changed = inner.merge_run(&items[k..j], &mut out);
                for (&(p, _, _), c) in items[k..j].iter().zip(&changed) {
                    if *c {
                        inner.dirty(p);
                    }
                }
            }
            k = j;
        }
        out
    }

    fn zero_frame(&self) -> LinuxFrame {
        LinuxFrame(None)
    }

    fn recycle(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        let mut out = Vec::with_capacity(pages.len());
        for run in runs(pages) {
            let start = out.len();
            self.inner.recycle_run(run, &mut out);
            for (p, r) in run.iter().zip(&out[start..]) {
                if r.is_ok() {
                    self.inner.dirty(*p);
                }
            }
        }
        out
    }

    fn unmerge(&self, page: PageId) -> Result<(), PageError> {
        let inner = &self.inner;
        if inner.uffd.is_none() {
            return inner.with_page(page, |_, _, _| Ok(()));
        }
        let changed = inner.with_page(page, |region, addr, st| {
            let changed = match st.kind {
                Kind::Store => {
                    inner.break_store(region, addr, st)?;
                    true
                }
                Kind::Zero => {
                    inner.unwp(region, addr, PAGE_SIZE, false)?;
                    // SAFETY: a page of a live region, locked, not write-protected: the
                    // populate allocates its private (zero) page; no contents change.
                    unsafe { sys::madvise(addr, PAGE_SIZE, Advice::LinuxPopulateWrite) }
                        .map_err(|e| gone_or(region, "MADV_POPULATE_WRITE", e, &[Errno::FAULT]))?;
                    st.kind = Kind::Anon;
                    true
                }
                Kind::Anon | Kind::StoreCow => {
                    if st.protected {
                        inner.unwp(region, addr, PAGE_SIZE, false)?;
                    }
                    false
                }
            };
            if let Some(uffd) = &inner.uffd {
                let _ = uffd.wake(addr, PAGE_SIZE);
            }
            if st.protected || changed {
                st.protected = false;
                st.gen += 1;
            }
            if changed {
                bump(&inner.counters.unmerged);
            }
            Ok(changed)
        })?;
        if changed {
            inner.dirty(page);
        }
        Ok(())
    }

    fn set_dirty_hook(&self, hook: Option<DirtyHook>) {
        *self.inner.hook.write().unwrap_or_else(|e| e.into_inner()) = hook;
    }
}

/// Splits `pages` into runs of consecutive pages of one region.
fn runs(pages: &[PageId]) -> impl Iterator<Item = &[PageId]> {
    pages.chunk_by(|a, b| a.region == b.region && b.index == a.index.wrapping_add(1))
}

impl Inner {
    /// Merges the (protected, all-zero) page at `addr` with the zero page.
    fn zero_page(&self, region: &Region, addr: usize, st: &mut PageState) -> Result<(), PageError> {
        match st.kind {
            Kind::Anon | Kind::Zero => {
                // SAFETY: a locked page of a live region whose contents are all zeros: after
                // dropping it, it reads as zeros (the kernel's zero page) again.
                unsafe { sys::madvise(addr, PAGE_SIZE, Advice::LinuxDontNeed) }
                    .map_err(|e| gone_or(region, "MADV_DONTNEED", e, &[Errno::NOMEM]))?;
                st.kind = Kind::Zero;
                // The empty entry is protected again (a marker) for the page's token.
                if self.wp(region, addr, PAGE_SIZE).is_err() {
                    st.protected = false;
                    st.gen += 1;
                    return Ok(());
                }
                self.check_window(region, addr, st);
            }
            Kind::Store | Kind::StoreCow => {
                self.map_anon(region, addr, st)?;
                if !st.registered || self.wp(region, addr, PAGE_SIZE).is_err() {
                    st.protected = false;
                    st.gen += 1;
                    return Ok(());
                }
                self.check_window(region, addr, st);
            }
        }
        Ok(())
    }

    /// Resolves `run` (consecutive pages of one region) to its region, or pushes `err`
    /// for each of its pages.
    fn run_region<T>(
        &self,
        run: &[PageId],
        out: &mut Vec<Result<T, PageError>>,
    ) -> Option<Arc<Region>> {
        let first = run[0];
        let fail = |out: &mut Vec<Result<T, PageError>>, e: PageError| {
            out.extend(run.iter().map(|_| Err(e.clone())));
        };
        let region = match self.region(first.region) {
            Ok(r) => r,
            Err(e) => {
                fail(out, e);
                return None;
            }
        };
        let end = first.index as u64 + run.len() as u64;
        if end > region.info.pages as u64 {
            for &p in run {
                out.push(if p.index < region.info.pages {
                    Err(PageError::Unsupported("run crosses the end of its region"))
                } else {
                    Err(PageError::NoSuchPage(p))
                });
            }
            return None;
        }
        Some(region)
    }

    fn protect_run(&self, run: &[PageId], out: &mut Vec<Result<ProtectToken, PageError>>) {
        let Some(region) = self.run_region(run, out) else {
            return;
        };
        let id = region.info.id;
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        let early = if !*live {
            Some(PageError::NoSuchRegion(id))
        } else if region.unmapped.load(Ordering::Relaxed) {
            Some(PageError::Unmapped(id))
        } else if self.uffd.is_none() {
            Some(PageError::Unsupported(NO_UFFD))
        } else {
            None
        };
        if let Some(e) = early {
            out.extend(run.iter().map(|_| Err(e.clone())));
            return;
        }
        let first = run[0].index as usize;
        let mut guards: Vec<MutexGuard<'_, PageState>> =
            (first..first + run.len()).map(|i| region.lock(i)).collect();
        // Pages whose remap could not be registered get another try; they are protected
        // one by one, and a write made while they were untracked is accounted for.
        let mut ok: Vec<Result<(), PageError>> = Vec::with_capacity(run.len());
        for (k, g) in guards.iter_mut().enumerate() {
            if g.registered {
                ok.push(Ok(()));
                continue;
            }
            let addr = region.addr((first + k) as u32);
            let r = self.register(addr).and_then(|()| {
                g.registered = true;
                self.wp(&region, addr, PAGE_SIZE)
            });
            if r.is_ok() {
                self.reconcile(&region, addr, g);
                g.protected = true;
            }
            ok.push(r);
        }
        // One UFFDIO_WRITEPROTECT per sub-run that needs it.
        let mut k = 0;
        while k < run.len() {
            if ok[k].is_err() {
                k += 1;
                continue;
            }
            let mut j = k;
            let mut needed = false;
            while j < run.len() && ok[j].is_ok() {
                needed |= !guards[j].protected && guards[j].kind != Kind::Store;
                j += 1;
            }
            if needed {
                let addr = region.addr((first + k) as u32);
                if let Err(e) = self.wp(&region, addr, (j - k) * PAGE_SIZE) {
                    for r in &mut ok[k..j] {
                        *r = Err(e.clone());
                    }
                }
            }
            k = j;
        }
        for (g, r) in guards.iter_mut().zip(ok) {
            out.push(r.map(|()| {
                g.protected = true;
                ProtectToken(g.gen)
            }));
            // (A page that could not be protected keeps its state; its old tokens stay
            // as valid or stale as they were.)
        }
    }

    fn unprotect_run(&self, run: &[PageId], out: &mut Vec<Result<(), PageError>>) {
        let Some(region) = self.run_region(run, out) else {
            return;
        };
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live || region.unmapped.load(Ordering::Relaxed) {
            let e = if *live {
                PageError::Unmapped(region.info.id)
            } else {
                PageError::NoSuchRegion(region.info.id)
            };
            out.extend(run.iter().map(|_| Err(e.clone())));
            return;
        }
        let first = run[0].index as usize;
        for (k, _) in run.iter().enumerate() {
            let mut st = region.lock(first + k);
            let r = if st.protected {
                // A store page keeps its protection (the fault thread must see its
                // copy-on-write break); it only stops being protected for the engine.
                let r = if st.kind != Kind::Store && st.registered && self.uffd.is_some() {
                    self.unwp(&region, region.addr((first + k) as u32), PAGE_SIZE, true)
                } else {
                    Ok(())
                };
                st.protected = false;
                st.gen += 1;
                r
            } else {
                Ok(())
            };
            out.push(r);
        }
    }

    fn recycle_run(&self, run: &[PageId], out: &mut Vec<Result<(), PageError>>) {
        let Some(region) = self.run_region(run, out) else {
            return;
        };
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live || region.unmapped.load(Ordering::Relaxed) {
            let e = if *live {
                PageError::Unmapped(region.info.id)
            } else {
                PageError::NoSuchRegion(region.info.id)
            };
            out.extend(run.iter().map(|_| Err(e.clone())));
            return;
        }
        let first = run[0].index as usize;
        let mut guards: Vec<MutexGuard<'_, PageState>> =
            (first..first + run.len()).map(|i| region.lock(i)).collect();
        let mut res: Vec<Result<(), PageError>> = vec![Ok(()); run.len()];
        let mut k = 0;
        while k < run.len() {
            let anon = |g: &PageState| matches!(g.kind, Kind::Anon | Kind::Zero);
            if anon(&guards[k]) {
                let mut j = k;
                while j < run.len() && anon(&guards[j]) {
                    j += 1;
                }
                let addr = region.addr((first + k) as u32);
                // SAFETY: pages of a live region, locked by us; recycling drops their
                // contents by definition (they then read as zeros).
                let r = unsafe { sys::madvise(addr, (j - k) * PAGE_SIZE, Advice::LinuxDontNeed) };
                if let Err(e) = r {
                    let e = gone_or(&region, "MADV_DONTNEED (recycle)", e, &[Errno::NOMEM]);
                    for r in &mut res[k..j] {
                        *r = Err(e.clone());
                    }
                }
                k = j;
            } else {
                let addr = region.addr((first + k) as u32);
                res[k] = if self.uffd.is_some() {
                    self.map_anon(&region, addr, &mut guards[k])
                } else {
                    Err(PageError::Unsupported(NO_UFFD))
                };
                k += 1;
            }
        }
        for (g, r) in guards.iter_mut().zip(res) {
            if r.is_ok() {
                g.kind = Kind::Zero;
                g.protected = false;
                g.gen += 1;
                bump(&self.counters.recycled);
            }
            out.push(r);
        }
    }
}
