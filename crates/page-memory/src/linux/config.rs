//! [`LinuxConfig`]: how a [`LinuxMemory`](super::LinuxMemory) is set up.

use std::time::Duration;

#[cfg(doc)]
use super::{LinuxCaps, LinuxError, LinuxMemory};
#[cfg(doc)]
use crate::{PageError, PageMemory};

/// How a [`LinuxMemory`] is set up.
///
/// Build one from [`LinuxConfig::default`] with the `with_*` setters (more settings may
/// come in later versions, so the struct cannot be written out whole):
///
/// ```
/// use page_memory::linux::LinuxConfig;
///
/// let config = LinuxConfig::default()
///     .with_fault_threads(2)
///     .with_kernel_faults(false); // guest memory written from user space only
/// assert_eq!(config.fault_threads, 2);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LinuxConfig {
    /// Fail [`LinuxMemory::new`] if userfaultfd write-protect, or another kernel feature
    /// it needs (see [`KernelFeature`](super::KernelFeature)), is unavailable (default).
    /// Off: the memory then works without userfaultfd ([`LinuxCaps::userfaultfd_error`]
    /// says why): nothing is protected, so nothing is ever merged.
    pub require_userfaultfd: bool,
    /// Use userfaultfd at all (default). Off: as if it were unavailable (the fallback
    /// described under *Failures* in the module docs), for embedders that only recycle.
    pub use_userfaultfd: bool,
    /// Handle writes made by the kernel for the guest (KVM's vCPUs, `read(2)` into guest
    /// memory) to protected pages (default). Needs privilege (see the module docs). Off:
    /// a user-mode-only userfaultfd, which any process may create (Linux 5.11), and a
    /// kernel write to a protected page fails with `EFAULT` in the kernel: only for
    /// embedders whose guest memory is written from user space alone (a VMM whose vCPUs
    /// run under KVM must keep it on).
    pub kernel_faults: bool,
    /// With [`kernel_faults`](Self::kernel_faults) on: fail [`LinuxMemory::new`] with
    /// [`LinuxError::KernelFaultsDenied`] when this process may not have kernel faults
    /// (default on), rather than fall back to a user-mode-only userfaultfd. Off, the
    /// fallback happens and [`LinuxCaps::kernel_faults`] says which one the memory got.
    /// The default refuses because a silent fallback would turn every KVM write to a
    /// protected page into a failed `KVM_RUN`.
    pub require_kernel_faults: bool,
    /// Threads that resolve write faults (default 1).
    pub fault_threads: usize,
    /// How long a fault thread keeps polling the userfaultfd without sleeping (yielding
    /// its CPU between polls) after the last write fault it read (default
    /// [`LinuxConfig::DEFAULT_FAULT_SPIN`], zero: it sleeps as soon as there is nothing
    /// to read). A fault that arrives within that time is read without waking the
    /// thread. `Duration::MAX`: never sleep (a CPU per fault thread).
    ///
    /// Measured on the project's 2-core VM, whose idle vCPUs halt at once, it bought
    /// nothing reliable (the `first_write` example; `docs/benchmarks.md`, "What the
    /// guest pays"): the writer's own CPU halts while it waits, and waking it costs the
    /// same whoever wakes it; never sleeping tripled the fault thread's CPU per fault and,
    /// on a loaded machine, took a CPU from the guest. It may help a host whose idle CPUs
    /// poll before halting; measure there before turning it on.
    pub fault_spin: Duration,
    /// Home slots of the canonical store: the most guest pages all regions together may
    /// have (default 2^26 pages, 256 GiB). The store reserves twice as much address space
    /// (home and overflow areas) for its read-only view; it uses memory only for
    /// canonical pages.
    pub home_slots: u64,
    /// Mappings to keep free below `vm.max_map_count` (default: a sixteenth of it, at
    /// least 256).
    pub map_count_reserve: Option<u64>,
    /// Read guest memory through `process_vm_readv`, so that a region unmapped by its
    /// owner yields [`PageError::Unmapped`] rather than a crash (default). Off: guest pages
    /// are read in place with atomic word loads (faster, and `read_words` reads each word
    /// atomically), and regions must stay mapped until removed.
    pub checked_access: bool,
    /// The most consecutive pages [`PageMemory::merge_batch`] and
    /// [`PageMemory::canonicalize_batch`] remap with one `mmap` (default 64). The pages of
    /// a run stay locked while it is compared and remapped, so a guest write to one of
    /// them waits for at most that one run (tens of microseconds at 64 pages).
    pub max_run_pages: usize,
    /// Refuse to protect, merge, canonicalize, recycle or discard anything while the
    /// process's pinned or locked memory (`VmPin`, `VmLck`) has grown past what it was
    /// when the memory was made plus the ranges declared pinned (default on; one read of
    /// `/proc/self/status` per protect, recycle or discard call). See *Pins* in the module docs. Off: only
    /// declared ranges are excluded, and a pin the embedder forgot to declare loses the
    /// writes made through it once its page is merged or recycled.
    pub pin_check: bool,
    /// Ask for userfaultfd's non-cooperative events (`UNMAP`, `REMOVE`, `REMAP`; default
    /// on): the fault thread learns synchronously of every unmap, drop and move of guest
    /// memory (see *Unmaps, discards and moves* in the module docs). They cost the
    /// backend's own remaps and drops a round trip to the fault thread each (the kernel
    /// holds the caller until the event is read): measured here, a single-page merge
    /// 22–29 µs instead of 10–16 µs, a single-page recycle 21–25 µs instead of 2–4 µs,
    /// with [`own_event_spin`](Self::own_event_spin) on (batches pay it once per run). Off: operations still check before they touch a
    /// page that it is still the region's (a new occupant of a region's address is never
    /// read, dropped or remapped once the unmap returned), but an owner's `MADV_DONTNEED`
    /// does not make tokens stale (`written_since` misses it), a region its owner moved
    /// loses the store pages it still maps when the backend lets go of them (they read
    /// zeros), and unmaps are found out by the next operation instead of at once.
    pub events: bool,
    /// Whether the fault threads poll without sleeping while one of the backend's own
    /// remaps or drops is under way (default off). The kernel holds such a call until the
    /// event it raised is read; polling spares the caller the fault thread's wake-up
    /// (about 10 µs per call on the project's machine: a single-page merge 22–29 µs
    /// instead of 31–43 µs) but costs about as much CPU as the call itself lasts, on a
    /// CPU the guest or the engine's other threads could use: measured here, PageONE's
    /// merge passes used 1.2–3.7× the CPU with it on (`docs/benchmarks.md`, "The fault
    /// thread's polling"). Turn it on where CPU is plentiful and merge latency matters.
    pub own_event_spin: bool,
    /// Whether the fault threads follow a batch of the backend's own remaps onto the
    /// CPU of the thread that makes them (default on): each remap is a round trip to a
    /// fault thread, cheaper on the caller's CPU than as a wake-up of another, especially
    /// in a virtual machine (on this project's machine PageONE's merging pass over the
    /// real-memory set took 0.22–0.28 s with it, 0.33–0.52 s without). A guest write
    /// fault during the batch is resolved on that CPU too.
    /// See `follow.rs`.
    pub fault_threads_follow: bool,
}

impl Default for LinuxConfig {
    fn default() -> Self {
        LinuxConfig {
            require_userfaultfd: true,
            use_userfaultfd: true,
            kernel_faults: true,
            require_kernel_faults: true,
            fault_threads: 1,
            fault_spin: Self::DEFAULT_FAULT_SPIN,
            home_slots: 1 << 26,
            map_count_reserve: None,
            checked_access: true,
            max_run_pages: 64,
            pin_check: true,
            events: true,
            own_event_spin: false,
            fault_threads_follow: true,
        }
    }
}

impl LinuxConfig {
    /// The default [`fault_spin`](Self::fault_spin).
    pub const DEFAULT_FAULT_SPIN: Duration = Duration::ZERO;

    /// Sets [`require_userfaultfd`](Self::require_userfaultfd).
    pub fn with_require_userfaultfd(mut self, require_userfaultfd: bool) -> Self {
        self.require_userfaultfd = require_userfaultfd;
        self
    }

    /// Sets [`use_userfaultfd`](Self::use_userfaultfd).
    pub fn with_use_userfaultfd(mut self, use_userfaultfd: bool) -> Self {
        self.use_userfaultfd = use_userfaultfd;
        self
    }

    /// Sets [`kernel_faults`](Self::kernel_faults).
    pub fn with_kernel_faults(mut self, kernel_faults: bool) -> Self {
        self.kernel_faults = kernel_faults;
        self
    }

    /// Sets [`require_kernel_faults`](Self::require_kernel_faults).
    pub fn with_require_kernel_faults(mut self, require_kernel_faults: bool) -> Self {
        self.require_kernel_faults = require_kernel_faults;
        self
    }

    /// Sets [`fault_threads`](Self::fault_threads).
    pub fn with_fault_threads(mut self, fault_threads: usize) -> Self {
        self.fault_threads = fault_threads;
        self
    }

    /// Sets [`fault_threads_follow`](Self::fault_threads_follow).
    pub fn with_fault_threads_follow(mut self, follow: bool) -> Self {
        self.fault_threads_follow = follow;
        self
    }

    /// Sets [`own_event_spin`](Self::own_event_spin).
    pub fn with_own_event_spin(mut self, own_event_spin: bool) -> Self {
        self.own_event_spin = own_event_spin;
        self
    }

    /// Sets [`fault_spin`](Self::fault_spin).
    pub fn with_fault_spin(mut self, fault_spin: Duration) -> Self {
        self.fault_spin = fault_spin;
        self
    }

    /// Sets [`home_slots`](Self::home_slots).
    pub fn with_home_slots(mut self, home_slots: u64) -> Self {
        self.home_slots = home_slots;
        self
    }

    /// Sets [`map_count_reserve`](Self::map_count_reserve).
    pub fn with_map_count_reserve(mut self, map_count_reserve: Option<u64>) -> Self {
        self.map_count_reserve = map_count_reserve;
        self
    }

    /// Sets [`checked_access`](Self::checked_access).
    pub fn with_checked_access(mut self, checked_access: bool) -> Self {
        self.checked_access = checked_access;
        self
    }

    /// Sets [`events`](Self::events).
    pub fn with_events(mut self, events: bool) -> Self {
        self.events = events;
        self
    }

    /// Sets [`pin_check`](Self::pin_check).
    pub fn with_pin_check(mut self, pin_check: bool) -> Self {
        self.pin_check = pin_check;
        self
    }

    /// Sets [`max_run_pages`](Self::max_run_pages).
    pub fn with_max_run_pages(mut self, max_run_pages: usize) -> Self {
        self.max_run_pages = max_run_pages;
        self
    }
}
