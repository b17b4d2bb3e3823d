//! [`KsmThread`]: the scanner on a background thread, like `ksmd`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use page_memory::PageMemory;

use crate::{Ksm, KsmStats, UnmergeReport};

/// The knobs `ksmd` reads between batches.
#[derive(Clone, Copy, Debug)]
struct Control {
    pages_to_scan: usize,
    sleep: Duration,
    /// KSM's `run`: scan (true) or stay idle (false).
    run: bool,
    stop: bool,
}

struct Shared<M: PageMemory> {
    /// The scanner, held by the thread for one batch at a time (KSM's `ksm_thread_mutex`).
    ksm: Mutex<Option<Ksm<M>>>,
    control: Mutex<Control>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A [`Ksm`] scanned by a background thread: batches of `pages_to_scan` pages with a
/// `sleep` between them, as `ksm_scan_thread` does. Dropping it stops the thread.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use ksm_baseline::{Ksm, KsmConfig, KsmThread};
/// use page_memory::sim::SimMemory;
/// use page_memory::{DomainId, PageId};
///
/// let mem = Arc::new(SimMemory::new());
/// let r = mem.add_region(8, DomainId(0));
/// for i in 0..8 {
///     mem.write(PageId::new(r, i), 0, b"same").unwrap();
/// }
/// let ksmd = KsmThread::spawn(Ksm::new(mem.clone(), KsmConfig::default()), 100, Duration::ZERO)?;
/// while ksmd.stats().pages_sharing < 7 {
///     std::thread::sleep(Duration::from_millis(1));
/// }
/// let ksm = ksmd.stop();
/// assert_eq!(ksm.stats().pages_shared, 1);
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "dropping the handle stops the scanner thread"]
pub struct KsmThread<M: PageMemory + 'static> {
    shared: Arc<Shared<M>>,
    handle: Option<JoinHandle<()>>,
}

impl<M: PageMemory + 'static> std::fmt::Debug for KsmThread<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KsmThread")
            .field("control", &*lock(&self.shared.control))
            .field("running", &self.handle.is_some())
            .finish_non_exhaustive()
    }
}

impl<M: PageMemory + 'static> KsmThread<M> {
    /// Starts scanning `ksm` on a new thread, `pages_to_scan` pages per batch (KSM's
    /// default is [`crate::DEFAULT_PAGES_TO_SCAN`]) and `sleep` between batches
    /// ([`crate::DEFAULT_SLEEP`]).
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn spawn(ksm: Ksm<M>, pages_to_scan: usize, sleep: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            ksm: Mutex::new(Some(ksm)),
            control: Mutex::new(Control {
                pages_to_scan,
                sleep,
                run: true,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("ksmd-baseline".into())
            .spawn(move || run(&s))?;
        Ok(KsmThread {
            shared,
            handle: Some(handle),
        })
    }

    /// Sets the pages per batch (KSM's `pages_to_scan`).
    pub fn set_pages_to_scan(&self, pages: usize) {
        lock(&self.shared.control).pages_to_scan = pages;
        self.shared.wake.notify_all();
    }

    /// Sets the sleep between batches (KSM's `sleep_millisecs`); wakes the thread.
    pub fn set_sleep(&self, sleep: Duration) {
        lock(&self.shared.control).sleep = sleep;
        self.shared.wake.notify_all();
    }

    /// Resumes scanning after [`KsmThread::pause`] or [`KsmThread::unmerge_all`] (KSM's
    /// `run = 1`).
    pub fn resume(&self) {
        lock(&self.shared.control).run = true;
        self.shared.wake.notify_all();
    }

    /// Stops scanning (after the batch under way) but keeps everything merged (KSM's
    /// `run = 0`).
    pub fn pause(&self) {
        lock(&self.shared.control).run = false;
        self.shared.wake.notify_all();
    }

    /// Stops scanning and unmerges everything (KSM's `run = 2`).
    pub fn unmerge_all(&self) -> UnmergeReport {
        self.pause();
        self.with(|ksm| ksm.unmerge_all())
    }

    /// The scanner's counters (waits for the batch under way, if any).
    pub fn stats(&self) -> KsmStats {
        self.with(|ksm| ksm.stats())
    }

    /// Runs `f` on the scanner between two batches.
    pub fn with<R>(&self, f: impl FnOnce(&mut Ksm<M>) -> R) -> R {
        let mut guard = lock(&self.shared.ksm);
        f(guard
            .as_mut()
            .expect("ksm-baseline: the scanner is only taken out by stop"))
    }

    /// Stops the thread (after the batch under way) and returns the scanner.
    pub fn stop(mut self) -> Ksm<M> {
        self.halt();
        lock(&self.shared.ksm)
            .take()
            .expect("ksm-baseline: the scanner is only taken out by stop")
    }

    fn halt(&mut self) {
        lock(&self.shared.control).stop = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.handle.take() {
            // A panic in the scanner thread already poisoned nothing we cannot recover.
            let _ = h.join();
        }
    }
}

impl<M: PageMemory + 'static> Drop for KsmThread<M> {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The thread: `ksm_scan_thread`.
fn run<M: PageMemory>(s: &Shared<M>) {
    loop {
        let c = *lock(&s.control);
        if c.stop {
            return;
        }
        if c.run {
            if let Some(ksm) = lock(&s.ksm).as_mut() {
                ksm.scan(c.pages_to_scan);
            }
        }
        let mut g = lock(&s.control);
        if g.stop {
            return;
        }
        if g.run {
            // Sleep, but wake at once for stop or a knob change.
            let before = *g;
            let (g2, _) = s
                .wake
                .wait_timeout_while(g, c.sleep, |now| {
                    !now.stop && now.sleep == before.sleep && now.run == before.run
                })
                .unwrap_or_else(|e| e.into_inner());
            drop(g2);
        } else {
            while !g.run && !g.stop {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}
