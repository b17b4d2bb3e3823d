//! `dynamic-vm`: pack more virtual machines into the same RAM.
//!
//! This facade re-exports the workspace's crates; see the README for the map.

#[doc(inline)]
pub use page_memory;
#[doc(inline)]
pub use pageone;
#[doc(inline)]
pub use pip;
#[doc(inline)]
pub use ppr_guest;
#[doc(inline)]
pub use ppr_host;
#[doc(inline)]
pub use sdtree;

// The README's examples compile and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
