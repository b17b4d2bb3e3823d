//! Regions and their life cycle: allocated or adopted, registered with the userfaultfd,
//! and at the end given back (adopted regions, as plain anonymous memory) or unmapped
//! (allocated ones). Also how an operation finds its region and page, and how a region
//! its owner unmapped is found out.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use rustix::io::Errno;

use super::store::{Slot, Tomb};
use super::sys::{self, Advice};
use super::{Inner, LinuxMemory};
use crate::{DomainId, PageError, PageId, RegionId, RegionInfo, PAGE_SIZE};

/// What a guest page is backed by now (see [`LinuxMemory::backing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backing {
    /// Its own anonymous memory (or none yet).
    Private,
    /// Nothing: zero-merged or recycled; reads see the kernel's zero page.
    Zero,
    /// A page of the canonical store, at this offset of the memfd.
    Store {
        /// Offset in the store's memfd.
        offset: u64,
    },
    /// Its own private copy, inside a mapping of the store (after a copy-on-write break).
    PrivateCopy,
}

/// What a page's entry is, as the backend left it (finer than [`Backing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Anonymous mapping, the page's own memory (or none yet).
    Anon,
    /// Anonymous mapping, dropped by a zero merge or a recycle.
    Zero,
    /// Store mapping; the entry maps the slot's file page (always write-protected, so the
    /// fault thread sees the copy-on-write break).
    Store,
    /// Store mapping; the entry holds a private copy (or, if `slot` is still set, may
    /// still map the file page until the writer's copy-on-write completes).
    StoreCow,
}

/// The backend's state of one guest page, under the page's lock: 24 bytes (32 with its
/// lock), metadata of every guest page (issue 14; `tests/footprint.rs`). So its yes/no
/// states share one byte ([`Flags`]: `protected`, `registered`, `gone`, `moved`, read and
/// set through the methods of those names), and its slot and tomb one pointer:
/// - the tomb: the store offset the page's address is mapped to
///   while it lies in a mapping of the store (kinds `Store` and `StoreCow`): what it
///   reads after an `MADV_DONTNEED` of the embedder's (see [`Tomb`]);
/// - the slot ([`slot`](Self::slot)): the store slot whose page the entry may map. A
///   page holds a slot only with its tomb (the slot's own), so the slot is that tomb's
///   `Arc` *parked* ([`Slot::park`]) and a flag says so.
pub(super) struct PageState {
    /// Moves on whenever the page is written while protected, or unprotected.
    pub(super) gen: u64,
    /// The tomb, and the slot parked in it if `flags` say so.
    hold: Option<Arc<Tomb>>,
    pub(super) kind: Kind,
    flags: Flags,
    /// `UFFD_EVENT_UNMAP`s the backend's own remaps of this page will cause and the fault
    /// thread has not seen yet (an own event is not the owner's unmap).
    pub(super) own_unmaps: u16,
    /// `UFFD_EVENT_REMOVE`s the backend's own `MADV_DONTNEED`s of this page will cause and
    /// the fault thread has not seen yet.
    pub(super) own_removes: u16,
    /// Declarations of the page as pinned ([`LinuxMemory::declare_pinned`]) in force.
    pub(super) pinned: u16,
}

impl Drop for PageState {
    fn drop(&mut self) {
        // A parked slot's hold on the contents goes with it (a plain `Arc` would keep it).
        drop(self.take_slot());
    }
}

/// A page's yes/no states, one bit each.
#[derive(Clone, Copy, Default)]
struct Flags(u8);

/// Defines a getter and a setter of one bit of [`Flags`].
macro_rules! flag {
    ($(#[$doc:meta])* $get:ident, $set:ident, $bit:expr) => {
        $(#[$doc])*
        pub(super) fn $get(&self) -> bool {
            self.flags.0 & $bit != 0
        }

        #[doc = concat!("Sets [`", stringify!($get), "`](Self::", stringify!($get), ").")]
        pub(super) fn $set(&mut self, on: bool) {
            if on {
                self.flags.0 |= $bit;
            } else {
                self.flags.0 &= !$bit;
            }
        }
    };
}

impl PageState {
    /// A fresh page: anonymous, unprotected, registered with the userfaultfd if
    /// `registered`.
    pub(super) fn new(registered: bool) -> PageState {
        let mut st = PageState {
            gen: 0,
            hold: None,
            kind: Kind::Anon,
            flags: Flags::default(),
            own_unmaps: 0,
            own_removes: 0,
            pinned: 0,
        };
        st.set_registered(registered);
        st
    }

    flag!(
        /// Protected for the engine (tokens are valid while this holds and `gen` is
        /// equal).
        protected,
        set_protected,
        1
    );
    flag!(
        /// The page's mapping is registered with the userfaultfd.
        registered,
        set_registered,
        2
    );
    flag!(
        /// The page's address is no longer the region's: its owner unmapped or moved it
        /// (learnt from a `UFFD_EVENT_UNMAP` or `UFFD_EVENT_REMAP` the backend did not
        /// cause). Nothing touches it any more.
        gone,
        set_gone,
        4
    );
    flag!(
        /// Gone because its owner moved it (`mremap`): the moved memory may still map its
        /// slot, which it keeps.
        moved,
        set_moved,
        8
    );
    flag!(
        /// `hold` is a parked slot (see [`PageState`]).
        holds_slot,
        set_holds_slot,
        16
    );

    /// The store slot whose page the entry may map.
    pub(super) fn slot(&self) -> Option<&Slot> {
        if !self.holds_slot() {
            return None;
        }
        // SAFETY: the flag is set only by `set_slot`, with the `Arc` `Slot::park` made,
        // and cleared whenever that `Arc` is unparked (`take_slot`); the borrow of `self`
        // keeps it from being unparked meanwhile.
        self.hold.as_ref().map(|t| unsafe { Slot::parked(t) })
    }

    /// The page maps `slot` (so lies in a mapping of the store at its offset): it holds
    /// the slot and its tomb, in place of what it held.
    pub(super) fn set_slot(&mut self, slot: Slot) {
        self.clear_holds();
        self.hold = Some(slot.park());
        self.set_holds_slot(true);
    }

    /// Lets go of the slot, which is returned; the tomb stays held.
    pub(super) fn take_slot(&mut self) -> Option<Slot> {
        if !self.holds_slot() {
            return None;
        }
        self.set_holds_slot(false);
        let parked = self.hold.take()?;
        self.hold = Some(parked.clone());
        // SAFETY: `parked` is the `Arc` `set_slot` parked the slot in (the flag said so),
        // and no longer read as a parked slot: the flag is cleared, and `hold` now holds a
        // plain clone of it.
        Some(unsafe { Slot::unpark(parked) })
    }

    /// Lets go of the slot (if held) and of the tomb.
    pub(super) fn clear_holds(&mut self) {
        drop(self.take_slot());
        self.hold = None;
    }

    /// Lets go of the slot and the tomb without giving them back: held for good.
    pub(super) fn forget_holds(&mut self) {
        std::mem::forget(self.take_slot());
        std::mem::forget(self.hold.take());
    }

    /// Whether the kernel write-protects the page (as far as the backend knows): pages
    /// protected for the engine, and pages that map the store (always protected, so
    /// that the fault thread sees their copy-on-write break).
    pub(super) fn kernel_wp(&self) -> bool {
        self.protected() || self.kind == Kind::Store
    }
}

/// A region: its mapping, its store home and its pages' states.
pub(super) struct Region {
    pub(super) info: RegionInfo,
    pub(super) base: usize,
    pub(super) owned: bool,
    /// First home slot in the store.
    pub(super) home: u64,
    /// `false` once removed; operations hold it shared, removal exclusively.
    pub(super) live: RwLock<bool>,
    /// Its owner unmapped it while in use.
    pub(super) unmapped: AtomicBool,
    /// Pages of it found gone (see [`PageState::gone`]); all of them: `unmapped`.
    pub(super) gone_pages: AtomicU32,
    pub(super) pages: Box<[Mutex<PageState>]>,
    /// One bit per page whose tokens went stale since
    /// [`LinuxMemory::take_unprotected`] last looked.
    pub(super) changed: Box<[AtomicU64]>,
    /// One bit per word of `changed` that may have a bit set (set after it): a look
    /// skips the untouched parts of a large region.
    pub(super) changed_words: Box<[AtomicU64]>,
}

impl Region {
    pub(super) fn addr(&self, index: u32) -> usize {
        self.base + index as usize * PAGE_SIZE
    }

    pub(super) fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    pub(super) fn lock(&self, index: usize) -> MutexGuard<'_, PageState> {
        self.pages[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page's lock if nobody holds it (the fault thread never waits for a lock).
    pub(super) fn try_lock(&self, index: usize) -> Option<MutexGuard<'_, PageState>> {
        match self.pages[index].try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The page at `addr` (locked in `st`) stops being protected for the engine: its
    /// tokens go stale, and the change is noted for [`LinuxMemory::take_unprotected`].
    pub(super) fn unprotect_at(&self, addr: usize, st: &mut PageState) {
        st.set_protected(false);
        st.gen += 1;
        let i = (addr - self.base) / PAGE_SIZE;
        if let Some(w) = self.changed.get(i / 64) {
            w.fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
        // After the page's bit: a look that clears this one reads the page's next.
        if let Some(w) = self.changed_words.get(i / 4096) {
            w.fetch_or(1 << ((i / 64) % 64), Ordering::Release);
        }
    }

    /// Marks the page (locked in `st`) gone: its address is no longer the region's. All
    /// pages gone: the region is unmapped.
    pub(super) fn mark_gone(&self, st: &mut PageState) {
        if st.gone() {
            return;
        }
        st.set_gone(true);
        st.set_protected(false);
        st.gen += 1;
        let n = self.gone_pages.fetch_add(1, Ordering::Relaxed) + 1;
        if n as usize >= self.pages.len() {
            self.unmapped.store(true, Ordering::Relaxed);
        }
    }
}

impl LinuxMemory {
    /// Allocates a region of `pages` zero pages (a private anonymous mapping, registered
    /// with the userfaultfd) in trust domain `domain`.
    pub fn add_region(&self, pages: u32, domain: DomainId) -> Result<RegionId, PageError> {
        if pages == 0 {
            return Err(PageError::Unsupported("a region of no pages"));
        }
        let len = pages as usize * PAGE_SIZE;
        let base = sys::map_fresh_anon(len).map_err(|e| PageError::Os {
            op: "mmap (allocate a region)",
            errno: e.raw_os_error(),
        })?;
        // SAFETY: the range is the mapping just made; the advice only changes how the
        // kernel backs it (no huge pages), not its contents.
        let _ = unsafe { sys::madvise(base, len, Advice::LinuxNoHugepage) };
        match self.insert_region(base, pages, domain, true) {
            Ok(id) => Ok(id),
            Err(e) => {
                // SAFETY: the mapping made above, which nothing else knows of.
                let _ = unsafe { sys::munmap(base, len) };
                Err(e)
            }
        }
    }

    /// Adopts `len` bytes of guest memory at `base`, mapped by the caller, as a region in
    /// trust domain `domain`.
    ///
    /// # Safety
    /// - `[base, base + len)` is page-aligned and made of private anonymous readable and
    ///   writable mappings of this process (this is checked), owned by the caller.
    /// - It stays mapped until [`remove_region`](Self::remove_region) returns or this
    ///   memory is dropped, and meanwhile the caller does not `mmap`, `mremap`, `munmap`,
    ///   `mprotect` or `madvise` over it (`MADV_DONTNEED` aside, which is safe though
    ///   [`discard`](Self::discard) is better), nor register it with another
    ///   userfaultfd: the backend remaps pages inside it. (Unmapping or moving it anyway
    ///   is learnt and reported as [`PageError::Unmapped`], but see *Unmaps, discards and
    ///   moves* in the module docs for the race that remains.)
    /// - Ranges of it that get pinned (DMA, fixed buffers) are declared with
    ///   [`declare_pinned`](Self::declare_pinned) (see *Pins* in the module docs).
    /// - Guest code may read and write it at any time; nothing else in the process may
    ///   hold Rust references to it.
    ///
    /// On removal or drop, pages of the range that map the canonical store are given
    /// private copies (the memory stays the caller's, with the same contents).
    pub unsafe fn adopt_region(
        &self,
        base: *mut u8,
        len: usize,
        domain: DomainId,
    ) -> Result<RegionId, PageError> {
        let start = base as usize;
        if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
            return Err(PageError::Unsupported(
                "adopted regions must be page-aligned and not empty",
            ));
        }
        let pages = u32::try_from(len / PAGE_SIZE)
            .map_err(|_| PageError::Unsupported("a region of more than 2^32 pages"))?;
        let end = start
            .checked_add(len)
            .ok_or(PageError::Unsupported("region wraps around"))?;
        if let Some(why) = sys::check_anonymous_private(start, end) {
            return Err(PageError::Unsupported(why));
        }
        // A region its owner unmapped (every page gone) no longer holds its range.
        let overlaps = self
            .live_regions()
            .iter()
            .filter(|r| !r.unmapped.load(Ordering::Relaxed))
            .any(|r| r.base < end && start < r.base + r.len());
        if overlaps {
            return Err(PageError::Unsupported("the range overlaps a region"));
        }
        self.insert_region(start, pages, domain, false)
    }

    fn insert_region(
        &self,
        base: usize,
        pages: u32,
        domain: DomainId,
        owned: bool,
    ) -> Result<RegionId, PageError> {
        let len = pages as usize * PAGE_SIZE;
        if let Some(uffd) = &self.inner.uffd {
            uffd.register_wp(base, len).map_err(|e| PageError::Os {
                op: "UFFDIO_REGISTER (write-protect mode) of a region",
                errno: e.raw_os_error(),
            })?;
        }
        let home = match self.inner.store().reserve_home(pages) {
            Ok(h) => h,
            Err(e) => {
                if let Some(uffd) = &self.inner.uffd {
                    let _ = uffd.unregister(base, len);
                }
                return Err(e);
            }
        };
        let mut regions = self
            .inner
            .regions
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let id = RegionId(regions.len() as u32);
        regions.push(Arc::new(Region {
            info: RegionInfo { id, pages, domain },
            base,
            owned,
            home,
            live: RwLock::new(true),
            unmapped: AtomicBool::new(false),
            gone_pages: AtomicU32::new(0),
            pages: (0..pages)
                .map(|_| Mutex::new(PageState::new(self.inner.uffd.is_some())))
                .collect(),
            changed: (0..(pages as usize).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            changed_words: (0..(pages as usize).div_ceil(4096))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }));
        Ok(id)
    }

    /// Removes a region: its pages that map the store get private copies, the range is
    /// unregistered from the userfaultfd, and an allocated region is unmapped (an adopted
    /// one stays the caller's, mapped, with the same contents).
    pub fn remove_region(&self, id: RegionId) -> Result<(), PageError> {
        let region = self.inner.region(id)?;
        let mut live = region.live.write().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return Err(PageError::NoSuchRegion(id));
        }
        *live = false;
        self.inner.retire(&region);
        Ok(())
    }
}

impl Inner {
    pub(super) fn region(&self, id: RegionId) -> Result<Arc<Region>, PageError> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id.0 as usize)
            .cloned()
            .ok_or(PageError::NoSuchRegion(id))
    }

    pub(super) fn live_region(&self, id: RegionId) -> Result<Arc<Region>, PageError> {
        let r = self.region(id)?;
        let live = *r.live.read().unwrap_or_else(|e| e.into_inner());
        if !live {
            return Err(PageError::NoSuchRegion(id));
        }
        if r.unmapped.load(Ordering::Relaxed) {
            return Err(PageError::Unmapped(id));
        }
        Ok(r)
    }

    /// Runs `f` on `page` with its region held live and the page locked.
    pub(super) fn with_page<R>(
        &self,
        page: PageId,
        f: impl FnOnce(&Region, usize, &mut PageState) -> Result<R, PageError>,
    ) -> Result<R, PageError> {
        let region = self.region(page.region)?;
        let live = region.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return Err(PageError::NoSuchRegion(page.region));
        }
        if region.unmapped.load(Ordering::Relaxed) {
            return Err(PageError::Unmapped(page.region));
        }
        if page.index >= region.info.pages {
            return Err(PageError::NoSuchPage(page));
        }
        let mut st = region.lock(page.index as usize);
        let r = f(&region, region.addr(page.index), &mut st);
        drop(st);
        drop(live);
        r
    }

    /// Unregisters a region being removed, gives its store-mapping pages private copies
    /// (adopted regions) and unmaps it (allocated ones). Called with `live` held
    /// exclusively and set to `false`.
    pub(super) fn retire(&self, region: &Region) {
        let all_gone = region.unmapped.load(Ordering::Relaxed);
        if !all_gone && !region.owned {
            // Pages gone are skipped, and each run is checked to be still the region's.
            self.give_back(region);
        }
        if !all_gone {
            // Run by run of pages not known gone, each checked to be still the region's
            // first (an event about them may be pending: the fault thread cannot apply it
            // while `live` is held): unregistered (which also wakes writers waiting there;
            // the fault thread wakes the others once we are done, the region no longer
            // live), and unmapped if the backend allocated them.
            let n = region.pages.len();
            let guards: Vec<MutexGuard<'_, PageState>> = (0..n).map(|i| region.lock(i)).collect();
            let mut k = 0;
            while k < n {
                if guards[k].gone() {
                    k += 1;
                    continue;
                }
                let mut j = k;
                while j < n && !guards[j].gone() {
                    j += 1;
                }
                let (addr, len) = (region.addr(k as u32), (j - k) * PAGE_SIZE);
                if self.check_ours(region, addr, &guards[k..j]).is_ok() {
                    if let Some(uffd) = &self.uffd {
                        let _ = uffd.unregister(addr, len);
                    }
                    if region.owned {
                        // SAFETY: pages of the region's mapping, made by `add_region` and
                        // just checked to be still the region's (not gone, still
                        // registered); no operation runs on it (`live` is held), and it is
                        // unregistered, so unmapping it raises no event.
                        let _ = unsafe { sys::munmap(addr, len) };
                    }
                }
                k = j;
            }
        }
        for i in 0..region.pages.len() {
            let mut st = region.lock(i);
            if st.moved() {
                // Its owner moved it: the moved memory may still map the slot, which must
                // read the same for as long as it may (the process's life): kept.
                st.forget_holds();
            } else if region.owned
                || all_gone
                || st.gone()
                || !matches!(st.kind, Kind::Store | Kind::StoreCow)
            {
                st.clear_holds();
            }
        }
    }

    /// Turns every run of pages of an adopted region that lie in store mappings back into
    /// plain anonymous memory with the same contents: the run is write-protected (writers
    /// wait), copied into a fresh anonymous mapping, and that mapping is moved over it with
    /// `mremap`, which replaces the old mappings atomically. (A private mapping of the store
    /// left in the embedder's memory would show store contents again after an
    /// `MADV_DONTNEED`.) A run that fails is left as it is, its slots kept.
    pub(super) fn give_back(&self, region: &Region) {
        let n = region.pages.len();
        let mut guards: Vec<MutexGuard<'_, PageState>> = (0..n).map(|i| region.lock(i)).collect();
        let in_store = |g: &PageState| !g.gone() && matches!(g.kind, Kind::Store | Kind::StoreCow);
        let mut k = 0;
        while k < n {
            if !in_store(&guards[k]) {
                k += 1;
                continue;
            }
            let mut j = k;
            while j < n && in_store(&guards[j]) {
                j += 1;
            }
            let (addr, len) = (region.addr(k as u32), (j - k) * PAGE_SIZE);
            if self
                .move_anon_over(region, addr, len, &mut guards[k..j])
                .is_ok()
            {
                for g in &mut guards[k..j] {
                    // The moved-in copy is a mapping of its own, not registered.
                    g.set_registered(false);
                    g.kind = Kind::Anon;
                    g.clear_holds();
                    g.set_protected(false);
                    g.gen += 1;
                }
            }
            k = j;
        }
    }

    /// Replaces `[addr, addr + len)` (pages of `region`, locked in `sts`) by anonymous
    /// memory with the same contents.
    pub(super) fn move_anon_over(
        &self,
        region: &Region,
        addr: usize,
        len: usize,
        sts: &mut [MutexGuard<'_, PageState>],
    ) -> Result<(), PageError> {
        self.check_ours(region, addr, sts)?;
        self.wp(region, addr, len)?;
        let scratch = sys::map_fresh_anon(len).map_err(|e| PageError::Os {
            op: "mmap (anonymous copy of a region given back)",
            errno: e.raw_os_error(),
        })?;
        // SAFETY: `scratch` is our fresh mapping of `len` bytes; nothing else refers to it.
        let copy = unsafe { std::slice::from_raw_parts_mut(scratch as *mut u8, len) };
        let r = sys::read_guest(self.pid, addr, copy)
            .map_err(|e| gone_or(region, "process_vm_readv (copy)", e, &[Errno::FAULT]))
            .and_then(|()| {
                let counted = self.expect_unmap(sts);
                // SAFETY: moves our scratch mapping over pages of a live region locked by us,
                // checked to be still the region's and write-protected (no write can land
                // meanwhile), with their exact contents: no reader sees a change. The
                // destination's old mappings are replaced atomically.
                let r = unsafe { sys::mremap_over(scratch, addr, len) };
                self.own_done(counted);
                r.map_err(|e| {
                    self.unexpect_unmap(sts, counted);
                    PageError::Os {
                        op: "mremap (give a region back as anonymous memory)",
                        errno: e.raw_os_error(),
                    }
                })
            });
        if r.is_err() {
            // SAFETY: the scratch mapping, not moved: still ours alone.
            let _ = unsafe { sys::munmap(scratch, len) };
        }
        r
    }
}

/// Why a guest-address operation failed: the region is gone, or the call failed.
///
/// An errno in `gone` only says that *something* at the address is not what the backend
/// left there: a hole, a mapping another party put there, or just one page whose fresh
/// mapping could not be registered with the userfaultfd. The region is marked unmapped
/// (every later operation on it fails with [`PageError::Unmapped`]) only when
/// `/proc/self/maps` proves it: some part of the region's range is a hole or a mapping
/// the backend does not make. Otherwise the error is the call's own, for this page alone.
pub(super) fn gone_or(region: &Region, op: &'static str, e: Errno, gone: &[Errno]) -> PageError {
    if region.unmapped.load(Ordering::Relaxed) {
        return PageError::Unmapped(region.info.id);
    }
    if gone.contains(&e) && !sys::range_is_ours(region.base, region.base + region.len()) {
        region.unmapped.store(true, Ordering::Relaxed);
        PageError::Unmapped(region.info.id)
    } else {
        PageError::Os {
            op,
            errno: e.raw_os_error(),
        }
    }
}

pub(super) fn uffd_gone_or(region: &Region, op: &'static str, e: Errno) -> PageError {
    gone_or(region, op, e, &[Errno::NOENT, Errno::FAULT])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every guest page has a `Mutex<PageState>`: it was 48 bytes (a `u64` generation,
    /// two pointers, the kind, four `bool`s and three `u16`s: 40, then the lock's word
    /// and poison flag), 32 since the `bool`s share one byte and the slot and its tomb
    /// one pointer. Grown back, this fails (issue 14: the agents' metadata per guest
    /// page; see `tests/footprint.rs`).
    #[test]
    fn a_page_state_and_its_lock_stay_small() {
        assert!(std::mem::size_of::<PageState>() <= 24);
        assert!(std::mem::size_of::<Mutex<PageState>>() <= 32);
    }

    /// A slot parked in a page state reads as the slot, lets its contents go when taken
    /// or cleared (the tomb when cleared), and when the state is dropped.
    #[test]
    fn a_parked_slot_holds_contents_and_offset() {
        let Ok(store) = super::super::store::Store::new(4) else {
            return; // no memfd here
        };
        store.reserve_home(4).unwrap();
        let live = || store.live.load(Ordering::Relaxed);
        let slot = store.allocate(2).unwrap();
        let mut st = PageState::new(false);
        assert!(st.slot().is_none());
        st.set_slot(slot.clone());
        drop(slot);
        assert_eq!(st.slot().map(|s| s.index()), Some(2));
        assert_eq!(live(), 1, "the page holds the contents");

        let taken = st.take_slot().unwrap();
        assert!(st.slot().is_none());
        drop(taken);
        assert_eq!(live(), 0, "contents gone with the slot taken");
        // The tomb stays: the offset is not handed out again.
        assert_ne!(store.allocate(2).unwrap().index(), 2);
        st.clear_holds();
        let again = store.allocate(2).unwrap();
        assert_eq!(again.index(), 2, "the offset is free once the tomb is gone");

        st.set_slot(again);
        st.set_slot(store.allocate(3).unwrap());
        assert_eq!(st.slot().map(|s| s.index()), Some(3));
        assert_eq!(live(), 1, "the slot replaced is let go");
        drop(st);
        assert_eq!(live(), 0, "a dropped state lets go of its slot");
    }

    #[test]
    fn flags_are_independent_bits() {
        let mut st = PageState::new(true);
        assert!(st.registered() && !st.protected() && !st.gone() && !st.moved());
        st.set_protected(true);
        st.set_moved(true);
        st.set_registered(false);
        assert!(!st.registered() && st.protected() && !st.gone() && st.moved());
        st.set_gone(true);
        st.set_protected(false);
        assert!(!st.registered() && !st.protected() && st.gone() && st.moved());
    }
}
