//! The bare-metal guest on real KVM vCPUs: it boots in long mode, prints, and its memory
//! checker finds every page as written. Skips (saying why) where `/dev/kvm` is unusable
//! or the guest was not built (target `x86_64-unknown-none` not installed).

use std::time::Duration;

use kvm_vmm::harness::guest_or_skip;
use kvm_vmm::workload::Checker;
use kvm_vmm::{run_all, Vm, VmConfig};

const MIB: u64 = 1 << 20;

#[test]
fn guest_boots_on_every_vcpu() {
    let Some(image) = guest_or_skip() else { return };
    let mut vm = Vm::new(VmConfig::new("hello", 8 * MIB).vcpus(2), &image).unwrap();
    let out = vm.run(Duration::from_secs(20)).unwrap();
    assert!(
        out.console.contains("hello from vCPU 0 of 2"),
        "{}",
        out.console
    );
    assert!(
        out.console.contains("hello from vCPU 1 of 2"),
        "{}",
        out.console
    );
}

#[test]
fn checker_without_engine_finds_no_mismatch() {
    let Some(image) = guest_or_skip() else { return };
    let checker = Checker {
        pages: 2048,
        rounds: 6,
        stride: 3,
        dup_period: 64,
        seed: 7,
        call_rounds: false,
    };
    let mut vms: Vec<Vm> = (0..2)
        .map(|i| {
            let c = Checker { seed: i, ..checker };
            Vm::new(c.config(format!("chk{i}"), 16 * MIB).vcpus(2), &image).unwrap()
        })
        .collect();
    for r in run_all(&mut vms, Duration::from_secs(60)) {
        let out = r.unwrap();
        let rep = Checker::report(&out).expect("a checker report");
        assert_eq!(rep.vcpus, 2);
        assert_eq!(rep.pages, 2048);
        assert_eq!(rep.checked, 2048 * 6);
        // Rounds 1..=6 with stride 3 rewrite every page twice.
        assert_eq!(rep.rewritten, 2048 * 2);
        assert_eq!(rep.mismatched, 0, "{}", out.console);
        assert!(rep.write_cycles > 0 && rep.total_cycles >= rep.write_cycles);
    }
}

#[test]
fn checker_detects_a_page_changed_behind_its_back() {
    // The checker is not blind: the host flips one word of a page between the fill and
    // the first re-read (at the round barrier), and the checker reports that page.
    let Some(image) = guest_or_skip() else { return };
    use kvm_vmm::abi;
    use std::sync::{Arc, Mutex};
    use vm_memory::{Bytes, GuestAddress};
    let checker = Checker {
        pages: 256,
        rounds: 2,
        stride: 2,
        dup_period: 0,
        seed: 1,
        call_rounds: true,
    };
    let memory: Arc<Mutex<Option<kvm_vmm::GuestRam>>> = Arc::new(Mutex::new(None));
    let m = memory.clone();
    let hook: kvm_vmm::CallHook = Arc::new(move |c| {
        if c.code == abi::CALL_ROUND && c.args == [0] {
            // Page 4: not rewritten in round 1 (4 % 2 != 1 % 2), so read as the fill left it.
            let addr = GuestAddress(abi::DATA_BASE + 4 * abi::PAGE_SIZE + 8);
            if let Some(mem) = &*m.lock().unwrap() {
                mem.write_obj(0xBAD_u64, addr).unwrap();
            }
        }
        0
    });
    let mut vm = Vm::new(checker.config("flip", 8 * MIB).on_call(hook), &image).unwrap();
    *memory.lock().unwrap() = Some(vm.memory().clone());
    let out = vm.run(Duration::from_secs(20)).unwrap();
    let rep = Checker::report(&out).unwrap();
    // Page 4 is read wrong in round 1, rewritten in round 2 (4 % 2 == 2 % 2), right again.
    assert_eq!(rep.mismatched, 1, "{}", out.console);
    assert_eq!(rep.mismatched_words, 1);
    assert!(out.console.contains("page 4 round 1"), "{}", out.console);
}
