//! The atomics the protocol is built from, switched to loom's under `--cfg pip_loom`.
//!
//! Every shared word of the pool goes through this module, so a loom build model-checks
//! all of them. The module is private: the public API names the types themselves
//! (`core::sync::atomic::AtomicU64`, or `loom::sync::atomic::AtomicU64` in a loom build),
//! so the loom tests build their pages from `loom::sync::atomic::AtomicU64` directly, and
//! [`MarkWords`](crate::MarkWords)'s array impl is then loom's.

#[cfg(not(pip_loom))]
pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(pip_loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// One step of a bounded wait: a CPU spin hint, or a loom yield (so the model checker
/// lets the thread being waited for run).
#[inline]
pub(crate) fn spin() {
    #[cfg(not(pip_loom))]
    core::hint::spin_loop();
    #[cfg(pip_loom)]
    loom::thread::yield_now();
}
