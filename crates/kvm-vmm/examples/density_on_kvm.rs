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
//! The runs are `kvm_vmm::density::run` (which the repository's density demo also runs
//! with `--kvm`): the guests wait at a barrier after boot and after every step, all VMs
//! together, until the engine has had its say (counted in its own passes): after boot,
//! until it converged (PageONE: 10 merge passes; KSM: 3 full scans; PPR: 2 recycler
//! passes; PPR + PageONE: 10 passes); after a step, one engine period (PageONE: 1 merge
//! pass; KSM: 1 full scan; PPR: 2 recycler passes; PPR + PageONE: 2 passes, base or
//! merge, in which the recycler runs); no engine: no wait. Memory is sampled at every
//! barrier, with the guests held.
//!
//! The engines run periodically, as deployed: PageONE's passes are driven like its
//! daemon (`PageOne::start`) by a thread that counts them: a merge pass every
//! `--merge-ms` (PageONE alone), or with the recycler as its hook a pass every
//! `--base-ms`, every `merge-ms / base-ms`-th of them a merge pass; the recycler alone
//! passes every `--reclaim-ms`; KSM `sleep_millisecs` = `--ksm-sleep-ms`,
//! `pages_to_scan` = `--ksm-pages`, `use_zero_pages=1`. `--threads` PageONE work threads
//! (default 1). `--idle N` adds N steps per cycle in which the application holds
//! nothing (default 0: the cycle is the spike).
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
//! [--steps 4] [--idle 0] [--cycles 2] [--reps 1] [--threads 1]`.

mod common;

use kvm_vmm::density::{self, Params, Row, Setup};
use kvm_vmm::harness::guest_or_skip;
use kvm_vmm::host::load_average;
use kvm_vmm::ksm;
use kvm_vmm::workload::Density;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn parse_args() -> (Params, u64) {
    let mut a = Params::default();
    let mut reps = 1;
    let mut threads = a.threads as u64;
    common::parse_flags(&mut [
        ("--vms", &mut a.vms),
        ("--mib", &mut a.mib),
        ("--steps", &mut a.steps),
        ("--idle", &mut a.idle),
        ("--cycles", &mut a.cycles),
        ("--reps", &mut reps),
        ("--threads", &mut threads),
        ("--base-ms", &mut a.base_ms),
        ("--merge-ms", &mut a.merge_ms),
        ("--reclaim-ms", &mut a.reclaim_ms),
        ("--ksm-sleep-ms", &mut a.ksm_sleep_ms),
        ("--ksm-pages", &mut a.ksm_pages),
    ]);
    a.threads = threads as usize;
    (a, reps)
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
    let (a, reps) = parse_args();
    let Some(image) = guest_or_skip() else { return };
    let plan = Density {
        idle: a.idle,
        ..Density::plan(a.mib * MIB, a.steps, a.cycles)
    };
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
        reps,
        load_average()
    );
    let rows = common::run_reps(
        &Setup::ALL,
        reps,
        Setup::name,
        |s| {
            let r = density::run(s, &a, &image)?;
            if r.ksm_stopped != 0 {
                return Err(format!(
                    "KSM was stopped or reconfigured by another process during the run ({} \
                     samples)",
                    r.ksm_stopped
                ));
            }
            Ok(r)
        },
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
