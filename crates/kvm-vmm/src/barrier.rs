//! A round barrier for [`CallHook`](crate::CallHook)s: the guests' vCPUs wait at
//! [`abi::CALL_ROUND`](crate::abi::CALL_ROUND) until all of them arrived and an engine
//! made some progress (passes), and the host measures while they are held.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Holds `parties` vCPUs at each round until all arrived, then until a progress counter
/// (an engine's completed passes) grew by the number asked, runs a measurement, and lets
/// them all go. Decided by counts; `limit` only bounds a wait for an engine that stopped
/// making progress (counted in [`RoundBarrier::timeouts`]: a test asserts it is 0).
#[derive(Debug)]
pub struct RoundBarrier {
    parties: u32,
    limit: Duration,
    rounds: Mutex<HashMap<u64, Round>>,
    released: Condvar,
    timeouts: Mutex<u64>,
}

#[derive(Debug, Default)]
struct Round {
    arrived: u32,
    released: bool,
}

impl RoundBarrier {
    /// A barrier for `parties` vCPUs (all VMs' together); a wait for progress gives up
    /// after `limit`.
    pub fn new(parties: u32, limit: Duration) -> Self {
        RoundBarrier {
            parties,
            limit,
            rounds: Mutex::new(HashMap::new()),
            released: Condvar::new(),
            timeouts: Mutex::new(0),
        }
    }

    /// Arrives at `round`. The last of the parties to arrive reads `progress()`, waits
    /// until it exceeds that by `more + 1` (the pass running now does not count; with
    /// `more == 0` it does not wait), runs `measure` and releases everyone; the others
    /// wait for that. Returns whether this caller was the last.
    pub fn wait(
        &self,
        round: u64,
        more: u64,
        progress: &dyn Fn() -> u64,
        measure: &mut dyn FnMut(),
    ) -> bool {
        let last = {
            let mut rounds = self.lock();
            let r = rounds.entry(round).or_default();
            r.arrived += 1;
            r.arrived == self.parties
        };
        if last {
            if more > 0 {
                let want = progress() + more + 1;
                let start = Instant::now();
                while progress() < want {
                    if start.elapsed() > self.limit {
                        *self.timeouts.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            measure();
            let mut rounds = self.lock();
            if let Some(r) = rounds.get_mut(&round) {
                r.released = true;
            }
            self.released.notify_all();
        } else {
            let mut rounds = self.lock();
            while !rounds.get(&round).is_some_and(|r| r.released) {
                rounds = self
                    .released
                    .wait(rounds)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        last
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Round>> {
        self.rounds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for progress that gave up at `limit`.
    pub fn timeouts(&self) -> u64 {
        *self.timeouts.lock().unwrap_or_else(|e| e.into_inner())
    }
}
