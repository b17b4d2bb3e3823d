//! Statistics, with Linux KSM's names where the meaning is the same.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use page_memory::PAGE_SIZE;

/// Engine-wide counters, updated by the work threads.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) pages_shared: AtomicI64,
    pub(crate) pages_sharing: AtomicI64,
    pub(crate) pages_unshared: AtomicI64,
    pub(crate) pages_unique: AtomicI64,
    pub(crate) zero_pages: AtomicI64,
    pub(crate) full_scans: AtomicU64,
    pub(crate) merges: AtomicU64,
    pub(crate) merge_races: AtomicU64,
    pub(crate) cow_breaks: AtomicU64,
    pub(crate) recycled: AtomicU64,
    pub(crate) canonicalized: AtomicU64,
    pub(crate) pages_read: AtomicU64,
    pub(crate) refused_map_count: AtomicU64,
    pub(crate) refused_pinned: AtomicU64,
    pub(crate) refused_errors: AtomicU64,
    pub(crate) insert_races: AtomicU64,
    pub(crate) claim_deferrals: AtomicU64,
    pub(crate) map_count_events: AtomicU64,
    pub(crate) map_count_limit: AtomicU64,
    pub(crate) map_count_mappings: AtomicU64,
}

/// Per-work-thread counters.
#[derive(Default)]
pub(crate) struct WorkerCounters {
    pub(crate) pages_scanned: AtomicU64,
    pub(crate) busy_ns: AtomicU64,
    pub(crate) tasks: AtomicU64,
    pub(crate) steals: AtomicU64,
}

/// One work thread's share of the work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Pages this thread examined.
    pub pages_scanned: u64,
    /// Time it spent working (not waiting).
    pub busy: Duration,
    /// Chunks of pages it processed.
    pub tasks: u64,
    /// Of those, chunks it stole from another thread's queue.
    pub steals: u64,
}

impl WorkerStats {
    /// Pages examined per second of work.
    pub fn scan_rate(&self) -> f64 {
        let s = self.busy.as_secs_f64();
        if s > 0.0 {
            self.pages_scanned as f64 / s
        } else {
            0.0
        }
    }
}

/// A snapshot of an engine's statistics.
///
/// `pages_shared`, `pages_sharing`, `pages_unshared`, `pages_volatile`, `full_scans`,
/// `pages_scanned` and `general_profit` mean what they mean in Linux KSM's sysfs;
/// `zero_pages` is `ksm_zero_pages`.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Pages examined, all passes together.
    pub pages_scanned: u64,
    /// Canonical pages mapped by two or more pages.
    pub pages_shared: u64,
    /// Pages mapping a canonical page beyond its first: pages saved.
    pub pages_sharing: u64,
    /// Pages with no twin, indexed for merging: unique pages indexed where they are
    /// (`pages_unique`), plus canonical pages mapped only by the page they came from (their
    /// twins were written since). KSM counts its unstable tree's pages here.
    pub pages_unshared: u64,
    /// Stable pages with no twin found, indexed where they are: write-protected, neither
    /// copied nor remapped (see *Unique pages* in the crate docs).
    pub pages_unique: u64,
    /// Pages that changed too recently to be merged (at the end of the last pass).
    pub pages_volatile: u64,
    /// Pages write-protected and being watched for stability (end of the last pass).
    pub pages_watched: u64,
    /// Merge passes that covered every page.
    pub full_scans: u64,
    /// Pages merged with the zero page.
    pub zero_pages: u64,
    /// Successful merges, all time.
    pub merges: u64,
    /// Merges and canonicalizations abandoned because the page was written while being
    /// merged (the backend found it changed, or different from the canonical page).
    pub merge_races: u64,
    /// Pages made canonical (each costs the backend a copy: on Linux, a store slot and a
    /// remap), all time. A page is made canonical only once a twin is found (unless
    /// [`Config::unique_in_place`](crate::Config::unique_in_place) is off).
    pub canonicalized: u64,
    /// Pages read (their contents copied from guest memory, on Linux with
    /// `process_vm_readv`), all time: KSM's checksum test reads a page twice before it is
    /// protected (the second time under protection, which makes its print exact); a
    /// stable page whose print is known is then merged, made canonical or indexed without
    /// being read again.
    pub pages_read: u64,
    /// Canonicalizations wasted: the page was made canonical, but an equal page of
    /// another thread was inserted in the tree first, so it was merged with that one.
    /// Kept near zero by the claims described in the crate docs (*Convergence*).
    pub insert_races: u64,
    /// Stable pages whose canonicalization was put off to the next pass because another
    /// thread was making an equal page canonical at the same time (a claim lost).
    pub claim_deferrals: u64,
    /// Merges and canonicalizations the backend refused to stay below the process's
    /// mapping limit ([`PageError::MapCountLimit`](page_memory::PageError::MapCountLimit)).
    pub refused_map_count: u64,
    /// Pages the backend refused because they are, or may be, pinned
    /// ([`PageError::Pinned`](page_memory::PageError::Pinned)): protect, merge or
    /// canonicalize.
    pub refused_pinned: u64,
    /// Operations refused for any other error (a region gone, an OS call failed).
    pub refused_errors: u64,
    /// Pages parked until the mapping budget has room again (end of the last pass over
    /// each chunk): stable and protected, waiting, not retried every pass.
    pub map_count_parked: u64,
    /// Times the engine ran into the mapping limit (one per episode: each
    /// [`Event::MapCountLimit`](crate::Event::MapCountLimit) sent).
    pub map_count_events: u64,
    /// The mapping limit the backend reported at the last refusal (`vm.max_map_count` on
    /// Linux); 0 if it never refused for it.
    pub map_count_limit: u64,
    /// The process's mappings the backend reported at the last refusal.
    pub map_count_mappings: u64,
    /// Merged or canonical pages whose sharing a guest write broke.
    pub cow_breaks: u64,
    /// Pages a scan hook (the Per Page Recycler) recycled.
    pub recycled: u64,
    /// Canonical pages indexed in the SD trees.
    pub canonical_indexed: u64,
    /// Engine metadata per tracked page, in bytes (page state; the SD tree's node and
    /// entry per canonical page are counted in `metadata_bytes`).
    pub metadata_bytes_per_page: usize,
    /// All engine metadata, in bytes (page states, canonical records, tree nodes).
    pub metadata_bytes: u64,
    /// Bytes saved by sharing and zero pages, minus the engine's metadata.
    pub general_profit: i64,
    /// Per work thread.
    pub workers: Vec<WorkerStats>,
}

impl Stats {
    /// Bytes of guest memory freed by merging (sharing plus zero pages).
    pub fn bytes_saved(&self) -> u64 {
        (self.pages_sharing + self.zero_pages) * PAGE_SIZE as u64
    }
}

pub(crate) fn get(a: &AtomicI64) -> u64 {
    a.load(Ordering::Relaxed).max(0) as u64
}
