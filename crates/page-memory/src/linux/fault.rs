//! The fault thread(s): every guest write to a protected page stops in the kernel and is
//! resolved here (see *Write protection* in the module docs).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::io::Errno;

use super::region::{gone_or, Kind, PageState, Region};
use super::stats::bump;
use super::store::Slot;
use super::sys::{self, uffd::Uffd, Advice};
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

/// The fault thread: resolves write faults until `stop` is signalled.
fn fault_loop(inner: &Inner, stop: &OwnedFd) {
    let Some(uffd) = &inner.uffd else { return };
    let mut buf = Uffd::msg_buffer(64);
    loop {
        let ready = match sys::wait_readable(uffd.as_fd(), stop.as_fd()) {
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
        // EAGAIN: another fault thread took the messages.
        let Ok(msgs) = uffd.read_msgs(&mut buf) else {
            continue;
        };
        // Only page faults are asked for (no UFFD_FEATURE_EVENT_*); anything else is
        // ignored. Every fault on a write-protect-only registration is a write to a
        // protected page (UFFD_PAGEFAULT_FLAG_WP).
        for fault in msgs.iter().filter_map(|m| m.pagefault()) {
            inner.on_fault(fault.address as usize);
        }
    }
}

impl Inner {
    /// A write fault at `addr`: unprotect the page, record the write, wake the writer.
    pub(super) fn on_fault(&self, addr: usize) {
        let page_addr = addr & !(PAGE_SIZE - 1);
        bump(&self.counters.write_faults);
        let region = {
            let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
            regions
                .iter()
                .find(|r| r.base <= page_addr && page_addr < r.base + r.len())
                .cloned()
        };
        if let Some(region) = region {
            let live = region.live.read().unwrap_or_else(|e| e.into_inner());
            if *live {
                let mut st = region.lock((page_addr - region.base) / PAGE_SIZE);
                self.resolve_write(&region, page_addr, &mut st);
                return;
            }
        }
        if let Some(uffd) = &self.uffd {
            let _ = uffd.wake(page_addr, PAGE_SIZE);
        }
    }

    pub(super) fn resolve_write(&self, region: &Region, addr: usize, st: &mut PageState) {
        let Some(uffd) = &self.uffd else { return };
        if st.kind == Kind::Store {
            // Break the sharing here, so that we know when the page stops mapping the slot.
            let freed = self.break_store(region, addr, st);
            bump(&self.counters.cow_breaks);
            let _ = uffd.wake(addr, PAGE_SIZE);
            // Free the slot (a punch-hole call) only after the writer is on its way.
            drop(freed);
        } else {
            if uffd.writeprotect(addr, PAGE_SIZE, false, true).is_err() {
                let _ = uffd.wake(addr, PAGE_SIZE);
            }
            if st.kind == Kind::Zero {
                st.kind = Kind::Anon;
            }
        }
        if st.protected {
            st.protected = false;
            st.gen += 1;
        }
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
    ) -> Result<Option<Arc<Slot>>, PageError> {
        self.unwp(region, addr, PAGE_SIZE, false)?;
        st.kind = Kind::StoreCow;
        // SAFETY: a page of a live region, locked by us, no longer write-protected (so the
        // populate cannot wait on our own fault thread). Populating for write copies the
        // page's contents into a private page; no contents change.
        let r = unsafe { sys::madvise(addr, PAGE_SIZE, Advice::LinuxPopulateWrite) };
        match r {
            Ok(()) => Ok(st.slot.take()),
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
