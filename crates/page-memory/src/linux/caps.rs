//! What the kernel offered ([`LinuxCaps`]) and the mechanisms a memory uses because of
//! it ([`DirtyTracking`], [`WindowCheck`]).

#[cfg(doc)]
use super::{KernelFeature, LinuxConfig, LinuxMemory};
use super::{LinuxError, UffdSource};
#[cfg(doc)]
use crate::PageMemory;

/// How [`PageMemory::written_since`] knows whether a page was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirtyTracking {
    /// Synchronous userfaultfd write-protect: the fault thread sees the first write to
    /// every protected page and records it, so `written_since` is exact and needs no
    /// system call.
    UffdWriteProtect,
    /// No userfaultfd write-protect: nothing can be protected, every page reads as
    /// written, and nothing is merged.
    Unavailable,
}

/// How a write in the window between a remap and its write-protection is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WindowCheck {
    /// `PAGEMAP_SCAN` (Linux 6.7): whether the page still maps the store page (or the
    /// zero page) it was given.
    PagemapScan,
    /// The page is read back and compared with what it was given (a write of the same
    /// bytes goes unseen until the page's next write, which is harmless).
    Contents,
}

/// What the kernel offered when the memory was made (see [`KernelFeature`] for what
/// each feature is needed for).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LinuxCaps {
    /// Why userfaultfd write-protect is unavailable (`None`: it works). Set only with
    /// [`LinuxConfig::require_userfaultfd`] off (on, [`LinuxMemory::new`] fails instead).
    pub userfaultfd_error: Option<LinuxError>,
    /// How the userfaultfd was created (`None`: there is none).
    pub source: Option<UffdSource>,
    /// Whether writes made by the kernel to protected pages are handled. `false` with
    /// [`LinuxConfig::kernel_faults`] on means this process may not have kernel faults and
    /// the memory fell back to a user-mode-only userfaultfd: a write the kernel makes to
    /// a protected page (KVM, `read(2)` into guest memory) then fails with `EFAULT`.
    pub kernel_faults: bool,
    /// userfaultfd write-protect on anonymous memory (Linux 5.7) works.
    pub uffd_wp_anon: bool,
    /// userfaultfd write-protect on a private mapping of a memfd (Linux 5.19) works.
    pub uffd_wp_shmem: bool,
    /// `MADV_POPULATE_WRITE` (Linux 5.14) works.
    pub populate_write: bool,
    /// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4) is on.
    pub wp_unpopulated: bool,
    /// userfaultfd's non-cooperative events `UFFD_EVENT_UNMAP`, `UFFD_EVENT_REMOVE` and
    /// `UFFD_EVENT_REMAP` (Linux 4.11) are on: the fault thread learns of every unmap,
    /// discard and move of guest memory (see the module docs). Off where the kernel lacks
    /// them or [`LinuxConfig::events`] is off.
    pub events: bool,
    /// `PAGEMAP_SCAN` (Linux 6.7) works.
    pub pagemap_scan: bool,
    /// `vm.max_map_count` when the memory was made.
    pub max_map_count: u64,
}
