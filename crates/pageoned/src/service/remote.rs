//! [`RemoteMemory`]: the guest RAM of every VMM of one trust domain, as one
//! [`PageMemory`] the engine runs over.
//!
//! Reads go straight to the VMM's memory (`process_vm_readv`: the agent copies nothing);
//! protect, canonicalize, merge, unprotect, unmerge and recycle become one request per
//! batch to the agent of the page's VMM, which does them in its own address space under
//! its own checks; canonical frames are pages of the domain's [`SharedStore`], read in
//! place by the engine. `written_since` costs no round trip: agents report every page
//! whose tokens went stale, and the memory keeps, per page, the newest generation
//! reported (a token is stale if older). A report may lag a write by a flush interval of
//! the agent: the engine then takes a page for unchanged a little longer, which is only
//! ever a hint (a merge is checked by the agent, under the page's lock, against the
//! page's real token).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use page_memory::linux::shared::{read_process, SharedFrame, SharedStore};
use page_memory::{
    consecutive_runs, DirtyHook, DomainId, MergeOutcome, PageError, PageId, PageMemory,
    ProtectToken, RegionId, RegionInfo, PAGE_SIZE,
};

use super::gens::Gens;
use super::session::Session;
use crate::wire::{ErrorCode, Op, PageRef, ReplyBody};

/// A VMM's region, as the service sees it.
pub(crate) struct RemoteRegion {
    pub(crate) id: RegionId,
    pub(crate) session: Arc<Session>,
    /// The agent's number for it.
    pub(crate) agent_region: u32,
    pub(crate) addr: u64,
    pub(crate) pages: u32,
    /// Its home run in the store (`None`: the home area was full).
    pub(crate) home: Option<u64>,
    /// Per page: the newest generation an agent reported stale tokens below.
    gens: Gens,
    pub(crate) live: AtomicBool,
}

impl RemoteRegion {
    pub(crate) fn new(
        id: RegionId,
        session: Arc<Session>,
        agent_region: u32,
        addr: u64,
        pages: u32,
        home: Option<u64>,
    ) -> Self {
        RemoteRegion {
            id,
            session,
            agent_region,
            addr,
            pages,
            home,
            gens: Gens::new(pages),
            live: AtomicBool::new(true),
        }
    }

    /// An agent reported that tokens of page `index` older than `gen` are stale.
    pub(crate) fn written(&self, index: u32, gen: u64) {
        self.gens.raise(index, gen);
    }
}

/// The guest RAM of one trust domain's VMMs: see the module docs.
pub struct RemoteMemory {
    domain: DomainId,
    store: Arc<SharedStore>,
    /// Indexed by `RegionId`; ids are never reused.
    regions: RwLock<Vec<Option<Arc<RemoteRegion>>>>,
    hook: RwLock<Option<DirtyHook>>,
}

impl std::fmt::Debug for RemoteMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteMemory")
            .field("domain", &self.domain)
            .field("regions", &self.regions().len())
            .finish_non_exhaustive()
    }
}

impl RemoteMemory {
    pub(crate) fn new(domain: DomainId, store: Arc<SharedStore>) -> Self {
        RemoteMemory {
            domain,
            store,
            regions: RwLock::new(Vec::new()),
            hook: RwLock::new(None),
        }
    }

    /// The trust domain.
    pub fn domain(&self) -> DomainId {
        self.domain
    }

    /// The domain's canonical store.
    pub fn store(&self) -> &Arc<SharedStore> {
        &self.store
    }

    /// Adds a region of `session`'s VMM; its id.
    pub(crate) fn add(
        &self,
        session: &Arc<Session>,
        agent_region: u32,
        addr: u64,
        pages: u32,
    ) -> Arc<RemoteRegion> {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        let id = RegionId(regions.len() as u32);
        let home = self.store.reserve_home(pages);
        let r = Arc::new(RemoteRegion::new(
            id,
            session.clone(),
            agent_region,
            addr,
            pages,
            home,
        ));
        regions.push(Some(r.clone()));
        r
    }

    /// Removes a region (its VMM took it back or went away).
    pub(crate) fn remove(&self, id: RegionId) {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = regions.get_mut(id.0 as usize) {
            if let Some(r) = slot.take() {
                r.live.store(false, Ordering::Relaxed);
            }
        }
    }

    fn region(&self, id: RegionId) -> Result<Arc<RemoteRegion>, PageError> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id.0 as usize)
            .and_then(|r| r.clone())
            .filter(|r| r.live.load(Ordering::Relaxed))
            .ok_or(PageError::NoSuchRegion(id))
    }

    fn page(&self, page: PageId) -> Result<(Arc<RemoteRegion>, PageRef), PageError> {
        let r = self.region(page.region)?;
        if page.index >= r.pages {
            return Err(PageError::NoSuchPage(page));
        }
        let at = PageRef {
            region: r.agent_region,
            index: page.index,
        };
        Ok((r, at))
    }

    fn dirty(&self, page: PageId) {
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(page);
        }
    }

    /// Splits `items` into runs of one region (at most a request's worth each), in
    /// order: for each, the region and the indices of its items. Items of a missing
    /// region or beyond its end get their error in `out` and are left out.
    fn plan<T, R>(
        &self,
        items: &[T],
        page_of: impl Fn(&T) -> PageId,
        out: &mut [Option<Result<R, PageError>>],
    ) -> Vec<(Arc<RemoteRegion>, Vec<usize>)> {
        let mut runs: Vec<(Arc<RemoteRegion>, Vec<usize>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let page = page_of(item);
            let r = match self.page(page) {
                Ok((r, _)) => r,
                Err(e) => {
                    out[i] = Some(Err(e));
                    continue;
                }
            };
            match runs.last_mut() {
                Some((last, idx))
                    if last.id == r.id && idx.len() < crate::wire::MAX_PAGES_PER_REQUEST =>
                {
                    idx.push(i)
                }
                _ => runs.push((r, vec![i])),
            }
        }
        runs
    }
}

/// One empty result per item.
fn results<R>(n: usize) -> Vec<Option<Result<R, PageError>>> {
    (0..n).map(|_| None).collect()
}

/// The results, every item answered.
fn finish<R>(out: Vec<Option<Result<R, PageError>>>) -> Vec<Result<R, PageError>> {
    out.into_iter()
        .map(|r| r.unwrap_or(Err(PageError::Unsupported("unreachable"))))
        .collect()
}

/// Puts one result per index of a reply into `out`: `each` turns the reply's items,
/// or fails every index (a failed call, a reply of the wrong kind or length).
fn spread<R, X>(
    out: &mut [Option<Result<R, PageError>>],
    idx: &[usize],
    reply: Result<Vec<X>, PageError>,
    mut each: impl FnMut(usize, X) -> Result<R, PageError>,
) {
    match reply {
        Ok(v) if v.len() == idx.len() => {
            for (&i, x) in idx.iter().zip(v) {
                out[i] = Some(each(i, x));
            }
        }
        Ok(_) => {
            for &i in idx {
                out[i] = Some(Err(PageError::Unsupported(
                    "the agent answered with the wrong number of results",
                )));
            }
        }
        Err(e) => {
            for &i in idx {
                out[i] = Some(Err(e.clone()));
            }
        }
    }
}

impl RemoteRegion {
    /// The agent's name for page `index`.
    fn at(&self, index: u32) -> PageRef {
        PageRef {
            region: self.agent_region,
            index,
        }
    }
}

/// A reply of the wrong kind.
const WRONG: PageError = PageError::Unsupported("the agent answered with the wrong kind of reply");

fn to_err(code: ErrorCode, page: PageId) -> PageError {
    code.into_page_error(page, page.region)
}

impl PageMemory for RemoteMemory {
    type Frame = SharedFrame;

    fn regions(&self) -> Vec<RegionInfo> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .filter(|r| r.live.load(Ordering::Relaxed))
            .map(|r| RegionInfo {
                id: r.id,
                pages: r.pages,
                domain: self.domain,
            })
            .collect()
    }

    fn read_page(&self, page: PageId, buf: &mut [u8; PAGE_SIZE]) -> Result<(), PageError> {
        let (r, _) = self.page(page)?;
        let addr = r.addr + page.index as u64 * PAGE_SIZE as u64;
        read_process(r.session.pid(), addr as usize, buf)
            .map_err(|_| PageError::Unmapped(page.region))
    }

    fn read_pages(
        &self,
        pages: &[PageId],
        out: &mut [[u8; PAGE_SIZE]],
    ) -> Vec<Result<(), PageError>> {
        assert!(
            out.len() >= pages.len(),
            "read_pages: fewer buffers than pages"
        );
        let mut res = Vec::with_capacity(pages.len());
        let mut k = 0;
        // One process_vm_readv per run of consecutive pages; per page if it fails.
        for run in consecutive_runs(pages) {
            let (first, bufs) = (run[0], &mut out[k..k + run.len()]);
            k += run.len();
            let done = self.page(first).is_ok_and(|(r, _)| {
                let addr = r.addr + first.index as u64 * PAGE_SIZE as u64;
                first.index as u64 + run.len() as u64 <= r.pages as u64
                    && read_process(r.session.pid(), addr as usize, bufs.as_flattened_mut()).is_ok()
            });
            if done {
                res.extend(run.iter().map(|_| Ok(())));
            } else {
                for (&p, buf) in run.iter().zip(bufs) {
                    res.push(self.read_page(p, buf));
                }
            }
        }
        res
    }

    fn read_words(&self, page: PageId, out: &mut [u64]) -> Result<(), PageError> {
        if out.len() > PAGE_SIZE / 8 {
            return Err(PageError::Unsupported("more words than a page holds"));
        }
        let (r, _) = self.page(page)?;
        let mut bytes = vec![0u8; out.len() * 8];
        let addr = r.addr + page.index as u64 * PAGE_SIZE as u64;
        read_process(r.session.pid(), addr as usize, &mut bytes)
            .map_err(|_| PageError::Unmapped(page.region))?;
        for (w, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        }
        Ok(())
    }

    fn protect(&self, pages: &[PageId]) -> Vec<Result<ProtectToken, PageError>> {
        let mut out = results(pages.len());
        for (r, idx) in self.plan(pages, |p| *p, &mut out) {
            let refs = idx.iter().map(|&i| r.at(pages[i].index)).collect();
            let reply = r.session.call(Op::Protect(refs)).and_then(|b| match b {
                ReplyBody::Tokens(v) => Ok(v),
                _ => Err(WRONG),
            });
            spread(&mut out, &idx, reply, |i, t| {
                t.map(ProtectToken).map_err(|c| to_err(c, pages[i]))
            });
        }
        finish(out)
    }

    fn unprotect(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        self.each_done(pages, Op::Unprotect)
    }

    fn written_since(&self, page: PageId, token: ProtectToken) -> Result<bool, PageError> {
        let (r, _) = self.page(page)?;
        if !r.session.is_alive() {
            return Err(PageError::NoSuchRegion(page.region));
        }
        Ok(r.gens.get(page.index).unwrap_or(0) > token.0)
    }

    fn canonicalize(&self, page: PageId, token: ProtectToken) -> Result<SharedFrame, PageError> {
        self.canonicalize_batch(&[(page, token)])
            .pop()
            .unwrap_or(Err(PageError::Unsupported("unreachable")))
    }

    fn canonicalize_batch(
        &self,
        pages: &[(PageId, ProtectToken)],
    ) -> Vec<Result<SharedFrame, PageError>> {
        let mut out = results(pages.len());
        for (r, idx) in self.plan(pages, |p| p.0, &mut out) {
            // A slot for each page (its home slot where free), held by a frame until the
            // agent's reply says what the page maps.
            let mut named = Vec::with_capacity(idx.len());
            for &i in &idx {
                let home = r.home.map_or(u64::MAX, |h| h + pages[i].0.index as u64);
                named.push(self.store.allocate(home));
            }
            if let Some(Err(e)) = named.iter().find(|f| f.is_err()) {
                spread(&mut out, &idx, Err::<Vec<()>, _>(e.clone()), |_, ()| {
                    Err(WRONG)
                });
                continue;
            }
            let named: Vec<SharedFrame> = named.into_iter().flatten().collect();
            let items = idx
                .iter()
                .zip(&named)
                .map(|(&i, f)| (r.at(pages[i].0.index), pages[i].1 .0, f.slot().unwrap_or(0)))
                .collect();
            let reply = r
                .session
                .call(Op::CanonicalizeAt(items))
                .and_then(|b| match b {
                    ReplyBody::Frames(v) => Ok(v.into_iter().zip(named).collect::<Vec<_>>()),
                    _ => Err(WRONG),
                });
            spread(&mut out, &idx, reply, |i, (res, named)| match res {
                Ok(Some(s)) if Some(s) == named.slot() => Ok(named),
                // The page already mapped a store page (merged before): that one.
                Ok(Some(s)) => self.store.frame(s).ok_or(PageError::Unsupported(
                    "the agent named a slot nobody holds",
                )),
                Ok(None) => Ok(self.store.zero_frame()),
                Err(c) => Err(to_err(c, pages[i].0)),
            });
        }
        let out = finish(out);
        for (r, &(p, _)) in out.iter().zip(pages) {
            if r.is_ok() {
                self.dirty(p);
            }
        }
        out
    }

    fn merge(
        &self,
        dup: PageId,
        token: ProtectToken,
        canonical: &SharedFrame,
    ) -> Result<MergeOutcome, PageError> {
        self.merge_batch(&[(dup, token, canonical)])
            .pop()
            .unwrap_or(Err(PageError::Unsupported("unreachable")))
    }

    fn merge_batch(
        &self,
        items: &[(PageId, ProtectToken, &SharedFrame)],
    ) -> Vec<Result<MergeOutcome, PageError>> {
        let mut out = results(items.len());
        for (i, (_, _, f)) in items.iter().enumerate() {
            if !f.is_of(&self.store) {
                out[i] = Some(Err(PageError::Unsupported(
                    "a frame of another trust domain's store",
                )));
            }
        }
        let pending: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_none()).collect();
        let sub: Vec<(PageId, ProtectToken, &SharedFrame)> =
            pending.iter().map(|&i| items[i]).collect();
        let mut sub_out = results(sub.len());
        for (r, idx) in self.plan(&sub, |i| i.0, &mut sub_out) {
            let list = idx
                .iter()
                .map(|&i| (r.at(sub[i].0.index), sub[i].1 .0, sub[i].2.slot()))
                .collect();
            let reply = r.session.call(Op::MergeAt(list)).and_then(|b| match b {
                ReplyBody::Outcomes(v) => Ok(v),
                _ => Err(WRONG),
            });
            spread(&mut sub_out, &idx, reply, |i, o| {
                o.map(Into::into).map_err(|c| to_err(c, sub[i].0))
            });
        }
        for (&i, r) in pending.iter().zip(sub_out) {
            out[i] = r;
        }
        let out = finish(out);
        for (r, &(p, _, _)) in out.iter().zip(items) {
            if matches!(r, Ok(MergeOutcome::Merged)) {
                self.dirty(p);
            }
        }
        out
    }

    fn zero_frame(&self) -> SharedFrame {
        self.store.zero_frame()
    }

    fn mapping_limit(&self) -> Option<u64> {
        // The tightest of the domain's VMM processes: each has its own.
        self.sessions_budget().map(|(_, limit)| limit)
    }

    fn mappings_in_use(&self, _recount: bool) -> Option<u64> {
        self.sessions_budget().map(|(in_use, _)| in_use)
    }

    /// Each VMM process has its own budget (its `vm.max_map_count`): its process id
    /// (`SO_PEERCRED`; one budget for every connection of one process).
    fn mapping_budget(&self, region: RegionId) -> u64 {
        self.region(region)
            .map_or(u64::MAX, |r| r.session.peer.pid as u32 as u64)
    }

    fn budget_limit(&self, budget: u64) -> Option<u64> {
        self.session_mappings(budget).map(|(_, limit)| limit)
    }

    fn budget_in_use(&self, budget: u64, _recount: bool) -> Option<u64> {
        // As reported by the VMM's agent (every 100 ms while it has work).
        self.session_mappings(budget).map(|(in_use, _)| in_use)
    }

    fn recycle(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        let out = self.each_done(pages, Op::Recycle);
        for (r, &p) in out.iter().zip(pages) {
            if r.is_ok() {
                self.dirty(p);
            }
        }
        out
    }

    fn unmerge(&self, page: PageId) -> Result<(), PageError> {
        let (r, at) = self.page(page)?;
        let reply = r.session.call(Op::Unmerge(at)).and_then(|b| match b {
            ReplyBody::Done(mut v) if v.len() == 1 => {
                v.pop().expect("one").map_err(|c| to_err(c, page))
            }
            _ => Err(WRONG),
        });
        if reply.is_ok() {
            self.dirty(page);
        }
        reply
    }

    fn set_dirty_hook(&self, hook: Option<DirtyHook>) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = hook;
    }
}

impl RemoteMemory {
    /// What an agent of the VMM process `pid` reported of its mappings (in use, limit),
    /// if it reported a limit (the highest of its connections' reports: they count the
    /// same process's mappings).
    fn session_mappings(&self, pid: u64) -> Option<(u64, u64)> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions
            .iter()
            .flatten()
            .filter(|r| r.session.peer.pid as u32 as u64 == pid)
            .map(|r| r.session.mappings())
            .filter(|&(_, limit)| limit > 0)
            .max_by_key(|&(in_use, _)| in_use)
    }

    /// The mapping budget of the process closest to its limit, scaled: (in use, limit)
    /// (the whole memory's budget, for callers that ask without naming a process).
    fn sessions_budget(&self) -> Option<(u64, u64)> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let mut worst: Option<(u64, u64)> = None;
        for r in regions.iter().flatten() {
            let (in_use, limit) = r.session.mappings();
            if limit == 0 {
                continue;
            }
            // Compare fractions in_use / limit without dividing.
            let tighter = match worst {
                None => true,
                Some((u, l)) => (in_use as u128) * (l as u128) > (u as u128) * (limit as u128),
            };
            if tighter {
                worst = Some((in_use, limit));
            }
        }
        worst
    }
}

impl RemoteMemory {
    /// An operation whose reply is one "done" per page.
    fn each_done(
        &self,
        pages: &[PageId],
        op: impl Fn(Vec<PageRef>) -> Op,
    ) -> Vec<Result<(), PageError>> {
        let mut out = results(pages.len());
        for (r, idx) in self.plan(pages, |p| *p, &mut out) {
            let refs = idx.iter().map(|&i| r.at(pages[i].index)).collect();
            let reply = r.session.call(op(refs)).and_then(|b| match b {
                ReplyBody::Done(v) => Ok(v),
                _ => Err(WRONG),
            });
            spread(&mut out, &idx, reply, |i, d| {
                d.map_err(|c| to_err(c, pages[i]))
            });
        }
        finish(out)
    }
}

impl RemoteMemory {
    /// The Per Page Recycler across processes: asks the agent of each page's VMM to
    /// recycle those of `pages` its guest freed ([`Op::Reclaim`]: the agent proves each
    /// against the pool in its guest's memory), one request per run of one region.
    /// Pages of regions whose agent reported no pool are not asked about (`Ok(false)`).
    /// Recycled pages are told to the dirty hook.
    pub(crate) fn reclaim(&self, pages: &[PageId]) -> Vec<Result<bool, PageError>> {
        let mut out = results(pages.len());
        for (r, idx) in self.plan(pages, |p| *p, &mut out) {
            if !r.session.has_pool(r.agent_region) {
                for &i in &idx {
                    out[i] = Some(Ok(false));
                }
                continue;
            }
            let refs = idx.iter().map(|&i| r.at(pages[i].index)).collect();
            let reply = r.session.call(Op::Reclaim(refs)).and_then(|b| match b {
                ReplyBody::Reclaimed(v) => Ok(v),
                _ => Err(WRONG),
            });
            spread(&mut out, &idx, reply, |i, d| {
                d.map_err(|c| to_err(c, pages[i]))
            });
        }
        let out = finish(out);
        for (r, &p) in out.iter().zip(pages) {
            if matches!(r, Ok(true)) {
                self.dirty(p);
            }
        }
        out
    }
}
