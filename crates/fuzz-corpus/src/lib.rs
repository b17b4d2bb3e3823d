//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/` at the workspace root)
//! through the same checkers the cargo-fuzz targets run, so that plain
//! `cargo test --workspace` keeps every corpus input passing.
//!
//! The checkers live with the crates they test, in their `tests/common/` directories
//! (`crates/sdtree/tests/common/differential.rs`, `crates/pip/tests/common/hostile.rs`,
//! `crates/pageoned/tests/common/wire_decode.rs`),
//! where those crates' own tests run hand-written inputs through them and the fuzz
//! targets include them. The corpora are not part of those crates (a packaged `sdtree` or
//! `pip` does not contain `fuzz/`), so their replay lives here, in a workspace member that
//! is never published: `tests/differential.rs`, `tests/pip_validate.rs`,
//! `tests/wire_decode.rs` and the others there, all through [`replay_corpus`].
//!
//! ```no_run
//! fn check(data: &[u8]) {
//!     assert!(data.len() < 1 << 20);
//! }
//! fuzz_corpus::replay_corpus("differential", check);
//! ```

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

/// The corpus directory of fuzz target `target`: `fuzz/corpus/<target>/` at the root of
/// the workspace.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// Runs `check` on `data`; if it panics, says which target and input failed (on stderr)
/// and re-raises the panic.
pub fn replay(target: &str, name: &str, data: &[u8], check: fn(&[u8])) {
    if let Err(e) = panic::catch_unwind(|| check(data)) {
        eprintln!(
            "{target} check failed on input {name} ({} bytes)",
            data.len()
        );
        panic::resume_unwind(e);
    }
}

/// Runs `check` on every file of [`corpus_dir`]`(target)`, in name order.
///
/// # Panics
/// If the directory cannot be read or holds no file, or if `check` panics on an input
/// (the panic is re-raised after naming the input).
pub fn replay_corpus(target: &str, check: fn(&[u8])) {
    let dir = corpus_dir(target);
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
