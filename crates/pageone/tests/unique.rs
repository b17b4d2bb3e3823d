//! Unique pages indexed in place, decided by counts and contents: a page with no twin is
//! never made canonical (no copy, its own frame kept); a twin found in a later pass, or
//! in another chunk or thread, merges both; a unique page written meanwhile never merges
//! with its old contents' twin; and switching in-place indexing off gives the old
//! behaviour (every stable page canonical).

use std::sync::Arc;

use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, PageMemory, RegionId, PAGE_SIZE};
use pageone::{Config, PageOne};

/// A page whose contents are determined by `seed` (0 = all zeros).
fn content(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if seed != 0 {
        p[200..208].copy_from_slice(&seed.to_le_bytes());
        p[PAGE_SIZE - 8..].copy_from_slice(&(seed * 7).to_le_bytes());
    }
    p
}

fn write(mem: &SimMemory, r: RegionId, i: u32, seed: u64) {
    mem.write(PageId::new(r, i), 0, &content(seed)).unwrap();
}

fn read(mem: &SimMemory, r: RegionId, i: u32) -> Vec<u8> {
    let mut buf = [0u8; PAGE_SIZE];
    mem.read_page(PageId::new(r, i), &mut buf).unwrap();
    buf.to_vec()
}

fn until_quiet<M: PageMemory>(engine: &PageOne<M>) -> u32 {
    for n in 1..=16 {
        if engine.merge_pass().quiet() {
            return n;
        }
    }
    panic!("not quiet after 16 passes");
}

fn config(threads: usize) -> Config {
    Config::default().work_threads(threads)
}

#[test]
fn unique_pages_stay_where_they_are_and_twins_merge() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(1024, DomainId(0));
    // 1024 pages: 900 unique, 62 contents twice (124 pages).
    for i in 0..900 {
        write(&mem, r, i, 1000 + i as u64);
    }
    for i in 900..1024 {
        write(&mem, r, i, 1 + (i as u64 - 900) / 2);
    }
    let engine = PageOne::new(mem.clone(), config(1)).unwrap();
    engine.merge_pass();
    engine.merge_pass();
    let merge = engine.merge_pass();
    assert_eq!(merge.canonicalized, 62, "only pages with a twin are copied");
    // Each content's first page is indexed before its twin comes along in the same pass.
    assert_eq!(merge.indexed, 900 + 62);
    assert_eq!(merge.merged, 62);
    until_quiet(&engine);
    let s = engine.stats();
    assert_eq!(s.canonicalized, 62);
    assert_eq!(s.pages_unique, 900);
    assert_eq!(s.pages_unshared, 900);
    assert_eq!((s.pages_shared, s.pages_sharing), (62, 62));
    assert_eq!(mem.accounting().frames, 962);
    for i in 0..1024 {
        let seed = if i < 900 {
            1000 + i as u64
        } else {
            1 + (i as u64 - 900) / 2
        };
        assert_eq!(read(&mem, r, i), content(seed), "page {i}");
    }
}

#[test]
fn a_twin_that_comes_later_merges_with_the_indexed_page() {
    let mem = Arc::new(SimMemory::new());
    let a = mem.add_region(600, DomainId(0));
    for i in 0..600 {
        write(&mem, a, i, 5000 + i as u64);
    }
    let engine = PageOne::new(mem.clone(), config(1)).unwrap();
    until_quiet(&engine);
    assert_eq!(engine.stats().pages_unique, 600);
    assert_eq!(engine.stats().canonicalized, 0);
    // Page 599 gets page 3's contents: it is volatile again, then stable, then finds page
    // 3 (indexed passes ago, in another chunk) as its twin.
    write(&mem, a, 599, 5003);
    let passes = until_quiet(&engine);
    assert!(passes <= 5, "{passes} passes");
    let s = engine.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, 1));
    assert_eq!(s.pages_unique, 598);
    assert_eq!(s.canonicalized, 1);
    assert_eq!(mem.accounting().frames, 599);
    assert_eq!(read(&mem, a, 3), content(5003));
    assert_eq!(read(&mem, a, 599), content(5003));
}

#[test]
fn a_unique_page_written_since_it_was_indexed_is_not_a_twin() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(16, DomainId(0));
    for i in 0..16 {
        write(&mem, r, i, 100 + i as u64);
    }
    let engine = PageOne::new(mem.clone(), config(1)).unwrap();
    until_quiet(&engine);
    assert_eq!(engine.stats().pages_unique, 16);
    // Page 0 changes, and page 15 takes page 0's old contents in the same interval: the
    // index still holds page 0 under the old print, but its token is stale.
    write(&mem, r, 0, 999);
    write(&mem, r, 15, 100);
    until_quiet(&engine);
    let s = engine.stats();
    assert_eq!(s.pages_sharing, 0, "nothing equal to merge");
    assert_eq!(s.pages_unique, 16);
    assert_eq!(read(&mem, r, 0), content(999));
    assert_eq!(read(&mem, r, 15), content(100));
    assert_eq!(mem.accounting().frames, 16);
}

#[test]
fn twins_in_many_regions_and_two_threads_merge_exactly() {
    // Four "VMs" booted from one image: region k's page i holds content i (every content
    // four times), plus unique pages in each.
    let mem = Arc::new(SimMemory::new());
    let regions: Vec<RegionId> = (0..4).map(|_| mem.add_region(1500, DomainId(0))).collect();
    for (k, &r) in regions.iter().enumerate() {
        for i in 0..1500 {
            let seed = if i < 1000 {
                1 + i as u64
            } else {
                100_000 * (k as u64 + 1) + i as u64
            };
            write(&mem, r, i, seed);
        }
    }
    let engine = PageOne::new(mem.clone(), config(2)).unwrap();
    until_quiet(&engine);
    let s = engine.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1000, 3000));
    assert_eq!(s.pages_unique, 4 * 500);
    assert_eq!(s.canonicalized - s.insert_races, 1000);
    assert_eq!(mem.accounting().frames, 1000 + 2000);
    for (k, &r) in regions.iter().enumerate() {
        for i in (0..1500).step_by(37) {
            let seed = if i < 1000 {
                1 + i as u64
            } else {
                100_000 * (k as u64 + 1) + i as u64
            };
            assert_eq!(read(&mem, r, i), content(seed));
        }
    }
}

#[test]
fn without_in_place_indexing_every_stable_page_is_canonical() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(64, DomainId(0));
    for i in 0..64 {
        write(&mem, r, i, 1 + (i as u64 % 48));
    }
    let engine = PageOne::new(mem.clone(), config(1).unique_in_place(false)).unwrap();
    until_quiet(&engine);
    let s = engine.stats();
    assert_eq!(s.canonicalized, 48);
    assert_eq!(s.pages_unique, 0);
    assert_eq!(
        (s.pages_shared, s.pages_sharing, s.pages_unshared),
        (16, 16, 32)
    );
    assert_eq!(mem.accounting().frames, 48);
}

#[test]
fn unmerge_all_takes_unique_pages_out_of_the_index() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(32, DomainId(0));
    for i in 0..32 {
        write(&mem, r, i, 1 + i as u64);
    }
    let engine = PageOne::new(mem.clone(), config(1)).unwrap();
    until_quiet(&engine);
    assert_eq!(engine.stats().pages_unique, 32);
    engine.unmerge_all();
    assert_eq!(engine.stats().pages_unique, 0);
    // Indexed again from scratch; a page written with another's contents now merges.
    write(&mem, r, 31, 1);
    until_quiet(&engine);
    let s = engine.stats();
    assert_eq!((s.pages_unique, s.pages_sharing), (30, 1));
    assert_eq!(read(&mem, r, 31), content(1));
}

/// With `unchanged_before_protect`, a pass reads volatile pages and keeps protected only
/// those unchanged since the previous pass: memory nobody writes merges in as many passes
/// as without it, and a page written before every pass is protected only for the moment
/// of one read and then read unprotected (so a guest writing it between passes never
/// faults) while the pages around it merge.
#[test]
fn unchanged_before_protect_spares_pages_the_guest_keeps_writing() {
    let mem = Arc::new(SimMemory::new());
    let r = mem.add_region(64, DomainId(0));
    for i in 0..64 {
        write(&mem, r, i, 1 + (i as u64 % 16));
    }
    let engine = PageOne::new(mem.clone(), config(1).unchanged_before_protect(true)).unwrap();
    let hot = PageId::new(r, 5);
    let mut merged = 0;
    for pass in 0..8u64 {
        mem.write(hot, 0, &content(1000 + pass)).unwrap();
        let p = engine.merge_pass();
        assert!(
            !mem.is_protected(hot).unwrap(),
            "pass {pass}: the hot page was protected"
        );
        match pass {
            0 => assert_eq!((p.protected, p.watching), (0, 64)),
            1 => assert_eq!(p.protected, 63),
            _ => {}
        }
        merged += p.merged;
    }
    // 63 cold pages of 16 contents (the hot page's old contents among them): 47 merged.
    assert_eq!(merged, 63 - 16);
    assert_eq!(engine.stats().pages_sharing, 47);
    assert_eq!(read(&mem, r, 5), content(1007));
    // Nobody writes any more: the hot page is protected two passes later, and merges
    // nothing (its contents are its own).
    let passes = until_quiet(&engine);
    assert!(passes <= 5, "{passes} passes");
    assert!(mem.is_protected(hot).unwrap());
}

/// A page is read twice before it merges (KSM's checksum test, the second read under
/// protection) and never again: the pass that finds it stable merges it, makes it
/// canonical or indexes it by the print of the read under protection, and a third and
/// fourth copy of a content find the canonical page by print. The eager mode (protect at
/// once, no print known) reads each stable page once, as before.
#[test]
fn a_stable_page_is_not_read_again_when_its_print_is_known() {
    for (checksum, reads_per_page) in [(true, 2), (false, 1)] {
        let mem = Arc::new(SimMemory::new());
        let r = mem.add_region(256, DomainId(0));
        // 256 pages: 32 contents 4 times each, 64 zero pages, 64 unique pages.
        for i in 0..256u32 {
            match i {
                0..=127 => write(&mem, r, i, 1 + (i % 32) as u64),
                128..=191 => {}
                _ => write(&mem, r, i, 1000 + i as u64),
            }
        }
        let cfg = config(1).unchanged_before_protect(checksum);
        let engine = PageOne::new(mem.clone(), cfg).unwrap();
        until_quiet(&engine);
        let s = engine.stats();
        assert_eq!(s.pages_read, 256 * reads_per_page, "checksum {checksum}");
        assert_eq!((s.pages_shared, s.pages_sharing), (32, 96));
        assert_eq!((s.zero_pages, s.pages_unique), (64, 64));
        for i in 0..256u32 {
            let want = match i {
                0..=127 => content(1 + (i % 32) as u64),
                128..=191 => vec![0u8; PAGE_SIZE],
                _ => content(1000 + i as u64),
            };
            assert_eq!(read(&mem, r, i), want, "page {i}");
        }
        // Writes after the merge are the writer's alone, and merge again once stable.
        write(&mem, r, 0, 7777);
        write(&mem, r, 1, 7777);
        until_quiet(&engine);
        assert_eq!(read(&mem, r, 0), content(7777));
        assert_eq!(read(&mem, r, 32), content(1));
        assert_eq!(engine.stats().pages_sharing, 96 - 2 + 1);
    }
}

/// Prints are hints: with prints cut to 3 bits (so most contents share their print with
/// others), every duplicate still merges with an equal page and nothing else, across the
/// tree groups too, and every page reads as written. Collisions cost reads and
/// refusals (`Differs`), never a missed or wrong merge.
#[test]
fn colliding_prints_cost_work_not_merges() {
    for threads in [1, 2] {
        let mem = Arc::new(SimMemory::new());
        let a = mem.add_region(192, DomainId(0));
        let b = mem.add_region(64, DomainId(1));
        // Region a: 32 contents 4 times each (128 pages) and 64 unique pages; region b, in
        // another trust domain: the same 32 contents twice each.
        let seed_a = |i: u32| {
            if i < 128 {
                1 + (i * 7 % 32) as u64
            } else {
                500 + i as u64
            }
        };
        let seed_b = |i: u32| 1 + (i % 32) as u64;
        for i in 0..192 {
            write(&mem, a, i, seed_a(i));
        }
        for i in 0..64 {
            write(&mem, b, i, seed_b(i));
        }
        let engine = PageOne::new(mem.clone(), config(threads).print_bits(3)).unwrap();
        for _ in 0..40 {
            if engine.merge_pass().quiet() {
                break;
            }
        }
        let s = engine.stats();
        // a: 32 canonical pages with 3 sharers each beyond the first; b: 32 with 1.
        assert_eq!(
            (s.pages_shared, s.pages_sharing),
            (64, 96 + 32),
            "{threads}t: {s:?}"
        );
        assert!(
            s.merge_races > 0,
            "the collisions were refused at the switch"
        );
        for i in 0..192 {
            assert_eq!(read(&mem, a, i), content(seed_a(i)), "a {i}");
        }
        for i in 0..64 {
            assert_eq!(read(&mem, b, i), content(seed_b(i)), "b {i}");
        }
        // Nothing is shared across the domains: 64 frames of contents, 64 unique pages.
        assert_eq!(mem.accounting().frames, 64 + 64);
    }
}
