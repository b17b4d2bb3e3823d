//! The vm-memory adapter's dirty bitmap with real vCPUs: every page the engines change
//! (merged, zero-merged, recycled) is marked dirty in the `GuestMemoryMmap`'s bitmap, so
//! a live migration that copies dirty pages (and KVM's dirty log for the vCPUs' own
//! writes) stays correct.
//!
//! Two density guests (the same OS image, zeroed pages, an application allocating and
//! freeing through the PPR hooks) run under PPR + PageONE with the bitmap cleared once
//! their RAM is adopted (the VMM's own writes through vm-memory, the image and page
//! tables, are not the engines'). The vCPUs write guest RAM through KVM, which marks no
//! vm-memory bitmap: what is marked is the engines' doing. At every barrier round, with
//! the guests held, each guest page's mapping is read from `/proc/self/pagemap`, and a
//! page whose mapping only an engine can have made is checked dirty: a page mapped from
//! the canonical store (a file page: merged or canonicalized), and a page that was
//! private anonymous memory at the last round and is now gone (recycled) or the zero
//! page (zero-merged). Asserted too: both merging and recycling happened, and a third
//! guest beside them, whose RAM no engine adopted, wrote all its pages and left its
//! bitmap clear (the marks are the engines', not the vCPUs').
//!
//! Skips (saying why) where `/dev/kvm` is unusable, the guest was not built, or the
//! Linux backend cannot run.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{merge_passes, MIB};
use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::harness::{adopt, release, PoolRegistry};
use kvm_vmm::workload::Density;
use kvm_vmm::{abi, run_all, CallHook, Vm};
use page_memory::vmm::vm_memory::bitmap::Bitmap;
use page_memory::vmm::vm_memory::GuestMemoryBackend;
use page_memory::DomainId;

const PAGE: usize = 4096;
const MEM: u64 = 12 * MIB;
/// VMs under the engines, and one more beside them whose RAM no engine touches.
const VMS: usize = 2;
const CONTROL: usize = VMS;

/// What a pagemap entry says of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Not present (never touched, or dropped).
    Absent,
    /// The kernel's shared zero page.
    Zero,
    /// Private anonymous memory of the guest's own.
    Anon,
    /// A file page: the canonical store's memfd.
    Store,
}

/// The kind of each page of `[base, base + pages * PAGE)`; `zero` is the zero page's
/// frame (root sees frame numbers; without them no page reads as `Zero`).
fn kinds(base: usize, pages: usize, zero: Option<u64>) -> Vec<Kind> {
    let f = fs::File::open("/proc/self/pagemap").expect("pagemap");
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, (base / PAGE) as u64 * 8)
        .expect("reading pagemap");
    buf.chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().unwrap());
            let pfn = e & ((1 << 55) - 1);
            if e >> 63 == 0 {
                Kind::Absent
            } else if e >> 61 & 1 == 1 {
                Kind::Store
            } else if zero == Some(pfn) && pfn != 0 {
                Kind::Zero
            } else {
                Kind::Anon
            }
        })
        .collect()
}

/// The zero page's frame: a read of fresh anonymous memory maps it.
fn zero_pfn() -> Option<u64> {
    // SAFETY: a fresh private anonymous page of our own, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `p` is readable; the read maps the zero page.
    let _ = unsafe { (p as *const u8).read_volatile() };
    let k = fs::File::open("/proc/self/pagemap").ok().and_then(|f| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, (p as usize / PAGE) as u64 * 8)
            .ok()?;
        Some(u64::from_le_bytes(b) & ((1 << 55) - 1))
    });
    // SAFETY: the page mapped above, not used afterwards.
    unsafe { libc::munmap(p, PAGE) };
    k.filter(|&pfn| pfn != 0)
}

/// What the checks at the rounds found.
#[derive(Debug, Default)]
struct Seen {
    /// Pages mapped from the store at a round (summed over rounds).
    store: u64,
    /// Anonymous pages gone at the next round.
    dropped: u64,
    /// Anonymous pages that became the zero page.
    zeroed: u64,
    /// Pages checked dirty.
    checked: u64,
    /// Pages an engine changed whose bit was clear: (vm, page, from, to).
    missed: Vec<(usize, usize, Kind, Kind)>,
}

#[test]
fn pages_the_engines_change_are_dirty_in_the_vm_memory_bitmap() {
    let Some((image, adapter)) = common::guest_and_adapter_or_skip() else {
        return;
    };
    let zero = zero_pfn();
    let plan = Density::plan(MEM, 2, 1);
    let pools = Arc::new(PoolRegistry::new(VMS + 1));
    let recycler = pools.recycler().clone();
    let passes = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(RoundBarrier::new(VMS as u32 + 1, Duration::from_secs(60)));
    // Per VM: the RAM's host base, its bitmap (through the region), the kinds at the
    // last round.
    type Watch = Vec<(usize, Arc<dyn Fn(usize) -> bool + Send + Sync>, Vec<Kind>)>;
    let watch: Arc<Mutex<Watch>> = Arc::default();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let pages = (MEM as usize) / PAGE;
    let hook = |vm: usize| -> CallHook {
        let (pools, passes, barrier) = (pools.clone(), passes.clone(), barrier.clone());
        let (watch, seen) = (watch.clone(), seen.clone());
        Arc::new(move |c| match c.code {
            abi::CALL_REGISTER => pools.register(vm, c, vm as u32 + 1, 0xD1E7_0000 ^ vm as u64),
            abi::CALL_ROUND => {
                let round = c.args[0];
                let more = if round == 0 { 10 } else { 2 };
                let progress = || passes.load(Ordering::Acquire);
                barrier.wait(round, more, &progress, &mut || {
                    let mut watch = watch.lock().unwrap();
                    let mut seen = seen.lock().unwrap();
                    for (v, (base, dirty, last)) in watch.iter_mut().enumerate() {
                        let now = kinds(*base, pages, zero);
                        for (p, (&was, &is)) in last.iter().zip(&now).enumerate() {
                            let engine = match (was, is) {
                                (_, Kind::Store) => {
                                    seen.store += 1;
                                    true
                                }
                                (Kind::Anon, Kind::Absent) => {
                                    seen.dropped += 1;
                                    true
                                }
                                (Kind::Anon, Kind::Zero) => {
                                    seen.zeroed += 1;
                                    true
                                }
                                _ => false,
                            };
                            if engine {
                                seen.checked += 1;
                                if !dirty(p * PAGE) {
                                    seen.missed.push((v, p, was, is));
                                }
                            }
                        }
                        *last = now;
                    }
                });
                0
            }
            _ => 0,
        })
    };
    let mut vms: Vec<Vm> = (0..=CONTROL)
        .map(|i| {
            let w = Density {
                phase: i as u64,
                seed: 0xD1_0000 + i as u64,
                ..plan
            };
            Vm::new(w.config(format!("vm{i}"), MEM).on_call(hook(i)), &image).unwrap()
        })
        .collect();
    let control = vms[CONTROL].memory().iter().next().unwrap().get_mmap();
    control.bitmap().reset();
    let mut adopted = Vec::new();
    for (i, vm) in vms[..VMS].iter().enumerate() {
        // SAFETY: nothing in this process remaps, madvises or registers the guests' RAM
        // with another userfaultfd; KVM and the vCPUs only read and write it.
        let a = unsafe { adopt(&adapter, vm, DomainId(0)) }.unwrap();
        // SAFETY: the VMs outlive the recycler (dropped before them, below).
        unsafe { pools.set_target(i, &a) };
        let region = vm.memory().iter().next().expect("one region").get_mmap();
        // The VMM's writes (image, page tables, parameters) are not the engines'.
        region.bitmap().reset();
        let dirty: Arc<dyn Fn(usize) -> bool + Send + Sync> =
            Arc::new(move |offset| region.bitmap().dirty_at(offset));
        let now = kinds(a.base, pages, zero);
        watch.lock().unwrap().push((a.base, dirty, now));
        adopted.push(a);
    }
    let engine = common::pageone(&adapter, Some(recycler.clone()));
    let worker = merge_passes(engine.clone(), passes.clone());
    let results = run_all(&mut vms, Duration::from_secs(120));
    worker.stop();
    for r in results {
        let out = r.unwrap();
        let rep = Density::report(&out).expect("a density report");
        assert_eq!(rep.corrupt, 0, "{}", out.console);
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    println!(
        "{seen:?}; recycler {:?}",
        recycler.0.read().unwrap().stats()
    );
    assert_eq!(barrier.timeouts(), 0);
    assert!(
        seen.missed.is_empty(),
        "{} pages changed by the engines are clean in the bitmap (vm, page, from, to): {:?}",
        seen.missed.len(),
        &seen.missed[..seen.missed.len().min(16)]
    );
    assert!(seen.store > 0, "no page was merged: {seen:?}");
    assert!(seen.dropped > 0, "no page was recycled: {seen:?}");
    // The control VM's vCPU wrote its OS pages and application pages through KVM, and
    // no engine touched its RAM: its bitmap stayed clear. The marks above are the
    // engines'.
    let marked = (0..pages)
        .filter(|p| control.bitmap().dirty_at(p * PAGE))
        .count();
    assert_eq!(
        marked, 0,
        "the control VM's bitmap has {marked} dirty pages"
    );
    drop(engine);
    drop(recycler);
    drop(pools);
    release(&adapter, adopted).unwrap();
}
