//! Configuration and the knobs that can change while the engine runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use page_memory::DomainId;

/// How a [`PageOne`](crate::PageOne) engine is set up.
///
/// Start from [`Config::default`] and change what you need with the setters (one per
/// field, named like it); more settings may be added in later versions without breaking
/// that (hence `#[non_exhaustive]`: a struct literal cannot be written outside this crate).
///
/// ```
/// use std::time::Duration;
/// use page_memory::DomainId;
/// use pageone::Config;
///
/// let config = Config::default()
///     .work_threads(2)
///     .merge_period(Duration::from_secs(10))
///     .joined_domains(vec![vec![DomainId(1), DomainId(2)]]);
/// assert_eq!(config.work_threads, 2);
/// assert_eq!(config.stable_periods, 2); // the default
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// Skip a volatile page for more passes each time it changes: 1, 2, 4, ... passes,
    /// doubling with each change in a row, up to this many (default 7).
    pub max_backoff: u8,
    /// Whether a stable page with no twin stays where it is, indexed in place (default),
    /// or is made canonical at once (copied into the backend's store and remapped), as
    /// before in-place indexing. In place, a page without a twin costs one read and an
    /// index entry; a twin found later costs both pages a remap. Even when on, pages are
    /// made canonical at once while the backend's mappings are scarce (more than a quarter
    /// of its limit in use; see *Unique pages* and *The mapping budget* in the crate
    /// docs).
    pub unique_in_place: bool,
    /// Keep a volatile page protected only once a pass found it unchanged since the
    /// previous pass (equal prints of two reads: Linux KSM's checksum test), rather than
    /// protecting it at the first pass that sees it volatile (default on). The second read
    /// is done under protection (so the print is exact and the page need not be read
    /// again when it merges), and a page found changed is unprotected at the end of that
    /// read and read unprotected at later passes until a read finds it unchanged. A page
    /// the guest keeps writing is so protected only while one chunk of pages is read, and
    /// costs the guest a fault (on Linux a round trip to the backend's fault thread,
    /// several times KSM's copy-on-write break) only if written in that moment; the price
    /// is a read and a print of every volatile page each merge pass. The unchanged period
    /// counts as the first of `stable_periods`, so a page written once still merges in the
    /// same pass as without it (with `stable_periods` 1, one pass later). Off: every
    /// volatile page is protected at once, which costs memory nobody writes a fifth to a
    /// third less CPU to merge (no reads before protection) and costs guests that write
    /// a fault per page per protection (`docs/benchmarks.md`, "The engines on real vCPUs":
    /// the guests' writes ran at 0.03× their speed without an engine, 0.19–0.29× with).
    pub unchanged_before_protect: bool,
    /// Called with every [`Event`] as it happens (on a work thread: keep it short). The
    /// same facts are in [`Stats`](crate::Stats) for an embedder that polls.
    pub on_event: Option<EventHook>,
    /// Test hook: prints keep only their lowest `print_bits` bits (64, the default: all),
    /// so that pages of different contents get equal prints. A print is only a hint
    /// (every merge is verified in full by the backend), and the engine's tests use this
    /// to show that collisions cost work and never a missed or wrong merge.
    #[doc(hidden)]
    pub print_bits: u32,
}

/// Something the embedder may want to act on, sent to [`Config::on_event`].
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use pageone::{Config, Event};
///
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// let config = Config::default().on_event(move |e: &Event| log.lock().unwrap().push(*e));
/// assert!(config.on_event.is_some());
/// # let _ = seen;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The backend refused merges to stay below the process's mapping limit
    /// (`vm.max_map_count` on Linux). Sent once per episode: when the engine first runs
    /// into the limit, and again only after a retry found room. Until then the refused
    /// pages are parked (see *The mapping budget* in the crate docs). Raising the limit
    /// (`sysctl -w vm.max_map_count=N`) lets the parked pages merge at the next retry.
    MapCountLimit {
        /// The limit.
        limit: u64,
        /// The process's mappings at the backend's last count.
        mappings: u64,
    },
}

/// The callback of [`Config::on_event`].
#[derive(Clone)]
pub struct EventHook(pub Arc<dyn Fn(&Event) + Send + Sync>);

impl std::fmt::Debug for EventHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventHook(..)")
    }
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
            unique_in_place: true,
            unchanged_before_protect: true,
            on_event: None,
            print_bits: 64,
        }
    }
}

impl Config {
    /// Sets the `print_bits` field (a test hook).
    #[doc(hidden)]
    #[must_use]
    pub fn print_bits(mut self, bits: u32) -> Self {
        self.print_bits = bits;
        self
    }

    /// The mask `print_bits` keeps of a print.
    pub(crate) fn print_mask(&self) -> u64 {
        if self.print_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.print_bits) - 1
        }
    }

    /// Sets the `merge_period` field.
    #[must_use]
    pub fn merge_period(mut self, period: Duration) -> Self {
        self.merge_period = period;
        self
    }

    /// Sets the `base_period` field.
    #[must_use]
    pub fn base_period(mut self, period: Duration) -> Self {
        self.base_period = period;
        self
    }

    /// Sets the `work_threads` field.
    #[must_use]
    pub fn work_threads(mut self, threads: usize) -> Self {
        self.work_threads = threads;
        self
    }

    /// Sets the `pages_per_pass` field (`None`: every page, every pass).
    #[must_use]
    pub fn pages_per_pass(mut self, pages: Option<u64>) -> Self {
        self.pages_per_pass = pages;
        self
    }

    /// Sets the `stable_periods` field.
    #[must_use]
    pub fn stable_periods(mut self, periods: u8) -> Self {
        self.stable_periods = periods;
        self
    }

    /// Sets the `max_page_sharing` field.
    #[must_use]
    pub fn max_page_sharing(mut self, pages: u32) -> Self {
        self.max_page_sharing = pages;
        self
    }

    /// Sets the `joined_domains` field.
    #[must_use]
    pub fn joined_domains(mut self, groups: Vec<Vec<DomainId>>) -> Self {
        self.joined_domains = groups;
        self
    }

    /// Sets the `unique_in_place` field.
    #[must_use]
    pub fn unique_in_place(mut self, in_place: bool) -> Self {
        self.unique_in_place = in_place;
        self
    }

    /// Sets the `unchanged_before_protect` field.
    #[must_use]
    pub fn unchanged_before_protect(mut self, on: bool) -> Self {
        self.unchanged_before_protect = on;
        self
    }

    /// Sets the `max_backoff` field.
    #[must_use]
    pub fn max_backoff(mut self, passes: u8) -> Self {
        self.max_backoff = passes;
        self
    }

    /// Sets the `on_event` field: `hook` is called with every [`Event`].
    #[must_use]
    pub fn on_event(mut self, hook: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.on_event = Some(EventHook(Arc::new(hook)));
        self
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
