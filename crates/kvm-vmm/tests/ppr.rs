//! The Per Page Recycler on real vCPUs: the guest's page allocator calls `ppr-guest`'s
//! hooks on KVM vCPUs, over a PIP pool in guest RAM that it registers with the host
//! through a call; the host's `ppr_host::Recycler` scans the guest's RAM through the
//! Linux backend (adopted from the VMM's `GuestMemoryMmap`) and recycles every page the
//! guest freed. The guest checks that every page it allocates again reads zeros (or, had
//! the host not taken it, exactly what it wrote), and that no page changed while in use.
//!
//! Decided by counts: after freeing its pages the guest waits at a barrier until the
//! recycler has completed two more passes (a page offered before a pass starts is
//! recycled by the end of it).
//!
//! A hostile guest (garbage marks, a garbage pool) makes the recycler count rejections
//! and recycle nothing.
//!
//! Skips (saying why) where `/dev/kvm` is unusable, the guest was not built, or the
//! Linux backend cannot run.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::MIB;
use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::harness::{adopt, release, PoolRegistry, Worker};
use kvm_vmm::{abi, CallHook, Vm, VmConfig};
use page_memory::DomainId;

const PAGE: u64 = 4096;

/// What one PPR run left: the guest's outcome, the recycler's stats, and the guest RAM's
/// usage (bytes) at each barrier round.
struct PprRun {
    out: kvm_vmm::VmOutcome,
    stats: ppr_host::Stats,
    usage: Vec<(u64, u64)>,
}

/// Runs `workload` on a 32 MiB VM whose RAM the Linux backend adopted, registering the
/// guest's pool with a `Recycler` that scans the RAM back to back on its own thread. At
/// barrier round `r` the guest is held until every vCPU arrived and then
/// `passes(r)` more recycler passes completed. `None`: skipped (printed why).
fn run_ppr(workload: u64, args: [u64; 16], vcpus: u32, passes: fn(u64) -> u64) -> Option<PprRun> {
    let (image, adapter) = common::guest_and_adapter_or_skip()?;
    let pools = Arc::new(PoolRegistry::new(1));
    let recycler = pools.recycler().clone();
    // All the vCPUs at each round (at most 60 s for the recycler's passes).
    let barrier = RoundBarrier::new(vcpus, Duration::from_secs(60));
    let usage_at: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let hook: CallHook = {
        let (pools, recycler, adapter) = (pools.clone(), recycler.clone(), adapter.clone());
        let usage_at = usage_at.clone();
        Arc::new(move |c| match c.code {
            abi::CALL_REGISTER => pools.register(0, c, 7, 0x5EED_C0FF_EE00_0000),
            abi::CALL_ROUND => {
                let round = c.args[0];
                let done = || recycler.0.read().unwrap().stats().passes;
                barrier.wait(round, passes(round), &done, &mut || {
                    let total = adapter.memory().usage().map_or(0, |u| u.total_bytes());
                    usage_at.lock().unwrap().push((round, total));
                });
                0
            }
            _ => 0,
        })
    };
    let config = VmConfig::new("ppr", 32 * MIB)
        .vcpus(vcpus)
        .workload(workload, args)
        .on_call(hook);
    let mut vm = Vm::new(config, &image).unwrap();
    // SAFETY: nothing in this process remaps, madvises or registers the guest's RAM with
    // another userfaultfd; KVM and the vCPUs only read and write it.
    let adopted = unsafe { adopt(&adapter, &vm, DomainId(0)) }.unwrap();
    // SAFETY: the VM outlives the recycler (dropped before it, below).
    unsafe { pools.set_target(0, &adopted) };
    let scanner = {
        let (recycler, adapter) = (recycler.clone(), adapter.clone());
        Worker::spawn("ppr-recycler", (), move |_| {
            recycler.0.read().unwrap().scan_pass(&**adapter.memory());
            std::thread::sleep(Duration::from_millis(1));
        })
        .unwrap()
    };
    let out = vm.run(Duration::from_secs(120));
    scanner.stop();
    let stats = recycler.0.read().unwrap().stats();
    let usage = usage_at.lock().unwrap().clone();
    println!("recycler {stats:?}");
    println!("usage at barriers (round, bytes) {usage:?}");
    // The pool lives in guest RAM: drop the recycler before the RAM goes back.
    drop(recycler);
    drop(pools);
    release(&adapter, [adopted]).unwrap();
    Some(PprRun {
        out: out.unwrap(),
        stats,
        usage,
    })
}

#[test]
fn guest_freed_pages_are_recycled_and_read_zeros_when_allocated_again() {
    const PAGES: u64 = 4096;
    const CYCLES: u64 = 3;
    let mut args = [0; 16];
    args[abi::PPR_POOL_BYTES] = 64 * 1024;
    args[abi::PPR_PAGES] = PAGES;
    args[abi::PPR_CYCLES] = CYCLES;
    // After the frees (even rounds): two complete recycler passes.
    let Some(run) = run_ppr(
        abi::WORKLOAD_PPR,
        args,
        2,
        |r| if r % 2 == 0 { 2 } else { 0 },
    ) else {
        return;
    };
    let (out, stats, usage) = (run.out, run.stats, run.usage);
    let total: [u64; abi::PPR_VALUES] = out.summed(abi::REPORT_PPR);
    println!("guest: {total:?}");
    let [allocs, zeros, intact, corrupt, offered, not_offered, _busy, pages] = total;
    assert_eq!(pages, PAGES);
    assert_eq!(allocs, PAGES * CYCLES);
    // No page changed while in use, and none came back with anything but zeros or its
    // own contents.
    assert_eq!(corrupt, 0, "{}", out.console);
    // Every free was offered, and every page freed was recycled within the two passes
    // the guest waited: it read zeros when allocated again.
    assert_eq!(not_offered, 0);
    assert_eq!(offered, PAGES * (CYCLES + 1));
    assert_eq!(zeros, allocs, "intact {intact}");
    assert!(stats.recycled >= PAGES * (CYCLES - 1), "{stats:?}");
    // An honest guest's marks are never out of range or of another pool; `NotOffered`
    // happens when the guest withdraws an offer while the host reads its mark (a race
    // the protocol settles: the page is skipped).
    assert_eq!(
        stats.invalid[..pip::Invalid::NotOffered.index()],
        [0, 0, 0],
        "{stats:?}"
    );
    assert_eq!(stats.invalid_pool, 0, "{stats:?}");
    // Memory: after each cycle's frees the written pages are gone again.
    for cycle in 1..=CYCLES {
        let at = |r: u64| usage.iter().find(|u| u.0 == r).map(|u| u.1).unwrap();
        let (used, freed) = (at(2 * cycle - 1), at(2 * cycle));
        assert!(
            used >= freed + PAGES * PAGE * 9 / 10,
            "cycle {cycle}: {used} bytes in use, {freed} after the frees"
        );
    }
}

#[test]
fn hostile_guest_gets_rejections_counted_and_no_page_in_use_recycled() {
    const PAGES: u64 = 1000;
    let mut args = [0; 16];
    args[abi::PPR_POOL_BYTES] = 64 * 1024;
    args[abi::PPR_PAGES] = PAGES;
    let Some(run) = run_ppr(abi::WORKLOAD_PPR_HOSTILE, args, 1, |_| 3) else {
        return;
    };
    let (out, stats) = (run.out, run.stats);
    let [pages, changed]: [u64; 2] = out.summed(abi::REPORT_PPR_HOSTILE);
    assert_eq!(pages, PAGES);
    // Nothing the guest keeps in use was touched...
    assert_eq!(changed, 0, "{}", out.console);
    assert_eq!(stats.recycled, 0, "{stats:?}");
    assert_eq!(stats.tampered, 0, "{stats:?}");
    // ... and every kind of garbage was seen and counted: marks naming another pool, a
    // slot out of range, a slot not holding the page (empty or garbage), and marks read
    // while the header was garbage.
    use pip::Invalid;
    assert!(stats.invalid[Invalid::Pool.index()] > 0, "{stats:?}");
    assert!(stats.invalid[Invalid::Slot.index()] > 0, "{stats:?}");
    assert!(stats.invalid[Invalid::NotOffered.index()] > 0, "{stats:?}");
    assert!(stats.invalid_pool > 0, "{stats:?}");
}
