//! The mapping budgets: one gate per budget of mappings (one process's
//! `vm.max_map_count`, see [`PageMemory::mapping_budget`]), closed for a while after the
//! backend refused a merge for that budget's limit, so that the pages it would cost wait
//! without being offered again every pass, while pages of other budgets go on merging.
//! See *The mapping budget* in the crate docs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use page_memory::{PageMemory, RegionId};

use crate::config::EventHook;
use crate::stats::Counters;
use crate::Event;

/// Most merge passes the gate stays closed after the mapping limit refused a merge.
pub(crate) const MAX_MAP_BACKOFF: u64 = 32;

/// The mapping budget's gate: closed (pages refused for the mapping limit stay parked)
/// for a number of merge passes that doubles at each refusal in a row, up to
/// [`MAX_MAP_BACKOFF`]; opened early when the backend reports a higher limit.
pub(crate) struct MapGate {
    /// The budget it guards ([`PageMemory::mapping_budget`]).
    budget: u64,
    /// Refusals for the limit in the current pass.
    refused: AtomicU64,
    /// A chunk of this budget was run in the current merge pass (a pass with a
    /// `pages_per_pass` budget may visit none: it neither retries nor ends the episode).
    visited: AtomicBool,
    /// Merge passes started.
    pub(crate) pass: AtomicU64,
    /// Closed while `pass < closed_until`.
    closed_until: AtomicU64,
    /// Passes of the next closing.
    backoff: AtomicU64,
    /// The limit at the last refusal (0: none).
    limit: AtomicU64,
    /// Whether this episode's event was sent.
    reported: AtomicBool,
    /// Whether the gate was open when the current pass started.
    pub(crate) open_at_start: AtomicBool,
    /// The backend's mapping limit at the start of the pass (0: none).
    limit_now: AtomicU64,
    /// Mappings are scarce: past [`TIGHT_SHARE`] of the limit. Unique pages are then made
    /// canonical at once rather than indexed in place (see *The mapping budget* in the
    /// crate docs).
    tight: AtomicBool,
    /// The pass of the last exact count.
    counted_at: AtomicU64,
}

/// While mappings are scarce, they are counted exactly only every this many passes (a
/// count reads every mapping: tens of milliseconds near the limit).
const RECOUNT_PASSES: u64 = 16;

/// Mappings are scarce once more than `1 / TIGHT_SHARE` of the limit is in use.
pub(crate) const TIGHT_SHARE: u64 = 4;

impl MapGate {
    pub(crate) fn new(budget: u64) -> Self {
        MapGate {
            budget,
            refused: AtomicU64::new(0),
            visited: AtomicBool::new(false),
            pass: AtomicU64::new(0),
            closed_until: AtomicU64::new(0),
            backoff: AtomicU64::new(1),
            limit: AtomicU64::new(0),
            reported: AtomicBool::new(false),
            open_at_start: AtomicBool::new(true),
            limit_now: AtomicU64::new(0),
            tight: AtomicBool::new(false),
            counted_at: AtomicU64::new(0),
        }
    }

    /// Whether mappings are scarce (see [`TIGHT_SHARE`]).
    pub(crate) fn is_tight(&self) -> bool {
        self.tight.load(Ordering::Relaxed)
    }

    /// At the start of a merge pass: decides whether mappings are scarce, from the
    /// backend's cheap upper bound when that says they are not, else from an exact count
    /// (at most every [`RECOUNT_PASSES`] passes while they stay scarce).
    fn measure<M: PageMemory>(&self, memory: &M) {
        let limit = memory.budget_limit(self.budget).unwrap_or(0);
        self.limit_now.store(limit, Ordering::Relaxed);
        let scarce = |used: u64| used.saturating_mul(TIGHT_SHARE) > limit;
        if limit == 0 || !memory.budget_in_use(self.budget, false).is_some_and(scarce) {
            self.tight.store(false, Ordering::Relaxed);
            return;
        }
        let pass = self.pass.load(Ordering::Relaxed);
        if self.is_tight() && pass < self.counted_at.load(Ordering::Relaxed) + RECOUNT_PASSES {
            return;
        }
        self.counted_at.store(pass, Ordering::Relaxed);
        let tight = memory.budget_in_use(self.budget, true).is_some_and(scarce);
        self.tight.store(tight, Ordering::Relaxed);
    }

    /// Before a chunk: mappings became scarce during the pass (the backend's cheap upper
    /// bound says so; the next pass counts again).
    pub(crate) fn check_tight<M: PageMemory>(&self, memory: &M) {
        let limit = self.limit_now.load(Ordering::Relaxed);
        if limit > 0
            && !self.is_tight()
            && memory
                .budget_in_use(self.budget, false)
                .is_some_and(|used| used.saturating_mul(TIGHT_SHARE) > limit)
        {
            self.tight.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.pass.load(Ordering::Relaxed) < self.closed_until.load(Ordering::Relaxed)
    }

    /// At the start of a merge pass: counts it, and opens the gate if the backend's limit
    /// went up since the refusal.
    pub(crate) fn start_pass<M: PageMemory>(&self, memory: &M, in_place: bool) {
        self.pass.fetch_add(1, Ordering::Relaxed);
        self.visited.store(false, Ordering::Relaxed);
        if in_place {
            self.measure(memory);
        }
        if self.is_closed() {
            let was = self.limit.load(Ordering::Relaxed);
            if matches!(memory.budget_limit(self.budget), Some(now) if now > was) {
                self.closed_until.store(0, Ordering::Relaxed);
            }
        }
        self.open_at_start
            .store(!self.is_closed(), Ordering::Relaxed);
    }

    /// A chunk of this budget is being run in a merge pass.
    pub(crate) fn visit(&self) {
        self.visited.store(true, Ordering::Relaxed);
    }

    /// At the end of a merge pass: a pass that ran chunks of this budget with the gate
    /// open and met no refusal for the limit ends the episode.
    pub(crate) fn end_pass(&self) {
        let refused = self.refused.swap(0, Ordering::Relaxed);
        let visited = self.visited.swap(false, Ordering::Relaxed);
        if visited && self.open_at_start.load(Ordering::Relaxed) && refused == 0 {
            self.backoff.store(1, Ordering::Relaxed);
            self.reported.store(false, Ordering::Relaxed);
        }
    }

    /// The backend refused for the limit: close the gate (if open), record the figures,
    /// and send the episode's event.
    pub(crate) fn hit(
        &self,
        limit: u64,
        mappings: u64,
        counters: &Counters,
        hook: Option<&EventHook>,
    ) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        counters.map_count_limit.store(limit, Ordering::Relaxed);
        counters
            .map_count_mappings
            .store(mappings, Ordering::Relaxed);
        self.limit.store(limit, Ordering::Relaxed);
        let pass = self.pass.load(Ordering::Relaxed);
        let until = self.closed_until.load(Ordering::Relaxed);
        if until <= pass {
            let backoff = self.backoff.load(Ordering::Relaxed);
            if self
                .closed_until
                .compare_exchange(until, pass + backoff, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.backoff
                    .store((backoff * 2).min(MAX_MAP_BACKOFF), Ordering::Relaxed);
            }
        }
        if !self.reported.swap(true, Ordering::Relaxed) {
            counters.map_count_events.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = hook {
                (h.0)(&Event::MapCountLimit { limit, mappings });
            }
        }
    }
}

/// The gates of every budget the engine met, by budget. A budget's gate is made when a
/// chunk of a region in it is first run, and kept while any region of the memory is in it
/// ([`Gates::retain`] at each refresh of the regions).
pub(crate) struct Gates {
    map: RwLock<HashMap<u64, Arc<MapGate>>>,
}

impl Gates {
    pub(crate) fn new() -> Self {
        Gates {
            map: RwLock::new(HashMap::new()),
        }
    }

    /// The gate of the budget `region`'s merges spend. A gate made now (the budget's
    /// first chunk, in a pass under way) starts its pass at once, measuring the budget.
    pub(crate) fn of<M: PageMemory>(
        &self,
        memory: &M,
        region: RegionId,
        in_place: bool,
    ) -> Arc<MapGate> {
        let budget = memory.mapping_budget(region);
        if let Some(g) = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&budget)
        {
            return g.clone();
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(budget)
            .or_insert_with(|| {
                let gate = MapGate::new(budget);
                gate.start_pass(memory, in_place);
                Arc::new(gate)
            })
            .clone()
    }

    /// Every gate now.
    pub(crate) fn all(&self) -> Vec<Arc<MapGate>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Keeps only the gates of `budgets` (the budgets of the memory's regions now).
    pub(crate) fn retain(&self, budgets: &[u64]) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|b, _| budgets.contains(b));
    }
}
