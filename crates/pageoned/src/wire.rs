//! The messages between the service (`pageoned`) and the agents embedded in the VMMs, and
//! their byte encoding.
//!
//! # Framing
//! The transport is a Unix `SOCK_SEQPACKET` socket ([`crate::socket`]): one message is
//! one datagram (a *frame*), so frames carry no length prefix. A frame is at most
//! [`MAX_FRAME`] bytes. File descriptors (the canonical store's memfd in
//! [`Msg::Welcome`]) travel as `SCM_RIGHTS` ancillary data of the frame, never in its
//! bytes.
//!
//! # Encoding
//! All integers are little-endian and fixed-width. Every frame starts with an 8-byte
//! header: `magic: u32` ([`MAGIC`], the bytes `DOGP` on the wire), `version: u16`
//! ([`VERSION`]), `kind: u16` (one of the [`kind`] constants), then the body of that kind
//! (see [`Msg`]'s variants for their fields, encoded in declaration order):
//!
//! - a list is a `u32` count, then its items;
//! - a string is a `u8` byte length, then that many bytes of UTF-8;
//! - a `bool` is one byte, 0 or 1; an `Option<u64>` is a tag byte (0 = `None`, 1 =
//!   `Some`) then, for `Some`, the `u64`; a `Result<T, ErrorCode>` is a tag byte (0 =
//!   `Ok`, 1 = `Err`) then `T` or the [`ErrorCode`];
//! - an enum ([`Op`], [`ReplyBody`], [`ErrorCode`], [`HoldKind`], [`Outcome`]) is a tag
//!   byte (its variant's position, from 0) then the variant's fields;
//! - a [`PageRef`] is `region: u32`, `index: u32`; a [`RegionDecl`] is `region: u32`,
//!   `addr: u64`, `pages: u32`.
//!
//! The encoding is canonical: a frame [`decode`] accepts is exactly what [`encode`]
//! writes for the message it decodes to.
//!
//! # Versioning
//! The header's version is [`VERSION`]; a frame of any other version is rejected
//! ([`WireError::BadVersion`]). A change of any message's layout, or a new kind that a
//! peer must understand, takes a new version: the two sides must run the same one.
//!
//! # Validation
//! The peer is not trusted: [`decode`] never panics and allocates at most what the frame
//! itself can hold. It rejects
//!
//! - a frame shorter than what its fields need ([`WireError::Truncated`]), or longer than
//!   [`MAX_FRAME`] ([`WireError::TooLong`]), or with bytes after the message
//!   ([`WireError::TrailingBytes`]);
//! - a wrong magic, version or kind;
//! - a list of more than [`MAX_PAGES_PER_REQUEST`] items ([`WireError::TooMany`], checked
//!   before anything is allocated), or a count whose items cannot fit in the rest of the
//!   frame ([`WireError::Truncated`], also before allocating);
//! - a string longer than [`MAX_STRING`] bytes, not UTF-8, or with control characters (a
//!   name ends up in logs);
//! - an enum tag, `bool`, `Option` or `Result` tag out of range, and a [`RegionDecl`]
//!   whose address is not page-aligned, whose size is zero pages, or whose end overflows
//!   ([`WireError::BadValue`]).
//!
//! Semantic checks (which regions a peer owns, whether its reply answers the request,
//! overlapping regions) are the receiver's, not the codec's. A peer that sends a
//! malformed frame gets an [`Msg::Error`] (code [`ErrorCode::Protocol`]) and a
//! disconnect.
//!
//! [`encode`] checks the same limits, so it never writes a frame [`decode`] would reject;
//! it returns an error (never panics) on a message that breaks them.

#![forbid(unsafe_code)]

use std::fmt;

use page_memory::{MergeOutcome, PageError, PageId, RegionId, PAGE_SIZE};

/// The first four bytes of every frame (little-endian; "PGOD" read as a big-endian
/// number).
pub const MAGIC: u32 = 0x5047_4F44;
/// The protocol version this module speaks (2: the Per Page Recycler's
/// [`Msg::Pools`], [`Op::Reclaim`] and [`ReplyBody::Reclaimed`]).
pub const VERSION: u16 = 2;
/// The longest frame, in bytes (header included).
pub const MAX_FRAME: usize = 256 * 1024;
/// The length of the header (magic, version, kind) in front of every body.
pub const HEADER_LEN: usize = 8;
/// The most items of any list in a message (pages of a request or reply, regions,
/// hold events, written pages); a longer list is [`WireError::TooMany`].
pub const MAX_PAGES_PER_REQUEST: usize = 4096;
/// The longest string (a [`Msg::Hello`] name, a [`Msg::Error`] text), in bytes.
pub const MAX_STRING: usize = 64;

/// The `kind` field of the header, one per [`Msg`] variant. Agent-to-service messages
/// are `0x00xx`, service-to-agent messages `0x01xx`.
pub mod kind {
    /// [`Msg::Hello`](super::Msg::Hello).
    pub const HELLO: u16 = 0x0001;
    /// [`Msg::Register`](super::Msg::Register).
    pub const REGISTER: u16 = 0x0002;
    /// [`Msg::Unregister`](super::Msg::Unregister).
    pub const UNREGISTER: u16 = 0x0003;
    /// [`Msg::Reply`](super::Msg::Reply).
    pub const REPLY: u16 = 0x0004;
    /// [`Msg::Holds`](super::Msg::Holds).
    pub const HOLDS: u16 = 0x0005;
    /// [`Msg::Written`](super::Msg::Written).
    pub const WRITTEN: u16 = 0x0006;
    /// [`Msg::Mappings`](super::Msg::Mappings).
    pub const MAPPINGS: u16 = 0x0007;
    /// [`Msg::Pools`](super::Msg::Pools).
    pub const POOLS: u16 = 0x0008;
    /// [`Msg::Welcome`](super::Msg::Welcome).
    pub const WELCOME: u16 = 0x0101;
    /// [`Msg::Registered`](super::Msg::Registered).
    pub const REGISTERED: u16 = 0x0102;
    /// [`Msg::Request`](super::Msg::Request).
    pub const REQUEST: u16 = 0x0103;
    /// [`Msg::Error`](super::Msg::Error).
    pub const ERROR: u16 = 0x0104;
}

/// Why a frame could not be decoded, or a message encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The frame ends before the message does.
    Truncated,
    /// The frame is (or would be) longer than [`MAX_FRAME`].
    TooLong,
    /// The frame does not start with [`MAGIC`].
    BadMagic,
    /// The frame is of a protocol version this side does not speak.
    BadVersion {
        /// The version in the frame.
        got: u16,
    },
    /// The header's kind is none of [`kind`]'s.
    UnknownKind(u16),
    /// A field holds a value out of its range (an enum tag, a `bool`, a string that is
    /// not UTF-8, an unaligned address, ...).
    BadValue {
        /// The field, as `Message.field`.
        field: &'static str,
    },
    /// A list (or string) is longer than its limit.
    TooMany {
        /// The list, as `Message.field`.
        field: &'static str,
        /// Its length in the frame (or the message being encoded).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes follow the end of the message.
    TrailingBytes,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "frame truncated: it ends inside the message"),
            WireError::TooLong => write!(f, "frame longer than {MAX_FRAME} bytes"),
            WireError::BadMagic => write!(f, "frame without the protocol's magic number"),
            WireError::BadVersion { got } => {
                write!(f, "protocol version {got}, expected {VERSION}")
            }
            WireError::UnknownKind(k) => write!(f, "unknown message kind {k:#06x}"),
            WireError::BadValue { field } => write!(f, "invalid value in {field}"),
            WireError::TooMany { field, count, max } => {
                write!(f, "{field} holds {count} items, more than the limit {max}")
            }
            WireError::TrailingBytes => write!(f, "bytes after the end of the message"),
        }
    }
}

impl std::error::Error for WireError {}

/// A page of an agent's guest RAM: the agent's own region number (as in its
/// [`RegionDecl`]) and the page's index in that region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRef {
    /// The region, numbered by the agent.
    pub region: u32,
    /// The page's index in the region.
    pub index: u32,
}

/// A region of guest RAM an agent registers: where it lies in the agent's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionDecl {
    /// The agent's number for the region (its [`PageRef::region`]).
    pub region: u32,
    /// The region's start in the agent's address space; a multiple of [`PAGE_SIZE`].
    pub addr: u64,
    /// The region's length in pages; at least 1, and `addr + pages * PAGE_SIZE` does not
    /// overflow.
    pub pages: u32,
}

/// A hold an agent took or let go of on a slot of the canonical store (the Linux
/// backend's own type: kind tag 0 = slot, 1 = tomb).
pub use page_memory::linux::shared::{HoldEvent, HoldKind};

/// A protected page the guest wrote (the agent saw the write-protect fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WrittenPage {
    /// The page.
    pub page: PageRef,
    /// The page's write generation after the write.
    pub gen: u64,
}

/// A message, agent to service or service to agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Agent → service, the first message of a connection. The peer's pid and uid come
    /// from `SO_PEERCRED` ([`crate::socket::peer_cred`]), never from a message.
    Hello {
        /// The VMM's name, for logs: at most [`MAX_STRING`] bytes, no control
        /// characters.
        name: String,
    },
    /// Agent → service: deduplicate these regions (answered by [`Msg::Registered`]).
    Register {
        /// The agent's request id, echoed by the answer.
        id: u64,
        /// The regions.
        regions: Vec<RegionDecl>,
    },
    /// Agent → service: stop deduplicating a region (the agent must then own all of
    /// its pages again).
    Unregister {
        /// The agent's request id.
        id: u64,
        /// The region.
        region: u32,
    },
    /// Agent → service: the answer to [`Msg::Request`] `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// One result per page of the request, in order.
        body: ReplyBody,
    },
    /// Agent → service: holds on canonical-store slots taken or dropped.
    Holds {
        /// The events, in the order they happened.
        events: Vec<HoldEvent>,
    },
    /// Agent → service: protected pages the guest wrote.
    Written {
        /// The pages.
        pages: Vec<WrittenPage>,
    },
    /// Agent → service: the VMM process's memory mappings (VMAs).
    Mappings {
        /// Mappings in use.
        in_use: u64,
        /// `vm.max_map_count`.
        limit: u64,
    },
    /// Agent → service: the agent's regions whose guest put a PIP pool in them, which
    /// the agent registered with its recycler ([`crate::agent::Agent::register_pool`]).
    /// The whole list each time: it replaces the one sent before. The service sends
    /// [`Op::Reclaim`] only for pages of these regions, and answers with
    /// [`Msg::Registered`].
    Pools {
        /// The agent's request id, echoed by the answer.
        id: u64,
        /// The regions, numbered by the agent.
        regions: Vec<u32>,
    },
    /// Service → agent, the answer to [`Msg::Hello`]. The frame carries the canonical
    /// store's memfd as `SCM_RIGHTS` ([`crate::socket::send`]), not in its bytes.
    Welcome {
        /// The trust domain the service put the agent in.
        domain: u32,
        /// The canonical store's size, in page slots.
        store_slots: u64,
    },
    /// Service → agent: the answer to [`Msg::Register`] or [`Msg::Pools`] `id`.
    Registered {
        /// The request's id.
        id: u64,
        /// Whether the regions were registered.
        result: Result<(), ErrorCode>,
    },
    /// Service → agent: do `op` in your address space and [`Msg::Reply`] with `id`.
    Request {
        /// The service's request id.
        id: u64,
        /// The operation.
        op: Op,
    },
    /// Either way: a fatal error; the sender disconnects after it.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Details for logs: at most [`MAX_STRING`] bytes, no control characters (see
        /// [`error_text`]).
        text: String,
    },
}

/// An operation the service asks an agent to perform on its own pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write-protect the pages; the reply is [`ReplyBody::Tokens`].
    Protect(Vec<PageRef>),
    /// Drop the write protection; the reply is [`ReplyBody::Done`].
    Unprotect(Vec<PageRef>),
    /// Copy each page into the store slot (the page must be unchanged since the token)
    /// and map that slot in its place; the reply is [`ReplyBody::Frames`].
    CanonicalizeAt(Vec<(PageRef, u64, u64)>),
    /// Map each page onto a store slot (`None`: the zero page) if it is unchanged since
    /// the token and equal to it; the reply is [`ReplyBody::Outcomes`].
    MergeAt(Vec<(PageRef, u64, Option<u64>)>),
    /// Give the pages' memory back (the guest reads zeros); the reply is
    /// [`ReplyBody::Done`].
    Recycle(Vec<PageRef>),
    /// Give a merged page a private copy again; the reply is [`ReplyBody::Done`] with one
    /// item.
    Unmerge(PageRef),
    /// Recycle those of the pages that the guest freed, as the agent's Per Page Recycler
    /// proves them (each page's PIP mark read, validated against its region's pool, the
    /// pool slot claimed, the page recycled, the claim completed): the agent, not the
    /// service, decides. The reply is [`ReplyBody::Reclaimed`].
    Reclaim(Vec<PageRef>),
}

/// An agent's results for a [`Msg::Request`], one per page, in the request's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyBody {
    /// For [`Op::Protect`]: the pages' protect tokens.
    Tokens(Vec<Result<u64, ErrorCode>>),
    /// For [`Op::Unprotect`], [`Op::Recycle`] and [`Op::Unmerge`] (one item).
    Done(Vec<Result<(), ErrorCode>>),
    /// For [`Op::CanonicalizeAt`]: the slot each page now maps (`None`: the zero page).
    Frames(Vec<Result<Option<u64>, ErrorCode>>),
    /// For [`Op::MergeAt`].
    Outcomes(Vec<Result<Outcome, ErrorCode>>),
    /// For [`Op::Reclaim`]: whether each page was recycled (`false`: not marked, not
    /// proven free, or its region has no pool).
    Reclaimed(Vec<Result<bool, ErrorCode>>),
}

/// The outcome of a merge that ran: [`page_memory::MergeOutcome`] on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The page now maps the slot.
    Merged,
    /// The page was written since its token: nothing changed.
    Changed,
    /// The page's contents differ from the slot's: nothing changed.
    Differs,
}

impl From<MergeOutcome> for Outcome {
    fn from(o: MergeOutcome) -> Self {
        match o {
            MergeOutcome::Merged => Outcome::Merged,
            MergeOutcome::Changed => Outcome::Changed,
            MergeOutcome::Differs => Outcome::Differs,
        }
    }
}

impl From<Outcome> for MergeOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Merged => MergeOutcome::Merged,
            Outcome::Changed => MergeOutcome::Changed,
            Outcome::Differs => MergeOutcome::Differs,
        }
    }
}

/// Why an operation failed, on the wire: [`PageError`] without the page and region (the
/// receiver knows which it asked about), plus the protocol's own reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// [`PageError::NoSuchRegion`].
    NoSuchRegion,
    /// [`PageError::NoSuchPage`].
    NoSuchPage,
    /// [`PageError::Stale`].
    Stale,
    /// [`PageError::Unsupported`].
    Unsupported,
    /// [`PageError::Unmapped`].
    Unmapped,
    /// [`PageError::MapCountLimit`].
    MapCountLimit {
        /// `vm.max_map_count`.
        limit: u64,
        /// The process's mappings at the last count.
        mappings: u64,
    },
    /// [`PageError::Pinned`].
    Pinned,
    /// [`PageError::Os`].
    Os {
        /// The OS error number.
        errno: i32,
    },
    /// The peer broke the protocol (a malformed frame, a reply to no request, a page of
    /// a region it does not own).
    Protocol,
    /// The peer is busy: try again later.
    Busy,
    /// The peer may not do this (its uid, or the service's policy).
    Denied,
}

/// [`PageError::Os`]'s `op` for an [`ErrorCode::Os`] reported by the peer.
const OP_PEER: &str = "reported by the peer";
/// [`PageError::Os`]'s `op` for [`ErrorCode::Protocol`].
const OP_PROTOCOL: &str = "reported by the peer: protocol error";
/// [`PageError::Os`]'s `op` for [`ErrorCode::Busy`].
const OP_BUSY: &str = "reported by the peer: busy";
/// [`PageError::Os`]'s `op` for [`ErrorCode::Denied`].
const OP_DENIED: &str = "reported by the peer: denied";
/// [`PageError::Unsupported`]'s text for an [`ErrorCode::Unsupported`] from the peer.
const UNSUPPORTED_PEER: &str = "reported by the peer";

impl ErrorCode {
    /// The code of a page-memory error (an agent's backend failed a page).
    ///
    /// Codes with no [`PageError`] of their own travel as [`PageError::Os`] with fixed
    /// `op` strings (see [`ErrorCode::into_page_error`]) and come back as themselves; a
    /// [`PageError`] variant newer than this crate becomes [`ErrorCode::Unsupported`].
    pub fn from_page_error(e: &PageError) -> Self {
        match e {
            PageError::NoSuchRegion(_) => ErrorCode::NoSuchRegion,
            PageError::NoSuchPage(_) => ErrorCode::NoSuchPage,
            PageError::Stale(_) => ErrorCode::Stale,
            PageError::Unsupported(_) => ErrorCode::Unsupported,
            PageError::Unmapped(_) => ErrorCode::Unmapped,
            PageError::MapCountLimit { limit, mappings } => ErrorCode::MapCountLimit {
                limit: *limit,
                mappings: *mappings,
            },
            PageError::Pinned(_) => ErrorCode::Pinned,
            PageError::Os { op, errno } => match *op {
                OP_PROTOCOL => ErrorCode::Protocol,
                OP_BUSY => ErrorCode::Busy,
                OP_DENIED => ErrorCode::Denied,
                _ => ErrorCode::Os { errno: *errno },
            },
            _ => ErrorCode::Unsupported,
        }
    }

    /// The page-memory error for this code, reported by an agent about `page` (the
    /// service's id for it) of `region`.
    ///
    /// [`ErrorCode::Protocol`], [`ErrorCode::Busy`] and [`ErrorCode::Denied`] become
    /// [`PageError::Os`] with `EPROTO`, `EBUSY` and `EACCES`; [`ErrorCode::Os`] and
    /// [`ErrorCode::Unsupported`] say they were reported by the peer.
    /// [`ErrorCode::from_page_error`] maps each result back to `self`.
    pub fn into_page_error(self, page: PageId, region: RegionId) -> PageError {
        match self {
            ErrorCode::NoSuchRegion => PageError::NoSuchRegion(region),
            ErrorCode::NoSuchPage => PageError::NoSuchPage(page),
            ErrorCode::Stale => PageError::Stale(page),
            ErrorCode::Unsupported => PageError::Unsupported(UNSUPPORTED_PEER),
            ErrorCode::Unmapped => PageError::Unmapped(region),
            ErrorCode::MapCountLimit { limit, mappings } => {
                PageError::MapCountLimit { limit, mappings }
            }
            ErrorCode::Pinned => PageError::Pinned(page),
            ErrorCode::Os { errno } => PageError::Os { op: OP_PEER, errno },
            ErrorCode::Protocol => PageError::Os {
                op: OP_PROTOCOL,
                errno: libc::EPROTO,
            },
            ErrorCode::Busy => PageError::Os {
                op: OP_BUSY,
                errno: libc::EBUSY,
            },
            ErrorCode::Denied => PageError::Os {
                op: OP_DENIED,
                errno: libc::EACCES,
            },
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::NoSuchRegion => write!(f, "no such region"),
            ErrorCode::NoSuchPage => write!(f, "no such page"),
            ErrorCode::Stale => write!(f, "stale token"),
            ErrorCode::Unsupported => write!(f, "unsupported"),
            ErrorCode::Unmapped => write!(f, "region unmapped"),
            ErrorCode::MapCountLimit { limit, mappings } => {
                write!(f, "map count limit ({mappings} of {limit} mappings)")
            }
            ErrorCode::Pinned => write!(f, "page pinned"),
            ErrorCode::Os { errno } => {
                write!(f, "OS error: {}", std::io::Error::from_raw_os_error(*errno))
            }
            ErrorCode::Protocol => write!(f, "protocol error"),
            ErrorCode::Busy => write!(f, "busy"),
            ErrorCode::Denied => write!(f, "denied"),
        }
    }
}

/// `text` made fit for [`Msg::Error`]: control characters replaced by spaces, cut to at
/// most [`MAX_STRING`] bytes at a character boundary.
pub fn error_text(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_STRING {
            break;
        }
        out.push(c);
    }
    out
}

impl Msg {
    /// The header's `kind` for this message (one of the [`kind`] constants).
    pub fn kind(&self) -> u16 {
        match self {
            Msg::Hello { .. } => kind::HELLO,
            Msg::Register { .. } => kind::REGISTER,
            Msg::Unregister { .. } => kind::UNREGISTER,
            Msg::Reply { .. } => kind::REPLY,
            Msg::Holds { .. } => kind::HOLDS,
            Msg::Written { .. } => kind::WRITTEN,
            Msg::Mappings { .. } => kind::MAPPINGS,
            Msg::Pools { .. } => kind::POOLS,
            Msg::Welcome { .. } => kind::WELCOME,
            Msg::Registered { .. } => kind::REGISTERED,
            Msg::Request { .. } => kind::REQUEST,
            Msg::Error { .. } => kind::ERROR,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding

/// Appends the frame of `msg` to `out`.
///
/// # Errors
/// [`WireError::TooMany`] for a list longer than [`MAX_PAGES_PER_REQUEST`] or a string
/// longer than [`MAX_STRING`], [`WireError::BadValue`] for a string with control
/// characters or an invalid [`RegionDecl`], [`WireError::TooLong`] if the frame would
/// exceed [`MAX_FRAME`]. On an error `out` is left as it was.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    let result = encode_frame(msg, out).and_then(|()| {
        if out.len() - start > MAX_FRAME {
            Err(WireError::TooLong)
        } else {
            Ok(())
        }
    });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_frame(msg: &Msg, out: &mut Vec<u8>) -> Result<(), WireError> {
    put_u32(out, MAGIC);
    put_u16(out, VERSION);
    put_u16(out, msg.kind());
    match msg {
        Msg::Hello { name } => put_str(out, "Hello.name", name),
        Msg::Register { id, regions } => {
            put_u64(out, *id);
            put_list(out, "Register.regions", regions, |out, r| {
                check_region(r)?;
                put_u32(out, r.region);
                put_u64(out, r.addr);
                put_u32(out, r.pages);
                Ok(())
            })
        }
        Msg::Unregister { id, region } => {
            put_u64(out, *id);
            put_u32(out, *region);
            Ok(())
        }
        Msg::Reply { id, body } => {
            put_u64(out, *id);
            encode_reply(out, body)
        }
        Msg::Holds { events } => put_list(out, "Holds.events", events, |out, e| {
            put_u64(out, e.slot);
            out.push(match e.kind {
                HoldKind::Slot => 0,
                HoldKind::Tomb => 1,
            });
            out.push(u8::from(e.acquire));
            Ok(())
        }),
        Msg::Written { pages } => put_list(out, "Written.pages", pages, |out, w| {
            put_page(out, w.page);
            put_u64(out, w.gen);
            Ok(())
        }),
        Msg::Mappings { in_use, limit } => {
            put_u64(out, *in_use);
            put_u64(out, *limit);
            Ok(())
        }
        Msg::Pools { id, regions } => {
            put_u64(out, *id);
            put_list(out, "Pools.regions", regions, |out, r| {
                put_u32(out, *r);
                Ok(())
            })
        }
        Msg::Welcome {
            domain,
            store_slots,
        } => {
            put_u32(out, *domain);
            put_u64(out, *store_slots);
            Ok(())
        }
        Msg::Registered { id, result } => {
            put_u64(out, *id);
            put_result(out, result, |_, ()| {});
            Ok(())
        }
        Msg::Request { id, op } => {
            put_u64(out, *id);
            encode_op(out, op)
        }
        Msg::Error { code, text } => {
            put_code(out, code);
            put_str(out, "Error.text", text)
        }
    }
}

fn encode_op(out: &mut Vec<u8>, op: &Op) -> Result<(), WireError> {
    match op {
        Op::Protect(pages) => {
            out.push(0);
            put_list(out, "Op::Protect", pages, |out, p| {
                put_page(out, *p);
                Ok(())
            })
        }
        Op::Unprotect(pages) => {
            out.push(1);
            put_list(out, "Op::Unprotect", pages, |out, p| {
                put_page(out, *p);
                Ok(())
            })
        }
        Op::CanonicalizeAt(items) => {
            out.push(2);
            put_list(out, "Op::CanonicalizeAt", items, |out, (p, token, slot)| {
                put_page(out, *p);
                put_u64(out, *token);
                put_u64(out, *slot);
                Ok(())
            })
        }
        Op::MergeAt(items) => {
            out.push(3);
            put_list(out, "Op::MergeAt", items, |out, (p, token, slot)| {
                put_page(out, *p);
                put_u64(out, *token);
                put_option(out, *slot);
                Ok(())
            })
        }
        Op::Recycle(pages) => {
            out.push(4);
            put_list(out, "Op::Recycle", pages, |out, p| {
                put_page(out, *p);
                Ok(())
            })
        }
        Op::Unmerge(p) => {
            out.push(5);
            put_page(out, *p);
            Ok(())
        }
        Op::Reclaim(pages) => {
            out.push(6);
            put_list(out, "Op::Reclaim", pages, |out, p| {
                put_page(out, *p);
                Ok(())
            })
        }
    }
}

fn encode_reply(out: &mut Vec<u8>, body: &ReplyBody) -> Result<(), WireError> {
    match body {
        ReplyBody::Tokens(items) => {
            out.push(0);
            put_list(out, "ReplyBody::Tokens", items, |out, r| {
                put_result(out, r, |out, t| put_u64(out, *t));
                Ok(())
            })
        }
        ReplyBody::Done(items) => {
            out.push(1);
            put_list(out, "ReplyBody::Done", items, |out, r| {
                put_result(out, r, |_, ()| {});
                Ok(())
            })
        }
        ReplyBody::Frames(items) => {
            out.push(2);
            put_list(out, "ReplyBody::Frames", items, |out, r| {
                put_result(out, r, |out, slot| put_option(out, *slot));
                Ok(())
            })
        }
        ReplyBody::Outcomes(items) => {
            out.push(3);
            put_list(out, "ReplyBody::Outcomes", items, |out, r| {
                put_result(out, r, |out, o| {
                    out.push(match o {
                        Outcome::Merged => 0,
                        Outcome::Changed => 1,
                        Outcome::Differs => 2,
                    })
                });
                Ok(())
            })
        }
        ReplyBody::Reclaimed(items) => {
            out.push(4);
            put_list(out, "ReplyBody::Reclaimed", items, |out, r| {
                put_result(out, r, |out, b| out.push(u8::from(*b)));
                Ok(())
            })
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_page(out: &mut Vec<u8>, p: PageRef) {
    put_u32(out, p.region);
    put_u32(out, p.index);
}

fn put_option(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_u64(out, v);
        }
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), WireError> {
    check_str(field, s)?;
    // check_str bounds the length by MAX_STRING (64).
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_list<T>(
    out: &mut Vec<u8>,
    field: &'static str,
    items: &[T],
    mut put: impl FnMut(&mut Vec<u8>, &T) -> Result<(), WireError>,
) -> Result<(), WireError> {
    if items.len() > MAX_PAGES_PER_REQUEST {
        return Err(WireError::TooMany {
            field,
            count: items.len(),
            max: MAX_PAGES_PER_REQUEST,
        });
    }
    // At most MAX_PAGES_PER_REQUEST (4096): fits a u32.
    put_u32(out, items.len() as u32);
    for item in items {
        put(out, item)?;
    }
    Ok(())
}

fn put_result<T>(
    out: &mut Vec<u8>,
    r: &Result<T, ErrorCode>,
    put_ok: impl FnOnce(&mut Vec<u8>, &T),
) {
    match r {
        Ok(v) => {
            out.push(0);
            put_ok(out, v);
        }
        Err(code) => {
            out.push(1);
            put_code(out, code);
        }
    }
}

fn put_code(out: &mut Vec<u8>, code: &ErrorCode) {
    match *code {
        ErrorCode::NoSuchRegion => out.push(0),
        ErrorCode::NoSuchPage => out.push(1),
        ErrorCode::Stale => out.push(2),
        ErrorCode::Unsupported => out.push(3),
        ErrorCode::Unmapped => out.push(4),
        ErrorCode::MapCountLimit { limit, mappings } => {
            out.push(5);
            put_u64(out, limit);
            put_u64(out, mappings);
        }
        ErrorCode::Pinned => out.push(6),
        ErrorCode::Os { errno } => {
            out.push(7);
            out.extend_from_slice(&errno.to_le_bytes());
        }
        ErrorCode::Protocol => out.push(8),
        ErrorCode::Busy => out.push(9),
        ErrorCode::Denied => out.push(10),
    }
}

/// The checks both sides apply to a string.
fn check_str(field: &'static str, s: &str) -> Result<(), WireError> {
    if s.len() > MAX_STRING {
        return Err(WireError::TooMany {
            field,
            count: s.len(),
            max: MAX_STRING,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(WireError::BadValue { field });
    }
    Ok(())
}

/// The checks both sides apply to a region declaration.
fn check_region(r: &RegionDecl) -> Result<(), WireError> {
    if r.addr % PAGE_SIZE as u64 != 0 {
        return Err(WireError::BadValue {
            field: "RegionDecl.addr",
        });
    }
    let len = u64::from(r.pages) * PAGE_SIZE as u64;
    if r.pages == 0 || r.addr.checked_add(len).is_none() {
        return Err(WireError::BadValue {
            field: "RegionDecl.pages",
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Decoding

/// Decodes one frame.
///
/// # Errors
/// See the [module docs](self#validation); never panics, whatever `frame` holds.
pub fn decode(frame: &[u8]) -> Result<Msg, WireError> {
    if frame.len() > MAX_FRAME {
        return Err(WireError::TooLong);
    }
    let mut r = Reader { buf: frame };
    if r.u32()? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::BadVersion { got: version });
    }
    let msg = match r.u16()? {
        kind::HELLO => Msg::Hello {
            name: r.string("Hello.name")?,
        },
        kind::REGISTER => Msg::Register {
            id: r.u64()?,
            regions: r.list("Register.regions", 16, |r| {
                let decl = RegionDecl {
                    region: r.u32()?,
                    addr: r.u64()?,
                    pages: r.u32()?,
                };
                check_region(&decl)?;
                Ok(decl)
            })?,
        },
        kind::UNREGISTER => Msg::Unregister {
            id: r.u64()?,
            region: r.u32()?,
        },
        kind::REPLY => Msg::Reply {
            id: r.u64()?,
            body: r.reply()?,
        },
        kind::HOLDS => Msg::Holds {
            events: r.list("Holds.events", 10, |r| {
                Ok(HoldEvent {
                    slot: r.u64()?,
                    kind: match r.u8()? {
                        0 => HoldKind::Slot,
                        1 => HoldKind::Tomb,
                        _ => {
                            return Err(WireError::BadValue {
                                field: "HoldEvent.kind",
                            })
                        }
                    },
                    acquire: r.bool("HoldEvent.acquire")?,
                })
            })?,
        },
        kind::WRITTEN => Msg::Written {
            pages: r.list("Written.pages", 16, |r| {
                Ok(WrittenPage {
                    page: r.page()?,
                    gen: r.u64()?,
                })
            })?,
        },
        kind::MAPPINGS => Msg::Mappings {
            in_use: r.u64()?,
            limit: r.u64()?,
        },
        kind::POOLS => Msg::Pools {
            id: r.u64()?,
            regions: r.list("Pools.regions", 4, Reader::u32)?,
        },
        kind::WELCOME => Msg::Welcome {
            domain: r.u32()?,
            store_slots: r.u64()?,
        },
        kind::REGISTERED => Msg::Registered {
            id: r.u64()?,
            result: r.result("Registered.result", |_| Ok(()))?,
        },
        kind::REQUEST => Msg::Request {
            id: r.u64()?,
            op: r.op()?,
        },
        kind::ERROR => Msg::Error {
            code: r.code()?,
            text: r.string("Error.text")?,
        },
        other => return Err(WireError::UnknownKind(other)),
    };
    if !r.buf.is_empty() {
        return Err(WireError::TrailingBytes);
    }
    Ok(msg)
}

/// The unread rest of a frame.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(WireError::Truncated)?;
        self.buf = rest;
        Ok(*head)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.take().map(u64::from_le_bytes)
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadValue { field }),
        }
    }

    fn page(&mut self) -> Result<PageRef, WireError> {
        Ok(PageRef {
            region: self.u32()?,
            index: self.u32()?,
        })
    }

    fn option(&mut self, field: &'static str) -> Result<Option<u64>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(WireError::BadValue { field }),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let len = usize::from(self.u8()?);
        if len > MAX_STRING {
            return Err(WireError::TooMany {
                field,
                count: len,
                max: MAX_STRING,
            });
        }
        let bytes = self.bytes(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| WireError::BadValue { field })?;
        check_str(field, s)?;
        Ok(s.to_owned())
    }

    /// A list of items at least `min_item` bytes long each. The count is checked against
    /// [`MAX_PAGES_PER_REQUEST`] and against the bytes left before anything is
    /// allocated.
    fn list<T>(
        &mut self,
        field: &'static str,
        min_item: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, WireError>,
    ) -> Result<Vec<T>, WireError> {
        let count = self.u32()?;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        if count > MAX_PAGES_PER_REQUEST {
            return Err(WireError::TooMany {
                field,
                count,
                max: MAX_PAGES_PER_REQUEST,
            });
        }
        if count.saturating_mul(min_item) > self.buf.len() {
            return Err(WireError::Truncated);
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }

    fn result<T>(
        &mut self,
        field: &'static str,
        ok: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Result<T, ErrorCode>, WireError> {
        match self.u8()? {
            0 => Ok(Ok(ok(self)?)),
            1 => Ok(Err(self.code()?)),
            _ => Err(WireError::BadValue { field }),
        }
    }

    fn code(&mut self) -> Result<ErrorCode, WireError> {
        Ok(match self.u8()? {
            0 => ErrorCode::NoSuchRegion,
            1 => ErrorCode::NoSuchPage,
            2 => ErrorCode::Stale,
            3 => ErrorCode::Unsupported,
            4 => ErrorCode::Unmapped,
            5 => ErrorCode::MapCountLimit {
                limit: self.u64()?,
                mappings: self.u64()?,
            },
            6 => ErrorCode::Pinned,
            7 => ErrorCode::Os {
                errno: i32::from_le_bytes(self.take()?),
            },
            8 => ErrorCode::Protocol,
            9 => ErrorCode::Busy,
            10 => ErrorCode::Denied,
            _ => return Err(WireError::BadValue { field: "ErrorCode" }),
        })
    }

    fn pages(&mut self, field: &'static str) -> Result<Vec<PageRef>, WireError> {
        self.list(field, 8, Self::page)
    }

    fn op(&mut self) -> Result<Op, WireError> {
        Ok(match self.u8()? {
            0 => Op::Protect(self.pages("Op::Protect")?),
            1 => Op::Unprotect(self.pages("Op::Unprotect")?),
            2 => Op::CanonicalizeAt(self.list("Op::CanonicalizeAt", 24, |r| {
                Ok((r.page()?, r.u64()?, r.u64()?))
            })?),
            3 => Op::MergeAt(self.list("Op::MergeAt", 17, |r| {
                Ok((r.page()?, r.u64()?, r.option("Op::MergeAt.slot")?))
            })?),
            4 => Op::Recycle(self.pages("Op::Recycle")?),
            5 => Op::Unmerge(self.page()?),
            6 => Op::Reclaim(self.pages("Op::Reclaim")?),
            _ => return Err(WireError::BadValue { field: "Op" }),
        })
    }

    fn reply(&mut self) -> Result<ReplyBody, WireError> {
        Ok(match self.u8()? {
            // An `Ok` token is 9 bytes, an `Err` at least 2.
            0 => ReplyBody::Tokens(self.list("ReplyBody::Tokens", 2, |r| {
                r.result("ReplyBody::Tokens", Self::u64)
            })?),
            1 => ReplyBody::Done(self.list("ReplyBody::Done", 1, |r| {
                r.result("ReplyBody::Done", |_| Ok(()))
            })?),
            2 => ReplyBody::Frames(self.list("ReplyBody::Frames", 2, |r| {
                r.result("ReplyBody::Frames", |r| r.option("ReplyBody::Frames.slot"))
            })?),
            3 => ReplyBody::Outcomes(self.list("ReplyBody::Outcomes", 2, |r| {
                r.result("ReplyBody::Outcomes", |r| match r.u8()? {
                    0 => Ok(Outcome::Merged),
                    1 => Ok(Outcome::Changed),
                    2 => Ok(Outcome::Differs),
                    _ => Err(WireError::BadValue { field: "Outcome" }),
                })
            })?),
            4 => ReplyBody::Reclaimed(self.list("ReplyBody::Reclaimed", 2, |r| {
                r.result("ReplyBody::Reclaimed", |r| {
                    r.bool("ReplyBody::Reclaimed.taken")
                })
            })?),
            _ => return Err(WireError::BadValue { field: "ReplyBody" }),
        })
    }
}
