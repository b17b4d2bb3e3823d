//! Replays the `pip_validate` fuzz target's corpus (`fuzz/corpus/pip_validate/`) through
//! the checker the target runs (pip's `tests/common/hostile.rs`).

#[path = "../../pip/tests/common/hostile.rs"]
mod hostile;

#[test]
fn corpus_replays() {
    fuzz_corpus::replay_corpus("pip_validate", hostile::run);
}
