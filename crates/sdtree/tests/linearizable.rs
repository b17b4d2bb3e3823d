//! Concurrent differential test: every operation's result is checked against a
//! linearizable history.
//!
//! Each run races a few threads, each running a short random sequence of operations on a
//! small key space (so the threads contend for the same keys and the same nodes). Every
//! operation takes a ticket from a global `SeqCst` counter just before it starts and
//! another just after it returns, so `a.ret < b.call` means `a` finished before `b` began
//! in real time. The checker then searches (Wing & Gong, with memoization) for a total
//! order of all operations that respects that real-time order and in which a sequential
//! model (`BTreeMap`) returns exactly the results the tree returned. A thread's own
//! operations are sequential, so a partial linearization is a prefix length per thread
//! plus the model's state; the search memoizes those pairs and is exhaustive.
//!
//! The number of runs is fixed (decided by correctness, not by time); the environment
//! variable `SDTREE_TEST_SCALE` (a percentage, default 100) scales it, for the slow
//! sanitizer runs of `.ci/sanitizers.sh`.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;

use sdtree::{Insert, SdMap, SdTree};

#[path = "common/workload.rs"]
mod workload;
use workload::{scaled, Rng};

/// One completed operation: what was asked, what came back, and its two tickets.
#[derive(Clone, Debug)]
struct Event<O, R> {
    op: O,
    res: R,
    call: u64,
    ret: u64,
}

/// A sequential specification: applying an operation to a state gives a result.
trait Spec: Clone + Eq + Hash + Debug {
    type Op: Clone + Debug;
    type Res: Clone + Debug + PartialEq;
    fn apply(&mut self, op: &Self::Op) -> Self::Res;
}

/// Whether `history` (one event list per thread, each in program order) is linearizable
/// with respect to `S` from `init`. Exhaustive search with memoization.
fn linearizable<S: Spec>(init: &S, history: &[Vec<Event<S::Op, S::Res>>]) -> bool {
    fn go<S: Spec>(
        state: &S,
        done: &mut Vec<usize>,
        history: &[Vec<Event<S::Op, S::Res>>],
        seen: &mut HashSet<(Vec<usize>, S)>,
    ) -> bool {
        if done.iter().zip(history).all(|(&d, h)| d == h.len()) {
            return true;
        }
        if !seen.insert((done.clone(), state.clone())) {
            return false;
        }
        // An operation may go next only if no pending operation returned before it was
        // called; each thread's first pending one has its thread's earliest return.
        let first_ret = done
            .iter()
            .zip(history)
            .filter_map(|(&d, h)| h.get(d).map(|e| e.ret))
            .min()
            .expect("some operation is pending");
        for t in 0..history.len() {
            let Some(e) = history[t].get(done[t]) else {
                continue;
            };
            if e.call > first_ret {
                continue;
            }
            let mut next = state.clone();
            if next.apply(&e.op) != e.res {
                continue;
            }
            done[t] += 1;
            let ok = go(&next, done, history, seen);
            done[t] -= 1;
            if ok {
                return true;
            }
        }
        false
    }
    let mut done = vec![0; history.len()];
    go(init, &mut done, history, &mut HashSet::new())
}

/// How many operations of `history` overlap in time with an operation of another
/// thread: the test asserts that the runs, taken together, were really concurrent.
fn overlapping<O, R>(history: &[Vec<Event<O, R>>]) -> usize {
    history
        .iter()
        .enumerate()
        .map(|(t, mine)| {
            mine.iter()
                .filter(|a| {
                    history.iter().enumerate().any(|(u, theirs)| {
                        u != t && theirs.iter().any(|b| a.call < b.ret && b.call < a.ret)
                    })
                })
                .count()
        })
        .sum()
}

/// Runs `ops[t]` on thread `t`, all released together, recording tickets.
fn record<T: Sync, O: Clone + Send + Sync, R: Send>(
    target: &T,
    ops: &[Vec<O>],
    run: impl Fn(&T, &O) -> R + Sync,
) -> Vec<Vec<Event<O, R>>> {
    let clock = AtomicU64::new(0);
    // A spinning start line: a blocking barrier wakes threads tens of microseconds apart,
    // longer than a whole run; spinning (yielding now and then, since there may be more
    // threads than cores) lines them up closely.
    let arrived = AtomicUsize::new(0);
    thread::scope(|s| {
        let handles: Vec<_> = ops
            .iter()
            .map(|mine| {
                let (clock, arrived, run) = (&clock, &arrived, &run);
                s.spawn(move || {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let mut spins = 0u32;
                    while arrived.load(Ordering::SeqCst) < ops.len() {
                        spins += 1;
                        if spins % 1024 == 0 {
                            thread::yield_now();
                        }
                        std::hint::spin_loop();
                    }
                    mine.iter()
                        .map(|op| {
                            let call = clock.fetch_add(1, Ordering::SeqCst);
                            let res = run(target, op);
                            let ret = clock.fetch_add(1, Ordering::SeqCst);
                            Event {
                                op: op.clone(),
                                res,
                                call,
                                ret,
                            }
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

// ----- SdTree over a handle table -----

/// Distinct keys sharing prefixes, one a prefix of another, lengths 0..=3.
const TREE_KEYS: [&[u8]; 5] = [b"", b"\x00", b"\x00\x01", b"\x80", b"\x80\xff\x00"];
/// Handles per key: handle `h` has key `TREE_KEYS[h % 5]`.
const COPIES: usize = 2;

#[derive(Clone, Debug)]
enum TreeOp {
    Insert(usize),
    Get(usize),
    Remove(usize),
    RemoveHandle(usize),
}

#[derive(Clone, Debug, PartialEq)]
enum TreeRes {
    Insert(Insert),
    Found(Option<usize>),
    Removed(bool),
}

/// The model: the handle stored under each key, if any.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TreeModel([Option<usize>; TREE_KEYS.len()]);

impl Spec for TreeModel {
    type Op = TreeOp;
    type Res = TreeRes;
    fn apply(&mut self, op: &TreeOp) -> TreeRes {
        let n = TREE_KEYS.len();
        match *op {
            TreeOp::Insert(h) => TreeRes::Insert(match self.0[h % n] {
                Some(p) => Insert::Present(p),
                None => {
                    self.0[h % n] = Some(h);
                    Insert::Inserted
                }
            }),
            TreeOp::Get(k) => TreeRes::Found(self.0[k]),
            TreeOp::Remove(k) => TreeRes::Found(self.0[k].take()),
            TreeOp::RemoveHandle(h) => TreeRes::Removed(if self.0[h % n] == Some(h) {
                self.0[h % n] = None;
                true
            } else {
                false
            }),
        }
    }
}

fn tree_op(rng: &mut Rng) -> TreeOp {
    let handles = TREE_KEYS.len() * COPIES;
    match rng.below(8) {
        0..=2 => TreeOp::Insert(rng.below(handles)),
        3 | 4 => TreeOp::Get(rng.below(TREE_KEYS.len())),
        5 | 6 => TreeOp::Remove(rng.below(TREE_KEYS.len())),
        _ => TreeOp::RemoveHandle(rng.below(handles)),
    }
}

fn run_tree_op(tree: &SdTree<Vec<&'static [u8]>>, op: &TreeOp) -> TreeRes {
    match *op {
        TreeOp::Insert(h) => TreeRes::Insert(tree.insert_or_get(h)),
        TreeOp::Get(k) => TreeRes::Found(tree.get(TREE_KEYS[k])),
        TreeOp::Remove(k) => TreeRes::Found(tree.remove(TREE_KEYS[k])),
        TreeOp::RemoveHandle(h) => TreeRes::Removed(tree.remove_handle(h)),
    }
}

/// The final contents must be some state the model can end in: the search's end state
/// is not unique, so check the tree against itself (lookups agree with iteration, in key
/// order) and that each key holds a handle with that key.
fn check_tree_contents(tree: &SdTree<Vec<&'static [u8]>>) {
    let all: Vec<usize> = tree.iter().collect();
    let keys: Vec<&[u8]> = all
        .iter()
        .map(|&h| TREE_KEYS[h % TREE_KEYS.len()])
        .collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "iteration: {all:?}");
    for &h in &all {
        assert_eq!(tree.get(TREE_KEYS[h % TREE_KEYS.len()]), Some(h));
    }
    assert_eq!(tree.len(), all.len());
}

#[test]
fn tree_histories_are_linearizable() {
    const THREADS: usize = 3;
    const OPS: usize = 24;
    let runs = scaled(3000);
    let table: Vec<&'static [u8]> = (0..TREE_KEYS.len() * COPIES)
        .map(|h| TREE_KEYS[h % TREE_KEYS.len()])
        .collect();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut concurrent = 0;
    for run in 0..runs {
        let tree = SdTree::new(table.clone());
        // A random starting state, so runs begin from different shapes.
        let mut init = TreeModel([None; TREE_KEYS.len()]);
        for _ in 0..rng.below(8) {
            let h = rng.below(table.len());
            let op = TreeOp::Insert(h);
            assert_eq!(run_tree_op(&tree, &op), init.apply(&op));
        }
        let ops: Vec<Vec<TreeOp>> = (0..THREADS)
            .map(|_| (0..OPS).map(|_| tree_op(&mut rng)).collect())
            .collect();
        let history = record(&tree, &ops, run_tree_op);
        concurrent += overlapping(&history);
        assert!(
            linearizable(&init, &history),
            "run {run}: not linearizable from {init:?}:\n{history:#?}"
        );
        check_tree_contents(&tree);
    }
    eprintln!(
        "tree: {runs} runs, {concurrent} of {} operations overlapped another thread's",
        runs * THREADS * OPS
    );
    assert!(concurrent > 0, "no two operations ever overlapped");
}

// ----- SdMap with owned keys and unique values -----

const MAP_KEYS: [&[u8]; 4] = [b"a", b"ab", b"b\x00", b"b\x00\x00\x00\x00\x00\x00\x00\x01"];

#[derive(Clone, Debug)]
enum MapOp {
    Insert(usize, u32),
    Get(usize),
    Remove(usize),
    /// `remove_if` with "the value is even".
    RemoveIfEven(usize),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MapModel([Option<u32>; MAP_KEYS.len()]);

impl Spec for MapModel {
    type Op = MapOp;
    type Res = Result<Option<u32>, Insert<u32>>;
    fn apply(&mut self, op: &MapOp) -> Self::Res {
        match *op {
            MapOp::Insert(k, v) => Err(match self.0[k] {
                Some(old) => Insert::Present(old),
                None => {
                    self.0[k] = Some(v);
                    Insert::Inserted
                }
            }),
            MapOp::Get(k) => Ok(self.0[k]),
            MapOp::Remove(k) => Ok(self.0[k].take()),
            MapOp::RemoveIfEven(k) => Ok(match self.0[k] {
                Some(v) if v % 2 == 0 => self.0[k].take(),
                _ => None,
            }),
        }
    }
}

fn run_map_op(map: &SdMap<Vec<u8>, u32>, op: &MapOp) -> Result<Option<u32>, Insert<u32>> {
    match *op {
        MapOp::Insert(k, v) => Err(map.insert_or_get(MAP_KEYS[k].to_vec(), v)),
        MapOp::Get(k) => Ok(map.get(MAP_KEYS[k])),
        MapOp::Remove(k) => Ok(map.remove(MAP_KEYS[k])),
        MapOp::RemoveIfEven(k) => Ok(map.remove_if(MAP_KEYS[k], |v| v % 2 == 0)),
    }
}

#[test]
fn map_histories_are_linearizable() {
    const THREADS: usize = 3;
    const OPS: usize = 24;
    let runs = scaled(2000);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut concurrent = 0;
    for run in 0..runs {
        let map: SdMap<Vec<u8>, u32> = SdMap::new();
        let mut init = MapModel([None; MAP_KEYS.len()]);
        // Values are unique across the run (thread, op index), so a wrong `Present` or
        // removed value names exactly which insert it came from.
        let mut next_value = 0u32;
        for _ in 0..rng.below(4) {
            let op = MapOp::Insert(rng.below(MAP_KEYS.len()), next_value);
            next_value += 1;
            assert_eq!(run_map_op(&map, &op), init.apply(&op));
        }
        let ops: Vec<Vec<MapOp>> = (0..THREADS)
            .map(|_| {
                (0..OPS)
                    .map(|_| {
                        let k = rng.below(MAP_KEYS.len());
                        match rng.below(7) {
                            0..=2 => {
                                next_value += 1;
                                MapOp::Insert(k, next_value)
                            }
                            3 => MapOp::Get(k),
                            4 | 5 => MapOp::Remove(k),
                            _ => MapOp::RemoveIfEven(k),
                        }
                    })
                    .collect()
            })
            .collect();
        let history = record(&map, &ops, run_map_op);
        concurrent += overlapping(&history);
        assert!(
            linearizable(&init, &history),
            "run {run}: not linearizable from {init:?}:\n{history:#?}"
        );
        let mut got = BTreeMap::new();
        map.for_each(|k, v| {
            got.insert(k.clone(), *v);
        });
        assert_eq!(got.len(), map.len());
        for (k, v) in &got {
            assert_eq!(map.get(k), Some(*v));
        }
    }
    eprintln!(
        "map: {runs} runs, {concurrent} of {} operations overlapped another thread's",
        runs * THREADS * OPS
    );
    assert!(concurrent > 0, "no two operations ever overlapped");
}

/// The checker itself must reject a history no order explains: a `get` that saw a value
/// after its only remove had returned, and one that saw it before it was inserted.
#[test]
fn checker_rejects_non_linearizable_histories() {
    let ev = |op, res, call, ret| Event { op, res, call, ret };
    let init = MapModel([None; MAP_KEYS.len()]);
    // Thread 0: insert(0, 7) [0,1], remove(0) -> 7 [2,3]; thread 1: get(0) -> 7 [4,5].
    let stale = vec![
        vec![
            ev(MapOp::Insert(0, 7), Err(Insert::Inserted), 0, 1),
            ev(MapOp::Remove(0), Ok(Some(7)), 2, 3),
        ],
        vec![ev(MapOp::Get(0), Ok(Some(7)), 4, 5)],
    ];
    assert!(!linearizable(&init, &stale));
    // The same get overlapping the remove is fine.
    let overlapping = vec![stale[0].clone(), vec![ev(MapOp::Get(0), Ok(Some(7)), 2, 5)]];
    assert!(linearizable(&init, &overlapping));
    // A get that returned before the insert was called cannot see its value.
    let early = vec![
        vec![ev(MapOp::Insert(0, 7), Err(Insert::Inserted), 2, 3)],
        vec![ev(MapOp::Get(0), Ok(Some(7)), 0, 1)],
    ];
    assert!(!linearizable(&init, &early));
}
