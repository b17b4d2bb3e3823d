//! The tables: density (like the 2017 mail's) and the reclaim × merge period sweep.

use std::fmt::Write;

use crate::engine::Setup;
use crate::plan::{sim_time, Clock, BUDGET_VMS, DENSITY_2017, MEASURE_S, SWEEP, SWEEP_2017};
use crate::run::RunResult;
use crate::workload::Workload;

/// Width of wrapped text.
const WIDTH: usize = 96;

/// `text` wrapped at word boundaries: the first line starts with `first`, the others
/// with `indent` spaces; every line ends with a newline.
pub fn wrap(text: &str, first: &str, indent: usize) -> String {
    let mut out = String::from(first);
    let mut col = first.chars().count();
    let mut empty = true;
    for word in text.split_whitespace() {
        let len = word.chars().count();
        if !empty && col + 1 + len > WIDTH {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            col = indent;
            empty = true;
        }
        if !empty {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += len;
        empty = false;
    }
    out.push('\n');
    out
}

fn mib(bytes: f64) -> f64 {
    bytes / 1048576.0
}

/// The memory budget, bytes: 230 GB for 4 GB VMs, scaled to this run's VM size.
pub fn budget(w: &Workload) -> f64 {
    BUDGET_VMS * w.pages as f64 * 4096.0
}

/// VMs of this run's kind that fit in the budget: the budget over the peak memory per
/// VM measured with `w.vms` VMs (a linear extrapolation).
pub fn vms_that_fit(r: &RunResult, w: &Workload) -> u64 {
    let per_vm = r.peak as f64 / w.vms as f64;
    if per_vm <= 0.0 {
        return 0;
    }
    (budget(w) / per_vm).floor() as u64
}

/// VMs that fit in the budget when there are many (central limit): with `n` VMs at
/// independent phases, memory has mean `n * m` and standard deviation `sqrt(n) * s`, where
/// `m` and `s * s` are this run's mean and variance per VM; its peak is taken `z` standard
/// deviations above the mean, `z` as observed in this run.
pub fn vms_that_fit_many(r: &RunResult, w: &Workload) -> u64 {
    let n = w.vms as f64;
    let (m, s) = (r.mean / n, r.sd / n.sqrt());
    let z = if r.sd > 0.0 {
        (r.peak as f64 - r.mean) / r.sd
    } else {
        0.0
    };
    let b = budget(w);
    // Largest x with m x + z s sqrt(x) <= b: a quadratic in sqrt(x).
    let (a2, a1) = (m, z * s);
    if a2 <= 0.0 {
        return 0;
    }
    let root = (-a1 + (a1 * a1 + 4.0 * a2 * b).sqrt()) / (2.0 * a2);
    (root * root).floor() as u64
}

/// The engine's CPU, in words: `ksmd 99.1%`, `workers 2 x 3.2%, daemon 0.4%` (the
/// memory's fault threads apart).
pub fn cpu_words(r: &RunResult) -> String {
    let mut s = String::new();
    if let Some(k) = r.cpu_avg("ksmd") {
        let _ = write!(s, "ksmd {k:.1}%");
    }
    if let Some(avg) = r.cpu_avg("worker") {
        let n = r.cpu.iter().filter(|c| c.role == "worker").count();
        let _ = write!(
            s,
            "workers {n} x {avg:.1}%, daemon {:.1}%",
            r.cpu_sum("daemon")
        );
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

/// A few lines about a finished run (printed without a trailing newline).
pub fn run_line(r: &RunResult) -> String {
    let g = &r.guests;
    let mut s = format!(
        "  {:<20} mean {:.1} MiB, peak {:.1} MiB; in the window: {} merged, {} recycled; \
         CPU: {}",
        r.setup.name(),
        mib(r.mean),
        mib(r.peak as f64),
        r.merges,
        r.recycled,
        cpu_words(r),
    );
    if let Some(f) = r.cpu_avg("fault") {
        let _ = write!(s, "; memory's fault thread {f:.1}%");
    }
    s.push('\n');
    let mut detail = format!(
        "guests: {} pages allocated, {} freed, {} allocations failed, {} frees not offered, \
         {} busy; longest step {:.1} ms. Engine metadata {:.1} MiB, PIP pools {:.1} MiB.",
        g.allocs,
        g.frees,
        g.failed,
        g.not_offered,
        g.busy,
        g.max_step.as_secs_f64() * 1e3,
        mib(r.metadata as f64),
        mib(r.pools as f64),
    );
    if let Some(d) = r.pass_every {
        let _ = write!(
            detail,
            " One pass over all pages every {:.1} ms.",
            d.as_secs_f64() * 1e3
        );
    }
    if let Some(d) = &r.diagnostics {
        let _ = write!(detail, " {d}.");
    }
    s.push_str(&wrap(&detail, &" ".repeat(23), 23));
    s.pop();
    s
}

/// The density table.
pub fn density_table(results: &[RunResult], w: &Workload) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Density: {} VMs x {} MiB, measured over one application period ({} simulated); \
         budget {:.0} MiB (230 GB for 4 GB VMs, scaled)",
        w.vms,
        w.pages / 256,
        sim_time(MEASURE_S),
        mib(budget(w))
    );
    let _ = writeln!(
        s,
        "  {:<20} {:>16} {:>25}  {:<32} 2017 (230 GB, 4 GB VMs)",
        "", "VMs that fit", "memory in use, MiB", "engine CPU"
    );
    let _ = writeln!(
        s,
        "  {:<20} {:>7} {:>8} {:>9} {:>15}  (% of one core)",
        "set-up", "linear", "many*", "mean", "low-peak"
    );
    for (i, r) in results.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {:<20} {:>7} {:>8} {:>9.1} {:>15}  {:<32} {}",
            r.setup.name(),
            vms_that_fit(r, w),
            vms_that_fit_many(r, w),
            mib(r.mean),
            format!("{:.1}-{:.1}", mib(r.low as f64), mib(r.peak as f64)),
            cpu_words(r),
            DENSITY_2017.get(i).copied().unwrap_or(""),
        );
    }
    let faults: Vec<String> = results
        .iter()
        .filter_map(|r| {
            r.cpu_avg("fault")
                .map(|f| format!("{} {f:.1}%", r.setup.name()))
        })
        .collect();
    if !faults.is_empty() {
        let _ = writeln!(
            s,
            "  the memory's write-fault thread (userfaultfd), not in engine CPU: {}",
            faults.join(", ")
        );
    }
    let text = format!(
        "linear: the budget over the peak memory per VM of these {} VMs. many*: for many \
         VMs, whose peaks average out: the most n whose mean + z sd fits, with mean and \
         variance per VM from this run (scaled by n) and z = this run's (peak - mean) / sd.",
        w.vms
    );
    s.push_str(&wrap(&text, "  ", 2));
    s
}

/// The sweep table, with the 2017 figures beside.
pub fn sweep_table(results: &[RunResult], w: &Workload, clock: &Clock) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Reclaim period x merge period (PPR+PageONE), as in the 2017 mail; periods in simulated \
         seconds"
    );
    let _ = writeln!(
        s,
        "  {:>7} {:>6} {:>15} {:>8} {:>8} {:>7} {:>8} {:>8}  | 2017: {:>4} {:>8} {:>7}",
        "reclaim",
        "merge",
        "pass every, ms",
        "mean",
        "peak",
        "VMs",
        "workers'",
        "daemon",
        "mean",
        "workers'",
        "daemon"
    );
    let _ = writeln!(
        s,
        "  {:>7} {:>6} {:>15} {:>8} {:>8} {:>7} {:>8} {:>8}  | {:>10} {:>8} {:>7}",
        "", "", "(asked)", "MiB", "MiB", "many*", "avg CPU", "CPU", "GB", "avg CPU", "CPU"
    );
    for r in results {
        let Setup::PprPageOne { reclaim_s, merge_s } = r.setup else {
            continue;
        };
        let old = SWEEP
            .iter()
            .position(|&p| p == (reclaim_s, merge_s))
            .map(|i| SWEEP_2017[i]);
        let asked = clock.wall(reclaim_s).as_secs_f64() * 1e3;
        let _ = writeln!(
            s,
            "  {:>6}s {:>5}s {:>15} {:>8.1} {:>8.1} {:>7} {:>7.1}% {:>7.1}%  | {:>10} {:>8} {:>7}",
            reclaim_s,
            merge_s,
            format!(
                "{} ({asked:.1})",
                r.pass_every
                    .map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
            ),
            mib(r.mean),
            mib(r.peak as f64),
            vms_that_fit_many(r, w),
            r.cpu_avg("worker").unwrap_or(0.0),
            r.cpu_sum("daemon"),
            old.map_or(String::new(), |o| format!("{:.0}", o.0)),
            old.map_or(String::new(), |o| format!("{:.1}%", o.1)),
            old.map_or(String::new(), |o| format!("{:.0}%", o.2)),
        );
    }
    let text = format!(
        "pass every: the measured wall time between two passes over all pages (each pass offers \
         every changed page to the recycler); asked: the reclaim period / {:.0}. A pass that \
         takes longer than the period starts the next one late.",
        clock.compression
    );
    s.push_str(&wrap(&text, "  ", 2));
    s
}
