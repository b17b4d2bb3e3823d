//! The pool's shared-memory layout: header, shard records, slot array.
//!
//! See the crate docs for the byte-offset tables. Every field is an atomic, so a `&` to
//! shared memory that the other side writes concurrently is sound (interior mutability,
//! and no byte of the pool is ever read non-atomically).

use core::fmt;

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// `magic`: the bytes `PIP-POOL` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PIP-POOL");
/// The layout version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Size of [`PoolHeader`] in bytes; the first shard record starts here.
pub const HEADER_BYTES: usize = 64;
/// Size of one [`Shard`] record in bytes (one cache line).
pub const SHARD_BYTES: usize = 64;
/// Size of one slot in bytes.
pub const SLOT_BYTES: usize = 8;
/// Required alignment of the pool's first byte.
pub const POOL_ALIGN: usize = 64;
/// Largest number of shards a pool may have.
pub const MAX_SHARDS: u32 = 4096;
/// Largest number of slots a pool may have (a slot index fits in 32 bits).
pub const MAX_SLOTS: u64 = u32::MAX as u64;

/// `state`: the header is zeroed; nobody has initialised it.
pub const STATE_EMPTY: u32 = 0;
/// `state`: the guest has written the layout fields and waits for the host.
pub const STATE_READY: u32 = 1;
/// `state`: the host has written `pool_id` and `indicator`; the pool is live.
pub const STATE_REGISTERED: u32 = 2;

/// The pool header: the first 64 bytes of the pool. Offsets are in the crate docs.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct PoolHeader {
    magic: AtomicU64,
    version: AtomicU32,
    state: AtomicU32,
    pool_id: AtomicU32,
    shard_count: AtomicU32,
    shard_slots: AtomicU32,
    reserved0: AtomicU32,
    indicator: AtomicU64,
    slot_count: AtomicU64,
    slots_offset: AtomicU64,
    reserved1: AtomicU64,
}

/// One shard: an allocation cursor and the guest's counters for one vCPU (or a group of
/// vCPUs), on a cache line of its own. Offsets are in the crate docs.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Shard {
    /// Next slot to probe, as an offset into the shard's range (a hint).
    pub(crate) cursor: AtomicU32,
    reserved: AtomicU32,
    pub(crate) offered: AtomicU64,
    pub(crate) full: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) busy: AtomicU64,
    reserved1: AtomicU64,
}

#[cfg(not(pip_loom))]
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<PoolHeader>() == HEADER_BYTES);
    assert!(align_of::<PoolHeader>() == POOL_ALIGN);
    assert!(offset_of!(PoolHeader, magic) == 0);
    assert!(offset_of!(PoolHeader, version) == 8);
    assert!(offset_of!(PoolHeader, state) == 12);
    assert!(offset_of!(PoolHeader, pool_id) == 16);
    assert!(offset_of!(PoolHeader, shard_count) == 20);
    assert!(offset_of!(PoolHeader, shard_slots) == 24);
    assert!(offset_of!(PoolHeader, reserved0) == 28);
    assert!(offset_of!(PoolHeader, indicator) == 32);
    assert!(offset_of!(PoolHeader, slot_count) == 40);
    assert!(offset_of!(PoolHeader, slots_offset) == 48);
    assert!(offset_of!(PoolHeader, reserved1) == 56);

    assert!(size_of::<Shard>() == SHARD_BYTES);
    assert!(align_of::<Shard>() == 64);
    assert!(offset_of!(Shard, cursor) == 0);
    assert!(offset_of!(Shard, reserved) == 4);
    assert!(offset_of!(Shard, offered) == 8);
    assert!(offset_of!(Shard, full) == 16);
    assert!(offset_of!(Shard, refused) == 24);
    assert!(offset_of!(Shard, cancelled) == 32);
    assert!(offset_of!(Shard, stale) == 40);
    assert!(offset_of!(Shard, busy) == 48);
    assert!(offset_of!(Shard, reserved1) == 56);

    assert!(size_of::<AtomicU64>() == SLOT_BYTES);
    assert!(align_of::<AtomicU64>() == 8);
};

impl PoolHeader {
    /// A zeroed header (state [`STATE_EMPTY`]).
    pub fn new() -> Self {
        PoolHeader {
            magic: AtomicU64::new(0),
            version: AtomicU32::new(0),
            state: AtomicU32::new(STATE_EMPTY),
            pool_id: AtomicU32::new(0),
            shard_count: AtomicU32::new(0),
            shard_slots: AtomicU32::new(0),
            reserved0: AtomicU32::new(0),
            indicator: AtomicU64::new(0),
            slot_count: AtomicU64::new(0),
            slots_offset: AtomicU64::new(0),
            reserved1: AtomicU64::new(0),
        }
    }

    /// `magic` (offset 0).
    pub fn magic(&self) -> u64 {
        self.magic.load(Ordering::Relaxed)
    }
    /// `version` (offset 8).
    pub fn version(&self) -> u32 {
        self.version.load(Ordering::Relaxed)
    }
    /// `state` (offset 12), loaded with `Acquire`: once it reads [`STATE_REGISTERED`],
    /// `pool_id` and `indicator` read the host's values.
    pub fn state(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }
    /// `pool_id` (offset 16), written by the host at registration.
    pub fn pool_id(&self) -> u32 {
        self.pool_id.load(Ordering::Relaxed)
    }
    /// `shard_count` (offset 20).
    pub fn shard_count(&self) -> u32 {
        self.shard_count.load(Ordering::Relaxed)
    }
    /// `shard_slots` (offset 24): slots per shard.
    pub fn shard_slots(&self) -> u32 {
        self.shard_slots.load(Ordering::Relaxed)
    }
    /// `indicator` (offset 32): the pool's secret, written by the host at registration.
    pub fn indicator(&self) -> u64 {
        self.indicator.load(Ordering::Relaxed)
    }
    /// `slot_count` (offset 40): `shard_count * shard_slots`.
    pub fn slot_count(&self) -> u64 {
        self.slot_count.load(Ordering::Relaxed)
    }
    /// `slots_offset` (offset 48): byte offset of slot 0 from the start of the pool.
    pub fn slots_offset(&self) -> u64 {
        self.slots_offset.load(Ordering::Relaxed)
    }

    /// The host's side of registration: `READY → REGISTERED`, publishing `pool_id` and
    /// `indicator` with the `Release` of the state change. Fails with the state it found
    /// if that was not [`STATE_READY`].
    pub(crate) fn register(&self, pool_id: u32, indicator: u64) -> Result<(), u32> {
        let found = self.state.load(Ordering::Acquire);
        if found != STATE_READY {
            return Err(found);
        }
        self.pool_id.store(pool_id, Ordering::Relaxed);
        self.indicator.store(indicator, Ordering::Relaxed);
        self.state
            .compare_exchange(
                STATE_READY,
                STATE_REGISTERED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map(|_| ())
    }
}

impl Default for PoolHeader {
    fn default() -> Self {
        Self::new()
    }
}

impl Shard {
    /// A zeroed shard record.
    pub fn new() -> Self {
        Shard {
            cursor: AtomicU32::new(0),
            reserved: AtomicU32::new(0),
            offered: AtomicU64::new(0),
            full: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            reserved1: AtomicU64::new(0),
        }
    }

    /// A snapshot of this shard's counters (each `Relaxed`; approximate while the guest
    /// runs, and untrusted on the host).
    pub fn counters(&self) -> GuestCounters {
        GuestCounters {
            offered: self.offered.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
        }
    }

    /// The allocation cursor (an offset into the shard's slot range; a hint).
    pub fn cursor(&self) -> u32 {
        self.cursor.load(Ordering::Relaxed)
    }
}

impl Default for Shard {
    fn default() -> Self {
        Self::new()
    }
}

/// The guest's counters, per shard or summed over shards ([`PoolView::counters`]).
///
/// The guest bumps them with a `Relaxed` load and store (no read-modify-write on the hot
/// path), so two vCPUs sharing a shard may lose a count; with one vCPU per shard they are
/// exact.
///
/// Non-exhaustive: more counters may be added; start from `GuestCounters::default()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuestCounters {
    /// Pages offered to the host (a slot taken and the mark written).
    pub offered: u64,
    /// Frees that found no empty slot within the probe window: slot exhaustion.
    pub full: u64,
    /// Frees refused because the frame number cannot be offered (0 or above `MAX_FRAME`).
    pub refused: u64,
    /// Allocations that withdrew their own offer (won the slot CAS).
    pub cancelled: u64,
    /// Allocations that found a mark whose slot no longer held the page (cleared it).
    pub stale: u64,
    /// Allocations that found the host recycling the page and reported it busy.
    pub busy: u64,
}

impl core::ops::Add for GuestCounters {
    type Output = GuestCounters;
    fn add(self, o: GuestCounters) -> GuestCounters {
        GuestCounters {
            offered: self.offered.wrapping_add(o.offered),
            full: self.full.wrapping_add(o.full),
            refused: self.refused.wrapping_add(o.refused),
            cancelled: self.cancelled.wrapping_add(o.cancelled),
            stale: self.stale.wrapping_add(o.stale),
            busy: self.busy.wrapping_add(o.busy),
        }
    }
}

/// Why a pool's memory was not accepted as a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    /// The pool's address is null or not [`POOL_ALIGN`]-aligned.
    Misaligned,
    /// The memory is shorter than the layout the header describes (or than a header).
    TooShort,
    /// `magic` is not [`MAGIC`].
    Magic,
    /// `version` is not [`VERSION`].
    Version,
    /// `shard_count` is 0 or above [`MAX_SHARDS`], or disagrees with the shard records.
    ShardCount,
    /// `shard_slots` is 0, or `shard_count * shard_slots` is above [`MAX_SLOTS`], or the
    /// slots given cannot be split into equal shards.
    ShardSlots,
    /// `slot_count` is not `shard_count * shard_slots`, or disagrees with the slot array.
    SlotCount,
    /// `slots_offset` is not `HEADER_BYTES + SHARD_BYTES * shard_count`.
    SlotsOffset,
    /// Initialisation found a header that is not zeroed (state not [`STATE_EMPTY`]).
    NotEmpty,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayoutError::Misaligned => "the pool's address is null or not 64-byte aligned",
            LayoutError::TooShort => "the pool's memory is shorter than its layout",
            LayoutError::Magic => "the pool header's magic is not \"PIP-POOL\"",
            LayoutError::Version => "the pool header's version is not 1",
            LayoutError::ShardCount => "the pool's shard count is out of range",
            LayoutError::ShardSlots => "the pool's slots per shard are out of range",
            LayoutError::SlotCount => "the pool's slot count disagrees with its shards",
            LayoutError::SlotsOffset => "the pool's slots offset disagrees with its shards",
            LayoutError::NotEmpty => "the pool header is not zeroed (already initialised?)",
        })
    }
}

impl core::error::Error for LayoutError {}

/// The byte offset of slot 0 in a pool of `shard_count` shards.
pub const fn slots_offset(shard_count: u32) -> usize {
    HEADER_BYTES + SHARD_BYTES * shard_count as usize
}

/// The bytes a pool of `shard_count` shards of `shard_slots` slots occupies.
pub const fn pool_bytes(shard_count: u32, shard_slots: u32) -> usize {
    slots_offset(shard_count) + SLOT_BYTES * shard_count as usize * shard_slots as usize
}

/// A borrowed view of one pool in shared memory: the header, the shard records and the
/// slot array (`AtomicU64` frame numbers; 0 = empty).
///
/// The lengths of `shards` and `slots` are fixed when the view is made, from header
/// values validated against the memory's size; the header is never re-read for them, so
/// a guest that rewrites its header later cannot move the host's accesses.
#[derive(Clone, Copy, Debug)]
pub struct PoolView<'a> {
    header: &'a PoolHeader,
    shards: &'a [Shard],
    slots: &'a [AtomicU64],
}

/// The layout values of a header, read once each.
struct Described {
    shard_count: u32,
    slot_count: u64,
}

fn describe(header: &PoolHeader) -> Result<Described, LayoutError> {
    if header.magic() != MAGIC {
        return Err(LayoutError::Magic);
    }
    if header.version() != VERSION {
        return Err(LayoutError::Version);
    }
    let shard_count = header.shard_count();
    if shard_count == 0 || shard_count > MAX_SHARDS {
        return Err(LayoutError::ShardCount);
    }
    let shard_slots = header.shard_slots();
    let total = shard_count as u64 * shard_slots as u64;
    if shard_slots == 0 || total > MAX_SLOTS {
        return Err(LayoutError::ShardSlots);
    }
    if header.slot_count() != total {
        return Err(LayoutError::SlotCount);
    }
    if header.slots_offset() != slots_offset(shard_count) as u64 {
        return Err(LayoutError::SlotsOffset);
    }
    Ok(Described {
        shard_count,
        slot_count: total,
    })
}

/// The guest's initialisation: writes the layout fields, then `state = READY` with
/// `Release`. The header must be zeroed.
fn write_layout(
    header: &PoolHeader,
    shard_count: u32,
    shard_slots: u32,
) -> Result<(), LayoutError> {
    if header.state.load(Ordering::Acquire) != STATE_EMPTY {
        return Err(LayoutError::NotEmpty);
    }
    if shard_count == 0 || shard_count > MAX_SHARDS {
        return Err(LayoutError::ShardCount);
    }
    let total = shard_count as u64 * shard_slots as u64;
    if shard_slots == 0 || total > MAX_SLOTS {
        return Err(LayoutError::ShardSlots);
    }
    header.magic.store(MAGIC, Ordering::Relaxed);
    header.version.store(VERSION, Ordering::Relaxed);
    header.pool_id.store(0, Ordering::Relaxed);
    header.indicator.store(0, Ordering::Relaxed);
    header.shard_count.store(shard_count, Ordering::Relaxed);
    header.shard_slots.store(shard_slots, Ordering::Relaxed);
    header.slot_count.store(total, Ordering::Relaxed);
    header
        .slots_offset
        .store(slots_offset(shard_count) as u64, Ordering::Relaxed);
    header.state.store(STATE_READY, Ordering::Release);
    Ok(())
}

impl<'a> PoolView<'a> {
    /// A view of a pool in properly typed storage, checking that the header describes
    /// exactly these shard records and slots (magic, version, counts, `slots_offset`).
    pub fn new(
        header: &'a PoolHeader,
        shards: &'a [Shard],
        slots: &'a [AtomicU64],
    ) -> Result<Self, LayoutError> {
        let d = describe(header)?;
        if shards.len() as u64 != d.shard_count as u64 {
            return Err(LayoutError::ShardCount);
        }
        if slots.len() as u64 != d.slot_count {
            return Err(LayoutError::SlotCount);
        }
        Ok(PoolView {
            header,
            shards,
            slots,
        })
    }

    /// The guest's initialisation of typed storage whose header is zeroed: splits `slots`
    /// into `shards.len()` equal shards, writes the layout fields and sets the state to
    /// [`STATE_READY`]. The guest then hands the pool's address to the host (how is the
    /// embedder's business) and waits for [`STATE_REGISTERED`].
    pub fn init(
        header: &'a PoolHeader,
        shards: &'a [Shard],
        slots: &'a [AtomicU64],
    ) -> Result<Self, LayoutError> {
        let shard_count = u32::try_from(shards.len()).map_err(|_| LayoutError::ShardCount)?;
        if shard_count == 0 || shard_count > MAX_SHARDS {
            return Err(LayoutError::ShardCount);
        }
        let shard_slots = slots.len() / shards.len();
        if shard_slots == 0 || shard_slots * shards.len() != slots.len() {
            return Err(LayoutError::ShardSlots);
        }
        let shard_slots = u32::try_from(shard_slots).map_err(|_| LayoutError::ShardSlots)?;
        write_layout(header, shard_count, shard_slots)?;
        PoolView::new(header, shards, slots)
    }

    /// A view of a pool at `ptr`, `len` bytes long, validating the header against `len`.
    ///
    /// The header is read once, field by field; the view's shard and slot counts come
    /// from those reads and are checked to fit in `len` bytes, so a header that changes
    /// later (a hostile guest) cannot make the view reach outside the memory.
    ///
    /// # Safety
    /// - `ptr..ptr + len` must be valid for reads and atomic writes for `'a`, and stay
    ///   mapped for all of `'a`;
    /// - for all of `'a`, every access to that memory by anyone (this process, another
    ///   process, a guest) must be an aligned atomic access of the width the layout gives
    ///   the field (or a hardware page swap that replaces it whole); no Rust code may hold
    ///   a `&mut` to it or read it non-atomically.
    ///
    /// Alignment and length are checked ([`LayoutError::Misaligned`],
    /// [`LayoutError::TooShort`]).
    #[cfg(not(pip_loom))]
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Result<Self, LayoutError> {
        if ptr.is_null() || ptr as usize % POOL_ALIGN != 0 {
            return Err(LayoutError::Misaligned);
        }
        if len < HEADER_BYTES {
            return Err(LayoutError::TooShort);
        }
        // SAFETY: `ptr` is non-null and 64-byte aligned, and (caller) valid for `len >= 64`
        // bytes of reads and atomic writes for 'a, accessed only atomically; `PoolHeader`
        // is 64 bytes of atomics (any bit pattern is valid), align 64.
        let header: &'a PoolHeader = unsafe { &*(ptr as *const PoolHeader) };
        let d = describe(header)?;
        let need = (d.slot_count)
            .checked_mul(SLOT_BYTES as u64)
            .and_then(|s| s.checked_add(slots_offset(d.shard_count) as u64));
        match need {
            Some(need) if need <= len as u64 => {}
            _ => return Err(LayoutError::TooShort),
        }
        // SAFETY: the shard records start right after the 64-byte header (64-byte aligned)
        // and `shard_count` of them end at `slots_offset <= need <= len`; they are atomics
        // (any bit pattern valid) and the caller guarantees validity and atomic-only access.
        let shards: &'a [Shard] = unsafe {
            core::slice::from_raw_parts(
                ptr.add(HEADER_BYTES) as *const Shard,
                d.shard_count as usize,
            )
        };
        // SAFETY: slot 0 is at `slots_offset` (a multiple of 64, so 8-byte aligned) and
        // `slot_count` slots of 8 bytes end at `need <= len` (which fits in usize, being at
        // most `len`); `AtomicU64` accepts any bit pattern; access is atomic-only (caller).
        let slots: &'a [AtomicU64] = unsafe {
            core::slice::from_raw_parts(
                ptr.add(slots_offset(d.shard_count)) as *const AtomicU64,
                d.slot_count as usize,
            )
        };
        Ok(PoolView {
            header,
            shards,
            slots,
        })
    }

    /// The guest's initialisation of raw, zeroed pool memory: as many equal shards of
    /// `shard_count` as fit in `len` bytes. Returns the view; the state is then
    /// [`STATE_READY`].
    ///
    /// # Safety
    /// As for [`PoolView::from_raw`].
    #[cfg(not(pip_loom))]
    pub unsafe fn init_raw(
        ptr: *const u8,
        len: usize,
        shard_count: u32,
    ) -> Result<Self, LayoutError> {
        if ptr.is_null() || ptr as usize % POOL_ALIGN != 0 {
            return Err(LayoutError::Misaligned);
        }
        if shard_count == 0 || shard_count > MAX_SHARDS {
            return Err(LayoutError::ShardCount);
        }
        let offset = slots_offset(shard_count);
        if len < offset {
            return Err(LayoutError::TooShort);
        }
        let per_shard = (len - offset) / SLOT_BYTES / shard_count as usize;
        let max_per_shard = (MAX_SLOTS / shard_count as u64) as usize;
        let shard_slots =
            u32::try_from(per_shard.min(max_per_shard)).map_err(|_| LayoutError::ShardSlots)?;
        if shard_slots == 0 {
            return Err(LayoutError::TooShort);
        }
        // SAFETY: as in `from_raw`: aligned, at least 64 bytes (`len >= offset >= 128`),
        // valid and atomic-only (caller).
        let header: &'a PoolHeader = unsafe { &*(ptr as *const PoolHeader) };
        write_layout(header, shard_count, shard_slots)?;
        // SAFETY: forwarded from this function's caller.
        unsafe { PoolView::from_raw(ptr, len) }
    }

    /// The header.
    pub fn header(&self) -> &'a PoolHeader {
        self.header
    }

    /// The shard records.
    pub fn shards(&self) -> &'a [Shard] {
        self.shards
    }

    /// The slot array.
    pub fn slots(&self) -> &'a [AtomicU64] {
        self.slots
    }

    /// Slots per shard (the view's, fixed when it was made).
    pub fn shard_slots(&self) -> usize {
        // `new` checked slots.len() == shards.len() * shard_slots with shards.len() >= 1.
        self.slots.len() / self.shards.len()
    }

    /// The guest's counters summed over all shards.
    pub fn counters(&self) -> GuestCounters {
        self.shards
            .iter()
            .fold(GuestCounters::default(), |acc, s| acc + s.counters())
    }

    /// How many slots hold a frame (offered or claimed), by a `Relaxed` pass.
    pub fn occupied(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count()
    }
}

/// Typed storage for a pool of `SHARDS` shards and `SLOTS` slots, laid out byte for byte
/// as the raw layout (`#[repr(C)]`: header, shard records, slots), for guests written in
/// Rust, tests and benchmarks. Large pools belong on the heap (`Box::new` of a
/// `PoolStorage` builds it on the stack first; prefer small `SLOTS` there).
#[repr(C)]
#[derive(Debug)]
pub struct PoolStorage<const SHARDS: usize, const SLOTS: usize> {
    header: PoolHeader,
    shards: [Shard; SHARDS],
    slots: [AtomicU64; SLOTS],
}

impl<const SHARDS: usize, const SLOTS: usize> PoolStorage<SHARDS, SLOTS> {
    /// Zeroed storage (state [`STATE_EMPTY`]).
    pub fn new() -> Self {
        PoolStorage {
            header: PoolHeader::new(),
            shards: core::array::from_fn(|_| Shard::new()),
            slots: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The guest's initialisation ([`PoolView::init`]); `SLOTS` must be a multiple of
    /// `SHARDS`.
    pub fn init(&self) -> Result<PoolView<'_>, LayoutError> {
        PoolView::init(&self.header, &self.shards, &self.slots)
    }

    /// A view of the (initialised) pool ([`PoolView::new`]).
    pub fn view(&self) -> Result<PoolView<'_>, LayoutError> {
        PoolView::new(&self.header, &self.shards, &self.slots)
    }

    /// The address of the first byte, for handing the pool to a host as raw memory.
    pub fn as_ptr(&self) -> *const u8 {
        self as *const Self as *const u8
    }
}

impl<const SHARDS: usize, const SLOTS: usize> Default for PoolStorage<SHARDS, SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}
