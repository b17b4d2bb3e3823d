//! The three set-ups and their engines.
//!
//! - **raw**: no engine; the guests have no PPR driver (their hooks are disabled).
//! - **KSM-like**: `ksm_baseline`, a single-threaded re-implementation of Linux KSM's
//!   algorithm, on its own thread with the mails' settings (`pages_to_scan = 100`,
//!   `sleep_millisecs = 0`: one busy scanner); no PPR.
//! - **PPR + PageONE**: the guests' allocators offer every freed page through the PIP
//!   hooks, and one PageONE engine (one daemon, `--threads` work threads) runs the
//!   recycler (`ppr_host::Recycler`, a PageONE scan hook) on every pass and merges on
//!   merge passes: reclaim period = PageONE's base period.

use std::sync::Arc;
use std::time::Duration;

use ksm_baseline::{Ksm, KsmConfig, KsmThread};
use page_memory::DomainId;
use pageone::{Config, PageOne};
use ppr_host::Recycler;

use crate::host::Host;
use crate::plan::{sim_time, Clock};

/// A set-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Setup {
    /// No engine.
    Raw,
    /// The single-threaded KSM baseline.
    KsmLike,
    /// PPR and PageONE in one engine, with these periods (simulated seconds).
    PprPageOne {
        /// Reclaim period (PageONE's base period).
        reclaim_s: f64,
        /// Merge period.
        merge_s: f64,
    },
}

/// KSM's `pages_to_scan` in the mails' KSM run.
pub const KSM_PAGES_TO_SCAN: usize = 100;

impl Setup {
    /// Its name in tables.
    pub fn name(&self) -> String {
        match self {
            Setup::Raw => "raw".into(),
            Setup::KsmLike => "KSM-like".into(),
            Setup::PprPageOne { reclaim_s, merge_s } => {
                format!("PPR+PageONE {reclaim_s}/{merge_s}")
            }
        }
    }

    /// Whether the guests run the PPR hooks.
    pub fn ppr(&self) -> bool {
        matches!(self, Setup::PprPageOne { .. })
    }

    /// How it is configured, in words (periods in simulated and wall time).
    pub fn describe(&self, clock: &Clock, threads: usize) -> String {
        match *self {
            Setup::Raw => "no engine, no PPR driver in the guests".into(),
            Setup::KsmLike => format!(
                "ksm_baseline on one thread, pages_to_scan = {KSM_PAGES_TO_SCAN}, \
                 sleep_millisecs = 0 (as in 2017), use_zero_pages = 1"
            ),
            Setup::PprPageOne { reclaim_s, merge_s } => format!(
                "{threads} work thread(s) + daemon; reclaim period {} (wall {:.1} ms), \
                 merge period {} (wall {:.0} ms)",
                sim_time(reclaim_s),
                clock.wall(reclaim_s).as_secs_f64() * 1e3,
                sim_time(merge_s),
                clock.wall(merge_s).as_secs_f64() * 1e3,
            ),
        }
    }

    /// Thread name prefixes of the engine, by role (the kernel keeps 15 bytes of a name).
    pub fn threads(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Setup::Raw => &[],
            Setup::KsmLike => &[("ksmd", "ksmd-baseline")],
            Setup::PprPageOne { .. } => {
                &[("daemon", "pageone-daemon"), ("worker", "pageone-worker")]
            }
        }
    }
}

/// An engine at work.
pub enum Engine<H: Host> {
    /// No engine.
    Raw,
    /// The KSM baseline's thread.
    Ksm(KsmThread<H>),
    /// PageONE with the recycler as its scan hook.
    Ppr {
        /// The engine.
        engine: PageOne<H>,
        /// The recycler (also held by the engine).
        recycler: Arc<Recycler>,
    },
}

/// An engine's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Successful merges (zero-page merges included), all time.
    pub merges: u64,
    /// Pages recycled, all time.
    pub recycled: u64,
    /// The engine's metadata, bytes.
    pub metadata: u64,
    /// Pages the engine looked at, all time.
    pub scanned: u64,
}

impl<H: Host> Engine<H> {
    /// Starts `setup`'s engine over `mem`, whose VMs are `domains`; `recycler` holds the
    /// guests' registered pools (PPR only).
    pub fn start(
        setup: Setup,
        mem: &Arc<H>,
        domains: Vec<DomainId>,
        recycler: Option<Recycler>,
        clock: &Clock,
        threads: usize,
    ) -> Engine<H> {
        match setup {
            Setup::Raw => Engine::Raw,
            Setup::KsmLike => Engine::Ksm(
                KsmThread::spawn(
                    Ksm::new(
                        mem.clone(),
                        // Linux KSM never scans pages a guest never touched; this baseline
                        // scans every page, and with `use_zero_pages` off would map each
                        // untouched page to a canonical page of zeros (on the Linux
                        // backend, one mapping each). With it on, pages of zeros are
                        // dropped to the zero page instead. Memory is the same either way.
                        KsmConfig::default().use_zero_pages(true),
                    ),
                    KSM_PAGES_TO_SCAN,
                    Duration::ZERO,
                )
                .expect("spawning the KSM-like scanner thread"),
            ),
            Setup::PprPageOne { reclaim_s, merge_s } => {
                let recycler = Arc::new(recycler.unwrap_or_default());
                let config = Config::default()
                    .base_period(clock.wall(reclaim_s))
                    .merge_period(clock.wall(merge_s))
                    .work_threads(threads)
                    // One tenant's VMs: the 2017 test merged across them.
                    .joined_domains(vec![domains]);
                let engine = PageOne::with_hook(mem.clone(), config, recycler.clone())
                    .expect("starting PageONE's work threads");
                engine.start().expect("starting PageONE's daemon");
                Engine::Ppr { engine, recycler }
            }
        }
    }

    /// The engine's counters now.
    pub fn counters(&self) -> Counters {
        match self {
            Engine::Raw => Counters::default(),
            Engine::Ksm(k) => {
                let s = k.stats();
                Counters {
                    merges: s.merges,
                    recycled: 0,
                    metadata: s.metadata_bytes,
                    scanned: s.pages_scanned + s.pages_skipped,
                }
            }
            Engine::Ppr { engine, recycler } => {
                let s = engine.stats();
                Counters {
                    merges: s.merges,
                    recycled: recycler.stats().recycled,
                    metadata: s.metadata_bytes,
                    scanned: s.pages_scanned,
                }
            }
        }
    }

    /// Stops the engine's threads (merged pages stay merged).
    pub fn stop(self) {
        match self {
            Engine::Raw => {}
            Engine::Ksm(k) => drop(k.stop()),
            Engine::Ppr { engine, .. } => engine.stop(),
        }
    }
}
