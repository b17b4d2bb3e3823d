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

#[test]
fn guest_freed_pages_are_recycled_and_read_zeros_when_allocated_again() {
    let Some(image) = guest_or_skip() else { return };
    let memory = match LinuxMemory::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            println!("SKIPPED: the Linux backend cannot run here: {e}");
            return;
        }
    };
    const PAGES: u64 = 4096;
    const CYCLES: u64 = 3;
    const POOL: u64 = 64 * 1024;
    const VCPUS: u32 = 2;
    let adapter = Arc::new(VmMemoryAdapter::new(memory));
    let recycler = Arc::new(RwLock::new(Recycler::new()));
    // Set once the VM and its adoption exist: the guest RAM's host base and the region.
    let target: Arc<Mutex<Option<(usize, page_memory::RegionInfo)>>> = Arc::new(Mutex::new(None));
    // Per barrier round: vCPUs arrived; and the usage there (bytes).
    let arrived: Arc<Mutex<HashMap<u64, (u32, Option<u64>)>>> = Arc::default();
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
                    0x5EED_0F_C0FF_EE00 ^ addr,
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
                    if e.0 == VCPUS {
                        // After the frees (even rounds): two complete recycler passes.
                        let passes = recycler.read().unwrap().stats().passes;
                        e.1 = Some(passes + if round % 2 == 0 { 3 } else { 0 });
                    }
                    e.0 == VCPUS
                };
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    let want = arrived.lock().unwrap()[&round].1;
                    let passes = recycler.read().unwrap().stats().passes;
                    if want.is_some_and(|w| passes >= w) {
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
    let mut args = [0; 16];
    args[abi::PPR_POOL_BYTES] = POOL;
    args[abi::PPR_PAGES] = PAGES;
    args[abi::PPR_CYCLES] = CYCLES;
    let config = VmConfig::new("ppr", 32 * MIB)
        .vcpus(VCPUS)
        .workload(abi::WORKLOAD_PPR, args)
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
    let out = out.unwrap();
    let mut total = [0u64; abi::PPR_VALUES];
    for (_, v) in out.reports(abi::REPORT_PPR) {
        for (t, x) in total.iter_mut().zip(v) {
            *t += x;
        }
    }
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
    drop(recycler);
    adapter.release(adopted).unwrap();
}
