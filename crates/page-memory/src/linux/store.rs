//! The canonical store: a memfd that holds each canonical content once, and the frames
//! that name its pages.
//!
//! # Layout
//! The memfd is sparse: a page of it uses memory only once written, so offsets are free
//! and the layout is chosen for the mappings, not for space.
//! - **Home slots.** Each region gets a run of slots as long as the region (its *home*):
//!   page `i` of the region, when it becomes canonical, goes to home slot `home + i` if
//!   that slot is free. Consecutive canonical pages of a region so sit at consecutive
//!   offsets, and so do the pages merged with them when the duplicates are laid out in the
//!   same order (two VMs booted from one image): their `MAP_PRIVATE` mappings of the store
//!   are contiguous in both address and file offset, and the kernel coalesces them into
//!   one mapping (VMA), which is what keeps merging under `vm.max_map_count`.
//! - **Overflow slots.** A page whose home slot is still taken (its old contents are
//!   still shared by other pages) gets a slot of the overflow area, handed out in order
//!   (freed ones first).
//!
//! # Lifetime of a slot
//! A slot's contents are held by [`Slot`]s: the engine's frames ([`LinuxFrame`]) hold
//! clones, and so does every page whose page-table entry may still map the slot's file
//! page. When the last clone goes, nothing can read the slot any more, and its page is
//! punched out of the memfd (`fallocate(PUNCH_HOLE)`), giving the memory back, before
//! the slot is free again (once its offset is not held either: [`Tomb`]). A slot is one
//! allocation, an `Arc<Tomb>` with a count of the [`Slot`]s among its clones: 48 bytes
//! of heap per slot of a store (per guest page that maps one, in a linked store, where
//! each page takes its own), where a slot and its tomb were two allocations. A page that stops mapping the slot (a copy-on-write break that the fault thread
//! completed itself, a remap) drops its clone only once that is certain: punching a slot
//! that a page still maps would change what the page reads.
//!
//! The store is read through one shared, read-only view of the whole memfd, so a frame's
//! bytes are an ordinary slice of memory.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::shared::{HoldEvent, HoldKind, HoldSink};
use crate::{PageError, PAGE_SIZE};

/// The most slots a store has (16 TiB): a slot's index is a `u32`.
const MAX_SLOTS: u64 = 1 << 32;

/// The all-zero page the zero frame reads.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// The memfd, its read-only view and the slot allocator.
pub(crate) struct Store {
    fd: OwnedFd,
    /// Address of the `MAP_SHARED`, `PROT_READ` view of the whole memfd.
    view: usize,
    /// Slots in all (home area, then the overflow area).
    slots: u64,
    /// Who allocates and frees slots.
    owner: Owner,
    /// Slots allocated now.
    pub(crate) live: AtomicU64,
    /// Slots punched out since the start.
    pub(crate) punched: AtomicU64,
    /// Punch-hole calls that failed (the memory stays held until the slot is reused).
    pub(crate) punch_errors: AtomicU64,
}

/// Who allocates a store's slots and punches them out.
enum Owner {
    /// This store: slots are allocated here and punched out when the last holder goes.
    Local(Mutex<Alloc>),
    /// A store shared by several processes ([`super::shared`]): another process (the
    /// service) allocates its slots and punches them; this one only reports, through the
    /// sink, each hold it takes on a slot or its offset and each it lets go.
    Linked(HoldSink),
}

/// The slot allocator: home runs per region, then the overflow area.
pub(crate) struct Alloc {
    /// Slots in the home area.
    home_slots: u64,
    /// Slots in all.
    slots: u64,
    /// Next home slot not yet given to a region.
    home_next: u64,
    /// One bit per home slot: allocated.
    home_used: Vec<u64>,
    /// Next overflow slot never used.
    overflow_next: u64,
    /// Freed overflow slots.
    overflow_free: Vec<u64>,
}

impl Store {
    /// A store with room for `home_slots` home slots and as many overflow slots (at most
    /// 2^32 slots in all).
    pub(crate) fn new(home_slots: u64) -> Result<Arc<Store>, PageError> {
        let os = |op| {
            move |e: rustix::io::Errno| PageError::Os {
                op,
                errno: e.raw_os_error(),
            }
        };
        let slots = home_slots
            .checked_mul(2)
            .filter(|&s| s <= MAX_SLOTS)
            .ok_or(PageError::Unsupported("canonical store too large"))?;
        let bytes = slots * PAGE_SIZE as u64;
        let fd = super::sys::memfd(super::sys::STORE_NAME, bytes)
            .map_err(os("memfd_create and ftruncate (canonical store)"))?;
        let len = usize::try_from(bytes).map_err(|_| PageError::Unsupported("store too large"))?;
        let view = super::sys::map_fresh_shared_view(fd.as_fd(), len)
            .map_err(os("mmap (view of the canonical store)"))?;
        Ok(Arc::new(Store {
            fd,
            view,
            slots,
            owner: Owner::Local(Mutex::new(Alloc::new(home_slots, slots))),
            live: AtomicU64::new(0),
            punched: AtomicU64::new(0),
            punch_errors: AtomicU64::new(0),
        }))
    }

    /// A store over `fd`, a memfd of `slots` pages that another process allocates
    /// (see [`Owner::Linked`]).
    pub(crate) fn linked(fd: OwnedFd, slots: u64, sink: HoldSink) -> Result<Arc<Store>, PageError> {
        let len = Some(slots)
            .filter(|&s| s <= MAX_SLOTS)
            .and_then(|s| s.checked_mul(PAGE_SIZE as u64))
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| b > 0)
            .ok_or(PageError::Unsupported(
                "a linked store of no slots or too many",
            ))?;
        let size = super::sys::file_size(fd.as_fd()).map_err(|e| PageError::Os {
            op: "fstat (linked canonical store)",
            errno: e.raw_os_error(),
        })?;
        if size < len as u64 {
            return Err(PageError::Unsupported(
                "the linked store's memfd is smaller than its slots",
            ));
        }
        let view =
            super::sys::map_fresh_shared_view(fd.as_fd(), len).map_err(|e| PageError::Os {
                op: "mmap (view of the linked canonical store)",
                errno: e.raw_os_error(),
            })?;
        Ok(Arc::new(Store {
            fd,
            view,
            slots,
            owner: Owner::Linked(sink),
            live: AtomicU64::new(0),
            punched: AtomicU64::new(0),
            punch_errors: AtomicU64::new(0),
        }))
    }

    /// Whether another process allocates this store's slots.
    pub(crate) fn is_linked(&self) -> bool {
        matches!(self.owner, Owner::Linked(_))
    }

    fn alloc(&self) -> Option<std::sync::MutexGuard<'_, Alloc>> {
        match &self.owner {
            Owner::Local(a) => Some(a.lock().unwrap_or_else(|e| e.into_inner())),
            Owner::Linked(_) => None,
        }
    }

    fn tell(&self, slot: u64, kind: HoldKind, acquire: bool) {
        if let Owner::Linked(sink) = &self.owner {
            sink(HoldEvent {
                slot,
                kind,
                acquire,
            });
        }
    }

    /// The memfd.
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Gives a region of `pages` pages its home: the first of `pages` consecutive slots.
    /// (A linked store's regions have no home here: its owner places their pages.)
    pub(crate) fn reserve_home(&self, pages: u32) -> Result<u64, PageError> {
        match self.alloc() {
            Some(mut a) => a.reserve_home(pages).ok_or(PageError::Unsupported(
                "the canonical store's home area is full: raise LinuxConfig::home_slots",
            )),
            None => Ok(0),
        }
    }

    /// A free slot: `home` if it is free, else an overflow slot. A linked store's slots
    /// are chosen by its owner ([`adopt`](Self::adopt)).
    pub(crate) fn allocate(self: &Arc<Self>, home: u64) -> Result<Slot, PageError> {
        let index = match self.alloc() {
            Some(mut a) => a.allocate(home).ok_or(PageError::Unsupported(
                "the canonical store's overflow area is full",
            ))?,
            None => {
                return Err(PageError::Unsupported(
                    "a linked store's slots are chosen by the process that owns it \
                     (LinuxMemory::canonicalize_at)",
                ))
            }
        };
        Ok(self.new_slot(index))
    }

    /// A hold on slot `index` of a linked store, which its owner chose (and holds while
    /// it asks this process to use it); the holds are reported through the sink.
    pub(crate) fn adopt(self: &Arc<Self>, index: u64) -> Result<Slot, PageError> {
        if !self.is_linked() {
            return Err(PageError::Unsupported(
                "only a linked store's slots are named by their owner",
            ));
        }
        if index >= self.slots {
            return Err(PageError::Unsupported(
                "a slot beyond the linked store's end",
            ));
        }
        Ok(self.new_slot(index))
    }

    /// A slot of index `index` (below `slots`, so below [`MAX_SLOTS`]).
    fn new_slot(self: &Arc<Self>, index: u64) -> Slot {
        self.live.fetch_add(1, Ordering::Relaxed);
        self.tell(index, HoldKind::Slot, true);
        self.tell(index, HoldKind::Tomb, true);
        Slot(Arc::new(Tomb {
            store: self.clone(),
            slots: AtomicU64::new(1),
            index: index as u32,
            outlived: AtomicBool::new(false),
        }))
    }

    /// Punches `index` out: its memory goes back to the system and it reads as zeros.
    fn punch(&self, index: u64) -> bool {
        let r = super::sys::punch_hole(self.fd.as_fd(), index * PAGE_SIZE as u64, PAGE_SIZE as u64);
        match r {
            Ok(()) => true,
            Err(_) => {
                self.punch_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Makes `index` (punched) free again.
    fn release(&self, index: u64) {
        if let Some(mut a) = self.alloc() {
            a.release(index);
        }
    }

    /// Bytes of memory the memfd holds (its allocated blocks).
    pub(crate) fn bytes(&self) -> Result<u64, PageError> {
        super::sys::allocated_bytes(self.fd.as_fd()).map_err(|e| PageError::Os {
            op: "fstat (canonical store)",
            errno: e.raw_os_error(),
        })
    }
}

impl Alloc {
    /// An allocator of `slots` slots, the first `home_slots` of them the home area.
    pub(crate) fn new(home_slots: u64, slots: u64) -> Alloc {
        Alloc {
            home_slots,
            slots,
            home_next: 0,
            home_used: Vec::new(),
            overflow_next: home_slots,
            overflow_free: Vec::new(),
        }
    }

    /// The first of `pages` consecutive home slots, or `None` if the home area is full.
    pub(crate) fn reserve_home(&mut self, pages: u32) -> Option<u64> {
        let base = self.home_next;
        let next = base + pages as u64;
        if next > self.home_slots {
            return None;
        }
        self.home_next = next;
        let words = next.div_ceil(64) as usize;
        if self.home_used.len() < words {
            self.home_used.resize(words, 0);
        }
        Some(base)
    }

    /// `home` if it is a free home slot, else a free overflow slot (`None`: full).
    pub(crate) fn allocate(&mut self, home: u64) -> Option<u64> {
        let (w, b) = ((home / 64) as usize, home % 64);
        let home_slots = self.home_slots;
        match self.home_used.get_mut(w) {
            Some(word) if home < home_slots && *word & (1 << b) == 0 => {
                *word |= 1 << b;
                Some(home)
            }
            _ => match self.overflow_free.pop() {
                Some(s) => Some(s),
                None if self.overflow_next < self.slots => {
                    self.overflow_next += 1;
                    Some(self.overflow_next - 1)
                }
                None => None,
            },
        }
    }

    /// Makes `index` free again.
    pub(crate) fn release(&mut self, index: u64) {
        if index < self.home_slots {
            if let Some(word) = self.home_used.get_mut((index / 64) as usize) {
                *word &= !(1 << (index % 64));
            }
        } else if index < self.slots {
            self.overflow_free.push(index);
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `view` is the mapping made in `new`, of `slots` pages; no slot (hence no
        // frame, hence no slice of it) outlives the store, since each holds an `Arc` of it.
        let _ = unsafe { super::sys::munmap(self.view, (self.slots as usize) * PAGE_SIZE) };
    }
}

/// A page of the canonical store, holding its contents while any clone lives: when the
/// last goes, the page is punched out (it reads as zeros), but its offset stays taken
/// while its [`Tomb`] is held. A clone is one pointer and no allocation (a count in the
/// tomb): see *Lifetime of a slot* in the module docs.
///
/// `repr(transparent)`: an `Arc<Tomb>` that carries a hold on the contents (a *parked*
/// slot, [`park`](Slot::park)) can be read as a `Slot` ([`parked`](Slot::parked)), which is
/// how a guest page keeps a slot and its tomb in one pointer.
#[repr(transparent)]
pub(crate) struct Slot(Arc<Tomb>);

/// The offset of a store slot, taken while any `Arc` of it lives: held by the slot itself
/// (every [`Slot`] is one) and by every guest page whose address lies in a private
/// mapping of the store at that offset, even after a copy-on-write break gave it a
/// private copy. Such a page, dropped with `MADV_DONTNEED` by the embedder, reads the
/// store at that offset again: the slot's contents if they are still held (the contents
/// the page had when it was merged), else a hole (zeros). Never other contents: the
/// offset is not handed out again while any page can read it so.
pub(crate) struct Tomb {
    pub(crate) store: Arc<Store>,
    /// The [`Slot`]s among the `Arc`s: holders of the contents.
    slots: AtomicU64,
    index: u32,
    /// Guest pages held it after the slot's contents went: a read through their mapping
    /// may have put a page back into the memfd, to be punched again.
    outlived: AtomicBool,
}

impl Tomb {
    /// The slot's index in the store.
    pub(crate) fn index(&self) -> u64 {
        self.index as u64
    }

    /// The slot's offset in the memfd.
    pub(crate) fn offset(&self) -> u64 {
        self.index() * PAGE_SIZE as u64
    }
}

impl Drop for Tomb {
    fn drop(&mut self) {
        if self.store.is_linked() {
            self.store.tell(self.index(), HoldKind::Tomb, false);
            return;
        }
        if self.outlived.load(Ordering::Relaxed) {
            self.store.punch(self.index());
        }
        self.store.release(self.index());
    }
}

impl std::ops::Deref for Slot {
    type Target = Tomb;

    fn deref(&self) -> &Tomb {
        &self.0
    }
}

impl Clone for Slot {
    fn clone(&self) -> Slot {
        // As `Arc::clone`: a new holder comes from an existing one, so nothing needs to
        // be ordered (the count cannot be zero here: `self` is a holder).
        self.0.slots.fetch_add(1, Ordering::Relaxed);
        Slot(self.0.clone())
    }
}

impl Slot {
    /// Whether `self` and `other` are the same page of the same store (a linked store
    /// may hand out several `Slot`s of one slot that are not clones of one another).
    pub(crate) fn same(&self, other: &Slot) -> bool {
        self.index == other.index && Arc::ptr_eq(&self.store, &other.store)
    }

    /// A hold on the slot's offset (see [`Tomb`]).
    #[cfg(test)]
    pub(crate) fn tomb(&self) -> Arc<Tomb> {
        self.0.clone()
    }

    /// Turns the slot into its `Arc`, which keeps the slot's hold on the contents (the
    /// count of holders is left as it is) until [`unpark`](Slot::unpark) makes it a
    /// `Slot` again. Dropped as a plain `Arc`, the hold would never be let go.
    pub(crate) fn park(self) -> Arc<Tomb> {
        // A clone's hold, and this slot dropped: one hold on the contents, as before, and
        // one `Arc`.
        self.0.slots.fetch_add(1, Ordering::Relaxed);
        self.0.clone()
    }

    /// The slot parked in `tomb`.
    ///
    /// # Safety
    /// `tomb` was returned by [`park`](Slot::park) and is not unparked (or read as a
    /// parked slot) elsewhere: it carries a hold on the contents, which the `Slot`
    /// returned now has.
    pub(crate) unsafe fn unpark(tomb: Arc<Tomb>) -> Slot {
        Slot(tomb)
    }

    /// The slot parked in `tomb`, borrowed.
    ///
    /// # Safety
    /// `tomb` was returned by [`park`](Slot::park) and is not unparked while the borrow
    /// lives: it carries a hold on the contents, so the contents stay for as long.
    pub(crate) unsafe fn parked(tomb: &Arc<Tomb>) -> &Slot {
        // SAFETY: `Slot` is `repr(transparent)` over `Arc<Tomb>`, so the two have one
        // layout; `tomb` carries a hold on the contents (the caller's guarantee), which is
        // all a `Slot` is, and it lives as long as the borrow.
        unsafe { &*(tomb as *const Arc<Tomb>).cast::<Slot>() }
    }

    /// The slot's bytes, through the store's view.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the view maps the whole memfd read-only and lives as long as the store,
        // which `self.store` keeps alive. The slot's page is written once, before the slot
        // is handed out (canonicalize), and punched only when the last `Slot` is gone, so
        // its bytes do not change while `self` is borrowed. `index < slots`.
        unsafe {
            std::slice::from_raw_parts(
                (self.store.view + self.index as usize * PAGE_SIZE) as *const u8,
                PAGE_SIZE,
            )
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // As `Arc`'s drop: the last holder sees every other holder's reads done.
        if self.0.slots.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        let store = &self.0.store;
        if store.is_linked() {
            // The owner punches it out once no process holds it.
            store.live.fetch_sub(1, Ordering::Relaxed);
            store.tell(self.index(), HoldKind::Slot, false);
            return;
        }
        if store.punch(self.index()) {
            store.punched.fetch_add(1, Ordering::Relaxed);
        }
        store.live.fetch_sub(1, Ordering::Relaxed);
        if Arc::strong_count(&self.0) > 1 {
            self.0.outlived.store(true, Ordering::Relaxed);
        }
        // The offset is freed when the last tomb goes (this one's, unless pages hold it).
    }
}

/// An immutable page of a [`LinuxMemory`](super::LinuxMemory): a page of the canonical
/// store, or the zero page. Its bytes never change while any clone of it lives.
#[derive(Clone)]
pub struct LinuxFrame(pub(crate) Option<Slot>);

impl LinuxFrame {
    /// Whether this is the zero frame.
    pub fn is_zero(&self) -> bool {
        self.0.is_none()
    }

    /// The frame's offset in the canonical store's memfd (`None` for the zero frame).
    pub fn store_offset(&self) -> Option<u64> {
        self.0.as_ref().map(|s| s.offset())
    }
}

impl AsRef<[u8]> for LinuxFrame {
    fn as_ref(&self) -> &[u8] {
        match &self.0 {
            Some(slot) => slot.bytes(),
            None => &ZERO_PAGE,
        }
    }
}

impl std::fmt::Debug for LinuxFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(s) => write!(f, "LinuxFrame(slot {})", s.index()),
            None => write!(f, "LinuxFrame(zero)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot is one allocation of 40 bytes (an `Arc`'s two counts and a 24-byte tomb: a
    /// 48-byte glibc chunk) held through 8-byte handles; a slot and its tomb were two such
    /// allocations. In a linked store every guest page that maps a slot takes its own
    /// (see `tests/footprint.rs`). Grown back, this fails.
    #[test]
    fn a_slot_is_one_small_allocation_behind_one_pointer() {
        use std::mem::size_of;
        assert!(size_of::<Tomb>() <= 24);
        assert_eq!(size_of::<Slot>(), 8);
        assert_eq!(size_of::<Option<Slot>>(), 8);
        assert_eq!(size_of::<LinuxFrame>(), 8);
    }

    /// The contents go when the last `Slot` does (not the last `Arc`): clones keep
    /// them, a tomb alone only keeps the offset.
    #[test]
    fn contents_go_with_the_last_slot_and_the_offset_with_the_last_tomb() {
        let Ok(store) = Store::new(4) else {
            return; // no memfd here
        };
        assert_eq!(store.reserve_home(4).unwrap(), 0);
        let a = store.allocate(1).unwrap();
        assert_eq!(a.index(), 1);
        let b = a.clone();
        let tomb = a.tomb();
        drop(a);
        assert_eq!(store.live.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(store.live.load(Ordering::Relaxed), 0);
        assert_eq!(store.punched.load(Ordering::Relaxed), 1);
        // The offset is still taken: home slot 1 is not handed out again.
        let c = store.allocate(1).unwrap();
        assert_ne!(c.index(), 1);
        drop(tomb);
        let d = store.allocate(1).unwrap();
        assert_eq!(d.index(), 1);
    }
}
