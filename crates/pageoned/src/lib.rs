//! `pageoned`: the PageONE deduplication engine as a service for many VMM processes.
//!
//! The daemon runs the engine over the guest RAM of every VMM that connects. Each VMM
//! embeds an *agent* that connects over a Unix `SOCK_SEQPACKET` socket, registers its
//! guest RAM, and performs remaps and write protection in its own address space when the
//! service asks. With the Per Page Recycler on
//! ([`service::ServiceConfig::with_recycle`]), the service also offers each VMM's recently
//! changed pages to its agent, which recycles those its guest freed into a PIP pool the
//! VMM registered ([`agent::Agent::register_pool`]): the agent proves each page free
//! itself, against the pool in its own memory (see the [`service`] docs, *The Per Page
//! Recycler across processes*). Each side treats the other's messages as hostile: every frame is
//! validated, and a malformed one gets an error message and a disconnect, never a panic.
//!
//! - [`service`]: the service (one PageONE engine and one canonical store per trust
//!   domain, over the guest RAM of the domain's VMMs);
//! - [`agent`]: what a VMM embeds;
//! - [`wire`]: the messages and their byte encoding (framing, versioning, validation);
//! - [`socket`]: the transport's OS calls (listen, connect, `SO_PEERCRED`, frames with
//!   `SCM_RIGHTS` descriptors).
//!
//! - `demo` (feature `demo`): a VMM process (guest RAM, an agent or KSM, writer
//!   threads) driven over stdin, for tests, examples and benchmarks.
//!
//! # Privileges
//! - The **service** reads guest pages with `process_vm_readv`: it needs ptrace access to
//!   each VMM (root or `CAP_SYS_PTRACE`, or the VMM's own user where Yama's
//!   `ptrace_scope` is 0 or 1: an agent allows its service with `PR_SET_PTRACER`).
//! - Each **agent** runs the Linux backend in its VMM, so the VMM needs a userfaultfd
//!   that handles kernel faults (its vCPUs write guest RAM through KVM): see
//!   `page_memory::linux`, *Write protection*.
//! - An agent talks only to a service whose user it trusts
//!   ([`agent::AgentConfig::service_uids`]: root and its own user by default); the
//!   service puts each VMM in the trust domain its configuration gives the VMM's user
//!   ([`service::ServiceConfig::with_domain`]; by default each user is a domain).
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
