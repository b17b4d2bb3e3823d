//! The Per Page Recycler across processes: a guest (the demo VMM's allocator) frees pages
//! into a PIP pool in its VMM's RAM, the service's passes offer them to the VMM's agent,
//! which proves and recycles exactly those; a hostile pool recycles nothing and breaks
//! nothing; a VMM without a pool is never asked.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use page_memory::DomainId;
use pageoned::agent::{Agent, AgentConfig, PoolError};
use pageoned::demo::{Dedup, Vmm};
use pageoned::service::{Service, ServiceConfig};
use pip::PoolStorage;

#[test]
fn vmm_child() {
    pageoned::demo::child_main();
}

/// A VMM process (this test binary again, running `vmm_child`) deduplicated by the
/// service at `socket`.
fn vmm(socket: &Path, pages: usize, seed: u64) -> Vmm {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["vmm_child", "--exact", "--nocapture", "--test-threads=1"]);
    Vmm::spawn(cmd, &Dedup::Service(socket.to_path_buf()), pages, 0, seed)
}

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::Dir;

/// A service with the recycler (passes by hand) on a fresh socket, where the backend can
/// run.
fn start(name: &str) -> Option<(Dir, PathBuf, Service)> {
    page_memory::linux::test_util::memory()?;
    let dir = Dir::new(name);
    let path = dir.0.join("pageoned.sock");
    let engine = pageone::Config::default()
        .stable_periods(1)
        .merge_period(Duration::from_millis(20));
    let svc = Service::start(
        ServiceConfig::new(&path)
            .with_engine(engine)
            .with_run_passes(false)
            .with_recycle(true),
    )
    .unwrap();
    Some((dir, path, svc))
}

fn my_domain() -> DomainId {
    DomainId(0x8000_0000 | rustix::process::geteuid().as_raw())
}

/// The agent's recycler as the demo VMM reports it.
#[derive(Debug, PartialEq, Eq)]
struct Ppr {
    recycled: u64,
    marks_seen: u64,
    invalid: u64,
    reclaim_requests: u64,
    reclaimed: u64,
}

fn ppr(v: &mut Vmm) -> Ppr {
    let a = v.ask("ppr");
    let n: Vec<u64> = a.split(' ').map(|x| x.parse().unwrap()).collect();
    Ppr {
        recycled: n[0],
        marks_seen: n[1],
        invalid: n[2],
        reclaim_requests: n[3],
        reclaimed: n[4],
    }
}

fn zeros(v: &mut Vmm) -> usize {
    v.ask("zeros").parse().unwrap()
}

/// Merge passes until `done` (at most 30); whether it was.
fn passes_until(svc: &Service, mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..30 {
        svc.merge_pass(my_domain());
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn pages_the_guest_freed_are_recycled_and_no_other() {
    let Some((_dir, path, svc)) = start("freed") else {
        return;
    };
    let d = my_domain();
    let mut a = vmm(&path, 64, 1);
    let mut b = vmm(&path, 32, 2);
    assert_eq!(a.ask("pool 2 ok"), "pool ok");
    // Nothing freed yet: passes recycle nothing (every page is in use).
    for _ in 0..4 {
        svc.merge_pass(d);
    }
    let before = ppr(&mut a);
    assert_eq!(before.recycled, 0, "{before:?}");
    assert!(before.reclaim_requests > 0, "the pooled VMM is asked");
    assert_eq!(a.mismatches(), 0);
    // The guest frees ten pages.
    let freed = [5usize, 6, 7, 20, 21, 40, 50, 60, 61, 63];
    for i in freed {
        assert_eq!(a.ask(&format!("free {i}")), "Some(Ok(()))");
    }
    assert!(
        passes_until(&svc, || zeros(&mut a) == freed.len()),
        "{:?}",
        ppr(&mut a)
    );
    // Exactly those: every page in use keeps its contents; the counts agree.
    assert_eq!(a.mismatches(), 0);
    let p = ppr(&mut a);
    eprintln!("{p:?}; {:?}", svc.stats());
    assert_eq!(p.recycled, freed.len() as u64, "{p:?}");
    assert_eq!(p.reclaimed, freed.len() as u64, "{p:?}");
    assert_eq!(p.invalid, 0, "{p:?}");
    assert!(p.marks_seen >= freed.len() as u64, "{p:?}");
    let st = svc.engine_stats(d).unwrap();
    assert_eq!(st.recycled, freed.len() as u64, "{st:?}");
    // A few more passes change nothing.
    for _ in 0..3 {
        svc.merge_pass(d);
    }
    assert_eq!(ppr(&mut a).recycled, freed.len() as u64);
    assert_eq!(a.mismatches(), 0);
    // The guest takes a recycled page back: it reads zeros and is the guest's again.
    let got = a.ask("alloc");
    let (i, z) = got.split_once(' ').unwrap();
    assert!(freed.contains(&i.parse().unwrap()), "{got}");
    assert_eq!(z, "1", "a recycled page reads zeros");
    for _ in 0..3 {
        svc.merge_pass(d);
    }
    assert_eq!(a.mismatches(), 0);
    // The VMM without a pool was never asked, and lost nothing.
    assert_eq!(
        ppr(&mut b),
        Ppr {
            recycled: 0,
            marks_seen: 0,
            invalid: 0,
            reclaim_requests: 0,
            reclaimed: 0
        }
    );
    assert_eq!(b.mismatches(), 0);
    let s = svc.stats();
    assert_eq!(s.protocol_errors, 0, "{s:?}");
    assert_eq!(s.vmms, 2, "{s:?}");
}

#[test]
fn a_hostile_pool_recycles_nothing_and_breaks_nothing() {
    let Some((_dir, path, svc)) = start("hostile") else {
        return;
    };
    let d = my_domain();
    // A header that is no pool: refused at registration; the VMM is never asked.
    let mut garbage = vmm(&path, 32, 3);
    assert!(garbage.ask("pool 2 garbage").starts_with("err"));
    // Slots that name other frames, and a header scribbled over after registration.
    let mut slots = vmm(&path, 32, 4);
    let mut header = vmm(&path, 32, 5);
    for v in [&mut slots, &mut header] {
        assert_eq!(v.ask("pool 2 ok"), "pool ok");
        for i in 4..12 {
            assert_eq!(v.ask(&format!("free {i}")), "Some(Ok(()))");
        }
    }
    assert_eq!(slots.ask("tamper slots"), "tampered");
    assert_eq!(header.ask("tamper header"), "tampered");
    // Until every marked page was offered to its agent and rejected.
    let rejected = passes_until(&svc, || {
        ppr(&mut slots).invalid >= 8 && ppr(&mut header).invalid >= 8
    });
    assert!(rejected, "{:?} {:?}", ppr(&mut slots), ppr(&mut header));
    for _ in 0..3 {
        svc.merge_pass(d);
    }
    for v in [&mut slots, &mut header] {
        let p = ppr(v);
        eprintln!("{p:?}");
        assert_eq!(p.recycled, 0, "{p:?}");
        assert_eq!(p.reclaimed, 0, "{p:?}");
        assert!(p.reclaim_requests > 0, "{p:?}");
        assert_eq!(zeros(v), 0);
        assert_eq!(v.mismatches(), 0);
    }
    let g = ppr(&mut garbage);
    assert_eq!(g.reclaim_requests, 0, "{g:?}");
    assert_eq!(garbage.mismatches(), 0);
    // Everyone is still connected and well: no agent or service fell over.
    let s = svc.stats();
    assert_eq!(s.protocol_errors, 0, "{s:?}");
    assert_eq!(s.vmms, 3, "{s:?}");
    assert_eq!(svc.engine_stats(d).unwrap().recycled, 0);
    for v in [&mut garbage, &mut slots, &mut header] {
        let stats = v.ask("stats");
        assert!(stats.ends_with(" 1"), "connected: {stats}");
    }
}

/// A pool the agent holds is let go of when its region is removed, whether the region was
/// adopted (connected) or its pool was still waiting for the connection.
#[test]
fn removing_a_region_drops_its_pool() {
    let Some((_dir, path, _svc)) = start("remove") else {
        return;
    };
    // A fresh private anonymous mapping, unmapped by `unmap` after the region was removed.
    let map = page_memory::linux::test_util::embedder_mmap;
    let unmap = |p: *mut u8, len: usize| {
        // SAFETY: our own mapping, its region removed from the agent.
        assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
    };
    let len = 8 * 4096;
    let pool = || {
        let p = Arc::new(PoolStorage::<1, 16>::new());
        p.init().unwrap();
        p
    };

    // No service yet: the pool waits for the region's adoption.
    let nowhere = Dir::new("nowhere");
    let agent = Agent::start(
        AgentConfig::new(nowhere.0.join("none.sock")).with_retry(Duration::from_millis(20)),
    )
    .unwrap();
    let ram = map(len);
    // SAFETY: our own private anonymous mapping, kept until the region is removed.
    let region = unsafe { agent.add_region(ram, len) }.unwrap();
    let p = pool();
    agent
        .register_pool(region, p.clone(), 1, 0x1234_5678_9abc_def1, 0x10)
        .unwrap();
    assert_eq!(
        agent.register_pool(region, pool(), 2, 0x1234_5678_9abc_def1, 0x10),
        Err(PoolError::Register(
            ppr_host::RegisterPoolError::RegionTaken
        ))
    );
    assert_eq!(Arc::strong_count(&p), 2);
    agent.remove_region(region).unwrap();
    assert_eq!(Arc::strong_count(&p), 1);
    assert_eq!(
        agent.register_pool(region, p.clone(), 1, 0x1234_5678_9abc_def1, 0x10),
        Err(PoolError::NoSuchRegion)
    );
    drop(agent);
    unmap(ram, len);

    // Connected: registered with the recycler at once, dropped with the region.
    let agent = Agent::start(
        AgentConfig::new(&path)
            .with_retry(Duration::from_millis(20))
            .with_linux(
                page_memory::linux::LinuxConfig::default().with_require_kernel_faults(false),
            ),
    )
    .unwrap();
    let ram = map(len);
    // SAFETY: as above.
    let region = unsafe { agent.add_region(ram, len) }.unwrap();
    assert!(agent.wait_registered(Duration::from_secs(10)));
    let p = pool();
    agent
        .register_pool(region, p.clone(), 1, 0x1234_5678_9abc_def1, 0x10)
        .unwrap();
    assert_eq!(p.view().unwrap().header().state(), pip::STATE_REGISTERED);
    assert_eq!(Arc::strong_count(&p), 2);
    agent.remove_region(region).unwrap();
    assert_eq!(Arc::strong_count(&p), 1);
    drop(agent);
    unmap(ram, len);
}

/// A connection that speaks the wire protocol by hand (a broken or hostile agent).
#[path = "common/raw.rs"]
mod raw;

/// An "agent" that says its region has a pool, then answers the service's reclaim
/// requests with too many results, with the wrong kind of reply, and with errors: the
/// service believes none of it (nothing counted recycled), asks about no region the agent
/// did not register, and goes on.
#[test]
fn wrong_answers_to_reclaim_are_not_believed() {
    use pageoned::wire::{ErrorCode, Msg, Op, ReplyBody};
    let Some((_dir, path, svc)) = start("liar") else {
        return;
    };
    let d = my_domain();
    let fd = raw::hello(&path, "liar");
    // Real memory of this process (the service reads it), never touched by anyone else.
    let ram = raw::register_own_memory(&fd);
    // Region 99 was never registered: named, but never asked about.
    raw::send(
        &fd,
        &Msg::Pools {
            id: 2,
            regions: vec![1, 99],
        },
    );
    assert!(matches!(
        raw::recv(&fd),
        Some(Ok(Msg::Registered {
            id: 2,
            result: Ok(())
        }))
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = stop.clone();
    let liar = std::thread::spawn(move || {
        let mut reclaims = 0;
        let mut asked = Vec::new();
        let mut buf = Vec::new();
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let got = pageoned::socket::recv(&fd, &mut buf, Some(Duration::from_millis(20)));
            match got {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => continue,
            }
            let Ok(Msg::Request { id, op }) = pageoned::wire::decode(&buf) else {
                panic!("not a request");
            };
            let body = match op {
                Op::Reclaim(pages) => {
                    reclaims += 1;
                    asked.extend(pages.iter().map(|p| p.region));
                    let n = pages.len();
                    match reclaims {
                        1 => ReplyBody::Reclaimed(vec![Ok(true); n + 1]),
                        2 => ReplyBody::Done(vec![Ok(()); n]),
                        _ => ReplyBody::Reclaimed(vec![Err(ErrorCode::Busy); n]),
                    }
                }
                Op::Protect(p) => ReplyBody::Tokens(vec![Err(ErrorCode::Busy); p.len()]),
                Op::Unprotect(p) | Op::Recycle(p) => ReplyBody::Done(vec![Ok(()); p.len()]),
                Op::CanonicalizeAt(v) => ReplyBody::Frames(vec![Err(ErrorCode::Busy); v.len()]),
                Op::MergeAt(v) => ReplyBody::Outcomes(vec![Err(ErrorCode::Busy); v.len()]),
                Op::Unmerge(_) => ReplyBody::Done(vec![Ok(())]),
            };
            raw::send(&fd, &Msg::Reply { id, body });
        }
        (reclaims, asked, fd)
    });
    for _ in 0..4 {
        svc.merge_pass(d);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reclaims, asked, _fd) = liar.join().unwrap();
    assert!(reclaims >= 3, "{reclaims} reclaim requests");
    assert!(
        !asked.is_empty() && asked.iter().all(|&r| r == 1),
        "{asked:?}"
    );
    assert_eq!(svc.engine_stats(d).unwrap().recycled, 0);
    let s = svc.stats();
    assert_eq!(s.protocol_errors, 0, "{s:?}");
    assert_eq!(s.vmms, 1, "{s:?}");
    drop(ram);
}
