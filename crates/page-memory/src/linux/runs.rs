//! Batches: runs of consecutive pages of one region, locked together and done with one
//! system call of each kind (see *Batches* in the module docs).

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use rustix::io::Errno;

use super::region::{gone_or, Kind, PageState, Region};
use super::stats::bump;
use super::store::{LinuxFrame, Slot};
use super::sys::{self, Advice};
use super::{Inner, NO_UFFD};
use crate::{MergeOutcome, PageError, PageId, ProtectToken, PAGE_SIZE};

thread_local! {
    /// A reusable buffer for reading runs of guest pages (kept between calls, so a run's
    /// read allocates nothing).
    static RUN_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Inner {
    /// Resolves `run` (consecutive pages of one region) to its region, or pushes `err`
    /// for each of its pages.
    pub(super) fn run_region<T>(
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

    /// The opening and closing steps of every run operation, written once: resolves `run`
    /// (consecutive pages of one region) to its region, holds the region live and locks
    /// every page of the run (in order), calls `body` with the region, the run's first
    /// index and the locks, then unlocks and pushes `body`'s results (one per page, in
    /// order) to `out`. A run whose region does not exist, was removed or was unmapped by
    /// its owner, or that crosses the region's end, gets an error for each page instead,
    /// and `body` is not called.
    pub(super) fn in_run<T, F>(&self, run: &[PageId], out: &mut Vec<Result<T, PageError>>, body: F)
    where
        F: FnOnce(&Region, usize, &mut [MutexGuard<'_, PageState>]) -> Vec<Result<T, PageError>>,
    {
        let Some(region) = self.run_region(run, out) else {
            return;
        };
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        let early = if !*live {
            Some(PageError::NoSuchRegion(region.info.id))
        } else if region.unmapped.load(Ordering::Relaxed) {
            Some(PageError::Unmapped(region.info.id))
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
        let results = body(&region, first, &mut guards);
        debug_assert_eq!(results.len(), run.len());
        drop(guards);
        drop(live);
        out.extend(results);
    }

    /// `protect` of a run: pages whose remap could not be registered are registered again
    /// first; then one `UFFDIO_WRITEPROTECT` per sub-run that needs it.
    pub(super) fn protect_run(
        &self,
        run: &[PageId],
        out: &mut Vec<Result<ProtectToken, PageError>>,
    ) {
        self.in_run(run, out, |region, first, guards| {
            if self.uffd.is_none() {
                return run
                    .iter()
                    .map(|_| Err(PageError::Unsupported(NO_UFFD)))
                    .collect();
            }
            // Pages whose remap could not be registered get another try; they are protected
            // one by one, and a write made while they were untracked is accounted for.
            let mut ok: Vec<Result<(), PageError>> = Vec::with_capacity(run.len());
            for (k, g) in guards.iter_mut().enumerate() {
                if g.gone() {
                    ok.push(Err(PageError::Unmapped(region.info.id)));
                    continue;
                }
                if g.pinned > 0 {
                    ok.push(Err(self.pinned(run[k])));
                    continue;
                }
                if g.registered() {
                    ok.push(Ok(()));
                    continue;
                }
                let addr = region.addr((first + k) as u32);
                let r = self.register(addr).and_then(|()| {
                    g.set_registered(true);
                    self.wp(region, addr, PAGE_SIZE)
                });
                if r.is_ok() {
                    self.reconcile(region, addr, g);
                    g.set_protected(true);
                }
                ok.push(r);
            }
            // One UFFDIO_WRITEPROTECT per sub-run, pages already protected included: it is
            // also the proof that the pages are still the region's (a mapping that took
            // their address is not registered, and fails with ENOENT), so no token is
            // handed out for memory that is no longer the region's. Where it fails, page
            // by page, so that a failure is the error of its own page alone.
            let mut k = 0;
            while k < run.len() {
                if ok[k].is_err() {
                    k += 1;
                    continue;
                }
                let mut j = k;
                while j < run.len() && ok[j].is_ok() {
                    j += 1;
                }
                let addr = region.addr((first + k) as u32);
                if self.wp(region, addr, (j - k) * PAGE_SIZE).is_err() {
                    for (i, r) in (k..j).zip(&mut ok[k..j]) {
                        let a = region.addr((first + i) as u32);
                        *r = self.wp(region, a, PAGE_SIZE);
                    }
                }
                k = j;
            }
            // A page that could not be protected gets no token, and its old ones die (its
            // kernel protection is not certain any more); a store page that could not be
            // protected when it was remapped finds out what it maps now.
            guards
                .iter_mut()
                .enumerate()
                .zip(ok)
                .map(|((k, g), r)| match r {
                    Ok(()) => {
                        if g.kind == Kind::StoreCow && g.slot().is_some() {
                            self.reconcile(region, region.addr((first + k) as u32), g);
                        }
                        g.set_protected(true);
                        Ok(ProtectToken(g.gen))
                    }
                    Err(e) => {
                        if g.protected() {
                            region.unprotect_at(region.addr((first + k) as u32), g);
                        }
                        Err(e)
                    }
                })
                .collect()
        });
    }

    /// `unprotect` of a run (store pages stay write-protected for the fault thread).
    pub(super) fn unprotect_run(&self, run: &[PageId], out: &mut Vec<Result<(), PageError>>) {
        self.in_run(run, out, |region, first, guards| {
            guards
                .iter_mut()
                .enumerate()
                .map(|(k, st)| {
                    if st.gone() {
                        Err(PageError::Unmapped(region.info.id))
                    } else if st.protected() {
                        // A store page keeps its protection (the fault thread must see its
                        // copy-on-write break); it only stops being protected for the engine.
                        let r = if st.kind != Kind::Store && st.registered() && self.uffd.is_some()
                        {
                            self.unwp(region, region.addr((first + k) as u32), PAGE_SIZE, true)
                        } else {
                            Ok(())
                        };
                        region.unprotect_at(region.addr((first + k) as u32), st);
                        r
                    } else {
                        Ok(())
                    }
                })
                .collect()
        });
    }

    /// `recycle` of a run: one `MADV_DONTNEED` per sub-run of anonymous pages, fresh
    /// anonymous memory over each page that maps the store.
    pub(super) fn recycle_run(
        &self,
        run: &[PageId],
        out: &mut Vec<Result<(), PageError>>,
        discard: bool,
    ) {
        self.in_run(run, out, |region, first, guards| {
            let mut res: Vec<Result<(), PageError>> = vec![Ok(()); run.len()];
            let mut k = 0;
            while k < run.len() {
                if guards[k].pinned > 0 {
                    res[k] = Err(self.pinned(run[k]));
                    k += 1;
                    continue;
                }
                let anon =
                    |g: &PageState| g.pinned == 0 && matches!(g.kind, Kind::Anon | Kind::Zero);
                if anon(&guards[k]) {
                    let mut j = k;
                    while j < run.len() && anon(&guards[j]) {
                        j += 1;
                    }
                    let addr = region.addr((first + k) as u32);
                    let r = self.check_ours(region, addr, &guards[k..j]).and_then(|()| {
                        let counted = self.expect_remove(&mut guards[k..j]);
                        // SAFETY: pages of a live region, locked by us and just checked to
                        // be still the region's; recycling drops their contents by
                        // definition (they then read as zeros).
                        let r = unsafe {
                            sys::madvise(addr, (j - k) * PAGE_SIZE, Advice::LinuxDontNeed)
                        };
                        self.own_done(counted);
                        r.map_err(|e| {
                            self.unexpect_remove(&mut guards[k..j], counted);
                            gone_or(region, "MADV_DONTNEED (recycle)", e, &[Errno::NOMEM])
                        })
                    });
                    if let Err(e) = r {
                        for r in &mut res[k..j] {
                            *r = Err(e.clone());
                        }
                    }
                    k = j;
                } else {
                    let addr = region.addr((first + k) as u32);
                    res[k] = if self.uffd.is_some() {
                        self.map_anon(region, addr, &mut guards[k])
                    } else {
                        Err(PageError::Unsupported(NO_UFFD))
                    };
                    k += 1;
                }
            }
            guards
                .iter_mut()
                .enumerate()
                .zip(res)
                .map(|((k, g), r)| {
                    if r.is_ok() {
                        g.kind = Kind::Zero;
                        region.unprotect_at(region.addr((first + k) as u32), g);
                        bump(if discard {
                            &self.counters.discarded
                        } else {
                            &self.counters.recycled
                        });
                    }
                    r
                })
                .collect()
        });
    }

    /// `merge` of a run of consecutive pages whose frames are consecutive store slots.
    /// Pushes one result per item; returns which pages changed (for the dirty hook).
    pub(super) fn merge_run(
        &self,
        items: &[(PageId, ProtectToken, &LinuxFrame)],
        out: &mut Vec<Result<MergeOutcome, PageError>>,
    ) -> Vec<bool> {
        let n = items.len();
        let pages: Vec<PageId> = items.iter().map(|i| i.0).collect();
        let mut changed = vec![false; n];
        self.in_run(&pages, out, |region, _, guards| {
            let mut res: Vec<Option<Result<MergeOutcome, PageError>>> = vec![None; n];
            for (k, (g, &(page, token, frame))) in guards.iter().zip(items).enumerate() {
                if g.pinned > 0 {
                    res[k] = Some(Err(self.pinned(page)));
                } else if !g.protected() || g.gen != token.0 {
                    res[k] = Some(Ok(MergeOutcome::Changed));
                } else if let (Kind::Store, Some(s), Some(c)) = (g.kind, g.slot(), &frame.0) {
                    if s.same(c) {
                        res[k] = Some(Ok(MergeOutcome::Merged));
                    }
                }
            }
            // Protected: no write can land while we compare and remap. One read for the run.
            let addr = region.addr(pages[0].index);
            RUN_BUF.with(|b| {
                let mut buf = b.borrow_mut();
                buf.resize(n * PAGE_SIZE, 0);
                let read = self
                    .check_ours(region, addr, guards)
                    .and_then(|()| self.read_guest(region, addr, &mut buf[..]));
                if let Err(e) = read {
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
                let slots: Vec<Slot> = items[k..j].iter().filter_map(|i| i.2 .0.clone()).collect();
                let r = self.map_slots_run(
                    region,
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
            res.into_iter()
                .map(|r| r.unwrap_or(Ok(MergeOutcome::Changed)))
                .collect()
        });
        changed
    }

    /// `read_pages` of a run (locked in `guards`, from page `first` of `region`): one
    /// `process_vm_readv` of the whole run between two proofs that the run is still the
    /// region's ([`check_ours`](Self::check_ours)), or, if any of that fails, page by page
    /// ([`read_checked`](Self::read_checked)), so that each page gets its own result.
    pub(super) fn read_run(
        &self,
        region: &Region,
        first: usize,
        guards: &mut [MutexGuard<'_, PageState>],
        bufs: &mut [[u8; PAGE_SIZE]],
    ) -> Vec<Result<(), PageError>> {
        let addr = region.addr(first as u32);
        let whole = bufs.as_flattened_mut();
        let read = if self.config.checked_access {
            self.check_ours(region, addr, guards).is_ok()
                && self.read_guest(region, addr, whole).is_ok()
                && self.check_ours(region, addr, guards).is_ok()
        } else {
            !region.unmapped.load(Ordering::Relaxed)
                && guards.iter().all(|s| !s.gone())
                && self.read_guest(region, addr, whole).is_ok()
        };
        if read {
            return vec![Ok(()); guards.len()];
        }
        guards
            .iter()
            .zip(bufs.iter_mut())
            .enumerate()
            .map(|(k, (st, buf))| {
                let r = self.read_checked(region, addr + k * PAGE_SIZE, &mut buf[..], st);
                if r.is_err() {
                    buf.fill(0);
                }
                r
            })
            .collect()
    }

    /// `canonicalize` of a run of consecutive pages: each page goes to its home slot where
    /// free, and each sub-run of consecutive slots is copied with one `pwrite` and mapped
    /// with one `mmap`. Pushes one result per page; returns which pages changed.
    pub(super) fn canonicalize_run(
        &self,
        run: &[(PageId, ProtectToken)],
        out: &mut Vec<Result<LinuxFrame, PageError>>,
        place: super::contract::Place<'_>,
    ) -> Vec<bool> {
        let n = run.len();
        let pages: Vec<PageId> = run.iter().map(|i| i.0).collect();
        let mut changed = vec![false; n];
        let store = self.store();
        self.in_run(&pages, out, |region, _, guards| {
            let mut res: Vec<Option<Result<LinuxFrame, PageError>>> = vec![None; n];
            let mut slots: Vec<Option<Slot>> = vec![None; n];
            for (k, (g, &(page, token))) in guards.iter().zip(run).enumerate() {
                res[k] = if g.pinned > 0 {
                    Some(Err(self.pinned(page)))
                } else if !g.protected() || g.gen != token.0 {
                    Some(Err(PageError::Stale(page)))
                } else {
                    match (g.kind, g.slot()) {
                        // (A page of a store since replaced is copied anew.)
                        (Kind::Store, Some(slot)) if Arc::ptr_eq(&slot.store, &store) => {
                            Some(Ok(LinuxFrame(Some(slot.clone()))))
                        }
                        (Kind::Zero, _) => Some(Ok(LinuxFrame(None))),
                        _ => match place(region, page) {
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
                let Some(s0) = slots[k].as_ref().map(|s| s.index()) else {
                    k += 1;
                    continue;
                };
                let mut j = k + 1;
                while j < n && slots[j].as_ref().map(|s| s.index()) == Some(s0 + (j - k) as u64) {
                    j += 1;
                }
                let addr = region.addr(pages[k].index);
                let run_slots: Vec<Slot> =
                    slots[k..j].iter_mut().filter_map(Option::take).collect();
                let r = self
                    .check_ours(region, addr, &guards[k..j])
                    .and_then(|()| {
                        sys::pwrite_from_guest(
                            run_slots[0].store.fd(),
                            addr,
                            (j - k) * PAGE_SIZE,
                            run_slots[0].offset(),
                        )
                        .map_err(|e| {
                            gone_or(
                                region,
                                "pwrite (copy pages into the store)",
                                e,
                                &[Errno::FAULT],
                            )
                        })
                    })
                    .and_then(|()| self.map_slots_run(region, addr, &mut guards[k..j], &run_slots));
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
            // Every page got its result above (the slot runs cover the rest).
            res.into_iter()
                .map(|r| r.unwrap_or(Err(PageError::Unsupported("unreachable"))))
                .collect()
        });
        changed
    }
}
