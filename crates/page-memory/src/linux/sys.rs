//! Every raw system call of the Linux backend, and the `/proc` files it reads. The rest
//! of the backend calls these functions, never `rustix::mm`, `libc` or `ioctl` directly.
//!
//! - [`uffd`]: userfaultfd, with the kernel's definitions written out (no bindgen).
//! - Files: [`memfd`], [`punch_hole`], [`allocated_bytes`], [`open_pagemap`]; the fault
//!   threads' stop signal: [`eventfd`], [`signal`], [`wait_readable`].
//! - Mappings: [`map_fresh_anon`], [`map_fresh_private_file`], [`map_anon_fixed`],
//!   [`map_file_fixed`], [`mremap_over`], [`munmap`], [`madvise`].
//! - Guest memory is never dereferenced to copy it out: [`read_guest`] uses
//!   `process_vm_readv` and [`pwrite_from_guest`] `pwrite`, both of which take the guest
//!   range as a plain address and fail with `EFAULT` where it is not mapped (an embedder
//!   unmapped a region) instead of faulting the process. `rustix` has no
//!   `process_vm_readv`, and its `pwrite` takes a `&[u8]`, which must not be made over
//!   memory that may vanish, so these two go through `libc`.
//! - `PAGEMAP_SCAN` (Linux 6.7) is an `ioctl` on `/proc/self/pagemap`; [`pagemap_scan`]
//!   describes it to `rustix::ioctl`.

pub(crate) mod uffd;

use std::ffi::c_void;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};
pub(crate) use rustix::mm::Advice;
use rustix::mm::{MapFlags, MremapFlags, ProtFlags};

/// A new memfd named `name` (as `/proc/self/maps` shows it), close-on-exec, sized to
/// `len` bytes (sparse: it holds no memory until written).
pub(crate) fn memfd(name: &str, len: u64) -> Result<OwnedFd, Errno> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, len)?;
    Ok(fd)
}

/// Punches `[offset, offset + len)` out of `file` (`fallocate(PUNCH_HOLE | KEEP_SIZE)`):
/// its memory goes back to the system and it reads as zeros again.
pub(crate) fn punch_hole(file: BorrowedFd<'_>, offset: u64, len: u64) -> Result<(), Errno> {
    use rustix::fs::FallocateFlags;
    rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// The size of `file` in bytes (`fstat`).
pub(crate) fn file_size(file: BorrowedFd<'_>) -> Result<u64, Errno> {
    Ok(rustix::fs::fstat(file)?.st_size as u64)
}

/// Bytes of memory `file` holds (its allocated blocks, `fstat`).
pub(crate) fn allocated_bytes(file: BorrowedFd<'_>) -> Result<u64, Errno> {
    Ok(rustix::fs::fstat(file)?.st_blocks as u64 * 512)
}

/// `/proc/self/pagemap`, read-only.
pub(crate) fn open_pagemap() -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        "/proc/self/pagemap",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
}

/// A non-blocking, close-on-exec eventfd (the fault threads' stop signal).
pub(crate) fn eventfd() -> Result<OwnedFd, Errno> {
    use rustix::event::EventfdFlags;
    rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
}

/// Signals the eventfd `fd` (adds one to its counter).
pub(crate) fn signal(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    rustix::io::write(fd, &1u64.to_ne_bytes()).map(drop)
}

/// Waits until `a` or `b` is readable (or has an error or hang-up), or `timeout` passed;
/// returns which have something to report.
pub(crate) fn wait_readable(
    a: BorrowedFd<'_>,
    b: BorrowedFd<'_>,
    timeout: Option<std::time::Duration>,
) -> Result<[bool; 2], Errno> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [
        PollFd::new(&a, PollFlags::IN),
        PollFd::new(&b, PollFlags::IN),
    ];
    let t = timeout.map(|d| Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    });
    rustix::event::poll(&mut fds, t.as_ref())?;
    Ok([!fds[0].revents().is_empty(), !fds[1].revents().is_empty()])
}

/// Maps `len` bytes of fresh private anonymous memory (readable, writable, no swap
/// reservation) where the kernel chooses; returns its address.
pub(crate) fn map_fresh_anon(len: usize) -> Result<usize, Errno> {
    // SAFETY: a new mapping at an address the kernel chooses overlaps nothing that exists,
    // so no memory anyone uses changes.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }?;
    Ok(p as usize)
}

/// Maps `len` bytes of `file` from offset 0, private (copy-on-write), readable and
/// writable, where the kernel chooses; returns its address.
pub(crate) fn map_fresh_private_file(file: BorrowedFd<'_>, len: usize) -> Result<usize, Errno> {
    // SAFETY: as in `map_fresh_anon`: a new mapping where the kernel chooses.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
            file,
            0,
        )
    }?;
    Ok(p as usize)
}

/// Maps `len` bytes of `file` from offset 0, shared and read-only, where the kernel
/// chooses; returns its address.
pub(crate) fn map_fresh_shared_view(file: BorrowedFd<'_>, len: usize) -> Result<usize, Errno> {
    // SAFETY: as in `map_fresh_anon`: a new mapping where the kernel chooses.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ,
            MapFlags::SHARED | MapFlags::NORESERVE,
            file,
            0,
        )
    }?;
    Ok(p as usize)
}

/// Replaces `[addr, addr + len)` with fresh private anonymous memory (zeros).
///
/// # Safety
/// The range must be memory the caller may replace: nothing may hold references into
/// it, and whoever reads it next must expect zeros (or the caller must know it held
/// zeros).
pub(crate) unsafe fn map_anon_fixed(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller vouches that the range may be replaced (see `# Safety`).
    unsafe {
        rustix::mm::mmap_anonymous(
            addr as *mut c_void,
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
        )
    }
    .map(drop)
}

/// Replaces `[addr, addr + len)` with a private (copy-on-write), readable and writable
/// mapping of `file` at `offset`.
///
/// # Safety
/// The range must be memory the caller may replace: nothing may hold references into
/// it, and its readers must see no change (the file's pages hold the range's contents),
/// unless they expect one.
pub(crate) unsafe fn map_file_fixed(
    addr: usize,
    len: usize,
    file: BorrowedFd<'_>,
    offset: u64,
) -> Result<(), Errno> {
    // SAFETY: the caller vouches that the range may be replaced (see `# Safety`).
    unsafe {
        rustix::mm::mmap(
            addr as *mut c_void,
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED,
            file,
            offset,
        )
    }
    .map(drop)
}

/// Moves the mapping `[from, from + len)` over `[to, to + len)`, replacing what was there
/// atomically (`mremap` with `MREMAP_MAYMOVE | MREMAP_FIXED`).
///
/// # Safety
/// `from` must be a mapping of the caller's own that nothing refers to, and the caller
/// must be allowed to replace `[to, to + len)` (as for [`map_anon_fixed`]).
pub(crate) unsafe fn mremap_over(from: usize, to: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller vouches for both ranges (see `# Safety`).
    unsafe {
        rustix::mm::mremap_fixed(
            from as *mut c_void,
            len,
            len,
            MremapFlags::MAYMOVE,
            to as *mut c_void,
        )
    }
    .map(drop)
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must be the caller's own mappings, which nothing refers to any more.
pub(crate) unsafe fn munmap(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller vouches for the range (see `# Safety`).
    unsafe { rustix::mm::munmap(addr as *mut c_void, len) }
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
/// The range must be memory the caller manages, and `advice` must change nothing its
/// readers do not expect: `MADV_DONTNEED` makes private anonymous pages read as zeros
/// (and private file pages as the file's page again).
pub(crate) unsafe fn madvise(addr: usize, len: usize, advice: Advice) -> Result<(), Errno> {
    // SAFETY: the caller vouches for the range and the advice (see `# Safety`).
    unsafe { rustix::mm::madvise(addr as *mut c_void, len, advice) }
}

/// `PAGE_IS_WRITTEN`: the page is not userfaultfd-write-protected.
#[allow(dead_code)]
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`: the page maps a page of a file (for us: of the canonical store).
pub(crate) const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`: the page is mapped.
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_PFNZERO`: the page maps the kernel's zero page.
pub(crate) const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `struct pm_scan_arg` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` of `<linux/fs.h>`: a run of pages with the same categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PageRegion {
    /// First byte.
    pub(crate) start: u64,
    /// One past the last byte.
    pub(crate) end: u64,
    /// The `PAGE_IS_*` bits (of the return mask) the run has.
    pub(crate) categories: u64,
}

/// One `PAGEMAP_SCAN` call, borrowing the output vector.
struct Scan<'a> {
    arg: PmScanArg,
    _out: PhantomData<&'a mut [PageRegion]>,
}

// SAFETY: `PAGEMAP_SCAN` is `_IOWR('f', 16, struct pm_scan_arg)`; its argument is a
// pointer to a `pm_scan_arg`, which `PmScanArg` lays out exactly (twelve `u64`, with
// `size` set to its size). The kernel writes `walk_end` into it and at most `vec_len`
// `page_region`s to `vec`, which points at the `&mut [PageRegion]` this value borrows for
// its lifetime. The return value is the number of regions written.
unsafe impl Ioctl for Scan<'_> {
    type Output = (usize, u64);
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        rustix::ioctl::opcode::read_write::<PmScanArg>(b'f', 16)
    }

    fn as_ptr(&mut self) -> *mut c_void {
        (&mut self.arg as *mut PmScanArg).cast()
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        extract_output: *mut c_void,
    ) -> rustix::io::Result<Self::Output> {
        // SAFETY: the caller passes the pointer `as_ptr` returned, after a successful call:
        // it points at our `PmScanArg`.
        let walk_end = unsafe { (*extract_output.cast::<PmScanArg>()).walk_end };
        Ok((out.max(0) as usize, walk_end))
    }
}

/// Scans the page tables of `[start, end)` of this process with `PAGEMAP_SCAN`: fills
/// `out` with runs of pages that have any of `anyof` (all pages with `anyof == 0`),
/// reporting the bits of `ret`. Returns the runs written and where the walk stopped (it
/// stops early when `out` is full).
pub(crate) fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    start: usize,
    end: usize,
    anyof: u64,
    ret: u64,
    out: &mut [PageRegion],
) -> Result<(usize, usize), Errno> {
    let scan = Scan {
        arg: PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: start as u64,
            end: end as u64,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            category_anyof_mask: anyof,
            return_mask: ret,
            ..PmScanArg::default()
        },
        _out: PhantomData,
    };
    // SAFETY: see the `Ioctl` impl of `Scan`; `pagemap` is an open `/proc/self/pagemap`,
    // and the kernel only reads the page tables of the range (it changes nothing without
    // `PM_SCAN_WP_MATCHING`, which is not set).
    let (n, walk_end) = unsafe { rustix::ioctl::ioctl(pagemap, scan) }?;
    Ok((n.min(out.len()), walk_end as usize))
}

/// The categories of the one page at `addr` (0 for a page with no page-table entry).
pub(crate) fn page_categories(pagemap: BorrowedFd<'_>, addr: usize) -> Result<u64, Errno> {
    let mut out = [PageRegion::default(); 1];
    let all = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO;
    let (n, _) = pagemap_scan(pagemap, addr, addr + crate::PAGE_SIZE, 0, all, &mut out)?;
    Ok(if n == 1 { out[0].categories } else { 0 })
}

/// Copies `buf.len()` bytes at address `addr` of this process into `buf`, without
/// dereferencing `addr`: `Err(EFAULT)` if any of it is not mapped.
pub(crate) fn read_guest(pid: i32, addr: usize, buf: &mut [u8]) -> Result<(), Errno> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, valid for `buf.len()` bytes of writes. `remote` is
    // only an address range of this process: the kernel reads it page by page and fails
    // with EFAULT where it is not mapped, instead of faulting us. Nothing else is touched.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    } else if n as usize != buf.len() {
        Err(Errno::FAULT)
    } else {
        Ok(())
    }
}

/// Writes the `len` bytes at address `addr` of this process to `file` at `offset`,
/// without dereferencing `addr`: `Err(EFAULT)` if any of it is not mapped.
pub(crate) fn pwrite_from_guest(
    file: BorrowedFd<'_>,
    addr: usize,
    len: usize,
    offset: u64,
) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: `addr` is passed as an address only: the kernel copies from it with fault
    // checks (EFAULT where unmapped). `file` is an open descriptor for the whole call.
    let n = unsafe {
        libc::pwrite(
            file.as_fd().as_raw_fd(),
            addr as *const c_void,
            len,
            offset as libc::off_t,
        )
    };
    if n < 0 {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    } else if n as usize != len {
        Err(Errno::NOSPC)
    } else {
        Ok(())
    }
}

/// `VmPin` (memory pinned for the long term: io_uring fixed buffers, RDMA, vhost-vdpa)
/// and `VmLck` (locked memory: `mlock`, VFIO type 1 DMA maps) of this process, in bytes,
/// from `/proc/self/status`.
pub(crate) fn pinned_and_locked() -> Option<(u64, u64)> {
    let status = open_status().ok()?;
    pinned_and_locked_from(status.as_fd())
}

/// `/proc/self/status`, kept open by callers that read it often.
pub(crate) fn open_status() -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        "/proc/self/status",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
}

/// [`pinned_and_locked`] read from an open `/proc/self/status` (one `pread`).
pub(crate) fn pinned_and_locked_from(status: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let mut buf = [0u8; 8192];
    let n = rustix::io::pread(status, &mut buf[..], 0).ok()?;
    let text = &buf[..n];
    let field = |name: &[u8]| -> Option<u64> {
        let at = text.windows(name.len()).position(|w| w == name)? + name.len();
        let digits = text[at..]
            .iter()
            .skip_while(|b| b.is_ascii_whitespace())
            .take_while(|b| b.is_ascii_digit());
        let mut kb = 0u64;
        let mut any = false;
        for d in digits {
            kb = kb.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            any = true;
        }
        any.then_some(kb * 1024)
    };
    Some((field(b"\nVmPin:")?, field(b"\nVmLck:")?))
}

/// `vm.max_map_count`, the most mappings (VMAs) a process may have.
pub(crate) fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The mappings (VMAs) this process has now: the lines of `/proc/self/maps`.
pub(crate) fn count_mappings() -> Option<u64> {
    let maps = std::fs::read("/proc/self/maps").ok()?;
    Some(maps.iter().filter(|&&b| b == b'\n').count() as u64)
}

/// One line of `/proc/self/maps`.
pub(crate) struct MapLine<'a> {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) perms: &'a str,
    pub(crate) dev: &'a str,
    pub(crate) inode: &'a str,
}

/// Parses a `/proc/self/maps` (or smaps header) line.
pub(crate) fn parse_map_line(line: &str) -> Option<MapLine<'_>> {
    let mut it = line.split_ascii_whitespace();
    let range = it.next()?;
    let (s, e) = range.split_once('-')?;
    let start = usize::from_str_radix(s, 16).ok()?;
    let end = usize::from_str_radix(e, 16).ok()?;
    let perms = it.next()?;
    let _offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    Some(MapLine {
        start,
        end,
        perms,
        dev,
        inode,
    })
}

/// Why `[start, end)` cannot be adopted: `None` if every byte of it lies in private,
/// anonymous, readable and writable mappings.
pub(crate) fn check_anonymous_private(start: usize, end: usize) -> Option<&'static str> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Some("cannot read /proc/self/maps to check the range");
    };
    let mut covered = start;
    for line in maps.lines() {
        let Some(m) = parse_map_line(line) else {
            continue;
        };
        if m.end <= covered || m.start >= end {
            continue;
        }
        if m.start > covered {
            return Some("part of the range is not mapped");
        }
        let p = m.perms.as_bytes();
        if p.len() < 4 || p[0] != b'r' || p[1] != b'w' || p[3] != b'p' {
            return Some("the range must be mapped private, readable and writable");
        }
        if m.dev != "00:00" || m.inode != "0" {
            return Some("the range must be anonymous memory (not a file mapping)");
        }
        covered = m.end;
        if covered >= end {
            return None;
        }
    }
    Some("part of the range is not mapped")
}

/// Whether `[start, end)` is mapped without a hole, by private readable and writable
/// anonymous memory or pages of the canonical store only: what a region this backend
/// manages looks like.
pub(crate) fn range_is_ours(start: usize, end: usize) -> bool {
    range_is_ours_in("self", start, end)
}

/// [`range_is_ours`] in process `pid` (`"self"`, or a number).
pub(crate) fn range_is_ours_in(pid: &str, start: usize, end: usize) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let mut covered = start;
    for line in maps.lines() {
        let Some(m) = parse_map_line(line) else {
            continue;
        };
        if m.end <= covered || m.start >= end {
            continue;
        }
        let anonymous = m.dev == "00:00" && m.inode == "0";
        // Private, readable and writable, as the backend maps everything in a region (a
        // PROT_NONE mapping an embedder put there is not ours).
        let p = m.perms.as_bytes();
        let rw_private = p.len() >= 4 && p[0] == b'r' && p[1] == b'w' && p[3] == b'p';
        if m.start > covered || !rw_private || !(anonymous || line.contains(STORE_NAME)) {
            return false;
        }
        covered = m.end;
        if covered >= end {
            return true;
        }
    }
    false
}

/// The name of the canonical store's memfd (as `/proc/self/maps` shows it).
pub(crate) const STORE_NAME: &str = "page-memory canonical store";

/// Totals of `/proc/self/smaps` over the mappings that lie in any of `ranges`.
#[derive(Default)]
pub(crate) struct SmapsTotals {
    pub(crate) rss: u64,
    pub(crate) pss: u64,
    pub(crate) anonymous: u64,
    pub(crate) swap: u64,
    pub(crate) mappings: u64,
}

/// Sums `Rss`, `Pss`, `Anonymous` and `Swap` of the mappings that overlap `ranges`
/// (sorted or not). Registration with userfaultfd splits mappings at region boundaries,
/// so every such mapping lies inside a region.
pub(crate) fn smaps_totals(ranges: &[(usize, usize)]) -> std::io::Result<SmapsTotals> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut t = SmapsTotals::default();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if !first.ends_with(':') {
            if let Some(m) = parse_map_line(line) {
                inside = ranges.iter().any(|&(s, e)| m.start < e && m.end > s);
                if inside {
                    t.mappings += 1;
                }
            }
            continue;
        }
        if !inside {
            continue;
        }
        let kb = || -> u64 {
            line.split_ascii_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
                * 1024
        };
        match first {
            "Rss:" => t.rss += kb(),
            "Pss:" => t.pss += kb(),
            "Anonymous:" => t.anonymous += kb(),
            "Swap:" => t.swap += kb(),
            _ => {}
        }
    }
    Ok(t)
}

/// Thread affinity, for the fault threads to follow the backend's own remaps
/// (`follow.rs`).
pub(super) mod affinity {
    use rustix::thread::{CpuSet, Pid};

    /// The calling thread's id.
    pub(in super::super) fn this_thread() -> Pid {
        rustix::thread::gettid()
    }

    /// The CPUs thread `tid` may run on.
    pub(in super::super) fn get(tid: Pid) -> Option<CpuSet> {
        rustix::thread::sched_getaffinity(Some(tid)).ok()
    }

    /// Lets thread `tid` run on `cpus` only (a thread that is gone, or CPUs the process
    /// may not use, leave it as it was).
    pub(in super::super) fn set(tid: Pid, cpus: &CpuSet) {
        let _ = rustix::thread::sched_setaffinity(Some(tid), cpus);
    }

    /// The CPU the calling thread runs on now (alone in a set).
    pub(in super::super) fn here() -> CpuSet {
        let mut set = CpuSet::new();
        set.set(rustix::thread::sched_getcpu());
        set
    }
}
