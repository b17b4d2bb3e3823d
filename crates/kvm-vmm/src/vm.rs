//! VMs, their vCPUs and the port I/O the guest talks through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::abi::{self, Params};
use crate::image::GuestImage;
use crate::Error;

/// Guest RAM: vm-memory's mmap backend (private anonymous memory) with a dirty bitmap,
/// as a rust-vmm VMM keeps it (and as `page_memory::vmm::VmMemoryAdapter` adopts it).
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// A call the guest made through [`abi::PORT_CALL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The vCPU that made it.
    pub vcpu: u32,
    /// The call code ([`abi::CALL_REPORT`], ...).
    pub code: u32,
    /// Its arguments, in the order pushed.
    pub args: Vec<u64>,
}

/// Handles the guest's calls on the calling vCPU's thread (it may block that vCPU); its
/// answer is what the guest reads back. Every call is also recorded in
/// [`VmOutcome::calls`]. A hook that blocks should do so with a deadline: a stopped VM
/// (timeout, another vCPU's failure) kicks its vCPUs out of `KVM_RUN`, but waits for a
/// hook to return.
pub type CallHook = Arc<dyn Fn(&Call) -> u64 + Send + Sync>;

/// The privilege level the vCPUs start at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Privilege {
    /// CPL 3 with IOPL 3 (the default): the guest may use port I/O but no privileged
    /// instruction, and every page is user-accessible. On a paravirtual KVM such as this
    /// project's machines' `kvm_pvm`, which emulates CPL-0 guest code instruction by
    /// instruction (about a million instructions a second) but runs CPL-3 code natively,
    /// this is what makes a workload run at hardware speed. Elsewhere it costs nothing.
    #[default]
    User,
    /// CPL 0, as a kernel starts (slow under `kvm_pvm`, see [`Privilege::User`]).
    Supervisor,
}

/// How to build a [`Vm`].
#[derive(Clone)]
pub struct VmConfig {
    /// A name for console output and errors.
    pub name: String,
    /// Bytes of guest RAM, from guest-physical 0 (a multiple of 2 MiB, at least 6 MiB,
    /// at most 3 GiB).
    pub mem_size: u64,
    /// vCPUs, 1 to [`abi::MAX_VCPUS`]; one host thread each.
    pub vcpus: u32,
    /// The privilege level the vCPUs start at.
    pub privilege: Privilege,
    /// The workload the guest runs ([`abi::WORKLOAD_CHECKER`], ...).
    pub workload: u64,
    /// The workload's arguments ([`Params::args`]).
    pub args: [u64; 16],
    /// Print the guest's console lines on stdout, prefixed with the VM's name.
    pub echo_console: bool,
    /// Handles the guest's calls (none: every call answers 0).
    pub on_call: Option<CallHook>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("name", &self.name)
            .field("mem_size", &self.mem_size)
            .field("vcpus", &self.vcpus)
            .field("privilege", &self.privilege)
            .field("workload", &self.workload)
            .field("args", &self.args)
            .field("echo_console", &self.echo_console)
            .field("on_call", &self.on_call.is_some())
            .finish()
    }
}

impl VmConfig {
    /// A VM named `name` with `mem_size` bytes of RAM, one vCPU, the hello workload.
    pub fn new(name: impl Into<String>, mem_size: u64) -> Self {
        VmConfig {
            name: name.into(),
            mem_size,
            vcpus: 1,
            privilege: Privilege::User,
            workload: abi::WORKLOAD_HELLO,
            args: [0; 16],
            echo_console: false,
            on_call: None,
        }
    }

    /// Sets the number of vCPUs.
    #[must_use]
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Sets the privilege level the vCPUs start at.
    #[must_use]
    pub fn privilege(mut self, privilege: Privilege) -> Self {
        self.privilege = privilege;
        self
    }

    /// Sets the workload and its arguments.
    #[must_use]
    pub fn workload(mut self, workload: u64, args: [u64; 16]) -> Self {
        self.workload = workload;
        self.args = args;
        self
    }

    /// Echoes the console on stdout (or not).
    #[must_use]
    pub fn echo_console(mut self, echo: bool) -> Self {
        self.echo_console = echo;
        self
    }

    /// Sets the call hook.
    #[must_use]
    pub fn on_call(mut self, hook: CallHook) -> Self {
        self.on_call = Some(hook);
        self
    }
}

/// What a VM did, once every vCPU wrote 0 to [`abi::PORT_DONE`].
#[derive(Clone, Debug)]
pub struct VmOutcome {
    /// The VM's name.
    pub name: String,
    /// Everything the guest printed.
    pub console: String,
    /// Every call, in the order the VMM handled them.
    pub calls: Vec<Call>,
    /// From the first vCPU's start to the last one's done.
    pub elapsed: Duration,
    /// CPU time of the VM's vCPU threads, all together (guest time and the VMM's exit
    /// handling: `CLOCK_THREAD_CPUTIME_ID` of each).
    pub vcpu_cpu: Duration,
}

impl VmOutcome {
    /// The values of every [`abi::CALL_REPORT`] with tag `tag`, with the vCPU that made it.
    pub fn reports(&self, tag: u64) -> impl Iterator<Item = (u32, &[u64])> + '_ {
        self.calls
            .iter()
            .filter(move |c| c.code == abi::CALL_REPORT && c.args.first() == Some(&tag))
            .map(|c| (c.vcpu, &c.args[1..]))
    }

    /// The first `N` values of every report tagged `tag`, summed over the reports (all
    /// vCPUs'), value by value.
    pub fn summed<const N: usize>(&self, tag: u64) -> [u64; N] {
        let mut total = [0u64; N];
        for (_, v) in self.reports(tag) {
            for (t, x) in total.iter_mut().zip(v) {
                *t += x;
            }
        }
        total
    }
}

/// Opens `/dev/kvm`, telling a missing device from a denied one.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing,
        libc::EACCES | libc::EPERM => Error::KvmDenied,
        _ => Error::KvmOpen(e),
    })
}

/// Whether this process can use KVM (`Ok`), or why not.
pub fn kvm_usable() -> Result<(), Error> {
    let kvm = open_kvm()?;
    kvm.create_vm().map(|_| ()).map_err(|source| Error::Kvm {
        op: "create a VM",
        source,
    })
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// A VM: its RAM, loaded with the guest image, page tables and parameters, and its
/// vCPUs, set up in 64-bit long mode at the image's entry point. It runs once
/// ([`Vm::run`], or several together with [`run_all`]).
pub struct Vm {
    name: String,
    // Declared (hence dropped) before the memory their memory slots point into.
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    _kvm: Kvm,
    memory: GuestRam,
    echo: bool,
    on_call: Option<CallHook>,
    ran: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("vcpus", &self.vcpus.len())
            .field("ran", &self.ran)
            .finish_non_exhaustive()
    }
}

const MIN_MEM: u64 = abi::DATA_BASE + (2 << 20);
const MAX_MEM: u64 = 3 << 30;

fn write(memory: &GuestRam, addr: u64, bytes: &[u8]) -> Result<(), Error> {
    memory
        .write_slice(bytes, GuestAddress(addr))
        .map_err(|e| Error::Memory(format!("writing {} bytes at {addr:#x}: {e}", bytes.len())))
}

fn u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn params_bytes(p: &Params) -> Vec<u8> {
    let mut w = vec![
        p.magic,
        p.vcpus,
        p.mem_size,
        p.data_base,
        p.data_len,
        p.workload,
    ];
    w.extend_from_slice(&p.args);
    u64s(&w)
}

/// The 64-bit code segment, the data segment and the TSS (CPL 0), as the GDT at
/// [`abi::GDT_ADDR`] describes them.
fn segments() -> (kvm_segment, kvm_segment, kvm_segment) {
    let code = kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: 0x08,
        type_: 0xB, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_segment {
        selector: 0x18,
        type_: 0xB, // busy 64-bit TSS
        s: 0,
        l: 0,
        ..code
    };
    (code, data, tss)
}

/// The CPL-3 code and data segments (GDT entries 5 and 6, as for `sysret`).
fn user_segments() -> (kvm_segment, kvm_segment) {
    let (code, data, _) = segments();
    (
        kvm_segment {
            selector: 0x28 | 3,
            dpl: 3,
            ..code
        },
        kvm_segment {
            selector: 0x30 | 3,
            dpl: 3,
            ..data
        },
    )
}

/// A GDT descriptor for `seg` (the inverse of how KVM reads one).
fn gdt_entry(seg: &kvm_segment) -> u64 {
    let limit = if seg.g == 1 {
        seg.limit >> 12
    } else {
        seg.limit
    } as u64;
    let base = seg.base;
    let access =
        seg.type_ as u64 | (seg.s as u64) << 4 | (seg.dpl as u64) << 5 | (seg.present as u64) << 7;
    let flags = (seg.avl as u64) | (seg.l as u64) << 1 | (seg.db as u64) << 2 | (seg.g as u64) << 3;
    (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | access << 40
        | ((limit >> 16) & 0xF) << 48
        | flags << 52
        | ((base >> 24) & 0xFF) << 56
}

impl Vm {
    /// Creates the VM: opens `/dev/kvm`, allocates its RAM, writes the page tables, GDT,
    /// parameter block and image, and creates its vCPUs in long mode.
    pub fn new(config: VmConfig, image: &GuestImage) -> Result<Vm, Error> {
        if config.vcpus == 0 || config.vcpus > abi::MAX_VCPUS {
            return Err(Error::Config(format!(
                "{} vCPUs (1 to {} supported)",
                config.vcpus,
                abi::MAX_VCPUS
            )));
        }
        if config.mem_size % (2 << 20) != 0 || !(MIN_MEM..=MAX_MEM).contains(&config.mem_size) {
            return Err(Error::Config(format!(
                "{} bytes of RAM (a multiple of 2 MiB from {MIN_MEM} to {MAX_MEM} supported)",
                config.mem_size
            )));
        }
        let loaded = image.parse()?;
        let kvm = open_kvm()?;
        let memory: GuestRam =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), config.mem_size as usize)])
                .map_err(|e| Error::Memory(format!("allocating guest RAM: {e}")))?;
        let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        // The TSS KVM needs on Intel hosts for real-mode emulation: above our 4 GiB map's
        // RAM, never touched by the guest.
        vm.set_tss_address(0xFFFB_D000)
            .map_err(kvm_err("set the TSS address"))?;
        for (slot, r) in memory.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the slot maps this VM's own RAM mapping, which `self.memory` keeps
            // alive for as long as the VM fd (declared before it, so dropped first).
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("add a memory slot"))?;
        }

        // Identity page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; 2 MiB pages; present,
        // writable, user-accessible.
        write(&memory, abi::PML4_ADDR, &u64s(&[abi::PDPT_ADDR | 0x7]))?;
        let pdpt: Vec<u64> = (0..4).map(|i| (abi::PD_ADDR + i * 0x1000) | 0x7).collect();
        write(&memory, abi::PDPT_ADDR, &u64s(&pdpt))?;
        let pds: Vec<u64> = (0..4 * 512u64).map(|i| (i << 21) | 0x87).collect();
        write(&memory, abi::PD_ADDR, &u64s(&pds))?;
        let (code, data, tss) = segments();
        let (ucode, udata) = user_segments();
        let gdt = [
            0,
            gdt_entry(&code),
            gdt_entry(&data),
            gdt_entry(&tss),
            0,
            gdt_entry(&ucode),
            gdt_entry(&udata),
        ];
        let (code, data, rflags) = match config.privilege {
            Privilege::Supervisor => (code, data, 0x2),
            Privilege::User => (ucode, udata, 0x2 | 3 << 12), // IOPL 3: port I/O allowed
        };
        write(&memory, abi::GDT_ADDR, &u64s(&gdt))?;
        let params = Params {
            magic: abi::PARAMS_MAGIC,
            vcpus: config.vcpus as u64,
            mem_size: config.mem_size,
            data_base: abi::DATA_BASE,
            data_len: config.mem_size - abi::DATA_BASE,
            workload: config.workload,
            args: config.args,
        };
        write(&memory, abi::PARAMS_ADDR, &params_bytes(&params))?;
        for s in &loaded.segments {
            write(&memory, s.addr, &s.data)?;
            // Fresh anonymous memory is already zero: `.bss` needs no writes.
        }

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the supported CPUID"))?;
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let vcpu = vm.create_vcpu(i as u64).map_err(kvm_err("create a vCPU"))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set the CPUID"))?;
            let mut sregs = vcpu.get_sregs().map_err(kvm_err("read sregs"))?;
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = tss;
            sregs.gdt.base = abi::GDT_ADDR;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            sregs.cr3 = abi::PML4_ADDR;
            sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
            sregs.cr0 = 0x8000_0033; // PG, NE, ET, MP, PE
            sregs.efer = 0x500; // LME, LMA
            vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
            let fpu = kvm_fpu {
                fcw: 0x37F,
                mxcsr: 0x1F80,
                ..Default::default()
            };
            vcpu.set_fpu(&fpu).map_err(kvm_err("set the FPU"))?;
            let mut regs = vcpu.get_regs().map_err(kvm_err("read regs"))?;
            regs.rip = loaded.entry;
            regs.rflags = rflags;
            regs.rdi = abi::PARAMS_ADDR;
            regs.rsi = i as u64;
            regs.rsp = abi::STACKS_BASE + (i as u64 + 1) * abi::STACK_SIZE - 8;
            vcpu.set_regs(&regs).map_err(kvm_err("set regs"))?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            name: config.name,
            vcpus,
            _vm: vm,
            _kvm: kvm,
            memory,
            echo: config.echo_console,
            on_call: config.on_call,
            ran: false,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's RAM (hand it to an engine before running the VM).
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// Runs the VM until every vCPU is done, one fails, or `timeout` passes.
    pub fn run(&mut self, timeout: Duration) -> Result<VmOutcome, Error> {
        run_all(std::slice::from_mut(self), timeout)
            .pop()
            .unwrap_or(Err(Error::Thread("no result".into())))
    }
}

/// The console and calls of one VM, shared by its vCPU threads.
#[derive(Default)]
struct Shared {
    console: Mutex<Vec<u8>>,
    calls: Mutex<Vec<Call>>,
    stop: AtomicBool,
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    cpu: Mutex<Duration>,
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// How a vCPU thread ended.
enum VcpuEnd {
    Done(u32),
    Stopped,
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    static FAILED: Mutex<Option<String>> = Mutex::new(None);
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            *FAILED.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
    });
    match &*FAILED.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(Error::Thread(format!(
            "cannot install the vCPU kick signal handler: {e}"
        ))),
        None => Ok(()),
    }
}

fn tail(bytes: &[u8], n: usize) -> String {
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(n)..]).into_owned()
}

struct VcpuCtx<'a> {
    index: u32,
    name: &'a str,
    shared: &'a Shared,
    echo: bool,
    on_call: Option<&'a CallHook>,
}

impl VcpuCtx<'_> {
    /// Appends a line of this vCPU's console output to the VM's console (whole lines, so
    /// that vCPUs printing at once do not interleave within a line), and echoes it.
    fn flush_line(&self, line: &mut Vec<u8>) {
        if line.is_empty() {
            return;
        }
        if self.echo {
            let text = String::from_utf8_lossy(line);
            println!("[{} cpu{}] {}", self.name, self.index, text.trim_end());
        }
        self.shared
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(line);
        line.clear();
    }
}

fn run_vcpu(vcpu: &mut VcpuFd, ctx: &VcpuCtx<'_>, line: &mut Vec<u8>) -> Result<VcpuEnd, Error> {
    let mut args: Vec<u64> = Vec::new();
    let mut lo: u32 = 0;
    let mut result: u64 = 0;
    let unexpected = |vcpu: &mut VcpuFd, reason: String| Error::UnexpectedExit {
        vcpu: ctx.index,
        reason,
        rip: vcpu.get_regs().map_or(u64::MAX, |r| r.rip),
    };
    let word = |data: &[u8]| -> Option<u32> { data.try_into().ok().map(u32::from_le_bytes) };
    loop {
        if ctx.shared.stop.load(Ordering::Acquire) {
            return Ok(VcpuEnd::Stopped);
        }
        let problem = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match (port, data.len()) {
                (abi::PORT_CONSOLE, _) => {
                    for &b in data.iter() {
                        line.push(b);
                        if b == b'\n' {
                            ctx.flush_line(line);
                        }
                    }
                    None
                }
                (abi::PORT_ARG_LO, 4) => {
                    lo = word(data).unwrap_or(0);
                    None
                }
                (abi::PORT_ARG_HI, 4) => {
                    args.push(lo as u64 | (word(data).unwrap_or(0) as u64) << 32);
                    None
                }
                (abi::PORT_CALL, 4) => {
                    let call = Call {
                        vcpu: ctx.index,
                        code: word(data).unwrap_or(0),
                        args: std::mem::take(&mut args),
                    };
                    result = ctx.on_call.map_or(0, |hook| hook(&call));
                    ctx.shared
                        .calls
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(call);
                    None
                }
                (abi::PORT_DONE, 4) => return Ok(VcpuEnd::Done(word(data).unwrap_or(0))),
                (port, len) => Some(format!("{len}-byte out to port {port:#x}")),
            },
            Ok(VcpuExit::IoIn(port, data)) => match (port, data.len()) {
                (abi::PORT_RESULT_LO, 4) => {
                    data.copy_from_slice(&(result as u32).to_le_bytes());
                    None
                }
                (abi::PORT_RESULT_HI, 4) => {
                    data.copy_from_slice(&((result >> 32) as u32).to_le_bytes());
                    None
                }
                (port, len) => Some(format!("{len}-byte in from port {port:#x}")),
            },
            Ok(exit) => Some(format!("{exit:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => return Err(kvm_err("run a vCPU")(e)),
        };
        if let Some(reason) = problem {
            return Err(unexpected(vcpu, reason));
        }
    }
}

/// Runs several VMs at once, in this process (a thread per vCPU), until each is done,
/// fails, or `timeout` passes; one result per VM, in order. A VM one of whose vCPUs fails
/// is stopped (its other vCPUs are kicked out of `KVM_RUN`); the others run on.
pub fn run_all(vms: &mut [Vm], timeout: Duration) -> Vec<Result<VmOutcome, Error>> {
    if let Err(e) = install_kick_handler() {
        let msg = e.to_string();
        return vms
            .iter()
            .map(|_| Err(Error::Thread(msg.clone())))
            .collect();
    }
    let mut results: Vec<Option<Result<VmOutcome, Error>>> = vms
        .iter()
        .map(|vm| vm.ran.then_some(Err(Error::AlreadyRun)))
        .collect();
    let shared: Vec<Shared> = vms
        .iter()
        .map(|vm| Shared {
            threads: Mutex::new(vec![None; vm.vcpus.len()]),
            ..Shared::default()
        })
        .collect();
    let names: Vec<String> = vms.iter().map(|vm| vm.name.clone()).collect();
    let start = Instant::now();
    let deadline = start + timeout;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, u32, Result<VcpuEnd, Error>)>();
        // Per VM: vCPUs still running, the first error, when the last finished.
        let mut running: Vec<Vec<u32>> = vec![Vec::new(); vms.len()];
        let mut first_error: Vec<Option<Error>> = (0..vms.len()).map(|_| None).collect();
        let mut finished: Vec<Duration> = vec![Duration::ZERO; vms.len()];
        for (v, vm) in vms.iter_mut().enumerate() {
            if results[v].is_some() {
                continue;
            }
            vm.ran = true;
            let (name, echo, on_call) = (&vm.name, vm.echo, vm.on_call.as_ref());
            for (i, vcpu) in vm.vcpus.iter_mut().enumerate() {
                let tx = tx.clone();
                let sh = &shared[v];
                running[v].push(i as u32);
                let spawned = std::thread::Builder::new()
                    .name(format!("{name}-vcpu{i}"))
                    .spawn_scoped(scope, move || {
                        // SAFETY: pthread_self has no preconditions.
                        let me = unsafe { libc::pthread_self() };
                        sh.threads.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(me);
                        let ctx = VcpuCtx {
                            index: i as u32,
                            name,
                            shared: sh,
                            echo,
                            on_call,
                        };
                        let mut line = Vec::new();
                        let end = run_vcpu(vcpu, &ctx, &mut line);
                        ctx.flush_line(&mut line);
                        *sh.cpu.lock().unwrap_or_else(|e| e.into_inner()) += thread_cpu();
                        let _ = tx.send((v, i as u32, end));
                    });
                if let Err(e) = spawned {
                    running[v].pop();
                    first_error[v].get_or_insert(Error::Thread(format!("spawn: {e}")));
                    sh.stop.store(true, Ordering::Release);
                }
            }
        }
        drop(tx);
        let mut timed_out = false;
        let mut last_kick = Instant::now();
        while running.iter().any(|r| !r.is_empty()) {
            let now = Instant::now();
            if now >= deadline && !timed_out {
                timed_out = true;
                for (v, r) in running.iter().enumerate() {
                    if !r.is_empty() {
                        first_error[v].get_or_insert(Error::Timeout {
                            after: timeout,
                            running: r.clone(),
                        });
                        shared[v].stop.store(true, Ordering::Release);
                    }
                }
            }
            // Kick the vCPUs of stopped VMs out of KVM_RUN, again every few ms (a kick
            // that lands just before KVM_RUN is entered is not seen).
            if now.duration_since(last_kick) >= Duration::from_millis(5) {
                last_kick = now;
                for (v, r) in running.iter().enumerate() {
                    if !shared[v].stop.load(Ordering::Acquire) {
                        continue;
                    }
                    let threads = shared[v].threads.lock().unwrap_or_else(|e| e.into_inner());
                    for &i in r {
                        if let Some(t) = threads[i as usize] {
                            // SAFETY: `t` is a thread of this scope, not joined yet (the
                            // scope joins at its end), so its id is valid.
                            unsafe { libc::pthread_kill(t, kick_signal()) };
                        }
                    }
                }
            }
            let wait = if timed_out || shared.iter().any(|s| s.stop.load(Ordering::Acquire)) {
                Duration::from_millis(5)
            } else {
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            };
            match rx.recv_timeout(wait) {
                Ok((v, i, end)) => {
                    running[v].retain(|&x| x != i);
                    finished[v] = start.elapsed();
                    let failure = match end {
                        Ok(VcpuEnd::Done(0)) | Ok(VcpuEnd::Stopped) => None,
                        Ok(VcpuEnd::Done(status)) => Some(Error::GuestFailed {
                            vcpu: i,
                            status,
                            console_tail: tail(
                                &shared[v].console.lock().unwrap_or_else(|e| e.into_inner()),
                                400,
                            ),
                        }),
                        Err(e) => Some(e),
                    };
                    if let Some(e) = failure {
                        first_error[v].get_or_insert(e);
                        shared[v].stop.store(true, Ordering::Release);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for (v, name) in names.into_iter().enumerate() {
            if results[v].is_some() {
                continue;
            }
            results[v] = Some(match first_error[v].take() {
                Some(e) => Err(e),
                None => Ok(VmOutcome {
                    name,
                    console: String::from_utf8_lossy(
                        &shared[v].console.lock().unwrap_or_else(|e| e.into_inner()),
                    )
                    .into_owned(),
                    calls: std::mem::take(
                        &mut shared[v].calls.lock().unwrap_or_else(|e| e.into_inner()),
                    ),
                    elapsed: finished[v],
                    vcpu_cpu: *shared[v].cpu.lock().unwrap_or_else(|e| e.into_inner()),
                }),
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.unwrap_or(Err(Error::Thread("no result".into()))))
        .collect()
}
