//! The agent: what a VMM embeds to have its guest RAM deduplicated by a `pageoned`
//! service, across VMM processes.
//!
//! The agent owns everything that must happen inside the VMM's address space: the
//! userfaultfd (only the owning process can register its ranges), the fault thread that
//! resolves guest writes to protected pages, and the remaps of guest pages over pages of
//! the service's canonical store. It is an ordinary [`LinuxMemory`] over the VMM's guest
//! RAM (adopted regions) whose store is the service's
//! ([`LinuxMemory::with_linked_store`]): the service decides *what* to protect, make
//! canonical and merge; the agent does it, in batches (one round trip per batch of
//! pages), with every check of the Linux backend (a merge happens only if the page is
//! still protected under its token and equal to the canonical page, checked under the
//! page's lock, the same lock the fault thread takes).
//!
//! # What a service crash or hang costs a guest
//! Nothing waits for the service while it holds a page: guest writes are resolved by the
//! agent's own fault thread, and a request is carried out and answered by the agent's
//! connection thread alone. If the service dies, the agent notices (end of file), keeps
//! its memory (merged pages keep mapping the old store, which stays alive while they do;
//! their copy-on-write breaks are still handled here) and reconnects every
//! [`AgentConfig::retry`]; a new service hands it a new store and merging resumes.
//!
//! # The Per Page Recycler
//! A guest that frees pages puts them in a PIP pool in its own RAM (`pip`, `ppr_guest`).
//! The VMM registers that pool with its agent ([`Agent::register_pool`]: the pool's
//! memory, as the VMM maps it, with the pool id, the secret indicator and the region's
//! first guest frame it chose); the agent keeps a [`ppr_host::Recycler`] over its own
//! backend and tells the service which of its regions have a pool. When the service's
//! passes offer it pages of such a region ([`Op::Reclaim`]), the agent **proves** each
//! page free itself, in this process, exactly as [`Recycler::examine`] does: it reads
//! the page's mark, validates it against the pool, claims the pool's slot (a CAS in
//! guest RAM), recycles the page (the guest then reads zeros) and completes the claim.
//! The service only asks: the protocol never carries the pool or its secret, and no
//! message can make the agent drop a page its guest did not offer. (A compromised
//! service is another matter: it has the ptrace access the agent grants it for
//! `process_vm_readv`, which also allows writing the VMM's memory, and it holds the
//! store the merged pages map, so it is trusted with the guests' memory; what the
//! protocol denies it is only what it cannot do without that.) A hostile guest
//! (a broken header, slots naming other frames) only fails its own marks, which the
//! recycler counts ([`Agent::recycler_stats`]) and skips.
//!
//! Unproven recycling ([`Op::Recycle`]: make pages read zeros because the service says
//! so) stays refused unless [`AgentConfig::allow_recycle`].
//!
//! # The embedder's contract
//! As for [`LinuxMemory::adopt_region`]: regions are private anonymous memory the VMM
//! keeps mapped until [`Agent::remove_region`] returned (which gives merged pages back as
//! private copies), and pins (DMA, vhost) are declared through [`Agent::memory`]. A
//! region's pool ([`Agent::register_pool`]) is let go of before `remove_region` returns
//! (or when the agent is dropped).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use page_memory::linux::shared::{HoldEvent, StoreLink};
use page_memory::linux::{LinuxConfig, LinuxMemory};
use page_memory::{
    DirtyHook, DomainId, PageError, PageId, PageMemory, ProtectToken, RegionId, RegionInfo,
};
use ppr_host::{PoolMemory, Recycler, RegisterPoolError};

use crate::socket;
use crate::wire::{self, ErrorCode, Msg, Op, PageRef, RegionDecl, ReplyBody, WrittenPage};

/// How an [`Agent`] connects and runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The service's socket.
    pub socket: PathBuf,
    /// A name for the service's logs (at most 64 bytes of UTF-8).
    pub name: String,
    /// The backend's configuration (userfaultfd, fault threads, runs).
    pub linux: LinuxConfig,
    /// How long to wait between attempts to (re)connect (default 200 ms).
    pub retry: Duration,
    /// How often pending reports (holds, written pages) are sent when no request comes
    /// (default 20 ms; before every reply they are sent anyway). The service's view of
    /// which pages were written lags by at most this much, which only delays a merge
    /// decision (the agent checks every merge against the page's real token).
    pub flush: Duration,
    /// Carry out the service's unproven requests to recycle pages ([`Op::Recycle`]: make
    /// them read as zeros because the service says so) (default off). The Per Page
    /// Recycler does not need it: its requests ([`Op::Reclaim`]) recycle only pages the
    /// agent itself proves free against its guest's pool ([`Agent::register_pool`]). So
    /// an agent refuses unproven recycling unless told otherwise: a bug in the service
    /// then cannot zero guest memory through the protocol.
    pub allow_recycle: bool,
    /// The user ids a service may run as (checked with `SO_PEERCRED` before anything is
    /// sent; default: root and this process's own user). The service may recycle and
    /// remap guest pages, so the agent talks only to one it trusts.
    pub service_uids: Vec<u32>,
}

impl AgentConfig {
    /// The defaults, connecting to `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AgentConfig {
            socket: socket.into(),
            name: String::from("vmm"),
            linux: LinuxConfig::default(),
            retry: Duration::from_millis(200),
            flush: Duration::from_millis(20),
            service_uids: vec![0, rustix::process::geteuid().as_raw()],
            allow_recycle: false,
        }
    }

    /// Sets [`allow_recycle`](Self::allow_recycle).
    pub fn with_allow_recycle(mut self, allow: bool) -> Self {
        self.allow_recycle = allow;
        self
    }

    /// Sets [`service_uids`](Self::service_uids).
    pub fn with_service_uids(mut self, uids: Vec<u32>) -> Self {
        self.service_uids = uids;
        self
    }

    /// Sets [`name`](Self::name) (cut to 64 bytes).
    pub fn with_name(mut self, name: &str) -> Self {
        let mut end = name.len().min(64);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        self.name = name[..end].to_string();
        self
    }

    /// Sets [`linux`](Self::linux).
    pub fn with_linux(mut self, linux: LinuxConfig) -> Self {
        self.linux = linux;
        self
    }

    /// Sets [`retry`](Self::retry).
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// Sets [`flush`](Self::flush).
    pub fn with_flush(mut self, flush: Duration) -> Self {
        self.flush = flush;
        self
    }
}

/// What an agent did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentStats {
    /// Connected to a service now.
    pub connected: bool,
    /// Connections made (the first, then reconnections).
    pub connections: u64,
    /// Requests carried out.
    pub requests: u64,
    /// Pages those requests named.
    pub pages: u64,
    /// Messages sent (replies and reports).
    pub messages_sent: u64,
    /// Connections ended by a malformed or unexpected message, or a refusal.
    pub protocol_errors: u64,
    /// Reclaim requests ([`Op::Reclaim`]) carried out.
    pub reclaim_requests: u64,
    /// Pages those requests recycled (proven free by the agent's recycler).
    pub reclaimed: u64,
}

#[derive(Default)]
struct Counters {
    connected: AtomicBool,
    connections: AtomicU64,
    requests: AtomicU64,
    pages: AtomicU64,
    sent: AtomicU64,
    protocol_errors: AtomicU64,
    reclaim_requests: AtomicU64,
    reclaimed: AtomicU64,
}

/// A VMM region handed to the agent.
struct Guest {
    base: usize,
    len: usize,
    /// Its region in the memory, once adopted.
    id: Option<RegionId>,
    /// Declared to the current service.
    registered: bool,
    /// The service took it (answered its registration).
    acked: bool,
    /// A pool given before the region was adopted: registered with the recycler when
    /// it is.
    pool: Option<PoolSpec>,
    /// Its pool is registered with the recycler.
    pooled: bool,
}

/// A PIP pool of a region, as [`Agent::register_pool`] got it.
struct PoolSpec {
    memory: Arc<dyn PoolMemory>,
    pool_id: u32,
    indicator: u64,
    first_frame: u64,
}

/// Why [`Agent::register_pool`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// No such guest region (never added, or removed).
    NoSuchRegion,
    /// The recycler refused the pool (a bad header, a pool registered already, frames
    /// that overflow, the region has a pool).
    Register(RegisterPoolError),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::NoSuchRegion => write!(f, "no such guest region"),
            PoolError::Register(e) => write!(f, "the pool was refused: {e}"),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Register(e) => Some(e),
            PoolError::NoSuchRegion => None,
        }
    }
}

/// One connection's reports, filled by the store's sink and the VMM's calls.
#[derive(Default)]
struct Link {
    alive: AtomicBool,
    outbox: Mutex<Outbox>,
}

#[derive(Default)]
struct Outbox {
    holds: Vec<HoldEvent>,
    unregister: Vec<u32>,
}

struct Shared {
    config: AgentConfig,
    guests: Mutex<Vec<Guest>>,
    memory: RwLock<Option<Arc<LinuxMemory>>>,
    link: RwLock<Option<Arc<Link>>>,
    hook: RwLock<Option<DirtyHook>>,
    /// The Per Page Recycler over `memory`: the pools of the guest regions.
    recycler: RwLock<Recycler>,
    /// Bumped whenever the list of regions with a pool changes (and at each connection).
    pools_gen: AtomicU64,
    /// The newest `pools_gen` whose list the service acknowledged.
    pools_told: AtomicU64,
    stop: AtomicBool,
    counters: Counters,
    /// The last error that ended a connection attempt, for [`Agent::last_error`].
    last_error: Mutex<Option<String>>,
}

/// The agent of one VMM process: see the module docs.
///
/// ```no_run
/// use pageoned::agent::{Agent, AgentConfig};
///
/// let agent = Agent::start(AgentConfig::new("/run/pageoned.sock").with_name("vm-7")).unwrap();
/// let len = 64 << 20;
/// // SAFETY: the VMM's guest RAM: private anonymous memory it keeps mapped until removed.
/// let ram = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// } as *mut u8;
/// // SAFETY: as above.
/// let region = unsafe { agent.add_region(ram, len) }.unwrap();
/// // ... the VM runs; the service merges its pages with other VMMs' ...
/// agent.remove_region(region).unwrap();
/// ```
#[must_use = "dropping the agent disconnects it and gives merged pages back as private copies"]
pub struct Agent {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A region handed to an agent ([`Agent::add_region`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestRegion(usize);

impl Agent {
    /// Starts the agent's connection thread; it connects (and reconnects) on its own.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(config: AgentConfig) -> io::Result<Agent> {
        let shared = Arc::new(Shared::new(config));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pageoned-agent".into())
            .spawn(move || s.run())?;
        Ok(Agent {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands guest RAM at `base`, `len` bytes, to the agent: it is declared to the service
    /// (now, or once connected) and deduplicated from then on.
    ///
    /// # Safety
    /// As [`LinuxMemory::adopt_region`]: private anonymous memory of this process,
    /// page-aligned, that stays mapped until [`remove_region`](Self::remove_region)
    /// returned (or the agent is dropped); nothing else in the process holds Rust
    /// references to it.
    pub unsafe fn add_region(&self, base: *mut u8, len: usize) -> Result<GuestRegion, PageError> {
        let start = base as usize;
        if start % page_memory::PAGE_SIZE != 0 || len % page_memory::PAGE_SIZE != 0 || len == 0 {
            return Err(PageError::Unsupported(
                "guest regions must be page-aligned and not empty",
            ));
        }
        let mut guests = self.shared.guests();
        if guests
            .iter()
            .any(|g| g.len > 0 && g.base < start + len && start < g.base + g.len)
        {
            return Err(PageError::Unsupported("the range overlaps a region"));
        }
        let handle = guests.len();
        guests.push(Guest {
            base: start,
            len,
            id: None,
            registered: false,
            acked: false,
            pool: None,
            pooled: false,
        });
        // Adopted now if connected (so that the caller knows it is protected from here
        // on); else when the connection comes.
        if let Some(mem) = self.shared.memory() {
            self.shared.adopt(&mem, &mut guests[handle])?;
        }
        Ok(GuestRegion(handle))
    }

    /// Takes a region back: the service is told, and its pages that map the store are
    /// given private copies (same contents). The VMM may unmap it once this returned.
    pub fn remove_region(&self, region: GuestRegion) -> Result<(), PageError> {
        let mut guests = self.shared.guests();
        let g = guests
            .get_mut(region.0)
            .filter(|g| g.len > 0)
            .ok_or(PageError::Unsupported("no such guest region"))?;
        g.len = 0;
        // Its pool goes first: the recycler never touches the pool's memory again.
        g.pool = None;
        if std::mem::take(&mut g.pooled) {
            if let Some(id) = g.id {
                self.shared.recycler_mut().unregister(id);
            }
            self.shared.pools_changed();
        }
        if let (Some(id), Some(mem)) = (g.id.take(), self.shared.memory()) {
            mem.remove_region(id)?;
            if g.registered {
                if let Some(link) = self.shared.link() {
                    link.outbox().unregister.push(id.0);
                }
            }
        }
        Ok(())
    }

    /// Registers the PIP pool the guest of `region` set up, so that the agent recycles
    /// the pages the guest frees (see [*The Per Page Recycler*](self#the-per-page-recycler)):
    /// `pool` is the pool's memory as this process maps it (typically a
    /// `pip::PoolView::from_raw` over guest RAM, whose safety promise is the VMM's:
    /// mapped, atomic accesses only, for as long as the agent holds `pool`), `pool_id`
    /// and `indicator` the id and secret the VMM chose (and tells the guest only through
    /// the pool's header, which registration writes), and `first_frame` the guest frame
    /// number of the region's page 0 (the frames the guest names in the pool). As
    /// [`Recycler::register`]: the pool's header moves to `REGISTERED`, and the guest
    /// may attach.
    ///
    /// If the region is not adopted yet (the agent has not connected yet) the pool is
    /// registered once it is (a refusal then goes to [`last_error`](Self::last_error)).
    /// The agent holds `pool` until the region is removed or the agent dropped.
    ///
    /// # Errors
    /// [`PoolError::NoSuchRegion`]; [`PoolError::Register`] if the recycler refuses the
    /// pool (its header is not a valid layout or not ready, the region has a pool, the
    /// frames overflow).
    pub fn register_pool(
        &self,
        region: GuestRegion,
        pool: Arc<dyn PoolMemory>,
        pool_id: u32,
        indicator: u64,
        first_frame: u64,
    ) -> Result<(), PoolError> {
        let mut guests = self.shared.guests();
        let g = guests
            .get_mut(region.0)
            .filter(|g| g.len > 0)
            .ok_or(PoolError::NoSuchRegion)?;
        if g.pooled || g.pool.is_some() {
            return Err(PoolError::Register(RegisterPoolError::RegionTaken));
        }
        let spec = PoolSpec {
            memory: pool,
            pool_id,
            indicator,
            first_frame,
        };
        match g.id {
            Some(id) => {
                self.shared
                    .register_pool(id, g.len, spec)
                    .map_err(PoolError::Register)?;
                g.pooled = true;
                self.shared.pools_changed();
            }
            None => g.pool = Some(spec),
        }
        Ok(())
    }

    /// What the agent's Per Page Recycler did so far (marks seen, pages recycled, marks
    /// rejected by reason).
    pub fn recycler_stats(&self) -> ppr_host::Stats {
        self.shared.recycler().stats()
    }

    /// The memory the agent runs (once connected the first time): for
    /// [`LinuxMemory::declare_pinned`], statistics and inspection.
    pub fn memory(&self) -> Option<Arc<LinuxMemory>> {
        self.shared.memory()
    }

    /// The [`PageId`] of byte `offset` of `region` (once adopted).
    pub fn page_id(&self, region: GuestRegion, offset: usize) -> Option<PageId> {
        let guests = self.shared.guests();
        let g = guests.get(region.0)?;
        let id = g.id?;
        (offset < g.len).then(|| PageId::new(id, (offset / page_memory::PAGE_SIZE) as u32))
    }

    /// Installs the hook told of every guest page the agent changed on the service's
    /// behalf (merged, made canonical, recycled): a VMM's live-migration dirty bitmap.
    pub fn set_dirty_hook(&self, hook: Option<DirtyHook>) {
        *self.shared.hook.write().unwrap_or_else(|e| e.into_inner()) = hook.clone();
        if let Some(mem) = self.shared.memory() {
            mem.set_dirty_hook(hook);
        }
    }

    /// What the agent did so far.
    pub fn stats(&self) -> AgentStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AgentStats {
            connected: c.connected.load(Ordering::Relaxed),
            connections: g(&c.connections),
            requests: g(&c.requests),
            pages: g(&c.pages),
            messages_sent: g(&c.sent),
            protocol_errors: g(&c.protocol_errors),
            reclaim_requests: g(&c.reclaim_requests),
            reclaimed: g(&c.reclaimed),
        }
    }

    /// Why the last connection attempt or connection ended, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the agent is connected and the service took every region it was
    /// given (answered their registration) and knows which have a pool
    /// ([`register_pool`](Self::register_pool)), for at most `timeout`; whether it did.
    pub fn wait_registered(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            let s = &self.shared;
            let done = s.counters.connected.load(Ordering::Relaxed)
                && s.guests().iter().all(|g| g.len == 0 || g.acked)
                && s.pools_told.load(Ordering::SeqCst) >= s.pools_gen.load(Ordering::SeqCst);
            if done || t0.elapsed() >= timeout {
                return done;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The memory (if no one else holds it) gives every region back as it drops.
        *self
            .shared
            .memory
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Link {
    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a connection ended.
enum End {
    /// The agent is stopping.
    Stop,
    /// The service went away or the connection failed; try again.
    Lost(String),
}

impl Shared {
    fn new(config: AgentConfig) -> Self {
        Shared {
            config,
            guests: Mutex::new(Vec::new()),
            memory: RwLock::new(None),
            link: RwLock::new(None),
            hook: RwLock::new(None),
            recycler: RwLock::new(Recycler::new()),
            pools_gen: AtomicU64::new(0),
            pools_told: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            last_error: Mutex::new(None),
        }
    }

    fn guests(&self) -> std::sync::MutexGuard<'_, Vec<Guest>> {
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn memory(&self) -> Option<Arc<LinuxMemory>> {
        self.memory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn link(&self) -> Option<Arc<Link>> {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// The list of regions with a pool changed: it is sent to the service again.
    fn pools_changed(&self) {
        self.pools_gen.fetch_add(1, Ordering::SeqCst);
    }

    fn recycler(&self) -> std::sync::RwLockReadGuard<'_, Recycler> {
        self.recycler.read().unwrap_or_else(|e| e.into_inner())
    }

    fn recycler_mut(&self) -> std::sync::RwLockWriteGuard<'_, Recycler> {
        self.recycler.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `spec` with the recycler for adopted region `id` of `len` bytes.
    fn register_pool(
        &self,
        id: RegionId,
        len: usize,
        spec: PoolSpec,
    ) -> Result<(), RegisterPoolError> {
        let pages =
            u32::try_from(len / page_memory::PAGE_SIZE).map_err(|_| RegisterPoolError::Frames)?;
        let info = RegionInfo {
            id,
            pages,
            domain: DomainId(0),
        };
        self.recycler_mut().register(
            spec.memory,
            spec.pool_id,
            spec.indicator,
            info,
            spec.first_frame,
        )
    }

    fn adopt(&self, mem: &LinuxMemory, g: &mut Guest) -> Result<(), PageError> {
        if g.id.is_none() && g.len > 0 {
            // SAFETY: the embedder promised, in `add_region`, that the range is private
            // anonymous memory that stays mapped until removed.
            let id = unsafe { mem.adopt_region(g.base as *mut u8, g.len, DomainId(0)) }?;
            g.id = Some(id);
            if let Some(spec) = g.pool.take() {
                match self.register_pool(id, g.len, spec) {
                    Ok(()) => {
                        g.pooled = true;
                        self.pools_changed();
                    }
                    Err(e) => self.note(format!("a region's pool was refused: {e}")),
                }
            }
        }
        Ok(())
    }

    /// The connection thread: connect, serve, reconnect, until stopped.
    fn run(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            match self.connection() {
                End::Stop => break,
                End::Lost(why) => self.note(why),
            }
            self.counters.connected.store(false, Ordering::Relaxed);
            if let Some(link) = self.link.write().unwrap_or_else(|e| e.into_inner()).take() {
                link.alive.store(false, Ordering::Relaxed);
            }
            for g in self.guests().iter_mut() {
                g.registered = false;
                g.acked = false;
            }
            let t0 = Instant::now();
            while !self.stop.load(Ordering::Relaxed) && t0.elapsed() < self.config.retry {
                std::thread::sleep(Duration::from_millis(5).min(self.config.retry));
            }
        }
        if let Some(link) = self.link() {
            link.alive.store(false, Ordering::Relaxed);
        }
    }

    fn send(&self, fd: &OwnedFd, msg: &Msg) -> Result<(), End> {
        let mut buf = Vec::new();
        wire::encode(msg, &mut buf).map_err(|e| End::Lost(format!("encode: {e}")))?;
        socket::send(fd.as_fd(), &buf, &[]).map_err(|e| End::Lost(format!("send: {e}")))?;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One connection, from connect to its end.
    fn connection(&self) -> End {
        let fd = match socket::connect(&self.config.socket) {
            Ok(fd) => fd,
            Err(e) => return End::Lost(format!("connect: {e}")),
        };
        // A service that stops reading must not hold this thread for ever.
        let _ = socket::set_send_timeout(fd.as_fd(), Some(Duration::from_secs(10)));
        match socket::peer_cred(fd.as_fd()) {
            Ok(peer) if self.config.service_uids.contains(&peer.uid) => {
                // The service reads guest pages with process_vm_readv; under Yama's
                // ptrace_scope 1 it may only if this process allows it (EINVAL: no Yama).
                let _ = socket::allow_ptracer(peer.pid);
            }
            Ok(peer) => {
                self.counters
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                return End::Lost(format!(
                    "the service runs as uid {}, which this agent does not trust",
                    peer.uid
                ));
            }
            Err(e) => return End::Lost(format!("the service's credentials: {e}")),
        }
        if let Err(end) = self.send(
            &fd,
            &Msg::Hello {
                name: self.config.name.clone(),
            },
        ) {
            return end;
        }
        let mut buf = Vec::new();
        let welcome = match socket::recv(fd.as_fd(), &mut buf, Some(Duration::from_secs(5))) {
            Ok(Some(r)) => r,
            Ok(None) => return End::Lost("the service closed the connection".into()),
            Err(e) => return End::Lost(format!("waiting for the welcome: {e}")),
        };
        let (slots, store_fd) = match (wire::decode(&buf), welcome.fds) {
            (Ok(Msg::Welcome { store_slots, .. }), mut fds)
                if fds.len() == 1 && !welcome.truncated =>
            {
                (store_slots, fds.pop().expect("one fd"))
            }
            (Ok(Msg::Error { code, text }), _) => {
                self.counters
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                return End::Lost(format!("refused by the service: {code:?}: {text}"));
            }
            _ => {
                self.counters
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                return End::Lost("a malformed welcome".into());
            }
        };
        let link = Arc::new(Link::default());
        link.alive.store(true, Ordering::Relaxed);
        let l = link.clone();
        let store = StoreLink {
            fd: store_fd,
            slots,
            sink: Arc::new(move |e| {
                if l.alive.load(Ordering::Relaxed) {
                    l.outbox().holds.push(e);
                }
            }),
        };
        let mem = match self.memory() {
            Some(mem) => match mem.relink_store(store) {
                Ok(()) => mem,
                Err(e) => return End::Lost(format!("relinking the store: {e}")),
            },
            None => match LinuxMemory::with_linked_store(self.config.linux.clone(), store) {
                Ok(mem) => {
                    let mem = Arc::new(mem);
                    let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
                    mem.set_dirty_hook(hook);
                    *self.memory.write().unwrap_or_else(|e| e.into_inner()) = Some(mem.clone());
                    mem
                }
                Err(e) => return End::Lost(format!("the Linux backend: {e}")),
            },
        };
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.counters.connected.store(true, Ordering::Relaxed);
        let mut next_id = 1u64;
        // A new service learns which regions have pools (once they are declared).
        self.pools_changed();
        // The list of pooled regions sent last (its `pools_gen`), and the lists not
        // answered yet: (request id, `pools_gen`).
        let mut pools_sent: Option<u64> = None;
        let mut pools_pending: Vec<(u64, u64)> = Vec::new();
        // Registrations sent and not answered yet: their regions (the agent's numbers).
        let mut pending: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut last_mappings = Instant::now() - Duration::from_secs(1);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return End::Stop;
            }
            if let Err(end) = self.declare(&fd, &mem, &mut next_id, &mut pending) {
                return end;
            }
            let got = socket::recv(fd.as_fd(), &mut buf, Some(self.config.flush));
            let reply = match got {
                Ok(Some(r)) if r.truncated || !r.fds.is_empty() => {
                    return self.protocol_error(&fd, "an oversized frame or unexpected fds")
                }
                Ok(Some(_)) => match wire::decode(&buf) {
                    Ok(Msg::Request { id, op }) => Some((id, self.serve(&mem, op))),
                    Ok(Msg::Registered { id, result })
                        if pools_pending.iter().any(|&(i, _)| i == id) =>
                    {
                        pools_pending.retain(|&(i, gen)| {
                            if i == id && result.is_ok() {
                                self.pools_told.fetch_max(gen, Ordering::SeqCst);
                            }
                            i != id
                        });
                        if let Err(code) = result {
                            self.note(format!("the service refused the pool list: {code:?}"));
                        }
                        None
                    }
                    Ok(Msg::Registered { id, result }) => {
                        let regions = pending.remove(&id).unwrap_or_default();
                        match result {
                            Ok(()) => {
                                for g in self.guests().iter_mut() {
                                    if g.id.is_some_and(|r| regions.contains(&r.0)) {
                                        g.acked = true;
                                    }
                                }
                            }
                            Err(code) => {
                                self.note(format!("the service refused a region: {code:?}"))
                            }
                        }
                        None
                    }
                    Ok(Msg::Error { code, text }) => {
                        return End::Lost(format!("the service ended it: {code:?}: {text}"))
                    }
                    Ok(_) => return self.protocol_error(&fd, "a message only an agent sends"),
                    Err(e) => return self.protocol_error(&fd, &format!("malformed: {e}")),
                },
                Ok(None) => return End::Lost("the service closed the connection".into()),
                Err(e) if is_timeout(&e) => None,
                Err(e) => return End::Lost(format!("recv: {e}")),
            };
            // Reports first: the service must count every hold a reply's pages took
            // before it reads the reply.
            if let Err(end) = self.flush(&fd, &link, &mem, &mut last_mappings, next_id) {
                return end;
            }
            // After the registrations (declare ran first): the service knows the regions.
            let gen = self.pools_gen.load(Ordering::SeqCst);
            if pools_sent != Some(gen) {
                let regions: Vec<u32> = self
                    .guests()
                    .iter()
                    .filter(|g| g.registered && g.pooled)
                    .filter_map(|g| g.id.map(|id| id.0))
                    .take(wire::MAX_PAGES_PER_REQUEST)
                    .collect();
                let id = next_id;
                next_id += 1;
                if let Err(end) = self.send(&fd, &Msg::Pools { id, regions }) {
                    return end;
                }
                pools_sent = Some(gen);
                pools_pending.push((id, gen));
            }
            if let Some((id, body)) = reply {
                if let Err(end) = self.send(&fd, &Msg::Reply { id, body }) {
                    return end;
                }
            }
        }
    }

    fn protocol_error(&self, fd: &OwnedFd, why: &str) -> End {
        self.counters
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.send(
            fd,
            &Msg::Error {
                code: ErrorCode::Protocol,
                text: why.chars().take(64).collect(),
            },
        );
        End::Lost(format!("protocol error: {why}"))
    }

    /// Adopts regions handed over since, and declares to the service every region it was
    /// not told of yet.
    fn declare(
        &self,
        fd: &OwnedFd,
        mem: &LinuxMemory,
        next_id: &mut u64,
        pending: &mut HashMap<u64, Vec<u32>>,
    ) -> Result<(), End> {
        let mut decls = Vec::new();
        {
            let mut guests = self.guests();
            for g in guests.iter_mut().filter(|g| g.len > 0 && !g.registered) {
                if let Err(e) = self.adopt(mem, g) {
                    self.note(format!("adopting a region: {e}"));
                    g.len = 0;
                    // The region is gone: so is its pool, never registered.
                    g.pool = None;
                    continue;
                }
                if let Some(id) = g.id {
                    if g.pooled {
                        // Its pool is told once the region is declared.
                        self.pools_changed();
                    }
                    decls.push(RegionDecl {
                        region: id.0,
                        addr: g.base as u64,
                        pages: (g.len / page_memory::PAGE_SIZE) as u32,
                    });
                    g.registered = true;
                }
            }
        }
        for chunk in decls.chunks(256) {
            let id = *next_id;
            *next_id += 1;
            pending.insert(id, chunk.iter().map(|d| d.region).collect());
            self.send(
                fd,
                &Msg::Register {
                    id,
                    regions: chunk.to_vec(),
                },
            )?;
        }
        Ok(())
    }

    /// Sends what is pending: hold events, regions taken back, pages whose tokens went
    /// stale, and (every 100 ms) the mapping budget.
    fn flush(
        &self,
        fd: &OwnedFd,
        link: &Link,
        mem: &LinuxMemory,
        last_mappings: &mut Instant,
        next_id: u64,
    ) -> Result<(), End> {
        let (holds, gone) = {
            let mut o = link.outbox();
            (
                std::mem::take(&mut o.holds),
                std::mem::take(&mut o.unregister),
            )
        };
        for chunk in holds.chunks(wire::MAX_PAGES_PER_REQUEST) {
            self.send(
                fd,
                &Msg::Holds {
                    events: chunk.to_vec(),
                },
            )?;
        }
        for region in gone {
            self.send(
                fd,
                &Msg::Unregister {
                    id: next_id,
                    region,
                },
            )?;
        }
        let ids: Vec<RegionId> = self
            .guests()
            .iter()
            .filter(|g| g.registered)
            .filter_map(|g| g.id)
            .collect();
        let mut written = Vec::new();
        for id in ids {
            if let Ok(pages) = mem.take_unprotected(id) {
                written.extend(pages.into_iter().map(|(index, gen)| WrittenPage {
                    page: PageRef {
                        region: id.0,
                        index,
                    },
                    gen,
                }));
            }
        }
        for chunk in written.chunks(wire::MAX_PAGES_PER_REQUEST) {
            self.send(
                fd,
                &Msg::Written {
                    pages: chunk.to_vec(),
                },
            )?;
        }

        if last_mappings.elapsed() >= Duration::from_millis(100) {
            *last_mappings = Instant::now();
            if let (Some(in_use), Some(limit)) = (mem.mappings_in_use(false), mem.mapping_limit()) {
                self.send(fd, &Msg::Mappings { in_use, limit })?;
            }
        }
        Ok(())
    }

    /// Carries out one request.
    fn serve(&self, mem: &LinuxMemory, op: Op) -> ReplyBody {
        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        let id = |p: &PageRef| PageId::new(RegionId(p.region), p.index);
        let code = |e: &PageError| ErrorCode::from_page_error(e);
        match op {
            Op::Protect(pages) => {
                c.pages.fetch_add(pages.len() as u64, Ordering::Relaxed);
                let ids: Vec<PageId> = pages.iter().map(id).collect();
                ReplyBody::Tokens(
                    mem.protect(&ids)
                        .into_iter()
                        .map(|r| r.map(|t| t.0).map_err(|e| code(&e)))
                        .collect(),
                )
            }
            Op::Unprotect(pages) => {
                c.pages.fetch_add(pages.len() as u64, Ordering::Relaxed);
                let ids: Vec<PageId> = pages.iter().map(id).collect();
                ReplyBody::Done(
                    mem.unprotect(&ids)
                        .into_iter()
                        .map(|r| r.map_err(|e| code(&e)))
                        .collect(),
                )
            }
            Op::CanonicalizeAt(items) => {
                c.pages.fetch_add(items.len() as u64, Ordering::Relaxed);
                let items: Vec<(PageId, ProtectToken, u64)> = items
                    .iter()
                    .map(|(p, t, s)| (id(p), ProtectToken(*t), *s))
                    .collect();
                ReplyBody::Frames(
                    mem.canonicalize_at(&items)
                        .into_iter()
                        .map(|r| {
                            r.map(|f| f.store_offset().map(|o| o / page_memory::PAGE_SIZE as u64))
                                .map_err(|e| code(&e))
                        })
                        .collect(),
                )
            }
            Op::MergeAt(items) => {
                c.pages.fetch_add(items.len() as u64, Ordering::Relaxed);
                let frames: Vec<Result<_, PageError>> = items
                    .iter()
                    .map(|(_, _, slot)| match slot {
                        Some(s) => mem.frame_at(*s),
                        None => Ok(mem.zero_frame()),
                    })
                    .collect();
                let mut out: Vec<Option<Result<wire::Outcome, ErrorCode>>> = frames
                    .iter()
                    .map(|f| f.as_ref().err().map(|e| Err(code(e))))
                    .collect();
                let batch: Vec<(PageId, ProtectToken, &page_memory::linux::LinuxFrame)> = items
                    .iter()
                    .zip(&frames)
                    .filter_map(|((p, t, _), f)| {
                        f.as_ref().ok().map(|f| (id(p), ProtectToken(*t), f))
                    })
                    .collect();
                let mut results = mem.merge_batch(&batch).into_iter();
                for o in out.iter_mut().filter(|o| o.is_none()) {
                    *o = Some(match results.next() {
                        Some(r) => r.map(Into::into).map_err(|e| code(&e)),
                        None => Err(ErrorCode::Protocol),
                    });
                }
                ReplyBody::Outcomes(out.into_iter().flatten().collect())
            }
            Op::Recycle(pages) if !self.config.allow_recycle => {
                ReplyBody::Done(pages.iter().map(|_| Err(ErrorCode::Denied)).collect())
            }
            Op::Recycle(pages) => {
                c.pages.fetch_add(pages.len() as u64, Ordering::Relaxed);
                let ids: Vec<PageId> = pages.iter().map(id).collect();
                ReplyBody::Done(
                    mem.recycle(&ids)
                        .into_iter()
                        .map(|r| r.map_err(|e| code(&e)))
                        .collect(),
                )
            }
            Op::Unmerge(page) => {
                c.pages.fetch_add(1, Ordering::Relaxed);
                ReplyBody::Done(vec![mem.unmerge(id(&page)).map_err(|e| code(&e))])
            }
            Op::Reclaim(pages) => {
                c.pages.fetch_add(pages.len() as u64, Ordering::Relaxed);
                c.reclaim_requests.fetch_add(1, Ordering::Relaxed);
                // The regions declared to this service, and their sizes: a page of any
                // other is the service's error, answered as such.
                let regions: Vec<(u32, usize)> = self
                    .guests()
                    .iter()
                    .filter(|g| g.registered && g.len > 0)
                    .filter_map(|g| g.id.map(|id| (id.0, g.len / page_memory::PAGE_SIZE)))
                    .collect();
                let recycler = self.recycler();
                ReplyBody::Reclaimed(
                    pages
                        .iter()
                        .map(|p| match regions.iter().find(|(r, _)| *r == p.region) {
                            None => Err(ErrorCode::NoSuchRegion),
                            Some(&(_, n)) if p.index as usize >= n => Err(ErrorCode::NoSuchPage),
                            // No pool for the region: not recycled (`examine` says so).
                            Some(_) => {
                                let took = recycler.examine(mem, id(p));
                                if took {
                                    c.reclaimed.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(took)
                            }
                        })
                        .collect(),
                )
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    use page_memory::PAGE_SIZE;
    use pip::{Free, Guest as PipGuest, PoolStorage};

    const FIRST: u64 = 0x40;
    const SECRET: u64 = 0x0123_4567_89ab_cdef;

    /// A guest region of `pages` pages adopted by `mem`, as `declare` leaves it.
    fn region(shared: &Shared, mem: &LinuxMemory, pages: usize) -> (usize, RegionId) {
        let len = pages * PAGE_SIZE;
        // A fresh private anonymous mapping, unmapped by the test after its region was
        // removed.
        let base = page_memory::linux::test_util::embedder_mmap(len);
        let mut g = Guest {
            base: base as usize,
            len,
            id: None,
            registered: true,
            acked: true,
            pool: None,
            pooled: false,
        };
        shared.adopt(mem, &mut g).unwrap();
        let id = g.id.unwrap();
        shared.guests().push(g);
        (base as usize, id)
    }

    /// Page `i` of the region at `base`, as the guest's words.
    fn page(base: usize, i: usize) -> &'static [AtomicU64; PAGE_SIZE / 8] {
        // SAFETY: inside the test's mapping, which outlives every use; page-aligned;
        // accessed only atomically (and by the backend's whole-page operations).
        unsafe { &*((base + i * PAGE_SIZE) as *const [AtomicU64; PAGE_SIZE / 8]) }
    }

    #[test]
    fn reclaim_recycles_only_pages_the_pool_proves_free() {
        let Some(mem) = page_memory::linux::test_util::memory() else {
            return;
        };
        let shared = Shared::new(AgentConfig::new("/nonexistent/pageoned.sock"));
        let (base, id) = region(&shared, &mem, 4);
        let (other_base, other) = region(&shared, &mem, 2);
        for i in 0..4 {
            for w in page(base, i) {
                w.store(0x1111 * (i as u64 + 1), Ordering::Relaxed);
            }
        }
        let pool = Arc::new(PoolStorage::<1, 16>::new());
        let view = pool.init().unwrap();
        let spec = PoolSpec {
            memory: pool.clone(),
            pool_id: 3,
            indicator: SECRET,
            first_frame: FIRST,
        };
        shared.register_pool(id, 4 * PAGE_SIZE, spec).unwrap();
        shared.guests()[0].pooled = true;
        let guest = PipGuest::attach(view).unwrap();
        // The guest frees pages 1 and 2; then makes page 2's slot name another frame.
        assert!(matches!(
            guest.on_free(0, FIRST + 1, page(base, 1)),
            Free::Offered(_)
        ));
        let Free::Offered(slot) = guest.on_free(0, FIRST + 2, page(base, 2)) else {
            panic!("not offered");
        };
        view.slots()[slot as usize].store(FIRST + 3, Ordering::Relaxed);
        // The other region has no pool: a page marked there (with this pool's secret) is
        // not recycled either.
        page(other_base, 0)[0].store(SECRET.to_le(), Ordering::Relaxed);
        let p = |region: RegionId, index| PageRef {
            region: region.0,
            index,
        };
        let reply = shared.serve(
            &mem,
            Op::Reclaim(vec![
                p(id, 0),
                p(id, 1),
                p(id, 2),
                p(id, 3),
                p(id, 4),
                p(other, 0),
                p(RegionId(999), 0),
            ]),
        );
        assert_eq!(
            reply,
            ReplyBody::Reclaimed(vec![
                Ok(false),
                Ok(true),
                Ok(false),
                Ok(false),
                Err(ErrorCode::NoSuchPage),
                Ok(false),
                Err(ErrorCode::NoSuchRegion),
            ])
        );
        // Page 1 reads zeros; every other page keeps its contents (page 2 its mark).
        assert!(page(base, 1).iter().all(|w| w.load(Ordering::Relaxed) == 0));
        for i in [0, 3] {
            assert!(page(base, i)
                .iter()
                .all(|w| w.load(Ordering::Relaxed) == 0x1111 * (i as u64 + 1)));
        }
        assert_eq!(page(base, 2)[0].load(Ordering::Relaxed), SECRET.to_le());
        assert_eq!(
            page(other_base, 0)[0].load(Ordering::Relaxed),
            SECRET.to_le()
        );
        let st = shared.recycler().stats();
        assert_eq!(st.recycled, 1, "{st:?}");
        assert_eq!(st.invalid_marks(), 1, "{st:?}");
        let c = &shared.counters;
        assert_eq!(c.reclaim_requests.load(Ordering::Relaxed), 1);
        assert_eq!(c.reclaimed.load(Ordering::Relaxed), 1);
        // Unproven recycling stays refused.
        assert_eq!(
            shared.serve(&mem, Op::Recycle(vec![p(id, 3)])),
            ReplyBody::Done(vec![Err(ErrorCode::Denied)])
        );
        assert!(page(base, 3)
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0x4444));
        // The region removed: its pool goes (the recycler holds it no more).
        assert!(shared.recycler_mut().unregister(id));
        assert_eq!(Arc::strong_count(&pool), 1);
        for (b, r, n) in [(base, id, 4), (other_base, other, 2)] {
            mem.remove_region(r).unwrap();
            // SAFETY: the test's own mapping, its region removed.
            let unmapped = unsafe { libc::munmap(b as *mut libc::c_void, n * PAGE_SIZE) };
            assert_eq!(unmapped, 0);
        }
    }
}
