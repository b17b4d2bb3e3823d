//! A VMM process for tests, examples and benchmarks (feature `demo`): a program runs
//! itself again as one ([`Vmm::spawn`]; the child calls [`child_main`] early, which
//! does nothing unless `PAGEONED_VMM` is set). It maps guest RAM, fills it (pages below
//! `shared` the same in every VMM, the others its own), hands it to an agent (or, in KSM
//! mode, marks it `MADV_MERGEABLE` for Linux KSM instead) and obeys line commands on
//! stdin, answering on stdout with lines that contain `@@ `.
//!
//! Commands: `check` (pages whose contents are wrong), `write I V`, `backing I`,
//! `stats` (connections, requests, merges, connected), `writers N` (threads writing
//! the last N pages, each write read back), `stop-writers` (writes, lost, longest write
//! in µs), `hotplug N K SEED` (a new region handed to the agent while it runs), `hot R I`
//! (pages of hot-plugged region R with wrong contents, and page I's backing), `exit`.
//!
//! The Per Page Recycler (a guest that frees pages into a PIP pool in its RAM): `pool K
//! MODE` (the guest puts its pool in its first K pages and the VMM registers it with the
//! agent, [`Agent::register_pool`]; MODE `ok`, or `garbage` for a header that is no
//! pool; then the guest's allocator, over the other pages, holds them all in use),
//! `free I` (the guest frees page I: it is offered to the host), `alloc` (the guest
//! allocates a page again: its index and whether it read zeros; its contents are then
//! written again), `zeros` (freed pages that read all zeros), `ppr` (the agent's
//! recycler: recycled, marks seen, marks rejected; reclaim requests, pages reclaimed),
//! `tamper header|slots` (a hostile guest scribbles over its pool's header, or makes
//! every occupied slot name another frame). `check` leaves pool pages and freed pages
//! out.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{Agent, AgentConfig};
use page_memory::linux::{Backing, LinuxConfig};
use ppr_guest::{Hooks, PageAllocator, PoolView};
use ppr_host::PoolMemory;

/// Bytes in a page.
pub const PAGE: usize = 4096;

/// Where a VMM's memory is deduplicated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dedup {
    /// By the service listening on this socket (through an agent).
    Service(std::path::PathBuf),
    /// By Linux KSM (`MADV_MERGEABLE`).
    Ksm,
}

/// The word `w` of page `i` of a VMM made with `seed`: pages below `shared` are the same in every VMM, the others
/// are the VMM's own (`seed`).
pub fn content(seed: u64, shared: usize, i: usize, w: usize) -> u64 {
    let s = if i < shared { 0x5eed } else { seed };
    let mut x = s
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((i as u64) << 20 | w as u64);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 31)
}

/// The guest frame number of page 0 of a demo VMM's guest RAM (for its PIP pool).
pub const FIRST_FRAME: u64 = 0x100;

/// The PIP pool id a demo VMM gives its pool.
pub const POOL_ID: u32 = 7;

/// A demo guest's PIP pool, in its VMM's guest RAM, as the agent's recycler reads it.
struct DemoPool {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pointer is into the demo VMM's guest RAM, mapped until the process exits;
// the pool in it is only accessed atomically (pip).
unsafe impl Send for DemoPool {}
// SAFETY: as for Send.
unsafe impl Sync for DemoPool {}

impl PoolMemory for DemoPool {
    fn view(&self) -> Option<PoolView<'_>> {
        // SAFETY: see the Send impl: mapped for the process's life, 64-byte aligned (page
        // aligned), every access atomic (the guest's allocator, the agent's recycler; the
        // agent's remaps replace whole pages).
        unsafe { PoolView::from_raw(self.ptr, self.len) }.ok()
    }
}

/// A VMM child process.
pub struct Vmm {
    /// The child process.
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Vmm {
    /// Starts a VMM of `pages` pages (the first `shared` the same in every VMM) by
    /// running `command` (this program again, with arguments that make it call
    /// [`child_main`] first); with a service, waits until its regions are registered.
    ///
    /// # Panics
    /// If the child cannot be started or does not get ready.
    pub fn spawn(
        mut command: Command,
        dedup: &Dedup,
        pages: usize,
        shared: usize,
        seed: u64,
    ) -> Vmm {
        let how = match dedup {
            Dedup::Service(socket) => socket.display().to_string(),
            Dedup::Ksm => String::from("ksm"),
        };
        let mut child = command
            .env("PAGEONED_VMM", format!("{how}|{pages}|{shared}|{seed}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut v = Vmm {
            child,
            stdin,
            stdout,
        };
        let ready = v.answer();
        assert!(ready.starts_with("ready"), "{ready}");
        v
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "the VMM child exited");
            // (libtest may print its "test vmm_child ... " before it on the same line.)
            if let Some(at) = line.find("@@ ") {
                return line[at + 3..].trim_end().to_string();
            }
        }
    }

    /// Sends a command, returns its answer.
    pub fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.answer()
    }

    /// Pages whose contents are not what they should be.
    pub fn mismatches(&mut self) -> u64 {
        let a = self.ask("check");
        a.strip_prefix("ok ").unwrap().parse().unwrap()
    }

    /// The store offset page `i` maps, if it maps the store.
    pub fn store_offset(&mut self, i: usize) -> Option<u64> {
        let a = self.ask(&format!("backing {i}"));
        a.strip_prefix("store ").map(|o| o.parse().unwrap())
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time of the child's threads whose name starts with one of `names` (from
    /// `/proc/PID/task/*/schedstat`).
    pub fn thread_cpu(&self, names: &[&str]) -> Duration {
        thread_cpu(self.child.id(), names)
    }

    /// The child's proportional set size (`Pss` of `/proc/PID/smaps_rollup`, bytes):
    /// summed over processes, shared pages count once.
    pub fn pss(&self) -> u64 {
        pss(self.child.id())
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
    }
}

/// CPU time of the threads of process `pid` whose name starts with one of `names` (all
/// threads if `names` is empty).
pub fn thread_cpu(pid: u32, names: &[&str]) -> Duration {
    let mut ns = 0u64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !names.is_empty() && !names.iter().any(|n| comm.starts_with(n)) {
            continue;
        }
        let sched = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += sched
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

/// The proportional set size of process `pid` in bytes (0 if it cannot be read).
pub fn pss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The child's side: runs the VMM if this process is one (never returns then).
pub fn child_main() {
    let Ok(spec) = std::env::var("PAGEONED_VMM") else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let socket = parts[0];
    let pages: usize = parts[1].parse().unwrap();
    let shared: usize = parts[2].parse().unwrap();
    let seed: u64 = parts[3].parse().unwrap();
    let len = pages * PAGE;
    // SAFETY: a fresh private anonymous mapping of our own.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let words = base as *mut AtomicU64;
    let word = |i: usize, w: usize| -> &'static AtomicU64 {
        // SAFETY: within the mapping, which lives until the process exits; aligned.
        unsafe { &*words.add(i * (PAGE / 8) + w) }
    };
    // What each word should hold: its content, unless written since (kept apart, so
    // the process holds no second copy of its guest memory).
    let mut written: std::collections::HashMap<(usize, usize), u64> = Default::default();
    let want = |written: &std::collections::HashMap<(usize, usize), u64>, i, w| {
        written
            .get(&(i, w))
            .copied()
            .unwrap_or_else(|| content(seed, shared, i, w))
    };
    for i in 0..pages {
        for w in 0..PAGE / 8 {
            word(i, w).store(content(seed, shared, i, w), Ordering::Relaxed);
        }
    }
    let agent = if socket == "ksm" {
        // SAFETY: our own mapping; MADV_MERGEABLE changes no contents.
        let r = unsafe { libc::madvise(base, len, libc::MADV_MERGEABLE) };
        assert_eq!(r, 0, "MADV_MERGEABLE: {}", std::io::Error::last_os_error());
        None
    } else {
        let config = AgentConfig::new(socket)
            .with_name(&format!("vmm-{seed}"))
            .with_retry(Duration::from_millis(20))
            .with_linux(LinuxConfig::default().with_require_kernel_faults(false));
        let agent = Agent::start(config).unwrap();
        // SAFETY: our own mapping, kept until the process exits.
        let region = unsafe { agent.add_region(base as *mut u8, len) }.unwrap();
        assert!(
            agent.wait_registered(Duration::from_secs(10)),
            "not registered: {:?}",
            agent.last_error()
        );
        Some((agent, region))
    };
    let mut hot: Vec<(crate::agent::GuestRegion, usize, usize, usize, u64)> = Vec::new();
    // The Per Page Recycler's guest side: the pool's pages, the allocator, freed pages.
    let mut pool_pages = 0usize;
    let mut guest_alloc: Option<PageAllocator<'static, [AtomicU64; PAGE / 8]>> = None;
    let mut freed: std::collections::HashSet<usize> = Default::default();
    // SAFETY: the guest RAM, mapped until the process exits, as pages of atomics (every
    // access to it here is atomic); aligned.
    let guest_pages: &'static [[AtomicU64; PAGE / 8]] =
        unsafe { std::slice::from_raw_parts(base as *const [AtomicU64; PAGE / 8], pages) };
    let refill = |i: usize| {
        for w in 0..PAGE / 8 {
            word(i, w).store(content(seed, shared, i, w), Ordering::Relaxed);
        }
    };
    let say = |s: String| {
        println!("@@ {s}");
        std::io::stdout().flush().unwrap();
    };
    say(format!("ready {}", std::process::id()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers: Vec<std::thread::JoinHandle<(u64, u64, u128)>> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let args: Vec<&str> = line.split_whitespace().collect();
        match args.as_slice() {
            ["check"] => {
                // (Word 1 of a page a writer thread writes is that thread's to check.)
                let busy = |i: usize, w: usize| w == 1 && i >= pages - writers.len();
                let mut bad = 0;
                for i in (pool_pages..pages).filter(|i| !freed.contains(i)) {
                    let wrong: Vec<usize> = (0..PAGE / 8)
                        .filter(|&w| {
                            !busy(i, w)
                                && word(i, w).load(Ordering::Relaxed) != want(&written, i, w)
                        })
                        .collect();
                    if let Some(&w) = wrong.first() {
                        bad += 1;
                        eprintln!(
                            "page {i} word {w}: {:#x}, want {:#x} ({} words differ)",
                            word(i, w).load(Ordering::Relaxed),
                            want(&written, i, w),
                            wrong.len()
                        );
                    }
                }
                say(format!("ok {bad}"));
            }
            ["write", i, v] => {
                let (i, v): (usize, u64) = (i.parse().unwrap(), v.parse().unwrap());
                word(i, 0).store(v, Ordering::Relaxed);
                written.insert((i, 0), v);
                say("done".into());
            }
            ["backing", i] => {
                let b = agent.as_ref().and_then(|(agent, region)| {
                    let p = agent.page_id(*region, i.parse::<usize>().ok()? * PAGE)?;
                    agent.memory()?.backing(p).ok()
                });
                say(match b {
                    Some(Backing::Store { offset }) => format!("store {offset}"),
                    other => format!("{other:?}"),
                });
            }
            ["stats"] => match &agent {
                Some((agent, _)) => {
                    let s = agent.stats();
                    let merges = agent.memory().map_or(0, |m| m.stats().merges);
                    say(format!(
                        "{} {} {} {}",
                        s.connections, s.requests, merges, s.connected as u8
                    ));
                }
                None => say("0 0 0 0".into()),
            },
            // Writer threads on the last `n` pages (each its own): each write
            // is read back at once (a lost write reads otherwise); the longest write is
            // what a guest waited.
            ["writers", n] => {
                let n: usize = n.parse().unwrap();
                stop.store(false, Ordering::Relaxed);
                for k in 0..n {
                    let i = pages - 1 - k;
                    let stop = stop.clone();
                    let w = word(i, 1);
                    writers.push(std::thread::spawn(move || {
                        let (mut writes, mut lost, mut worst) = (0u64, 0u64, 0u128);
                        let mut c = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            c += 1;
                            let t = Instant::now();
                            w.store(c, Ordering::Relaxed);
                            worst = worst.max(t.elapsed().as_micros());
                            if w.load(Ordering::Relaxed) != c {
                                lost += 1;
                            }
                            writes += 1;
                            if c % 64 == 0 {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                        }
                        (writes, lost, worst)
                    }));
                }
                say("started".into());
            }
            ["stop-writers"] => {
                stop.store(true, Ordering::Relaxed);
                let (mut writes, mut lost, mut worst) = (0, 0, 0);
                for (k, t) in writers.drain(..).enumerate() {
                    let (w, l, s) = t.join().unwrap();
                    writes += w;
                    lost += l;
                    worst = worst.max(s);
                    let i = pages - 1 - k;
                    written.insert((i, 1), word(i, 1).load(Ordering::Relaxed));
                }
                say(format!("{writes} {lost} {worst}"));
            }
            // Memory hot-plug: a new region of `n` pages, the first `k` the same in every
            // VMM (seed `s`), handed to the agent while it runs.
            ["hotplug", n, k, s] => {
                let (n, k, s): (usize, usize, u64) =
                    (n.parse().unwrap(), k.parse().unwrap(), s.parse().unwrap());
                let Some((agent, _)) = &agent else {
                    say("no agent".into());
                    continue;
                };
                // SAFETY: a fresh private anonymous mapping of our own.
                let base = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        n * PAGE,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(base, libc::MAP_FAILED);
                let w = base as *mut AtomicU64;
                for i in 0..n {
                    for j in 0..PAGE / 8 {
                        // SAFETY: within the new mapping; aligned.
                        unsafe { &*w.add(i * (PAGE / 8) + j) }
                            .store(content(s, k, i, j), Ordering::Relaxed);
                    }
                }
                // SAFETY: our own mapping, kept until the process exits.
                let r = unsafe { agent.add_region(base as *mut u8, n * PAGE) }.unwrap();
                let ok = agent.wait_registered(Duration::from_secs(10));
                hot.push((r, base as usize, n, k, s));
                say(format!("added {}", ok as u8));
            }
            // Page `i` of hot-plugged region `r`: its backing, and whether all of that
            // region's pages hold what they should.
            ["hot", r, i] => {
                let (r, i): (usize, usize) = (r.parse().unwrap(), i.parse().unwrap());
                let (region, base, n, k, s) = hot[r];
                let w = base as *const AtomicU64;
                let bad = (0..n)
                    .filter(|&p| {
                        (0..PAGE / 8).any(|j| {
                            // SAFETY: within the hot-plugged mapping; aligned.
                            unsafe { &*w.add(p * (PAGE / 8) + j) }.load(Ordering::Relaxed)
                                != content(s, k, p, j)
                        })
                    })
                    .count();
                let b = agent.as_ref().and_then(|(agent, _)| {
                    let p = agent.page_id(region, i * PAGE)?;
                    agent.memory()?.backing(p).ok()
                });
                say(match b {
                    Some(Backing::Store { offset }) => format!("{bad} store {offset}"),
                    other => format!("{bad} {other:?}"),
                });
            }
            // The guest sets up its PIP pool in its first `k` pages; the VMM registers it.
            ["pool", k, mode] => {
                let k: usize = k.parse().unwrap();
                let Some((agent, region)) = &agent else {
                    say("no agent".into());
                    continue;
                };
                if pool_pages > 0 || k == 0 || k >= pages {
                    say("err no".into());
                    continue;
                }
                pool_pages = k;
                for i in 0..k {
                    for w in 0..PAGE / 8 {
                        word(i, w).store(0, Ordering::Relaxed);
                    }
                }
                let (ptr, len) = (base as *const u8, k * PAGE);
                let view = if *mode == "garbage" {
                    for w in 0..8 {
                        word(0, w).store(0xbad0_0000_0000_0000 | w as u64, Ordering::Relaxed);
                    }
                    None
                } else {
                    // SAFETY: the first `k` pages of the guest RAM, zeroed, mapped until
                    // the process exits and accessed only atomically from now on.
                    Some(unsafe { PoolView::<'static>::init_raw(ptr, len, 2) }.unwrap())
                };
                let indicator = 0x5eed_c0de_0000_0001 ^ seed.rotate_left(17);
                let pool = Arc::new(DemoPool { ptr, len });
                match agent.register_pool(*region, pool, POOL_ID, indicator, FIRST_FRAME) {
                    Err(e) => say(format!("err {e}")),
                    Ok(()) => {
                        if let Some(view) = view {
                            // The guest's allocator starts with every other page free
                            // (offered), then takes them all (its users' data goes back).
                            let hooks = Hooks::attach(view).unwrap();
                            let mut a = PageAllocator::with_free(
                                hooks,
                                guest_pages,
                                FIRST_FRAME,
                                0,
                                k..pages,
                            );
                            while let Some((frame, _)) = a.alloc(0) {
                                refill((frame - FIRST_FRAME) as usize);
                            }
                            guest_alloc = Some(a);
                        }
                        // The service knows the region has a pool before we go on.
                        let told = agent.wait_registered(Duration::from_secs(10));
                        say(if told { "pool ok" } else { "pool untold" }.into());
                    }
                }
            }
            ["free", i] => {
                let i: usize = i.parse().unwrap();
                let r = guest_alloc
                    .as_mut()
                    .map(|a| a.free(0, FIRST_FRAME + i as u64));
                if matches!(r, Some(Ok(()))) {
                    freed.insert(i);
                }
                say(format!("{r:?}"));
            }
            ["alloc"] => match guest_alloc.as_mut().and_then(|a| a.alloc(0)) {
                Some((frame, page)) => {
                    let i = (frame - FIRST_FRAME) as usize;
                    let zeros = page.iter().all(|w| w.load(Ordering::Relaxed) == 0);
                    freed.remove(&i);
                    refill(i);
                    say(format!("{i} {}", zeros as u8));
                }
                None => say("none".into()),
            },
            ["zeros"] => {
                let n = freed
                    .iter()
                    .filter(|&&i| (0..PAGE / 8).all(|w| word(i, w).load(Ordering::Relaxed) == 0))
                    .count();
                say(format!("{n}"));
            }
            ["ppr"] => match &agent {
                Some((agent, _)) => {
                    let r = agent.recycler_stats();
                    let s = agent.stats();
                    say(format!(
                        "{} {} {} {} {}",
                        r.recycled,
                        r.marks_seen,
                        r.invalid_marks(),
                        s.reclaim_requests,
                        s.reclaimed
                    ));
                }
                None => say("0 0 0 0 0".into()),
            },
            ["tamper", what] => {
                let Some(a) = &guest_alloc else {
                    say("no pool".into());
                    continue;
                };
                let view = a.hooks().guest().map(|g| g.view());
                match (*what, view) {
                    ("header", _) => word(0, 0).store(!0, Ordering::Relaxed),
                    ("slots", Some(view)) => {
                        for s in view.slots() {
                            let v = s.load(Ordering::Relaxed);
                            if v != 0 {
                                s.store(v + 1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ => {}
                }
                say("tampered".into());
            }
            ["exit"] => break,
            _ => say(format!("unknown {line}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(agent);
    std::process::exit(0);
}
