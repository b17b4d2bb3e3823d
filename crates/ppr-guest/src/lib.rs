//! The Per Page Recycler's guest side: the two hooks a guest's page allocator calls, so
//! that every page it frees is offered to the host for recycling and every page it
//! allocates is taken back first, over the PIP protocol ([`pip`]).
//!
//! - [`Hooks`]: [`Hooks::on_free`] and [`Hooks::on_alloc`], `no_std`, no allocation, no
//!   locks, no system calls: a few loads, one CAS and two stores each. A disabled
//!   [`Hooks`] (no pool, or a host without PPR) does nothing.
//! - [`PageAllocator`] (feature `alloc`, on by default): a small user-space page
//!   allocator over a caller-given set of pages, with the hooks in its free and alloc
//!   paths and a deferred list for pages the host holds busy: for tests, examples and
//!   benchmarks, and as the reference for a kernel integration.
//! - Test helpers, behind the `test-util` feature (off by default): `GuestPage` (what
//!   tests need from a page besides its mark words: write and verify a pattern),
//!   `pattern` (the pattern), and `SimPage` (a 4 KiB page of atomics implementing both
//!   [`MarkWords`] and `GuestPage`).
//!
//! A page is anything implementing [`MarkWords`]; here, a 4 KiB array of atomics:
//!
//! ```
//! use core::sync::atomic::{AtomicU64, Ordering};
//! use pip::{HostPool, PoolStorage, Scan};
//! use ppr_guest::{Hooks, PageAllocator};
//!
//! let pool = PoolStorage::<1, 64>::new();
//! let view = pool.init().unwrap(); // the guest sets the pool up ...
//! let host = HostPool::register(view, 1, 0x9e37_79b9_7f4a_7c15, 1 << 20).unwrap(); // ... the host registers it
//! let hooks = Hooks::attach(view).unwrap();
//!
//! type Page = [AtomicU64; 512];
//! let pages: Vec<Page> = (0..8).map(|_| core::array::from_fn(|_| AtomicU64::new(0))).collect();
//! let mut alloc = PageAllocator::new(hooks, &pages, 0x1000); // frames 0x1000..0x1008, all offered
//! let (frame, page) = alloc.alloc(0).unwrap();
//! page[0].store(42, Ordering::Relaxed); // the page is ours: write it
//! assert_eq!(host.scan(frame, page, || unreachable!()), Scan::NotMarked); // in use: no mark
//! alloc.free(0, frame).unwrap(); // offered again
//! let recycled = host.scan(frame, page, || {
//!     page.iter().rev().for_each(|w| w.store(0, Ordering::Release)); // zero it, word 0 last
//!     true
//! });
//! assert!(matches!(recycled, Scan::Recycled(_)));
//! ```
//!
//! # Calling the hooks from a guest kernel
//! **Setup, at boot.** Reserve the pool (a few MiB of physically contiguous, 64-byte
//! aligned memory; 8 bytes per slot), zero it, and initialise it with one shard per
//! possible CPU: [`pip::PoolView::init_raw`]`(addr, len, nr_cpu_ids)`. Hand its
//! guest-physical address to the host over the platform's channel (a hypercall, an I/O
//! port, a firmware table), wait until the header's `state` reads `REGISTERED`, and
//! attach: [`Hooks::attach`]. Until then, and forever if the host has no PPR, use
//! [`Hooks::disabled`].
//!
//! **Free path.** For every 4 KiB page being freed (each sub-page of a higher-order
//! block), once the page is dead and before it can be allocated again: after the free
//! path's own checks and after any zeroing or poisoning on free (`init_on_free` would
//! erase the mark), and before the page goes onto a per-CPU or buddy free list:
//!
//! ```text
//! hooks.on_free(smp_processor_id(), page_to_pfn(page), page_address(page));
//! ```
//!
//! The result needs no action: [`Free::Offered`] the host may take the page;
//! [`Free::Full`] / [`Free::Refused`] it will not (counted in the pool's shard
//! counters). After it, the page's contents must not be written until `on_alloc` says so.
//!
//! **Allocation path.** For every 4 KiB page taken off a free list, before anything
//! writes it (before `init_on_alloc` / `__GFP_ZERO` zeroing and before the page is
//! returned), in Linux's `post_alloc_hook()` or an equivalent check:
//!
//! ```text
//! if !hooks.on_alloc(smp_processor_id(), pfn, page_address(page)).is_usable() {
//!     defer(page);   // the host is recycling it right now
//!     retry;         // take another page from the free lists
//! }
//! ```
//!
//! [`Alloc::Busy`] means the host holds the page claimed: the page must not be handed
//! out nor written (the host may be zeroing it). Treat it like a page that failed the
//! allocator's sanity checks (Linux's `check_new_pages()` makes `rmqueue` take another
//! page), but keep it: put it on a per-CPU deferred list, and retry it later (from the
//! next allocation or a timer) with `on_alloc` again; once it says usable, hand it out
//! or free it again through the ordinary free path. The host ends every claim in
//! bounded time, so deferred pages come back. [`PageAllocator`] does exactly this.
//!
//! **What the hooks write.** `on_free` writes the page's first 16 bytes (the mark).
//! `on_alloc` writes them back to zero when it withdraws an offer, and writes nothing
//! when the page carries no mark (never offered, or recycled: it then reads zeros). No
//! other byte of the page is touched, by the guest hooks or by PIP.
//!
//! **Higher orders.** A block of order `n` is `2ⁿ` hook calls, one per 4 KiB page, in
//! both paths.
//!
//! # Cost
//! Each hook is wait-free: `on_free` probes at most [`pip::PROBES`] slots (normally one)
//! with one CAS; `on_alloc` reads the mark and, if the page was offered, one slot and one
//! CAS; it waits (bounded, [`pip::DEFAULT_SPINS`]) only when the host is recycling that
//! very page. Each vCPU offers into its own shard of slots, with its own cursor and
//! counters on its own cache line, so vCPUs do not contend on one atomic. The pool's
//! slots are touched by the vCPU that freed the page, the one that allocates it, and the
//! host.

#![no_std]
#![warn(missing_docs)]
#![warn(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
mod allocator;
#[cfg(feature = "test-util")]
mod page;

#[cfg(feature = "alloc")]
pub use allocator::{AllocStats, FreeError, PageAllocator};
#[cfg(feature = "test-util")]
pub use page::{pattern, GuestPage, SimPage, PAGE_WORDS};
pub use pip::{Alloc, AttachError, Free, MarkWords, PoolView};

// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The guest's two hooks, over an attached pool, or disabled.
///
/// `Copy`, and shared by every vCPU: it holds only the pool's view and the guest's
/// private copies of the pool id and secret.
#[derive(Clone, Copy, Debug)]
pub struct Hooks<'a> {
    guest: Option<pip::Guest<'a>>,
}

impl<'a> Hooks<'a> {
    /// Hooks that do nothing: `on_free` offers nothing, `on_alloc` always says usable.
    pub const fn disabled() -> Self {
        Hooks { guest: None }
    }

    /// Hooks over a pool the host has registered ([`pip::Guest::attach`]).
    pub fn attach(view: PoolView<'a>) -> Result<Self, AttachError> {
        Ok(Hooks {
            guest: Some(pip::Guest::attach(view)?),
        })
    }

    /// Hooks over an attached [`pip::Guest`] (to choose its wait bound, say).
    pub fn from_guest(guest: pip::Guest<'a>) -> Self {
        Hooks { guest: Some(guest) }
    }

    /// The attached pool, if any.
    pub fn guest(&self) -> Option<&pip::Guest<'a>> {
        self.guest.as_ref()
    }

    /// Whether a pool is attached.
    pub fn is_enabled(&self) -> bool {
        self.guest.is_some()
    }

    /// The page-free hook: offers page `frame` to the host ([`pip::Guest::on_free`]).
    /// `None` when disabled. `cpu` is the calling vCPU's number (it picks the shard).
    #[inline]
    pub fn on_free<P: MarkWords + ?Sized>(&self, cpu: usize, frame: u64, page: &P) -> Option<Free> {
        self.guest.as_ref().map(|g| g.on_free(cpu, frame, page))
    }

    /// The page-allocation hook: withdraws page `frame`'s offer before it is used
    /// ([`pip::Guest::on_alloc`]). [`Alloc::Unmarked`] when disabled. If the result is
    /// not [`Alloc::is_usable`], do not use or write the page: defer it and retry later.
    #[inline]
    pub fn on_alloc<P: MarkWords + ?Sized>(&self, cpu: usize, frame: u64, page: &P) -> Alloc {
        match &self.guest {
            Some(g) => g.on_alloc(cpu, frame, page),
            None => Alloc::Unmarked,
        }
    }
}
