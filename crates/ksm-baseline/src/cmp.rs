//! `memcmp` of pages, counting what it costs.
//!
//! KSM orders both trees by `memcmp_pages()`: a byte-wise comparison that stops at the
//! first difference, so its cost is the length of the common prefix. This module does
//! the same comparison and counts the comparisons and the bytes examined (prefix + the
//! differing byte, or the whole page when equal): the cost KSM pays at every tree level
//! for pages that differ only near their end.
//!
//! Two kinds of operand: a byte slice (the scanned page's copy, a canonical frame's
//! bytes, which never change), and a *live* page that must be read through
//! [`PageMemory::read_words`] because the guest may be writing it (an unstable-tree page,
//! as KSM reads `tree_page` without protection). The live page is read in growing
//! stages (64 bytes, 512 bytes, the whole page) so that, like `memcmp` on a mapped page,
//! a difference near the start costs a short read and only long common prefixes cost a
//! whole page.

use std::cmp::Ordering;

use page_memory::{PageId, PageMemory, PAGE_SIZE, PAGE_WORDS};

/// Comparison cost counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CmpCost {
    /// Comparisons made.
    pub(crate) comparisons: u64,
    /// Bytes examined by them.
    pub(crate) bytes: u64,
}

/// Bytes compared per step when looking for the first difference.
const CHUNK: usize = 32;

/// The first index where `a` and `b` differ (over their common length), if any.
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut off = 0;
    for (x, y) in a.chunks_exact(CHUNK).zip(b.chunks_exact(CHUNK)) {
        // Fixed-size arrays compare as a few vector loads, like an inlined memcmp.
        let (Ok(xa), Ok(ya)) = (<&[u8; CHUNK]>::try_from(x), <&[u8; CHUNK]>::try_from(y)) else {
            break;
        };
        if xa != ya {
            return x.iter().zip(y).position(|(p, q)| p != q).map(|i| off + i);
        }
        off += CHUNK;
    }
    a[off..]
        .iter()
        .zip(&b[off..])
        .position(|(p, q)| p != q)
        .map(|i| off + i)
}

/// `memcmp(a, b)` for two equally long byte strings, counted in `cost`.
pub(crate) fn memcmp(a: &[u8], b: &[u8], cost: &mut CmpCost) -> Ordering {
    cost.comparisons += 1;
    match first_difference(a, b) {
        Some(i) => {
            cost.bytes += i as u64 + 1;
            a[i].cmp(&b[i])
        }
        None => {
            cost.bytes += a.len().min(b.len()) as u64;
            Ordering::Equal
        }
    }
}

/// Words read from a live page at each stage of a comparison.
const STAGES: [usize; 3] = [8, 64, PAGE_WORDS];

/// Scratch space to read a live page in.
pub(crate) struct LiveScratch {
    words: Box<[u64; PAGE_WORDS]>,
    bytes: Box<[u8; PAGE_SIZE]>,
}

impl LiveScratch {
    pub(crate) fn new() -> Self {
        LiveScratch {
            words: Box::new([0; PAGE_WORDS]),
            bytes: Box::new([0; PAGE_SIZE]),
        }
    }
}

/// `memcmp(buf, page)` where `page` is read live from `mem` (it may be changing), counted
/// in `cost`. `None` if the page cannot be read (it went away).
pub(crate) fn memcmp_live<M: PageMemory + ?Sized>(
    mem: &M,
    buf: &[u8; PAGE_SIZE],
    page: PageId,
    scratch: &mut LiveScratch,
    cost: &mut CmpCost,
) -> Option<Ordering> {
    let mut done = 0;
    for stage in STAGES {
        mem.read_words(page, &mut scratch.words[..stage]).ok()?;
        for (w, out) in scratch.words[done..stage]
            .iter()
            .zip(scratch.bytes[done * 8..stage * 8].chunks_exact_mut(8))
        {
            out.copy_from_slice(&w.to_ne_bytes());
        }
        let (from, to) = (done * 8, stage * 8);
        if let Some(i) = first_difference(&buf[from..to], &scratch.bytes[from..to]) {
            cost.comparisons += 1;
            cost.bytes += (from + i) as u64 + 1;
            return Some(buf[from + i].cmp(&scratch.bytes[from + i]));
        }
        done = stage;
    }
    cost.comparisons += 1;
    cost.bytes += PAGE_SIZE as u64;
    Some(Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use page_memory::sim::SimMemory;
    use page_memory::DomainId;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn memcmp_orders_like_slices(a in proptest::collection::vec(0u8..3, 0..200), b in proptest::collection::vec(0u8..3, 0..200)) {
            let n = a.len().min(b.len());
            let mut cost = CmpCost::default();
            let ord = memcmp(&a[..n], &b[..n], &mut cost);
            prop_assert_eq!(ord, a[..n].cmp(&b[..n]));
            let prefix = a[..n].iter().zip(&b[..n]).take_while(|(x, y)| x == y).count();
            prop_assert_eq!(cost.bytes as usize, if prefix == n { n } else { prefix + 1 });
        }

        #[test]
        fn live_compare_matches_memcmp(at in 0usize..PAGE_SIZE, x in any::<u8>(), y in any::<u8>()) {
            let mem = SimMemory::new();
            let r = mem.add_region(1, DomainId(0));
            let page = PageId::new(r, 0);
            let mut buf = Box::new([7u8; PAGE_SIZE]);
            buf[at] = x;
            let mut live = [7u8; PAGE_SIZE];
            live[at] = y;
            mem.write(page, 0, &live).unwrap();
            let mut cost = CmpCost::default();
            let ord = memcmp_live(&mem, &buf, page, &mut LiveScratch::new(), &mut cost);
            prop_assert_eq!(ord, Some(buf[..].cmp(&live[..])));
            prop_assert_eq!(cost.bytes as usize, if x == y { PAGE_SIZE } else { at + 1 });
        }
    }
}
