//! Fast differential fuzzing of `SdMap` against `BTreeMap` on short keys (1 to 16 bytes,
//! at most 256 operations per input); the input format is documented in
//! `crates/sdtree/tests/common/short_keys.rs`, which `cargo test` (the `fuzz-corpus`
//! crate, `crates/fuzz-corpus/tests/differential_short.rs`) also runs over the corpus in
//! `fuzz/corpus/differential_short/`. The slower `differential` target covers long keys
//! and the handle tree.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run differential_short` from `fuzz/`. Measured on two
//! shared cores, from the checked-in corpus, 30 s runs: about 3,300 executions per second
//! under AddressSanitizer (cargo fuzz's default), about 16,000 with `--sanitizer none
//! -- -max_len=256` (half a million in the 30 s). Measured again once the map's wrapper
//! (a private collector per input) had moved to `crates/sdtree/tests/common/private.rs`,
//! shared with `differential`: about 4,300 under AddressSanitizer (load average 3.3).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/sdtree/tests/common/short_keys.rs"]
mod short_keys;

fuzz_target!(|data: &[u8]| short_keys::run(data));
