//! A [`LinuxMemory`] whose canonical store another process owns (a deduplication
//! service; see [`super::shared`]): made with [`LinuxMemory::with_linked_store`], its
//! pages are made canonical into slots the owner names ([`LinuxMemory::canonicalize_at`])
//! and merged with frames of slots it names ([`LinuxMemory::frame_at`]); every hold on a
//! slot is reported to the owner. What a guest write changed is collected for the owner
//! ([`LinuxMemory::take_unprotected`]), which keeps its own view of the tokens.
//!
//! Everything else is the ordinary backend: the fault thread, the page locks, the checks
//! under protection. In particular the last check of a merge (the page still protected
//! under its token and equal to the frame) and the remap happen here, in the process
//! that owns the guest memory, under the page's lock.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::shared::StoreLink;
use super::store::{LinuxFrame, Store};
use super::{LinuxConfig, LinuxError, LinuxMemory};
use crate::{PageError, PageId, ProtectToken, RegionId};

impl LinuxMemory {
    /// A memory set up by `config` whose canonical store is `link`'s: a memfd another
    /// process (the service) owns and shares with every VMM of a trust domain. Its pages
    /// are made canonical only with [`canonicalize_at`](Self::canonicalize_at) (plain
    /// `canonicalize` is refused with [`PageError::Unsupported`]); frames come from
    /// [`frame_at`](Self::frame_at).
    pub fn with_linked_store(
        config: LinuxConfig,
        link: StoreLink,
    ) -> Result<LinuxMemory, LinuxError> {
        let store = Store::linked(link.fd, link.slots, link.sink)?;
        Self::with_store(config, store)
    }

    /// Replaces the linked store by `link`'s (the service restarted with a new store).
    /// Pages that map the old store keep mapping it, and their holds are reported to the
    /// old link's sink; new canonical pages and frames are the new store's.
    pub fn relink_store(&self, link: StoreLink) -> Result<(), PageError> {
        if !self.inner.store().is_linked() {
            return Err(PageError::Unsupported(
                "only a memory made with a linked store can be relinked",
            ));
        }
        let store = Store::linked(link.fd, link.slots, link.sink)?;
        *self.inner.store.write().unwrap_or_else(|e| e.into_inner()) = store;
        Ok(())
    }

    /// Whether the canonical store is another process's.
    pub fn is_linked(&self) -> bool {
        self.inner.store().is_linked()
    }

    /// A frame of slot `slot` of the linked store, holding it (the hold is reported): for
    /// [`merge`](crate::PageMemory::merge) with a page the owner made canonical there.
    /// The owner must hold the slot while this process uses the frame.
    pub fn frame_at(&self, slot: u64) -> Result<LinuxFrame, PageError> {
        Ok(LinuxFrame(Some(self.inner.store().adopt(slot)?)))
    }

    /// [`canonicalize`](crate::PageMemory::canonicalize) of each `(page, token, slot)`
    /// into the linked store's slot `slot`, chosen by its owner; one result per item, in
    /// order. A page that already maps a store page (or the zero page) keeps it: its
    /// result is that frame, which may be another slot than the one named.
    pub fn canonicalize_at(
        &self,
        items: &[(PageId, ProtectToken, u64)],
    ) -> Vec<Result<LinuxFrame, PageError>> {
        let store = self.inner.store();
        if !store.is_linked() {
            let e = PageError::Unsupported("canonicalize_at needs a linked store");
            return items.iter().map(|_| Err(e.clone())).collect();
        }
        let named: HashMap<PageId, u64> = items.iter().map(|&(p, _, s)| (p, s)).collect();
        if named.len() != items.len() {
            let e = PageError::Unsupported("canonicalize_at: a page named twice");
            return items.iter().map(|_| Err(e.clone())).collect();
        }
        let pages: Vec<(PageId, ProtectToken)> = items.iter().map(|&(p, t, _)| (p, t)).collect();
        self.canonicalize_batch_placed(&pages, &|_, page| {
            let slot = named
                .get(&page)
                .ok_or(PageError::Unsupported("canonicalize_at: no slot named"))?;
            store.adopt(*slot)
        })
    }

    /// The pages of `region` whose tokens went stale (written, unprotected, discarded)
    /// since the last call, with their generation now (a token of the page is stale if
    /// it is older): what a service that keeps its own view of the tokens needs to know.
    /// Each page is reported once per call however often it changed; a page may be
    /// reported whose change a caller already saw.
    pub fn take_unprotected(&self, region: RegionId) -> Result<Vec<(u32, u64)>, PageError> {
        let r = self.inner.region(region)?;
        let mut out = Vec::new();
        // Only the words of `changed` flagged in `changed_words` (cleared first, so a
        // page noted meanwhile is found now or at the next call).
        let flagged = r.changed_words.iter().enumerate().flat_map(|(s, summary)| {
            let mut words = summary.swap(0, Ordering::Acquire);
            std::iter::from_fn(move || {
                (words != 0).then(|| {
                    let w = s * 64 + words.trailing_zeros() as usize;
                    words &= words - 1;
                    w
                })
            })
        });
        for w in flagged {
            let Some(word) = r.changed.get(w) else {
                continue;
            };
            let mut bits = word.swap(0, Ordering::Relaxed);
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if i < r.pages.len() {
                    // The generation now, under the page's lock: every change before the
                    // bit was cleared is in it.
                    let gen = r.lock(i).gen;
                    out.push((i as u32, gen));
                }
            }
        }
        Ok(out)
    }
}
