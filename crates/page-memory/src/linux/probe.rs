//! The kernel floor: what [`LinuxMemory::with_config`](super::LinuxMemory::with_config)
//! checks before it makes a memory.
//!
//! It creates the userfaultfd (falling back from `/dev/userfaultfd` to `userfaultfd(2)`,
//! and from kernel faults to user-mode-only faults where this process may not have kernel
//! faults: see [`LinuxConfig::require_kernel_faults`]), negotiates its features, and tries
//! every kernel feature the backend relies on, on probe pages of its own:
//!
//! | feature | Linux | needed for | without it |
//! | --- | --- | --- | --- |
//! | userfaultfd | 4.3 | the fault thread | [`LinuxError::Missing`] |
//! | `UFFD_USER_MODE_ONLY` | 5.11 | a userfaultfd without privilege for kernel faults | [`LinuxError::Missing`] (unprivileged only) |
//! | write-protect, anonymous memory | 5.7 | protecting guest pages | [`LinuxError::Missing`] |
//! | `MADV_POPULATE_WRITE` | 5.14 | breaking a merged page's sharing (fault thread, `unmerge`) | [`LinuxError::Missing`] |
//! | write-protect, shmem (private mapping of a memfd) | 5.19 | protecting merged pages, which map the store | [`LinuxError::Missing`] |
//! | `UFFD_FEATURE_WP_UNPOPULATED` | 6.4 | protecting empty entries | the zero page is faulted in first |
//! | `PAGEMAP_SCAN` | 6.7 | remap-window checks, the page census | the page is read back and compared; no census |
//!
//! The floor is thus Linux 5.19; 6.7 has everything. With
//! [`LinuxConfig::require_userfaultfd`] off, a missing required feature is not an error:
//! the memory works without userfaultfd ([`DirtyTracking::Unavailable`]) and
//! [`LinuxCaps::userfaultfd_error`] says why.
//!
//! [`DirtyTracking::Unavailable`]: super::DirtyTracking::Unavailable

use std::os::fd::{AsFd, OwnedFd};

use rustix::io::Errno;

use super::error::{KernelFeature, LinuxError};
use super::sys::uffd::{
    OpenError, Uffd, UffdSource, UFFD_FEATURE_EVENTS, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_UNPOPULATED,
};
use super::sys::{self, Advice};
use super::{LinuxCaps, LinuxConfig};
use crate::{PageError, PAGE_SIZE};

/// What the kernel offers: the userfaultfd (if it is usable), `/proc/self/pagemap` (if
/// `PAGEMAP_SCAN` works) and the caps that say so.
pub(super) struct Kernel {
    pub(super) uffd: Option<Uffd>,
    pub(super) pagemap: Option<OwnedFd>,
    pub(super) caps: LinuxCaps,
}

/// Probes the kernel for `config` (see the module docs).
pub(super) fn probe(config: &LinuxConfig, max_map_count: u64) -> Result<Kernel, LinuxError> {
    let pagemap = sys::open_pagemap()
        .ok()
        .filter(|fd| probe_pagemap_scan(fd.as_fd()));
    let mut caps = LinuxCaps {
        userfaultfd_error: None,
        source: None,
        kernel_faults: false,
        uffd_wp_anon: false,
        uffd_wp_shmem: false,
        populate_write: probe_populate_write(),
        wp_unpopulated: false,
        events: false,
        pagemap_scan: pagemap.is_some(),
        max_map_count,
    };
    let uffd = if config.use_userfaultfd {
        open_probed(config, &mut caps)
    } else {
        Err(LinuxError::Disabled)
    };
    let uffd = match uffd {
        Ok(u) => Some(u),
        Err(e) if config.require_userfaultfd => return Err(e),
        Err(e) => {
            caps.userfaultfd_error = Some(e);
            caps.source = None;
            caps.kernel_faults = false;
            caps.events = false;
            None
        }
    };
    Ok(Kernel {
        uffd,
        pagemap,
        caps,
    })
}

/// Creates the userfaultfd the memory will use, and checks every feature it needs.
fn open_probed(config: &LinuxConfig, caps: &mut LinuxCaps) -> Result<Uffd, LinuxError> {
    // A userfaultfd takes one UFFDIO_API: ask a throwaway one what the kernel supports.
    let (first, source, kernel_faults) = open(config)?;
    let supported = first.api(0).map_err(|e| os("UFFDIO_API", e))?;
    drop(first);
    if supported & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
        return Err(LinuxError::Missing {
            feature: KernelFeature::UffdWriteProtectAnon,
            errno: 0,
        });
    }
    // The non-cooperative events (Linux 4.11, below the floor): how the backend learns of
    // unmaps, discards and moves of guest memory (see *Unmaps, discards and moves* in the
    // module docs).
    let want = UFFD_FEATURE_PAGEFAULT_FLAG_WP
        | (supported & UFFD_FEATURE_WP_UNPOPULATED)
        | if config.events {
            supported & UFFD_FEATURE_EVENTS
        } else {
            0
        };
    let (uffd, _) = Uffd::open(!kernel_faults).map_err(|e| user_mode_error(e, kernel_faults))?;
    uffd.api(want).map_err(|e| os("UFFDIO_API", e))?;
    caps.source = Some(source);
    caps.kernel_faults = kernel_faults;
    caps.wp_unpopulated = want & UFFD_FEATURE_WP_UNPOPULATED != 0;
    caps.events = want & UFFD_FEATURE_EVENTS == UFFD_FEATURE_EVENTS;
    let missing = |feature, e: Errno| LinuxError::Missing {
        feature,
        errno: e.raw_os_error(),
    };
    probe_wp_anon(&uffd).map_err(|e| missing(KernelFeature::UffdWriteProtectAnon, e))?;
    caps.uffd_wp_anon = true;
    probe_wp_shmem(&uffd).map_err(|e| missing(KernelFeature::UffdWriteProtectShmem, e))?;
    caps.uffd_wp_shmem = true;
    if !caps.populate_write {
        return Err(missing(KernelFeature::PopulateWrite, Errno::INVAL));
    }
    Ok(uffd)
}

/// Creates a userfaultfd: with kernel faults if `config` asks for them and this process
/// may have them, else user-mode-only (unless `config` requires kernel faults). Returns
/// it, how it was made, and whether it handles kernel faults.
fn open(config: &LinuxConfig) -> Result<(Uffd, UffdSource, bool), LinuxError> {
    if !config.kernel_faults {
        let (u, s) = Uffd::open(true).map_err(|e| user_mode_error(e, false))?;
        return Ok((u, s, false));
    }
    match Uffd::open(false) {
        Ok((u, s)) => Ok((u, s, true)),
        Err(e) if e.syscall == Errno::PERM || e.syscall == Errno::ACCESS => {
            if config.require_kernel_faults {
                return Err(LinuxError::KernelFaultsDenied {
                    dev_errno: e.dev.raw_os_error(),
                    syscall_errno: e.syscall.raw_os_error(),
                });
            }
            let (u, s) = Uffd::open(true).map_err(|e| user_mode_error(e, false))?;
            Ok((u, s, false))
        }
        Err(e) => Err(user_mode_error(e, true)),
    }
}

/// The error of a failed [`Uffd::open`].
fn user_mode_error(e: OpenError, kernel_faults: bool) -> LinuxError {
    let missing = |feature| LinuxError::Missing {
        feature,
        errno: e.syscall.raw_os_error(),
    };
    match e.syscall {
        Errno::NOSYS => missing(KernelFeature::Userfaultfd),
        // Before 5.11 the flag is unknown: EINVAL.
        Errno::INVAL if !kernel_faults => missing(KernelFeature::UserModeOnly),
        Errno::PERM | Errno::ACCESS if kernel_faults => LinuxError::KernelFaultsDenied {
            dev_errno: e.dev.raw_os_error(),
            syscall_errno: e.syscall.raw_os_error(),
        },
        Errno::PERM | Errno::ACCESS => LinuxError::Denied {
            dev_errno: e.dev.raw_os_error(),
            syscall_errno: e.syscall.raw_os_error(),
        },
        other => os("userfaultfd(2)", other),
    }
}

fn os(op: &'static str, e: Errno) -> LinuxError {
    LinuxError::Page(PageError::Os {
        op,
        errno: e.raw_os_error(),
    })
}

/// A page of probe memory, unmapped when dropped.
struct ProbePage(usize);

impl Drop for ProbePage {
    fn drop(&mut self) {
        // SAFETY: the probe's own page (anonymous, or a private mapping of a probe memfd),
        // mapped where the kernel chose; nothing else refers to it.
        let _ = unsafe { sys::munmap(self.0, PAGE_SIZE) };
    }
}

/// Registers `page` in write-protect mode and protects it, then unregisters it.
fn try_wp(uffd: &Uffd, page: &ProbePage) -> Result<(), Errno> {
    uffd.register_wp(page.0, PAGE_SIZE)?;
    let r = uffd.writeprotect(page.0, PAGE_SIZE, true, false);
    let _ = uffd.unregister(page.0, PAGE_SIZE);
    r
}

/// Write-protect on anonymous memory: register a probe page and protect it.
fn probe_wp_anon(uffd: &Uffd) -> Result<(), Errno> {
    let page = ProbePage(sys::map_fresh_anon(PAGE_SIZE)?);
    // A written page and an empty entry both: write it first.
    // SAFETY: the probe page just mapped, readable and writable, ours alone.
    unsafe { (page.0 as *mut u8).write(1) };
    try_wp(uffd, &page)
}

/// Write-protect on a private mapping of a memfd (what a merged page is): register a
/// mapping of a one-page probe memfd and protect it.
fn probe_wp_shmem(uffd: &Uffd) -> Result<(), Errno> {
    let fd = sys::memfd("page-memory probe", PAGE_SIZE as u64)?;
    let page = ProbePage(sys::map_fresh_private_file(fd.as_fd(), PAGE_SIZE)?);
    try_wp(uffd, &page)
}

/// `MADV_POPULATE_WRITE` on a probe page (`EINVAL` before Linux 5.14).
fn probe_populate_write() -> bool {
    let Ok(addr) = sys::map_fresh_anon(PAGE_SIZE) else {
        return false;
    };
    let page = ProbePage(addr);
    // SAFETY: the probe page just mapped, ours alone; populating changes no contents.
    unsafe { sys::madvise(page.0, PAGE_SIZE, Advice::LinuxPopulateWrite) }.is_ok()
}

/// Whether `PAGEMAP_SCAN` works on `pagemap` (tried on a page of this thread's stack).
fn probe_pagemap_scan(pagemap: std::os::fd::BorrowedFd<'_>) -> bool {
    let x = 0u64;
    let addr = (&x as *const u64 as usize) & !(PAGE_SIZE - 1);
    sys::page_categories(pagemap, addr).is_ok()
}
