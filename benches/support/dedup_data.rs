//! The two data sets of the deduplication comparisons (the 2017 seeds' experiment),
//! shared by `benches/dedup.rs` and `examples/ksm_vs_pageone.rs` (included with
//! `#[path]`), so simulated and real-memory runs deduplicate the same pages.

/// Page contents of a deduplication run, each content generated from a fixed seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSet {
    /// Random pages: every pair differs within the first bytes (the seeds' easy case).
    Random,
    /// A run of zero bytes of uniformly random length 0..=256 (mean 128), then random
    /// bytes (the seeds' hard case).
    ZeroPrefix,
}

impl DataSet {
    /// The name used in benchmark ids and reports.
    pub fn name(self) -> &'static str {
        match self {
            DataSet::Random => "random",
            DataSet::ZeroPrefix => "zero-prefix",
        }
    }

    /// Writes content number `c` into `page` (4 KiB); never an all-zero page.
    pub fn fill(self, c: u64, page: &mut [u8]) {
        let mut rng = fastrand::Rng::with_seed(0x5EED_0000 ^ c);
        let start = match self {
            DataSet::Random => 0,
            DataSet::ZeroPrefix => rng.usize(0..=256),
        };
        page[..start].fill(0);
        rng.fill(&mut page[start..]);
        if page[start..].iter().all(|&b| b == 0) {
            let last = page.len() - 1;
            page[last] = 1;
        }
    }
}
