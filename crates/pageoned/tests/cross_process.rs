//! The service deduplicates across VMM processes: pages of two processes share one
//! frame, a write in one leaves the other's page alone, a VMM killed mid-merge leaves
//! the others running and nothing held, trust domains are the service's choice.
#![cfg(target_os = "linux")]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Vmm;
use page_memory::DomainId;
use pageoned::service::{Service, ServiceConfig};

#[test]
fn vmm_child() {
    common::child_main();
}

/// A socket path in a fresh directory of this test's own.
fn socket(name: &str) -> (tempdir::Dir, PathBuf) {
    let dir = tempdir::Dir::new(name);
    let path = dir.0.join("pageoned.sock");
    (dir, path)
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "pageoned-test-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

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

fn my_domain() -> DomainId {
    DomainId(0x8000_0000 | rustix::process::geteuid().as_raw())
}

#[test]
fn identical_pages_of_two_processes_share_one_frame() {
    if !backend_here() {
        return;
    }
    let (_dir, path) = socket("share");
    let svc = service(&path);
    let mut a = Vmm::spawn("vmm_child", &path, 64, 32, 1);
    let mut b = Vmm::spawn("vmm_child", &path, 64, 32, 2);
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
fn a_vmm_killed_mid_merge_leaves_the_others_whole_and_nothing_held() {
    if !backend_here() {
        return;
    }
    let (_dir, path) = socket("kill-vmm");
    let svc = service(&path);
    let mut vmms: Vec<Vmm> = (0..3)
        .map(|k| Vmm::spawn("vmm_child", &path, 256, 192, 10 + k))
        .collect();
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
    let mut a = Vmm::spawn("vmm_child", &path, 16, 16, 1);
    let mut b = Vmm::spawn("vmm_child", &path, 16, 16, 2);
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
