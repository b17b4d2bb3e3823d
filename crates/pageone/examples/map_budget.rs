//! PageONE on the Linux backend against the process's mapping limit (`vm.max_map_count`),
//! and the canonicalizations two work threads waste on insert races. Prints figures for
//! `docs/benchmarks.md` ("PageONE: convergence, the mapping budget and insert races").
//!
//! - **scattered** (`--mib`, default 1024): one region in which every third page duplicates
//!   a random earlier page (the others unique): merges map store offsets in random order,
//!   so nearly every one costs mappings, and merging runs into the limit. Merge passes run
//!   until the merged count stops growing, then `--idle` more passes are timed: the CPU a
//!   pass costs once the limit is hit.
//! - **copies** (`--copies K --copy-mib M`): K regions with the same contents page for
//!   page (VMs booted from one image, every page unique within a region) and 2 work
//!   threads: what fraction of canonicalizations is wasted on lost insert races.
//!
//! CPU is the sum over the process's threads (`/proc/self/task/*/schedstat`), so it
//! includes the backend's fault thread and the kernel time of the system calls. Needs
//! userfaultfd write-protect (root, or `vm.unprivileged_userfaultfd=1`); says so and exits
//! 0 without it. Run with
//! `cargo run --release -p pageone --example map_budget -- [--mib 1024] [--threads 1]
//! [--idle 10] [--reserve N] [--copies 4] [--copy-mib 64] [--no-in-place]`.
//! `--own-spin` turns `LinuxConfig::own_event_spin` on. `--no-in-place` turns [`Config::unique_in_place`](pageone::Config) off: every stable
//! page is made canonical at once, as before in-place indexing.

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("SKIPPED: the Linux backend runs on Linux only");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use page_memory::linux::{LinuxConfig, LinuxMemory};
    use page_memory::{DomainId, PageId, RegionId, PAGE_WORDS};
    use pageone::{Config, PageOne};

    fn splitmix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// Guest write of the page with contents `seed` to `page`.
    fn fill(mem: &LinuxMemory, page: PageId, seed: u64) {
        let base = mem.page_ptr(page).unwrap().cast::<u64>();
        for i in 0..PAGE_WORDS {
            // SAFETY: word `i` of a page of a live region of `mem`, aligned; guest memory
            // is only accessed atomically here.
            let w = unsafe { AtomicU64::from_ptr(base.add(i)) };
            w.store(
                splitmix(seed.wrapping_mul(PAGE_WORDS as u64) + i as u64) | 1,
                Ordering::Relaxed,
            );
        }
    }

    /// CPU time of every thread of the process so far.
    fn cpu() -> Duration {
        let mut ns = 0u64;
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for t in dir.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                    ns += s
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        Duration::from_nanos(ns)
    }

    fn flag(name: &str) -> bool {
        std::env::args().any(|a| a == name)
    }

    fn config(threads: usize) -> Config {
        Config::default()
            .work_threads(threads)
            .unique_in_place(!flag("--no-in-place"))
    }

    fn arg(name: &str) -> Option<u64> {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    }

    fn memory(reserve: Option<u64>) -> Option<Arc<LinuxMemory>> {
        let config = LinuxConfig::default()
            .with_map_count_reserve(reserve)
            .with_own_event_spin(flag("--own-spin"));
        match LinuxMemory::with_config(config) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                println!("SKIPPED: no userfaultfd write-protect here: {e}");
                None
            }
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    pub(super) fn main() {
        let mib = arg("--mib").unwrap_or(1024);
        let threads = arg("--threads").unwrap_or(1) as usize;
        let idle = arg("--idle").unwrap_or(10);
        let reserve = arg("--reserve");
        let copies = arg("--copies").unwrap_or(4);
        let copy_mib = arg("--copy-mib").unwrap_or(64);
        if mib > 0 {
            scattered(mib, threads, idle, reserve);
        }
        if copies > 0 {
            copied(copies, copy_mib);
        }
    }

    fn scattered(mib: u64, threads: usize, idle: u64, reserve: Option<u64>) {
        let Some(mem) = memory(reserve) else { return };
        let pages = (mib * 256) as u32;
        let r: RegionId = mem.add_region(pages, DomainId(0)).unwrap();
        let mut rng = 0x5eed_u64;
        let mut seeds = Vec::with_capacity(pages as usize);
        let mut dups = 0u64;
        for i in 0..pages {
            let seed = if i % 3 == 2 {
                rng = splitmix(rng);
                dups += 1;
                // A random earlier page (itself possibly a duplicate: same contents).
                seeds[(rng % i as u64) as usize]
            } else {
                1 + i as u64
            };
            seeds.push(seed);
            fill(&mem, PageId::new(r, i), seed);
        }
        let engine = PageOne::new(mem.clone(), config(threads)).unwrap();
        println!(
            "scattered: {mib} MiB ({pages} pages, {dups} duplicates), {threads} work thread(s), \
             vm.max_map_count {}, unique pages in place: {}",
            mem.stats().max_map_count,
            !flag("--no-in-place")
        );
        let mut merging = Duration::ZERO;
        let mut last = 0;
        let mut flat = 0;
        let mut pass = 0;
        let mut full_pass = Duration::ZERO;
        while flat < 2 && pass < 40 {
            let c0 = cpu();
            engine.merge_pass();
            let c = cpu() - c0;
            merging += c;
            pass += 1;
            let s = engine.stats();
            let b = mem.stats();
            println!(
                "  pass {pass:2}: cpu {:8.1} ms, pages_sharing {:6}, backend merges {:6}, \
                 map-limit refusals {:7}, mappings {}",
                ms(c),
                s.pages_sharing,
                b.merges,
                b.map_limit_refusals,
                b.mappings_counted
            );
            if pass == 1 {
                full_pass = c; // every page read for protection
            }
            if s.pages_sharing == last && pass > 3 {
                flat += 1;
            } else {
                flat = 0;
            }
            last = s.pages_sharing;
        }
        let mut at_limit = Vec::new();
        for _ in 0..idle {
            let c0 = cpu();
            engine.merge_pass();
            at_limit.push(cpu() - c0);
        }
        at_limit.sort();
        let b = mem.stats();
        let median = at_limit
            .get(at_limit.len() / 2)
            .copied()
            .unwrap_or_default();
        let mean = at_limit.iter().sum::<Duration>() / at_limit.len().max(1) as u32;
        println!(
            "scattered: merged {} of {dups} duplicates; {idle} passes after: median cpu {:.1} ms, \
             mean {:.1} ms, max {:.1} ms per pass (first pass, protecting every page: {:.1} ms); \
             backend: {} map-limit refusals, {} mappings at the last count (limit {})",
            engine.stats().pages_sharing,
            ms(median),
            ms(mean),
            ms(at_limit.last().copied().unwrap_or_default()),
            ms(full_pass),
            b.map_limit_refusals,
            b.mappings_counted,
            b.max_map_count
        );
        println!(
            "scattered: cpu of the {pass} merging passes {:.1} ms",
            ms(merging)
        );
        println!("scattered: engine stats {:?}", engine.stats());
    }

    fn copied(copies: u64, mib: u64) {
        let Some(mem) = memory(None) else { return };
        let pages = (mib * 256) as u32;
        for _ in 0..copies {
            let r = mem.add_region(pages, DomainId(0)).unwrap();
            for i in 0..pages {
                fill(&mem, PageId::new(r, i), 1 + i as u64);
            }
        }
        let engine = PageOne::new(mem.clone(), config(2)).unwrap();
        let c0 = cpu();
        for _ in 0..4 {
            engine.merge_pass();
        }
        let c = cpu() - c0;
        let s = engine.stats();
        let b = mem.stats();
        let kept = s.pages_shared + s.pages_unshared - s.pages_unique;
        let wasted = b.canonicalized.saturating_sub(kept);
        println!(
            "copies: {copies} x {mib} MiB, 2 work threads, 4 passes, cpu {:.1} ms: {} \
             canonicalizations for {kept} canonical pages kept: {wasted} wasted ({:.2} %); \
             pages_sharing {}",
            ms(c),
            b.canonicalized,
            100.0 * wasted as f64 / b.canonicalized.max(1) as f64,
            s.pages_sharing
        );
    }
}
