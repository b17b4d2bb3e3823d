//! Deduplicate the guest RAM of a rust-vmm VMM: build a vm-memory `GuestMemoryMmap` with a
//! dirty bitmap, fill it as three guests booted from one image would (two thirds of the
//! pages repeat, some are zeros), adopt it into PageONE's Linux backend through the
//! vm-memory adapter, deduplicate it, and print the memory it uses before and after.
//!
//! Needs userfaultfd write-protect (root, or see `page_memory::linux`); says so and exits
//! otherwise. Run with
//! `cargo run --release --features vm-memory --example vm_memory_dedup [-- MiB]`.

use std::sync::Arc;
use std::time::Instant;

use dynamic_vm::page_memory::linux::LinuxMemory;
use dynamic_vm::page_memory::vmm::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use dynamic_vm::page_memory::vmm::vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use dynamic_vm::page_memory::vmm::VmMemoryAdapter;
use dynamic_vm::page_memory::DomainId;
use dynamic_vm::pageone::{Config, PageOne};

const PAGE: usize = 4096;

/// `Rss` and `Pss` of the whole process (`/proc/self/smaps_rollup`), in MiB. `Rss` counts
/// a shared page once per mapping of it; `Pss` divides it among them.
fn rss_pss() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let field = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("Rss:"), field("Pss:"))
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(96);
    let memory = match LinuxMemory::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            println!("SKIPPED: PageONE's Linux backend needs userfaultfd write-protect: {e}");
            return;
        }
    };
    // Guest RAM: two regions (below and above a 1 GiB hole), as a VMM lays it out.
    let half = mib / 2 * (1 << 20);
    let guest: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), half),
        (GuestAddress(1 << 30), mib * (1 << 20) - half),
    ])
    .expect("GuestMemoryMmap");
    // Three "images" of a third each: every content three times; one page in 16 zeros.
    let pages: usize = guest.iter().map(|r| r.len() as usize / PAGE).sum();
    let third = pages.div_ceil(3);
    let mut buf = vec![0u8; PAGE];
    let mut n = 0;
    for r in guest.iter() {
        for off in (0..r.len()).step_by(PAGE) {
            let c = (n % third) as u64;
            if c % 16 == 15 {
                buf.fill(0);
            } else {
                fastrand::Rng::with_seed(c).fill(&mut buf);
            }
            guest
                .write_slice(&buf, r.start_addr().unchecked_add(off))
                .expect("write_slice");
            n += 1;
        }
    }
    let adapter = VmMemoryAdapter::new(memory);
    // SAFETY: this program does nothing else with the guest's memory than reading and
    // writing it through vm-memory.
    let vm = unsafe { adapter.adopt(&guest, DomainId(0)) }.expect("adopt the guest's regions");
    for r in guest.iter() {
        r.get_mmap().bitmap().reset(); // as after a migration round
    }
    let (rss0, pss0) = rss_pss();
    let before = adapter.memory().usage().expect("usage");
    let engine = PageOne::new(adapter.memory().clone(), Config::default())
        .expect("starting PageONE's work threads");
    let t0 = Instant::now();
    for _ in 0..3 {
        engine.merge_pass();
    }
    let took = t0.elapsed();
    let s = engine.stats();
    let (rss1, pss1) = rss_pss();
    let after = adapter.memory().usage().expect("usage");
    let dirty: usize = guest
        .iter()
        .map(|r| {
            (0..r.len() as usize)
                .step_by(PAGE)
                .filter(|&o| r.bitmap().dirty_at(o))
                .count()
        })
        .sum();
    println!(
        "{} MiB of guest RAM in {} regions ({pages} pages), deduplicated in {:.2} s",
        mib,
        vm.regions().len(),
        took.as_secs_f64()
    );
    println!(
        "  pages_shared {}, pages_sharing {}, zero pages {}; {dirty} pages marked dirty",
        s.pages_shared, s.pages_sharing, s.zero_pages
    );
    println!(
        "  guest RAM (anonymous memory + canonical store): {:.1} MiB -> {:.1} MiB",
        before.total_bytes() as f64 / 1048576.0,
        after.total_bytes() as f64 / 1048576.0
    );
    println!(
        "  process RSS {rss0:.1} MiB -> {rss1:.1} MiB (a shared page counts once per mapping)"
    );
    println!("  process PSS {pss0:.1} MiB -> {pss1:.1} MiB");
    // Contents unchanged, through vm-memory.
    let mut check = vec![0u8; PAGE];
    guest
        .read_slice(&mut check, GuestAddress(1 << 30))
        .expect("read_slice");
    let c = ((half / PAGE) % third) as u64;
    if c % 16 != 15 {
        fastrand::Rng::with_seed(c).fill(&mut buf);
        assert_eq!(check, buf, "guest memory reads what was written");
    }
    engine.unmerge_all();
    drop(engine);
    adapter.release(vm).expect("release");
}
