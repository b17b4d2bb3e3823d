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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kvm_vmm::{abi, guest_image, kvm_usable, CallHook, GuestImage, Vm, VmConfig};
use page_memory::linux::LinuxMemory;
use page_memory::vmm::vm_memory::{GuestAddress, GuestMemoryBackend};
use page_memory::vmm::VmMemoryAdapter;
use page_memory::{DomainId, PageMemory};
use pip::PoolView;
use ppr_host::{PoolMemory, Recycler};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn guest_or_skip() -> Option<GuestImage> {
    if let Err(e) = kvm_usable() {
        println!("SKIPPED: KVM is not usable here: {e}");
        return None;
    }
    match guest_image() {
        Ok(g) => Some(g),
        Err(e) => {
            println!("SKIPPED: {e}");
            None
        }
    }
}

/// The guest's PIP pool, in guest RAM, as the host sees it.
struct GuestPool {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pointer is into guest RAM that stays mapped while the VM and the adapter
// live (the test drops the recycler first); it is only accessed atomically (pip).
unsafe impl Send for GuestPool {}
// SAFETY: as for Send.
unsafe impl Sync for GuestPool {}

impl PoolMemory for GuestPool {
    fn view(&self) -> Option<PoolView<'_>> {
        // SAFETY: see the Send impl: mapped for the pool's life, atomic accesses only
        // (the guest's pip and the host's recycler).
        unsafe { PoolView::from_raw(self.ptr, self.len) }.ok()
    }
}

/// Per barrier round: vCPUs arrived, and the recycler pass count to wait for.
type Arrivals = HashMap<u64, (u32, Option<u64>)>;

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
    let image = guest_or_skip()?;
    let memory = match LinuxMemory::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            println!("SKIPPED: the Linux backend cannot run here: {e}");
            return None;
        }
    };
    let adapter = Arc::new(VmMemoryAdapter::new(memory));
    let recycler = Arc::new(RwLock::new(Recycler::new()));
    // Set once the VM and its adoption exist: the guest RAM's host base and the region.
    let target: Arc<Mutex<Option<(usize, page_memory::RegionInfo)>>> = Arc::new(Mutex::new(None));
    // Per barrier round: vCPUs arrived, and the pass count to wait for.
    let arrived: Arc<Mutex<Arrivals>> = Arc::default();
    let usage_at: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let hook: CallHook = {
        let (recycler, target, adapter) = (recycler.clone(), target.clone(), adapter.clone());
        let (arrived, usage_at) = (arrived.clone(), usage_at.clone());
        Arc::new(move |c| match c.code {
            abi::CALL_REGISTER if c.args.first() == Some(&abi::REGISTER_PIP_POOL) => {
                let (Some(&addr), Some(&len)) = (c.args.get(1), c.args.get(2)) else {
                    return 0;
                };
                let Some((base, region)) = *target.lock().unwrap() else {
                    return 0;
                };
                let pool = GuestPool {
                    ptr: (base + addr as usize) as *const u8,
                    len: len as usize,
                };
                let registered = recycler.write().unwrap().register(
                    Arc::new(pool),
                    7,
                    0x5EED_C0FF_EE00_0000 ^ addr,
                    region,
                    abi::PPR_FRAME_OFFSET,
                );
                registered.is_ok() as u64
            }
            abi::CALL_ROUND => {
                let round = c.args[0];
                let last = {
                    let mut a = arrived.lock().unwrap();
                    let e = a.entry(round).or_insert((0, None));
                    e.0 += 1;
                    if e.0 == vcpus {
                        // The pass running now does not count.
                        let done = recycler.read().unwrap().stats().passes;
                        e.1 = Some(done + passes(round) + 1);
                    }
                    e.0 == vcpus
                };
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    let want = arrived.lock().unwrap()[&round].1;
                    let done = recycler.read().unwrap().stats().passes;
                    if want.is_some_and(|w| done >= w) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if last {
                    let total = adapter.memory().usage().map_or(0, |u| u.total_bytes());
                    usage_at.lock().unwrap().push((round, total));
                }
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
    let adopted = unsafe { adapter.adopt(vm.memory(), DomainId(0)) }.unwrap();
    let region_id = adopted.regions()[0].region;
    let region = adapter
        .memory()
        .regions()
        .into_iter()
        .find(|r| r.id == region_id)
        .unwrap();
    let base = vm.memory().get_host_address(GuestAddress(0)).unwrap() as usize;
    *target.lock().unwrap() = Some((base, region));
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (recycler, stop, adapter) = (recycler.clone(), stop.clone(), adapter.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                recycler.read().unwrap().scan_pass(&**adapter.memory());
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let out = vm.run(Duration::from_secs(120));
    stop.store(true, Ordering::Release);
    scanner.join().unwrap();
    let stats = recycler.read().unwrap().stats();
    let usage = usage_at.lock().unwrap().clone();
    println!("recycler {stats:?}");
    println!("usage at barriers (round, bytes) {usage:?}");
    // The pool lives in guest RAM: drop the recycler before the RAM goes back.
    drop(recycler);
    adapter.release(adopted).unwrap();
    Some(PprRun {
        out: out.unwrap(),
        stats,
        usage,
    })
}

fn summed<const N: usize>(out: &kvm_vmm::VmOutcome, tag: u64) -> [u64; N] {
    let mut total = [0u64; N];
    for (_, v) in out.reports(tag) {
        for (t, x) in total.iter_mut().zip(v) {
            *t += x;
        }
    }
    total
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
    let total: [u64; abi::PPR_VALUES] = summed(&out, abi::REPORT_PPR);
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
    let [pages, changed]: [u64; 2] = summed(&out, abi::REPORT_PPR_HOSTILE);
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
