//! The guest's side: offer a freed page, withdraw the offer when the page is allocated.

use core::fmt;

use crate::layout::{PoolView, Shard, STATE_REGISTERED};
use crate::mark::{location, MarkWords, INDICATOR, LOCATION};
use crate::sync::{spin, AtomicU64, Ordering};
use crate::{CLAIMED, MAX_FRAME};

/// How many slots an offer probes, from its shard's cursor, before it counts the free as
/// slot exhaustion ([`Free::Full`]). Eight slots are one cache line.
pub const PROBES: usize = 16;

/// How many times [`Guest::on_alloc`] re-reads a slot the host holds claimed (or a mark
/// the host is zeroing) before it reports the page [`Alloc::Busy`]. Each step is one
/// `spin_loop` hint and one or two loads.
pub const DEFAULT_SPINS: u32 = 64;

/// The guest's handle on a registered pool, with its private copies of the pool id and
/// the secret indicator (read once, at [`Guest::attach`]).
///
/// `Guest` is `Copy` and holds only shared references: every vCPU may use the same one.
#[derive(Clone, Copy, Debug)]
pub struct Guest<'a> {
    view: PoolView<'a>,
    pool_id: u32,
    secret: u64,
    shard_slots: usize,
    spins: u32,
}

/// Why [`Guest::attach`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachError {
    /// The host has not registered the pool yet (the state it read).
    NotRegistered(u32),
    /// The host wrote pool id 0 or indicator 0, which the protocol reserves.
    BadRegistration,
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::NotRegistered(state) => write!(
                f,
                "the host has not registered the pool (state {state}, expected {STATE_REGISTERED})"
            ),
            AttachError::BadRegistration => {
                f.write_str("the host registered the pool with a reserved pool id or indicator (0)")
            }
        }
    }
}

impl core::error::Error for AttachError {}

/// What [`Guest::on_free`] did with a freed page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Free {
    /// The page is offered in this slot and carries a mark naming it.
    Offered(u32),
    /// No empty slot within [`PROBES`] of the shard's cursor: the page is not offered
    /// (counted as `full`). Its indicator word was cleared.
    Full,
    /// The frame number cannot be offered (0, or above [`MAX_FRAME`]); counted as
    /// `refused`. Its indicator word was cleared.
    Refused,
}

/// What [`Guest::on_alloc`] found; every variant but `Busy` means the page may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alloc {
    /// The page carries no mark of this pool (never offered, or recycled by the host: it
    /// then reads zeros). Nothing was written.
    Unmarked,
    /// The page was offered and this call withdrew the offer (won the slot CAS); its mark
    /// is cleared.
    Cancelled,
    /// The page carried a mark whose slot no longer holds it (an older offer already
    /// withdrawn or completed); the mark is cleared.
    Stale,
    /// The host holds the page claimed and is recycling it (or is zeroing its mark): the
    /// page must **not** be written or handed out. Put it aside and call `on_alloc` again
    /// later; the host finishes or restores every claim in bounded time.
    Busy,
}

impl Alloc {
    /// Whether the page may be handed out and written.
    #[inline]
    pub fn is_usable(self) -> bool {
        !matches!(self, Alloc::Busy)
    }
}

/// Adds one to a guest counter with a `Relaxed` load and store (no RMW on the hot path).
#[inline]
fn bump(counter: &AtomicU64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}

/// Clears a mark: the indicator first, so no one takes the half-cleared rest for a mark.
#[inline]
fn clear<P: MarkWords + ?Sized>(page: &P) {
    page.store(INDICATOR, 0);
    page.store(LOCATION, 0);
}

impl<'a> Guest<'a> {
    /// Attaches to a pool the host has registered (state [`STATE_REGISTERED`], read with
    /// `Acquire`), copying the pool id and the secret indicator.
    pub fn attach(view: PoolView<'a>) -> Result<Self, AttachError> {
        let header = view.header();
        let state = header.state();
        if state != STATE_REGISTERED {
            return Err(AttachError::NotRegistered(state));
        }
        let (pool_id, secret) = (header.pool_id(), header.indicator());
        if pool_id == 0 || secret == 0 {
            return Err(AttachError::BadRegistration);
        }
        Ok(Guest {
            view,
            pool_id,
            secret,
            shard_slots: view.shard_slots(),
            spins: DEFAULT_SPINS,
        })
    }

    /// The same handle with another bound on `on_alloc`'s wait (see [`DEFAULT_SPINS`]).
    pub fn with_spins(mut self, spins: u32) -> Self {
        self.spins = spins;
        self
    }

    /// The pool.
    pub fn view(&self) -> PoolView<'a> {
        self.view
    }

    /// The pool id the host assigned.
    pub fn pool_id(&self) -> u32 {
        self.pool_id
    }

    /// The pool's secret indicator.
    pub fn secret(&self) -> u64 {
        self.secret
    }

    /// The index of vCPU `cpu`'s shard: `cpu % shard_count` (no division when `cpu` is
    /// already below the shard count).
    #[inline]
    pub fn shard_index(&self, cpu: usize) -> usize {
        let k = self.view.shards().len();
        if cpu < k {
            cpu
        } else {
            cpu % k
        }
    }

    /// The shard of vCPU `cpu`.
    #[inline]
    pub fn shard(&self, cpu: usize) -> &'a Shard {
        &self.view.shards()[self.shard_index(cpu)]
    }

    /// The guest's page-free hook: offers the freed page `frame` to the host.
    ///
    /// Call it after the page's last use and before the page can be allocated again (on
    /// the free path, before the page joins a free list); `cpu` picks the shard (the
    /// calling vCPU's number; any value works, `cpu % shards` is used). The page must
    /// not be written again until [`Guest::on_alloc`] says it is usable.
    ///
    /// Probes at most [`PROBES`] slots of the shard from its cursor; takes the first empty
    /// one with a CAS `0 → frame` (*linearization point* of the offer), then writes the
    /// location word and, last, the indicator (`Release`). The cursor moves past the slot
    /// taken, or past the whole window when none was empty. Wait-free.
    #[inline]
    pub fn on_free<P: MarkWords + ?Sized>(&self, cpu: usize, frame: u64, page: &P) -> Free {
        let index = self.shard_index(cpu);
        let shard = &self.view.shards()[index];
        if frame == 0 || frame > MAX_FRAME {
            page.store(INDICATOR, 0);
            bump(&shard.refused);
            return Free::Refused;
        }
        let n = self.shard_slots;
        let base = index * n;
        let slots = &self.view.slots()[base..base + n];
        let mut at = shard.cursor.load(Ordering::Relaxed) as usize;
        if at >= n {
            at = 0;
        }
        for _ in 0..PROBES.min(n) {
            let (i, slot) = (at, &slots[at]);
            at = if at + 1 == n { 0 } else { at + 1 };
            // Cheap test first; the CAS is the offer's linearization point. `Release`: a
            // host that acquires `frame` from this slot sees every write the guest made to
            // the page before freeing it, so its zeroing is ordered after them.
            if slot.load(Ordering::Relaxed) == 0
                && slot
                    .compare_exchange(0, frame, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
            {
                shard.cursor.store(at as u32, Ordering::Relaxed);
                let index = (base + i) as u32;
                page.store(LOCATION, location(self.pool_id, index));
                page.store(INDICATOR, self.secret);
                bump(&shard.offered);
                return Free::Offered(index);
            }
        }
        // Move the cursor past the crowded window, so the next free probes fresh slots
        // instead of failing on the same ones.
        shard.cursor.store(at as u32, Ordering::Relaxed);
        page.store(INDICATOR, 0);
        bump(&shard.full);
        Free::Full
    }

    /// The guest's page-allocation hook: withdraws the page's offer, if any, before the
    /// page `frame` is handed out. Returns whether the page may be used.
    ///
    /// Call it on the allocation path after taking the page off a free list and before
    /// anyone writes it; `cpu` picks the shard whose counters are bumped. If it returns
    /// [`Alloc::Busy`], do not write the page: take another one and retry this one later
    /// (see the crate docs, "Progress").
    ///
    /// Reads the mark (indicator first). No indicator of this pool: [`Alloc::Unmarked`].
    /// Otherwise it reads the slot the location names: if it holds `frame`, a CAS
    /// `frame → 0` (*linearization point* of the cancel) withdraws the offer and the mark
    /// is cleared, indicator first; if the host holds it claimed (`frame | CLAIMED`), it
    /// waits at most `spins` steps for the host to finish (the page then reads zeros) or
    /// restore the offer (the CAS is then retried); anything else is a stale mark.
    #[inline]
    pub fn on_alloc<P: MarkWords + ?Sized>(&self, cpu: usize, frame: u64, page: &P) -> Alloc {
        let shard = self.shard(cpu);
        if frame == 0 || frame > MAX_FRAME {
            // Never offered (on_free refuses such frames): any mark on it is stale.
            if page.load(INDICATOR) != self.secret {
                return Alloc::Unmarked;
            }
            clear(page);
            bump(&shard.stale);
            return Alloc::Stale;
        }
        let mut budget = self.spins;
        loop {
            // `Acquire`: pairs with the host's zeroing (indicator last, `Release`), so a
            // page that reads unmarked because it was recycled has all its zeros visible.
            if page.load(INDICATOR) != self.secret {
                return Alloc::Unmarked;
            }
            let loc = page.load(LOCATION);
            if loc == 0 {
                // Only a host zeroing the page in place (indicator last) leaves the
                // indicator with a zero location: wait for it.
                if budget == 0 {
                    bump(&shard.busy);
                    return Alloc::Busy;
                }
                budget -= 1;
                spin();
                continue;
            }
            let slot = match self.slot_of(loc) {
                Some(slot) => slot,
                None => {
                    // Not a location of this pool: no slot can hold this page for it.
                    clear(page);
                    bump(&shard.stale);
                    return Alloc::Stale;
                }
            };
            let mut now = slot.load(Ordering::Acquire);
            if now == frame {
                // The cancel's linearization point. `Acquire` on failure: a host that
                // finished (slot emptied with `Release`) has its zeroing visible to us.
                match slot.compare_exchange(frame, 0, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        clear(page);
                        bump(&shard.cancelled);
                        return Alloc::Cancelled;
                    }
                    Err(found) => now = found,
                }
            }
            if now == frame | CLAIMED {
                // The host won: it is recycling the page, or will restore the offer.
                if budget == 0 {
                    bump(&shard.busy);
                    return Alloc::Busy;
                }
                budget -= 1;
                spin();
                continue;
            }
            // The slot holds neither this page nor its claim: no host can claim this page
            // through it any more (nobody offers a page while it is being allocated). If
            // the host just finished, the page reads zeros: leave it untouched.
            if page.load(INDICATOR) != self.secret {
                return Alloc::Unmarked;
            }
            clear(page);
            bump(&shard.stale);
            return Alloc::Stale;
        }
    }

    /// The slot a location word of this pool names, if it is in range.
    #[inline]
    fn slot_of(&self, loc: u64) -> Option<&'a AtomicU64> {
        if (loc >> 32) as u32 != self.pool_id {
            return None;
        }
        self.view.slots().get(loc as u32 as usize)
    }
}
