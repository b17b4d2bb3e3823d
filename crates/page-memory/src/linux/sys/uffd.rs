//! userfaultfd, without bindgen: the few definitions of the kernel's
//! `include/uapi/linux/userfaultfd.h` the backend uses, checked against the kernel's sizes
//! and ioctl numbers, and the raw calls on them.
//!
//! Creating a userfaultfd ([`Uffd::open`]) tries `/dev/userfaultfd` first (Linux 6.1;
//! whoever may open the device gets kernel faults, whatever the sysctl says), then the
//! `userfaultfd(2)` system call (Linux 4.3), whose access rules are:
//! - without `UFFD_USER_MODE_ONLY` (kernel faults handled too): allowed to a process with
//!   `CAP_SYS_PTRACE` in the initial user namespace, or to anyone when
//!   `vm.unprivileged_userfaultfd = 1`; otherwise `EPERM`;
//! - with `UFFD_USER_MODE_ONLY` (Linux 5.11; `EINVAL` before): allowed to anyone,
//!   whatever the sysctl says. Faults the kernel takes on the process's behalf
//!   (`read(2)` into registered memory, KVM) then fail with `EFAULT` instead of being
//!   reported.
//!
//! (Seccomp filters and LSMs may still deny either; container runtimes' default seccomp
//! profiles commonly deny `userfaultfd(2)`.)

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::io::Errno;

/// `UFFD_API`: the API version `UFFDIO_API` negotiates.
pub(crate) const UFFD_API: u64 = 0xAA;

/// `UFFD_USER_MODE_ONLY` (Linux 5.11): a flag of `userfaultfd(2)` and
/// `USERFAULTFD_IOC_NEW`: only faults taken in user mode are reported.
pub(crate) const UFFD_USER_MODE_ONLY: i32 = 1;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP` (Linux 5.7 for anonymous memory): write-protect
/// faults are reported with `UFFD_PAGEFAULT_FLAG_WP`.
pub(crate) const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protecting an empty entry of
/// anonymous memory leaves a marker, so the first write to it is still reported.
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// `UFFD_FEATURE_EVENT_REMAP` (Linux 4.11): a registered mapping moved by `mremap` is
/// reported with `UFFD_EVENT_REMAP` (and stays registered at its new address).
pub(crate) const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE` (Linux 4.11): `MADV_DONTNEED` / `MADV_REMOVE` (and
/// `MADV_FREE`) on a registered range are reported with `UFFD_EVENT_REMOVE`, before the
/// pages are dropped.
pub(crate) const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP` (Linux 4.11): `munmap` of a registered range, and any
/// `mmap(MAP_FIXED)` or `mremap` that replaces one, is reported with `UFFD_EVENT_UNMAP`
/// after the range is gone.
pub(crate) const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// The non-cooperative events the backend asks for.
pub(crate) const UFFD_FEATURE_EVENTS: u64 =
    UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;

/// `UFFDIO_REGISTER_MODE_WP`: register a range in write-protect mode.
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: remove protection).
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: remove protection without waking waiters (not
/// allowed together with `MODE_WP`).
pub(crate) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`. Registered in write-protect mode only, every page fault is a
/// write to a write-protected page (`UFFD_PAGEFAULT_FLAG_WP` set in its flags).
/// (Write-protect on shmem, Linux 5.19, needs no feature bit of its own to be asked for:
/// the kernel advertises it as `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`, and the backend probes
/// it by registering a mapping of a memfd.)
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `UFFD_EVENT_REMAP`: `arg.remap` says where a registered range moved.
pub(crate) const UFFD_EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`: `arg.remove` is a range about to be dropped (`MADV_DONTNEED`).
pub(crate) const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`: `arg.remove` is a range that was unmapped.
pub(crate) const UFFD_EVENT_UNMAP: u8 = 0x16;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdioWriteprotect {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
}

/// The `pagefault` member of `uffd_msg.arg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdPagefault {
    pub(crate) flags: u64,
    pub(crate) address: u64,
    /// `feat.ptid` (with `UFFD_FEATURE_THREAD_ID`, not used).
    pub(crate) ptid: u32,
}

/// The `remap` member of `uffd_msg.arg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdRemap {
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) len: u64,
}

/// The `remove` member of `uffd_msg.arg` (also used by `UFFD_EVENT_UNMAP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UffdRemove {
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// `uffd_msg.arg`: the members the backend reads, and the kernel's `reserved` member that
/// gives the union its size.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) union UffdMsgArg {
    pub(crate) pagefault: UffdPagefault,
    pub(crate) remap: UffdRemap,
    pub(crate) remove: UffdRemove,
    pub(crate) reserved: [u64; 3],
}

/// A message read from the userfaultfd, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A write to a write-protected page at this address.
    WriteFault(usize),
    /// `[start, end)` was unmapped (or replaced by a new mapping).
    Unmap { start: usize, end: usize },
    /// `[start, end)` is about to be dropped (`MADV_DONTNEED` and the like).
    Remove { start: usize, end: usize },
    /// `len` bytes at `from` moved to `to`.
    Remap { from: usize, to: usize, len: usize },
    /// Anything else (not asked for).
    Other(u8),
}

/// `struct uffd_msg` (declared `__packed` by the kernel, but every member is at its natural
/// alignment, so `repr(C)` lays it out the same: checked below).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UffdMsg {
    pub(crate) event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub(crate) arg: UffdMsgArg,
}

impl UffdMsg {
    const ZERO: UffdMsg = UffdMsg {
        event: 0,
        reserved1: 0,
        reserved2: 0,
        reserved3: 0,
        arg: UffdMsgArg { reserved: [0; 3] },
    };
}

impl UffdMsg {
    /// The message, decoded.
    pub(crate) fn decode(&self) -> Event {
        match self.event {
            UFFD_EVENT_PAGEFAULT => {
                // SAFETY: every member of the union is plain integers (any bit pattern is
                // valid); the kernel fills `pagefault` for UFFD_EVENT_PAGEFAULT.
                let f = unsafe { self.arg.pagefault };
                Event::WriteFault(f.address as usize)
            }
            UFFD_EVENT_UNMAP | UFFD_EVENT_REMOVE => {
                // SAFETY: as above; the kernel fills `remove` for UNMAP and REMOVE.
                let r = unsafe { self.arg.remove };
                let (start, end) = (r.start as usize, r.end as usize);
                if self.event == UFFD_EVENT_UNMAP {
                    Event::Unmap { start, end }
                } else {
                    Event::Remove { start, end }
                }
            }
            UFFD_EVENT_REMAP => {
                // SAFETY: as above; the kernel fills `remap` for REMAP.
                let r = unsafe { self.arg.remap };
                Event::Remap {
                    from: r.from as usize,
                    to: r.to as usize,
                    len: r.len as usize,
                }
            }
            other => Event::Other(other),
        }
    }
}

impl std::fmt::Debug for UffdMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdMsg")
            .field("event", &self.event)
            .field("decoded", &self.decode())
            .finish()
    }
}

// The kernel's sizes (include/uapi/linux/userfaultfd.h): a mismatch would make the ioctl
// numbers below wrong and the kernel read or write past our structs.
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdMsgArg>() == 24);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::offset_of!(UffdMsg, arg) == 8);

/// `_IOC(dir, 0xAA, nr, size)` of `<asm-generic/ioctl.h>` (x86, arm64, riscv: dir in bits
/// 30-31, size in 16-29, type in 8-15, nr in 0-7).
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (0xAA << 8) | nr
}
/// `_IOC_WRITE`: userspace writes the argument (the kernel reads it).
const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: the kernel writes the argument.
const IOC_READ: u32 = 2;

// The ioctls, as include/uapi/linux/userfaultfd.h defines them:
//   #define UFFDIO_API          _IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)          // 0x3F
//   #define UFFDIO_REGISTER     _IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register) // 0x00
//   #define UFFDIO_UNREGISTER   _IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)   // 0x01
//   #define UFFDIO_WAKE         _IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)         // 0x02
//   #define UFFDIO_WRITEPROTECT _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect) // 0x06
//   #define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
// (UNREGISTER and WAKE are `_IOR` although the kernel only reads their argument: the
// numbers are what they are.)
/// `UFFDIO_API`.
pub(crate) const UFFDIO_API: u32 =
    ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`.
pub(crate) const UFFDIO_REGISTER: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
/// `UFFDIO_UNREGISTER`.
pub(crate) const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
/// `UFFDIO_WAKE`.
pub(crate) const UFFDIO_WAKE: u32 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT`.
pub(crate) const UFFDIO_WRITEPROTECT: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
/// `USERFAULTFD_IOC_NEW` (on `/dev/userfaultfd`, Linux 6.1): its argument is the flags a
/// `userfaultfd(2)` call would take.
pub(crate) const USERFAULTFD_IOC_NEW: u32 = ioc(0, 0x00, 0);

// The same numbers as the kernel's headers produce (x86-64).
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xAA00);

/// The errno of the last failed call.
fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// `ioctl(fd, request, arg)` with a pointer argument; the return value on success.
///
/// # Safety
/// `request` must be an ioctl whose argument is a `T` (read and/or written by the kernel,
/// and nothing beyond it), and `arg` must point at a valid `T` for the call.
unsafe fn ioctl_ptr<T>(fd: BorrowedFd<'_>, request: u32, arg: *mut T) -> Result<i32, Errno> {
    // SAFETY: the caller vouches for `request` and `arg`; `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg.cast::<c_void>()) };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r)
    }
}

/// How a userfaultfd was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdSource {
    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1).
    DevUserfaultfd,
    /// The `userfaultfd(2)` system call.
    Syscall,
}

/// A userfaultfd (not yet through `UFFDIO_API` when made by [`Uffd::open`]).
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

/// Why [`Uffd::open`] failed: the errors of both ways.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpenError {
    /// `/dev/userfaultfd` (its `open`, or `USERFAULTFD_IOC_NEW`).
    pub(crate) dev: Errno,
    /// `userfaultfd(2)`.
    pub(crate) syscall: Errno,
}

impl Uffd {
    /// A new userfaultfd, close-on-exec and non-blocking, with `UFFD_USER_MODE_ONLY` if
    /// `user_mode_only`: from `/dev/userfaultfd` if this process may use it, else from the
    /// `userfaultfd(2)` system call.
    pub(crate) fn open(user_mode_only: bool) -> Result<(Uffd, UffdSource), OpenError> {
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if user_mode_only {
            flags |= UFFD_USER_MODE_ONLY;
        }
        let dev = match Self::from_dev(flags) {
            Ok(u) => return Ok((u, UffdSource::DevUserfaultfd)),
            Err(e) => e,
        };
        // SAFETY: userfaultfd(2) takes one int of flags and returns a new descriptor (or
        // -1); it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(OpenError {
                dev,
                syscall: last_errno(),
            });
        }
        // SAFETY: `fd` is the new descriptor the kernel just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok((Uffd { fd }, UffdSource::Syscall))
    }

    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
    fn from_dev(flags: i32) -> Result<Uffd, Errno> {
        let dev = rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument itself (no
        // pointer) and returns a new userfaultfd descriptor; `dev` is the open device.
        let fd = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as _,
                flags as libc::c_long,
            )
        };
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: the new descriptor the kernel just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Uffd { fd })
    }

    /// `UFFDIO_API` asking for `features`: the features the kernel supports (all of them,
    /// not only those asked for). `EINVAL` if one asked for is not supported; a userfaultfd
    /// takes one successful `UFFDIO_API` only.
    pub(crate) fn api(&self, features: u64) -> Result<u64, Errno> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API's argument is a `struct uffdio_api`, which `UffdioApi` lays
        // out (size checked above); the kernel reads and writes only it.
        unsafe { ioctl_ptr(self.fd.as_fd(), UFFDIO_API, &mut api) }?;
        Ok(api.features)
    }

    /// `UFFDIO_REGISTER` of `[addr, addr + len)` in write-protect mode.
    pub(crate) fn register_wp(&self, addr: usize, len: usize) -> Result<(), Errno> {
        let mut reg = UffdioRegister {
            range: range(addr, len),
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER's argument is a `struct uffdio_register` (`UffdioRegister`,
        // size checked above); the kernel reads the range and mode and writes `ioctls`. The
        // range is only an address range to it: registering changes no memory contents.
        unsafe { ioctl_ptr(self.fd.as_fd(), UFFDIO_REGISTER, &mut reg) }.map(drop)
    }

    /// `UFFDIO_UNREGISTER` of `[addr, addr + len)` (also wakes its waiting faults).
    pub(crate) fn unregister(&self, addr: usize, len: usize) -> Result<(), Errno> {
        let mut r = range(addr, len);
        // SAFETY: UFFDIO_UNREGISTER's argument is a `struct uffdio_range` (`UffdioRange`),
        // which the kernel only reads; unregistering changes no memory contents.
        unsafe { ioctl_ptr(self.fd.as_fd(), UFFDIO_UNREGISTER, &mut r) }.map(drop)
    }

    /// `UFFDIO_WAKE` of `[addr, addr + len)`: wakes the faults waiting there.
    pub(crate) fn wake(&self, addr: usize, len: usize) -> Result<(), Errno> {
        let mut r = range(addr, len);
        // SAFETY: UFFDIO_WAKE's argument is a `struct uffdio_range` (`UffdioRange`), which
        // the kernel only reads.
        unsafe { ioctl_ptr(self.fd.as_fd(), UFFDIO_WAKE, &mut r) }.map(drop)
    }

    /// `UFFDIO_WRITEPROTECT` of `[addr, addr + len)`: protects it if `protect`, else removes
    /// the protection, waking the writers waiting there if `wake`.
    pub(crate) fn writeprotect(
        &self,
        addr: usize,
        len: usize,
        protect: bool,
        wake: bool,
    ) -> Result<(), Errno> {
        let mode = match (protect, wake) {
            (true, _) => UFFDIO_WRITEPROTECT_MODE_WP,
            (false, true) => 0,
            (false, false) => UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
        };
        let mut wp = UffdioWriteprotect {
            range: range(addr, len),
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT's argument is a `struct uffdio_writeprotect`
        // (`UffdioWriteprotect`, size checked above), which the kernel only reads. It
        // changes page-table protection of the range, never its contents.
        unsafe { ioctl_ptr(self.fd.as_fd(), UFFDIO_WRITEPROTECT, &mut wp) }.map(drop)
    }

    /// Reads pending messages into `buf` with `read(2)`: the messages read (`EAGAIN` when
    /// none is pending: the descriptor is non-blocking).
    pub(crate) fn read_msgs<'b>(&self, buf: &'b mut [UffdMsg]) -> Result<&'b [UffdMsg], Errno> {
        // SAFETY: `buf` is `buf.len()` writable `UffdMsg`s, plain integers for which any
        // bytes are valid; the kernel writes whole 32-byte messages into it, at most its
        // size.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<c_void>(),
                std::mem::size_of_val(buf),
            )
        };
        if n < 0 {
            return Err(last_errno());
        }
        let msgs = n as usize / std::mem::size_of::<UffdMsg>();
        Ok(&buf[..msgs.min(buf.len())])
    }

    /// A buffer of `n` messages for [`read_msgs`](Self::read_msgs).
    pub(crate) fn msg_buffer(n: usize) -> Vec<UffdMsg> {
        vec![UffdMsg::ZERO; n]
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn range(addr: usize, len: usize) -> UffdioRange {
    UffdioRange {
        start: addr as u64,
        len: len as u64,
    }
}
