//! PageONE over the vm-memory adapter (feature `vm-memory`): a `GuestMemoryMmap`
//! deduplicated by the engine keeps its dirty bitmap exact and its contents readable
//! through vm-memory's `Bytes` API. Tests skip, with the reason printed, where userfaultfd
//! write-protect is unavailable.
#![cfg(feature = "vm-memory")]

use std::collections::BTreeSet;
use std::sync::Arc;

use page_memory::linux::{Backing, LinuxConfig, LinuxMemory};
use page_memory::vmm::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use page_memory::vmm::vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use page_memory::vmm::{AdoptedGuest, VmMemoryAdapter};
use page_memory::{DomainId, PageId, PAGE_SIZE};
use pageone::{Config, PageOne};

type Guest = GuestMemoryMmap<AtomicBitmap>;

const PAGE: u64 = PAGE_SIZE as u64;
/// Two guest regions, with a hole between them.
const STARTS: [u64; 2] = [0, 1 << 32];

/// The adapter these tests use: they write guest memory from user space only, so a
/// process that may not have kernel faults (CI's unprivileged run) falls back to a
/// user-mode-only userfaultfd.
fn adapter() -> Option<VmMemoryAdapter> {
    match LinuxMemory::with_config(LinuxConfig::default().with_require_kernel_faults(false)) {
        Ok(m) => Some(VmMemoryAdapter::new(Arc::new(m))),
        Err(e) => {
            eprintln!("SKIPPED: no userfaultfd write-protect here: {e}");
            None
        }
    }
}

fn guest(pages: u64) -> Guest {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(STARTS[0]), (pages * PAGE) as usize),
        (GuestAddress(STARTS[1]), (pages * PAGE) as usize),
    ])
    .expect("GuestMemoryMmap")
}

/// The contents `seed` (0: a zero page).
fn content(seed: u64) -> Vec<u8> {
    if seed == 0 {
        return vec![0; PAGE_SIZE];
    }
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..PAGE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Guest address of page `i` of region `r`.
fn gpa(r: usize, i: u64) -> GuestAddress {
    GuestAddress(STARTS[r] + i * PAGE)
}

fn clear_bitmaps(g: &Guest) {
    for r in g.iter() {
        r.get_mmap().bitmap().reset();
    }
}

/// Guest addresses (page-aligned) whose dirty bit is set.
fn dirty(g: &Guest) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for r in g.iter() {
        let b = r.bitmap();
        for off in (0..r.len()).step_by(PAGE_SIZE) {
            if b.dirty_at(off as usize) {
                out.insert(r.start_addr().0 + off);
            }
        }
    }
    out
}

fn read(g: &Guest, addr: GuestAddress) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    g.read_slice(&mut buf, addr).expect("read_slice");
    buf
}

fn page(vm: &AdoptedGuest, addr: GuestAddress) -> PageId {
    vm.page_of(addr).expect("an adopted page")
}

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
    for _ in 0..3 {
        engine.merge_pass();
    }
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
