//! Replays the `wire_decode` fuzz target's corpus (`fuzz/corpus/wire_decode/`) through
//! the checker the target runs (pageoned's `tests/common/wire_decode.rs`).

#![cfg(target_os = "linux")]

#[path = "../../pageoned/tests/common/wire_decode.rs"]
mod wire_decode;

#[test]
fn corpus_replays() {
    fuzz_corpus::replay_corpus("wire_decode", wire_decode::run);
}
