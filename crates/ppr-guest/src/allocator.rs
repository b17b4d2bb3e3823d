//! A small user-space page allocator with the PPR hooks in its paths.

use core::fmt;

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use pip::{Alloc, Free, MarkWords};

use crate::Hooks;

/// A page allocator over a caller-given slice of pages, frame `first_frame + i` being
/// `pages[i]`: a LIFO free list, a FIFO of deferred pages (those `on_alloc` reported
/// busy), and the hooks on both paths.
///
/// `&mut self` methods: one allocator per thread, or one behind a lock; several
/// allocators may share one slice of pages if their page sets are disjoint. The `cpu`
/// argument of each call is the calling vCPU's number and only picks the pool shard.
#[derive(Debug)]
pub struct PageAllocator<'a, P> {
    hooks: Hooks<'a>,
    pages: &'a [P],
    first_frame: u64,
    free: Vec<u32>,
    deferred: VecDeque<u32>,
    allocated: Vec<bool>,
    stats: AllocStats,
}

/// What a [`PageAllocator`] did.
///
/// Non-exhaustive: more counters may be added; start from `AllocStats::default()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AllocStats {
    /// Pages handed out.
    pub allocs: u64,
    /// Allocations that found nothing usable (free list empty, deferred pages busy).
    pub failed: u64,
    /// Pages freed.
    pub frees: u64,
    /// Frees that offered the page to the host.
    pub offered: u64,
    /// Frees that found no slot (slot exhaustion) or an unofferable frame.
    pub not_offered: u64,
    /// `on_alloc` calls that found the host recycling the page (page deferred).
    pub busy: u64,
    /// Allocations that withdrew their own offer.
    pub cancelled: u64,
    /// Allocations of a page with no mark (never offered, or recycled by the host).
    pub unmarked: u64,
    /// Allocations that cleared a stale mark.
    pub stale: u64,
}

/// Why [`PageAllocator::free`] refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeError {
    /// The frame is not one of this allocator's pages.
    NotOurs(u64),
    /// The frame is not allocated (a double free).
    NotAllocated(u64),
}

impl fmt::Display for FreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FreeError::NotOurs(frame) => {
                write!(f, "frame {frame:#x} is not one of this allocator's pages")
            }
            FreeError::NotAllocated(frame) => {
                write!(f, "frame {frame:#x} is not allocated (a double free)")
            }
        }
    }
}

impl core::error::Error for FreeError {}

impl<'a, P: MarkWords> PageAllocator<'a, P> {
    /// An allocator owning all of `pages` (frames `first_frame..first_frame + len`), all
    /// free: each is passed through `on_free` on vCPU 0, so the host may take them all
    /// (the boot-time free memory of a guest). These frees are counted in the stats.
    pub fn new(hooks: Hooks<'a>, pages: &'a [P], first_frame: u64) -> Self {
        Self::with_free(hooks, pages, first_frame, 0, 0..pages.len())
    }

    /// An allocator over `pages` owning only the pages at `indices`, freed (offered) on
    /// vCPU `cpu`; the other pages belong to other allocators.
    ///
    /// # Panics
    /// If an index is out of range, or `pages` has more than `u32::MAX` pages.
    pub fn with_free(
        hooks: Hooks<'a>,
        pages: &'a [P],
        first_frame: u64,
        cpu: usize,
        indices: impl IntoIterator<Item = usize>,
    ) -> Self {
        assert!(u32::try_from(pages.len()).is_ok(), "too many pages");
        let mut this = PageAllocator {
            hooks,
            pages,
            first_frame,
            free: Vec::new(),
            deferred: VecDeque::new(),
            allocated: alloc::vec![false; pages.len()],
            stats: AllocStats::default(),
        };
        for i in indices {
            assert!(i < pages.len(), "page index {i} out of range");
            this.allocated[i] = true;
            this.free(cpu, first_frame + i as u64)
                .expect("a fresh page frees");
        }
        this
    }

    /// Allocates a page on vCPU `cpu`: retries the oldest deferred page first, then pops
    /// free pages until `on_alloc` calls one usable (deferring busy ones), then, with the
    /// free list empty, retries the other deferred pages once each. `None` if no page is
    /// usable now (none is left, or the host is recycling all that are).
    pub fn alloc(&mut self, cpu: usize) -> Option<(u64, &'a P)> {
        if let Some(i) = self.deferred.pop_front() {
            if self.take(cpu, i) {
                return Some(self.handed_out(i));
            }
            self.deferred.push_back(i);
        }
        while let Some(i) = self.free.pop() {
            if self.take(cpu, i) {
                return Some(self.handed_out(i));
            }
            self.deferred.push_back(i);
        }
        // Nothing free: give every other deferred page one more chance.
        for _ in 1..self.deferred.len() {
            let i = self.deferred.pop_front()?;
            if self.take(cpu, i) {
                return Some(self.handed_out(i));
            }
            self.deferred.push_back(i);
        }
        self.stats.failed += 1;
        None
    }

    /// Frees page `frame` on vCPU `cpu`: `on_free` (offers it to the host), then the free
    /// list. The caller must not touch the page afterwards.
    pub fn free(&mut self, cpu: usize, frame: u64) -> Result<(), FreeError> {
        let i = self.index(frame).ok_or(FreeError::NotOurs(frame))?;
        if !self.allocated[i] {
            return Err(FreeError::NotAllocated(frame));
        }
        self.allocated[i] = false;
        match self.hooks.on_free(cpu, frame, &self.pages[i]) {
            Some(Free::Offered(_)) => self.stats.offered += 1,
            Some(Free::Full | Free::Refused) => self.stats.not_offered += 1,
            None => {}
        }
        self.stats.frees += 1;
        self.free.push(i as u32);
        Ok(())
    }

    /// The page of `frame`, if it is one of the slice's.
    pub fn page(&self, frame: u64) -> Option<&'a P> {
        self.index(frame).map(|i| &self.pages[i])
    }

    /// Pages on the free list (not counting deferred ones).
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages deferred because the host was recycling them.
    pub fn deferred_pages(&self) -> usize {
        self.deferred.len()
    }

    /// What the allocator did so far.
    pub fn stats(&self) -> AllocStats {
        self.stats
    }

    /// The hooks.
    pub fn hooks(&self) -> Hooks<'a> {
        self.hooks
    }

    fn index(&self, frame: u64) -> Option<usize> {
        let i = frame.checked_sub(self.first_frame)?;
        (i < self.pages.len() as u64).then_some(i as usize)
    }

    /// `on_alloc` on free page `i`: whether it may be handed out.
    fn take(&mut self, cpu: usize, i: u32) -> bool {
        let frame = self.first_frame + i as u64;
        let got = self.hooks.on_alloc(cpu, frame, &self.pages[i as usize]);
        match got {
            Alloc::Unmarked => self.stats.unmarked += 1,
            Alloc::Cancelled => self.stats.cancelled += 1,
            Alloc::Stale => self.stats.stale += 1,
            Alloc::Busy => self.stats.busy += 1,
        }
        got.is_usable()
    }

    fn handed_out(&mut self, i: u32) -> (u64, &'a P) {
        self.allocated[i as usize] = true;
        self.stats.allocs += 1;
        (self.first_frame + i as u64, &self.pages[i as usize])
    }
}
