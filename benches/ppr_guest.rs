//! The PPR guest hooks: one `on_free` + `on_alloc` pair (the page is offered, then the
//! offer withdrawn: the common path, with no host racing), per thread, with 1 and 2
//! threads, side by side with the 2017 scheme (one global `fetch_add` cursor taken
//! modulo the slot count, shared by every vCPU).
//!
//! ```text
//! cargo bench --bench ppr_guest
//! ```
//!
//! Ids are `free_alloc/SCHEME/tTHREADS`: `pip_own_shard` (each thread on its own shard:
//! how a guest runs it), `pip_one_shard` (both threads on one shard: cursor and slot
//! lines shared), `scheme2017` (the original's global cursor). The time reported is the
//! wall time of one pair on each thread, all threads running at once. Each thread cycles
//! over 64 pages of its own.
//!
//! `cargo test --benches` runs each once, as a check.

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pip::{Alloc, Free, HostPool, MarkWords, PoolStorage, PoolView};
use ppr_guest::{Hooks, SimPage};

const PAGES_PER_THREAD: usize = 64;
const FIRST: u64 = 0x1000;

/// A guest's hooks: one pair on page `i` of thread `t`.
trait Scheme: Sync {
    fn pair(&self, cpu: usize, frame: u64, page: &SimPage);
}

/// pip through ppr-guest's hooks; `cpu` picks the shard.
struct Pip<'a>(Hooks<'a>);

impl Scheme for Pip<'_> {
    #[inline]
    fn pair(&self, cpu: usize, frame: u64, page: &SimPage) {
        let f = self.0.on_free(cpu, frame, page);
        debug_assert!(matches!(f, Some(Free::Offered(_))));
        let a = self.0.on_alloc(cpu, frame, page);
        debug_assert_eq!(a, Alloc::Cancelled);
        black_box((f, a));
    }
}

/// The 2017 scheme: a global `alloc_idx` every vCPU `fetch_add`s, taken modulo the slot
/// count; the mark is (indicator, pool id, slot); on allocation, a matching mark whose
/// slot holds the frame is withdrawn by CAS and the mark zeroed.
struct Scheme2017 {
    alloc_idx: AtomicU64,
    desc: Vec<AtomicU64>,
    pool_id: u64,
}

const INDICATOR_2017: u64 = 0xABCD_EF00_AABB_CC55;

impl Scheme2017 {
    fn new(slots: usize) -> Self {
        Scheme2017 {
            alloc_idx: AtomicU64::new(0),
            desc: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            pool_id: 1,
        }
    }
}

impl Scheme for Scheme2017 {
    #[inline]
    fn pair(&self, _cpu: usize, frame: u64, page: &SimPage) {
        // Free: one global fetch_add, modulo, one CAS, three mark words (indicator last).
        let max = self.desc.len() as u64;
        let i = self.alloc_idx.fetch_add(1, Ordering::Relaxed) % max;
        let slot = &self.desc[i as usize];
        if slot.load(Ordering::Relaxed) == 0
            && slot
                .compare_exchange(0, frame, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            page.store(1, self.pool_id);
            MarkWords::store(page, 2, i);
        } else {
            page.store(1, self.pool_id + 1000);
            MarkWords::store(page, 2, max + 1);
        }
        page.store(0, INDICATOR_2017);
        // Alloc: check the mark, withdraw by CAS, zero the mark.
        if page.load(0) == INDICATOR_2017 && page.load(1) == self.pool_id {
            let i = page.load(2);
            if let Some(slot) = self.desc.get(i as usize) {
                let won = slot
                    .compare_exchange(frame, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok();
                black_box(won);
            }
        }
        for w in 0..3 {
            page.store(w, 0);
        }
    }
}

/// Runs `iters` pairs on each of `threads` threads at once; returns the slowest thread's
/// time.
fn run<S: Scheme>(
    scheme: &S,
    pages: &[SimPage],
    threads: usize,
    cpus: &[usize],
    iters: u64,
) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, cpu) = (&barrier, cpus[t]);
                let mine = &pages[t * PAGES_PER_THREAD..(t + 1) * PAGES_PER_THREAD];
                s.spawn(move || {
                    let base = FIRST + (t * PAGES_PER_THREAD) as u64;
                    barrier.wait();
                    let start = Instant::now();
                    let mut i = 0;
                    for _ in 0..iters {
                        scheme.pair(cpu, base + i as u64, &mine[i]);
                        i += 1;
                        if i == PAGES_PER_THREAD {
                            i = 0;
                        }
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn registered(view: PoolView<'_>) -> Hooks<'_> {
    HostPool::register(view, 1, 0x243F_6A88_85A3_08D3, 1 << 40).unwrap();
    Hooks::attach(view).unwrap()
}

fn bench(c: &mut Criterion) {
    let pages: Vec<SimPage> = (0..2 * PAGES_PER_THREAD).map(|_| SimPage::new()).collect();
    // 2 shards of 1024 slots, and 1 shard of 2048.
    let two = Box::new(PoolStorage::<2, 2048>::new());
    let one = Box::new(PoolStorage::<1, 2048>::new());
    let own = Pip(registered(two.init().unwrap()));
    let shared = Pip(registered(one.init().unwrap()));
    let orig = Scheme2017::new(2048);

    let mut g = c.benchmark_group("free_alloc");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    for threads in [1, 2] {
        g.bench_function(format!("pip_own_shard/t{threads}"), |b| {
            b.iter_custom(|iters| run(&own, &pages, threads, &[0, 1], iters))
        });
        if threads > 1 {
            g.bench_function(format!("pip_one_shard/t{threads}"), |b| {
                b.iter_custom(|iters| run(&shared, &pages, threads, &[0, 0], iters))
            });
        }
        g.bench_function(format!("scheme2017/t{threads}"), |b| {
            b.iter_custom(|iters| run(&orig, &pages, threads, &[0, 1], iters))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
