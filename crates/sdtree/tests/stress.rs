//! Multi-thread stress: threads race inserts and removes on overlapping keys; the final
//! state must account for every successful operation, with nothing lost or duplicated.
//!
//! Besides the shared keys, each thread owns private keys that no other thread touches,
//! interleaved with its shared operations (and stored in the same subtrees, since every key
//! comes from one table): on those, every single result the thread sees must be exactly
//! what a sequential model of its own operations says.
//!
//! Every test runs a fixed number of operations, not for a time. `SDTREE_TEST_SCALE` (a
//! percentage, default 100) scales those counts, for the sanitizer runs of
//! `.ci/sanitizers.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;

use sdtree::{base, epoch, Insert, SdMap, SdTree};

const THREADS: usize = 4;

#[path = "common/workload.rs"]
mod workload;
use workload::{scaled, Rng};

/// Distinct keys with long shared prefixes; key `2b + 1` is key `2b` plus a zero byte.
fn key_table(distinct: usize) -> Vec<Vec<u8>> {
    (0..distinct)
        .map(|i| {
            let b = i / 2;
            let mut k = vec![0xAAu8; 40 * (b % 3)];
            k.extend_from_slice(&(b as u16).to_be_bytes());
            if i % 2 == 1 {
                k.push(0);
            }
            k
        })
        .collect()
}

#[test]
fn handles_are_never_lost_or_duplicated() {
    const DISTINCT: usize = 64;
    const PRIVATE: usize = 16;
    const COPIES: usize = 3;
    let ops = scaled(50_000);
    // Keys 0..DISTINCT are shared; thread t owns keys DISTINCT + t * PRIVATE + 0..PRIVATE.
    let distinct = key_table(DISTINCT + THREADS * PRIVATE);
    // Handle h has key distinct[h / COPIES]: COPIES handles share each key.
    let keys: Vec<Vec<u8>> = (0..distinct.len() * COPIES)
        .map(|h| distinct[h / COPIES].clone())
        .collect();
    let tree = SdTree::new(&keys);
    let barrier = Barrier::new(THREADS);
    // net[t][h]: inserts minus removes of handle h that thread t saw succeed.
    let nets: Vec<Vec<i64>> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (tree, keys, barrier, distinct) = (&tree, &keys, &barrier, &distinct);
                s.spawn(move || {
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                    let mut net = vec![0i64; keys.len()];
                    // This thread's private keys: key index -> the handle stored under it.
                    let mut mine: BTreeMap<usize, usize> = BTreeMap::new();
                    let first_private = (DISTINCT + t * PRIVATE) * COPIES;
                    barrier.wait();
                    for _ in 0..ops {
                        let private = rng.below(4) == 0;
                        let h = if private {
                            first_private + rng.below(PRIVATE * COPIES)
                        } else {
                            rng.below(DISTINCT * COPIES)
                        };
                        let k = h / COPIES;
                        match rng.below(4) {
                            0 | 1 => match tree.insert_or_get(h) {
                                Insert::Inserted => {
                                    net[h] += 1;
                                    if private {
                                        assert_eq!(
                                            mine.insert(k, h),
                                            None,
                                            "private {h}: inserted twice"
                                        );
                                    }
                                }
                                Insert::Present(p) => {
                                    assert_eq!(keys[p], keys[h], "Present gave another key");
                                    if private {
                                        assert_eq!(
                                            mine.get(&k),
                                            Some(&p),
                                            "private {h}: Present({p})"
                                        );
                                    }
                                }
                                Insert::Refused => panic!("Refused with immutable keys"),
                            },
                            2 => {
                                let removed = tree.remove_handle(h);
                                if removed {
                                    net[h] -= 1;
                                }
                                if private {
                                    let want = mine.get(&k) == Some(&h);
                                    assert_eq!(removed, want, "private {h}: remove_handle");
                                    if want {
                                        mine.remove(&k);
                                    }
                                }
                            }
                            _ => {
                                let got = tree.remove(&keys[h]);
                                if let Some(p) = got {
                                    assert_eq!(keys[p], keys[h]);
                                    net[p] -= 1;
                                }
                                if private {
                                    assert_eq!(got, mine.remove(&k), "private {h}: remove");
                                }
                            }
                        }
                        if private {
                            assert_eq!(
                                tree.get(&keys[h]),
                                mine.get(&k).copied(),
                                "private {h}: get"
                            );
                        }
                    }
                    // Private keys are unchanged since this thread's last operation.
                    let lo = DISTINCT + t * PRIVATE;
                    for (k, key) in distinct.iter().enumerate().skip(lo).take(PRIVATE) {
                        assert_eq!(
                            tree.get(key),
                            mine.get(&k).copied(),
                            "private key {k} at the end"
                        );
                    }
                    net
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let present: Vec<usize> = tree.iter().collect();
    let present_set: BTreeSet<usize> = present.iter().copied().collect();
    assert_eq!(
        present.len(),
        present_set.len(),
        "a handle was yielded twice"
    );
    for h in 0..keys.len() {
        let net: i64 = nets.iter().map(|n| n[h]).sum();
        assert!(net == 0 || net == 1, "handle {h}: net {net}");
        assert_eq!(net == 1, present_set.contains(&h), "handle {h}: net {net}");
    }
    // At most one handle per key, in key order, and every present handle is found.
    let ks: Vec<&Vec<u8>> = present.iter().map(|&h| &keys[h]).collect();
    assert!(ks.windows(2).all(|w| w[0] < w[1]), "iteration out of order");
    for &h in &present {
        assert_eq!(tree.get(&keys[h]), Some(h));
    }
    assert_eq!(tree.len(), present.len());
}

#[test]
fn map_values_are_removed_at_most_once() {
    const SHARED: usize = 48;
    const PRIVATE: usize = 16;
    let ops = scaled(50_000);
    // Keys 0..SHARED are shared; thread t owns keys SHARED + t * PRIVATE + 0..PRIVATE.
    let keys = key_table(SHARED + THREADS * PRIVATE);
    let map: SdMap<Vec<u8>, u64> = SdMap::new();
    let barrier = Barrier::new(THREADS);
    let (inserted, removed): (Vec<Vec<u64>>, Vec<Vec<u64>>) = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (map, keys, barrier) = (&map, &keys, &barrier);
                s.spawn(move || {
                    let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (t as u64 + 1));
                    let (mut ins, mut rem) = (Vec::new(), Vec::new());
                    // This thread's private keys: key index -> the value stored under it.
                    let mut mine: BTreeMap<usize, u64> = BTreeMap::new();
                    barrier.wait();
                    for i in 0..ops {
                        let private = rng.below(4) == 0;
                        let k = if private {
                            SHARED + t * PRIVATE + rng.below(PRIVATE)
                        } else {
                            rng.below(SHARED)
                        };
                        // Values are unique: thread in the top bits, op number below.
                        let v = ((t as u64) << 32) | i as u64;
                        if rng.below(2) == 0 {
                            let got = map.insert_or_get(keys[k].clone(), v);
                            if got == Insert::Inserted {
                                ins.push(v);
                            }
                            if private {
                                let want = match mine.get(&k) {
                                    Some(&old) => Insert::Present(old),
                                    None => {
                                        mine.insert(k, v);
                                        Insert::Inserted
                                    }
                                };
                                assert_eq!(got, want, "private key {k}: insert_or_get");
                            }
                        } else {
                            let got = map.remove(&keys[k]);
                            if let Some(old) = got {
                                rem.push(old);
                            }
                            if private {
                                assert_eq!(got, mine.remove(&k), "private key {k}: remove");
                            }
                        }
                        if private {
                            assert_eq!(
                                map.get(&keys[k]),
                                mine.get(&k).copied(),
                                "private key {k}: get"
                            );
                        }
                    }
                    let lo = SHARED + t * PRIVATE;
                    for (k, key) in keys.iter().enumerate().skip(lo).take(PRIVATE) {
                        assert_eq!(
                            map.get(key),
                            mine.get(&k).copied(),
                            "private key {k} at the end"
                        );
                    }
                    (ins, rem)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).unzip()
    });
    let inserted: BTreeSet<u64> = inserted.into_iter().flatten().collect();
    let removed_all: Vec<u64> = removed.into_iter().flatten().collect();
    let removed: BTreeSet<u64> = removed_all.iter().copied().collect();
    assert_eq!(
        removed.len(),
        removed_all.len(),
        "a value was removed twice"
    );
    assert!(
        removed.is_subset(&inserted),
        "removed a value never inserted"
    );
    let mut remaining = BTreeSet::new();
    map.for_each(|_, v| {
        remaining.insert(*v);
    });
    let expected: BTreeSet<u64> = inserted.difference(&removed).copied().collect();
    assert_eq!(remaining, expected);
}

#[test]
fn stable_keys_stay_visible_while_neighbours_churn() {
    const STABLE: usize = 32;
    let keys = key_table(STABLE * 4);
    let collector = epoch::Collector::new();
    let tree = base::SdTree::new(&keys, collector.clone());
    {
        let h = collector.register();
        let g = h.pin();
        for k in (0..keys.len()).step_by(4) {
            assert_eq!(tree.insert_or_get(k, &g), Insert::Inserted);
        }
    }
    let stop = AtomicBool::new(false);
    let churn = scaled(30_000);
    thread::scope(|s| {
        for t in 0..2 {
            let (tree, keys, stop, collector) = (&tree, &keys, &stop, &collector);
            s.spawn(move || {
                let handle = collector.register();
                let mut rng = Rng(77 + t);
                for _ in 0..churn {
                    let k = rng.below(keys.len());
                    if k % 4 == 0 {
                        continue;
                    }
                    let g = handle.pin();
                    if rng.below(2) == 0 {
                        let _ = tree.insert_or_get(k, &g);
                    } else {
                        tree.remove(&keys[k], &g);
                    }
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
        let (tree, keys, stop, collector) = (&tree, &keys, &stop, &collector);
        s.spawn(move || {
            let handle = collector.register();
            while !stop.load(Ordering::Relaxed) {
                let g = handle.pin();
                for k in (0..keys.len()).step_by(4) {
                    assert_eq!(tree.get(&keys[k], &g), Some(k), "stable key {k} vanished");
                }
                let seen: Vec<usize> = tree.iter(&g).filter(|h| h % 4 == 0).collect();
                let want: Vec<usize> = (0..keys.len()).step_by(4).collect();
                let mut sorted = want.clone();
                sorted.sort_by(|&a, &b| keys[a].cmp(&keys[b]));
                assert_eq!(seen, sorted, "iteration lost or reordered a stable key");
            }
        });
    });
}
