//! The experiment's figures (from the 2017 mails) and how they are scaled to this run.
//!
//! The mails: 4 GB VMs; each runs an application that allocates and frees memory every
//! 30 minutes, up to 3 GB at the top of each period and 150 MB on average; raw KVM fits
//! 67 VMs in 230 GB, KVM + KSM 73, KVM + PPR + PageONE 516 (reclaim period 10 s, merge
//! period 600 s). Nothing else about the VMs is given, so the OS part of each VM below is
//! derived from the raw and KSM figures: 230 GB / 67 VMs = 3.43 GB per raw VM, i.e. the
//! 3 GB application peak plus 0.43 GB (10.5 % of the VM) of OS; 230 GB / 73 = 3.15 GB per
//! VM with KSM, i.e. 7 % of the VM is mergeable (taken here as 5 % OS image, identical in
//! every VM, and 2 % pages the guest zeroed) and 3.5 % is private to the VM.
//!
//! Time is compressed: one run simulates a 40-minute warm-up (every VM goes through at
//! least one allocation cycle, and the engines see the OS image for more than three merge
//! periods) and one measured 30-minute application period, in `--seconds` of wall time.
//! Every period (application cycle, reclaim period, merge period, sampling) is divided by
//! the same factor; the engines' own speed is not, so they get that much less time per
//! guest page change than in 2017.
//!
//! The guests step through fixed steps of simulated time, paced to the compressed clock
//! when the machine keeps up and simply later when it does not, and memory is sampled
//! right after a step: what the guests do and when memory is sampled is the same in every
//! run of a workload; only the engines' threads depend on the machine's load.

use std::time::Duration;

/// The application's cycle (the mails' 30 minutes), simulated seconds.
pub const APP_PERIOD_S: f64 = 1800.0;
/// Warm-up before the measured window, simulated seconds.
pub const WARMUP_S: f64 = 2400.0;
/// The measured window (one application period), simulated seconds.
pub const MEASURE_S: f64 = APP_PERIOD_S;
/// PPR + PageONE's periods in the mails' main run: reclaim 10 s, merge 600 s.
pub const MAIN_PERIODS: (f64, f64) = (10.0, 600.0);
/// The mails' sweep of reclaim period × merge period, simulated seconds.
pub const SWEEP: [(f64, f64); 4] = [(5.0, 200.0), (5.0, 600.0), (10.0, 200.0), (10.0, 600.0)];
/// The mails' sweep results: (average memory GB, work threads' CPU %, daemon CPU %).
pub const SWEEP_2017: [(f64, f64, f64); 4] = [
    (164.0, 6.8, 34.0),
    (176.0, 6.3, 35.0),
    (171.0, 6.6, 22.0),
    (182.0, 6.1, 22.0),
];
/// The memory budget in VM sizes: 230 GB for 4 GB VMs.
pub const BUDGET_VMS: f64 = 230.0 / 4.0;
/// The mails' density results: raw, KSM, PPR + PageONE (reclaim 10 s, merge 600 s).
pub const DENSITY_2017: [&str; 3] = [
    "67 VMs",
    "73 VMs, ksmd 100%",
    "516 VMs, 139-218 GB (mean 182), workers 6.1%, daemon 22%",
];

/// What each VM holds, as fractions of its memory.
pub const IMAGE: f64 = 0.05;
/// Pages the guest zeroed (they use memory until merged with the zero page).
pub const ZEROED: f64 = 0.02;
/// OS memory private to the VM (unique contents).
pub const PRIVATE: f64 = 0.035;
/// The application's top allocation in each period (3 GB of 4 GB).
pub const APP_PEAK: f64 = 0.75;
/// The application's mean allocation over a period (150 MB of 4 GB).
pub const APP_MEAN: f64 = 150.0 / 4096.0;

/// Simulated time against wall time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Simulated seconds per wall second.
    pub compression: f64,
}

impl Clock {
    /// The clock of a run lasting `seconds` of wall time.
    pub fn for_run(seconds: f64) -> Clock {
        Clock {
            compression: (WARMUP_S + MEASURE_S) / seconds,
        }
    }

    /// Wall time of `sim_s` simulated seconds.
    pub fn wall(&self, sim_s: f64) -> Duration {
        Duration::from_secs_f64(sim_s / self.compression)
    }

    /// Simulated seconds of `wall`.
    pub fn sim(&self, wall: Duration) -> f64 {
        wall.as_secs_f64() * self.compression
    }
}

/// `s` simulated seconds as `1h05m`, `12m30s` or `7.5s`.
pub fn sim_time(s: f64) -> String {
    if s >= 3600.0 {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    } else if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.1}s")
    }
}
