//! The density demo (`examples/density.rs`) on a tiny configuration: its modules are
//! compiled here as they are in the example, and the whole demo runs on the simulated
//! memory with two small VMs and one-second runs (the sweep included), so CI exercises
//! the example's logic without its minute.

// Items the example's `main` uses and these tests do not.
#![allow(dead_code)]

#[path = "../examples/density/cpu.rs"]
mod cpu;
#[path = "../examples/density/demo.rs"]
mod demo;
#[path = "../examples/density/engine.rs"]
mod engine;
#[path = "../examples/density/host.rs"]
mod host;
#[path = "../examples/density/kvm.rs"]
mod kvm;
#[path = "../examples/density/options.rs"]
mod options;
#[path = "../examples/density/plan.rs"]
mod plan;
#[path = "../examples/density/plot.rs"]
mod plot;
#[path = "../examples/density/progress.rs"]
mod progress;
#[path = "../examples/density/real.rs"]
mod real;
#[path = "../examples/density/report.rs"]
mod report;
#[path = "../examples/density/run.rs"]
mod run;
#[path = "../examples/density/workload.rs"]
mod workload;

use page_memory::sim::SimMemory;

use crate::engine::Setup;
use crate::options::Options;
use crate::plan::{APP_PERIOD_S, SWEEP};
use crate::workload::Workload;

#[test]
fn the_demo_runs_end_to_end_on_two_tiny_vms() {
    let dir = std::env::temp_dir().join(format!("density-demo-{}", std::process::id()));
    let opts = Options::parse(
        "--vms 2 --vm-mib 2 --seconds 1 --threads 2 --no-progress"
            .split_whitespace()
            .map(String::from)
            .chain([
                "--svg".into(),
                dir.join("density.svg").display().to_string(),
            ]),
    )
    .unwrap();
    let report = demo::run_all::<SimMemory>(&opts).unwrap();

    let names: Vec<String> = report.main.iter().map(|r| r.setup.name()).collect();
    assert_eq!(names, ["raw", "KSM-like", "PPR+PageONE 10/600"]);
    let (raw, ksm, ppr) = (&report.main[0], &report.main[1], &report.main[2]);
    for r in &report.main {
        assert!(!r.samples.is_empty(), "{}: no samples", r.setup.name());
        assert!(
            r.low <= r.peak && r.mean <= r.peak as f64,
            "{}",
            r.setup.name()
        );
        assert_eq!(r.guests.failed, 0, "{}: {:?}", r.setup.name(), r.guests);
        assert!(
            r.guests.allocs > 0,
            "{}: the applications never ran",
            r.setup.name()
        );
    }
    // Raw keeps every page the guests ever touched; the engines never cost more than
    // their metadata on top of that, and PPR gives freed pages back.
    assert!(ksm.mean <= 1.02 * raw.mean + ksm.metadata as f64);
    assert!(ppr.recycled > 0, "nothing recycled: {:?}", ppr.guests);
    assert!(
        ppr.mean < raw.mean,
        "PPR+PageONE {} vs raw {}",
        ppr.mean,
        raw.mean
    );
    assert!(raw.cpu.is_empty() && ksm.cpu_avg("ksmd").is_some());
    assert_eq!(ppr.cpu.iter().filter(|c| c.role == "worker").count(), 2);

    assert_eq!(report.sweep.len(), SWEEP.len());
    for (r, (reclaim_s, merge_s)) in report.sweep.iter().zip(SWEEP) {
        assert_eq!(r.setup, Setup::PprPageOne { reclaim_s, merge_s });
    }
    let svg = std::fs::read_to_string(&report.svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("PPR+PageONE"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn each_application_peaks_once_per_period_and_averages_its_mean() {
    let w = Workload::new(3, 1024, 7);
    for vm in 0..3 {
        let n = 18_000;
        let samples: Vec<u32> = (0..n)
            .map(|i| w.app_pages(vm, i as f64 * APP_PERIOD_S / n as f64))
            .collect();
        let max = *samples.iter().max().unwrap();
        let mean = samples.iter().map(|&p| p as f64).sum::<f64>() / n as f64;
        assert!(
            max + 1 >= w.app_peak,
            "VM {vm} peaks at {max} of {}",
            w.app_peak
        );
        let want = plan::APP_MEAN * w.pages as f64;
        assert!(
            (mean - want).abs() < 0.05 * want,
            "VM {vm}: mean {mean}, want {want}"
        );
        // A late step still reaches the top of a spike it skipped over.
        let top = w.phases[vm] + w.spike_s / 2.0;
        assert_eq!(w.app_pages_max(vm, top - 1.0, top + 1.0), w.app_peak);
        assert_eq!(
            w.app_pages_max(vm, top + APP_PERIOD_S - 5.0, top + APP_PERIOD_S + 5.0),
            w.app_peak
        );
    }
}

#[test]
fn many_vm_estimate_is_linear_when_memory_is_flat() {
    let w = Workload::new(4, 1024, 1);
    let flat = run::RunResult {
        setup: Setup::Raw,
        samples: Vec::new(),
        mean: 4.0 * 1024.0 * 4096.0,
        peak: 4 * 1024 * 4096,
        low: 4 * 1024 * 4096,
        sd: 0.0,
        cpu: Vec::new(),
        merges: 0,
        recycled: 0,
        metadata: 0,
        pools: 0,
        guests: Default::default(),
        pass_every: None,
        diagnostics: None,
    };
    // One VM's whole memory per VM: the budget holds 57.5 VM sizes.
    assert_eq!(report::vms_that_fit(&flat, &w), 57);
    assert_eq!(report::vms_that_fit_many(&flat, &w), 57);
}

/// Without the `linux` feature, `--real` says how to get it instead of running.
#[cfg(not(feature = "linux"))]
#[test]
fn without_the_linux_feature_real_says_how_to_get_it() {
    let why = real::check().unwrap_err();
    assert!(why.contains("--features linux"), "{why}");
    assert!(real::run_all(&Options::default()).is_err());
}
