//! The vm-memory adapter: a `GuestMemoryMmap` deduplicated on the Linux backend keeps its
//! dirty bitmap exact and its contents readable through vm-memory's `Bytes` API. Tests
//! skip, with the reason printed, where userfaultfd write-protect is unavailable.
#![cfg(feature = "vm-memory")]

use std::collections::BTreeSet;

use page_memory::linux::test_util::*;
use page_memory::vmm::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use page_memory::{DomainId, MergeOutcome, PageError, PageId, PageMemory, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// The backend's own operations mark exactly the pages they change, at the right guest
/// addresses, and nothing else.
#[test]
fn dirty_bits_are_set_exactly_on_changed_pages() {
    let Some(adapter) = adapter() else { return };
    let mem = adapter.memory().clone();
    const N: u64 = 64;
    let g = guest(N);
    for r in 0..2 {
        for i in 0..N {
            // Pages 16..32 repeat pages 0..16; the rest are distinct.
            let seed = 1 + r as u64 * 1000 + if (16..32).contains(&i) { i - 16 } else { i };
            g.write_slice(&content(seed), gpa(r, i)).unwrap();
        }
    }
    // SAFETY: the test's own guest memory; nothing else remaps or madvises it.
    let vm = unsafe { adapter.adopt(&g, DomainId(7)) }.unwrap();
    assert_eq!(vm.regions().len(), 2);
    assert_eq!(vm.guest_addr(page(&vm, gpa(1, 5))), Some(gpa(1, 5)));
    assert_eq!(mem.regions()[1].domain, DomainId(7));
    // The fill marked everything; a migration pass would now have copied and cleared it.
    assert_eq!(dirty(&g).len(), 2 * N as usize);
    clear_bitmaps(&g);
    assert!(dirty(&g).is_empty());

    let mut expect = BTreeSet::new();
    for r in 0..2 {
        let ids: Vec<PageId> = (0..48).map(|i| page(&vm, gpa(r, i))).collect();
        let tokens: Vec<_> = mem.protect(&ids).into_iter().map(Result::unwrap).collect();
        // Protecting changes nothing the guest sees: no bit.
        assert_eq!(dirty(&g), expect);
        // Canonicalize 0..16 and merge 16..32 with them, as batches (runs) ...
        let canon =
            mem.canonicalize_batch(&(0..16).map(|i| (ids[i], tokens[i])).collect::<Vec<_>>());
        let frames: Vec<_> = canon.into_iter().map(Result::unwrap).collect();
        let merges: Vec<_> = (16..32)
            .map(|i| (ids[i], tokens[i], &frames[i - 16]))
            .collect();
        assert!(mem
            .merge_batch(&merges)
            .iter()
            .all(|o| *o == Ok(MergeOutcome::Merged)));
        // ... a merge with different contents changes nothing, nor does a stale one ...
        assert_eq!(
            mem.merge(ids[40], tokens[40], &frames[0]),
            Ok(MergeOutcome::Differs)
        );
        g.write_obj(1u64, gpa(r, 41)).unwrap();
        assert_eq!(
            mem.merge(ids[41], tokens[41], &frames[0]),
            Ok(MergeOutcome::Changed)
        );
        // ... and recycle 32..40.
        assert!(mem.recycle(&ids[32..40]).iter().all(Result::is_ok));
        for i in 0..40 {
            expect.insert(gpa(r, i).0);
        }
        // The guest's own write went through vm-memory, which marked it.
        expect.insert(gpa(r, 41).0);
        assert_eq!(mem.backing(ids[20]).unwrap(), mem.backing(ids[4]).unwrap());
    }
    assert_eq!(dirty(&g), expect);

    // Unmerging a merged page marks it again (after a migration pass cleared the bits).
    clear_bitmaps(&g);
    let p = page(&vm, gpa(1, 20));
    mem.unmerge(p).unwrap();
    assert_eq!(dirty(&g), BTreeSet::from([gpa(1, 20).0]));

    // Contents are intact through vm-memory.
    for r in 0..2 {
        for i in 0..N {
            let seed = 1 + r as u64 * 1000 + if (16..32).contains(&i) { i - 16 } else { i };
            let want = match i {
                32..40 => content(0),
                _ => content(seed),
            };
            let got = read(&g, gpa(r, i));
            if i == 41 {
                assert_eq!(&got[..8], &1u64.to_ne_bytes());
                assert_eq!(&got[8..], &want[8..]);
            } else {
                assert_eq!(got, want, "page {i} of region {r}");
            }
        }
    }
    adapter.release(vm).unwrap();
    assert_eq!(adapter.adopted_regions(), 0);
    // Released: the backend no longer knows the pages, the guest still reads them.
    assert_eq!(read(&g, gpa(0, 20)), content(5));
}

/// Memory vm-memory maps from a file cannot be adopted; nothing is adopted then.
#[test]
fn file_backed_guest_memory_is_refused() {
    let Some(adapter) = adapter() else { return };
    use page_memory::vmm::vm_memory::FileOffset;
    let file = std::fs::File::from(
        rustix::fs::memfd_create("vmm-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap(),
    );
    file.set_len(16 * PAGE).unwrap();
    let g: Guest = GuestMemoryMmap::from_ranges_with_files(&[
        (GuestAddress(0), 16 * PAGE_SIZE, None),
        (
            GuestAddress(1 << 20),
            16 * PAGE_SIZE,
            Some(FileOffset::new(file, 0)),
        ),
    ])
    .unwrap();
    // SAFETY: the test's own guest memory; nothing else remaps or madvises it.
    let r = unsafe { adapter.adopt(&g, DomainId(0)) };
    assert!(matches!(r, Err(PageError::Unsupported(_))), "{r:?}");
    assert_eq!(adapter.adopted_regions(), 0);
    assert!(adapter.memory().regions().is_empty());
}

/// A balloon through the adapter: a discarded guest range reads zeros through vm-memory
/// (merged pages included), its pages are marked dirty; a range declared pinned is never
/// protected until it is undeclared.
#[test]
fn discards_and_pins_by_guest_address() {
    let Some(adapter) = adapter() else { return };
    let g = guest(8);
    for i in 0..8 {
        g.write_slice(&content(1 + i % 2), gpa(0, i)).unwrap();
    }
    // SAFETY: the test's own guest memory, touched only through vm-memory and the backend.
    let vm = unsafe { adapter.adopt(&g, DomainId(0)) }.unwrap();
    let mem = adapter.memory().clone();
    let pages: Vec<PageId> = (0..4).map(|i| page(&vm, gpa(0, i))).collect();
    let t: Vec<_> = mem
        .protect(&pages)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let canon = mem.canonicalize(pages[0], t[0]).unwrap();
    assert_eq!(
        mem.merge(pages[2], t[2], &canon).unwrap(),
        MergeOutcome::Merged
    );
    clear_bitmaps(&g);
    adapter.discard(&vm, gpa(0, 1), 3 * PAGE).unwrap();
    for i in 1..4 {
        assert_eq!(read(&g, gpa(0, i)), content(0), "page {i}");
    }
    assert_eq!(read(&g, gpa(0, 0)), content(1));
    assert_eq!(read(&g, gpa(0, 4)), content(1));
    let marked = dirty(&g);
    for i in 1..4 {
        assert!(marked.contains(&gpa(0, i).0), "page {i} not marked dirty");
    }
    assert!(matches!(
        adapter.discard(&vm, GuestAddress(STARTS[0] + 100), PAGE),
        Err(PageError::Unsupported(_))
    ));
    adapter.declare_pinned(&vm, gpa(1, 2), 2 * PAGE).unwrap();
    let p = page(&vm, gpa(1, 3));
    assert_eq!(mem.protect(&[p])[0], Err(PageError::Pinned(p)));
    adapter.undeclare_pinned(&vm, gpa(1, 2), 2 * PAGE).unwrap();
    assert!(mem.protect(&[p])[0].is_ok());
    drop(canon);
    adapter.release(vm).unwrap();
}
