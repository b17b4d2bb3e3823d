//! What the concurrent tests (stress, linearizable) share: their sizes, scaled for
//! sanitizer runs, and a deterministic random number generator.

/// `n` scaled by `SDTREE_TEST_SCALE` percent (at least 1).
pub fn scaled(n: usize) -> usize {
    let pct: usize = std::env::var("SDTREE_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    (n * pct / 100).max(1)
}

/// A small xorshift generator: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
