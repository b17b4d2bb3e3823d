//! The vm-memory adapter (feature `vm-memory`): deduplicate and recycle the guest RAM of a
//! rust-vmm VMM (Firecracker, Cloud Hypervisor, ...) kept in a vm-memory 0.18
//! [`GuestMemoryMmap`].
//!
//! [`VmMemoryAdapter::adopt`] hands every region of a `GuestMemoryMmap` to a
//! [`LinuxMemory`] by host address and length ([`LinuxMemory::adopt_region`]), in a trust
//! domain of the embedder's choice, and installs the backend's [`DirtyHook`]: every page
//! the engines change (canonicalized, merged, zero-merged, recycled, unmerged) is marked
//! in the region's vm-memory dirty bitmap, so a live migration that copies dirty pages
//! stays correct. Writes the guest or the VMM make go through vm-memory (which marks its
//! bitmap itself) or KVM's dirty log, as before; the engines never write guest memory
//! through vm-memory.
//!
//! The adapter keeps each adopted region's mapping alive (it holds its `Arc<MmapRegion>`)
//! until the guest is [released](VmMemoryAdapter::release) or the adapter is dropped, at
//! which point the regions are given back to the VMM as plain anonymous memory with the
//! same contents: the `GuestMemoryMmap` may be dropped before, after or meanwhile.
//!
//! Only private anonymous guest memory can be adopted (vm-memory's default,
//! `GuestMemoryMmap::from_ranges`): file-backed, shared or hugetlbfs regions are refused
//! with [`PageError::Unsupported`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use page_memory::linux::LinuxMemory;
//! use page_memory::vmm::vm_memory::bitmap::AtomicBitmap;
//! use page_memory::vmm::vm_memory::{GuestAddress, GuestMemoryMmap};
//! use page_memory::vmm::VmMemoryAdapter;
//! use page_memory::DomainId;
//!
//! let guest: GuestMemoryMmap<AtomicBitmap> =
//!     GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
//! let adapter = VmMemoryAdapter::new(Arc::new(LinuxMemory::new().unwrap()));
//! // SAFETY: nothing else in this process remaps, madvises or registers the guest's
//! // memory with a userfaultfd while it is adopted.
//! let vm = unsafe { adapter.adopt(&guest, DomainId(0)) }.unwrap();
//! // Hand the backend to an engine, e.g. `pageone::PageOne::new(memory, ..)`.
//! let memory: Arc<LinuxMemory> = adapter.memory().clone();
//! # drop(memory);
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub use vm_memory;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::linux::LinuxMemory;
use crate::{DirtyHook, DomainId, PageError, PageId, PageMemory, RegionId, PAGE_SIZE};

/// Marks `PAGE_SIZE` bytes at an offset of one region dirty.
type Mark = Box<dyn Fn(usize) + Send + Sync>;

struct Route {
    guest: u64,
    start: GuestAddress,
    len: u64,
    /// Marks the region's bitmap; holds the region's mapping alive.
    mark: Mark,
}

type Routes = RwLock<HashMap<RegionId, Route>>;

/// One region of an adopted guest: where it is for the guest and for the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdoptedRegion {
    /// The backend's region.
    pub region: RegionId,
    /// The guest-physical address of its first byte.
    pub guest_addr: GuestAddress,
    /// Its length in bytes.
    pub len: u64,
}

/// A guest whose memory a [`VmMemoryAdapter`] adopted; give it back with
/// [`VmMemoryAdapter::release`] (dropping the adapter gives back every guest).
#[derive(Debug)]
pub struct AdoptedGuest {
    id: u64,
    regions: Vec<AdoptedRegion>,
}

impl AdoptedGuest {
    /// Its regions, in guest address order.
    pub fn regions(&self) -> &[AdoptedRegion] {
        &self.regions
    }

    /// The backend's page that holds guest-physical address `addr`.
    pub fn page_of(&self, addr: GuestAddress) -> Option<PageId> {
        self.regions.iter().find_map(|r| {
            let off = addr.checked_offset_from(r.guest_addr)?;
            (off < r.len).then(|| PageId::new(r.region, (off / PAGE_SIZE as u64) as u32))
        })
    }

    /// The guest-physical address of `page`'s first byte.
    pub fn guest_addr(&self, page: PageId) -> Option<GuestAddress> {
        let r = self.regions.iter().find(|r| r.region == page.region)?;
        let off = page.index as u64 * PAGE_SIZE as u64;
        (off < r.len).then(|| r.guest_addr.unchecked_add(off))
    }
}

/// Adopts vm-memory guest RAM into a [`LinuxMemory`] and keeps the guests' dirty bitmaps
/// marked for every page the engines change. See the module docs.
pub struct VmMemoryAdapter {
    memory: Arc<LinuxMemory>,
    routes: Arc<Routes>,
    next_guest: AtomicU64,
}

impl std::fmt::Debug for VmMemoryAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMemoryAdapter")
            .field("memory", &self.memory)
            .field("adopted_regions", &self.adopted_regions())
            .finish_non_exhaustive()
    }
}

impl VmMemoryAdapter {
    /// An adapter over `memory`; installs `memory`'s dirty hook (replacing any).
    pub fn new(memory: Arc<LinuxMemory>) -> Self {
        Self::build(memory, None)
    }

    /// Like [`new`](Self::new), and `next` is told of every changed page too (of adopted
    /// regions or not), after the bitmap is marked.
    pub fn with_hook(memory: Arc<LinuxMemory>, next: DirtyHook) -> Self {
        Self::build(memory, Some(next))
    }

    fn build(memory: Arc<LinuxMemory>, next: Option<DirtyHook>) -> Self {
        let routes: Arc<Routes> = Arc::new(RwLock::new(HashMap::new()));
        let r = routes.clone();
        memory.set_dirty_hook(Some(Arc::new(move |page: PageId| {
            if let Some(route) = r
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&page.region)
            {
                (route.mark)(page.index as usize * PAGE_SIZE);
            }
            if let Some(next) = &next {
                next(page);
            }
        })));
        VmMemoryAdapter {
            memory,
            routes,
            next_guest: AtomicU64::new(0),
        }
    }

    /// The backend: give it to the engines (`PageOne::new(adapter.memory().clone(), ..)`).
    pub fn memory(&self) -> &Arc<LinuxMemory> {
        &self.memory
    }

    /// Adopts every region of `guest` into the backend, in trust domain `domain`. Fails
    /// (adopting nothing) if a region is not private anonymous memory, not page-aligned,
    /// already adopted, or the backend refuses it.
    ///
    /// # Safety
    /// Until the guest is released or the adapter dropped, nothing in this process may
    /// `mmap`, `mremap`, `mprotect` or `madvise` over the guest's memory (a balloon device
    /// should recycle pages through the backend instead), or register it with another
    /// userfaultfd: the backend remaps pages inside it. Guest code, KVM and vm-memory's
    /// accessors may read and write it at any time. (The adapter keeps the mappings alive,
    /// so they cannot be unmapped meanwhile.) See [`LinuxMemory::adopt_region`].
    pub unsafe fn adopt<B>(
        &self,
        guest: &GuestMemoryMmap<B>,
        domain: DomainId,
    ) -> Result<AdoptedGuest, PageError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let id = self.next_guest.fetch_add(1, Ordering::Relaxed);
        let mut adopted = AdoptedGuest {
            id,
            regions: Vec::new(),
        };
        for r in guest.iter() {
            let found = if r.file_offset().is_some() {
                Err(PageError::Unsupported(
                    "file-backed guest memory: only private anonymous memory can be adopted",
                ))
            } else if r.is_hugetlbfs() == Some(true) {
                Err(PageError::Unsupported("hugetlbfs guest memory"))
            } else {
                let mapping = r.get_mmap();
                let (base, len) = (mapping.as_ptr(), mapping.size());
                // SAFETY: the region's own mapping, kept alive by `mapping` (held by the
                // route below until the region is removed from the backend); the caller
                // promised the rest (see `# Safety`). The backend checks that it is
                // private anonymous memory.
                unsafe { self.memory.adopt_region(base, len, domain) }.map(|region| {
                    let mark: Mark = Box::new(move |offset| {
                        mapping.bitmap().mark_dirty(offset, PAGE_SIZE);
                    });
                    (region, len as u64, mark)
                })
            };
            match found {
                Ok((region, len, mark)) => {
                    let start = r.start_addr();
                    self.routes
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            region,
                            Route {
                                guest: id,
                                start,
                                len,
                                mark,
                            },
                        );
                    adopted.regions.push(AdoptedRegion {
                        region,
                        guest_addr: start,
                        len,
                    });
                }
                Err(e) => {
                    let _ = self.release(adopted);
                    return Err(e);
                }
            }
        }
        Ok(adopted)
    }

    /// Gives `guest`'s regions back: removed from the backend (pages that share canonical
    /// contents get private copies, so the VMM's memory reads the same) and no longer
    /// marked. Engines built over the backend before see the regions' pages fail from now
    /// on; build a new engine (or drop the old one first).
    pub fn release(&self, guest: AdoptedGuest) -> Result<(), PageError> {
        let mut first_error = Ok(());
        for r in &guest.regions {
            let removed = self.memory.remove_region(r.region);
            // The mapping may be unmapped only once the backend let go of it.
            self.routes
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&r.region);
            if let (Err(e), Ok(())) = (removed, &first_error) {
                first_error = Err(e);
            }
        }
        first_error
    }

    /// The backend's page that holds guest-physical address `addr` of the guest adopted as
    /// `guest` (see [`AdoptedGuest::page_of`]), if its region is still adopted.
    pub fn page_of(&self, guest: &AdoptedGuest, addr: GuestAddress) -> Option<PageId> {
        let page = guest.page_of(addr)?;
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let r = routes.get(&page.region)?;
        (r.guest == guest.id && addr.checked_offset_from(r.start)? < r.len).then_some(page)
    }

    /// The pages of guest-physical range `[addr, addr + len)` of `guest` (page-aligned,
    /// inside adopted regions), in order.
    fn pages_in(
        &self,
        guest: &AdoptedGuest,
        addr: GuestAddress,
        len: u64,
    ) -> Result<Vec<PageId>, PageError> {
        let page = PAGE_SIZE as u64;
        if addr.raw_value() % page != 0 || len % page != 0 {
            return Err(PageError::Unsupported(
                "guest ranges must be page-aligned and a whole number of pages",
            ));
        }
        (0..len / page)
            .map(|k| {
                let at = addr
                    .checked_add(k * page)
                    .ok_or(PageError::Unsupported("guest range wraps around"))?;
                self.page_of(guest, at).ok_or(PageError::Unsupported(
                    "guest range not inside the guest's adopted regions",
                ))
            })
            .collect()
    }

    /// Discards guest-physical range `[addr, addr + len)` of `guest` (a balloon inflating,
    /// free-page reporting): [`LinuxMemory::discard`] of its pages, which then read zeros
    /// (and are marked dirty). Use this instead of `madvise(MADV_DONTNEED)` on the
    /// region's host memory. The first page that fails gives the error (the others are
    /// still discarded).
    pub fn discard(
        &self,
        guest: &AdoptedGuest,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), PageError> {
        let pages = self.pages_in(guest, addr, len)?;
        self.memory
            .discard(&pages)
            .into_iter()
            .find(Result::is_err)
            .unwrap_or(Ok(()))
    }

    /// Declares guest-physical range `[addr, addr + len)` of `guest` pinned (VFIO DMA
    /// maps, vhost, io_uring fixed buffers over guest memory):
    /// [`LinuxMemory::declare_pinned`] of its pages, which are then never protected,
    /// merged or recycled. Declare before pinning.
    pub fn declare_pinned(
        &self,
        guest: &AdoptedGuest,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), PageError> {
        for p in self.pages_in(guest, addr, len)? {
            self.memory.declare_pinned(p.region, p.index..p.index + 1)?;
        }
        Ok(())
    }

    /// Takes back a [`declare_pinned`](Self::declare_pinned) of the same range (after the
    /// embedder unpinned it).
    pub fn undeclare_pinned(
        &self,
        guest: &AdoptedGuest,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), PageError> {
        for p in self.pages_in(guest, addr, len)? {
            self.memory
                .undeclare_pinned(p.region, p.index..p.index + 1)?;
        }
        Ok(())
    }

    /// Regions adopted now, over all guests.
    pub fn adopted_regions(&self) -> usize {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for VmMemoryAdapter {
    fn drop(&mut self) {
        let regions: Vec<RegionId> = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for r in regions {
            let _ = self.memory.remove_region(r);
        }
        self.memory.set_dirty_hook(None);
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
