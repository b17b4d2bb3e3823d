//! Tree metadata per stored key, measured with a counting allocator: the budget is
//! 32 bytes or less (the 2017 SD tree's), never more than 64 (a KSM `rmap_item`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use sdtree::{epoch, SdTree};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts requested bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn metadata_per_key_is_at_most_32_bytes() {
    const N: usize = 100_000;
    let keys: Vec<[u8; 16]> = (0..N as u128)
        .map(|i| (i * 0x9E37_79B9_7F4A_7C15).to_be_bytes())
        .collect();
    // Pin once up front so the epoch machinery's own allocations are not counted.
    drop(epoch::pin());
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let tree = SdTree::new(&keys);
    for h in 0..N {
        let _ = tree.insert_or_get(h);
    }
    let per_key = (LIVE_BYTES.load(Ordering::Relaxed) - before) as f64 / N as f64;
    assert_eq!(tree.len(), N);
    assert!(per_key <= 32.0, "{per_key} bytes of metadata per key");
    assert!(
        per_key >= sdtree::NODE_BYTES as f64 * 0.99,
        "{per_key}: counting is broken"
    );
    println!(
        "{per_key:.2} bytes of tree metadata per key (node: {} bytes)",
        sdtree::NODE_BYTES
    );
}
