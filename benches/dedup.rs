//! PageONE against the KSM-faithful baseline, on the same simulated memory, in one run.
//!
//! The seeds' experiment scaled down: 12 "VMs", two thirds of all pages duplicated across
//! VMs (every content three times, in three different VMs), data sets "random" and
//! "zero-prefix" (each page starts with a random run of zero bytes, 128 on average); and
//! the data set "real": the memory of real processes, several started from each of the
//! same programs, captured at the start of the run (`benches/support/real_memory.rs`),
//! one region per process.
//! Each sample deduplicates the memory from scratch until every duplicate is merged:
//! - `dedup_cpu/*`: the CPU time this took (all threads of the process), so criterion's
//!   throughput is **pages merged per CPU-second**;
//! - `dedup_wall/*`: the wall time (time to converge), throughput **pages merged per
//!   second**.
//!
//! Sizes: `DEDUP_BENCH=full` runs 12 × 64 MiB (196,608 pages); the default (quick) runs
//! 12 × 16 MiB. The real set's size: `DEDUP_REAL_GROUPS` groups of processes (default 6),
//! `DEDUP_REAL_MIB` MiB of text read by each worker process (default 8), about 180 MiB
//! in all; `DEDUP_REAL_CACHE=1` reuses the capture saved under `target/real-memory/` for
//! the same two numbers, or saves this one there (shared with `ksm_vs_pageone
//! --real-cache`). `DEDUP_BENCH_SETS` picks data sets (a list; the default is
//! `random,zero-prefix,real`). Run with `cargo bench --bench dedup`.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use ksm_baseline::{Ksm, KsmConfig};
use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, PAGE_SIZE};
use pageone::{Config, PageOne};

const VMS: usize = 12;

/// Process CPU time (all threads).
fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[path = "support/dedup_data.rs"]
mod dedup_data;
use dedup_data::real_memory::{self, CaptureConfig};
use dedup_data::{DataSet, Workload};

/// `workload` in simulated memory: one region per region of the workload.
fn memory(workload: &Workload) -> Arc<SimMemory> {
    let mem = Arc::new(SimMemory::new());
    let mut page = vec![0u8; PAGE_SIZE];
    for (r, &pages) in workload.regions.iter().enumerate() {
        let region = mem.add_region(pages as u32, DomainId(0));
        for i in 0..pages {
            workload.fill(r, i, &mut page);
            mem.write(PageId::new(region, i as u32), 0, &page)
                .expect("fill");
        }
    }
    mem
}

/// What one deduplication run measured.
struct Run {
    cpu: Duration,
    wall: Duration,
}

/// Merge passes until `pages_sharing` and `zero_pages` reach `expected`, or a pass is
/// quiet, or 10 passes.
fn run_pageone(mem: &Arc<SimMemory>, threads: usize, expected: (u64, u64)) -> Run {
    let engine = PageOne::new(mem.clone(), Config::default().work_threads(threads))
        .expect("starting PageONE's work threads");
    let reached = || {
        let s = engine.stats();
        (s.pages_sharing, s.zero_pages)
    };
    let (cpu0, wall0) = (cpu_now(), Instant::now());
    for _ in 0..10 {
        let quiet = engine.merge_pass().quiet();
        if quiet || reached() == expected {
            break;
        }
    }
    let run = Run {
        cpu: cpu_now() - cpu0,
        wall: wall0.elapsed(),
    };
    assert_eq!(reached(), expected, "PageONE did not converge");
    engine.unmerge_all();
    engine.collect_garbage();
    run
}

/// Scans until `pages_sharing` reaches `expected`, or 10 full scans.
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

    fn run(self, mem: &Arc<SimMemory>, workload: &Workload) -> Run {
        match self {
            Engine::Ksm => run_ksm(mem, workload.ksm_expected()),
            Engine::PageOne(t) => run_pageone(mem, t, workload.pageone_expected()),
        }
    }
}

fn bench(c: &mut Criterion) {
    let full = std::env::var("DEDUP_BENCH").is_ok_and(|v| v == "full");
    // 64 MiB or 16 MiB per VM.
    let per_vm = if full { 16384 } else { 4096 };
    let sets: Vec<DataSet> = match std::env::var("DEDUP_BENCH_SETS") {
        Ok(v) => v
            .split(',')
            .map(|s| DataSet::parse(s).unwrap_or_else(|| panic!("unknown data set {s}")))
            .collect(),
        Err(_) => vec![DataSet::Random, DataSet::ZeroPrefix, DataSet::Real],
    };
    for set in sets {
        let workload = match set {
            DataSet::Real => match Workload::real(CaptureConfig::from_env()) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("dedup: no real-memory data set here ({e}); skipping it");
                    continue;
                }
            },
            _ => Workload::synthetic(set, VMS, per_vm),
        };
        eprintln!(
            "dedup/{}: {} ({} pages)",
            set.name(),
            workload.description,
            workload.total_pages()
        );
        let mem = memory(&workload);
        // Throughput: the duplicates (every page beyond the first of its content, pages
        // of zeros one content), what both engines free but for `max_page_sharing`.
        let duplicates =
            workload.census.pages - workload.census.distinct - u64::from(workload.census.zero > 0);
        for (group, use_cpu) in [("dedup_cpu", true), ("dedup_wall", false)] {
            let mut g = c.benchmark_group(format!("{group}/{}", set.name()));
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(if full { 30 } else { 8 }))
                .throughput(Throughput::Elements(duplicates));
            for engine in [Engine::Ksm, Engine::PageOne(1), Engine::PageOne(2)] {
                g.bench_function(BenchmarkId::from_parameter(engine.name()), |b| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                let r = engine.run(&mem, &workload);
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

// criterion_main!, after a check for the real set's worker mode: the capture starts this
// executable again as its worker processes.
fn main() {
    real_memory::worker_main();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
