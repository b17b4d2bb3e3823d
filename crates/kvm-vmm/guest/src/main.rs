//! The bare-metal guest of `kvm-vmm`: a tiny 64-bit kernel without interrupts that runs
//! one workload on every vCPU and talks to the VMM through port I/O (see `abi.rs`, shared
//! with the VMM).
//!
//! Workloads:
//! - hello: prints a line per vCPU.
//! - checker: fills pages with patterns that encode (page, generation), rewrites a moving
//!   subset in rounds, re-reads every page after each round and reports pages checked,
//!   rewritten and mismatched.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

#[allow(dead_code)]
#[path = "../../src/abi.rs"]
mod abi;

use core::arch::asm;
use core::fmt::Write;

use abi::Params;

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the VMM's ports; it touches no memory of ours. Not `nomem`:
    // the asm is also a compiler barrier, so guest memory is written before the VMM
    // hears of it.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nostack, preserves_flags)) };
}

fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, preserves_flags)) };
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) };
    v
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time-stamp counter; no memory, no side effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// Makes a call to the VMM with `args`; returns its answer.
fn call(code: u32, args: &[u64]) -> u64 {
    for &a in args {
        outl(abi::PORT_ARG_LO, a as u32);
        outl(abi::PORT_ARG_HI, (a >> 32) as u32);
    }
    outl(abi::PORT_CALL, code);
    inl(abi::PORT_RESULT_LO) as u64 | (inl(abi::PORT_RESULT_HI) as u64) << 32
}

fn done(status: u32) -> ! {
    outl(abi::PORT_DONE, status);
    // The VMM no longer runs this vCPU (and `hlt` is privileged: we run at CPL 3).
    loop {
        core::hint::spin_loop();
    }
}

struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            outb(abi::PORT_CONSOLE, b);
        }
        Ok(())
    }
}

macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = writeln!(Console, $($arg)*);
    }};
}

/// Entered by every vCPU in long mode: `params` in `rdi`, the vCPU's index in `rsi`.
#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start(params: *const Params, cpu: u64) -> ! {
    // SAFETY: the VMM wrote the parameter block at this address before starting us and
    // never changes it.
    let p = unsafe { core::ptr::read_volatile(params) };
    if p.magic != abi::PARAMS_MAGIC {
        println!("cpu {cpu}: bad parameter block");
        done(2);
    }
    let status = match p.workload {
        abi::WORKLOAD_HELLO => {
            println!("hello from vCPU {cpu} of {}", p.vcpus);
            0
        }
        abi::WORKLOAD_CHECKER => checker(&p, cpu),
        w => {
            println!("cpu {cpu}: unknown workload {w}");
            1
        }
    };
    done(status)
}

const WORDS: usize = (abi::PAGE_SIZE / 8) as usize;

fn page_ptr(p: &Params, page: u64) -> *mut u64 {
    (p.data_base + page * abi::PAGE_SIZE) as *mut u64
}

/// Writes the pattern of (`src`, `generation`) into page `page`.
fn fill(p: &Params, page: u64, src: u64, generation: u64, seed: u64) {
    let ptr = page_ptr(p, page);
    for i in 0..WORDS {
        // SAFETY: `page` is inside the data area (the caller checked), identity-mapped
        // RAM that only this vCPU touches.
        unsafe {
            ptr.add(i)
                .write_volatile(abi::pattern_word(src, generation, seed, i as u64))
        };
    }
}

/// Counts the words of page `page` that differ from the pattern of (`src`, `generation`).
fn compare(p: &Params, page: u64, src: u64, generation: u64, seed: u64) -> u64 {
    let ptr = page_ptr(p, page) as *const u64;
    let mut bad = 0;
    for i in 0..WORDS {
        // SAFETY: as in `fill`.
        let w = unsafe { ptr.add(i).read_volatile() };
        bad += (w != abi::pattern_word(src, generation, seed, i as u64)) as u64;
    }
    bad
}

fn checker(p: &Params, cpu: u64) -> u32 {
    let a = &p.args;
    let avail = p.data_len / abi::PAGE_SIZE;
    let pages = if a[abi::CHECKER_PAGES] == 0 {
        avail
    } else {
        a[abi::CHECKER_PAGES]
    };
    if pages > avail {
        println!("checker: {pages} pages asked, {avail} in the data area");
        return 3;
    }
    let rounds = a[abi::CHECKER_ROUNDS];
    let stride = a[abi::CHECKER_STRIDE].max(1);
    let period = a[abi::CHECKER_DUP_PERIOD];
    let seed = a[abi::CHECKER_SEED];
    let barrier = a[abi::CHECKER_CALL_ROUNDS] != 0;
    let (first, end) = (pages * cpu / p.vcpus, pages * (cpu + 1) / p.vcpus);
    let src0 = |page: u64| if period == 0 { page } else { page % period };
    let src = |page: u64, generation: u64| if generation == 0 { src0(page) } else { page };

    let t0 = rdtsc();
    for page in first..end {
        fill(p, page, src0(page), 0, seed);
    }
    let mut write_cycles = rdtsc() - t0;
    let (mut checked, mut rewritten, mut bad_pages, mut bad_words) = (0u64, 0u64, 0u64, 0u64);
    if barrier {
        call(abi::CALL_ROUND, &[0]);
    }
    for round in 1..=rounds {
        let t = rdtsc();
        for page in first..end {
            if page % stride == round % stride {
                let g = abi::checker_generation(page, round, stride);
                fill(p, page, src(page, g), g, seed);
                rewritten += 1;
            }
        }
        write_cycles += rdtsc() - t;
        for page in first..end {
            let g = abi::checker_generation(page, round, stride);
            let bad = compare(p, page, src(page, g), g, seed);
            checked += 1;
            if bad != 0 {
                if bad_pages < 4 {
                    println!("checker: cpu {cpu} page {page} round {round}: {bad} words differ");
                }
                bad_pages += 1;
                bad_words += bad;
            }
        }
        if barrier {
            call(abi::CALL_ROUND, &[round]);
        }
    }
    let total = rdtsc() - t0;
    call(
        abi::CALL_REPORT,
        &[
            abi::REPORT_CHECKER,
            checked,
            rewritten,
            bad_pages,
            bad_words,
            write_cycles,
            total,
            rounds,
            end - first,
        ],
    );
    println!("checker: cpu {cpu}: {checked} pages checked, {rewritten} rewritten, {bad_pages} mismatched");
    0
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("guest panic: {info}");
    done(0xDEAD)
}
