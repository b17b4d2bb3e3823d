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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_vmm::workload::Checker;
use kvm_vmm::{abi, guest_image, kvm_usable, run_all, CallHook, GuestImage, Vm};
use page_memory::linux::LinuxMemory;
use page_memory::vmm::VmMemoryAdapter;
use page_memory::DomainId;
use pageone::{Config, PageOne};

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

/// Merge passes the engine thread has completed.
static PASSES: AtomicU64 = AtomicU64::new(0);

/// A barrier of all the vCPUs at each round that then waits for merge passes.
struct RoundBarrier {
    vcpus: u32,
    /// Per round: vCPUs arrived, and the pass count to wait for once all have.
    rounds: Mutex<HashMap<u64, (u32, Option<u64>)>>,
}

impl RoundBarrier {
    /// Holds the calling vCPU until every vCPU reached `round` and then `passes` more
    /// merge passes completed (the one running when the last vCPU arrived does not
    /// count). Returns whether this vCPU was the last to arrive. At most 60 s: a stuck
    /// engine fails the test through its counts, not a hang.
    fn wait(&self, round: u64, passes: u64) -> bool {
        let last = {
            let mut rounds = self.rounds.lock().unwrap();
            let e = rounds.entry(round).or_insert((0, None));
            e.0 += 1;
            if e.0 == self.vcpus {
                e.1 = Some(PASSES.load(Ordering::Acquire) + passes + 1);
            }
            e.0 == self.vcpus
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let target = self.rounds.lock().unwrap()[&round].1;
            if target.is_some_and(|t| PASSES.load(Ordering::Acquire) >= t) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        last
    }
}

#[test]
fn checker_finds_no_mismatch_while_pageone_merges_guest_ram() {
    let Some(image) = guest_or_skip() else { return };
    let memory = match LinuxMemory::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            println!("SKIPPED: the Linux backend cannot run here: {e}");
            return;
        }
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
    let adapter = Arc::new(VmMemoryAdapter::new(memory));
    let barrier = Arc::new(RoundBarrier {
        vcpus: 4,
        rounds: Mutex::new(HashMap::new()),
    });
    let hook: CallHook = {
        let (usage_at, adapter) = (usage_at.clone(), adapter.clone());
        Arc::new(move |c| {
            // Enough passes for a page left alone to be protected, found stable and
            // merged (PageONE merges a page unchanged for two passes in the third);
            // after the fill, more: pages written while a pass protected them are
            // backed off (skipped for a few passes).
            let passes = if c.args.first() == Some(&0) { 10 } else { 3 };
            if c.code == abi::CALL_ROUND && barrier.wait(c.args[0], passes) {
                let total = adapter.memory().usage().map_or(0, |u| u.total_bytes());
                usage_at.lock().unwrap().push((c.args[0], total));
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
    let mut adopted = Vec::new();
    for vm in &vms {
        // SAFETY: nothing in this process remaps, madvises or registers the guests' RAM
        // with another userfaultfd; KVM and the vCPUs only read and write it.
        adopted.push(unsafe { adapter.adopt(vm.memory(), DomainId(0)) }.unwrap());
    }
    let engine = Arc::new(
        PageOne::new(adapter.memory().clone(), Config::default().work_threads(1)).unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let merger = {
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
    let most_sharing = merger.join().unwrap();
    let stats = engine.stats();
    let backend = adapter.memory().stats();
    let usage = usage_at.lock().unwrap().clone();
    println!(
        "passes {}, most pages_sharing {most_sharing}",
        PASSES.load(Ordering::Acquire)
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
    for g in adopted {
        adapter.release(g).unwrap();
    }
}
