//! The simulated memory keeps the page-memory contract.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use page_memory::sim::SimMemory;
use page_memory::{
    is_zero_page, DomainId, MergeOutcome, PageError, PageId, PageMemory, RegionId, PAGE_SIZE,
};

fn page_of(mem: &SimMemory, p: PageId) -> Vec<u8> {
    let mut buf = [0u8; PAGE_SIZE];
    mem.read_page(p, &mut buf).unwrap();
    buf.to_vec()
}

#[test]
fn merge_shares_and_a_write_breaks_the_sharing() {
    let mem = SimMemory::new();
    let r = mem.add_region(3, DomainId(1));
    let [a, b, c] = [0, 1, 2].map(|i| PageId::new(r, i));
    for p in [a, b, c] {
        mem.write(p, 100, b"hello").unwrap();
    }
    assert_eq!(mem.accounting().frames, 3);
    let t = mem.protect(&[a, b, c]);
    let canon = mem.canonicalize(a, t[0].clone().unwrap()).unwrap();
    assert_eq!(&canon.as_ref()[100..105], b"hello");
    for (p, tok) in [(b, &t[1]), (c, &t[2])] {
        assert_eq!(
            mem.merge(p, tok.clone().unwrap(), &canon).unwrap(),
            MergeOutcome::Merged
        );
    }
    let acc = mem.accounting();
    assert_eq!((acc.frames, acc.pages_shared, acc.pages_sharing), (1, 1, 2));
    assert!(mem.shares_frame(a, c).unwrap());
    // A write to a merged page copies it; the canonical frame and the others are intact.
    mem.write(b, 100, b"HELLO").unwrap();
    assert_eq!(&page_of(&mem, b)[100..105], b"HELLO");
    assert_eq!(&page_of(&mem, a)[100..105], b"hello");
    assert_eq!(&canon.as_ref()[100..105], b"hello");
    let acc = mem.accounting();
    // Four copies: three first writes to the zero page, one write to the merged page.
    assert_eq!(
        (
            acc.frames,
            acc.pages_shared,
            acc.pages_sharing,
            acc.cow_faults
        ),
        (2, 1, 1, 4)
    );
    assert!(mem.written_since(b, t[1].clone().unwrap()).unwrap());
    assert!(!mem.written_since(c, t[2].clone().unwrap()).unwrap());
}

#[test]
fn merge_refuses_changed_or_different_pages() {
    let mem = SimMemory::new();
    let r = mem.add_region(3, DomainId(0));
    let [a, b, c] = [0, 1, 2].map(|i| PageId::new(r, i));
    mem.write(a, 0, b"x").unwrap();
    mem.write(b, 0, b"x").unwrap();
    mem.write(c, 0, b"y").unwrap();
    let t = mem.protect(&[a, b, c]);
    let canon = mem.canonicalize(a, t[0].clone().unwrap()).unwrap();
    assert_eq!(
        mem.merge(c, t[2].clone().unwrap(), &canon).unwrap(),
        MergeOutcome::Differs
    );
    mem.write(b, 1, b"z").unwrap();
    assert_eq!(
        mem.merge(b, t[1].clone().unwrap(), &canon).unwrap(),
        MergeOutcome::Changed
    );
    assert_eq!(mem.accounting().pages_sharing, 0);
    // A stale token cannot canonicalize either.
    assert_eq!(
        mem.canonicalize(b, t[1].clone().unwrap()).unwrap_err(),
        PageError::Stale(b)
    );
}

#[test]
fn recycle_zeroes_and_unmerge_restores_private_contents() {
    let mem = SimMemory::new();
    let r = mem.add_region(2, DomainId(0));
    let [a, b] = [0, 1].map(|i| PageId::new(r, i));
    mem.write(a, 0, &[7; PAGE_SIZE]).unwrap();
    mem.write(b, 0, &[7; PAGE_SIZE]).unwrap();
    let hooked = Arc::new(AtomicUsize::new(0));
    let h = hooked.clone();
    mem.set_dirty_hook(Some(Arc::new(move |_| {
        h.fetch_add(1, Ordering::Relaxed);
    })));
    let t = mem.protect(&[a, b]);
    let canon = mem.canonicalize(a, t[0].clone().unwrap()).unwrap();
    assert_eq!(
        mem.merge(b, t[1].clone().unwrap(), &canon).unwrap(),
        MergeOutcome::Merged
    );
    mem.unmerge(b).unwrap();
    assert!(!mem.shares_frame(a, b).unwrap());
    assert_eq!(page_of(&mem, b), vec![7; PAGE_SIZE]);
    mem.recycle(&[a])[0].clone().unwrap();
    assert!(is_zero_page(&page_of(&mem, a)));
    assert!(mem.is_zero_mapped(a).unwrap());
    assert_eq!(hooked.load(Ordering::Relaxed), 3, "merge, unmerge, recycle");
    drop(canon);
    assert_eq!(mem.accounting().frames, 1);
}

#[test]
fn bad_ids_are_typed_errors() {
    let mem = SimMemory::new();
    let r = mem.add_region(1, DomainId(0));
    let beyond = PageId::new(r, 1);
    let nowhere = PageId::new(RegionId(9), 0);
    assert_eq!(
        mem.write(beyond, 0, b"x"),
        Err(PageError::NoSuchPage(beyond))
    );
    assert_eq!(
        mem.read_word(nowhere, 0),
        Err(PageError::NoSuchRegion(RegionId(9)))
    );
    assert!(mem.write(PageId::new(r, 0), PAGE_SIZE - 1, b"xy").is_err());
    assert!(mem.protect(&[beyond])[0].is_err());
    assert!(mem.recycle(&[nowhere])[0].is_err());
}

#[test]
fn racing_writers_never_lose_a_write_to_merges() {
    // Writers keep writing their own counter into their own pages while the main thread
    // protects, canonicalizes and merges those pages with each other.
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(64, DomainId(0));
    let pages: Vec<PageId> = (0..64).map(|i| PageId::new(r, i)).collect();
    thread::scope(|s| {
        for w in 0..2u32 {
            let (mem, pages) = (&mem, &pages);
            s.spawn(move || {
                for round in 1..=2000u64 {
                    for (i, &p) in pages.iter().enumerate() {
                        if i % 2 == w as usize && round % (i as u64 + 1) == 0 {
                            mem.write_word(p, 3, round).unwrap();
                            assert_eq!(mem.read_word(p, 3).unwrap(), round, "lost write");
                        }
                    }
                }
            });
        }
        for _ in 0..300 {
            let t = mem.protect(&pages);
            let Ok(canon) = mem.canonicalize(pages[0], t[0].clone().unwrap()) else {
                continue;
            };
            for (p, tok) in pages.iter().zip(&t).skip(1) {
                let _ = mem.merge(*p, tok.clone().unwrap(), &canon);
            }
        }
    });
}

proptest::proptest! {
    /// Reads and writes at any offset and length agree with a plain byte array.
    #[test]
    fn byte_reads_and_writes_match_a_shadow(
        ops in proptest::collection::vec((0usize..PAGE_SIZE, 0usize..64, proptest::num::u8::ANY), 1..40)
    ) {
        let mem = SimMemory::new();
        let p = PageId::new(mem.add_region(1, DomainId(0)), 0);
        let mut shadow = vec![0u8; PAGE_SIZE];
        for (off, len, v) in ops {
            let len = len.min(PAGE_SIZE - off);
            let data: Vec<u8> = (0..len).map(|i| v.wrapping_add(i as u8)).collect();
            mem.write(p, off, &data).unwrap();
            shadow[off..off + len].copy_from_slice(&data);
            let mut back = vec![0u8; len];
            mem.read(p, off, &mut back).unwrap();
            proptest::prop_assert_eq!(&back, &data);
        }
        proptest::prop_assert_eq!(page_of(&mem, p), shadow);
    }
}
