//! The PIP host's validation and claim logic against a hostile guest: arbitrary pool
//! contents, page marks, frame numbers and slot rewrites between the host's steps; also
//! `PoolView::from_raw` over arbitrary headers. The input format is documented in
//! `crates/pip/tests/common/hostile.rs`, which `cargo test` (the `fuzz-corpus` crate,
//! `crates/fuzz-corpus/tests/pip_validate.rs`) also runs over the corpus in
//! `fuzz/corpus/pip_validate/`.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run pip_validate` from `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/pip/tests/common/hostile.rs"]
mod hostile;

fuzz_target!(|data: &[u8]| hostile::run(data));
