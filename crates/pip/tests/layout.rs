//! The byte layout, checked the way a C guest would see it: a pool written as raw bytes
//! at the documented offsets is accepted by `PoolView::from_raw`, the host's and the
//! guest's writes land at the documented offsets, and hostile headers are refused.

use std::mem::size_of;

use pip::{
    Alloc, AttachError, Free, Guest, HostPool, LayoutError, PoolStorage, PoolView, RegisterError,
    Release, Scan, CLAIMED, HEADER_BYTES, MAGIC, MAX_SHARDS, MAX_SLOTS, SHARD_BYTES, STATE_READY,
    STATE_REGISTERED, VERSION,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// 64-byte aligned raw memory.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

struct Raw(Vec<Line>);

impl Raw {
    fn zeroed(len: usize) -> Raw {
        Raw(vec![Line([0; 64]); len.div_ceil(64)])
    }
    fn len(&self) -> usize {
        self.0.len() * 64
    }
    fn ptr(&self) -> *const u8 {
        self.0.as_ptr() as *const u8
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes; the vector holds `len()` of them contiguously.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len()) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `bytes`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, len) }
    }
    fn put32(&mut self, at: usize, v: u32) {
        self.bytes_mut()[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(&mut self, at: usize, v: u64) {
        self.bytes_mut()[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn get32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes()[at..at + 4].try_into().unwrap())
    }
    fn get64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes()[at..at + 8].try_into().unwrap())
    }
    /// A view of the pool; while it lives the memory is only accessed atomically.
    fn view(&self) -> Result<PoolView<'_>, LayoutError> {
        // SAFETY: the memory is owned by `self`, valid and 64-aligned for the borrow; no
        // `&mut` exists while the view lives and every access through it is atomic.
        unsafe { PoolView::from_raw(self.ptr(), self.len()) }
    }
}

/// A header for `k` shards of `s` slots, written as a C guest would, at the documented
/// offsets.
fn c_guest_pool(k: u32, s: u32) -> Raw {
    let off = 64 + 64 * k as usize;
    let mut raw = Raw::zeroed(off + 8 * (k as usize * s as usize));
    raw.put64(0, 0x4c4f4f502d504950); // "PIP-POOL"
    raw.put32(8, 1);
    raw.put32(12, 1); // ready
    raw.put32(20, k);
    raw.put32(24, s);
    raw.put64(40, k as u64 * s as u64);
    raw.put64(48, off as u64);
    raw
}

#[test]
fn documented_constants() {
    assert_eq!(MAGIC, 0x4c4f4f502d504950);
    assert_eq!(&MAGIC.to_le_bytes(), b"PIP-POOL");
    assert_eq!(VERSION, 1);
    assert_eq!(size_of::<pip::PoolHeader>(), HEADER_BYTES);
    assert_eq!(size_of::<pip::Shard>(), SHARD_BYTES);
    assert_eq!(pip::slots_offset(3), 64 + 3 * 64);
    assert_eq!(pip::pool_bytes(2, 4), 64 + 128 + 64);
    assert_eq!(pip::location(7, 9), 7 << 32 | 9);
    // The typed storage is byte for byte the raw layout.
    assert_eq!(size_of::<PoolStorage<2, 8>>(), pip::pool_bytes(2, 4));
    assert_eq!(size_of::<PoolStorage<3, 24>>(), pip::pool_bytes(3, 8));
}

#[test]
fn c_guest_pool_round_trip() {
    let raw = c_guest_pool(2, 4);
    {
        let view = raw.view().unwrap();
        assert_eq!(view.shards().len(), 2);
        assert_eq!(view.slots().len(), 8);
        let host = HostPool::register(view, 9, 0x1122_3344_5566_7788, 1 << 20).unwrap();
        let guest = Guest::attach(view).unwrap();
        let page: [AtomicU64; 3] = Default::default();
        assert_eq!(guest.on_free(1, 0x4_2000, &page), Free::Offered(4));
        assert_eq!(page[0].load(Ordering::Relaxed), 0x1122_3344_5566_7788);
        assert_eq!(page[1].load(Ordering::Relaxed), 9 << 32 | 4);
        let offer = host.validate(0x4_2000, &page).unwrap();
        let claim = host.claim(offer).unwrap();
        assert_eq!(view.slots()[4].load(Ordering::Relaxed), 0x4_2000 | CLAIMED);
        // Leave it claimed, to see it in the bytes below.
        std::mem::forget(claim);
        assert_eq!(guest.on_free(1, 0x4_2001, &page), Free::Offered(5));
        assert_eq!(guest.on_alloc(1, 0x4_2001, &page), Alloc::Cancelled);
        assert_eq!(guest.on_free(0, 0x77, &page), Free::Offered(0));
    }
    // The bytes, at the documented offsets.
    assert_eq!(raw.get32(12), STATE_REGISTERED);
    assert_eq!(raw.get32(16), 9);
    assert_eq!(raw.get64(32), 0x1122_3344_5566_7788);
    let slots = 64 + 2 * 64;
    assert_eq!(raw.get64(slots), 0x77);
    assert_eq!(raw.get64(slots + 4 * 8), 0x4_2000 | 1 << 63);
    assert_eq!(raw.get64(slots + 5 * 8), 0);
    // Shard 1 (vCPU 1): cursor at offset 2 of its range, 2 offers, 1 cancel.
    let shard1 = 64 + 64;
    assert_eq!(raw.get32(shard1), 2);
    assert_eq!(raw.get64(shard1 + 8), 2); // offered
    assert_eq!(raw.get64(shard1 + 32), 1); // cancelled

    // Shard 0: one offer, cursor 1.
    assert_eq!(raw.get32(64), 1);
    assert_eq!(raw.get64(64 + 8), 1);
}

#[test]
fn init_raw_writes_the_documented_header() {
    // 1152 bytes, 3 shards: (1152 - 64 - 3 * 64) / 8 = 112 slots fit, 37 per shard.
    let raw = Raw::zeroed(1152);
    assert_eq!(raw.len(), 1152);
    {
        // SAFETY: as in `Raw::view`.
        let view = unsafe { PoolView::init_raw(raw.ptr(), raw.len(), 3) }.unwrap();
        assert_eq!(view.slots().len(), 111);
        assert_eq!(view.shard_slots(), 37);
        assert_eq!(view.header().state(), STATE_READY);
    }
    assert_eq!(raw.get64(0), MAGIC);
    assert_eq!(raw.get32(8), VERSION);
    assert_eq!(raw.get32(12), STATE_READY);
    assert_eq!(raw.get32(20), 3);
    assert_eq!(raw.get32(24), 37);
    assert_eq!(raw.get64(40), 111);
    assert_eq!(raw.get64(48), 64 + 3 * 64);
    // A second init finds the header in use.
    // SAFETY: as in `Raw::view`.
    let again = unsafe { PoolView::init_raw(raw.ptr(), raw.len(), 3) };
    assert_eq!(again.unwrap_err(), LayoutError::NotEmpty);
    // Too small for one slot per shard.
    let tiny = Raw::zeroed(256);
    // SAFETY: as in `Raw::view`.
    let tiny = unsafe { PoolView::init_raw(tiny.ptr(), tiny.len(), 3) };
    assert_eq!(tiny.unwrap_err(), LayoutError::TooShort);
}

#[test]
fn hostile_headers_are_refused() {
    type Edit = fn(&mut Raw);
    let cases: [(&str, Edit, LayoutError); 12] = [
        ("magic", |r| r.put64(0, 1), LayoutError::Magic),
        ("version", |r| r.put32(8, 2), LayoutError::Version),
        ("no shards", |r| r.put32(20, 0), LayoutError::ShardCount),
        (
            "too many shards",
            |r| r.put32(20, MAX_SHARDS + 1),
            LayoutError::ShardCount,
        ),
        ("no slots", |r| r.put32(24, 0), LayoutError::ShardSlots),
        (
            "slot count above MAX_SLOTS",
            |r| {
                r.put32(20, 4096);
                r.put32(24, u32::MAX);
            },
            LayoutError::ShardSlots,
        ),
        ("slot count", |r| r.put64(40, 9), LayoutError::SlotCount),
        ("slots offset", |r| r.put64(48, 0), LayoutError::SlotsOffset),
        (
            "more slots than memory",
            |r| {
                r.put32(24, 5);
                r.put64(40, 10);
            },
            LayoutError::TooShort,
        ),
        (
            "more shards than memory",
            |r| {
                r.put32(20, 4000);
                r.put32(24, 1);
                r.put64(40, 4000);
                r.put64(48, 64 + 64 * 4000);
            },
            LayoutError::TooShort,
        ),
        (
            "huge but consistent",
            |r| {
                r.put32(20, 1);
                r.put32(24, u32::MAX);
                r.put64(40, MAX_SLOTS);
                r.put64(48, 128);
            },
            LayoutError::TooShort,
        ),
        ("fine", |_| {}, LayoutError::NotEmpty),
    ];
    for (name, edit, want) in cases {
        let mut raw = c_guest_pool(2, 4);
        edit(&mut raw);
        match raw.view() {
            Ok(view) => {
                assert_eq!(want, LayoutError::NotEmpty, "{name}: accepted");
                assert_eq!(view.slots().len(), 8);
            }
            Err(e) => assert_eq!(e, want, "{name}"),
        }
    }
    // Misaligned and short memory.
    let raw = c_guest_pool(2, 4);
    // SAFETY: `ptr + 8 .. ptr + len` is inside `raw`; it is refused before any access.
    let odd = unsafe { PoolView::from_raw(raw.ptr().add(8), raw.len() - 8) };
    assert_eq!(odd.unwrap_err(), LayoutError::Misaligned);
    // SAFETY: a null pointer is refused before any access.
    let null = unsafe { PoolView::from_raw(std::ptr::null(), 4096) };
    assert_eq!(null.unwrap_err(), LayoutError::Misaligned);
    // SAFETY: the first 63 bytes of `raw`; refused before any access.
    let short = unsafe { PoolView::from_raw(raw.ptr(), 63) };
    assert_eq!(short.unwrap_err(), LayoutError::TooShort);
    // SAFETY: the pool minus its last slot: refused, the slots would not fit.
    let short = unsafe { PoolView::from_raw(raw.ptr(), raw.len() - 8) };
    assert_eq!(short.unwrap_err(), LayoutError::TooShort);
}

#[test]
fn registration_and_attach_states() {
    let pool = PoolStorage::<2, 8>::new();
    assert_eq!(pool.view().unwrap_err(), LayoutError::Magic);
    let view = pool.init().unwrap();
    assert_eq!(pool.init().unwrap_err(), LayoutError::NotEmpty);
    assert_eq!(
        Guest::attach(view).unwrap_err(),
        AttachError::NotRegistered(STATE_READY)
    );
    assert_eq!(
        HostPool::register(view, 0, 5, 10).unwrap_err(),
        RegisterError::Reserved
    );
    assert_eq!(
        HostPool::register(view, 5, 0, 10).unwrap_err(),
        RegisterError::Reserved
    );
    HostPool::register(view, 5, 77, 10).unwrap();
    assert_eq!(
        HostPool::register(view, 6, 78, 10).unwrap_err(),
        RegisterError::State(STATE_REGISTERED)
    );
    let guest = Guest::attach(view).unwrap();
    assert_eq!((guest.pool_id(), guest.secret()), (5, 77));

    let odd = PoolStorage::<3, 10>::new();
    assert_eq!(odd.init().unwrap_err(), LayoutError::ShardSlots);
    let none = PoolStorage::<0, 0>::new();
    assert_eq!(none.init().unwrap_err(), LayoutError::ShardCount);
}

#[test]
fn a_dropped_claim_restores_the_offer() {
    let pool = PoolStorage::<1, 4>::new();
    let view = pool.init().unwrap();
    let host = HostPool::register(view, 1, 0xfeed, 1000).unwrap();
    let guest = Guest::attach(view).unwrap();
    let page: [AtomicU64; 2] = Default::default();
    assert_eq!(guest.on_free(0, 10, &page), Free::Offered(0));
    let claim = host.claim(host.validate(10, &page).unwrap()).unwrap();
    assert_eq!(guest.with_spins(3).on_alloc(0, 10, &page), Alloc::Busy);
    drop(claim);
    assert_eq!(view.slots()[0].load(Ordering::Relaxed), 10);
    assert_eq!(guest.on_alloc(0, 10, &page), Alloc::Cancelled);
    assert_eq!(view.counters().busy, 1);

    // A guest that overwrites a claimed slot is noticed, and nothing is written.
    assert_eq!(guest.on_free(0, 10, &page), Free::Offered(1));
    let claim = host.claim(host.validate(10, &page).unwrap()).unwrap();
    view.slots()[1].store(3, Ordering::Relaxed);
    assert_eq!(claim.complete(), Release::Tampered);
    assert_eq!(view.slots()[1].load(Ordering::Relaxed), 3);
    assert_eq!(
        host.scan(10, &page, || unreachable!()),
        Scan::Invalid(pip::Invalid::NotOffered)
    );
}

#[test]
fn unofferable_frames_are_refused_and_never_cancelled() {
    let pool = PoolStorage::<1, 4>::new();
    let view = pool.init().unwrap();
    HostPool::register(view, 1, 0xfeed, 1000).unwrap();
    let guest = Guest::attach(view).unwrap();
    let page: [AtomicU64; 2] = Default::default();
    for frame in [0, pip::MAX_FRAME + 1, 5 | CLAIMED, u64::MAX] {
        page[0].store(0xfeed, Ordering::Relaxed);
        page[1].store(pip::location(1, 0), Ordering::Relaxed);
        assert_eq!(guest.on_alloc(0, frame, &page), Alloc::Stale);
        assert_eq!(page[0].load(Ordering::Relaxed), 0);
        assert_eq!(guest.on_alloc(0, frame, &page), Alloc::Unmarked);
        page[0].store(0xfeed, Ordering::Relaxed);
        assert_eq!(guest.on_free(0, frame, &page), Free::Refused);
        assert_eq!(page[0].load(Ordering::Relaxed), 0);
    }
    assert_eq!(view.occupied(), 0);
    assert_eq!(view.counters().refused, 4);
}
