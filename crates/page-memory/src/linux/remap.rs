//! Guest pages as the backend touches them: reading them without dereferencing them,
//! (un)protecting them, remapping them to store pages or fresh anonymous memory, and
//! settling a fresh mapping (register, protect, catch a write made in the window: see
//! *Merging* in the module docs).

use std::ops::{Deref, DerefMut};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::fault::in_fault_thread;
use super::region::{gone_or, uffd_gone_or, Kind, PageState, Region};
use super::stats::bump;
use super::store::Slot;
use super::sys::{self, Advice};
use super::Inner;
use crate::{is_zero_page, PageError, PAGE_SIZE};

/// How long an operation retries a write-protect call that fails with `EAGAIN` (an event
/// not read yet) before it gives up with that error.
const EAGAIN_PATIENCE: Duration = Duration::from_secs(2);

impl Inner {
    /// Copies the guest page at `addr` into `buf`.
    pub(super) fn read_guest(
        &self,
        region: &Region,
        addr: usize,
        buf: &mut [u8],
    ) -> Result<(), PageError> {
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

    /// Copies the guest page at `addr` (locked in `st`) into `buf`, proving before and
    /// after the copy that the page is still the region's ([`check_page`](Self::check_page)):
    /// bytes of a mapping that took the region's address are never returned. (Only a
    /// mapping registered with this userfaultfd passes the check, and only the backend
    /// registers, under the page's lock, which is held.) With `checked_access` off the
    /// embedder keeps regions mapped, and only pages known gone are refused.
    pub(super) fn read_checked(
        &self,
        region: &Region,
        addr: usize,
        buf: &mut [u8],
        st: &PageState,
    ) -> Result<(), PageError> {
        if !self.config.checked_access {
            if st.gone() || region.unmapped.load(Ordering::Relaxed) {
                return Err(PageError::Unmapped(region.info.id));
            }
            return self.read_guest(region, addr, buf);
        }
        self.check_page(region, addr, st)?;
        let r = self.read_guest(region, addr, buf);
        if let Err(e) = self.check_page(region, addr, st) {
            buf.fill(0);
            return Err(e);
        }
        r
    }

    /// Registers the page at `addr` (a fresh mapping) with the userfaultfd.
    pub(super) fn register(&self, addr: usize) -> Result<(), PageError> {
        self.uffd()?
            .register_wp(addr, PAGE_SIZE)
            .map_err(|e| PageError::Os {
                op: "UFFDIO_REGISTER of a remapped page",
                errno: e.raw_os_error(),
            })
    }

    /// `UFFDIO_WRITEPROTECT` of `[addr, addr + len)`. While the kernel holds an event that
    /// no fault thread has read yet, the call fails with `EAGAIN` (the kernel's
    /// `mmap_changing`); an operation then tries again until the fault thread has read it
    /// (microseconds: it never waits for anything else), for at most
    /// [`EAGAIN_PATIENCE`]. A fault thread does not retry: it is the reader.
    pub(super) fn wp_call(
        &self,
        addr: usize,
        len: usize,
        protect: bool,
        wake: bool,
    ) -> Result<(), Errno> {
        let uffd = self.uffd.as_ref().ok_or(Errno::NOTSUP)?;
        let mut since: Option<Instant> = None;
        loop {
            match uffd.writeprotect(addr, len, protect, wake) {
                Err(Errno::AGAIN) if !in_fault_thread() => {
                    let t0 = *since.get_or_insert_with(Instant::now);
                    if t0.elapsed() > EAGAIN_PATIENCE {
                        return Err(Errno::AGAIN);
                    }
                    std::thread::yield_now();
                }
                r => return r,
            }
        }
    }

    /// Write-protects `len` bytes at `addr`.
    pub(super) fn wp(&self, region: &Region, addr: usize, len: usize) -> Result<(), PageError> {
        self.uffd()?;
        if !self.caps.wp_unpopulated {
            // Without markers an empty entry cannot be protected: fault the zero page in.
            // SAFETY: the range is guest memory of a live region; reading it in changes no
            // contents.
            let _ = unsafe { sys::madvise(addr, len, Advice::LinuxPopulateRead) };
        }
        self.wp_call(addr, len, true, false)
            .map_err(|e| uffd_gone_or(region, "UFFDIO_WRITEPROTECT", e))
    }

    /// Proves, under the locks of its pages (`sts`, from `addr` on), that the range is
    /// still the region's before the backend reads, drops or remaps it: no page is known
    /// gone, and the kernel still has the range registered with this userfaultfd
    /// (`UFFDIO_WRITEPROTECT` leaving each page's protection as it is, which fails with
    /// `ENOENT` where the mapping is not registered: a new mapping at the address never
    /// is). Pages whose fresh mapping could not be registered are checked against
    /// `/proc/self/maps` instead. Without a userfaultfd only `gone` is checked.
    ///
    /// What it cannot rule out: the owner unmapping the range and another mapping taking
    /// the address between this check and the call that follows it (see *Unmaps,
    /// discards and moves* in the module docs).
    pub(super) fn check_ours<S: Deref<Target = PageState>>(
        &self,
        region: &Region,
        addr: usize,
        sts: &[S],
    ) -> Result<(), PageError> {
        if region.unmapped.load(Ordering::Relaxed) || sts.iter().any(|s| s.gone()) {
            return Err(PageError::Unmapped(region.info.id));
        }
        if self.uffd.is_none() {
            return Ok(());
        }
        let key = |s: &PageState| (s.registered(), s.kernel_wp());
        let mut k = 0;
        while k < sts.len() {
            let (registered, wp) = key(&sts[k]);
            let mut j = k + 1;
            while j < sts.len() && key(&sts[j]) == (registered, wp) {
                j += 1;
            }
            let (a, len) = (addr + k * PAGE_SIZE, (j - k) * PAGE_SIZE);
            if registered {
                self.wp_call(a, len, wp, false).map_err(|e| {
                    uffd_gone_or(region, "UFFDIO_WRITEPROTECT (is it still the region's?)", e)
                })?;
            } else if !sys::range_is_ours(a, a + len) {
                return Err(gone_or(
                    region,
                    "check of /proc/self/maps (is it still the region's?)",
                    Errno::NOENT,
                    &[Errno::NOENT],
                ));
            }
            k = j;
        }
        Ok(())
    }

    /// [`check_ours`](Self::check_ours) of one page.
    pub(super) fn check_page(
        &self,
        region: &Region,
        addr: usize,
        st: &PageState,
    ) -> Result<(), PageError> {
        self.check_ours(region, addr, std::slice::from_ref(&st))
    }

    /// Counts, on the pages about to be remapped (`mmap(MAP_FIXED)` or `mremap` over
    /// them), the `UFFD_EVENT_UNMAP` the remap will raise: one for the whole range if any
    /// of it is registered. The fault thread takes it off when it reads the event, which
    /// so is not taken for the owner's unmap. Returns whether it counted.
    pub(super) fn expect_unmap<S: DerefMut<Target = PageState>>(&self, sts: &mut [S]) -> bool {
        if !self.caps.events || !sts.iter().any(|s| s.registered()) {
            return false;
        }
        for s in sts.iter_mut() {
            s.own_unmaps = s.own_unmaps.saturating_add(1);
        }
        self.own_in_flight.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The remap or drop counted by [`expect_unmap`](Self::expect_unmap) or
    /// [`expect_remove`](Self::expect_remove) returned (its event, if any, was read).
    pub(super) fn own_done(&self, counted: bool) {
        if counted {
            self.own_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes back what [`expect_unmap`](Self::expect_unmap) counted (the remap failed).
    pub(super) fn unexpect_unmap<S: DerefMut<Target = PageState>>(
        &self,
        sts: &mut [S],
        counted: bool,
    ) {
        if counted {
            for s in sts.iter_mut() {
                s.own_unmaps = s.own_unmaps.saturating_sub(1);
            }
        }
    }

    /// Counts, on the pages about to be dropped (`MADV_DONTNEED`), the
    /// `UFFD_EVENT_REMOVE` each registered one will raise.
    pub(super) fn expect_remove<S: DerefMut<Target = PageState>>(&self, sts: &mut [S]) -> bool {
        if !self.caps.events || !sts.iter().any(|s| s.registered()) {
            return false;
        }
        for s in sts.iter_mut().filter(|s| s.registered()) {
            s.own_removes = s.own_removes.saturating_add(1);
        }
        self.own_in_flight.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes back what [`expect_remove`](Self::expect_remove) counted (the call failed).
    pub(super) fn unexpect_remove<S: DerefMut<Target = PageState>>(
        &self,
        sts: &mut [S],
        counted: bool,
    ) {
        if counted {
            for s in sts.iter_mut().filter(|s| s.registered()) {
                s.own_removes = s.own_removes.saturating_sub(1);
            }
        }
    }

    /// Removes write protection from `len` bytes at `addr`, waking waiting writers if
    /// `wake`.
    pub(super) fn unwp(
        &self,
        region: &Region,
        addr: usize,
        len: usize,
        wake: bool,
    ) -> Result<(), PageError> {
        self.uffd()?;
        self.wp_call(addr, len, false, wake)
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
    pub(super) fn written_in_window(
        &self,
        region: &Region,
        addr: usize,
        expect: Option<&Slot>,
    ) -> bool {
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
    ///
    /// A page that cannot be registered or protected gets no token: it is unprotected
    /// and its tokens are stale, and a page that maps the store is no longer taken to
    /// map it (a write may make a private copy unseen): it becomes a [`Kind::StoreCow`]
    /// that keeps its slot, until [`protect`](crate::PageMemory::protect) protects it
    /// again and finds out what it maps ([`reconcile`](Self::reconcile)).
    pub(super) fn settle(&self, region: &Region, addr: usize, st: &mut PageState) {
        st.set_registered(self.register(addr).is_ok());
        let protected = st.registered() && self.wp(region, addr, PAGE_SIZE).is_ok();
        if !protected {
            self.untrack(region, addr, st);
            return;
        }
        self.check_window(region, addr, st);
    }

    /// A page whose kernel write-protection is not (or no longer) certain: no token of
    /// it stays valid, and a store page is only "may still map its slot".
    pub(super) fn untrack(&self, region: &Region, addr: usize, st: &mut PageState) {
        region.unprotect_at(addr, st);
        if st.kind == Kind::Store {
            st.kind = Kind::StoreCow;
        }
        bump(&self.counters.settle_failures);
    }

    /// The page at `addr` is write-protected now: if a write reached it since it was given
    /// the contents its `kind` says (a store page, or zeros), record what it maps now.
    /// Returns whether there was such a write.
    pub(super) fn reconcile(&self, region: &Region, addr: usize, st: &mut PageState) -> bool {
        let expect = match (st.kind, st.slot()) {
            (Kind::Store, _) => st.slot().cloned(),
            (Kind::Zero, _) => None,
            // A store page that could not be protected: it still maps its slot unless a
            // write made a private copy meanwhile.
            (Kind::StoreCow, Some(slot)) => {
                let slot = slot.clone();
                if self.written_in_window(region, addr, Some(&slot)) {
                    drop(st.take_slot());
                    return true;
                }
                st.kind = Kind::Store;
                return false;
            }
            (Kind::Anon | Kind::StoreCow, _) => return false,
        };
        if !self.written_in_window(region, addr, expect.as_ref()) {
            return false;
        }
        bump(&self.counters.window_writes);
        if st.kind == Kind::Store {
            // The write made a private copy: the page no longer maps the slot.
            st.kind = Kind::StoreCow;
            drop(st.take_slot());
        } else {
            st.kind = Kind::Anon;
        }
        true
    }

    /// Catches a write made between a remap of the page at `addr` and its protection:
    /// such a page is unprotected and its tokens stale.
    pub(super) fn check_window(&self, region: &Region, addr: usize, st: &mut PageState) {
        if self.reconcile(region, addr, st) {
            let _ = self.unwp(region, addr, PAGE_SIZE, true);
            region.unprotect_at(addr, st);
        }
    }

    /// Maps store slot `slot` over the (protected, equal) page at `addr`.
    pub(super) fn map_slot(
        &self,
        region: &Region,
        addr: usize,
        st: &mut PageState,
        slot: &Slot,
    ) -> Result<(), PageError> {
        self.check_page(region, addr, st)?;
        self.guard.admit()?;
        let counted = self.expect_unmap(std::slice::from_mut(&mut &mut *st));
        // SAFETY: `addr` is a page of a live region, which this backend may remap (the
        // embedder promised so for adopted regions), locked by us and just checked to be
        // still the region's. The new mapping has the page's exact current contents (the
        // slot was compared equal, or copied from it, while the page was
        // write-protected), so no reader sees a change; writers are held by the protection
        // or land in a copy. `slot` stays allocated while the page maps it (`st.slot()`
        // holds it).
        let r = unsafe { sys::map_file_fixed(addr, PAGE_SIZE, slot.store.fd(), slot.offset()) };
        self.own_done(counted);
        if let Err(e) = r {
            self.unexpect_unmap(std::slice::from_mut(&mut &mut *st), counted);
            return Err(self.mmap_error("mmap of a store page over a guest page", e));
        }
        st.kind = Kind::Store;
        st.set_slot(slot.clone());
        self.settle(region, addr, st);
        Ok(())
    }

    /// Maps the store slots `slots` (consecutive offsets) over as many consecutive pages of
    /// `region` at `addr` (locked in `sts`, protected, equal to the slots) with one `mmap`,
    /// then registers, protects and checks them as one range.
    pub(super) fn map_slots_run(
        &self,
        region: &Region,
        addr: usize,
        sts: &mut [MutexGuard<'_, PageState>],
        slots: &[Slot],
    ) -> Result<(), PageError> {
        debug_assert_eq!(sts.len(), slots.len());
        self.check_ours(region, addr, sts)?;
        self.guard.admit()?;
        let counted = self.expect_unmap(sts);
        // SAFETY: as in `map_slot`, for each page of the run: pages of a live region that
        // this backend may remap, locked by us, just checked to be still the region's,
        // protected, and each mapped to a slot with its exact current contents (compared,
        // or copied from it, while protected). The slots are consecutive in the memfd, so
        // one mapping covers them all; each page's `st.slot` keeps its slot allocated
        // while the page maps it.
        let r = unsafe {
            sys::map_file_fixed(
                addr,
                slots.len() * PAGE_SIZE,
                slots[0].store.fd(),
                slots[0].offset(),
            )
        };
        self.own_done(counted);
        if let Err(e) = r {
            self.unexpect_unmap(sts, counted);
            return Err(self.mmap_error("mmap of store pages over guest pages", e));
        }
        for (st, slot) in sts.iter_mut().zip(slots) {
            st.kind = Kind::Store;
            st.set_slot(slot.clone());
        }
        self.settle_run(region, addr, sts);
        Ok(())
    }

    /// [`settle`](Self::settle) for a run of freshly remapped pages at `addr`: one
    /// register, one protect, one `PAGEMAP_SCAN` for the whole run where they work.
    pub(super) fn settle_run(
        &self,
        region: &Region,
        addr: usize,
        sts: &mut [MutexGuard<'_, PageState>],
    ) {
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
            st.set_registered(true);
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
    pub(super) fn present_private(&self, start: usize, end: usize) -> Option<Vec<usize>> {
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

    /// Maps fresh anonymous memory (zeros) over the page at `addr`, which maps the store.
    pub(super) fn map_anon(
        &self,
        region: &Region,
        addr: usize,
        st: &mut PageState,
    ) -> Result<(), PageError> {
        // Make sure the page is still ours (its mapping is still registered) first. The
        // probe protects (never unprotects): a write racing the remap must wait for it.
        if region.unmapped.load(Ordering::Relaxed) || st.gone() {
            return Err(PageError::Unmapped(region.info.id));
        }
        self.uffd()?;
        if st.registered() {
            if let Err(e) = self.wp_call(addr, PAGE_SIZE, true, false) {
                return Err(uffd_gone_or(region, "UFFDIO_WRITEPROTECT (probe)", e));
            }
        } else {
            self.check_page(region, addr, st)?;
        }
        self.guard.admit()?;
        let counted = self.expect_unmap(std::slice::from_mut(&mut &mut *st));
        // SAFETY: as in `map_slot`: a locked page of a live region that this backend may
        // remap, just checked to be still the region's; callers only do this where the
        // page's contents are to read as zeros (they are zeros already, or the page is
        // being recycled or discarded).
        let r = unsafe { sys::map_anon_fixed(addr, PAGE_SIZE) };
        self.own_done(counted);
        if let Err(e) = r {
            self.unexpect_unmap(std::slice::from_mut(&mut &mut *st), counted);
            return Err(self.mmap_error("mmap of anonymous memory over a guest page", e));
        }
        st.kind = Kind::Zero;
        st.clear_holds();
        st.set_registered(self.register(addr).is_ok());
        Ok(())
    }

    /// Merges the (protected, all-zero) page at `addr` with the zero page.
    pub(super) fn zero_page(
        &self,
        region: &Region,
        addr: usize,
        st: &mut PageState,
    ) -> Result<(), PageError> {
        match st.kind {
            Kind::Anon | Kind::Zero => {
                self.check_page(region, addr, st)?;
                let counted = self.expect_remove(std::slice::from_mut(&mut &mut *st));
                // SAFETY: a locked page of a live region, just checked to be still the
                // region's, whose contents are all zeros: after dropping it, it reads as
                // zeros (the kernel's zero page) again.
                let r = unsafe { sys::madvise(addr, PAGE_SIZE, Advice::LinuxDontNeed) };
                self.own_done(counted);
                r.map_err(|e| {
                    self.unexpect_remove(std::slice::from_mut(&mut &mut *st), counted);
                    gone_or(region, "MADV_DONTNEED", e, &[Errno::NOMEM])
                })?;
                st.kind = Kind::Zero;
                // The empty entry is protected again (a marker) for the page's token.
                if self.wp(region, addr, PAGE_SIZE).is_err() {
                    self.untrack(region, addr, st);
                    return Ok(());
                }
                self.check_window(region, addr, st);
            }
            Kind::Store | Kind::StoreCow => {
                self.map_anon(region, addr, st)?;
                if !st.registered() || self.wp(region, addr, PAGE_SIZE).is_err() {
                    self.untrack(region, addr, st);
                    return Ok(());
                }
                self.check_window(region, addr, st);
            }
        }
        Ok(())
    }

    pub(super) fn mmap_error(&self, op: &'static str, e: Errno) -> PageError {
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
}
