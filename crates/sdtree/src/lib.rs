//! The SD tree: a lock-free crit-bit (binary Patricia) trie over byte-string keys that are
//! read in place.
//!
//! It indexes keys it does not own, typically 4 KiB pages of guest memory, by reading them
//! through a [`KeySource`]; a search tests each key bit at most once and reads one stored
//! key, once, at the end. A red-black tree of pages (Linux KSM) instead compares the probe
//! with a stored page at every level, so pages with long common prefixes cost it a long
//! `memcmp` per level; here they cost nothing extra.
//!
//! - [`SdTree`] / [`base::SdTree`]: handles (`usize ≤ MAX_HANDLE`) whose keys a
//!   [`KeySource`] supplies. [`SdTree::insert_or_get`] is the deduplication primitive.
//! - [`SdMap`] / [`base::SdMap`]: owned keys (`K: AsRef<[u8]>`) and values.
//! - The root types pin crossbeam-epoch's default collector for you (`std` feature, on by
//!   default); [`base`] takes a [`Guard`](epoch::Guard) and works with `no_std` + `alloc`.
//!
//! ```
//! use sdtree::{Insert, SdTree};
//!
//! // Three "pages"; 0 and 2 are identical.
//! let pages = vec![vec![0u8; 4096], vec![7u8; 4096], vec![0u8; 4096]];
//! let tree = SdTree::new(&pages);
//! assert_eq!(tree.insert_or_get(0), Insert::Inserted);
//! assert_eq!(tree.insert_or_get(1), Insert::Inserted);
//! assert_eq!(tree.insert_or_get(2), Insert::Present(0)); // merge page 2 into page 0
//! assert_eq!(tree.remove(&pages[1]), Some(1));
//! assert_eq!(tree.len(), 1);
//! ```
//!
//! # Keys as bits
//! A key of `n` bytes is read as `n` nine-bit symbols (`0x100 | byte`) followed by zero
//! symbols: the leading "present" bit makes a proper prefix differ from its extensions,
//! at the first symbol past its end, and sort before them. So variable-length keys need
//! no terminator, and the tree's order is byte-lexicographic. In front of those symbols
//! the tree reads a 64-bit **zero-run header** that ranks the key's leading run of zero
//! bytes in that same order: pages that begin with zero runs of many different lengths
//! (the 2017 seeds' hard case) would otherwise form a comb of one node per distinct first
//! 1 bit, over a thousand deep; with the header they stay under 64 deep at 10,000 keys
//! (`tests/search_cost.rs`). A search is *not* about log2(n) nodes on real data, though:
//! a crit-bit trie is as deep as its keys' bit patterns make it, not balanced. On pages
//! with random tails it visits about 1.0–1.1 × log2(n) nodes (22 at a million keys,
//! `docs/benchmarks.md`); on the 200,000 distinct 4 KiB pages of this machine's
//! `/usr/lib` it visited 35.9 on average (2.0 × log2 n) and up to 240
//! (`tests/search_cost.rs`, `real_pages_search_depth`, ignored by default); issue 15
//! measured 34 on average (about 2.3 × log2 n) and up to 61 on its real pages, past the
//! 48-step inline search path. The probe's run is scanned once per operation, a stored
//! key's only in the final comparison. A bit position (`pos`) is `symbol << 4 | offset`;
//! positions compare like the bits they name. See `key.rs` for the proof of order.
//!
//! # Layout
//! - An **internal node** is 24 bytes on 64-bit targets: two edge words and the bit
//!   position it tests ([`NODE_BYTES`]). A tree of `n ≥ 1` keys has exactly `n − 1`
//!   internal nodes.
//! - An **edge** is one `AtomicUsize`. It holds a node pointer or, with bit 2 set, a leaf:
//!   the handle itself, shifted left by 3. Leaves are never allocated, so a stored key
//!   costs one node: 24 bytes of metadata (32 with the usual 16-byte malloc granularity),
//!   against 32 in the 2017 SD tree and 64 for a KSM `rmap_item`. [`SdMap`] adds one heap
//!   entry per key, holding the key and value.
//! - The two low bits of an edge are marks: **FLAG** (bit 0) says the leaf under it is
//!   being removed; **TAG** (bit 1) says the node owning the edge is being removed. A
//!   marked edge is frozen: no CAS expects a marked value, except the one that unlinks it.
//! - The tree's head is one more edge (`0` = empty). It is never tagged.
//!
//! # Invariants
//! 1. Positions strictly increase along every path.
//! 2. All keys below a node agree on every bit before its `pos`; those under `child[b]`
//!    have bit `pos` equal to `b`. A node's `pos` never changes.
//! 3. A node whose edge is tagged has its other edge flagged (a tag is only set by the
//!    removal of the leaf on the other side). Marks are never cleared in place.
//! 4. A node is unlinked only when all its edges are marked; so an unmarked edge belongs
//!    to a node that is still linked.
//!
//! # Operations
//! **Lookup** follows the probe's bit at each node and compares the probe with the one
//! leaf it reaches. It allocates nothing and writes nothing. *Linearization point:* the
//! load of the leaf's edge (a flagged leaf counts as absent).
//!
//! **Insert-or-get** walks like a lookup, recording the path, then compares the probe
//! with the leaf's key once to find the first differing bit `d`. Every key under the
//! first node on the path that tests a bit after `d` differs from the probe at `d` and
//! agrees before it (invariant 2), so a new node testing `d`, with the old subtree on one
//! side and the new leaf on the other, is published with **one CAS** on the edge above
//! that node, expecting the unmarked word the walk read. *Linearization point:* that CAS;
//! or, when an equal unflagged key is found, the load of its edge.
//!
//! **Remove** walks to the leaf, compares it in full, and **freezes** it by CAS-ing FLAG
//! into its edge (*linearization point*). Then it unlinks: it TAGs the edge of the
//! leaf's sibling (freezing it), and CASes the edge of the nearest ancestor whose edge on
//! the path is untagged from the path's node to the sibling (FLAG preserved if the sibling
//! is itself a flagged leaf). That one CAS may unlink a chain of nodes whose removals are
//! all in flight. Whoever wins it retires every unlinked node and flagged leaf, once.
//! Anyone who meets a marked edge on a CAS target *helps*: runs that same unlink from its
//! own path, then retries. This is Natarajan and Mittal's edge-marking protocol (PPoPP
//! 2014) adapted to a Patricia trie, where insertions may target an edge above the leaf.
//!
//! **Local retry.** After a failed CAS an update does not restart from the head: it
//! re-reads the edges of its recorded path from the bottom up and resumes from the
//! deepest one that still holds an unmarked word (invariant 4: its owner is still linked),
//! helping first if the edge it needed is marked.
//!
//! # Memory orderings
//! - Edge loads are `Acquire`; every CAS is `AcqRel` (failure `Acquire`); the TAG
//!   `fetch_or` is `AcqRel`. A new node's fields are written with plain or `Relaxed`
//!   stores before the `Release` half of the publishing CAS, so a reader that `Acquire`s
//!   the edge sees them. Key bytes a caller wrote before inserting are published the same
//!   way.
//! - `len` is a `Relaxed` counter: exact when quiescent, approximate during updates.
//! - Reclamation is crossbeam-epoch's: a node or [`SdMap`] entry is unlinked first, then
//!   retired with `defer`, and freed only once every thread pinned at that time has
//!   unpinned. Every operation holds a pin for its whole run, so no pointer it read can be
//!   freed under it, and a word it read cannot come back with another meaning (no ABA).
//!   That pin must be real: the guard-taking API refuses `epoch::unprotected()`, under
//!   which crossbeam frees deferred memory at once ([`base`], "Guards").
//!
//! # Progress
//! Lookups are wait-free apart from the walk (bounded by the tree's depth). Updates are
//! lock-free: a CAS fails only because another update's CAS succeeded, and a marked edge
//! is always unlinkable by whoever meets it. There are no locks and no spinning on a
//! flag.
//!
//! # Consistency
//! - `get`, `insert_or_get` and `remove` are linearizable.
//! - Iteration is weakly consistent: it yields keys in increasing order, each at most
//!   once; every key present for the whole iteration is yielded; keys inserted or removed
//!   during it may or may not be.
//! - `len` is exact when no update is in flight.
//! - **Keys that change while stored.** If the bytes a [`KeySource`] returns for a stored
//!   handle change (a page written behind the tree's back), the tree stays memory-safe,
//!   every read stays in bounds, and every operation terminates (positions still strictly
//!   increase along every path). Searches may then miss entries; a match that is returned
//!   was verified by a full comparison just before; an insert that finds no free position
//!   returns [`Insert::Refused`]. A remover whose stored key changed may leave its frozen
//!   leaf linked; the next update that meets it unlinks it.
//! - A handle must not be reused for different key bytes, nor its key storage released,
//!   until every guard pinned before its removal is dropped.
//!
//! # Verification
//! loom models (`RUSTFLAGS="--cfg sdtree_loom --cfg crossbeam_loom" cargo test -p sdtree
//! --test loom --release`), proptest model tests against `BTreeMap`, a multi-thread stress
//! test, a differential fuzz target under the repository's `fuzz/` (its checker runs
//! hand-written inputs in `tests/fuzz_inputs.rs`; the repository's `fuzz-corpus` crate
//! replays its corpus under `cargo test --workspace`), a test of the guards the API
//! refuses (`tests/guards.rs`), and a test of the bytes of stored keys a search reads
//! ([`SdTree::get_with_stats`]).

#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

extern crate alloc;

pub mod base;
mod key;
#[cfg(all(feature = "std", not(sdtree_loom)))]
mod map;
mod raw;
mod sync;
#[cfg(all(feature = "std", not(sdtree_loom)))]
mod tree;

pub use base::KeySource;
pub use crossbeam_epoch as epoch;
#[cfg(all(feature = "std", not(sdtree_loom)))]
pub use map::SdMap;
pub use raw::{Insert, SearchStats, MAX_HANDLE, NODE_BYTES};
#[cfg(all(feature = "std", not(sdtree_loom)))]
pub use tree::{Iter, SdTree};

// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
