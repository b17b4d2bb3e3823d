//! The timing channel a merged or protected page opens (see *Side channels* in the Linux
//! backend's module docs): how long a guest's first write takes to an unprotected page, a
//! protected page and a merged page. Prints medians and 90th percentiles; asserts only
//! the order (a protected page's first write is slower than an unprotected one's).
//! Meaningful numbers need `--release`:
//! `cargo test -p page-memory --release --all-features --test linux_timing -- --nocapture`.
#![cfg(feature = "linux")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use page_memory::linux::{LinuxConfig, LinuxMemory};
use page_memory::{DomainId, MergeOutcome, PageId, PageMemory, PAGE_WORDS};

fn word(mem: &LinuxMemory, page: PageId, i: usize) -> &AtomicU64 {
    let base = mem.page_ptr(page).unwrap().cast::<u64>();
    // SAFETY: a word inside a page of a region of `mem`, which the test never removes;
    // every access of the test to guest memory is atomic.
    unsafe { AtomicU64::from_ptr(base.add(i)) }
}

fn fill(mem: &LinuxMemory, page: PageId, seed: u64) {
    for i in 0..PAGE_WORDS {
        word(mem, page, i).store(seed ^ i as u64, Ordering::Relaxed);
    }
}

/// Nanoseconds of one store to word 3 of each page.
fn first_writes(mem: &LinuxMemory, pages: &[PageId]) -> Vec<u64> {
    pages
        .iter()
        .map(|&p| {
            let w = word(mem, p, 3);
            let t0 = Instant::now();
            w.store(0xfeed, Ordering::Relaxed);
            t0.elapsed().as_nanos() as u64
        })
        .collect()
}

fn summary_of(label: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    eprintln!(
        "{label}: median {:.2} us, p90 {:.2} us",
        ns[ns.len() / 2] as f64 / 1000.0,
        ns[ns.len() * 9 / 10] as f64 / 1000.0
    );
}

fn summary(label: &str, mut ns: Vec<u64>) -> u64 {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    eprintln!(
        "first write to {label}: median {:.2} us, p90 {:.2} us, min {:.2} us ({} pages)",
        at(0.5),
        at(0.9),
        at(0.0),
        ns.len()
    );
    ns[ns.len() / 2]
}

#[test]
fn first_write_latency_to_unprotected_protected_and_merged_pages() {
    let mem =
        match LinuxMemory::with_config(LinuxConfig::default().with_require_kernel_faults(false)) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("SKIPPED: no userfaultfd write-protect here: {e}");
                return;
            }
        };
    const N: u32 = 400;
    let r = mem.add_region(3 * N, DomainId(0)).unwrap();
    let group =
        |g: u32| -> Vec<PageId> { (g * N..(g + 1) * N).map(|i| PageId::new(r, i)).collect() };
    let (plain, protected, merged) = (group(0), group(1), group(2));
    for p in plain.iter().chain(&protected) {
        fill(&mem, *p, u64::from(p.index) << 20);
    }
    for p in &merged {
        fill(&mem, *p, 7);
    }
    assert!(mem.protect(&protected).iter().all(Result::is_ok));
    let t: Vec<_> = mem
        .protect(&merged)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let canon = mem.canonicalize(merged[0], t[0]).unwrap();
    for (p, t) in merged.iter().zip(&t).skip(1) {
        assert_eq!(mem.merge(*p, *t, &canon).unwrap(), MergeOutcome::Merged);
    }
    let u = summary("an unprotected page", first_writes(&mem, &plain));
    let p = summary("a protected page", first_writes(&mem, &protected));
    let m = summary("a merged page", first_writes(&mem, &merged[1..]));
    assert!(
        p > u && m > u,
        "protected {p} ns, merged {m} ns, unprotected {u} ns"
    );
    // What a read through the backend costs now that it proves, before and after the
    // copy, that the page is still the region's.
    let mut buf = [0u8; page_memory::PAGE_SIZE];
    let reads: Vec<u64> = plain
        .iter()
        .map(|&p| {
            let t0 = Instant::now();
            mem.read_page(p, &mut buf).unwrap();
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    summary_of("read_page", reads);
    // What a merge and a recycle cost, page by page (each remap raises a userfaultfd
    // event the fault thread must read before the call returns).
    let r2 = mem.add_region(2 * N, DomainId(0)).unwrap();
    let dups: Vec<PageId> = (0..N).map(|i| PageId::new(r2, i)).collect();
    let scratch: Vec<PageId> = (N..2 * N).map(|i| PageId::new(r2, i)).collect();
    for p in dups.iter().chain(&scratch) {
        fill(&mem, *p, 7);
    }
    let t: Vec<_> = mem.protect(&dups).into_iter().map(Result::unwrap).collect();
    let merges: Vec<u64> = dups
        .iter()
        .zip(&t)
        .map(|(&p, &t)| {
            let t0 = Instant::now();
            assert_eq!(mem.merge(p, t, &canon).unwrap(), MergeOutcome::Merged);
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    summary_of("merge (one page a call)", merges);
    let recycles: Vec<u64> = scratch
        .iter()
        .map(|&p| {
            let t0 = Instant::now();
            assert!(mem.recycle(&[p])[0].is_ok());
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    summary_of("recycle (one private page a call)", recycles);
    drop(canon);
}
