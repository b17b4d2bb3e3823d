//! Counters ([`LinuxStats`]) and real memory figures ([`LinuxUsage`], [`PageCensus`]) of
//! a [`LinuxMemory`](super::LinuxMemory).

use std::sync::atomic::{AtomicU64, Ordering};

use super::sys;
use crate::{PageError, PAGE_SIZE};

/// Counters of a [`LinuxMemory`](super::LinuxMemory) since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Pages discarded by the embedder through
    /// [`LinuxMemory::discard`](super::LinuxMemory::discard).
    pub discarded: u64,
    /// Times the process's pinned or locked memory (`VmPin`, `VmLck`) was found grown
    /// past the baseline and the declared pinned ranges (each time it starts to be).
    pub pin_alarms: u64,
    /// Pages refused because they are declared pinned or because the process holds pins
    /// nobody declared ([`PageError::Pinned`](crate::PageError::Pinned)).
    pub pin_refusals: u64,
    /// Bytes of pinned or locked memory nobody declared, at the last check (0: none):
    /// while it is not 0, nothing is protected, merged, recycled or discarded.
    pub undeclared_pinned_bytes: u64,
    /// Pages declared pinned now.
    pub declared_pinned_pages: u64,
    /// Pages given a private copy again by `unmerge`.
    pub unmerged: u64,
    /// Writes caught in the window between a remap and its protection.
    pub window_writes: u64,
    /// Freshly remapped pages that could not be registered or write-protected: each got
    /// no token (it is unprotected, its tokens stale) and is protected again by the next
    /// `protect` that succeeds on it.
    pub settle_failures: u64,
    /// Pages found unmapped or moved away by their owner (`UFFD_EVENT_UNMAP` and
    /// `UFFD_EVENT_REMAP` the backend did not cause): they are gone, and every operation
    /// on them fails with [`PageError::Unmapped`](crate::PageError::Unmapped).
    pub foreign_unmaps: u64,
    /// Pages their owner dropped itself (`MADV_DONTNEED`, `UFFD_EVENT_REMOVE` the backend
    /// did not cause): their tokens died; see *Discards* in the module docs.
    pub foreign_removes: u64,
    /// `mremap` moves of guest memory by its owner (`UFFD_EVENT_REMAP`).
    pub foreign_remaps: u64,
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
#[non_exhaustive]
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
    /// `VmPin` of the process (bytes): memory pinned for the long term (io_uring fixed
    /// buffers, RDMA, vhost-vdpa), guest memory or not.
    pub process_pinned: u64,
    /// `VmLck` of the process (bytes): locked memory (`mlock`, VFIO type 1 DMA maps).
    pub process_locked: u64,
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
#[non_exhaustive]
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

/// The counters behind [`LinuxStats`] (the map guard and the store keep their own).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) write_faults: AtomicU64,
    pub(super) cow_breaks: AtomicU64,
    pub(super) canonicalized: AtomicU64,
    pub(super) merges: AtomicU64,
    pub(super) zero_merges: AtomicU64,
    pub(super) recycled: AtomicU64,
    pub(super) unmerged: AtomicU64,
    pub(super) window_writes: AtomicU64,
    pub(super) settle_failures: AtomicU64,
    pub(super) discarded: AtomicU64,
    pub(super) foreign_unmaps: AtomicU64,
    pub(super) foreign_removes: AtomicU64,
    pub(super) foreign_remaps: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts what the pages of `ranges` map.
pub(super) fn census(
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
