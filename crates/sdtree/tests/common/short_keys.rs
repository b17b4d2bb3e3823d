//! A fast differential test of [`sdtree::base::SdMap`] against `std::collections::BTreeMap` on
//! short keys (1 to 16 bytes), driven by arbitrary bytes.
//!
//! Shared by the cargo-fuzz target `fuzz/fuzz_targets/differential_short.rs`, by
//! `tests/fuzz_inputs.rs` (hand-written inputs) and by the workspace's `fuzz-corpus` crate,
//! which replays `fuzz/corpus/differential_short/`. Unlike `differential.rs` (keys up to
//! 597 bytes, up to 2000 operations per program, a map program and a tree program per
//! input), keys here are short and one map program runs at most [`MAX_OPS`] operations;
//! as there, each operation checks the key it touched and `len`, and the whole map is
//! compared at the explicit iteration operation and at the end. An input costs a fraction
//! of a millisecond and the fuzzer reaches millions of executions. [`run`] only panics when
//! the map and the model disagree.
//!
//! # Input format
//! A sequence of operations, each one byte `op` and then a key; the program ends where an
//! `op` byte is expected and the input has ended (reading a key past the end gives zero
//! bytes). Operation `i` (from 0) is dispatched on `op % 8`:
//!
//! | `op % 8` | operation                                                     |
//! |----------|---------------------------------------------------------------|
//! | 0, 1, 2  | `insert_or_get(key, i)`: `Inserted`, or `Present(old)`        |
//! | 3        | `get(key)` and `contains_key(key)`                            |
//! | 4        | `remove(key)`                                                 |
//! | 5        | `remove_if(key, v is odd)`                                    |
//! | 6        | `insert_or_get` of every proper prefix of `key`, longest first |
//! | 7        | full ordered iteration (`for_each`) (key unused)              |
//!
//! A key is a byte `b` giving the length `1 + b % 16`, then one byte per key byte: byte
//! `c` gives `ALPHABET[c % 4]` if `c < 0xC0`, else `c` itself (so that the fuzzer can also
//! reach arbitrary bytes, while the 4-letter alphabet makes equal keys, prefix pairs and
//! long shared prefixes frequent). Values are operation indices, so every stored value is
//! distinct and a wrong `Present` or `remove` value names the insert it came from.

use std::collections::BTreeMap;

use sdtree::Insert;

// `tests/fuzz_inputs.rs` includes both checkers, so this file is loaded twice there.
#[allow(clippy::duplicate_mod)]
#[path = "private.rs"]
mod private;

/// `base::SdMap` on a collector of its own, pinned per operation (see `private.rs`: each
/// input then frees all it allocated, and libFuzzer's leak check stays idle).
type SdMap = private::SdMap<Vec<u8>, u32>;

/// The most operations one program runs.
pub const MAX_OPS: usize = 256;

/// The bytes keys are mostly made of: the extremes and two single-bit bytes.
const ALPHABET: [u8; 4] = [0x00, 0x01, 0x80, 0xff];

/// One key in the input format above, from `data[*at..]`.
fn key(data: &[u8], at: &mut usize) -> Vec<u8> {
    let mut byte = || {
        let b = data.get(*at).copied().unwrap_or(0);
        *at += 1;
        b
    };
    let len = 1 + usize::from(byte() % 16);
    (0..len)
        .map(|_| match byte() {
            c if c < 0xC0 => ALPHABET[usize::from(c) % ALPHABET.len()],
            c => c,
        })
        .collect()
}

/// The whole map, in order, against the model (without copying the keys).
fn check_iteration(map: &SdMap, model: &BTreeMap<Vec<u8>, u32>, i: usize) {
    let mut want = model.iter();
    map.for_each(|k, v| {
        assert_eq!(
            want.next(),
            Some((k, v)),
            "op {i}: for_each differs from the model"
        );
    });
    assert_eq!(want.next(), None, "op {i}: for_each ended early");
}

/// Iteration and a lookup of every model key: only at the end of a program (per
/// operation it would make a program quadratic).
fn check_all(map: &SdMap, model: &BTreeMap<Vec<u8>, u32>, i: usize) {
    check_iteration(map, model, i);
    for (k, v) in model {
        assert_eq!(map.get(k), Some(*v), "op {i}: get({k:02x?}) at the end");
    }
}

fn insert(map: &SdMap, model: &mut BTreeMap<Vec<u8>, u32>, key: Vec<u8>, i: u32) {
    let want = match model.get(&key) {
        Some(&old) => Insert::Present(old),
        None => {
            model.insert(key.clone(), i);
            Insert::Inserted
        }
    };
    let got = map.insert_or_get(key, i);
    assert_eq!(got, want, "op {i}: insert_or_get (value {i})");
}

/// Runs the program `data` encodes (see the module docs), panicking on the first
/// difference from the model.
pub fn run(data: &[u8]) {
    let map = SdMap::new();
    let mut model: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut at = 0;
    for i in 0..MAX_OPS {
        let Some(&op) = data.get(at) else { break };
        at += 1;
        let k = key(data, &mut at);
        let v = i as u32;
        match op % 8 {
            0..=2 => insert(&map, &mut model, k, v),
            3 => {
                let want = model.get(&k).copied();
                assert_eq!(map.get(&k), want, "op {i}: get({k:02x?})");
                assert_eq!(map.contains_key(&k), want.is_some(), "op {i}: contains_key");
            }
            4 => assert_eq!(map.remove(&k), model.remove(&k), "op {i}: remove({k:02x?})"),
            5 => {
                let want = match model.get(&k) {
                    Some(&v) if v % 2 == 1 => model.remove(&k),
                    _ => None,
                };
                assert_eq!(
                    map.remove_if(&k, |v| v % 2 == 1),
                    want,
                    "op {i}: remove_if({k:02x?})"
                );
            }
            6 => {
                for len in (1..k.len()).rev() {
                    insert(&map, &mut model, k[..len].to_vec(), v);
                }
            }
            _ => check_iteration(&map, &model, i),
        }
        assert_eq!(map.len(), model.len(), "op {i}: len");
    }
    check_all(&map, &model, MAX_OPS);
}
