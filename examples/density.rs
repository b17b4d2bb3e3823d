//! The density demo: how many VMs fit in the same memory raw, with a KSM-like
//! deduplicator, and with PPR + PageONE (the 2017 RFC's density experiment, scaled down).
//!
//! ```text
//! cargo run --release --example density                      # about a minute on 2 cores
//! cargo run --release --example density -- --vms 16 --vm-mib 128 --seconds 20 --threads 4
//! cargo run --release --features linux --example density -- --real   # real memory, RSS
//! cargo run --release --example density -- --kvm     # real guests on KVM (a clone, root)
//! ```
//!
//! VMs (regions of guest memory) boot the same OS image, then run an application that
//! allocates and frees memory every (simulated) 30 minutes, up to 75% of the VM and 3.7%
//! on average, as in the 2017 mails. Each set-up runs the same workload on fresh memory:
//! raw (no engine), KSM-like (`ksm_baseline`: KSM's algorithm on one busy thread), and
//! PPR + PageONE (the guests' allocators offer freed pages through the PIP hooks,
//! `ppr_host::Recycler` recycles them inside PageONE's passes, PageONE merges the rest).
//! Time is compressed (see the output): periods of minutes become tens of milliseconds.
//! The demo prints a live progress line, the density table and the reclaim × merge period
//! sweep, and writes a plot of memory over time to `target/density.svg`
//! (`--docs-plot` regenerates the committed `docs/density.svg`).
//!
//! The modules are in `examples/density/`; `tests/density_demo.rs` runs them on a tiny
//! configuration. Exit status: 0 done, 1 failed, 2 bad flags, 3 `--real` or `--kvm` cannot
//! run here (no `linux` feature, or no userfaultfd write-protect; no KVM VMM in this build
//! (the packaged crate), no usable `/dev/kvm`, or no guest; the message says which).
//!
//! With `--kvm` the VMs are real guests: kvm-vmm's VMM and bare-metal guest (the
//! workspace's `crates/kvm-vmm`, not published), their vCPUs writing guest RAM through
//! KVM, under no engine, Linux KSM and PPR + PageONE (see `density/kvm.rs`).

#[path = "density/cpu.rs"]
mod cpu;
#[path = "density/demo.rs"]
mod demo;
#[path = "density/engine.rs"]
mod engine;
#[path = "density/host.rs"]
mod host;
#[path = "density/kvm.rs"]
mod kvm;
#[path = "density/options.rs"]
mod options;
#[path = "density/plan.rs"]
mod plan;
#[path = "density/plot.rs"]
mod plot;
#[path = "density/progress.rs"]
mod progress;
#[path = "density/real.rs"]
mod real;
#[path = "density/report.rs"]
mod report;
#[path = "density/run.rs"]
mod run;
#[path = "density/workload.rs"]
mod workload;

use options::{Options, ParseError, USAGE};

fn main() {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(ParseError::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(ParseError::Bad(why)) => {
            eprintln!("density: {why}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let result = if opts.kvm {
        if let Err(why) = kvm::check() {
            eprintln!("density: {why}");
            // Not a failure of the demo: this machine or build cannot run it.
            std::process::exit(3);
        }
        kvm::run_all(&opts)
    } else if opts.real {
        if let Err(why) = real::check() {
            eprintln!("density: {why}");
            // Not a failure of the demo: this machine or build cannot run it.
            std::process::exit(3);
        }
        real::run_all(&opts)
    } else {
        demo::run_all::<page_memory::sim::SimMemory>(&opts)
    };
    if let Err(why) = result {
        eprintln!("density: {why}");
        std::process::exit(1);
    }
}
