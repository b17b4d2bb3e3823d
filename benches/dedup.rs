//! PageONE against the KSM-faithful baseline, on the same simulated memory, in one run.
//!
//! The seeds' experiment scaled down: 12 "VMs", two thirds of all pages duplicated across
//! VMs (every content three times, in three different VMs), data sets "random" and
//! "zero-prefix" (each page starts with a random run of zero bytes, 128 on average).
//! Each sample deduplicates the memory from scratch until every duplicate is merged:
//! - `dedup_cpu/*`: the CPU time this took (all threads of the process), so criterion's
//!   throughput is **pages merged per CPU-second**;
//! - `dedup_wall/*`: the wall time (time to converge), throughput **pages merged per
//!   second**.
//!
//! Sizes: `DEDUP_BENCH=full` runs 12 × 64 MiB (196,608 pages); the default (quick) runs
//! 12 × 16 MiB. Run with `cargo bench --bench dedup`.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ksm_baseline::{Ksm, KsmConfig};
use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, PAGE_SIZE};
use pageone::{Config, PageOne};

const VMS: u32 = 12;

/// Process CPU time (all threads).
fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[path = "support/dedup_data.rs"]
mod dedup_data;
use dedup_data::DataSet;

/// A memory of `VMS` regions of `per_vm` pages; slot `s` holds content `s % (total / 3)`,
/// so each content lands in three different VMs.
fn memory(set: DataSet, per_vm: u32) -> (Arc<SimMemory>, u64) {
    let mem = Arc::new(SimMemory::new());
    let total = (VMS * per_vm) as u64;
    let distinct = total / 3;
    let contents: Vec<Vec<u8>> = (0..distinct)
        .map(|c| {
            let mut p = vec![0u8; PAGE_SIZE];
            set.fill(c, &mut p);
            p
        })
        .collect();
    for v in 0..VMS {
        let r = mem.add_region(per_vm, DomainId(0));
        for i in 0..per_vm {
            let s = (v * per_vm + i) as u64;
            mem.write(PageId::new(r, i), 0, &contents[(s % distinct) as usize])
                .expect("fill");
        }
    }
    (mem, total - distinct)
}

/// What one deduplication run measured.
struct Run {
    cpu: Duration,
    wall: Duration,
}

fn run_pageone(mem: &Arc<SimMemory>, threads: usize, expected: u64) -> Run {
    let engine = PageOne::new(mem.clone(), Config::default().work_threads(threads))
        .expect("starting PageONE's work threads");
    let (cpu0, wall0) = (cpu_now(), Instant::now());
    for _ in 0..10 {
        engine.merge_pass();
        if engine.stats().pages_sharing >= expected {
            break;
        }
    }
    let run = Run {
        cpu: cpu_now() - cpu0,
        wall: wall0.elapsed(),
    };
    assert_eq!(
        engine.stats().pages_sharing,
        expected,
        "PageONE did not converge"
    );
    engine.unmerge_all();
    engine.collect_garbage();
    run
}

fn run_ksm(mem: &Arc<SimMemory>, expected: u64) -> Run {
    let mut ksm = Ksm::new(mem.clone(), KsmConfig::default().smart_scan(false));
    let (cpu0, wall0) = (cpu_now(), Instant::now());
    while ksm.stats().pages_sharing < expected && ksm.stats().full_scans < 10 {
        ksm.scan(4096);
    }
    let run = Run {
        cpu: cpu_now() - cpu0,
        wall: wall0.elapsed(),
    };
    assert_eq!(
        ksm.stats().pages_sharing,
        expected,
        "the baseline did not converge"
    );
    ksm.unmerge_all();
    run
}

#[derive(Clone, Copy)]
enum Engine {
    Ksm,
    PageOne(usize),
}

impl Engine {
    fn name(self) -> String {
        match self {
            Engine::Ksm => "ksm-baseline".into(),
            Engine::PageOne(t) => format!("pageone-{t}t"),
        }
    }

    fn run(self, mem: &Arc<SimMemory>, expected: u64) -> Run {
        match self {
            Engine::Ksm => run_ksm(mem, expected),
            Engine::PageOne(t) => run_pageone(mem, t, expected),
        }
    }
}

fn bench(c: &mut Criterion) {
    let full = std::env::var("DEDUP_BENCH").is_ok_and(|v| v == "full");
    // 64 MiB or 16 MiB per VM.
    let per_vm: u32 = if full { 16384 } else { 4096 };
    for set in [DataSet::Random, DataSet::ZeroPrefix] {
        let (mem, expected) = memory(set, per_vm);
        for (group, use_cpu) in [("dedup_cpu", true), ("dedup_wall", false)] {
            let mut g = c.benchmark_group(format!("{group}/{}", set.name()));
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(if full { 30 } else { 8 }))
                .throughput(Throughput::Elements(expected));
            for engine in [Engine::Ksm, Engine::PageOne(1), Engine::PageOne(2)] {
                g.bench_function(BenchmarkId::from_parameter(engine.name()), |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                let r = engine.run(&mem, expected);
                                if use_cpu {
                                    r.cpu
                                } else {
                                    r.wall
                                }
                            })
                            .sum()
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
