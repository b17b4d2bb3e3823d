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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kvm_vmm::workload::Checker;
use kvm_vmm::{abi, guest_image, kvm_usable, run_all, CallHook, GuestImage, Vm, VmConfig};
use page_memory::linux::LinuxMemory;
use page_memory::vmm::vm_memory::{GuestAddress, GuestMemoryBackend};
use page_memory::vmm::VmMemoryAdapter;
use page_memory::{DomainId, PageId, PageMemory, RegionInfo, ScanHook};
use pageone::{Config, PageOne};
use pip::PoolView;
use ppr_host::{PoolMemory, Recycler};

const MIB: u64 = 1 << 20;

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
// live (the test drops the engine and the recycler first); it is only accessed
// atomically (pip).
unsafe impl Send for GuestPool {}
// SAFETY: as for Send.
unsafe impl Sync for GuestPool {}

impl PoolMemory for GuestPool {
    fn view(&self) -> Option<PoolView<'_>> {
        // SAFETY: see the Send impl.
        unsafe { PoolView::from_raw(self.ptr, self.len) }.ok()
    }
}

/// The recycler, registered with pools while PageONE already holds it as its hook.
struct SharedRecycler(RwLock<Recycler>);

impl ScanHook<LinuxMemory> for SharedRecycler {
    fn examine(&self, memory: &LinuxMemory, page: PageId) -> bool {
        self.0.read().unwrap().examine(memory, page)
    }
}

/// Engine passes completed.
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Per VM and round: vCPUs arrived, and the pass count to wait for.
type Arrivals = HashMap<(usize, u64), (u32, Option<u64>)>;

/// Holds the vCPU until all `vcpus` of VM `vm` reached `round`, then `passes` more
/// passes completed (at most 60 s).
fn barrier(arrivals: &Mutex<Arrivals>, vm: usize, vcpus: u32, round: u64, passes: u64) {
    {
        let mut a = arrivals.lock().unwrap();
        let e = a.entry((vm, round)).or_insert((0, None));
        e.0 += 1;
        if e.0 == vcpus {
            e.1 = Some(PASSES.load(Ordering::Acquire) + passes + 1);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let want = arrivals.lock().unwrap()[&(vm, round)].1;
        if want.is_some_and(|w| PASSES.load(Ordering::Acquire) >= w) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn checker_and_ppr_guests_under_pageone_with_the_recycler_in_its_scan() {
    let Some(image) = guest_or_skip() else { return };
    let memory = match LinuxMemory::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            println!("SKIPPED: the Linux backend cannot run here: {e}");
            return;
        }
    };
    const CHECK_PAGES: u64 = 4096;
    const PERIOD: u64 = 128;
    const ROUNDS: u64 = 4;
    const PPR_PAGES: u64 = 2048;
    const CYCLES: u64 = 3;
    let adapter = Arc::new(VmMemoryAdapter::new(memory));
    let recycler = Arc::new(SharedRecycler(RwLock::new(Recycler::new())));
    let target: Arc<Mutex<Option<(usize, RegionInfo)>>> = Arc::default();
    let arrivals: Arc<Mutex<Arrivals>> = Arc::default();
    let hook = |vm: usize, vcpus: u32| -> CallHook {
        let (recycler, target, arrivals) = (recycler.clone(), target.clone(), arrivals.clone());
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
                let r = recycler.0.write().unwrap().register(
                    Arc::new(pool),
                    3,
                    0xC0DE_5EED_0000_0000 ^ addr,
                    region,
                    abi::PPR_FRAME_OFFSET,
                );
                r.is_ok() as u64
            }
            abi::CALL_ROUND => {
                // The checker: after the fill, long enough to merge everything (pages
                // written while protected are backed off for a few passes); after a
                // round, enough to merge what stayed. The PPR guest: after its frees,
                // two passes (a page offered before a pass is recycled by its end).
                let round = c.args[0];
                let passes = match (vm, round) {
                    (0, 0) => 10,
                    (0, _) => 3,
                    (_, r) if r % 2 == 0 => 2,
                    _ => 0,
                };
                barrier(&arrivals, vm, vcpus, round, passes);
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
    let mut adopted = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        // SAFETY: nothing in this process remaps, madvises or registers the guests' RAM
        // with another userfaultfd; KVM and the vCPUs only read and write it.
        adopted.push(unsafe { adapter.adopt(vm.memory(), DomainId(i as u32)) }.unwrap());
    }
    let ppr_region = adopted[1].regions()[0].region;
    let region = adapter
        .memory()
        .regions()
        .into_iter()
        .find(|r| r.id == ppr_region)
        .unwrap();
    let base = vms[1].memory().get_host_address(GuestAddress(0)).unwrap() as usize;
    *target.lock().unwrap() = Some((base, region));
    let engine = Arc::new(
        PageOne::with_hook(
            adapter.memory().clone(),
            Config::default().work_threads(1),
            recycler.clone(),
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut most_sharing = 0;
            while !stop.load(Ordering::Acquire) {
                engine.merge_pass();
                most_sharing = most_sharing.max(engine.stats().pages_sharing);
                PASSES.fetch_add(1, Ordering::Release);
            }
            most_sharing
        })
    };
    let results = run_all(&mut vms, Duration::from_secs(120));
    stop.store(true, Ordering::Release);
    let most_sharing = worker.join().unwrap();
    let stats = engine.stats();
    let rstats = recycler.0.read().unwrap().stats();
    let backend = adapter.memory().stats();
    println!("passes {}", PASSES.load(Ordering::Acquire));
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
    let mut t = [0u64; abi::PPR_VALUES];
    for (_, v) in out.reports(abi::REPORT_PPR) {
        t.iter_mut().zip(v).for_each(|(t, x)| *t += x);
    }
    println!("ppr guest {t:?}");
    let [allocs, zeros, _intact, corrupt, _offered, not_offered, _busy, _pages] = t;
    assert_eq!(allocs, PPR_PAGES * CYCLES);
    assert_eq!(corrupt, 0, "{}", out.console);
    assert_eq!(not_offered, 0);
    // Every page freed came back as zeros: recycled within two passes of the engine.
    assert_eq!(zeros, allocs);
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
    for g in adopted {
        adapter.release(g).unwrap();
    }
}
