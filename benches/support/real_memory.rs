//! The real-memory data set: the memory of running processes started from the same
//! programs, read through `/proc/<pid>/maps`, `/proc/<pid>/pagemap` and `/proc/<pid>/mem`.
//!
//! [`capture`] starts `groups` identical groups of processes and waits until each is idle:
//! - a **worker**: this very executable (`std::env::current_exe`) started again with
//!   [`WORKER_ENV`] set, which does the work of a small indexing service and then blocks
//!   on its stdin (see [`worker_main`]): it reads its own executable, reads text files from
//!   `/usr/share`, `/usr/include` and `/etc` (sorted walk, the same files in every worker)
//!   until it holds `worker_mib` MiB of them, and builds a word index (a `HashMap` with
//!   the per-process random hash seed, so the table's layout differs between workers)
//!   and a sorted table of the printable strings of its executable. The contents are the
//!   same in every worker; pointers, hash-table layouts, pids and the stack differ, as
//!   address-space randomization and the process's own state make them differ;
//! - `sh` (reading commands from a pipe), `cat` (reading a pipe) and `sleep 3600`, found
//!   on `PATH`; a program that cannot be started is left out and named in
//!   [`Capture::missing`].
//!
//! It then reads, for each process, every readable mapping (private and shared, anonymous
//! and file-backed: the program text and libraries a guest's page cache would hold too)
//! except `[vvar]`, `[vvar_vclock]` and `[vsyscall]`, and of those only the pages
//! present in the process's page tables (`pagemap` bit 63) or swapped out (bit 62):
//! memory the process really has, not reserved address space that would read as zeros.
//! Mappings and pages left out are counted in [`Skipped`]. Then it kills and reaps the
//! processes (also on error or panic: [`Children`]'s `Drop`).
//!
//! Reading another process's memory needs `ptrace` access to it: root, or a parent
//! reading its own children (allowed by Yama's `ptrace_scope` 0 and 1).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// Set (to the corpus size in MiB) in the environment of a worker process.
pub const WORKER_ENV: &str = "DYNAMIC_VM_REAL_MEMORY_WORKER";

/// How much memory to capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Groups of processes (a worker, `sh`, `cat`, `sleep`); every program runs this many
    /// times.
    pub groups: usize,
    /// MiB of text files each worker reads (its resident memory ends at about 3 times
    /// this: the text, the index, its executable read whole).
    pub worker_mib: usize,
    /// Reuse the capture saved for these `groups` and `worker_mib` (see [`load_or_capture`]),
    /// or save this one for the next run.
    pub cache: bool,
}

impl Default for CaptureConfig {
    /// 6 groups, 8 MiB of text per worker: about 180 MiB of pages in all; no cache.
    fn default() -> Self {
        CaptureConfig {
            groups: 6,
            worker_mib: 8,
            cache: false,
        }
    }
}

impl CaptureConfig {
    /// The default, overridden by `DEDUP_REAL_GROUPS`, `DEDUP_REAL_MIB` and
    /// `DEDUP_REAL_CACHE=1` if set.
    pub fn from_env() -> Self {
        let mut c = CaptureConfig::default();
        let get = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        if let Some(g) = get("DEDUP_REAL_GROUPS") {
            c.groups = g.max(1);
        }
        if let Some(m) = get("DEDUP_REAL_MIB") {
            c.worker_mib = m;
        }
        c.cache = get("DEDUP_REAL_CACHE").is_some_and(|v| v != 0);
        c
    }

    /// Where the capture for this configuration is saved:
    /// `<target>/real-memory/g<groups>-m<worker_mib>.pages`, `<target>` being
    /// `CARGO_TARGET_DIR` or the workspace's `target`.
    pub fn cache_path(&self) -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        target
            .join("real-memory")
            .join(format!("g{}-m{}.pages", self.groups, self.worker_mib))
    }
}

/// The pages of one captured process, in address order.
pub struct Process {
    /// The program (`worker`, `sh`, `cat`, `sleep`).
    pub program: String,
    /// Its present pages, 4 KiB each, concatenated.
    pub pages: Vec<u8>,
}

impl Process {
    /// The number of pages.
    pub fn len(&self) -> usize {
        self.pages.len() / PAGE
    }

    /// Page `i`.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.pages[i * PAGE..(i + 1) * PAGE]
    }
}

/// What the capture left out.
#[derive(Clone, Debug, Default)]
pub struct Skipped {
    /// Mappings without read permission (guard pages, reserved address space).
    pub unreadable_mappings: u64,
    /// `[vvar]`, `[vvar_vclock]` and `[vsyscall]`.
    pub special_mappings: u64,
    /// Pages of readable mappings not present in memory (never touched).
    pub absent_pages: u64,
    /// Present pages whose read failed (`EIO`: I/O memory and the like).
    pub unreadable_pages: u64,
    /// Processes that exited or could not be read (left out entirely).
    pub lost_processes: u64,
}

/// A captured real-memory data set.
pub struct Capture {
    /// What was asked for.
    pub config: CaptureConfig,
    /// The processes, group by group, in the order started.
    pub processes: Vec<Process>,
    /// Programs that could not be started (left out of every group).
    pub missing: Vec<String>,
    /// What was left out.
    pub skipped: Skipped,
    /// The file it was loaded from, if it was not captured in this run.
    pub loaded_from: Option<PathBuf>,
}

/// Counts of a set of pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Pages in all.
    pub pages: u64,
    /// Pages of zeros.
    pub zero: u64,
    /// Distinct contents other than zeros.
    pub distinct: u64,
    /// Of those, the contents present only once (pages with no duplicate).
    pub singletons: u64,
    /// Non-zero pages that repeat an earlier one: non-zero pages minus `distinct`.
    pub duplicates: u64,
    /// Pages an engine merges, every duplicate of a content with the zero page counted
    /// as content, when one canonical page takes at most `max_sharing` pages.
    pub merged_all: u64,
    /// The same over the non-zero contents only.
    pub merged_non_zero: u64,
}

impl Census {
    /// Counts `pages`; `max_sharing` is the engines' `max_page_sharing`.
    pub fn of<'a>(pages: impl Iterator<Item = &'a [u8]>, max_sharing: u64) -> Census {
        let mut counts: HashMap<&[u8], u64> = HashMap::new();
        let mut c = Census::default();
        for p in pages {
            c.pages += 1;
            if p.iter().all(|&b| b == 0) {
                c.zero += 1;
            } else {
                *counts.entry(p).or_default() += 1;
            }
        }
        // n copies fill ceil(n / max_sharing) canonical pages; the rest are merged.
        let merged = |n: u64| n - n.div_ceil(max_sharing);
        c.distinct = counts.len() as u64;
        c.singletons = counts.values().filter(|&&n| n == 1).count() as u64;
        c.duplicates = c.pages - c.zero - c.distinct;
        c.merged_non_zero = counts.values().map(|&n| merged(n)).sum();
        c.merged_all = c.merged_non_zero + merged(c.zero);
        c
    }
}

impl Capture {
    /// Every page, process by process.
    pub fn pages(&self) -> impl Iterator<Item = &[u8]> {
        self.processes
            .iter()
            .flat_map(|p| p.pages.chunks_exact(PAGE))
    }

    /// A description: programs, processes, and what was left out.
    pub fn describe(&self, census: &Census) -> String {
        let mut per_program: Vec<(&str, usize, usize)> = Vec::new();
        for p in &self.processes {
            match per_program.iter_mut().find(|(n, _, _)| *n == p.program) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += p.len();
                }
                None => per_program.push((&p.program, 1, p.len())),
            }
        }
        let programs: Vec<String> = per_program
            .iter()
            .map(|(n, k, pages)| format!("{k} x {n} ({pages} pages)"))
            .collect();
        let s = &self.skipped;
        let mib = |p: u64| p as f64 * PAGE as f64 / (1 << 20) as f64;
        let loaded = match &self.loaded_from {
            Some(p) => format!(" (loaded from {})", p.display()),
            None => String::new(),
        };
        format!(
            "real memory{loaded} of {} processes ({} groups, {} MiB of text per worker): {}{}; \
             {} pages ({:.1} MiB), {} zero pages, {} distinct non-zero contents ({} of them \
             on one page only), {} non-zero duplicates; left out: {} absent pages, {} \
             unreadable pages, {} unreadable and {} special mappings, {} lost processes",
            self.processes.len(),
            self.config.groups,
            self.config.worker_mib,
            programs.join(", "),
            if self.missing.is_empty() {
                String::new()
            } else {
                format!(" (not started: {})", self.missing.join(", "))
            },
            census.pages,
            mib(census.pages),
            census.zero,
            census.distinct,
            census.singletons,
            census.duplicates,
            s.absent_pages,
            s.unreadable_pages,
            s.unreadable_mappings,
            s.special_mappings,
            s.lost_processes,
        )
    }
}

/// The processes started by [`capture`]: killed and reaped when dropped.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the processes, waits until they are idle, reads their memory, ends them.
pub fn capture(config: CaptureConfig) -> io::Result<Capture> {
    let exe = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    let mut missing: Vec<String> = Vec::new();
    for _ in 0..config.groups {
        let mut worker = Command::new(&exe);
        worker
            .env(WORKER_ENV, config.worker_mib.to_string())
            .stdin(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut sh = Command::new("sh");
        sh.stdin(Stdio::piped());
        let mut cat = Command::new("cat");
        cat.stdin(Stdio::piped());
        let mut sleep = Command::new("sleep");
        sleep.arg("3600").stdin(Stdio::null());
        for (name, mut cmd) in [
            ("worker", worker),
            ("sh", sh),
            ("cat", cat),
            ("sleep", sleep),
        ] {
            if missing.iter().any(|m| m == name) {
                continue;
            }
            match cmd
                .stdout(if name == "worker" {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .spawn()
            {
                Ok(c) => children.0.push((name.to_string(), c)),
                Err(e) if name == "worker" => return Err(e),
                Err(_) => missing.push(name.to_string()),
            }
        }
    }
    // Wait until each is idle: a worker says so when its work is done; the others are
    // idle once they run their program (not ours: the exec happened) and sleep. One that
    // does not get there (it failed, or exited) is left out and counted.
    let own_comm = fs::read_to_string("/proc/self/comm")?;
    let mut processes = Vec::new();
    let mut skipped = Skipped::default();
    for (name, child) in &mut children.0 {
        let ready = if name == "worker" {
            let mut line = String::new();
            let said = match child.stdout.take() {
                Some(out) => BufReader::new(out).read_line(&mut line).is_ok(),
                None => false,
            };
            said && line.starts_with("ready")
        } else {
            wait_idle(child.id(), &own_comm)
        };
        if !ready {
            eprintln!(
                "real memory: {name} (pid {}) did not get ready; left out",
                child.id()
            );
            skipped.lost_processes += 1;
            continue;
        }
        match read_process(child.id(), &mut skipped) {
            Ok(pages) => processes.push(Process {
                program: name.clone(),
                pages,
            }),
            Err(_) => skipped.lost_processes += 1,
        }
    }
    drop(children);
    if processes.is_empty() {
        return Err(io::Error::other("no process could be read"));
    }
    Ok(Capture {
        config,
        processes,
        missing,
        skipped,
        loaded_from: None,
    })
}

const CACHE_MAGIC: &str = "dynamic-vm real-memory 1";

/// [`capture`], or with `config.cache` the capture saved by an earlier run for the same
/// `groups` and `worker_mib` ([`CaptureConfig::cache_path`]); a fresh capture is then
/// saved there (a failure to save is reported on stderr, not fatal). Delete the file to
/// capture anew.
pub fn load_or_capture(config: CaptureConfig) -> io::Result<Capture> {
    if !config.cache {
        return capture(config);
    }
    let path = config.cache_path();
    if let Ok(c) = load(&path, config) {
        return Ok(c);
    }
    let c = capture(config)?;
    if let Err(e) = save(&c, &path) {
        eprintln!("real memory: not saved to {}: {e}", path.display());
    }
    Ok(c)
}

/// Writes `c` to `path` (a text header, then the pages), through a temporary file.
fn save(c: &Capture, path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = io::BufWriter::new(File::create(&tmp)?);
    let s = &c.skipped;
    writeln!(f, "{CACHE_MAGIC}")?;
    writeln!(f, "missing {}", c.missing.join(","))?;
    writeln!(
        f,
        "skipped {} {} {} {} {}",
        s.unreadable_mappings,
        s.special_mappings,
        s.absent_pages,
        s.unreadable_pages,
        s.lost_processes
    )?;
    for p in &c.processes {
        writeln!(f, "process {} {}", p.program, p.len())?;
    }
    writeln!(f, "end")?;
    for p in &c.processes {
        f.write_all(&p.pages)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(&tmp, path)
}

/// Reads a capture written by [`save`].
fn load(path: &Path, config: CaptureConfig) -> io::Result<Capture> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut r = BufReader::new(File::open(path)?);
    let mut line = String::new();
    let mut next = |r: &mut BufReader<File>| -> io::Result<String> {
        line.clear();
        r.read_line(&mut line)?;
        Ok(line.trim_end_matches('\n').to_string())
    };
    if next(&mut r)? != CACHE_MAGIC {
        return Err(bad("not a real-memory capture"));
    }
    let missing = next(&mut r)?;
    let missing: Vec<String> = missing
        .strip_prefix("missing ")
        .ok_or_else(|| bad("missing"))?
        .split(',')
        .filter(|m| !m.is_empty())
        .map(String::from)
        .collect();
    let skipped = next(&mut r)?;
    let n: Vec<u64> = skipped
        .strip_prefix("skipped ")
        .ok_or_else(|| bad("skipped"))?
        .split(' ')
        .map(|v| v.parse().map_err(|_| bad("skipped")))
        .collect::<io::Result<_>>()?;
    let [unreadable_mappings, special_mappings, absent_pages, unreadable_pages, lost_processes] =
        n[..]
    else {
        return Err(bad("skipped"));
    };
    let mut processes = Vec::new();
    loop {
        let l = next(&mut r)?;
        if l == "end" {
            break;
        }
        let (program, pages) = l
            .strip_prefix("process ")
            .and_then(|p| p.rsplit_once(' '))
            .ok_or_else(|| bad("process"))?;
        let pages: usize = pages.parse().map_err(|_| bad("process"))?;
        processes.push(Process {
            program: program.to_string(),
            pages: vec![0; pages * PAGE],
        });
    }
    for p in &mut processes {
        r.read_exact(&mut p.pages)?;
    }
    if r.read(&mut [0])? != 0 || processes.is_empty() {
        return Err(bad("size"));
    }
    Ok(Capture {
        config,
        processes,
        missing,
        skipped: Skipped {
            unreadable_mappings,
            special_mappings,
            absent_pages,
            unreadable_pages,
            lost_processes,
        },
        loaded_from: Some(path.to_path_buf()),
    })
}

/// Waits (up to 10 s) until process `pid` has exec'd (its `comm` is no longer ours) and
/// sleeps (state `S`); false if it did not, or exited.
fn wait_idle(pid: u32, own_comm: &str) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let (Ok(stat), Ok(comm)) = (
            fs::read_to_string(format!("/proc/{pid}/stat")),
            fs::read_to_string(format!("/proc/{pid}/comm")),
        ) else {
            return false;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("");
        match state {
            "S" if comm != own_comm => return true,
            "Z" | "X" => return false,
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    false
}

/// The present pages of process `pid`'s readable mappings, in address order.
fn read_process(pid: u32, skipped: &mut Skipped) -> io::Result<Vec<u8>> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = f.nth(3).unwrap_or("");
        let Some((start, end)) = range.split_once('-').and_then(|(s, e)| {
            Some((
                usize::from_str_radix(s, 16).ok()?,
                usize::from_str_radix(e, 16).ok()?,
            ))
        }) else {
            continue;
        };
        if matches!(name, "[vvar]" | "[vvar_vclock]" | "[vsyscall]") {
            skipped.special_mappings += 1;
            continue;
        }
        if !perms.starts_with('r') {
            skipped.unreadable_mappings += 1;
            continue;
        }
        read_mapping(&pagemap, &mem, start, end, &mut out, skipped)?;
    }
    Ok(out)
}

/// Appends the present pages of `start..end` to `out`.
fn read_mapping(
    pagemap: &File,
    mem: &File,
    start: usize,
    end: usize,
    out: &mut Vec<u8>,
    skipped: &mut Skipped,
) -> io::Result<()> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const BATCH: usize = 1 << 14;
    let mut entries = vec![0u8; BATCH * 8];
    let mut page = start;
    while page < end {
        let n = ((end - page) / PAGE).min(BATCH);
        let buf = &mut entries[..n * 8];
        pagemap.read_exact_at(buf, (page / PAGE * 8) as u64)?;
        for (k, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
            if e & (PRESENT | SWAPPED) == 0 {
                skipped.absent_pages += 1;
                continue;
            }
            let at = out.len();
            out.resize(at + PAGE, 0);
            if mem
                .read_exact_at(&mut out[at..], (page + k * PAGE) as u64)
                .is_err()
            {
                out.truncate(at);
                skipped.unreadable_pages += 1;
            }
        }
        page += n * PAGE;
    }
    Ok(())
}

/// If this process was started as a worker by [`capture`], does the worker's work, waits
/// for its stdin to close (or to be killed) and exits; otherwise returns at once. Call it
/// first thing in `main`.
pub fn worker_main() {
    let Some(mib) = std::env::var(WORKER_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return;
    };
    let state = match Worker::build(mib << 20) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("real-memory worker: {e}");
            std::process::exit(1);
        }
    };
    let mut stdout = io::stdout();
    let _ = writeln!(stdout, "ready: {}", state.summary());
    let _ = stdout.flush();
    // Idle until the capture is done: it kills us, or closes our stdin.
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
    std::process::exit(0);
}

/// What a worker holds: a small indexing service's state.
struct Worker {
    /// Its own executable, read whole.
    exe: Vec<u8>,
    /// The text files read, in walk order.
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Lower-cased word -> (file, line) of each occurrence.
    index: HashMap<String, Vec<(u32, u32)>>,
    /// The printable strings (8 bytes or more) of the executable, sorted, deduplicated.
    strings: Vec<String>,
}

impl Worker {
    /// What it holds, in a line.
    fn summary(&self) -> String {
        let text: usize = self.files.iter().map(|(_, t)| t.len()).sum();
        let occurrences: usize = self.index.values().map(Vec::len).sum();
        format!(
            "executable {} bytes, {} files ({} bytes; the first {:?}), {} words ({} \
             occurrences), {} strings",
            self.exe.len(),
            self.files.len(),
            text,
            self.files.first().map(|(p, _)| p),
            self.index.len(),
            occurrences,
            self.strings.len()
        )
    }

    fn build(budget: usize) -> io::Result<Worker> {
        let exe = fs::read(std::env::current_exe()?)?;
        let mut files = Vec::new();
        let mut read = 0;
        for root in ["/usr/share", "/usr/include", "/etc"] {
            walk(Path::new(root), &mut files, &mut read, budget);
        }
        let mut index: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        for (f, (_, text)) in files.iter().enumerate() {
            for (l, line) in text.split(|&b| b == b'\n').enumerate() {
                for word in line.split(|b| !b.is_ascii_alphanumeric()) {
                    if (3..=32).contains(&word.len()) {
                        let w = String::from_utf8_lossy(word).to_ascii_lowercase();
                        index.entry(w).or_default().push((f as u32, l as u32));
                    }
                }
            }
        }
        let mut strings: Vec<String> = exe
            .split(|b| !(b.is_ascii_graphic() || *b == b' '))
            .filter(|s| s.len() >= 8)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        strings.sort_unstable();
        strings.dedup();
        Ok(Worker {
            exe,
            files,
            index,
            strings,
        })
    }
}

/// Reads the text files (no NUL in their first KiB, at most 1 MiB) under `dir` in sorted
/// order into `files` until `read` reaches `budget` bytes. Unreadable entries are skipped.
fn walk(dir: &Path, files: &mut Vec<(PathBuf, Vec<u8>)>, read: &mut usize, budget: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if *read >= budget {
            return;
        }
        let Ok(t) = e.file_type() else { continue };
        let path = e.path();
        if t.is_dir() {
            walk(&path, files, read, budget);
        } else if t.is_file() && e.metadata().is_ok_and(|m| (1..=1 << 20).contains(&m.len())) {
            let Ok(text) = fs::read(&path) else { continue };
            if text.is_empty() || text[..text.len().min(1024)].contains(&0) {
                continue;
            }
            *read += text.len();
            files.push((path, text));
        }
    }
}
