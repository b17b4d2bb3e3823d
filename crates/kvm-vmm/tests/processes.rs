//! One process per VM (`kvm_vmm::process`): the test re-executes its own binary twice,
//! running only itself (`--exact`), as the children of VM 0 and VM 1; each child boots
//! its VM with the memory checker (two vCPUs, pages duplicated within the VM) and, where
//! the Linux backend can run, under its own PageONE (merge passes back to back in the
//! child, over the child's own guest RAM: merging across processes is not done here),
//! and sends the outcome back through its standard output. The parent asserts that both
//! children's checkers saw every page as written (0 mismatches) and that they ran in
//! processes other than its own.
//!
//! Skips (saying why) where `/dev/kvm` is unusable or the guest was not built.

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use common::{merge_passes, pageone, MIB};
use kvm_vmm::harness::{adopt, guest_or_skip, linux_adapter, release};
use kvm_vmm::process::{child_vm, send, ChildVm};
use kvm_vmm::workload::Checker;
use kvm_vmm::{abi, Vm};
use page_memory::DomainId;

const TEST: &str = "two_vms_in_two_processes_check_every_page";

fn checker(vm: usize) -> Checker {
    Checker {
        pages: 1024,
        rounds: 6,
        stride: 3,
        dup_period: 32,
        seed: 11 + vm as u64,
        call_rounds: false,
    }
}

/// The child's part: VM `vm`, under PageONE where the backend runs; its outcome, with
/// the child's pid and the pages PageONE merged as a last report, sent to the parent.
fn child(vm: usize) {
    let image = kvm_vmm::guest_image().expect("the parent checked the guest");
    let config = checker(vm).config(format!("proc{vm}"), 16 * MIB).vcpus(2);
    let result = Vm::new(config, &image).map(|mut v| {
        let adapter = linux_adapter().ok();
        let engine = adapter.as_ref().map(|a| {
            // SAFETY: nothing in this process remaps, madvises or registers the VM's RAM
            // with another userfaultfd; KVM and the vCPUs read and write it.
            let g = unsafe { adopt(a, &v, DomainId(0)) }.expect("adopting the RAM");
            let engine = pageone(a, None);
            let passes = merge_passes(engine.clone(), Arc::new(AtomicU64::new(0)));
            (g, engine, passes)
        });
        let mut out = v.run(Duration::from_secs(60));
        if let (Some(a), Some((g, engine, passes))) = (adapter, engine) {
            let most_sharing = passes.stop();
            drop(engine);
            release(&a, [g]).expect("releasing the RAM");
            if let Ok(o) = &mut out {
                o.calls.push(kvm_vmm::Call {
                    vcpu: 0,
                    code: abi::CALL_REPORT,
                    args: vec![0xC41D, std::process::id() as u64, 1, most_sharing],
                });
            }
        } else if let Ok(o) = &mut out {
            o.calls.push(kvm_vmm::Call {
                vcpu: 0,
                code: abi::CALL_REPORT,
                args: vec![0xC41D, std::process::id() as u64, 0, 0],
            });
        }
        out
    });
    send(&result.and_then(|r| r));
}

#[test]
fn two_vms_in_two_processes_check_every_page() {
    if let Some(vm) = child_vm() {
        return child(vm);
    }
    if guest_or_skip().is_none() {
        return;
    }
    let children: Vec<ChildVm> = (0..2)
        .map(|vm| ChildVm::spawn(vm, &["--exact", TEST, "--nocapture", "--test-threads=1"]))
        .collect::<Result<_, _>>()
        .expect("spawning the children");
    let pids: Vec<u32> = children.iter().map(ChildVm::id).collect();
    for (vm, c) in children.into_iter().enumerate() {
        let out = c.wait(Duration::from_secs(120)).unwrap();
        assert_eq!(out.name, format!("proc{vm}"));
        let rep = Checker::report(&out).expect("a checker report");
        assert_eq!((rep.vcpus, rep.pages), (2, 1024));
        assert_eq!(rep.checked, 1024 * 6);
        assert_eq!(rep.mismatched, 0, "VM {vm}: {}", out.console);
        let (_, child) = out.reports(0xC41D).next().expect("the child's own report");
        assert_eq!(child[0] as u32, pids[vm], "VM {vm} ran in its own child");
        assert_ne!(child[0] as u32, std::process::id());
        if child[1] == 1 {
            println!(
                "VM {vm}: PageONE in the child, at most {} pages sharing",
                child[2]
            );
        } else {
            println!("VM {vm}: no engine (the Linux backend cannot run here)");
        }
    }
}
