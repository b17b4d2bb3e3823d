//! Test helpers (feature `test-util`): pages that check their own contents, so tests,
//! examples and benchmarks can prove no allocated page is changed behind the guest's back.

use core::sync::atomic::{AtomicU64, Ordering};

use pip::MarkWords;

#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
/// Words in a 4 KiB page.
pub const PAGE_WORDS: usize = 512;

#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
/// What [`PageAllocator`](crate::PageAllocator)'s users need from a page besides its
/// mark words: writing a whole page and checking it, to prove that no allocated page is
/// ever changed behind the guest's back.
pub trait GuestPage: MarkWords {
    /// Writes a pattern derived from `seed` over the whole page, mark words included (a
    /// page in use belongs to its user entirely).
    fn fill(&self, seed: u64);
    /// Whether the page holds exactly the pattern [`GuestPage::fill`] wrote for `seed`.
    fn verify(&self, seed: u64) -> bool;
}

#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
/// A 4 KiB page of atomics, for tests, examples and benchmarks: both the guest (through
/// [`MarkWords`] and [`GuestPage`]) and a simulated host ([`SimPage::zero`]) access it
/// concurrently, always atomically.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct SimPage {
    words: [AtomicU64; PAGE_WORDS],
}

impl SimPage {
    /// A zeroed page.
    pub fn new() -> Self {
        SimPage {
            words: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Word `i` (`Relaxed`).
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Relaxed)
    }

    /// The host's recycle, done in place: zeroes every word from the last to the first,
    /// so the indicator (word 0) turns zero last, with `Release`, as
    /// [`pip::Claim::complete`] requires of an in-place recycle.
    pub fn zero(&self) {
        for w in self.words.iter().rev() {
            w.store(0, Ordering::Release);
        }
    }

    /// Whether every word reads zero.
    pub fn is_zero(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }
}

impl Default for SimPage {
    fn default() -> Self {
        Self::new()
    }
}

impl MarkWords for SimPage {
    #[inline]
    fn load(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    #[inline]
    fn store(&self, i: usize, v: u64) {
        self.words[i].store(v, Ordering::Release)
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
/// Word `i` of the pattern [`GuestPage::fill`] writes for `seed` (splitmix64 of `seed`
/// and `i`, with the low bit set): never 0, so a zeroed word is always caught. Other
/// [`GuestPage`] implementations use it too, so every page checks the same way.
#[inline]
pub fn pattern(seed: u64, i: usize) -> u64 {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

impl GuestPage for SimPage {
    fn fill(&self, seed: u64) {
        for (i, w) in self.words.iter().enumerate() {
            w.store(pattern(seed, i), Ordering::Relaxed);
        }
    }

    fn verify(&self, seed: u64) -> bool {
        self.words
            .iter()
            .enumerate()
            .all(|(i, w)| w.load(Ordering::Relaxed) == pattern(seed, i))
    }
}
