//! The bare-metal guest of `kvm-vmm`: a tiny 64-bit kernel without interrupts that runs
//! one workload on every vCPU and talks to the VMM through port I/O (see `abi.rs`, shared
//! with the VMM).
//!
//! Workloads:
//! - hello: prints a line per vCPU.
//! - checker: fills pages with patterns that encode (page, generation), rewrites a moving
//!   subset in rounds, re-reads every page after each round and reports pages checked,
//!   rewritten and mismatched.
//! - ppr: a page allocator that calls `ppr-guest`'s `on_free` / `on_alloc` hooks, over a
//!   PIP pool in guest memory registered with the host through a call.
//! - density: the repository's density workload: an OS image identical in every VM,
//!   private and zeroed OS pages, and an application that allocates and frees pages in
//!   cycles through such a page allocator.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

#[allow(dead_code)]
#[path = "../../src/abi.rs"]
mod abi;

use core::arch::asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ppr_guest::{Free, Hooks, PoolView};

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
pub extern "C" fn _start(params: u64, cpu: u64) -> ! {
    // SAFETY: the VMM wrote the parameter block at this address before starting us and
    // never changes it.
    let p = unsafe { core::ptr::read_volatile(params as *const Params) };
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
        abi::WORKLOAD_PPR => ppr(&p, cpu),
        abi::WORKLOAD_PPR_HOSTILE => hostile(&p, cpu),
        abi::WORKLOAD_DENSITY => density(&p, cpu),
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
    let fill_cycles = rdtsc() - t0;
    let mut write_cycles = fill_cycles;
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
            fill_cycles,
        ],
    );
    println!("checker: cpu {cpu}: {checked} pages checked, {rewritten} rewritten, {bad_pages} mismatched");
    0
}

/// Set by vCPU 0 once the host registered the pool.
static POOL_READY: AtomicBool = AtomicBool::new(false);

type Page = [AtomicU64; WORDS];

fn page_at(addr: u64) -> &'static Page {
    // SAFETY: `addr` is a page-aligned page of the data area (the caller checked),
    // identity-mapped RAM for the guest's whole life; it is only accessed atomically
    // here (by this vCPU, and by the host's recycler through PIP).
    unsafe { &*(addr as *const Page) }
}

/// What a page allocated again holds.
enum Seen {
    Zero,
    Intact,
    Corrupt,
}

/// Compares `page` with zeros and with generation `generation` of frame `frame`'s
/// pattern with the mark words zeroed (what a withdrawn offer leaves).
fn seen(page: &Page, frame: u64, generation: u64) -> Seen {
    let (mut zero, mut intact) = (true, generation != 0);
    for (i, w) in page.iter().enumerate() {
        let v = w.load(Ordering::Relaxed);
        zero &= v == 0;
        let want = if i < pip::MARK_WORDS {
            0
        } else {
            abi::pattern_word(frame, generation, abi::PPR_SEED, i as u64)
        };
        intact &= v == want;
    }
    match (zero, intact) {
        (true, _) => Seen::Zero,
        (false, true) => Seen::Intact,
        _ => Seen::Corrupt,
    }
}

fn ppr(p: &Params, cpu: u64) -> u32 {
    let a = &p.args;
    let pool_addr = p.data_base;
    let pool_len = a[abi::PPR_POOL_BYTES];
    let pages = a[abi::PPR_PAGES];
    let cycles = a[abi::PPR_CYCLES];
    let first = pool_addr + pool_len.div_ceil(abi::PAGE_SIZE) * abi::PAGE_SIZE;
    if first + pages * abi::PAGE_SIZE > p.data_base + p.data_len {
        println!("ppr: {pages} pages after a {pool_len}-byte pool do not fit");
        return 4;
    }
    let view = if cpu == 0 {
        // SAFETY: the pool's bytes are zeroed RAM of the data area that nothing else
        // uses; from now on the guest (pip) and the host access them atomically only.
        let view = unsafe {
            PoolView::init_raw(pool_addr as *const u8, pool_len as usize, p.vcpus as u32)
        };
        let Ok(view) = view else {
            println!("ppr: cannot lay out the pool");
            return 5;
        };
        if call(
            abi::CALL_REGISTER,
            &[abi::REGISTER_PIP_POOL, pool_addr, pool_len],
        ) != 1
        {
            println!("ppr: the host did not register the pool");
            return 6;
        }
        POOL_READY.store(true, Ordering::Release);
        view
    } else {
        while !POOL_READY.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: as above; vCPU 0 laid the pool out.
        match unsafe { PoolView::from_raw(pool_addr as *const u8, pool_len as usize) } {
            Ok(view) => view,
            Err(_) => {
                println!("ppr: cpu {cpu}: the pool's layout is invalid");
                return 5;
            }
        }
    };
    let hooks = match Hooks::attach(view) {
        Ok(h) => h,
        Err(e) => {
            println!("ppr: cpu {cpu}: cannot attach: {e:?}");
            return 7;
        }
    };
    let c = cpu as usize;
    let (lo, hi) = (pages * cpu / p.vcpus, pages * (cpu + 1) / p.vcpus);
    let frame_of = |i: u64| (first / abi::PAGE_SIZE) + i + abi::PPR_FRAME_OFFSET;
    let addr_of = |i: u64| first + i * abi::PAGE_SIZE;
    let (mut allocs, mut zeros, mut intact, mut corrupt) = (0u64, 0u64, 0u64, 0u64);
    let (mut offered, mut not_offered, mut busy) = (0u64, 0u64, 0u64);
    let free = |i: u64, offered: &mut u64, not_offered: &mut u64| match hooks.on_free(
        c,
        frame_of(i),
        page_at(addr_of(i)),
    ) {
        Some(Free::Offered(_)) => *offered += 1,
        _ => *not_offered += 1,
    };
    // Every page starts free, and offered.
    for i in lo..hi {
        free(i, &mut offered, &mut not_offered);
    }
    for cycle in 1..=cycles {
        for i in lo..hi {
            let (frame, page) = (frame_of(i), page_at(addr_of(i)));
            // The host may be recycling this very page: retry until it lets go (it
            // ends every claim in bounded time).
            while !hooks.on_alloc(c, frame, page).is_usable() {
                busy += 1;
                core::hint::spin_loop();
            }
            allocs += 1;
            match seen(page, frame, cycle - 1) {
                Seen::Zero => zeros += 1,
                Seen::Intact => intact += 1,
                Seen::Corrupt => {
                    if corrupt < 4 {
                        println!("ppr: cpu {cpu} frame {frame} cycle {cycle}: corrupt on alloc");
                    }
                    corrupt += 1;
                }
            }
            for (w, word) in page.iter().enumerate() {
                word.store(
                    abi::pattern_word(frame, cycle, abi::PPR_SEED, w as u64),
                    Ordering::Relaxed,
                );
            }
        }
        call(abi::CALL_ROUND, &[2 * cycle - 1]);
        for i in lo..hi {
            let (frame, page) = (frame_of(i), page_at(addr_of(i)));
            // In use since the allocation: nobody may have touched it.
            let whole = page.iter().enumerate().all(|(w, word)| {
                word.load(Ordering::Relaxed)
                    == abi::pattern_word(frame, cycle, abi::PPR_SEED, w as u64)
            });
            if !whole {
                if corrupt < 4 {
                    println!("ppr: cpu {cpu} frame {frame} cycle {cycle}: changed while in use");
                }
                corrupt += 1;
            }
            free(i, &mut offered, &mut not_offered);
        }
        call(abi::CALL_ROUND, &[2 * cycle]);
    }
    call(
        abi::CALL_REPORT,
        &[
            abi::REPORT_PPR,
            allocs,
            zeros,
            intact,
            corrupt,
            offered,
            not_offered,
            busy,
            hi - lo,
        ],
    );
    println!("ppr: cpu {cpu}: {allocs} allocations, {zeros} read zeros, {intact} intact, {corrupt} corrupt");
    0
}

fn atomic_u64(addr: u64) -> &'static AtomicU64 {
    // SAFETY: an 8-byte aligned address inside the pool (the caller's arithmetic), RAM
    // for the guest's whole life, accessed atomically only.
    unsafe { &*(addr as *const AtomicU64) }
}

/// The two mark words hostile page `i` carries (`indicator`, `pool_id`, `slots`: the
/// pool's, as registered).
fn hostile_mark(i: u64, indicator: u64, pool_id: u64, slots: u64) -> [u64; 2] {
    let slot = i % slots;
    match i % 5 {
        // An empty slot (nothing offered): NotOffered.
        0 => [indicator, pool_id << 32 | slot],
        // Another pool: Pool.
        1 => [indicator, (pool_id + 1) << 32 | slot],
        // A slot past the end: Slot.
        2 => [indicator, pool_id << 32 | (slots + i) & 0xFFFF_FFFF],
        // A slot the guest filled with a garbage frame number: NotOffered.
        3 => [indicator, pool_id << 32 | slot],
        // Not even the indicator.
        _ => [abi::pattern_word(i, 7, 7, 0), abi::pattern_word(i, 7, 7, 1)],
    }
}

fn hostile(p: &Params, cpu: u64) -> u32 {
    if cpu != 0 {
        return 0;
    }
    let a = &p.args;
    let pool = p.data_base;
    let pool_len = a[abi::PPR_POOL_BYTES];
    let pages = a[abi::PPR_PAGES];
    let first = pool + pool_len.div_ceil(abi::PAGE_SIZE) * abi::PAGE_SIZE;
    if first + pages * abi::PAGE_SIZE > p.data_base + p.data_len {
        println!("hostile: {pages} pages do not fit");
        return 4;
    }
    // SAFETY: zeroed RAM of the data area, atomics only from now on.
    let view = unsafe { PoolView::init_raw(pool as *const u8, pool_len as usize, 1) };
    if view.is_err()
        || call(
            abi::CALL_REGISTER,
            &[abi::REGISTER_PIP_POOL, pool, pool_len],
        ) != 1
    {
        println!("hostile: the pool was not registered");
        return 6;
    }
    // The header's fields (pip's documented offsets).
    let pool_id = atomic_u64(pool + 16).load(Ordering::Acquire) & 0xFFFF_FFFF;
    let indicator = atomic_u64(pool + 32).load(Ordering::Acquire);
    let slots = atomic_u64(pool + 40).load(Ordering::Acquire);
    let slots_at = pool + atomic_u64(pool + 48).load(Ordering::Acquire);
    let frame_of = |i: u64| first / abi::PAGE_SIZE + i + abi::PPR_FRAME_OFFSET;
    let page = |i: u64| page_at(first + i * abi::PAGE_SIZE);
    // Every page in use: its pattern, then the garbage mark over its first two words.
    for i in 0..pages {
        let mark = hostile_mark(i, indicator, pool_id, slots);
        for (w, word) in page(i).iter().enumerate() {
            let v = match w {
                0 | 1 => mark[w],
                _ => abi::pattern_word(frame_of(i), 1, abi::PPR_SEED, w as u64),
            };
            word.store(v, Ordering::Relaxed);
        }
        if i % 5 == 3 {
            // Garbage in the named slot: a frame far out of range, or the frame of
            // another page in use (neither names this page).
            let garbage = if i % 2 == 0 {
                0x7FFF_FFFF_FFF0 + i
            } else {
                frame_of(i + 1)
            };
            atomic_u64(slots_at + (i % slots) * 8).store(garbage, Ordering::Release);
        }
    }
    let mut changed = 0;
    let mut check = |round: u64| {
        call(abi::CALL_ROUND, &[round]);
        for i in 0..pages {
            let mark = hostile_mark(i, indicator, pool_id, slots);
            let ok = page(i).iter().enumerate().all(|(w, word)| {
                let want = match w {
                    0 | 1 => mark[w],
                    _ => abi::pattern_word(frame_of(i), 1, abi::PPR_SEED, w as u64),
                };
                word.load(Ordering::Relaxed) == want
            });
            if !ok {
                if changed < 4 {
                    println!("hostile: page {i} changed by round {round}");
                }
                changed += 1;
            }
        }
    };
    check(1);
    // Round 2: a header that no longer describes a valid layout.
    atomic_u64(pool + 40).store(u64::MAX, Ordering::Release);
    check(2);
    call(abi::CALL_REPORT, &[abi::REPORT_PPR_HOSTILE, pages, changed]);
    println!("hostile: {pages} pages in use, {changed} changed");
    0
}

/// The density workload's pool: 0 until vCPU 0 knows, then 1 (registered: hooks on)
/// or 2 (the host refused: hooks off).
static DENSITY_POOL: AtomicU64 = AtomicU64::new(0);

/// Seeds of the density workload's page contents, kept apart by kind.
const PRIVATE_SEED: u64 = 0x2222_0000_0000_0000;
const APP_SEED: u64 = 0x3333_0000_0000_0000;

/// Word `w` of a page whose contents are (`page`, `generation`, `seed`), or zeros.
#[derive(Clone, Copy)]
enum Contents {
    Zero,
    Pattern(u64, u64, u64),
}

impl Contents {
    fn word(self, w: usize) -> u64 {
        match self {
            Contents::Zero => 0,
            Contents::Pattern(page, generation, seed) => {
                abi::pattern_word(page, generation, seed, w as u64)
            }
        }
    }

    fn write(self, page: &Page) {
        for (w, word) in page.iter().enumerate() {
            word.store(self.word(w), Ordering::Relaxed);
        }
    }

    fn holds(self, page: &Page) -> bool {
        page.iter()
            .enumerate()
            .all(|(w, word)| word.load(Ordering::Relaxed) == self.word(w))
    }
}

/// A `u32` array of this vCPU's own in guest RAM (the allocator's metadata).
struct Meta {
    ptr: *mut u32,
    len: u64,
}

impl Meta {
    fn get(&self, i: u64) -> u32 {
        assert!(i < self.len);
        // SAFETY: in bounds (checked) of metadata RAM only this vCPU accesses.
        unsafe { self.ptr.add(i as usize).read_volatile() }
    }

    fn set(&self, i: u64, v: u32) {
        assert!(i < self.len);
        // SAFETY: as in `get`.
        unsafe { self.ptr.add(i as usize).write_volatile(v) }
    }
}

/// Pages the application holds at step `t`: a triangle of `2 * steps` steps, then
/// `idle` steps holding nothing, per cycle.
fn density_target(peak: u64, steps: u64, idle: u64, phase: u64, t: u64) -> u64 {
    let x = (t + phase) % (2 * steps + idle);
    if x >= 2 * steps {
        return 0;
    }
    peak * x.min(2 * steps - x) / steps
}

fn density(p: &Params, cpu: u64) -> u32 {
    let a = &p.args;
    let n = p.vcpus;
    let page = abi::PAGE_SIZE;
    let pool_addr = p.data_base;
    let pool_len = a[abi::DENSITY_POOL_BYTES].max(1).div_ceil(page) * page;
    let (image, private, zeroed) = (
        a[abi::DENSITY_IMAGE],
        a[abi::DENSITY_PRIVATE],
        a[abi::DENSITY_ZEROED],
    );
    let (peak, steps, cycles) = (
        a[abi::DENSITY_APP_PEAK],
        a[abi::DENSITY_STEPS].max(1),
        a[abi::DENSITY_CYCLES],
    );
    let idle = a[abi::DENSITY_IDLE];
    let period = 2 * steps + idle;
    let (phase, seed, image_seed) = (
        a[abi::DENSITY_PHASE],
        a[abi::DENSITY_SEED],
        a[abi::DENSITY_IMAGE_SEED],
    );
    let data_pages = p.data_len / page;
    let os_first = pool_len / page;
    let os_pages = image + private + zeroed;
    let meta_first = os_first + os_pages;
    // Three u32 per allocator page: solve for the allocator's pages when not given.
    let free = if a[abi::DENSITY_FREE] != 0 {
        a[abi::DENSITY_FREE]
    } else {
        let rest = data_pages.saturating_sub(meta_first);
        let mut f = rest * page / (page + 12);
        while f > 0 && f + (12 * f).div_ceil(page) > rest {
            f -= 1;
        }
        f
    };
    let meta_pages = (12 * free).div_ceil(page);
    let app_first = meta_first + meta_pages;
    if app_first + free > data_pages || free < peak || free > u32::MAX as u64 {
        println!(
            "density: {os_pages} OS pages and {free} allocator pages (peak {peak}) do not fit"
        );
        return 4;
    }
    let addr = |i: u64| p.data_base + i * page;
    let t0 = rdtsc();

    // The pool: laid out and registered by vCPU 0.
    let hooks = if cpu == 0 {
        // SAFETY: the pool's bytes are zeroed RAM of the data area that nothing else
        // uses; from now on the guest (pip) and the host access them atomically only.
        let view =
            unsafe { PoolView::init_raw(pool_addr as *const u8, pool_len as usize, n as u32) };
        let Ok(view) = view else {
            println!("density: cannot lay out the pool");
            DENSITY_POOL.store(2, Ordering::Release);
            return 5;
        };
        let registered = call(
            abi::CALL_REGISTER,
            &[abi::REGISTER_PIP_POOL, pool_addr, pool_len],
        ) == 1;
        let hooks = if registered {
            match Hooks::attach(view) {
                Ok(h) => h,
                Err(e) => {
                    println!("density: cannot attach: {e:?}");
                    DENSITY_POOL.store(2, Ordering::Release);
                    return 7;
                }
            }
        } else {
            Hooks::disabled()
        };
        DENSITY_POOL.store(if registered { 1 } else { 2 }, Ordering::Release);
        hooks
    } else {
        let state = loop {
            match DENSITY_POOL.load(Ordering::Acquire) {
                0 => core::hint::spin_loop(),
                s => break s,
            }
        };
        if state == 1 {
            // SAFETY: as above; vCPU 0 laid the pool out and the host registered it.
            let view = unsafe { PoolView::from_raw(pool_addr as *const u8, pool_len as usize) };
            match view.map(Hooks::attach) {
                Ok(Ok(h)) => h,
                _ => {
                    println!("density: cpu {cpu}: cannot attach to the pool");
                    return 7;
                }
            }
        } else {
            Hooks::disabled()
        }
    };
    let enabled = hooks.is_enabled();
    let c = cpu as usize;

    // The OS pages: this vCPU's share of each kind.
    let share = |total: u64| (total * cpu / n, total * (cpu + 1) / n);
    let os_contents = |i: u64| {
        if i < image {
            Contents::Pattern(i, 1, image_seed)
        } else if i < image + private {
            Contents::Pattern(i, 2, seed ^ PRIVATE_SEED)
        } else {
            Contents::Zero
        }
    };
    let (os_lo, os_hi) = share(os_pages);
    for i in os_lo..os_hi {
        os_contents(i).write(page_at(addr(os_first + i)));
    }
    let mut corrupt = 0u64;
    let mut os_checked = 0u64;
    let mut check_os = |corrupt: &mut u64| {
        for i in os_lo..os_hi {
            os_checked += 1;
            if !os_contents(i).holds(page_at(addr(os_first + i))) {
                if *corrupt < 4 {
                    println!("density: cpu {cpu}: OS page {i} changed");
                }
                *corrupt += 1;
            }
        }
    };

    // The allocator over this vCPU's pages: LIFO free stack, held stack, generations.
    let (lo, hi) = share(free);
    let mine = hi - lo;
    let my_peak = share(peak).1 - share(peak).0;
    let meta = |k: u64| Meta {
        // SAFETY (of the later accesses): three arrays of `free` u32 in the metadata
        // pages; this vCPU uses entries lo..hi of each only.
        ptr: (addr(meta_first) + 4 * (k * free + lo)) as *mut u32,
        len: mine,
    };
    let (stack, held, generation) = (meta(0), meta(1), meta(2));
    let frame_of = |i: u64| addr(app_first + lo + i) / page + abi::PPR_FRAME_OFFSET;
    let app_page = |i: u64| page_at(addr(app_first + lo + i));
    let (mut n_free, mut n_held) = (0u64, 0u64);
    let (mut offered, mut not_offered) = (0u64, 0u64);
    let free_page = |i: u64, n_free: &mut u64, offered: &mut u64, not_offered: &mut u64| {
        match hooks.on_free(c, frame_of(i), app_page(i)) {
            Some(Free::Offered(_)) => *offered += 1,
            Some(_) => *not_offered += 1,
            None => {}
        }
        stack.set(*n_free, i as u32);
        *n_free += 1;
    };
    // Every page starts free (offered); the lowest is allocated first.
    for i in (0..mine).rev() {
        generation.set(i, 0);
        free_page(i, &mut n_free, &mut offered, &mut not_offered);
    }
    let boot_cycles = rdtsc() - t0;
    call(abi::CALL_ROUND, &[0]);

    let (mut allocs, mut frees, mut zeros, mut intact, mut busy) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut work_cycles = 0u64;
    let total = cycles * period;
    for t in 1..=total + 1 {
        let w0 = rdtsc();
        let target = if t > total {
            0
        } else {
            density_target(my_peak, steps, idle, phase, t)
        };
        while n_held < target && n_free > 0 {
            n_free -= 1;
            let i = stack.get(n_free) as u64;
            let (frame, pg) = (frame_of(i), app_page(i));
            // The host may be recycling this very page: retry until it lets go (it
            // ends every claim in bounded time).
            while !hooks.on_alloc(c, frame, pg).is_usable() {
                busy += 1;
                core::hint::spin_loop();
            }
            allocs += 1;
            let g = generation.get(i) as u64;
            let last = Contents::Pattern(frame, g, seed ^ APP_SEED);
            if Contents::Zero.holds(pg) {
                zeros += 1;
            } else if g != 0
                && pg.iter().enumerate().all(|(w, word)| {
                    let v = word.load(Ordering::Relaxed);
                    v == last.word(w) || (w < pip::MARK_WORDS && v == 0)
                })
            {
                intact += 1;
            } else {
                if corrupt < 4 {
                    println!("density: cpu {cpu} frame {frame} step {t}: corrupt on alloc");
                }
                corrupt += 1;
            }
            let g = g + 1;
            generation.set(i, g as u32);
            Contents::Pattern(frame, g, seed ^ APP_SEED).write(pg);
            held.set(n_held, i as u32);
            n_held += 1;
        }
        while n_held > target {
            n_held -= 1;
            let i = held.get(n_held) as u64;
            let (frame, g) = (frame_of(i), generation.get(i) as u64);
            if !Contents::Pattern(frame, g, seed ^ APP_SEED).holds(app_page(i)) {
                if corrupt < 4 {
                    println!("density: cpu {cpu} frame {frame} step {t}: changed while held");
                }
                corrupt += 1;
            }
            frees += 1;
            free_page(i, &mut n_free, &mut offered, &mut not_offered);
        }
        if t % period == 0 || t > total {
            check_os(&mut corrupt);
        }
        work_cycles += rdtsc() - w0;
        call(abi::CALL_ROUND, &[t]);
    }
    call(
        abi::CALL_REPORT,
        &[
            abi::REPORT_DENSITY,
            allocs,
            frees,
            zeros,
            intact,
            corrupt,
            offered,
            not_offered,
            busy,
            os_checked,
            total + 1,
            work_cycles,
            boot_cycles,
            mine,
            enabled as u64,
        ],
    );
    println!(
        "density: cpu {cpu}: {allocs} allocated, {frees} freed, {zeros} read zeros, \
         {intact} intact, {corrupt} corrupt, {os_checked} OS pages checked"
    );
    0
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("guest panic: {info}");
    done(0xDEAD)
}
