//! The memory the VMs live in: the simulated memory, or (with `--real`) the Linux
//! backend. The run is generic over [`Host`].

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, PageMemory, RegionId, PAGE_SIZE};
use pip::{MarkWords, PoolView};
use ppr_host::PoolMemory;

/// A guest page as the guests use it: the mark words the PIP hooks read and write, and
/// whole-page writes.
pub trait VmPage: MarkWords + Send + Sync + 'static {
    /// Writes contents derived from `seed` over the whole page (see [`word`]).
    fn fill(&self, seed: u64);
    /// Writes zeros over the whole page (which then uses memory, as a guest's
    /// `memset(0)` does).
    fn zero(&self);
}

/// Word `i` of the contents [`VmPage::fill`] writes for `seed`: cheap to make (one
/// multiply per word), and pages of different seeds differ in every word.
pub fn word(seed: u64, i: usize) -> u64 {
    let x = (seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1;
    x.wrapping_mul(i as u64 * 2 + 1) ^ seed
}

/// A memory for the VMs, and how the guests and the measurement reach it.
pub trait Host: PageMemory + Sized + 'static {
    /// A guest page as the guest sees it.
    type Page: VmPage;
    /// What the memory is, for the output.
    const NAME: &'static str;
    /// The same, in two words (for the plot).
    const SHORT: &'static str;
    /// What "memory in use" is measured from, for the output.
    const MEASURE: &'static str;
    /// How often memory in use is sampled (wall time).
    const SAMPLE_EVERY: Duration;
    /// Names (prefixes) of the memory's own threads, whose CPU time is reported apart.
    const THREADS: &'static [&'static str];

    /// A fresh, empty memory.
    fn fresh() -> Result<Arc<Self>, String>;
    /// Adds a VM of `pages` zero pages.
    fn add_vm(&self, pages: u32, domain: DomainId) -> Result<RegionId, String>;
    /// The guest's view of the first `pages` pages of `region`.
    fn guest_pages(self: &Arc<Self>, region: RegionId, pages: u32) -> Vec<Self::Page>;
    /// Bytes of host memory backing guest RAM now.
    fn used_bytes(&self) -> u64;
    /// What the memory itself counted during a run, if anything worth a line.
    fn diagnostics(&self) -> Option<String> {
        None
    }
}

/// A page of a [`SimMemory`]: the guest's accesses go through the memory's guest API
/// (atomic word loads and stores, copy-on-write when the page is shared or protected), as
/// a vCPU's would.
pub struct SimPage {
    mem: Arc<SimMemory>,
    id: PageId,
}

impl MarkWords for SimPage {
    fn load(&self, i: usize) -> u64 {
        // Marks are little-endian in memory; `read_word` is an `Acquire` load.
        u64::from_le(self.mem.read_word(self.id, i).unwrap_or(0))
    }

    fn store(&self, i: usize, v: u64) {
        // `write_word` is a `Release` store, after any copy-on-write.
        let _ = self.mem.write_word(self.id, i, v.to_le());
    }
}

impl VmPage for SimPage {
    fn fill(&self, seed: u64) {
        let mut bytes = [0u8; PAGE_SIZE];
        for (i, c) in bytes.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&word(seed, i).to_ne_bytes());
        }
        let _ = self.mem.write(self.id, 0, &bytes);
    }

    fn zero(&self) {
        let _ = self.mem.write(self.id, 0, &[0u8; PAGE_SIZE]);
    }
}

impl Host for SimMemory {
    type Page = SimPage;
    const NAME: &'static str =
        "simulated memory (page_memory::sim::SimMemory: refcounted 4 KiB frames, copy-on-write)";
    const SHORT: &'static str = "simulated memory";
    const MEASURE: &'static str = "live 4 KiB frames (exact count) + engine metadata + PIP pools";
    const SAMPLE_EVERY: Duration = Duration::from_millis(20);
    const THREADS: &'static [&'static str] = &[];

    fn fresh() -> Result<Arc<Self>, String> {
        Ok(Arc::new(SimMemory::new()))
    }

    fn add_vm(&self, pages: u32, domain: DomainId) -> Result<RegionId, String> {
        Ok(self.add_region(pages, domain))
    }

    fn guest_pages(self: &Arc<Self>, region: RegionId, pages: u32) -> Vec<SimPage> {
        (0..pages)
            .map(|i| SimPage {
                mem: self.clone(),
                id: PageId::new(region, i),
            })
            .collect()
    }

    fn used_bytes(&self) -> u64 {
        self.accounting().bytes()
    }
}

/// A PIP pool in heap memory, sized at run time: the guest's pool of one VM (in a real
/// guest, a few pages of its RAM it reserved and told the host about).
pub struct HeapPool {
    lines: Box<[Line]>,
    len: usize,
}

/// 64 bytes, aligned as the pool layout wants.
#[repr(C, align(64))]
struct Line([AtomicU64; 8]);

impl HeapPool {
    /// A zeroed pool of one shard of `slots` slots, initialised by the guest.
    pub fn new(slots: u32) -> Result<HeapPool, String> {
        let len = pip::pool_bytes(1, slots);
        let lines = (0..len.div_ceil(64))
            .map(|_| Line(Default::default()))
            .collect();
        let pool = HeapPool { lines, len };
        // SAFETY: `lines` is `len` (rounded up) bytes of 64-byte aligned, zeroed atomics
        // owned by the pool, which lives as long as the view (borrowed from `pool`); it is
        // only ever accessed atomically (through views).
        unsafe { PoolView::init_raw(pool.lines.as_ptr().cast(), pool.len, 1) }
            .map_err(|e| format!("PIP pool layout: {e:?}"))?;
        Ok(pool)
    }

    /// Bytes the pool takes.
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

impl PoolMemory for HeapPool {
    fn view(&self) -> Option<PoolView<'_>> {
        // SAFETY: as in `new`: the memory is the pool's own, 64-byte aligned, `len` bytes
        // long, alive as long as `&self`, and only accessed atomically.
        unsafe { PoolView::from_raw(self.lines.as_ptr().cast(), self.len) }.ok()
    }
}
