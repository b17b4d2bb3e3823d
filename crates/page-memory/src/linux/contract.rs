//! The [`PageMemory`] contract on Linux memory: each operation of the trait, in terms of
//! the backend's steps.

use std::sync::Arc;

use rustix::io::Errno;

use super::region::{gone_or, Kind, Region};
use super::stats::bump;
use super::store::{LinuxFrame, Slot};
use super::sys::{self, Advice};
use super::LinuxMemory;
use crate::{
    consecutive_runs, DirtyHook, MergeOutcome, PageError, PageId, PageMemory, ProtectToken,
    RegionInfo, PAGE_SIZE, PAGE_WORDS,
};

impl PageMemory for LinuxMemory {
    type Frame = LinuxFrame;

    fn regions(&self) -> Vec<RegionInfo> {
        self.live_regions().iter().map(|r| r.info).collect()
    }

    fn read_page(&self, page: PageId, buf: &mut [u8; PAGE_SIZE]) -> Result<(), PageError> {
        self.inner.with_page(page, |region, addr, st| {
            self.inner.read_checked(region, addr, &mut buf[..], st)
        })
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
        let max = self.inner.config.max_run_pages.max(1);
        let mut results = Vec::with_capacity(pages.len());
        let mut k = 0;
        for run in consecutive_runs(pages).flat_map(|r| r.chunks(max)) {
            let bufs = &mut out[k..k + run.len()];
            k += run.len();
            if run.len() == 1 {
                results.push(self.read_page(run[0], &mut bufs[0]));
                continue;
            }
            self.inner
                .in_run(run, &mut results, |region, first, guards| {
                    self.inner.read_run(region, first, guards, bufs)
                });
        }
        results
    }

    fn read_words(&self, page: PageId, out: &mut [u64]) -> Result<(), PageError> {
        if out.len() > PAGE_WORDS {
            return Err(PageError::Unsupported("more words than a page holds"));
        }
        let mut bytes = [0u8; PAGE_SIZE];
        let n = out.len() * 8;
        self.inner.with_page(page, |region, addr, st| {
            self.inner.read_checked(region, addr, &mut bytes[..n], st)
        })?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *o = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        }
        Ok(())
    }

    fn protect(&self, pages: &[PageId]) -> Vec<Result<ProtectToken, PageError>> {
        if let Err(refused) = self.inner.pins_checked(pages) {
            return refused;
        }
        let mut out = Vec::with_capacity(pages.len());
        for run in consecutive_runs(pages) {
            self.inner.protect_run(run, &mut out);
        }
        out
    }

    fn unprotect(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        let mut out = Vec::with_capacity(pages.len());
        for run in consecutive_runs(pages) {
            self.inner.unprotect_run(run, &mut out);
        }
        out
    }

    fn written_since(&self, page: PageId, token: ProtectToken) -> Result<bool, PageError> {
        let tracked = self.inner.uffd.is_some();
        self.inner.with_page(page, |_, _, s| {
            Ok(!tracked || !s.protected() || s.gen != token.0)
        })
    }

    fn canonicalize(&self, page: PageId, token: ProtectToken) -> Result<LinuxFrame, PageError> {
        let store = self.inner.store();
        self.canonicalize_placed(page, token, &|r, p| store.allocate(r.home + p.index as u64))
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
            if !Arc::ptr_eq(&slot.store, &inner.store()) {
                return Err(PageError::Unsupported("a frame of another LinuxMemory"));
            }
        }
        inner.pin_last_checked(dup)?;
        let outcome = inner.with_page(dup, |region, addr, st| {
            if st.pinned > 0 {
                return Err(inner.pinned(dup));
            }
            if !st.protected() || st.gen != token.0 {
                return Ok((MergeOutcome::Changed, false));
            }
            match (&canonical.0, st.kind, st.slot()) {
                (None, Kind::Zero, _) => return Ok((MergeOutcome::Merged, false)),
                (Some(c), Kind::Store, Some(s)) if c.same(s) => {
                    return Ok((MergeOutcome::Merged, false))
                }
                _ => {}
            }
            // Protected: no write can land while we compare and remap.
            let mut buf = [0u8; PAGE_SIZE];
            inner.check_page(region, addr, st)?;
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
        let store = self.inner.store();
        self.canonicalize_batch_placed(pages, &|r, p| store.allocate(r.home + p.index as u64))
    }

    fn merge_batch(
        &self,
        items: &[(PageId, ProtectToken, &LinuxFrame)],
    ) -> Vec<Result<MergeOutcome, PageError>> {
        let inner = &self.inner;
        let ids: Vec<PageId> = items.iter().map(|i| i.0).collect();
        if let Err(refused) = inner.pins_last_checked(&ids) {
            return refused;
        }
        let _near = inner.follow();
        let mut out = Vec::with_capacity(items.len());
        let max = inner.config.max_run_pages.max(1);
        // The store slot of a frame of this memory (`None`: the zero frame, or foreign).
        let store = inner.store();
        let slot = |f: &LinuxFrame| -> Option<u64> {
            f.0.as_ref()
                .filter(|s| Arc::ptr_eq(&s.store, &store))
                .map(|s| s.index())
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

    /// `vm.max_map_count`, reread (one small read of `/proc/sys`).
    fn mapping_limit(&self) -> Option<u64> {
        sys::max_map_count()
    }

    /// The map-count guard's upper bound (the last count plus two per remap since), or
    /// with `recount` a fresh count of `/proc/self/maps`.
    fn mappings_in_use(&self, recount: bool) -> Option<u64> {
        Some(self.inner.guard.in_use(recount))
    }

    fn recycle(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        if let Err(refused) = self.inner.pins_checked(pages) {
            return refused;
        }
        let _near = self.inner.follow();
        let mut out = Vec::with_capacity(pages.len());
        for run in consecutive_runs(pages) {
            let start = out.len();
            self.inner.recycle_run(run, &mut out, false);
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
            inner.check_page(region, addr, st)?;
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
                    if st.protected() {
                        inner.unwp(region, addr, PAGE_SIZE, false)?;
                    }
                    false
                }
            };
            if let Some(uffd) = &inner.uffd {
                let _ = uffd.wake(addr, PAGE_SIZE);
            }
            if st.protected() || changed {
                region.unprotect_at(addr, st);
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

/// Chooses the store slot a page being made canonical goes to.
pub(super) type Place<'a> = &'a dyn Fn(&Region, PageId) -> Result<Slot, PageError>;

impl LinuxMemory {
    /// `canonicalize`, with the page's new slot chosen by `place`.
    pub(super) fn canonicalize_placed(
        &self,
        page: PageId,
        token: ProtectToken,
        place: Place<'_>,
    ) -> Result<LinuxFrame, PageError> {
        let inner = &self.inner;
        inner.uffd()?;
        inner.pin_last_checked(page)?;
        let frame = inner.with_page(page, |region, addr, st| {
            if st.pinned > 0 {
                return Err(inner.pinned(page));
            }
            if !st.protected() || st.gen != token.0 {
                return Err(PageError::Stale(page));
            }
            match (st.kind, st.slot()) {
                // Already maps a store page (merged, or canonical before): that is its frame.
                // (A page of a store since replaced, `relink_store`, is copied anew.)
                (Kind::Store, Some(slot)) if Arc::ptr_eq(&slot.store, &inner.store()) => {
                    return Ok((LinuxFrame(Some(slot.clone())), false))
                }
                (Kind::Zero, _) => return Ok((LinuxFrame(None), false)),
                _ => {}
            }
            inner.check_page(region, addr, st)?;
            let slot = place(region, page)?;
            sys::pwrite_from_guest(slot.store.fd(), addr, PAGE_SIZE, slot.offset()).map_err(
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

    /// `canonicalize_batch`, with each page's new slot chosen by `place`.
    pub(super) fn canonicalize_batch_placed(
        &self,
        pages: &[(PageId, ProtectToken)],
        place: Place<'_>,
    ) -> Vec<Result<LinuxFrame, PageError>> {
        let ids: Vec<PageId> = pages.iter().map(|p| p.0).collect();
        if let Err(refused) = self.inner.pins_last_checked(&ids) {
            return refused;
        }
        let _near = self.inner.follow();
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
                out.extend(
                    pages[k..j]
                        .iter()
                        .map(|&(p, t)| self.canonicalize_placed(p, t, place)),
                );
            } else {
                let done = out.len();
                let changed = self.inner.canonicalize_run(&pages[k..j], &mut out, place);
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
}
