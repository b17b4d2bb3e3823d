//! The engines on real vCPUs, side by side: the same guests (the bare-metal guest's
//! memory checker on KVM vCPUs) run with no engine, under PageONE (Linux backend, RAM
//! adopted from the VMM's `GuestMemoryMmap` with the vm-memory adapter) and under Linux
//! KSM (`MADV_MERGEABLE` on the same guest RAM).
//!
//! Every VM's checker fills its pages (generation 0 repeats every `--period` pages, the
//! same in every VM: an OS image all guests share), then waits at a barrier until the
//! engine has converged (PageONE: 10 merge passes after the last VM arrived; KSM: 3 full
//! scans; none: no wait); there memory is measured. Then it runs `--rounds` rounds, each
//! rewriting a moving 1/`--stride` of its pages (page-unique contents) and re-reading
//! all, while the engine keeps running.
//!
//! Per set-up: guest RAM in use at convergence (no engine and KSM: `Pss` of the guest
//! mappings in `/proc/self/smaps`, a KSM page counted once; PageONE: the regions'
//! anonymous memory plus its canonical store, `LinuxUsage::total_bytes`), merged and
//! zero-merged pages, engine CPU (PageONE: the process's CPU less the vCPU threads';
//! KSM: ksmd's, from `/proc/<ksmd>/schedstat`), the checker's mismatches (must be 0) and
//! its write throughput (pages written per TSC cycle spent writing, in the guest)
//! relative to no engine. Both engines run flat out (PageONE passes back to back, KSM
//! `sleep_millisecs=0`, `pages_to_scan=4096`), as in `examples/ksm_vs_pageone.rs`.
//!
//! Needs `/dev/kvm`, the guest (target `x86_64-unknown-none`), root (userfaultfd with
//! kernel faults, KSM's sysfs knobs) and no other KSM user; says what is missing and
//! skips that set-up otherwise. Run with
//! `cargo run --release -p kvm-vmm --example engines_on_kvm -- [--vms 4] [--mib 64]
//! [--rounds 8] [--stride 8] [--period 1024] [--reps 1]`.

use std::collections::HashMap;
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_vmm::workload::{Checker, CheckerReport};
use kvm_vmm::{abi, guest_image, kvm_usable, run_all, CallHook, GuestImage, Vm};
use page_memory::linux::LinuxMemory;
use page_memory::vmm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use page_memory::vmm::VmMemoryAdapter;
use page_memory::DomainId;
use pageone::{Config, PageOne};

const KSM: &str = "/sys/kernel/mm/ksm";
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    None,
    PageOne,
    Ksm,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::None => "no engine",
            Setup::PageOne => "PageONE (1 work thread)",
            Setup::Ksm => "KSM",
        }
    }
}

struct Args {
    vms: u64,
    mib: u64,
    rounds: u64,
    stride: u64,
    period: u64,
    reps: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        vms: 4,
        mib: 64,
        rounds: 8,
        stride: 8,
        period: 1024,
        reps: 1,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v: u64 = argv
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} needs a number", argv[i]));
        match argv[i].as_str() {
            "--vms" => a.vms = v,
            "--mib" => a.mib = v,
            "--rounds" => a.rounds = v,
            "--stride" => a.stride = v,
            "--period" => a.period = v,
            "--reps" => a.reps = v,
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    a
}

fn process_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
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

fn ksm_write(knob: &str, v: &str) -> std::io::Result<()> {
    fs::write(format!("{KSM}/{knob}"), v)
}

fn ksmd_pid() -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "ksmd")
            .then_some(pid)
    })
}

fn ksmd_cpu(pid: u32) -> Duration {
    let ns = fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// `Pss` (bytes) of this process's mappings inside `ranges`.
fn pss(ranges: &[(usize, usize)]) -> u64 {
    let text = fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut total, mut inside) = (0, false);
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let first = f.next().unwrap_or("");
        if !first.ends_with(':') {
            if let Some((s, e)) = first.split_once('-') {
                let s = usize::from_str_radix(s, 16).unwrap_or(0);
                let e = usize::from_str_radix(e, 16).unwrap_or(0);
                inside = ranges.iter().any(|&(a, b)| s < b && e > a);
            }
        } else if inside && first == "Pss:" {
            total += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        }
    }
    total
}

/// KSM's knobs as they were; written back on drop (`run` last).
struct KsmRestore(Vec<(&'static str, String)>);

impl Drop for KsmRestore {
    fn drop(&mut self) {
        for (k, v) in self.0.iter().rev() {
            let _ = ksm_write(k, v);
        }
    }
}

/// What one set-up measured.
#[derive(Clone, Copy, Debug, Default)]
struct Row {
    memory: u64,
    merged: u64,
    zero: u64,
    engine_cpu: Duration,
    run_wall: Duration,
    report: CheckerReport,
}

/// Per barrier round: VMs arrived, and the progress to wait for.
type Arrivals = HashMap<u64, (u64, Option<u64>)>;

/// Reads guest RAM in use (bytes), merged pages and zero-merged pages.
type Measure = Box<dyn Fn() -> (u64, u64, u64) + Send>;

/// Merge passes (PageONE) or full scans (KSM) completed: what the barrier waits for.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

fn run(setup: Setup, a: &Args, image: &GuestImage) -> Result<Row, String> {
    let memory_at_barrier = Arc::new(Mutex::new(0u64));
    let merged_at_barrier = Arc::new(Mutex::new((0u64, 0u64)));
    let arrived: Arc<Mutex<Arrivals>> = Arc::default();
    let measure: Arc<Mutex<Option<Measure>>> = Arc::new(Mutex::new(None));
    let wait_for = match setup {
        Setup::None => 0,
        Setup::PageOne => 10,
        Setup::Ksm => 3,
    };
    let vms_n = a.vms;
    let hook: CallHook = {
        let (arrived, measure) = (arrived.clone(), measure.clone());
        let (mem_at, merged_at) = (memory_at_barrier.clone(), merged_at_barrier.clone());
        Arc::new(move |c| {
            if c.code != abi::CALL_ROUND || c.args.first() != Some(&0) {
                return 0;
            }
            let last = {
                let mut r = arrived.lock().unwrap();
                let e = r.entry(0).or_insert((0, None));
                e.0 += 1;
                if e.0 == vms_n {
                    e.1 = Some(PROGRESS.load(Ordering::Acquire) + wait_for + 1);
                }
                e.0 == vms_n
            };
            let deadline = Instant::now() + Duration::from_secs(300);
            while Instant::now() < deadline {
                let want = arrived.lock().unwrap()[&0].1;
                let have = PROGRESS.load(Ordering::Acquire);
                if want.is_some_and(|w| wait_for == 0 || have >= w) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if last {
                if let Some(m) = &*measure.lock().unwrap() {
                    let (bytes, merged, zero) = m();
                    *mem_at.lock().unwrap() = bytes;
                    *merged_at.lock().unwrap() = (merged, zero);
                }
            }
            0
        })
    };
    let mut vms: Vec<Vm> = (0..a.vms)
        .map(|i| {
            let checker = Checker {
                pages: 0,
                rounds: a.rounds,
                stride: a.stride,
                dup_period: a.period,
                seed: 1000 + i,
                call_rounds: true,
            };
            Vm::new(
                checker
                    .config(format!("vm{i}"), a.mib * MIB)
                    .on_call(hook.clone()),
                image,
            )
            .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let ranges: Vec<(usize, usize)> = vms
        .iter()
        .flat_map(|vm| {
            vm.memory()
                .iter()
                .map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len() as usize))
                .collect::<Vec<_>>()
        })
        .collect();
    PROGRESS.store(0, Ordering::Release);
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = process_cpu();
    let mut ksmd = None;
    let mut _restore = None;
    let mut adapter_guests = None;
    let mut worker = None;
    match setup {
        Setup::None => {
            let r = ranges.clone();
            *measure.lock().unwrap() = Some(Box::new(move || (pss(&r), 0, 0)));
        }
        Setup::PageOne => {
            let memory = LinuxMemory::new()
                .map_err(|e| format!("the Linux backend cannot run here: {e}"))?;
            let adapter = Arc::new(VmMemoryAdapter::new(Arc::new(memory)));
            let mut guests = Vec::new();
            for vm in &vms {
                // SAFETY: nothing in this process remaps, madvises or registers the
                // guests' RAM with another userfaultfd; KVM and the vCPUs read and write it.
                guests.push(
                    unsafe { adapter.adopt(vm.memory(), DomainId(0)) }
                        .map_err(|e| e.to_string())?,
                );
            }
            let engine = Arc::new(
                PageOne::new(adapter.memory().clone(), Config::default().work_threads(1))
                    .map_err(|e| e.to_string())?,
            );
            let (e, ad) = (engine.clone(), adapter.clone());
            *measure.lock().unwrap() = Some(Box::new(move || {
                let s = e.stats();
                let used = ad.memory().usage().map_or(0, |u| u.total_bytes());
                (used, s.pages_sharing, s.zero_pages)
            }));
            let st = stop.clone();
            worker = Some(std::thread::spawn(move || {
                while !st.load(Ordering::Acquire) {
                    engine.merge_pass();
                    PROGRESS.fetch_add(1, Ordering::Release);
                }
            }));
            adapter_guests = Some((adapter, guests));
        }
        Setup::Ksm => {
            let pid = ksmd_pid().ok_or("no ksmd (a kernel without KSM)")?;
            if ksm_num("run") != 0 || ksm_num("pages_sharing") != 0 {
                return Err("KSM is in use by someone else (run != 0 or pages merged)".into());
            }
            let knobs = ["run", "sleep_millisecs", "pages_to_scan", "use_zero_pages"];
            _restore = Some(KsmRestore(
                knobs.iter().map(|&k| (k, ksm_read(k))).collect(),
            ));
            for &(base, end) in &ranges {
                // SAFETY: guest RAM of our VMs; MADV_MERGEABLE only lets ksmd merge it.
                if unsafe {
                    libc::madvise(base as *mut libc::c_void, end - base, libc::MADV_MERGEABLE)
                } != 0
                {
                    return Err(format!(
                        "MADV_MERGEABLE: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            let set = |k: &str, v: &str| {
                ksm_write(k, v).map_err(|e| format!("KSM's {k} (needs root): {e}"))
            };
            set("sleep_millisecs", "0")?;
            set("pages_to_scan", "4096")?;
            set("use_zero_pages", "1")?;
            set("run", "1")?;
            let r = ranges.clone();
            *measure.lock().unwrap() = Some(Box::new(move || {
                (pss(&r), ksm_num("pages_sharing"), ksm_num("ksm_zero_pages"))
            }));
            let st = stop.clone();
            let scans0 = ksm_num("full_scans");
            worker = Some(std::thread::spawn(move || {
                while !st.load(Ordering::Acquire) {
                    PROGRESS.store(
                        ksm_num("full_scans").saturating_sub(scans0),
                        Ordering::Release,
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
            ksmd = Some((pid, ksmd_cpu(pid)));
        }
    }
    let t0 = Instant::now();
    let results = run_all(&mut vms, Duration::from_secs(600));
    let run_wall = t0.elapsed();
    stop.store(true, Ordering::Release);
    if let Some(w) = worker {
        let _ = w.join();
    }
    let (merged, zero) = *merged_at_barrier.lock().unwrap();
    let mut row = Row {
        memory: *memory_at_barrier.lock().unwrap(),
        merged,
        zero,
        run_wall,
        ..Row::default()
    };
    let mut vcpu_cpu = Duration::ZERO;
    for r in results {
        let out = r.map_err(|e| e.to_string())?;
        vcpu_cpu += out.vcpu_cpu;
        let rep = Checker::report(&out).ok_or("no checker report")?;
        row.report.vcpus += rep.vcpus;
        row.report.checked += rep.checked;
        row.report.rewritten += rep.rewritten;
        row.report.mismatched += rep.mismatched;
        row.report.write_cycles += rep.write_cycles;
        row.report.total_cycles += rep.total_cycles;
        row.report.pages += rep.pages;
        row.report.fill_cycles += rep.fill_cycles;
    }
    row.engine_cpu = match (setup, ksmd) {
        (Setup::Ksm, Some((pid, c0))) => ksmd_cpu(pid).saturating_sub(c0),
        (Setup::PageOne, _) => (process_cpu() - cpu0).saturating_sub(vcpu_cpu),
        _ => Duration::ZERO,
    };
    if setup == Setup::Ksm {
        let _ = ksm_write("run", "2");
        let t = Instant::now();
        while ksm_num("pages_shared") + ksm_num("pages_sharing") > 0
            && t.elapsed() < Duration::from_secs(120)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some((adapter, guests)) = adapter_guests {
        for g in guests {
            adapter.release(g).map_err(|e| e.to_string())?;
        }
    }
    Ok(row)
}

fn main() {
    let a = parse_args();
    if let Err(e) = kvm_usable() {
        println!("SKIPPED: KVM is not usable here: {e}");
        return;
    }
    let image = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            println!("SKIPPED: {e}");
            return;
        }
    };
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} VMs x {} MiB, 1 vCPU each; checker over the whole data area, generation 0 \
         repeating every {} pages in every VM; {} rounds rewriting 1/{} each; {} rep(s); \
         load before: {}",
        a.vms,
        a.mib,
        a.period,
        a.rounds,
        a.stride,
        a.reps,
        load.trim()
    );
    let setups = [Setup::None, Setup::PageOne, Setup::Ksm];
    let mut rows: Vec<(Setup, Vec<Row>)> = setups.iter().map(|&s| (s, Vec::new())).collect();
    for rep in 0..a.reps {
        for (s, out) in rows.iter_mut() {
            match run(*s, &a, &image) {
                Ok(r) => {
                    eprintln!("rep {rep} {}: {r:?}", s.name());
                    out.push(r)
                }
                Err(e) => println!("{}: SKIPPED: {e}", s.name()),
            }
        }
    }
    let base = |f: fn(&CheckerReport) -> f64| {
        rows[0].1.iter().map(|r| f(&r.report)).sum::<f64>() / rows[0].1.len().max(1) as f64
    };
    let (fill0, rewrite0) = (
        base(CheckerReport::fill_pages_per_mcycle),
        base(CheckerReport::rewrite_pages_per_mcycle),
    );
    println!();
    println!(
        "| set-up | guest RAM at convergence | merged pages | zero pages | engine CPU | \
         run wall | mismatches | guest write throughput vs no engine: fill / rewrites |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (s, rs) in &rows {
        if rs.is_empty() {
            continue;
        }
        let n = rs.len() as f64;
        let avg = |f: &dyn Fn(&Row) -> f64| rs.iter().map(f).sum::<f64>() / n;
        println!(
            "| {} | {:.1} MiB | {:.0} | {:.0} | {:.2} s ({:.0} % of the run) | {:.2} s | {} | {:.3} / {:.3} |",
            s.name(),
            avg(&|r| r.memory as f64) / MIB as f64,
            avg(&|r| r.merged as f64),
            avg(&|r| r.zero as f64),
            avg(&|r| r.engine_cpu.as_secs_f64()),
            avg(&|r| 100.0 * r.engine_cpu.as_secs_f64() / r.run_wall.as_secs_f64()),
            avg(&|r| r.run_wall.as_secs_f64()),
            rs.iter().map(|r| r.report.mismatched).sum::<u64>(),
            avg(&|r| r.report.fill_pages_per_mcycle()) / fill0,
            avg(&|r| r.report.rewrite_pages_per_mcycle()) / rewrite0,
        );
    }
}
