//! [`SimGuestPage`]: a page of a [`SimMemory`] as the guest's allocator sees it (feature
//! `test-util`).

use std::sync::Arc;

use page_memory::sim::SimMemory;
use page_memory::{PageId, RegionId, PAGE_SIZE, PAGE_WORDS};
use pip::MarkWords;
use ppr_guest::{pattern, GuestPage};

/// A guest page backed by a [`SimMemory`] page: the guest side of simulations, tests and
/// benchmarks (the guest's allocator writes marks and data through it while the host
/// scans and recycles the same memory).
///
/// Accesses go through the memory's guest API: atomic word stores and loads, with
/// copy-on-write when the page is shared or protected, exactly as a vCPU's writes would.
/// A page id that does not exist reads as zeros and ignores writes.
///
/// ```
/// use std::sync::Arc;
/// use page_memory::sim::SimMemory;
/// use page_memory::DomainId;
/// use ppr_guest::GuestPage;
/// use ppr_host::SimGuestPage;
///
/// let mem = Arc::new(SimMemory::new());
/// let region = mem.add_region(2, DomainId(0));
/// let pages = SimGuestPage::region(&mem, region, 2);
/// pages[1].fill(7);
/// assert!(pages[1].verify(7));
/// assert!(!pages[0].verify(7)); // still zeros
/// ```
#[derive(Clone, Debug)]
pub struct SimGuestPage {
    memory: Arc<SimMemory>,
    page: PageId,
}

impl SimGuestPage {
    /// Page `page` of `memory`.
    pub fn new(memory: Arc<SimMemory>, page: PageId) -> Self {
        SimGuestPage { memory, page }
    }

    /// The first `pages` pages of `region`, in order.
    pub fn region(memory: &Arc<SimMemory>, region: RegionId, pages: u32) -> Vec<SimGuestPage> {
        (0..pages)
            .map(|i| SimGuestPage::new(memory.clone(), PageId::new(region, i)))
            .collect()
    }

    /// The page's id in the memory.
    pub fn id(&self) -> PageId {
        self.page
    }
}

impl MarkWords for SimGuestPage {
    fn load(&self, i: usize) -> u64 {
        // `read_word` is an `Acquire` load; marks are little-endian in memory.
        u64::from_le(self.memory.read_word(self.page, i).unwrap_or(0))
    }

    fn store(&self, i: usize, v: u64) {
        // `write_word` is a `Release` store (after any copy-on-write).
        let _ = self.memory.write_word(self.page, i, v.to_le());
    }
}

impl GuestPage for SimGuestPage {
    fn fill(&self, seed: u64) {
        let mut bytes = [0u8; PAGE_SIZE];
        for (i, c) in bytes.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&pattern(seed, i).to_ne_bytes());
        }
        let _ = self.memory.write(self.page, 0, &bytes);
    }

    fn verify(&self, seed: u64) -> bool {
        let mut bytes = [0u8; PAGE_SIZE];
        if self.memory.read(self.page, 0, &mut bytes).is_err() {
            return false;
        }
        (0..PAGE_WORDS).all(|i| {
            let w = u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            w == pattern(seed, i)
        })
    }
}
