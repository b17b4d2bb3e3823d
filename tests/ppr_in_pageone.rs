//! The recycler inside PageONE's passes (`PageOne::with_hook`): a page the guest freed is
//! recycled, not deduplicated. Here, in the facade, because ppr-host and pageone do not
//! depend on each other.

use std::sync::Arc;

use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageMemory};
use pageone::{Config, PageOne};
use pip::PoolStorage;
use ppr_guest::{GuestPage, Hooks, PageAllocator};
use ppr_host::{Recycler, SimGuestPage};

#[test]
fn inside_pageone_a_freed_page_is_recycled_instead_of_merged() {
    const PAGES: u32 = 256;
    let mem = Arc::new(SimMemory::new());
    mem.add_region(PAGES, DomainId(0));
    let info = mem.regions()[0];
    let pool = Arc::new(PoolStorage::<2, 2048>::new());
    pool.init().unwrap();
    let mut recycler = Recycler::new();
    recycler
        .register(pool.clone(), 3, 0x7a3f_11c0_de5e_c2e7, info, 1)
        .unwrap();
    let recycler = Arc::new(recycler);
    let engine = PageOne::with_hook(
        mem.clone(),
        Config::default().work_threads(2),
        recycler.clone(),
    )
    .unwrap();
    let pages = SimGuestPage::region(&mem, info.id, PAGES);
    let mut alloc = PageAllocator::new(Hooks::attach(pool.view().unwrap()).unwrap(), &pages, 1);
    // The guest uses every page, all with the same contents: ideal for deduplication.
    let mut used = Vec::new();
    while let Some((frame, page)) = alloc.alloc(0) {
        page.fill(99);
        used.push((frame, page));
    }
    assert_eq!(used.len(), PAGES as usize);
    // Merged by the third pass, but with two threads a content both claimed at once may
    // wait a pass: run passes until one changes nothing and leaves nothing pending.
    let passes = (1..=8)
        .find(|_| engine.merge_pass().quiet())
        .expect("quiet within 8 merge passes");
    assert!(passes >= 3);
    assert_eq!(engine.stats().pages_sharing, PAGES as u64 - 1);
    // It frees half of them: those are recycled (zero page), not kept merged.
    for (frame, _) in used.drain(..PAGES as usize / 2) {
        alloc.free(0, frame).unwrap();
    }
    engine.base_pass();
    assert_eq!(recycler.stats().recycled, PAGES as u64 / 2);
    for (_, page) in &used {
        assert!(page.verify(99), "a page still in use changed");
    }
    let (zero, in_use): (Vec<_>, Vec<_>) = pages
        .iter()
        .partition(|p| mem.is_zero_mapped(p.id()).unwrap());
    assert_eq!(zero.len(), PAGES as usize / 2);
    assert_eq!(in_use.len(), PAGES as usize / 2);
    // The other half stays merged, and the engine's counters agree with the memory.
    engine.merge_pass();
    assert_eq!(engine.stats().pages_sharing, mem.accounting().pages_sharing);
    assert_eq!(mem.accounting().frames, 1);
}
