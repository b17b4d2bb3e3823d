//! The transport's OS calls: Unix `SOCK_SEQPACKET` sockets that carry one
//! [`wire`](crate::wire) frame per datagram, with file descriptors as `SCM_RIGHTS`.
//!
//! Every socket is created close-on-exec, and so is every descriptor received. Sockets
//! this module connects or accepts get a send buffer large enough for a
//! [`MAX_FRAME`]-byte datagram (Linux refuses a datagram larger than the sender's
//! `SO_SNDBUF`, whose default is about 208 KiB). The calls go through rustix: the
//! module has no `unsafe` code.
//!
//! # Receiving
//! [`recv`] reads one datagram into a buffer of [`MAX_FRAME`] bytes. A longer datagram
//! is cut there and reported [`Received::truncated`]; at most [`MAX_FDS`] descriptors
//! are kept, the others closed and reported [`Received::fds_dropped`]. End of stream is
//! `Ok(None)`; so is a zero-byte datagram, which a seqpacket socket cannot tell apart
//! from it ([`send`] never sends one). A timeout is an error of kind
//! [`io::ErrorKind::TimedOut`].

#![forbid(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown, SocketAddrUnix, SocketFlags,
    SocketType,
};

use crate::wire::MAX_FRAME;

/// The most file descriptors a frame carries; [`recv`] closes any more.
pub const MAX_FDS: usize = 4;

/// The listener's backlog of connections not yet accepted.
pub const BACKLOG: i32 = 128;

/// `SO_SNDBUF` for connected sockets: a [`MAX_FRAME`] datagram plus room for the
/// kernel's bookkeeping. (Linux caps the request at `net.core.wmem_max`, then doubles it;
/// with the default cap of 208 KiB that gives 416 KiB.)
const SEND_BUFFER: usize = MAX_FRAME + 64 * 1024;

/// The credentials of a connected peer, as the kernel recorded them when it connected
/// (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's process id.
    pub pid: i32,
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
}

/// One datagram [`recv`] read.
#[derive(Debug)]
pub struct Received {
    /// The frame's length in bytes: the buffer passed to [`recv`] now holds it.
    pub len: usize,
    /// The descriptors that came with the frame (at most [`MAX_FDS`]), close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The datagram was longer than [`MAX_FRAME`]: the buffer holds only its start.
    pub truncated: bool,
    /// Descriptors came beyond [`MAX_FDS`] (or beyond the control buffer): they were
    /// closed.
    pub fds_dropped: bool,
}

fn new_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

fn size_send_buffer(fd: &OwnedFd) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_send_buffer_size(
        fd,
        SEND_BUFFER,
    )?)
}

/// Creates a listening socket bound to `path`.
///
/// If `path` exists, it is removed only if it is a socket nobody listens on (connecting
/// to it fails with `ECONNREFUSED`: a service that exited without removing it);
/// otherwise the call fails with [`io::ErrorKind::AddrInUse`]. The socket file gets the
/// process's umask; restricting who may connect is the caller's (directory permissions,
/// and [`peer_cred`] on each connection).
///
/// # Errors
/// The OS's: a path longer than `sun_path`, a directory that does not exist, ...
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let addr = SocketAddrUnix::new(path)?;
    let fd = new_socket()?;
    match rustix::net::bind(&fd, &addr) {
        Ok(()) => {}
        Err(Errno::ADDRINUSE) => {
            remove_stale(path, &addr)?;
            rustix::net::bind(&fd, &addr)?;
        }
        Err(e) => return Err(e.into()),
    }
    rustix::net::listen(&fd, BACKLOG)?;
    Ok(fd)
}

/// Removes the socket file at `path` if nobody listens on it.
fn remove_stale(path: &Path, addr: &SocketAddrUnix) -> io::Result<()> {
    let in_use = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: {why}", path.display()),
        ))
    };
    let probe = new_socket()?;
    match rustix::net::connect(&probe, addr) {
        Ok(()) => in_use("a service is listening on it"),
        Err(Errno::CONNREFUSED) => {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_socket() {
                return in_use("exists and is not a socket");
            }
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => in_use(&format!("exists, and connecting to it failed: {e}")),
    }
}

/// Accepts a connection on `listener` (blocking until one comes).
///
/// # Errors
/// The OS's; `EINTR` is retried.
pub fn accept(listener: impl AsFd) -> io::Result<OwnedFd> {
    loop {
        match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
            Ok(fd) => {
                size_send_buffer(&fd)?;
                return Ok(fd);
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Accepts a connection on `listener`, waiting at most `timeout`: `Ok(None)` if none
/// came.
///
/// # Errors
/// The OS's.
pub fn accept_within(listener: impl AsFd, timeout: Duration) -> io::Result<Option<OwnedFd>> {
    let listener = listener.as_fd();
    let deadline = Instant::now() + timeout;
    loop {
        match wait_readable(listener, deadline) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(None),
            Err(e) => return Err(e),
        }
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
            Ok(fd) => {
                // Blocking again: `recv` polls for its timeouts.
                rustix::io::ioctl_fionbio(&fd, false)?;
                size_send_buffer(&fd)?;
                return Ok(Some(fd));
            }
            Err(Errno::INTR) | Err(Errno::AGAIN) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A pidfd of process `pid` (`pidfd_open`): it says when that very process exits, even
/// once its pid is reused.
///
/// # Errors
/// The OS's (`ESRCH`: no such process any more).
pub fn pidfd(pid: i32) -> io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Whether the process of `pidfd` has exited (its pidfd polls readable then).
pub fn process_exited(pidfd: impl AsFd) -> bool {
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

/// Lets process `pid` read this process's memory under the Yama ptrace policy
/// (`prctl(PR_SET_PTRACER)`; where Yama's `ptrace_scope` is 1, only an ancestor may
/// otherwise): how an agent lets its service read guest pages with `process_vm_readv`.
///
/// # Errors
/// The OS's (`EINVAL` where Yama is not built in: nothing to allow then).
pub fn allow_ptracer(pid: i32) -> io::Result<()> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::set_ptracer(
        rustix::process::PTracer::ProcessID(pid),
    )?)
}

/// Connects to the service listening at `path`.
///
/// # Errors
/// The OS's: `ECONNREFUSED` when nothing listens there, `ENOENT` when there is no such
/// socket file, ...
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let addr = SocketAddrUnix::new(path)?;
    let fd = new_socket()?;
    rustix::net::connect(&fd, &addr)?;
    size_send_buffer(&fd)?;
    Ok(fd)
}

/// The credentials of the process at the other end of `fd` (`SO_PEERCRED`), as they were
/// when it connected.
///
/// # Errors
/// The OS's (`fd` not a connected Unix socket).
pub fn peer_cred(fd: impl AsFd) -> io::Result<PeerCred> {
    let cred = rustix::net::sockopt::socket_peercred(fd)?;
    Ok(PeerCred {
        pid: cred.pid.as_raw_nonzero().get(),
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
    })
}

/// Sends `frame` as one datagram, with `fds` as `SCM_RIGHTS` when there are any
/// (`MSG_NOSIGNAL`: a closed peer is `EPIPE`, not `SIGPIPE`). Blocks while the socket's
/// send buffer is full, up to the timeout [`set_send_timeout`] set.
///
/// # Errors
/// [`io::ErrorKind::InvalidInput`] for an empty frame, one longer than [`MAX_FRAME`], or
/// more than [`MAX_FDS`] descriptors; [`io::ErrorKind::WouldBlock`] when the send timeout
/// expired; otherwise the OS's (`EPIPE` once the peer is gone). `EINTR` is retried.
pub fn send(fd: impl AsFd, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if frame.is_empty() || frame.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a frame is 1 to {MAX_FRAME} bytes long, not {}",
                frame.len()
            ),
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS} descriptors per frame, not {}", fds.len()),
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    let iov = [IoSlice::new(frame)];
    loop {
        match rustix::net::sendmsg(&fd, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("sent {n} of {} bytes", frame.len()),
                ))
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets how long [`send`] may block on a full send buffer (`SO_SNDTIMEO`; `None`: for
/// ever, the default). A service sets one so that an agent that stops reading cannot
/// stall it.
///
/// # Errors
/// The OS's.
pub fn set_send_timeout(fd: impl AsFd, timeout: Option<Duration>) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_timeout(
        fd,
        rustix::net::sockopt::Timeout::Send,
        timeout,
    )?)
}

/// Receives one datagram into `buf` (its contents are replaced by the frame; its
/// capacity is reused), waiting at most `timeout` for it (`None`: for ever).
///
/// Returns `Ok(None)` at end of stream (the peer closed or shut down its end) and for a
/// zero-byte datagram (see the [module docs](self)). Descriptors are received
/// close-on-exec.
///
/// # Errors
/// [`io::ErrorKind::TimedOut`] when nothing came within `timeout`; otherwise the OS's.
/// `EINTR` is retried (within the timeout).
pub fn recv(
    fd: impl AsFd,
    buf: &mut Vec<u8>,
    timeout: Option<Duration>,
) -> io::Result<Option<Received>> {
    let fd = fd.as_fd();
    // A timeout too long to represent is no timeout.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    // Wait first, then size the buffer to the datagram (peeked): neither an idle
    // timeout nor a small frame pays for clearing a whole MAX_FRAME buffer.
    if let Some(deadline) = deadline {
        while !wait_readable(fd, deadline)? {}
    }
    let size = peek_len(fd).map_or(MAX_FRAME, |n| n.clamp(1, MAX_FRAME) + 1);
    buf.clear();
    buf.resize(size.min(MAX_FRAME), 0);
    let result = recv_into(fd, buf, deadline);
    let len = match &result {
        Ok(Some(received)) => received.len,
        _ => 0,
    };
    buf.truncate(len);
    result
}

/// The length of the next datagram, without taking it (`MSG_PEEK | MSG_TRUNC`), or
/// `None` if there is none yet or the kernel would not say.
fn peek_len(fd: BorrowedFd<'_>) -> Option<usize> {
    let mut space: [MaybeUninit<u8>; 0] = [];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let flags = RecvFlags::PEEK | RecvFlags::TRUNC | RecvFlags::DONTWAIT;
    match rustix::net::recvmsg(fd, &mut [], &mut control, flags) {
        Ok(msg) if msg.bytes > 0 => Some(msg.bytes),
        _ => None,
    }
}

fn recv_into(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> io::Result<Option<Received>> {
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if deadline.is_some() {
        // poll(2) says when to read; a spurious wake-up must not block past the deadline.
        flags |= RecvFlags::DONTWAIT;
    }
    loop {
        if let Some(deadline) = deadline {
            if !wait_readable(fd, deadline)? {
                continue;
            }
        }
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(fd, &mut [IoSliceMut::new(buf)], &mut control, flags) {
            Ok(msg) => msg,
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) if deadline.is_some() => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        let mut fds_dropped = msg.flags.contains(ReturnFlags::CTRUNC);
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                for fd in received {
                    if fds.len() < MAX_FDS {
                        fds.push(fd);
                    } else {
                        // Dropping it closes it.
                        fds_dropped = true;
                    }
                }
            }
        }
        let truncated = msg.flags.contains(ReturnFlags::TRUNC);
        if msg.bytes == 0 && !truncated {
            // End of stream (descriptors sent with a zero-byte datagram are closed).
            return Ok(None);
        }
        return Ok(Some(Received {
            len: msg.bytes.min(buf.len()),
            fds,
            truncated,
            fds_dropped,
        }));
    }
}

/// Waits until `fd` is readable (or hung up) or `deadline` passes: `Ok(true)` when it is
/// readable, `Ok(false)` when interrupted (try again), `TimedOut` at the deadline.
fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    // `left` comes from an `Instant` difference, so its seconds fit an i64.
    let timeout = Timespec::try_from(left).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no frame within the timeout",
        )),
        Ok(_) => Ok(true),
        Err(Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Shuts both directions of `fd` down: the peer's [`recv`] sees end of stream, even
/// while other descriptors for the socket (a `fork`ed child's) stay open. A socket
/// that is not connected (any more) is not an error.
///
/// # Errors
/// The OS's.
pub fn shutdown(fd: impl AsFd) -> io::Result<()> {
    match rustix::net::shutdown(fd, Shutdown::Both) {
        Ok(()) | Err(Errno::NOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
