//! The density workload on real vCPUs, per set-up: no engine, Linux KSM
//! (`MADV_MERGEABLE` on the same guest RAM), PageONE, the Per Page Recycler (PPR), and
//! PPR + PageONE (`PageOne::with_hook` with the recycler inside its scan).
//!
//! Every VM runs the guest's density workload (`kvm_vmm::workload::Density`, the
//! fractions of `examples/density`'s plan): an OS image identical in every VM (5 % of
//! its pages), private OS pages (3.5 %), zeroed pages (2 %), and an application that
//! allocates up to 75 % of the VM and frees it again, `--cycles` times, in `--steps`
//! steps up and as many down, each VM at its own phase; every page it allocates gets
//! fresh unique contents. The guest's page allocator calls `ppr-guest`'s hooks over a
//! PIP pool it registers; only the PPR set-ups register it (the others answer 0: hooks
//! off, as a guest without PPR).
//!
//! The guests wait at a barrier after boot and after every step, all VMs together,
//! until the engine has had its say (counted in its own passes): after boot, until it
//! converged (PageONE: 10 merge passes; KSM: 3 full scans; PPR: 2 recycler passes;
//! PPR + PageONE: 10 merge passes); after a step, one engine period (PageONE: 1 merge
//! pass; KSM: 1 full scan; PPR: 2 recycler passes; PPR + PageONE: 2 passes, base or
//! merge, in which the recycler runs); no engine: no wait. Memory is sampled at every
//! barrier, with the guests held.
//!
//! The engines run periodically, as deployed: PageONE's passes are driven like its
//! daemon (`PageOne::start`) by a thread of this example that counts them: a base pass
//! every `--base-ms` (only with a hook: the recycler), a merge pass every `--merge-ms`;
//! the recycler alone passes every `--reclaim-ms`; KSM `sleep_millisecs` =
//! `--ksm-sleep-ms`, `pages_to_scan` = `--ksm-pages`, `use_zero_pages=1`. One PageONE
//! work thread.
//!
//! Engine CPU is the run time (`/proc/.../schedstat`) of the engine's own threads:
//! PageONE's work threads, the pass-driving thread, the Linux backend's userfaultfd
//! fault thread (every first write to a protected page is resolved there) and the
//! recycler's thread; KSM: ksmd. Not included for either: the faults' cost in the
//! faulting vCPU threads (KSM's copy-on-write, the userfaultfd round trip's guest
//! side), which shows in the guests' progress. "to converge after boot" is that CPU
//! from the engine's start (before the guests boot) until the guests are released after
//! boot, also per page of memory saved then against the no-engine runs; "per page
//! recycled" is the whole run's engine CPU divided by the pages recycled.
//!
//! Needs `/dev/kvm`, the guest (target `x86_64-unknown-none`), root (userfaultfd with
//! kernel faults, KSM's sysfs knobs) and no other KSM user; says what is missing and
//! skips that set-up otherwise. Run with
//! `cargo run --release -p kvm-vmm --example density_on_kvm -- [--vms 4] [--mib 64]
//! [--steps 4] [--cycles 2] [--reps 1]`.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use kvm_vmm::barrier::RoundBarrier;
use kvm_vmm::workload::{Density, DensityReport};
use kvm_vmm::{abi, guest_image, kvm_usable, run_all, CallHook, GuestImage, Vm};
use page_memory::linux::LinuxMemory;
use page_memory::vmm::vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use page_memory::vmm::VmMemoryAdapter;
use page_memory::{DomainId, PageId, PageMemory, RegionInfo, ScanHook};
use pageone::{Config, PageOne};
use pip::PoolView;
use ppr_host::{PoolMemory, Recycler};

const KSM: &str = "/sys/kernel/mm/ksm";
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    None,
    Ksm,
    PageOne,
    Ppr,
    PprPageOne,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::None => "no engine",
            Setup::Ksm => "KSM",
            Setup::PageOne => "PageONE",
            Setup::Ppr => "PPR recycler",
            Setup::PprPageOne => "PPR + PageONE",
        }
    }

    fn ppr(self) -> bool {
        matches!(self, Setup::Ppr | Setup::PprPageOne)
    }

    /// Engine progress to wait for after boot and after a step.
    fn waits(self) -> (u64, u64) {
        match self {
            Setup::None => (0, 0),
            Setup::Ksm => (3, 1),
            Setup::PageOne => (10, 1),
            Setup::Ppr => (2, 2),
            Setup::PprPageOne => (10, 2),
        }
    }
}

struct Args {
    vms: u64,
    mib: u64,
    steps: u64,
    cycles: u64,
    reps: u64,
    base_ms: u64,
    merge_ms: u64,
    reclaim_ms: u64,
    ksm_sleep_ms: u64,
    ksm_pages: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        vms: 4,
        mib: 64,
        steps: 4,
        cycles: 2,
        reps: 1,
        base_ms: 50,
        merge_ms: 200,
        reclaim_ms: 50,
        ksm_sleep_ms: 20,
        ksm_pages: 4096,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v: u64 = argv
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} needs a number", argv[i]));
        match argv[i].as_str() {
            "--vms" => a.vms = v,
            "--mib" => a.mib = v,
            "--steps" => a.steps = v,
            "--cycles" => a.cycles = v,
            "--reps" => a.reps = v,
            "--base-ms" => a.base_ms = v,
            "--merge-ms" => a.merge_ms = v,
            "--reclaim-ms" => a.reclaim_ms = v,
            "--ksm-sleep-ms" => a.ksm_sleep_ms = v,
            "--ksm-pages" => a.ksm_pages = v,
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    a
}

fn ksm_read(knob: &str) -> String {
    fs::read_to_string(format!("{KSM}/{knob}"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn ksm_num(knob: &str) -> u64 {
    ksm_read(knob).parse().unwrap_or(0)
}

fn ksm_write(knob: &str, v: &str) -> std::io::Result<()> {
    fs::write(format!("{KSM}/{knob}"), v)
}

fn ksmd_pid() -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "ksmd")
            .then_some(pid)
    })
}

fn schedstat(path: &str) -> Duration {
    let ns = fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// Run time of this process's engine threads (by name: PageONE's work threads, the
/// pass driver, the Linux backend's fault threads, the recycler).
fn engine_threads_cpu() -> Duration {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            ["pageone-", "page-memory-", "ppr-recycler"]
                .iter()
                .any(|p| comm.starts_with(p))
        })
        .map(|t| schedstat(&t.path().join("schedstat").to_string_lossy()))
        .sum()
}

/// `Pss` (bytes) of this process's mappings inside `ranges`.
fn pss(ranges: &[(usize, usize)]) -> u64 {
    let text = fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut total, mut inside) = (0, false);
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let first = f.next().unwrap_or("");
        if !first.ends_with(':') {
            if let Some((s, e)) = first.split_once('-') {
                let s = usize::from_str_radix(s, 16).unwrap_or(0);
                let e = usize::from_str_radix(e, 16).unwrap_or(0);
                inside = ranges.iter().any(|&(a, b)| s < b && e > a);
            }
        } else if inside && first == "Pss:" {
            total += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        }
    }
    total
}

/// The physical frame of the kernel's shared zero page (what a read of fresh anonymous
/// memory maps), from `/proc/self/pagemap` (root sees frame numbers).
fn zero_pfn() -> Option<u64> {
    static PFN: OnceLock<Option<u64>> = OnceLock::new();
    *PFN.get_or_init(|| {
        // SAFETY: a fresh private anonymous page of our own, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p` is a readable page just mapped; reading maps the zero page.
        let _ = unsafe { (p as *const u8).read_volatile() };
        let pfn = pagemap(p as usize, 1)
            .and_then(|e| e.first().copied())
            .filter(|e| e >> 63 == 1)
            .map(|e| e & PFN_MASK);
        // SAFETY: the page mapped above, not used afterwards.
        unsafe { libc::munmap(p, PAGE as usize) };
        pfn
    })
}

const PFN_MASK: u64 = (1 << 55) - 1;

/// `pages` entries of `/proc/self/pagemap` from address `addr`.
fn pagemap(addr: usize, pages: usize) -> Option<Vec<u64>> {
    let f = fs::File::open("/proc/self/pagemap").ok()?;
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, (addr as u64 / PAGE) * 8).ok()?;
    Some(
        buf.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

/// Bytes of distinct physical pages mapped in `ranges` (the kernel's zero page not
/// counted; a KSM page mapped by many guest pages counted once), from
/// `/proc/self/pagemap`; `None` without frame numbers (not root).
fn distinct_resident(ranges: &[(usize, usize)]) -> Option<u64> {
    let zero = zero_pfn()?;
    let mut frames = HashSet::new();
    for &(a, b) in ranges {
        for e in pagemap(a, (b - a) / PAGE as usize)? {
            let pfn = e & PFN_MASK;
            if e >> 63 == 1 && pfn != zero {
                if pfn == 0 {
                    return None;
                }
                frames.insert(pfn);
            }
        }
    }
    Some(frames.len() as u64 * PAGE)
}

/// KSM's knobs as they were; written back on drop.
struct KsmRestore(Vec<(&'static str, String)>);

impl Drop for KsmRestore {
    fn drop(&mut self) {
        for (k, v) in self.0.iter().rev() {
            let _ = ksm_write(k, v);
        }
    }
}

/// A guest's PIP pool, in guest RAM, as the host sees it.
struct GuestPool {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pointer is into guest RAM that stays mapped while the VMs and the adapter
// live (`run` drops the engines and the recycler before the VMs); only accessed
// atomically (pip).
unsafe impl Send for GuestPool {}
// SAFETY: as for Send.
unsafe impl Sync for GuestPool {}

impl PoolMemory for GuestPool {
    fn view(&self) -> Option<PoolView<'_>> {
        // SAFETY: see the Send impl.
        unsafe { PoolView::from_raw(self.ptr, self.len) }.ok()
    }
}

/// Per VM, once its RAM is adopted: the guest RAM's host base and its region.
type Targets = Arc<Mutex<Vec<Option<(usize, RegionInfo)>>>>;

/// The recycler, registered with pools while PageONE already holds it as its hook.
struct SharedRecycler(RwLock<Recycler>);

impl ScanHook<LinuxMemory> for SharedRecycler {
    fn examine(&self, memory: &LinuxMemory, page: PageId) -> bool {
        self.0.read().unwrap().examine(memory, page)
    }
}

/// One sample, taken at a barrier with the guests held.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// `Pss` of the guest RAM's mappings (a mapping that the kernel merged with a
    /// neighbour counts whole).
    pss: u64,
    /// Distinct physical pages mapped in the guest RAM, bytes (`/proc/self/pagemap`).
    resident: Option<u64>,
    /// The Linux backend's usage (`LinuxUsage::total_bytes`), where there is one.
    usage: Option<u64>,
    /// Pages sharing a merged page (beyond the first).
    merged: u64,
    /// Pages merged with the zero page.
    zero: u64,
    /// Pages recycled so far.
    recycled: u64,
    /// Engine CPU so far.
    cpu: Duration,
}

impl Sample {
    /// The memory the guest RAM uses: the backend's usage where there is one (the
    /// guests' private memory plus the canonical store; page tables miss store pages
    /// not mapped into the guest yet), else the distinct resident pages (else `Pss`).
    fn memory(&self) -> u64 {
        self.usage.or(self.resident).unwrap_or(self.pss)
    }
}

/// What one set-up measured.
#[derive(Clone, Debug, Default)]
struct Row {
    boot: Sample,
    steps: Vec<Sample>,
    end: Sample,
    engine_cpu: Duration,
    run_wall: Duration,
    report: DensityReport,
    timeouts: u64,
}

type Probe = Box<dyn Fn() -> Sample + Send>;

fn run(setup: Setup, a: &Args, image: &GuestImage) -> Result<Row, String> {
    let mem = a.mib * MIB;
    let plan = Density::plan(mem, a.steps, a.cycles);
    let n = a.vms as usize;
    let last = plan.last_round();
    let (boot_wait, step_wait) = setup.waits();
    let barrier = Arc::new(RoundBarrier::new(n as u32, Duration::from_secs(300)));
    let progress = Arc::new(AtomicU64::new(0));
    let probe: Arc<Mutex<Option<Probe>>> = Arc::default();
    let samples: Arc<Mutex<Vec<(u64, Sample)>>> = Arc::default();
    let recycler = Arc::new(SharedRecycler(RwLock::new(Recycler::new())));
    let targets: Targets = Arc::new(Mutex::new(vec![None; n]));
    let hook = |vm: usize| -> CallHook {
        let (barrier, progress, probe, samples) = (
            barrier.clone(),
            progress.clone(),
            probe.clone(),
            samples.clone(),
        );
        let (recycler, targets) = (recycler.clone(), targets.clone());
        Arc::new(move |c| match c.code {
            abi::CALL_REGISTER if c.args.first() == Some(&abi::REGISTER_PIP_POOL) => {
                if !setup.ppr() {
                    return 0;
                }
                let (Some(&addr), Some(&len)) = (c.args.get(1), c.args.get(2)) else {
                    return 0;
                };
                let Some((base, region)) = targets.lock().unwrap()[vm] else {
                    return 0;
                };
                let pool = GuestPool {
                    ptr: (base + addr as usize) as *const u8,
                    len: len as usize,
                };
                let r = recycler.0.write().unwrap().register(
                    Arc::new(pool),
                    vm as u32 + 1,
                    0xDE25_17E0_0000_0000 ^ (vm as u64) << 24 ^ addr,
                    region,
                    abi::PPR_FRAME_OFFSET,
                );
                r.is_ok() as u64
            }
            abi::CALL_ROUND => {
                let round = c.args[0];
                let more = if round == 0 { boot_wait } else { step_wait };
                let p = || progress.load(Ordering::Acquire);
                barrier.wait(round, more, &p, &mut || {
                    if let Some(probe) = &*probe.lock().unwrap() {
                        samples.lock().unwrap().push((round, probe()));
                    }
                });
                0
            }
            _ => 0,
        })
    };
    let mut vms: Vec<Vm> = (0..n)
        .map(|i| {
            let w = Density {
                phase: (i as u64 * 2 * a.steps) / a.vms.max(1),
                seed: 0xA5A5_0000 + i as u64,
                ..plan
            };
            Vm::new(w.config(format!("vm{i}"), mem).on_call(hook(i)), image)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let ranges: Vec<(usize, usize)> = vms
        .iter()
        .flat_map(|vm| {
            vm.memory()
                .iter()
                .map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len() as usize))
                .collect::<Vec<_>>()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut restore = None;
    let mut adopted = None;
    let mut engine_keep = None;
    let ksmd = if setup == Setup::Ksm {
        Some(ksmd_pid().ok_or("no ksmd (a kernel without KSM)")?)
    } else {
        None
    };
    let cpu_now: Arc<dyn Fn() -> Duration + Send + Sync> = match ksmd {
        Some(pid) => Arc::new(move || schedstat(&format!("/proc/{pid}/schedstat"))),
        None => Arc::new(engine_threads_cpu),
    };
    let cpu0 = cpu_now();
    if matches!(setup, Setup::PageOne | Setup::Ppr | Setup::PprPageOne) {
        let memory =
            LinuxMemory::new().map_err(|e| format!("the Linux backend cannot run here: {e}"))?;
        let adapter = Arc::new(VmMemoryAdapter::new(Arc::new(memory)));
        let mut guests = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            // SAFETY: nothing in this process remaps, madvises or registers the guests'
            // RAM with another userfaultfd; KVM and the vCPUs read and write it.
            let g =
                unsafe { adapter.adopt(vm.memory(), DomainId(0)) }.map_err(|e| e.to_string())?;
            let id = g.regions()[0].region;
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
            targets.lock().unwrap()[i] = Some((base, region));
            guests.push(g);
        }
        let engine = match setup {
            Setup::PageOne => Some(Arc::new(
                PageOne::new(adapter.memory().clone(), Config::default().work_threads(1))
                    .map_err(|e| e.to_string())?,
            )),
            Setup::PprPageOne => Some(Arc::new(
                PageOne::with_hook(
                    adapter.memory().clone(),
                    Config::default().work_threads(1),
                    recycler.clone(),
                )
                .map_err(|e| e.to_string())?,
            )),
            _ => None,
        };
        let (ad, e, r, cpu) = (
            adapter.clone(),
            engine.clone(),
            recycler.clone(),
            cpu_now.clone(),
        );
        let rr = ranges.clone();
        *probe.lock().unwrap() = Some(Box::new(move || {
            let s = e.as_ref().map(|e| e.stats()).unwrap_or_default();
            Sample {
                pss: pss(&rr),
                resident: distinct_resident(&rr),
                usage: ad.memory().usage().ok().map(|u| u.total_bytes()),
                merged: s.pages_sharing,
                zero: s.zero_pages,
                recycled: r.0.read().unwrap().stats().recycled,
                cpu: cpu().saturating_sub(cpu0),
            }
        }));
        let (st, pr) = (stop.clone(), progress.clone());
        let (base, merge, reclaim) = (
            Duration::from_millis(a.base_ms),
            Duration::from_millis(a.merge_ms),
            Duration::from_millis(a.reclaim_ms),
        );
        let driver = match engine.clone() {
            // PageONE's daemon loop, with its passes counted: a merge pass when due,
            // else a base pass when there is a hook.
            Some(engine) => std::thread::Builder::new()
                .name("pageone-driver".into())
                .spawn(move || {
                    let with_hook = setup == Setup::PprPageOne;
                    let mut last_merge = Instant::now() - merge;
                    while !st.load(Ordering::Acquire) {
                        if last_merge.elapsed() + base / 2 >= merge {
                            last_merge = Instant::now();
                            engine.merge_pass();
                        } else if with_hook {
                            engine.base_pass();
                        } else {
                            std::thread::sleep(base);
                            continue;
                        }
                        pr.fetch_add(1, Ordering::Release);
                        std::thread::sleep(base);
                    }
                }),
            None => {
                let (r, ad) = (recycler.clone(), adapter.clone());
                std::thread::Builder::new()
                    .name("ppr-recycler".into())
                    .spawn(move || {
                        while !st.load(Ordering::Acquire) {
                            r.0.read().unwrap().scan_pass(&**ad.memory());
                            pr.fetch_add(1, Ordering::Release);
                            std::thread::sleep(reclaim);
                        }
                    })
            }
        }
        .map_err(|e| e.to_string())?;
        threads.push(driver);
        engine_keep = engine;
        adopted = Some((adapter, guests));
    } else if setup == Setup::Ksm {
        if ksm_num("run") != 0 || ksm_num("pages_sharing") != 0 {
            return Err("KSM is in use by someone else (run != 0 or pages merged)".into());
        }
        let knobs = ["run", "sleep_millisecs", "pages_to_scan", "use_zero_pages"];
        restore = Some(KsmRestore(
            knobs.iter().map(|&k| (k, ksm_read(k))).collect(),
        ));
        for &(base, end) in &ranges {
            // SAFETY: guest RAM of our VMs; MADV_MERGEABLE only lets ksmd merge it.
            if unsafe { libc::madvise(base as *mut libc::c_void, end - base, libc::MADV_MERGEABLE) }
                != 0
            {
                return Err(format!(
                    "MADV_MERGEABLE: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        let set =
            |k: &str, v: &str| ksm_write(k, v).map_err(|e| format!("KSM's {k} (needs root): {e}"));
        set("sleep_millisecs", &a.ksm_sleep_ms.to_string())?;
        set("pages_to_scan", &a.ksm_pages.to_string())?;
        set("use_zero_pages", "1")?;
        let (rr, cpu) = (ranges.clone(), cpu_now.clone());
        *probe.lock().unwrap() = Some(Box::new(move || Sample {
            pss: pss(&rr),
            resident: distinct_resident(&rr),
            usage: None,
            merged: ksm_num("pages_sharing"),
            zero: ksm_num("ksm_zero_pages"),
            recycled: 0,
            cpu: cpu().saturating_sub(cpu0),
        }));
        let scans0 = ksm_num("full_scans");
        set("run", "1")?;
        let (st, pr) = (stop.clone(), progress.clone());
        threads.push(std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                pr.store(
                    ksm_num("full_scans").saturating_sub(scans0),
                    Ordering::Release,
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    } else {
        let rr = ranges.clone();
        *probe.lock().unwrap() = Some(Box::new(move || Sample {
            pss: pss(&rr),
            resident: distinct_resident(&rr),
            ..Sample::default()
        }));
    }
    let t0 = Instant::now();
    let results = run_all(&mut vms, Duration::from_secs(900));
    let run_wall = t0.elapsed();
    let engine_cpu = cpu_now().saturating_sub(cpu0);
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    let mut row = Row {
        engine_cpu,
        run_wall,
        timeouts: barrier.timeouts(),
        ..Row::default()
    };
    for (round, s) in samples.lock().unwrap().iter() {
        match *round {
            0 => row.boot = *s,
            r if r == last => row.end = *s,
            _ => row.steps.push(*s),
        }
    }
    for r in results {
        let out = r.map_err(|e| e.to_string())?;
        let rep = Density::report(&out).ok_or("no density report")?;
        if rep.corrupt != 0 {
            eprintln!("{}: {}", setup.name(), out.console);
        }
        row.report.add(&rep);
    }
    if setup == Setup::Ksm {
        let _ = ksm_write("run", "2");
        let t = Instant::now();
        while ksm_num("pages_shared") + ksm_num("pages_sharing") > 0
            && t.elapsed() < Duration::from_secs(120)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(restore);
    drop(engine_keep);
    *probe.lock().unwrap() = None;
    if let Some((adapter, guests)) = adopted {
        for g in guests {
            adapter.release(g).map_err(|e| e.to_string())?;
        }
    }
    drop(recycler);
    Ok(row)
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0.0);
    for x in xs {
        s += x;
        n += 1.0;
    }
    if n > 0.0 {
        s / n
    } else {
        0.0
    }
}

fn main() {
    let a = parse_args();
    if let Err(e) = kvm_usable() {
        println!("SKIPPED: KVM is not usable here: {e}");
        return;
    }
    let image = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            println!("SKIPPED: {e}");
            return;
        }
    };
    let plan = Density::plan(a.mib * MIB, a.steps, a.cycles);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} VMs x {} MiB, 1 vCPU each; per VM: OS image {} pages (same in every VM), \
         private {}, zeroed {}, application peak {} pages; {} cycles of {} steps up and \
         down; PageONE base {} ms / merge {} ms, recycler {} ms, KSM sleep {} ms x {} \
         pages (smart_scan {}); {} rep(s); load before: {}",
        a.vms,
        a.mib,
        plan.image,
        plan.private,
        plan.zeroed,
        plan.app_peak,
        a.cycles,
        a.steps,
        a.base_ms,
        a.merge_ms,
        a.reclaim_ms,
        a.ksm_sleep_ms,
        a.ksm_pages,
        ksm_read("smart_scan"),
        a.reps,
        load.trim()
    );
    let setups = [
        Setup::None,
        Setup::Ksm,
        Setup::PageOne,
        Setup::Ppr,
        Setup::PprPageOne,
    ];
    let mut rows: Vec<(Setup, Vec<Row>)> = setups.iter().map(|&s| (s, Vec::new())).collect();
    for rep in 0..a.reps {
        for (s, out) in rows.iter_mut() {
            match run(*s, &a, &image) {
                Ok(r) => {
                    eprintln!(
                        "rep {rep} {}: boot {:?} end {:?} cpu {:?} wall {:?} timeouts {} {:?}",
                        s.name(),
                        r.boot,
                        r.end,
                        r.engine_cpu,
                        r.run_wall,
                        r.timeouts,
                        r.report
                    );
                    out.push(r)
                }
                Err(e) => println!("{}: SKIPPED: {e}", s.name()),
            }
        }
    }
    let progress0 = mean(rows[0].1.iter().map(|r| r.report.allocs_per_mcycle()));
    let steps_mem = |r: &Row| mean(r.steps.iter().map(|s| s.memory() as f64));
    let mem0 = mean(rows[0].1.iter().map(steps_mem));
    let boot0 = mean(rows[0].1.iter().map(|r| r.boot.memory() as f64));
    let mib = |b: f64| b / MIB as f64;
    println!();
    println!(
        "| set-up | guest memory over the steps, mean (vs no engine) | at the end | after \
         boot | merged / zero-merged pages after boot | pages recycled | engine CPU: \
         run (per page recycled) | engine CPU to converge after boot (per page saved vs \
         no engine) | corrupt pages | guest progress vs no engine | run wall |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (s, rs) in &rows {
        if rs.is_empty() {
            continue;
        }
        let m = |f: &dyn Fn(&Row) -> f64| mean(rs.iter().map(f));
        let step_mem = m(&steps_mem);
        // Pages of memory saved after boot, against the no-engine runs' mean.
        let saved = |r: &Row| (boot0 - r.boot.memory() as f64) / PAGE as f64;
        let per_saved = m(&|r| r.boot.cpu.as_secs_f64() * 1e6 / saved(r));
        let recycled = m(&|r| r.end.recycled as f64);
        let per_recycled = m(&|r| r.engine_cpu.as_secs_f64() * 1e6 / r.end.recycled.max(1) as f64);
        println!(
            "| {} | {:.1} MiB ({:.2}) | {:.1} MiB | {:.1} MiB | {:.0} / {:.0} | {:.0} | {} | {} | {} | {:.2} | {:.1} s |",
            s.name(),
            mib(step_mem),
            step_mem / mem0,
            mib(m(&|r| r.end.memory() as f64)),
            mib(m(&|r| r.boot.memory() as f64)),
            m(&|r| r.boot.merged as f64),
            m(&|r| r.boot.zero as f64),
            recycled,
            if recycled > 0.0 {
                format!("{:.2} s ({per_recycled:.0} µs)", m(&|r| r.engine_cpu.as_secs_f64()))
            } else {
                format!("{:.2} s", m(&|r| r.engine_cpu.as_secs_f64()))
            },
            match s {
                Setup::None => "–".to_string(),
                _ if mean(rs.iter().map(saved)) < 1.0 => {
                    format!("{:.2} s (nothing saved)", m(&|r| r.boot.cpu.as_secs_f64()))
                }
                _ => format!(
                    "{:.2} s ({per_saved:.1} µs)",
                    m(&|r| r.boot.cpu.as_secs_f64())
                ),
            },
            rs.iter().map(|r| r.report.corrupt).sum::<u64>(),
            m(&|r| r.report.allocs_per_mcycle()) / progress0,
            m(&|r| r.run_wall.as_secs_f64()),
        );
    }
    println!();
    for (s, rs) in &rows {
        for r in rs {
            println!(
                "{}: allocs {} (read zeros {}, intact {}), frees {}, offered {}, not offered {}, \
                 busy {}, OS pages checked {}, barrier timeouts {}, boot CPU {:.2} s, \
                 guest RAM over the steps: Pss {:.1} MiB, distinct resident pages {:.1} MiB; \
                 at the end: Pss {:.1} MiB",
                s.name(),
                r.report.allocs,
                r.report.zeros,
                r.report.intact,
                r.report.frees,
                r.report.offered,
                r.report.not_offered,
                r.report.busy,
                r.report.os_checked,
                r.timeouts,
                r.boot.cpu.as_secs_f64(),
                mib(mean(r.steps.iter().map(|s| s.pss as f64))),
                mib(mean(r.steps.iter().map(|s| s.resident.unwrap_or(0) as f64))),
                mib(r.end.pss as f64),
            );
        }
    }
}
