//! Running the guests under the dynamic-vm engines: what this crate's tests and examples
//! set up around their VMs.
//!
//! - Skipping where the machine cannot run them: [`kvm_or_skip`], [`guest_or_skip`],
//!   [`linux_adapter`] and [`adapter_or_skip`] say why (`SKIPPED: ...` on stdout).
//! - Guest RAM under the Linux backend: [`adopt`] a VM's RAM into a
//!   `page_memory::vmm::VmMemoryAdapter` and learn its host address and region,
//!   [`release`] them again; [`host_ranges`] of VMs for `/proc` measurements.
//! - The Per Page Recycler's host side: a [`PoolRegistry`] answers the guests'
//!   [`abi::CALL_REGISTER`] of their PIP pools by registering them with a
//!   [`SharedRecycler`], which PageONE can hold as its scan hook meanwhile.
//! - Engines driven from a thread of the host: a [`Worker`] runs their passes until
//!   stopped (the caller counts what a [`RoundBarrier`](crate::barrier::RoundBarrier)
//!   waits for).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use page_memory::linux::LinuxMemory;
use page_memory::vmm::vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use page_memory::vmm::{AdoptedGuest, VmMemoryAdapter};
use page_memory::{DomainId, PageId, PageMemory, RegionInfo, ScanHook, PAGE_SIZE};
use pip::PoolView;
use ppr_host::{PoolMemory, Recycler};

use crate::{abi, guest_image, kvm_usable, Call, GuestImage, Vm};

/// Whether `/dev/kvm` is usable; if not, prints `SKIPPED:` and why.
pub fn kvm_or_skip() -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED: KVM is not usable here: {e}");
            false
        }
    }
}

/// The bare-metal guest ([`guest_image`]) where `/dev/kvm` is usable; otherwise `None`,
/// having printed `SKIPPED:` and why (KVM unusable, or the guest not built).
pub fn guest_or_skip() -> Option<GuestImage> {
    if !kvm_or_skip() {
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

/// A vm-memory adapter over a new Linux backend ([`LinuxMemory::new`]: kernel faults
/// required, as vCPUs write guest RAM from the kernel), or why the backend cannot run.
pub fn linux_adapter() -> Result<Arc<VmMemoryAdapter>, String> {
    let memory =
        LinuxMemory::new().map_err(|e| format!("the Linux backend cannot run here: {e}"))?;
    Ok(Arc::new(VmMemoryAdapter::new(Arc::new(memory))))
}

/// [`linux_adapter`], or `None` having printed `SKIPPED:` and why.
pub fn adapter_or_skip() -> Option<Arc<VmMemoryAdapter>> {
    linux_adapter().map_err(|e| println!("SKIPPED: {e}")).ok()
}

/// A VM's RAM as [`adopt`] left it.
#[derive(Debug)]
pub struct AdoptedVm {
    /// The adopted guest; give it back with [`release`].
    pub guest: AdoptedGuest,
    /// The host address of guest-physical address 0.
    pub base: usize,
    /// The backend's region holding the RAM.
    pub region: RegionInfo,
}

/// Adopts `vm`'s RAM (one region, from guest-physical 0) into `adapter`'s Linux backend
/// in trust domain `domain`, and finds its host address and the backend's region.
///
/// # Safety
///
/// As for `VmMemoryAdapter::adopt`: until the RAM is released, nothing in this process
/// remaps, madvises or registers it with another userfaultfd (KVM and the vCPUs only
/// read and write it).
pub unsafe fn adopt(
    adapter: &VmMemoryAdapter,
    vm: &Vm,
    domain: DomainId,
) -> Result<AdoptedVm, String> {
    // SAFETY: the caller's promise, as `adopt` asks it.
    let guest = unsafe { adapter.adopt(vm.memory(), domain) }.map_err(|e| e.to_string())?;
    let id = guest.regions()[0].region;
    let region = adapter
        .memory()
        .regions()
        .into_iter()
        .find(|r| r.id == id)
        .ok_or("the adopted region is not listed")?;
    let base = vm
        .memory()
        .get_host_address(GuestAddress(0))
        .map_err(|e| e.to_string())? as usize;
    Ok(AdoptedVm {
        guest,
        base,
        region,
    })
}

/// Gives every VM's RAM back to its owner (see `VmMemoryAdapter::release`).
pub fn release(
    adapter: &VmMemoryAdapter,
    adopted: impl IntoIterator<Item = AdoptedVm>,
) -> Result<(), String> {
    for a in adopted {
        adapter.release(a.guest).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The host address ranges (`[start, end)`) of the VMs' RAM.
pub fn host_ranges(vms: &[Vm]) -> Vec<(usize, usize)> {
    vms.iter()
        .flat_map(|vm| {
            vm.memory()
                .iter()
                .map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len() as usize))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A guest's PIP pool, in guest RAM, as the host sees it.
struct GuestPool {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pointer is into guest RAM that stays mapped while the pool lives (the
// promise of `PoolRegistry::set_target`); it is only accessed atomically (pip).
unsafe impl Send for GuestPool {}
// SAFETY: as for Send.
unsafe impl Sync for GuestPool {}

impl PoolMemory for GuestPool {
    fn view(&self) -> Option<PoolView<'_>> {
        // SAFETY: see the Send impl: mapped for the pool's life, inside the guest's RAM
        // (checked at registration), atomic accesses only (the guest's pip and the
        // host's recycler).
        unsafe { PoolView::from_raw(self.ptr, self.len) }.ok()
    }
}

/// The Per Page Recycler, registered with pools while PageONE already holds it as its
/// scan hook (`PageOne::with_hook`).
#[derive(Debug, Default)]
pub struct SharedRecycler(pub RwLock<Recycler>);

impl ScanHook<LinuxMemory> for SharedRecycler {
    fn examine(&self, memory: &LinuxMemory, page: PageId) -> bool {
        self.0.read().unwrap().examine(memory, page)
    }
}

/// Registers the PIP pools that the guests of several VMs announce
/// ([`abi::CALL_REGISTER`] with [`abi::REGISTER_PIP_POOL`], the pool's guest-physical
/// address and length) with one [`SharedRecycler`], once the host knows where each VM's
/// RAM is ([`PoolRegistry::set_target`]).
#[derive(Debug)]
pub struct PoolRegistry {
    recycler: Arc<SharedRecycler>,
    /// Per VM: the guest RAM's host base and the backend's region.
    targets: Mutex<Vec<Option<(usize, RegionInfo)>>>,
}

impl PoolRegistry {
    /// A registry for `vms` VMs (indexed from 0), with a new recycler.
    pub fn new(vms: usize) -> Self {
        PoolRegistry {
            recycler: Arc::default(),
            targets: Mutex::new(vec![None; vms]),
        }
    }

    /// The recycler the pools are registered with.
    pub fn recycler(&self) -> &Arc<SharedRecycler> {
        &self.recycler
    }

    /// VM `vm`'s RAM is `adopted`: its registrations are taken from now on (before,
    /// they are answered 0).
    ///
    /// # Safety
    ///
    /// The RAM stays mapped while the recycler (every clone of [`Self::recycler`]) lives:
    /// the pools registered read it.
    pub unsafe fn set_target(&self, vm: usize, adopted: &AdoptedVm) {
        self.targets.lock().unwrap()[vm] = Some((adopted.base, adopted.region));
    }

    /// Answers `call` from VM `vm`: a pool registration (a pool inside the VM's RAM,
    /// once its target is set) is registered as pool `pool_id` with indicator
    /// `indicator ^ address` over the VM's region, its frames from
    /// [`abi::PPR_FRAME_OFFSET`]; 1 if the recycler took it, else (any other call too) 0.
    pub fn register(&self, vm: usize, call: &Call, pool_id: u32, indicator: u64) -> u64 {
        if call.code != abi::CALL_REGISTER || call.args.first() != Some(&abi::REGISTER_PIP_POOL) {
            return 0;
        }
        let (Some(&addr), Some(&len)) = (call.args.get(1), call.args.get(2)) else {
            return 0;
        };
        let Some((base, region)) = self.targets.lock().unwrap()[vm] else {
            return 0;
        };
        let ram = region.pages as u64 * PAGE_SIZE as u64;
        if addr.checked_add(len).is_none_or(|end| end > ram) {
            return 0;
        }
        let pool = GuestPool {
            ptr: (base + addr as usize) as *const u8,
            len: len as usize,
        };
        let registered = self.recycler.0.write().unwrap().register(
            Arc::new(pool),
            pool_id,
            indicator ^ addr,
            region,
            abi::PPR_FRAME_OFFSET,
        );
        registered.is_ok() as u64
    }
}

/// A host thread that runs an engine's passes (or any step) over and over until stopped.
#[derive(Debug)]
pub struct Worker<T> {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<T>,
}

impl<T: Send + 'static> Worker<T> {
    /// Spawns a thread named `name` that calls `step(&mut state)` until [`Worker::stop`].
    pub fn spawn(
        name: &str,
        mut state: T,
        mut step: impl FnMut(&mut T) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    step(&mut state);
                }
                state
            })?;
        Ok(Worker { stop, thread })
    }

    /// Stops the thread after its current step and returns its state (a panic of the
    /// step is resumed here).
    pub fn stop(self) -> T {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}
