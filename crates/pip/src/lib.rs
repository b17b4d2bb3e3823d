//! PIP, the Pointer-Indicator Pair: how a guest tells its host which free pages it may
//! take back, with no exits and no interrupts, and how the two settle the race between a
//! host recycling a page and the guest allocating it again.
//!
//! A guest that frees a page **offers** it: it puts the page's frame number into a slot
//! of a pool in memory shared with the host (the *pointer*), and writes a mark at the
//! start of the page naming the pool and the slot, behind a per-pool secret (the
//! *indicator*). The host, scanning guest memory, finds the indicator, follows the mark
//! to the slot and **claims** the page if the slot points back at it. A guest that
//! allocates the page again first **cancels** the offer. One CAS on the slot decides
//! who wins; the indicator only says where to look, the slot is the proof.
//!
//! - [`PoolView`]: the pool in shared memory ([`PoolHeader`], [`Shard`]s, slots), from
//!   typed storage ([`PoolStorage`], [`PoolView::new`]) or raw memory
//!   ([`PoolView::from_raw`], validated).
//! - [`Guest`]: the guest's hooks, [`Guest::on_free`] (offer) and [`Guest::on_alloc`]
//!   (cancel, or report the page [`Alloc::Busy`]).
//! - [`HostPool`]: the host's pure functions, [`HostPool::validate`] (no writes),
//!   [`HostPool::claim`] (one CAS) and the [`Claim`] it returns, ended by
//!   [`Claim::complete`] or [`Claim::restore`]; [`HostPool::scan`] does all of it for one
//!   page.
//! - [`MarkWords`]: how both sides read and write a page's first words (atomically).
//!
//! `no_std`, no allocation, no locks; every operation is wait-free (bounded loops only).
//! Needs a target with 64-bit atomics (`target_has_atomic = "64"`).
//!
//! ```
//! use core::sync::atomic::{AtomicU64, Ordering};
//! use pip::{Alloc, Free, Guest, HostPool, PoolStorage, Scan};
//!
//! // Guest: a pool of 2 shards of 4 slots, initialised, handed to the host.
//! let pool = PoolStorage::<2, 8>::new();
//! let view = pool.init().unwrap();
//! // Host: registers it with a fresh random secret, for a guest of 1000 frames.
//! let host = HostPool::register(view, 1, 0x5eed_1234_abcd_0042, 1000).unwrap();
//! let guest = Guest::attach(view).unwrap();
//!
//! // A page is its first words (plus whatever follows).
//! let page: [AtomicU64; 4] = Default::default();
//! assert_eq!(guest.on_free(0, 7, &page), Free::Offered(0)); // vCPU 0 frees frame 7
//! assert_eq!(host.scan(7, &page, || {
//!     for w in page.iter().rev() { w.store(0, Ordering::Release) } // zero it
//!     true
//! }), Scan::Recycled(pip::Release::Clean));
//! assert_eq!(guest.on_alloc(1, 7, &page), Alloc::Unmarked); // reads zeros: usable
//!
//! assert_eq!(guest.on_free(0, 7, &page), Free::Offered(1));
//! assert_eq!(guest.on_alloc(0, 7, &page), Alloc::Cancelled); // the guest won this time
//! assert_eq!(host.scan(7, &page, || unreachable!()), Scan::NotMarked);
//! ```
//!
//! # Layout
//! All integers are little-endian; every field is accessed atomically at its own width.
//! The pool is one region of guest memory, 64-byte aligned:
//!
//! | bytes | what |
//! |---|---|
//! | `0..64` | [`PoolHeader`] |
//! | `64..64 + 64·K` | `K = shard_count` [`Shard`] records |
//! | `slots_offset..slots_offset + 8·N` | `N = slot_count` slots, `u64` each |
//!
//! **Pool header** ([`PoolHeader`], 64 bytes, `const`-asserted with `offset_of!`):
//!
//! | offset | size | field | written by | meaning |
//! |---|---|---|---|---|
//! | 0 | 8 | `magic` | guest, init | [`MAGIC`] (`"PIP-POOL"`) |
//! | 8 | 4 | `version` | guest, init | [`VERSION`] (1) |
//! | 12 | 4 | `state` | guest, then host | 0 empty, 1 [`STATE_READY`], 2 [`STATE_REGISTERED`] |
//! | 16 | 4 | `pool_id` | host, registration | `1..`; 0 = none |
//! | 20 | 4 | `shard_count` | guest, init | `K`, `1..=`[`MAX_SHARDS`] |
//! | 24 | 4 | `shard_slots` | guest, init | slots per shard, `≥ 1` |
//! | 28 | 4 | reserved | | 0 |
//! | 32 | 8 | `indicator` | host, registration | the pool's random secret, `≠ 0` |
//! | 40 | 8 | `slot_count` | guest, init | `N = K · shard_slots`, `≤` [`MAX_SLOTS`] |
//! | 48 | 8 | `slots_offset` | guest, init | `64 + 64·K` |
//! | 56 | 8 | reserved | | 0 |
//!
//! **Shard record** ([`Shard`], 64 bytes, one cache line; shard `s` owns slots
//! `s·shard_slots .. (s+1)·shard_slots`; vCPU `c` uses shard `c mod K`):
//!
//! | offset | size | field | meaning |
//! |---|---|---|---|
//! | 0 | 4 | `cursor` | next slot to probe, as an offset in the shard (a hint) |
//! | 4 | 4 | reserved | 0 |
//! | 8 | 8 | `offered` | pages offered |
//! | 16 | 8 | `full` | frees that found no empty slot (slot exhaustion) |
//! | 24 | 8 | `refused` | frees of an unofferable frame number |
//! | 32 | 8 | `cancelled` | allocations that withdrew their offer |
//! | 40 | 8 | `stale` | allocations that cleared a stale mark |
//! | 48 | 8 | `busy` | allocations that found the host recycling the page |
//! | 56 | 8 | reserved | 0 |
//!
//! The shard records are written only by the guest, and only the guest trusts them.
//!
//! **Slot** (`u64`): `0` empty; `F` (`1..=`[`MAX_FRAME`]) frame `F` is offered;
//! `F |` [`CLAIMED`] (bit 63) the host has claimed frame `F` and is recycling it.
//!
//! **Mark** ([`MARK_WORDS`] = 2 words, [`MARK_BYTES`] = 16 bytes at offset 0 of a freed
//! page):
//!
//! | offset | size | word | meaning |
//! |---|---|---|---|
//! | 0 | 8 | [`INDICATOR`] | the pool's `indicator` (secret) |
//! | 8 | 8 | [`LOCATION`] | `pool_id << 32 \| slot` ([`location`]) |
//!
//! In C:
//!
//! ```c
//! struct pip_pool_header {            /* 64 bytes, aligned 64 */
//!     uint64_t magic;                 /* 0x4c4f4f502d504950, "PIP-POOL" */
//!     uint32_t version, state;        /* 1; 0 empty, 1 ready, 2 registered */
//!     uint32_t pool_id, shard_count, shard_slots, reserved0;
//!     uint64_t indicator, slot_count, slots_offset, reserved1;
//! };
//! struct pip_shard {                  /* 64 bytes, aligned 64 */
//!     uint32_t cursor, reserved;
//!     uint64_t offered, full, refused, cancelled, stale, busy, reserved1;
//! };
//! /* pool: header, pip_shard[shard_count], uint64_t slot[slot_count] (at slots_offset) */
//! /* mark: uint64_t words[2] = { indicator, (uint64_t)pool_id << 32 | slot } */
//! ```
//!
//! # Setup
//! 1. The guest reserves and zeroes the pool's memory and initialises it
//!    ([`PoolView::init`] / [`PoolView::init_raw`]): layout fields, then `state = READY`
//!    (`Release`).
//! 2. It hands the pool's guest-physical address to the host (a hypercall, an I/O port,
//!    a firmware table: the embedder's choice).
//! 3. The host maps it and builds its own view with [`PoolView::from_raw`], which checks
//!    magic, version and every count against the mapping's length and fixes the view's
//!    lengths from those checked values. [`HostPool::register`] then writes a fresh
//!    `pool_id` and a fresh random `indicator` and sets `state = REGISTERED` (`Release`).
//!    The host keeps its own copies; it never reads them back from the header.
//! 4. The guest sees `REGISTERED` (`Acquire`) and attaches ([`Guest::attach`]), copying
//!    the pool id and the secret into its private handle.
//!
//! # The protocol
//! ## Slot state machine
//!
//! | from | to | who | operation | ordering |
//! |---|---|---|---|---|
//! | `0` | `F` | guest, [`Guest::on_free`] | **offer**: CAS | `Release` |
//! | `F` | `0` | guest, [`Guest::on_alloc`] | **cancel**: CAS | `AcqRel` |
//! | `F` | `F\|CLAIMED` | host, [`HostPool::claim`] | **claim**: CAS | `AcqRel` |
//! | `F\|CLAIMED` | `0` | host, [`Claim::complete`] | **complete** (page reads zeros): CAS | `Release` |
//! | `F\|CLAIMED` | `F` | host, [`Claim::restore`] | **restore** (recycle failed, page untouched): CAS | `Release` |
//!
//! No other transition exists. The guest never writes a claimed slot; the host never
//! writes an empty or offered one except by the claim CAS. The winner of the CAS out of
//! `F` (cancel or claim) decides the page's fate.
//!
//! ## Page state machine (page `F`, from its free to its next use)
//!
//! | state | event | next state |
//! |---|---|---|
//! | in use | `on_free`, a slot taken (offer CAS), mark written, indicator last | offered |
//! | in use | `on_free`, no slot in the probe window, or frame 0 | free, unmarked (indicator cleared) |
//! | offered | `on_alloc` wins the cancel CAS; mark cleared, indicator first | in use |
//! | offered | the host wins the claim CAS | claimed |
//! | claimed | the host recycles (page reads zeros), then completes | free, unmarked (zero) |
//! | claimed | the recycle fails; the host restores the slot | offered |
//! | claimed | `on_alloc` | stays claimed; `on_alloc` waits a bounded time, then returns [`Alloc::Busy`] |
//! | free, unmarked | `on_alloc` ([`Alloc::Unmarked`]) | in use |
//!
//! ## Linearization points
//! - **Offer**: the CAS `0 → F`. From then on the host may claim the page; the mark is
//!   written after it, indicator last, so a host that sees the indicator (`Acquire`)
//!   sees the location too.
//! - **Cancel**: the CAS `F → 0`. If it succeeds the host's claim CAS can no longer
//!   succeed, and the page is the guest's; it then clears the mark, indicator first.
//! - **Claim**: the CAS `F → F|CLAIMED`. If it succeeds the page was free (offered) at
//!   that instant, and stays free until the claim ends: the guest cannot cancel a claimed
//!   offer, and nobody else can offer `F` (it is not in use to be freed).
//! - **Complete / restore**: the CAS out of `F|CLAIMED`. A guest that reads the slot
//!   after it (`Acquire`) sees the page's zeros (complete) or the offer back (restore).
//!
//! ## Why a claimed state (and not `F → 0`)
//! In the 2017 design the host's claim was `F → 0`. If the recycle then failed (its
//! retry path), the slot stayed 0 while the page kept its mark, and a guest that had
//! lost its cancel CAS spun forever waiting for the page to read zeros: a livelock in the
//! page allocator. Restoring by CAS `0 → F` is not enough either: while the slot reads 0
//! another vCPU may offer another page into it, the restore then fails, and a guest
//! reading "slot ≠ F" would take the mark for stale and write a page the host may still
//! be zeroing. Here the claimed slot keeps `F` with bit 63 set: no offer can take it, the
//! guest can tell "the host is working on my page" from "stale", and restore
//! (`F|CLAIMED → F`) cannot fail.
//!
//! # Progress
//! Every loop is bounded; nothing blocks and nobody waits forever.
//! - `on_free` probes at most [`PROBES`] slots; when they are all taken it counts the
//!   free as `full` (slot exhaustion is counted, never silent) and leaves the page
//!   unmarked.
//! - `on_alloc` waits at most `spins` steps ([`DEFAULT_SPINS`], [`Guest::with_spins`])
//!   while the host holds the page claimed. **Fallback:** it returns [`Alloc::Busy`]; the
//!   allocator must not hand the page out or write it, and takes another page instead,
//!   retrying this one later (the `ppr-guest` allocator keeps such pages on a deferred
//!   list). The guest never writes a page the host may still be zeroing.
//! - The host's claim is one CAS, attempted once. It is made only when the recycle can go
//!   ahead at once, and every claim ends, by complete or by restore (a dropped [`Claim`]
//!   restores), so a busy page becomes usable again as soon as the host finishes.
//!
//! # Memory orderings
//! - [`MarkWords`] loads are `Acquire` and its stores `Release`. The offer's indicator
//!   store publishes its location store; the host's `Acquire` load of the indicator pairs
//!   with it.
//! - The offer CAS is `Release` and the claim CAS `AcqRel`: a host that claims `F` has
//!   every guest write to the page made before the free ordered before its recycle.
//! - The guest loads slots with `Acquire`, and its cancel CAS is `AcqRel` (`Acquire` on
//!   failure); `complete` is a `Release` CAS: a guest that sees the slot emptied by the
//!   host sees the page's zeros.
//! - A host that zeroes a page in place stores the indicator word **last**, with
//!   `Release` ([`Claim::complete`] states the contract); the guest's first load in
//!   `on_alloc` is an `Acquire` load of the indicator, so a page that reads unmarked
//!   because it was recycled has all its zeros visible, and the guest's later writes are
//!   ordered after them. A guest that sees the indicator with a zero location knows the
//!   host is mid-zeroing and waits (or reports busy). A page swap (the real backends)
//!   changes all words at once and meets the contract trivially.
//! - Cursors and counters are `Relaxed`: they are hints and statistics.
//!
//! # Consistency
//! Invariants (for a guest that follows the protocol):
//! 1. At most one slot holds `F` or `F|CLAIMED`, and only while page `F` is free (between
//!    its `on_free` and an `on_alloc` that returns usable).
//! 2. While a slot holds `F` or `F|CLAIMED`, page `F`'s mark names that slot, from the
//!    offer's indicator store on (the offer writes it right after its CAS; only cancel,
//!    which empties the slot first, or the recycle, which holds the claim, remove it).
//!    The guest reads the mark only in `on_alloc`, which follows its `on_free` in the
//!    guest allocator's order, so it always sees the whole mark.
//! 3. The host writes a page only between a successful claim and its end.
//!
//! Guarantees:
//! - A page is recycled only if it was free at the claim's linearization point (the slot
//!   held `F`, invariant 1).
//! - A page `on_alloc` called usable is never zeroed behind the guest's back: usable
//!   means the cancel CAS won (no claim can follow), or the slot no longer holds `F` nor
//!   its claim (no claim can follow: nobody offers a page being allocated), or the page
//!   already reads zeros (the recycle is over).
//! - A freed page is either offered or counted (`full`, `refused`); an offered page is
//!   claimed by the next scan that reads its mark, unless the guest allocates it first.
//! - Guest counters are exact with one vCPU per shard and may lose counts when vCPUs
//!   share a shard.
//!
//! # Security
//! Guest memory is hostile input: the pool, the marks and the page contents are written
//! by the guest, which may be compromised.
//! - The host trusts nothing it reads: [`PoolView::from_raw`] reads the header once and
//!   fixes the view's lengths from values checked against the mapping; afterwards the
//!   host uses only its private pool id, secret and frame limit. In a mark, the pool id
//!   must be this pool's, the slot index is range-checked (`slots.get`, never an
//!   unchecked index), the scanned frame must be in `1..frame_limit` and `≤ MAX_FRAME`,
//!   and the slot must hold exactly that frame. A bad value yields a typed
//!   [`Reject::Invalid`] reason to count; nothing panics.
//! - The worst a hostile guest can do through PIP is make the host recycle pages of its
//!   own that it offered, or make the host do one validation per page it scans. It
//!   cannot name another guest's pages (the host only ever recycles the frame it is
//!   scanning, in the guest it is scanning), nor make the host loop or block.
//! - The indicator is a per-pool random secret, fresh at each registration, not a
//!   constant: page contents (another VM's pages, files, the guest's own memory after a
//!   reboot) match it only by a 2⁻⁶⁴ accident, so the host's scan rarely follows a
//!   forged mark, and marks of one registration never match the next.
//! - No host address or other host secret is written into guest memory (the 2017 design
//!   wrote host kernel pointers into the pool header).
//!
//! # For a host's recycler
//! Glue to page memory is one [`MarkWords`] implementation for a page of guest memory
//! (atomic `u64` loads and stores at byte offsets 0 and 8 of the page's host mapping,
//! little-endian) and a recycle that makes the page read zeros. Then:
//!
//! ```
//! use core::sync::atomic::{AtomicU64, Ordering};
//! use pip::{HostPool, Invalid, PoolView, Release, Scan};
//! # let storage = pip::PoolStorage::<1, 8>::new();
//! # storage.init().unwrap();
//! # let (addr, len) = (storage.as_ptr(), core::mem::size_of_val(&storage));
//! # let (pool_id, secret, guest_frames) = (7, 0x1234_5678_9abc_def1, 1 << 20);
//! // Once, when the guest hands over its pool (`addr`, `len`: its host mapping).
//! // SAFETY: the mapping stays valid, and is accessed only atomically, while `pool` lives.
//! let view = unsafe { PoolView::from_raw(addr, len) }.unwrap(); // validated, lengths fixed
//! let pool = HostPool::register(view, pool_id, secret, guest_frames).unwrap();
//! # let guest = pip::Guest::attach(storage.view().unwrap()).unwrap();
//! # let page: [AtomicU64; 2] = Default::default();
//! # guest.on_free(0, 42, &page);
//! # let frame = 42;
//! # let recycle = || { page[1].store(0, Ordering::Release); page[0].store(0, Ordering::Release); true };
//! let (mut invalid, mut lost, mut recycled, mut failed) = ([0u64; Invalid::COUNT], 0, 0, 0);
//!
//! // For each scanned page `frame`, with `page: impl MarkWords` and `recycle` returning
//! // whether the page now reads zeros (false: untouched).
//! match pool.scan(frame, &page, recycle) {
//!     Scan::NotMarked => {}                             // most pages: one load, one compare
//!     Scan::Invalid(why) => invalid[why.index()] += 1,  // counted and skipped
//!     Scan::Lost => lost += 1,                          // the guest withdrew it first
//!     Scan::Recycled(Release::Clean) => recycled += 1,
//!     Scan::Recycled(Release::Tampered) => recycled += 1, // the guest broke the protocol
//!     Scan::Restored(_) => failed += 1,                 // the guest may withdraw it again
//! }
//! # assert_eq!((recycled, lost, failed), (1, 0, 0));
//! ```
//!
//! To batch recycles: [`Mark::read`] and [`HostPool::is_marked`] (the cheap test),
//! [`HostPool::validate_mark`], then [`HostPool::claim`] each page whose recycle is ready
//! to go, recycle the batch, and end each [`Claim`] with [`Claim::complete`] or
//! [`Claim::restore`]. Keep claims short: a guest allocating a claimed page waits a
//! bounded time and then defers it.
//!
//! # Verification
//! loom models of offer / cancel / claim races (`RUSTFLAGS="--cfg pip_loom" cargo test
//! -p pip --test loom --release`; small enough to explore every interleaving, with no
//! preemption bound, in a few seconds), proptest model
//! tests of operation sequences (with a hostile guest rewriting slots and marks), layout
//! tests of the byte offsets through raw memory, and a fuzz target
//! (`fuzz/fuzz_targets/pip_validate.rs` in the repository) running host validation and
//! claims over arbitrary pool and page contents: its checker runs hand-written inputs in
//! `tests/fuzz_inputs.rs`, and the repository's `fuzz-corpus` crate replays its corpus
//! under `cargo test --workspace`.

#![no_std]
#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

#[cfg(not(target_has_atomic = "64"))]
compile_error!("pip needs 64-bit atomics (slots and mark words are AtomicU64)");

mod guest;
mod host;
mod layout;
mod mark;
mod sync;

pub use guest::{Alloc, AttachError, Free, Guest, DEFAULT_SPINS, PROBES};
pub use host::{
    Claim, HostPool, Invalid, Lost, Offer, RegisterError, Reject, Release, Scan, SlotState,
};
pub use layout::{
    pool_bytes, slots_offset, GuestCounters, LayoutError, PoolHeader, PoolStorage, PoolView, Shard,
    HEADER_BYTES, MAGIC, MAX_SHARDS, MAX_SLOTS, POOL_ALIGN, SHARD_BYTES, SLOT_BYTES, STATE_EMPTY,
    STATE_READY, STATE_REGISTERED, VERSION,
};
pub use mark::{location, Mark, MarkWords, INDICATOR, LOCATION, MARK_BYTES, MARK_WORDS};

/// Bit 63 of a slot: the host has claimed the frame in the low bits.
pub const CLAIMED: u64 = 1 << 63;

/// The largest frame number a slot can hold: 52 bits, enough for 2⁶⁴ bytes of 4 KiB
/// pages. Frame 0 is "empty" and is never offered.
pub const MAX_FRAME: u64 = (1 << 52) - 1;

// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
