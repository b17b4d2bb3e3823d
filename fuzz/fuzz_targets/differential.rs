//! Differential fuzzing of `SdMap` and `SdTree` (the `base` types, each on a collector of
//! its own: `crates/sdtree/tests/common/private.rs`) against `BTreeMap`, on keys of up to
//! 597 bytes, up to 2000 operations per program; the input format is documented in
//! `crates/sdtree/tests/common/differential.rs`, which `cargo test` (the `fuzz-corpus`
//! crate, `crates/fuzz-corpus/tests/differential.rs`) also runs over the corpus in
//! `fuzz/corpus/differential/`.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run differential` from `fuzz/`. Measured on two shared
//! cores (load average 2 to 4.5 from other work), from a copy of the checked-in corpus,
//! 30 s runs, two each: about 135 executions per second under AddressSanitizer (cargo
//! fuzz's default; 31 to 35 before each input got a private collector, 91 with
//! `-detect_leaks=0`: libFuzzer's leak check took most of the time), about 400 to 440 with
//! `--sanitizer none` (280 to 310 before the iteration check stopped copying every key). What is left is the tree's
//! and the model's own work under comparison tracing (`perf`: over a third of the time in
//! libFuzzer's `__sanitizer_cov_trace_*cmp*` callbacks, half of that from the tree's
//! descent and iteration), so the speed follows the input's length: with
//! `-- -max_len=512`, about 380 executions per second under AddressSanitizer (47 before)
//! and 2,200 without. For millions of executions, run `differential_short`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/sdtree/tests/common/differential.rs"]
mod differential;

fuzz_target!(|data: &[u8]| differential::run(data));
