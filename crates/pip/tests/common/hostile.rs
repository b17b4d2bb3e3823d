//! The host's validation and claim logic against a hostile guest, driven by arbitrary
//! bytes.
//!
//! Shared by the cargo-fuzz target `fuzz/fuzz_targets/pip_validate.rs`, by the test
//! `tests/fuzz_inputs.rs` (hand-written inputs), and by the workspace's `fuzz-corpus`
//! crate, which replays the checked-in corpus under plain `cargo test --workspace`.
//! [`run`] never panics because of its input: it panics only when the host code panics,
//! reads or writes outside the pool, or claims a page whose slot did not point at it.
//!
//! # Input format
//! Reading past the end yields zero bytes, except where a scan is expected: there the
//! input ends. `u64` values are 8 bytes, little-endian.
//!
//! 1. **Raw header** (`h`, then 64 bytes): if `h % 2 == 1`, the 64 bytes are a header as
//!    the guest wrote it, placed in front of `64 * (h / 2 % 8)` more zero bytes, and
//!    handed to `PoolView::from_raw`: it must not panic, and a view it accepts must lie
//!    inside the memory. Nothing else is read for it.
//! 2. **Pool**: a byte `k` (`1 + k % 4` shards), a byte `s` (`1 + s % 8` slots per shard),
//!    a byte `id` (the host's pool id, `1 + id % 3`), a `u64` secret (made non-zero) and
//!    a byte `l` choosing the frame limit, `FRAME_LIMITS[l % 4]`.
//! 3. **Slots**: for each slot, a `VALUE` (below): the guest's initial contents.
//! 4. **Scans**, until the input ends: a byte `op`, then
//!    - a `VALUE`: the frame number the host scans;
//!    - the mark: a byte `ind` (indicator: `ind % 4` = 0 the secret, 1 zero, 2 the
//!      secret with bit 0 flipped, 3 a `u64`), and a location: a byte `pl` (pool id:
//!      `pl % 4` = 0 the host's, 1 zero, 2 the host's + 1, 3 a `u32` of 4 bytes) and a
//!      byte `sl` (slot: `sl % 4` = 0 `sl / 4 % slot_count`, 1 `slot_count`, 2
//!      `u32::MAX`, 3 a `u32` of 4 bytes);
//!    - a byte `t1` and, if `t1 % 4 == 3`, a slot index byte and a `VALUE`: the guest
//!      rewrites that slot between validation and claim;
//!    - a byte `t2` and, if `t2 % 4 == 3`, a slot index byte and a `VALUE`: the guest
//!      rewrites a slot while the host holds its claim;
//!
//!    `op % 4` picks the host's move after a successful claim: 0 recycle and complete,
//!    1 restore, 2 drop the claim (restores), 3 [`HostPool::scan`] instead of the
//!    two-phase calls (with a recycle that succeeds if `op & 4`).
//!    Every fourth scan also runs the guest's `on_alloc` and `on_free` on the page and
//!    pool as they are (they must return, without panicking).
//!
//! A `VALUE` is a byte `v`: `v % 8` = 0 zero, 1..=3 the frame `v % 8`, 4
//! `INTERESTING[v / 8 % 9]` (frames at every boundary the host checks), 5 the same with
//! `CLAIMED` set, 6 and 7 a `u64` of the next 8 bytes.

use pip::{
    Alloc, Free, Guest, HostPool, Invalid, LayoutError, Mark, PoolView, Reject, Release, Scan,
    CLAIMED, MAX_FRAME,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// Frame limits the host may be configured with.
const FRAME_LIMITS: [u64; 4] = [4, 1 << 20, MAX_FRAME, u64::MAX];

/// Frame numbers near every boundary the host checks.
const INTERESTING: [u64; 9] = [
    1,
    3,
    4,
    (1 << 20) - 1,
    1 << 20,
    MAX_FRAME,
    MAX_FRAME + 1,
    u64::MAX >> 1,
    u64::MAX,
];

/// Most scans the checker runs on one input.
pub const MAX_SCANS: usize = 256;

/// Reads the input; zero bytes past its end.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, i| acc | (self.byte() as u64) << (8 * i))
    }
    fn value(&mut self) -> u64 {
        let v = self.byte();
        match v % 8 {
            0 => 0,
            f @ 1..=3 => f as u64,
            4 => INTERESTING[(v / 8 % 9) as usize],
            5 => INTERESTING[(v / 8 % 9) as usize] | CLAIMED,
            _ => self.u64(),
        }
    }
}

/// 64-byte aligned memory.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u64; 8]);

/// Feeds a raw header to `PoolView::from_raw`.
fn raw_header(input: &mut Input, h: u8) {
    let lines = 1 + (h / 2 % 8) as usize;
    let mut mem = vec![Line([0; 8]); lines];
    for w in 0..8 {
        mem[0].0[w] = input.u64();
    }
    let len = lines * 64;
    // SAFETY: `mem` is 64-byte aligned, `len` bytes long, owned here, and only accessed
    // through the view (atomically) while the view lives.
    let view = unsafe { PoolView::from_raw(mem.as_ptr() as *const u8, len) };
    match view {
        Ok(view) => {
            let k = view.shards().len();
            let n = view.slots().len();
            assert!(k >= 1 && n >= k && n % k == 0);
            assert!(64 + 64 * k + 8 * n <= len, "view outside the memory");
            let base = mem.as_ptr() as usize;
            let end = view.slots().as_ptr_range().end as usize;
            assert!(end <= base + len);
        }
        Err(e) => assert_ne!(e, LayoutError::NotEmpty),
    }
}

/// The host's checks, in order; what `validate` must answer for `frame` and `mark`.
fn expected(host: &HostPool, slots: &[AtomicU64], frame: u64, mark: Mark) -> Result<(), Reject> {
    if mark.indicator != host.indicator() {
        return Err(Reject::NotMarked);
    }
    if frame == 0 || frame >= host.frame_limit() || frame > MAX_FRAME {
        return Err(Reject::Invalid(Invalid::Frame));
    }
    if mark.pool_id() != host.pool_id() {
        return Err(Reject::Invalid(Invalid::Pool));
    }
    match slots.get(mark.slot() as usize) {
        None => Err(Reject::Invalid(Invalid::Slot)),
        Some(s) if s.load(Ordering::Relaxed) != frame => Err(Reject::Invalid(Invalid::NotOffered)),
        Some(_) => Ok(()),
    }
}

/// Runs the checker on arbitrary bytes.
pub fn run(data: &[u8]) {
    let mut input = Input { data, at: 0 };
    let h = input.byte();
    if h % 2 == 1 {
        raw_header(&mut input, h);
        return;
    }

    let shard_count = 1 + (input.byte() % 4) as u32;
    let shard_slots = 1 + (input.byte() % 8) as u32;
    let pool_id = 1 + (input.byte() % 3) as u32;
    let secret = input.u64() | 1;
    let frame_limit = FRAME_LIMITS[(input.byte() % 4) as usize];
    let n = (shard_count * shard_slots) as usize;

    // The pool as raw memory, initialised by the guest, viewed by the host.
    let len = pip::pool_bytes(shard_count, shard_slots);
    let mem = vec![Line([0; 8]); len.div_ceil(64)];
    let ptr = mem.as_ptr() as *const u8;
    // SAFETY: `mem` is zeroed, 64-byte aligned, at least `len` bytes, owned here and only
    // accessed atomically through views while they live.
    let view = unsafe { PoolView::init_raw(ptr, len, shard_count) }.expect("a valid pool");
    assert_eq!(view.slots().len(), n);
    let slots = view.slots();
    for slot in slots {
        slot.store(input.value(), Ordering::Relaxed);
    }
    // The host's private facts; the guest registers with the same (as the protocol has
    // it), then the header is irrelevant to the host.
    let host = HostPool::register(view, pool_id, secret, frame_limit).expect("registration");
    let guest = Guest::attach(view).expect("attach").with_spins(2);
    let snapshot = || -> Vec<u64> { slots.iter().map(|s| s.load(Ordering::Relaxed)).collect() };

    for round in 0..MAX_SCANS {
        if input.done() {
            break;
        }
        let op = input.byte();
        let frame = input.value();
        let indicator = match input.byte() % 4 {
            0 => secret,
            1 => 0,
            2 => secret ^ 1,
            _ => input.u64(),
        };
        let pl = input.byte();
        let mark_pool = match pl % 4 {
            0 => pool_id,
            1 => 0,
            2 => pool_id + 1,
            _ => input.u32(),
        };
        let sl = input.byte();
        let mark_slot = match sl % 4 {
            0 => (sl / 4) as u32 % n as u32,
            1 => n as u32,
            2 => u32::MAX,
            _ => input.u32(),
        };
        let mark = Mark {
            indicator,
            location: pip::location(mark_pool, mark_slot),
        };
        let page: [AtomicU64; 4] = [
            AtomicU64::new(mark.indicator),
            AtomicU64::new(mark.location),
            AtomicU64::new(0x1111),
            AtomicU64::new(0x2222),
        ];
        let tamper = |input: &mut Input| -> Option<(usize, u64)> {
            if input.byte() % 4 == 3 {
                Some((input.byte() as usize % n, input.value()))
            } else {
                None
            }
        };
        let t1 = tamper(&mut input);
        let t2 = tamper(&mut input);

        let before = snapshot();
        let want = expected(&host, slots, frame, mark);
        if op % 4 == 3 {
            // The one-call path.
            let ok = op & 4 != 0;
            let mut recycled_while = None;
            let got = host.scan(frame, &page, || {
                recycled_while = Some(snapshot());
                ok
            });
            let after = snapshot();
            match want {
                Err(Reject::NotMarked) => assert_eq!(got, Scan::NotMarked),
                Err(Reject::Invalid(why)) => assert_eq!(got, Scan::Invalid(why)),
                Ok(()) => {
                    let i = mark.slot() as usize;
                    let during = recycled_while.as_ref().expect("a valid offer is claimed");
                    // Never a recycle of a page whose slot did not point at it.
                    assert_eq!(before[i], frame);
                    assert_eq!(during[i], frame | CLAIMED);
                    let end = if ok { 0 } else { frame };
                    assert_eq!(after[i], end);
                    let want = if ok {
                        Scan::Recycled(Release::Clean)
                    } else {
                        Scan::Restored(Release::Clean)
                    };
                    assert_eq!(got, want);
                }
            }
            if !matches!(got, Scan::Recycled(_) | Scan::Restored(_)) {
                assert!(recycled_while.is_none());
                assert_eq!(after, before, "the host wrote a slot it did not claim");
            } else {
                let i = mark.slot() as usize;
                for (j, (b, a)) in before.iter().zip(&after).enumerate() {
                    if j != i {
                        assert_eq!(a, b, "the host wrote slot {j} claiming {i}");
                    }
                }
            }
        } else {
            // The two-phase path, with the guest rewriting slots in between.
            let got = host.validate(frame, &page);
            match (want, got) {
                (Ok(()), Ok(offer)) => {
                    assert_eq!((offer.frame(), offer.slot()), (frame, mark.slot()));
                }
                (Err(w), Err(g)) => assert_eq!(w, g),
                (w, g) => panic!("validate: expected {w:?}, got {g:?}"),
            }
            assert_eq!(snapshot(), before, "validate wrote a slot");
            if let Ok(offer) = got {
                let i = offer.slot() as usize;
                if let Some((j, v)) = t1 {
                    slots[j].store(v, Ordering::Relaxed);
                }
                let at_claim = snapshot();
                match host.claim(offer) {
                    Ok(claim) => {
                        // The claim's linearization point: the slot held this frame.
                        assert_eq!(at_claim[i], frame);
                        assert_eq!(slots[i].load(Ordering::Relaxed), frame | CLAIMED);
                        if let Some((j, v)) = t2 {
                            slots[j].store(v, Ordering::Relaxed);
                        }
                        let held = slots[i].load(Ordering::Relaxed);
                        let clean = held == frame | CLAIMED;
                        let (release, end) = match op % 4 {
                            0 => (claim.complete(), 0),
                            1 => (claim.restore(), frame),
                            _ => {
                                drop(claim);
                                (
                                    if clean {
                                        Release::Clean
                                    } else {
                                        Release::Tampered
                                    },
                                    frame,
                                )
                            }
                        };
                        assert_eq!(release == Release::Clean, clean);
                        let now = slots[i].load(Ordering::Relaxed);
                        assert_eq!(now, if clean { end } else { held });
                    }
                    Err(pip::Lost) => assert_ne!(at_claim[i], frame),
                }
            }
        }

        if round % 4 == 0 {
            // The guest's hooks over whatever the pool and page hold: they return, and
            // touch only their own page's mark words and the slots they name.
            let cpu = op as usize;
            let a = guest.on_alloc(cpu, frame, &page);
            if a.is_usable() {
                assert_eq!(page[2].load(Ordering::Relaxed), 0x1111);
            }
            if a == Alloc::Cancelled {
                assert_eq!(page[0].load(Ordering::Relaxed), 0);
            }
            match guest.on_free(cpu, frame, &page) {
                Free::Offered(i) => {
                    assert_eq!(slots[i as usize].load(Ordering::Relaxed), frame);
                    assert_eq!(page[0].load(Ordering::Relaxed), secret);
                    assert_eq!(page[1].load(Ordering::Relaxed), pip::location(pool_id, i));
                }
                Free::Full | Free::Refused => assert_eq!(page[0].load(Ordering::Relaxed), 0),
            }
        }
    }
    drop(mem);
}
