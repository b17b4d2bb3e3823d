//! Why a [`LinuxMemory`](super::LinuxMemory) could not be made: [`LinuxError`], and the
//! kernel features it names ([`KernelFeature`]) with the Linux version that provides each.

use std::fmt;

use crate::PageError;

/// A kernel feature the backend uses, with the Linux version that provides it.
///
/// The backend needs the [required](KernelFeature::required) ones to protect and merge
/// pages; without the others it falls back to slower ways (see the module docs). The
/// kernel floor is therefore Linux 5.19 (6.7 for everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelFeature {
    /// userfaultfd itself (Linux 4.3, `CONFIG_USERFAULTFD`): the fault thread.
    Userfaultfd,
    /// `UFFD_USER_MODE_ONLY` (Linux 5.11): a userfaultfd for a process without privilege
    /// for kernel faults.
    UserModeOnly,
    /// userfaultfd write-protect on anonymous memory (Linux 5.7): protecting guest pages.
    UffdWriteProtectAnon,
    /// userfaultfd write-protect on shmem, private mappings of a memfd included (Linux
    /// 5.19): protecting merged pages, which map the canonical store, so that their
    /// copy-on-write breaks are seen.
    UffdWriteProtectShmem,
    /// `MADV_POPULATE_WRITE` (Linux 5.14): breaking a merged page's sharing in the fault
    /// thread and in `unmerge`.
    PopulateWrite,
    /// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): protecting empty entries without
    /// faulting the zero page in first (optional).
    WpUnpopulated,
    /// `PAGEMAP_SCAN` (Linux 6.7): catching writes in a remap's window without reading
    /// the page back, and the page census of [`LinuxUsage`](super::LinuxUsage) (optional).
    PagemapScan,
}

impl KernelFeature {
    /// The Linux version that first has it.
    pub fn since(self) -> &'static str {
        match self {
            KernelFeature::Userfaultfd => "4.3",
            KernelFeature::UserModeOnly => "5.11",
            KernelFeature::UffdWriteProtectAnon => "5.7",
            KernelFeature::UffdWriteProtectShmem => "5.19",
            KernelFeature::PopulateWrite => "5.14",
            KernelFeature::WpUnpopulated => "6.4",
            KernelFeature::PagemapScan => "6.7",
        }
    }

    /// Whether the backend needs it to protect and merge pages (`false`: it has a
    /// fallback). [`UserModeOnly`](KernelFeature::UserModeOnly) is needed only by a
    /// process without privilege for kernel faults.
    pub fn required(self) -> bool {
        !matches!(
            self,
            KernelFeature::WpUnpopulated | KernelFeature::PagemapScan
        )
    }

    /// Its name, as the kernel's headers spell it.
    pub fn name(self) -> &'static str {
        match self {
            KernelFeature::Userfaultfd => "userfaultfd",
            KernelFeature::UserModeOnly => "UFFD_USER_MODE_ONLY",
            KernelFeature::UffdWriteProtectAnon => "userfaultfd write-protect on anonymous memory",
            KernelFeature::UffdWriteProtectShmem => {
                "userfaultfd write-protect on shmem (UFFD_FEATURE_WP_HUGETLBFS_SHMEM)"
            }
            KernelFeature::PopulateWrite => "MADV_POPULATE_WRITE",
            KernelFeature::WpUnpopulated => "UFFD_FEATURE_WP_UNPOPULATED",
            KernelFeature::PagemapScan => "PAGEMAP_SCAN",
        }
    }

    /// A static sentence for [`PageError::Unsupported`].
    fn unsupported(self) -> &'static str {
        match self {
            KernelFeature::Userfaultfd => {
                "the kernel has no userfaultfd (CONFIG_USERFAULTFD, Linux 4.3) or a seccomp \
                 filter denies it: use a kernel built with it, or allow userfaultfd(2) in the \
                 seccomp profile"
            }
            KernelFeature::UserModeOnly => {
                "this kernel has no UFFD_USER_MODE_ONLY (Linux 5.11): run as root, with \
                 CAP_SYS_PTRACE, or with vm.unprivileged_userfaultfd = 1, or use Linux 5.11+"
            }
            KernelFeature::UffdWriteProtectAnon => {
                "the kernel lacks userfaultfd write-protect on anonymous memory: use Linux \
                 5.7+ on an architecture that has it (CONFIG_HAVE_ARCH_USERFAULTFD_WP, x86-64 \
                 among others)"
            }
            KernelFeature::UffdWriteProtectShmem => {
                "the kernel lacks userfaultfd write-protect on shmem \
                 (UFFD_FEATURE_WP_HUGETLBFS_SHMEM): use Linux 5.19+ built with \
                 CONFIG_PTE_MARKER_UFFD_WP"
            }
            KernelFeature::PopulateWrite => "the kernel lacks MADV_POPULATE_WRITE: use Linux 5.14+",
            KernelFeature::WpUnpopulated => {
                "the kernel lacks UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4)"
            }
            KernelFeature::PagemapScan => "the kernel lacks PAGEMAP_SCAN (Linux 6.7)",
        }
    }
}

impl fmt::Display for KernelFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (Linux {})", self.name(), self.since())
    }
}

/// Why [`LinuxMemory::new`](super::LinuxMemory::new) failed. Converts into a
/// [`PageError`] (`?` works in functions that return one).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinuxError {
    /// A kernel feature the backend needs is missing here.
    Missing {
        /// The feature.
        feature: KernelFeature,
        /// The errno of the call that showed it (0 if the kernel said so without one).
        errno: i32,
    },
    /// This process may not create a userfaultfd that handles kernel faults, and
    /// [`LinuxConfig::require_kernel_faults`](super::LinuxConfig::require_kernel_faults)
    /// is on (else the backend falls back to a user-mode-only userfaultfd and reports it
    /// in [`LinuxCaps::kernel_faults`](super::LinuxCaps::kernel_faults)).
    KernelFaultsDenied {
        /// Why `/dev/userfaultfd` could not be used (errno).
        dev_errno: i32,
        /// Why `userfaultfd(2)` refused (errno).
        syscall_errno: i32,
    },
    /// No userfaultfd could be created at all, for want of permission: a seccomp filter or
    /// an LSM denies even the user-mode-only one.
    Denied {
        /// Why `/dev/userfaultfd` could not be used (errno).
        dev_errno: i32,
        /// Why `userfaultfd(2)` refused (errno).
        syscall_errno: i32,
    },
    /// [`LinuxConfig::use_userfaultfd`](super::LinuxConfig::use_userfaultfd) is off while
    /// [`LinuxConfig::require_userfaultfd`](super::LinuxConfig::require_userfaultfd) is on.
    Disabled,
    /// Another failure (a system call, the canonical store's set-up).
    Page(PageError),
}

impl LinuxError {
    /// The kernel feature it names, if any.
    pub fn missing_feature(&self) -> Option<KernelFeature> {
        match self {
            LinuxError::Missing { feature, .. } => Some(*feature),
            _ => None,
        }
    }
}

fn errno_name(errno: i32) -> String {
    if errno == 0 {
        return "no error number".into();
    }
    std::io::Error::from_raw_os_error(errno).to_string()
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinuxError::Missing { feature, errno } => write!(
                f,
                "missing kernel feature {feature}: {} [{}]",
                feature.unsupported(),
                errno_name(*errno)
            ),
            LinuxError::KernelFaultsDenied {
                dev_errno,
                syscall_errno,
            } => write!(
                f,
                "no userfaultfd that handles kernel faults for this process (/dev/userfaultfd: \
                 {}; userfaultfd(2): {}): run as root or with CAP_SYS_PTRACE, grant read-write \
                 access to /dev/userfaultfd (Linux 6.1+), or set vm.unprivileged_userfaultfd = 1; \
                 or, if guest memory is written from user space only (never by KVM's vCPUs), turn \
                 off LinuxConfig::kernel_faults (a user-mode-only userfaultfd, allowed to any \
                 process since Linux 5.11; writes the kernel makes to protected pages then fail \
                 with EFAULT)",
                errno_name(*dev_errno),
                errno_name(*syscall_errno)
            ),
            LinuxError::Denied {
                dev_errno,
                syscall_errno,
            } => write!(
                f,
                "userfaultfd denied even in user-mode-only mode (/dev/userfaultfd: {}; \
                 userfaultfd(2): {}): a seccomp filter or an LSM denies it; allow userfaultfd(2) \
                 in the seccomp profile (container runtimes deny it by default), or grant \
                 read-write access to /dev/userfaultfd",
                errno_name(*dev_errno),
                errno_name(*syscall_errno)
            ),
            LinuxError::Disabled => write!(
                f,
                "userfaultfd is turned off by LinuxConfig::use_userfaultfd, yet required by \
                 LinuxConfig::require_userfaultfd: turn one of them around"
            ),
            LinuxError::Page(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LinuxError {}

impl From<PageError> for LinuxError {
    fn from(e: PageError) -> Self {
        LinuxError::Page(e)
    }
}

impl From<LinuxError> for PageError {
    fn from(e: LinuxError) -> Self {
        match e {
            LinuxError::Missing { feature, .. } => PageError::Unsupported(feature.unsupported()),
            LinuxError::KernelFaultsDenied { .. } => PageError::Unsupported(
                "no userfaultfd that handles kernel faults for this process: run as root or with \
                 CAP_SYS_PTRACE, grant read-write access to /dev/userfaultfd, set \
                 vm.unprivileged_userfaultfd = 1, or (guest memory written from user space only) turn \
                 off LinuxConfig::kernel_faults",
            ),
            LinuxError::Denied { .. } => PageError::Unsupported(
                "userfaultfd denied even in user-mode-only mode (seccomp or LSM): allow \
                 userfaultfd(2) in the seccomp profile, or grant access to /dev/userfaultfd",
            ),
            LinuxError::Disabled => PageError::Unsupported(
                "userfaultfd turned off by LinuxConfig::use_userfaultfd, yet required by \
                 LinuxConfig::require_userfaultfd",
            ),
            LinuxError::Page(e) => e,
        }
    }
}
