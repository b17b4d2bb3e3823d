//! The atomics the protocol is built from, switched to loom's under `--cfg pip_loom`.
//!
//! Every shared word of the pool goes through this module, so a loom build model-checks
//! all of them. The types are public because the pool's slot array and the test pages of
//! [`MarkWords`](crate::MarkWords) are made of them: a loom test builds its pages from
//! `pip::sync::AtomicU64` and gets loom's atomics.

#[cfg(not(pip_loom))]
pub use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(pip_loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// One step of a bounded wait: a CPU spin hint, or a loom yield (so the model checker
/// lets the thread being waited for run).
#[inline]
pub(crate) fn spin() {
    #[cfg(not(pip_loom))]
    core::hint::spin_loop();
    #[cfg(pip_loom)]
    loom::thread::yield_now();
}
