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
//! blocked in the kernel and the hand-off is a context switch; the affinity they had when
//! the first batch under way began (the embedder's placement, if it set one) is put back
//! when the last one ends. A guest's write fault meanwhile is resolved
//! on that CPU too. Concurrent batches on different CPUs: the last to start wins, the
//! others' round trips cross CPUs as without this. [`LinuxConfig::fault_threads_follow`]
//! (default on) turns it off.
//!
//! [`LinuxConfig::fault_threads_follow`]: super::LinuxConfig::fault_threads_follow

use std::sync::Mutex;

use rustix::thread::{CpuSet, Pid};

use super::sys::affinity;

/// The fault threads and the batches under way.
#[derive(Default)]
pub(super) struct Follow {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Each fault thread, and the affinity to put back (read when a batch begins with
    /// none under way).
    threads: Vec<(Pid, Option<CpuSet>)>,
    /// Batches under way.
    batches: usize,
}

/// A batch of remaps under way: the fault threads are on its CPU until it drops.
pub(super) struct Following<'a>(&'a Follow);

impl Follow {
    /// Called by each fault thread as it starts: records its id.
    pub(super) fn register_this_thread(&self) {
        self.lock().threads.push((affinity::this_thread(), None));
    }

    /// The registered fault threads' ids.
    pub(super) fn thread_ids(&self) -> Vec<i32> {
        self.lock()
            .threads
            .iter()
            .map(|(tid, _)| tid.as_raw_nonzero().get())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the fault threads to the calling thread's CPU for a batch of remaps.
    pub(super) fn follow(&self) -> Following<'_> {
        let here = affinity::here();
        let mut state = self.lock();
        let first = state.batches == 0;
        state.batches += 1;
        for (tid, saved) in state.threads.iter_mut() {
            if first {
                *saved = affinity::get(*tid);
            }
            affinity::set(*tid, &here);
        }
        Following(self)
    }
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.batches -= 1;
        if state.batches == 0 {
            for (tid, saved) in state.threads.iter_mut() {
                if let Some(cpus) = saved.take() {
                    affinity::set(*tid, &cpus);
                }
            }
        }
    }
}
