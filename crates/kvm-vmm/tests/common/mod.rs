//! What the tests that run the guests under the engines share.
// Each test binary uses its own part.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_vmm::harness::{adapter_or_skip, guest_or_skip, Worker};
use kvm_vmm::GuestImage;
use page_memory::linux::LinuxMemory;
use page_memory::vmm::VmMemoryAdapter;
use page_memory::ScanHook;
use pageone::{Config, PageOne};

/// A mebibyte.
pub const MIB: u64 = 1 << 20;

/// The guest and a vm-memory adapter over the Linux backend, or `None` having printed
/// `SKIPPED:` and why (KVM unusable, the guest not built, the backend unable to run).
pub fn guest_and_adapter_or_skip() -> Option<(GuestImage, Arc<VmMemoryAdapter>)> {
    Some((guest_or_skip()?, adapter_or_skip()?))
}

/// PageONE's merge passes back to back on a thread, each counted in `passes` once done;
/// the thread's state is the most pages sharing seen after a pass.
pub fn merge_passes(engine: Arc<PageOne<LinuxMemory>>, passes: Arc<AtomicU64>) -> Worker<u64> {
    Worker::spawn("pageone-merge", 0, move |most_sharing| {
        engine.merge_pass();
        *most_sharing = (*most_sharing).max(engine.stats().pages_sharing);
        passes.fetch_add(1, Ordering::Release);
    })
    .expect("the merge thread")
}

/// PageONE with one work thread over `adapter`'s backend, with `hook` (the recycler) in
/// its scan if given.
pub fn pageone(
    adapter: &VmMemoryAdapter,
    hook: Option<Arc<dyn ScanHook<LinuxMemory>>>,
) -> Arc<PageOne<LinuxMemory>> {
    let (memory, config) = (adapter.memory().clone(), Config::default().work_threads(1));
    Arc::new(
        match hook {
            Some(hook) => PageOne::with_hook(memory, config, hook),
            None => PageOne::new(memory, config),
        }
        .unwrap(),
    )
}
