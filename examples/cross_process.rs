//! Deduplication across VMM processes: one `pageoned` service against Linux KSM, on the
//! same processes.
//!
//! `--vms` VMM processes of `--mib` MiB each: where KVM works (and the guest was built),
//! real guests, each VM a process of the workspace's test VMM whose vCPU writes guest RAM
//! through KVM (`cross_process/kvm.rs` says what they run); elsewhere, or with
//! `--plain`, plain processes (this executable started again: `pageoned::demo`) with
//! anonymous guest memory and writer threads. In the plain processes a `--shared`
//! fraction of each VM's pages
//! (default 0.5) holds the same contents in every VM, page for page (VMs booted from one
//! image); the rest is each VM's own. Each VM runs `--writers` threads (default 1) that
//! write their own page without pause, reading each write back (a write lost reads
//! otherwise). Two runs, from scratch each:
//! - **pageoned**: a service in this process (`pageoned::service::Service`, one trust
//!   domain: every VM runs as this user), `--threads` work threads (default 1); each VM's
//!   agent connects over a Unix socket; merge passes back to back until every shared page
//!   is merged (or `--max-passes`). CPU is the service's threads plus every VM's agent
//!   and fault threads (`/proc/PID/task/*/schedstat`).
//! - **KSM**: each VM marks its memory `MADV_MERGEABLE`; ksmd runs with
//!   `pages_to_scan` 4096, `sleep_millisecs` 0, `smart_scan` 0, `max_page_sharing` 256
//!   until `pages_sharing` reaches the same count; CPU is ksmd's. Every knob is put back.
//!
//! Memory is measured: the sum over the VMs' processes of their `Pss` (a page shared by
//! k processes counts 1/k in each), plus each engine's own: for pageoned, what the
//! service's process (this one) grew by (its metadata and its share of the store pages
//! it maps); for KSM, its metadata in the kernel (`pages_sharing` pages less
//! `general_profit`). With `--scaling`, the pageoned run is repeated with 1 and 2 work
//! threads and the wall-clock times compared (the second run's own memory is understated:
//! its service reuses memory the first one freed in this process, so its memory is not
//! compared with KSM's).
//!
//! `CROSS_PROCESS_SMAPS=1` prints the service's largest mappings by `Pss` after each
//! pageoned run on plain processes (where its own memory goes).
//!
//! Needs root (KSM's knobs, userfaultfd with kernel faults) and no other KSM user; it
//! says what it skipped otherwise. Run with
//! `cargo run --release --example cross_process -- [--vms 4] [--mib 64] [--threads 1]
//! [--scaling] [--no-ksm] [--max-passes 200]`, and for real guests `[--rounds 4]`, for
//! plain processes `[--plain] [--shared 0.5] [--writers 1]`.

#[cfg(all(target_os = "linux", pageoned))]
fn main() {
    pageoned::demo::child_main();
    #[cfg(kvm_vmm)]
    if kvm::child_main() {
        return;
    }
    run::main();
}

#[cfg(all(target_os = "linux", pageoned, kvm_vmm))]
#[path = "cross_process/kvm.rs"]
mod kvm;

#[cfg(not(all(target_os = "linux", pageoned)))]
fn main() {
    eprintln!(
        "cross_process: this build has no pageoned (Linux only; the service crate is not \
         packaged with this one)"
    );
    std::process::exit(3);
}

#[cfg(all(target_os = "linux", pageoned))]
mod run {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use page_memory::linux::test_util::{ksm, mib};
    use pageoned::demo::{pss, thread_cpu, Dedup, Vmm};
    use pageoned::service::{Service, ServiceConfig};

    pub(crate) struct Args {
        pub(crate) vms: usize,
        pub(crate) mib: usize,
        shared: f64,
        threads: usize,
        writers: usize,
        scaling: bool,
        ksm: bool,
        pub(crate) max_passes: usize,
        /// Plain processes even where KVM works.
        plain: bool,
        /// Rounds of the real guests' checker after the measurements.
        pub(crate) rounds: u64,
    }

    fn args() -> Args {
        let mut a = Args {
            vms: 4,
            mib: 64,
            shared: 0.5,
            threads: 1,
            writers: 1,
            scaling: false,
            ksm: true,
            max_passes: 200,
            plain: false,
            rounds: 4,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut v = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            match flag.as_str() {
                "--vms" => a.vms = v().parse().expect("--vms N"),
                "--mib" => a.mib = v().parse().expect("--mib M"),
                "--shared" => a.shared = v().parse().expect("--shared F"),
                "--threads" => a.threads = v().parse().expect("--threads N"),
                "--writers" => a.writers = v().parse().expect("--writers N"),
                "--max-passes" => a.max_passes = v().parse().expect("--max-passes N"),
                "--scaling" => a.scaling = true,
                "--no-ksm" => a.ksm = false,
                "--plain" => a.plain = true,
                "--rounds" => a.rounds = v().parse().expect("--rounds N"),
                other => panic!("unknown argument {other}"),
            }
        }
        assert!(a.vms >= 2 && a.mib >= 1 && (0.0..=1.0).contains(&a.shared));
        a
    }

    /// What one run measured.
    pub(crate) struct Outcome {
        pub(crate) engine: String,
        pub(crate) merged: u64,
        pub(crate) before: u64,
        pub(crate) after: u64,
        /// Of `after`, the engine's own (the service's growth; KSM's metadata).
        pub(crate) own: u64,
        pub(crate) cpu: Duration,
        pub(crate) wall: Duration,
        pub(crate) checked: Checked,
        pub(crate) round_trips: Option<u64>,
    }

    /// What the VMs' writers and page checks saw.
    pub(crate) struct Checked {
        pub(crate) writes: u64,
        pub(crate) lost: u64,
        pub(crate) longest_write_us: u64,
        pub(crate) mismatches: u64,
    }

    /// Pages per VM, and of those the ones the same in every VM (the writers' own pages
    /// are not).
    fn layout(a: &Args) -> (usize, usize) {
        let pages = a.mib * 256;
        let shared = ((pages as f64 * a.shared) as usize).min(pages - a.writers);
        (pages, shared)
    }

    fn spawn_vms(a: &Args, dedup: &Dedup) -> Vec<Vmm> {
        let (pages, shared) = layout(a);
        (0..a.vms)
            .map(|k| {
                let cmd = std::process::Command::new(std::env::current_exe().unwrap());
                Vmm::spawn(cmd, dedup, pages, shared, 100 + k as u64)
            })
            .collect()
    }

    /// Starts `n` writer threads in each VM.
    fn start_writers(vms: &mut [Vmm], n: usize) {
        for v in vms {
            assert_eq!(v.ask(&format!("writers {n}")), "started");
        }
    }

    /// Stops the writers and checks every page.
    fn finish(vms: &mut [Vmm]) -> Checked {
        let mut c = Checked {
            writes: 0,
            lost: 0,
            longest_write_us: 0,
            mismatches: 0,
        };
        for v in vms.iter_mut() {
            let r: Vec<u64> = v
                .ask("stop-writers")
                .split(' ')
                .map(|x| x.parse().unwrap())
                .collect();
            c.writes += r[0];
            c.lost += r[1];
            c.longest_write_us = c.longest_write_us.max(r[2]);
            c.mismatches += v.mismatches();
        }
        c
    }

    fn expected(a: &Args) -> u64 {
        layout(a).1 as u64 * (a.vms as u64 - 1)
    }

    fn pageoned_run(a: &Args, threads: usize, dir: &Path) -> Outcome {
        let socket = dir.join(format!("pageoned-{threads}.sock"));
        // The service is this process: its share of the memory is what it grows by.
        let me = std::process::id();
        let own0 = pss(me);
        let engine = pageone::Config::default().work_threads(threads);
        let svc = Service::start(
            ServiceConfig::new(&socket)
                .with_engine(engine)
                .with_run_passes(false),
        )
        .expect("the service");
        let mut vms = spawn_vms(a, &Dedup::Service(socket.clone()));
        let before: u64 = vms.iter().map(|v| v.pss()).sum();
        start_writers(&mut vms, a.writers);
        // (The service's threads, and the agents' in the VMs.)
        let cpu = |vms: &[Vmm]| {
            (
                thread_cpu(me, &["pageoned", "pageone"]),
                vms.iter()
                    .map(|v| v.thread_cpu(&["pageoned-agent", "page-memory-uff"]))
                    .sum::<Duration>(),
            )
        };
        let cpu0 = cpu(&vms);
        let t0 = Instant::now();
        let domain = svc.domains()[0];
        let want = expected(a);
        for _ in 0..a.max_passes {
            let r = svc.merge_pass(domain).expect("the domain's engine");
            let st = svc.engine_stats(domain).unwrap();
            if st.pages_sharing >= want || (r.quiet() && st.pages_sharing > 0) {
                break;
            }
        }
        let wall = t0.elapsed();
        let cpu1 = cpu(&vms);
        let (service_cpu, agents_cpu) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
        let spent = service_cpu + agents_cpu;
        println!(
            "pageoned {threads}t: CPU {:.3} s in the service, {:.3} s in the agents",
            service_cpu.as_secs_f64(),
            agents_cpu.as_secs_f64()
        );
        let st = svc.engine_stats(domain).unwrap();
        let own = pss(me).saturating_sub(own0);
        if std::env::var_os("CROSS_PROCESS_SMAPS").is_some() {
            // Where the service's memory is, by mapping (largest first).
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
            let mut maps: Vec<(u64, String)> = Vec::new();
            let mut name = String::new();
            for line in smaps.lines() {
                if let Some(v) = line.strip_prefix("Pss:") {
                    let kb = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    maps.push((kb, name.clone()));
                } else if line.split_whitespace().count() >= 5 && !line.ends_with("kB") {
                    name = line.to_string();
                }
            }
            maps.sort_by_key(|m| std::cmp::Reverse(m.0));
            for (kb, name) in maps.iter().take(8) {
                eprintln!("{kb:>8} kB  {name}");
            }
        }
        let after = vms.iter().map(|v| v.pss()).sum::<u64>() + own;
        let checked = finish(&mut vms);
        let requests = svc.stats().requests;
        drop(vms);
        drop(svc);
        Outcome {
            engine: format!("pageoned {threads}t"),
            merged: st.pages_sharing,
            before,
            after,
            own,
            cpu: spent,
            wall,
            checked,
            round_trips: Some(requests),
        }
    }

    /// KSM claimed for a run: ksmd's pid, and the knobs to put back when dropped.
    pub(crate) struct KsmRun {
        pid: u32,
        _restore: ksm::Restore,
    }

    /// What ksmd did from `run` = 1 until `pages_sharing` reached the count asked for.
    pub(crate) struct KsmConverged {
        pub(crate) wall: Duration,
        pub(crate) cpu: Duration,
        pub(crate) merged: u64,
        /// Its metadata in the kernel (rmap items), which no `Pss` shows.
        pub(crate) metadata: u64,
    }

    impl KsmRun {
        /// Claims KSM (refused if another user has pages merged or it running), fast
        /// knobs: `pages_to_scan` 4096, `sleep_millisecs` 0 (the rest of
        /// `set_up_comparison`).
        pub(crate) fn claim() -> Result<KsmRun, String> {
            ksm::available()?;
            if ksm::in_use() {
                return Err(ksm::IN_USE.into());
            }
            let pid = ksm::ksmd()?;
            let restore = ksm::set_up_comparison();
            ksm::put("pages_to_scan", "4096");
            ksm::put("sleep_millisecs", "0");
            Ok(KsmRun {
                pid,
                _restore: restore,
            })
        }

        /// Runs ksmd until `pages_sharing` reaches `want` (at most 600 s).
        pub(crate) fn converge(&self, want: u64) -> KsmConverged {
            let cpu0 = thread_cpu(self.pid, &[]);
            let t0 = Instant::now();
            ksm::put("run", "1");
            while ksm::num("pages_sharing") < want && t0.elapsed() < Duration::from_secs(600) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let wall = t0.elapsed();
            let cpu = thread_cpu(self.pid, &[]) - cpu0;
            let merged = ksm::num("pages_sharing");
            // general_profit is what merging saved net of KSM's metadata.
            let metadata = match ksm::read("general_profit").trim().parse::<i64>() {
                Ok(profit) => (merged as i64 * 4096 - profit).max(0) as u64,
                Err(_) => 0,
            };
            KsmConverged {
                wall,
                cpu,
                merged,
                metadata,
            }
        }
    }

    impl KsmConverged {
        /// The run's outcome, from the VMs' memory before and after (`Pss`) and what
        /// their checks saw; unmerges everything and stops ksmd.
        pub(crate) fn outcome(self, before: u64, pss_after: u64, checked: Checked) -> Outcome {
            ksm::unmerge_and_stop(Duration::from_secs(30), Duration::from_millis(10));
            Outcome {
                engine: "KSM".into(),
                merged: self.merged,
                before,
                after: pss_after + self.metadata,
                own: self.metadata,
                cpu: self.cpu,
                wall: self.wall,
                checked,
                round_trips: None,
            }
        }
    }

    fn ksm_run(a: &Args) -> Result<Outcome, String> {
        let run = KsmRun::claim()?;
        let mut vms = spawn_vms(a, &Dedup::Ksm);
        let before: u64 = vms.iter().map(|v| v.pss()).sum();
        start_writers(&mut vms, a.writers);
        let k = run.converge(expected(a));
        let after = vms.iter().map(|v| v.pss()).sum::<u64>();
        let checked = finish(&mut vms);
        drop(vms);
        Ok(k.outcome(before, after, checked))
    }

    pub fn main() {
        let a = args();
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("cross_process: SKIPPED: needs root (KSM's knobs, kernel faults)");
            return;
        }
        if page_memory::linux::LinuxMemory::new().is_err() {
            eprintln!("cross_process: SKIPPED: no userfaultfd write-protect here");
            return;
        }
        let dir = std::env::temp_dir().join(format!("cross-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let threads: Vec<usize> = if a.scaling {
            vec![1, 2]
        } else {
            vec![a.threads]
        };
        #[cfg(kvm_vmm)]
        let kvm = if a.plain {
            Err("--plain".to_string())
        } else {
            crate::kvm::usable()
        };
        #[cfg(not(kvm_vmm))]
        let kvm: Result<(), String> = Err("this build has no kvm-vmm".into());
        let runs = match kvm {
            #[cfg(kvm_vmm)]
            Ok(()) => real_guests(&a, &threads, &dir),
            _ => {
                if let Err(why) = &kvm {
                    println!("plain processes ({why})");
                }
                plain_processes(&a, &threads, &dir)
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        report(&a, &runs);
    }

    /// The runs on real guests (KVM).
    #[cfg(kvm_vmm)]
    fn real_guests(a: &Args, threads: &[usize], dir: &Path) -> Vec<Outcome> {
        println!(
            "{} VMM processes on KVM x {} MiB of data, filled alike in every VM, then {} \
             rounds of rewrites checked by the guests; {} pages to merge",
            a.vms,
            a.mib,
            a.rounds,
            a.mib as u64 * 256 * (a.vms as u64 - 1)
        );
        let mut runs = Vec::new();
        for &t in threads {
            match crate::kvm::pageoned_run(a, t, dir) {
                Ok(o) => runs.push(o),
                Err(why) => {
                    eprintln!("cross_process: pageoned {t}t on KVM failed: {why}");
                    std::process::exit(1);
                }
            }
        }
        if a.ksm {
            match crate::kvm::ksm_run(a, dir) {
                Ok(o) => runs.push(o),
                Err(why) => println!("KSM: SKIPPED: {why}"),
            }
        }
        runs
    }

    /// The runs on plain processes.
    fn plain_processes(a: &Args, threads: &[usize], dir: &Path) -> Vec<Outcome> {
        println!(
            "{} VMM processes x {} MiB, {:.0}% of each VM's pages shared by all, {} writer \
             thread(s) per VM; {} pages to merge",
            a.vms,
            a.mib,
            a.shared * 100.0,
            a.writers,
            expected(a)
        );
        let mut runs = Vec::new();
        for &t in threads {
            runs.push(pageoned_run(a, t, dir));
        }
        if a.ksm {
            match ksm_run(a) {
                Ok(o) => runs.push(o),
                Err(why) => println!("KSM: SKIPPED: {why}"),
            }
        }
        runs
    }

    /// Prints the runs side by side; exits 1 on a lost write or a wrong page.
    fn report(a: &Args, runs: &[Outcome]) {
        println!(
            "{:<12} {:>8} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>5} {:>10} {:>6} {:>10}",
            "engine",
            "merged",
            "before MiB",
            "after MiB",
            "saved MiB",
            "own MiB",
            "CPU s",
            "wall s",
            "writes",
            "lost",
            "max wr us",
            "wrong",
            "rt/merged"
        );
        for r in runs {
            println!(
                "{:<12} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>8.1} {:>8.3} {:>8.3} {:>10} {:>5} {:>10} {:>6} {:>10}",
                r.engine,
                r.merged,
                mib(r.before),
                mib(r.after),
                mib(r.before.saturating_sub(r.after)),
                mib(r.own),
                r.cpu.as_secs_f64(),
                r.wall.as_secs_f64(),
                r.checked.writes,
                r.checked.lost,
                r.checked.longest_write_us,
                r.checked.mismatches,
                r.round_trips
                    .map(|n| format!("{:.3}", n as f64 / r.merged.max(1) as f64))
                    .unwrap_or_else(|| "-".into())
            );
        }
        if let Some(k) = runs.iter().find(|r| r.engine == "KSM") {
            for (i, r) in runs.iter().filter(|r| r.engine != "KSM").enumerate() {
                // A later service in this process reuses memory an earlier one freed
                // (allocator arenas), so only the first run's own memory is all its own.
                let saved = if i == 0 {
                    format!(
                        "{:.2}x",
                        r.before.saturating_sub(r.after) as f64
                            / k.before.saturating_sub(k.after).max(1) as f64
                    )
                } else {
                    "- (its own memory is understated after the run before)".into()
                };
                println!(
                    "{} vs KSM: memory saved {saved}, CPU {:.2}x, merged pages per CPU-second {:.2}x",
                    r.engine,
                    r.cpu.as_secs_f64() / k.cpu.as_secs_f64().max(1e-9),
                    (r.merged as f64 / r.cpu.as_secs_f64().max(1e-9))
                        / (k.merged as f64 / k.cpu.as_secs_f64().max(1e-9))
                );
            }
        }
        if a.scaling && runs.len() >= 2 {
            println!(
                "2 work threads: {:.2}x the wall-clock speed of 1",
                runs[0].wall.as_secs_f64() / runs[1].wall.as_secs_f64().max(1e-9)
            );
        }
        let bad: u64 = runs
            .iter()
            .map(|r| r.checked.lost + r.checked.mismatches)
            .sum();
        if bad > 0 {
            eprintln!("cross_process: {bad} lost writes or wrong pages");
            std::process::exit(1);
        }
    }
}
