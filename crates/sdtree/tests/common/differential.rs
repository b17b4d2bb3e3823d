//! Differential test of [`sdtree::base::SdMap`] and [`sdtree::base::SdTree`] against
//! `std::collections::BTreeMap`, driven by arbitrary bytes.
//!
//! Shared by the cargo-fuzz target `fuzz/fuzz_targets/differential.rs`, by the test
//! `tests/fuzz_inputs.rs` (hand-written inputs), and by the workspace's `fuzz-corpus`
//! crate, which replays the checked-in corpus under plain `cargo test --workspace`.
//! [`run`] never panics because of its input: it only panics when the tree and the model
//! disagree.
//!
//! The map and the tree each run on a crossbeam-epoch collector of their own, pinned per
//! operation, through the wrappers in `private.rs` (the API of `sdtree::SdMap` and
//! `sdtree::SdTree`, which pin the default collector): each input then frees all it
//! allocated, so libFuzzer's leak check stays idle. The whole map or tree is compared with
//! the model at the iteration operations and at the end, in place (no key is copied), and
//! `len` after every operation; a program runs up to [`MAX_OPS`] operations, so the
//! fuzzer's speed depends mostly on how long its inputs are (see the target's docs).
//!
//! # Input format
//! The same input is read twice, from its first byte each time: once as a map program and
//! once as a tree program. Reading past the end yields zero bytes, except where an
//! operation byte is expected: there the program ends. At most [`MAX_OPS`] operations run
//! per program.
//!
//! ## Keys (`KEY`)
//! One byte `b` starts a key:
//! - `b < 0xE0`, a **short key**: its length is `b % 7` (0..=6), and each of its bytes
//!   takes one more input byte `c`, giving `ALPHABET[c % 5]` where `ALPHABET` is
//!   `[0x00, 0x01, 0x80, 0xff, b'a']`. Equal keys and prefix pairs are frequent.
//! - `b >= 0xE0`, a **long key**: a fill byte `ALPHABET[(b & 0x1f) % 5]`; a byte `x` sets
//!   the length `100 + (x % 8) * 71` (100..=597); a byte `y` sets the number of edits
//!   `y % 3`, and each edit takes a byte `m` and writes `ALPHABET[(m / 48) % 5]` at offset
//!   `len - 1 - m % 48`. Long keys share long prefixes and differ late, if at all, so the
//!   word-at-a-time comparison runs over many words and stops anywhere in one.
//!
//! ## Map program
//! A sequence of operations on an `SdMap<Vec<u8>, u32>`; operation `i` (from 0) is one
//! byte `op`, dispatched on `op % 8`:
//!
//! | `op % 8` | operands   | operation                                                  |
//! |----------|------------|------------------------------------------------------------|
//! | 0, 1     | `KEY`      | `insert_or_get(key, i)`: `Inserted`, or `Present(old)`     |
//! | 2        | `KEY`      | `get(key)` and `contains_key(key)`                         |
//! | 3        | `KEY`      | `remove(key)`                                              |
//! | 4        | `KEY`, `p` | `remove_if(key, v % 3 == p % 3)`                           |
//! | 5        |            | full ordered iteration (`for_each`) and `len`              |
//! | 6        | `n`, `s`   | an operation on a key derived from a stored key (below)    |
//! | 7        | `KEY`, `k` | insert prefixes of `key`, then `key` (below)               |
//!
//! Derived keys (op 6): the stored key `n % len` in key order (or the empty key if the map
//! is empty) is altered by `s % 4`: 0 kept, 1 last byte dropped, 2 `ALPHABET[s / 4 % 5]`
//! appended, 3 last byte replaced by `ALPHABET[s / 4 % 5]`; then `(s / 20) % 4` picks
//! insert, get, remove or `remove_if` (with predicate `v % 2 == 0`). Op 7 inserts up to
//! `k % 8` proper prefixes of `key`, longest first, then `key` itself.
//!
//! Values are operation indices, so every stored value is distinct and a wrong `Present`
//! or `remove` value is caught. `len` is checked after every operation; at the end the
//! whole map is iterated and every model key looked up.
//!
//! ## Tree program
//! A key table, then operations on an `SdTree` over it (`Vec<Vec<u8>>`, handle = index),
//! checked against a `BTreeMap<Vec<u8>, usize>` of key → stored handle. The table is one
//! byte `t`, then `1 + t % 64` keys (`KEY` each). Then operation `i` is one byte `op` and a
//! handle byte `h` (handle `h % table_len`), dispatched on `op % 8`:
//!
//! | `op % 8` | operands | operation                                                      |
//! |----------|----------|----------------------------------------------------------------|
//! | 0, 1     |          | `insert_or_get(h)`: `Inserted`, or `Present(stored handle)`    |
//! | 2        |          | `get(table[h])`                                                |
//! | 3        |          | `remove(table[h])`                                             |
//! | 4        |          | `remove_handle(h)`: true only if `h` itself is stored          |
//! | 5        |          | full ordered iteration (`iter`) and `len`                      |
//! | 6        | `KEY`    | `get(key)` then, if `h` is odd, `remove(key)`, on a free key   |
//! | 7        | `k`      | `insert_or_get` on handles `h, h+1, …` (`k % 16` of them)      |
//!
//! `len` is checked after every operation; at the end the whole tree is iterated and every
//! table key looked up.

use std::collections::BTreeMap;

use sdtree::Insert;

// `tests/fuzz_inputs.rs` includes both checkers, so this file is loaded twice there.
#[allow(clippy::duplicate_mod)]
#[path = "private.rs"]
mod private;

// `sdtree::SdMap` and `sdtree::SdTree`'s API over the `base` types on a collector of their
// own, pinned per operation (see `private.rs`: each input then frees all it allocated, and
// libFuzzer's leak check stays idle).
use private::{SdMap, SdTree};

/// The most operations one program runs, so that one input stays fast.
pub const MAX_OPS: usize = 2000;

/// The bytes short keys are made of: the extremes, a high-bit byte and a letter.
const ALPHABET: [u8; 5] = [0x00, 0x01, 0x80, 0xff, b'a'];

/// A cursor over the input that never fails.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data, at: 0 }
    }

    /// The next byte, or `None` at the end.
    fn next(&mut self) -> Option<u8> {
        let b = self.data.get(self.at).copied();
        if b.is_some() {
            self.at += 1;
        }
        b
    }

    /// The next byte, or 0 at the end.
    fn byte(&mut self) -> u8 {
        self.next().unwrap_or(0)
    }

    fn letter(&mut self) -> u8 {
        ALPHABET[usize::from(self.byte()) % ALPHABET.len()]
    }

    /// A key, in the format the module docs describe.
    fn key(&mut self) -> Vec<u8> {
        let b = self.byte();
        if b < 0xE0 {
            let len = usize::from(b % 7);
            (0..len).map(|_| self.letter()).collect()
        } else {
            let fill = ALPHABET[usize::from(b & 0x1f) % ALPHABET.len()];
            let len = 100 + usize::from(self.byte() % 8) * 71;
            let mut key = vec![fill; len];
            let edits = self.byte() % 3;
            for _ in 0..edits {
                let m = usize::from(self.byte());
                key[len - 1 - m % 48] = ALPHABET[(m / 48) % ALPHABET.len()];
            }
            key
        }
    }
}

/// Runs the map program and the tree program that `data` encodes (see the module docs),
/// panicking on the first difference from the model.
pub fn run(data: &[u8]) {
    run_map(data);
    run_tree(data);
}

/// A short rendering of a key for panic messages.
fn show(key: &[u8]) -> String {
    if key.len() <= 16 {
        format!("{key:02x?}")
    } else {
        format!(
            "{} bytes, {:02x?}..{:02x?}",
            key.len(),
            &key[..8],
            &key[key.len() - 8..]
        )
    }
}

/// Every entry of `map` in iteration order must be the model's, in the model's order
/// (compared in place: no key is copied unless the check fails).
fn check_map_contents(map: &SdMap<Vec<u8>, u32>, model: &BTreeMap<Vec<u8>, u32>, i: usize) {
    let mut want = model.iter();
    let mut got_len = 0;
    // The first entry that differs: its index, what the map and the model have there.
    type Entry = Option<(String, u32)>;
    let mut first: Option<(usize, Entry, Entry)> = None;
    map.for_each(|k, v| {
        let w = want.next();
        if first.is_none() && w != Some((k, v)) {
            first = Some((got_len, Some((show(k), *v)), w.map(|(k, v)| (show(k), *v))));
        }
        got_len += 1;
    });
    if first.is_none() && got_len != model.len() {
        first = Some((got_len, None, want.next().map(|(k, v)| (show(k), *v))));
    }
    if let Some((first, got, want)) = first {
        panic!(
            "map op {i}: for_each differs from the model at entry {first}: \
             got {got_len} entries, model {}; got {got:?}, model {want:?}",
            model.len(),
        );
    }
    assert_eq!(map.len(), model.len(), "map op {i}: len");
}

/// One map operation on `key` (kind 0 insert, 1 get, 2 remove, 3 `remove_if`).
fn map_op(
    map: &SdMap<Vec<u8>, u32>,
    model: &mut BTreeMap<Vec<u8>, u32>,
    i: usize,
    kind: u8,
    key: Vec<u8>,
    pred: impl Fn(u32) -> bool,
) {
    let value = u32::try_from(i).unwrap_or(u32::MAX);
    match kind {
        0 => {
            let want = match model.get(&key) {
                Some(&old) => Insert::Present(old),
                None => Insert::Inserted,
            };
            let got = map.insert_or_get(key.clone(), value);
            assert_ne!(
                got,
                Insert::Refused,
                "map op {i}: insert_or_get({}) refused",
                show(&key)
            );
            assert_eq!(
                got,
                want,
                "map op {i}: insert_or_get({}, {value})",
                show(&key)
            );
            model.entry(key).or_insert(value);
        }
        1 => {
            let want = model.get(&key).copied();
            assert_eq!(map.get(&key), want, "map op {i}: get({})", show(&key));
            assert_eq!(
                map.contains_key(&key),
                want.is_some(),
                "map op {i}: contains_key({})",
                show(&key)
            );
        }
        2 => {
            let want = model.remove(&key);
            assert_eq!(map.remove(&key), want, "map op {i}: remove({})", show(&key));
        }
        _ => {
            let want = match model.get(&key) {
                Some(&v) if pred(v) => model.remove(&key),
                _ => None,
            };
            let got = map.remove_if(&key, |v| pred(*v));
            assert_eq!(got, want, "map op {i}: remove_if({})", show(&key));
        }
    }
}

/// The map program: see the module docs.
fn run_map(data: &[u8]) {
    let mut r = Reader::new(data);
    let map: SdMap<Vec<u8>, u32> = SdMap::new();
    let mut model: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut i = 0;
    while let Some(op) = r.next() {
        if i >= MAX_OPS {
            break;
        }
        match op % 8 {
            0 | 1 => map_op(&map, &mut model, i, 0, r.key(), |_| true),
            2 => map_op(&map, &mut model, i, 1, r.key(), |_| true),
            3 => map_op(&map, &mut model, i, 2, r.key(), |_| true),
            4 => {
                let key = r.key();
                let p = u32::from(r.byte() % 3);
                map_op(&map, &mut model, i, 3, key, move |v| v % 3 == p);
            }
            5 => check_map_contents(&map, &model, i),
            6 => {
                let n = usize::from(r.byte());
                let s = r.byte();
                let mut key = if model.is_empty() {
                    Vec::new()
                } else {
                    model
                        .keys()
                        .nth(n % model.len())
                        .cloned()
                        .unwrap_or_default()
                };
                let letter = ALPHABET[usize::from(s / 4) % ALPHABET.len()];
                match s % 4 {
                    0 => {}
                    1 => {
                        key.pop();
                    }
                    2 => key.push(letter),
                    _ => match key.last_mut() {
                        Some(last) => *last = letter,
                        None => key.push(letter),
                    },
                }
                map_op(&map, &mut model, i, (s / 20) % 4, key, |v| v % 2 == 0);
            }
            _ => {
                let key = r.key();
                let k = usize::from(r.byte() % 8);
                for cut in 0..k.min(key.len()) {
                    let prefix = key[..key.len() - 1 - cut].to_vec();
                    map_op(&map, &mut model, i, 0, prefix, |_| true);
                }
                map_op(&map, &mut model, i, 0, key, |_| true);
            }
        }
        assert_eq!(map.len(), model.len(), "map op {i}: len");
        i += 1;
    }
    check_map_contents(&map, &model, i);
    for (k, v) in &model {
        assert_eq!(map.get(k), Some(*v), "map end: get({})", show(k));
    }
}

/// Every handle of `tree` in iteration order must be the model's, in the model's order.
fn check_tree_contents(tree: &SdTree<Vec<Vec<u8>>>, model: &BTreeMap<Vec<u8>, usize>, i: usize) {
    let mut got: Vec<usize> = Vec::with_capacity(model.len());
    tree.for_each(|h| got.push(h));
    let want: Vec<usize> = model.values().copied().collect();
    if got != want {
        let first = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        let keys = tree.source();
        panic!(
            "tree op {i}: iter differs from the model at entry {first}: \
             got {} handles, model {}; got {:?}, model {:?}",
            got.len(),
            want.len(),
            got.get(first).map(|&h| (h, show(&keys[h]))),
            want.get(first).map(|&h| (h, show(&keys[h]))),
        );
    }
    assert_eq!(tree.len(), model.len(), "tree op {i}: len");
}

/// `insert_or_get(h)` on the tree and the model.
fn tree_insert(
    tree: &SdTree<Vec<Vec<u8>>>,
    model: &mut BTreeMap<Vec<u8>, usize>,
    i: usize,
    h: usize,
) {
    let key = &tree.source()[h];
    let want = match model.get(key) {
        Some(&stored) => Insert::Present(stored),
        None => Insert::Inserted,
    };
    let got = tree.insert_or_get(h);
    assert_ne!(
        got,
        Insert::Refused,
        "tree op {i}: insert_or_get({h}) refused (key {})",
        show(key)
    );
    assert_eq!(
        got,
        want,
        "tree op {i}: insert_or_get({h}) (key {})",
        show(key)
    );
    model.entry(key.clone()).or_insert(h);
}

/// The tree program: see the module docs.
fn run_tree(data: &[u8]) {
    let mut r = Reader::new(data);
    let size = 1 + usize::from(r.byte() % 64);
    let table: Vec<Vec<u8>> = (0..size).map(|_| r.key()).collect();
    let tree = SdTree::new(table);
    let keys = tree.source();
    let mut model: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    let mut i = 0;
    while let Some(op) = r.next() {
        if i >= MAX_OPS {
            break;
        }
        let hb = usize::from(r.byte());
        let h = hb % size;
        let key = &keys[h];
        match op % 8 {
            0 | 1 => tree_insert(&tree, &mut model, i, h),
            2 => {
                let want = model.get(key).copied();
                assert_eq!(tree.get(key), want, "tree op {i}: get({})", show(key));
            }
            3 => {
                let want = model.remove(key);
                assert_eq!(tree.remove(key), want, "tree op {i}: remove({})", show(key));
            }
            4 => {
                let want = model.get(key) == Some(&h);
                if want {
                    model.remove(key);
                }
                assert_eq!(
                    tree.remove_handle(h),
                    want,
                    "tree op {i}: remove_handle({h}) (key {})",
                    show(key)
                );
            }
            5 => check_tree_contents(&tree, &model, i),
            6 => {
                let free = r.key();
                let want = model.get(&free).copied();
                assert_eq!(tree.get(&free), want, "tree op {i}: get({})", show(&free));
                if hb % 2 == 1 {
                    let want = model.remove(&free);
                    assert_eq!(
                        tree.remove(&free),
                        want,
                        "tree op {i}: remove({})",
                        show(&free)
                    );
                }
            }
            _ => {
                let k = usize::from(r.byte() % 16);
                for off in 0..k {
                    tree_insert(&tree, &mut model, i, (h + off) % size);
                }
            }
        }
        assert_eq!(tree.len(), model.len(), "tree op {i}: len");
        i += 1;
    }
    check_tree_contents(&tree, &model, i);
    for key in keys {
        let want = model.get(key).copied();
        assert_eq!(tree.get(key), want, "tree end: get({})", show(key));
    }
}
