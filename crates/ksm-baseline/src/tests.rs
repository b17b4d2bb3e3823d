//! White-box tests: the scanner's own structures stay consistent.

use super::*;
use page_memory::sim::SimMemory;

fn fill(mem: &SimMemory, page: PageId, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = [0u8; PAGE_SIZE];
    rng.fill(&mut buf);
    mem.write(page, 0, &buf).unwrap();
}

#[test]
fn invariants_hold_through_merges_writes_and_chains() {
    for seed in 0..8 {
        invariants_with_seed(seed);
    }
}

fn invariants_with_seed(seed: u64) {
    let mem = Arc::new(SimMemory::new());
    let regions: Vec<_> = (0..3).map(|d| mem.add_region(64, DomainId(d))).collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    for &r in &regions {
        for i in 0..64 {
            fill(&mem, PageId::new(r, i), rng.u64(0..12));
        }
    }
    let mut ksm = Ksm::new(
        mem.clone(),
        KsmConfig {
            max_page_sharing: 3,
            smart_scan: seed % 2 == 0,
            use_zero_pages: seed % 3 == 0,
            merge_across_domains: seed % 4 != 1,
        },
    );
    for round in 0..40 {
        ksm.scan(rng.usize(1..80));
        ksm.check_invariants().unwrap();
        // Guest writes between batches: some pages change, some become duplicates again,
        // some become zero pages.
        for _ in 0..rng.usize(0..6) {
            let page = PageId::new(regions[rng.usize(0..3)], rng.u32(0..64));
            if rng.u8(0..8) == 0 {
                mem.write(page, 0, &[0; PAGE_SIZE]).unwrap();
            } else {
                fill(&mem, page, rng.u64(0..12));
            }
        }
        if round == 30 {
            ksm.unmerge_all();
            ksm.check_invariants().unwrap();
        }
    }
    ksm.set_smart_scan(false);
    assert!(ksm.run_until_converged(20).converged);
    ksm.check_invariants().unwrap();
    let s = ksm.stats();
    assert!(s.merges > 0 && s.pages_sharing > 0);
    // Chains formed: at most 3 pages per frame, about 16 pages per content.
    assert!(s.stable_node_chains > 0);
    assert_eq!(mem.accounting().pages_sharing, s.pages_sharing);
}

#[test]
fn rmap_item_is_32_bytes() {
    assert_eq!(RMAP_ITEM_BYTES, 32);
}

#[test]
fn stable_node_and_dup_are_48_bytes_over_sim_memory() {
    assert_eq!(stable_node_bytes::<page_memory::sim::SimFrame>(), 48);
}
