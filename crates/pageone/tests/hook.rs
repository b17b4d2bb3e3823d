//! The scan hook in PageONE's passes: each chunk's volatile pages are offered in one
//! `examine_batch` call (one round trip for a hook across processes), only volatile pages
//! are offered, and the pages the hook takes are counted and left alone that pass.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use page_memory::sim::SimMemory;
use page_memory::{DomainId, PageId, PageMemory, ScanHook};
use pageone::{Config, PageOne};

/// Records every batch; takes (recycles) the pages whose first word is `0xdead`.
#[derive(Debug, Default)]
struct Recorder {
    batches: Mutex<Vec<Vec<PageId>>>,
    singles: Mutex<u64>,
}

impl<M: PageMemory> ScanHook<M> for Recorder {
    fn examine(&self, _memory: &M, _page: PageId) -> bool {
        *self.singles.lock().unwrap() += 1;
        false
    }

    fn examine_batch(&self, memory: &M, pages: &[PageId], taken: &mut [bool]) {
        self.batches.lock().unwrap().push(pages.to_vec());
        for (&p, t) in pages.iter().zip(taken.iter_mut()) {
            let mut w = [0u64; 1];
            *t = memory.read_words(p, &mut w).is_ok()
                && w[0] == 0xdead
                && matches!(memory.recycle(&[p]).pop(), Some(Ok(())));
        }
    }
}

impl Recorder {
    fn take(&self) -> Vec<Vec<PageId>> {
        std::mem::take(&mut *self.batches.lock().unwrap())
    }
}

#[test]
fn each_chunk_offers_its_volatile_pages_in_one_batch() {
    let mem = Arc::new(SimMemory::new());
    // Three chunks: 512 + 512 + 3 pages, every page different.
    let r = mem.add_region(1027, DomainId(0));
    for i in 0..1027 {
        mem.write_word(PageId::new(r, i), 1, 0x1000 + i as u64)
            .unwrap();
    }
    mem.write_word(PageId::new(r, 600), 0, 0xdead).unwrap();
    let hook = Arc::new(Recorder::default());
    let config = Config::default()
        .work_threads(1)
        .stable_periods(1)
        .merge_period(Duration::from_millis(5));
    let engine = PageOne::with_hook(mem.clone(), config, hook.clone()).unwrap();
    engine.merge_pass();
    let mut batches = hook.take();
    batches.sort_by_key(|b| b.first().map(|p| p.index));
    let lens: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(lens, [512, 512, 3], "every page is volatile at first");
    for b in &batches {
        assert!(
            b.windows(2).all(|w| w[1].index == w[0].index + 1),
            "in order"
        );
    }
    assert_eq!(*hook.singles.lock().unwrap(), 0, "only batches");
    // The marked page was taken: recycled, counted.
    assert_eq!(engine.stats().recycled, 1);
    assert_eq!(mem.read_word(PageId::new(r, 600), 0).unwrap(), 0);
    // Once the pages are watched or merged, only pages written since are offered.
    for _ in 0..6 {
        engine.merge_pass();
    }
    hook.take();
    mem.write_word(PageId::new(r, 5), 0, 0xdead).unwrap();
    engine.merge_pass();
    let batches = hook.take();
    assert!(
        batches.iter().flatten().any(|&p| p == PageId::new(r, 5)),
        "{batches:?}"
    );
    assert!(
        batches
            .iter()
            .flatten()
            .all(|&p| p.index == 5 || p.index == 600),
        "only volatile pages are offered: {batches:?}"
    );
    assert_eq!(engine.stats().recycled, 2);
    assert_eq!(mem.read_word(PageId::new(r, 5), 0).unwrap(), 0);
}
