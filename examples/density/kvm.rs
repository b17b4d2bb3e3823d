//! `--kvm`: the same experiment on real guests: VMs of the workspace's test VMM
//! (`crates/kvm-vmm`, on KVM) running its bare-metal guest's density workload, whose
//! vCPUs write guest RAM through KVM's page tables. The runs are `kvm_vmm::density::run`
//! (also behind `cargo run -p kvm-vmm --example density_on_kvm`); this module maps the
//! demo's workload, set-ups and clock onto them and their samples back onto the demo's
//! results, so the tables and the plot are the demo's own.
//!
//! The mapping: every VM runs the guest's density workload with the demo's fractions
//! (OS image 5 %, private 3.5 %, zeroed 2 %, application peak 75 %) and the demo's
//! spike (4 steps up and as many down, then idle steps to the end of the
//! 30-minute application period: the same 3.7 % on average), each VM at its demo phase
//! rounded to a step. The guests step together: each step is a barrier round of all
//! VMs, released on the compressed clock (a step of simulated time per round, paced on
//! the wall clock; later when the guests or the engine's faults slow them down), and
//! memory is sampled at every round with the guests held. The engines run on their own
//! periods meanwhile, as in the demo: raw has none; KSM-like is Linux KSM itself
//! (`MADV_MERGEABLE` on the guest RAM, `pages_to_scan` 100, `sleep_millisecs` 0, as in
//! 2017, `use_zero_pages` 1); PPR + PageONE is PageONE over the guest RAM adopted by the
//! Linux backend, with the recycler (the guests' PIP pools, in their RAM, registered
//! through port I/O) inside its passes, a pass every reclaim period and every
//! merge-period's worth of them a merge pass.
//!
//! Memory in use: the Linux backend's usage (the guests' private memory and the
//! canonical store) plus PageONE's metadata with PPR + PageONE; the distinct physical
//! pages mapped in the guest RAM (`/proc/self/pagemap`) otherwise. The PIP pools are in
//! guest RAM, counted there.

use crate::demo::Report;
use crate::options::Options;

/// Why this build cannot run `--kvm`.
#[cfg(not(kvm_vmm))]
const NO_VMM: &str = "--kvm runs the guests on kvm-vmm, the workspace's test VMM and \
     bare-metal guest, which this build does not include (it is not published: run the \
     demo from a clone of the repository, on Linux):\n\n    \
     cargo run --release --example density -- --kvm";

/// Whether `--kvm` can run here; if not, exactly what is missing.
pub fn check() -> Result<(), String> {
    #[cfg(not(kvm_vmm))]
    return Err(NO_VMM.into());
    #[cfg(kvm_vmm)]
    on_kvm::check()
}

/// Runs the demo on real guests ([`check`] says whether it can).
pub fn run_all(opts: &Options) -> Result<Report, String> {
    #[cfg(not(kvm_vmm))]
    {
        let _ = opts;
        Err(NO_VMM.into())
    }
    #[cfg(kvm_vmm)]
    {
        on_kvm::check()?;
        crate::demo::run_on::<on_kvm::Kvm>(opts)
    }
}

#[cfg(kvm_vmm)]
mod on_kvm {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use kvm_vmm::density::{self, Pace, Params, Sample};
    use kvm_vmm::host::process_run_time;
    use kvm_vmm::{guest_image, ksm, kvm_usable};

    /// Steps up (and as many down) of each application spike.
    pub const SPIKE_STEPS: u64 = 4;

    use crate::cpu;
    use crate::demo::Backend;
    use crate::engine::{Counters, Setup, KSM_PAGES_TO_SCAN};
    use crate::plan::{Clock, APP_PERIOD_S, MEASURE_S, WARMUP_S};
    use crate::progress::Progress;
    use crate::run::{RunParams, RunResult, Sample as DemoSample, ThreadCpu};
    use crate::workload::GuestStats;

    /// Whether KVM, the guest, the Linux backend (kernel faults) and Linux KSM (free,
    /// and its knobs writable) are here; if not, what is missing.
    pub fn check() -> Result<(), String> {
        kvm_usable().map_err(|e| {
            format!(
                "KVM is not usable here: {e}.\n--kvm boots real guests: it needs a readable \
                 and writable /dev/kvm. The simulated demo (without --kvm) runs anywhere."
            )
        })?;
        guest_image().map_err(|e| format!("{e}"))?;
        kvm_vmm::harness::linux_adapter().map_err(|e| {
            format!(
                "{e}.\n--kvm runs PPR + PageONE over the guests' RAM adopted by the Linux \
                 backend, whose vCPU writes need userfaultfd with kernel faults (root or \
                 CAP_SYS_PTRACE, Linux 5.19 or later)"
            )
        })?;
        ksm::ksmd()?;
        if ksm::num("run") != 0 || ksm::num("pages_sharing") != 0 {
            return Err(
                "Linux KSM is in use by someone else (run != 0 or pages merged): \
                 --kvm's KSM-like run needs it to itself"
                    .into(),
            );
        }
        ksm::write("run", "0").map_err(|e| {
            format!("--kvm's KSM-like run sets Linux KSM's knobs, which needs root: {e}")
        })?;
        Ok(())
    }

    /// Real guests on KVM.
    pub struct Kvm;

    /// The steps of an application period, and the simulated seconds of one.
    fn steps(spike_s: f64) -> (u64, f64) {
        let step_s = spike_s / (2 * SPIKE_STEPS) as f64;
        let period = ((APP_PERIOD_S / step_s).round() as u64).max(2 * SPIKE_STEPS);
        (period, APP_PERIOD_S / period as f64)
    }

    /// What the main thread learns at the rounds.
    #[derive(Default)]
    struct Window {
        /// At the first sample in the window: when, the threads' CPU, ksmd's, the
        /// sample.
        start: Option<(Instant, HashMap<u32, cpu::ThreadTime>, Duration, Sample)>,
        /// The same at the last sample in the window.
        end: Option<(Instant, HashMap<u32, cpu::ThreadTime>, Duration, Sample)>,
    }

    impl Backend for Kvm {
        fn name() -> &'static str {
            "REAL GUESTS on KVM: kvm-vmm's VMM (kvm-ioctls, vm-memory) and bare-metal guest, \
             1 vCPU per VM, guest RAM a private anonymous GuestMemoryMmap (PPR + PageONE: \
             adopted by the Linux backend, userfaultfd write-protect; KSM-like: Linux KSM \
             itself)"
        }

        fn short() -> &'static str {
            "real guests on KVM"
        }

        fn measure() -> &'static str {
            "the Linux backend's usage (the guests' private memory + the canonical store) + \
             PageONE's metadata with PPR + PageONE; otherwise the distinct physical pages \
             mapped in the guest RAM (/proc/self/pagemap). PIP pools are in guest RAM"
        }

        fn sampled() -> String {
            "at every step of the guests (a barrier of all VMs, guests held)".into()
        }

        fn describe(setup: &Setup, clock: &Clock, threads: usize) -> String {
            match setup {
                Setup::KsmLike => format!(
                    "Linux KSM itself (ksmd; MADV_MERGEABLE on the guest RAM), pages_to_scan \
                     = {KSM_PAGES_TO_SCAN}, sleep_millisecs = 0 (as in 2017), use_zero_pages = 1"
                ),
                Setup::PprPageOne { .. } => format!(
                    "{}; the passes driven by one thread (pageone-driver, the \"daemon\")",
                    setup.describe(clock, threads)
                ),
                Setup::Raw => setup.describe(clock, threads),
            }
        }

        fn run(
            setup: Setup,
            p: &RunParams<'_>,
            progress: &mut Progress,
        ) -> Result<RunResult, String> {
            let image = guest_image().map_err(|e| e.to_string())?;
            let w = p.workload;
            let (period, step_s) = steps(w.spike_s);
            let end_s = WARMUP_S + MEASURE_S;
            let rounds = (end_s / step_s).ceil() as u64;
            let cycles = rounds.div_ceil(period);
            // The guest holds tri((t + phase) % period); the demo's VM at phase `ph`
            // starts its spike at t = ph.
            let phases = w
                .phases
                .iter()
                .map(|ph| (period - (ph / step_s).round() as u64 % period) % period)
                .collect();
            let ksmd = if setup == Setup::KsmLike {
                Some(ksm::ksmd()?)
            } else {
                None
            };
            let window: Arc<Mutex<Window>> = Arc::default();
            let live = Arc::new(Mutex::new(std::mem::replace(
                progress,
                Progress::new(false),
            )));
            let total = p.clock.wall(end_s);
            let on_round: density::OnRound = {
                let (window, live) = (window.clone(), live.clone());
                Arc::new(move |round, s: &Sample| {
                    let t = round as f64 * step_s;
                    if t > end_s {
                        return;
                    }
                    let snap = || {
                        (
                            Instant::now(),
                            cpu::snapshot(),
                            ksmd.map_or(Duration::ZERO, process_run_time),
                            *s,
                        )
                    };
                    let mut win = window.lock().unwrap();
                    if t >= WARMUP_S {
                        if win.start.is_none() {
                            win.start = Some(snap());
                        }
                        win.end = Some(snap());
                    }
                    live.lock().unwrap().update(
                        &setup,
                        total.mul_f64((t / end_s).clamp(0.0, 1.0)),
                        total,
                        t,
                        s.memory() + s.metadata,
                        counters(s),
                    );
                })
            };
            let params = Params {
                vms: w.vms as u64,
                mib: (w.pages / 256) as u64,
                steps: SPIKE_STEPS,
                idle: period - 2 * SPIKE_STEPS,
                cycles,
                phases: Some(phases),
                threads: p.threads,
                base_ms: ms(p.clock.wall(reclaim(setup))),
                merge_ms: ms(p.clock.wall(merge(setup))),
                reclaim_ms: 50,
                ksm_sleep_ms: 0,
                ksm_pages: KSM_PAGES_TO_SCAN as u64,
                waits: Some((0, 0)),
                pace: Some(Pace {
                    every: p.clock.wall(step_s),
                    rounds,
                }),
                on_round: Some(on_round),
            };
            let kvm_setup = match setup {
                Setup::Raw => density::Setup::None,
                Setup::KsmLike => density::Setup::Ksm,
                Setup::PprPageOne { .. } => density::Setup::PprPageOne,
            };
            let row = density::run(kvm_setup, &params, &image);
            *progress = std::mem::replace(&mut *live.lock().unwrap(), Progress::new(false));
            progress.done();
            let row = row?;
            if row.ksm_stopped != 0 {
                return Err(format!(
                    "{}: Linux KSM was stopped or reconfigured by another process during the \
                     run ({} of {} samples found its run knob not 1): its figures would not \
                     be KSM's; run again when nothing else uses KSM",
                    setup.name(),
                    row.ksm_stopped,
                    row.rounds.len()
                ));
            }
            if row.report.corrupt != 0 {
                return Err(format!(
                    "{}: the guests found {} corrupt pages",
                    setup.name(),
                    row.report.corrupt
                ));
            }
            let samples: Vec<DemoSample> = row
                .rounds
                .iter()
                .map(|(r, s)| DemoSample {
                    t: *r as f64 * step_s,
                    bytes: s.memory() + s.metadata,
                })
                .filter(|s| s.t <= end_s)
                .collect();
            let summary = crate::run::window(&samples);
            let win = std::mem::take(&mut *window.lock().unwrap());
            let (Some(start), Some(end)) = (win.start, win.end) else {
                return Err("the guests never reached the measured window".into());
            };
            let wall = (end.0 - start.0).as_secs_f64().max(1e-9);
            let pct = |d: Duration| 100.0 * d.as_secs_f64() / wall;
            let mut cpu = Vec::new();
            if ksmd.is_some() {
                cpu.push(ThreadCpu {
                    role: "ksmd",
                    percent: pct(end.2.saturating_sub(start.2)),
                });
            }
            for (role, prefix) in [
                ("worker", "pageone-worker"),
                ("daemon", "pageone-driver"),
                ("fault", "page-memory-uff"),
            ] {
                for (_, spent) in cpu::spent(&start.1, &end.1, &[prefix]) {
                    cpu.push(ThreadCpu {
                        role,
                        percent: pct(spent),
                    });
                }
            }
            let rep = &row.report;
            let diagnostics = format!(
                "KVM: {} VMs x 1 vCPU, {} rounds of {:.1} simulated s ({:.0} ms paced), \
                 guests released up to {:.0} ms late; the guests checked every page: {} \
                 allocations read zeros, {} their last contents, {} corrupt; engine CPU over \
                 the whole run {:.2} s",
                w.vms,
                rounds,
                step_s,
                p.clock.wall(step_s).as_secs_f64() * 1e3,
                row.max_late.as_secs_f64() * 1e3,
                rep.zeros,
                rep.intact,
                rep.corrupt,
                row.engine_cpu.as_secs_f64()
            );
            Ok(RunResult {
                setup,
                mean: summary.mean,
                sd: summary.sd,
                peak: summary.peak,
                low: summary.low,
                cpu,
                merges: end.3.merges.saturating_sub(start.3.merges),
                recycled: end.3.recycled.saturating_sub(start.3.recycled),
                metadata: row.end.metadata,
                pools: 0,
                guests: GuestStats {
                    allocs: rep.allocs,
                    frees: rep.frees,
                    failed: 0,
                    not_offered: rep.not_offered,
                    busy: rep.busy,
                    max_step: row.max_late,
                },
                pass_every: {
                    // Passes over every page in the window, as the demo counts them.
                    let all = w.vms as f64 * w.pages as f64;
                    let passes = end.3.scanned.saturating_sub(start.3.scanned) as f64 / all;
                    (passes >= 1.0).then(|| (end.0 - start.0).div_f64(passes))
                },
                samples,
                diagnostics: Some(diagnostics),
            })
        }
    }

    fn counters(s: &Sample) -> Counters {
        Counters {
            merges: s.merges,
            recycled: s.recycled,
            metadata: s.metadata,
            scanned: s.scanned,
        }
    }

    fn ms(d: Duration) -> u64 {
        (d.as_millis() as u64).max(1)
    }

    fn reclaim(setup: Setup) -> f64 {
        match setup {
            Setup::PprPageOne { reclaim_s, .. } => reclaim_s,
            _ => 10.0,
        }
    }

    fn merge(setup: Setup) -> f64 {
        match setup {
            Setup::PprPageOne { merge_s, .. } => merge_s,
            _ => 600.0,
        }
    }
}
