//! proptest model tests: random operation sequences on the tree and the map, checked
//! step by step against `BTreeMap`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sdtree::{Insert, SdMap, SdTree};

/// Short keys over a tiny alphabet: equal keys, shared prefixes and prefix pairs abound.
fn short_key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![0u8, 1, 0x7f, 0x80, 0xff]), 0..6)
}

/// Page-sized keys that share a long prefix and differ in a few sparse bytes.
fn page_key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((0usize..4096, 1u8..=3), 0..3).prop_map(|edits| {
        let mut page = vec![0u8; 4096];
        for (at, v) in edits {
            page[at] = v;
        }
        page
    })
}

#[derive(Clone, Debug)]
enum Op {
    Insert(usize, u32),
    Get(usize),
    Remove(usize),
    RemoveIf(usize, u32),
    Check,
}

fn ops(nkeys: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0..nkeys, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
        2 => (0..nkeys).prop_map(Op::Get),
        2 => (0..nkeys).prop_map(Op::Remove),
        1 => (0..nkeys, 0u32..4).prop_map(|(k, v)| Op::RemoveIf(k, v)),
        1 => Just(Op::Check),
    ];
    prop::collection::vec(op, 0..200)
}

fn run_map(keys: &[Vec<u8>], ops: &[Op]) {
    let map: SdMap<Vec<u8>, u32> = SdMap::new();
    let mut model: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    for op in ops {
        match *op {
            Op::Insert(k, v) => {
                let key = &keys[k];
                let expected = match model.get(key) {
                    Some(&old) => Insert::Present(old),
                    None => {
                        model.insert(key.clone(), v % 4);
                        Insert::Inserted
                    }
                };
                assert_eq!(map.insert_or_get(key.clone(), v % 4), expected);
            }
            Op::Get(k) => assert_eq!(map.get(&keys[k]), model.get(&keys[k]).copied()),
            Op::Remove(k) => assert_eq!(map.remove(&keys[k]), model.remove(&keys[k])),
            Op::RemoveIf(k, v) => {
                let expected = match model.get(&keys[k]) {
                    Some(&old) if old == v => model.remove(&keys[k]),
                    _ => None,
                };
                assert_eq!(map.remove_if(&keys[k], |&x| x == v), expected);
            }
            Op::Check => {
                let mut seen = Vec::new();
                map.for_each(|k, v| seen.push((k.clone(), *v)));
                let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
                assert_eq!(seen, want);
            }
        }
        assert_eq!(map.len(), model.len());
    }
}

/// The handle tree over a fixed key table: handle `i` has key `keys[i]`.
fn run_tree(keys: &[Vec<u8>], ops: &[Op]) {
    let tree = SdTree::new(keys);
    let mut model: BTreeMap<&[u8], usize> = BTreeMap::new();
    for op in ops {
        match *op {
            Op::Insert(h, _) => {
                let expected = match model.get(keys[h].as_slice()) {
                    Some(&old) => Insert::Present(old),
                    None => {
                        model.insert(&keys[h], h);
                        Insert::Inserted
                    }
                };
                assert_eq!(tree.insert_or_get(h), expected);
            }
            Op::Get(h) => assert_eq!(tree.get(&keys[h]), model.get(keys[h].as_slice()).copied()),
            Op::Remove(h) => assert_eq!(tree.remove(&keys[h]), model.remove(keys[h].as_slice())),
            Op::RemoveIf(h, _) => {
                let stored = model.get(keys[h].as_slice()) == Some(&h);
                if stored {
                    model.remove(keys[h].as_slice());
                }
                assert_eq!(tree.remove_handle(h), stored);
            }
            Op::Check => {
                let seen: Vec<usize> = tree.iter().collect();
                let want: Vec<usize> = model.values().copied().collect();
                assert_eq!(seen, want);
            }
        }
        assert_eq!(tree.len(), model.len());
    }
    let seen: Vec<usize> = tree.iter().collect();
    assert_eq!(seen, model.values().copied().collect::<Vec<_>>());
}

fn short_case() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<Op>)> {
    prop::collection::vec(short_key(), 1..24).prop_flat_map(|keys| {
        let n = keys.len();
        (Just(keys), ops(n))
    })
}

fn page_case() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<Op>)> {
    prop::collection::vec(page_key(), 1..12).prop_flat_map(|keys| {
        let n = keys.len();
        (Just(keys), ops(n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn map_matches_btreemap_short_keys((keys, ops) in short_case()) {
        run_map(&keys, &ops);
    }

    #[test]
    fn tree_matches_btreemap_short_keys((keys, ops) in short_case()) {
        run_tree(&keys, &ops);
    }

    #[test]
    fn map_matches_btreemap_page_keys((keys, ops) in page_case()) {
        run_map(&keys, &ops);
    }

    #[test]
    fn tree_matches_btreemap_page_keys((keys, ops) in page_case()) {
        run_tree(&keys, &ops);
    }
}

#[test]
fn prefixes_and_empty_key_are_distinct_and_ordered() {
    let keys: Vec<&[u8]> = vec![b"abc", b"", b"ab", b"a", b"abc\0", b"b", b"\0"];
    let tree = SdTree::new(keys.clone());
    for (h, k) in keys.iter().enumerate() {
        assert_eq!(tree.insert_or_get(h), Insert::Inserted, "key {k:?}");
    }
    let order: Vec<&[u8]> = tree.iter().map(|h| keys[h]).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    for (h, k) in keys.iter().enumerate() {
        assert_eq!(tree.get(k), Some(h));
    }
    assert_eq!(tree.get(b"abcd"), None);
}

#[test]
#[should_panic(expected = "MAX_HANDLE")]
fn handle_above_max_is_rejected_with_a_clear_panic() {
    struct Any;
    impl sdtree::KeySource for Any {
        fn key(&self, _: usize) -> &[u8] {
            b"k"
        }
    }
    let tree = SdTree::new(Any);
    let _ = tree.insert_or_get(sdtree::MAX_HANDLE + 1);
}
