//! One run: boot the VMs, start a set-up's engine, drive the guests on the compressed
//! clock, sample memory, and measure the engine's CPU time over the measured window.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use page_memory::DomainId;
use ppr_guest::Hooks;
use ppr_host::{PoolMemory, Recycler};

use crate::cpu;
use crate::engine::{Counters, Engine, Setup};
use crate::host::{HeapPool, Host};
use crate::plan::{Clock, WARMUP_S};
use crate::progress::Progress;
use crate::workload::{GuestStats, Guests, Workload};

/// How often the guests step (wall time on the compressed clock; each step is this much
/// simulated time however long it really takes).
const GUEST_TICK: Duration = Duration::from_millis(1);

/// Memory at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Simulated seconds since the VMs booted.
    pub t: f64,
    /// Memory in use: guest RAM the host backs, engine metadata and PIP pools.
    pub bytes: u64,
}

/// CPU time of one engine thread over the measured window.
#[derive(Clone, Debug)]
pub struct ThreadCpu {
    /// Its role (`ksmd`, `daemon`, `worker`, `fault`).
    pub role: &'static str,
    /// Percent of one CPU.
    pub percent: f64,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The set-up.
    pub setup: Setup,
    /// Memory over the whole run, warm-up included.
    pub samples: Vec<Sample>,
    /// Mean memory over the measured window, bytes.
    pub mean: f64,
    /// Peak memory over the measured window, bytes.
    pub peak: u64,
    /// Lowest memory over the measured window, bytes.
    pub low: u64,
    /// Standard deviation of memory over the measured window, bytes.
    pub sd: f64,
    /// CPU of the engine's threads (and the memory's own threads) over the window.
    pub cpu: Vec<ThreadCpu>,
    /// Merges in the measured window.
    pub merges: u64,
    /// Pages recycled in the measured window.
    pub recycled: u64,
    /// Engine metadata at the end, bytes.
    pub metadata: u64,
    /// PIP pools, bytes.
    pub pools: u64,
    /// What the guests did.
    pub guests: GuestStats,
    /// How often the engine went over every page in the measured window (wall time).
    pub pass_every: Option<Duration>,
    /// What the memory itself counted, if anything.
    pub diagnostics: Option<String>,
}

impl RunResult {
    /// Percent of one CPU used by the threads of `role`, summed.
    pub fn cpu_sum(&self, role: &str) -> f64 {
        self.cpu
            .iter()
            .filter(|c| c.role == role)
            .map(|c| c.percent)
            .sum()
    }

    /// Percent of one CPU used by the threads of `role`, averaged per thread.
    pub fn cpu_avg(&self, role: &str) -> Option<f64> {
        let n = self.cpu.iter().filter(|c| c.role == role).count();
        (n > 0).then(|| self.cpu_sum(role) / n as f64)
    }
}

/// What a run needs besides the set-up.
pub struct RunParams<'a> {
    /// The workload.
    pub workload: &'a Workload,
    /// The compressed clock.
    pub clock: Clock,
    /// Wall time of the run.
    pub seconds: f64,
    /// PageONE work threads.
    pub threads: usize,
}

/// Runs `setup` on a fresh `H`.
pub fn run<H: Host>(
    setup: Setup,
    p: &RunParams<'_>,
    progress: &mut Progress,
) -> Result<RunResult, String> {
    let w = p.workload;
    let mem = H::fresh()?;
    let (pages, domains) = boot(&mem, w)?;
    let (pools, recycler) = if setup.ppr() {
        let (pools, recycler) = register_pools(&*mem, w)?;
        (pools, Some(recycler))
    } else {
        (Vec::new(), None)
    };
    let pool_bytes: u64 = pools.iter().map(|p| p.bytes() as u64).sum();
    let engine = Engine::start(setup, &mem, domains, recycler, &p.clock, p.threads);

    let (m, guests) = drive(
        &*mem,
        &engine,
        Driven {
            setup,
            pages: &pages,
            pools: &pools,
            pool_bytes,
        },
        p,
        progress,
    );
    engine.stop();
    progress.done();
    let win = window(&m.samples);
    let pass_every = pass_every(&m, w);
    Ok(RunResult {
        setup,
        mean: win.mean,
        sd: win.sd,
        peak: win.peak,
        low: win.low,
        cpu: m.cpu,
        merges: m.end.merges - m.start.merges,
        recycled: m.end.recycled - m.start.recycled,
        metadata: m.end.metadata,
        pools: pool_bytes,
        guests,
        pass_every,
        samples: m.samples,
        diagnostics: mem.diagnostics(),
    })
}

/// The memory samples of the measured window (after the warm-up), summed up.
pub struct Window {
    /// Mean bytes.
    pub mean: f64,
    /// Standard deviation.
    pub sd: f64,
    /// Highest sample.
    pub peak: u64,
    /// Lowest sample.
    pub low: u64,
}

/// The measured window of `samples` (after the warm-up).
pub fn window(samples: &[Sample]) -> Window {
    let in_window: Vec<u64> = samples
        .iter()
        .filter(|s| s.t >= WARMUP_S)
        .map(|s| s.bytes)
        .collect();
    let n = in_window.len().max(1) as f64;
    let mean = in_window.iter().map(|&b| b as f64).sum::<f64>() / n;
    let var = in_window
        .iter()
        .map(|&b| (b as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    Window {
        mean,
        sd: var.sqrt(),
        peak: in_window.iter().copied().max().unwrap_or(0),
        low: in_window.iter().copied().min().unwrap_or(0),
    }
}

/// The wall time between two passes over all pages, on average over the window.
fn pass_every(m: &Measured, w: &Workload) -> Option<Duration> {
    let passes = (m.end.scanned - m.start.scanned) as f64 / (w.vms as f64 * w.pages as f64);
    (passes >= 1.0).then(|| m.window.div_f64(passes))
}

/// Each VM's guest pages, and the VMs' trust domains.
type Booted<P> = (Vec<Vec<P>>, Vec<DomainId>);

/// Adds the VMs (each its own trust domain) and boots them (OS image, private and zeroed
/// pages); returns each VM's guest pages and the domains.
fn boot<H: Host>(mem: &Arc<H>, w: &Workload) -> Result<Booted<H::Page>, String> {
    let mut pages = Vec::new();
    let mut domains = Vec::new();
    for vm in 0..w.vms {
        let domain = DomainId(vm);
        let region = mem.add_vm(w.pages, domain)?;
        let p = mem.guest_pages(region, w.pages);
        w.boot(&p, vm);
        pages.push(p);
        domains.push(domain);
    }
    Ok((pages, domains))
}

/// PPR's set-up: each guest makes its pool (two slots per page it may free), and the
/// host registers it for the guest's region, with a secret of its own.
fn register_pools<H: Host>(
    mem: &H,
    w: &Workload,
) -> Result<(Vec<Arc<HeapPool>>, Recycler), String> {
    let mut recycler = Recycler::new();
    let mut rng = fastrand::Rng::with_seed(0x5EC2E7);
    let mut pools = Vec::new();
    for (vm, info) in mem.regions().into_iter().enumerate() {
        let pool = Arc::new(HeapPool::new(2 * (w.pages - w.first_free()).max(1))?);
        recycler
            .register(pool.clone(), vm as u32 + 1, rng.u64(..) | 1, info, 1)
            .map_err(|e| format!("registering VM {vm}'s PIP pool: {e}"))?;
        pools.push(pool);
    }
    Ok((pools, recycler))
}

/// Sleeps until `next + every` (or not at all if that is past); returns that time.
fn pace(next: Instant, every: Duration) -> Instant {
    let next = next + every;
    let now = Instant::now();
    if next > now {
        thread::sleep(next - now);
        next
    } else {
        now
    }
}

/// What the main thread measured during a run.
struct Measured {
    samples: Vec<Sample>,
    cpu: Vec<ThreadCpu>,
    /// The engine's counters at the start and the end of the measured window.
    start: Counters,
    end: Counters,
    /// Wall time of the measured window.
    window: Duration,
}

/// What [`drive`] steps and samples besides the memory and the engine.
struct Driven<'a, P> {
    setup: Setup,
    /// Each VM's guest pages.
    pages: &'a [Vec<P>],
    /// The VMs' PIP pools (PPR only).
    pools: &'a [Arc<HeapPool>],
    pool_bytes: u64,
}

/// The run, on this thread: attaches each VM's PPR hooks (if it has a pool), boots its
/// allocator, then steps the applications through fixed steps of simulated time (one
/// [`GUEST_TICK`] of wall time each on the compressed clock: paced to the wall clock
/// when the machine keeps up, only later when it does not) up to the run's end, samples
/// memory right after every `H::SAMPLE_EVERY`'s worth of steps, and snapshots CPU time
/// and the engine's counters when the measured window opens and when the run ends.
///
/// The guests and the samples follow simulated time only: what the guests do, and when
/// memory is sampled, is the same in every run of a workload however loaded the machine
/// is. Only the engine's threads (how much they have saved by each sample) depend on it.
fn drive<H: Host>(
    mem: &H,
    engine: &Engine<H>,
    d: Driven<'_, H::Page>,
    p: &RunParams<'_>,
    progress: &mut Progress,
) -> (Measured, GuestStats) {
    let w = p.workload;
    let views: Vec<_> = d.pools.iter().map(|p| p.view()).collect();
    let hooks: Vec<Hooks<'_>> = (0..w.vms as usize)
        .map(|vm| match views.get(vm) {
            Some(Some(v)) => Hooks::attach(*v).unwrap_or(Hooks::disabled()),
            _ => Hooks::disabled(),
        })
        .collect();
    let mut guests = Guests::new(w, d.pages, &hooks);
    let total = Duration::from_secs_f64(p.seconds);
    let (tick, end) = (p.clock.sim(GUEST_TICK), p.clock.sim(total));
    let sample_every = (H::SAMPLE_EVERY.as_nanos() / GUEST_TICK.as_nanos()).max(1) as u64;
    let start = Instant::now();
    let (mut next, mut since, mut max_step) = (start, 0.0, Duration::ZERO);
    let mut samples = Vec::new();
    let mut window_start = None;
    for step in 0u64.. {
        let t = (step as f64 * tick).min(end);
        let began = Instant::now();
        guests.step(w, since, t);
        // The first step brings VMs that boot in the middle of a spike to where they are.
        if step > 0 {
            max_step = max_step.max(began.elapsed());
        }
        since = t;
        if step % sample_every == 0 || t >= end {
            let c = engine.counters();
            let bytes = mem.used_bytes() + c.metadata + d.pool_bytes;
            samples.push(Sample { t, bytes });
            if window_start.is_none() && t >= WARMUP_S {
                window_start = Some((Instant::now(), cpu::snapshot(), c));
            }
            progress.update(&d.setup, p.clock.wall(t), total, t, bytes, c);
        }
        if t >= end {
            break;
        }
        next = pace(next, GUEST_TICK);
    }
    let setup = d.setup;
    let end = engine.counters();
    let end_cpu = cpu::snapshot();
    let (w_start, w_cpu, w_counters) =
        window_start.unwrap_or_else(|| (start, HashMap::new(), Counters::default()));
    let window = w_start.elapsed();
    let roles = setup
        .threads()
        .iter()
        .copied()
        .chain(H::THREADS.iter().map(|&t| ("fault", t)));
    let mut threads = Vec::new();
    for (role, prefix) in roles {
        for (_, spent) in cpu::spent(&w_cpu, &end_cpu, &[prefix]) {
            threads.push(ThreadCpu {
                role,
                percent: 100.0 * spent.as_secs_f64() / window.as_secs_f64().max(1e-9),
            });
        }
    }
    let measured = Measured {
        samples,
        cpu: threads,
        start: w_counters,
        end,
        window,
    };
    (measured, guests.stats(w, max_step))
}
