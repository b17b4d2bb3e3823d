//! The guest's workloads, as the host sets them up and reads their results.

use crate::abi;
use crate::vm::{VmConfig, VmOutcome};

/// The memory checker ([`abi::WORKLOAD_CHECKER`]): fills pages with patterns encoding
/// (page, generation), rewrites a moving `1/stride` of them every round, re-reads every
/// page after each round and reports what it saw. The vCPUs split the pages evenly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checker {
    /// Pages, all vCPUs together (0: the whole data area).
    pub pages: u64,
    /// Rounds of rewrite and re-read.
    pub rounds: u64,
    /// Round `r` rewrites the pages `p` with `p % stride == r % stride`.
    pub stride: u64,
    /// Generation 0 of page `p` is the pattern of page `p % dup_period`: pages
    /// `dup_period` apart, and the same pages of VMs with the same period, start
    /// identical (0: every page distinct).
    pub dup_period: u64,
    /// Mixed into generations 1 and later (give each VM its own).
    pub seed: u64,
    /// Call [`abi::CALL_ROUND`] after the fill and after every round (a barrier the
    /// host's [`CallHook`](crate::CallHook) can hold).
    pub call_rounds: bool,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            pages: 0,
            rounds: 8,
            stride: 4,
            dup_period: 0,
            seed: 0,
            call_rounds: false,
        }
    }
}

/// What the checker reported, summed over the vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckerReport {
    /// vCPUs that reported.
    pub vcpus: u64,
    /// Page reads compared with their expected pattern.
    pub checked: u64,
    /// Page rewrites.
    pub rewritten: u64,
    /// Page reads that differed from the expected pattern (must be 0).
    pub mismatched: u64,
    /// Words that differed.
    pub mismatched_words: u64,
    /// TSC cycles spent writing pages (fill and rewrites), summed over vCPUs.
    pub write_cycles: u64,
    /// TSC cycles from the fill to the report, summed over vCPUs.
    pub total_cycles: u64,
    /// Rounds (per vCPU).
    pub rounds: u64,
    /// Pages, all vCPUs together.
    pub pages: u64,
    /// TSC cycles spent in the fill alone, summed over vCPUs.
    pub fill_cycles: u64,
}

impl CheckerReport {
    /// Pages written (fill and rewrites) per million TSC cycles of writing: the guest's
    /// write throughput, to compare between runs on one machine.
    pub fn pages_written_per_mcycle(&self) -> f64 {
        (self.pages + self.rewritten) as f64 / (self.write_cycles.max(1) as f64 / 1e6)
    }

    /// Pages written per million TSC cycles in the fill (first writes of every page).
    pub fn fill_pages_per_mcycle(&self) -> f64 {
        self.pages as f64 / (self.fill_cycles.max(1) as f64 / 1e6)
    }

    /// Pages rewritten per million TSC cycles in the rounds (rewrites of written pages).
    pub fn rewrite_pages_per_mcycle(&self) -> f64 {
        let cycles = self.write_cycles.saturating_sub(self.fill_cycles).max(1);
        self.rewritten as f64 / (cycles as f64 / 1e6)
    }
}

impl Checker {
    /// The workload's [`abi::Params::args`].
    pub fn args(&self) -> [u64; 16] {
        let mut a = [0; 16];
        a[abi::CHECKER_PAGES] = self.pages;
        a[abi::CHECKER_ROUNDS] = self.rounds;
        a[abi::CHECKER_STRIDE] = self.stride;
        a[abi::CHECKER_DUP_PERIOD] = self.dup_period;
        a[abi::CHECKER_SEED] = self.seed;
        a[abi::CHECKER_CALL_ROUNDS] = self.call_rounds as u64;
        a
    }

    /// A VM configuration running this checker.
    pub fn config(&self, name: impl Into<String>, mem_size: u64) -> VmConfig {
        VmConfig::new(name, mem_size).workload(abi::WORKLOAD_CHECKER, self.args())
    }

    /// The checker's reports in `outcome`, summed (`None`: no vCPU reported).
    pub fn report(outcome: &VmOutcome) -> Option<CheckerReport> {
        let mut r = CheckerReport::default();
        for (_, v) in outcome.reports(abi::REPORT_CHECKER) {
            if v.len() != abi::CHECKER_VALUES {
                continue;
            }
            r.vcpus += 1;
            r.checked += v[0];
            r.rewritten += v[1];
            r.mismatched += v[2];
            r.mismatched_words += v[3];
            r.write_cycles += v[4];
            r.total_cycles += v[5];
            r.rounds = r.rounds.max(v[6]);
            r.pages += v[7];
            r.fill_cycles += v[8];
        }
        (r.vcpus > 0).then_some(r)
    }
}
