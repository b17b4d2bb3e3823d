//! One process per VM: the example re-executes itself once per VM (with `--child 1` and
//! `KVM_VMM_CHILD_VM` naming the VM, `kvm_vmm::process`), each child boots its VM with
//! the memory checker and runs it, under its own PageONE over its own RAM with
//! `--pageone 1` (merge passes back to back, 1 work thread; merging across the
//! processes is not done), and sends the outcome back through its stdout pipe. The
//! parent prints a line per VM: the child's pid, the checker's pages checked and
//! mismatches (must be 0), its write throughput, the VM's wall time and vCPU time, and
//! with PageONE the most pages sharing after a pass (the rounds rewrite every page with
//! unique contents, so by the end nothing is shared) and the child's guest memory at the
//! end.
//!
//! Needs `/dev/kvm` and the guest; with `--pageone 1` root (userfaultfd with kernel
//! faults; a child without it runs no engine and says so). Run with
//! `cargo run --release -p kvm-vmm --example vms_in_processes -- [--vms 4] [--mib 64]
//! [--rounds 8] [--pageone 0]`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_vmm::harness::{self, guest_or_skip, linux_adapter, Worker};
use kvm_vmm::process::{child_vm, send, ChildVm};
use kvm_vmm::workload::Checker;
use kvm_vmm::{abi, Call, GuestImage, Vm};
use page_memory::DomainId;
use pageone::{Config, PageOne};

const MIB: u64 = 1 << 20;
/// The tag of the child's own report (added to the VM's calls before sending).
const CHILD_REPORT: u64 = 0xC41D;

struct Args {
    vms: u64,
    mib: u64,
    rounds: u64,
    pageone: u64,
    child: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        vms: 4,
        mib: 64,
        rounds: 8,
        pageone: 0,
        child: 0,
    };
    common::parse_flags(&mut [
        ("--vms", &mut a.vms),
        ("--mib", &mut a.mib),
        ("--rounds", &mut a.rounds),
        ("--pageone", &mut a.pageone),
        ("--child", &mut a.child),
    ]);
    a
}

fn checker(a: &Args, vm: usize) -> Checker {
    Checker {
        pages: 0,
        rounds: a.rounds,
        stride: 8,
        dup_period: 1024,
        seed: vm as u64,
        call_rounds: false,
    }
}

/// The child's part: VM `vm`, under PageONE if asked and possible; the outcome, with a
/// report of the child's own (pid, whether PageONE ran, pages sharing, guest memory at
/// the end), sent to the parent.
fn child(a: &Args, vm: usize, image: &GuestImage) {
    let config = checker(a, vm).config(format!("vm{vm}"), a.mib * MIB);
    let result = Vm::new(config, image).and_then(|mut v| {
        let engine = if a.pageone != 0 {
            match linux_adapter() {
                Ok(adapter) => {
                    // SAFETY: nothing in this process remaps, madvises or registers the
                    // VM's RAM with another userfaultfd; KVM and the vCPUs read and write
                    // it.
                    let g = unsafe { harness::adopt(&adapter, &v, DomainId(0)) }
                        .map_err(kvm_vmm::Error::Memory)?;
                    let engine = Arc::new(
                        PageOne::new(adapter.memory().clone(), Config::default().work_threads(1))
                            .map_err(|e| kvm_vmm::Error::Memory(e.to_string()))?,
                    );
                    let e = engine.clone();
                    let passes = Worker::spawn("pageone-merge", 0u64, move |most| {
                        e.merge_pass();
                        *most = (*most).max(e.stats().pages_sharing);
                    })
                    .map_err(|e| kvm_vmm::Error::Thread(e.to_string()))?;
                    Some((adapter, g, engine, passes))
                }
                Err(e) => {
                    eprintln!("vm{vm}: no engine: {e}");
                    None
                }
            }
        } else {
            None
        };
        let mut out = v.run(Duration::from_secs(600))?;
        let mut mine = vec![CHILD_REPORT, std::process::id() as u64, 0, 0, 0];
        if let Some((adapter, g, engine, passes)) = engine {
            mine[2] = 1;
            mine[3] = passes.stop();
            mine[4] = adapter.memory().usage().map_or(0, |u| u.total_bytes());
            drop(engine);
            harness::release(&adapter, [g]).map_err(kvm_vmm::Error::Memory)?;
        }
        out.calls.push(Call {
            vcpu: 0,
            code: abi::CALL_REPORT,
            args: mine,
        });
        Ok(out)
    });
    send(&result);
}

fn main() {
    let a = parse_args();
    let Some(image) = guest_or_skip() else { return };
    if let Some(vm) = child_vm().filter(|_| a.child != 0) {
        return child(&a, vm, &image);
    }
    let args: Vec<String> = [
        ("--mib", a.mib),
        ("--rounds", a.rounds),
        ("--pageone", a.pageone),
        ("--child", 1),
    ]
    .iter()
    .flat_map(|(f, v)| [f.to_string(), v.to_string()])
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let children: Vec<ChildVm> = (0..a.vms as usize)
        .map(|vm| ChildVm::spawn(vm, &args))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("spawning the children: {e}"));
    println!(
        "{} VMs x {} MiB, one process each (parent {}), checker {} rounds, {}",
        a.vms,
        a.mib,
        std::process::id(),
        a.rounds,
        if a.pageone != 0 {
            "each child under its own PageONE"
        } else {
            "no engine"
        }
    );
    let mut failed = false;
    for (vm, c) in children.into_iter().enumerate() {
        match c.wait(Duration::from_secs(900)) {
            Ok(out) => {
                let rep = Checker::report(&out).unwrap_or_default();
                let mine = out
                    .reports(CHILD_REPORT)
                    .next()
                    .map(|(_, v)| v.to_vec())
                    .unwrap_or_default();
                let field = |i: usize| mine.get(i).copied().unwrap_or(0);
                failed |= rep.mismatched != 0 || rep.vcpus == 0;
                println!(
                    "vm{vm}: pid {}, {} pages checked, {} mismatched, {:.1} pages written per \
                     Mcycle, wall {:.2} s, vCPU {:.2} s{}",
                    field(0),
                    rep.checked,
                    rep.mismatched,
                    rep.pages_written_per_mcycle(),
                    out.elapsed.as_secs_f64(),
                    out.vcpu_cpu.as_secs_f64(),
                    if field(1) == 1 {
                        format!(
                            ", PageONE: at most {} pages sharing, guest memory at the end {:.1} MiB",
                            field(2),
                            field(3) as f64 / MIB as f64
                        )
                    } else {
                        String::new()
                    }
                );
            }
            Err(e) => {
                failed = true;
                println!("vm{vm}: FAILED: {e}");
            }
        }
    }
    println!("all done in {:.2} s", t.elapsed().as_secs_f64());
    if failed {
        std::process::exit(1);
    }
}
