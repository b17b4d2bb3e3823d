//! [`RecyclerThread`]: the recycler on its own thread, with its own reclaim period.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use page_memory::PageMemory;

use crate::Recycler;

/// Runs [`Recycler::scan_pass`] every reclaim period on a thread of its own, for hosts
/// that recycle without deduplicating. Dropping it stops the thread.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use page_memory::sim::SimMemory;
/// use ppr_host::{Recycler, RecyclerThread};
///
/// let mem = Arc::new(SimMemory::new());
/// let recycler = Arc::new(Recycler::new()); // register the guests' pools first
/// let host = RecyclerThread::spawn(recycler.clone(), mem, Duration::from_millis(10))?;
/// while recycler.stats().passes < 2 {
///     std::thread::yield_now();
/// }
/// host.stop();
/// # Ok::<(), std::io::Error>(())
/// ```
#[must_use = "dropping the handle stops the recycler thread"]
pub struct RecyclerThread {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RecyclerThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecyclerThread")
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

impl RecyclerThread {
    /// Starts scanning `memory` every `period` (the first pass at once).
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn spawn<M: PageMemory + 'static>(
        recycler: Arc<Recycler>,
        memory: Arc<M>,
        period: Duration,
    ) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ppr-recycler".into())
            .spawn(move || loop {
                recycler.scan_pass(&*memory);
                let (lock, cv) = &*s;
                let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (stopped, _) = cv
                    .wait_timeout_while(stopped, period, |stopped| !*stopped)
                    .unwrap_or_else(|e| e.into_inner());
                if *stopped {
                    return;
                }
            })?;
        Ok(RecyclerThread {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread after its current pass.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RecyclerThread {
    fn drop(&mut self) {
        self.halt();
    }
}
