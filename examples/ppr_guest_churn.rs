//! The Per Page Recycler's guest side at work: two guest vCPUs allocate, write, check and
//! free pages through `ppr_guest::PageAllocator` (whose free and alloc paths call the
//! PIP hooks), while a host thread scans every page and recycles the offered ones with
//! `pip::HostPool::scan`, zeroing them in place. At the end it prints what each side saw.
//!
//! ```text
//! cargo run --release --example ppr_guest_churn
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dynamic_vm::pip::{HostPool, PoolStorage, Scan};
use dynamic_vm::ppr_guest::{GuestPage, Hooks, PageAllocator, SimPage};

const VCPUS: usize = 2;
const PAGES_PER_VCPU: usize = 256;
const FIRST_FRAME: u64 = 0x4_0000;

fn main() {
    // The guest sets up its pool: one shard per vCPU, 512 slots each.
    let pool = Box::new(PoolStorage::<VCPUS, { VCPUS * 512 }>::new());
    let view = pool.init().expect("a fresh pool");
    // The host registers it with a per-pool random secret (here: the clock's nanoseconds).
    let secret = Instant::now().elapsed().as_nanos() as u64 ^ 0x9E37_79B9_7F4A_7C15 | 1;
    let n = VCPUS * PAGES_PER_VCPU;
    let host = HostPool::register(view, 1, secret, FIRST_FRAME + n as u64).expect("registration");
    let hooks = Hooks::attach(view).expect("registered");
    let pages: Vec<SimPage> = (0..n).map(|_| SimPage::new()).collect();
    let stop = AtomicBool::new(false);

    let (guest_stats, host_counts) = thread::scope(|s| {
        let host_thread = s.spawn(|| {
            let (mut recycled, mut lost, mut invalid, mut passes) = (0u64, 0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                for (i, page) in pages.iter().enumerate() {
                    match host.scan(FIRST_FRAME + i as u64, page, || {
                        page.zero();
                        true
                    }) {
                        Scan::Recycled(_) => recycled += 1,
                        Scan::Lost => lost += 1,
                        Scan::Invalid(_) => invalid += 1,
                        Scan::NotMarked | Scan::Restored(_) => {}
                    }
                }
                passes += 1;
                thread::sleep(Duration::from_millis(1)); // the reclaim period
            }
            (recycled, lost, invalid, passes)
        });
        let guests: Vec<_> = (0..VCPUS)
            .map(|cpu| {
                let pages = &pages;
                s.spawn(move || {
                    let mine = cpu * PAGES_PER_VCPU..(cpu + 1) * PAGES_PER_VCPU;
                    let mut alloc = PageAllocator::with_free(hooks, pages, FIRST_FRAME, cpu, mine);
                    let mut corrupted = 0u64;
                    let start = Instant::now();
                    let mut seed = cpu as u64;
                    while start.elapsed() < Duration::from_millis(500) {
                        let mut held = Vec::new();
                        for _ in 0..16 {
                            if let Some((frame, page)) = alloc.alloc(cpu) {
                                seed += 1;
                                page.fill(seed);
                                held.push((frame, seed));
                            }
                        }
                        for (frame, seed) in held {
                            if !alloc.page(frame).unwrap().verify(seed) {
                                corrupted += 1;
                            }
                            alloc.free(cpu, frame).unwrap();
                        }
                    }
                    (alloc.stats(), corrupted)
                })
            })
            .collect();
        let stats: Vec<_> = guests.into_iter().map(|g| g.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        (stats, host_thread.join().unwrap())
    });

    for (cpu, (s, corrupted)) in guest_stats.iter().enumerate() {
        println!(
            "vCPU {cpu}: {} allocations ({} withdrew their offer, {} found the page recycled, {} busy), {} frees ({} offered), {corrupted} corrupted",
            s.allocs, s.cancelled, s.unmarked, s.busy, s.frees, s.offered
        );
    }
    let (recycled, lost, invalid, passes) = host_counts;
    println!("host: {passes} passes, {recycled} pages recycled, {lost} claims lost to the guest, {invalid} marks rejected");
    println!("pool counters (guest-written): {:?}", view.counters());
    assert!(
        guest_stats.iter().all(|(_, c)| *c == 0),
        "an allocated page changed"
    );
}
