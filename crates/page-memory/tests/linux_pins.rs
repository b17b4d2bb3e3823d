//! Pins on real memory: an io_uring fixed buffer (`IORING_REGISTER_BUFFERS`, a
//! `FOLL_LONGTERM` pin, as VFIO takes for device DMA) over a guest page. The backend sees
//! the process's pinned memory grow and refuses to protect, merge or recycle anything
//! until the embedder declares the range; then only the declared page is refused, and a
//! write made through the fixed buffer lands in the guest page (nothing lost). A test
//! binary of its own: `VmPin` is counted for the whole process. Skips, saying why, where
//! io_uring or userfaultfd with kernel faults is unavailable.
#![cfg(feature = "linux")]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use page_memory::linux::{LinuxConfig, LinuxMemory};
use page_memory::{DomainId, MergeOutcome, PageError, PageId, PageMemory, PAGE_SIZE, PAGE_WORDS};

/// `struct io_sqring_offsets`.
#[repr(C)]
#[derive(Default, Debug)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

/// `struct io_cqring_offsets`.
#[repr(C)]
#[derive(Default, Debug)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

/// `struct io_uring_params`.
#[repr(C)]
#[derive(Default, Debug)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}
const _: () = assert!(std::mem::size_of::<Params>() == 120);

/// `struct io_uring_sqe`, as far as `IORING_OP_READ_FIXED` uses it.
#[repr(C)]
#[derive(Default)]
struct Sqe {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    off: u64,
    addr: u64,
    len: u32,
    rw_flags: u32,
    user_data: u64,
    buf_index: u16,
    personality: u16,
    splice_fd_in: i32,
    addr3: u64,
    pad: u64,
}
const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

/// `struct io_uring_cqe`.
#[repr(C)]
struct Cqe {
    user_data: u64,
    res: i32,
    flags: u32,
}

const IORING_OFF_SQ_RING: i64 = 0;
const IORING_OFF_CQ_RING: i64 = 0x800_0000;
const IORING_OFF_SQES: i64 = 0x1000_0000;
const IORING_OP_READ_FIXED: u8 = 4;
const IORING_ENTER_GETEVENTS: u32 = 1;
const IORING_REGISTER_BUFFERS: u32 = 0;
const IORING_UNREGISTER_BUFFERS: u32 = 1;

/// A minimal io_uring: one submission at a time, raw system calls (no liburing).
struct Ring {
    fd: OwnedFd,
    sq: (*mut u8, usize),
    cq: (*mut u8, usize),
    sqes: (*mut u8, usize),
    p: Params,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `mmap` of a ring region of the io_uring `fd`.
fn map_ring(fd: i32, len: usize, off: i64) -> Result<*mut u8, i32> {
    // SAFETY: a new shared mapping of the io_uring's own memory at an address the kernel
    // chooses; nothing else is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(p.cast())
    }
}

impl Ring {
    fn new() -> Result<Ring, i32> {
        let mut p = Params::default();
        // SAFETY: io_uring_setup(2) takes the entry count and a `struct io_uring_params`
        // (`Params`, size checked), which it fills in.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut p as *mut Params) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: the descriptor just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let raw = fd.as_raw_fd();
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * std::mem::size_of::<Cqe>();
        let sqes_len = p.sq_entries as usize * std::mem::size_of::<Sqe>();
        let sq = map_ring(raw, sq_len, IORING_OFF_SQ_RING)?;
        let cq = map_ring(raw, cq_len, IORING_OFF_CQ_RING)?;
        let sqes = map_ring(raw, sqes_len, IORING_OFF_SQES)?;
        Ok(Ring {
            fd,
            sq: (sq, sq_len),
            cq: (cq, cq_len),
            sqes: (sqes, sqes_len),
            p,
        })
    }

    /// `IORING_REGISTER_BUFFERS` of one buffer: pins it (`FOLL_LONGTERM`).
    fn register_buffer(&self, addr: *mut u8, len: usize) -> Result<(), i32> {
        let iov = libc::iovec {
            iov_base: addr.cast(),
            iov_len: len,
        };
        // SAFETY: io_uring_register(2) with one iovec describing `len` bytes of this
        // process's memory at `addr`, which the kernel pins; it writes nothing of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.fd.as_raw_fd(),
                IORING_REGISTER_BUFFERS,
                &iov as *const libc::iovec,
                1u32,
            )
        };
        if r < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    fn unregister_buffers(&self) -> Result<(), i32> {
        // SAFETY: io_uring_register(2) without an argument: unpins the buffers.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.fd.as_raw_fd(),
                IORING_UNREGISTER_BUFFERS,
                std::ptr::null::<libc::c_void>(),
                0u32,
            )
        };
        if r < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    fn atomic(base: *mut u8, off: u32) -> &'static AtomicU32 {
        // SAFETY: `off` is an offset the kernel gave for a 32-bit ring field inside a
        // mapping that lives as long as the ring (which the tests keep for the whole
        // access); the kernel updates these fields concurrently, hence atomics.
        unsafe { AtomicU32::from_ptr(base.add(off as usize).cast::<u32>()) }
    }

    /// `IORING_OP_READ_FIXED`: reads `len` bytes of `file` at offset 0 into registered
    /// buffer 0 at `addr`, and waits for it: the bytes read.
    fn read_fixed(&self, file: i32, addr: *mut u8, len: u32) -> Result<i32, i32> {
        let (sq, cq) = (self.sq.0, self.cq.0);
        let o = &self.p.sq_off;
        let tail = Self::atomic(sq, o.tail).load(Ordering::Acquire);
        let mask = Self::atomic(sq, o.ring_mask).load(Ordering::Relaxed);
        let idx = tail & mask;
        let sqe = Sqe {
            opcode: IORING_OP_READ_FIXED,
            fd: file,
            off: 0,
            addr: addr as u64,
            len,
            user_data: 7,
            buf_index: 0,
            ..Sqe::default()
        };
        // SAFETY: entry `idx` (< sq_entries) of the SQE array, which the kernel reads only
        // after the tail moves past it below.
        unsafe { self.sqes.0.cast::<Sqe>().add(idx as usize).write(sqe) };
        // SAFETY: slot `idx` of the SQ ring's index array (u32s at `array`).
        unsafe {
            sq.add(o.array as usize)
                .cast::<u32>()
                .add(idx as usize)
                .write(idx)
        };
        Self::atomic(sq, o.tail).store(tail.wrapping_add(1), Ordering::Release);
        // SAFETY: io_uring_enter(2): submit one, wait for one; no memory argument.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd.as_raw_fd(),
                1u32,
                1u32,
                IORING_ENTER_GETEVENTS,
                std::ptr::null::<libc::c_void>(),
                0usize,
            )
        };
        if r < 0 {
            return Err(errno());
        }
        let c = &self.p.cq_off;
        let head = Self::atomic(cq, c.head).load(Ordering::Acquire);
        let cmask = Self::atomic(cq, c.ring_mask).load(Ordering::Relaxed);
        // SAFETY: completion `head & mask` of the CQE array, written by the kernel before
        // it moved the tail (io_uring_enter waited for it).
        let res = unsafe {
            cq.add(c.cqes as usize)
                .cast::<Cqe>()
                .add((head & cmask) as usize)
                .read()
        }
        .res;
        Self::atomic(cq, c.head).store(head.wrapping_add(1), Ordering::Release);
        Ok(res)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for (p, len) in [self.sq, self.cq, self.sqes] {
            // SAFETY: the ring's own mappings made in `new`, used by nothing else now.
            unsafe { libc::munmap(p.cast(), len) };
        }
    }
}

fn pattern(seed: u64, i: usize) -> u64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64) | 1
}

fn word(mem: &LinuxMemory, page: PageId, i: usize) -> &AtomicU64 {
    let base = mem.page_ptr(page).unwrap().cast::<u64>();
    // SAFETY: a word inside a page of a region of `mem`, which the test never removes;
    // every access of the test to guest memory is atomic.
    unsafe { AtomicU64::from_ptr(base.add(i)) }
}

fn fill(mem: &LinuxMemory, page: PageId, seed: u64) {
    for i in 0..PAGE_WORDS {
        word(mem, page, i).store(pattern(seed, i), Ordering::Relaxed);
    }
}

#[test]
fn a_page_pinned_by_an_io_uring_fixed_buffer_is_never_merged_and_its_writes_land() {
    let mem = match LinuxMemory::with_config(LinuxConfig::default()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: the pin test needs kernel faults (io_uring's pin writes): {e}");
            return;
        }
    };
    let ring = match Ring::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIPPED: no io_uring here (errno {e})");
            return;
        }
    };
    let r = mem.add_region(8, DomainId(0)).unwrap();
    let all: Vec<PageId> = (0..8).map(|i| PageId::new(r, i)).collect();
    for p in &all {
        fill(&mem, *p, 1);
    }
    let t: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    let canon = mem.canonicalize(all[0], t[0]).unwrap();
    assert_eq!(
        mem.merge(all[1], t[1], &canon).unwrap(),
        MergeOutcome::Merged
    );
    let before = mem.usage().unwrap();

    // The embedder pins page 4 (protected) without declaring it: a FOLL_LONGTERM pin for
    // write, which the fault thread sees as a write.
    let buf = mem.page_ptr(all[4]).unwrap();
    if let Err(e) = ring.register_buffer(buf, PAGE_SIZE) {
        eprintln!("SKIPPED: IORING_REGISTER_BUFFERS failed (errno {e})");
        return;
    }
    let pinned = mem.usage().unwrap();
    eprintln!(
        "VmPin {} -> {} bytes, VmLck {} -> {}",
        before.process_pinned, pinned.process_pinned, before.process_locked, pinned.process_locked
    );
    assert!(pinned.process_pinned >= before.process_pinned + PAGE_SIZE as u64);
    // The pin, taken for writing, went through the fault thread: page 4's token is stale,
    // so a merge of it changes nothing.
    assert!(mem.written_since(all[4], t[4]).unwrap());
    assert_eq!(
        mem.merge(all[4], t[4], &canon).unwrap(),
        MergeOutcome::Changed
    );
    // Nothing is protected while the pin is undeclared, and once a check has seen it,
    // nothing is merged, recycled or discarded either.
    assert!(mem
        .protect(&all[2..6])
        .iter()
        .all(|x| matches!(x, Err(PageError::Pinned(_)))));
    assert_eq!(
        mem.merge(all[2], t[2], &canon),
        Err(PageError::Pinned(all[2]))
    );
    assert!(mem
        .recycle(&all[6..7])
        .iter()
        .all(|x| matches!(x, Err(PageError::Pinned(_)))));
    assert!(mem.discard(&all[6..7]).iter().all(Result::is_err));
    let st = mem.stats();
    assert_eq!(st.pin_alarms, 1);
    assert!(st.undeclared_pinned_bytes >= PAGE_SIZE as u64);
    assert!(st.pin_refusals >= 6);
    // Declared: only that page is refused.
    mem.declare_pinned(r, 4..5).unwrap();
    let t2 = mem.protect(&all[2..6]);
    assert_eq!(t2[2], Err(PageError::Pinned(all[4])));
    for k in [0, 1, 3] {
        assert!(t2[k].is_ok(), "{:?}", t2[k]);
    }
    assert_eq!(
        mem.merge(all[2], t2[0].clone().unwrap(), &canon).unwrap(),
        MergeOutcome::Merged
    );
    assert!(matches!(
        mem.merge(all[4], t[4], &canon),
        Ok(MergeOutcome::Changed) | Err(PageError::Pinned(_))
    ));
    assert_eq!(mem.recycle(&all[4..5])[0], Err(PageError::Pinned(all[4])));
    assert_eq!(mem.discard(&all[4..5])[0], Err(PageError::Pinned(all[4])));
    assert_eq!(mem.stats().undeclared_pinned_bytes, 0);
    // A write through the fixed buffer (as a device's DMA would be) lands in the guest
    // page: nothing is lost.
    let data = vec![0xcdu8; PAGE_SIZE];
    let file = rustix::fs::memfd_create("pin test data", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::io::pwrite(&file, &data, 0).unwrap();
    let n = ring
        .read_fixed(file.as_raw_fd(), buf, PAGE_SIZE as u32)
        .expect("io_uring_enter");
    assert_eq!(n, PAGE_SIZE as i32, "READ_FIXED result");
    let mut got = [0u8; PAGE_SIZE];
    mem.read_page(all[4], &mut got).unwrap();
    assert!(
        got.iter().all(|&b| b == 0xcd),
        "the write through the pin was lost"
    );
    assert_eq!(
        word(&mem, all[4], 3).load(Ordering::Relaxed),
        u64::from_ne_bytes([0xcd; 8])
    );
    // Unpinned and undeclared: the page merges again.
    ring.unregister_buffers().unwrap();
    mem.undeclare_pinned(r, 4..5).unwrap();
    fill(&mem, all[4], 1);
    let t4 = mem.protect(&all[4..5])[0].clone().unwrap();
    assert_eq!(mem.merge(all[4], t4, &canon).unwrap(), MergeOutcome::Merged);
    // What a pin check costs: one read of /proc/self/status per operation.
    let n = 200;
    let t0 = Instant::now();
    for _ in 0..n {
        let _ = mem.recycle(&[]);
    }
    eprintln!(
        "pin check: {:.1} us per operation",
        t0.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    drop(canon);
}
