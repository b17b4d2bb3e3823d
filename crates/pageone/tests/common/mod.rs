//! Page contents and memory filling shared by the engine's tests.
#![allow(dead_code)]

use std::collections::HashMap;

use page_memory::sim::SimMemory;
use page_memory::{PageId, RegionId, PAGE_SIZE};

/// A page whose contents are determined by `seed` (0 = all zeros): the seed at byte
/// `at` and `seed * 31` in the last 8 bytes, zeros elsewhere (a long shared prefix, so
/// the tree's work is not trivial).
pub fn content_at(at: usize, seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if seed != 0 {
        p[at..at + 8].copy_from_slice(&seed.to_le_bytes());
        p[PAGE_SIZE - 8..].copy_from_slice(&(seed * 31).to_le_bytes());
    }
    p
}

/// Writes page `i` of `r` (`i < pages`) with `page_of(i)`; returns what each page holds.
pub fn fill_with(
    mem: &SimMemory,
    r: RegionId,
    pages: u32,
    page_of: impl Fn(u32) -> Vec<u8>,
) -> HashMap<PageId, Vec<u8>> {
    (0..pages)
        .map(|i| {
            let p = PageId::new(r, i);
            let c = page_of(i);
            mem.write(p, 0, &c).unwrap();
            (p, c)
        })
        .collect()
}
