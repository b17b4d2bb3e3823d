//! A VMM process for the tests: the test binary runs itself again as one (the test
//! `vmm_child` of each test file, which does nothing unless `PAGEONED_VMM` is set). It
//! maps guest RAM, fills it, hands it to an agent and obeys line commands on stdin,
//! answering on stdout with lines that start with `@@ `.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_memory::linux::{Backing, LinuxConfig};
use pageoned::agent::{Agent, AgentConfig};

pub const PAGE: usize = 4096;

/// The word `w` of page `i`: pages below `shared` are the same in every VMM, the others
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
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Vmm {
    /// Starts a VMM of `pages` pages (the first `shared` the same in every VMM) whose
    /// agent connects to `socket`; waits until its regions are registered.
    pub fn spawn(
        test: &str,
        socket: &std::path::Path,
        pages: usize,
        shared: usize,
        seed: u64,
    ) -> Vmm {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(
                "PAGEONED_VMM",
                format!("{}|{pages}|{shared}|{seed}", socket.display()),
            )
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

    pub fn pid(&self) -> u32 {
        self.child.id()
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
    let mut expect: Vec<Vec<u64>> = (0..pages)
        .map(|i| (0..PAGE / 8).map(|w| content(seed, shared, i, w)).collect())
        .collect();
    for (i, page) in expect.iter().enumerate() {
        for (w, v) in page.iter().enumerate() {
            word(i, w).store(*v, Ordering::Relaxed);
        }
    }
    let config = AgentConfig::new(socket)
        .with_name(&format!("test-vmm-{seed}"))
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
                for (i, want) in expect.iter().enumerate() {
                    let wrong: Vec<usize> = (0..PAGE / 8)
                        .filter(|&w| !busy(i, w) && word(i, w).load(Ordering::Relaxed) != want[w])
                        .collect();
                    if let Some(&w) = wrong.first() {
                        bad += 1;
                        eprintln!(
                            "page {i} word {w}: {:#x}, want {:#x} ({} words differ)",
                            word(i, w).load(Ordering::Relaxed),
                            want[w],
                            wrong.len()
                        );
                    }
                }
                say(format!("ok {bad}"));
            }
            ["write", i, v] => {
                let (i, v): (usize, u64) = (i.parse().unwrap(), v.parse().unwrap());
                word(i, 0).store(v, Ordering::Relaxed);
                expect[i][0] = v;
                say("done".into());
            }
            ["backing", i] => {
                let p = agent
                    .page_id(region, i.parse::<usize>().unwrap() * PAGE)
                    .unwrap();
                let b = agent.memory().unwrap().backing(p).unwrap();
                say(match b {
                    Backing::Store { offset } => format!("store {offset}"),
                    other => format!("{other:?}"),
                });
            }
            ["stats"] => {
                let s = agent.stats();
                let m = agent.memory().unwrap().stats();
                say(format!(
                    "{} {} {} {}",
                    s.connections, s.requests, m.merges, s.connected as u8
                ));
            }
            // Writer threads on the last `n` pages (each its own), for `ms`: each write
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
                    expect[i][1] = word(i, 1).load(Ordering::Relaxed);
                }
                say(format!("{writes} {lost} {worst}"));
            }
            ["exit"] => break,
            _ => say(format!("unknown {line}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(agent);
    std::process::exit(0);
}
