//! Corpus replay shared by the crates' `tests/fuzz_corpus.rs`: every fuzz target's corpus
//! under `fuzz/corpus/` is run through the same checker the target runs, so plain
//! `cargo test` keeps it passing. Included with `#[path]` (it is test code, not a crate).

use std::fs;
use std::panic;
use std::path::Path;

/// Runs `check` on `data`, re-panicking with `target` and `name` if it fails.
pub fn replay(target: &str, name: &str, data: &[u8], check: fn(&[u8])) {
    if let Err(e) = panic::catch_unwind(|| check(data)) {
        eprintln!(
            "{target} check failed on input {name} ({} bytes)",
            data.len()
        );
        panic::resume_unwind(e);
    }
}

/// Replays every file of `fuzz/corpus/<target>/` (the directory must hold at least one).
pub fn replay_corpus(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("reading a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    for path in &files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        replay(target, &path.display().to_string(), &data, check);
    }
}
