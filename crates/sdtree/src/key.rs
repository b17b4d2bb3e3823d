//! Key bits: how a byte string is read as a sequence of bits, and how two keys are compared.
//!
//! # Symbols
//! A key of `n` bytes is read as `n` nine-bit symbols followed by zero symbols forever:
//! symbol `i` is `0x100 | key[i]` while `i < n` and `0` after the end. The high "present"
//! bit makes a key that is a proper prefix of another differ from it (at the first symbol
//! past its end) and sort before it, so variable-length keys need no terminator byte.
//!
//! # The zero-run header
//! Pages often begin with a run of zero bytes of varying length. Read plainly, such keys
//! form a *comb*: every distinct position of a first 1 bit is a branch on the path of
//! every key with a longer run, so a search could visit thousands of nodes. So the tree
//! reads every key as a 64-bit **header** (eight more symbols, in front) followed by its
//! symbols. The header ranks the key's leading zero run in the key order:
//! - a key made only of zero bytes (or empty), of length `L`: header `L` (top bit 0);
//! - any other key, starting with `z` zero bytes: header `2^63 | (2^63 - 1 - z)`.
//!
//! All-zero keys sort before every other key (a run of zeros is a prefix of, or smaller
//! than, anything with a non-zero byte at the same place), among themselves by length;
//! keys whose non-zero data starts earlier sort later. So the header agrees with byte
//! order: the tree's order stays byte-lexicographic, and keys with equal headers share
//! their zero run, which Patricia search skips for free. The run is found with one scan of
//! the probe (word at a time); a stored key's run is scanned only in the final comparison.
//!
//! # Positions
//! A bit position is a [`Pos`]: `symbol << 4 | offset`, counting the eight header symbols
//! first, where offset 0 is a symbol's present bit and offsets 1..=8 its data bits from
//! most to least significant. Positions compare like the bits they name.

/// A bit position in the reading of a key (see the module docs).
pub(crate) type Pos = u64;

/// Header symbols in front of a key's own.
const HEADER_SYMBOLS: usize = 8;

/// The header of a key: see the module docs. Also returns the key's leading zero bytes.
#[inline]
fn header(key: &[u8]) -> (u64, usize) {
    let z = leading_zero_bytes(key);
    if z == key.len() {
        (key.len() as u64, z)
    } else {
        ((1 << 63) | ((1u64 << 63) - 1 - z as u64), z)
    }
}

/// The number of zero bytes `key` starts with (word at a time).
#[inline]
fn leading_zero_bytes(key: &[u8]) -> usize {
    let mut words = key.chunks_exact(8);
    let mut z = 0;
    for w in &mut words {
        let v = u64::from_be_bytes(w.try_into().unwrap_or([0xff; 8]));
        if v != 0 {
            return z + (v.leading_zeros() / 8) as usize;
        }
        z += 8;
    }
    z + words.remainder().iter().take_while(|&&b| b == 0).count()
}

/// A key being searched for, with its header computed once.
#[derive(Clone, Copy)]
pub(crate) struct Probe<'a> {
    bytes: &'a [u8],
    head: u64,
    zeros: usize,
}

impl<'a> Probe<'a> {
    /// Reads `bytes`' zero-run header.
    #[inline]
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        let (head, zeros) = header(bytes);
        Probe { bytes, head, zeros }
    }

    /// The key bytes.
    #[inline(always)]
    pub(crate) fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Symbol `i` of the header-then-key reading.
    #[inline(always)]
    fn symbol(&self, i: usize) -> u32 {
        if i < HEADER_SYMBOLS {
            0x100 | ((self.head >> (8 * (HEADER_SYMBOLS - 1 - i))) & 0xff) as u32
        } else {
            match self.bytes.get(i - HEADER_SYMBOLS) {
                Some(&b) => 0x100 | b as u32,
                None => 0,
            }
        }
    }

    /// The bit at `pos` (0 or 1). Reads at most one byte, never out of bounds.
    #[inline(always)]
    pub(crate) fn bit(&self, pos: Pos) -> usize {
        let shift = 8u32.wrapping_sub((pos & 15) as u32) & 31;
        ((self.symbol((pos >> 4) as usize) >> shift) & 1) as usize
    }
}

/// How a probe key relates to a stored key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Diff {
    /// Byte-for-byte equal.
    Equal,
    /// They differ first at this bit position.
    At(Pos),
}

/// Compares `probe` with `stored` and finds their first differing bit.
///
/// Returns the result and the number of bytes of `stored` that were read (the compare
/// works in 8-byte words, so this is rounded up to the word that held the difference).
#[inline]
pub(crate) fn diff(probe: &Probe<'_>, stored: &[u8]) -> (Diff, usize) {
    let (head, zeros) = header(stored);
    let scanned = (zeros + 1).min(stored.len());
    if head != probe.head {
        let top = (head ^ probe.head).leading_zeros() as u64;
        // Header byte `top / 8`, data bit `top % 8` of it (offset 0 is the present bit).
        return (Diff::At(((top / 8) << 4) | (1 + top % 8)), scanned);
    }
    // Equal headers: both keys start with the same `zeros` zero bytes (and if the header
    // is an all-zero key's, they are equal).
    let from = zeros.min(probe.zeros);
    let (d, read) = diff_from(probe.bytes, stored, from);
    let d = match d {
        Diff::Equal => Diff::Equal,
        Diff::At(p) => Diff::At(p + ((HEADER_SYMBOLS as u64) << 4)),
    };
    (d, read.max(scanned))
}

/// The first differing bit of `a` and `b` in the plain symbol reading (no header), given
/// that they agree on their first `from` bytes.
#[inline]
fn diff_from(a: &[u8], b: &[u8], from: usize) -> (Diff, usize) {
    let common = a.len().min(b.len());
    let mut i = from.min(common);
    // Skip equal 64-byte blocks with a compare the library vectorizes, then locate the
    // first differing byte word at a time.
    while i + 64 <= common && a[i..i + 64] == b[i..i + 64] {
        i += 64;
    }
    while i + 8 <= common {
        let x = u64::from_be_bytes(a[i..i + 8].try_into().unwrap_or([0; 8]));
        let y = u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        if x != y {
            let byte = i + ((x ^ y).leading_zeros() / 8) as usize;
            return (Diff::At(pos_in_symbol(a, b, byte)), i + 8);
        }
        i += 8;
    }
    while i < common {
        if a[i] != b[i] {
            return (Diff::At(pos_in_symbol(a, b, i)), common);
        }
        i += 1;
    }
    if a.len() == b.len() {
        (Diff::Equal, common)
    } else {
        (Diff::At(pos_in_symbol(a, b, common)), common)
    }
}

/// Plain symbol `i` of `key`.
#[inline(always)]
fn plain_symbol(key: &[u8], i: usize) -> u32 {
    match key.get(i) {
        Some(&b) => 0x100 | b as u32,
        None => 0,
    }
}

/// The position (plain reading) of the highest differing bit of symbol `i`.
#[inline(always)]
fn pos_in_symbol(a: &[u8], b: &[u8], i: usize) -> Pos {
    let x = plain_symbol(a, i) ^ plain_symbol(b, i);
    debug_assert!(x != 0);
    // Highest set bit of a nine-bit value: 8 for the present bit, 7..0 for data bits.
    let top = 31 - x.leading_zeros();
    ((i as u64) << 4) | (8 - top) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_diff_naive(a: &[u8], b: &[u8]) -> Option<Pos> {
        let (pa, pb) = (Probe::new(a), Probe::new(b));
        let n = a.len().max(b.len()) + 1 + HEADER_SYMBOLS;
        (0..(n as u64) << 4)
            .filter(|p| p & 15 <= 8)
            .find(|&p| pa.bit(p) != pb.bit(p))
    }

    const KEYS: &[&[u8]] = &[
        b"",
        b"a",
        b"ab",
        b"abc",
        b"abd",
        b"\0",
        b"\0\0",
        b"\0\x01",
        b"\0\0\0\0\0\0\0\0\0\x05",
        b"\0\0\0\0\0\0\0\0\0",
        b"\x80",
        b"abcdefghij",
        b"abcdefghik",
        b"abcdefgh",
        b"abcdefgh\0",
    ];

    #[test]
    fn diff_matches_bitwise_definition() {
        for a in KEYS {
            for b in KEYS {
                let (d, _) = diff(&Probe::new(a), b);
                match first_diff_naive(a, b) {
                    None => assert_eq!(d, Diff::Equal, "{a:?} {b:?}"),
                    Some(p) => assert_eq!(d, Diff::At(p), "{a:?} {b:?}"),
                }
            }
        }
    }

    #[test]
    fn first_difference_orders_like_bytes() {
        for a in KEYS {
            for b in KEYS {
                if let (Diff::At(p), _) = diff(&Probe::new(a), b) {
                    // The key with the 1 bit at the first difference is the greater one.
                    assert_eq!(Probe::new(a).bit(p) == 1, a > b, "{a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn leading_zero_bytes_counts_words_and_tails() {
        assert_eq!(leading_zero_bytes(b""), 0);
        assert_eq!(leading_zero_bytes(&[0; 13]), 13);
        assert_eq!(leading_zero_bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 7]), 9);
        assert_eq!(leading_zero_bytes(&[0, 0, 1]), 2);
    }
}
