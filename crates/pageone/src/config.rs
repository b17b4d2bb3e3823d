//! Configuration and the knobs that can change while the engine runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use page_memory::DomainId;

/// How a [`PageOne`](crate::PageOne) engine is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often the daemon runs a merge pass (the original's `merge_period`, 20 s).
    pub merge_period: Duration,
    /// How often the daemon wakes to run a base pass (the original's 5 s): the pass in
    /// which scan hooks (the Per Page Recycler) look at volatile pages. Merge passes fall
    /// on base ticks, so `merge_period` is rounded up to a multiple of it.
    pub base_period: Duration,
    /// Work threads. Default: the available cores.
    pub work_threads: usize,
    /// CPU budget: the most pages a merge pass examines; the next pass continues where
    /// this one stopped. `None`: every page, every pass.
    pub pages_per_pass: Option<u64>,
    /// Merge passes a page must stay unwritten (write-protected) before it is merged.
    pub stable_periods: u8,
    /// The most pages that may share one canonical page (KSM's `max_page_sharing`).
    /// When reached, the next duplicate becomes a fresh canonical page.
    pub max_page_sharing: u32,
    /// Trust domains whose pages may be merged with each other. Pages of domains not
    /// joined here are only merged within their own domain.
    pub joined_domains: Vec<Vec<DomainId>>,
    /// Skip a volatile page for more passes each time it changes (up to this many).
    pub max_backoff: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            merge_period: Duration::from_secs(20),
            base_period: Duration::from_secs(5),
            work_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pages_per_pass: None,
            stable_periods: 2,
            max_page_sharing: 256,
            joined_domains: Vec::new(),
            max_backoff: 7,
        }
    }
}

/// Knobs read by the daemon on every tick.
pub(crate) struct Knobs {
    pub(crate) run: AtomicBool,
    pub(crate) merge_period_ns: AtomicU64,
    pub(crate) base_period_ns: AtomicU64,
    /// `u64::MAX` = no budget.
    pub(crate) pages_per_pass: AtomicU64,
}

impl Knobs {
    pub(crate) fn new(c: &Config) -> Self {
        Knobs {
            run: AtomicBool::new(false),
            merge_period_ns: AtomicU64::new(c.merge_period.as_nanos() as u64),
            base_period_ns: AtomicU64::new(c.base_period.as_nanos().max(1) as u64),
            pages_per_pass: AtomicU64::new(c.pages_per_pass.unwrap_or(u64::MAX)),
        }
    }

    pub(crate) fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}
