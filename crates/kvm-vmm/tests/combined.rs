//! Both engines at once on real vCPUs: PageONE merges the RAM of two guests while the
//! Per Page Recycler runs inside its scan (`PageOne::with_hook`, the recycler as its
//! `ScanHook`). One guest runs the memory checker over pages that start as duplicates of
//! each other; the other runs the PPR page allocator over a pool it registers. The
//! checker must read every page back as written, every page the PPR guest frees must be
//! recycled (read zeros when allocated again), and neither guest may see a page change
//! under it, while PageONE protects, merges, zero-merges and unmerges pages of both.
//!
//! Decided by counts: each guest waits at its barriers for engine passes.
//! Skips (saying why) where `/dev/kvm` is unusable, the guest was not built, or the
//! Linux backend cannot run.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{merge_passes, MIB};
use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::harness::{adopt, release, PoolRegistry};
use kvm_vmm::workload::Checker;
use kvm_vmm::{abi, run_all, CallHook, Vm, VmConfig};
use page_memory::DomainId;

#[test]
fn checker_and_ppr_guests_under_pageone_with_the_recycler_in_its_scan() {
    let Some((image, adapter)) = common::guest_and_adapter_or_skip() else {
        return;
    };
    const CHECK_PAGES: u64 = 4096;
    const PERIOD: u64 = 128;
    const ROUNDS: u64 = 4;
    const PPR_PAGES: u64 = 2048;
    const CYCLES: u64 = 3;
    // Only the PPR guest (VM 1) registers a pool.
    let pools = Arc::new(PoolRegistry::new(2));
    let recycler = pools.recycler().clone();
    // Engine passes completed.
    let passes = Arc::new(AtomicU64::new(0));
    let hook = |vm: usize, vcpus: u32| -> CallHook {
        let (pools, passes) = (pools.clone(), passes.clone());
        // Holds the VM's vCPUs at each round until all arrived, then the passes asked
        // for more passes completed (at most 60 s).
        let barrier = RoundBarrier::new(vcpus, Duration::from_secs(60));
        Arc::new(move |c| match c.code {
            abi::CALL_REGISTER => pools.register(vm, c, 3, 0xC0DE_5EED_0000_0000),
            abi::CALL_ROUND => {
                // The checker: after the fill, long enough to merge everything (pages
                // written while protected are backed off for a few passes); after a
                // round, enough to merge what stayed. The PPR guest: after its frees,
                // two passes (a page offered before a pass is recycled by its end).
                let round = c.args[0];
                let more = match (vm, round) {
                    (0, 0) => 10,
                    (0, _) => 3,
                    (_, r) if r % 2 == 0 => 2,
                    _ => 0,
                };
                let progress = || passes.load(Ordering::Acquire);
                barrier.wait(round, more, &progress, &mut || {});
                0
            }
            _ => 0,
        })
    };
    let checker = Checker {
        pages: CHECK_PAGES,
        rounds: ROUNDS,
        stride: 4,
        dup_period: PERIOD,
        seed: 5,
        call_rounds: true,
    };
    let mut args = [0; 16];
    args[abi::PPR_POOL_BYTES] = 64 * 1024;
    args[abi::PPR_PAGES] = PPR_PAGES;
    args[abi::PPR_CYCLES] = CYCLES;
    let mut vms = vec![
        Vm::new(
            checker
                .config("checker", 32 * MIB)
                .vcpus(2)
                .on_call(hook(0, 2)),
            &image,
        )
        .unwrap(),
        Vm::new(
            VmConfig::new("ppr", 16 * MIB)
                .vcpus(1)
                .workload(abi::WORKLOAD_PPR, args)
                .on_call(hook(1, 1)),
            &image,
        )
        .unwrap(),
    ];
    let adopted: Vec<_> = vms
        .iter()
        .enumerate()
        // SAFETY: nothing in this process remaps, madvises or registers the guests' RAM
        // with another userfaultfd; KVM and the vCPUs only read and write it.
        .map(|(i, vm)| unsafe { adopt(&adapter, vm, DomainId(i as u32)) }.unwrap())
        .collect();
    // SAFETY: the VMs outlive the recycler (dropped before them, below).
    unsafe { pools.set_target(1, &adopted[1]) };
    let engine = common::pageone(&adapter, Some(recycler.clone()));
    let worker = merge_passes(engine.clone(), passes.clone());
    let results = run_all(&mut vms, Duration::from_secs(120));
    let most_sharing = worker.stop();
    let stats = engine.stats();
    let rstats = recycler.0.read().unwrap().stats();
    let backend = adapter.memory().stats();
    println!("passes {}", passes.load(Ordering::Acquire));
    println!("engine {stats:?}");
    println!("recycler {rstats:?}");
    println!("backend {backend:?}");
    let mut results = results.into_iter();
    let out = results.next().unwrap().unwrap();
    let rep = Checker::report(&out).expect("a checker report");
    println!("checker {rep:?}");
    assert_eq!(rep.checked, CHECK_PAGES * ROUNDS);
    assert_eq!(rep.mismatched, 0, "{}", out.console);
    let out = results.next().unwrap().unwrap();
    let t: [u64; abi::PPR_VALUES] = out.summed(abi::REPORT_PPR);
    println!("ppr guest {t:?}");
    let [allocs, zeros, intact, corrupt, _offered, not_offered, _busy, _pages] = t;
    assert_eq!(allocs, PPR_PAGES * CYCLES);
    assert_eq!(corrupt, 0, "{}", out.console);
    assert_eq!(not_offered, 0);
    // Every page allocated again read zeros (recycled) or exactly its last contents (the
    // guest took it back before the host recycled it): never anything else. Inside
    // PageONE's passes most are recycled in time, but not always all: one CI run saw
    // 5,870 of 6,144 (the standalone recycler's test, tests/ppr.rs, asserts all).
    assert_eq!(zeros + intact, allocs);
    assert!(
        zeros * 2 > allocs,
        "most freed pages recycled: {zeros} of {allocs}"
    );
    assert!(rstats.recycled >= PPR_PAGES * (CYCLES - 1), "{rstats:?}");
    assert_eq!(
        rstats.recycled, stats.recycled,
        "PageONE counts the hook's recycles"
    );
    // The checker's duplicates were merged.
    assert!(
        most_sharing >= CHECK_PAGES - PERIOD,
        "pages_sharing {most_sharing}"
    );
    assert!(
        backend.write_faults > 0 && backend.cow_breaks > 0,
        "{backend:?}"
    );
    drop(engine);
    drop(recycler);
    drop(pools);
    release(&adapter, adopted).unwrap();
}
