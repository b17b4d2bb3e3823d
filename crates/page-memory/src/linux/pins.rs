//! Pins: guest pages that something holds by their physical page (device DMA mapped by
//! VFIO, io_uring fixed buffers, vhost, RDMA: `FOLL_LONGTERM` pins and the like). A write
//! through a pin lands in the physical page whatever the page tables say: it bypasses
//! write protection (a token would stay valid), and after a remap (merge, recycle,
//! discard) it lands in a page the guest no longer maps, and is lost. So the backend
//! never protects, merges or recycles a page that may be pinned (see *Pins* in the module
//! docs):
//! - the embedder declares the ranges it pins ([`LinuxMemory::declare_pinned`]); those
//!   pages are refused with [`PageError::Pinned`];
//! - the kernel does not say which pages are pinned, but it does count them: `VmPin`
//!   (`pinned_vm`: io_uring, RDMA, vhost-vdpa) and `VmLck` (`locked_vm`: VFIO type 1,
//!   `mlock`) in `/proc/self/status`. When they grow past what they were when the memory
//!   was made plus what the embedder declared, the backend refuses to protect, merge,
//!   canonicalize, recycle or discard any page ([`PageError::Pinned`]), counts it, and
//!   reports it ([`LinuxUsage`](super::LinuxUsage), [`LinuxStats`](super::LinuxStats)),
//!   until the embedder declares the pinned ranges or, for memory that is not guest
//!   memory, acknowledges them ([`LinuxMemory::acknowledge_pins`]).

use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use super::stats::bump;
use super::{sys, Inner, LinuxMemory};
use crate::{PageError, PageId, RegionId, PAGE_SIZE};

/// What the backend knows of pins.
pub(super) struct PinWatch {
    /// `VmPin + VmLck` (bytes) taken as not guest memory: at the start, or acknowledged.
    pub(super) baseline: AtomicU64,
    /// Pages declared pinned (each counted once, however many declarations cover it).
    pub(super) declared_pages: AtomicU64,
    /// Bytes of `VmPin + VmLck` beyond the baseline and the declared pages at the last
    /// check (0: none).
    pub(super) undeclared: AtomicU64,
    /// Times undeclared pins were found (each time they appear).
    pub(super) alarms: AtomicU64,
    /// Pages refused because they are or may be pinned.
    pub(super) refusals: AtomicU64,
    /// `/proc/self/status`, kept open (one `pread` per check).
    status: Option<OwnedFd>,
}

impl PinWatch {
    pub(super) fn new() -> PinWatch {
        let status = sys::open_status().ok();
        let (pin, lck) = status
            .as_ref()
            .and_then(|s| sys::pinned_and_locked_from(s.as_fd()))
            .unwrap_or((0, 0));
        PinWatch {
            baseline: AtomicU64::new(pin + lck),
            declared_pages: AtomicU64::new(0),
            undeclared: AtomicU64::new(0),
            alarms: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            status,
        }
    }

    /// Reads `VmPin` and `VmLck`: whether every pinned or locked byte beyond the baseline
    /// is declared. (A few microseconds: one read of `/proc/self/status`.)
    pub(super) fn all_declared(&self) -> bool {
        let read = self
            .status
            .as_ref()
            .and_then(|s| sys::pinned_and_locked_from(s.as_fd()));
        let Some((pin, lck)) = read else {
            // Not readable (no procfs): only declared ranges are excluded.
            return true;
        };
        let allowed = self.baseline.load(Ordering::Relaxed)
            + self.declared_pages.load(Ordering::Relaxed) * PAGE_SIZE as u64;
        let excess = (pin + lck).saturating_sub(allowed);
        let before = self.undeclared.swap(excess, Ordering::Relaxed);
        if excess > 0 && before == 0 {
            bump(&self.alarms);
        }
        excess == 0
    }
}

impl Inner {
    /// `Err(PageError::Pinned)` for each page of `pages` (counted) if the process holds
    /// pins nobody declared; checked once per operation.
    pub(super) fn pins_checked<T>(
        &self,
        pages: &[PageId],
    ) -> Result<(), Vec<Result<T, PageError>>> {
        if !self.config.pin_check || self.pins.all_declared() {
            return Ok(());
        }
        self.pins
            .refusals
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        Err(pages.iter().map(|&p| Err(PageError::Pinned(p))).collect())
    }

    /// [`pins_checked`](Self::pins_checked) without reading `/proc/self/status`: the
    /// result of the last check. For merges and canonicalizations, which need a token:
    /// `protect` checked when it gave it, and a pin taken for writing since is a write
    /// fault that made the token stale.
    pub(super) fn pins_last_checked<T>(
        &self,
        pages: &[PageId],
    ) -> Result<(), Vec<Result<T, PageError>>> {
        if !self.config.pin_check || self.pins.undeclared.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        self.pins
            .refusals
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        Err(pages.iter().map(|&p| Err(PageError::Pinned(p))).collect())
    }

    /// [`pins_last_checked`](Self::pins_last_checked) of one page.
    pub(super) fn pin_last_checked(&self, page: PageId) -> Result<(), PageError> {
        self.pins_last_checked::<()>(&[page])
            .map_err(|_| PageError::Pinned(page))
    }

    /// A page declared pinned, refused (counted).
    pub(super) fn pinned(&self, page: PageId) -> PageError {
        bump(&self.pins.refusals);
        PageError::Pinned(page)
    }
}

impl LinuxMemory {
    /// Declares that the embedder pins (or is about to pin) pages `pages` of region
    /// `region`: VFIO DMA maps, io_uring fixed buffers, vhost rings and buffers, RDMA
    /// registrations. Until [`undeclare_pinned`](Self::undeclare_pinned), those pages are
    /// never protected, merged, canonicalized, recycled or discarded (each such call
    /// fails with [`PageError::Pinned`] for them); their protection is removed now and
    /// their tokens become stale. Declarations nest (a page declared twice must be
    /// undeclared twice). Declared pages also count against the growth of `VmPin` and
    /// `VmLck` (see *Pins* in the module docs).
    ///
    /// Declare before pinning: a page merged when it is pinned is given a private copy by
    /// the pinning itself (a write fault the fault thread resolves), which is then what
    /// the device writes; declaring afterwards is safe too as long as no merge, recycle
    /// or discard of the page happened in between, which the backend refuses anyway while
    /// the pin is undeclared.
    pub fn declare_pinned(&self, region: RegionId, pages: Range<u32>) -> Result<(), PageError> {
        let r = self.inner.live_region(region)?;
        if pages.end > r.info.pages || pages.start > pages.end {
            return Err(PageError::NoSuchPage(PageId::new(region, pages.end)));
        }
        let live = r.live.read().unwrap_or_else(|e| e.into_inner());
        if !*live {
            return Err(PageError::NoSuchRegion(region));
        }
        for i in pages {
            let mut st = r.lock(i as usize);
            st.pinned = st.pinned.saturating_add(1);
            if st.pinned == 1 {
                self.inner
                    .pins
                    .declared_pages
                    .fetch_add(1, Ordering::Relaxed);
            }
            if st.protected() {
                if st.kind != super::region::Kind::Store && !st.gone() {
                    let _ = self.inner.unwp(&r, r.addr(i), PAGE_SIZE, true);
                }
                r.unprotect_at(r.addr(i), &mut st);
            }
        }
        drop(live);
        self.inner.pins.all_declared();
        Ok(())
    }

    /// Takes back one [`declare_pinned`](Self::declare_pinned) of `pages` of `region`
    /// (after the embedder unpinned them). Pages not declared are left alone.
    pub fn undeclare_pinned(&self, region: RegionId, pages: Range<u32>) -> Result<(), PageError> {
        let r = self.inner.region(region)?;
        if pages.end > r.info.pages || pages.start > pages.end {
            return Err(PageError::NoSuchPage(PageId::new(region, pages.end)));
        }
        for i in pages {
            let mut st = r.lock(i as usize);
            if st.pinned > 0 {
                st.pinned -= 1;
                if st.pinned == 0 {
                    self.inner
                        .pins
                        .declared_pages
                        .fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        self.inner.pins.all_declared();
        Ok(())
    }

    /// Says that the pinned and locked memory the process holds now beyond the declared
    /// ranges is not guest memory (an io_uring buffer of the VMM's own, an `mlock` of
    /// something else): it stops counting as undeclared pins. Pins of guest memory must be
    /// declared instead ([`declare_pinned`](Self::declare_pinned)): acknowledging them
    /// lets the backend merge and recycle pinned pages, and lose the writes made through
    /// the pins.
    pub fn acknowledge_pins(&self) {
        let w = &self.inner.pins;
        if let Some((pin, lck)) = sys::pinned_and_locked() {
            let declared = w.declared_pages.load(Ordering::Relaxed) * PAGE_SIZE as u64;
            w.baseline
                .store((pin + lck).saturating_sub(declared), Ordering::Relaxed);
            w.undeclared.store(0, Ordering::Relaxed);
        }
    }
}
