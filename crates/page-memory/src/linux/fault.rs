//! The fault thread(s): every guest write to a protected page stops in the kernel and is
//! resolved here (see *Write protection* in the module docs).

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::region::{gone_or, Kind, PageState, Region};
use super::stats::bump;
use super::store::Slot;
use super::sys::uffd::{Event, Uffd};
use super::sys::{self, Advice};
use super::Inner;
use crate::{PageError, PAGE_SIZE};

/// The running fault threads; dropping it stops and joins them.
pub(super) struct FaultThreads {
    /// An eventfd the threads poll besides the userfaultfd: written to stop them.
    stop: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl FaultThreads {
    /// Starts [`LinuxConfig::fault_threads`](super::LinuxConfig::fault_threads) threads
    /// (at least one) on `inner`'s userfaultfd. A thread that cannot be created is an
    /// error (the ones already started are stopped again).
    pub(super) fn start(inner: &Arc<Inner>) -> Result<FaultThreads, PageError> {
        let stop = sys::eventfd().map_err(|e| PageError::Os {
            op: "eventfd (fault thread stop)",
            errno: e.raw_os_error(),
        })?;
        let mut faults = FaultThreads {
            stop: Arc::new(stop),
            threads: Vec::new(),
        };
        for n in 0..inner.config.fault_threads.max(1) {
            let (inner, stop) = (inner.clone(), faults.stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("page-memory-uffd-{n}"))
                .spawn(move || fault_loop(&inner, &stop))
                .map_err(|e| PageError::Os {
                    op: "spawn a userfaultfd fault thread",
                    errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
                })?;
            faults.threads.push(t);
        }
        Ok(faults)
    }

    /// Threads running.
    pub(super) fn len(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for FaultThreads {
    fn drop(&mut self) {
        let _ = sys::signal(self.stop.as_fd());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

thread_local! {
    /// Set in the fault threads: they must never wait for the userfaultfd to be read
    /// (they are its readers), so they do not retry `EAGAIN` (see [`Inner::wp_call`]).
    static IN_FAULT_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is a fault thread.
pub(super) fn in_fault_thread() -> bool {
    IN_FAULT_THREAD.with(Cell::get)
}

/// Something a fault thread has to do, kept until it can be done without waiting.
#[derive(Debug)]
enum Work {
    /// A write fault at this address.
    Fault(usize),
    /// A range event, applied page by page from `next` on.
    Range {
        what: RangeEvent,
        end: usize,
        next: usize,
    },
    /// Unregister a range that moved out of a region (`UFFD_EVENT_REMAP`'s destination,
    /// still registered and write-protected).
    Unregister { start: usize, len: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RangeEvent {
    Unmap,
    Remove,
    Moved,
}

/// How long a fault thread with work it could not do waits before it tries again
/// (unless a message arrives first).
const RETRY: Duration = Duration::from_micros(20);

/// The fault thread: reads the userfaultfd until `stop` is signalled, and resolves write
/// faults and applies events.
///
/// It never waits for a page lock nor retries a call that fails because an event is
/// pending (`EAGAIN`): an operation holding a page lock may itself be waiting for the
/// userfaultfd to be read (its `mmap(MAP_FIXED)` or `MADV_DONTNEED` raised an event, and
/// the kernel holds the caller until a reader reads it). Work that cannot be done now is
/// kept, in order, and tried again after the next read or within [`RETRY`].
fn fault_loop(inner: &Inner, stop: &OwnedFd) {
    let Some(uffd) = &inner.uffd else { return };
    IN_FAULT_THREAD.with(|f| f.set(true));
    inner.follow.register_this_thread();
    let mut buf = Uffd::msg_buffer(64);
    let mut pending: VecDeque<Work> = VecDeque::new();
    let spin = inner.config.fault_spin;
    let own_spin = inner.config.own_event_spin;
    // When this thread last read a write fault.
    let mut last_fault: Option<Instant> = None;
    loop {
        // With `own_event_spin`, while an own remap or drop is under way, poll without
        // sleeping: its caller is held by the kernel until its event is read, and waking
        // a sleeping fault thread costs that caller about 10 µs more on this project's
        // machine. For the same reason, keep polling for `fault_spin` after a write
        // fault: the writer of the next one is then not held for our wake-up either.
        let spinning = spin == Duration::MAX
            || (!spin.is_zero() && last_fault.is_some_and(|t| t.elapsed() < spin));
        let own = own_spin && inner.own_in_flight.load(Ordering::Relaxed) > 0;
        let timeout = if spinning || own {
            Some(Duration::ZERO)
        } else {
            (!pending.is_empty()).then_some(RETRY)
        };
        let ready = match sys::wait_readable(uffd.as_fd(), stop.as_fd(), timeout) {
            Ok(r) => r,
            Err(Errno::INTR) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        if ready[1] {
            return;
        }
        if spinning && !ready[0] && pending.is_empty() {
            // Let a thread waiting for this CPU have it (a writer we just woke may be one:
            // the scheduler often wakes it where we run).
            std::thread::yield_now();
            continue;
        }
        if ready[0] {
            // EAGAIN: nothing more (or another fault thread took the messages).
            while let Ok(msgs) = uffd.read_msgs(&mut buf) {
                for m in msgs {
                    match m.decode() {
                        Event::WriteFault(addr) => {
                            bump(&inner.counters.write_faults);
                            if !spin.is_zero() {
                                last_fault = Some(Instant::now());
                            }
                            pending.push_back(Work::Fault(addr));
                        }
                        Event::Unmap { start, end } => {
                            pending.push_back(range(RangeEvent::Unmap, start, end))
                        }
                        Event::Remove { start, end } => {
                            pending.push_back(range(RangeEvent::Remove, start, end))
                        }
                        Event::Remap { from, to, len } => {
                            bump(&inner.counters.foreign_remaps);
                            pending.push_back(range(
                                RangeEvent::Moved,
                                from,
                                from.saturating_add(len),
                            ));
                            pending.push_back(Work::Unregister { start: to, len });
                        }
                        Event::Other(_) => {}
                    }
                }
                if msgs.len() < buf.len() {
                    break;
                }
            }
        }
        for _ in 0..pending.len() {
            let Some(mut w) = pending.pop_front() else {
                break;
            };
            if !inner.work(&mut w) {
                pending.push_back(w);
            }
        }
    }
}

fn range(what: RangeEvent, start: usize, end: usize) -> Work {
    Work::Range {
        what,
        end,
        next: start,
    }
}

impl Inner {
    /// Does `w` if it can without waiting; whether it is done.
    fn work(&self, w: &mut Work) -> bool {
        match w {
            Work::Fault(addr) => self.on_fault(*addr),
            Work::Range { what, end, next } => self.on_range(*what, next, *end),
            Work::Unregister { start, len } => {
                if let Some(uffd) = &self.uffd {
                    let _ = uffd.unregister(*start, *len);
                }
                true
            }
        }
    }

    /// A write fault at `addr`: unprotect the page, record the write, wake the writer.
    /// Whether it is done (`false`: the page is locked, or an event is pending).
    fn on_fault(&self, addr: usize) -> bool {
        let page_addr = addr & !(PAGE_SIZE - 1);
        if let Some(region) = self.region_at(page_addr) {
            let live = match region.live.try_read() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return false,
            };
            if *live {
                let Some(mut st) = region.try_lock((page_addr - region.base) / PAGE_SIZE) else {
                    return false;
                };
                if !st.gone() {
                    return self.resolve_write(&region, page_addr, &mut st);
                }
            }
        }
        // Not a page of a live region (a region removed meanwhile, or a range moved out of
        // one, which keeps its protection): remove the protection and wake the writer.
        let Some(uffd) = &self.uffd else { return true };
        match uffd.writeprotect(page_addr, PAGE_SIZE, false, true) {
            Err(Errno::AGAIN) => false,
            Err(_) => {
                let _ = uffd.wake(page_addr, PAGE_SIZE);
                true
            }
            Ok(()) => true,
        }
    }

    /// The live region whose range holds `addr`.
    fn region_at(&self, addr: usize) -> Option<Arc<Region>> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions
            .iter()
            .rev()
            .find(|r| r.base <= addr && addr < r.base + r.len())
            .cloned()
    }

    /// Applies a range event to the pages of `[*next, end)`, page by page; `*next`
    /// moves on past each page done. Whether all are done.
    fn on_range(&self, what: RangeEvent, next: &mut usize, end: usize) -> bool {
        *next &= !(PAGE_SIZE - 1);
        while *next < end {
            let Some(region) = self.region_at(*next) else {
                // No region here: skip to the next region that starts before `end`.
                let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
                let after = regions
                    .iter()
                    .map(|r| r.base)
                    .filter(|&b| b > *next && b < end)
                    .min();
                match after {
                    Some(b) => {
                        *next = b;
                        continue;
                    }
                    None => return true,
                }
            };
            let live = match region.live.try_read() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return false,
            };
            let stop = end.min(region.base + region.len());
            while *next < stop {
                if *live {
                    let i = (*next - region.base) / PAGE_SIZE;
                    let Some(mut st) = region.try_lock(i) else {
                        return false;
                    };
                    self.apply(&region, *next, what, &mut st);
                }
                *next += PAGE_SIZE;
            }
        }
        true
    }

    /// One page's share of a range event. The backend's own remaps and drops raise
    /// events too; they were counted on the page beforehand (`own_unmaps`,
    /// `own_removes`) and are only taken off here.
    fn apply(&self, region: &Region, addr: usize, what: RangeEvent, st: &mut PageState) {
        match what {
            RangeEvent::Unmap if st.own_unmaps > 0 => st.own_unmaps -= 1,
            RangeEvent::Remove if st.own_removes > 0 => st.own_removes -= 1,
            _ if st.gone() => {}
            RangeEvent::Unmap => {
                // Its owner unmapped it (or mapped something else over it): nothing of
                // the region is there any more, and the page no longer maps its slot.
                region.mark_gone(st);
                st.clear_holds();
                bump(&self.counters.foreign_unmaps);
            }
            RangeEvent::Moved => {
                // Moved away: the mapping lives on elsewhere, out of the backend's reach,
                // and may still map its slot, which the page therefore keeps.
                region.mark_gone(st);
                st.set_moved(true);
                bump(&self.counters.foreign_unmaps);
            }
            RangeEvent::Remove => {
                // Its owner drops it (MADV_DONTNEED): its contents change without a
                // write fault, and anonymous memory loses its write protection.
                region.unprotect_at(addr, st);
                if st.kind == Kind::Anon {
                    st.kind = Kind::Zero;
                }
                bump(&self.counters.foreign_removes);
            }
        }
    }

    /// Resolves a write fault on the locked page at `addr`: unprotects it (a store page:
    /// breaks its sharing first), wakes the writer and records the write. `false` if an
    /// event is pending (`EAGAIN`): nothing changed, try again.
    pub(super) fn resolve_write(&self, region: &Region, addr: usize, st: &mut PageState) -> bool {
        let Some(uffd) = &self.uffd else { return true };
        if st.kind == Kind::Store {
            // Break the sharing here, so that we know when the page stops mapping the slot.
            let freed = self.break_store(region, addr, st);
            if matches!(freed, Err(PageError::Os { errno, .. }) if errno == libc::EAGAIN) {
                return false;
            }
            bump(&self.counters.cow_breaks);
            let _ = uffd.wake(addr, PAGE_SIZE);
            // Free the slot (a punch-hole call) only after the writer is on its way.
            drop(freed);
        } else {
            match uffd.writeprotect(addr, PAGE_SIZE, false, true) {
                Err(Errno::AGAIN) => return false,
                Err(_) => {
                    let _ = uffd.wake(addr, PAGE_SIZE);
                }
                Ok(()) => {}
            }
            if st.kind == Kind::Zero {
                st.kind = Kind::Anon;
            }
        }
        if st.protected() {
            region.unprotect_at(addr, st);
        }
        true
    }

    /// Gives a page that maps the store a private copy (`MADV_POPULATE_WRITE`: the kernel's
    /// copy-on-write), without waking writers. Once that is certain the page no longer
    /// maps its slot: the slot is returned, for the caller to drop (which may free it)
    /// when it is done with the page.
    pub(super) fn break_store(
        &self,
        region: &Region,
        addr: usize,
        st: &mut PageState,
    ) -> Result<Option<Slot>, PageError> {
        self.unwp(region, addr, PAGE_SIZE, false)?;
        st.kind = Kind::StoreCow;
        // SAFETY: a page of a live region, locked by us, no longer write-protected (so the
        // populate cannot wait on our own fault thread). Populating for write copies the
        // page's contents into a private page; no contents change.
        let r = unsafe { sys::madvise(addr, PAGE_SIZE, Advice::LinuxPopulateWrite) };
        match r {
            Ok(()) => Ok(st.take_slot()),
            // The writer's own copy-on-write will break it; keep the slot until we know.
            Err(e) => Err(gone_or(
                region,
                "MADV_POPULATE_WRITE",
                e,
                &[Errno::NOMEM, Errno::FAULT],
            )),
        }
    }
}
