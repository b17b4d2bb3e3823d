//! A canonical store shared by several processes: the service that owns it
//! ([`SharedStore`]) and the VMM processes whose guest pages map it (each a
//! [`LinuxMemory`](super::LinuxMemory) made with
//! [`with_linked_store`](super::LinuxMemory::with_linked_store)).
//!
//! Deduplication across VMM processes needs one memfd that every VMM of a trust domain
//! maps: a page of VM A and a page of VM B share a frame only if both map the same page
//! of the same file. The service creates the memfd, hands it to each VMM (over a Unix
//! socket, `SCM_RIGHTS`), chooses every slot, and punches slots out; a VMM never
//! allocates or punches a slot of a linked store.
//!
//! # Holds
//! Within one process a slot is held by `Arc` clones (see the `store` module): the
//! engine's frames, and every page that may still map it. Across processes that becomes a
//! count per slot, kept by the service: each [`SharedFrame`] the service holds, plus each
//! hold a VMM reported. A VMM's linked store reports every hold it takes and lets go
//! through its [`HoldSink`] as a [`HoldEvent`]: a *slot* hold (the page may map the slot's
//! file page: its contents must stay) and a *tomb* hold (the page's address lies in a
//! mapping of the store at that offset, so an `MADV_DONTNEED` of the embedder's would read
//! it again: the offset must not be handed out again). The service
//! ([`SharedStore::apply`]) punches a slot out when its slot holds reach zero, and frees
//! its offset when its tomb holds do too.
//!
//! # Consistency
//! - A VMM takes a hold only on a slot the service named in a request, and the service
//!   holds that slot (a [`SharedFrame`]) until the VMM's reply. A VMM's events reach the
//!   service in the order they were taken (one socket, flushed before each reply), so
//!   the service has counted a VMM's hold before it reads the reply, and before it can
//!   drop its own: a slot in use is never punched.
//! - Counts are kept per VMM ([`ClientId`]), never below zero: a release the service
//!   has no hold for is refused ([`HoldError`]) and changes nothing, so a hostile or
//!   buggy VMM can free only what it holds itself.
//! - [`SharedStore::drop_client`] lets go of every hold of a VMM at once. Call it only
//!   once the VMM's *process* is gone (not merely its connection): a process that lives
//!   on still maps the slots it holds.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use super::store::Alloc;
use crate::{PageError, PAGE_SIZE};

/// Which of a slot's two holds an event is about (see *Holds* in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldKind {
    /// The slot's contents: a page may map the slot's file page.
    Slot,
    /// The slot's offset: a page's address lies in a mapping of the store there.
    Tomb,
}

/// A hold a VMM took (`acquire`) or let go of, on slot `slot` of a linked store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HoldEvent {
    /// The slot (its offset is `slot * 4096`).
    pub slot: u64,
    /// The slot's contents, or its offset.
    pub kind: HoldKind,
    /// Taken (`true`) or let go (`false`).
    pub acquire: bool,
}

/// Where a linked store reports its holds. It is called from any thread, with the
/// backend's page locks held: it must not block for long nor call back into the memory.
pub type HoldSink = Arc<dyn Fn(HoldEvent) + Send + Sync>;

/// What a VMM needs to map a service's store: the memfd, its size in slots, and where
/// to report holds.
pub struct StoreLink {
    /// The store's memfd, as received from the service.
    pub fd: OwnedFd,
    /// Its size in slots (4 KiB pages); the memfd must be at least that long.
    pub slots: u64,
    /// Told of every hold taken and let go.
    pub sink: HoldSink,
}

impl std::fmt::Debug for StoreLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLink")
            .field("fd", &self.fd)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

/// A VMM process known to a [`SharedStore`], as its owner numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

/// A hold event the store refused: it changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HoldError {
    /// A slot beyond the store's end.
    NoSuchSlot(u64),
    /// An acquire of a slot nobody holds (its contents may be gone): a VMM may only take
    /// holds on slots the service named while holding them.
    NotHeld(u64),
    /// A release of a hold the client does not have.
    NotYours(u64),
    /// An acquire beyond the most holds a slot can count (2^32 - 1 of each kind).
    TooMany(u64),
}

impl std::fmt::Display for HoldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HoldError::NoSuchSlot(s) => write!(f, "slot {s} is beyond the store's end"),
            HoldError::NotHeld(s) => write!(f, "slot {s} is not held: it cannot be acquired"),
            HoldError::NotYours(s) => write!(f, "slot {s}: a release of a hold never taken"),
            HoldError::TooMany(s) => write!(f, "slot {s} holds as many holds as it can count"),
        }
    }
}

impl std::error::Error for HoldError {}

/// A slot's number in the bookkeeping: a store has at most 2^32 slots (16 TiB), so 4
/// bytes instead of 8 in each of the maps' entries (one per slot allocated, one per slot
/// and client holding it: metadata per guest page, see `tests/footprint.rs`).
type Key = u32;

/// Holds on one slot, of the two kinds (a slot's in all, or a client's share of them).
/// Counts stop at `u32::MAX`: an acquire beyond is refused ([`HoldError::TooMany`]).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Holds {
    /// Service frames plus VMM slot holds (a client's: its slot holds).
    slot: u32,
    /// VMM tomb holds.
    tomb: u32,
}

impl Holds {
    /// The count of `kind`.
    fn of(&mut self, kind: HoldKind) -> &mut u32 {
        match kind {
            HoldKind::Slot => &mut self.slot,
            HoldKind::Tomb => &mut self.tomb,
        }
    }
}

struct State {
    alloc: Alloc,
    /// Slots allocated and not yet free.
    holds: HashMap<Key, Holds>,
    /// Slots punched out while tombs were held: a read through a tomb may have put a page
    /// back into the memfd, to be punched again when the offset is freed. (Few: apart
    /// from `holds`, so that its entries stay 12 bytes.)
    outlived: HashSet<Key>,
    /// Each client's holds, per slot.
    clients: HashMap<ClientId, HashMap<Key, Holds>>,
}

/// What a [`SharedStore`] holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedStoreStats {
    /// Slots allocated (held, or with their offset still taken).
    pub slots: u64,
    /// Of those, slots whose contents are held.
    pub live: u64,
    /// Slots punched out since the start.
    pub punched: u64,
    /// Bytes of memory the memfd holds.
    pub bytes: u64,
    /// Slots whose contents pages of two or more client processes hold (pages of
    /// different processes that share one frame).
    pub across_clients: u64,
}

/// A canonical store one process owns and others map; see the module docs.
///
/// ```no_run
/// use page_memory::linux::shared::SharedStore;
///
/// let store = SharedStore::new(1 << 20).unwrap();
/// let home = store.reserve_home(256).unwrap();
/// let frame = store.allocate(home).unwrap(); // a slot for page 0 of that region
/// // ... a VMM copies the page into it (LinuxMemory::canonicalize_at) ...
/// assert_eq!(frame.as_ref().len(), 4096);
/// ```
pub struct SharedStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    fd: OwnedFd,
    view: usize,
    slots: u64,
    state: Mutex<State>,
    punched: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("slots", &self.inner.slots)
            .finish_non_exhaustive()
    }
}

impl SharedStore {
    /// A store with `home_slots` home slots and as many overflow slots (sparse: it uses
    /// memory only for canonical pages). At most 2^32 slots in all (16 TiB).
    pub fn new(home_slots: u64) -> Result<SharedStore, PageError> {
        let slots = home_slots
            .checked_mul(2)
            .filter(|s| *s > 0 && *s <= 1 << Key::BITS && s.checked_mul(PAGE_SIZE as u64).is_some())
            .ok_or(PageError::Unsupported(
                "shared store of no slots or too many",
            ))?;
        let bytes = slots * PAGE_SIZE as u64;
        let len = usize::try_from(bytes).map_err(|_| PageError::Unsupported("store too large"))?;
        let os = |op| {
            move |e: rustix::io::Errno| PageError::Os {
                op,
                errno: e.raw_os_error(),
            }
        };
        let fd = super::sys::memfd(super::sys::STORE_NAME, bytes)
            .map_err(os("memfd_create and ftruncate (shared store)"))?;
        let view = super::sys::map_fresh_shared_view(fd.as_fd(), len)
            .map_err(os("mmap (view of the shared store)"))?;
        Ok(SharedStore {
            inner: Arc::new(StoreInner {
                fd,
                view,
                slots,
                state: Mutex::new(State {
                    alloc: Alloc::new(home_slots, slots),
                    holds: HashMap::new(),
                    outlived: HashSet::new(),
                    clients: HashMap::new(),
                }),
                punched: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// The memfd, to hand to VMMs.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// The store's size in slots.
    pub fn slots(&self) -> u64 {
        self.inner.slots
    }

    /// The first of `pages` consecutive home slots for a region, or `None` if the home
    /// area is full (the region's pages then go to the overflow area). Home runs are not
    /// reused: a service that outlives many regions ends up with overflow slots only.
    pub fn reserve_home(&self, pages: u32) -> Option<u64> {
        self.inner.state().alloc.reserve_home(pages)
    }

    /// A free slot, `home` if it is free (else an overflow slot), held by the returned
    /// frame. Its bytes are whatever a VMM copies into it.
    pub fn allocate(&self, home: u64) -> Result<SharedFrame, PageError> {
        let mut st = self.inner.state();
        let slot = st.alloc.allocate(home).ok_or(PageError::Unsupported(
            "the shared store is full: raise the service's store size",
        ))?;
        st.holds.entry(key(slot)).or_default().slot += 1;
        drop(st);
        Ok(SharedFrame(Some(Arc::new(FrameSlot {
            store: self.inner.clone(),
            slot,
        }))))
    }

    /// A frame of slot `slot`, if its contents are held now (by a frame or a VMM), and
    /// by fewer than `u32::MAX` holds.
    pub fn frame(&self, slot: u64) -> Option<SharedFrame> {
        let mut st = self.inner.state();
        let h = st
            .holds
            .get_mut(&Key::try_from(slot).ok()?)
            .filter(|h| h.slot > 0)?;
        h.slot = h.slot.checked_add(1)?;
        drop(st);
        Some(SharedFrame(Some(Arc::new(FrameSlot {
            store: self.inner.clone(),
            slot,
        }))))
    }

    /// The zero frame (no slot).
    pub fn zero_frame(&self) -> SharedFrame {
        SharedFrame(None)
    }

    /// Applies hold events of `client` in order; returns how many were refused (each is
    /// skipped and changes nothing).
    pub fn apply(&self, client: ClientId, events: &[HoldEvent]) -> Result<(), Vec<HoldError>> {
        let mut st = self.inner.state();
        let mut refused = Vec::new();
        for ev in events {
            if let Err(e) = self.inner.apply_one(&mut st, client, *ev) {
                refused.push(e);
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(refused)
        }
    }

    /// Lets go of every hold of `client`: call it once its process is gone.
    pub fn drop_client(&self, client: ClientId) {
        let mut st = self.inner.state();
        let Some(held) = st.clients.remove(&client) else {
            return;
        };
        for (slot, mine) in held {
            if let Some(h) = st.holds.get_mut(&slot) {
                h.slot -= mine.slot.min(h.slot);
                h.tomb -= mine.tomb.min(h.tomb);
            }
            self.inner.settle(&mut st, slot);
        }
    }

    /// Holds `client` has now: (slot holds, tomb holds), summed over slots.
    pub fn client_holds(&self, client: ClientId) -> (u64, u64) {
        self.inner.state().clients.get(&client).map_or((0, 0), |m| {
            m.values()
                .fold((0, 0), |(a, b), h| (a + h.slot as u64, b + h.tomb as u64))
        })
    }

    /// What the store holds now.
    pub fn stats(&self) -> Result<SharedStoreStats, PageError> {
        let st = self.inner.state();
        let slots = st.holds.len() as u64;
        let live = st.holds.values().filter(|h| h.slot > 0).count() as u64;
        let mut holders: HashMap<Key, u32> = HashMap::new();
        for held in st.clients.values() {
            for (&slot, h) in held {
                if h.slot > 0 {
                    *holders.entry(slot).or_default() += 1;
                }
            }
        }
        let across_clients = holders.values().filter(|&&n| n >= 2).count() as u64;
        drop(st);
        Ok(SharedStoreStats {
            slots,
            live,
            across_clients,
            punched: self
                .inner
                .punched
                .load(std::sync::atomic::Ordering::Relaxed),
            bytes: super::sys::allocated_bytes(self.inner.fd.as_fd()).map_err(|e| {
                PageError::Os {
                    op: "fstat (shared store)",
                    errno: e.raw_os_error(),
                }
            })?,
        })
    }
}

impl StoreInner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply_one(&self, st: &mut State, client: ClientId, ev: HoldEvent) -> Result<(), HoldError> {
        if ev.slot >= self.slots {
            return Err(HoldError::NoSuchSlot(ev.slot));
        }
        let slot = key(ev.slot);
        if ev.acquire {
            // A hold on contents nobody holds would pin whatever the slot holds next.
            let h = st
                .holds
                .get_mut(&slot)
                .filter(|h| h.slot > 0)
                .ok_or(HoldError::NotHeld(ev.slot))?;
            // A client's count is part of the slot's: it cannot overflow if that does not.
            let count = h.of(ev.kind);
            *count = count.checked_add(1).ok_or(HoldError::TooMany(ev.slot))?;
            *st.clients
                .entry(client)
                .or_default()
                .entry(slot)
                .or_default()
                .of(ev.kind) += 1;
            return Ok(());
        }
        let mine = st
            .clients
            .get_mut(&client)
            .and_then(|m| m.get_mut(&slot))
            .ok_or(HoldError::NotYours(ev.slot))?;
        let count = mine.of(ev.kind);
        if *count == 0 {
            return Err(HoldError::NotYours(ev.slot));
        }
        *count -= 1;
        if *mine == Holds::default() {
            if let Some(m) = st.clients.get_mut(&client) {
                m.remove(&slot);
            }
        }
        if let Some(h) = st.holds.get_mut(&slot) {
            let count = h.of(ev.kind);
            *count -= (*count).min(1);
        }
        self.settle(st, slot);
        Ok(())
    }

    /// After `slot` lost a hold: punch it out if its contents are no longer held, free
    /// it if its offset is not either.
    fn settle(&self, st: &mut State, slot: Key) {
        let Some(h) = st.holds.get(&slot) else {
            return;
        };
        if h.slot > 0 {
            return;
        }
        let punch = |inner: &StoreInner| {
            let offset = slot as u64 * PAGE_SIZE as u64;
            let r = super::sys::punch_hole(inner.fd.as_fd(), offset, PAGE_SIZE as u64);
            if r.is_ok() {
                inner
                    .punched
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        if h.tomb == 0 {
            // Punched now (first time) or again (a tomb read may have refilled it).
            st.holds.remove(&slot);
            st.outlived.remove(&slot);
            punch(self);
            st.alloc.release(slot as u64);
        } else if st.outlived.insert(slot) {
            punch(self);
        }
    }
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        // SAFETY: `view` is the mapping made in `SharedStore::new`, of `slots` pages; every
        // frame holds an `Arc` of this, so no slice of the view outlives it.
        let _ = unsafe { super::sys::munmap(self.view, self.slots as usize * PAGE_SIZE) };
    }
}

/// A slot's key in the bookkeeping: `slot` is below the store's slots, at most 2^32.
fn key(slot: u64) -> Key {
    slot as Key
}

/// A held slot of a shared store.
struct FrameSlot {
    store: Arc<StoreInner>,
    slot: u64,
}

impl Drop for FrameSlot {
    fn drop(&mut self) {
        let mut st = self.store.state();
        let slot = key(self.slot);
        if let Some(h) = st.holds.get_mut(&slot) {
            h.slot -= 1;
        }
        self.store.settle(&mut st, slot);
    }
}

/// A page of a [`SharedStore`] the service holds (or the zero page): its bytes do not
/// change while any clone lives, as long as VMMs only copy into slots they were asked to
/// fill (a VMM has the memfd, so a VMM of the trust domain *could* write any slot: the
/// domain's members trust one another, see the service's docs).
#[derive(Clone)]
pub struct SharedFrame(Option<Arc<FrameSlot>>);

impl SharedFrame {
    /// Whether this is a frame of `store` (the zero frame is every store's).
    pub fn is_of(&self, store: &SharedStore) -> bool {
        self.0
            .as_ref()
            .is_none_or(|s| Arc::ptr_eq(&s.store, &store.inner))
    }

    /// The slot (`None` for the zero frame).
    pub fn slot(&self) -> Option<u64> {
        self.0.as_ref().map(|s| s.slot)
    }
}

impl AsRef<[u8]> for SharedFrame {
    fn as_ref(&self) -> &[u8] {
        static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        match &self.0 {
            // SAFETY: the view maps the whole memfd read-only and lives as long as the
            // store, which the frame's `Arc` keeps alive; `slot < slots`; the slot is held,
            // so it is not punched while the frame lives.
            Some(s) => unsafe {
                std::slice::from_raw_parts(
                    (s.store.view + s.slot as usize * PAGE_SIZE) as *const u8,
                    PAGE_SIZE,
                )
            },
            None => &ZERO,
        }
    }
}

impl std::fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.slot() {
            Some(s) => write!(f, "SharedFrame(slot {s})"),
            None => write!(f, "SharedFrame(zero)"),
        }
    }
}

/// Whether `[start, end)` of process `pid` is guest memory as the Linux backend manages
/// it: mapped without a hole, private, readable and writable, anonymous or pages of a
/// canonical store (from `/proc/PID/maps`). How a service checks a region a VMM declares
/// before it spends anything on it.
pub fn is_guest_range(pid: i32, start: u64, end: u64) -> bool {
    match (usize::try_from(start), usize::try_from(end)) {
        (Ok(s), Ok(e)) if s < e => super::sys::range_is_ours_in(&pid.to_string(), s, e),
        _ => false,
    }
}

/// Reads `buf.len()` bytes at `addr` of process `pid` (`process_vm_readv`): how a
/// service reads a VMM's guest pages without the VMM copying them. Needs ptrace access
/// to `pid` (root, or the VMM allowed it with `prctl(PR_SET_PTRACER)`).
pub fn read_process(pid: i32, addr: usize, buf: &mut [u8]) -> Result<(), PageError> {
    super::sys::read_guest(pid, addr, buf).map_err(|e| PageError::Os {
        op: "process_vm_readv (another process's guest memory)",
        errno: e.raw_os_error(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bookkeeping's entries are metadata per slot and per slot and client (see
    /// `tests/footprint.rs`): 12 bytes (a `u32` slot, two `u32` counts) where they were
    /// 32 and 24. Grown back, this fails.
    #[test]
    fn bookkeeping_entries_stay_small() {
        assert_eq!(std::mem::size_of::<(Key, Holds)>(), 12);
    }

    /// A count at its most refuses another acquire (instead of wrapping to zero, which
    /// would let the slot be punched while held) and changes nothing.
    #[test]
    fn an_acquire_beyond_the_most_holds_is_refused() {
        let store = SharedStore::new(4).unwrap();
        let frame = store.allocate(0).unwrap();
        let slot = frame.slot().unwrap();
        store.inner.state().holds.get_mut(&key(slot)).unwrap().tomb = u32::MAX;
        let ev = |kind| HoldEvent {
            slot,
            kind,
            acquire: true,
        };
        let c = ClientId(1);
        assert_eq!(
            store.apply(c, &[ev(HoldKind::Tomb)]),
            Err(vec![HoldError::TooMany(slot)])
        );
        assert_eq!(store.client_holds(c), (0, 0));
        assert_eq!(store.apply(c, &[ev(HoldKind::Slot)]), Ok(()));
        assert_eq!(store.client_holds(c), (1, 0));
        store.inner.state().holds.get_mut(&key(slot)).unwrap().slot = u32::MAX;
        assert!(
            store.frame(slot).is_none(),
            "no frame beyond the most holds"
        );
    }

    /// Stores of more than 2^32 slots are refused (the bookkeeping's keys are `u32`).
    #[test]
    fn at_most_2_pow_32_slots() {
        assert!(SharedStore::new((1 << 31) + 1).is_err());
    }
}
