//! The fault threads follow the backend's own remaps onto the caller's CPU.
//!
//! Every remap or drop the backend makes of a registered range raises a userfaultfd event
//! (`UNMAP`, `REMOVE`), and the kernel holds the caller until a fault thread has read it:
//! each remap is a round trip to the fault thread. When the fault thread sleeps on another
//! CPU, each round trip wakes that CPU, and in a virtual machine an idle vCPU's wake-up
//! is an exit to the hypervisor: measured on this project's machine (2 vCPUs, nested
//! KVM), PageONE's merging pass over the real-memory set took 0.33–0.52 s with the fault
//! thread free to run anywhere and 0.18–0.23 s with everything on one CPU
//! (`docs/benchmarks.md`). So while a batch of remaps is under way
//! ([`PageMemory::merge_batch`](crate::PageMemory::merge_batch), `canonicalize_batch`,
//! `recycle`), the fault threads may run only on the caller's CPU, where the caller is
//! blocked in the kernel and the hand-off is a context switch; their own affinity is put
//! back when the last batch under way ends. A guest's write fault meanwhile is resolved
//! on that CPU too. Concurrent batches on different CPUs: the last to start wins, the
//! others' round trips cross CPUs as without this. [`LinuxConfig::fault_threads_follow`]
//! (default on) turns it off.
//!
//! [`LinuxConfig::fault_threads_follow`]: super::LinuxConfig::fault_threads_follow

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rustix::thread::{CpuSet, Pid};

use super::sys::affinity;

/// The fault threads' ids and own affinities, and the batches under way.
#[derive(Default)]
pub(super) struct Follow {
    threads: Mutex<Vec<(Pid, CpuSet)>>,
    batches: AtomicUsize,
}

/// A batch of remaps under way: the fault threads are on its CPU until it drops.
pub(super) struct Following<'a>(&'a Follow);

impl Follow {
    /// Called by each fault thread as it starts: records its id and affinity.
    pub(super) fn register_this_thread(&self) {
        let tid = affinity::this_thread();
        if let Some(cpus) = affinity::get(tid) {
            self.lock().push((tid, cpus));
        }
    }

    /// The registered fault threads' ids.
    pub(super) fn thread_ids(&self) -> Vec<i32> {
        self.lock()
            .iter()
            .map(|(tid, _)| tid.as_raw_nonzero().get())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Pid, CpuSet)>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the fault threads to the calling thread's CPU for a batch of remaps.
    pub(super) fn follow(&self) -> Following<'_> {
        self.batches.fetch_add(1, Ordering::AcqRel);
        let here = affinity::here();
        for (tid, _) in self.lock().iter() {
            affinity::set(*tid, &here);
        }
        Following(self)
    }
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        if self.0.batches.fetch_sub(1, Ordering::AcqRel) == 1 {
            for (tid, cpus) in self.0.lock().iter() {
                affinity::set(*tid, cpus);
            }
        }
    }
}
