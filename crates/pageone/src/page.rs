//! Page states and what a pass does to each page of a chunk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use page_memory::{
    is_zero_page, DomainId, MergeOutcome, PageError, PageId, PageMemory, ProtectToken, RegionId,
    PAGE_SIZE,
};

use crate::budget::{Gates, MapGate};
use crate::canon::{Canon, Canons, Claim, Claims, Found};
use crate::config::EventHook;
use crate::stats::{Counters, WorkerCounters};
use crate::unique::{Pair, UniqueRef, Uniques};
use crate::ScanHook;

/// Pages per chunk: the unit of work a thread takes (and steals).
pub(crate) const CHUNK_PAGES: u32 = 512;

/// Where a page is in its life cycle.
pub(crate) enum Phase<F> {
    /// Changed recently (or never looked at): a candidate for protection. `print`: the
    /// print of its contents at the last pass that read it (0: not read since it changed;
    /// see [`Config::unchanged_before_protect`](crate::Config::unchanged_before_protect)).
    Volatile { print: u64 },
    /// Write-protected since `token`, unwritten for `periods` merge passes. `print`: the
    /// print of its contents (tagged with its tree group) read while it was protected,
    /// so exact while the token holds; 0 if it was protected without being read.
    Watch {
        token: ProtectToken,
        periods: u8,
        print: u64,
    },
    /// Stable, protected since `token`, with no twin found: indexed where it is under
    /// `print` ([`Uniques`]), neither copied nor remapped.
    Unique { token: ProtectToken, print: u64 },
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
    /// Changes in a row while watched, unique or merged (saturating at 8): the back-off
    /// doubles with each.
    backoff: u8,
    /// Merge passes still to skip.
    skip: u8,
    /// Watched and stable, refused for the mapping limit: waits while the gate is closed.
    parked: bool,
    /// Volatile, and found changed when last read under protection: the next read is
    /// done without protection (see `unchanged`).
    recheck: bool,
}

impl<F> PageEntry<F> {
    fn new() -> Self {
        PageEntry {
            phase: Phase::Volatile { print: 0 },
            backoff: 0,
            skip: 0,
            parked: false,
            recheck: false,
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
    parked: AtomicU32,
    /// Whether the last merge pass over this chunk changed nothing and left nothing
    /// pending (see [`Tally::quiet`]).
    pub(crate) quiet: AtomicBool,
    /// Unique pages of this chunk whose twin another page found and made canonical:
    /// (index in the chunk, the canonical page to merge with; `None` if making the twin
    /// canonical failed and the page is to be looked up again). Filled by any thread,
    /// taken by the thread that holds the chunk.
    twins: Mutex<Vec<Twin<F>>>,
    /// Whether `twins` may hold anything.
    has_twins: AtomicBool,
}

/// A unique page whose twin was found: (index in the chunk, the twin's canonical page).
type Twin<F> = (u32, Option<Arc<Canon<F>>>);

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
            parked: AtomicU32::new(0),
            quiet: AtomicBool::new(false),
            twins: Mutex::new(Vec::new()),
            has_twins: AtomicBool::new(false),
        }
    }

    /// Tells page `i` of the chunk that its twin is canonical now (as `canon`).
    fn flag_twin(&self, i: u32, canon: Option<Arc<Canon<F>>>) {
        self.twins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((i, canon));
        self.has_twins.store(true, Ordering::Release);
    }

    /// Whether any page of the chunk is flagged.
    pub(crate) fn has_twins(&self) -> bool {
        self.has_twins.load(Ordering::Acquire)
    }

    /// Takes the flagged pages, in page order.
    fn take_twins(&self) -> Vec<Twin<F>> {
        if !self.has_twins() {
            return Vec::new();
        }
        let mut twins = self.twins.lock().unwrap_or_else(|e| e.into_inner());
        self.has_twins.store(false, Ordering::Relaxed);
        let mut out = std::mem::take(&mut *twins);
        drop(twins);
        out.sort_by_key(|t| t.0);
        out
    }

    pub(crate) fn len(&self) -> u32 {
        self.pages
    }

    pub(crate) fn gauges(&self) -> (u32, u32, u32) {
        (
            self.volatile.load(Ordering::Relaxed),
            self.watched.load(Ordering::Relaxed),
            self.parked.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PageEntry<F>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<F: AsRef<[u8]> + Clone + Send + Sync + 'static> Chunk<F> {
    /// The chunk's region is gone: drops every page state it holds as if each page had
    /// been found written, without calling the memory (the pages are gone; the memory
    /// would only answer `NoSuchRegion`). A canonical or merged page releases its sharer
    /// reference (the last one takes its canonical page out of the tree; a canonical frame
    /// other pages still map stays theirs), a unique page leaves the index, a zero page is
    /// no longer counted. Flagged twins are dropped and the gauges zeroed; the chunk is
    /// empty afterwards. Nothing is counted as written or unmerged: no guest wrote.
    pub(crate) fn retire(&self, canons: &Canons<F>, uniques: &Uniques, counters: &Counters) {
        let entries = std::mem::take(&mut *self.lock());
        for (i, e) in entries.into_iter().enumerate() {
            match e.phase {
                Phase::Canonical { canon, .. } | Phase::Merged { canon, .. } => {
                    canons.drop_sharer(self.domain, &canon, counters);
                }
                Phase::Zero { .. } => {
                    counters.zero_pages.fetch_sub(1, Ordering::Relaxed);
                }
                Phase::Unique { print, .. } => {
                    uniques.remove(print, PageId::new(self.region, self.first + i as u32));
                    counters.pages_unique.fetch_sub(1, Ordering::Relaxed);
                }
                Phase::Watch { .. } | Phase::Volatile { .. } => {}
            }
        }
        drop(self.take_twins());
        self.volatile.store(0, Ordering::Relaxed);
        self.watched.store(0, Ordering::Relaxed);
        self.parked.store(0, Ordering::Relaxed);
        self.quiet.store(true, Ordering::Relaxed);
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
    /// Merge the unique pages whose twins were found after the pass went over them.
    Twins,
}

/// What a pass did to the pages of one chunk (summed over the chunks of a pass into a
/// [`PassReport`](crate::PassReport)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) merged: u64,
    pub(crate) zero_merged: u64,
    pub(crate) canonicalized: u64,
    pub(crate) indexed: u64,
    pub(crate) written: u64,
    pub(crate) unmerged: u64,
    pub(crate) protected: u64,
    pub(crate) recycled: u64,
    pub(crate) map_count: u64,
    pub(crate) pinned: u64,
    pub(crate) changed: u64,
    pub(crate) differs: u64,
    pub(crate) insert_races: u64,
    pub(crate) errors: u64,
    pub(crate) deferred: u64,
    pub(crate) parked: u64,
    pub(crate) watching: u64,
    pub(crate) backing_off: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, o: &Tally) {
        self.merged += o.merged;
        self.zero_merged += o.zero_merged;
        self.canonicalized += o.canonicalized;
        self.indexed += o.indexed;
        self.written += o.written;
        self.unmerged += o.unmerged;
        self.protected += o.protected;
        self.recycled += o.recycled;
        self.map_count += o.map_count;
        self.pinned += o.pinned;
        self.changed += o.changed;
        self.differs += o.differs;
        self.insert_races += o.insert_races;
        self.errors += o.errors;
        self.deferred += o.deferred;
        self.parked += o.parked;
        self.watching += o.watching;
        self.backing_off += o.backing_off;
    }

    /// Refusals of every reason.
    pub(crate) fn refused(&self) -> u64 {
        self.map_count + self.pinned + self.changed + self.differs + self.insert_races + self.errors
    }

    /// Nothing changed, nothing refused, nothing waiting to happen by itself.
    pub(crate) fn quiet(&self) -> bool {
        self.merged
            + self.zero_merged
            + self.canonicalized
            + self.indexed
            + self.written
            + self.protected
            + self.recycled
            + self.refused()
            + self.deferred
            + self.parked
            + self.watching
            + self.backing_off
            == 0
    }
}

/// The longest a thread waits for another to insert a page whose contents it claimed
/// (a safety bound: a claim is held for one batch's canonicalization, milliseconds).
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Stable pages read with one [`PageMemory::read_pages`] call.
const READ_GROUP: usize = 64;

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
    /// The gates of the mapping budgets.
    pub(crate) gates: &'a Gates,
    /// The gate of the budget of the chunk being run (set by [`Ctx::run`]).
    pub(crate) gate: Option<&'a MapGate>,
    pub(crate) claims: &'a Claims,
    pub(crate) on_event: Option<&'a EventHook>,
    pub(crate) uniques: &'a Uniques,
    /// [`Config::unchanged_before_protect`](crate::Config::unchanged_before_protect).
    pub(crate) unchanged_first: bool,
    /// Whether this is the engine's only work thread (passes never overlap, so then no
    /// other thread touches the trees: claims are not needed).
    pub(crate) alone: bool,
    /// Whether unique pages are indexed where they are (else made canonical at once).
    pub(crate) in_place: bool,
    /// Every chunk of the pass's layout, and the first chunk of each region: where twin
    /// flags go.
    pub(crate) chunks: &'a [Arc<Chunk<M::Frame>>],
    pub(crate) first_chunk: &'a HashMap<RegionId, usize>,
}

impl<M: PageMemory> Clone for Ctx<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}

// Every field is a reference or a plain value (no bound on `M` needed, unlike a derive).
impl<M: PageMemory> Copy for Ctx<'_, M> {}

impl<M: PageMemory> Ctx<'_, M> {
    /// Runs `kind` over every page of `chunk`; returns what it did.
    pub(crate) fn run(&self, chunk: &Chunk<M::Frame>, kind: PassKind) -> Tally {
        // Merges of the chunk's pages spend its region's budget: its gate decides.
        let gate = self.gates.of(self.memory, chunk.region, self.in_place);
        if kind == PassKind::Merge {
            gate.visit();
        }
        Ctx {
            gate: Some(&gate),
            ..*self
        }
        .run_chunk(chunk, kind)
    }

    /// The gate of the budget of the chunk being run.
    fn gate(&self) -> &MapGate {
        self.gate.expect("set by Ctx::run for the chunk it runs")
    }

    fn run_chunk(&self, chunk: &Chunk<M::Frame>, kind: PassKind) -> Tally {
        let mut t = Tally::default();
        let mut entries = chunk.lock();
        if kind == PassKind::Twins {
            self.merge_twins(chunk, &mut entries, &mut t);
            if !t.quiet() {
                chunk.quiet.store(false, Ordering::Relaxed);
            }
            return t;
        }
        if kind == PassKind::Merge {
            if self.in_place {
                self.gate().check_tight(self.memory);
            }
            self.merge_twins(chunk, &mut entries, &mut t);
        }
        let mut to_protect: Vec<u32> = Vec::new();
        let mut to_check: Vec<u32> = Vec::new();
        let mut stable: Vec<Stable> = Vec::new();
        let closed = self.gate().is_closed();
        for (i, e) in entries.iter_mut().enumerate() {
            let page = PageId::new(chunk.region, chunk.first + i as u32);
            // Per thread only: a shared counter here would bounce its cache line between
            // the work threads on every page (`stats()` sums them).
            self.worker.pages_scanned.fetch_add(1, Ordering::Relaxed);
            if kind == PassKind::Unmerge {
                self.unmerge(e, page, chunk.domain);
                continue;
            }
            self.notice_writes(e, page, chunk.domain, &mut t);
        }
        // The volatile pages go to the hook first, in one batch (one round trip where
        // the hook's pages are across one); those it takes are left alone this pass.
        let mut taken = vec![false; entries.len()];
        if let Some(hook) = self.hook.filter(|_| kind != PassKind::Unmerge) {
            let offered: Vec<u32> = (0..entries.len() as u32)
                .filter(|&i| matches!(entries[i as usize].phase, Phase::Volatile { .. }))
                .collect();
            if !offered.is_empty() {
                let pages: Vec<PageId> = offered
                    .iter()
                    .map(|&i| PageId::new(chunk.region, chunk.first + i))
                    .collect();
                let mut took = vec![false; pages.len()];
                hook.examine_batch(self.memory, &pages, &mut took);
                for (&i, _) in offered.iter().zip(&took).filter(|(_, &t)| t) {
                    taken[i as usize] = true;
                }
            }
        }
        for (i, e) in entries.iter_mut().enumerate() {
            if kind == PassKind::Unmerge {
                break;
            }
            match e.phase {
                Phase::Volatile { .. } => {
                    if taken[i] {
                        self.counters.recycled.fetch_add(1, Ordering::Relaxed);
                        t.recycled += 1;
                        e.skip = 0;
                        // Its contents are gone: its next read is a first one.
                        e.phase = Phase::Volatile { print: 0 };
                        e.recheck = false;
                        continue;
                    }
                    if kind == PassKind::Merge {
                        if e.skip > 0 {
                            e.skip -= 1;
                            t.backing_off += 1;
                        } else if self.unchanged_first {
                            to_check.push(i as u32);
                        } else {
                            to_protect.push(i as u32);
                        }
                    }
                }
                // Refused for the mapping limit: not read, looked up or offered to the
                // backend again until the gate opens.
                Phase::Watch { .. } if kind == PassKind::Merge && e.parked && closed => {}
                Phase::Watch {
                    token,
                    periods,
                    print,
                } if kind == PassKind::Merge => {
                    if periods + 1 >= self.stable_periods {
                        stable.push((i as u32, token, print));
                    } else {
                        e.phase = Phase::Watch {
                            token,
                            periods: periods + 1,
                            print,
                        };
                    }
                }
                _ => {}
            }
        }
        if !stable.is_empty() {
            self.merge_stable(chunk, &mut entries, &stable, &mut t, true);
        }
        if !to_check.is_empty() {
            self.unchanged(chunk, &mut entries, &to_check, &mut t);
        }
        if !to_protect.is_empty() {
            let pages: Vec<PageId> = to_protect
                .iter()
                .map(|&i| PageId::new(chunk.region, chunk.first + i))
                .collect();
            for (&i, r) in to_protect.iter().zip(self.memory.protect(&pages)) {
                let e = &mut entries[i as usize];
                match r {
                    Ok(token) => {
                        e.phase = Phase::Watch {
                            token,
                            periods: 0,
                            print: 0,
                        };
                        t.protected += 1;
                    }
                    // Not protected: tried again after a back-off, counted by reason.
                    Err(err) => {
                        self.count_error(&err, &mut t);
                        self.back_off(e);
                    }
                }
            }
        }
        if kind == PassKind::Merge {
            // Twins found in this pass by this chunk's own pages (or by other threads
            // while it ran): merge them now rather than next pass.
            self.merge_twins(chunk, &mut entries, &mut t);
            let (mut v, mut w, mut p, mut read) = (0, 0, 0, 0u64);
            for e in entries.iter() {
                match e.phase {
                    Phase::Volatile { print } => {
                        v += 1;
                        // Read, and to be protected if unchanged at the next pass.
                        if print != 0 && e.skip == 0 {
                            read += 1;
                        }
                    }
                    Phase::Watch { .. } => {
                        w += 1;
                        if e.parked {
                            p += 1;
                        }
                    }
                    _ => {}
                }
            }
            t.parked = p as u64;
            // Pages watched and not parked are still on their way to a merge (deferred
            // ones included: they are counted in `deferred` too).
            t.watching = (w - p) as u64 + read;
            chunk.volatile.store(v, Ordering::Relaxed);
            chunk.watched.store(w, Ordering::Relaxed);
            chunk.parked.store(p, Ordering::Relaxed);
            chunk.quiet.store(t.quiet(), Ordering::Relaxed);
        } else if kind == PassKind::Unmerge {
            chunk.parked.store(0, Ordering::Relaxed);
            chunk.quiet.store(false, Ordering::Relaxed);
        } else if !t.quiet() {
            chunk.quiet.store(false, Ordering::Relaxed);
        }
        t
    }

    /// KSM's checksum test, on the volatile pages `check` (indices in `chunk`, in order).
    /// A page read at an earlier pass is write-protected, then read, and stays protected
    /// (watched, with one stable period behind it) if it holds what the earlier read saw;
    /// read under protection, its print is exact while its token holds, so the pass that
    /// finds it stable need not read it again (see `merge_stable`). A page that changed is
    /// unprotected once the chunk is read and keeps its new print, and its next reads are done without
    /// protection until one finds it unchanged: a page the guest keeps writing is read
    /// once a pass, as by KSM, and protected only while one chunk is read. A page
    /// never read since it changed (print 0) is only read.
    fn unchanged(
        &self,
        chunk: &Chunk<M::Frame>,
        entries: &mut [PageEntry<M::Frame>],
        check: &[u32],
        t: &mut Tally,
    ) {
        let group = self.canons.group(chunk.domain);
        let id = |i: u32| PageId::new(chunk.region, chunk.first + i);
        let guarded = |e: &PageEntry<M::Frame>| {
            !e.recheck && !matches!(e.phase, Phase::Volatile { print: 0 })
        };
        // The tokens of the pages protected for the read (in `check` order); pages whose
        // protection was refused back off and are not read.
        let mut tokens: Vec<Option<ProtectToken>> = vec![None; check.len()];
        let mut skip = vec![false; check.len()];
        let again: Vec<usize> = (0..check.len())
            .filter(|&k| guarded(&entries[check[k] as usize]))
            .collect();
        if !again.is_empty() {
            let pages: Vec<PageId> = again.iter().map(|&k| id(check[k])).collect();
            for (&k, r) in again.iter().zip(self.memory.protect(&pages)) {
                match r {
                    Ok(token) => tokens[k] = Some(token),
                    Err(err) => {
                        self.count_error(&err, t);
                        self.back_off(&mut entries[check[k] as usize]);
                        skip[k] = true;
                    }
                }
            }
        }
        let mut changed = Vec::new();
        let mut bufs = vec![[0u8; PAGE_SIZE]; READ_GROUP.min(check.len())];
        for (from, reading) in (0..check.len())
            .step_by(READ_GROUP)
            .zip(check.chunks(READ_GROUP))
        {
            let (idx, ids): (Vec<usize>, Vec<PageId>) = (from..from + reading.len())
                .filter(|&k| !skip[k])
                .map(|k| (k, id(check[k])))
                .unzip();
            if ids.is_empty() {
                continue;
            }
            let reads = self.memory.read_pages(&ids, &mut bufs);
            self.counters
                .pages_read
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            for ((&k, read), buf) in idx.iter().zip(reads).zip(bufs.iter()) {
                let i = check[k];
                let e = &mut entries[i as usize];
                let print = match read {
                    Ok(()) => self.uniques.print(&buf[..], group),
                    Err(err) => {
                        self.count_error(&err, t);
                        self.back_off(e);
                        if tokens[k].is_some() {
                            changed.push(i);
                        }
                        e.phase = Phase::Volatile { print: 0 };
                        continue;
                    }
                };
                let Phase::Volatile { print: last } = e.phase else {
                    continue;
                };
                match tokens[k] {
                    Some(token) if last == print => {
                        e.phase = Phase::Watch {
                            token,
                            periods: 1,
                            print,
                        };
                        t.protected += 1;
                    }
                    Some(_) => {
                        changed.push(i);
                        e.phase = Phase::Volatile { print };
                        e.recheck = true;
                    }
                    None => {
                        // Unchanged since a read that found it changed under protection:
                        // it is protected at its next read.
                        e.recheck = e.recheck && last != 0 && last != print;
                        e.phase = Phase::Volatile { print };
                    }
                }
            }
        }
        if !changed.is_empty() {
            // A refusal here leaves a page protected that the engine no longer watches:
            // its next write costs its guest one fault (the backend unprotects it), nothing
            // else.
            let pages: Vec<PageId> = changed.iter().map(|&i| id(i)).collect();
            drop(self.memory.unprotect(&pages));
        }
    }

    /// If the page was written since its token, it is volatile again: drop what it held.
    fn notice_writes(
        &self,
        e: &mut PageEntry<M::Frame>,
        page: PageId,
        domain: DomainId,
        t: &mut Tally,
    ) {
        let token = match &e.phase {
            Phase::Volatile { .. } => return,
            Phase::Watch { token, .. }
            | Phase::Unique { token, .. }
            | Phase::Canonical { token, .. }
            | Phase::Merged { token, .. }
            | Phase::Zero { token } => *token,
        };
        // A page that went away reads as written: it is dropped to volatile.
        if !self.memory.written_since(page, token).unwrap_or(true) {
            return;
        }
        t.written += 1;
        e.parked = false;
        match std::mem::replace(&mut e.phase, Phase::Volatile { print: 0 }) {
            Phase::Canonical { canon, .. } | Phase::Merged { canon, .. } => {
                self.canons.drop_sharer(domain, &canon, self.counters);
                self.counters.cow_breaks.fetch_add(1, Ordering::Relaxed);
                t.unmerged += 1;
            }
            Phase::Zero { .. } => {
                self.counters.zero_pages.fetch_sub(1, Ordering::Relaxed);
                self.counters.cow_breaks.fetch_add(1, Ordering::Relaxed);
                t.unmerged += 1;
            }
            Phase::Unique { print, .. } => {
                self.uniques.remove(print, page);
                self.counters.pages_unique.fetch_sub(1, Ordering::Relaxed);
            }
            Phase::Watch { .. } | Phase::Volatile { .. } => {}
        }
        self.back_off(e);
    }

    /// Merges the unique pages of `chunk` flagged since the last call: pages indexed in
    /// place whose twin another page found and made canonical (see [`Uniques`]). Each is
    /// merged with its twin's canonical page at once, without being read or looked up
    /// (the backend compares it in full as it merges: a page that differs after all, an
    /// unlikely collision of prints, is treated as written). A page whose twin could not
    /// be made canonical, or whose canonical page is full or gone, is handled as a stable
    /// page again: looked up, and merged or indexed again.
    fn merge_twins(
        &self,
        chunk: &Chunk<M::Frame>,
        entries: &mut [PageEntry<M::Frame>],
        t: &mut Tally,
    ) {
        let twins = chunk.take_twins();
        if twins.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        let mut stable: Vec<Stable> = Vec::new();
        for (i, canon) in twins {
            let page = PageId::new(chunk.region, chunk.first + i);
            let e = &mut entries[i as usize];
            self.notice_writes(e, page, chunk.domain, t);
            let Phase::Unique { token, print } = e.phase else {
                continue;
            };
            self.uniques.remove(print, page);
            self.counters.pages_unique.fetch_sub(1, Ordering::Relaxed);
            e.phase = Phase::Watch {
                token,
                periods: self.stable_periods,
                print,
            };
            match canon {
                Some(c)
                    if c.sharers.load(Ordering::Relaxed) > 0
                        && self.canons.has_room(
                            &c,
                            1 + batch.pending.iter().filter(|p| Arc::ptr_eq(p, &c)).count() as u32,
                        ) =>
                {
                    batch.pending.push(c.clone());
                    batch.merges.push((i, token, Some(c)));
                }
                _ => stable.push((i, token, print)),
            }
        }
        self.flush(chunk, entries, &mut batch, t);
        if !stable.is_empty() {
            self.merge_stable(chunk, entries, &stable, t, true);
        }
    }

    /// Tells the unique page `page` that its twin is canonical now (as `canon`).
    fn flag_twin(&self, page: PageId, canon: Option<Arc<Canon<M::Frame>>>) {
        let Some(&first) = self.first_chunk.get(&page.region) else {
            return;
        };
        let c = first + (page.index / CHUNK_PAGES) as usize;
        if let Some(ch) = self.chunks.get(c) {
            if ch.region == page.region && page.index >= ch.first {
                ch.flag_twin(page.index - ch.first, canon);
            }
        }
    }

    /// A stable page with no canonical match, holding its contents' claim (if any): with
    /// no twin indexed it is indexed in place and stays where it is; with one, it goes to
    /// `batch` to be made canonical, and the twin is flagged after that.
    #[allow(clippy::too_many_arguments)]
    fn vacant(
        &self,
        e: &mut PageEntry<M::Frame>,
        batch: &mut Batch<M::Frame>,
        page: PageId,
        token: ProtectToken,
        print: u64,
        claim: Option<usize>,
        t: &mut Tally,
    ) {
        // While mappings are scarce no page is indexed, but a twin indexed before still
        // pairs with this page (else it would stay unique for good).
        if self.in_place {
            let me = UniqueRef { page, token };
            let live = |r: &UniqueRef| !self.memory.written_since(r.page, r.token).unwrap_or(true);
            let index = !self.gate().is_tight();
            match self.uniques.pair(print, me, index, live) {
                Pair::Indexed => {
                    e.phase = Phase::Unique { token, print };
                    e.backoff = 0;
                    e.parked = false;
                    t.indexed += 1;
                    self.counters.pages_unique.fetch_add(1, Ordering::Relaxed);
                    if let Some(slot) = claim {
                        self.claims.release(slot);
                    }
                    return;
                }
                Pair::Twin(twin) => {
                    batch.prints.push(print);
                    batch.vacant.push((page, token));
                    batch.claims.push(claim);
                    batch.twins.push(Some(twin.page));
                    return;
                }
                Pair::Alone => {}
            }
        }
        batch.prints.push(print);
        batch.vacant.push((page, token));
        batch.claims.push(claim);
        batch.twins.push(None);
    }

    /// The page changed (or was refused): skip it for 1, 2, 4, ... passes, doubling with
    /// each change in a row, up to `max_backoff` (KSM's smart scan skips pages that do
    /// not merge the same way). Every protection of a page that is written again costs
    /// its guest a round trip to the fault thread and cannot merge anyway, so hot pages
    /// reach the longest back-off after a few changes.
    fn back_off(&self, e: &mut PageEntry<M::Frame>) {
        e.backoff = e.backoff.saturating_add(1).min(8);
        let skip = 1u32 << (e.backoff - 1);
        e.skip = skip.min(self.max_backoff as u32) as u8;
    }

    /// Pages that stayed unwritten for `stable_periods` passes (`stable`, in page order):
    /// merge each with an equal canonical page or the zero page, or make it canonical.
    ///
    /// Done in batches, so the backend can remap runs of pages at once: pages are read
    /// (protected and unwritten, so what we read is what they hold) and looked up; the
    /// ones with no canonical match are claimed ([`Claims`]: a page whose contents another
    /// thread is making canonical right now is put off to the next pass), canonicalized
    /// together ([`PageMemory::canonicalize_batch`]) and inserted; then the merges go to
    /// the backend together ([`PageMemory::merge_batch`]), which re-checks each page's
    /// protection and compares it in full as it switches. The result is what merging page
    /// by page gives: a batch is flushed early when a page would take a canonical page past
    /// `max_page_sharing` counting the batch's own merges, or may equal a page of the batch
    /// that is to become canonical (same fingerprint), so that the lookup after the flush
    /// sees it. While the mapping gate is closed, pages that would need the tree are
    /// parked instead.
    fn merge_stable(
        &self,
        chunk: &Chunk<M::Frame>,
        entries: &mut [PageEntry<M::Frame>],
        stable: &[Stable],
        t: &mut Tally,
        again: bool,
    ) {
        let domain = chunk.domain;
        let group = self.canons.group(domain);
        let id = |i: u32| PageId::new(chunk.region, chunk.first + i);
        let zero_print = self.uniques.zero_print(group);
        let unread = stable.iter().filter(|s| s.2 == 0).count();
        let mut bufs = vec![[0u8; PAGE_SIZE]; READ_GROUP.min(unread)];
        let mut batch = Batch::default();
        let mut put_off = Vec::new();
        for reading in stable.chunks(READ_GROUP) {
            // Only pages whose print is not known are read (and looked up by contents);
            // the others are looked up by print (see *Page life cycle* in the crate docs).
            let mut at = vec![usize::MAX; reading.len()];
            let mut ids = Vec::new();
            for (k, &(i, _, known)) in reading.iter().enumerate() {
                if known == 0 {
                    at[k] = ids.len();
                    ids.push(id(i));
                }
            }
            let reads = if ids.is_empty() {
                Vec::new()
            } else {
                self.counters
                    .pages_read
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                self.memory.read_pages(&ids, &mut bufs)
            };
            for (k, &(i, token, known)) in reading.iter().enumerate() {
                let bytes = match reads.get(at[k]) {
                    None => None,
                    Some(Ok(())) => Some(&bufs[at[k]][..]),
                    Some(Err(err)) => {
                        self.count_error(err, t);
                        entries[i as usize].phase = Phase::Volatile { print: 0 };
                        entries[i as usize].parked = false;
                        continue;
                    }
                };
                if bytes.map_or(known == zero_print, is_zero_page) {
                    batch.merges.push((i, token, None));
                    continue;
                }
                if self.gate().is_closed() {
                    // The backend refused merges for the mapping limit this pass or recently:
                    // keep the page watched (its token stays good) until the gate opens.
                    entries[i as usize].parked = true;
                    continue;
                }
                let print = bytes.map_or(known, |b| self.uniques.print(b, group));
                if batch.prints.contains(&print) {
                    self.flush(chunk, entries, &mut batch, t);
                }
                let mut claimed = None;
                loop {
                    let found = match bytes {
                        Some(b) => self.canons.find(domain, b),
                        None => self.canons.find_print(domain, print),
                    };
                    match found {
                        Found::Existing(c) => {
                            if let Some(slot) = claimed.take() {
                                self.claims.release(slot);
                            }
                            let extra =
                                batch.pending.iter().filter(|p| Arc::ptr_eq(p, &c)).count() as u32;
                            if extra > 0 && !self.canons.has_room(&c, extra + 1) {
                                // Merging would overfill it: settle the batch, then look again
                                // (the full page is then taken out of the tree).
                                self.flush(chunk, entries, &mut batch, t);
                                continue;
                            }
                            batch.pending.push(c.clone());
                            batch.merges.push((i, token, Some(c)));
                        }
                        Found::Vacant if claimed.is_some() => {
                            let e = &mut entries[i as usize];
                            self.vacant(e, &mut batch, id(i), token, print, claimed.take(), t);
                        }
                        // One work thread: nobody else inserts, so no claim is needed.
                        Found::Vacant if self.alone => {
                            let e = &mut entries[i as usize];
                            self.vacant(e, &mut batch, id(i), token, print, None, t);
                        }
                        Found::Vacant => match self.claims.claim(Claims::key(print, group)) {
                            // Look again holding the claim: an equal page inserted by the
                            // thread that held it before is seen now.
                            Claim::Held(slot) => {
                                claimed = Some(slot);
                                continue;
                            }
                            // Another thread is making this content canonical: merge with its
                            // page next pass (the page stays watched and stable).
                            Claim::Lost if again => {
                                put_off.push((i, token, known, Claims::key(print, group)))
                            }
                            Claim::Lost => {
                                t.deferred += 1;
                                self.counters
                                    .claim_deferrals
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Claim::Full => {
                                let e = &mut entries[i as usize];
                                self.vacant(e, &mut batch, id(i), token, print, None, t);
                            }
                        },
                    }
                    break;
                }
            }
        }
        self.flush(chunk, entries, &mut batch, t);
        // Once more, after this thread's own claims are released: wait (holding no claim,
        // so no two threads can wait for each other) until the threads that held the
        // claims have inserted their pages, then look the pages up again. A page whose
        // claim is still held after `CLAIM_WAIT`, or is claimed again meanwhile, waits for
        // the next pass.
        if !put_off.is_empty() {
            let deadline = std::time::Instant::now() + CLAIM_WAIT;
            for &(.., key) in &put_off {
                self.claims.wait_released(key, deadline);
            }
            let again: Vec<_> = put_off
                .iter()
                .map(|&(i, token, known, _)| (i, token, known))
                .collect();
            self.merge_stable(chunk, entries, &again, t, false);
        }
    }

    /// Canonicalizes and merges what `batch` holds, and empties it.
    fn flush(
        &self,
        chunk: &Chunk<M::Frame>,
        entries: &mut [PageEntry<M::Frame>],
        batch: &mut Batch<M::Frame>,
        t: &mut Tally,
    ) {
        let domain = chunk.domain;
        let id = |i: u32| PageId::new(chunk.region, chunk.first + i);
        let mut to_merge = std::mem::take(&mut batch.merges);
        let vacant = std::mem::take(&mut batch.vacant);
        let claims = std::mem::take(&mut batch.claims);
        let twins = std::mem::take(&mut batch.twins);
        let prints = std::mem::take(&mut batch.prints);
        batch.pending.clear();
        if !vacant.is_empty() {
            let frames = self.memory.canonicalize_batch(&vacant);
            let mut late = false;
            let items = vacant.iter().zip(frames).zip(claims).zip(twins).zip(prints);
            for ((((&(page, token), r), claim), twin), print) in items {
                let i = page.index - chunk.first;
                let e = &mut entries[i as usize];
                // The canonical page the twin (if any) is to merge with.
                let mut made = None;
                match r {
                    Err(err) => self.refused(e, &err, t),
                    Ok(frame) => {
                        self.counters.canonicalized.fetch_add(1, Ordering::Relaxed);
                        t.canonicalized += 1;
                        // The print was read under the protection the canonicalization
                        // just verified, so it is the frame's.
                        match self.canons.insert(domain, frame, print, self.counters) {
                            Ok(mine) => {
                                made = Some(mine.clone());
                                e.phase = Phase::Canonical { token, canon: mine };
                                e.backoff = 0;
                                e.parked = false;
                            }
                            // An equal page became canonical meanwhile (another thread's,
                            // unclaimed): merge with it. The canonicalization was wasted.
                            Err(other) => {
                                t.insert_races += 1;
                                self.counters.insert_races.fetch_add(1, Ordering::Relaxed);
                                made = Some(other.clone());
                                to_merge.push((i, token, Some(other)));
                                late = true;
                            }
                        }
                    }
                }
                // After the insert: whoever claims the contents next finds the page.
                if let Some(slot) = claim {
                    self.claims.release(slot);
                }
                // The twin merges with the new canonical page (or, if there is none, is
                // looked up again).
                if let Some(twin) = twin {
                    self.flag_twin(twin, made);
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
                    e.parked = false;
                    t.zero_merged += 1;
                    self.counters.zero_pages.fetch_add(1, Ordering::Relaxed);
                    self.counters.merges.fetch_add(1, Ordering::Relaxed);
                }
                (Ok(MergeOutcome::Merged), Some(canon)) => {
                    self.canons.add_sharer(&canon, self.counters);
                    self.counters.merges.fetch_add(1, Ordering::Relaxed);
                    t.merged += 1;
                    e.phase = Phase::Merged { token, canon };
                    e.backoff = 0;
                    e.parked = false;
                }
                // `Differs`: the page is protected and unwritten but not equal to the
                // canonical page: it was found by a print its contents share with other
                // contents (a collision), or it was written in a way the backend saw and
                // we have not yet. Either way it stays watched and is read and looked up
                // by its contents at the next pass (a write, if any, is noticed first),
                // never again by that print: a collision costs work, not a merge.
                (Ok(MergeOutcome::Differs), _) => {
                    t.differs += 1;
                    self.counters.merge_races.fetch_add(1, Ordering::Relaxed);
                    e.phase = Phase::Watch {
                        token,
                        periods: self.stable_periods,
                        print: 0,
                    };
                    e.parked = false;
                }
                (Ok(MergeOutcome::Changed), _) => {
                    t.changed += 1;
                    self.raced(e);
                }
                (Err(err), _) => self.refused(e, &err, t),
            }
        }
    }

    /// Counts a refusal by its reason (the page's state is the caller's business).
    fn count_error(&self, err: &PageError, t: &mut Tally) {
        let c = self.counters;
        match err {
            PageError::MapCountLimit { limit, mappings } => {
                t.map_count += 1;
                c.refused_map_count.fetch_add(1, Ordering::Relaxed);
                self.gate().hit(*limit, *mappings, c, self.on_event);
            }
            PageError::Pinned(_) => {
                t.pinned += 1;
                c.refused_pinned.fetch_add(1, Ordering::Relaxed);
            }
            PageError::Stale(_) => {
                t.changed += 1;
                c.merge_races.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                t.errors += 1;
                c.refused_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The backend refused to canonicalize or merge a stable page: a page refused for the
    /// mapping limit stays watched (protected, its token good) and is parked; any other
    /// page is volatile again, after a back-off.
    fn refused(&self, e: &mut PageEntry<M::Frame>, err: &PageError, t: &mut Tally) {
        self.count_error(err, t);
        if matches!(err, PageError::MapCountLimit { .. }) {
            e.parked = true;
        } else {
            e.parked = false;
            e.phase = Phase::Volatile { print: 0 };
            self.back_off(e);
        }
    }

    fn raced(&self, e: &mut PageEntry<M::Frame>) {
        self.counters.merge_races.fetch_add(1, Ordering::Relaxed);
        e.phase = Phase::Volatile { print: 0 };
        e.parked = false;
        self.back_off(e);
    }

    fn unmerge(&self, e: &mut PageEntry<M::Frame>, page: PageId, domain: DomainId) {
        match std::mem::replace(&mut e.phase, Phase::Volatile { print: 0 }) {
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
            Phase::Unique { print, .. } => {
                let _ = self.memory.unprotect(&[page]);
                self.uniques.remove(print, page);
                self.counters.pages_unique.fetch_sub(1, Ordering::Relaxed);
            }
            Phase::Volatile { .. } => {}
        }
        e.backoff = 0;
        e.skip = 0;
        e.parked = false;
    }
}

/// A stable page: (index in the chunk, token, its print if known, else 0).
type Stable = (u32, ProtectToken, u64);

/// A merge to do: (index in the chunk, token, canonical page; `None` for the zero frame).
type PendingMerge<F> = (u32, ProtectToken, Option<Arc<Canon<F>>>);

/// Merges and canonicalizations gathered for one call of each batch operation.
struct Batch<F> {
    /// (index in the chunk, token, canonical page; `None` for the zero frame), page order.
    merges: Vec<PendingMerge<F>>,
    /// Pages to become canonical, page order.
    vacant: Vec<(PageId, ProtectToken)>,
    /// The claim slot held for each page of `vacant` (`None`: unclaimed).
    claims: Vec<Option<usize>>,
    /// The canonical pages `merges` adds sharers to, once per merge.
    pending: Vec<Arc<Canon<F>>>,
    /// Fingerprints of the pages in `vacant`.
    prints: Vec<u64>,
    /// For each page of `vacant`, the unique page it is the twin of (if any): told once
    /// the page is canonical.
    twins: Vec<Option<PageId>>,
}

impl<F> Default for Batch<F> {
    fn default() -> Self {
        Batch {
            merges: Vec::new(),
            vacant: Vec::new(),
            claims: Vec::new(),
            pending: Vec::new(),
            prints: Vec::new(),
            twins: Vec::new(),
        }
    }
}

/// Bytes of engine state per tracked page.
pub(crate) fn entry_bytes<F>() -> usize {
    std::mem::size_of::<PageEntry<F>>()
}
