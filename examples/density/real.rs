//! `--real`: the same demo on the Linux backend (`page_memory::linux::LinuxMemory`): the
//! VMs are anonymous memory of this process, the guests write it directly, merging remaps
//! pages onto a memfd canonical store under userfaultfd write-protect, recycling is
//! `MADV_DONTNEED`, and memory in use is read from the kernel (`/proc/self/smaps`: the
//! regions' `Anonymous` and `Swap`, plus the store's allocated blocks).
//!
//! Needs the `linux` feature (page-memory's Linux backend; its `userfaultfd-sys`
//! dependency runs bindgen, so libclang must be installed) and userfaultfd write-protect
//! (Linux 5.7+). Without the privilege for kernel faults (root, `CAP_SYS_PTRACE`,
//! `vm.unprivileged_userfaultfd = 1`) it uses a user-mode-only userfaultfd (Linux 5.11+):
//! the guests here write from user space only.

use crate::demo::Report;
use crate::options::Options;

/// What is missing for `--real` in a build without the `linux` feature.
#[cfg(not(feature = "linux"))]
const NO_FEATURE: &str = "--real runs on page-memory's Linux backend, which this build does \
     not include: rebuild with the `linux` feature:\n\n    \
     cargo run --release --features linux --example density -- --real\n\n\
     (the feature builds userfaultfd-sys, whose bindgen needs libclang: \
     `apt-get install libclang-dev` on Debian/Ubuntu)";

/// Whether `--real` can run here; if not, exactly what is missing.
pub fn check() -> Result<(), String> {
    #[cfg(not(feature = "linux"))]
    return Err(NO_FEATURE.into());
    #[cfg(feature = "linux")]
    linux::check()
}

/// Runs the demo on real memory ([`check`] says whether it can).
pub fn run_all(opts: &Options) -> Result<Report, String> {
    #[cfg(not(feature = "linux"))]
    {
        let _ = opts;
        Err(NO_FEATURE.into())
    }
    #[cfg(feature = "linux")]
    {
        linux::check()?;
        crate::demo::run_all::<page_memory::linux::LinuxMemory>(opts)
    }
}

#[cfg(feature = "linux")]
mod linux {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use page_memory::linux::{LinuxConfig, LinuxMemory};
    use page_memory::{DomainId, PageId, RegionId, PAGE_WORDS};
    use pip::MarkWords;

    use crate::host::{word, Host, VmPage};

    fn config() -> LinuxConfig {
        // The demo's regions stay mapped until the memory is dropped: the engines may read
        // guest pages in place (atomic loads) instead of through process_vm_readv.
        LinuxConfig::default().with_checked_access(false)
    }

    /// A memory with kernel faults handled where this process may (root, CAP_SYS_PTRACE,
    /// access to `/dev/userfaultfd`, `vm.unprivileged_userfaultfd = 1`), else with a
    /// user-mode-only userfaultfd (the backend falls back by itself and says so in
    /// `caps().kernel_faults`): the demo's guests write their memory from user space only,
    /// so either works for it.
    fn memory() -> Result<LinuxMemory, String> {
        LinuxMemory::with_config(config()).map_err(|e| e.to_string())
    }

    /// Whether the backend works here; if not, what is missing.
    pub fn check() -> Result<(), String> {
        memory().map(drop).map_err(|e| {
            format!(
                "the Linux backend is not usable here: {e}.\n\
                 It needs userfaultfd write-protect on anonymous and shmem memory and \
                 MADV_POPULATE_WRITE (Linux 5.19 or later; without privilege, user-mode-only \
                 userfaultfd, which is enough for this demo). The simulated demo (without \
                 --real) runs anywhere."
            )
        })
    }

    /// A guest page of a [`LinuxMemory`] region: the guest writes it directly, word by
    /// word (atomically), as a vCPU would.
    pub struct RealPage {
        /// Keeps the region mapped.
        _mem: Arc<LinuxMemory>,
        words: *mut u64,
    }

    // SAFETY: the page is plain guest memory, accessed only with atomic word operations
    // (see `word`), and the memory (hence the mapping) lives as long as the page.
    unsafe impl Send for RealPage {}
    // SAFETY: as above: every access through a shared reference is atomic.
    unsafe impl Sync for RealPage {}

    impl RealPage {
        fn at(&self, i: usize) -> &AtomicU64 {
            assert!(i < PAGE_WORDS);
            // SAFETY: `words` is the start of a 4 KiB, page-aligned guest page of a region
            // that stays mapped while `_mem` lives (the demo never removes regions), `i`
            // is within it, and guest memory is only ever accessed atomically here (the
            // backend reads it with atomic loads or system calls, and remaps it whole).
            unsafe { AtomicU64::from_ptr(self.words.add(i)) }
        }
    }

    impl MarkWords for RealPage {
        fn load(&self, i: usize) -> u64 {
            u64::from_le(self.at(i).load(Ordering::Acquire))
        }

        fn store(&self, i: usize, v: u64) {
            self.at(i).store(v.to_le(), Ordering::Release);
        }
    }

    impl VmPage for RealPage {
        fn fill(&self, seed: u64) {
            for i in 0..PAGE_WORDS {
                self.at(i).store(word(seed, i), Ordering::Relaxed);
            }
        }

        fn zero(&self) {
            for i in 0..PAGE_WORDS {
                self.at(i).store(0, Ordering::Relaxed);
            }
        }
    }

    impl Host for LinuxMemory {
        type Page = RealPage;
        const NAME: &'static str = "REAL memory: page_memory::linux::LinuxMemory (anonymous \
             memory of this process, userfaultfd write-protect, memfd canonical store, \
             MADV_DONTNEED recycling)";
        const SHORT: &'static str = "real memory (Linux backend)";
        const MEASURE: &'static str = "the kernel's figures: the regions' Anonymous + Swap \
             (/proc/self/smaps) + the canonical store's memfd blocks, + engine metadata + PIP \
             pools";
        // Reading /proc/self/smaps walks the regions' page tables under the mmap lock, which
        // the engines' remaps also need: sample less often than on the simulated memory.
        const SAMPLE_EVERY: Duration = Duration::from_millis(100);
        const THREADS: &'static [&'static str] = &["page-memory-uff"];

        fn fresh() -> Result<Arc<Self>, String> {
            memory().map(Arc::new)
        }

        fn add_vm(&self, pages: u32, domain: DomainId) -> Result<RegionId, String> {
            self.add_region(pages, domain).map_err(|e| e.to_string())
        }

        fn guest_pages(self: &Arc<Self>, region: RegionId, pages: u32) -> Vec<RealPage> {
            (0..pages)
                .map(|i| RealPage {
                    _mem: self.clone(),
                    words: self
                        .page_ptr(PageId::new(region, i))
                        .expect("a page of a region just added")
                        .cast(),
                })
                .collect()
        }

        fn used_bytes(&self) -> u64 {
            self.usage().map_or(0, |u| u.total_bytes())
        }

        fn diagnostics(&self) -> Option<String> {
            let s = self.stats();
            Some(format!(
                "Linux backend: {} write faults ({} copy-on-write breaks), {} canonicalized, \
                 {} merged, {} zero-merged, {} recycled, {} merges refused at \
                 vm.max_map_count ({} mappings at the last count, limit {})",
                s.write_faults,
                s.cow_breaks,
                s.canonicalized,
                s.merges,
                s.zero_merges,
                s.recycled,
                s.map_limit_refusals,
                s.mappings_counted,
                s.max_map_count
            ))
        }
    }
}
