//! The density experiment on real vCPUs: VMs running the guest's density workload
//! ([`Density`]) under one set-up ([`Setup`]: no engine, Linux KSM, PageONE, the Per
//! Page Recycler, PPR + PageONE), memory sampled at every barrier round with the guests
//! held. What `examples/density_on_kvm.rs` tabulates and what the repository's density
//! demo (`cargo run --release --example density -- --kvm`) turns into its own table and
//! plot.
//!
//! The guests wait at a barrier after boot and after every step, all VMs together, and
//! the last to arrive holds them until the engine has had its say, counted in its own
//! passes ([`Params::waits`]; by default [`Setup::waits`]), and, if [`Params::pace`] is
//! set, until the round's time on a wall clock ([`Pace`]): engines that run on their
//! own periods then see the guests change at a fixed rate, as in the demo's compressed
//! time.
//!
//! The engines run periodically, as deployed: PageONE's passes are driven like its
//! daemon (`PageOne::start`) by a thread of this module, `pageone-driver`, that counts
//! them: a base pass every [`Params::base_ms`] (only with a hook: the recycler), a merge
//! pass every [`Params::merge_ms`] (counted in base periods: a merge pass replaces every
//! `merge_ms / base_ms`-th pass); the recycler alone passes every
//! [`Params::reclaim_ms`] (thread `ppr-recycler`); KSM `sleep_millisecs` =
//! [`Params::ksm_sleep_ms`], `pages_to_scan` = [`Params::ksm_pages`], `use_zero_pages=1`.
//!
//! Engine CPU is the run time (`/proc/.../schedstat`) of the engine's own threads:
//! PageONE's work threads, the pass-driving thread, the Linux backend's userfaultfd
//! fault thread (every first write to a protected page is resolved there) and the
//! recycler's thread; KSM: ksmd. Not included for either: the faults' cost in the
//! faulting vCPU threads, which shows in the guests' progress.
//!
//! Needs `/dev/kvm`, the guest, root (userfaultfd with kernel faults, KSM's sysfs
//! knobs) and, for KSM, no other KSM user: [`run`] says what is missing.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use page_memory::DomainId;
use pageone::{Config, PageOne};

use crate::barrier::RoundBarrier;
use crate::harness::{self, linux_adapter, PoolRegistry, Worker};
use crate::host::{process_run_time, pss, schedstat};
use crate::ksm;
use crate::workload::{Density, DensityReport};
use crate::{abi, run_all, CallHook, GuestImage, Vm};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A set-up of the experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// No engine; the guests' PPR hooks disabled.
    None,
    /// Linux KSM (`MADV_MERGEABLE` on the guest RAM).
    Ksm,
    /// PageONE (merge passes only).
    PageOne,
    /// The Per Page Recycler alone, on its own thread.
    Ppr,
    /// PageONE with the recycler inside its scan (`PageOne::with_hook`).
    PprPageOne,
}

impl Setup {
    /// Every set-up, in the order of the tables.
    pub const ALL: [Setup; 5] = [
        Setup::None,
        Setup::Ksm,
        Setup::PageOne,
        Setup::Ppr,
        Setup::PprPageOne,
    ];

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Setup::None => "no engine",
            Setup::Ksm => "KSM",
            Setup::PageOne => "PageONE",
            Setup::Ppr => "PPR recycler",
            Setup::PprPageOne => "PPR + PageONE",
        }
    }

    /// Whether the guests' PIP pools are registered (their hooks enabled).
    pub fn ppr(self) -> bool {
        matches!(self, Setup::Ppr | Setup::PprPageOne)
    }

    /// Engine progress to wait for after boot and after a step: PageONE 10 merge passes
    /// and 1; KSM 3 full scans and 1; PPR 2 recycler passes and 2; PPR + PageONE 10
    /// passes (base or merge) and 2; no engine: no wait.
    pub fn waits(self) -> (u64, u64) {
        match self {
            Setup::None => (0, 0),
            Setup::Ksm => (3, 1),
            Setup::PageOne => (10, 1),
            Setup::Ppr => (2, 2),
            Setup::PprPageOne => (10, 2),
        }
    }
}

/// A hook called with the guests held at every barrier round, with the round and its
/// sample.
pub type OnRound = Arc<dyn Fn(u64, &Sample) + Send + Sync>;

/// Pacing of the rounds on the wall clock: round `r` (up to `rounds`) is released no
/// earlier than `r * every` after round 0; later rounds as soon as the engine waits
/// allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// Wall time per round.
    pub every: Duration,
    /// The last paced round.
    pub rounds: u64,
}

/// What to run.
#[derive(Clone)]
pub struct Params {
    /// VMs.
    pub vms: u64,
    /// Memory of each VM, MiB.
    pub mib: u64,
    /// Steps up (and as many down) of the application's spike.
    pub steps: u64,
    /// Steps per cycle after the spike, holding nothing.
    pub idle: u64,
    /// Application cycles.
    pub cycles: u64,
    /// Each VM's phase in steps (`None`: VM `i` at `i * period / vms`).
    pub phases: Option<Vec<u64>>,
    /// PageONE work threads.
    pub threads: usize,
    /// PageONE's base period (with the recycler as its hook), ms.
    pub base_ms: u64,
    /// PageONE's merge period, ms.
    pub merge_ms: u64,
    /// The recycler's period when alone, ms.
    pub reclaim_ms: u64,
    /// KSM's `sleep_millisecs`.
    pub ksm_sleep_ms: u64,
    /// KSM's `pages_to_scan`.
    pub ksm_pages: u64,
    /// Engine progress to wait for after boot and after a step (`None`:
    /// [`Setup::waits`]).
    pub waits: Option<(u64, u64)>,
    /// Pacing of the rounds on the wall clock (`None`: released as soon as the engine
    /// waits allow).
    pub pace: Option<Pace>,
    /// Called at every round with the guests held, after the sample.
    pub on_round: Option<OnRound>,
}

impl Default for Params {
    /// 4 VMs × 64 MiB, a spike of 4 steps up and 4 down, no idle steps, 2 cycles; one
    /// PageONE work thread, base 50 ms, merge 200 ms, recycler 50 ms, KSM 20 ms × 4096
    /// pages.
    fn default() -> Self {
        Params {
            vms: 4,
            mib: 64,
            steps: 4,
            idle: 0,
            cycles: 2,
            phases: None,
            threads: 1,
            base_ms: 50,
            merge_ms: 200,
            reclaim_ms: 50,
            ksm_sleep_ms: 20,
            ksm_pages: 4096,
            waits: None,
            pace: None,
            on_round: None,
        }
    }
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Params")
            .field("vms", &self.vms)
            .field("mib", &self.mib)
            .field("steps", &self.steps)
            .field("idle", &self.idle)
            .field("cycles", &self.cycles)
            .field("phases", &self.phases)
            .field("threads", &self.threads)
            .field("base_ms", &self.base_ms)
            .field("merge_ms", &self.merge_ms)
            .field("reclaim_ms", &self.reclaim_ms)
            .field("ksm_sleep_ms", &self.ksm_sleep_ms)
            .field("ksm_pages", &self.ksm_pages)
            .field("waits", &self.waits)
            .field("pace", &self.pace)
            .field("on_round", &self.on_round.is_some())
            .finish()
    }
}

impl Params {
    /// Each VM's workload: [`Density::plan`] with these steps, idle steps and cycles, its
    /// own phase and seed.
    pub fn workloads(&self) -> Vec<Density> {
        let plan = Density {
            idle: self.idle,
            ..Density::plan(self.mib * MIB, self.steps, self.cycles)
        };
        (0..self.vms)
            .map(|i| Density {
                phase: match &self.phases {
                    Some(p) => p.get(i as usize).copied().unwrap_or(0),
                    None => i * plan.period() / self.vms.max(1),
                },
                seed: 0xA5A5_0000 + i,
                ..plan
            })
            .collect()
    }
}

/// One sample, taken at a barrier with the guests held.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// `Pss` of the guest RAM's mappings (a mapping that the kernel merged with a
    /// neighbour counts whole).
    pub pss: u64,
    /// Distinct physical pages mapped in the guest RAM, bytes (`/proc/self/pagemap`;
    /// `None` without frame numbers, i.e. not root).
    pub resident: Option<u64>,
    /// The Linux backend's usage (`LinuxUsage::total_bytes`), where there is one.
    pub usage: Option<u64>,
    /// PageONE's metadata, bytes (0 for the others: KSM's is the kernel's).
    pub metadata: u64,
    /// Pages sharing a merged page (beyond the first).
    pub merged: u64,
    /// Pages merged with the zero page.
    pub zero: u64,
    /// Merges so far (PageONE: successful merges, zero-page merges included; KSM: the
    /// pages sharing and zero-merged now).
    pub merges: u64,
    /// Pages recycled so far.
    pub recycled: u64,
    /// Pages PageONE's passes looked at so far (0 for the others).
    pub scanned: u64,
    /// Engine CPU so far.
    pub cpu: Duration,
    /// Wall time since the run started (before the guests booted).
    pub at: Duration,
}

impl Sample {
    /// The memory the guest RAM uses: the backend's usage where there is one (the
    /// guests' private memory plus the canonical store), else the distinct resident
    /// pages (else `Pss`).
    pub fn memory(&self) -> u64 {
        self.usage.or(self.resident).unwrap_or(self.pss)
    }
}

/// What one run of a set-up measured.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// After boot (round 0).
    pub boot: Sample,
    /// After each step (rounds 1 to the last but one).
    pub steps: Vec<Sample>,
    /// After the final frees (the last round).
    pub end: Sample,
    /// Every sample, by round.
    pub rounds: Vec<(u64, Sample)>,
    /// Engine CPU over the whole run.
    pub engine_cpu: Duration,
    /// Wall time of the run (boot to the guests' exit).
    pub run_wall: Duration,
    /// The guests' reports, summed.
    pub report: DensityReport,
    /// Barrier waits for engine progress that gave up.
    pub timeouts: u64,
    /// The most a paced round was released after its time ([`Params::pace`]).
    pub max_late: Duration,
    /// KSM: the samples at which KSM's `run` knob was not 1 (someone else stopped or
    /// reconfigured it during the run: the figures are not KSM's).
    pub ksm_stopped: u64,
}

/// Run time of this process's engine threads (by name: PageONE's work threads, the
/// pass driver, the Linux backend's fault threads, the recycler).
pub fn engine_threads_cpu() -> Duration {
    engine_threads()
        .into_iter()
        .map(|(_, cpu)| cpu)
        .sum::<Duration>()
}

/// The name prefixes of [`engine_threads`]: PageONE's work threads and this module's
/// `pageone-driver`, the Linux backend's fault threads, the recycler's thread.
pub const ENGINE_THREADS: [&str; 3] = ["pageone-", "page-memory-", "ppr-recycler"];

/// Run time so far of each engine thread of this process (name, run time).
pub fn engine_threads() -> Vec<(String, Duration)> {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let comm = comm.trim_end();
            ENGINE_THREADS.iter().any(|p| comm.starts_with(p)).then(|| {
                (
                    comm.to_string(),
                    schedstat(&t.path().join("schedstat").to_string_lossy()),
                )
            })
        })
        .collect()
}

const PFN_MASK: u64 = (1 << 55) - 1;

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
pub fn distinct_resident(ranges: &[(usize, usize)]) -> Option<u64> {
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

type Probe = Box<dyn Fn() -> Sample + Send>;

/// Runs `setup` over new VMs of `image` (the guest of this crate), as `p` says; the
/// error says what is missing (the Linux backend, KSM, ...) or what failed.
pub fn run(setup: Setup, p: &Params, image: &GuestImage) -> Result<Row, String> {
    let mem = p.mib * MIB;
    let workloads = p.workloads();
    let n = workloads.len();
    let last = workloads.first().map_or(1, |w: &Density| w.last_round());
    let (boot_wait, step_wait) = p.waits.unwrap_or(setup.waits());
    let barrier = Arc::new(RoundBarrier::new(n as u32, Duration::from_secs(300)));
    let progress = Arc::new(AtomicU64::new(0));
    let probe: Arc<Mutex<Option<Probe>>> = Arc::default();
    let samples: Arc<Mutex<Vec<(u64, Sample)>>> = Arc::default();
    let pools = Arc::new(PoolRegistry::new(n));
    let recycler = pools.recycler().clone();
    let t_start = Instant::now();
    // When round 0 was released (the pace's origin), and the latest release after its
    // paced time.
    let released0: Arc<OnceLock<Instant>> = Arc::default();
    let max_late: Arc<Mutex<Duration>> = Arc::default();
    let hook = |vm: usize| -> CallHook {
        let (barrier, progress, probe, samples) = (
            barrier.clone(),
            progress.clone(),
            probe.clone(),
            samples.clone(),
        );
        let (pools, released0, max_late) = (pools.clone(), released0.clone(), max_late.clone());
        let (pace, on_round) = (p.pace, p.on_round.clone());
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
                    if let (Some(pace), Some(&t0)) =
                        (pace.filter(|p| round <= p.rounds), released0.get())
                    {
                        let due = t0 + pace.every * round as u32;
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        } else {
                            let mut late = max_late.lock().unwrap();
                            *late = (*late).max(now - due);
                        }
                    }
                    if let Some(probe) = &*probe.lock().unwrap() {
                        let mut s = probe();
                        s.at = t_start.elapsed();
                        samples.lock().unwrap().push((round, s));
                        if let Some(f) = &on_round {
                            f(round, &s);
                        }
                    }
                    if round == 0 {
                        let _ = released0.set(Instant::now());
                    }
                });
                0
            }
            _ => 0,
        })
    };
    let mut vms: Vec<Vm> = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| {
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
    let ksm_stopped = Arc::new(AtomicU64::new(0));
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
        let config = Config::default().work_threads(p.threads.max(1));
        let engine = match setup {
            Setup::PageOne => Some(Arc::new(
                PageOne::new(adapter.memory().clone(), config).map_err(|e| e.to_string())?,
            )),
            Setup::PprPageOne => Some(Arc::new(
                PageOne::with_hook(adapter.memory().clone(), config, recycler.clone())
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
                metadata: s.metadata_bytes,
                merged: s.pages_sharing,
                zero: s.zero_pages,
                merges: s.merges,
                recycled: r.0.read().unwrap().stats().recycled,
                scanned: s.pages_scanned,
                cpu: cpu().saturating_sub(cpu0),
                at: Duration::ZERO,
            }
        }));
        let pr = progress.clone();
        let (base, reclaim) = (
            Duration::from_millis(p.base_ms),
            Duration::from_millis(p.reclaim_ms),
        );
        let merge_every = (p.merge_ms / p.base_ms.max(1)).max(1);
        let driver = match engine.clone() {
            // PageONE's daemon loop, with its passes counted: without a hook, a merge
            // pass every merge period; with one, a base pass every base period, every
            // `merge_every`-th of them a merge pass.
            Some(engine) => {
                let with_hook = setup == Setup::PprPageOne;
                let mut tick = 0u64;
                Worker::spawn("pageone-driver", (), move |_| {
                    let t = Instant::now();
                    if !with_hook || tick % merge_every == 0 {
                        engine.merge_pass();
                    } else {
                        engine.base_pass();
                    }
                    tick += 1;
                    pr.fetch_add(1, Ordering::Release);
                    let period = if with_hook {
                        base
                    } else {
                        base * merge_every as u32
                    };
                    std::thread::sleep(period.saturating_sub(t.elapsed()));
                })
            }
            None => {
                let (r, ad) = (recycler.clone(), adapter.clone());
                Worker::spawn("ppr-recycler", (), move |_| {
                    let t = Instant::now();
                    r.0.read().unwrap().scan_pass(&**ad.memory());
                    pr.fetch_add(1, Ordering::Release);
                    std::thread::sleep(reclaim.saturating_sub(t.elapsed()));
                })
            }
        }
        .map_err(|e| e.to_string())?;
        threads.push(driver);
        engine_keep = engine;
        adopted = Some((adapter, guests));
    } else if setup == Setup::Ksm {
        restore = Some(ksm::claim(&ranges)?);
        ksm::set("sleep_millisecs", &p.ksm_sleep_ms.to_string())?;
        ksm::set("pages_to_scan", &p.ksm_pages.to_string())?;
        ksm::set("use_zero_pages", "1")?;
        let (rr, cpu, stopped) = (ranges.clone(), cpu_now.clone(), ksm_stopped.clone());
        *probe.lock().unwrap() = Some(Box::new(move || {
            if ksm::num("run") != 1 {
                stopped.fetch_add(1, Ordering::Relaxed);
            }
            let (merged, zero) = (ksm::num("pages_sharing"), ksm::num("ksm_zero_pages"));
            Sample {
                pss: pss(&rr),
                resident: distinct_resident(&rr),
                merged,
                zero,
                merges: merged + zero,
                cpu: cpu().saturating_sub(cpu0),
                ..Sample::default()
            }
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
        max_late: *max_late.lock().unwrap(),
        ksm_stopped: ksm_stopped.load(Ordering::Relaxed),
        ..Row::default()
    };
    row.rounds = samples.lock().unwrap().clone();
    for (round, s) in &row.rounds {
        match *round {
            0 => row.boot = *s,
            r if r == last => row.end = *s,
            _ => row.steps.push(*s),
        }
    }
    let mut failure = None;
    for r in results {
        let out = match r {
            Ok(out) => out,
            Err(e) => {
                failure.get_or_insert(e.to_string());
                continue;
            }
        };
        let Some(rep) = Density::report(&out) else {
            failure.get_or_insert("a VM sent no density report".into());
            continue;
        };
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
    match failure {
        Some(e) => Err(e),
        None => Ok(row),
    }
}
