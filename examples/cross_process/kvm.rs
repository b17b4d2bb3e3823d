//! The VMM processes as real guests: each VM is a process of the workspace's test VMM
//! (`crates/kvm-vmm`, this executable started again as `kvm_vmm::process` child), whose
//! vCPU writes guest RAM through KVM's page tables, running the guest's memory checker
//! (`kvm_vmm::workload::Checker`, one vCPU).
//!
//! Each VM's RAM is `--mib` MiB of data (plus the guest's own 4 MiB below
//! `kvm_vmm::abi::DATA_BASE`). The checker fills every data page with a pattern of its
//! page number, the same page for page in every VM (VMs booted from one image), then
//! calls the host; the host holds the vCPU there until both engines' measurements are
//! taken. Then the checker runs `--rounds` rounds, each rewriting a quarter of its pages
//! with contents of its own VM's and re-reading every page: a page that does not hold
//! what the guest last wrote is a lost write (`lost`, must be 0), while the engine keeps
//! merging. `writes` counts the guest's rewrites.
//!
//! The engines and what is measured are those of the plain processes: the service in
//! this process with an agent in each VM's process (its regions: the VM's RAM; the
//! agent's fault thread resolves the vCPU's writes to pages the service protected), or
//! each VM's RAM marked `MADV_MERGEABLE` for ksmd. Convergence is timed from the moment
//! every VM has filled its RAM to the moment `pages_sharing` reaches the data pages of
//! every VM but one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_vmm::process::{child_vm, send, ChildVm};
use kvm_vmm::workload::Checker;
use kvm_vmm::{abi, CallHook, Vm};
use page_memory::vmm::vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use pageoned::agent::{Agent, AgentConfig};
use pageoned::demo::{pss, thread_cpu};
use pageoned::service::{Service, ServiceConfig};

use crate::run::{Args, Checked, KsmRun, Outcome};

/// Where a child learns how to deduplicate: `ksm`, or the service's socket.
const DEDUP_ENV: &str = "CROSS_PROCESS_KVM_DEDUP";
/// The directory of the run's gate files.
const GATE_ENV: &str = "CROSS_PROCESS_KVM_GATE";
/// Data MiB per VM, and the checker's rounds.
const SIZE_ENV: &str = "CROSS_PROCESS_KVM_SIZE";

const MIB: u64 = 1 << 20;

/// Whether real guests can run here; if not, why.
pub fn usable() -> Result<(), String> {
    kvm_vmm::kvm_usable().map_err(|e| e.to_string())?;
    kvm_vmm::guest_image().map_err(|e| e.to_string())?;
    Ok(())
}

/// In a child: runs its VM and returns `true`; in the parent `false`.
pub fn child_main() -> bool {
    let Some(vm) = child_vm() else {
        return false;
    };
    if std::env::var_os(DEDUP_ENV).is_none() {
        return false;
    }
    child(vm);
    true
}

fn child(vm: usize) {
    let image = kvm_vmm::guest_image().expect("the parent checked the guest");
    let dedup = std::env::var(DEDUP_ENV).expect("the dedup mode");
    let gate = PathBuf::from(std::env::var(GATE_ENV).expect("the gate directory"));
    let size = std::env::var(SIZE_ENV).expect("the size");
    let (mib, rounds) = size.split_once(' ').expect("MiB and rounds");
    let (mib, rounds): (u64, u64) = (mib.parse().unwrap(), rounds.parse().unwrap());
    let checker = Checker {
        pages: mib * 256,
        rounds,
        stride: 4,
        dup_period: 0,
        // Rewrites are the VM's own contents (the fill is the same in every VM).
        seed: 1 + vm as u64,
        call_rounds: true,
    };
    let hook: CallHook = Arc::new(move |c| {
        if c.code == abi::CALL_ROUND && c.args.first() == Some(&0) {
            // Filled: say so, and wait for the parent's measurements.
            let _ = std::fs::write(gate.join(format!("filled-{vm}")), b"");
            let t0 = Instant::now();
            while !gate.join("go").exists() && t0.elapsed() < Duration::from_secs(900) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        0
    });
    let config = checker
        .config(format!("xp{vm}"), abi::DATA_BASE + mib * MIB)
        .vcpus(1)
        .on_call(hook);
    let result = Vm::new(config, &image).and_then(|mut v| {
        let ram = v.memory();
        let base = ram.get_host_address(GuestAddress(0)).expect("guest RAM");
        let len: usize = ram.iter().map(|r| r.len() as usize).sum();
        let mut agent = None;
        if dedup == "ksm" {
            // SAFETY: the VM's RAM, this process's own mapping; MADV_MERGEABLE only lets
            // ksmd merge it, which keeps its contents.
            unsafe {
                rustix::mm::madvise(base.cast(), len, rustix::mm::Advice::LinuxMergeable)
                    .expect("MADV_MERGEABLE")
            };
        } else {
            let a = Agent::start(AgentConfig::new(&dedup).with_name(&format!("kvm-{vm}")))
                .expect("the agent");
            // SAFETY: the VM's RAM, private anonymous memory of this process that stays
            // mapped until the VM is dropped, after the agent; nothing else remaps or
            // registers it.
            let region = unsafe { a.add_region(base, len) }.expect("handing the RAM over");
            assert!(
                a.wait_registered(Duration::from_secs(60)),
                "{:?}",
                a.last_error()
            );
            agent = Some((a, region));
        }
        let out = v.run(Duration::from_secs(900));
        if let Some((a, region)) = agent {
            a.remove_region(region).expect("taking the RAM back");
        }
        out
    });
    send(&result);
}

/// The children of one run.
struct Children {
    vms: Vec<ChildVm>,
    gate: PathBuf,
}

impl Children {
    fn spawn(a: &Args, dedup: &str, gate: &Path) -> Children {
        std::fs::create_dir_all(gate).unwrap();
        // SAFETY (of the environment): set before any child starts, by the main thread,
        // while no other thread of this process reads the environment.
        std::env::set_var(DEDUP_ENV, dedup);
        std::env::set_var(GATE_ENV, gate);
        std::env::set_var(SIZE_ENV, format!("{} {}", a.mib, a.rounds));
        let vms = (0..a.vms)
            .map(|vm| ChildVm::spawn(vm, &[]).expect("spawning a VM"))
            .collect();
        Children {
            vms,
            gate: gate.to_path_buf(),
        }
    }

    /// Waits until every VM filled its RAM (and holds its vCPU).
    fn wait_filled(&self) -> Result<(), String> {
        let t0 = Instant::now();
        while !(0..self.vms.len()).all(|vm| self.gate.join(format!("filled-{vm}")).exists()) {
            if t0.elapsed() > Duration::from_secs(300) {
                return Err("the VMs did not fill their RAM within 300 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn pss(&self) -> u64 {
        self.vms.iter().map(|c| pss(c.id())).sum()
    }

    /// CPU of the VMs' agents (their request and fault threads).
    fn agents_cpu(&self) -> Duration {
        self.vms
            .iter()
            .map(|c| thread_cpu(c.id(), &["pageoned-agent", "page-memory-uff"]))
            .sum()
    }

    /// Lets the VMs run their rounds and collects what their checkers saw.
    fn finish(self) -> Result<Checked, String> {
        std::fs::write(self.gate.join("go"), b"").map_err(|e| e.to_string())?;
        let mut c = Checked {
            writes: 0,
            lost: 0,
            longest_write_us: 0,
            mismatches: 0,
        };
        for (vm, child) in self.vms.into_iter().enumerate() {
            let out = child.wait(Duration::from_secs(900))?;
            let rep = Checker::report(&out).ok_or(format!("VM {vm}: no checker report"))?;
            c.writes += rep.rewritten;
            c.lost += rep.mismatched;
        }
        Ok(c)
    }
}

fn want(a: &Args) -> u64 {
    a.mib as u64 * 256 * (a.vms as u64 - 1)
}

/// The pageoned run on real guests.
pub fn pageoned_run(a: &Args, threads: usize, dir: &Path) -> Result<Outcome, String> {
    let socket = dir.join(format!("kvm-pageoned-{threads}.sock"));
    let me = std::process::id();
    let own0 = pss(me);
    let engine = pageone::Config::default().work_threads(threads);
    let svc = Arc::new(
        Service::start(
            ServiceConfig::new(&socket)
                .with_engine(engine)
                .with_run_passes(false),
        )
        .map_err(|e| e.to_string())?,
    );
    let children = Children::spawn(
        a,
        socket.to_str().expect("a UTF-8 path"),
        &dir.join(format!("gate-pageoned-{threads}")),
    );
    children.wait_filled()?;
    let before = children.pss();
    let cpu = |c: &Children| (thread_cpu(me, &["pageoned", "pageone"]), c.agents_cpu());
    let cpu0 = cpu(&children);
    let t0 = Instant::now();
    let domain = loop {
        // The agents registered before their VMs started: the domain is there.
        if let Some(&d) = svc.domains().first() {
            break d;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let want = want(a);
    for _ in 0..a.max_passes {
        let r = svc.merge_pass(domain).ok_or("the domain's engine")?;
        let st = svc.engine_stats(domain).unwrap();
        if st.pages_sharing >= want || (r.quiet() && st.pages_sharing > 0) {
            break;
        }
    }
    let wall = t0.elapsed();
    let cpu1 = cpu(&children);
    let (service_cpu, agents_cpu) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    println!(
        "pageoned {threads}t: CPU {:.3} s in the service, {:.3} s in the agents",
        service_cpu.as_secs_f64(),
        agents_cpu.as_secs_f64()
    );
    let spent = service_cpu + agents_cpu;
    let merged = svc.engine_stats(domain).unwrap().pages_sharing;
    let own = pss(me).saturating_sub(own0);
    let after = children.pss() + own;
    // Merging goes on while the guests rewrite and re-read their pages.
    let done = Arc::new(AtomicBool::new(false));
    let passes = {
        let (svc, done) = (svc.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                svc.merge_pass(domain);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let checked = children.finish();
    done.store(true, Ordering::Relaxed);
    passes.join().unwrap();
    let requests = svc.stats().requests;
    drop(svc);
    Ok(Outcome {
        engine: format!("pageoned {threads}t"),
        merged,
        before,
        after,
        own,
        cpu: spent,
        wall,
        checked: checked?,
        round_trips: Some(requests),
    })
}

/// The KSM run on real guests.
pub fn ksm_run(a: &Args, dir: &Path) -> Result<Outcome, String> {
    let run = KsmRun::claim()?;
    let children = Children::spawn(a, "ksm", &dir.join("gate-ksm"));
    children.wait_filled()?;
    let before = children.pss();
    let k = run.converge(want(a));
    let after = children.pss();
    let checked = children.finish()?;
    Ok(k.outcome(before, after, checked))
}
