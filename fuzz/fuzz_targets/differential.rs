//! Differential fuzzing of `SdMap` and `SdTree` against `BTreeMap`; the input format is
//! documented in `crates/sdtree/tests/common/differential.rs`, which `cargo test`
//! (the `fuzz-corpus` crate, `crates/fuzz-corpus/tests/differential.rs`) also runs over the
//! corpus in `fuzz/corpus/differential/`.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run differential` from `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/sdtree/tests/common/differential.rs"]
mod differential;

fuzz_target!(|data: &[u8]| differential::run(data));
