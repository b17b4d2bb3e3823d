//! The VMM's errors.

use std::fmt;
use std::time::Duration;

/// What went wrong creating or running a VM.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/kvm` does not exist: no KVM on this machine (or not exposed to it).
    KvmMissing,
    /// `/dev/kvm` exists but this process may not open it (not root, not in group `kvm`).
    KvmDenied,
    /// Another error opening `/dev/kvm` or checking its API version.
    KvmOpen(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    Kvm {
        /// What the VMM was doing.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up or accessed.
    Memory(String),
    /// The guest image is not a loadable image (see the reason).
    ImageLoad(String),
    /// The guest image does not fit in the image area.
    ImageTooBig {
        /// The end of the image (guest-physical, exclusive).
        end: u64,
        /// The end of the image area.
        limit: u64,
    },
    /// The VM's configuration cannot work (see the reason).
    Config(String),
    /// A vCPU stopped in a way the VMM does not handle.
    UnexpectedExit {
        /// The vCPU's index.
        vcpu: u32,
        /// The exit reason, as KVM gave it.
        reason: String,
        /// The guest's instruction pointer after the exit.
        rip: u64,
    },
    /// A vCPU reported failure on the done port.
    GuestFailed {
        /// The vCPU's index.
        vcpu: u32,
        /// The status it wrote.
        status: u32,
        /// The end of the VM's console output (a panic message, usually).
        console_tail: String,
    },
    /// The VM did not finish in time; its vCPUs were stopped.
    Timeout {
        /// The time limit.
        after: Duration,
        /// The vCPUs that were still running.
        running: Vec<u32>,
    },
    /// A VM can run only once.
    AlreadyRun,
    /// A vCPU thread could not be started, kicked or joined.
    Thread(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::KvmMissing => write!(
                f,
                "/dev/kvm is missing: this machine exposes no KVM (load kvm_intel or kvm_amd, \
                 or enable nested virtualization)"
            ),
            Error::KvmDenied => write!(
                f,
                "/dev/kvm is denied: this process may not open it (run as root or join the \
                 `kvm` group)"
            ),
            Error::KvmOpen(e) => write!(f, "cannot open /dev/kvm: {e}"),
            Error::Kvm { op, source } => write!(f, "KVM failed to {op}: {source}"),
            Error::Memory(m) => write!(f, "guest memory: {m}"),
            Error::ImageLoad(m) => write!(f, "the guest image fails to load: {m}"),
            Error::ImageTooBig { end, limit } => write!(
                f,
                "the guest image is too big: it ends at {end:#x}, the image area at {limit:#x}"
            ),
            Error::Config(m) => write!(f, "bad VM configuration: {m}"),
            Error::UnexpectedExit { vcpu, reason, rip } => write!(
                f,
                "vCPU {vcpu} exited unexpectedly: {reason} (guest RIP {rip:#x})"
            ),
            Error::GuestFailed {
                vcpu,
                status,
                console_tail,
            } => write!(
                f,
                "vCPU {vcpu} reported failure (status {status}); console: {console_tail:?}"
            ),
            Error::Timeout { after, running } => write!(
                f,
                "the VM did not finish within {after:?}; vCPUs {running:?} were still running"
            ),
            Error::AlreadyRun => write!(f, "this VM has already run (a VM runs once)"),
            Error::Thread(m) => write!(f, "vCPU thread: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::KvmOpen(e) | Error::Kvm { source: e, .. } => Some(e),
            _ => None,
        }
    }
}
