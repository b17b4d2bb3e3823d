#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_debug_implementations)]

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
