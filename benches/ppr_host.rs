//! The PPR host: what one page costs the recycler on the simulated memory.
//!
//! - `ppr_host/recycle`: every page carries a valid offer; one scan pass reads each
//!   page's mark, validates it, claims the slot, recycles the page (the frame is dropped
//!   and the page maps the zero frame) and releases the slot. The 2017 figure to compare
//!   with is about 6,500 cycles per recycled page, 3,900 of them page-table work (seeds;
//!   not rerunnable here).
//! - `ppr_host/scan_unmarked`: no page is marked (all in use): the cost of looking, which
//!   is what an idle scanner pays for every page of guest RAM.
//!
//! ```text
//! cargo bench --bench ppr_host
//! ```
//! Throughput is pages per second; the time per page is its inverse.

// `criterion_group!` defines an undocumented function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageMemory};
use pip::PoolStorage;
use ppr_guest::{GuestPage, Hooks, PageAllocator};
use ppr_host::{Recycler, SimGuestPage};

const PAGES: u32 = 4096;
type Pool = PoolStorage<1, 16384>;

/// A memory of `PAGES` written pages, its pool, and a registered recycler. With `free`,
/// the guest has freed (offered) every page; otherwise it holds them all.
fn setup(free: bool) -> (Arc<SimMemory>, Recycler, Arc<Pool>) {
    let mem = Arc::new(SimMemory::new());
    let region = mem.add_region(PAGES, DomainId(0));
    let info = mem.regions()[0];
    let pool = Arc::new(Pool::new());
    let view = pool.init().expect("pool layout");
    let mut recycler = Recycler::new();
    recycler
        .register(pool.clone(), 1, 0x0dd_ba11_5eed_cafe, info, 1)
        .expect("register");
    let pages = SimGuestPage::region(&mem, region, PAGES);
    let mut alloc = PageAllocator::new(Hooks::attach(view).expect("attach"), &pages, 1);
    let mut held = Vec::new();
    while let Some((frame, page)) = alloc.alloc(0) {
        page.fill(frame);
        held.push(frame);
    }
    if free {
        for frame in held {
            alloc.free(0, frame).expect("free");
        }
    }
    (mem, recycler, pool)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ppr_host");
    g.throughput(Throughput::Elements(PAGES as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    g.bench_function("recycle", |b| {
        b.iter_batched(
            || setup(true),
            |(mem, recycler, _pool)| {
                let n = recycler.scan_pass(&*mem);
                assert_eq!(n, PAGES as u64);
                (mem, recycler)
            },
            BatchSize::PerIteration,
        )
    });
    let (mem, recycler, _pool) = setup(false);
    g.bench_function("scan_unmarked", |b| {
        b.iter(|| assert_eq!(recycler.scan_pass(&*mem), 0))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
