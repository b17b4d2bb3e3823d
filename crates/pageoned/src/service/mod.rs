//! The service: one process that deduplicates the guest RAM of many VMM processes.
//!
//! It listens on a Unix socket (`SOCK_SEQPACKET`). A VMM's [`Agent`](crate::agent::Agent)
//! connects; the service learns who it is from the socket (`SO_PEERCRED`: pid, uid,
//! gid; never from a message) and decides its **trust domain** from its own
//! configuration ([`ServiceConfig::with_domain`]: a uid is mapped to a domain; by default
//! every uid is a domain of its own, so pages are merged only between processes of one
//! user, which can already read each other's memory). Each domain has its own canonical
//! store (a memfd, [`SharedStore`]) and its own PageONE engine over a [`RemoteMemory`]
//! of the domain's VMMs; a VMM is handed only its domain's store, and a request names
//! pages only by the VMM's own region numbers, so a VMM can name neither another VMM's
//! memory nor another domain.
//!
//! # Life cycle
//! - VMMs and their regions come and go while the service runs: each merge pass of a
//!   domain starts by taking the regions registered and dropping those gone
//!   ([`pageone::PageOne::refresh_regions`]).
//! - A VMM that disconnects (killed, or its agent dropped) has its regions removed at
//!   once; the holds it had on store slots are let go only once its *process* is gone
//!   (a pidfd says so): a process that lives on may still map them.
//! - A malformed or unexpected message gets an [`Error`](crate::wire::Msg::Error) and a
//!   disconnect; hold reports the store refuses are counted and skipped; an agent that
//!   does not answer a request within [`ServiceConfig::request_timeout`] is disconnected.
//! - The service killed: the VMMs' guests keep running (their writes are resolved by their
//!   agents), merged pages stay valid (the VMMs keep mapping the old store), and agents
//!   reconnect to a new service, which starts from scratch with new stores.
//!
//! # The Per Page Recycler across processes
//! With [`ServiceConfig::with_recycle`], a domain's passes also give back the pages the
//! guests freed (PPR, `ppr_host`). The PIP pool stays where the guest put it, in its
//! VMM's guest RAM, and the proof that a page is free is a CAS on the pool's slot, so
//! **the agent proves, the service only asks**:
//!
//! - the VMM registers the pool with its agent
//!   ([`Agent::register_pool`](crate::agent::Agent::register_pool): the pool's memory,
//!   id, secret indicator and the region's first guest frame); the agent's own
//!   `ppr_host::Recycler` over its Linux backend holds it, and the agent tells the
//!   service which of its regions have a pool ([`Msg::Pools`]);
//! - each pass offers a chunk's volatile pages (changed recently) to the service's scan
//!   hook, which sends the agent of a pooled region one
//!   [`Op::Reclaim`](crate::wire::Op::Reclaim) per batch; pages of regions without a
//!   pool, and VMMs without pools, are never asked about;
//! - the agent runs `Recycler::examine` on each page in its own process (read the mark,
//!   validate it against the pool, claim the slot, recycle the page, complete the
//!   claim) and answers which pages it recycled; the engine leaves those alone this
//!   pass.
//!
//! The protocol never carries a pool or its secret, and no message makes an agent
//! recycle a page its guest did not offer: through the protocol the service can only
//! ask. (The service is trusted with the guests' memory all the same: the ptrace access
//! its reads need also allows writes, and merged pages map its store.) A hostile guest's
//! pool (a bad header, marks or slots naming other frames) is the
//! agent's recycler's to reject, page by page (counted in its `ppr_host::Stats`).
//!
//! # Consistency
//! The engine's invariants hold across processes: the agent checks each merge under the
//! page's lock (protected under its token, equal to the canonical page) in the VMM, and a
//! store slot is punched only once no process holds it (see `page_memory::linux::shared`).
//! Trust within a domain is mutual: every VMM of a domain has the domain's store memfd
//! read-write (it copies canonical pages into it), so a hostile VMM could change
//! canonical pages other VMMs of its domain map. Put VMMs that do not trust each other in
//! different domains (the default does, per uid).

mod gens;
mod remote;
mod session;

pub use remote::RemoteMemory;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use page_memory::linux::shared::{is_guest_range, ClientId, SharedStore, SharedStoreStats};
use page_memory::{DomainId, PageId, PageMemory, ScanHook, PAGE_SIZE};
use pageone::{PageOne, PassReport};

use self::remote::RemoteRegion;
use self::session::Session;
use crate::socket;
use crate::wire::{self, ErrorCode, Msg, RegionDecl};

/// How a [`Service`] is set up.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// The socket to listen on.
    pub socket: PathBuf,
    /// The engine's configuration, for every domain's engine.
    pub engine: pageone::Config,
    /// Trust domains by uid; a uid not listed is a domain of its own (domain
    /// `0x8000_0000 | uid`), unless [`only_listed`](Self::only_listed).
    pub domains: HashMap<u32, DomainId>,
    /// Refuse VMMs whose uid is not in [`domains`](Self::domains) (default off).
    pub only_listed: bool,
    /// Home slots of each domain's store: the most guest pages a domain's regions may
    /// have together before new regions get no home run (default 2^24, 64 GiB).
    pub store_home_slots: u64,
    /// Run merge passes every [`pageone::Config::merge_period`] on a thread of the
    /// service's own (default on). Off: passes run only through [`Service::merge_pass`].
    pub run_passes: bool,
    /// How long an agent may take to answer a request before it is disconnected
    /// (default 10 s).
    pub request_timeout: Duration,
    /// The most pages one VMM may register (default 2^26, 256 GiB).
    pub max_pages_per_vmm: u64,
    /// The most VMMs connected at once (default 4096); more are refused.
    pub max_vmms: usize,
    /// Run the Per Page Recycler in every domain's passes (default off): each pass
    /// offers the volatile pages of VMMs whose agents registered PIP pools to those
    /// agents ([`Op::Reclaim`](crate::wire::Op::Reclaim), one request per batch), which
    /// recycle the ones their guests freed. See [*The Per Page
    /// Recycler*](self#the-per-page-recycler-across-processes).
    pub recycle: bool,
}

impl ServiceConfig {
    /// The defaults, listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ServiceConfig {
            socket: socket.into(),
            engine: pageone::Config::default(),
            domains: HashMap::new(),
            only_listed: false,
            store_home_slots: 1 << 24,
            run_passes: true,
            request_timeout: Duration::from_secs(10),
            max_pages_per_vmm: 1 << 26,
            max_vmms: 4096,
            recycle: false,
        }
    }

    /// Sets [`recycle`](Self::recycle).
    pub fn with_recycle(mut self, on: bool) -> Self {
        self.recycle = on;
        self
    }

    /// Sets [`max_vmms`](Self::max_vmms).
    pub fn with_max_vmms(mut self, vmms: usize) -> Self {
        self.max_vmms = vmms;
        self
    }

    /// Sets [`engine`](Self::engine).
    pub fn with_engine(mut self, engine: pageone::Config) -> Self {
        self.engine = engine;
        self
    }

    /// Puts VMMs of `uid` into `domain` (domain numbers at or above `0x8000_0000` are the
    /// per-uid defaults' and are refused here).
    ///
    /// # Panics
    /// If `domain` is `0x8000_0000` or above.
    pub fn with_domain(mut self, uid: u32, domain: DomainId) -> Self {
        assert!(
            domain.0 < PER_UID,
            "domains from 0x8000_0000 up are per-uid defaults"
        );
        self.domains.insert(uid, domain);
        self
    }

    /// Sets [`only_listed`](Self::only_listed).
    pub fn with_only_listed(mut self, only: bool) -> Self {
        self.only_listed = only;
        self
    }

    /// Sets [`store_home_slots`](Self::store_home_slots).
    pub fn with_store_home_slots(mut self, slots: u64) -> Self {
        self.store_home_slots = slots;
        self
    }

    /// Sets [`run_passes`](Self::run_passes).
    pub fn with_run_passes(mut self, on: bool) -> Self {
        self.run_passes = on;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`max_pages_per_vmm`](Self::max_pages_per_vmm).
    pub fn with_max_pages_per_vmm(mut self, pages: u64) -> Self {
        self.max_pages_per_vmm = pages;
        self
    }

    /// The trust domain of a VMM run by `uid`, or `None` if it is refused.
    pub fn domain_of(&self, uid: u32) -> Option<DomainId> {
        match self.domains.get(&uid) {
            Some(d) => Some(*d),
            None if self.only_listed => None,
            None => Some(DomainId(PER_UID | (uid & !PER_UID))),
        }
    }
}

/// The Per Page Recycler in a domain's passes ([`ServiceConfig::recycle`]): PageONE
/// offers it each chunk's volatile pages, and it asks each page's agent, one request per
/// batch, to reclaim them ([`RemoteMemory::reclaim`]); the agents prove and recycle.
struct Reclaimer;

impl ScanHook<RemoteMemory> for Reclaimer {
    fn examine(&self, memory: &RemoteMemory, page: PageId) -> bool {
        matches!(memory.reclaim(&[page]).pop(), Some(Ok(true)))
    }

    fn examine_batch(&self, memory: &RemoteMemory, pages: &[PageId], taken: &mut [bool]) {
        for (t, r) in taken.iter_mut().zip(memory.reclaim(pages)) {
            *t = matches!(r, Ok(true));
        }
    }
}

/// The first per-uid default domain.
const PER_UID: u32 = 0x8000_0000;

/// What a service did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceStats {
    /// VMMs connected now.
    pub vmms: u64,
    /// Connections accepted since the start.
    pub connections: u64,
    /// Connections refused (trust domain policy) or ended for a protocol error.
    pub refused: u64,
    /// Malformed or unexpected messages (each ended its connection).
    pub protocol_errors: u64,
    /// Hold reports the stores refused (counted and skipped).
    pub refused_holds: u64,
    /// Requests sent to agents (round trips).
    pub requests: u64,
    /// Pages those requests named.
    pub request_pages: u64,
    /// VMM processes whose store holds were let go after they exited.
    pub reaped: u64,
}

/// A VMM as the service sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmmInfo {
    /// Its process id.
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// The name it gave.
    pub name: String,
    /// Its trust domain.
    pub domain: DomainId,
    /// Pages it registered.
    pub pages: u64,
}

/// A disconnected VMM whose process may still map slots of its domain's store.
struct Orphan {
    client: ClientId,
    /// Its process (`None`: it could not be opened, the process was gone already).
    pidfd: Option<OwnedFd>,
    store: Arc<SharedStore>,
}

/// One trust domain: its store, memory and engine.
struct Domain {
    memory: Arc<RemoteMemory>,
    engine: PageOne<RemoteMemory>,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    protocol_errors: AtomicU64,
    refused_holds: AtomicU64,
    requests: AtomicU64,
    request_pages: AtomicU64,
    reaped: AtomicU64,
}

struct Shared {
    config: ServiceConfig,
    listener: OwnedFd,
    stop: AtomicBool,
    domains: Mutex<HashMap<DomainId, Arc<Domain>>>,
    sessions: Mutex<HashMap<ClientId, Arc<Session>>>,
    /// Disconnected VMMs whose process may still map store slots.
    orphans: Mutex<Vec<Orphan>>,
    next_client: AtomicU64,
    counters: Counters,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

/// A running deduplication service; see the module docs. Dropping it stops it (the
/// agents then see their connections end).
///
/// ```no_run
/// use pageoned::service::{Service, ServiceConfig};
///
/// let service = Service::start(ServiceConfig::new("/run/pageoned.sock")).unwrap();
/// std::thread::sleep(std::time::Duration::from_secs(60));
/// println!("{:?}", service.stats());
/// ```
#[must_use = "dropping the service stops it"]
pub struct Service {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Listens on the configured socket and starts the service's threads.
    ///
    /// # Errors
    /// If the socket cannot be made (a live socket is already there, no permission) or a
    /// thread cannot be spawned.
    pub fn start(config: ServiceConfig) -> io::Result<Service> {
        let listener = socket::listen(&config.socket)?;
        let shared = Arc::new(Shared {
            config,
            listener,
            stop: AtomicBool::new(false),
            domains: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            next_client: AtomicU64::new(1),
            counters: Counters::default(),
            readers: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("pageoned-accept".into())
                .spawn(move || s.accept_loop())?,
        );
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("pageoned-passes".into())
                .spawn(move || s.pass_loop())?,
        );
        Ok(Service { shared, threads })
    }

    /// The trust domains with VMMs (now or before).
    pub fn domains(&self) -> Vec<DomainId> {
        let mut d: Vec<DomainId> = self.shared.domains().keys().copied().collect();
        d.sort();
        d
    }

    /// Runs one merge pass over `domain`'s VMMs now (taking regions registered since the
    /// last pass, dropping those gone); `None` if the domain has no engine.
    pub fn merge_pass(&self, domain: DomainId) -> Option<PassReport> {
        let d = self.shared.domains().get(&domain).cloned()?;
        let _ = d.engine.refresh_regions();
        Some(d.engine.merge_pass())
    }

    /// Runs merge passes over `domain` until one is quiet, at most `max` passes; the
    /// passes run.
    pub fn merge_until_quiet(&self, domain: DomainId, max: usize) -> usize {
        for n in 1..=max {
            match self.merge_pass(domain) {
                Some(r) if r.quiet() => return n,
                Some(_) => {}
                None => return n,
            }
        }
        max
    }

    /// The engine statistics of `domain`.
    pub fn engine_stats(&self, domain: DomainId) -> Option<pageone::Stats> {
        self.shared.domains().get(&domain).map(|d| d.engine.stats())
    }

    /// What `domain`'s store holds.
    pub fn store_stats(&self, domain: DomainId) -> Option<SharedStoreStats> {
        let d = self.shared.domains().get(&domain).cloned()?;
        d.memory.store().stats().ok()
    }

    /// The VMMs connected now.
    pub fn vmms(&self) -> Vec<VmmInfo> {
        self.shared
            .sessions()
            .values()
            .map(|s| VmmInfo {
                pid: s.peer.pid,
                uid: s.peer.uid,
                name: s.name.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                domain: s.domain,
                pages: s
                    .regions
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .map(|r| r.pages as u64)
                    .sum(),
            })
            .collect()
    }

    /// Counters since the start.
    pub fn stats(&self) -> ServiceStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sessions = self.shared.sessions();
        let live_req: u64 = sessions
            .values()
            .map(|s| s.counters.requests.load(Ordering::Relaxed))
            .sum();
        let live_pages: u64 = sessions
            .values()
            .map(|s| s.counters.pages.load(Ordering::Relaxed))
            .sum();
        ServiceStats {
            vmms: sessions.len() as u64,
            connections: g(&c.connections),
            refused: g(&c.refused),
            protocol_errors: g(&c.protocol_errors),
            refused_holds: g(&c.refused_holds),
            requests: g(&c.requests) + live_req,
            request_pages: g(&c.request_pages) + live_pages,
            reaped: g(&c.reaped),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = socket::shutdown(self.shared.listener.as_fd());
        for s in self.shared.sessions().values() {
            s.kill();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let readers: Vec<_> = self
            .shared
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in readers {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.shared.config.socket);
    }
}

impl Shared {
    fn domains(&self) -> std::sync::MutexGuard<'_, HashMap<DomainId, Arc<Domain>>> {
        self.domains.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The domain, made on first use (store, memory, engine).
    fn domain(&self, id: DomainId) -> io::Result<Arc<Domain>> {
        let mut domains = self.domains();
        if let Some(d) = domains.get(&id) {
            return Ok(d.clone());
        }
        let store = SharedStore::new(self.config.store_home_slots)
            .map_err(|e| io::Error::other(format!("the domain's store: {e}")))?;
        let memory = Arc::new(RemoteMemory::new(id, Arc::new(store)));
        let engine = if self.config.recycle {
            PageOne::with_hook(
                memory.clone(),
                self.config.engine.clone(),
                Arc::new(Reclaimer),
            )?
        } else {
            PageOne::new(memory.clone(), self.config.engine.clone())?
        };
        let d = Arc::new(Domain { memory, engine });
        domains.insert(id, d.clone());
        Ok(d)
    }

    fn accept_loop(self: Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            match socket::accept_within(self.listener.as_fd(), Duration::from_millis(100)) {
                Ok(Some(fd)) => self.clone().admit(fd),
                Ok(None) => {}
                Err(_) if self.stop.load(Ordering::Relaxed) => break,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            self.reap();
        }
    }

    /// A new connection: who it is, its domain, its welcome, its reader thread.
    fn admit(self: Arc<Self>, fd: OwnedFd) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let refuse = |fd: &OwnedFd, code: ErrorCode, text: &str| {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            let mut buf = Vec::new();
            if wire::encode(
                &Msg::Error {
                    code,
                    text: text.into(),
                },
                &mut buf,
            )
            .is_ok()
            {
                let _ = socket::send(fd.as_fd(), &buf, &[]);
            }
        };
        if self.sessions().len() >= self.config.max_vmms {
            return refuse(&fd, ErrorCode::Busy, "too many VMMs connected");
        }
        let Ok(peer) = socket::peer_cred(fd.as_fd()) else {
            return refuse(&fd, ErrorCode::Denied, "no peer credentials");
        };
        // The process, held by a pidfd now (so a reused pid is never mistaken for it).
        let pidfd = socket::pidfd(peer.pid).ok();
        let Some(domain) = self.config.domain_of(peer.uid) else {
            return refuse(&fd, ErrorCode::Denied, "this user is not served here");
        };
        let dom = match self.domain(domain) {
            Ok(d) => d,
            Err(_) => return refuse(&fd, ErrorCode::Busy, "the domain's store"),
        };
        // An agent that stops reading must not hold a work thread for ever: a send that
        // cannot finish within the request timeout fails, and the session ends.
        let _ = socket::set_send_timeout(fd.as_fd(), Some(self.config.request_timeout));
        let client = ClientId(self.next_client.fetch_add(1, Ordering::Relaxed));
        let session = Arc::new(Session::new(
            client,
            peer,
            domain,
            fd,
            self.config.request_timeout,
        ));
        let s = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("pageoned-vmm-{}", peer.pid))
            .spawn(move || s.serve(session, dom, pidfd));
        if let Ok(t) = spawned {
            self.readers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(t);
        }
    }

    /// The reader thread of one VMM: hello, welcome, then its messages until it ends.
    fn serve(&self, session: Arc<Session>, dom: Arc<Domain>, pidfd: Option<OwnedFd>) {
        let mut buf = Vec::new();
        // Hello first (within 5 s), then the welcome with the store.
        let hello = socket::recv(session.fd(), &mut buf, Some(Duration::from_secs(5)));
        let ok = match hello {
            Ok(Some(r)) if !r.truncated && r.fds.is_empty() => match wire::decode(&buf) {
                Ok(Msg::Hello { name }) => {
                    *session.name.lock().unwrap_or_else(|e| e.into_inner()) = name;
                    true
                }
                _ => false,
            },
            _ => false,
        };
        let store = dom.memory.store().clone();
        if !ok {
            self.violation(&session, "expected a hello");
        } else if session
            .send(
                &Msg::Welcome {
                    domain: session.domain.0,
                    store_slots: store.slots(),
                },
                &[store.fd()],
            )
            .is_ok()
        {
            self.sessions().insert(session.client, session.clone());
            self.messages(&session, &dom, &mut buf);
        }
        // Torn down: its regions go now; its holds once its process is gone.
        session.kill();
        self.sessions().remove(&session.client);
        let regions: Vec<Arc<RemoteRegion>> = session
            .regions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in regions {
            dom.memory.remove(r.id);
        }
        let c = &self.counters;
        c.requests.fetch_add(
            session.counters.requests.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        c.request_pages.fetch_add(
            session.counters.pages.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Orphan {
                client: session.client,
                pidfd,
                store,
            });
        self.reap();
    }

    /// Messages of a welcomed VMM, until it disconnects or breaks the protocol.
    fn messages(&self, session: &Arc<Session>, dom: &Domain, buf: &mut Vec<u8>) {
        while !self.stop.load(Ordering::Relaxed) && session.is_alive() {
            let r = match socket::recv(session.fd(), buf, Some(Duration::from_millis(100))) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(_) => return,
            };
            if r.truncated || !r.fds.is_empty() {
                return self.violation(session, "an oversized frame or unexpected fds");
            }
            let msg = match wire::decode(buf) {
                Ok(m) => m,
                Err(_) => return self.violation(session, "a malformed message"),
            };
            match msg {
                Msg::Reply { id, body } => {
                    if !session.deliver(id, body) {
                        return self.violation(session, "a reply to no request");
                    }
                }
                Msg::Holds { events } => {
                    if let Err(refused) = dom.memory.store().apply(session.client, &events) {
                        self.counters
                            .refused_holds
                            .fetch_add(refused.len() as u64, Ordering::Relaxed);
                    }
                }
                Msg::Written { pages } => {
                    let regions = session.regions.read().unwrap_or_else(|e| e.into_inner());
                    for w in pages {
                        if let Some(r) = regions.get(&w.page.region) {
                            r.written(w.page.index, w.gen);
                        }
                    }
                }
                Msg::Mappings { in_use, limit } => session.set_mappings(in_use, limit),
                Msg::Pools { id, regions } => {
                    session.set_pools(&regions);
                    let answer = Msg::Registered { id, result: Ok(()) };
                    if session.send(&answer, &[]).is_err() {
                        return;
                    }
                }
                Msg::Register { id, regions } => {
                    let result = self.register(session, dom, &regions);
                    if session.send(&Msg::Registered { id, result }, &[]).is_err() {
                        return;
                    }
                }
                Msg::Unregister { region, .. } => {
                    let r = session
                        .regions
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&region);
                    if let Some(r) = r {
                        dom.memory.remove(r.id);
                    }
                }
                Msg::Error { .. } => return,
                _ => return self.violation(session, "a message only a service sends"),
            }
        }
    }

    /// Checks and adds a VMM's regions (all or none).
    fn register(
        &self,
        session: &Arc<Session>,
        dom: &Domain,
        decls: &[RegionDecl],
    ) -> Result<(), ErrorCode> {
        let mut regions = session.regions.write().unwrap_or_else(|e| e.into_inner());
        let mut total: u64 = regions.values().map(|r| r.pages as u64).sum();
        let mut seen = std::collections::HashSet::new();
        for d in decls {
            let len = d.pages as u64 * PAGE_SIZE as u64;
            // Declared memory costs the service (8 bytes a page here, more in the
            // engine): it must be the VMM's guest memory, mapped, not a made-up range.
            let fits = d.pages > 0
                && d.addr % PAGE_SIZE as u64 == 0
                && d.addr.checked_add(len).is_some()
                && !regions.contains_key(&d.region)
                && seen.insert(d.region)
                && is_guest_range(session.pid(), d.addr, d.addr + len);
            total += d.pages as u64;
            if !fits || total > self.config.max_pages_per_vmm {
                return Err(ErrorCode::Unsupported);
            }
        }
        for d in decls {
            let r = dom.memory.add(session, d.region, d.addr, d.pages);
            regions.insert(d.region, r);
        }
        Ok(())
    }

    fn violation(&self, session: &Session, why: &str) {
        self.counters
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        let _ = session.send(
            &Msg::Error {
                code: ErrorCode::Protocol,
                text: why.into(),
            },
            &[],
        );
        session.kill();
    }

    /// Lets go of the store holds of VMMs whose process is gone.
    fn reap(&self) {
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        orphans.retain(|o| {
            let gone = match &o.pidfd {
                Some(fd) => socket::process_exited(fd.as_fd()),
                None => true,
            };
            if gone {
                o.store.drop_client(o.client);
                self.counters.reaped.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
    }

    /// Merge passes over every domain, every merge period (if configured).
    fn pass_loop(self: Arc<Self>) {
        let mut last = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(
                self.config
                    .engine
                    .merge_period
                    .min(Duration::from_millis(20)),
            );
            if !self.config.run_passes || last.elapsed() < self.config.engine.merge_period {
                continue;
            }
            last = Instant::now();
            let domains: Vec<Arc<Domain>> = self.domains().values().cloned().collect();
            for d in domains {
                if self.stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = d.engine.refresh_regions();
                if !d.memory.regions().is_empty() {
                    let _ = d.engine.merge_pass();
                }
            }
        }
    }
}
