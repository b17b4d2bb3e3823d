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

/// The density workload ([`abi::WORKLOAD_DENSITY`]), as in the repository's
/// `examples/density`: an OS image identical in every VM (same [`Density::image_seed`]),
/// OS pages private to the VM, pages the guest zeroed, and an application that
/// allocates pages up to its peak and frees them again in cycles, through a page
/// allocator whose free and alloc paths call `ppr-guest`'s hooks over a PIP pool the
/// guest registers with [`abi::CALL_REGISTER`] (a host that answers 0 leaves the hooks
/// disabled: no PPR). Every page the application allocates gets fresh contents unique
/// to the VM; the guest checks every page it allocates (zeros, or its last contents),
/// every page before it frees it (unchanged), and its OS pages every cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Density {
    /// OS image pages (identical in every VM with the same `image_seed`).
    pub image: u64,
    /// OS pages private to the VM.
    pub private: u64,
    /// Pages the guest zeroed.
    pub zeroed: u64,
    /// The application's peak, pages.
    pub app_peak: u64,
    /// The allocator's pages (0: the rest of the data area). At least `app_peak`.
    pub free: u64,
    /// Steps up (and as many down) per cycle; a [`abi::CALL_ROUND`] after each.
    pub steps: u64,
    /// Steps per cycle after the spike, in which the application holds nothing (0: the
    /// cycle is the spike alone).
    pub idle: u64,
    /// Application cycles.
    pub cycles: u64,
    /// The VM's phase, in steps into the cycle.
    pub phase: u64,
    /// The VM's own seed (give each VM its own).
    pub seed: u64,
    /// The OS image's seed (give every VM the same).
    pub image_seed: u64,
    /// vCPUs (each runs its share of every count over its own pages).
    pub vcpus: u32,
}

impl Density {
    /// The workload for a VM of `mem_size` bytes with the fractions of
    /// `examples/density`'s plan: OS image 5 %, private 3.5 %, zeroed 2 %, the
    /// application's peak 75 % of the VM (of its data area here), the allocator owning
    /// every page after the OS pages; `steps` steps up per cycle, `cycles` cycles.
    pub fn plan(mem_size: u64, steps: u64, cycles: u64) -> Density {
        let pages = (mem_size - abi::DATA_BASE) / abi::PAGE_SIZE;
        let frac = |f: f64| (pages as f64 * f).round() as u64;
        Density {
            image: frac(0.05),
            private: frac(0.035),
            zeroed: frac(0.02),
            app_peak: frac(0.75),
            free: 0,
            steps,
            idle: 0,
            cycles,
            phase: 0,
            seed: 1,
            image_seed: 0x1111,
            vcpus: 1,
        }
    }

    /// Bytes of the PIP pool: a slot for twice the allocator's pages (at most, every
    /// page of the data area), as `pip::layout::pool_bytes` lays it out (a 64-byte
    /// header, 64 bytes per shard, 8 per slot), rounded up to whole pages.
    pub fn pool_bytes(&self, mem_size: u64) -> u64 {
        let pages = (mem_size - abi::DATA_BASE) / abi::PAGE_SIZE;
        let shards = self.vcpus.max(1) as u64;
        let slots_per_shard = (2 * pages).div_ceil(shards);
        (64 + 64 * shards + 8 * slots_per_shard * shards).div_ceil(abi::PAGE_SIZE) * abi::PAGE_SIZE
    }

    /// The workload's [`abi::Params::args`] for a VM of `mem_size` bytes.
    pub fn args(&self, mem_size: u64) -> [u64; 16] {
        let mut a = [0; 16];
        a[abi::DENSITY_POOL_BYTES] = self.pool_bytes(mem_size);
        a[abi::DENSITY_IMAGE] = self.image;
        a[abi::DENSITY_PRIVATE] = self.private;
        a[abi::DENSITY_ZEROED] = self.zeroed;
        a[abi::DENSITY_APP_PEAK] = self.app_peak;
        a[abi::DENSITY_STEPS] = self.steps;
        a[abi::DENSITY_CYCLES] = self.cycles;
        a[abi::DENSITY_PHASE] = self.phase;
        a[abi::DENSITY_SEED] = self.seed;
        a[abi::DENSITY_IMAGE_SEED] = self.image_seed;
        a[abi::DENSITY_FREE] = self.free;
        a[abi::DENSITY_IDLE] = self.idle;
        a
    }

    /// A VM configuration running this workload.
    pub fn config(&self, name: impl Into<String>, mem_size: u64) -> VmConfig {
        VmConfig::new(name, mem_size)
            .vcpus(self.vcpus)
            .workload(abi::WORKLOAD_DENSITY, self.args(mem_size))
    }

    /// Steps per cycle: the spike's `2 * steps` and the idle steps.
    pub fn period(&self) -> u64 {
        2 * self.steps.max(1) + self.idle
    }

    /// The barrier rounds the guest calls: 0 after boot, `1..=last_round() - 1` after
    /// each step, `last_round()` after the final frees.
    pub fn last_round(&self) -> u64 {
        self.cycles * self.period() + 1
    }

    /// The workload's reports in `outcome`, summed (`None`: no vCPU reported).
    pub fn report(outcome: &VmOutcome) -> Option<DensityReport> {
        let mut r = DensityReport::default();
        for (_, v) in outcome.reports(abi::REPORT_DENSITY) {
            let Ok(v) = <[u64; abi::DENSITY_VALUES]>::try_from(v) else {
                continue;
            };
            r.vcpus += 1;
            r.allocs += v[0];
            r.frees += v[1];
            r.zeros += v[2];
            r.intact += v[3];
            r.corrupt += v[4];
            r.offered += v[5];
            r.not_offered += v[6];
            r.busy += v[7];
            r.os_checked += v[8];
            r.steps = r.steps.max(v[9]);
            r.work_cycles += v[10];
            r.boot_cycles += v[11];
            r.allocator_pages += v[12];
            r.ppr_vcpus += v[13];
        }
        (r.vcpus > 0).then_some(r)
    }
}

/// What the density workload reported, summed over vCPUs (and VMs, with
/// [`DensityReport::add`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DensityReport {
    /// vCPUs that reported.
    pub vcpus: u64,
    /// Pages the application allocated.
    pub allocs: u64,
    /// Pages it freed (boot-time frees not counted).
    pub frees: u64,
    /// Allocations that read zeros (recycled, zero-merged, or never written).
    pub zeros: u64,
    /// Allocations that read their last contents (not recycled).
    pub intact: u64,
    /// Pages found corrupt: allocated reading neither, changed while held, or an OS page
    /// not holding what was written (must be 0).
    pub corrupt: u64,
    /// Frees offered to the host (boot-time frees included).
    pub offered: u64,
    /// Frees not offered (pool full or refused).
    pub not_offered: u64,
    /// `on_alloc` answers `Busy` (the host was recycling the page; retried).
    pub busy: u64,
    /// OS page reads checked.
    pub os_checked: u64,
    /// Steps (per vCPU), the final frees included.
    pub steps: u64,
    /// TSC cycles of the steps' work (not the barriers), summed over vCPUs.
    pub work_cycles: u64,
    /// TSC cycles of the boot (OS pages, boot-time frees), summed over vCPUs.
    pub boot_cycles: u64,
    /// The allocator's pages.
    pub allocator_pages: u64,
    /// vCPUs whose hooks were enabled (the host registered the pool).
    pub ppr_vcpus: u64,
}

impl DensityReport {
    /// Adds another VM's report.
    pub fn add(&mut self, o: &DensityReport) {
        self.vcpus += o.vcpus;
        self.allocs += o.allocs;
        self.frees += o.frees;
        self.zeros += o.zeros;
        self.intact += o.intact;
        self.corrupt += o.corrupt;
        self.offered += o.offered;
        self.not_offered += o.not_offered;
        self.busy += o.busy;
        self.os_checked += o.os_checked;
        self.steps = self.steps.max(o.steps);
        self.work_cycles += o.work_cycles;
        self.boot_cycles += o.boot_cycles;
        self.allocator_pages += o.allocator_pages;
        self.ppr_vcpus += o.ppr_vcpus;
    }

    /// Pages allocated and written per million TSC cycles of the steps' work: the
    /// guest's progress, to compare between runs on one machine.
    pub fn allocs_per_mcycle(&self) -> f64 {
        self.allocs as f64 / (self.work_cycles.max(1) as f64 / 1e6)
    }
}
