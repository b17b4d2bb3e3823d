//! The wire codec against arbitrary bytes: the checker of the `wire_decode` fuzz target.
//!
//! Shared by the cargo-fuzz target `fuzz/fuzz_targets/wire_decode.rs`, by this crate's
//! `tests/wire.rs` (hand-written inputs), and by the workspace's `fuzz-corpus` crate,
//! which replays the checked-in corpus (`fuzz/corpus/wire_decode/`) under plain
//! `cargo test --workspace`.
//!
//! # Input format
//! The input is one frame, decoded as it is. [`run`] panics only when the codec is wrong:
//! if `decode` panics, or accepts a frame that `encode` then refuses, encodes
//! differently (the encoding is canonical) or decodes to another message.

use pageoned::wire::{decode, encode, MAX_FRAME};

/// Decodes `data`; a message it accepts must encode back to exactly `data`.
pub fn run(data: &[u8]) {
    let Ok(msg) = decode(data) else {
        return;
    };
    assert!(
        data.len() <= MAX_FRAME,
        "decode accepted an oversized frame"
    );
    let mut out = Vec::new();
    if let Err(e) = encode(&msg, &mut out) {
        panic!("decode accepted {msg:?}, which encode refuses: {e}");
    }
    assert_eq!(out, data, "the encoding of {msg:?} is not canonical");
    assert_eq!(
        decode(&out).as_ref(),
        Ok(&msg),
        "re-decoding changed the message"
    );
}
