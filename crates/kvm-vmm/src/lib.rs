//! A small test VMM on KVM, built on the rust-vmm crates a Rust VMM uses (`kvm-ioctls`,
//! `kvm-bindings`, `vm-memory`, `vmm-sys-util`), to run real vCPUs over guest RAM that
//! the dynamic-vm engines protect, merge and recycle.
//!
//! A [`Vm`] is guest RAM (a vm-memory [`GuestRam`] of private anonymous memory, which
//! `page_memory::vmm::VmMemoryAdapter` can adopt), one KVM memory slot over it, and
//! vCPUs that the VMM puts in 64-bit long mode itself: identity page tables with 2 MiB
//! pages over the first 4 GiB, a GDT, CR0/CR3/CR4/EFER and the segment registers (see
//! [`abi`] for the layout). The vCPUs start at CPL 3 with IOPL 3 by default
//! ([`Privilege`]): the paravirtual KVM of this project's machines (`kvm_pvm`) emulates
//! CPL-0 guest code instruction by instruction but runs CPL-3 code natively. The guest image ([`GuestImage`]: an ELF executable linked at
//! [`abi::IMAGE_BASE`], loaded by a small parser, or a flat binary) is entered on every
//! vCPU, each on its own host thread. The guest talks through port I/O: a console, calls
//! with 64-bit arguments (reports of results, a round barrier, registrations) that a
//! [`CallHook`] may answer, and a done port. [`run_all`] runs several VMs in one
//! process; [`process`] runs one process per VM (the binary re-executed once per VM,
//! each child's outcome sent back through a pipe).
//!
//! The bare-metal guest of this crate (`guest/`: `#![no_std]`, target
//! `x86_64-unknown-none`, linked at [`abi::IMAGE_BASE`]) is built by the build script with
//! a nested cargo and embedded in the crate: [`guest_image`]. It runs the workloads of
//! [`abi`]: the memory checker ([`workload::Checker`]) and the Per Page Recycler's guest
//! side ([`abi::WORKLOAD_PPR`]: a page allocator calling `ppr-guest`'s hooks over a PIP
//! pool in guest RAM that it registers through [`abi::CALL_REGISTER`]; the host answers
//! with `ppr_host::Recycler::register`, see `tests/ppr.rs`), a hostile PPR guest
//! ([`abi::WORKLOAD_PPR_HOSTILE`]), and the density workload of the repository's
//! `examples/density` ([`workload::Density`], [`abi::WORKLOAD_DENSITY`]). Hosts hold the
//! guests at their round calls with a [`barrier::RoundBarrier`] (engine passes counted).
//!
//! `examples/engines_on_kvm.rs` runs the checker's guests with no engine, under PageONE
//! and under Linux KSM, and prints memory, merged pages, engine CPU, mismatches and the
//! guests' write throughput side by side (`docs/benchmarks.md`, "The engines on real
//! vCPUs"); `examples/density_on_kvm.rs` runs the density workload with no engine, KSM,
//! PageONE, the PPR recycler and PPR + PageONE ("The density workload on real vCPUs");
//! `examples/vms_in_processes.rs` runs checker VMs one process each ([`process`]).
//! What they and the tests set up around the VMs is [`harness`] (skipping where the
//! machine cannot run them, guest RAM adopted by the Linux backend, the PPR pools
//! registered with a recycler, engine threads); the examples' measurements are [`host`]
//! (`/proc` figures) and [`ksm`] (Linux KSM's knobs). The density experiment's runs
//! ([`density::run`]) are shared by `density_on_kvm` and the repository's density demo
//! (`cargo run --release --example density -- --kvm`).
//!
//! ```no_run
//! use std::time::Duration;
//! use kvm_vmm::workload::Checker;
//! use kvm_vmm::{guest_image, Vm, VmConfig};
//!
//! let image = guest_image().expect("the guest was built");
//! let config = Checker { pages: 512, rounds: 4, ..Checker::default() }.config("vm0", 16 << 20);
//! let out = Vm::new(config, &image).unwrap().run(Duration::from_secs(30)).unwrap();
//! let report = Checker::report(&out).unwrap();
//! assert_eq!(report.mismatched, 0);
//! ```
//!
//! A hand-written flat image works too:
//!
//! ```no_run
//! use std::time::Duration;
//! use kvm_vmm::{GuestImage, Vm, VmConfig};
//!
//! // mov dx, 0xE9; mov al, 'A'; out dx, al; mov dx, 0x524; xor eax, eax; out dx, eax
//! let code = vec![0x66, 0xBA, 0xE9, 0x00, 0xB0, b'A', 0xEE, 0x66, 0xBA, 0x24, 0x05, 0x31, 0xC0, 0xEF];
//! let mut vm = Vm::new(VmConfig::new("hello", 8 << 20), &GuestImage::Flat(code)).unwrap();
//! let out = vm.run(Duration::from_secs(10)).unwrap();
//! assert_eq!(out.console, "A");
//! ```

#![cfg(target_os = "linux")]

pub mod abi;
pub mod barrier;
pub mod density;
mod error;
pub mod harness;
pub mod host;
pub mod image;
pub mod ksm;
pub mod process;
mod vm;
pub mod workload;

pub use error::Error;
pub use image::GuestImage;
pub use vm::{
    kvm_usable, open_kvm, run_all, Call, CallHook, GuestRam, Privilege, Vm, VmConfig, VmOutcome,
};

/// Why [`guest_image`] has no guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestUnavailable(pub &'static str);

impl std::fmt::Display for GuestUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the bare-metal guest was not built: {}", self.0)
    }
}

impl std::error::Error for GuestUnavailable {}

/// The bare-metal guest (`guest/`), as the build script built it: an ELF image.
#[cfg(kvm_vmm_guest)]
pub fn guest_image() -> Result<GuestImage, GuestUnavailable> {
    Ok(GuestImage::Elf(
        include_bytes!(env!("KVM_VMM_GUEST_ELF")).to_vec(),
    ))
}

/// The bare-metal guest (`guest/`): not built here, and why.
#[cfg(not(kvm_vmm_guest))]
pub fn guest_image() -> Result<GuestImage, GuestUnavailable> {
    Err(GuestUnavailable(env!("KVM_VMM_GUEST_MISSING")))
}
