//! The density workload on real vCPUs, per set-up: no engine, Linux KSM
//! (`MADV_MERGEABLE` on the same guest RAM), PageONE, the Per Page Recycler (PPR), and
//! PPR + PageONE (`PageOne::with_hook` with the recycler inside its scan).
//!
//! Every VM runs the guest's density workload (`kvm_vmm::workload::Density`, the
//! fractions of `examples/density`'s plan): an OS image identical in every VM (5 % of
//! its pages), private OS pages (3.5 %), zeroed pages (2 %), and an application that
//! allocates up to 75 % of the VM and frees it again, `--cycles` times, in `--steps`
//! steps up and as many down, each VM at its own phase; every page it allocates gets
//! fresh unique contents. The guest's page allocator calls `ppr-guest`'s hooks over a
//! PIP pool it registers; only the PPR set-ups register it (the others answer 0: hooks
//! off, as a guest without PPR).
//!
//! The guests wait at a barrier after boot and after every step, all VMs together,
//! until the engine has had its say (counted in its own passes): after boot, until it
//! converged (PageONE: 10 merge passes; KSM: 3 full scans; PPR: 2 recycler passes;
//! PPR + PageONE: 10 merge passes); after a step, one engine period (PageONE: 1 merge
//! pass; KSM: 1 full scan; PPR: 2 recycler passes; PPR + PageONE: 2 passes, base or
//! merge, in which the recycler runs); no engine: no wait. Memory is sampled at every
//! barrier, with the guests held.
//!
//! The engines run periodically, as deployed: PageONE's passes are driven like its
//! daemon (`PageOne::start`) by a thread of this example that counts them: a base pass
//! every `--base-ms` (only with a hook: the recycler), a merge pass every `--merge-ms`;
//! the recycler alone passes every `--reclaim-ms`; KSM `sleep_millisecs` =
//! `--ksm-sleep-ms`, `pages_to_scan` = `--ksm-pages`, `use_zero_pages=1`. One PageONE
//! work thread.
//!
//! Engine CPU is the run time (`/proc/.../schedstat`) of the engine's own threads:
//! PageONE's work threads, the pass-driving thread, the Linux backend's userfaultfd
//! fault thread (every first write to a protected page is resolved there) and the
//! recycler's thread; KSM: ksmd. Not included for either: the faults' cost in the
//! faulting vCPU threads (KSM's copy-on-write, the userfaultfd round trip's guest
//! side), which shows in the guests' progress. "to converge after boot" is that CPU
//! from the engine's start (before the guests boot) until the guests are released after
//! boot, also per page of memory saved then against the no-engine runs; "per page
//! recycled" is the whole run's engine CPU divided by the pages recycled.
//!
//! Needs `/dev/kvm`, the guest (target `x86_64-unknown-none`), root (userfaultfd with
//! kernel faults, KSM's sysfs knobs) and no other KSM user; says what is missing and
//! skips that set-up otherwise. Run with
//! `cargo run --release -p kvm-vmm --example density_on_kvm -- [--vms 4] [--mib 64]
//! [--steps 4] [--cycles 2] [--reps 1]`.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::harness::{self, guest_or_skip, linux_adapter, PoolRegistry, Worker};
use kvm_vmm::host::{load_average, process_run_time, pss, schedstat};
use kvm_vmm::ksm;
use kvm_vmm::workload::{Density, DensityReport};
use kvm_vmm::{abi, run_all, CallHook, GuestImage, Vm};
use page_memory::DomainId;
use pageone::{Config, PageOne};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    None,
    Ksm,
    PageOne,
    Ppr,
    PprPageOne,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::None => "no engine",
            Setup::Ksm => "KSM",
            Setup::PageOne => "PageONE",
            Setup::Ppr => "PPR recycler",
            Setup::PprPageOne => "PPR + PageONE",
        }
    }

    fn ppr(self) -> bool {
        matches!(self, Setup::Ppr | Setup::PprPageOne)
    }

    /// Engine progress to wait for after boot and after a step.
    fn waits(self) -> (u64, u64) {
        match self {
            Setup::None => (0, 0),
            Setup::Ksm => (3, 1),
            Setup::PageOne => (10, 1),
            Setup::Ppr => (2, 2),
            Setup::PprPageOne => (10, 2),
        }
    }
}

struct Args {
    vms: u64,
    mib: u64,
    steps: u64,
    cycles: u64,
    reps: u64,
    base_ms: u64,
    merge_ms: u64,
    reclaim_ms: u64,
    ksm_sleep_ms: u64,
    ksm_pages: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        vms: 4,
        mib: 64,
        steps: 4,
        cycles: 2,
        reps: 1,
        base_ms: 50,
        merge_ms: 200,
        reclaim_ms: 50,
        ksm_sleep_ms: 20,
        ksm_pages: 4096,
    };
    common::parse_flags(&mut [
        ("--vms", &mut a.vms),
        ("--mib", &mut a.mib),
        ("--steps", &mut a.steps),
        ("--cycles", &mut a.cycles),
        ("--reps", &mut a.reps),
        ("--base-ms", &mut a.base_ms),
        ("--merge-ms", &mut a.merge_ms),
        ("--reclaim-ms", &mut a.reclaim_ms),
        ("--ksm-sleep-ms", &mut a.ksm_sleep_ms),
        ("--ksm-pages", &mut a.ksm_pages),
    ]);
    a
}

/// Run time of this process's engine threads (by name: PageONE's work threads, the
/// pass driver, the Linux backend's fault threads, the recycler).
fn engine_threads_cpu() -> Duration {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            ["pageone-", "page-memory-", "ppr-recycler"]
                .iter()
                .any(|p| comm.starts_with(p))
        })
        .map(|t| schedstat(&t.path().join("schedstat").to_string_lossy()))
        .sum()
}

/// The physical frame of the kernel's shared zero page (what a read of fresh anonymous
/// memory maps), from `/proc/self/pagemap` (root sees frame numbers).
fn zero_pfn() -> Option<u64> {
    static PFN: OnceLock<Option<u64>> = OnceLock::new();
    *PFN.get_or_init(|| {
        // SAFETY: a fresh private anonymous page of our own, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p` is a readable page just mapped; reading maps the zero page.
        let _ = unsafe { (p as *const u8).read_volatile() };
        let pfn = pagemap(p as usize, 1)
            .and_then(|e| e.first().copied())
            .filter(|e| e >> 63 == 1)
            .map(|e| e & PFN_MASK);
        // SAFETY: the page mapped above, not used afterwards.
        unsafe { libc::munmap(p, PAGE as usize) };
        pfn
    })
}

const PFN_MASK: u64 = (1 << 55) - 1;

/// `pages` entries of `/proc/self/pagemap` from address `addr`.
fn pagemap(addr: usize, pages: usize) -> Option<Vec<u64>> {
    let f = fs::File::open("/proc/self/pagemap").ok()?;
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, (addr as u64 / PAGE) * 8).ok()?;
    Some(
        buf.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

/// Bytes of distinct physical pages mapped in `ranges` (the kernel's zero page not
/// counted; a KSM page mapped by many guest pages counted once), from
/// `/proc/self/pagemap`; `None` without frame numbers (not root).
fn distinct_resident(ranges: &[(usize, usize)]) -> Option<u64> {
    let zero = zero_pfn()?;
    let mut frames = HashSet::new();
    for &(a, b) in ranges {
        for e in pagemap(a, (b - a) / PAGE as usize)? {
            let pfn = e & PFN_MASK;
            if e >> 63 == 1 && pfn != zero {
                if pfn == 0 {
                    return None;
                }
                frames.insert(pfn);
            }
        }
    }
    Some(frames.len() as u64 * PAGE)
}

/// One sample, taken at a barrier with the guests held.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// `Pss` of the guest RAM's mappings (a mapping that the kernel merged with a
    /// neighbour counts whole).
    pss: u64,
    /// Distinct physical pages mapped in the guest RAM, bytes (`/proc/self/pagemap`).
    resident: Option<u64>,
    /// The Linux backend's usage (`LinuxUsage::total_bytes`), where there is one.
    usage: Option<u64>,
    /// Pages sharing a merged page (beyond the first).
    merged: u64,
    /// Pages merged with the zero page.
    zero: u64,
    /// Pages recycled so far.
    recycled: u64,
    /// Engine CPU so far.
    cpu: Duration,
}

impl Sample {
    /// The memory the guest RAM uses: the backend's usage where there is one (the
    /// guests' private memory plus the canonical store; page tables miss store pages
    /// not mapped into the guest yet), else the distinct resident pages (else `Pss`).
    fn memory(&self) -> u64 {
        self.usage.or(self.resident).unwrap_or(self.pss)
    }
}

/// What one set-up measured.
#[derive(Clone, Debug, Default)]
struct Row {
    boot: Sample,
    steps: Vec<Sample>,
    end: Sample,
    engine_cpu: Duration,
    run_wall: Duration,
    report: DensityReport,
    timeouts: u64,
}

type Probe = Box<dyn Fn() -> Sample + Send>;

fn run(setup: Setup, a: &Args, image: &GuestImage) -> Result<Row, String> {
    let mem = a.mib * MIB;
    let plan = Density::plan(mem, a.steps, a.cycles);
    let n = a.vms as usize;
    let last = plan.last_round();
    let (boot_wait, step_wait) = setup.waits();
    let barrier = Arc::new(RoundBarrier::new(n as u32, Duration::from_secs(300)));
    let progress = Arc::new(AtomicU64::new(0));
    let probe: Arc<Mutex<Option<Probe>>> = Arc::default();
    let samples: Arc<Mutex<Vec<(u64, Sample)>>> = Arc::default();
    let pools = Arc::new(PoolRegistry::new(n));
    let recycler = pools.recycler().clone();
    let hook = |vm: usize| -> CallHook {
        let (barrier, progress, probe, samples) = (
            barrier.clone(),
            progress.clone(),
            probe.clone(),
            samples.clone(),
        );
        let pools = pools.clone();
        Arc::new(move |c| match c.code {
            // Only the PPR set-ups take the guests' pools.
            abi::CALL_REGISTER if setup.ppr() => pools.register(
                vm,
                c,
                vm as u32 + 1,
                0xDE25_17E0_0000_0000 ^ (vm as u64) << 24,
            ),
            abi::CALL_ROUND => {
                let round = c.args[0];
                let more = if round == 0 { boot_wait } else { step_wait };
                let p = || progress.load(Ordering::Acquire);
                barrier.wait(round, more, &p, &mut || {
                    if let Some(probe) = &*probe.lock().unwrap() {
                        samples.lock().unwrap().push((round, probe()));
                    }
                });
                0
            }
            _ => 0,
        })
    };
    let mut vms: Vec<Vm> = (0..n)
        .map(|i| {
            let w = Density {
                phase: (i as u64 * 2 * a.steps) / a.vms.max(1),
                seed: 0xA5A5_0000 + i as u64,
                ..plan
            };
            Vm::new(w.config(format!("vm{i}"), mem).on_call(hook(i)), image)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let ranges = harness::host_ranges(&vms);
    let mut threads = Vec::new();
    let mut restore = None;
    let mut adopted = None;
    let mut engine_keep = None;
    let ksmd = if setup == Setup::Ksm {
        Some(ksm::ksmd()?)
    } else {
        None
    };
    let cpu_now: Arc<dyn Fn() -> Duration + Send + Sync> = match ksmd {
        Some(pid) => Arc::new(move || process_run_time(pid)),
        None => Arc::new(engine_threads_cpu),
    };
    let cpu0 = cpu_now();
    if matches!(setup, Setup::PageOne | Setup::Ppr | Setup::PprPageOne) {
        let adapter = linux_adapter()?;
        let mut guests = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            // SAFETY: nothing in this process remaps, madvises or registers the guests'
            // RAM with another userfaultfd; KVM and the vCPUs read and write it.
            let g = unsafe { harness::adopt(&adapter, vm, DomainId(0)) }?;
            // SAFETY: `run` drops the engines and the recycler before the VMs.
            unsafe { pools.set_target(i, &g) };
            guests.push(g);
        }
        let engine = match setup {
            Setup::PageOne => Some(Arc::new(
                PageOne::new(adapter.memory().clone(), Config::default().work_threads(1))
                    .map_err(|e| e.to_string())?,
            )),
            Setup::PprPageOne => Some(Arc::new(
                PageOne::with_hook(
                    adapter.memory().clone(),
                    Config::default().work_threads(1),
                    recycler.clone(),
                )
                .map_err(|e| e.to_string())?,
            )),
            _ => None,
        };
        let (ad, e, r, cpu) = (
            adapter.clone(),
            engine.clone(),
            recycler.clone(),
            cpu_now.clone(),
        );
        let rr = ranges.clone();
        *probe.lock().unwrap() = Some(Box::new(move || {
            let s = e.as_ref().map(|e| e.stats()).unwrap_or_default();
            Sample {
                pss: pss(&rr),
                resident: distinct_resident(&rr),
                usage: ad.memory().usage().ok().map(|u| u.total_bytes()),
                merged: s.pages_sharing,
                zero: s.zero_pages,
                recycled: r.0.read().unwrap().stats().recycled,
                cpu: cpu().saturating_sub(cpu0),
            }
        }));
        let pr = progress.clone();
        let (base, merge, reclaim) = (
            Duration::from_millis(a.base_ms),
            Duration::from_millis(a.merge_ms),
            Duration::from_millis(a.reclaim_ms),
        );
        let driver = match engine.clone() {
            // PageONE's daemon loop, with its passes counted: a merge pass when due,
            // else a base pass when there is a hook.
            Some(engine) => {
                let with_hook = setup == Setup::PprPageOne;
                let mut last_merge = Instant::now() - merge;
                Worker::spawn("pageone-driver", (), move |_| {
                    if last_merge.elapsed() + base / 2 >= merge {
                        last_merge = Instant::now();
                        engine.merge_pass();
                    } else if with_hook {
                        engine.base_pass();
                    } else {
                        std::thread::sleep(base);
                        return;
                    }
                    pr.fetch_add(1, Ordering::Release);
                    std::thread::sleep(base);
                })
            }
            None => {
                let (r, ad) = (recycler.clone(), adapter.clone());
                Worker::spawn("ppr-recycler", (), move |_| {
                    r.0.read().unwrap().scan_pass(&**ad.memory());
                    pr.fetch_add(1, Ordering::Release);
                    std::thread::sleep(reclaim);
                })
            }
        }
        .map_err(|e| e.to_string())?;
        threads.push(driver);
        engine_keep = engine;
        adopted = Some((adapter, guests));
    } else if setup == Setup::Ksm {
        restore = Some(ksm::claim(&ranges)?);
        ksm::set("sleep_millisecs", &a.ksm_sleep_ms.to_string())?;
        ksm::set("pages_to_scan", &a.ksm_pages.to_string())?;
        ksm::set("use_zero_pages", "1")?;
        let (rr, cpu) = (ranges.clone(), cpu_now.clone());
        *probe.lock().unwrap() = Some(Box::new(move || Sample {
            pss: pss(&rr),
            resident: distinct_resident(&rr),
            usage: None,
            merged: ksm::num("pages_sharing"),
            zero: ksm::num("ksm_zero_pages"),
            recycled: 0,
            cpu: cpu().saturating_sub(cpu0),
        }));
        let scans = ksm::count_full_scans(progress.clone()).map_err(|e| e.to_string())?;
        threads.push(scans);
        ksm::set("run", "1")?;
    } else {
        let rr = ranges.clone();
        *probe.lock().unwrap() = Some(Box::new(move || Sample {
            pss: pss(&rr),
            resident: distinct_resident(&rr),
            ..Sample::default()
        }));
    }
    let t0 = Instant::now();
    let results = run_all(&mut vms, Duration::from_secs(900));
    let run_wall = t0.elapsed();
    let engine_cpu = cpu_now().saturating_sub(cpu0);
    for t in threads {
        t.stop();
    }
    let mut row = Row {
        engine_cpu,
        run_wall,
        timeouts: barrier.timeouts(),
        ..Row::default()
    };
    for (round, s) in samples.lock().unwrap().iter() {
        match *round {
            0 => row.boot = *s,
            r if r == last => row.end = *s,
            _ => row.steps.push(*s),
        }
    }
    for r in results {
        let out = r.map_err(|e| e.to_string())?;
        let rep = Density::report(&out).ok_or("no density report")?;
        if rep.corrupt != 0 {
            eprintln!("{}: {}", setup.name(), out.console);
        }
        row.report.add(&rep);
    }
    if setup == Setup::Ksm {
        ksm::unmerge(Duration::from_secs(120));
    }
    drop(restore);
    drop(engine_keep);
    *probe.lock().unwrap() = None;
    if let Some((adapter, guests)) = adopted {
        harness::release(&adapter, guests)?;
    }
    drop(recycler);
    drop(pools);
    Ok(row)
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0.0);
    for x in xs {
        s += x;
        n += 1.0;
    }
    if n > 0.0 {
        s / n
    } else {
        0.0
    }
}

fn main() {
    let a = parse_args();
    let Some(image) = guest_or_skip() else { return };
    let plan = Density::plan(a.mib * MIB, a.steps, a.cycles);
    println!(
        "{} VMs x {} MiB, 1 vCPU each; per VM: OS image {} pages (same in every VM), \
         private {}, zeroed {}, application peak {} pages; {} cycles of {} steps up and \
         down; PageONE base {} ms / merge {} ms, recycler {} ms, KSM sleep {} ms x {} \
         pages (smart_scan {}); {} rep(s); load before: {}",
        a.vms,
        a.mib,
        plan.image,
        plan.private,
        plan.zeroed,
        plan.app_peak,
        a.cycles,
        a.steps,
        a.base_ms,
        a.merge_ms,
        a.reclaim_ms,
        a.ksm_sleep_ms,
        a.ksm_pages,
        ksm::read("smart_scan"),
        a.reps,
        load_average()
    );
    let rows = common::run_reps(
        &[
            Setup::None,
            Setup::Ksm,
            Setup::PageOne,
            Setup::Ppr,
            Setup::PprPageOne,
        ],
        a.reps,
        Setup::name,
        |s| run(s, &a, &image),
        |rep, s, r| {
            eprintln!(
                "rep {rep} {}: boot {:?} end {:?} cpu {:?} wall {:?} timeouts {} {:?}",
                s.name(),
                r.boot,
                r.end,
                r.engine_cpu,
                r.run_wall,
                r.timeouts,
                r.report
            )
        },
    );
    let progress0 = mean(rows[0].1.iter().map(|r| r.report.allocs_per_mcycle()));
    let steps_mem = |r: &Row| mean(r.steps.iter().map(|s| s.memory() as f64));
    let mem0 = mean(rows[0].1.iter().map(steps_mem));
    let boot0 = mean(rows[0].1.iter().map(|r| r.boot.memory() as f64));
    let mib = |b: f64| b / MIB as f64;
    println!();
    println!(
        "| set-up | guest memory over the steps, mean (vs no engine) | at the end | after \
         boot | merged / zero-merged pages after boot | pages recycled | engine CPU: \
         run (per page recycled) | engine CPU to converge after boot (per page saved vs \
         no engine) | corrupt pages | guest progress vs no engine | run wall |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (s, rs) in &rows {
        if rs.is_empty() {
            continue;
        }
        let m = |f: &dyn Fn(&Row) -> f64| mean(rs.iter().map(f));
        let step_mem = m(&steps_mem);
        // Pages of memory saved after boot, against the no-engine runs' mean.
        let saved = |r: &Row| (boot0 - r.boot.memory() as f64) / PAGE as f64;
        let per_saved = m(&|r| r.boot.cpu.as_secs_f64() * 1e6 / saved(r));
        let recycled = m(&|r| r.end.recycled as f64);
        let per_recycled = m(&|r| r.engine_cpu.as_secs_f64() * 1e6 / r.end.recycled.max(1) as f64);
        println!(
            "| {} | {:.1} MiB ({:.2}) | {:.1} MiB | {:.1} MiB | {:.0} / {:.0} | {:.0} | {} | {} | {} | {:.2} | {:.1} s |",
            s.name(),
            mib(step_mem),
            step_mem / mem0,
            mib(m(&|r| r.end.memory() as f64)),
            mib(m(&|r| r.boot.memory() as f64)),
            m(&|r| r.boot.merged as f64),
            m(&|r| r.boot.zero as f64),
            recycled,
            if recycled > 0.0 {
                format!("{:.2} s ({per_recycled:.0} µs)", m(&|r| r.engine_cpu.as_secs_f64()))
            } else {
                format!("{:.2} s", m(&|r| r.engine_cpu.as_secs_f64()))
            },
            match s {
                Setup::None => "–".to_string(),
                _ if mean(rs.iter().map(saved)) < 1.0 => {
                    format!("{:.2} s (nothing saved)", m(&|r| r.boot.cpu.as_secs_f64()))
                }
                _ => format!(
                    "{:.2} s ({per_saved:.1} µs)",
                    m(&|r| r.boot.cpu.as_secs_f64())
                ),
            },
            rs.iter().map(|r| r.report.corrupt).sum::<u64>(),
            m(&|r| r.report.allocs_per_mcycle()) / progress0,
            m(&|r| r.run_wall.as_secs_f64()),
        );
    }
    println!();
    for (s, rs) in &rows {
        for r in rs {
            println!(
                "{}: allocs {} (read zeros {}, intact {}), frees {}, offered {}, not offered {}, \
                 busy {}, OS pages checked {}, barrier timeouts {}, boot CPU {:.2} s, \
                 guest RAM over the steps: Pss {:.1} MiB, distinct resident pages {:.1} MiB; \
                 at the end: Pss {:.1} MiB",
                s.name(),
                r.report.allocs,
                r.report.zeros,
                r.report.intact,
                r.report.frees,
                r.report.offered,
                r.report.not_offered,
                r.report.busy,
                r.report.os_checked,
                r.timeouts,
                r.boot.cpu.as_secs_f64(),
                mib(mean(r.steps.iter().map(|s| s.pss as f64))),
                mib(mean(r.steps.iter().map(|s| s.resident.unwrap_or(0) as f64))),
                mib(r.end.pss as f64),
            );
        }
    }
}
