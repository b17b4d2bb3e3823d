//! The whole demo over one kind of memory: the three set-ups, the sweep, the tables and
//! the plot.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Instant;

use crate::engine::Setup;
use crate::host::Host;
use crate::options::Options;
use crate::plan::{
    sim_time, Clock, APP_MEAN, APP_PERIOD_S, MAIN_PERIODS, MEASURE_S, SWEEP, WARMUP_S,
};
use crate::progress::Progress;
use crate::report::{self, wrap};
use crate::run::{self, RunParams, RunResult};
use crate::workload::Workload;

/// What the demo measured.
#[allow(dead_code)] // read by tests/density_demo.rs
pub struct Report {
    /// Raw, KSM-like, PPR + PageONE (main periods).
    pub main: Vec<RunResult>,
    /// The sweep's runs (the main PPR + PageONE run among them), in the mails' order.
    pub sweep: Vec<RunResult>,
    /// Where the plot was written.
    pub svg: PathBuf,
}

/// Where the demo's runs happen: guests of this process over a memory ([`OnHost`]), or
/// (`--kvm`) real guests on KVM.
pub trait Backend {
    /// What the VMs run on, for the output.
    fn name() -> &'static str;
    /// The same, in two words (for the plot).
    fn short() -> &'static str;
    /// What "memory in use" is measured from, for the output.
    fn measure() -> &'static str;
    /// When memory is sampled, for the notes.
    fn sampled() -> String;
    /// How `setup` is configured, in words.
    fn describe(setup: &Setup, clock: &crate::plan::Clock, threads: usize) -> String {
        setup.describe(clock, threads)
    }
    /// Runs one set-up.
    fn run(setup: Setup, p: &RunParams<'_>, progress: &mut Progress) -> Result<RunResult, String>;
}

/// The guests as threads of this process writing memory `H`.
pub struct OnHost<H>(PhantomData<H>);

impl<H: Host> Backend for OnHost<H> {
    fn name() -> &'static str {
        H::NAME
    }

    fn short() -> &'static str {
        H::SHORT
    }

    fn measure() -> &'static str {
        H::MEASURE
    }

    fn sampled() -> String {
        format!("every {} ms of wall time", H::SAMPLE_EVERY.as_millis())
    }

    fn run(setup: Setup, p: &RunParams<'_>, progress: &mut Progress) -> Result<RunResult, String> {
        run::run::<H>(setup, p, progress)
    }
}

/// Runs the demo on memory `H`, printing as it goes.
pub fn run_all<H: Host>(opts: &Options) -> Result<Report, String> {
    run_on::<OnHost<H>>(opts)
}

/// Runs the demo on backend `B`, printing as it goes.
pub fn run_on<B: Backend>(opts: &Options) -> Result<Report, String> {
    let began = Instant::now();
    let w = Workload::new(opts.vms, opts.vm_pages(), opts.seed);
    let clock = Clock::for_run(opts.seconds);
    intro::<B>(opts, &w, &clock);
    let params = RunParams {
        workload: &w,
        clock,
        seconds: opts.seconds,
        threads: opts.threads,
    };
    let mut progress = Progress::new(opts.progress);
    let (reclaim_s, merge_s) = MAIN_PERIODS;
    let setups = [
        Setup::Raw,
        Setup::KsmLike,
        Setup::PprPageOne { reclaim_s, merge_s },
    ];
    println!(
        "Runs ({} s of wall time each, on fresh memory):",
        opts.seconds
    );
    let mut main = Vec::new();
    for setup in setups {
        main.push(one_run::<B>(setup, &params, opts, &mut progress)?);
    }
    println!();
    print!("{}", report::density_table(&main, &w));
    println!();

    let mut sweep = Vec::new();
    if opts.sweep {
        println!("Sweep of reclaim period x merge period (PPR+PageONE):");
        for (reclaim_s, merge_s) in SWEEP {
            let setup = Setup::PprPageOne { reclaim_s, merge_s };
            match main.iter().find(|r| r.setup == setup) {
                Some(done) => {
                    println!("  {:<20} (the run above)", setup.name());
                    sweep.push(done.clone());
                }
                None => sweep.push(one_run::<B>(setup, &params, opts, &mut progress)?),
            }
        }
        println!();
        print!("{}", report::sweep_table(&sweep, &w, &clock));
        println!();
    }
    crate::plot::write(&opts.svg, &main, &w, &clock, B::short())?;
    println!("Plot of memory over time: {}", opts.svg.display());
    println!();
    notes::<B>(&clock);
    println!("Total wall time: {:.1} s", began.elapsed().as_secs_f64());
    Ok(Report {
        main,
        sweep,
        svg: opts.svg.clone(),
    })
}

/// Runs one set-up and prints what it did.
fn one_run<B: Backend>(
    setup: Setup,
    params: &RunParams<'_>,
    opts: &Options,
    progress: &mut Progress,
) -> Result<RunResult, String> {
    print!(
        "{}",
        wrap(
            &B::describe(&setup, &params.clock, opts.threads),
            &format!("  {:<20} ", setup.name()),
            23
        )
    );
    let r = B::run(setup, params, progress)?;
    println!("{}", report::run_line(&r));
    lag_warning(&r, params.workload, &params.clock);
    Ok(r)
}

fn intro<B: Backend>(opts: &Options, w: &Workload, clock: &Clock) {
    let pct = |p: u32| 100.0 * p as f64 / w.pages as f64;
    println!("dynamic-vm density demo: the 2017 density experiment, scaled to this machine");
    let field = |name: &str, text: String| print!("{}", wrap(&text, &format!("  {name:<10} "), 13));
    field("memory:", B::name().to_string());
    field("measured:", B::measure().to_string());
    field(
        "VMs:",
        format!(
            "{} x {} MiB; each: OS image {:.1}% (the same in every VM), zeroed pages {:.1}%, \
             private OS pages {:.1}%, the rest free for its application",
            w.vms,
            opts.vm_mib,
            pct(w.image),
            pct(w.zeroed),
            pct(w.private)
        ),
    );
    field(
        "apps:",
        format!(
            "every {} each application allocates up to {:.0}% of its VM and frees it again (a \
             {} spike; {:.2}% of the VM on average), fresh unique data in every page it gets",
            sim_time(APP_PERIOD_S),
            pct(w.app_peak),
            sim_time(w.spike_s),
            100.0 * APP_MEAN
        ),
    );
    field(
        "time:",
        format!(
            "SIMULATED and compressed {:.0}x: each run is {} of warm-up + {} measured = {} s of \
             wall time (longer on a machine that cannot keep up: the guests step through the \
             same simulated times, later); every period (application, reclaim, merge) is divided by {:.0}, so one \
             wall second is {} of simulated time",
            clock.compression,
            sim_time(WARMUP_S),
            sim_time(MEASURE_S),
            opts.seconds,
            clock.compression,
            sim_time(clock.compression)
        ),
    );
    println!();
}

/// Says so when the guests fell behind the compressed schedule by more than a quarter of
/// an allocation spike: they still made every allocation (a late step reaches the spike's
/// top), but later than scheduled.
fn lag_warning(r: &RunResult, w: &Workload, clock: &Clock) {
    let spike = clock.wall(w.spike_s);
    if r.guests.max_step > spike / 4 {
        let text = format!(
            "the guests fell behind the schedule by up to {:.0} ms (a spike lasts {:.0} ms): \
             their writes were slowed down (by the engine, the memory or a busy CPU). Every \
             allocation still happened, later than scheduled, but this run is less like the \
             others; a larger --seconds compresses time less.",
            r.guests.max_step.as_secs_f64() * 1e3,
            spike.as_secs_f64() * 1e3
        );
        print!("{}", wrap(&text, "  ! ", 4));
    }
}

fn notes<B: Backend>(clock: &Clock) {
    let text = format!(
        "Notes: memory in use is sampled {}; mean, low and peak are over \
         the measured window only. Engine CPU is each engine thread's CPU time \
         (/proc/self/task/*/schedstat) over the window's wall time, in % of one core. Time is \
         compressed {:.0}x but the engines run at their real speed, so per second they see \
         {:.0} times the guest activity of 2017 (on fewer, smaller VMs): compare the set-ups \
         with each other, not with the 2017 percentages. \"merged\" counts the engine's merges, \
         zero-page merges included (PageONE re-protects recycled pages and merges them with \
         the zero page).",
        B::sampled(),
        clock.compression,
        clock.compression
    );
    print!("{}", wrap(&text, "", 0));
}
