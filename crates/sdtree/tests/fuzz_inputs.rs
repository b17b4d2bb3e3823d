//! Hand-written inputs run through the checker the `differential` fuzz target runs
//! (`tests/common/differential.rs`), so plain `cargo test` keeps them passing. The
//! checked-in corpus (`fuzz/corpus/differential/`, not part of this package) is replayed
//! by the workspace's `fuzz-corpus` crate.

#[path = "common/differential.rs"]
mod differential;

fn replay_one(name: &str, data: &[u8]) {
    // The input's name goes to the test's output, so a failure says which one it was.
    eprintln!("differential: input {name:?} ({} bytes)", data.len());
    differential::run(data);
}

/// A short key in the input format: length byte, then one byte per letter
/// (`0` → 0x00, `1` → 0x01, `2` → 0x80, `3` → 0xff, `4` → `a`).
fn short(letters: &[u8]) -> Vec<u8> {
    assert!(letters.len() <= 6);
    let mut out = vec![letters.len() as u8];
    out.extend_from_slice(letters);
    out
}

/// A long key in the input format: `fill` letter, length step (`100 + 71 * step` bytes),
/// then `(from_end, letter)` edits (at most 2, `from_end < 48`).
fn long(fill: u8, step: u8, edits: &[(u8, u8)]) -> Vec<u8> {
    assert!(edits.len() <= 2);
    let mut out = vec![0xE0 | fill, step, edits.len() as u8];
    for &(from_end, letter) in edits {
        out.push(letter * 48 + from_end);
    }
    out
}

/// A map program: `(op, operands)` pairs concatenated.
fn program(ops: &[(u8, Vec<u8>)]) -> Vec<u8> {
    ops.iter()
        .flat_map(|(op, rest)| std::iter::once(*op).chain(rest.iter().copied()))
        .collect()
}

#[test]
fn hand_written_inputs() {
    const INSERT: u8 = 0;
    const GET: u8 = 2;
    const REMOVE: u8 = 3;
    const REMOVE_IF: u8 = 4;
    const CHECK: u8 = 5;
    const DERIVED: u8 = 6;
    const PREFIXES: u8 = 7;

    let mut inputs: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("one byte", vec![0]),
        ("all ones", vec![0xff; 64]),
        ("counting", (0..=255u8).collect()),
        ("counting twice", (0..=255u8).chain(0..=255).collect()),
    ];

    // Prefix chains and equal keys, removed and re-inserted.
    inputs.push((
        "prefix chain",
        program(&[
            (INSERT, short(&[])),
            (INSERT, short(&[4])),
            (INSERT, short(&[4, 4])),
            (INSERT, short(&[4, 0])),
            (INSERT, short(&[4, 0, 0])),
            (INSERT, short(&[4])),
            (CHECK, vec![]),
            (REMOVE, short(&[4])),
            (GET, short(&[4, 0])),
            (REMOVE_IF, [short(&[4, 0]), vec![0]].concat()),
            (REMOVE_IF, [short(&[4, 0]), vec![1]].concat()),
            (CHECK, vec![]),
            (INSERT, short(&[4])),
            (REMOVE, short(&[])),
            (REMOVE, short(&[])),
            (CHECK, vec![]),
            (PREFIXES, [short(&[3, 2, 1, 0, 3, 2]), vec![5]].concat()),
            (DERIVED, vec![3, 1]),
            (DERIVED, vec![4, 2 + 4 * 3 + 20]),
            (DERIVED, vec![0, 3 + 40]),
            (CHECK, vec![]),
        ]),
    ));

    // Long keys that differ in the last word, in the middle of a word, or only in length.
    inputs.push((
        "long keys",
        program(&[
            (INSERT, long(4, 0, &[])),
            (INSERT, long(4, 1, &[])),
            (INSERT, long(4, 0, &[(0, 0)])),
            (INSERT, long(4, 0, &[(7, 3)])),
            (INSERT, long(4, 0, &[(8, 3)])),
            (INSERT, long(4, 0, &[(47, 1), (0, 2)])),
            (INSERT, long(4, 7, &[(3, 0)])),
            (INSERT, long(0, 7, &[])),
            (INSERT, long(4, 0, &[(7, 3)])),
            (CHECK, vec![]),
            (REMOVE, long(4, 0, &[(8, 3)])),
            (GET, long(4, 0, &[(7, 3)])),
            (GET, long(4, 0, &[(6, 3)])),
            (REMOVE, long(4, 0, &[])),
            (CHECK, vec![]),
            (PREFIXES, [long(4, 2, &[(1, 1)]), vec![7]].concat()),
            (CHECK, vec![]),
        ]),
    ));

    // A tree program: a table with duplicates, then every kind of operation.
    let mut tree = vec![6]; // 1 + 6 = 7 keys
    for key in [
        short(&[4]),
        short(&[4, 4]),
        short(&[4]),
        short(&[]),
        long(3, 2, &[(5, 0)]),
        long(3, 2, &[(5, 0)]),
        long(3, 2, &[]),
    ] {
        tree.extend(key);
    }
    tree.extend([
        0, 0, 0, 1, 0, 2, 1, 0, // insert 0, 1; 2 is Present(0), 0 again
        7, 3, 15, // insert handles 3..=17 (mod 8)
        5, 0, // check
        4, 2, 4, 0, 3, 0, // remove_handle 2 (false), 0 (true), remove "a" (gone)
        1, 2, 2, 2, 5, 0, // insert 2, get, check
        6, 1, 1, 4, 6, 0, 0, // get + remove "a", get ""
        3, 4, 0, 5, 5, 0, 4, 6, 5, 0, // remove long, insert the twin, remove_handle 6
    ]);
    inputs.push(("tree table", tree));

    for (name, data) in &inputs {
        replay_one(name, data);
    }
}

#[path = "common/short_keys.rs"]
mod short_keys;

/// Hand-written inputs for the `differential_short` target's checker: prefix chains,
/// equal keys inserted twice, removes of present and absent keys, arbitrary bytes.
#[test]
fn short_key_inputs() {
    // Each op: op byte, length byte (len = 1 + b % 16), then len key bytes.
    let inputs: [&[u8]; 6] = [
        b"",
        // insert [00], insert [00] again (Present), get, remove, get.
        &[0, 0, 0, 1, 0, 0, 3, 0, 0, 4, 0, 0, 3, 0, 0],
        // insert the prefixes of a 16-byte key, then iterate.
        &[6, 15, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 7],
        // bytes >= 0xC0 are taken as they are; remove_if of an odd value (op 1).
        &[2, 1, 0xC0, 0xFE, 0, 1, 0xC0, 0xFF, 5, 1, 0xC0, 0xFF, 7],
        // keys that differ only in their last byte, at every length.
        &[
            0, 7, 3, 3, 3, 3, 3, 3, 3, 2, 1, 7, 3, 3, 3, 3, 3, 3, 3, 3, 6, 7, 3, 3, 3, 3, 3, 3, 3,
            2, 7,
        ],
        // a truncated key reads zeros.
        &[0, 9, 1],
    ];
    for data in inputs {
        short_keys::run(data);
    }
    // A long pseudo-random program.
    let mut x = 0x1234_5678_9ABC_DEF1u64;
    let data: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    short_keys::run(&data);
}
