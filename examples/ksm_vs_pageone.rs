//! PageONE side by side with real Linux KSM, on real anonymous memory of this process.
//!
//! The seeds' experiment scaled to one machine: `--vms` regions ("VMs") of `--mib` MiB each
//! (default 12 × 128 MiB), two thirds of all pages duplicates (every content three times,
//! in three different VMs, page for page as VMs booted from one image), data sets
//! `random` and `zero-prefix` (each page starts with a random run of 0–256 zero bytes);
//! and the data set `real` (`--sets real`): the memory of real processes, `--real-groups`
//! groups (default 6) of a worker (this executable started again, which reads
//! `--real-mib` MiB of text files and indexes them, default 8), `sh`, `cat` and `sleep`,
//! captured through `/proc/<pid>/mem` (`benches/support/real_memory.rs`), laid out one
//! region per captured process (the `--vms` and `--mib` of the synthetic sets do not
//! apply to it). `--capture-only` captures the real set, prints what it holds and exits
//! (no root needed). `--real-cache` (or `DEDUP_REAL_CACHE=1`, which `cargo bench --bench
//! dedup` reads too) reuses the capture saved under `target/real-memory/` for the same
//! `--real-groups` and `--real-mib`, or saves this one there.
//! Each data set is deduplicated from scratch three ways:
//! - **KSM**: the regions get `MADV_MERGEABLE`; ksmd runs with `pages_to_scan` large,
//!   `sleep_millisecs=0`, `smart_scan=0`, advisor off, `use_zero_pages=0`,
//!   `max_page_sharing=256`; we wait until `pages_sharing` reaches the number of pages
//!   full merging gives (every page beyond the first of its content, pages of zeros
//!   included, less one more KSM page per 256 copies; polled every 5 ms), take ksmd's CPU
//!   time from `/proc/<ksmd>/schedstat` (plus our `madvise` calls), then unmerge
//!   (`run=2`) and restore every knob as it was;
//! - **PageONE** with 1 and with 2 work threads, on `page_memory::linux::LinuxMemory`
//!   (userfaultfd write-protect, memfd canonical store), merge passes back to back until
//!   every duplicate is merged (`pages_sharing` of the non-zero contents, counted the
//!   same way, and `zero_pages`: every page of zeros, as they map the zero frame) or a pass
//!   is quiet; CPU time is the whole process's (work threads, fault thread, kernel time in
//!   their system calls).
//!
//! Memory is measured, not counted: KSM's is the `Pss` of the regions' mappings in
//! `/proc/self/smaps` (a KSM page mapped by three guest pages counts once); PageONE's is
//! the regions' `Anonymous` memory plus the canonical store's allocated blocks (what
//! `LinuxUsage::total_bytes` reads). Both start from the same filled memory.
//!
//! Needs root (KSM's sysfs knobs; PageONE's userfaultfd for kernel faults) and no other
//! KSM user: it says so and exits 0 without them (and stops with exit status 2 if another
//! KSM user appears between its runs). Run with
//! `cargo run --release --features linux --example ksm_vs_pageone -- [--mib 128] [--vms 12]
//! [--sets random,zero-prefix,real] [--engines ksm,pageone-1t,pageone-2t]
//! [--pages-to-scan N] [--reps 3] [--run-pages 64] [--real-groups 6] [--real-mib 8]
//! [--real-cache] [--capture-only]` (the data sets are all three by default). Engines are
//! `ksm` and `pageone-<N>t` (N work threads), or `pageone-<N>t-copy` for PageONE making
//! every stable page canonical at once (`Config::unique_in_place` off, as before unique
//! pages were indexed in place), with `-eager` appended for PageONE protecting volatile
//! pages at once (`Config::unchanged_before_protect` off). `--run-pages 1` makes the
//! Linux backend remap page by page (`LinuxConfig::max_run_pages`), as it did before
//! batches. Each figure in the table is the median of the repetitions (which interleave
//! the engines).

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_memory::linux::test_util::ksm;
use page_memory::linux::{LinuxConfig, LinuxMemory};
use page_memory::{DomainId, PAGE_SIZE};
use pageone::{Config, PageOne};

#[path = "../benches/support/dedup_data.rs"]
mod dedup_data;
use dedup_data::real_memory::{self, CaptureConfig};
use dedup_data::{DataSet, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Ksm,
    /// PageONE with this many work threads; `copy`: unique pages made canonical at once
    /// (`Config::unique_in_place` off), as before in-place indexing; `eager`: volatile
    /// pages protected at once (`Config::unchanged_before_protect` off).
    PageOne {
        threads: usize,
        copy: bool,
        eager: bool,
    },
}

impl Engine {
    fn name(self) -> String {
        match self {
            Engine::Ksm => "ksm".into(),
            Engine::PageOne {
                threads,
                copy,
                eager,
            } => format!(
                "pageone-{threads}t{}{}",
                if copy { "-copy" } else { "" },
                if eager { "-eager" } else { "" }
            ),
        }
    }

    fn parse(s: &str) -> Option<Engine> {
        if s == "ksm" {
            return Some(Engine::Ksm);
        }
        let rest = s.strip_prefix("pageone-")?;
        let (rest, eager) = match rest.strip_suffix("-eager") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (rest, copy) = match rest.strip_suffix("-copy") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let threads = rest.strip_suffix('t')?.parse().ok().filter(|&t| t > 0)?;
        Some(Engine::PageOne {
            threads,
            copy,
            eager,
        })
    }
}

struct Args {
    mib: usize,
    vms: usize,
    sets: Vec<DataSet>,
    engines: Vec<Engine>,
    pages_to_scan: u64,
    reps: usize,
    run_pages: usize,
    real: CaptureConfig,
    capture_only: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        mib: 128,
        vms: 12,
        sets: vec![DataSet::Random, DataSet::ZeroPrefix, DataSet::Real],
        engines: vec![
            Engine::Ksm,
            Engine::PageOne {
                threads: 1,
                copy: false,
                eager: false,
            },
            Engine::PageOne {
                threads: 2,
                copy: false,
                eager: false,
            },
        ],
        pages_to_scan: 4096,
        reps: 3,
        run_pages: LinuxConfig::default().max_run_pages,
        real: CaptureConfig::from_env(),
        capture_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--capture-only" {
            a.capture_only = true;
            continue;
        }
        if k == "--real-cache" {
            a.real.cache = true;
            continue;
        }
        let v = it.next().unwrap_or_default();
        match k.as_str() {
            "--mib" => a.mib = v.parse().expect("--mib N"),
            "--vms" => a.vms = v.parse().expect("--vms N"),
            "--pages-to-scan" => a.pages_to_scan = v.parse().expect("--pages-to-scan N"),
            "--run-pages" => a.run_pages = v.parse().expect("--run-pages N"),
            "--reps" => a.reps = v.parse::<usize>().expect("--reps N").max(1),
            "--real-groups" => a.real.groups = v.parse::<usize>().expect("--real-groups N").max(1),
            "--real-mib" => a.real.worker_mib = v.parse().expect("--real-mib N"),
            "--sets" => {
                a.sets = v
                    .split(',')
                    .map(|s| DataSet::parse(s).unwrap_or_else(|| panic!("unknown data set {s}")))
                    .collect()
            }
            "--engines" => {
                a.engines = v
                    .split(',')
                    .map(|s| Engine::parse(s).unwrap_or_else(|| panic!("unknown engine {s}")))
                    .collect()
            }
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

/// Process CPU time (all threads, user and system).
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time ksmd has used: `/proc/<pid>/schedstat` (nanoseconds), else `stat` (ticks).
fn ksmd_cpu(pid: u32) -> Duration {
    if let Some(ns) = fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    {
        return Duration::from_nanos(ns);
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("ksmd's stat");
    let after = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the state field.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = rustix::param::clock_ticks_per_second();
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// `Rss`, `Pss` and `Anonymous` (bytes) of the mappings of this process inside `ranges`.
fn smaps(ranges: &[(usize, usize)]) -> (u64, u64, u64) {
    let text = fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let (mut rss, mut pss, mut anon) = (0, 0, 0);
    let mut inside = false;
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let first = f.next().unwrap_or("");
        if !first.ends_with(':') {
            if let Some((s, e)) = first.split_once('-') {
                let (s, e) = (
                    usize::from_str_radix(s, 16).unwrap_or(0),
                    usize::from_str_radix(e, 16).unwrap_or(0),
                );
                inside = ranges.iter().any(|&(a, b)| s < b && e > a);
            }
            continue;
        }
        if !inside {
            continue;
        }
        let kb = f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        match first {
            "Rss:" => rss += kb,
            "Pss:" => pss += kb,
            "Anonymous:" => anon += kb,
            _ => {}
        }
    }
    (rss, pss, anon)
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
struct Run {
    wall: Duration,
    cpu: Duration,
    merged: u64,
    before: u64,
    after: u64,
}

impl Run {
    /// The median of each figure over `runs` (one engine's repetitions).
    fn median(runs: &[Run]) -> Run {
        fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        }
        Run {
            wall: mid(runs.iter().map(|r| r.wall).collect()),
            cpu: mid(runs.iter().map(|r| r.cpu).collect()),
            merged: mid(runs.iter().map(|r| r.merged).collect()),
            before: mid(runs.iter().map(|r| r.before).collect()),
            after: mid(runs.iter().map(|r| r.after).collect()),
        }
    }

    fn saved(&self) -> u64 {
        self.before.saturating_sub(self.after)
    }

    fn per_cpu_s(&self) -> f64 {
        self.merged as f64 / self.cpu.as_secs_f64()
    }
}

/// Fills the regions at `bases` with `workload`'s pages, one thread per region.
fn fill(workload: &Workload, bases: &[*mut u8]) {
    std::thread::scope(|s| {
        for (r, (&base, &pages)) in bases.iter().zip(&workload.regions).enumerate() {
            let base = base as usize;
            s.spawn(move || {
                for i in 0..pages {
                    // SAFETY: page `i` of a region of `pages` pages this process mapped
                    // and owns; each thread fills its own region, and nothing else reads
                    // or writes it meanwhile.
                    let page = unsafe {
                        std::slice::from_raw_parts_mut((base + i * PAGE_SIZE) as *mut u8, PAGE_SIZE)
                    };
                    workload.fill(r, i, page);
                }
            });
        }
    });
}

fn mmap_region(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping at an address the kernel chooses.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
        )
    }
    .expect("mmap a region");
    // SAFETY: our fresh mapping; the advice changes how it is backed, not its contents.
    // (LinuxMemory::add_region does the same: 4 KiB pages for both engines.)
    unsafe { rustix::mm::madvise(p, len, rustix::mm::Advice::LinuxNoHugepage) }
        .expect("MADV_NOHUGEPAGE");
    p.cast()
}

fn run_ksm(workload: &Workload, a: &Args, ksmd: u32) -> Run {
    let expected = workload.ksm_expected();
    let lens: Vec<usize> = workload.regions.iter().map(|&p| p * PAGE_SIZE).collect();
    let bases: Vec<*mut u8> = lens.iter().map(|&len| mmap_region(len)).collect();
    fill(workload, &bases);
    let ranges: Vec<(usize, usize)> = bases
        .iter()
        .zip(&lens)
        .map(|(&b, &len)| (b as usize, b as usize + len))
        .collect();
    let before = smaps(&ranges).1;
    // Another KSM user may have started since the check in `main` (a benchmark of its
    // own): measuring now would count its pages, and our `run=2` and restore would
    // unmerge and stop its work. Leave at once, knobs as they are now.
    if ksm::read("run") != "0" || ksm::num("pages_shared") + ksm::num("pages_sharing") > 0 {
        println!("STOPPED: KSM came into use by another process (run != 0 or pages merged).");
        std::process::exit(2);
    }
    ksm::put("pages_to_scan", &a.pages_to_scan.to_string());
    ksm::put("sleep_millisecs", "0");
    let cpu0 = ksmd_cpu(ksmd);
    let own0 = process_cpu();
    let t0 = Instant::now();
    for (&b, &len) in bases.iter().zip(&lens) {
        // SAFETY: our own mapping; MADV_MERGEABLE only lets ksmd merge its pages.
        unsafe { rustix::mm::madvise(b.cast(), len, rustix::mm::Advice::LinuxMergeable) }
            .expect("MADV_MERGEABLE");
    }
    // Our own share: the madvise calls (not the polling below).
    let own = process_cpu() - own0;
    let scans0 = ksm::num("full_scans");
    ksm::put("run", "1");
    // Converged, or given up: 10 full scans (it needs 2 or 3), two full scans in a row
    // that merged nothing, or 10 minutes.
    let limit = Duration::from_secs(600);
    let (mut last_scan, mut sharing_at_scan, mut idle_scans) = (scans0, 0, 0);
    while ksm::num("pages_sharing") < expected
        && t0.elapsed() < limit
        && last_scan < scans0 + 10
        && idle_scans < 2
    {
        std::thread::sleep(Duration::from_millis(5));
        let scans = ksm::num("full_scans");
        if scans > last_scan {
            let sharing = ksm::num("pages_sharing");
            idle_scans = if sharing == sharing_at_scan && scans > scans0 + 1 {
                idle_scans + scans - last_scan
            } else {
                0
            };
            (last_scan, sharing_at_scan) = (scans, sharing);
        }
    }
    let wall = t0.elapsed();
    let cpu = (ksmd_cpu(ksmd) - cpu0) + own;
    ksm::put("run", "0");
    let merged = ksm::num("pages_sharing");
    let after = smaps(&ranges).1;
    eprintln!(
        "  ksm: pages_shared {} pages_sharing {} full_scans {}",
        ksm::num("pages_shared"),
        merged,
        ksm::num("full_scans")
    );
    // Unmerge and stop, then give the memory back.
    ksm::unmerge_and_stop(Duration::from_secs(120), Duration::from_millis(10));
    for (&b, &len) in bases.iter().zip(&lens) {
        // SAFETY: our own mapping, not used after this.
        unsafe { rustix::mm::munmap(b.cast(), len) }.expect("munmap");
    }
    assert_eq!(
        merged, expected,
        "KSM did not converge (10 full scans, two idle ones, or {limit:?})"
    );
    Run {
        wall,
        cpu,
        merged,
        before,
        after,
    }
}

fn run_pageone(workload: &Workload, a: &Args, threads: usize, copy: bool, eager: bool) -> Run {
    let expected = workload.pageone_expected();
    let mem = Arc::new(
        LinuxMemory::with_config(LinuxConfig::default().with_max_run_pages(a.run_pages))
            .expect("userfaultfd write-protect"),
    );
    let regions: Vec<_> = workload
        .regions
        .iter()
        .map(|&pages| {
            mem.add_region(pages as u32, DomainId(0))
                .expect("add_region")
        })
        .collect();
    let bases: Vec<*mut u8> = regions
        .iter()
        .map(|&r| mem.region_ptr(r).unwrap())
        .collect();
    fill(workload, &bases);
    let before = mem.usage().expect("usage").total_bytes();
    let config = Config::default()
        .work_threads(threads)
        .unique_in_place(!copy)
        .unchanged_before_protect(!eager);
    let engine = PageOne::new(mem.clone(), config).expect("starting PageONE's work threads");
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let mut passes = 0;
    let mut pass_s = Vec::new();
    let reached = || {
        let s = engine.stats();
        (s.pages_sharing, s.zero_pages)
    };
    while reached() != expected && passes < 10 {
        let pass = engine.merge_pass();
        pass_s.push(format!("{:.3}", pass.elapsed.as_secs_f64()));
        passes += 1;
        if pass.quiet() {
            break;
        }
    }
    let wall = t0.elapsed();
    let cpu = process_cpu() - cpu0;
    let s = engine.stats();
    let usage = mem.usage().expect("usage");
    eprintln!(
        "  {}: {passes} passes ({} s); workers busy {:?} s; pages_shared {} pages_sharing {} \
         zero_pages {} merge_races {}; backend {:?}; {} mappings",
        Engine::PageOne {
            threads,
            copy,
            eager,
        }
        .name(),
        pass_s.join(", "),
        s.workers
            .iter()
            .map(|w| format!("{:.3}", w.busy.as_secs_f64()))
            .collect::<Vec<_>>(),
        s.pages_shared,
        s.pages_sharing,
        s.zero_pages,
        s.merge_races,
        mem.stats(),
        usage.region_mappings
    );
    engine.unmerge_all();
    drop(engine);
    drop(mem);
    assert_eq!(
        (s.pages_sharing, s.zero_pages),
        expected,
        "PageONE did not converge"
    );
    Run {
        wall,
        cpu,
        merged: s.pages_sharing + s.zero_pages,
        before,
        after: usage.total_bytes(),
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn workload(set: DataSet, a: &Args) -> Workload {
    match set {
        DataSet::Real => Workload::real(a.real).expect("capturing the real-memory data set"),
        _ => Workload::synthetic(set, a.vms, a.mib * 256),
    }
}

fn main() {
    // The real set's capture starts this executable again as its worker processes.
    real_memory::worker_main();
    let a = parse_args();
    if a.capture_only {
        let w = workload(DataSet::Real, &a);
        println!("{}", w.description);
        println!(
            "{:?}; full merging: KSM pages_sharing {}, PageONE (pages_sharing, zero_pages) {:?}",
            w.census,
            w.ksm_expected(),
            w.pageone_expected()
        );
        return;
    }
    if let Err(why) = ksm::available() {
        println!("SKIPPED: {why}.");
        return;
    }
    let Ok(ksmd) = ksm::ksmd() else {
        println!("SKIPPED: no ksmd thread found.");
        return;
    };
    if ksm::in_use() {
        println!("SKIPPED: {}.", ksm::IN_USE);
        return;
    }
    if a.engines
        .iter()
        .any(|e| matches!(e, Engine::PageOne { .. }))
    {
        if let Err(e) = LinuxMemory::new() {
            println!("SKIPPED: PageONE's Linux backend is unavailable here: {e}");
            return;
        }
    }
    // Put every knob back as it was when we are done, even after a panic.
    let _restore = ksm::set_up_comparison();

    println!(
        "ksm pages_to_scan {}, sleep_millisecs 0, smart_scan 0, use_zero_pages 0, \
         max_page_sharing 256; pageone runs of up to {} pages",
        a.pages_to_scan, a.run_pages
    );
    let mut rows = Vec::new();
    for &set in &a.sets {
        let w = workload(set, &a);
        println!(
            "{}: {}; {} pages ({:.0} MiB) in {} regions; full merging: KSM pages_sharing {}, \
             PageONE (pages_sharing, zero_pages) {:?}",
            set.name(),
            w.description,
            w.total_pages(),
            mib((w.total_pages() * PAGE_SIZE) as u64),
            w.regions.len(),
            w.ksm_expected(),
            w.pageone_expected()
        );
        let mut all: Vec<Vec<Run>> = vec![Vec::new(); a.engines.len()];
        // Repetitions interleave the engines, so a burst of load elsewhere hits all.
        for rep in 0..a.reps {
            for (k, &e) in a.engines.iter().enumerate() {
                eprintln!("{} / {} (run {})", set.name(), e.name(), rep + 1);
                let r = match e {
                    Engine::Ksm => run_ksm(&w, &a, ksmd),
                    Engine::PageOne {
                        threads,
                        copy,
                        eager,
                    } => run_pageone(&w, &a, threads, copy, eager),
                };
                eprintln!(
                "  wall {:.3} s, cpu {:.3} s, merged {}, {:.0} merged/cpu-s, memory {:.1} -> {:.1} MiB",
                r.wall.as_secs_f64(),
                r.cpu.as_secs_f64(),
                r.merged,
                r.per_cpu_s(),
                mib(r.before),
                mib(r.after)
                );
                all[k].push(r);
            }
        }
        let runs: Vec<(Engine, Run)> = a
            .engines
            .iter()
            .zip(&all)
            .map(|(&e, r)| (e, Run::median(r)))
            .collect();
        rows.push((set, runs));
    }

    println!();
    println!("medians of {} runs each", a.reps);
    println!(
        "| data set | engine | wall to converge (s) | CPU (s) | merged pages | merged/CPU-s | memory before → after (MiB) | saved (MiB) | speed vs KSM (wall) | merged/CPU-s vs KSM | saved vs KSM | final memory vs KSM |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (set, runs) in &rows {
        let ksm = runs
            .iter()
            .find(|(e, _)| *e == Engine::Ksm)
            .map(|(_, r)| *r);
        for (e, r) in runs {
            let ratio = |f: &dyn Fn(&Run) -> f64, inv: bool| -> String {
                match ksm {
                    Some(k) if inv => format!("{:.2}×", f(&k) / f(r)),
                    Some(k) => format!("{:.2}×", f(r) / f(&k)),
                    None => "–".into(),
                }
            };
            println!(
                "| {} | {} | {:.2} | {:.2} | {} | {:.0} | {:.0} → {:.0} | {:.0} | {} | {} | {} | {} |",
                set.name(),
                e.name(),
                r.wall.as_secs_f64(),
                r.cpu.as_secs_f64(),
                r.merged,
                r.per_cpu_s(),
                mib(r.before),
                mib(r.after),
                mib(r.saved()),
                ratio(&|x| x.wall.as_secs_f64(), true),
                ratio(&|x| x.per_cpu_s(), false),
                ratio(&|x| x.saved() as f64, false),
                ratio(&|x| x.after as f64, false),
            );
        }
    }
}
