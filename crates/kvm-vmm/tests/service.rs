//! Real vCPUs, one process per VM, deduplicated across the processes by one `pageoned`
//! service: the test runs the service and re-executes its own binary twice as the VMs'
//! processes (`kvm_vmm::process`); each child boots a VM with the memory checker (the same
//! contents in both VMs, so pages merge *across* the processes), hands its guest RAM to a
//! `pageoned` agent and runs the VM while the service merges. The parent asserts that
//! both checkers saw every page exactly as written (0 mismatches: KVM's writes to pages
//! the service protected or merged all landed) and that pages of the two processes were
//! merged with each other.
//!
//! Skips (saying why) where `/dev/kvm` is unusable, the guest was not built, or the Linux
//! backend cannot run (no userfaultfd with kernel faults).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_vmm::harness::{guest_or_skip, linux_adapter};
use kvm_vmm::process::{child_vm, send, ChildVm};
use kvm_vmm::workload::Checker;
use kvm_vmm::Vm;
use page_memory::vmm::vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use pageoned::agent::{Agent, AgentConfig};
use pageoned::service::{Service, ServiceConfig};

const TEST: &str = "vms_in_two_processes_are_merged_across_them_by_the_service";
const MIB: usize = 1 << 20;

fn checker() -> Checker {
    Checker {
        pages: 1024,
        rounds: 6,
        stride: 3,
        // Every page distinct within a VM, the same page for page in both VMs (the same
        // seed): every page that merges, merges with the other process's.
        dup_period: 0,
        seed: 21,
        // Each round ends with a call, which pauses the vCPU (see `child`).
        call_rounds: true,
    }
}

fn child(vm: usize) {
    let image = kvm_vmm::guest_image().expect("the parent checked the guest");
    let socket = std::env::var("KVM_VMM_SERVICE").expect("the service's socket");
    // After the fill the vCPUs wait until both VMs have filled their RAM (a file each
    // next to the socket), then until the parent saw pages of both processes share
    // frames (a file `merged`; at most 30 s), and 100 ms after each round: the service's
    // passes (slow on nested KVM: a few hundred ms each) then find pages of both
    // processes unchanged long enough to merge them.
    let dir = std::path::Path::new(&socket)
        .parent()
        .expect("the socket's directory")
        .to_path_buf();
    let pause: kvm_vmm::CallHook = Arc::new(move |c| {
        if c.code != kvm_vmm::abi::CALL_ROUND {
            return 0;
        }
        if c.args.first() == Some(&0) {
            let _ = std::fs::write(dir.join(format!("filled-{vm}")), b"");
            let t0 = std::time::Instant::now();
            while !(0..2).all(|k| dir.join(format!("filled-{k}")).exists())
                && t0.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            let t0 = std::time::Instant::now();
            while !dir.join("merged").exists() && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
        0
    });
    let config = checker()
        .config(format!("svc{vm}"), 16 * MIB as u64)
        .vcpus(2)
        .on_call(pause);
    let result = Vm::new(config, &image).map(|mut v| {
        let agent = Agent::start(AgentConfig::new(&socket).with_name(&format!("kvm-{vm}")))
            .expect("the agent");
        let ram = v.memory();
        let base = ram.get_host_address(GuestAddress(0)).expect("guest RAM");
        let len: usize = ram.iter().map(|r| r.len() as usize).sum();
        // SAFETY: the VM's RAM, private anonymous memory of this process that stays mapped
        // until the VM is dropped, after the agent; nothing else remaps or registers it.
        let region = unsafe { agent.add_region(base, len) }.expect("handing the RAM over");
        assert!(
            agent.wait_registered(Duration::from_secs(20)),
            "{:?}",
            agent.last_error()
        );
        let out = v.run(Duration::from_secs(120));
        agent.remove_region(region).expect("taking the RAM back");
        drop(agent);
        out
    });
    send(&result.and_then(|r| r));
}

#[test]
fn vms_in_two_processes_are_merged_across_them_by_the_service() {
    if let Some(vm) = child_vm() {
        return child(vm);
    }
    if guest_or_skip().is_none() {
        return;
    }
    if let Err(why) = linux_adapter() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvm-vmm-service-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("pageoned.sock");
    let engine = pageone::Config::default()
        .stable_periods(1)
        .merge_period(Duration::from_millis(10));
    let svc = Arc::new(
        Service::start(
            ServiceConfig::new(&socket)
                .with_engine(engine)
                .with_run_passes(false),
        )
        .unwrap(),
    );
    // The most store pages that pages of both processes mapped at once, seen while the
    // VMs ran.
    let most = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (svc, most, done, dir) = (svc.clone(), most.clone(), done.clone(), dir.clone());
        std::thread::spawn(move || {
            // Merge passes back to back while the VMs run.
            while !done.load(Ordering::Relaxed) {
                for d in svc.domains() {
                    if let Some(r) = svc.merge_pass(d) {
                        if std::env::var_os("SERVICE_TEST_VERBOSE").is_some() {
                            eprintln!("{r:?}");
                        }
                    }
                    if let Some(st) = svc.store_stats(d) {
                        most.fetch_max(st.across_clients, Ordering::Relaxed);
                        if st.across_clients > 0 {
                            let _ = std::fs::write(dir.join("merged"), b"");
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    std::env::set_var("KVM_VMM_SERVICE", &socket);
    let children: Vec<ChildVm> = (0..2)
        .map(|vm| ChildVm::spawn(vm, &["--exact", TEST, "--nocapture", "--test-threads=1"]))
        .collect::<Result<_, _>>()
        .expect("spawning the children");
    for (vm, c) in children.into_iter().enumerate() {
        let out = c.wait(Duration::from_secs(240)).unwrap();
        let rep = Checker::report(&out).expect("a checker report");
        assert_eq!(rep.mismatched, 0, "VM {vm}: {}", out.console);
        assert_eq!(rep.checked, 1024 * 6);
    }
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let most = most.load(Ordering::Relaxed);
    println!(
        "at most {most} store pages mapped by both processes; {:?}",
        svc.stats()
    );
    // Pages of the two processes shared frames of the service's store. (How many depends
    // on how many passes fit in the pauses: on this machine's nested KVM, write-protecting
    // guest RAM is slow, a pass takes about 100 ms.)
    assert!(
        most >= 64,
        "{most} pages of one process shared a frame with the other's"
    );
    assert_eq!(svc.stats().protocol_errors, 0);
    drop(svc);
    let _ = std::fs::remove_dir_all(&dir);
}
