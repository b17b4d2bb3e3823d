//! The atomics the tree is built from, switched to loom's under `--cfg sdtree_loom`.
//!
//! Every shared word of the tree goes through this module, so a loom build model-checks
//! all of them. crossbeam-epoch is switched by its own `--cfg crossbeam_loom` (and its
//! `loom` feature, which this crate turns on under `sdtree_loom`).

#[cfg(not(sdtree_loom))]
pub(crate) use core::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
#[cfg(sdtree_loom)]
pub(crate) use loom::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
