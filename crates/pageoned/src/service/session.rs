//! A connected VMM: its socket, its calls in flight, and what it reported.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use page_memory::linux::shared::ClientId;
use page_memory::{DomainId, PageError};

use super::remote::RemoteRegion;
use crate::socket::{self, PeerCred};
use crate::wire::{self, Msg, Op, ReplyBody};

/// A call waiting for its reply.
#[derive(Default)]
struct Call {
    reply: Mutex<Option<Result<ReplyBody, PageError>>>,
    ready: Condvar,
}

/// Counters of one session (summed into the service's).
#[derive(Default)]
pub(crate) struct SessionCounters {
    pub(crate) requests: AtomicU64,
    pub(crate) pages: AtomicU64,
}

/// A connected VMM.
pub(crate) struct Session {
    pub(crate) client: ClientId,
    pub(crate) peer: PeerCred,
    pub(crate) domain: DomainId,
    pub(crate) name: Mutex<String>,
    fd: OwnedFd,
    send_lock: Mutex<()>,
    calls: Mutex<HashMap<u64, Arc<Call>>>,
    next_id: AtomicU64,
    alive: AtomicBool,
    in_use: AtomicU64,
    limit: AtomicU64,
    timeout: Duration,
    /// Its regions, by the agent's number.
    pub(crate) regions: RwLock<HashMap<u32, Arc<RemoteRegion>>>,
    /// Its regions (the agent's numbers) with a PIP pool ([`Msg::Pools`]): the only
    /// ones it is asked to reclaim pages of.
    pooled: RwLock<HashSet<u32>>,
    pub(crate) counters: SessionCounters,
}

/// The error of a call to a VMM that is gone or does not answer.
const GONE: PageError = PageError::Os {
    op: "a request to a VMM's agent (the VMM is gone or did not answer)",
    errno: 104, // ECONNRESET
};

impl Session {
    pub(crate) fn new(
        client: ClientId,
        peer: PeerCred,
        domain: DomainId,
        fd: OwnedFd,
        timeout: Duration,
    ) -> Self {
        Session {
            client,
            peer,
            domain,
            name: Mutex::new(String::new()),
            fd,
            send_lock: Mutex::new(()),
            calls: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            in_use: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            timeout,
            regions: RwLock::new(HashMap::new()),
            pooled: RwLock::new(HashSet::new()),
            counters: SessionCounters::default(),
        }
    }

    /// The VMM's process id (from `SO_PEERCRED`).
    pub(crate) fn pid(&self) -> i32 {
        self.peer.pid
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// The VMM's last reported mapping budget: (in use, limit); limit 0 if none yet.
    pub(crate) fn mappings(&self) -> (u64, u64) {
        (
            self.in_use.load(Ordering::Relaxed),
            self.limit.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_mappings(&self, in_use: u64, limit: u64) {
        self.in_use.store(in_use, Ordering::Relaxed);
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The agent's regions with a pool are now `regions` (its [`Msg::Pools`]).
    pub(crate) fn set_pools(&self, regions: &[u32]) {
        *self.pooled.write().unwrap_or_else(|e| e.into_inner()) = regions.iter().copied().collect();
    }

    /// Whether the agent's region `region` has a pool (its pages may be reclaimed).
    pub(crate) fn has_pool(&self, region: u32) -> bool {
        self.pooled
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&region)
    }

    /// Sends `msg` (with `fds`), whole or not at all.
    pub(crate) fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut buf = Vec::new();
        wire::encode(msg, &mut buf).map_err(io::Error::other)?;
        let _g = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        socket::send(self.fd.as_fd(), &buf, fds)
    }

    /// Sends `op` to the agent and waits for its reply (at most the session's timeout:
    /// an agent that does not answer in time is disconnected).
    pub(crate) fn call(&self, op: Op) -> Result<ReplyBody, PageError> {
        if !self.is_alive() {
            return Err(GONE);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let call = Arc::new(Call::default());
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, call.clone());
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .pages
            .fetch_add(op_pages(&op), Ordering::Relaxed);
        if self.send(&Msg::Request { id, op }, &[]).is_err() {
            self.forget(id);
            self.kill();
            return Err(GONE);
        }
        let mut reply = call.reply.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = std::time::Instant::now() + self.timeout;
        while reply.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                drop(reply);
                self.forget(id);
                self.kill();
                return Err(GONE);
            }
            reply = call
                .ready
                .wait_timeout(reply, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        reply.take().unwrap_or(Err(GONE))
    }

    fn forget(&self, id: u64) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Hands a reply to its call; `false` if no call waits for `id` (a protocol error).
    pub(crate) fn deliver(&self, id: u64, body: ReplyBody) -> bool {
        let call = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match call {
            Some(c) => {
                *c.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ok(body));
                c.ready.notify_all();
                true
            }
            None => false,
        }
    }

    /// Ends the session: no more calls, every waiting call fails, the socket is shut
    /// down (the reader thread then tears it down).
    pub(crate) fn kill(&self) {
        self.alive.store(false, Ordering::Relaxed);
        let _ = socket::shutdown(self.fd.as_fd());
        let calls: Vec<Arc<Call>> = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in calls {
            *c.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(GONE));
            c.ready.notify_all();
        }
    }
}

/// Pages an operation names.
fn op_pages(op: &Op) -> u64 {
    (match op {
        Op::Protect(v) | Op::Unprotect(v) | Op::Recycle(v) | Op::Reclaim(v) => v.len(),
        Op::CanonicalizeAt(v) => v.len(),
        Op::MergeAt(v) => v.len(),
        Op::Unmerge(_) => 1,
    }) as u64
}
