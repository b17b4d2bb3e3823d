//! Page states and what a pass does to each page of a chunk.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use page_memory::{
    is_zero_page, DomainId, MergeOutcome, PageId, PageMemory, ProtectToken, RegionId, PAGE_SIZE,
};

use crate::canon::{Canon, Canons, Found};
use crate::stats::{Counters, WorkerCounters};
use crate::ScanHook;

/// Pages per chunk: the unit of work a thread takes (and steals).
pub(crate) const CHUNK_PAGES: u32 = 512;

/// Where a page is in its life cycle.
pub(crate) enum Phase<F> {
    /// Changed recently (or never looked at): a candidate for protection.
    Volatile,
    /// Write-protected since `token`, unwritten for `periods` merge passes.
    Watch { token: ProtectToken, periods: u8 },
    /// Maps its own frozen frame, which is canonical (indexed, or full and retired).
    Canonical {
        token: ProtectToken,
        canon: Arc<Canon<F>>,
    },
    /// Maps another page's canonical frame.
    Merged {
        token: ProtectToken,
        canon: Arc<Canon<F>>,
    },
    /// Maps the zero frame.
    Zero { token: ProtectToken },
}

/// The engine's record of one guest page.
pub(crate) struct PageEntry<F> {
    pub(crate) phase: Phase<F>,
    /// Times the page changed while watched or merged (saturating at the configured max).
    backoff: u8,
    /// Merge passes still to skip.
    skip: u8,
}

impl<F> PageEntry<F> {
    fn new() -> Self {
        PageEntry {
            phase: Phase::Volatile,
            backoff: 0,
            skip: 0,
        }
    }
}

/// A run of pages of one region, processed by one thread at a time.
pub(crate) struct Chunk<F> {
    pub(crate) region: RegionId,
    pub(crate) domain: DomainId,
    pub(crate) first: u32,
    pages: u32,
    pub(crate) entries: Mutex<Vec<PageEntry<F>>>,
    /// Gauges written at the end of each merge pass over this chunk.
    volatile: AtomicU32,
    watched: AtomicU32,
}

impl<F> Chunk<F> {
    pub(crate) fn new(region: RegionId, domain: DomainId, first: u32, pages: u32) -> Self {
        Chunk {
            region,
            domain,
            first,
            pages,
            entries: Mutex::new((0..pages).map(|_| PageEntry::new()).collect()),
            volatile: AtomicU32::new(pages),
            watched: AtomicU32::new(0),
        }
    }

    pub(crate) fn len(&self) -> u32 {
        self.pages
    }

    pub(crate) fn gauges(&self) -> (u32, u32) {
        (
            self.volatile.load(Ordering::Relaxed),
            self.watched.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PageEntry<F>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a pass does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PassKind {
    /// Notice writes, protect volatile pages, merge stable ones.
    Merge,
    /// Notice writes and give volatile pages to the scan hook; no protecting or merging.
    Base,
    /// Give every merged page a private copy again.
    Unmerge,
}

/// Everything a pass over a chunk needs.
pub(crate) struct Ctx<'a, M: PageMemory> {
    pub(crate) memory: &'a M,
    pub(crate) canons: &'a Canons<M::Frame>,
    pub(crate) counters: &'a Counters,
    pub(crate) worker: &'a WorkerCounters,
    pub(crate) hook: Option<&'a dyn ScanHook<M>>,
    pub(crate) zero: &'a M::Frame,
    pub(crate) stable_periods: u8,
    pub(crate) max_backoff: u8,
}

impl<M: PageMemory> Ctx<'_, M> {
    /// Runs `kind` over every page of `chunk`.
    pub(crate) fn run(&self, chunk: &Chunk<M::Frame>, kind: PassKind) {
        let mut entries = chunk.lock();
        let mut to_protect: Vec<u32> = Vec::new();
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for (i, e) in entries.iter_mut().enumerate() {
            let page = PageId::new(chunk.region, chunk.first + i as u32);
            self.counters.pages_scanned.fetch_add(1, Ordering::Relaxed);
            self.worker.pages_scanned.fetch_add(1, Ordering::Relaxed);
            if kind == PassKind::Unmerge {
                self.unmerge(e, page, chunk.domain);
                continue;
            }
            self.notice_writes(e, page, chunk.domain);
            match e.phase {
                Phase::Volatile => {
                    if let Some(hook) = self.hook {
                        if hook.examine(self.memory, page) {
                            self.counters.recycled.fetch_add(1, Ordering::Relaxed);
                            e.skip = 0;
                            continue;
                        }
                    }
                    if kind == PassKind::Merge {
                        if e.skip > 0 {
                            e.skip -= 1;
                        } else {
                            to_protect.push(i as u32);
                        }
                    }
                }
                Phase::Watch { token, periods } if kind == PassKind::Merge => {
                    if periods + 1 >= self.stable_periods {
                        self.try_merge(e, page, chunk.domain, token, &mut buf);
                    } else {
                        e.phase = Phase::Watch {
                            token,
                            periods: periods + 1,
                        };
                    }
                }
                _ => {}
            }
        }
        if !to_protect.is_empty() {
            let pages: Vec<PageId> = to_protect
                .iter()
                .map(|&i| PageId::new(chunk.region, chunk.first + i))
                .collect();
            for (&i, r) in to_protect.iter().zip(self.memory.protect(&pages)) {
                if let Ok(token) = r {
                    entries[i as usize].phase = Phase::Watch { token, periods: 0 };
                }
            }
        }
        if kind == PassKind::Merge {
            let (mut v, mut w) = (0, 0);
            for e in entries.iter() {
                match e.phase {
                    Phase::Volatile => v += 1,
                    Phase::Watch { .. } => w += 1,
                    _ => {}
                }
            }
            chunk.volatile.store(v, Ordering::Relaxed);
            chunk.watched.store(w, Ordering::Relaxed);
        }
    }

    /// If the page was written since its token, it is volatile again: drop what it held.
    fn notice_writes(&self, e: &mut PageEntry<M::Frame>, page: PageId, domain: DomainId) {
        let token = match &e.phase {
            Phase::Volatile => return,
            Phase::Watch { token, .. }
            | Phase::Canonical { token, .. }
            | Phase::Merged { token, .. }
            | Phase::Zero { token } => *token,
        };
        // A page that went away reads as written: it is dropped to volatile.
        if !self.memory.written_since(page, token).unwrap_or(true) {
            return;
        }
        match std::mem::replace(&mut e.phase, Phase::Volatile) {
            Phase::Canonical { canon, .. } | Phase::Merged { canon, .. } => {
                self.canons.drop_sharer(domain, &canon, self.counters);
                self.counters.cow_breaks.fetch_add(1, Ordering::Relaxed);
            }
            Phase::Zero { .. } => {
                self.counters.zero_pages.fetch_sub(1, Ordering::Relaxed);
                self.counters.cow_breaks.fetch_add(1, Ordering::Relaxed);
            }
            Phase::Watch { .. } | Phase::Volatile => {}
        }
        self.back_off(e);
    }

    fn back_off(&self, e: &mut PageEntry<M::Frame>) {
        e.backoff = e.backoff.saturating_add(1).min(self.max_backoff);
        e.skip = e.backoff;
    }

    /// A page stayed unwritten for `stable_periods` passes: merge it with an equal
    /// canonical page, with the zero page, or make it canonical.
    fn try_merge(
        &self,
        e: &mut PageEntry<M::Frame>,
        page: PageId,
        domain: DomainId,
        token: ProtectToken,
        buf: &mut [u8; PAGE_SIZE],
    ) {
        // Protected and unwritten: what we read is what the page holds.
        if self.memory.read_page(page, buf).is_err() {
            e.phase = Phase::Volatile;
            return;
        }
        if is_zero_page(&buf[..]) {
            match self.memory.merge(page, token, self.zero) {
                Ok(MergeOutcome::Merged) => {
                    e.phase = Phase::Zero { token };
                    e.backoff = 0;
                    self.counters.zero_pages.fetch_add(1, Ordering::Relaxed);
                    self.counters.merges.fetch_add(1, Ordering::Relaxed);
                }
                _ => self.raced(e),
            }
            return;
        }
        let canon = match self.canons.find(domain, &buf[..]) {
            Found::Existing(c) => c,
            Found::Vacant => {
                let Ok(frame) = self.memory.canonicalize(page, token) else {
                    return self.raced(e);
                };
                match self.canons.insert(domain, frame, self.counters) {
                    Ok(mine) => {
                        e.phase = Phase::Canonical { token, canon: mine };
                        e.backoff = 0;
                        return;
                    }
                    // An equal page became canonical meanwhile: merge with it.
                    Err(other) => other,
                }
            }
        };
        match self.memory.merge(page, token, &canon.frame) {
            Ok(MergeOutcome::Merged) => {
                self.canons.add_sharer(&canon, self.counters);
                self.counters.merges.fetch_add(1, Ordering::Relaxed);
                e.phase = Phase::Merged { token, canon };
                e.backoff = 0;
            }
            Ok(MergeOutcome::Differs) => {
                // The tree verified equality against our snapshot of a protected page, so
                // this means the backend saw a write we did not: treat it as one.
                self.raced(e)
            }
            Ok(MergeOutcome::Changed) | Err(_) => self.raced(e),
        }
    }

    fn raced(&self, e: &mut PageEntry<M::Frame>) {
        self.counters.merge_races.fetch_add(1, Ordering::Relaxed);
        e.phase = Phase::Volatile;
        self.back_off(e);
    }

    fn unmerge(&self, e: &mut PageEntry<M::Frame>, page: PageId, domain: DomainId) {
        match std::mem::replace(&mut e.phase, Phase::Volatile) {
            Phase::Canonical { canon, .. } | Phase::Merged { canon, .. } => {
                let _ = self.memory.unmerge(page);
                self.canons.drop_sharer(domain, &canon, self.counters);
            }
            Phase::Zero { .. } => {
                let _ = self.memory.unmerge(page);
                self.counters.zero_pages.fetch_sub(1, Ordering::Relaxed);
            }
            Phase::Watch { .. } => {
                let _ = self.memory.unprotect(&[page]);
            }
            Phase::Volatile => {}
        }
        e.backoff = 0;
        e.skip = 0;
    }
}

/// Bytes of engine state per tracked page.
pub(crate) fn entry_bytes<F>() -> usize {
    std::mem::size_of::<PageEntry<F>>()
}
