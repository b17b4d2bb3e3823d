//! The VMM on real KVM vCPUs with hand-assembled flat guests: console, calls, done,
//! several vCPUs and VMs, and the typed errors for unexpected exits and timeouts.
//! Skips (saying why) where `/dev/kvm` is unusable.

use std::sync::Arc;
use std::time::Duration;

use kvm_vmm::abi::{self, IMAGE_BASE};
use kvm_vmm::harness::kvm_or_skip;
use kvm_vmm::{run_all, Error, GuestImage, Privilege, Vm, VmConfig};

/// A tiny x86-64 assembler for the few instructions these guests use.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.0.extend_from_slice(&[0x66, 0xBA]);
        self.0.extend_from_slice(&port.to_le_bytes());
        self
    }
    fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.0.push(0xB8);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `out dx, al`
    fn out8(&mut self) -> &mut Self {
        self.0.push(0xEE);
        self
    }
    /// `out dx, eax`
    fn out32(&mut self) -> &mut Self {
        self.0.push(0xEF);
        self
    }
    /// `in eax, dx`
    fn in32(&mut self) -> &mut Self {
        self.0.push(0xED);
        self
    }
    /// `mov eax, esi` (the vCPU index)
    fn eax_from_esi(&mut self) -> &mut Self {
        self.0.extend_from_slice(&[0x89, 0xF0]);
        self
    }
    fn print(&mut self, s: &str) -> &mut Self {
        self.mov_dx(abi::PORT_CONSOLE);
        for b in s.bytes() {
            self.mov_eax(b as u32).out8();
        }
        self
    }
    fn done(&mut self, status: u32) -> &mut Self {
        self.mov_dx(abi::PORT_DONE).mov_eax(status).out32()
    }
    fn image(&self) -> GuestImage {
        GuestImage::Flat(self.0.clone())
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn flat_guest_prints_calls_and_finishes() {
    if !kvm_or_skip() {
        return;
    }
    let mut a = Asm::default();
    a.print("hi\n");
    // Call 7 with arguments (vCPU index, 0x1_0000_0002), read back the answer and report
    // it: every vCPU reports index + 100.
    a.mov_dx(abi::PORT_ARG_LO).eax_from_esi().out32();
    a.mov_dx(abi::PORT_ARG_HI).mov_eax(0).out32();
    a.mov_dx(abi::PORT_ARG_LO).mov_eax(2).out32();
    a.mov_dx(abi::PORT_ARG_HI).mov_eax(1).out32();
    a.mov_dx(abi::PORT_CALL).mov_eax(7).out32();
    a.mov_dx(abi::PORT_RESULT_LO).in32();
    // push rax's low half as an argument of a report tagged 0x42
    a.0.extend_from_slice(&[0x89, 0xC1]); // mov ecx, eax
    a.mov_dx(abi::PORT_ARG_LO).mov_eax(0x42).out32();
    a.mov_dx(abi::PORT_ARG_HI).mov_eax(0).out32();
    a.0.extend_from_slice(&[0x89, 0xC8]); // mov eax, ecx
    a.mov_dx(abi::PORT_ARG_LO).out32();
    a.mov_dx(abi::PORT_ARG_HI).mov_eax(0).out32();
    a.mov_dx(abi::PORT_CALL).mov_eax(abi::CALL_REPORT).out32();
    a.done(0);
    let hook: kvm_vmm::CallHook = Arc::new(|c| {
        if c.code == 7 {
            assert_eq!(c.args[1], 0x1_0000_0002);
            c.args[0] + 100
        } else {
            0
        }
    });
    let config = VmConfig::new("flat", 8 * MIB).vcpus(3).on_call(hook);
    // The same guest at CPL 0 too.
    let mut vm0 = Vm::new(config.clone().privilege(Privilege::Supervisor), &a.image()).unwrap();
    let out = vm0.run(Duration::from_secs(20)).unwrap();
    assert_eq!(out.console.matches("hi\n").count(), 3, "{:?}", out.console);
    let mut vm = Vm::new(config, &a.image()).unwrap();
    let out = vm.run(Duration::from_secs(20)).unwrap();
    assert_eq!(out.console.matches("hi\n").count(), 3, "{:?}", out.console);
    let mut reported: Vec<(u32, Vec<u64>)> =
        out.reports(0x42).map(|(v, x)| (v, x.to_vec())).collect();
    reported.sort();
    assert_eq!(
        reported,
        vec![(0, vec![100]), (1, vec![101]), (2, vec![102])]
    );
    assert!(matches!(
        vm.run(Duration::from_secs(1)),
        Err(Error::AlreadyRun)
    ));
}

#[test]
fn several_vms_run_in_one_process() {
    if !kvm_or_skip() {
        return;
    }
    let mut vms: Vec<Vm> = (0..4)
        .map(|i| {
            let mut a = Asm::default();
            a.print(&format!("vm{i}\n")).done(0);
            Vm::new(VmConfig::new(format!("vm{i}"), 8 * MIB), &a.image()).unwrap()
        })
        .collect();
    let results = run_all(&mut vms, Duration::from_secs(20));
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap().console, format!("vm{i}\n"));
    }
}

#[test]
fn unexpected_exits_are_typed_with_reason_and_rip() {
    if !kvm_or_skip() {
        return;
    }
    // hlt at CPL 0: an exit this VMM does not expect; RIP is past the hlt.
    let mut vm = Vm::new(
        VmConfig::new("hlt", 8 * MIB).privilege(Privilege::Supervisor),
        &GuestImage::Flat(vec![0x90, 0xF4]),
    )
    .unwrap();
    match vm.run(Duration::from_secs(20)) {
        Err(Error::UnexpectedExit { vcpu, reason, rip }) => {
            assert_eq!(vcpu, 0);
            assert_eq!(reason, "Hlt");
            assert_eq!(rip, IMAGE_BASE + 2);
        }
        other => panic!("{other:?}"),
    }
    // An out to a port nobody serves.
    let mut a = Asm::default();
    a.mov_dx(0x1234).mov_eax(1).out32();
    let mut vm = Vm::new(VmConfig::new("port", 8 * MIB), &a.image()).unwrap();
    let e = vm.run(Duration::from_secs(20)).unwrap_err();
    assert!(e.to_string().contains("4-byte out to port 0x1234"), "{e}");
    assert!(
        e.to_string().contains(&format!("{:#x}", IMAGE_BASE + 10)),
        "{e}"
    );
    // hlt at CPL 3 is a #GP, and ud2 an #UD: with no IDT, a triple fault, KVM's shutdown
    // exit.
    let mut vm = Vm::new(
        VmConfig::new("hlt3", 8 * MIB),
        &GuestImage::Flat(vec![0xF4]),
    )
    .unwrap();
    let e = vm.run(Duration::from_secs(20)).unwrap_err();
    assert!(
        matches!(&e, Error::UnexpectedExit { reason, .. } if reason == "Shutdown"),
        "{e}"
    );
    let mut vm = Vm::new(
        VmConfig::new("ud2", 8 * MIB),
        &GuestImage::Flat(vec![0x0F, 0x0B]),
    )
    .unwrap();
    let e = vm.run(Duration::from_secs(20)).unwrap_err();
    assert!(
        matches!(&e, Error::UnexpectedExit { reason, .. } if reason == "Shutdown"),
        "{e}"
    );
    // A failure status on the done port.
    let mut a = Asm::default();
    a.print("oops").done(3);
    let mut vm = Vm::new(VmConfig::new("fail", 8 * MIB), &a.image()).unwrap();
    let e = vm.run(Duration::from_secs(20)).unwrap_err();
    assert!(matches!(&e, Error::GuestFailed { status: 3, .. }), "{e}");
    assert!(e.to_string().contains("oops"), "{e}");
}

#[test]
fn a_spinning_guest_times_out_and_its_vcpus_are_kicked() {
    if !kvm_or_skip() {
        return;
    }
    // jmp $ on two vCPUs: only the kick gets them out of KVM_RUN.
    let mut vm = Vm::new(
        VmConfig::new("spin", 8 * MIB).vcpus(2),
        &GuestImage::Flat(vec![0xEB, 0xFE]),
    )
    .unwrap();
    match vm.run(Duration::from_millis(300)) {
        Err(Error::Timeout { running, .. }) => assert_eq!(running.len(), 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_configurations_and_images_are_refused() {
    let flat = GuestImage::Flat(vec![0xF4]);
    let e = Vm::new(VmConfig::new("x", 8 * MIB).vcpus(0), &flat).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let e = Vm::new(VmConfig::new("x", 3 * MIB), &flat).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let big = GuestImage::Flat(vec![0x90; 3 << 20]);
    let e = Vm::new(VmConfig::new("x", 8 * MIB), &big).unwrap_err();
    assert!(matches!(e, Error::ImageTooBig { .. }), "{e}");
    let e = Vm::new(VmConfig::new("x", 8 * MIB), &GuestImage::Elf(vec![1, 2, 3])).unwrap_err();
    assert!(matches!(e, Error::ImageLoad(_)), "{e}");
}

#[test]
fn kvm_errors_say_missing_or_denied() {
    assert!(Error::KvmMissing
        .to_string()
        .contains("/dev/kvm is missing"));
    assert!(Error::KvmDenied.to_string().contains("/dev/kvm is denied"));
}
