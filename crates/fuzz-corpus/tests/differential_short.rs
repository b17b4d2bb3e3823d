//! Replays the `differential_short` fuzz target's corpus
//! (`fuzz/corpus/differential_short/`) through the checker the target runs (sdtree's
//! `tests/common/short_keys.rs`).

#[path = "../../sdtree/tests/common/short_keys.rs"]
mod short_keys;

#[test]
fn corpus_replays() {
    fuzz_corpus::replay_corpus("differential_short", short_keys::run);
}
