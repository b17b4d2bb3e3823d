//! A VMM's live-migration dirty bitmap stays exact under the service: every guest page the
//! agent changes on the service's behalf (made canonical, merged) is marked in the VMM's
//! vm-memory bitmap through the agent's dirty hook, and no other page is. The VMM here is
//! this test process itself (a `GuestMemoryMmap` with an `AtomicBitmap`, both regions
//! handed to an agent), with the service in threads of its own: the service reads the
//! guest through `process_vm_readv` of its own process, as it would another's.
#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use page_memory::linux::test_util::{clear_bitmaps, content, dirty, gpa, guest, read};
use page_memory::vmm::vm_memory::bitmap::Bitmap;
use page_memory::vmm::vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use page_memory::{PageId, RegionId, PAGE_SIZE};
use pageoned::agent::{Agent, AgentConfig};
use pageoned::service::{Service, ServiceConfig};

const PAGES: u64 = 128;

/// Page `i` of region `r`: in each region pages 0..32 hold 8 contents 4 times each (the
/// same in both regions, so they merge across them too), the rest their own.
fn seed(r: usize, i: u64) -> u64 {
    if i < 32 {
        1 + i % 8
    } else {
        1000 * (r as u64 + 1) + i
    }
}

#[test]
fn pages_the_agent_changes_are_marked_in_the_vmms_dirty_bitmap() {
    if page_memory::linux::test_util::memory().is_none() {
        return; // said why
    }
    let dir = std::env::temp_dir().join(format!("pageoned-dirty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("pageoned.sock");
    let engine = pageone::Config::default().stable_periods(1);
    let svc = Service::start(
        ServiceConfig::new(&socket)
            .with_engine(engine)
            .with_run_passes(false),
    )
    .unwrap();

    let g = guest(PAGES);
    for r in 0..2 {
        for i in 0..PAGES {
            g.write_slice(&content(seed(r, i)), gpa(r, i)).unwrap();
        }
    }
    // The VMM's own writes are in the bitmap; a migration round copied them.
    assert_eq!(dirty(&g).len(), 2 * PAGES as usize);
    clear_bitmaps(&g);

    let agent = Agent::start(AgentConfig::new(&socket).with_name("dirty")).unwrap();
    let mut regions = Vec::new();
    let mut ids: Vec<RegionId> = Vec::new();
    for ram in g.iter() {
        let mapping = ram.get_mmap();
        // SAFETY: the guest's RAM, private anonymous memory of this process that stays
        // mapped (held by `g`) until after its region is taken back; nothing else
        // remaps or registers it.
        let region = unsafe { agent.add_region(mapping.as_ptr(), mapping.size()) }.unwrap();
        regions.push(region);
    }
    assert!(
        agent.wait_registered(Duration::from_secs(20)),
        "{:?}",
        agent.last_error()
    );
    // The agent's numbers for the regions (given once they are adopted).
    for &region in &regions {
        ids.push(agent.page_id(region, 0).unwrap().region);
    }
    // The hook marks the guest's bitmap at the page's guest address, and records what it
    // was told.
    let told = Arc::new(Mutex::new(BTreeSet::new()));
    let (g2, log) = (g.clone(), told.clone());
    agent.set_dirty_hook(Some(Arc::new(move |page: PageId| {
        let r = ids
            .iter()
            .position(|&id| id == page.region)
            .expect("a guest region");
        let addr = gpa(r, page.index as u64);
        let ram = g2.iter().nth(r).unwrap();
        let offset = (addr.0 - ram.start_addr().0) as usize;
        ram.bitmap().mark_dirty(offset, PAGE_SIZE);
        log.lock().unwrap().insert(addr.0);
    })));

    let domain = svc.domains()[0];
    let t0 = Instant::now();
    // 64 pages of 8 contents: 56 sharing.
    while svc.engine_stats(domain).unwrap().pages_sharing < 56 {
        svc.merge_pass(domain).unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            svc.engine_stats(domain)
        );
    }
    // Exactly the pages with twins changed (made canonical: remapped to the store, or
    // merged); the unique pages stayed where they were.
    let want: BTreeSet<u64> = (0..2)
        .flat_map(|r| (0..32).map(move |i| gpa(r, i).0))
        .collect();
    assert_eq!(dirty(&g), want);
    assert_eq!(*told.lock().unwrap(), want);
    // And the guest reads every page as written.
    for r in 0..2 {
        for i in 0..PAGES {
            assert_eq!(read(&g, gpa(r, i)), content(seed(r, i)), "page {i} of {r}");
        }
    }
    for region in regions {
        agent.remove_region(region).unwrap();
    }
    drop(agent);
    drop(svc);
    let _ = std::fs::remove_dir_all(&dir);
}
