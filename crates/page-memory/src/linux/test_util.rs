//! Helpers for tests of the Linux backend (feature `test-util`), shared by page-memory's
//! own tests and the facade's engine-over-Linux tests: a memory that skips (saying why)
//! where userfaultfd write-protect is unavailable, page contents made from a seed, guest
//! writes and reads of them, usage printing, and mappings made and unmapped as an
//! embedder would. With feature `vm-memory` too: a two-region `GuestMemoryMmap` and its
//! dirty bitmap, for the vm-memory adapter's tests. [`ksm`]: Linux KSM's sysfs knobs, for
//! the measurements that run KSM beside the backend.
//!
//! Test code: these helpers panic on the failures a test wants to see as panics.

pub mod ksm;

use std::sync::atomic::{AtomicU64, Ordering};

use super::{LinuxConfig, LinuxMemory, LinuxUsage};
use crate::{PageId, PageMemory, RegionId, PAGE_SIZE, PAGE_WORDS};

/// [`memory_with`] the default configuration.
pub fn memory() -> Option<LinuxMemory> {
    memory_with(LinuxConfig::default())
}

/// The memory tests use: they write guest memory from user space only, so a process
/// that may not have kernel faults (CI's unprivileged run) falls back to a
/// user-mode-only userfaultfd. `None` (the reason printed on stderr, starting
/// `SKIPPED:`) where there is no userfaultfd write-protect at all.
pub fn memory_with(config: LinuxConfig) -> Option<LinuxMemory> {
    match LinuxMemory::with_config(config.with_require_kernel_faults(false)) {
        Ok(m) => Some(m),
        Err(e) => {
            let knob = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
                .unwrap_or_else(|_| "unknown".into());
            eprintln!(
                "SKIPPED: no userfaultfd write-protect here: {e} (vm.unprivileged_userfaultfd = {})",
                knob.trim()
            );
            None
        }
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value from `x`.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Word `i` of the page with contents `seed` (never zero: no such page is a zero page).
pub fn pattern(seed: u64, i: usize) -> u64 {
    splitmix(seed.wrapping_mul(PAGE_WORDS as u64) + i as u64) | 1
}

/// Word `i` of `page`, as the guest sees it. Panics if `i` is out of the page or the
/// page has no address.
///
/// The caller must not remove or unmap `page`'s region while the reference is used (it
/// borrows `mem`), and must access guest memory only atomically.
pub fn word(mem: &LinuxMemory, page: PageId, i: usize) -> &AtomicU64 {
    assert!(i < PAGE_WORDS);
    let base = mem.page_ptr(page).unwrap().cast::<u64>();
    // SAFETY: `page` is a page of a region of `mem` that the tests do not remove or unmap
    // while the returned reference is used (it borrows `mem`); word `i` is inside it and
    // aligned. All test accesses to guest memory are atomic.
    unsafe { AtomicU64::from_ptr(base.add(i)) }
}

/// Guest write of the page with contents `seed` ([`pattern`]) to `page`.
pub fn fill(mem: &LinuxMemory, page: PageId, seed: u64) {
    for i in 0..PAGE_WORDS {
        word(mem, page, i).store(pattern(seed, i), Ordering::Relaxed);
    }
}

/// Whether `page` holds the contents `seed` (read through the backend).
pub fn holds(mem: &LinuxMemory, page: PageId, seed: u64) -> bool {
    let mut buf = [0u8; PAGE_SIZE];
    mem.read_page(page, &mut buf).unwrap();
    buf.chunks_exact(8)
        .enumerate()
        .all(|(i, c)| u64::from_ne_bytes(c.try_into().unwrap()) == pattern(seed, i))
}

/// Pages `range` of region `r`.
pub fn pages(r: RegionId, range: std::ops::Range<u32>) -> Vec<PageId> {
    range.map(|i| PageId::new(r, i)).collect()
}

/// `bytes` in MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Prints `u` on stderr, labelled.
pub fn show(label: &str, u: &LinuxUsage) {
    eprintln!(
        "{label}: anonymous {:.2} MiB, store {:.2} MiB, total {:.2} MiB; rss {:.2} MiB, pss {:.2} MiB, \
         {} mappings; census {:?}",
        mib(u.region_anonymous),
        mib(u.store_bytes),
        mib(u.total_bytes()),
        mib(u.region_rss),
        mib(u.region_pss),
        u.region_mappings,
        u.census
    );
}

/// Maps `len` bytes of private anonymous memory, as an embedder would. Panics if the
/// mapping fails.
pub fn embedder_mmap(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping at an address the kernel chooses.
    unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .expect("mmap")
    .cast()
}

/// Unmaps `[base, base + len)` as an embedder would, except that the address range stays
/// reserved (a `PROT_NONE` mapping replaces the memory atomically): no other test in the
/// process can get a mapping there while a memory still remembers the region. Release it
/// with `munmap` once no memory refers to it.
///
/// The range must be the test's own mapping (from [`embedder_mmap`]), which nothing
/// touches afterwards but the backend (whose accesses are fault-checked).
pub fn unmap_keeping_the_address(base: *mut u8, len: usize) {
    // SAFETY: the test's own mapping, which nothing in the test touches afterwards (the
    // backend only reaches it through fault-checked calls, which fail on PROT_NONE).
    unsafe {
        rustix::mm::mmap_anonymous(
            base.cast(),
            len,
            rustix::mm::ProtFlags::empty(),
            rustix::mm::MapFlags::PRIVATE
                | rustix::mm::MapFlags::FIXED
                | rustix::mm::MapFlags::NORESERVE,
        )
    }
    .expect("mmap PROT_NONE over the region");
}

#[cfg(feature = "vm-memory")]
pub use guest::*;

/// Guest memory for the vm-memory adapter's tests.
#[cfg(feature = "vm-memory")]
mod guest {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    use super::memory;
    use crate::vmm::{AdoptedGuest, VmMemoryAdapter};
    use crate::{PageId, PAGE_SIZE};

    /// Guest memory as a rust-vmm VMM keeps it: mmap regions with a dirty bitmap.
    pub type Guest = GuestMemoryMmap<AtomicBitmap>;

    const PAGE: u64 = PAGE_SIZE as u64;

    /// Where [`guest`]'s two regions start, with a hole between them.
    pub const STARTS: [u64; 2] = [0, 1 << 32];

    /// An adapter over [`memory`](super::memory): `None` (the reason printed) where there
    /// is no userfaultfd write-protect.
    pub fn adapter() -> Option<VmMemoryAdapter> {
        memory().map(|m| VmMemoryAdapter::new(Arc::new(m)))
    }

    /// Guest memory of two regions of `pages` pages each, at [`STARTS`]. Panics if it
    /// cannot be mapped.
    pub fn guest(pages: u64) -> Guest {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(STARTS[0]), (pages * PAGE) as usize),
            (GuestAddress(STARTS[1]), (pages * PAGE) as usize),
        ])
        .expect("GuestMemoryMmap")
    }

    /// The page contents `seed` (0: a zero page).
    pub fn content(seed: u64) -> Vec<u8> {
        if seed == 0 {
            return vec![0; PAGE_SIZE];
        }
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Guest address of page `i` of region `r` of a [`guest`].
    pub fn gpa(r: usize, i: u64) -> GuestAddress {
        GuestAddress(STARTS[r] + i * PAGE)
    }

    /// Clears every region's dirty bitmap.
    pub fn clear_bitmaps(g: &Guest) {
        for r in g.iter() {
            r.get_mmap().bitmap().reset();
        }
    }

    /// Guest addresses (page-aligned) whose dirty bit is set.
    pub fn dirty(g: &Guest) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for r in g.iter() {
            let b = r.bitmap();
            for off in (0..r.len()).step_by(PAGE_SIZE) {
                if b.dirty_at(off as usize) {
                    out.insert(r.start_addr().0 + off);
                }
            }
        }
        out
    }

    /// The page at `addr`, read through vm-memory's `Bytes` API. Panics if it cannot be
    /// read.
    pub fn read(g: &Guest, addr: GuestAddress) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE_SIZE];
        g.read_slice(&mut buf, addr).expect("read_slice");
        buf
    }

    /// The backend's page at `addr` of the adopted guest `vm`. Panics if `addr` is not
    /// adopted.
    pub fn page(vm: &AdoptedGuest, addr: GuestAddress) -> PageId {
        vm.page_of(addr).expect("an adopted page")
    }
}
