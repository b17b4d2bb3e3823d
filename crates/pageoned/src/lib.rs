//! `pageoned`: the PageONE deduplication engine as a service for many VMM processes.
//!
//! The daemon runs the engine over the guest RAM of every VMM that connects. Each VMM
//! embeds an *agent* that connects over a Unix `SOCK_SEQPACKET` socket, registers its
//! guest RAM, and performs remaps and write protection in its own address space when the
//! service asks. Each side treats the other's messages as hostile: every frame is
//! validated, and a malformed one gets an error message and a disconnect, never a panic.
//!
//! - [`service`]: the service (one PageONE engine and one canonical store per trust
//!   domain, over the guest RAM of the domain's VMMs);
//! - [`agent`]: what a VMM embeds;
//! - [`wire`]: the messages and their byte encoding (framing, versioning, validation);
//! - [`socket`]: the transport's OS calls (listen, connect, `SO_PEERCRED`, frames with
//!   `SCM_RIGHTS` descriptors).
//!
//! Linux only: elsewhere the crate is empty.

#[cfg(target_os = "linux")]
pub mod agent;
#[cfg(all(target_os = "linux", feature = "demo"))]
pub mod demo;
#[cfg(target_os = "linux")]
pub mod service;
#[cfg(target_os = "linux")]
pub mod socket;
#[cfg(target_os = "linux")]
pub mod wire;
