//! The host's side: validate a page's mark against the pool, claim the slot, and then
//! either complete the claim (the page was recycled) or restore it.
//!
//! Everything here is a pure function of the host's private copy of the pool's facts
//! ([`HostPool`]), the slot array and the page's mark words; nothing read from guest
//! memory is trusted, every index is range-checked, and no function panics or loops on
//! guest data.

use core::fmt;
use core::mem::ManuallyDrop;

use crate::layout::PoolView;
use crate::mark::{Mark, MarkWords};
use crate::sync::{AtomicU64, Ordering};
use crate::{CLAIMED, MAX_FRAME};

/// The host's handle on one registered pool: the shared view plus private copies of the
/// pool id, the secret indicator and the guest's frame limit. The host never reads these
/// back from the header.
#[derive(Clone, Copy, Debug)]
pub struct HostPool<'a> {
    view: PoolView<'a>,
    pool_id: u32,
    secret: u64,
    frame_limit: u64,
}

/// Why [`HostPool::register`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisterError {
    /// The header's state was not [`STATE_READY`](crate::STATE_READY) (the state found).
    State(u32),
    /// Pool id 0 and indicator 0 are reserved by the protocol.
    Reserved,
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegisterError::State(state) => write!(
                f,
                "the pool is not ready for registration (state {state}, expected {})",
                crate::STATE_READY
            ),
            RegisterError::Reserved => f.write_str("pool id 0 and indicator 0 are reserved"),
        }
    }
}

impl core::error::Error for RegisterError {}

/// Why a page's mark was rejected; counted by the caller and skipped.
///
/// Non-exhaustive: a later version may add reasons (and raise [`Invalid::COUNT`]); size
/// counter arrays with `COUNT` and index them with [`Invalid::index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Invalid {
    /// The scanned frame number is 0, at or above the pool's frame limit, or above
    /// [`MAX_FRAME`].
    Frame,
    /// The location word names another pool.
    Pool,
    /// The location word names a slot index outside the pool.
    Slot,
    /// The named slot does not hold this frame (an offer withdrawn or already claimed, a
    /// stale mark, or a forged one).
    NotOffered,
}

impl Invalid {
    /// How many reasons there are (for arrays of counters).
    pub const COUNT: usize = 4;
    /// Every reason, in [`Invalid::index`] order.
    pub const ALL: [Invalid; Invalid::COUNT] = [
        Invalid::Frame,
        Invalid::Pool,
        Invalid::Slot,
        Invalid::NotOffered,
    ];

    /// A dense index in `0..COUNT`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short name for statistics.
    pub fn name(self) -> &'static str {
        match self {
            Invalid::Frame => "frame",
            Invalid::Pool => "pool",
            Invalid::Slot => "slot",
            Invalid::NotOffered => "not_offered",
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invalid::Frame => "the scanned frame number is outside the guest's frames",
            Invalid::Pool => "the mark names another pool",
            Invalid::Slot => "the mark names a slot outside the pool",
            Invalid::NotOffered => "the named slot does not hold the scanned frame",
        })
    }
}

impl core::error::Error for Invalid {}

/// Why [`HostPool::validate`] did not return an offer.
///
/// Deliberately exhaustive, unlike the crate's other error enums: a page's first words
/// either are not this pool's mark or are an invalid one, and new reasons for the latter
/// are added to [`Invalid`] (non-exhaustive), so hosts can match both cases directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    /// The indicator word is not this pool's secret: not a mark (most pages).
    NotMarked,
    /// A mark of this pool that does not hold up; count it and skip the page.
    Invalid(Invalid),
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::NotMarked => f.write_str("the page carries no mark of this pool"),
            Reject::Invalid(_) => f.write_str("the page carries an invalid mark of this pool"),
        }
    }
}

impl core::error::Error for Reject {
    /// The [`Invalid`] reason, for [`Reject::Invalid`].
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Reject::NotMarked => None,
            Reject::Invalid(why) => Some(why),
        }
    }
}

/// A validated offer: slot `slot` held `frame` when it was read. Only
/// [`HostPool::validate`] makes one; claiming it re-checks the slot by CAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Offer {
    frame: u64,
    slot: u32,
}

impl Offer {
    /// The frame offered.
    pub fn frame(&self) -> u64 {
        self.frame
    }
    /// The slot it is offered in.
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

/// The claim CAS failed: the slot no longer held the frame (the guest withdrew the offer,
/// or it was claimed already). Count it as a claim lost to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lost;

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("claim lost: the slot no longer held the frame")
    }
}

impl core::error::Error for Lost {}

/// A claimed page: slot holds `frame | CLAIMED`, and the page's fate is the host's.
///
/// While it lives, the guest will not write the page (its `on_alloc` reports it busy).
/// End it with [`Claim::complete`] once the page reads zeros to the guest, or with
/// [`Claim::restore`] if the recycle failed and left the page untouched. Dropping it
/// restores (the safe default when the recycle did not happen).
#[must_use = "a claim holds the guest's page busy until completed or restored"]
#[derive(Debug)]
pub struct Claim<'a> {
    slot: &'a AtomicU64,
    frame: u64,
    index: u32,
}

/// How a [`Claim`] ended, seen from the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The slot held `frame | CLAIMED` and now holds its end value.
    Clean,
    /// The guest had overwritten the claimed slot (which the protocol never does: a
    /// hostile or broken guest). Nothing was written; count it.
    Tampered,
}

/// What [`HostPool::scan`] did with one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// No mark of this pool.
    NotMarked,
    /// A mark that does not hold up (counted and skipped).
    Invalid(Invalid),
    /// The mark was valid but the guest withdrew the offer before the claim.
    Lost,
    /// Claimed, recycled, slot emptied (`Release::Tampered` if the guest had overwritten
    /// the claimed slot: the page was still recycled).
    Recycled(Release),
    /// Claimed, but the recycle failed: slot restored to the frame (the mark was never
    /// touched), so the guest can withdraw the offer.
    Restored(Release),
}

impl<'a> HostPool<'a> {
    /// Registers a pool the guest has initialised (state [`STATE_READY`](crate::STATE_READY)): writes
    /// `pool_id` and the secret `indicator`, then the state `REGISTERED` (`Release`).
    ///
    /// `view` should come from [`PoolView::from_raw`] on the guest's memory, so its
    /// lengths are fixed from validated header values. `indicator` must be a fresh random
    /// `u64` for every registration (from the host's CSPRNG), `pool_id` unique among the
    /// host's pools, and `frame_limit` one past the guest's largest frame number.
    pub fn register(
        view: PoolView<'a>,
        pool_id: u32,
        indicator: u64,
        frame_limit: u64,
    ) -> Result<Self, RegisterError> {
        if pool_id == 0 || indicator == 0 {
            return Err(RegisterError::Reserved);
        }
        view.header()
            .register(pool_id, indicator)
            .map_err(RegisterError::State)?;
        Ok(HostPool::new(view, pool_id, indicator, frame_limit))
    }

    /// A handle on a pool registered earlier, from the host's own records (nothing is
    /// read from or written to the header).
    pub fn new(view: PoolView<'a>, pool_id: u32, indicator: u64, frame_limit: u64) -> Self {
        HostPool {
            view,
            pool_id,
            secret: indicator,
            frame_limit,
        }
    }

    /// The shared view.
    pub fn view(&self) -> PoolView<'a> {
        self.view
    }
    /// The pool id.
    pub fn pool_id(&self) -> u32 {
        self.pool_id
    }
    /// The secret indicator.
    pub fn indicator(&self) -> u64 {
        self.secret
    }
    /// One past the largest frame number the host accepts.
    pub fn frame_limit(&self) -> u64 {
        self.frame_limit
    }

    /// Whether `indicator` is this pool's: the cheap first test of a scan.
    #[inline]
    pub fn is_marked(&self, indicator: u64) -> bool {
        indicator == self.secret
    }

    /// Validates the mark of page `frame`, read from `page` with [`Mark::read`].
    #[inline]
    pub fn validate<P: MarkWords + ?Sized>(&self, frame: u64, page: &P) -> Result<Offer, Reject> {
        self.validate_mark(frame, Mark::read(page))
    }

    /// Validates `mark`, read from page `frame`: the indicator is this pool's secret, the
    /// frame is in range, the location names this pool and a slot inside it, and that
    /// slot (loaded `Acquire`) holds exactly `frame`. Reads one slot; writes nothing.
    #[inline]
    pub fn validate_mark(&self, frame: u64, mark: Mark) -> Result<Offer, Reject> {
        if mark.indicator != self.secret {
            return Err(Reject::NotMarked);
        }
        if frame == 0 || frame >= self.frame_limit || frame > MAX_FRAME {
            return Err(Reject::Invalid(Invalid::Frame));
        }
        if mark.pool_id() != self.pool_id {
            return Err(Reject::Invalid(Invalid::Pool));
        }
        let slot = mark.slot();
        let Some(word) = self.view.slots().get(slot as usize) else {
            return Err(Reject::Invalid(Invalid::Slot));
        };
        if word.load(Ordering::Acquire) != frame {
            return Err(Reject::Invalid(Invalid::NotOffered));
        }
        Ok(Offer { frame, slot })
    }

    /// Claims a validated offer: CAS `frame → frame | CLAIMED` on its slot, the claim's
    /// *linearization point*. On success the page was free (offered) at that instant and
    /// stays the host's until the returned [`Claim`] ends; the guest cannot withdraw it.
    ///
    /// Call it only when the recycle can go ahead at once (whatever can fail is done or
    /// checked before); if the recycle fails anyway, [`Claim::restore`] puts the offer
    /// back, so a guest waiting for the page proceeds.
    #[inline]
    pub fn claim(&self, offer: Offer) -> Result<Claim<'a>, Lost> {
        let Some(slot) = self.view.slots().get(offer.slot as usize) else {
            return Err(Lost);
        };
        if offer.frame == 0 || offer.frame > MAX_FRAME {
            return Err(Lost);
        }
        // `AcqRel`: the `Acquire` half pairs with the guest's offer CAS (`Release`), so
        // every guest write to the page before the free is ordered before the recycle.
        match slot.compare_exchange(
            offer.frame,
            offer.frame | CLAIMED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => Ok(Claim {
                slot,
                frame: offer.frame,
                index: offer.slot,
            }),
            Err(_) => Err(Lost),
        }
    }

    /// Validates, claims and recycles one page: the whole per-page job of a recycler.
    ///
    /// `recycle` runs only after a successful claim and must make the page read zeros to
    /// the guest and return `true`, or leave the page untouched and return `false` (see
    /// [`Claim`]). It is not called for unmarked, invalid or lost pages.
    pub fn scan<P, F>(&self, frame: u64, page: &P, recycle: F) -> Scan
    where
        P: MarkWords + ?Sized,
        F: FnOnce() -> bool,
    {
        let offer = match self.validate(frame, page) {
            Ok(offer) => offer,
            Err(Reject::NotMarked) => return Scan::NotMarked,
            Err(Reject::Invalid(why)) => return Scan::Invalid(why),
        };
        let Ok(claim) = self.claim(offer) else {
            return Scan::Lost;
        };
        if recycle() {
            Scan::Recycled(claim.complete())
        } else {
            Scan::Restored(claim.restore())
        }
    }
}

impl Claim<'_> {
    /// The claimed frame.
    pub fn frame(&self) -> u64 {
        self.frame
    }

    /// The claimed slot's index.
    pub fn slot(&self) -> u32 {
        self.index
    }

    /// Ends the claim after a successful recycle: CAS `frame | CLAIMED → 0` (`Release`,
    /// pairing with the guest's `Acquire` loads of the slot).
    ///
    /// Call it only once the page reads zeros to the guest: after a page swap, or after
    /// zeroing in place with the indicator word stored last (`Release`). From here on the
    /// host must not write the page.
    pub fn complete(self) -> Release {
        let this = ManuallyDrop::new(self);
        this.end(0)
    }

    /// Ends the claim after a failed recycle that left the page untouched: CAS
    /// `frame | CLAIMED → frame`, putting the offer back. The guest's `on_alloc` can then
    /// withdraw it; the next scan may claim it again.
    pub fn restore(self) -> Release {
        let this = ManuallyDrop::new(self);
        this.end(this.frame)
    }

    fn end(&self, to: u64) -> Release {
        match self.slot.compare_exchange(
            self.frame | CLAIMED,
            to,
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => Release::Clean,
            Err(_) => Release::Tampered,
        }
    }
}

impl Drop for Claim<'_> {
    /// Restores the offer: a claim dropped without [`Claim::complete`] (an early return, a
    /// panic in the recycle) must not leave the guest's page busy forever. Correct only
    /// if the recycle did not touch the page, which is the recycle's contract.
    fn drop(&mut self) {
        self.end(self.frame);
    }
}

/// The state a slot value is in, for statistics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// 0.
    Empty,
    /// A frame in `1..=MAX_FRAME`: offered.
    Offered(u64),
    /// `frame | CLAIMED`: the host is recycling it.
    Claimed(u64),
    /// Anything else (only a hostile or broken guest writes it).
    Garbage(u64),
}

impl SlotState {
    /// Decodes a slot value.
    pub fn of(value: u64) -> SlotState {
        match value {
            0 => SlotState::Empty,
            f if f <= MAX_FRAME => SlotState::Offered(f),
            c if c & CLAIMED != 0 && (c & !CLAIMED) != 0 && (c & !CLAIMED) <= MAX_FRAME => {
                SlotState::Claimed(c & !CLAIMED)
            }
            g => SlotState::Garbage(g),
        }
    }
}
