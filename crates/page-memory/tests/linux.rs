//! The Linux backend keeps the page-memory contract on real memory, and PageONE runs on
//! it. Tests skip, with the reason printed, where userfaultfd write-protect is unavailable
//! (no privilege: see `LinuxMemory`'s module docs).
#![cfg(feature = "linux")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use page_memory::linux::test_util::*;
use page_memory::linux::{Backing, LinuxConfig, LinuxError, LinuxFrame, LinuxMemory};
use page_memory::{
    is_zero_page, DomainId, MergeOutcome, PageError, PageId, PageMemory, RegionId, PAGE_SIZE,
    PAGE_WORDS,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// [`memory`], where it has userfaultfd non-cooperative events (`None`, the reason
/// printed, where it has not).
fn memory_with_events() -> Option<LinuxMemory> {
    let mem = memory()?;
    if !mem.caps().events {
        eprintln!("SKIPPED: no userfaultfd non-cooperative events here");
        return None;
    }
    Some(mem)
}

/// Waits (at most 5 s) until the backend has learnt of `want` pages unmapped by their
/// owner.
fn wait_for_foreign_unmaps(mem: &LinuxMemory, want: u64) {
    let t0 = Instant::now();
    while mem.stats().foreign_unmaps < want && t0.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
}

/// `pages` pages of the test's own memory (a fresh private anonymous mapping, as an
/// embedder's), adopted into `mem`: the mapping's address, its length and the region.
/// The test unmaps the mapping itself, once no memory refers to it.
fn adopted(mem: &LinuxMemory, pages: usize) -> (*mut u8, usize, RegionId) {
    let len = pages * PAGE_SIZE;
    let base = embedder_mmap(len);
    // SAFETY: the test's own fresh private anonymous mapping, unmapped only by the test.
    let r = unsafe { mem.adopt_region(base, len, DomainId(0)) }.unwrap();
    (base, len, r)
}

#[test]
fn reports_its_mechanisms() {
    let Some(mem) = memory() else { return };
    eprintln!(
        "dirty tracking {:?}, window check {:?}, caps {:?}",
        mem.dirty_tracking(),
        mem.window_check(),
        mem.caps()
    );
    assert_eq!(
        mem.dirty_tracking(),
        page_memory::linux::DirtyTracking::UffdWriteProtect
    );
}

/// A write the kernel makes for the process (here `read(2)` from a pipe) into a protected
/// page: handled by the fault thread where the memory has kernel faults; where this
/// process may not have them, the memory says so (`caps().kernel_faults` false) and such a
/// write fails with `EFAULT`, leaving the page as it was. Requiring kernel faults then
/// fails with a typed error that says what would work.
#[test]
fn kernel_writes_are_handled_or_the_fallback_is_reported() {
    let Some(mem) = memory() else { return };
    let caps = mem.caps().clone();
    eprintln!(
        "kernel faults: {} (userfaultfd from {:?})",
        caps.kernel_faults, caps.source
    );
    let required =
        LinuxMemory::with_config(LinuxConfig::default().with_require_kernel_faults(true));
    match (&required, caps.kernel_faults) {
        (Ok(m), true) => assert!(m.caps().kernel_faults),
        (Err(e @ LinuxError::KernelFaultsDenied { .. }), false) => {
            let shown = e.to_string();
            eprintln!("required kernel faults: {shown}");
            assert!(shown.contains("/dev/userfaultfd") && shown.contains("root"));
        }
        (other, kf) => panic!("kernel faults {kf}, yet requiring them gave {other:?}"),
    }
    drop(required);
    let r = mem.add_region(1, DomainId(0)).unwrap();
    let p = PageId::new(r, 0);
    fill(&mem, p, 5);
    let t = mem.protect(&[p])[0].clone().unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is two ints for pipe(2) to fill.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let msg = [0xabu8; 64];
    // SAFETY: `msg` is 64 readable bytes; fds[1] is the pipe's write end.
    assert_eq!(unsafe { libc::write(fds[1], msg.as_ptr().cast(), 64) }, 64);
    let at = mem.page_ptr(p).unwrap();
    // SAFETY: the kernel writes at most 64 bytes into the page (guest memory of a live
    // region, which the test accesses only atomically otherwise); fds[0] is the read end.
    let n = unsafe { libc::read(fds[0], at.cast(), 64) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: both ends of the pipe made above, closed once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    if caps.kernel_faults {
        assert_eq!(n, 64);
        assert!(mem.written_since(p, t).unwrap());
        assert_eq!(
            word(&mem, p, 0).load(Ordering::Relaxed),
            u64::from_ne_bytes([0xab; 8])
        );
    } else {
        assert_eq!((n, errno), (-1, Some(libc::EFAULT)));
        assert!(!mem.written_since(p, t).unwrap());
        assert!(holds(&mem, p, 5));
    }
}

#[test]
fn merge_and_recycle_free_the_expected_memory() {
    let Some(mem) = memory() else { return };
    const N: u32 = 2048;
    const HALF: u32 = N / 2;
    let r = mem.add_region(N, DomainId(0)).unwrap();
    for i in 0..N {
        fill(&mem, PageId::new(r, i), (i % HALF) as u64 + 1);
    }
    let before = mem.usage().unwrap();
    show("filled (2048 pages, 1024 distinct)", &before);
    assert_eq!(before.region_anonymous, N as u64 * PAGE);
    assert_eq!(before.store_bytes, 0);

    let all = pages(r, 0..N);
    let tokens: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    let mut frames = Vec::new();
    for i in 0..HALF {
        let canon = mem
            .canonicalize(PageId::new(r, i), tokens[i as usize])
            .unwrap();
        let dup = PageId::new(r, i + HALF);
        assert_eq!(
            mem.merge(dup, tokens[(i + HALF) as usize], &canon).unwrap(),
            MergeOutcome::Merged
        );
        frames.push(canon);
    }
    for i in 0..N {
        assert!(holds(&mem, PageId::new(r, i), (i % HALF) as u64 + 1));
    }
    let merged = mem.usage().unwrap();
    show("merged", &merged);
    // Every page maps the store now: no private memory left, one store page per content.
    assert_eq!(merged.region_anonymous, 0);
    assert_eq!(merged.store_bytes, HALF as u64 * PAGE);
    assert_eq!(
        before.total_bytes() - merged.total_bytes(),
        HALF as u64 * PAGE
    );
    if let Some(c) = merged.census {
        assert_eq!((c.store, c.private, c.not_present), (N as u64, 0, 0));
    }
    // Canonical pages sit at consecutive store offsets, and so do their duplicates: two
    // coalesced mappings.
    assert!(merged.region_mappings <= 2, "{}", merged.region_mappings);

    // Recycling a duplicate frees nothing (its content is still the canonical page's)...
    let dups = pages(r, HALF..HALF + 256);
    assert!(mem.recycle(&dups).iter().all(Result::is_ok));
    let u = mem.usage().unwrap();
    assert_eq!(u.total_bytes(), merged.total_bytes());
    // ...recycling the canonical pages too, once the engine lets go of their frames, frees
    // their store pages.
    assert!(mem.recycle(&pages(r, 0..256)).iter().all(Result::is_ok));
    frames.drain(..256);
    let recycled = mem.usage().unwrap();
    show("recycled 256 contents (512 pages)", &recycled);
    assert_eq!(recycled.store_bytes, (HALF as u64 - 256) * PAGE);
    assert_eq!(merged.total_bytes() - recycled.total_bytes(), 256 * PAGE);
    for i in 0..256 {
        let mut buf = [1u8; PAGE_SIZE];
        mem.read_page(PageId::new(r, i), &mut buf).unwrap();
        assert!(is_zero_page(&buf));
    }

    // Private pages: recycling 512 of a fresh region frees exactly 512 pages.
    let r2 = mem.add_region(1024, DomainId(0)).unwrap();
    for i in 0..1024 {
        fill(&mem, PageId::new(r2, i), 10_000 + i as u64);
    }
    let filled = mem.usage().unwrap();
    assert!(mem.recycle(&pages(r2, 0..512)).iter().all(Result::is_ok));
    let after = mem.usage().unwrap();
    show("second region: 1024 private pages, 512 recycled", &after);
    assert_eq!(filled.region_anonymous - after.region_anonymous, 512 * PAGE);
    assert_eq!(mem.stats().recycled, 256 + 256 + 512);
    // The backend's own remaps and drops raised events, none taken for the owner's.
    let st = mem.stats();
    assert_eq!((st.foreign_unmaps, st.foreign_removes), (0, 0), "{st:?}");
}

#[test]
fn zero_pages_are_dropped_and_stay_protected() {
    let Some(mem) = memory() else { return };
    let r = mem.add_region(64, DomainId(0)).unwrap();
    for i in 0..64 {
        let p = PageId::new(r, i);
        fill(&mem, p, 1);
        // Written all zeros again: allocated, but empty.
        for w in 0..PAGE_WORDS {
            word(&mem, p, w).store(0, Ordering::Relaxed);
        }
    }
    let before = mem.usage().unwrap();
    assert_eq!(before.region_anonymous, 64 * PAGE);
    let all = pages(r, 0..64);
    let tokens: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    let zero = mem.zero_frame();
    for (p, t) in all.iter().zip(&tokens) {
        assert_eq!(mem.merge(*p, *t, &zero).unwrap(), MergeOutcome::Merged);
        assert_eq!(mem.backing(*p).unwrap(), Backing::Zero);
    }
    let after = mem.usage().unwrap();
    show("64 zero pages merged with the zero page", &after);
    assert_eq!(after.region_anonymous, 0);
    // Still protected: a write is seen and makes the token stale.
    let p = all[5];
    assert!(!mem.written_since(p, tokens[5]).unwrap());
    word(&mem, p, 3).store(42, Ordering::Relaxed);
    assert!(mem.written_since(p, tokens[5]).unwrap());
    assert!(!mem.written_since(all[6], tokens[6]).unwrap());
    assert_eq!(word(&mem, p, 3).load(Ordering::Relaxed), 42);
}

#[test]
fn a_write_after_merge_gets_a_private_copy_and_leaves_the_sharers_alone() {
    let Some(mem) = memory() else { return };
    let r = mem.add_region(3, DomainId(0)).unwrap();
    let [a, b, c] = [0, 1, 2].map(|i| PageId::new(r, i));
    for p in [a, b, c] {
        fill(&mem, p, 77);
    }
    let t = mem.protect(&[a, b, c]);
    let t: Vec<_> = t.into_iter().map(Result::unwrap).collect();
    let canon = mem.canonicalize(a, t[0]).unwrap();
    for (p, tok) in [(b, t[1]), (c, t[2])] {
        assert_eq!(mem.merge(p, tok, &canon).unwrap(), MergeOutcome::Merged);
    }
    assert!(mem.shares_frame(a, b).unwrap() && mem.shares_frame(a, c).unwrap());
    let stats = mem.stats();
    // The guest writes the merged page: the fault thread breaks the sharing, the write lands.
    word(&mem, b, 100).store(0xdead_beef, Ordering::Relaxed);
    assert_eq!(word(&mem, b, 100).load(Ordering::Relaxed), 0xdead_beef);
    assert!(mem.written_since(b, t[1]).unwrap());
    assert_eq!(mem.backing(b).unwrap(), Backing::PrivateCopy);
    assert!(holds(&mem, a, 77) && holds(&mem, c, 77));
    assert!(!mem.written_since(a, t[0]).unwrap() && !mem.written_since(c, t[2]).unwrap());
    assert!(mem.shares_frame(a, c).unwrap());
    assert_eq!(&canon.as_ref()[..8], &pattern(77, 0).to_ne_bytes());
    // The rest of b is intact: the copy was of the shared page.
    for i in (0..PAGE_WORDS).filter(|&i| i != 100) {
        assert_eq!(word(&mem, b, i).load(Ordering::Relaxed), pattern(77, i));
    }
    // A write to the canonical page itself: c keeps the old contents, and so does the frame.
    word(&mem, a, 0).store(5, Ordering::Relaxed);
    assert!(holds(&mem, c, 77));
    assert_eq!(canon.as_ref()[..8], pattern(77, 0).to_ne_bytes());
    let after = mem.stats();
    assert_eq!(after.cow_breaks - stats.cow_breaks, 2);
    assert!(after.write_faults - stats.write_faults >= 2);
}

#[test]
fn tokens_merges_and_errors_keep_the_contract() {
    let Some(mem) = memory() else { return };
    let r = mem.add_region(4, DomainId(3)).unwrap();
    let [a, b, c, d] = [0, 1, 2, 3].map(|i| PageId::new(r, i));
    fill(&mem, a, 1);
    fill(&mem, b, 1);
    fill(&mem, c, 2);
    fill(&mem, d, 1);
    let t: Vec<_> = mem
        .protect(&[a, b, c, d])
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(mem.is_protected(a).unwrap());
    let canon = mem.canonicalize(a, t[0]).unwrap();
    // Different contents: nothing happens.
    assert_eq!(mem.merge(c, t[2], &canon).unwrap(), MergeOutcome::Differs);
    assert_eq!(mem.backing(c).unwrap(), Backing::Private);
    // Written since the token: nothing happens.
    word(&mem, b, 7).store(pattern(1, 7), Ordering::Relaxed); // same value, still a write
    assert_eq!(mem.merge(b, t[1], &canon).unwrap(), MergeOutcome::Changed);
    assert_eq!(mem.canonicalize(b, t[1]).unwrap_err(), PageError::Stale(b));
    // Unprotected: tokens are stale.
    assert!(mem.unprotect(&[d]).iter().all(Result::is_ok));
    assert!(mem.written_since(d, t[3]).unwrap());
    assert_eq!(mem.merge(d, t[3], &canon).unwrap(), MergeOutcome::Changed);
    // Merging twice is a no-op; canonicalizing a merged page gives its frame.
    let t2: Vec<_> = mem.protect(&[d]).into_iter().map(Result::unwrap).collect();
    assert_eq!(mem.merge(d, t2[0], &canon).unwrap(), MergeOutcome::Merged);
    assert_eq!(mem.merge(d, t2[0], &canon).unwrap(), MergeOutcome::Merged);
    let again = mem.canonicalize(d, t2[0]).unwrap();
    assert_eq!(again.store_offset(), canon.store_offset());
    // Bad ids.
    let beyond = PageId::new(r, 4);
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(
        mem.read_page(beyond, &mut buf),
        Err(PageError::NoSuchPage(beyond))
    );
    assert_eq!(
        mem.protect(&[PageId::new(RegionId(9), 0)])[0],
        Err(PageError::NoSuchRegion(RegionId(9)))
    );
    // A frame of another memory is refused.
    if let Some(other) = memory() {
        assert!(matches!(
            other.merge(a, t[0], &canon),
            Err(PageError::Unsupported(_)) | Err(PageError::NoSuchRegion(_))
        ));
    }
    // read_words.
    let mut words = [0u64; 4];
    mem.read_words(c, &mut words).unwrap();
    assert_eq!(words[3], pattern(2, 3));
    assert_eq!(mem.regions().len(), 1);
    assert_eq!(mem.regions()[0].domain, DomainId(3));
}

#[test]
fn the_dirty_hook_hears_every_change() {
    let Some(mem) = memory() else { return };
    let r = mem.add_region(4, DomainId(0)).unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = heard.clone();
    mem.set_dirty_hook(Some(Arc::new(move |p| h.lock().unwrap().push(p.index))));
    for i in 0..4 {
        fill(&mem, PageId::new(r, i), 9);
    }
    let t: Vec<_> = mem
        .protect(&pages(r, 0..4))
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let canon = mem.canonicalize(PageId::new(r, 0), t[0]).unwrap();
    mem.merge(PageId::new(r, 1), t[1], &canon).unwrap();
    mem.recycle(&[PageId::new(r, 2)]);
    mem.unmerge(PageId::new(r, 1)).unwrap();
    assert_eq!(*heard.lock().unwrap(), vec![0, 1, 2, 1]);
}

/// Writer threads write and check patterns while another thread merges, canonicalizes,
/// unmerges and drops frames as fast as it can: no write is lost.
#[test]
fn writers_lose_no_write_across_merge_and_copy_on_write_cycles() {
    let Some(mem) = memory() else { return };
    let mem = Arc::new(mem);
    const N: u32 = 256;
    const WRITERS: u32 = 4;
    let r = mem.add_region(N, DomainId(0)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(WRITERS as usize + 1));
    let rounds = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(4);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (mem, stop, start) = (mem.clone(), stop.clone(), start.clone());
            thread::spawn(move || {
                // Shadow of every page this writer owns: the contents it must read back.
                let mine: Vec<u32> = (0..N).filter(|i| i % WRITERS == w).collect();
                let mut shadow: HashMap<u32, Vec<u64>> =
                    mine.iter().map(|&i| (i, vec![0u64; PAGE_WORDS])).collect();
                let mut rng = splitmix(w as u64 + 1);
                let mut writes = 0u64;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    rng = splitmix(rng);
                    let i = mine[(rng % mine.len() as u64) as usize];
                    let p = PageId::new(r, i);
                    let s = shadow.get_mut(&i).unwrap();
                    if rng % 4 == 0 {
                        // One word: the rest of the page must survive merges untouched.
                        let k = (rng >> 8) as usize % PAGE_WORDS;
                        let v = rng >> 16;
                        word(&mem, p, k).store(v, Ordering::Relaxed);
                        s[k] = v;
                    } else {
                        // A whole page, one of few contents, so that pages keep merging.
                        let seed = (rng >> 8) % 3 + 1;
                        for (k, sk) in s.iter_mut().enumerate() {
                            let v = pattern(seed, k);
                            word(&mem, p, k).store(v, Ordering::Relaxed);
                            *sk = v;
                        }
                    }
                    writes += 1;
                    for (k, &v) in s.iter().enumerate() {
                        let got = word(&mem, p, k).load(Ordering::Relaxed);
                        assert_eq!(got, v, "writer {w}: page {i} word {k} lost a write");
                    }
                    if writes % 8 == 0 {
                        // Let pages stay unwritten for a while, so they get merged.
                        thread::sleep(Duration::from_micros(300));
                    }
                }
                (shadow, writes)
            })
        })
        .collect();
    start.wait();
    // The merger: protect everything, merge what is equal, unmerge some, drop frames.
    let all = pages(r, 0..N);
    let mut by_contents: HashMap<Vec<u8>, LinuxFrame> = HashMap::new();
    let mut buf = [0u8; PAGE_SIZE];
    let mut outcomes = [0u64; 4];
    while Instant::now() < deadline {
        let n = rounds.fetch_add(1, Ordering::Relaxed);
        let tokens = mem.protect(&all);
        for (p, t) in all.iter().zip(tokens) {
            let t = t.unwrap();
            mem.read_page(*p, &mut buf).unwrap();
            let frame = if is_zero_page(&buf) {
                mem.zero_frame()
            } else if let Some(f) = by_contents.get(&buf[..]) {
                f.clone()
            } else {
                match mem.canonicalize(*p, t) {
                    Ok(f) => {
                        if f.as_ref() == &buf[..] {
                            by_contents.insert(buf.to_vec(), f);
                        }
                        outcomes[3] += 1;
                        continue;
                    }
                    Err(PageError::Stale(_)) => continue,
                    Err(e) => panic!("{e}"),
                }
            };
            match mem.merge(*p, t, &frame).unwrap() {
                MergeOutcome::Merged => outcomes[0] += 1,
                MergeOutcome::Changed => outcomes[1] += 1,
                MergeOutcome::Differs => outcomes[2] += 1,
            }
        }
        if n % 5 == 4 {
            for p in all.iter().step_by(7) {
                mem.unmerge(*p).unwrap();
            }
        }
        if n % 3 == 2 {
            by_contents.clear();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut total_writes = 0;
    for w in writers {
        let (shadow, writes) = w.join().expect("a writer saw a lost write");
        total_writes += writes;
        for (i, s) in shadow {
            let p = PageId::new(r, i);
            mem.read_page(p, &mut buf).unwrap();
            for (k, c) in buf.chunks_exact(8).enumerate() {
                assert_eq!(
                    u64::from_ne_bytes(c.try_into().unwrap()),
                    s[k],
                    "page {i} word {k}"
                );
            }
        }
    }
    let st = mem.stats();
    eprintln!(
        "{} merger rounds, {total_writes} guest writes; merged {}, changed {}, differs {}, \
         canonicalized {}; {:?}",
        rounds.load(Ordering::Relaxed),
        outcomes[0],
        outcomes[1],
        outcomes[2],
        outcomes[3],
        st
    );
    assert!(outcomes[0] > 100, "too few merges to mean anything");
    assert!(
        st.cow_breaks > 100,
        "too few copy-on-write breaks to mean anything"
    );
    assert_eq!((st.foreign_unmaps, st.foreign_removes), (0, 0));
    drop(by_contents);
    drop(mem);
}

/// An embedder unmaps an adopted region (with canonical and merged pages in it) behind
/// the backend's back: the next operation that touches it finds out, every later one fails
/// with `Unmapped`, the other region is untouched, and dropping the memory is clean.
#[test]
fn a_region_unmapped_by_its_owner_yields_errors() {
    let Some(mem) = memory() else { return };
    const PAGES: usize = 64;
    let (base, len, r) = adopted(&mem, PAGES);
    let keep = mem.add_region(8, DomainId(0)).unwrap();
    for i in 0..PAGES as u32 {
        fill(&mem, PageId::new(r, i), 1 + (i % 8) as u64);
    }
    for i in 0..8 {
        fill(&mem, PageId::new(keep, i), 1 + i as u64);
    }
    let all = pages(r, 0..PAGES as u32);
    let t: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    let frames: Vec<_> = (0..8)
        .map(|i| mem.canonicalize(all[i], t[i]).unwrap())
        .collect();
    for i in 8..PAGES / 2 {
        assert_eq!(
            mem.merge(all[i], t[i], &frames[i % 8]).unwrap(),
            MergeOutcome::Merged
        );
    }
    unmap_keeping_the_address(base, len);
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(
        mem.read_page(all[40], &mut buf),
        Err(PageError::Unmapped(r))
    );
    let p = all[3];
    assert_eq!(mem.protect(&[p])[0], Err(PageError::Unmapped(r)));
    assert_eq!(mem.recycle(&[p])[0], Err(PageError::Unmapped(r)));
    assert_eq!(mem.unmerge(p), Err(PageError::Unmapped(r)));
    assert_eq!(
        mem.merge(all[40], t[40], &frames[0]),
        Err(PageError::Unmapped(r))
    );
    let batch = mem.canonicalize_batch(&[(all[41], t[41]), (all[42], t[42])]);
    assert!(batch
        .iter()
        .all(|b| matches!(b, Err(PageError::Unmapped(_)))));
    assert!(mem.usage().is_ok());
    assert!(holds(&mem, PageId::new(keep, 3), 4));
    fill(&mem, PageId::new(keep, 3), 9);
    assert!(holds(&mem, PageId::new(keep, 3), 9));
    drop(frames);
    drop(mem);
    // SAFETY: the reservation made above; no memory refers to the range any more.
    unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
}

/// Without userfaultfd: nothing is protected or merged, recycling still frees memory.
#[test]
fn without_userfaultfd_nothing_merges_but_recycling_works() {
    let strict = LinuxMemory::with_config(LinuxConfig::default().with_use_userfaultfd(false));
    assert!(matches!(
        strict,
        Err(page_memory::linux::LinuxError::Disabled)
    ));
    let mem = Arc::new(
        LinuxMemory::with_config(
            LinuxConfig::default()
                .with_use_userfaultfd(false)
                .with_require_userfaultfd(false),
        )
        .unwrap(),
    );
    assert_eq!(
        mem.dirty_tracking(),
        page_memory::linux::DirtyTracking::Unavailable
    );
    assert!(mem.caps().userfaultfd_error.is_some());
    let r = mem.add_region(64, DomainId(0)).unwrap();
    for i in 0..64 {
        fill(&mem, PageId::new(r, i), 1);
    }
    let p = PageId::new(r, 0);
    assert!(matches!(
        mem.protect(&[p])[0],
        Err(PageError::Unsupported(_))
    ));
    assert!(mem.written_since(p, page_memory::ProtectToken(0)).unwrap());
    let zero = mem.zero_frame();
    assert!(matches!(
        mem.merge(p, page_memory::ProtectToken(0), &zero),
        Err(PageError::Unsupported(_))
    ));
    assert!(matches!(
        mem.canonicalize(p, page_memory::ProtectToken(0)),
        Err(PageError::Unsupported(_))
    ));
    let before = mem.usage().unwrap();
    assert!(mem.recycle(&pages(r, 0..32)).iter().all(Result::is_ok));
    let after = mem.usage().unwrap();
    assert_eq!(before.region_anonymous - after.region_anonymous, 32 * PAGE);
    assert!(holds(&mem, PageId::new(r, 40), 1));
}

/// Removing an adopted region gives it back as plain anonymous memory with its contents.
#[test]
fn removing_an_adopted_region_gives_it_back_as_plain_memory() {
    let Some(mem) = memory() else { return };
    const PAGES: usize = 64;
    let (base, len, r) = adopted(&mem, PAGES);
    for i in 0..PAGES as u32 {
        fill(&mem, PageId::new(r, i), 1 + (i % 4) as u64);
    }
    let all = pages(r, 0..PAGES as u32);
    let t: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    let frames: Vec<_> = (0..4)
        .map(|i| mem.canonicalize(all[i], t[i]).unwrap())
        .collect();
    for i in 4..PAGES {
        assert_eq!(
            mem.merge(all[i], t[i], &frames[i % 4]).unwrap(),
            MergeOutcome::Merged
        );
    }
    word(&mem, all[9], 1).store(99, Ordering::Relaxed); // a private copy in a store mapping
    assert!(mem.usage().unwrap().store_bytes > 0);
    mem.remove_region(r).unwrap();
    assert_eq!(mem.region_ptr(r), Err(PageError::NoSuchRegion(r)));
    assert_eq!(mem.remove_region(r), Err(PageError::NoSuchRegion(r)));
    // SAFETY: the region is the test's again; all accesses are atomic, as before.
    let at = |i: usize, w: usize| unsafe {
        AtomicU64::from_ptr(base.add(i * PAGE_SIZE).cast::<u64>().add(w))
    };
    for i in 0..PAGES {
        for w in 0..PAGE_WORDS {
            let want = if (i, w) == (9, 1) {
                99
            } else {
                pattern(1 + (i % 4) as u64, w)
            };
            assert_eq!(at(i, w).load(Ordering::Relaxed), want, "page {i} word {w}");
        }
    }
    // Nothing of the store is left in the range: it is anonymous memory again, so dropping
    // a page reads zeros (a private mapping of the store would read the store again).
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let (start, end) = (base as usize, base as usize + len);
    for line in maps.lines() {
        let mut it = line.split_ascii_whitespace();
        let (s, e) = it.next().unwrap().split_once('-').unwrap();
        let (s, e) = (
            usize::from_str_radix(s, 16).unwrap(),
            usize::from_str_radix(e, 16).unwrap(),
        );
        if s < end && e > start {
            assert!(!line.contains("memfd"), "{line}");
        }
    }
    drop(frames);
    // SAFETY: a page of the test's own mapping, which no one else uses now.
    unsafe {
        rustix::mm::madvise(
            base.add(5 * PAGE_SIZE).cast(),
            PAGE_SIZE,
            rustix::mm::Advice::LinuxDontNeed,
        )
    }
    .unwrap();
    assert_eq!(at(5, 0).load(Ordering::Relaxed), 0);
    at(6, 0).store(7, Ordering::Relaxed);
    drop(mem);
    assert_eq!(at(6, 0).load(Ordering::Relaxed), 7);
    // SAFETY: the test's own mapping; nothing refers to it any more.
    unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
}

/// `canonicalize_batch` and `merge_batch` give what one call per page gives, with mixed
/// outcomes inside a run, and a run of duplicates of a run of canonical pages becomes one
/// mapping.
#[test]
fn batches_do_what_single_calls_do() {
    let Some(mem) = memory() else { return };
    const N: u32 = 200;
    let r = mem.add_region(2 * N, DomainId(0)).unwrap();
    for i in 0..N {
        fill(&mem, PageId::new(r, i), 1 + i as u64);
        fill(&mem, PageId::new(r, N + i), 1 + i as u64);
    }
    let all = pages(r, 0..2 * N);
    let t: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    // Page 7 is written after protection: its canonicalization is stale.
    word(&mem, PageId::new(r, 7), 0).store(3, Ordering::Relaxed);
    let canon: Vec<_> = (0..N).map(|i| (PageId::new(r, i), t[i as usize])).collect();
    let frames = mem.canonicalize_batch(&canon);
    assert_eq!(frames.len(), N as usize);
    assert_eq!(
        frames[7].as_ref().unwrap_err(),
        &PageError::Stale(PageId::new(r, 7))
    );
    for (i, f) in frames.iter().enumerate() {
        if i != 7 {
            let f = f.as_ref().unwrap();
            assert!(holds(&mem, PageId::new(r, i as u32), 1 + i as u64));
            assert_eq!(f.as_ref(), {
                let mut b = [0u8; PAGE_SIZE];
                mem.read_page(PageId::new(r, i as u32), &mut b).unwrap();
                b
            });
        }
    }
    // Canonicalizing again gives the same frames (no change).
    let again = mem.canonicalize_batch(&canon[10..20]);
    for (k, f) in again.iter().enumerate() {
        assert_eq!(
            f.as_ref().unwrap().store_offset(),
            frames[10 + k].as_ref().unwrap().store_offset()
        );
    }
    let stats = mem.stats();
    assert_eq!(stats.canonicalized, N as u64 - 1);
    // Merge the second half with the first, in one batch: page N+7 gets page 8's frame
    // (differs), page N+20 was written (changed), the rest merge.
    word(&mem, PageId::new(r, N + 20), 5).store(9, Ordering::Relaxed);
    let zero = mem.zero_frame();
    let items: Vec<(PageId, page_memory::ProtectToken, &LinuxFrame)> = (0..N)
        .map(|i| {
            let f = if i == 7 {
                frames[8].as_ref().unwrap()
            } else {
                frames[i as usize].as_ref().unwrap()
            };
            (PageId::new(r, N + i), t[(N + i) as usize], f)
        })
        .chain(std::iter::once((
            PageId::new(r, N + 7),
            t[(N + 7) as usize],
            &zero,
        )))
        .collect();
    let out = mem.merge_batch(&items);
    for (k, o) in out.iter().enumerate() {
        let want = match k as u32 {
            7 | 200 => MergeOutcome::Differs,
            20 => MergeOutcome::Changed,
            _ => MergeOutcome::Merged,
        };
        assert_eq!(*o, Ok(want), "item {k}");
    }
    // Merging again: already merged, nothing changes.
    let out2 = mem.merge_batch(&items[30..40]);
    assert!(out2.iter().all(|o| *o == Ok(MergeOutcome::Merged)));
    assert_eq!(mem.stats().merges, N as u64 - 2);
    for i in 0..N {
        let p = PageId::new(r, N + i);
        match i {
            7 => assert!(holds(&mem, p, 8)),
            20 => assert_eq!(word(&mem, p, 5).load(Ordering::Relaxed), 9),
            _ => {
                assert!(holds(&mem, p, 1 + i as u64));
                assert!(mem.shares_frame(p, PageId::new(r, i)).unwrap());
            }
        }
    }
    // Runs coalesce: the merged pages map consecutive store offsets, so the region is a
    // handful of mappings (split only around pages 7 and 20), not one per page.
    let u = mem.usage().unwrap();
    assert!(u.region_mappings <= 8, "{} mappings", u.region_mappings);
    // A write to a merged page still breaks the sharing for that page alone.
    word(&mem, PageId::new(r, N + 50), 0).store(1, Ordering::Relaxed);
    assert!(holds(&mem, PageId::new(r, 50), 51));
    assert!(holds(&mem, PageId::new(r, N + 51), 52));
}

/// One page of an adopted region is replaced behind the backend's back (a fresh
/// anonymous mapping over it, which the userfaultfd does not know): protecting it fails
/// for that page alone, with no token; the rest of the region keeps working and is not
/// taken for unmapped.
#[test]
fn a_page_replaced_behind_the_backends_back_fails_alone() {
    let Some(mem) = memory() else { return };
    const PAGES: usize = 8;
    let (base, len, r) = adopted(&mem, PAGES);
    for i in 0..PAGES as u32 {
        fill(&mem, PageId::new(r, i), 1 + (i % 2) as u64);
    }
    // SAFETY: page 3 of the test's own mapping; a fresh anonymous page replaces it (the
    // contract violation under test), and only fault-checked calls reach it afterwards.
    unsafe {
        rustix::mm::mmap_anonymous(
            base.add(3 * PAGE_SIZE).cast(),
            PAGE_SIZE,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED,
        )
    }
    .expect("mmap over page 3");
    let all = pages(r, 0..PAGES as u32);
    let t = mem.protect(&all);
    for (i, t) in t.iter().enumerate() {
        if i == 3 {
            assert!(
                matches!(t, Err(PageError::Os { .. } | PageError::Unmapped(_))),
                "{t:?}"
            );
        } else {
            assert!(t.is_ok(), "page {i}: {t:?}");
        }
    }
    assert!(!mem.is_protected(all[3]).unwrap_or(false));
    // The rest of the region is not taken for unmapped: it merges.
    let canon = mem.canonicalize(all[0], t[0].clone().unwrap()).unwrap();
    assert_eq!(
        mem.merge(all[2], t[2].clone().unwrap(), &canon).unwrap(),
        MergeOutcome::Merged
    );
    assert!(holds(&mem, all[2], 1));
    assert!(holds(&mem, all[5], 2));
    assert_eq!(mem.regions().len(), 1);
    drop(canon);
    drop(mem);
    // SAFETY: the test's own mapping; no memory refers to it any more.
    unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
}

/// Maps `len` bytes of fresh anonymous memory exactly at `at` without replacing anything
/// (`MAP_FIXED_NOREPLACE`): `None` if something (another test's mapping) is there.
fn map_exactly_at(at: *mut u8, len: usize) -> Option<*mut u8> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: the call either
    // makes a new mapping at `at` or fails.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            at.cast(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED_NOREPLACE,
        )
    }
    .ok()?;
    if p.cast::<u8>() == at {
        return Some(at);
    }
    // An old kernel that ignores the flag put it elsewhere.
    // SAFETY: the mapping just made, ours alone.
    let _ = unsafe { rustix::mm::munmap(p, len) };
    None
}

/// Whether every byte of `[at, at + len)` is `b` (read with atomic loads).
fn all_bytes(at: *mut u8, len: usize, b: u8) -> bool {
    (0..len / 8).all(|w| {
        // SAFETY: `at` is a live mapping of `len` bytes the caller owns; aligned words.
        let v = unsafe { AtomicU64::from_ptr(at.cast::<u64>().add(w)) }.load(Ordering::Relaxed);
        v == u64::from_ne_bytes([b; 8])
    })
}

/// An embedder unmaps an adopted region (merged pages in it) and a new mapping takes the
/// same address at once: the backend never reads nor zeroes the new occupant. Every
/// operation on the region fails, before the fault thread has applied the unmap event
/// (the per-operation check finds the address no longer registered) and after (the
/// pages are gone), and the new occupant keeps its bytes through all of it and through
/// the memory's drop.
#[test]
fn a_new_mapping_at_an_unmapped_regions_address_is_never_read_nor_zeroed() {
    let Some(mem) = memory_with_events() else {
        return;
    };
    new_occupant_is_never_touched(mem);
}

/// The same without the unmap events (`LinuxConfig::events` off): the per-operation
/// checks alone keep the backend off the new occupant.
#[test]
fn without_events_a_new_mapping_at_an_unmapped_regions_address_is_never_touched() {
    let Some(mem) = memory_with(LinuxConfig::default().with_events(false)) else {
        return;
    };
    assert!(!mem.caps().events);
    new_occupant_is_never_touched(mem);
}

fn new_occupant_is_never_touched(mem: LinuxMemory) {
    let events = mem.caps().events;
    const PAGES: usize = 16;
    let len = PAGES * PAGE_SIZE;
    // Regions unmapped (one more each time another test took the address first).
    let mut unmapped = 0u64;
    let (base, r, t, frames, occupant) = loop {
        unmapped += 1;
        let base = embedder_mmap(len);
        // SAFETY: the test's own fresh private anonymous mapping.
        let r = unsafe { mem.adopt_region(base, len, DomainId(0)) }.unwrap();
        for i in 0..PAGES as u32 {
            fill(&mem, PageId::new(r, i), 1 + (i % 4) as u64);
        }
        let all = pages(r, 0..PAGES as u32);
        let t: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
        let frames: Vec<_> = (0..4)
            .map(|i| mem.canonicalize(all[i], t[i]).unwrap())
            .collect();
        for i in 4..8 {
            assert_eq!(
                mem.merge(all[i], t[i], &frames[i % 4]).unwrap(),
                MergeOutcome::Merged
            );
        }
        // The embedder unmaps it behind the backend's back (munmap returns once the fault
        // thread has read the unmap event), and maps new memory at the same address.
        // SAFETY: the test's own mapping; only fault-checked calls reach it afterwards.
        unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
        match map_exactly_at(base, len) {
            Some(o) => break (base, r, t, frames, o),
            // Another test took the address in between: try again elsewhere, once the
            // fault thread has applied this unmap.
            None => {
                if events {
                    wait_for_foreign_unmaps(&mem, unmapped * PAGES as u64);
                }
                continue;
            }
        }
    };
    // SAFETY: the new occupant, the test's own mapping.
    unsafe { std::ptr::write_bytes(occupant, 0xab, len) };
    let check = |mem: &LinuxMemory| {
        let mut buf = [0u8; PAGE_SIZE];
        for i in 0..PAGES as u32 {
            let p = PageId::new(r, i);
            let got = mem.read_page(p, &mut buf);
            assert!(got.is_err(), "page {i} read the new occupant: {got:?}");
            assert!(
                buf.iter().all(|&b| b != 0xab),
                "page {i}: occupant bytes leaked"
            );
            let mut w = [0u64; 2];
            assert!(mem.read_words(p, &mut w).is_err());
        }
        let all = pages(r, 0..PAGES as u32);
        assert!(mem.recycle(&all).iter().all(Result::is_err));
        assert!(mem.protect(&all).iter().all(Result::is_err));
        for p in &all {
            assert!(mem.unmerge(*p).is_err());
        }
        let zero = mem.zero_frame();
        // Refused, or (a failed protect having made the tokens stale) `Changed`: never
        // merged.
        let not_merged =
            |r: &Result<MergeOutcome, PageError>| !matches!(r, Ok(MergeOutcome::Merged));
        assert!(not_merged(&mem.merge(all[9], t[9], &frames[1])));
        assert!(not_merged(&mem.merge(all[10], t[10], &zero)));
        let items: Vec<_> = (8..12).map(|i| (all[i], t[i], &frames[i % 4])).collect();
        assert!(mem.merge_batch(&items).iter().all(not_merged));
        let canon: Vec<_> = (10..14).map(|i| (all[i], t[i])).collect();
        assert!(mem.canonicalize_batch(&canon).iter().all(Result::is_err));
        assert!(
            all_bytes(occupant, len, 0xab),
            "the backend wrote the new occupant"
        );
    };
    // At once, whether or not the fault thread has applied the event yet.
    check(&mem);
    // Once it has, the region is unmapped.
    if !events {
        check(&mem);
        drop(frames);
        drop(mem);
        assert!(
            all_bytes(occupant, len, 0xab),
            "the memory's drop wrote the new occupant"
        );
        // SAFETY: the new occupant, the test's own mapping; nothing refers to it any more.
        unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
        return;
    }
    let want = unmapped * PAGES as u64;
    wait_for_foreign_unmaps(&mem, want);
    assert_eq!(mem.stats().foreign_unmaps, want);
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(
        mem.read_page(PageId::new(r, 5), &mut buf),
        Err(PageError::Unmapped(r))
    );
    check(&mem);
    drop(frames);
    drop(mem);
    assert!(
        all_bytes(occupant, len, 0xab),
        "the memory's drop wrote the new occupant"
    );
    // SAFETY: the new occupant, the test's own mapping; nothing refers to it any more.
    unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
}

/// One page of a region unmapped by its owner: that page alone is gone.
#[test]
fn one_page_unmapped_by_its_owner_is_gone_alone() {
    let Some(mem) = memory_with_events() else {
        return;
    };
    const PAGES: usize = 8;
    let (base, len, r) = adopted(&mem, PAGES);
    for i in 0..PAGES as u32 {
        fill(&mem, PageId::new(r, i), 7);
    }
    // Page 2 is unmapped, but its address stays reserved (PROT_NONE), so that no other
    // test can take it.
    unmap_keeping_the_address(
        // SAFETY: inside the test's own mapping.
        unsafe { base.add(2 * PAGE_SIZE) },
        PAGE_SIZE,
    );
    wait_for_foreign_unmaps(&mem, 1);
    assert_eq!(mem.stats().foreign_unmaps, 1);
    let all = pages(r, 0..PAGES as u32);
    // A batched read of the run: every page but the gone one reads its contents.
    let mut bufs = vec![[0u8; PAGE_SIZE]; PAGES];
    let reads = mem.read_pages(&all, &mut bufs);
    let mut want = [0u8; PAGE_SIZE];
    mem.read_page(all[0], &mut want).unwrap();
    for (i, (r2, buf)) in reads.iter().zip(&bufs).enumerate() {
        if i == 2 {
            assert_eq!(*r2, Err(PageError::Unmapped(r)));
        } else {
            assert_eq!(*r2, Ok(()), "page {i}");
            assert!(buf[..] == want[..], "page {i}");
        }
    }
    let t = mem.protect(&all);
    for (i, t) in t.iter().enumerate() {
        if i == 2 {
            assert_eq!(*t, Err(PageError::Unmapped(r)));
        } else {
            assert!(t.is_ok(), "page {i}: {t:?}");
        }
    }
    let canon = mem.canonicalize(all[0], t[0].clone().unwrap()).unwrap();
    assert_eq!(
        mem.merge(all[1], t[1].clone().unwrap(), &canon).unwrap(),
        MergeOutcome::Merged
    );
    assert!(holds(&mem, all[1], 7) && holds(&mem, all[3], 7));
    assert_eq!(mem.regions().len(), 1);
    drop(canon);
    drop(mem);
    // SAFETY: the test's own mapping (page 2 a reservation); nothing refers to it any more.
    unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
}

/// The embedder moves a region with `mremap`: the backend learns of it (the region is
/// gone at its old address), a write at the new address is not held (the moved range is
/// unregistered), and the moved memory keeps its contents.
#[test]
fn a_region_moved_by_its_owner_is_gone_and_the_moved_memory_works() {
    let Some(mem) = memory_with_events() else {
        return;
    };
    const PAGES: usize = 8;
    let (base, len, r) = adopted(&mem, PAGES);
    // Pages 0 and 1 hold the same contents and get merged before the move.
    let seed = |i: usize| 3 + i.max(1) as u64;
    for i in 0..PAGES {
        fill(&mem, PageId::new(r, i as u32), seed(i));
    }
    let all = pages(r, 0..PAGES as u32);
    let t: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    let canon = mem.canonicalize(all[0], t[0]).unwrap();
    assert_eq!(
        mem.merge(all[1], t[1], &canon).unwrap(),
        MergeOutcome::Merged
    );
    let to = embedder_mmap(len);
    // The merged pages are mappings of their own (of the store, both at the same offset),
    // and mremap moves one mapping at a time: page 0, page 1, then pages 2-7.
    for (from, n) in [(0, 1), (1, 1), (2, PAGES - 2)] {
        // SAFETY: moves part of the test's own mapping over part of its own mapping `to`.
        // MREMAP_DONTUNMAP leaves the old range mapped (empty), so that no other test's
        // mapping can land there while the backend still remembers the region.
        unsafe {
            rustix::mm::mremap_fixed(
                base.add(from * PAGE_SIZE).cast(),
                n * PAGE_SIZE,
                n * PAGE_SIZE,
                rustix::mm::MremapFlags::MAYMOVE | rustix::mm::MremapFlags::DONTUNMAP,
                to.add(from * PAGE_SIZE).cast(),
            )
        }
        .expect("mremap");
    }
    wait_for_foreign_unmaps(&mem, PAGES as u64);
    assert_eq!(mem.stats().foreign_remaps, 3);
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(mem.read_page(all[0], &mut buf), Err(PageError::Unmapped(r)));
    // SAFETY: the test's own (moved) mapping; atomic accesses.
    let w = |i: usize, k: usize| unsafe {
        AtomicU64::from_ptr(to.add(i * PAGE_SIZE).cast::<u64>().add(k))
    };
    // The moved memory: its contents, and writable (protection gone with the registration;
    // the merged pages 0 and 1 are left unwritten, so that they still map the store).
    for i in 0..PAGES {
        assert_eq!(w(i, 1).load(Ordering::Relaxed), pattern(seed(i), 1));
        if i >= 2 {
            w(i, 0).store(42, Ordering::Relaxed);
            assert_eq!(w(i, 0).load(Ordering::Relaxed), 42);
        }
    }
    // The merged pages still read their contents once the engine's frame and the memory
    // are gone (their store pages are kept for the moved memory).
    drop(canon);
    drop(mem);
    for i in 0..PAGES {
        for k in 1..PAGE_WORDS {
            assert_eq!(
                w(i, k).load(Ordering::Relaxed),
                pattern(seed(i), k),
                "page {i}"
            );
        }
    }
    // SAFETY: the test's own mappings; nothing refers to them any more.
    unsafe {
        rustix::mm::munmap(to.cast(), len).unwrap();
        rustix::mm::munmap(base.cast(), len).unwrap();
    }
}

/// Drops `page` the way a balloon device does, behind the backend's back
/// (`MADV_DONTNEED` on guest memory).
fn embedder_dontneed(mem: &LinuxMemory, page: PageId) {
    let at = mem.page_ptr(page).unwrap();
    // SAFETY: a page of guest memory the test owns; dropping it is the embedder action
    // under test (the guest gave the page up).
    unsafe { rustix::mm::madvise(at.cast(), PAGE_SIZE, rustix::mm::Advice::LinuxDontNeed) }
        .unwrap();
}

/// `discard` makes every kind of page read zeros (private, canonical, merged, a private
/// copy in a store mapping, zero-merged), stales its tokens, releases store slots, and
/// the pages are usable again.
#[test]
fn discard_makes_every_kind_of_page_read_zeros() {
    let Some(mem) = memory() else { return };
    let r = mem.add_region(8, DomainId(0)).unwrap();
    let all = pages(r, 0..8);
    for p in &all[..5] {
        fill(&mem, *p, 1);
    }
    fill(&mem, all[5], 2);
    fill(&mem, all[7], 3);
    let t: Vec<_> = mem.protect(&all).into_iter().map(Result::unwrap).collect();
    let canon = mem.canonicalize(all[0], t[0]).unwrap();
    for i in 1..3 {
        assert_eq!(
            mem.merge(all[i], t[i], &canon).unwrap(),
            MergeOutcome::Merged
        );
    }
    word(&mem, all[2], 0).store(5, Ordering::Relaxed); // a private copy in a store mapping
    assert_eq!(mem.backing(all[2]).unwrap(), Backing::PrivateCopy);
    let zero = mem.zero_frame();
    assert_eq!(
        mem.merge(all[6], t[6], &zero).unwrap(),
        MergeOutcome::Merged
    );
    assert_eq!(mem.stats().store_slots, 1);
    let out = mem.discard(&all);
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let mut buf = [1u8; PAGE_SIZE];
    for (i, p) in all.iter().enumerate() {
        mem.read_page(*p, &mut buf).unwrap();
        assert!(is_zero_page(&buf), "page {i}");
        assert_eq!(word(&mem, *p, 9).load(Ordering::Relaxed), 0, "page {i}");
        assert_eq!(mem.backing(*p).unwrap(), Backing::Zero);
        assert!(mem.written_since(*p, t[i]).unwrap());
    }
    assert_eq!(mem.stats().discarded, 8);
    drop(canon);
    assert_eq!(mem.stats().store_slots, 0);
    assert_eq!(mem.usage().unwrap().store_bytes, 0);
    fill(&mem, all[1], 9);
    assert!(holds(&mem, all[1], 9));
    assert_eq!(mem.stats().foreign_removes, 0);
}

/// A balloon's own `MADV_DONTNEED` on guest pages that lie in mappings of the canonical
/// store: a merged page reads its own contents again; a page whose private copy is
/// dropped reads zeros or the contents it was merged with, never the contents another
/// trust domain put in the store since, because its store offset is not handed out again
/// while the page lies in a mapping of it. Tokens of dropped pages are stale.
#[test]
fn an_embedders_dontneed_never_shows_another_domains_bytes() {
    let Some(mem) = memory_with_events() else {
        return;
    };
    let ra = mem.add_region(3, DomainId(0)).unwrap();
    let rb = mem.add_region(1, DomainId(1)).unwrap();
    let [a0, a1, a2] = [0, 1, 2].map(|i| PageId::new(ra, i));
    let b0 = PageId::new(rb, 0);
    // A merged page (it maps its slot) dropped by the embedder: its own contents.
    fill(&mem, a0, 1);
    fill(&mem, a2, 1);
    let t = mem.protect(&[a0, a2]);
    let (ta0, ta2) = (t[0].clone().unwrap(), t[1].clone().unwrap());
    let f1 = mem.canonicalize(a0, ta0).unwrap();
    assert_eq!(mem.merge(a2, ta2, &f1).unwrap(), MergeOutcome::Merged);
    embedder_dontneed(&mem, a2);
    assert!(holds(&mem, a2, 1));
    let t0 = Instant::now();
    while mem.stats().foreign_removes < 1 && t0.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
    assert!(
        mem.written_since(a2, ta2).unwrap(),
        "a dropped page's token stays valid"
    );

    // Page a1 gets a private copy inside a mapping of an overflow slot (a0's home slot
    // is still held by f1), whose contents then go away.
    fill(&mem, a0, 2);
    fill(&mem, a1, 2);
    let t = mem.protect(&[a0, a1]);
    let f2 = mem.canonicalize(a0, t[0].clone().unwrap()).unwrap();
    assert_ne!(f2.store_offset(), f1.store_offset());
    assert_eq!(
        mem.merge(a1, t[1].clone().unwrap(), &f2).unwrap(),
        MergeOutcome::Merged
    );
    let offset = f2.store_offset();
    word(&mem, a1, 0).store(pattern(2, 0), Ordering::Relaxed); // copy-on-write break
    assert_eq!(mem.backing(a1).unwrap(), Backing::PrivateCopy);
    drop(f2);
    assert!(mem.recycle(&[a0]).iter().all(Result::is_ok));
    // Domain 1 puts new contents into the store's overflow area.
    fill(&mem, b0, 5);
    let tb = mem.protect(&[b0])[0].clone().unwrap();
    let g1 = mem.canonicalize(b0, tb).unwrap();
    fill(&mem, b0, 6);
    let tb = mem.protect(&[b0])[0].clone().unwrap();
    let g2 = mem.canonicalize(b0, tb).unwrap();
    assert_ne!(
        g2.store_offset(),
        offset,
        "a1's store offset was handed out again"
    );
    // The balloon drops a1: zeros or its own old contents, never domain 1's.
    embedder_dontneed(&mem, a1);
    let mut buf = [0u8; PAGE_SIZE];
    mem.read_page(a1, &mut buf).unwrap();
    let own = holds(&mem, a1, 2);
    assert!(
        is_zero_page(&buf) || own,
        "a1 reads neither zeros nor its own contents"
    );
    assert!(!holds(&mem, a1, 6) && !holds(&mem, a1, 5));
    eprintln!(
        "after the embedder's MADV_DONTNEED a1 reads {}",
        if own { "its own old contents" } else { "zeros" }
    );
    // It is still guest memory that works.
    fill(&mem, a1, 8);
    assert!(holds(&mem, a1, 8));
    drop((f1, g1, g2));
}

/// What the backend's design rests on, checked on this kernel with a userfaultfd of the
/// test's own: a thread that unmaps (`munmap`) or drops (`MADV_DONTNEED`) registered
/// memory with `UFFD_FEATURE_EVENT_UNMAP` / `EVENT_REMOVE` on is held by the kernel until
/// the event is read, and reads it as the range it unmapped or dropped.
#[test]
fn the_kernel_holds_unmappers_and_droppers_until_their_event_is_read() {
    const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
    const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
    const EVENT_REMOVE: u64 = 1 << 3;
    const EVENT_UNMAP: u64 = 1 << 6;
    // SAFETY: userfaultfd(2) with flags only; returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | 1,
        )
    };
    if fd < 0 {
        eprintln!("SKIPPED: no userfaultfd here");
        return;
    }
    let fd = fd as i32;
    let mut api = [0xAAu64, EVENT_REMOVE | EVENT_UNMAP, 0];
    // SAFETY: UFFDIO_API takes a `struct uffdio_api` (three u64), which `api` is.
    if unsafe { libc::ioctl(fd, UFFDIO_API, api.as_mut_ptr()) } != 0 {
        eprintln!("SKIPPED: no non-cooperative events here");
        // SAFETY: the descriptor made above.
        unsafe { libc::close(fd) };
        return;
    }
    let len = 4 * PAGE_SIZE;
    let base = embedder_mmap(len);
    // MISSING | WP: a plain registration of anonymous memory.
    let mut reg = [base as u64, len as u64, 1 | 2, 0];
    // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register` (range, mode, ioctls).
    let registered = unsafe { libc::ioctl(fd, UFFDIO_REGISTER, reg.as_mut_ptr()) };
    assert_eq!(registered, 0);
    // Reads one event (waits for it): (event, start, end).
    let read_event = || -> (u8, u64, u64) {
        loop {
            let mut msg = [0u64; 4];
            // SAFETY: reads at most one 32-byte `struct uffd_msg` into `msg`.
            let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), 32) };
            if n == 32 {
                return ((msg[0] & 0xff) as u8, msg[1], msg[2]);
            }
            thread::sleep(Duration::from_millis(1));
        }
    };
    let hold = Duration::from_millis(100);
    let addr = base as usize;
    // Runs `call` on a thread of its own and reads its event `hold` after the thread
    // started it: the call must not have returned before the reading began.
    let held = |call: Box<dyn FnOnce() -> i32 + Send>| -> (u8, u64, u64) {
        let started = Arc::new(AtomicBool::new(false));
        let reading = Arc::new(AtomicBool::new(false));
        let (s, rd) = (started.clone(), reading.clone());
        let caller = thread::spawn(move || {
            s.store(true, Ordering::SeqCst);
            let r = call();
            (r, rd.load(Ordering::SeqCst))
        });
        while !started.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        thread::sleep(hold);
        reading.store(true, Ordering::SeqCst);
        let event = read_event();
        let (r, after_reading) = caller.join().unwrap();
        assert_eq!(r, 0);
        assert!(after_reading, "the call returned before its event was read");
        event
    };
    // MADV_DONTNEED of page 1: held until the REMOVE event is read.
    let (event, start, end) = held(Box::new(move || {
        // SAFETY: page 1 of the test's own mapping.
        unsafe {
            libc::madvise(
                (addr + PAGE_SIZE) as *mut libc::c_void,
                PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        }
    }));
    assert_eq!(
        (event, start, end),
        (
            0x15,
            (addr + PAGE_SIZE) as u64,
            (addr + 2 * PAGE_SIZE) as u64
        )
    );
    // munmap of the whole range: held until the UNMAP event is read.
    let (event, start, end) = held(Box::new(move || {
        // SAFETY: the test's own mapping, which nothing uses any more.
        unsafe { libc::munmap(addr as *mut libc::c_void, len) }
    }));
    assert_eq!(
        (event, start, end),
        (0x16, addr as u64, (addr + len) as u64)
    );
    eprintln!("MADV_DONTNEED and munmap each held until their event was read ({hold:?})");
    // SAFETY: the descriptor made above.
    unsafe { libc::close(fd) };
}

/// `read_pages` gives what `read_page` gives, page for page, over runs longer than
/// `max_run_pages`, pages out of order, single pages and pages of two regions.
#[test]
fn read_pages_reads_what_read_page_reads() {
    let Some(mem) = memory() else {
        return;
    };
    let a = mem.add_region(150, DomainId(0)).unwrap();
    let b = mem.add_region(3, DomainId(0)).unwrap();
    for i in 0..150 {
        fill(&mem, PageId::new(a, i), 1000 + i as u64);
    }
    for i in 0..3 {
        fill(&mem, PageId::new(b, i), 5000 + i as u64);
    }
    let mut list = pages(a, 0..150);
    list.extend([PageId::new(b, 2), PageId::new(a, 7), PageId::new(b, 0)]);
    list.extend(pages(b, 0..3));
    let _ = mem.protect(&pages(a, 10..90));
    let mut bufs = vec![[0u8; PAGE_SIZE]; list.len()];
    let reads = mem.read_pages(&list, &mut bufs);
    assert_eq!(reads.len(), list.len());
    let mut one = [0u8; PAGE_SIZE];
    for ((&p, r), buf) in list.iter().zip(&reads).zip(&bufs) {
        assert_eq!(*r, Ok(()), "{p}");
        mem.read_page(p, &mut one).unwrap();
        assert!(buf[..] == one[..], "{p}");
    }
    assert_eq!(
        mem.read_pages(&[PageId::new(b, 3)], &mut bufs[..1]),
        vec![Err(PageError::NoSuchPage(PageId::new(b, 3)))]
    );
}

/// Fault threads that keep polling after a fault (`fault_spin`, up to forever) resolve
/// every write, lose none, still take the backend's own events, and stop when the memory
/// is dropped.
#[test]
fn spinning_fault_threads_resolve_every_write_and_stop() {
    for (spin, threads) in [
        (Duration::from_micros(200), 1),
        (Duration::MAX, 1),
        (Duration::MAX, 2),
    ] {
        let config = LinuxConfig::default()
            .with_fault_spin(spin)
            .with_fault_threads(threads);
        let Some(mem) = memory_with(config) else {
            return;
        };
        let r = mem.add_region(64, DomainId(0)).unwrap();
        let pages: Vec<PageId> = (0..64).map(|i| PageId::new(r, i)).collect();
        for (n, &p) in pages.iter().enumerate() {
            fill(&mem, p, 1000 + (n % 32) as u64);
        }
        let t: Vec<_> = mem
            .protect(&pages)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // Merge the second half into the first (events round trips while spinning).
        let frames: Vec<LinuxFrame> = (0..32)
            .map(|i| mem.canonicalize(pages[i], t[i]).unwrap())
            .collect();
        for i in 32..64 {
            assert_eq!(
                mem.merge(pages[i], t[i], &frames[i - 32]).unwrap(),
                MergeOutcome::Merged
            );
        }
        let before = mem.stats();
        for &p in &pages {
            word(&mem, p, 9).store(0xabc, Ordering::Relaxed);
        }
        for (n, &p) in pages.iter().enumerate() {
            assert_eq!(word(&mem, p, 9).load(Ordering::Relaxed), 0xabc);
            let seed = 1000 + (n % 32) as u64;
            assert_eq!(word(&mem, p, 10).load(Ordering::Relaxed), pattern(seed, 10));
        }
        let after = mem.stats();
        assert_eq!(after.write_faults - before.write_faults, 64);
        assert_eq!(after.cow_breaks - before.cow_breaks, 64);
        drop(frames);
        drop(mem);
    }
}

/// The CPUs a thread of this process may run on, from `/proc` (`Cpus_allowed_list`).
fn cpus_allowed(task: &std::path::Path) -> String {
    std::fs::read_to_string(task.join("status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// A batch of the backend's own remaps brings the fault thread onto the caller's CPU
/// (`LinuxConfig::fault_threads_follow`, see the backend's `follow.rs`), and its own
/// affinity is back once the batch is done: the contents merge as ever.
#[test]
fn the_fault_thread_goes_back_to_its_cpus_after_a_batch() {
    let Some(mem) = memory() else { return };
    let r = mem.add_region(64, DomainId(0)).unwrap();
    let pages: Vec<PageId> = (0..64).map(|i| PageId::new(r, i)).collect();
    for &p in &pages {
        fill(&mem, p, 1 + (p.index % 2) as u64);
    }
    let ours = cpus_allowed(std::path::Path::new("/proc/thread-self"));
    // This memory's fault threads (other tests' run beside them).
    let t0 = Instant::now();
    while mem.fault_thread_ids().is_empty() && t0.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(1));
    }
    let faults: Vec<std::path::PathBuf> = mem
        .fault_thread_ids()
        .iter()
        .map(|tid| std::path::PathBuf::from(format!("/proc/self/task/{tid}")))
        .collect();
    assert!(!faults.is_empty(), "a fault thread runs");
    // What the fault threads may run on while the batch is under way (the dirty hook is
    // told of each merged page inside the batch).
    let during = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, watched) = (during.clone(), faults.clone());
    mem.set_dirty_hook(Some(Arc::new(move |_| {
        let mut seen = seen.lock().unwrap();
        if seen.is_empty() {
            seen.extend(watched.iter().map(|t| cpus_allowed(t)));
        }
    })));
    let tokens: Vec<page_memory::ProtectToken> = mem
        .protect(&pages)
        .into_iter()
        .map(|t| t.unwrap())
        .collect();
    let canon = mem
        .canonicalize_batch(&[(pages[0], tokens[0]), (pages[1], tokens[1])])
        .into_iter()
        .map(|f| f.unwrap())
        .collect::<Vec<_>>();
    let items: Vec<(PageId, page_memory::ProtectToken, &LinuxFrame)> = (2..64)
        .map(|i| (pages[i], tokens[i], &canon[i % 2]))
        .collect();
    for r in mem.merge_batch(&items) {
        assert_eq!(r.unwrap(), MergeOutcome::Merged);
    }
    let during = during.lock().unwrap().clone();
    assert_eq!(during.len(), faults.len());
    for cpus in &during {
        // One CPU (the caller's) while the batch ran.
        assert!(cpus.parse::<usize>().is_ok(), "during the batch: {cpus}");
    }
    for t in &faults {
        assert_eq!(cpus_allowed(t), ours, "{}", t.display());
    }
    for &p in &pages {
        assert!(holds(&mem, p, 1 + (p.index % 2) as u64));
    }
    // An affinity the embedder gives a fault thread between batches stays after the next.
    let tid = mem.fault_thread_ids()[0];
    let mut cpu0 = rustix::thread::CpuSet::new();
    cpu0.set(0);
    rustix::thread::sched_setaffinity(rustix::thread::Pid::from_raw(tid), &cpu0).unwrap();
    for r in mem.recycle(&pages[32..40]) {
        r.unwrap();
    }
    let task = std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
    assert_eq!(cpus_allowed(&task), "0");
}
