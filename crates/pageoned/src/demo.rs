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

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{Agent, AgentConfig};
use page_memory::linux::{Backing, LinuxConfig};

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
                for i in 0..pages {
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
            ["exit"] => break,
            _ => say(format!("unknown {line}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(agent);
    std::process::exit(0);
}
