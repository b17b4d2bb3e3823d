//! The VMs: what each holds at boot, and what its application allocates over time.
//!
//! Page layout of a VM: the OS image (same contents in every VM), the OS's private
//! pages (contents unique to the VM), pages the guest zeroed, then free memory, owned by
//! the guest's page allocator (`ppr_guest::PageAllocator`) and used by the application.
//! The application follows a triangle each period: at its VM's phase it allocates up to
//! its peak and frees it all again, over a spike long enough to average [`APP_MEAN`] of the
//! VM over the period. Every page it allocates gets fresh unique contents (no
//! deduplication can save them); freed pages keep those contents unless PPR recycles
//! them. Everything is a function of the seed: every set-up runs the same workload.

use std::time::Duration;

use ppr_guest::{Hooks, PageAllocator};

use crate::host::VmPage;
use crate::plan::{APP_MEAN, APP_PEAK, APP_PERIOD_S, IMAGE, PRIVATE, ZEROED};

/// The workload of one run (the same for every set-up).
#[derive(Clone, Debug)]
pub struct Workload {
    /// VMs.
    pub vms: u32,
    /// Pages of each VM.
    pub pages: u32,
    /// OS image pages (identical across VMs), at the start of each VM.
    pub image: u32,
    /// OS pages private to the VM, after the image.
    pub private: u32,
    /// Zeroed pages, after those.
    pub zeroed: u32,
    /// The application's peak, pages.
    pub app_peak: u32,
    /// Each VM's phase in the application period, simulated seconds.
    pub phases: Vec<f64>,
    /// Length of the allocation spike (up and down), simulated seconds.
    pub spike_s: f64,
    seed: u64,
}

/// Seeds of page contents, kept apart by kind.
const IMAGE_SEED: u64 = 0x1111_0000_0000_0000;
const PRIVATE_SEED: u64 = 0x2222_0000_0000_0000;
const APP_SEED: u64 = 0x3333_0000_0000_0000;

impl Workload {
    /// `vms` VMs of `pages` pages each, phases drawn from `seed`.
    pub fn new(vms: u32, pages: u32, seed: u64) -> Workload {
        let frac = |f: f64| (pages as f64 * f).round() as u32;
        let mut rng = fastrand::Rng::with_seed(seed);
        let phases = (0..vms).map(|_| rng.f64() * APP_PERIOD_S).collect();
        Workload {
            vms,
            pages,
            image: frac(IMAGE),
            private: frac(PRIVATE),
            zeroed: frac(ZEROED),
            app_peak: frac(APP_PEAK),
            phases,
            // A triangle of height `peak` and width `w` averages peak * w / (2 * period).
            spike_s: 2.0 * APP_PERIOD_S * APP_MEAN / APP_PEAK,
            seed,
        }
    }

    /// First page of free memory (the allocator's).
    pub fn first_free(&self) -> u32 {
        self.image + self.private + self.zeroed
    }

    /// The most pages VM `vm`'s application holds at any time in `[t0, t1]`.
    pub fn app_pages_max(&self, vm: usize, t0: f64, t1: f64) -> u32 {
        let ends = self.app_pages(vm, t0).max(self.app_pages(vm, t1));
        // The top of a spike: phase + spike / 2 + k * period, for some k.
        let top = self.phases[vm] + self.spike_s / 2.0;
        let k = ((t0 - top) / APP_PERIOD_S).ceil();
        if top + k * APP_PERIOD_S <= t1 {
            self.app_peak
        } else {
            ends
        }
    }

    /// Pages VM `vm`'s application holds at simulated time `t`.
    pub fn app_pages(&self, vm: usize, t: f64) -> u32 {
        let s = (t - self.phases[vm]).rem_euclid(APP_PERIOD_S);
        if s >= self.spike_s {
            return 0;
        }
        let x = 2.0 * s / self.spike_s; // 0..2: up, then down
        let height = if x <= 1.0 { x } else { 2.0 - x };
        (self.app_peak as f64 * height).round() as u32
    }

    /// Boots VM `vm`: writes its OS image, private pages and zeroed pages.
    pub fn boot<P: VmPage>(&self, pages: &[P], vm: u32) {
        let vm_seed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((vm as u64) << 32);
        for (i, page) in pages.iter().enumerate().take(self.first_free() as usize) {
            let i = i as u32;
            if i < self.image {
                page.fill(IMAGE_SEED ^ (self.seed << 24) ^ i as u64);
            } else if i < self.image + self.private {
                page.fill(PRIVATE_SEED ^ vm_seed ^ i as u64);
            } else {
                page.zero();
            }
        }
    }
}

/// What the guests did in one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestStats {
    /// Pages allocated by the applications (boot not counted).
    pub allocs: u64,
    /// Pages freed by the applications.
    pub frees: u64,
    /// Allocations that found no usable page.
    pub failed: u64,
    /// Frees that could not offer the page to the host (PIP slots exhausted).
    pub not_offered: u64,
    /// Allocations that found the host recycling the page and took another.
    pub busy: u64,
    /// Longest time one step of all VMs took, the first step apart (how far the guests
    /// fell behind the schedule).
    pub max_step: Duration,
}

/// One VM's guest: its allocator and the frames its application holds.
struct VmGuest<'a, P> {
    alloc: PageAllocator<'a, P>,
    held: Vec<u64>,
    allocated: u64,
}

/// The guests of all VMs, driven by one thread (their vCPU 0), step by step.
pub struct Guests<'a, P> {
    vms: Vec<VmGuest<'a, P>>,
    seed: u64,
    failed: u64,
}

impl<'a, P: VmPage> Guests<'a, P> {
    /// Boot-time allocators: each VM's free memory, freed through the hooks (with PPR,
    /// offered to the host: a guest kernel handing its free memory to the buddy allocator
    /// at boot marks every free page).
    pub fn new(w: &Workload, pages: &'a [Vec<P>], hooks: &[Hooks<'a>]) -> Self {
        let free = w.first_free() as usize..w.pages as usize;
        let vms = pages
            .iter()
            .zip(hooks)
            .map(|(p, &h)| VmGuest {
                alloc: PageAllocator::with_free(h, p, 1, 0, free.clone()),
                held: Vec::new(),
                allocated: 0,
            })
            .collect();
        Guests {
            vms,
            seed: w.seed,
            failed: 0,
        }
    }

    /// Brings every VM's application to what it holds at simulated time `t`, having
    /// allocated on the way everything it held since the last step (`since`): a step that
    /// comes late still reaches each spike's top, so every set-up gets the same
    /// allocations, however busy the machine.
    pub fn step(&mut self, w: &Workload, since: f64, t: f64) {
        for (vm, g) in self.vms.iter_mut().enumerate() {
            let top = w.app_pages_max(vm, since, t) as usize;
            let target = w.app_pages(vm, t) as usize;
            while g.held.len() < top {
                let Some((frame, page)) = g.alloc.alloc(0) else {
                    self.failed += 1;
                    break;
                };
                g.allocated += 1;
                page.fill(APP_SEED ^ (self.seed << 40) ^ ((vm as u64) << 32) ^ g.allocated);
                g.held.push(frame);
            }
            while g.held.len() > target {
                let frame = g.held.pop().expect("held is longer than target");
                g.alloc
                    .free(0, frame)
                    .expect("the application frees only frames it holds");
            }
        }
    }

    /// What the guests did (boot-time frees not counted), their longest step being
    /// `max_step`.
    pub fn stats(&self, w: &Workload, max_step: Duration) -> GuestStats {
        let boot_frees = (w.pages - w.first_free()) as u64;
        let mut s = GuestStats {
            failed: self.failed,
            max_step,
            ..GuestStats::default()
        };
        for g in &self.vms {
            let a = g.alloc.stats();
            s.allocs += a.allocs;
            s.frees += a.frees - boot_frees;
            s.not_offered += a.not_offered;
            s.busy += a.busy;
        }
        s
    }
}
