//! What the guest pays: the latency of a guest's first write to a page, side by side, in
//! one run (issue 12, item 5):
//! - **plain**: a private page already populated and writable (no fault: the anchor);
//! - **fresh**: a private page never touched (the kernel's zero-fill fault);
//! - **watched**: a page [`LinuxMemory`] write-protected with `protect` (the userfaultfd
//!   round trip through the fault thread), for each `--spins` setting of
//!   [`LinuxConfig::fault_spin`];
//! - **merged**: a page `LinuxMemory` merged (it maps the canonical store: the fault
//!   thread breaks the sharing with `MADV_POPULATE_WRITE`), for the same settings;
//! - **sync floor**: the synchronous round trip with the least a handler can do (a raw
//!   userfaultfd and a thread that only polls, reads and removes the protection);
//! - **async-wp prototype**: the asynchronous design of the backend's module docs
//!   (*Asynchronous write-protect*) on a raw userfaultfd: `WP_ASYNC` for watching, and a
//!   merge window made with `UFFDIO_MOVE` (its cost, and a check that a page written
//!   without pause loses no write while windows open and close on it);
//! - **file page cow**: a page of a private mapping of a memfd, read but never written:
//!   the kernel's own copy-on-write of a file page, what a merged page of the backend
//!   (a private mapping of the canonical store) would cost if it were not write-protected;
//! - **ksm**: a page Linux KSM merged (`MADV_MERGEABLE`, ksmd run until every page is
//!   merged, then stopped with `run = 0` so that it does not scan while we write): the
//!   kernel's copy-on-write break.
//!
//! Each write is one 8-byte store timed with `Instant` (about 20–30 ns of overhead: the
//! plain row). Two patterns: **cold**, one write every `--gap-us` microseconds (busy
//! waiting in between, as a running vCPU would), so that a fault thread that sleeps when
//! idle is asleep; and **burst**, writes back to back. Rounds interleave every case, so a
//! burst of load elsewhere hits them all. Fault-thread CPU is the process's CPU time
//! minus this (the writing) thread's, over the writes, per fault.
//!
//! Needs root for KSM (its knobs are restored afterwards, `run` last); without root, or
//! without KSM, or with KSM in use by someone else, it prints `SKIPPED` and exits 0, and
//! `--no-ksm` measures the rest (any process may: the writes are its own, so the backend
//! and the raw userfaultfds do without kernel faults). A round whose KSM another process
//! took meanwhile has no KSM row.
//!
//! ```text
//! cargo run --release -p page-memory --features linux,test-util --example first_write -- \
//!     [--pages 1000] [--rounds 5] [--gap-us 300] [--spins 0,50,max] [--no-ksm]
//! ```
use std::fs;
use std::time::{Duration, Instant};

use page_memory::linux::test_util::ksm::{self, Restore};
use page_memory::linux::{LinuxConfig, LinuxMemory};
use page_memory::{DomainId, MergeOutcome, PageId, PageMemory, PAGE_SIZE};

struct Args {
    pages: usize,
    rounds: usize,
    gap: Duration,
    spins: Vec<Duration>,
    ksm: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        pages: 1000,
        rounds: 5,
        gap: Duration::from_micros(300),
        spins: vec![Duration::ZERO, Duration::from_micros(50), Duration::MAX],
        ksm: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--no-ksm" {
            a.ksm = false;
            continue;
        }
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--pages" => a.pages = v.parse().expect("--pages N"),
            "--rounds" => a.rounds = v.parse().expect("--rounds N"),
            "--gap-us" => a.gap = Duration::from_micros(v.parse().expect("--gap-us N")),
            "--spins" => {
                a.spins = v
                    .split(',')
                    .map(|s| match s {
                        "max" => Duration::MAX,
                        n => Duration::from_micros(n.parse().expect("--spins 0,50,max")),
                    })
                    .collect()
            }
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

fn spin_name(d: Duration) -> String {
    if d == Duration::MAX {
        "spin=always".into()
    } else {
        format!("spin={}us", d.as_micros())
    }
}

fn cpu(clock: libc::clockid_t) -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(clock, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time of every thread but this one.
fn others_cpu() -> Duration {
    cpu(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(cpu(libc::CLOCK_THREAD_CPUTIME_ID))
}

/// A private anonymous mapping of `pages` pages (4 KiB pages, as `LinuxMemory` gives).
fn mmap_anon(pages: usize) -> *mut u8 {
    let len = pages * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: our fresh mapping; the advice changes how it is backed, not its contents.
    assert_eq!(unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) }, 0);
    p.cast()
}

fn munmap(p: *mut u8, pages: usize) {
    // SAFETY: a mapping of ours that nothing uses any more.
    unsafe { libc::munmap(p.cast(), pages * PAGE_SIZE) };
}

/// Fills page `p` with contents unique to `seed`.
fn fill(p: *mut u8, seed: u64) {
    let w = p.cast::<u64>();
    for i in 0..PAGE_SIZE / 8 {
        // SAFETY: `p` is a page of a mapping of ours.
        unsafe {
            w.add(i)
                .write_volatile(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64)
        };
    }
}

/// Nanoseconds of one store to each page (word 5), `gap` apart.
fn first_writes(pages: &[*mut u8], gap: Duration) -> Vec<u64> {
    let mut out = Vec::with_capacity(pages.len());
    for &p in pages {
        if !gap.is_zero() {
            let t = Instant::now();
            while t.elapsed() < gap {
                std::hint::spin_loop();
            }
        }
        let t0 = Instant::now();
        // SAFETY: a page of a mapping of ours (guest memory of a LinuxMemory is written
        // directly, as a vCPU would).
        unsafe { p.cast::<u64>().add(5).write_volatile(0xfeed) };
        out.push(t0.elapsed().as_nanos() as u64);
    }
    out
}

#[derive(Default)]
struct Case {
    ns: Vec<u64>,
    /// Median of each round.
    round_medians: Vec<u64>,
    faults: u64,
    helper_cpu: Duration,
}

impl Case {
    fn add(&mut self, mut ns: Vec<u64>) {
        let mut s = ns.clone();
        s.sort_unstable();
        self.round_medians.push(s[s.len() / 2]);
        self.ns.append(&mut ns);
    }
}

fn q(sorted: &[u64], f: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * f).round() as usize] as f64 / 1000.0
}

/// Pages `[from, from + n)` of `base`.
fn ptrs(base: *mut u8, from: usize, n: usize) -> Vec<*mut u8> {
    // SAFETY (of the arithmetic): inside the mapping.
    (from..from + n)
        .map(|i| base.wrapping_add(i * PAGE_SIZE))
        .collect()
}

/// The backend's configuration here: the writes are the process's own (user space), so
/// a process without the privilege for kernel faults still measures.
fn config() -> LinuxConfig {
    LinuxConfig::default().with_require_kernel_faults(false)
}

/// Watched and merged pages of a `LinuxMemory` made with `config`: `(watched cold,
/// watched burst, merged cold, merged burst)`, each with the fault threads' CPU over its
/// writes.
fn run_ours(
    config: &LinuxConfig,
    n: usize,
    gap: Duration,
    round: u64,
) -> [(Vec<u64>, u64, Duration); 4] {
    let mem = LinuxMemory::with_config(config.clone()).expect("LinuxMemory");
    // [0, 2n) watched; [2n, 4n) canonical; [4n, 6n) their duplicates.
    let r = mem.add_region(6 * n as u32, DomainId(0)).unwrap();
    let base = mem.region_ptr(r).unwrap();
    let page = |i: usize| PageId::new(r, i as u32);
    for i in 0..6 * n {
        let seed = (round << 32) | (if i >= 4 * n { i - 2 * n } else { i }) as u64;
        fill(base.wrapping_add(i * PAGE_SIZE), seed);
    }
    let all: Vec<PageId> = (0..6 * n).map(page).collect();
    let tokens: Vec<_> = mem
        .protect(&all)
        .into_iter()
        .map(|t| t.expect("protect"))
        .collect();
    let canon: Vec<_> = (2 * n..4 * n).map(|i| (page(i), tokens[i])).collect();
    let frames: Vec<_> = mem
        .canonicalize_batch(&canon)
        .into_iter()
        .map(|f| f.expect("canonicalize"))
        .collect();
    let dups: Vec<_> = (4 * n..6 * n)
        .map(|i| (page(i), tokens[i], &frames[i - 4 * n]))
        .collect();
    for m in mem.merge_batch(&dups) {
        assert_eq!(m.expect("merge"), MergeOutcome::Merged);
    }
    // Let the fault thread go to sleep (or settle into its spin).
    std::thread::sleep(Duration::from_millis(5));
    let measure = |from: usize, gap: Duration| {
        let f0 = mem.stats().write_faults;
        let c0 = others_cpu();
        let ns = first_writes(&ptrs(base, from, n), gap);
        let cpu = others_cpu().saturating_sub(c0);
        (ns, mem.stats().write_faults - f0, cpu)
    };
    let out = [
        measure(0, gap),
        measure(n, Duration::ZERO),
        measure(4 * n, gap),
        measure(5 * n, Duration::ZERO),
    ];
    let s = mem.stats();
    assert_eq!(
        s.cow_breaks,
        2 * n as u64,
        "every merged page's write broke its sharing"
    );
    // Nothing lost: every written page reads its write, and its other words are intact.
    for i in (0..2 * n).chain(4 * n..6 * n) {
        let p = base.wrapping_add(i * PAGE_SIZE).cast::<u64>();
        // SAFETY: pages of our region, not written by anyone else now.
        let (w5, w6) = unsafe { (p.add(5).read_volatile(), p.add(6).read_volatile()) };
        let seed = (round << 32) | (if i >= 4 * n { i - 2 * n } else { i }) as u64;
        assert_eq!(w5, 0xfeed, "page {i} lost its write");
        assert_eq!(
            w6,
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 6,
            "page {i} changed"
        );
    }
    out
}

/// KSM-merged pages: `(cold, burst)`, or `None` if ksmd did not merge them in time.
fn run_ksm(n: usize, gap: Duration, round: u64) -> Option<(Vec<u64>, Vec<u64>)> {
    // Someone else may have started KSM since the last round: leave it alone.
    if ksm::in_use() {
        eprintln!("  ksm: in use by another process, round skipped");
        return None;
    }
    ksm::put("pages_to_scan", &(8 * n).to_string());
    ksm::put("sleep_millisecs", "0");
    // [0, 2n) originals, [2n, 4n) their copies.
    let base = mmap_anon(4 * n);
    for i in 0..4 * n {
        fill(
            base.wrapping_add(i * PAGE_SIZE),
            (round << 32) | (i % (2 * n)) as u64 | 1 << 40,
        );
    }
    // SAFETY: our own mapping; MADV_MERGEABLE only lets ksmd merge its pages.
    let r = unsafe { libc::madvise(base.cast(), 4 * n * PAGE_SIZE, libc::MADV_MERGEABLE) };
    assert_eq!(r, 0, "MADV_MERGEABLE");
    ksm::put("run", "1");
    let t0 = Instant::now();
    let want = 2 * n as u64;
    while ksm::num("pages_sharing") < want && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Stopped (merged pages stay merged): ksmd does not scan while we write.
    ksm::put("run", "0");
    let merged = ksm::num("pages_sharing") >= want;
    let out = merged.then(|| {
        std::thread::sleep(Duration::from_millis(5));
        let cold = first_writes(&ptrs(base, 2 * n, n), gap);
        let burst = first_writes(&ptrs(base, 3 * n, n), Duration::ZERO);
        (cold, burst)
    });
    munmap(base, 4 * n);
    // Unmerge whatever is left (nothing of ours: the mapping is gone) and stop.
    ksm::unmerge_and_stop(Duration::from_secs(30), Duration::from_millis(5));
    if !merged {
        eprintln!(
            "  ksm: only {} of {want} pages merged in 120 s",
            ksm::num("pages_sharing")
        );
    }
    out
}

/// The asynchronous design, prototyped on a raw userfaultfd of its own (not the backend):
/// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7) for watching, and `UFFDIO_MOVE` (6.8) plus
/// `MISSING` registration for the merge window. See *Dirty tracking* in the backend's
/// module docs.
mod async_wp {
    use super::*;

    /// `UFFD_USER_MODE_ONLY`: the writes here are the process's own, and any process may
    /// create such a userfaultfd (Linux 5.11).
    const USER_MODE_ONLY: i32 = 1;
    const WP_UNPOPULATED: u64 = 1 << 13;
    const WP_ASYNC: u64 = 1 << 15;
    const MOVE: u64 = 1 << 16;
    const FLAG_WP: u64 = 1 << 0;
    const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
    const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
    const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
    const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
    /// `_IOWR(0xAA, 0x05, struct uffdio_move)` (40 bytes).
    const UFFDIO_MOVE: libc::c_ulong = 0xC028_AA05;
    const MODE_MISSING: u64 = 1 << 0;
    const MODE_WP: u64 = 1 << 1;

    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Register {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Wp {
        start: u64,
        len: u64,
        mode: u64,
    }
    #[repr(C)]
    struct Move {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        moved: i64,
    }

    fn ioctl<T>(fd: i32, req: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
        // SAFETY: every request used here takes a pointer to the struct `T` given for it,
        // laid out as the kernel's (`include/uapi/linux/userfaultfd.h`).
        let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// What the prototype measured.
    pub struct Report {
        pub cold: Vec<u64>,
        pub burst: Vec<u64>,
        /// Nanoseconds of one merge window on an unchanged page: move the page out,
        /// compare it, move it back.
        pub window: Vec<u64>,
        /// Windows opened and closed on a page another thread writes without pause; the
        /// writer's last value; what the page holds after; whether the rest is intact.
        pub check: (u64, u64, u64, bool),
    }

    /// A new user-mode-only, non-blocking userfaultfd (no feature negotiated yet).
    fn open_uffd() -> Result<i32, String> {
        // SAFETY: userfaultfd(2) takes flags and returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                USER_MODE_ONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        } as i32;
        if fd < 0 {
            return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()));
        }
        Ok(fd)
    }

    /// `None` (with the reason) where the kernel lacks a feature.
    pub fn run(n: usize, gap: Duration) -> Result<Report, String> {
        let fd = open_uffd()?;
        let mut api = Api {
            api: 0xAA,
            features: FLAG_WP | WP_UNPOPULATED | WP_ASYNC | MOVE,
            ioctls: 0,
        };
        let r = ioctl(fd, UFFDIO_API, &mut api);
        let out = r
            .map_err(|e| format!("UFFDIO_API with WP_ASYNC and MOVE (Linux 6.8): {e}"))
            .and_then(|()| measure(fd, n, gap));
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(fd) };
        out
    }

    /// The floor of the synchronous round trip: a raw userfaultfd (write-protect,
    /// synchronous) whose handler thread does the least there is to do (`poll`, `read`,
    /// one `UFFDIO_WRITEPROTECT` that removes the protection and wakes the writer), with
    /// no page state, locks or events: `(cold, burst)`.
    pub fn sync_floor(n: usize, gap: Duration) -> Result<(Vec<u64>, Vec<u64>), String> {
        let fd = open_uffd()?;
        let mut api = Api {
            api: 0xAA,
            features: FLAG_WP,
            ioctls: 0,
        };
        let g = mmap_anon(2 * n);
        for i in 0..2 * n {
            fill(g.wrapping_add(i * PAGE_SIZE), 1 << 51 | i as u64);
        }
        let mut reg = Register {
            start: g as u64,
            len: (2 * n * PAGE_SIZE) as u64,
            mode: MODE_WP,
            ioctls: 0,
        };
        let mut wp = Wp {
            start: g as u64,
            len: (2 * n * PAGE_SIZE) as u64,
            mode: 1,
        };
        let setup = ioctl(fd, UFFDIO_API, &mut api)
            .and_then(|()| ioctl(fd, UFFDIO_REGISTER, &mut reg))
            .and_then(|()| ioctl(fd, UFFDIO_WRITEPROTECT, &mut wp));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let out = setup
            .map_err(|e| format!("sync floor setup: {e}"))
            .map(|()| {
                let handler = {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut msgs = [[0u64; 4]; 16];
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let mut p = libc::pollfd {
                                fd,
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            // SAFETY: one pollfd, for the call.
                            if unsafe { libc::poll(&mut p, 1, 10) } <= 0 {
                                continue;
                            }
                            // SAFETY: `msgs` is 16 `struct uffd_msg` (32 bytes each).
                            let r = unsafe { libc::read(fd, msgs.as_mut_ptr().cast(), 16 * 32) };
                            for m in msgs.iter().take(r.max(0) as usize / 32) {
                                // Word 2 of a page-fault message is its address.
                                let mut un = Wp {
                                    start: m[2] & !(PAGE_SIZE as u64 - 1),
                                    len: PAGE_SIZE as u64,
                                    mode: 0,
                                };
                                let _ = ioctl(fd, UFFDIO_WRITEPROTECT, &mut un);
                            }
                        }
                    })
                };
                std::thread::sleep(Duration::from_millis(2));
                let cold = first_writes(&ptrs(g, 0, n), gap);
                let burst = first_writes(&ptrs(g, n, n), Duration::ZERO);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                handler.join().expect("handler");
                (cold, burst)
            });
        munmap(g, 2 * n);
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(fd) };
        out
    }

    fn measure(fd: i32, n: usize, gap: Duration) -> Result<Report, String> {
        let e = |what: &'static str| move |x: std::io::Error| format!("{what}: {x}");
        // 2n guest pages and one scratch page, all anonymous and registered.
        let g = mmap_anon(2 * n + 1);
        let scratch = mmap_anon(1);
        for i in 0..2 * n + 1 {
            fill(g.wrapping_add(i * PAGE_SIZE), 1 << 50 | i as u64);
        }
        let mut reg = Register {
            start: g as u64,
            len: ((2 * n + 1) * PAGE_SIZE) as u64,
            mode: MODE_MISSING | MODE_WP,
            ioctls: 0,
        };
        ioctl(fd, UFFDIO_REGISTER, &mut reg).map_err(e("register guest"))?;
        let mut reg = Register {
            start: scratch as u64,
            len: PAGE_SIZE as u64,
            mode: MODE_MISSING,
            ioctls: 0,
        };
        ioctl(fd, UFFDIO_REGISTER, &mut reg).map_err(e("register scratch"))?;
        let mut wp = Wp {
            start: g as u64,
            len: ((2 * n + 1) * PAGE_SIZE) as u64,
            mode: 1,
        };
        ioctl(fd, UFFDIO_WRITEPROTECT, &mut wp).map_err(e("protect"))?;
        std::thread::sleep(Duration::from_millis(2));
        // Watching: the kernel resolves the first write itself.
        let cold = first_writes(&ptrs(g, 0, n), gap);
        let burst = first_writes(&ptrs(g, n, n), Duration::ZERO);
        let mv = |dst: *mut u8, src: *mut u8| {
            let mut m = Move {
                dst: dst as u64,
                src: src as u64,
                len: PAGE_SIZE as u64,
                mode: 0,
                moved: 0,
            };
            ioctl(fd, UFFDIO_MOVE, &mut m)
        };
        // The merge window on unchanged pages: out, compare, back.
        let mut window = Vec::with_capacity(2 * n);
        let mut copy = vec![0u8; PAGE_SIZE];
        for i in 0..2 * n {
            let p = g.wrapping_add(i * PAGE_SIZE);
            // SAFETY: a page of our mapping, nobody writes it now.
            unsafe { std::ptr::copy_nonoverlapping(p, copy.as_mut_ptr(), PAGE_SIZE) };
            let t0 = Instant::now();
            mv(scratch, p).map_err(e("move out"))?;
            // SAFETY: the scratch page, which holds the moved page now.
            let same = unsafe { std::slice::from_raw_parts(scratch, PAGE_SIZE) } == &copy[..];
            mv(p, scratch).map_err(e("move back"))?;
            window.push(t0.elapsed().as_nanos() as u64);
            assert!(same, "a page nobody wrote changed");
        }
        // A writer on the last page without pause while windows open and close on it:
        // inside a window the page is missing, the write waits (a MISSING fault, which
        // an asynchronous userfaultfd still delivers) until the window is closed and the
        // waiter woken; no write is lost and the page cannot change inside the window.
        let last = g.wrapping_add(2 * n * PAGE_SIZE) as usize;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let w = (last + 8) as *mut u64;
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    // SAFETY: a word of our mapping, written only by this thread.
                    unsafe { w.write_volatile(i) };
                }
                i
            })
        };
        std::thread::sleep(Duration::from_millis(1));
        let (mut windows, t) = (0u64, Instant::now());
        while t.elapsed() < Duration::from_millis(100) {
            match mv(scratch, last as *mut u8) {
                Ok(()) => {}
                Err(x) if matches!(x.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => continue,
                Err(x) => return Err(format!("move out (check): {x}")),
            }
            let w = (scratch as usize + 8) as *const u64;
            // SAFETY: the scratch page, which holds the moved page now.
            let seen = unsafe { w.read_volatile() };
            for _ in 0..200 {
                std::hint::spin_loop();
            }
            // SAFETY: as above.
            let again = unsafe { w.read_volatile() };
            assert_eq!(again, seen, "the page changed inside the window");
            mv(last as *mut u8, scratch).map_err(e("move back (check)"))?;
            let mut wake = [last as u64, PAGE_SIZE as u64];
            ioctl(fd, UFFDIO_WAKE, &mut wake).map_err(e("wake"))?;
            windows += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.join().expect("writer");
        let p = last as *const u64;
        // SAFETY: our mapping; the writer is done.
        let holds = unsafe { p.add(1).read_volatile() };
        let seed = 1 << 50 | (2 * n) as u64;
        let intact = (2..PAGE_SIZE / 8).all(|i| {
            // SAFETY: as above.
            let w = unsafe { p.add(i).read_volatile() };
            w == seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64
        });
        munmap(g, 2 * n + 1);
        munmap(scratch, 1);
        Ok(Report {
            cold,
            burst,
            window,
            check: (windows, written, holds, intact),
        })
    }
}

/// Pages of a private mapping of a memfd whose pages are mapped (read) but not written:
/// the first write is the kernel's own copy-on-write of a file page, what a merged page
/// of the backend would cost if it were left unprotected. `(cold, burst)`.
fn run_file_cow(n: usize, gap: Duration, round: u64) -> (Vec<u64>, Vec<u64>) {
    let len = 2 * n * PAGE_SIZE;
    // SAFETY: memfd_create takes a name and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"first-write".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: our new memfd.
    assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
    // SAFETY: a new shared mapping of our memfd where the kernel chooses.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(shared, libc::MAP_FAILED);
    for i in 0..2 * n {
        fill(
            shared.cast::<u8>().wrapping_add(i * PAGE_SIZE),
            1 << 52 | round << 32 | i as u64,
        );
    }
    // SAFETY: a new private (copy-on-write) mapping of our memfd where the kernel chooses.
    let private = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            fd,
            0,
        )
    };
    assert_ne!(private, libc::MAP_FAILED);
    let p = private.cast::<u8>();
    for i in 0..2 * n {
        // SAFETY: a page of our private mapping: reading maps the file's page.
        unsafe { p.wrapping_add(i * PAGE_SIZE).read_volatile() };
    }
    std::thread::sleep(Duration::from_millis(2));
    let cold = first_writes(&ptrs(p, 0, n), gap);
    let burst = first_writes(&ptrs(p, n, n), Duration::ZERO);
    // SAFETY: our mappings and descriptor, not used after this.
    unsafe {
        libc::munmap(private, len);
        libc::munmap(shared, len);
        libc::close(fd);
    }
    (cold, burst)
}

/// Takes KSM over for the run: its knobs as they were (written back when the result is
/// dropped), or why not.
fn claim_ksm(pages: usize) -> Result<Restore, String> {
    ksm::available()?;
    if ksm::in_use() {
        return Err(ksm::IN_USE.into());
    }
    let restore = ksm::set_up_comparison();
    ksm::put("pages_to_scan", &(8 * pages).to_string());
    ksm::put("sleep_millisecs", "0");
    Ok(restore)
}

fn main() {
    let a = parse_args();
    if let Err(e) = LinuxMemory::with_config(config()) {
        println!("SKIPPED: the Linux backend is unavailable here: {e}");
        return;
    }
    let _restore = if a.ksm {
        match claim_ksm(a.pages) {
            Ok(r) => Some(r),
            Err(why) => {
                println!("SKIPPED: {why} (--no-ksm runs the other cases)");
                return;
            }
        }
    } else {
        None
    };

    let n = a.pages;
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{n} pages per case and pattern, {} rounds, cold gap {} us; load before: {}",
        a.rounds,
        a.gap.as_micros(),
        load.trim()
    );
    // Names, in print order; [cold, burst] per name.
    let mut names = vec!["plain".to_string(), "fresh".to_string()];
    // The backend's configurations: one per `--spins` value.
    let variants: Vec<(String, LinuxConfig)> = a
        .spins
        .iter()
        .map(|&s| (spin_name(s), config().with_fault_spin(s)))
        .collect();
    for (v, _) in &variants {
        names.push(format!("watched {v}"));
    }
    for (v, _) in &variants {
        names.push(format!("merged {v}"));
    }
    names.push("sync floor (raw uffd)".to_string());
    names.push("async-wp prototype".to_string());
    names.push("file page cow".to_string());
    names.push("ksm".to_string());
    let mut cases: Vec<[Case; 2]> = names.iter().map(|_| Default::default()).collect();
    let k = variants.len();
    let (mut window, mut windows) = (Vec::new(), 0u64);
    // A warm-up, not measured: the first `LinuxMemory` of a process measured slower
    // (35–55 µs first writes, against 7–16 µs in the rounds after).
    let _ = run_ours(&variants[0].1, n.min(200), a.gap, 1 << 20);
    for round in 0..a.rounds as u64 {
        eprintln!("round {}", round + 1);
        // plain: populated, writable.
        let p = mmap_anon(2 * n);
        for i in 0..2 * n {
            fill(p.wrapping_add(i * PAGE_SIZE), i as u64);
        }
        cases[0][0].add(first_writes(&ptrs(p, 0, n), a.gap));
        cases[0][1].add(first_writes(&ptrs(p, n, n), Duration::ZERO));
        munmap(p, 2 * n);
        // fresh: never touched.
        let p = mmap_anon(2 * n);
        cases[1][0].add(first_writes(&ptrs(p, 0, n), a.gap));
        cases[1][1].add(first_writes(&ptrs(p, n, n), Duration::ZERO));
        munmap(p, 2 * n);
        // The configurations take turns at going first (order effects are shared).
        for j in (0..k).map(|j| (j + round as usize) % k) {
            let [wc, wb, mc, mb] = run_ours(&variants[j].1, n, a.gap, round);
            for ((at, pat), (ns, faults, cpu)) in [
                ((2 + j, 0), wc),
                ((2 + j, 1), wb),
                ((2 + k + j, 0), mc),
                ((2 + k + j, 1), mb),
            ] {
                let case = &mut cases[at][pat];
                case.add(ns);
                case.faults += faults;
                case.helper_cpu += cpu;
            }
        }
        match async_wp::sync_floor(n, a.gap) {
            Ok((cold, burst)) => {
                cases[2 + 2 * k][0].add(cold);
                cases[2 + 2 * k][1].add(burst);
            }
            Err(e) => eprintln!("  sync floor skipped: {e}"),
        }
        match async_wp::run(n, a.gap) {
            Ok(r) => {
                cases[3 + 2 * k][0].add(r.cold);
                cases[3 + 2 * k][1].add(r.burst);
                window.append(&mut r.window.clone());
                let (w, written, holds, intact) = r.check;
                assert!(
                    written == holds && intact,
                    "async prototype lost a write: wrote {written}, page holds {holds}, rest intact {intact}"
                );
                windows += w;
            }
            Err(e) => eprintln!("  async-wp prototype skipped: {e}"),
        }
        let (cold, burst) = run_file_cow(n, a.gap, round);
        cases[4 + 2 * k][0].add(cold);
        cases[4 + 2 * k][1].add(burst);
        if let Some((cold, burst)) = a.ksm.then(|| run_ksm(n, a.gap, round)).flatten() {
            cases[5 + 2 * k][0].add(cold);
            cases[5 + 2 * k][1].add(burst);
        }
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load after: {}", load.trim());
    if !window.is_empty() {
        window.sort_unstable();
        println!(
            "async-wp prototype: merge window (move out, compare, move back) median {:.2} us, \
             p90 {:.2} us, p99 {:.2} us; {windows} windows on a page written without pause \
             lost no write",
            q(&window, 0.5),
            q(&window, 0.9),
            q(&window, 0.99)
        );
    }
    for (pat, label) in [(0, "cold (one write per gap)"), (1, "burst (back to back)")] {
        println!("\n{label}: microseconds per first write");
        println!(
            "{:<22} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>9}  round medians",
            "case", "median", "p90", "p99", "max", "med/ksm", "p90/ksm", "cpu/fault"
        );
        let ksm: Option<Vec<u64>> = {
            let c = &cases[5 + 2 * k][pat];
            (!c.ns.is_empty()).then(|| {
                let mut s = c.ns.clone();
                s.sort_unstable();
                s
            })
        };
        for (name, c) in names.iter().zip(&cases) {
            let c = &c[pat];
            if c.ns.is_empty() {
                println!("{name:<22} (no data)");
                continue;
            }
            let mut s = c.ns.clone();
            s.sort_unstable();
            let ratio = |f: f64| {
                ksm.as_ref()
                    .map_or("-".to_string(), |k| format!("{:.2}", q(&s, f) / q(k, f)))
            };
            let cpu = if c.faults > 0 {
                format!("{:.2}", c.helper_cpu.as_secs_f64() * 1e6 / c.faults as f64)
            } else {
                "-".to_string()
            };
            let rm: Vec<String> = c
                .round_medians
                .iter()
                .map(|&m| format!("{:.2}", m as f64 / 1000.0))
                .collect();
            println!(
                "{name:<22} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>9} {:>9} {:>9}  {}",
                q(&s, 0.5),
                q(&s, 0.9),
                q(&s, 0.99),
                q(&s, 1.0),
                ratio(0.5),
                ratio(0.9),
                cpu,
                rm.join(" ")
            );
        }
    }
}
