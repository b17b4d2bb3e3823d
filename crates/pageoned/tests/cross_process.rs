//! The service deduplicates across VMM processes: pages of two processes share one
//! frame, a write in one leaves the other's page alone, a VMM killed mid-merge leaves
//! the others running and nothing held, trust domains are the service's choice.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use page_memory::DomainId;
use pageoned::demo::{Dedup, Vmm};
use pageoned::service::{Service, ServiceConfig};

#[test]
fn vmm_child() {
    pageoned::demo::child_main();
}

/// A VMM process (this test binary again, running `vmm_child`) deduplicated by the
/// service at `socket`.
fn vmm(socket: &Path, pages: usize, shared: usize, seed: u64) -> Vmm {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["vmm_child", "--exact", "--nocapture", "--test-threads=1"]);
    Vmm::spawn(
        cmd,
        &Dedup::Service(socket.to_path_buf()),
        pages,
        shared,
        seed,
    )
}

/// A socket path in a fresh directory of this test's own.
fn socket(name: &str) -> (tempdir::Dir, PathBuf) {
    let dir = tempdir::Dir::new(name);
    let path = dir.0.join("pageoned.sock");
    (dir, path)
}

#[path = "common/tempdir.rs"]
mod tempdir;

/// Whether the backend can run here (userfaultfd write-protect); says why not.
fn backend_here() -> bool {
    page_memory::linux::test_util::memory().is_some()
}

fn service(path: &std::path::Path) -> Service {
    let engine = pageone::Config::default()
        .stable_periods(1)
        .merge_period(Duration::from_millis(20));
    Service::start(
        ServiceConfig::new(path)
            .with_engine(engine)
            .with_run_passes(false),
    )
    .unwrap()
}

/// A service (passes by hand) on a fresh socket, where the backend can run.
fn start(name: &str) -> Option<(tempdir::Dir, PathBuf, Service)> {
    if !backend_here() {
        return None;
    }
    let (dir, path) = socket(name);
    let svc = service(&path);
    Some((dir, path, svc))
}

fn my_domain() -> DomainId {
    DomainId(0x8000_0000 | rustix::process::geteuid().as_raw())
}

#[test]
fn identical_pages_of_two_processes_share_one_frame() {
    let Some((_dir, path, svc)) = start("share") else {
        return;
    };
    let mut a = vmm(&path, 64, 32, 1);
    let mut b = vmm(&path, 64, 32, 2);
    let d = my_domain();
    let passes = svc.merge_until_quiet(d, 40);
    let st = svc.engine_stats(d).unwrap();
    eprintln!("{passes} passes: {st:?}; {:?}", svc.stats());
    // 32 contents shared by 2 pages each.
    assert_eq!(st.pages_shared, 32, "{st:?}");
    assert_eq!(st.pages_sharing, 32, "{st:?}");
    for i in 0..32 {
        let (x, y) = (a.store_offset(i), b.store_offset(i));
        assert!(x.is_some() && x == y, "page {i}: {x:?} {y:?}");
    }
    for i in 32..64 {
        assert_ne!(
            a.store_offset(i)
                .zip(b.store_offset(i))
                .map(|(x, y)| x == y),
            Some(true)
        );
    }
    assert_eq!(a.mismatches(), 0);
    assert_eq!(b.mismatches(), 0);
    // A write after the merge in one process does not change the other's page.
    assert_eq!(a.ask("write 3 77"), "done");
    assert_eq!(a.mismatches(), 0);
    assert_eq!(b.mismatches(), 0);
    assert_eq!(a.store_offset(3), None);
    assert!(b.store_offset(3).is_some());
    let s = svc.stats();
    assert!(s.requests > 0 && s.protocol_errors == 0, "{s:?}");
}

#[test]
fn memory_hot_plugged_into_running_vmms_is_merged_without_a_restart() {
    let Some((_dir, path, svc)) = start("hotplug") else {
        return;
    };
    let mut a = vmm(&path, 16, 0, 1);
    let mut b = vmm(&path, 16, 0, 2);
    let d = my_domain();
    svc.merge_until_quiet(d, 40);
    assert_eq!(svc.engine_stats(d).unwrap().pages_sharing, 0);
    // Both VMMs get 32 more pages, 24 of them the same in both.
    assert_eq!(a.ask("hotplug 32 24 7"), "added 1");
    assert_eq!(b.ask("hotplug 32 24 8"), "added 1");
    svc.merge_until_quiet(d, 40);
    let st = svc.engine_stats(d).unwrap();
    assert_eq!(st.pages_sharing, 24, "{st:?}");
    for i in 0..24 {
        let (x, y) = (a.ask(&format!("hot 0 {i}")), b.ask(&format!("hot 0 {i}")));
        assert!(x.starts_with("0 store ") && x == y, "page {i}: {x} / {y}");
    }
    assert!(a.ask("hot 0 30").starts_with("0 "));
    assert_eq!(a.mismatches() + b.mismatches(), 0);
}

#[test]
fn a_vmm_killed_mid_merge_leaves_the_others_whole_and_nothing_held() {
    let Some((_dir, path, svc)) = start("kill-vmm") else {
        return;
    };
    let mut vmms: Vec<Vmm> = (0..3).map(|k| vmm(&path, 256, 192, 10 + k)).collect();
    let d = my_domain();
    // A few passes, then the kill while passes keep running on another thread.
    for _ in 0..3 {
        svc.merge_pass(d);
    }
    let victim = vmms.remove(0);
    let mut victim = victim;
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..6 {
                svc.merge_pass(d);
            }
        });
        std::thread::sleep(Duration::from_millis(5));
        victim.kill();
    });
    // The service notices (end of stream) and drops the VMM's regions.
    let t0 = std::time::Instant::now();
    while svc.vmms().len() != 2 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(svc.vmms().len(), 2);
    svc.merge_until_quiet(d, 40);
    for v in &mut vmms {
        assert_eq!(v.mismatches(), 0);
    }
    let st = svc.engine_stats(d).unwrap();
    assert_eq!(st.pages_shared, 192, "{st:?}");
    assert_eq!(st.pages_sharing, 192, "{st:?}");
    // The killed VMM's holds were let go once its process was gone.
    let t0 = std::time::Instant::now();
    while svc.stats().reaped == 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(svc.stats().reaped, 1);
    assert_eq!(svc.vmms().len(), 2);
    // What the store holds is what the survivors map: one slot per shared content.
    let store = svc.store_stats(d).unwrap();
    assert_eq!(store.live, 192, "{store:?}");
    drop(vmms);
    drop(victim);
}

#[test]
fn the_service_decides_the_trust_domain() {
    if !backend_here() {
        return;
    }
    let (_dir, path) = socket("domains");
    let me = rustix::process::geteuid().as_raw();
    let engine = pageone::Config::default().stable_periods(1);
    let svc = Service::start(
        ServiceConfig::new(&path)
            .with_engine(engine)
            .with_run_passes(false)
            .with_domain(me, DomainId(7)),
    )
    .unwrap();
    let mut a = vmm(&path, 16, 16, 1);
    let mut b = vmm(&path, 16, 16, 2);
    assert_eq!(svc.domains(), vec![DomainId(7)]);
    svc.merge_until_quiet(DomainId(7), 40);
    assert_eq!(svc.engine_stats(DomainId(7)).unwrap().pages_sharing, 16);
    assert_eq!(a.mismatches() + b.mismatches(), 0);
    drop((a, b));
    drop(svc);

    // A service that serves only another user refuses this one.
    let (_dir2, path2) = socket("domains-refused");
    let svc = Service::start(
        ServiceConfig::new(&path2)
            .with_run_passes(false)
            .with_domain(me.wrapping_add(1), DomainId(1))
            .with_only_listed(true),
    )
    .unwrap();
    let fd = pageoned::socket::connect(&path2).unwrap();
    let mut buf = Vec::new();
    let got = pageoned::socket::recv(&fd, &mut buf, Some(Duration::from_secs(5))).unwrap();
    assert!(got.is_some());
    assert!(matches!(
        pageoned::wire::decode(&buf),
        Ok(pageoned::wire::Msg::Error {
            code: pageoned::wire::ErrorCode::Denied,
            ..
        })
    ));
    assert!(svc.domains().is_empty());
    assert_eq!(svc.stats().refused, 1);
}

/// A connection that speaks the wire protocol by hand (a broken or hostile agent).
#[path = "common/raw.rs"]
mod raw;

/// The `pageoned` binary, listening on `path` (passes every 20 ms).
fn service_process(path: &std::path::Path) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pageoned"))
        .args([
            "--period-ms",
            "20",
            "--stable-periods",
            "1",
            "--stats-s",
            "3600",
        ])
        .arg("--socket")
        .arg(path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !path.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Waits (at most 20 s) until `f` holds.
fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Merges the agent's memory made so far.
fn merges(v: &mut Vmm) -> u64 {
    v.ask("stats").split(' ').nth(2).unwrap().parse().unwrap()
}

#[test]
fn the_service_killed_mid_merge_loses_no_write_and_comes_back() {
    if !backend_here() {
        return;
    }
    let (_dir, path) = socket("kill-service");
    let mut svc = service_process(&path);
    let mut a = vmm(&path, 64, 32, 1);
    let mut b = vmm(&path, 64, 32, 2);
    assert!(wait_until(|| {
        let (x, y) = (a.store_offset(0), b.store_offset(0));
        x.is_some() && x == y
    }));
    assert_eq!(a.ask("writers 2"), "started");
    assert_eq!(b.ask("writers 2"), "started");
    std::thread::sleep(Duration::from_millis(100));
    // kill -9 while it merges (passes every 20 ms), with the guests writing.
    svc.kill().unwrap();
    svc.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The guests ran on: merged pages are still there, readable and right.
    assert_eq!(a.mismatches() + b.mismatches(), 0);
    let before = merges(&mut a) + merges(&mut b);
    // A new service: the agents reconnect and merging resumes (one of the two makes
    // the pages canonical in the new store, the other's merge with them).
    let mut svc = service_process(&path);
    assert!(
        wait_until(|| merges(&mut a) + merges(&mut b) > before),
        "{} / {}",
        a.ask("stats"),
        b.ask("stats")
    );
    for v in [&mut a, &mut b] {
        let s = v.ask("stop-writers");
        let n: Vec<u64> = s.split(' ').map(|x| x.parse().unwrap()).collect();
        eprintln!("writes {}, lost {}, longest write {} us", n[0], n[1], n[2]);
        assert!(n[0] > 0);
        assert_eq!(n[1], 0, "lost writes");
        // Nothing waited for the dead service: the longest write is a fault, not a hang.
        assert!(n[2] < 2_000_000, "a write waited {} us", n[2]);
        let stats: Vec<u64> = v
            .ask("stats")
            .split(' ')
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(stats[0] >= 2, "reconnected: {stats:?}");
    }
    assert_eq!(a.mismatches() + b.mismatches(), 0);
    let _ = svc.kill();
    let _ = svc.wait();
}

#[test]
fn malformed_messages_get_an_error_and_a_disconnect() {
    if !backend_here() {
        return;
    }
    use pageoned::socket as s;
    use pageoned::wire::{self, ErrorCode, Msg};
    let (_dir, path) = socket("hostile");
    let svc = service(&path);
    let expect_error_then_eof = |fd: &std::os::fd::OwnedFd| {
        let got = raw::recv(fd);
        assert!(
            matches!(
                got,
                Some(Ok(Msg::Error {
                    code: ErrorCode::Protocol,
                    ..
                }))
            ),
            "{got:?}"
        );
        assert!(raw::recv(fd).is_none());
    };
    // Garbage instead of a hello.
    let fd = s::connect(&path).unwrap();
    s::send(&fd, b"not a frame at all", &[]).unwrap();
    expect_error_then_eof(&fd);
    // A hello, then a frame with a trailing byte.
    let fd = raw::hello(&path, "x");
    let mut frame = Vec::new();
    let mappings = Msg::Mappings {
        in_use: 1,
        limit: 2,
    };
    wire::encode(&mappings, &mut frame).unwrap();
    frame.push(0);
    s::send(&fd, &frame, &[]).unwrap();
    expect_error_then_eof(&fd);
    // A reply to a request never made; a message only a service sends.
    for msg in [
        Msg::Reply {
            id: 99,
            body: wire::ReplyBody::Done(vec![]),
        },
        Msg::Welcome {
            domain: 0,
            store_slots: 1,
        },
    ] {
        let fd = raw::hello(&path, "x");
        raw::send(&fd, &msg);
        expect_error_then_eof(&fd);
    }
    // Regions that are not are refused, not taken: a region named twice; a range this
    // process does not map (memory it does not have costs it nothing, so the service
    // checks /proc/PID/maps before it spends anything on it).
    let fd = raw::hello(&path, "x");
    let decl = |region, addr, pages| wire::RegionDecl {
        region,
        addr,
        pages,
    };
    for (id, regions) in [
        (1, vec![decl(1, 0x1000_0000, 4), decl(1, 0x1000_0000, 4)]),
        (2, vec![decl(5, 0x7ff0_0000_0000, 1 << 20)]),
    ] {
        raw::send(&fd, &Msg::Register { id, regions });
        assert!(matches!(
            raw::recv(&fd),
            Some(Ok(Msg::Registered { result: Err(_), .. }))
        ));
    }
    // Holds on slots never handed out are counted and skipped.
    raw::send(
        &fd,
        &Msg::Holds {
            events: vec![wire::HoldEvent {
                slot: 12345,
                kind: wire::HoldKind::Slot,
                acquire: true,
            }],
        },
    );
    assert!(wait_until(|| svc.stats().refused_holds == 1));
    drop(fd);
    let st = svc.stats();
    assert_eq!(st.protocol_errors, 4, "{st:?}");
    // The service still serves a VMM.
    let mut v = vmm(&path, 8, 8, 3);
    assert_eq!(v.mismatches(), 0);
    // (The hostile connection dropped above goes away on its own time.)
    assert!(wait_until(|| svc.vmms().len() == 1));
}

#[test]
fn an_agent_that_stops_answering_is_cut_off_and_the_passes_go_on() {
    if !backend_here() {
        return;
    }
    use pageoned::wire::Msg;
    let (_dir, path) = socket("mute");
    let engine = pageone::Config::default().stable_periods(1);
    let svc = Service::start(
        ServiceConfig::new(&path)
            .with_engine(engine)
            .with_run_passes(false)
            .with_request_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    // An "agent" that registers real memory of this process, then never answers.
    let fd = raw::hello(&path, "mute");
    let ram = raw::register_own_memory(&fd);
    let d = my_domain();
    let t0 = std::time::Instant::now();
    for _ in 0..4 {
        svc.merge_pass(d);
    }
    // The first request waited the timeout, then the session was cut off: the passes
    // went on without it.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(wait_until(|| svc.vmms().is_empty()));
    let mut requests = 0;
    while let Some(m) = raw::recv(&fd) {
        if matches!(m, Ok(Msg::Request { .. })) {
            requests += 1;
        }
    }
    assert!(requests >= 1, "the service asked something");
    drop(ram);
}
