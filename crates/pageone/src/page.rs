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
        let mut stable: Vec<(u32, ProtectToken)> = Vec::new();
        for (i, e) in entries.iter_mut().enumerate() {
            let page = PageId::new(chunk.region, chunk.first + i as u32);
            // Per thread only: a shared counter here would bounce its cache line between
            // the work threads on every page (`stats()` sums them).
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
                        stable.push((i as u32, token));
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
        if !stable.is_empty() {
            self.merge_stable(chunk, &mut entries, &stable);
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

    /// Pages that stayed unwritten for `stable_periods` passes (`stable`, in page order):
    /// merge each with an equal canonical page or the zero page, or make it canonical.
    ///
    /// Done in batches, so the backend can remap runs of pages at once: pages are read
    /// (protected and unwritten, so what we read is what they hold) and looked up; the
    /// ones with no canonical match are canonicalized together
    /// ([`PageMemory::canonicalize_batch`]) and inserted; then the merges go to the backend
    /// together ([`PageMemory::merge_batch`]), which re-checks each page's protection and
    /// compares it in full as it switches. The result is what merging page by page gives:
    /// a batch is flushed early when a page would take a canonical page past
    /// `max_page_sharing` counting the batch's own merges, or may equal a page of the batch
    /// that is to become canonical (same fingerprint), so that the lookup after the flush
    /// sees it.
    fn merge_stable(
        &self,
        chunk: &Chunk<M::Frame>,
        entries: &mut [PageEntry<M::Frame>],
        stable: &[(u32, ProtectToken)],
    ) {
        let domain = chunk.domain;
        let id = |i: u32| PageId::new(chunk.region, chunk.first + i);
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        let mut batch = Batch::default();
        for &(i, token) in stable {
            if self.memory.read_page(id(i), &mut buf).is_err() {
                entries[i as usize].phase = Phase::Volatile;
                continue;
            }
            if is_zero_page(&buf[..]) {
                batch.merges.push((i, token, None));
                continue;
            }
            let print = fingerprint(&buf[..]);
            if batch.prints.contains(&print) {
                self.flush(chunk, entries, &mut batch);
            }
            loop {
                match self.canons.find(domain, &buf[..]) {
                    Found::Existing(c) => {
                        let extra =
                            batch.pending.iter().filter(|p| Arc::ptr_eq(p, &c)).count() as u32;
                        if extra > 0 && !self.canons.has_room(&c, extra + 1) {
                            // Merging would overfill it: settle the batch, then look again
                            // (the full page is then taken out of the tree).
                            self.flush(chunk, entries, &mut batch);
                            continue;
                        }
                        batch.pending.push(c.clone());
                        batch.merges.push((i, token, Some(c)));
                    }
                    Found::Vacant => {
                        batch.prints.push(print);
                        batch.vacant.push((id(i), token));
                    }
                }
                break;
            }
        }
        self.flush(chunk, entries, &mut batch);
    }

    /// Canonicalizes and merges what `batch` holds, and empties it.
    fn flush(
        &self,
        chunk: &Chunk<M::Frame>,
        entries: &mut [PageEntry<M::Frame>],
        batch: &mut Batch<M::Frame>,
    ) {
        let domain = chunk.domain;
        let id = |i: u32| PageId::new(chunk.region, chunk.first + i);
        let mut to_merge = std::mem::take(&mut batch.merges);
        let vacant = std::mem::take(&mut batch.vacant);
        batch.pending.clear();
        batch.prints.clear();
        if !vacant.is_empty() {
            let frames = self.memory.canonicalize_batch(&vacant);
            let mut late = false;
            for (&(page, token), r) in vacant.iter().zip(frames) {
                let i = page.index - chunk.first;
                let e = &mut entries[i as usize];
                let Ok(frame) = r else {
                    self.raced(e);
                    continue;
                };
                match self.canons.insert(domain, frame, self.counters) {
                    Ok(mine) => {
                        e.phase = Phase::Canonical { token, canon: mine };
                        e.backoff = 0;
                    }
                    // An equal page became canonical meanwhile (another thread's): merge
                    // with it.
                    Err(other) => {
                        to_merge.push((i, token, Some(other)));
                        late = true;
                    }
                }
            }
            // Keep page order, so the backend sees runs.
            if late {
                to_merge.sort_by_key(|m| m.0);
            }
        }
        if to_merge.is_empty() {
            return;
        }
        let items: Vec<(PageId, ProtectToken, &M::Frame)> = to_merge
            .iter()
            .map(|(i, token, c)| (id(*i), *token, c.as_ref().map_or(self.zero, |c| &c.frame)))
            .collect();
        let outcomes = self.memory.merge_batch(&items);
        drop(items);
        for ((i, token, canon), r) in to_merge.into_iter().zip(outcomes) {
            let e = &mut entries[i as usize];
            match (r, canon) {
                (Ok(MergeOutcome::Merged), None) => {
                    e.phase = Phase::Zero { token };
                    e.backoff = 0;
                    self.counters.zero_pages.fetch_add(1, Ordering::Relaxed);
                    self.counters.merges.fetch_add(1, Ordering::Relaxed);
                }
                (Ok(MergeOutcome::Merged), Some(canon)) => {
                    self.canons.add_sharer(&canon, self.counters);
                    self.counters.merges.fetch_add(1, Ordering::Relaxed);
                    e.phase = Phase::Merged { token, canon };
                    e.backoff = 0;
                }
                // `Differs`: the tree verified equality against our snapshot of a protected
                // page, so the backend saw a write we did not: treat it as one.
                (Ok(MergeOutcome::Differs | MergeOutcome::Changed) | Err(_), _) => self.raced(e),
            }
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

/// A merge to do: (index in the chunk, token, canonical page; `None` for the zero frame).
type PendingMerge<F> = (u32, ProtectToken, Option<Arc<Canon<F>>>);

/// Merges and canonicalizations gathered for one call of each batch operation.
struct Batch<F> {
    /// (index in the chunk, token, canonical page; `None` for the zero frame), page order.
    merges: Vec<PendingMerge<F>>,
    /// Pages to become canonical, page order.
    vacant: Vec<(PageId, ProtectToken)>,
    /// The canonical pages `merges` adds sharers to, once per merge.
    pending: Vec<Arc<Canon<F>>>,
    /// Fingerprints of the pages in `vacant`.
    prints: Vec<u64>,
}

impl<F> Default for Batch<F> {
    fn default() -> Self {
        Batch {
            merges: Vec::new(),
            vacant: Vec::new(),
            pending: Vec::new(),
            prints: Vec::new(),
        }
    }
}

/// A 64-bit fingerprint of a page (every word counts): equal pages have equal ones.
fn fingerprint(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [1u64, 2, 3, 4];
    for c in bytes.chunks_exact(32) {
        for (l, w) in lanes.iter_mut().zip(c.chunks_exact(8)) {
            let w = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            *l = (*l ^ w).wrapping_mul(K).rotate_left(29);
        }
    }
    lanes
        .iter()
        .fold(0u64, |h, &l| (h ^ l).wrapping_mul(K).rotate_left(31))
}

/// Bytes of engine state per tracked page.
pub(crate) fn entry_bytes<F>() -> usize {
    std::mem::size_of::<PageEntry<F>>()
}
