//! The work threads: one queue of chunks each, with stealing when a queue runs dry.
//!
//! A pass puts each chunk on its home thread's queue (a region's chunks share a home, so
//! one VM's merges stay on one thread). A thread takes work from the front of its own
//! queue and, when that is empty, steals from the back of the others'. Passes are
//! serialized by the caller; `run` returns once every chunk of the pass is done. A pass
//! hands the threads its [`Layout`] with its chunks: the indices in the queues are
//! indices in that layout, which `refresh_regions` cannot replace while a pass runs.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use page_memory::PageMemory;

use crate::page::PassKind;
use crate::stats::{WorkerCounters, WorkerStats};
use crate::{Layout, Shared};

struct PassState<M: PageMemory> {
    kind: PassKind,
    /// The layout of the current (or last) pass: the queued indices are its chunks.
    layout: Arc<Layout<M>>,
    /// Chunks of the current pass not yet done.
    pending: usize,
    /// Bumped whenever work is queued, so a thread cannot miss a wake-up.
    generation: u64,
    shutdown: bool,
}

struct Inner<M: PageMemory> {
    shared: Arc<Shared<M>>,
    queues: Vec<Mutex<VecDeque<usize>>>,
    state: Mutex<PassState<M>>,
    work: Condvar,
    done: Condvar,
    workers: Vec<WorkerCounters>,
}

/// A cloneable reference to the pool, for the daemon.
pub(crate) struct PoolHandle<M: PageMemory> {
    inner: Arc<Inner<M>>,
}

/// The pool and its threads.
pub(crate) struct Pool<M: PageMemory> {
    inner: Arc<Inner<M>>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<M: PageMemory + 'static> Pool<M> {
    /// Starts `threads` work threads; if one cannot be spawned, stops the others and
    /// returns the error.
    pub(crate) fn start(shared: Arc<Shared<M>>, threads: usize) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            queues: (0..threads).map(|_| Mutex::new(VecDeque::new())).collect(),
            state: Mutex::new(PassState {
                kind: PassKind::Merge,
                layout: shared.layout(),
                pending: 0,
                generation: 0,
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            workers: (0..threads).map(|_| WorkerCounters::default()).collect(),
            shared,
        });
        let mut pool = Pool {
            inner,
            threads: Vec::with_capacity(threads),
        };
        for w in 0..threads {
            let inner = pool.inner.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pageone-worker-{w}"))
                .spawn(move || worker_loop(&inner, w));
            match spawned {
                Ok(t) => pool.threads.push(t),
                Err(e) => {
                    // Stop the threads already started before giving up.
                    pool.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    pub(crate) fn handle(&self) -> PoolHandle<M> {
        PoolHandle {
            inner: self.inner.clone(),
        }
    }

    pub(crate) fn worker_stats(&self) -> Vec<WorkerStats> {
        self.inner
            .workers
            .iter()
            .map(|w| WorkerStats {
                pages_scanned: w.pages_scanned.load(Ordering::Relaxed),
                busy: std::time::Duration::from_nanos(w.busy_ns.load(Ordering::Relaxed)),
                tasks: w.tasks.load(Ordering::Relaxed),
                steals: w.steals.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub(crate) fn shutdown(&mut self) {
        lock(&self.inner.state).shutdown = true;
        self.inner.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<M: PageMemory + 'static> PoolHandle<M> {
    /// Runs `kind` over `chunks` (indices in `layout`) on the work threads; returns when
    /// all are done.
    pub(crate) fn run(&self, kind: PassKind, layout: &Arc<Layout<M>>, chunks: &[usize]) {
        if chunks.is_empty() {
            return;
        }
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        if state.shutdown {
            return;
        }
        state.kind = kind;
        state.layout = layout.clone();
        state.pending = chunks.len();
        for &c in chunks {
            let home = layout.home[c] % inner.queues.len();
            lock(&inner.queues[home]).push_back(c);
        }
        state.generation += 1;
        inner.work.notify_all();
        while state.pending > 0 && !state.shutdown {
            state = inner.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The next chunk for thread `w`: its own queue first, then a steal.
fn take<M: PageMemory>(inner: &Inner<M>, w: usize) -> Option<(usize, bool)> {
    if let Some(c) = lock(&inner.queues[w]).pop_front() {
        return Some((c, false));
    }
    let n = inner.queues.len();
    (1..n).find_map(|d| {
        lock(&inner.queues[(w + d) % n])
            .pop_back()
            .map(|c| (c, true))
    })
}

fn worker_loop<M: PageMemory + 'static>(inner: &Inner<M>, w: usize) {
    let counters = &inner.workers[w];
    loop {
        let seen = {
            let s = lock(&inner.state);
            if s.shutdown {
                return;
            }
            s.generation
        };
        while let Some((c, stolen)) = take(inner, w) {
            // Holding a chunk of the current pass, whose kind and layout cannot change
            // until the pass ends.
            let (kind, layout) = {
                let s = lock(&inner.state);
                (s.kind, s.layout.clone())
            };
            let start = Instant::now();
            let ctx = inner.shared.ctx(counters, &layout);
            let tally = ctx.run(&layout.chunks[c], kind);
            lock(&inner.shared.pass_tally).add(&tally);
            // Hand what this chunk retired (canonical pages taken out of a tree) to the
            // global collector, so it is freed once no thread can read it, not whenever
            // this thread next runs.
            sdtree::epoch::pin().flush();
            counters
                .busy_ns
                .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            counters.tasks.fetch_add(1, Ordering::Relaxed);
            if stolen {
                counters.steals.fetch_add(1, Ordering::Relaxed);
            }
            let mut s = lock(&inner.state);
            s.pending -= 1;
            if s.pending == 0 {
                inner.done.notify_all();
            }
        }
        let mut s = lock(&inner.state);
        while s.generation == seen && !s.shutdown {
            s = inner.work.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}
