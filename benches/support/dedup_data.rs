//! The data sets of the deduplication comparisons, shared by `benches/dedup.rs` and
//! `examples/ksm_vs_pageone.rs` (included with `#[path]`), so simulated and real-memory
//! runs deduplicate the same pages: two synthetic sets (the 2017 seeds' experiment) and
//! one of real process memory ([`real_memory`]).

#[path = "real_memory.rs"]
pub mod real_memory;

use real_memory::{Capture, CaptureConfig, Census};

/// `max_page_sharing` of both engines in the comparisons (KSM's default, PageONE's
/// default): one canonical page is shared by at most this many pages.
pub const MAX_PAGE_SHARING: u64 = 256;

/// Page contents of a deduplication run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSet {
    /// Random pages: every pair differs within the first bytes (the seeds' easy case).
    Random,
    /// A run of zero bytes of uniformly random length 0..=256 (mean 128), then random
    /// bytes (the seeds' hard case).
    ZeroPrefix,
    /// The memory of real processes ([`real_memory::capture`]).
    Real,
}

impl DataSet {
    /// The name used in benchmark ids, reports and command lines.
    pub fn name(self) -> &'static str {
        match self {
            DataSet::Random => "random",
            DataSet::ZeroPrefix => "zero-prefix",
            DataSet::Real => "real",
        }
    }

    /// The set called `name`.
    pub fn parse(name: &str) -> Option<DataSet> {
        [DataSet::Random, DataSet::ZeroPrefix, DataSet::Real]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// Writes synthetic content number `c` of `set` into `page` (4 KiB); never an all-zero
/// page. Each content is generated from a fixed seed.
fn fill_synthetic(set: DataSet, c: u64, page: &mut [u8]) {
    let mut rng = fastrand::Rng::with_seed(0x5EED_0000 ^ c);
    let start = match set {
        DataSet::Random => 0,
        DataSet::ZeroPrefix => rng.usize(0..=256),
        DataSet::Real => unreachable!("real pages are captured, not generated"),
    };
    page[..start].fill(0);
    rng.fill(&mut page[start..]);
    if page[start..].iter().all(|&b| b == 0) {
        let last = page.len() - 1;
        page[last] = 1;
    }
}

/// Where a workload's pages come from.
enum Source {
    /// Slot `s` (counting through the regions) holds content `s % distinct`.
    Synthetic { per_region: usize, distinct: u64 },
    /// Region `r` holds the pages of captured process `r`.
    Real(Capture),
}

/// A data set laid out in regions ("VMs"), and what full deduplication of it merges.
pub struct Workload {
    /// The data set.
    pub set: DataSet,
    /// Pages of each region.
    pub regions: Vec<usize>,
    /// The pages counted.
    pub census: Census,
    /// One line on what the pages are.
    pub description: String,
    source: Source,
}

impl Workload {
    /// A synthetic set: `vms` regions of `per_vm` pages, slot `s` holding content
    /// `s % (total / 3)`, so each content lands in three different VMs (page for page,
    /// as VMs booted from one image) and two thirds of all pages are duplicates.
    pub fn synthetic(set: DataSet, vms: usize, per_vm: usize) -> Workload {
        assert_ne!(
            set,
            DataSet::Real,
            "the real set is captured: Workload::real"
        );
        let total = (vms * per_vm) as u64;
        let distinct = total / 3;
        // Every content is present three or four times (the last `total % 3` slots add
        // a fourth copy), never zeros: everything but one copy of each is merged.
        let merged = total - distinct;
        let census = Census {
            pages: total,
            zero: 0,
            distinct,
            singletons: 0,
            duplicates: total - distinct,
            merged_all: merged,
            merged_non_zero: merged,
        };
        Workload {
            set,
            regions: vec![per_vm; vms],
            census,
            description: format!(
                "{vms} regions x {per_vm} pages of {} contents, each content 3 times",
                set.name()
            ),
            source: Source::Synthetic {
                per_region: per_vm,
                distinct,
            },
        }
    }

    /// The real set: captures process memory as `config` says (or loads a saved
    /// capture: [`real_memory::load_or_capture`]); one region per captured process, its
    /// pages in address order.
    pub fn real(config: CaptureConfig) -> std::io::Result<Workload> {
        let capture = real_memory::load_or_capture(config)?;
        let census = Census::of(capture.pages(), MAX_PAGE_SHARING);
        Ok(Workload {
            set: DataSet::Real,
            regions: capture.processes.iter().map(|p| p.len()).collect(),
            description: capture.describe(&census),
            census,
            source: Source::Real(capture),
        })
    }

    /// All pages.
    pub fn total_pages(&self) -> usize {
        self.regions.iter().sum()
    }

    /// Writes page `i` of region `r` into `page` (4 KiB).
    pub fn fill(&self, r: usize, i: usize, page: &mut [u8]) {
        match &self.source {
            Source::Synthetic {
                per_region,
                distinct,
            } => fill_synthetic(self.set, (r * per_region + i) as u64 % distinct, page),
            Source::Real(c) => page.copy_from_slice(c.processes[r].page(i)),
        }
    }

    /// What KSM's `pages_sharing` reaches when everything is merged: with
    /// `use_zero_pages=0`, pages of zeros merge into KSM pages like any content.
    pub fn ksm_expected(&self) -> u64 {
        self.census.merged_all
    }

    /// What PageONE's `pages_sharing` and `zero_pages` reach when everything is merged:
    /// pages of zeros map the zero frame and are not shared canonical pages.
    pub fn pageone_expected(&self) -> (u64, u64) {
        (self.census.merged_non_zero, self.census.zero)
    }
}
