//! [`Gens`]: per page of a VMM's region, the newest generation its agent reported (what
//! [`RemoteMemory::written_since`](super::RemoteMemory) compares tokens with), in 4 bytes
//! a page instead of 8.
//!
//! A page's generation moves once per unprotect, copy-on-write break or discard of it:
//! 2^32 of them for one page is far off, but not impossible (a guest that discards one
//! page in a loop for hours). So the generations are kept exact, never truncated: in
//! `u32`s while every generation reported fits, and in `u64`s from the first that does
//! not (the region's array is widened once, under a write lock). A truncated generation
//! could compare equal to, or below, a token it is in fact above, and the engine would
//! take a written page for unchanged for good.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::RwLock;

/// Generations of a region's pages; see the module docs.
pub(crate) struct Gens(RwLock<Repr>);

enum Repr {
    /// Every generation reported fits in 32 bits.
    Narrow(Box<[AtomicU32]>),
    /// Some did not.
    Wide(Box<[AtomicU64]>),
}

impl Gens {
    /// `pages` pages, each at generation 0.
    pub(crate) fn new(pages: u32) -> Gens {
        Gens(RwLock::new(Repr::Narrow(
            (0..pages).map(|_| AtomicU32::new(0)).collect(),
        )))
    }

    /// Page `index`'s generation is at least `gen` (ignored beyond the region's end).
    pub(crate) fn raise(&self, index: u32, gen: u64) {
        let i = index as usize;
        {
            let repr = self.0.read().unwrap_or_else(|e| e.into_inner());
            match &*repr {
                Repr::Wide(w) => {
                    if let Some(g) = w.get(i) {
                        g.fetch_max(gen, Ordering::Relaxed);
                    }
                    return;
                }
                Repr::Narrow(n) => {
                    let Some(g) = n.get(i) else {
                        return;
                    };
                    if let Ok(gen) = u32::try_from(gen) {
                        g.fetch_max(gen, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
        let mut repr = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Repr::Narrow(n) = &*repr {
            let wide = n
                .iter()
                .map(|g| AtomicU64::new(g.load(Ordering::Relaxed) as u64))
                .collect();
            *repr = Repr::Wide(wide);
        }
        if let Repr::Wide(w) = &*repr {
            w[i].fetch_max(gen, Ordering::Relaxed);
        }
    }

    /// Page `index`'s generation (`None` beyond the region's end).
    pub(crate) fn get(&self, index: u32) -> Option<u64> {
        let i = index as usize;
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            Repr::Narrow(n) => n.get(i).map(|g| g.load(Ordering::Relaxed) as u64),
            Repr::Wide(w) => w.get(i).map(|g| g.load(Ordering::Relaxed)),
        }
    }

    /// Bytes a page takes.
    #[cfg(test)]
    fn bytes_per_page(&self) -> usize {
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            Repr::Narrow(_) => std::mem::size_of::<AtomicU32>(),
            Repr::Wide(_) => std::mem::size_of::<AtomicU64>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 bytes a page (was 8: the service's metadata per guest page, issue 14), until a
    /// generation needs more.
    #[test]
    fn four_bytes_a_page_until_a_generation_needs_eight() {
        let g = Gens::new(3);
        assert_eq!(g.bytes_per_page(), 4);
        g.raise(1, 7);
        g.raise(1, 5);
        assert_eq!((g.get(0), g.get(1), g.get(3)), (Some(0), Some(7), None));
        g.raise(3, u64::MAX); // beyond the end: ignored, not widened
        assert_eq!(g.bytes_per_page(), 4);

        // The first generation of 2^32 or more widens, exactly: no wrap to 0.
        g.raise(2, 1 << 32);
        assert_eq!(g.bytes_per_page(), 8);
        assert_eq!((g.get(1), g.get(2)), (Some(7), Some(1 << 32)));
        g.raise(2, 3);
        g.raise(0, u64::MAX);
        assert_eq!((g.get(0), g.get(2)), (Some(u64::MAX), Some(1 << 32)));
    }
}
