//! [`SimMemory`]: an in-process guest memory with real sharing and copy-on-write.
//!
//! # Model
//! - A **frame** is 4 KiB of `AtomicU64` words, reference-counted. Guest pages map
//!   frames; several pages may map one frame (sharing), and the all-zero frame is shared
//!   by every zero page.
//! - A frame is **frozen** once it becomes canonical (or is the zero frame): from then on
//!   it is never written, so [`SimFrame`] can hand out its bytes as `&[u8]`. A frame that
//!   is not frozen is mapped by exactly one page.
//! - Each page has a small lock-protected state: its frame, whether it is protected, and a
//!   write generation. A guest write to a page that is protected, frozen or shared first
//!   copies the frame (copy-on-write) and bumps the generation (a "fault"): the write is
//!   never lost and waits at most for one engine operation on that page.
//! - Guest accesses and engine reads of unfrozen frames use atomic word accesses, so
//!   racing guest threads and engine threads are well-defined: a concurrent reader may see
//!   a page half-written (as on real hardware), never undefined behaviour.
//!
//! # Accounting
//! [`SimMemory::accounting`] is exact at any quiescent point: live frames (including
//! canonical frames an engine still holds but no page maps), zero pages, and KSM-style
//! `pages_shared` (frames mapped by two or more pages) / `pages_sharing` (the extra
//! mappings of those frames, i.e. pages saved).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

/// The most regions a [`SimMemory`] holds.
pub const MAX_REGIONS: usize = 1024;

use crate::{
    DirtyHook, DomainId, MergeOutcome, PageError, PageId, PageMemory, ProtectToken, RegionId,
    RegionInfo, PAGE_SIZE, PAGE_WORDS,
};

/// Counters shared by the memory and its frames (frames update them when they die).
#[derive(Default)]
struct Counters {
    /// Frames alive, not counting the zero frame.
    frames: AtomicI64,
    /// Frames mapped by two or more pages.
    shared: AtomicI64,
    /// Sum over frames of (mappings − 1), for frames mapped at least once.
    sharing: AtomicI64,
    /// Pages mapping the zero frame.
    zero_pages: AtomicI64,
    /// Guest writes that had to copy a frame first.
    cow_faults: AtomicI64,
}

struct FrameData {
    words: Box<[AtomicU64]>,
    frozen: AtomicBool,
    /// Pages mapping this frame.
    mappings: AtomicI64,
    /// `None` for the zero frame, which is not counted.
    counters: Option<Arc<Counters>>,
}

impl FrameData {
    fn new(counters: Option<Arc<Counters>>) -> Arc<FrameData> {
        if let Some(c) = &counters {
            c.frames.fetch_add(1, Ordering::Relaxed);
        }
        Arc::new(FrameData {
            words: (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect(),
            frozen: AtomicBool::new(false),
            mappings: AtomicI64::new(0),
            counters,
        })
    }

    fn copy_of(src: &FrameData, counters: &Arc<Counters>) -> Arc<FrameData> {
        let f = FrameData::new(Some(counters.clone()));
        for (d, s) in f.words.iter().zip(src.words.iter()) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        f
    }

    fn bytes_equal(&self, other: &[u8]) -> bool {
        other.len() == PAGE_SIZE
            && self
                .words
                .iter()
                .zip(other.chunks_exact(8))
                .all(|(w, c)| w.load(Ordering::Relaxed).to_ne_bytes() == c)
    }
}

impl Drop for FrameData {
    fn drop(&mut self) {
        if let Some(c) = &self.counters {
            c.frames.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// An immutable (frozen) frame of a [`SimMemory`]: a canonical page or the zero page.
#[derive(Clone)]
pub struct SimFrame(Arc<FrameData>);

impl AsRef<[u8]> for SimFrame {
    fn as_ref(&self) -> &[u8] {
        debug_assert!(self.0.frozen.load(Ordering::Relaxed));
        // SAFETY: a `SimFrame` only wraps frozen frames (made by `canonicalize` or the zero
        // frame), and a frozen frame is never written again (every write path copies it
        // first), so plain reads of its words cannot race with a write. The words are
        // 4096 contiguous bytes (a boxed slice of 512 `AtomicU64`, which has the size and
        // alignment of `u64`), alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.0.words.as_ptr() as *const u8, PAGE_SIZE) }
    }
}

impl std::fmt::Debug for SimFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimFrame({:p})", Arc::as_ptr(&self.0))
    }
}

struct PageState {
    frame: Arc<FrameData>,
    protected: bool,
    generation: u64,
}

struct Region {
    info: RegionInfo,
    pages: Box<[Mutex<PageState>]>,
    /// Set by [`SimMemory::remove_region`] before it releases the frames; checked under
    /// each page's lock, so no operation touches a page once its frame is released.
    removed: AtomicBool,
}

/// Totals of a [`SimMemory`], exact when no operation is in flight.
///
/// More totals may be added in later versions (hence `#[non_exhaustive]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimAccounting {
    /// Guest pages in all regions.
    pub pages: u64,
    /// Frames alive (the memory really used), zero frame excluded. Includes canonical
    /// frames an engine holds that no page maps any more.
    pub frames: u64,
    /// Pages that map the zero frame (they use no memory).
    pub zero_pages: u64,
    /// Frames mapped by two or more pages (KSM's `pages_shared`).
    pub pages_shared: u64,
    /// Extra mappings of shared frames: pages saved by sharing (KSM's `pages_sharing`).
    pub pages_sharing: u64,
    /// Guest writes that copied a frame first (copy-on-write faults).
    pub cow_faults: u64,
}

impl SimAccounting {
    /// Bytes of frames alive.
    pub fn bytes(&self) -> u64 {
        self.frames * PAGE_SIZE as u64
    }
}

/// An in-process guest memory; see the module docs.
///
/// ```
/// use page_memory::sim::SimMemory;
/// use page_memory::{DomainId, PageId, PageMemory, MergeOutcome};
///
/// let mem = SimMemory::new();
/// let r = mem.add_region(2, DomainId(0));
/// let (a, b) = (PageId::new(r, 0), PageId::new(r, 1));
/// mem.write(a, 0, b"same").unwrap();
/// mem.write(b, 0, b"same").unwrap();
/// let tokens = mem.protect(&[a, b]);
/// let canon = mem.canonicalize(a, tokens[0].clone().unwrap()).unwrap();
/// assert_eq!(mem.merge(b, tokens[1].clone().unwrap(), &canon).unwrap(), MergeOutcome::Merged);
/// assert_eq!(mem.accounting().pages_sharing, 1);
/// mem.write(b, 0, b"diff").unwrap(); // copy-on-write: `a` keeps its contents
/// let mut buf = [0u8; 4];
/// mem.read(a, 0, &mut buf).unwrap();
/// assert_eq!(&buf, b"same");
/// ```
pub struct SimMemory {
    /// Regions by id: filled once each, read without a lock (a per-access read lock or
    /// `Arc` clone would bounce one cache line between every thread touching memory).
    regions: Box<[OnceLock<Region>]>,
    /// Regions added so far; adding is serialized by `adding`.
    count: AtomicUsize,
    adding: Mutex<()>,
    zero: Arc<FrameData>,
    counters: Arc<Counters>,
    hook: RwLock<Option<DirtyHook>>,
}

impl std::fmt::Debug for SimMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimMemory")
            .field("regions", &self.count.load(Ordering::Relaxed))
            .field("accounting", &self.accounting())
            .finish_non_exhaustive()
    }
}

impl Default for SimMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl SimMemory {
    /// An empty memory, with no regions.
    pub fn new() -> Self {
        let zero = FrameData::new(None);
        zero.frozen.store(true, Ordering::Relaxed);
        SimMemory {
            regions: (0..MAX_REGIONS).map(|_| OnceLock::new()).collect(),
            count: AtomicUsize::new(0),
            adding: Mutex::new(()),
            zero,
            counters: Arc::new(Counters::default()),
            hook: RwLock::new(None),
        }
    }

    /// Adds a region of `pages` zero pages in trust domain `domain`.
    ///
    /// # Panics
    /// If the memory already has [`MAX_REGIONS`] regions.
    pub fn add_region(&self, pages: u32, domain: DomainId) -> RegionId {
        let _one_at_a_time = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.count.load(Ordering::Relaxed);
        assert!(
            n < MAX_REGIONS,
            "SimMemory holds at most {MAX_REGIONS} regions"
        );
        let id = RegionId(n as u32);
        self.zero
            .mappings
            .fetch_add(pages as i64, Ordering::Relaxed);
        self.counters
            .zero_pages
            .fetch_add(pages as i64, Ordering::Relaxed);
        let pages: Box<[Mutex<PageState>]> = (0..pages)
            .map(|_| {
                Mutex::new(PageState {
                    frame: self.zero.clone(),
                    protected: false,
                    generation: 0,
                })
            })
            .collect();
        let info = RegionInfo {
            id,
            pages: pages.len() as u32,
            domain,
        };
        let _ = self.regions[n].set(Region {
            info,
            pages,
            removed: AtomicBool::new(false),
        });
        self.count.store(n + 1, Ordering::Release);
        id
    }

    /// Removes region `id` (a VM stopped, memory unplugged): its pages' frames are
    /// released (a canonical frame an engine still holds stays alive as long as the
    /// engine holds it, and pages of other regions that map it keep mapping it), it is no
    /// longer listed by [`regions`](PageMemory::regions) or counted by
    /// [`accounting`](Self::accounting), and every later operation on its pages returns
    /// [`PageError::NoSuchRegion`]. Region ids are never reused: a region added later
    /// gets a new one. The region's slot and its small per-page records stay allocated
    /// until the memory is dropped (regions are looked up without a lock), so at most
    /// [`MAX_REGIONS`] regions can be added over the memory's life.
    ///
    /// # Errors
    /// [`PageError::NoSuchRegion`] if there is no such region, or it was removed already.
    ///
    /// ```
    /// use page_memory::sim::SimMemory;
    /// use page_memory::{DomainId, PageError, PageId, PageMemory};
    ///
    /// let mem = SimMemory::new();
    /// let a = mem.add_region(2, DomainId(0));
    /// let b = mem.add_region(3, DomainId(0));
    /// mem.write(PageId::new(b, 0), 0, b"data").unwrap();
    /// assert_eq!(mem.accounting().frames, 1);
    /// mem.remove_region(b).unwrap();
    /// assert_eq!(mem.accounting().frames, 0); // its frame is released
    /// assert_eq!(mem.accounting().pages, 2);
    /// assert_eq!(mem.regions().iter().map(|r| r.id).collect::<Vec<_>>(), [a]);
    /// let mut buf = [0u8; 4];
    /// assert_eq!(mem.read(PageId::new(b, 0), 0, &mut buf), Err(PageError::NoSuchRegion(b)));
    /// assert_eq!(mem.remove_region(b), Err(PageError::NoSuchRegion(b)));
    /// assert_ne!(mem.add_region(1, DomainId(0)), b); // ids are not reused
    /// ```
    pub fn remove_region(&self, id: RegionId) -> Result<(), PageError> {
        let region = self.region(id)?;
        if region.removed.swap(true, Ordering::AcqRel) {
            return Err(PageError::NoSuchRegion(id));
        }
        for slot in region.pages.iter() {
            let mut state = slot.lock().unwrap_or_else(|e| e.into_inner());
            // The zero frame is not counted as a frame: pointing a gone page at it (without
            // counting a mapping) releases the page's frame.
            self.unmap(&state.frame);
            state.frame = self.zero.clone();
            state.protected = false;
            state.generation += 1;
        }
        Ok(())
    }

    /// The regions added so far and not removed.
    fn all_regions(&self) -> impl Iterator<Item = &Region> {
        let n = self.count.load(Ordering::Acquire);
        self.regions[..n]
            .iter()
            .filter_map(OnceLock::get)
            .filter(|r| !r.removed.load(Ordering::Acquire))
    }

    fn region(&self, id: RegionId) -> Result<&Region, PageError> {
        self.regions
            .get(id.0 as usize)
            .and_then(OnceLock::get)
            .filter(|r| !r.removed.load(Ordering::Acquire))
            .ok_or(PageError::NoSuchRegion(id))
    }

    /// Runs `f` with `page`'s state locked.
    fn with_page<R>(
        &self,
        page: PageId,
        f: impl FnOnce(&mut PageState) -> R,
    ) -> Result<R, PageError> {
        let region = self.region(page.region)?;
        let slot = region
            .pages
            .get(page.index as usize)
            .ok_or(PageError::NoSuchPage(page))?;
        let mut state: MutexGuard<'_, PageState> = slot.lock().unwrap_or_else(|e| e.into_inner());
        // Checked again under the page's lock: `remove_region` sets the flag before it
        // takes each page's lock to release its frame.
        if region.removed.load(Ordering::Acquire) {
            return Err(PageError::NoSuchRegion(page.region));
        }
        Ok(f(&mut state))
    }

    /// Points `state` at `frame`, keeping the sharing counters exact.
    fn remap(&self, state: &mut PageState, frame: Arc<FrameData>) {
        self.unmap(&state.frame);
        self.map(&frame);
        state.frame = frame;
    }

    fn map(&self, frame: &Arc<FrameData>) {
        if Arc::ptr_eq(frame, &self.zero) {
            self.zero.mappings.fetch_add(1, Ordering::Relaxed);
            self.counters.zero_pages.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let old = frame.mappings.fetch_add(1, Ordering::Relaxed);
        if old >= 1 {
            self.counters.sharing.fetch_add(1, Ordering::Relaxed);
        }
        if old == 1 {
            self.counters.shared.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn unmap(&self, frame: &Arc<FrameData>) {
        if Arc::ptr_eq(frame, &self.zero) {
            self.zero.mappings.fetch_sub(1, Ordering::Relaxed);
            self.counters.zero_pages.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let old = frame.mappings.fetch_sub(1, Ordering::Relaxed);
        if old >= 2 {
            self.counters.sharing.fetch_sub(1, Ordering::Relaxed);
        }
        if old == 2 {
            self.counters.shared.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Makes `state`'s frame privately writable: copies it if it is frozen, shared or the
    /// page is protected (a write fault), and drops protection.
    fn make_writable(&self, state: &mut PageState) {
        let private = !state.frame.frozen.load(Ordering::Relaxed)
            && state.frame.mappings.load(Ordering::Relaxed) == 1;
        if !private {
            let copy = FrameData::copy_of(&state.frame, &self.counters);
            self.remap(state, copy);
            self.counters.cow_faults.fetch_add(1, Ordering::Relaxed);
        }
        if state.protected || !private {
            state.protected = false;
            state.generation += 1;
        }
    }

    fn dirty(&self, page: PageId) {
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(page);
        }
    }

    /// Guest write of `data` at byte `offset` of `page` (copy-on-write as needed).
    pub fn write(&self, page: PageId, offset: usize, data: &[u8]) -> Result<(), PageError> {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > PAGE_SIZE)
        {
            return Err(PageError::Unsupported("write beyond the end of a page"));
        }
        self.with_page(page, |s| {
            self.make_writable(s);
            write_bytes(&s.frame.words, offset, data);
        })
    }

    /// Guest write of one 64-bit word (`index < 512`), atomically.
    pub fn write_word(&self, page: PageId, index: usize, value: u64) -> Result<(), PageError> {
        if index >= PAGE_WORDS {
            return Err(PageError::Unsupported(
                "word index beyond the end of a page",
            ));
        }
        self.with_page(page, |s| {
            self.make_writable(s);
            s.frame.words[index].store(value, Ordering::Release);
        })
    }

    /// Guest read of `buf.len()` bytes at byte `offset` of `page`.
    pub fn read(&self, page: PageId, offset: usize, buf: &mut [u8]) -> Result<(), PageError> {
        if offset
            .checked_add(buf.len())
            .is_none_or(|end| end > PAGE_SIZE)
        {
            return Err(PageError::Unsupported("read beyond the end of a page"));
        }
        let frame = self.with_page(page, |s| s.frame.clone())?;
        read_bytes(&frame.words, offset, buf);
        Ok(())
    }

    /// Guest read of one 64-bit word, atomically.
    pub fn read_word(&self, page: PageId, index: usize) -> Result<u64, PageError> {
        if index >= PAGE_WORDS {
            return Err(PageError::Unsupported(
                "word index beyond the end of a page",
            ));
        }
        self.with_page(page, |s| s.frame.words[index].load(Ordering::Acquire))
    }

    /// Exact totals (see [`SimAccounting`]).
    pub fn accounting(&self) -> SimAccounting {
        let pages = self.all_regions().map(|r| r.pages.len() as u64).sum();
        let c = &self.counters;
        let get = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0) as u64;
        SimAccounting {
            pages,
            frames: get(&c.frames),
            zero_pages: get(&c.zero_pages),
            pages_shared: get(&c.shared),
            pages_sharing: get(&c.sharing),
            cow_faults: get(&c.cow_faults),
        }
    }

    /// Whether `page` is currently write-protected (feature `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    pub fn is_protected(&self, page: PageId) -> Result<bool, PageError> {
        self.with_page(page, |s| s.protected)
    }

    /// Whether `a` and `b` map the same frame (share memory; feature `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    pub fn shares_frame(&self, a: PageId, b: PageId) -> Result<bool, PageError> {
        let fa = self.with_page(a, |s| s.frame.clone())?;
        let fb = self.with_page(b, |s| s.frame.clone())?;
        Ok(Arc::ptr_eq(&fa, &fb))
    }

    /// Whether `page` maps the zero frame (feature `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    pub fn is_zero_mapped(&self, page: PageId) -> Result<bool, PageError> {
        self.with_page(page, |s| Arc::ptr_eq(&s.frame, &self.zero))
    }
}

fn write_bytes(words: &[AtomicU64], offset: usize, data: &[u8]) {
    let mut i = 0;
    while i < data.len() {
        let at = offset + i;
        let (w, within) = (at / 8, at % 8);
        let n = (8 - within).min(data.len() - i);
        if n == 8 {
            let v = u64::from_ne_bytes(data[i..i + 8].try_into().unwrap_or([0; 8]));
            words[w].store(v, Ordering::Relaxed);
        } else {
            let mut bytes = words[w].load(Ordering::Relaxed).to_ne_bytes();
            bytes[within..within + n].copy_from_slice(&data[i..i + n]);
            words[w].store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
        }
        i += n;
    }
}

fn read_bytes(words: &[AtomicU64], offset: usize, buf: &mut [u8]) {
    if offset % 8 == 0 {
        // Whole words: one load and one 8-byte copy each.
        let first = offset / 8;
        let whole = buf.len() / 8 * 8;
        let (head, rest) = buf.split_at_mut(whole);
        for (c, w) in head.chunks_exact_mut(8).zip(&words[first..]) {
            c.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        if !rest.is_empty() {
            read_partial(words, offset + whole, rest);
        }
        return;
    }
    read_partial(words, offset, buf);
}

fn read_partial(words: &[AtomicU64], offset: usize, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let at = offset + i;
        let (w, within) = (at / 8, at % 8);
        let n = (8 - within).min(buf.len() - i);
        let bytes = words[w].load(Ordering::Relaxed).to_ne_bytes();
        buf[i..i + n].copy_from_slice(&bytes[within..within + n]);
        i += n;
    }
}

impl PageMemory for SimMemory {
    type Frame = SimFrame;

    fn regions(&self) -> Vec<RegionInfo> {
        self.all_regions().map(|r| r.info).collect()
    }

    fn read_page(&self, page: PageId, buf: &mut [u8; PAGE_SIZE]) -> Result<(), PageError> {
        let frame = self.with_page(page, |s| s.frame.clone())?;
        read_bytes(&frame.words, 0, buf);
        Ok(())
    }

    fn read_words(&self, page: PageId, out: &mut [u64]) -> Result<(), PageError> {
        if out.len() > PAGE_WORDS {
            return Err(PageError::Unsupported("more words than a page holds"));
        }
        let frame = self.with_page(page, |s| s.frame.clone())?;
        for (o, w) in out.iter_mut().zip(frame.words.iter()) {
            *o = w.load(Ordering::Acquire);
        }
        Ok(())
    }

    fn protect(&self, pages: &[PageId]) -> Vec<Result<ProtectToken, PageError>> {
        pages
            .iter()
            .map(|&p| {
                self.with_page(p, |s| {
                    s.protected = true;
                    ProtectToken(s.generation)
                })
            })
            .collect()
    }

    fn unprotect(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        pages
            .iter()
            .map(|&p| {
                self.with_page(p, |s| {
                    if s.protected {
                        s.protected = false;
                        s.generation += 1;
                    }
                })
            })
            .collect()
    }

    fn written_since(&self, page: PageId, token: ProtectToken) -> Result<bool, PageError> {
        self.with_page(page, |s| !s.protected || s.generation != token.0)
    }

    fn canonicalize(&self, page: PageId, token: ProtectToken) -> Result<SimFrame, PageError> {
        self.with_page(page, |s| {
            if !s.protected || s.generation != token.0 {
                return Err(PageError::Stale(page));
            }
            // Protected and unchanged: freeze the frame in place; writes will copy it.
            s.frame.frozen.store(true, Ordering::Relaxed);
            Ok(SimFrame(s.frame.clone()))
        })?
    }

    fn merge(
        &self,
        dup: PageId,
        token: ProtectToken,
        canonical: &SimFrame,
    ) -> Result<MergeOutcome, PageError> {
        let outcome = self.with_page(dup, |s| {
            if !s.protected || s.generation != token.0 {
                return MergeOutcome::Changed;
            }
            if Arc::ptr_eq(&s.frame, &canonical.0) {
                return MergeOutcome::Merged;
            }
            // Under the page lock no guest write can land: compare, then switch.
            if !s.frame.bytes_equal(canonical.as_ref()) {
                return MergeOutcome::Differs;
            }
            self.remap(s, canonical.0.clone());
            MergeOutcome::Merged
        })?;
        if outcome == MergeOutcome::Merged {
            self.dirty(dup);
        }
        Ok(outcome)
    }

    fn zero_frame(&self) -> SimFrame {
        SimFrame(self.zero.clone())
    }

    fn recycle(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        pages
            .iter()
            .map(|&p| {
                self.with_page(p, |s| {
                    self.remap(s, self.zero.clone());
                    s.protected = false;
                    s.generation += 1;
                })?;
                self.dirty(p);
                Ok(())
            })
            .collect()
    }

    fn unmerge(&self, page: PageId) -> Result<(), PageError> {
        let changed = self.with_page(page, |s| {
            let private = !s.frame.frozen.load(Ordering::Relaxed)
                && s.frame.mappings.load(Ordering::Relaxed) == 1;
            if !private {
                let copy = FrameData::copy_of(&s.frame, &self.counters);
                self.remap(s, copy);
            }
            if s.protected {
                s.protected = false;
                s.generation += 1;
            }
            !private
        })?;
        if changed {
            self.dirty(page);
        }
        Ok(())
    }

    fn set_dirty_hook(&self, hook: Option<DirtyHook>) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = hook;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_region_lets_go_of_shared_frames_and_refuses_every_operation() {
        let mem = SimMemory::new();
        let a = mem.add_region(2, DomainId(0));
        let b = mem.add_region(2, DomainId(0));
        let (pa, pb) = (PageId::new(a, 0), PageId::new(b, 0));
        mem.write(pa, 0, b"same").unwrap();
        mem.write(pb, 0, b"same").unwrap();
        let tokens = mem.protect(&[pa, pb]);
        let canon = mem.canonicalize(pa, tokens[0].clone().unwrap()).unwrap();
        let merged = mem.merge(pb, tokens[1].clone().unwrap(), &canon).unwrap();
        assert_eq!(merged, MergeOutcome::Merged);
        assert_eq!(mem.accounting().pages_sharing, 1);
        // The canonical page's region goes: the frame lives on for `b` (and `canon`).
        mem.remove_region(a).unwrap();
        let acc = mem.accounting();
        assert_eq!((acc.pages, acc.frames, acc.zero_pages), (2, 1, 1));
        assert_eq!((acc.pages_shared, acc.pages_sharing), (0, 0));
        let mut buf = [0u8; 4];
        mem.read(pb, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"same");
        let gone = Err(PageError::NoSuchRegion(a));
        assert_eq!(mem.read(pa, 0, &mut buf), gone);
        assert_eq!(mem.write(pa, 0, b"x"), gone);
        assert_eq!(mem.protect(&[pa])[0], Err(PageError::NoSuchRegion(a)));
        assert_eq!(
            mem.written_since(pa, ProtectToken(0)),
            Err(PageError::NoSuchRegion(a))
        );
        assert_eq!(
            mem.merge(pa, ProtectToken(0), &canon),
            Err(PageError::NoSuchRegion(a))
        );
        assert_eq!(mem.unmerge(pa), gone);
        assert_eq!(mem.shares_frame(pa, pb), Err(PageError::NoSuchRegion(a)));
        // `b` goes too; only the frame `canon` holds is left.
        mem.remove_region(b).unwrap();
        assert!(mem.regions().is_empty());
        let acc = mem.accounting();
        assert_eq!((acc.pages, acc.frames, acc.zero_pages), (0, 1, 0));
        drop(canon);
        assert_eq!(mem.accounting().frames, 0);
    }
}
