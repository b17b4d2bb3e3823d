//! Replays the `differential` fuzz target's corpus (`fuzz/corpus/differential/`) through
//! the checker the target runs (sdtree's `tests/common/differential.rs`).

#[path = "../../sdtree/tests/common/differential.rs"]
mod differential;

#[test]
fn corpus_replays() {
    fuzz_corpus::replay_corpus("differential", differential::run);
}
