//! What the guest pays: the latency of a guest's first write to a page, side by side, in
//! one run (issue 12, item 5):
//! - **plain**: a private page already populated and writable (no fault: the anchor);
//! - **fresh**: a private page never touched (the kernel's zero-fill fault);
//! - **watched**: a page [`LinuxMemory`] write-protected with `protect` (the userfaultfd
//!   round trip through the fault thread), for each `--spins` setting of
//!   [`LinuxConfig::fault_spin`];
//! - **merged**: a page `LinuxMemory` merged (it maps the canonical store: the fault
//!   thread breaks the sharing with `MADV_POPULATE_WRITE`), for the same settings;
//! - **ksm**: a page Linux KSM merged (`MADV_MERGEABLE`, ksmd run until every page is
//!   merged, then stopped with `run = 0` so that it does not scan while we write): the
//!   kernel's copy-on-write break.
//!
//! Each write is one 8-byte store timed with `Instant` (about 20–30 ns of overhead: the
//! plain row). Two patterns: **cold**, one write every `--gap-us` microseconds (busy
//! waiting in between, as a running vCPU would), so that a fault thread that sleeps when
//! idle is asleep; and **burst**, writes back to back. Rounds interleave every case, so a
//! burst of load elsewhere hits them all. Fault-thread CPU is the process's CPU time
//! minus this (the writing) thread's, over the writes, per fault.
//!
//! Needs root for KSM (its knobs are restored afterwards, `run` last); without root, or
//! without KSM, or with KSM in use by someone else, it prints `SKIPPED` and exits 0.
//!
//! ```text
//! cargo run --release -p page-memory --features linux --example first_write -- \
//!     [--pages 1000] [--rounds 5] [--gap-us 300] [--spins 0,50,max]
//! ```
use std::fs;
use std::time::{Duration, Instant};

use page_memory::linux::{LinuxConfig, LinuxMemory};
use page_memory::{DomainId, MergeOutcome, PageId, PageMemory, PAGE_SIZE};

const KSM: &str = "/sys/kernel/mm/ksm";

struct Args {
    pages: usize,
    rounds: usize,
    gap: Duration,
    spins: Vec<Duration>,
}

fn parse_args() -> Args {
    let mut a = Args {
        pages: 1000,
        rounds: 5,
        gap: Duration::from_micros(300),
        spins: vec![Duration::ZERO, Duration::from_micros(50), Duration::MAX],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--pages" => a.pages = v.parse().expect("--pages N"),
            "--rounds" => a.rounds = v.parse().expect("--rounds N"),
            "--gap-us" => a.gap = Duration::from_micros(v.parse().expect("--gap-us N")),
            "--spins" => {
                a.spins = v
                    .split(',')
                    .map(|s| match s {
                        "max" => Duration::MAX,
                        n => Duration::from_micros(n.parse().expect("--spins 0,50,max")),
                    })
                    .collect()
            }
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

fn spin_name(d: Duration) -> String {
    if d == Duration::MAX {
        "spin=always".into()
    } else {
        format!("spin={}us", d.as_micros())
    }
}

fn cpu(clock: libc::clockid_t) -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(clock, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time of every thread but this one.
fn others_cpu() -> Duration {
    cpu(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(cpu(libc::CLOCK_THREAD_CPUTIME_ID))
}

fn ksm_read(knob: &str) -> String {
    fs::read_to_string(format!("{KSM}/{knob}"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn ksm_num(knob: &str) -> u64 {
    ksm_read(knob).parse().unwrap_or(0)
}

fn ksm_write(knob: &str, v: &str) {
    if let Err(e) = fs::write(format!("{KSM}/{knob}"), v) {
        panic!("writing {v} to {KSM}/{knob}: {e}");
    }
}

/// KSM's knobs as they were; written back on drop (`run` last).
struct Restore(Vec<(&'static str, String)>);

impl Drop for Restore {
    fn drop(&mut self) {
        for (k, v) in self.0.iter().rev() {
            let v = if *k == "advisor_mode" {
                v.split('[')
                    .nth(1)
                    .and_then(|x| x.split(']').next())
                    .unwrap_or("none")
            } else {
                v.as_str()
            };
            let _ = fs::write(format!("{KSM}/{k}"), v);
        }
    }
}

/// A private anonymous mapping of `pages` pages (4 KiB pages, as `LinuxMemory` gives).
fn mmap_anon(pages: usize) -> *mut u8 {
    let len = pages * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: our fresh mapping; the advice changes how it is backed, not its contents.
    assert_eq!(unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) }, 0);
    p.cast()
}

fn munmap(p: *mut u8, pages: usize) {
    // SAFETY: a mapping of ours that nothing uses any more.
    unsafe { libc::munmap(p.cast(), pages * PAGE_SIZE) };
}

/// Fills page `p` with contents unique to `seed`.
fn fill(p: *mut u8, seed: u64) {
    let w = p.cast::<u64>();
    for i in 0..PAGE_SIZE / 8 {
        // SAFETY: `p` is a page of a mapping of ours.
        unsafe {
            w.add(i)
                .write_volatile(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64)
        };
    }
}

/// Nanoseconds of one store to each page (word 5), `gap` apart.
fn first_writes(pages: &[*mut u8], gap: Duration) -> Vec<u64> {
    let mut out = Vec::with_capacity(pages.len());
    for &p in pages {
        if !gap.is_zero() {
            let t = Instant::now();
            while t.elapsed() < gap {
                std::hint::spin_loop();
            }
        }
        let t0 = Instant::now();
        // SAFETY: a page of a mapping of ours (guest memory of a LinuxMemory is written
        // directly, as a vCPU would).
        unsafe { p.cast::<u64>().add(5).write_volatile(0xfeed) };
        out.push(t0.elapsed().as_nanos() as u64);
    }
    out
}

#[derive(Default)]
struct Case {
    ns: Vec<u64>,
    /// Median of each round.
    round_medians: Vec<u64>,
    faults: u64,
    helper_cpu: Duration,
}

impl Case {
    fn add(&mut self, mut ns: Vec<u64>) {
        let mut s = ns.clone();
        s.sort_unstable();
        self.round_medians.push(s[s.len() / 2]);
        self.ns.append(&mut ns);
    }
}

fn q(sorted: &[u64], f: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * f).round() as usize] as f64 / 1000.0
}

/// Pages `[from, from + n)` of `base`.
fn ptrs(base: *mut u8, from: usize, n: usize) -> Vec<*mut u8> {
    // SAFETY (of the arithmetic): inside the mapping.
    (from..from + n)
        .map(|i| base.wrapping_add(i * PAGE_SIZE))
        .collect()
}

/// Watched and merged pages of a `LinuxMemory` with `spin`: `(watched cold, watched burst,
/// merged cold, merged burst)`, each with the fault threads' CPU over its writes.
fn run_ours(spin: Duration, n: usize, gap: Duration, round: u64) -> [(Vec<u64>, u64, Duration); 4] {
    let mem = LinuxMemory::with_config(LinuxConfig::default().with_fault_spin(spin))
        .expect("LinuxMemory");
    // [0, 2n) watched; [2n, 4n) canonical; [4n, 6n) their duplicates.
    let r = mem.add_region(6 * n as u32, DomainId(0)).unwrap();
    let base = mem.region_ptr(r).unwrap();
    let page = |i: usize| PageId::new(r, i as u32);
    for i in 0..6 * n {
        let seed = (round << 32) | (if i >= 4 * n { i - 2 * n } else { i }) as u64;
        fill(base.wrapping_add(i * PAGE_SIZE), seed);
    }
    let all: Vec<PageId> = (0..6 * n).map(page).collect();
    let tokens: Vec<_> = mem
        .protect(&all)
        .into_iter()
        .map(|t| t.expect("protect"))
        .collect();
    let canon: Vec<_> = (2 * n..4 * n).map(|i| (page(i), tokens[i])).collect();
    let frames: Vec<_> = mem
        .canonicalize_batch(&canon)
        .into_iter()
        .map(|f| f.expect("canonicalize"))
        .collect();
    let dups: Vec<_> = (4 * n..6 * n)
        .map(|i| (page(i), tokens[i], &frames[i - 4 * n]))
        .collect();
    for m in mem.merge_batch(&dups) {
        assert_eq!(m.expect("merge"), MergeOutcome::Merged);
    }
    // Let the fault thread go to sleep (or settle into its spin).
    std::thread::sleep(Duration::from_millis(5));
    let measure = |from: usize, gap: Duration| {
        let f0 = mem.stats().write_faults;
        let c0 = others_cpu();
        let ns = first_writes(&ptrs(base, from, n), gap);
        let cpu = others_cpu().saturating_sub(c0);
        (ns, mem.stats().write_faults - f0, cpu)
    };
    let out = [
        measure(0, gap),
        measure(n, Duration::ZERO),
        measure(4 * n, gap),
        measure(5 * n, Duration::ZERO),
    ];
    let s = mem.stats();
    assert_eq!(
        s.cow_breaks,
        2 * n as u64,
        "every merged page's write broke its sharing"
    );
    // Nothing lost: every written page reads its write, and its other words are intact.
    for i in (0..2 * n).chain(4 * n..6 * n) {
        let p = base.wrapping_add(i * PAGE_SIZE).cast::<u64>();
        // SAFETY: pages of our region, not written by anyone else now.
        let (w5, w6) = unsafe { (p.add(5).read_volatile(), p.add(6).read_volatile()) };
        let seed = (round << 32) | (if i >= 4 * n { i - 2 * n } else { i }) as u64;
        assert_eq!(w5, 0xfeed, "page {i} lost its write");
        assert_eq!(
            w6,
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 6,
            "page {i} changed"
        );
    }
    out
}

/// KSM-merged pages: `(cold, burst)`, or `None` if ksmd did not merge them in time.
fn run_ksm(n: usize, gap: Duration, round: u64) -> Option<(Vec<u64>, Vec<u64>)> {
    // [0, 2n) originals, [2n, 4n) their copies.
    let base = mmap_anon(4 * n);
    for i in 0..4 * n {
        fill(
            base.wrapping_add(i * PAGE_SIZE),
            (round << 32) | (i % (2 * n)) as u64 | 1 << 40,
        );
    }
    // SAFETY: our own mapping; MADV_MERGEABLE only lets ksmd merge its pages.
    assert_eq!(
        unsafe { libc::madvise(base.cast(), 4 * n * PAGE_SIZE, libc::MADV_MERGEABLE) },
        0
    );
    ksm_write("run", "1");
    let t0 = Instant::now();
    let want = 2 * n as u64;
    while ksm_num("pages_sharing") < want && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Stopped (merged pages stay merged): ksmd does not scan while we write.
    ksm_write("run", "0");
    let merged = ksm_num("pages_sharing") >= want;
    let out = merged.then(|| {
        std::thread::sleep(Duration::from_millis(5));
        let cold = first_writes(&ptrs(base, 2 * n, n), gap);
        let burst = first_writes(&ptrs(base, 3 * n, n), Duration::ZERO);
        (cold, burst)
    });
    munmap(base, 4 * n);
    // Unmerge whatever is left (nothing of ours: the mapping is gone) and stop.
    ksm_write("run", "2");
    let t1 = Instant::now();
    while ksm_num("pages_shared") + ksm_num("pages_sharing") > 0
        && t1.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    ksm_write("run", "0");
    if !merged {
        eprintln!(
            "  ksm: only {} of {want} pages merged in 120 s",
            ksm_num("pages_sharing")
        );
    }
    out
}

fn main() {
    let a = parse_args();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: KSM's sysfs knobs ({KSM}) need root; run as root.");
        return;
    }
    if !std::path::Path::new(KSM).exists() {
        println!("SKIPPED: this kernel has no KSM ({KSM} is missing).");
        return;
    }
    if ksm_num("pages_shared") + ksm_num("pages_sharing") > 0 || ksm_read("run") == "1" {
        println!("SKIPPED: KSM is in use by another process (pages_shared > 0 or run = 1).");
        return;
    }
    if let Err(e) = LinuxMemory::new() {
        println!("SKIPPED: the Linux backend is unavailable here: {e}");
        return;
    }
    let knobs = [
        "run",
        "pages_to_scan",
        "sleep_millisecs",
        "smart_scan",
        "advisor_mode",
        "max_page_sharing",
        "use_zero_pages",
    ];
    let _restore = Restore(
        knobs
            .iter()
            .map(|&k| (k, ksm_read(k)))
            .filter(|(_, v)| !v.is_empty())
            .collect(),
    );
    ksm_write("run", "0");
    for (k, v) in [
        ("smart_scan", "0"),
        ("use_zero_pages", "0"),
        ("max_page_sharing", "256"),
    ] {
        if !ksm_read(k).is_empty() {
            ksm_write(k, v);
        }
    }
    if ksm_read("advisor_mode").contains('[') {
        ksm_write("advisor_mode", "none");
    }
    ksm_write("pages_to_scan", &(8 * a.pages).to_string());
    ksm_write("sleep_millisecs", "0");

    let n = a.pages;
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{n} pages per case and pattern, {} rounds, cold gap {} us; load before: {}",
        a.rounds,
        a.gap.as_micros(),
        load.trim()
    );
    // Names, in print order; [cold, burst] per name.
    let mut names = vec!["plain".to_string(), "fresh".to_string()];
    for &s in &a.spins {
        names.push(format!("watched {}", spin_name(s)));
    }
    for &s in &a.spins {
        names.push(format!("merged {}", spin_name(s)));
    }
    names.push("ksm".to_string());
    let mut cases: Vec<[Case; 2]> = names.iter().map(|_| Default::default()).collect();
    let k = a.spins.len();
    for round in 0..a.rounds as u64 {
        eprintln!("round {}", round + 1);
        // plain: populated, writable.
        let p = mmap_anon(2 * n);
        for i in 0..2 * n {
            fill(p.wrapping_add(i * PAGE_SIZE), i as u64);
        }
        cases[0][0].add(first_writes(&ptrs(p, 0, n), a.gap));
        cases[0][1].add(first_writes(&ptrs(p, n, n), Duration::ZERO));
        munmap(p, 2 * n);
        // fresh: never touched.
        let p = mmap_anon(2 * n);
        cases[1][0].add(first_writes(&ptrs(p, 0, n), a.gap));
        cases[1][1].add(first_writes(&ptrs(p, n, n), Duration::ZERO));
        munmap(p, 2 * n);
        for (j, &s) in a.spins.iter().enumerate() {
            let [wc, wb, mc, mb] = run_ours(s, n, a.gap, round);
            for ((at, pat), (ns, faults, cpu)) in [
                ((2 + j, 0), wc),
                ((2 + j, 1), wb),
                ((2 + k + j, 0), mc),
                ((2 + k + j, 1), mb),
            ] {
                let case = &mut cases[at][pat];
                case.add(ns);
                case.faults += faults;
                case.helper_cpu += cpu;
            }
        }
        if let Some((cold, burst)) = run_ksm(n, a.gap, round) {
            cases[2 + 2 * k][0].add(cold);
            cases[2 + 2 * k][1].add(burst);
        }
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load after: {}", load.trim());
    for (pat, label) in [(0, "cold (one write per gap)"), (1, "burst (back to back)")] {
        println!("\n{label}: microseconds per first write");
        println!(
            "{:<22} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>9}  round medians",
            "case", "median", "p90", "p99", "max", "med/ksm", "p90/ksm", "cpu/fault"
        );
        let ksm: Option<Vec<u64>> = {
            let c = &cases[2 + 2 * k][pat];
            (!c.ns.is_empty()).then(|| {
                let mut s = c.ns.clone();
                s.sort_unstable();
                s
            })
        };
        for (name, c) in names.iter().zip(&cases) {
            let c = &c[pat];
            if c.ns.is_empty() {
                println!("{name:<22} (no data)");
                continue;
            }
            let mut s = c.ns.clone();
            s.sort_unstable();
            let ratio = |f: f64| {
                ksm.as_ref()
                    .map_or("-".to_string(), |k| format!("{:.2}", q(&s, f) / q(k, f)))
            };
            let cpu = if c.faults > 0 {
                format!("{:.2}", c.helper_cpu.as_secs_f64() * 1e6 / c.faults as f64)
            } else {
                "-".to_string()
            };
            let rm: Vec<String> = c
                .round_medians
                .iter()
                .map(|&m| format!("{:.2}", m as f64 / 1000.0))
                .collect();
            println!(
                "{name:<22} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>9} {:>9} {:>9}  {}",
                q(&s, 0.5),
                q(&s, 0.9),
                q(&s, 0.99),
                q(&s, 1.0),
                ratio(0.5),
                ratio(0.9),
                cpu,
                rm.join(" ")
            );
        }
    }
}
