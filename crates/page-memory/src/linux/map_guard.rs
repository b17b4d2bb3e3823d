//! The map-count guard: keeps the process below `vm.max_map_count` (see *The map-count
//! limit* in the module docs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sys;
use crate::PageError;

/// Keeps the process below `vm.max_map_count` (see the module docs).
pub(super) struct MapGuard {
    pub(super) limit: AtomicU64,
    pub(super) reserve: Option<u64>,
    /// Upper bound of the process's mappings: the last count plus two per remap since.
    pub(super) estimate: AtomicU64,
    pub(super) counted: AtomicU64,
    pub(super) last_count: Mutex<Instant>,
    pub(super) refusals: AtomicU64,
    pub(super) recounts: AtomicU64,
}

impl MapGuard {
    /// Minimum time between two counts while refusing.
    const RECOUNT_EVERY: Duration = Duration::from_millis(20);

    pub(super) fn new(reserve: Option<u64>) -> MapGuard {
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

    pub(super) fn ceiling(&self) -> u64 {
        let limit = self.limit.load(Ordering::Relaxed);
        let reserve = self.reserve.unwrap_or((limit / 16).max(256));
        limit.saturating_sub(reserve)
    }

    /// The upper bound of the process's mappings, or (`recount`) a fresh count.
    pub(super) fn in_use(&self, recount: bool) -> u64 {
        if recount {
            let mut last = self.last_count.lock().unwrap_or_else(|e| e.into_inner());
            self.recount(&mut last);
        }
        self.estimate.load(Ordering::Relaxed)
    }

    /// Counts the process's mappings (the estimate becomes the count), holding
    /// `last_count` (`last`), which it sets to now.
    fn recount(&self, last: &mut Instant) {
        if let Some(count) = sys::count_mappings() {
            self.counted.store(count, Ordering::Relaxed);
            self.estimate.store(count, Ordering::Relaxed);
        }
        self.recounts.fetch_add(1, Ordering::Relaxed);
        *last = Instant::now();
    }

    /// Admits one remap (which may add two mappings), or refuses it.
    pub(super) fn admit(&self) -> Result<(), PageError> {
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
            self.recount(&mut last);
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
