//! The recycler over the simulated memory: guests churning pages never see an allocated
//! page change, freed pages come back to the host within two reclaim passes, hostile
//! marks are counted and skipped. (The recycler inside PageONE's passes is tested by the
//! facade crate, `tests/ppr_in_pageone.rs`: ppr-host does not depend on pageone.)

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, PageMemory, RegionInfo};
use pip::{Invalid, PoolStorage};
use ppr_guest::{GuestPage, Hooks, PageAllocator};
use ppr_host::{Recycler, RecyclerThread, SimGuestPage};

const SECRET: u64 = 0x7a3f_11c0_de5e_c2e7;

/// Two shards (one per guest vCPU) of 1024 slots each: four slots per page, so an offer
/// always finds a free slot within its probe window.
type Pool = PoolStorage<2, 2048>;

fn setup(pages: u32) -> (Arc<SimMemory>, RegionInfo, Arc<Pool>, Recycler) {
    let mem = Arc::new(SimMemory::new());
    mem.add_region(pages, DomainId(0));
    let info = mem.regions()[0];
    let pool = Arc::new(Pool::new());
    pool.init().unwrap();
    let mut recycler = Recycler::new();
    recycler.register(pool.clone(), 3, SECRET, info, 1).unwrap();
    (mem, info, pool, recycler)
}

#[test]
fn guests_churning_pages_never_lose_data_and_freed_pages_come_back_in_two_passes() {
    const PAGES: u32 = 512;
    const HALF: u32 = PAGES / 2;
    // How long the guests churn, in counts (never in wall time): every vCPU runs at least
    // `ROUNDS` rounds, and the host completes at least `PASSES` passes while they do.
    const ROUNDS: u64 = 40;
    const PASSES: u64 = 4;
    let (mem, info, pool, recycler) = setup(PAGES);
    let recycler = Arc::new(recycler);
    let host =
        RecyclerThread::spawn(recycler.clone(), mem.clone(), Duration::from_millis(5)).unwrap();
    let pages = SimGuestPage::region(&mem, info.id, PAGES);
    let view = pool.view().unwrap();
    let barrier = Barrier::new(2);
    let guests = thread::scope(|s| {
        let vcpus: Vec<_> = (0..2usize)
            .map(|cpu| {
                // Each vCPU owns half the pages (frames 1 + cpu * HALF ..), and offers them
                // through its own shard.
                let half = &pages[cpu * HALF as usize..(cpu + 1) * HALF as usize];
                let (view, barrier, recycler, mem) = (view, &barrier, &recycler, &mem);
                s.spawn(move || {
                    let first = 1 + cpu as u64 * HALF as u64;
                    let hooks = Hooks::attach(view).unwrap();
                    let mut alloc =
                        PageAllocator::with_free(hooks, half, first, cpu, 0..half.len());
                    // Frames whose last free left them unmarked (no free slot in the probe
                    // window): not the host's to recycle. A boot-time offer that failed
                    // left its page without the secret and no longer the zero page (the
                    // guest cleared word 0); the host never zeroes an unmarked page, so
                    // reading the mark first and the mapping second cannot misjudge.
                    let mut unoffered: BTreeSet<u64> = half
                        .iter()
                        .zip(first..)
                        .filter(|(page, _)| {
                            u64::from_le(mem.read_word(page.id(), 0).unwrap()) != SECRET
                                && !mem.is_zero_mapped(page.id()).unwrap()
                        })
                        .map(|(_, frame)| frame)
                        .collect();
                    assert!(unoffered.len() as u64 <= alloc.stats().not_offered);
                    barrier.wait();
                    let passes_at_start = recycler.stats().passes;
                    let mut round = 0u64;
                    let mut held = Vec::new();
                    while round < ROUNDS || recycler.stats().passes < passes_at_start + PASSES {
                        round += 1;
                        // Take a handful of pages, write them, verify them, give them back.
                        for _ in 0..24 {
                            if let Some((frame, page)) = alloc.alloc(cpu) {
                                let seed = round << 20 | frame;
                                page.fill(seed);
                                held.push((frame, page, seed));
                            }
                        }
                        thread::yield_now();
                        for (frame, page, seed) in held.drain(..) {
                            assert!(
                                page.verify(seed),
                                "allocated frame {frame} changed under the guest"
                            );
                            let before = alloc.stats().not_offered;
                            alloc.free(cpu, frame).unwrap();
                            // A free whose offer found no slot leaves the page unmarked:
                            // counted, and not the host's to recycle.
                            if alloc.stats().not_offered > before {
                                unoffered.insert(frame);
                            } else {
                                unoffered.remove(&frame);
                            }
                        }
                    }
                    assert_eq!(alloc.free_pages() + alloc.deferred_pages(), HALF as usize);
                    (alloc.stats(), round, unoffered)
                })
            })
            .collect();
        vcpus
            .into_iter()
            .map(|v| v.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut unoffered = BTreeSet::new();
    for (g, rounds, frames) in &guests {
        assert!(*rounds >= ROUNDS, "{rounds} rounds: {g:?}");
        // Every free is either offered or counted as not offered.
        assert_eq!(g.offered + g.not_offered, g.frees, "{g:?}");
        unoffered.extend(frames.iter().map(|&f| (f - 1) as u32));
    }
    // Every page is free now. A page offered before a pass starts is recycled by the end
    // of that pass: once two more passes have completed (the first may have been under
    // way during the last frees), every page whose last free was offered is back.
    let passes = recycler.stats().passes;
    while recycler.stats().passes < passes + 2 {
        thread::yield_now();
    }
    host.stop();
    let not_back: Vec<u32> = (0..PAGES)
        .filter(|&i| !mem.is_zero_mapped(PageId::new(info.id, i)).unwrap())
        .collect();
    let unoffered: Vec<u32> = unoffered.into_iter().collect();
    assert_eq!(
        not_back, unoffered,
        "not recycled in two passes (left) vs never offered"
    );
    assert_eq!(mem.accounting().frames, unoffered.len() as u64);
    let stats = recycler.stats();
    assert!(
        stats.recycled >= PAGES as u64 - unoffered.len() as u64,
        "{stats:?}"
    );
    // The frame is the host's own fact, and an honest guest never touches its pool header.
    // Other rejections can happen to an honest guest: the host reads a mark's two words
    // one at a time, so it may see the old indicator and then the new contents of a page
    // the guest has just taken back and written (a torn read: `Pool` or `Slot`), or an
    // offer withdrawn as it looks (`NotOffered`). Each is rejected, and no page in use was
    // ever recycled: every guest verified its pages above.
    assert_eq!(stats.invalid[Invalid::Frame.index()], 0, "{stats:?}");
    assert_eq!(stats.invalid_pool, 0, "{stats:?}");
    assert_eq!(
        (stats.recycle_failures, stats.tampered),
        (0, 0),
        "{stats:?}"
    );
}

#[test]
fn hostile_marks_are_counted_and_never_recycle_a_page_that_was_not_offered() {
    let (mem, info, pool, recycler) = setup(8);
    let view = pool.view().unwrap();
    let pages = SimGuestPage::region(&mem, info.id, 8);
    // Page 0 (frame 1) is really offered, in slot 5.
    view.slots()[5].store(1, Ordering::Release);
    let mark = |page: u32, location: u64| {
        let p = PageId::new(info.id, page);
        mem.write(p, 64, b"guest data").unwrap();
        mem.write_word(p, 1, location.to_le()).unwrap();
        mem.write_word(p, 0, SECRET.to_le()).unwrap();
    };
    mark(0, pip::location(3, 5)); // valid
    mark(1, pip::location(3, 5)); // slot 5 holds frame 1, not frame 2
    mark(2, pip::location(4, 6)); // another pool's id
    mark(3, pip::location(3, 1_000_000)); // slot out of range
    mark(4, pip::location(3, 7)); // empty slot
    recycler.scan_pass(&*mem);
    let stats = recycler.stats();
    assert_eq!(stats.recycled, 1);
    assert!(mem.is_zero_mapped(pages[0].id()).unwrap());
    for page in &pages[1..5] {
        let mut buf = [0u8; 10];
        mem.read(page.id(), 64, &mut buf).unwrap();
        assert_eq!(&buf, b"guest data", "{:?} was recycled", page.id());
    }
    assert_eq!(stats.invalid[Invalid::NotOffered.index()], 2);
    assert_eq!(stats.invalid[Invalid::Pool.index()], 1);
    assert_eq!(stats.invalid[Invalid::Slot.index()], 1);
    assert_eq!(stats.marks_seen, 5);
    // The slot was released to empty, and the page is never recycled twice.
    assert_eq!(view.slots()[5].load(Ordering::Acquire), 0);
    recycler.scan_pass(&*mem);
    assert_eq!(recycler.stats().recycled, 1);
}

#[test]
fn a_broken_pool_header_is_counted_not_trusted() {
    let (mem, info, pool, recycler) = setup(4);
    let p = PageId::new(info.id, 0);
    mem.write_word(p, 1, pip::location(3, 0).to_le()).unwrap();
    mem.write_word(p, 0, SECRET.to_le()).unwrap();
    // A hostile guest scribbles over its pool header (all of it).
    // SAFETY: the storage is a plain array of atomics; we only write whole words
    // atomically, as the layout requires.
    let header = pool.as_ptr() as *const std::sync::atomic::AtomicU64;
    for i in 0..8 {
        // SAFETY: the header is 64 bytes of 8-byte aligned atomics at the storage's start.
        unsafe { (*header.add(i)).store(u64::MAX, Ordering::Release) };
    }
    recycler.scan_pass(&*mem);
    let stats = recycler.stats();
    assert_eq!(stats.recycled, 0);
    assert_eq!(stats.invalid_pool, 1);
    assert!(!mem.is_zero_mapped(p).unwrap());
}

#[test]
fn an_unregistered_pool_is_never_touched_again() {
    let (mem, info, pool, mut recycler) = setup(4);
    assert_eq!(recycler.pooled_regions(), [info.id]);
    let view = pool.view().unwrap();
    let pages = SimGuestPage::region(&mem, info.id, 4);
    let mut alloc = PageAllocator::new(Hooks::attach(view).unwrap(), &pages, 1);
    let (frame, page) = alloc.alloc(0).unwrap();
    page.fill(9);
    alloc.free(0, frame).unwrap();
    // Its region went away: the pool is dropped, nothing is read or recycled any more.
    assert!(recycler.unregister(info.id));
    assert!(!recycler.unregister(info.id));
    assert!(recycler.pooled_regions().is_empty());
    assert_eq!(Arc::strong_count(&pool), 1);
    assert!(!recycler.examine(&*mem, page.id()));
    assert_eq!(recycler.scan_pass(&*mem), 0);
    assert_eq!(recycler.stats().pages_scanned, 0);
    assert!(!mem.is_zero_mapped(page.id()).unwrap());
    // The region can have a pool again.
    let again = Arc::new(Pool::new());
    again.init().unwrap();
    recycler.register(again, 4, SECRET ^ 1, info, 1).unwrap();
    assert_eq!(recycler.pooled_regions(), [info.id]);
}
