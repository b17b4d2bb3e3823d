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
//! [--rounds 8] [--stride 8] [--period 1024] [--reps 1] [--unchanged-first 0]`.
//! `--unchanged-first 1` turns PageONE's `Config::unchanged_before_protect` on (pages are
//! protected only once a pass found them unchanged since the previous one).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::harness::{self, guest_or_skip, linux_adapter, Worker};
use kvm_vmm::host::{load_average, process_cpu, process_run_time, pss};
use kvm_vmm::ksm;
use kvm_vmm::workload::{Checker, CheckerReport};
use kvm_vmm::{abi, run_all, CallHook, GuestImage, Vm};
use page_memory::DomainId;
use pageone::{Config, PageOne};

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
    unchanged_first: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        vms: 4,
        mib: 64,
        rounds: 8,
        stride: 8,
        period: 1024,
        reps: 1,
        unchanged_first: 0,
    };
    common::parse_flags(&mut [
        ("--vms", &mut a.vms),
        ("--mib", &mut a.mib),
        ("--rounds", &mut a.rounds),
        ("--stride", &mut a.stride),
        ("--period", &mut a.period),
        ("--reps", &mut a.reps),
        ("--unchanged-first", &mut a.unchanged_first),
    ]);
    a
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

/// Reads guest RAM in use (bytes), merged pages and zero-merged pages.
type Measure = Box<dyn Fn() -> (u64, u64, u64) + Send>;

fn run(setup: Setup, a: &Args, image: &GuestImage) -> Result<Row, String> {
    let memory_at_barrier = Arc::new(Mutex::new(0u64));
    let merged_at_barrier = Arc::new(Mutex::new((0u64, 0u64)));
    // Merge passes (PageONE) or full scans (KSM) completed: what the barrier waits for.
    let progress = Arc::new(AtomicU64::new(0));
    // All the VMs (1 vCPU each) after the fill.
    let barrier = Arc::new(RoundBarrier::new(a.vms as u32, Duration::from_secs(300)));
    let measure: Arc<Mutex<Option<Measure>>> = Arc::new(Mutex::new(None));
    let wait_for = match setup {
        Setup::None => 0,
        Setup::PageOne => 10,
        Setup::Ksm => 3,
    };
    let hook: CallHook = {
        let (barrier, progress, measure) = (barrier.clone(), progress.clone(), measure.clone());
        let (mem_at, merged_at) = (memory_at_barrier.clone(), merged_at_barrier.clone());
        Arc::new(move |c| {
            if c.code != abi::CALL_ROUND || c.args.first() != Some(&0) {
                return 0;
            }
            let p = || progress.load(Ordering::Acquire);
            barrier.wait(0, wait_for, &p, &mut || {
                if let Some(m) = &*measure.lock().unwrap() {
                    let (bytes, merged, zero) = m();
                    *mem_at.lock().unwrap() = bytes;
                    *merged_at.lock().unwrap() = (merged, zero);
                }
            });
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
    let ranges = harness::host_ranges(&vms);
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
            let adapter = linux_adapter()?;
            let mut guests = Vec::new();
            for vm in &vms {
                // SAFETY: nothing in this process remaps, madvises or registers the
                // guests' RAM with another userfaultfd; KVM and the vCPUs read and write it.
                guests.push(unsafe { harness::adopt(&adapter, vm, DomainId(0)) }?);
            }
            let engine = Arc::new(
                PageOne::new(
                    adapter.memory().clone(),
                    Config::default()
                        .work_threads(1)
                        .unchanged_before_protect(a.unchanged_first != 0),
                )
                .map_err(|e| e.to_string())?,
            );
            let (e, ad) = (engine.clone(), adapter.clone());
            *measure.lock().unwrap() = Some(Box::new(move || {
                let s = e.stats();
                let used = ad.memory().usage().map_or(0, |u| u.total_bytes());
                (used, s.pages_sharing, s.zero_pages)
            }));
            let progress = progress.clone();
            worker = Some(
                Worker::spawn("pageone-merge", (), move |_| {
                    engine.merge_pass();
                    progress.fetch_add(1, Ordering::Release);
                })
                .map_err(|e| e.to_string())?,
            );
            adapter_guests = Some((adapter, guests));
        }
        Setup::Ksm => {
            let pid = ksm::ksmd()?;
            _restore = Some(ksm::claim(&ranges)?);
            ksm::set("sleep_millisecs", "0")?;
            ksm::set("pages_to_scan", "4096")?;
            ksm::set("use_zero_pages", "1")?;
            ksm::set("run", "1")?;
            let r = ranges.clone();
            *measure.lock().unwrap() = Some(Box::new(move || {
                (
                    pss(&r),
                    ksm::num("pages_sharing"),
                    ksm::num("ksm_zero_pages"),
                )
            }));
            worker = Some(ksm::count_full_scans(progress.clone()).map_err(|e| e.to_string())?);
            ksmd = Some((pid, process_run_time(pid)));
        }
    }
    let t0 = Instant::now();
    let results = run_all(&mut vms, Duration::from_secs(600));
    let run_wall = t0.elapsed();
    if let Some(w) = worker {
        w.stop();
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
        (Setup::Ksm, Some((pid, c0))) => process_run_time(pid).saturating_sub(c0),
        (Setup::PageOne, _) => (process_cpu() - cpu0).saturating_sub(vcpu_cpu),
        _ => Duration::ZERO,
    };
    if setup == Setup::Ksm {
        ksm::unmerge(Duration::from_secs(120));
    }
    if let Some((adapter, guests)) = adapter_guests {
        harness::release(&adapter, guests)?;
    }
    Ok(row)
}

fn main() {
    let a = parse_args();
    let Some(image) = guest_or_skip() else { return };
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
        load_average()
    );
    let rows = common::run_reps(
        &[Setup::None, Setup::PageOne, Setup::Ksm],
        a.reps,
        Setup::name,
        |s| run(s, &a, &image),
        |rep, s, r| eprintln!("rep {rep} {}: {r:?}", s.name()),
    );
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
