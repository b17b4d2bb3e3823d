//! Key bits: how a byte string is read as a sequence of bits, and how two keys are compared.
//!
//! A key of `n` bytes is read as `n` nine-bit symbols followed by zero symbols forever:
//! symbol `i` is `0x100 | key[i]` while `i < n` and `0` after the end. The high "present"
//! bit makes a key that is a proper prefix of another differ from it (at the first symbol
//! past its end) and sort before it, so the tree's order is byte-lexicographic, and
//! variable-length keys need no terminator byte.
//!
//! A bit position is a [`Pos`]: `symbol << 4 | offset`, where offset 0 is the present bit
//! and offsets 1..=8 are the data bits from most to least significant. Positions compare
//! like the bits they name, which is all the tree needs of them.

/// A bit position in the nine-bit-symbol reading of a key (see the module docs).
pub(crate) type Pos = u64;

/// The symbol `i` of `key`: `0x100 | byte` inside the key, `0` past its end.
#[inline(always)]
fn symbol(key: &[u8], i: usize) -> u32 {
    match key.get(i) {
        Some(&b) => 0x100 | b as u32,
        None => 0,
    }
}

/// The bit of `key` at `pos` (0 or 1). Reads at most one byte, never out of bounds.
#[inline(always)]
pub(crate) fn bit(key: &[u8], pos: Pos) -> usize {
    let i = (pos >> 4) as usize;
    let shift = 8 - (pos & 15) as u32;
    ((symbol(key, i) >> shift) & 1) as usize
}

/// How a probe key relates to a stored key, and what the comparison cost.
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
pub(crate) fn diff(probe: &[u8], stored: &[u8]) -> (Diff, usize) {
    let common = probe.len().min(stored.len());
    let mut i = 0;
    // Word-at-a-time scan for the first differing byte.
    while i + 8 <= common {
        let a = u64::from_be_bytes(probe[i..i + 8].try_into().unwrap_or([0; 8]));
        let b = u64::from_be_bytes(stored[i..i + 8].try_into().unwrap_or([0; 8]));
        if a != b {
            let byte = i + ((a ^ b).leading_zeros() / 8) as usize;
            return (Diff::At(pos_in_symbol(probe, stored, byte)), i + 8);
        }
        i += 8;
    }
    while i < common {
        if probe[i] != stored[i] {
            return (Diff::At(pos_in_symbol(probe, stored, i)), common);
        }
        i += 1;
    }
    if probe.len() == stored.len() {
        (Diff::Equal, common)
    } else {
        (Diff::At(pos_in_symbol(probe, stored, common)), common)
    }
}

/// The position of the highest differing bit of symbol `i`, which must differ.
#[inline(always)]
fn pos_in_symbol(a: &[u8], b: &[u8], i: usize) -> Pos {
    let x = symbol(a, i) ^ symbol(b, i);
    debug_assert!(x != 0);
    // Highest set bit of a nine-bit value: 8 for the present bit, 7..0 for data bits.
    let top = 31 - x.leading_zeros();
    ((i as u64) << 4) | (8 - top) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_diff_naive(a: &[u8], b: &[u8]) -> Option<Pos> {
        let n = a.len().max(b.len()) + 1;
        (0..(n as u64) << 4)
            .filter(|p| p & 15 <= 8)
            .find(|&p| bit(a, p) != bit(b, p))
    }

    #[test]
    fn diff_matches_bitwise_definition() {
        let keys: &[&[u8]] = &[
            b"",
            b"a",
            b"ab",
            b"abc",
            b"abd",
            b"\0",
            b"\0\0",
            b"\x80",
            b"abcdefghij",
            b"abcdefghik",
            b"abcdefgh",
            b"abcdefgh\0",
        ];
        for a in keys {
            for b in keys {
                let (d, _) = diff(a, b);
                match first_diff_naive(a, b) {
                    None => assert_eq!(d, Diff::Equal, "{a:?} {b:?}"),
                    Some(p) => assert_eq!(d, Diff::At(p), "{a:?} {b:?}"),
                }
            }
        }
    }

    #[test]
    fn first_difference_orders_like_bytes() {
        let keys: &[&[u8]] = &[b"", b"a", b"a\0", b"ab", b"b", b"\xff", b"\xff\xff"];
        for a in keys {
            for b in keys {
                if let (Diff::At(p), _) = diff(a, b) {
                    // The key with the 1 bit at the first difference is the greater one.
                    assert_eq!(bit(a, p) == 1, a > b, "{a:?} {b:?}");
                }
            }
        }
    }
}
