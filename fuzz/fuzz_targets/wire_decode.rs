//! The service/agent wire codec against hostile bytes: `pageoned::wire::decode` must not
//! panic, and a frame it accepts must encode back to exactly its bytes and decode to the
//! same message. The checker is `crates/pageoned/tests/common/wire_decode.rs`, which
//! `cargo test` (the `fuzz-corpus` crate, `crates/fuzz-corpus/tests/wire_decode.rs`)
//! also runs over the corpus in `fuzz/corpus/wire_decode/` (seeded with a valid frame
//! of every kind by `cargo test -p pageoned --test wire -- --ignored write_seed_corpus`).
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run wire_decode` from `fuzz/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/pageoned/tests/common/wire_decode.rs"]
mod wire_decode;

fuzz_target!(|data: &[u8]| wire_decode::run(data));
