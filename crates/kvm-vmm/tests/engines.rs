//! The engines on real vCPUs: two guests run the memory checker on KVM vCPUs while
//! PageONE merges their RAM through the Linux backend (adopted from the VMM's
//! `GuestMemoryMmap` by the vm-memory adapter). The guests' writes reach protected and
//! merged pages through KVM's own page faults, and remaps reach the vCPUs through KVM's
//! MMU notifier: the checker must still read back every page exactly as written.
//!
//! Decided by counts, not time: the guests stop at a barrier after the fill and after
//! every round until PageONE has run a given number of passes over their RAM.
//!
//! Skips (saying why) where `/dev/kvm` is unusable, the guest was not built, or the
//! Linux backend cannot run (it needs userfaultfd write-protect with kernel faults:
//! root, or see `page_memory::linux`).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{merge_passes, MIB};
use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::harness::{adopt, release};
use kvm_vmm::workload::Checker;
use kvm_vmm::{abi, run_all, CallHook, Vm};
use page_memory::DomainId;

const PAGE: u64 = 4096;

#[test]
fn checker_finds_no_mismatch_while_pageone_merges_guest_ram() {
    let Some((image, adapter)) = common::guest_and_adapter_or_skip() else {
        return;
    };
    // Two VMs of 32 MiB, 2 vCPUs each. The checker's 4096 pages (16 MiB) per VM start
    // as 256 distinct contents, the same in both VMs (a shared "image"); every round
    // rewrites a quarter of them with page-unique contents.
    const PAGES: u64 = 4096;
    const PERIOD: u64 = 256;
    const ROUNDS: u64 = 6;
    const STRIDE: u64 = 4;
    // Usage of the guests' RAM (anonymous + canonical store) at each barrier.
    let usage_at: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    // Merge passes the engine thread has completed.
    let passes = Arc::new(AtomicU64::new(0));
    // All 4 vCPUs at each round; a stuck engine fails the test through its counts, not
    // a hang.
    let barrier = Arc::new(RoundBarrier::new(4, Duration::from_secs(60)));
    let hook: CallHook = {
        let (usage_at, adapter, passes) = (usage_at.clone(), adapter.clone(), passes.clone());
        Arc::new(move |c| {
            // Enough passes for a page left alone to be protected, found stable and
            // merged (PageONE merges a page unchanged for two passes in the third);
            // after the fill, more: pages written while a pass protected them are
            // backed off (skipped for a few passes).
            let more = if c.args.first() == Some(&0) { 10 } else { 3 };
            if c.code == abi::CALL_ROUND {
                let progress = || passes.load(Ordering::Acquire);
                barrier.wait(c.args[0], more, &progress, &mut || {
                    let total = adapter.memory().usage().map_or(0, |u| u.total_bytes());
                    usage_at.lock().unwrap().push((c.args[0], total));
                });
            }
            0
        })
    };
    let mut vms: Vec<Vm> = (0..2)
        .map(|i| {
            let checker = Checker {
                pages: PAGES,
                rounds: ROUNDS,
                stride: STRIDE,
                dup_period: PERIOD,
                seed: 100 + i,
                call_rounds: true,
            };
            let config = checker
                .config(format!("vm{i}"), 32 * MIB)
                .vcpus(2)
                .on_call(hook.clone());
            Vm::new(config, &image).unwrap()
        })
        .collect();
    let adopted: Vec<_> = vms
        .iter()
        // SAFETY: nothing in this process remaps, madvises or registers the guests' RAM
        // with another userfaultfd; KVM and the vCPUs only read and write it.
        .map(|vm| unsafe { adopt(&adapter, vm, DomainId(0)) }.unwrap())
        .collect();
    let engine = common::pageone(&adapter, None);
    let merger = merge_passes(engine.clone(), passes.clone());
    let results = run_all(&mut vms, Duration::from_secs(120));
    let most_sharing = merger.stop();
    let stats = engine.stats();
    let backend = adapter.memory().stats();
    let usage = usage_at.lock().unwrap().clone();
    println!(
        "passes {}, most pages_sharing {most_sharing}",
        passes.load(Ordering::Acquire)
    );
    println!("engine {stats:?}");
    println!("backend {backend:?}");
    println!("usage at barriers (round, bytes) {usage:?}");
    for r in results {
        let out = r.unwrap();
        let rep = Checker::report(&out).expect("a checker report");
        println!("{}: {rep:?}", out.name);
        assert_eq!(rep.vcpus, 2);
        assert_eq!(rep.checked, PAGES * ROUNDS);
        assert_eq!(rep.rewritten, PAGES * ROUNDS / STRIDE);
        assert_eq!(rep.mismatched, 0, "{}", out.console);
    }
    // Pages were really merged: after the fill, the 2 x 4096 checker pages (256
    // contents) share 256 canonical pages...
    assert!(
        most_sharing >= 2 * PAGES - PERIOD,
        "pages_sharing {most_sharing}"
    );
    // ... and the guests' RAM (32 MiB of checker pages written) used about 1 MiB for
    // them, plus the few pages of page tables, image and stacks.
    let after_fill = usage
        .iter()
        .find(|u| u.0 == 0)
        .expect("usage after the fill")
        .1;
    assert!(
        after_fill < PERIOD * PAGE + MIB,
        "{after_fill} bytes after the fill"
    );
    // And the vCPUs' writes went through the backend's fault handling: first writes to
    // protected pages, and writes to merged pages whose sharing was broken.
    assert!(backend.write_faults > 0, "{backend:?}");
    assert!(backend.cow_breaks > 0, "{backend:?}");
    release(&adapter, adopted).unwrap();
}
