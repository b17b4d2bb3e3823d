//! The density workload on real vCPUs under PPR + PageONE: three guests boot the same
//! OS image, private and zeroed OS pages, and run an application that allocates and
//! frees most of their memory in cycles through a page allocator calling `ppr-guest`'s
//! hooks over a PIP pool each registers. PageONE merges their RAM with the recycler
//! inside its scan (`PageOne::with_hook`), merge passes back to back.
//!
//! Decided by counts: at every step the guests wait at a barrier (all vCPUs of all VMs)
//! until two more engine passes completed (ten after boot), so a page freed in a step
//! is recycled before the next step allocates. Asserted: no page corrupt (every
//! allocation read zeros or its last contents, no held page changed, every OS page held
//! what was written); every allocation read zeros (every freed page was recycled);
//! the recycler recycled at least every page the application freed; the OS image,
//! identical in every VM, merged across the VMs; the zeroed pages merged with the zero
//! page; memory after the final frees is the OS pages' (not the application's peak).
//!
//! Skips (saying why) where `/dev/kvm` is unusable, the guest was not built, or the
//! Linux backend cannot run.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{merge_passes, MIB};
use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::harness::{adopt, release, PoolRegistry};
use kvm_vmm::workload::{Density, DensityReport};
use kvm_vmm::{abi, run_all, CallHook, Vm};
use page_memory::linux::LinuxMemory;
use page_memory::DomainId;
use pageone::PageOne;

const PAGE: u64 = 4096;

#[test]
fn density_guests_under_ppr_and_pageone_recycle_every_free_and_share_the_os_image() {
    let Some((image, adapter)) = common::guest_and_adapter_or_skip() else {
        return;
    };
    const VMS: usize = 3;
    const MEM: u64 = 12 * MIB;
    let plan = Density::plan(MEM, 2, 2);
    let workloads: Vec<Density> = (0..VMS as u64)
        .map(|i| Density {
            phase: i,
            seed: 0x5EED_0000 + i,
            ..plan
        })
        .collect();
    assert_eq!(
        plan.pool_bytes(MEM) as usize,
        pip::pool_bytes(1, 2 * ((MEM - abi::DATA_BASE) / PAGE) as u32).div_ceil(PAGE as usize)
            * PAGE as usize,
        "Density::pool_bytes follows pip's layout"
    );
    let pools = Arc::new(PoolRegistry::new(VMS));
    let recycler = pools.recycler().clone();
    let passes = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(RoundBarrier::new(VMS as u32, Duration::from_secs(60)));
    // Engine figures when the guests were held after boot.
    let engine_slot: Arc<Mutex<Option<Arc<PageOne<LinuxMemory>>>>> = Arc::default();
    let at_boot: Arc<Mutex<Option<pageone::Stats>>> = Arc::default();
    let hook = |vm: usize| -> CallHook {
        let (pools, passes) = (pools.clone(), passes.clone());
        let (barrier, engine_slot, at_boot) =
            (barrier.clone(), engine_slot.clone(), at_boot.clone());
        Arc::new(move |c| match c.code {
            abi::CALL_REGISTER => pools.register(
                vm,
                c,
                vm as u32 + 1,
                0xD0E5_1700_0000_0000 ^ (vm as u64) << 20,
            ),
            abi::CALL_ROUND => {
                let round = c.args[0];
                // After boot: enough passes to merge the OS pages (pages must stay
                // unwritten for two passes first); after every step: two passes (a
                // page offered before a pass is recycled by its end).
                let more = if round == 0 { 10 } else { 2 };
                let progress = || passes.load(Ordering::Acquire);
                barrier.wait(round, more, &progress, &mut || {
                    if round == 0 {
                        if let Some(e) = &*engine_slot.lock().unwrap() {
                            *at_boot.lock().unwrap() = Some(e.stats());
                        }
                    }
                });
                0
            }
            _ => 0,
        })
    };
    let mut vms: Vec<Vm> = workloads
        .iter()
        .enumerate()
        .map(|(i, w)| Vm::new(w.config(format!("vm{i}"), MEM).on_call(hook(i)), &image).unwrap())
        .collect();
    let mut adopted = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        // SAFETY: nothing in this process remaps, madvises or registers the guests' RAM
        // with another userfaultfd; KVM and the vCPUs only read and write it.
        let a = unsafe { adopt(&adapter, vm, DomainId(0)) }.unwrap();
        // SAFETY: the VMs outlive the recycler (dropped before them, below).
        unsafe { pools.set_target(i, &a) };
        adopted.push(a);
    }
    let engine = common::pageone(&adapter, Some(recycler.clone()));
    *engine_slot.lock().unwrap() = Some(engine.clone());
    let worker = merge_passes(engine.clone(), passes.clone());
    let results = run_all(&mut vms, Duration::from_secs(120));
    // The guests are done; memory now: the OS pages, the pools and the allocators'
    // metadata, every application page recycled.
    let used_at_end = adapter.memory().usage().map_or(0, |u| u.total_bytes());
    worker.stop();
    *engine_slot.lock().unwrap() = None;
    let stats = engine.stats();
    let rstats = recycler.0.read().unwrap().stats();
    let boot = at_boot
        .lock()
        .unwrap()
        .clone()
        .expect("the boot barrier measured");
    println!("passes {}", passes.load(Ordering::Acquire));
    println!("engine at boot {boot:?}");
    println!("engine {stats:?}");
    println!("recycler {rstats:?}");
    println!("used at end {used_at_end}");
    let mut total = DensityReport::default();
    for (i, r) in results.into_iter().enumerate() {
        let out = r.unwrap();
        let rep = Density::report(&out).expect("a density report");
        println!("vm{i} {rep:?}");
        assert_eq!(rep.corrupt, 0, "{}", out.console);
        assert_eq!(rep.ppr_vcpus, 1, "the host registered the pool");
        assert_eq!(rep.steps, plan.last_round());
        total.add(&rep);
    }
    assert_eq!(
        barrier.timeouts(),
        0,
        "every barrier was released by engine passes"
    );
    // The application ran: it allocated and freed its peak every cycle (VM 0's phase 0:
    // from zero up to the peak and back, twice).
    assert!(total.allocs >= plan.cycles * plan.app_peak, "{total:?}");
    assert_eq!(total.frees, total.allocs);
    assert_eq!(total.not_offered, 0, "{total:?}");
    // Every page the application allocated read zeros: each freed page had been
    // recycled (two engine passes) before the next step allocated it.
    assert_eq!(total.zeros, total.allocs, "{total:?}");
    assert!(rstats.recycled >= total.frees, "{rstats:?} {total:?}");
    assert_eq!(
        rstats.recycled, stats.recycled,
        "PageONE counts the hook's recycles"
    );
    assert_eq!(rstats.tampered, 0);
    assert_eq!(
        rstats.invalid[..pip::Invalid::NotOffered.index()],
        [0, 0, 0]
    );
    // The OS image, the same in every VM, is merged across the VMs: all but one copy
    // of each page shared; the zeroed pages merged with the zero page.
    let image = VMS as u64 - 1;
    assert!(
        boot.pages_sharing >= image * plan.image,
        "pages_sharing {} after boot, image {} pages x {VMS} VMs",
        boot.pages_sharing,
        plan.image
    );
    assert!(
        boot.zero_pages >= VMS as u64 * plan.zeroed,
        "zero_pages {} after boot, zeroed {} pages x {VMS} VMs",
        boot.zero_pages,
        plan.zeroed
    );
    // Memory after the final frees and recycles: far below the application's peak (all
    // VMs together held about 3 x 1,536 pages, 18 MiB, at their peaks).
    let os = VMS as u64 * (plan.private + plan.image / VMS as u64 + 1) * PAGE;
    assert!(
        used_at_end < os + VMS as u64 * plan.app_peak * PAGE / 4,
        "{used_at_end} bytes in use at the end"
    );
    drop(engine);
    drop(recycler);
    drop(pools);
    release(&adapter, adopted).unwrap();
}
