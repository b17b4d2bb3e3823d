//! PageONE over the vm-memory adapter (feature `vm-memory`): a `GuestMemoryMmap`
//! deduplicated by the engine keeps its dirty bitmap exact and its contents readable
//! through vm-memory's `Bytes` API. Tests skip, with the reason printed, where userfaultfd
//! write-protect is unavailable.
#![cfg(feature = "vm-memory")]

use page_memory::linux::test_util::*;
use page_memory::linux::Backing;
use page_memory::vmm::vm_memory::{Address, Bytes};
use page_memory::{DomainId, PAGE_SIZE};
use pageone::{Config, PageOne};

const PAGE: u64 = PAGE_SIZE as u64;

/// PageONE deduplicates a `GuestMemoryMmap`: memory is freed, every merged page is marked
/// dirty, and vm-memory's `Bytes` API reads (and writes) correct contents throughout.
#[test]
fn pageone_deduplicates_guest_memory_readable_through_bytes() {
    let Some(adapter) = adapter() else { return };
    const N: u64 = 1024;
    let g = guest(N);
    // Region 1 is a copy of region 0 (two VMs from one image would be two guests; one
    // guest with repeated contents is the same to the engine); one page in 8 is zeros.
    let seed = |i: u64| if i % 8 == 7 { 0 } else { 1 + i };
    for r in 0..2 {
        for i in 0..N {
            g.write_slice(&content(seed(i)), gpa(r, i)).unwrap();
        }
    }
    // SAFETY: the test's own guest memory; nothing else remaps or madvises it.
    let vm = unsafe { adapter.adopt(&g, DomainId(0)) }.unwrap();
    let mem = adapter.memory().clone();
    clear_bitmaps(&g);
    let before = mem.usage().unwrap();
    let engine =
        PageOne::new(mem.clone(), Config::default().work_threads(2)).expect("the engine's threads");
    // Merged by the third pass, but with two threads a content both claimed at once may
    // wait a pass: run passes until one changes nothing and leaves nothing pending.
    let passes = (1..=8)
        .find(|_| engine.merge_pass().quiet())
        .expect("quiet within 8 merge passes");
    assert!(passes >= 3);
    let s = engine.stats();
    let nonzero = N * 7 / 8;
    assert_eq!(s.pages_shared, nonzero);
    assert_eq!(s.pages_sharing, nonzero);
    assert_eq!(s.zero_pages, 2 * N / 8);
    let after = mem.usage().unwrap();
    eprintln!(
        "guest memory: {} KiB -> {} KiB ({} mappings)",
        before.total_bytes() / 1024,
        after.total_bytes() / 1024,
        after.region_mappings
    );
    // Half of the non-zero pages freed; the zero pages held memory too (they were written).
    assert_eq!(
        before.total_bytes() - after.total_bytes(),
        (nonzero + 2 * N / 8) * PAGE
    );
    // Every page the engine changed is dirty: here every page (canonical, merged, zero).
    // (Two threads may both canonicalize a content before one merges with the other's.)
    let b = mem.stats();
    assert!(b.canonicalized + b.merges + b.zero_merges >= 2 * N);
    assert_eq!(b.merges + b.zero_merges, s.pages_sharing + s.zero_pages);
    assert_eq!(dirty(&g).len(), 2 * N as usize);
    for r in 0..2 {
        for i in 0..N {
            assert_eq!(read(&g, gpa(r, i)), content(seed(i)), "page {i} of {r}");
        }
    }
    // A write through vm-memory to a merged page gets a private copy; its twin keeps the
    // old contents, and the next pass notices.
    let addr = gpa(1, 3).unchecked_add(100);
    g.write_obj(0xDEAD_BEEF_u32, addr).unwrap();
    assert_eq!(g.read_obj::<u32>(addr).unwrap(), 0xDEAD_BEEF);
    assert_eq!(read(&g, gpa(0, 3)), content(seed(3)));
    assert_eq!(
        mem.backing(page(&vm, gpa(1, 3))).unwrap(),
        Backing::PrivateCopy
    );
    engine.merge_pass();
    assert_eq!(engine.stats().cow_breaks, 1);
    engine.unmerge_all();
    drop(engine);
    // Give the guest back: plain memory with the same contents.
    adapter.release(vm).unwrap();
    let mut want = content(seed(3));
    want[100..104].copy_from_slice(&0xDEAD_BEEF_u32.to_ne_bytes());
    assert_eq!(read(&g, gpa(1, 3)), want);
    assert_eq!(read(&g, gpa(1, 4)), content(seed(4)));
}
