//! The SD tree against KSM's red-black tree and the maps users would pick instead, on
//! 4 KiB pages held in one arena (issue 3). See `docs/benchmarks.md` for what each
//! benchmark does and the results.
//!
//! ```text
//! cargo bench --bench sdtree                      # quick: 10k and 100k keys, ~10 min on 2 cores
//! SDTREE_BENCH=full cargo bench --bench sdtree    # full: 10k, 100k and 1M keys
//! ```
//!
//! Environment (each optional; lists are comma-separated):
//! - `SDTREE_BENCH`: `quick` (default) or `full`;
//! - `SDTREE_BENCH_SIZES`: stored keys, e.g. `10k,100k,1M`;
//! - `SDTREE_BENCH_THREADS`: thread counts, e.g. `1,2,4,8,16` (default `1,2`);
//! - `SDTREE_BENCH_DATA`: data sets by number, e.g. `1,2,3` (default all four);
//! - `SDTREE_BENCH_OPS`: any of `lookup_hit,lookup_miss,insert_or_get,remove`;
//! - `SDTREE_BENCH_STRUCTS`: any of `sdtree,rbtree_ksm,btreemap_rwlock,skipmap,scc_treeindex,papaya_xxh3`.
//!
//! Only one arena is alive at a time (the 1M arena is about 5.3 GB). Benchmark ids are
//! `OP/DATASET/SIZE/STRUCTURE/tTHREADS`; criterion's own filter argument also works,
//! but the arena of each (data set, size) is generated either way.
//!
//! `cargo test --benches` (criterion's test mode) runs every benchmark once on 3,000 keys,
//! which checks every structure's answers.

#[path = "common/mod.rs"]
mod common;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{build, DataSet, Layout, PageSet, STRUCTURES};
use criterion::{BenchmarkId, Criterion, Throughput};

const OPS: [&str; 4] = ["lookup_hit", "lookup_miss", "insert_or_get", "remove"];

struct Config {
    sizes: Vec<usize>,
    threads: Vec<usize>,
    datasets: Vec<DataSet>,
    ops: Vec<&'static str>,
    structs: Vec<&'static str>,
    /// Hit and miss probes checked when a structure is built.
    check: usize,
}

fn env_list(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok()?;
    let items: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    (!items.is_empty()).then_some(items)
}

fn parse_size(s: &str) -> usize {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1_000),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .unwrap_or_else(|_| panic!("SDTREE_BENCH_SIZES: bad size {s:?}"))
        * mul
}

fn size_label(n: usize) -> String {
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n % 1_000 == 0 {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

fn pick<'a>(name: &str, all: &[&'a str], items: Vec<String>) -> Vec<&'a str> {
    items
        .iter()
        .map(|i| {
            *all.iter()
                .find(|a| **a == i.as_str())
                .unwrap_or_else(|| panic!("{name}: unknown {i:?}; known: {all:?}"))
        })
        .collect()
}

impl Config {
    /// The configuration and the criterion settings that go with it.
    fn from_env(test_mode: bool) -> (Config, Criterion) {
        let full = std::env::var("SDTREE_BENCH").is_ok_and(|v| v == "full");
        let mut cfg = Config {
            sizes: if full {
                vec![10_000, 100_000, 1_000_000]
            } else {
                vec![10_000, 100_000]
            },
            threads: vec![1, 2],
            datasets: DataSet::ALL.to_vec(),
            ops: OPS.to_vec(),
            structs: STRUCTURES.to_vec(),
            check: 1_000,
        };
        if let Some(v) = env_list("SDTREE_BENCH_SIZES") {
            cfg.sizes = v.iter().map(|s| parse_size(s)).collect();
        }
        if let Some(v) = env_list("SDTREE_BENCH_THREADS") {
            cfg.threads = v
                .iter()
                .map(|s| s.parse().expect("SDTREE_BENCH_THREADS: a number"))
                .collect();
        }
        if let Some(v) = env_list("SDTREE_BENCH_DATA") {
            cfg.datasets = v
                .iter()
                .map(|s| {
                    let k: usize = s.parse().expect("SDTREE_BENCH_DATA: 1 to 4");
                    DataSet::ALL[k.checked_sub(1).expect("SDTREE_BENCH_DATA: 1 to 4")]
                })
                .collect();
        }
        if let Some(v) = env_list("SDTREE_BENCH_OPS") {
            cfg.ops = pick("SDTREE_BENCH_OPS", &OPS, v);
        }
        if let Some(v) = env_list("SDTREE_BENCH_STRUCTS") {
            cfg.structs = pick("SDTREE_BENCH_STRUCTS", &STRUCTURES, v);
        }
        if test_mode {
            // Every benchmark runs once: small keys count, every probe checked.
            cfg.sizes = vec![3_000];
            cfg.check = usize::MAX;
        }
        let c = if full {
            Criterion::default()
                .sample_size(20)
                .warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(3))
                .with_plots()
        } else {
            Criterion::default()
                .sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_millis(800))
                .without_plots()
        };
        (cfg, c)
    }
}

/// Runs ops `start..start + n` (indices taken modulo `modulo`) split into `threads`
/// contiguous parts, one per thread, all released together. Returns the wall time from
/// the release until the last thread finished, and how many ops returned `true`.
fn timed<F: Fn(usize) -> bool + Sync>(
    threads: usize,
    start: usize,
    n: usize,
    modulo: usize,
    f: &F,
) -> (Duration, usize) {
    let run = |lo: usize, hi: usize| {
        let mut j = lo % modulo;
        let mut ok = 0;
        for _ in lo..hi {
            ok += f(j) as usize;
            j += 1;
            if j == modulo {
                j = 0;
            }
        }
        ok
    };
    if threads == 1 {
        let t0 = Instant::now();
        let ok = run(start, start + n);
        return (t0.elapsed(), ok);
    }
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (lo, hi) = (start + n * t / threads, start + n * (t + 1) / threads);
                let (barrier, run) = (&barrier, &run);
                s.spawn(move || {
                    barrier.wait();
                    run(lo, hi)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let ok = workers
            .into_iter()
            .map(|w| w.join().expect("benchmark thread panicked"))
            .sum();
        (t0.elapsed(), ok)
    })
}

/// The fixed-seed op sequences of one (data set, size) run, as arena page indices.
struct Orders {
    /// Hit probes, shuffled.
    hit: Vec<usize>,
    /// Miss probes, shuffled.
    miss: Vec<usize>,
    /// The insert stream: each fresh page once, and twice as many copies of stored keys
    /// (2/3 duplicates), shuffled.
    insert: Vec<usize>,
    /// The stored keys, shuffled; removed `x` at a time.
    remove: Vec<usize>,
}

impl Orders {
    fn new(l: Layout, ds: DataSet) -> Orders {
        let mut rng = fastrand::Rng::with_seed(0x0bde_5000 + ds.number() as u64);
        let mut hit: Vec<usize> = (l.hits()..l.hits() + l.h).collect();
        let mut miss: Vec<usize> = (l.misses()..l.misses() + l.h).collect();
        let mut insert: Vec<usize> = (l.fresh()..l.fresh() + l.x).collect();
        insert.extend((0..2 * l.x).map(|_| l.hits() + rng.usize(0..l.h)));
        let mut remove: Vec<usize> = (0..l.n).collect();
        rng.shuffle(&mut hit);
        rng.shuffle(&mut miss);
        rng.shuffle(&mut insert);
        rng.shuffle(&mut remove);
        Orders {
            hit,
            miss,
            insert,
            remove,
        }
    }
}

/// One (data set, size): generates the arena, builds every structure over it, runs every
/// op, then drops them all before the next arena is made.
fn run_dataset(c: &mut Criterion, cfg: &Config, ds: DataSet, n: usize) {
    let layout = Layout::new(n);
    let t0 = Instant::now();
    let arena = layout.arena(ds);
    let orders = Orders::new(layout, ds);
    eprintln!(
        "{} {}: {} pages ({:.2} GB) generated in {:.1?}",
        ds.label(),
        size_label(n),
        arena.len(),
        (arena.len() * common::PAGE) as f64 / 1e9,
        t0.elapsed()
    );
    let t0 = Instant::now();
    // Build every structure at once, one thread each.
    let sets: Vec<(&str, Box<dyn PageSet + '_>)> = std::thread::scope(|s| {
        let arena = &arena;
        let handles: Vec<_> = cfg
            .structs
            .iter()
            .map(|&name| s.spawn(move || (name, build(name, arena, layout, cfg.check))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("building a structure panicked"))
            .collect()
    });
    eprintln!(
        "  {} structures built and checked in {:.1?}",
        sets.len(),
        t0.elapsed()
    );
    if cfg.check == usize::MAX {
        // Test mode: one whole insert pass and one whole remove window on two threads,
        // each followed by its reset, as the timed loops would do them.
        for (_, s) in &sets {
            let s: &dyn PageSet = &**s;
            let ins = |j: usize| s.insert_or_get(orders.insert[j]).is_none();
            assert_eq!(
                timed(2, 0, orders.insert.len(), orders.insert.len(), &ins).1,
                layout.x
            );
            for p in layout.fresh()..layout.fresh() + layout.x {
                assert!(s.remove(p));
            }
            let keys = &orders.remove[..layout.x];
            assert_eq!(
                timed(2, 0, keys.len(), keys.len(), &|j: usize| s.remove(keys[j])).1,
                layout.x
            );
            assert_eq!(
                timed(2, 0, keys.len(), keys.len(), &|j: usize| s
                    .get(keys[j])
                    .is_some())
                .1,
                0
            );
            for &k in keys {
                assert_eq!(s.insert_or_get(k), None);
            }
        }
    }

    for &op in &cfg.ops {
        let mut g = c.benchmark_group(format!("{op}/{}/{}", ds.label(), size_label(n)));
        g.throughput(Throughput::Elements(1));
        for (name, s) in &sets {
            let s: &dyn PageSet = &**s;
            for &threads in &cfg.threads {
                let id = BenchmarkId::new(*name, format!("t{threads}"));
                match op {
                    "lookup_hit" | "lookup_miss" => {
                        let (order, hit) = if op == "lookup_hit" {
                            (&orders.hit, true)
                        } else {
                            (&orders.miss, false)
                        };
                        let mut pos = 0;
                        g.bench_function(id, |b| {
                            b.iter_custom(|iters| {
                                let n = iters as usize;
                                let f = |j: usize| s.get(order[j]).is_some();
                                let (d, found) = timed(threads, pos, n, order.len(), &f);
                                assert_eq!(found, if hit { n } else { 0 }, "{name}: {op}");
                                pos = (pos + n) % order.len();
                                d
                            })
                        });
                    }
                    "insert_or_get" => bench_insert(&mut g, id, s, &orders, layout, threads),
                    "remove" => bench_remove(&mut g, id, s, &orders, layout, threads),
                    _ => unreachable!(),
                }
            }
        }
        g.finish();
    }
    drop(sets);
    drop(arena);
}

type Group<'c> = criterion::BenchmarkGroup<'c, criterion::measurement::WallTime>;

/// `insert_or_get` over the stream of `orders.insert` on a tree holding the `n` keys.
///
/// The stream holds `x = n/10` fresh pages and `2x` copies of stored keys; after each
/// pass (the tree has grown to `1.1 n`) the fresh pages are removed again, untimed.
fn bench_insert(
    g: &mut Group<'_>,
    id: BenchmarkId,
    s: &dyn PageSet,
    o: &Orders,
    l: Layout,
    threads: usize,
) {
    let stream = &o.insert;
    let reset = || {
        for p in l.fresh()..l.fresh() + l.x {
            assert!(s.remove(p), "fresh page {p} was not inserted");
        }
    };
    let (mut pos, mut inserted) = (0, 0);
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut left = iters as usize;
            let mut total = Duration::ZERO;
            while left > 0 {
                let n = left.min(stream.len() - pos);
                let f = |j: usize| s.insert_or_get(stream[j]).is_none();
                let (d, ok) = timed(threads, pos, n, stream.len(), &f);
                total += d;
                inserted += ok;
                pos += n;
                left -= n;
                if pos == stream.len() {
                    assert_eq!(inserted, l.x, "insert_or_get: inserted count of one pass");
                    reset();
                    (pos, inserted) = (0, 0);
                }
            }
            total
        })
    });
    // Back to the n keys for the next benchmark.
    for p in l.fresh()..l.fresh() + l.x {
        s.remove(p);
    }
}

/// `remove` of stored keys, `x = n/10` per window; after each window the removed keys
/// are inserted again, untimed, and the next window of the shuffled keys is used.
fn bench_remove(
    g: &mut Group<'_>,
    id: BenchmarkId,
    s: &dyn PageSet,
    o: &Orders,
    l: Layout,
    threads: usize,
) {
    let windows = (l.n / l.x).max(1);
    let (mut window, mut pos) = (0, 0);
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut left = iters as usize;
            let mut total = Duration::ZERO;
            while left > 0 {
                let keys = &o.remove[window * l.x..(window + 1) * l.x];
                let n = left.min(keys.len() - pos);
                let f = |j: usize| s.remove(keys[j]);
                let (d, ok) = timed(threads, pos, n, keys.len(), &f);
                assert_eq!(ok, n, "remove: every key is present");
                total += d;
                pos += n;
                left -= n;
                if pos == keys.len() {
                    for &k in keys {
                        assert_eq!(s.insert_or_get(k), None, "re-insert after remove");
                    }
                    window = (window + 1) % windows;
                    pos = 0;
                }
            }
            total
        })
    });
    for &k in &o.remove[window * l.x..window * l.x + pos] {
        assert_eq!(s.insert_or_get(k), None, "re-insert after remove");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |a: &str| args.iter().any(|x| x == a);
    // Criterion's rule: without `--bench` (cargo test), or with `--test`, run once.
    let test_mode = !has("--bench") || has("--test");
    let (cfg, c) = Config::from_env(test_mode);
    let mut c = c.configure_from_args();
    for &n in &cfg.sizes {
        for &ds in &cfg.datasets {
            run_dataset(&mut c, &cfg, ds, n);
        }
    }
    c.final_summary();
}
