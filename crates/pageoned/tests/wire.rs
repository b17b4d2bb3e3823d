//! The wire codec (round trips, truncations, hostile counts, validation) and the socket
//! transport (descriptors, credentials, end of stream, timeouts, oversized datagrams).
//!
//! Also runs hand-written inputs through the `wire_decode` fuzz target's checker
//! (`tests/common/wire_decode.rs`); the checked-in corpus (`fuzz/corpus/wire_decode/`)
//! is replayed by the workspace's `fuzz-corpus` crate. `write_seed_corpus` (ignored)
//! writes the corpus's seed frames.

#![cfg(target_os = "linux")]

#[path = "common/wire_decode.rs"]
mod wire_decode;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use page_memory::{MergeOutcome, PageError, PageId, RegionId, PAGE_SIZE};
use pageoned::socket::{self, MAX_FDS};
use pageoned::wire::{
    decode, encode, error_text, kind, ErrorCode, HoldEvent, HoldKind, Msg, Op, Outcome, PageRef,
    RegionDecl, ReplyBody, WireError, WrittenPage, HEADER_LEN, MAGIC, MAX_FRAME,
    MAX_PAGES_PER_REQUEST, MAX_STRING, VERSION,
};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Counting this thread's allocations, to show a hostile count allocates nothing.

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s
// contract; the counter is a const-initialized thread-local without a destructor, so
// touching it neither allocates nor recurses.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        // SAFETY: the caller's guarantees for `layout` are `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with `layout` (every allocation does).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes this thread allocated while running `f`.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

// ---------------------------------------------------------------------------------------
// Strategies

fn page_ref() -> impl Strategy<Value = PageRef> {
    (any::<u32>(), any::<u32>()).prop_map(|(region, index)| PageRef { region, index })
}

fn string() -> impl Strategy<Value = String> {
    // Up to 16 non-control characters of up to 4 bytes: at most 64 bytes.
    "\\PC{0,16}"
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::NoSuchRegion),
        Just(ErrorCode::NoSuchPage),
        Just(ErrorCode::Stale),
        Just(ErrorCode::Unsupported),
        Just(ErrorCode::Unmapped),
        (any::<u64>(), any::<u64>())
            .prop_map(|(limit, mappings)| ErrorCode::MapCountLimit { limit, mappings }),
        Just(ErrorCode::Pinned),
        any::<i32>().prop_map(|errno| ErrorCode::Os { errno }),
        Just(ErrorCode::Protocol),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Denied),
    ]
}

fn result<T: std::fmt::Debug>(
    ok: impl Strategy<Value = T>,
) -> impl Strategy<Value = Result<T, ErrorCode>> {
    prop_oneof![ok.prop_map(Ok), error_code().prop_map(Err)]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Merged),
        Just(Outcome::Changed),
        Just(Outcome::Differs)
    ]
}

fn region_decl() -> impl Strategy<Value = RegionDecl> {
    (any::<u32>(), 0u64..1 << 40, 1u32..=u32::MAX).prop_map(|(region, page, pages)| RegionDecl {
        region,
        addr: page * PAGE_SIZE as u64,
        pages,
    })
}

const LIST: std::ops::Range<usize> = 0..8;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        vec(page_ref(), LIST).prop_map(Op::Protect),
        vec(page_ref(), LIST).prop_map(Op::Unprotect),
        vec((page_ref(), any::<u64>(), any::<u64>()), LIST).prop_map(Op::CanonicalizeAt),
        vec((page_ref(), any::<u64>(), any::<Option<u64>>()), LIST).prop_map(Op::MergeAt),
        vec(page_ref(), LIST).prop_map(Op::Recycle),
        page_ref().prop_map(Op::Unmerge),
        vec(page_ref(), LIST).prop_map(Op::Reclaim),
    ]
}

fn reply_body() -> impl Strategy<Value = ReplyBody> {
    prop_oneof![
        vec(result(any::<u64>()), LIST).prop_map(ReplyBody::Tokens),
        vec(result(Just(())), LIST).prop_map(ReplyBody::Done),
        vec(result(any::<Option<u64>>()), LIST).prop_map(ReplyBody::Frames),
        vec(result(outcome()), LIST).prop_map(ReplyBody::Outcomes),
        vec(result(any::<bool>()), LIST).prop_map(ReplyBody::Reclaimed),
    ]
}

fn msg() -> impl Strategy<Value = Msg> {
    let hold =
        (any::<u64>(), any::<bool>(), any::<bool>()).prop_map(|(slot, tomb, acquire)| HoldEvent {
            slot,
            kind: if tomb { HoldKind::Tomb } else { HoldKind::Slot },
            acquire,
        });
    let written = (page_ref(), any::<u64>()).prop_map(|(page, gen)| WrittenPage { page, gen });
    prop_oneof![
        string().prop_map(|name| Msg::Hello { name }),
        (any::<u64>(), vec(region_decl(), LIST))
            .prop_map(|(id, regions)| Msg::Register { id, regions }),
        (any::<u64>(), any::<u32>()).prop_map(|(id, region)| Msg::Unregister { id, region }),
        (any::<u64>(), reply_body()).prop_map(|(id, body)| Msg::Reply { id, body }),
        vec(hold, LIST).prop_map(|events| Msg::Holds { events }),
        vec(written, LIST).prop_map(|pages| Msg::Written { pages }),
        (any::<u64>(), any::<u64>()).prop_map(|(in_use, limit)| Msg::Mappings { in_use, limit }),
        (any::<u64>(), vec(any::<u32>(), LIST))
            .prop_map(|(id, regions)| Msg::Pools { id, regions }),
        (any::<u32>(), any::<u64>()).prop_map(|(domain, store_slots)| Msg::Welcome {
            domain,
            store_slots
        }),
        (any::<u64>(), result(Just(()))).prop_map(|(id, result)| Msg::Registered { id, result }),
        (any::<u64>(), op()).prop_map(|(id, op)| Msg::Request { id, op }),
        (error_code(), string()).prop_map(|(code, text)| Msg::Error { code, text }),
    ]
}

fn frame(msg: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out).expect("encode");
    out
}

/// A header of `kind` followed by `body`.
fn raw(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------------------
// The codec

proptest! {
    #[test]
    fn every_message_round_trips(msg in msg()) {
        let bytes = frame(&msg);
        prop_assert!(bytes.len() <= MAX_FRAME);
        prop_assert_eq!(&bytes[..4], &MAGIC.to_le_bytes());
        prop_assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), msg.kind());
        prop_assert_eq!(decode(&bytes), Ok(msg));
        wire_decode::run(&bytes);
    }

    #[test]
    fn every_truncation_is_an_error(msg in msg()) {
        let bytes = frame(&msg);
        for len in 0..bytes.len() {
            prop_assert_eq!(decode(&bytes[..len]), Err(WireError::Truncated), "length {}", len);
        }
    }

    #[test]
    fn trailing_bytes_are_rejected(msg in msg(), extra in vec(any::<u8>(), 1..16)) {
        let mut bytes = frame(&msg);
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode(&bytes), Err(WireError::TrailingBytes));
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in vec(any::<u8>(), 0..64), kind in 0u16..0x0110) {
        wire_decode::run(&raw(kind, &body));
        wire_decode::run(&body);
    }

    #[test]
    fn encode_appends_without_touching_what_is_there(
        msg in msg(), prefix in vec(any::<u8>(), 0..16),
    ) {
        let mut out = prefix.clone();
        encode(&msg, &mut out).unwrap();
        prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
        prop_assert_eq!(decode(&out[prefix.len()..]), Ok(msg));
    }

    #[test]
    fn error_codes_survive_page_errors(code in error_code()) {
        let page = PageId { region: RegionId(3), index: 7 };
        let e = code.into_page_error(page, RegionId(3));
        prop_assert_eq!(ErrorCode::from_page_error(&e), code);
    }
}

#[test]
fn a_hostile_count_allocates_nothing() {
    // The counter sees allocations.
    let (_, allocated) = allocated_by(|| std::hint::black_box(vec![0u8; 100]));
    assert!(allocated >= 100);

    // Request { id, Protect(count = 0xFFFF_FFFF) } in 21 bytes.
    let mut body = 9u64.to_le_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    let bytes = raw(kind::REQUEST, &body);
    assert_eq!(bytes.len(), 21);
    let (result, allocated) = allocated_by(|| decode(&bytes));
    assert_eq!(
        result,
        Err(WireError::TooMany {
            field: "Op::Protect",
            count: u32::MAX as usize,
            max: MAX_PAGES_PER_REQUEST
        })
    );
    assert_eq!(allocated, 0);

    // Under the limit, but more than the frame holds: Truncated, still no allocation.
    let mut body = 9u64.to_le_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(MAX_PAGES_PER_REQUEST as u32).to_le_bytes());
    body.extend_from_slice(&[0; 8 * 3]);
    let bytes = raw(kind::REQUEST, &body);
    let (result, allocated) = allocated_by(|| decode(&bytes));
    assert_eq!(result, Err(WireError::Truncated));
    assert_eq!(allocated, 0);

    // Every list, counted at u32::MAX.
    let hostile = |kind: u16, prefix: &[u8]| {
        let mut body = prefix.to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let bytes = raw(kind, &body);
        let (result, allocated) = allocated_by(|| decode(&bytes));
        assert!(
            matches!(result, Err(WireError::TooMany { count, .. }) if count == u32::MAX as usize),
            "{result:?}"
        );
        assert_eq!(allocated, 0);
    };
    hostile(kind::REGISTER, &[0; 8]);
    hostile(kind::HOLDS, &[]);
    hostile(kind::WRITTEN, &[]);
    hostile(kind::POOLS, &[0; 8]);
    for tag in 0..5u8 {
        let mut prefix = vec![0; 8];
        prefix.push(tag);
        hostile(kind::REPLY, &prefix);
    }
    for tag in [0u8, 1, 2, 3, 4, 6] {
        let mut prefix = vec![0; 8];
        prefix.push(tag);
        hostile(kind::REQUEST, &prefix);
    }
}

#[test]
fn the_header_is_checked() {
    let good = frame(&Msg::Mappings {
        in_use: 1,
        limit: 2,
    });
    let mut bad = good.clone();
    bad[0] ^= 1;
    assert_eq!(decode(&bad), Err(WireError::BadMagic));
    let mut bad = good.clone();
    bad[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert_eq!(
        decode(&bad),
        Err(WireError::BadVersion { got: VERSION + 1 })
    );
    // Version 1 (before the Per Page Recycler's messages) is not spoken any more.
    bad[4..6].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(decode(&bad), Err(WireError::BadVersion { got: 1 }));
    let mut bad = good.clone();
    bad[6..8].copy_from_slice(&0x0200u16.to_le_bytes());
    assert_eq!(decode(&bad), Err(WireError::UnknownKind(0x0200)));
    assert_eq!(decode(&[]), Err(WireError::Truncated));
    assert_eq!(decode(&good[..HEADER_LEN]), Err(WireError::Truncated));
    let long = vec![0; MAX_FRAME + 1];
    assert_eq!(decode(&long), Err(WireError::TooLong));
    // Each error says what it is.
    for e in [
        WireError::Truncated,
        WireError::TooLong,
        WireError::BadMagic,
        WireError::BadVersion { got: 2 },
        WireError::UnknownKind(9),
        WireError::BadValue { field: "x" },
        WireError::TooMany {
            field: "x",
            count: 5,
            max: 4,
        },
        WireError::TrailingBytes,
    ] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn values_out_of_range_are_rejected() {
    let bad = |kind: u16, body: &[u8], field: &'static str| {
        assert_eq!(
            decode(&raw(kind, body)),
            Err(WireError::BadValue { field }),
            "{body:?}"
        );
    };
    let id = [0u8; 8];
    let cat = |parts: &[&[u8]]| parts.concat();
    // Enum tags.
    bad(kind::REQUEST, &cat(&[&id, &[7]]), "Op");
    bad(kind::REPLY, &cat(&[&id, &[5]]), "ReplyBody");
    bad(
        kind::REPLY,
        &cat(&[&id, &[4], &1u32.to_le_bytes(), &[0, 2]]),
        "ReplyBody::Reclaimed.taken",
    );
    bad(kind::ERROR, &[11, 0], "ErrorCode");
    bad(
        kind::HOLDS,
        &cat(&[&1u32.to_le_bytes(), &[0; 8], &[2, 0]]),
        "HoldEvent.kind",
    );
    bad(
        kind::HOLDS,
        &cat(&[&1u32.to_le_bytes(), &[0; 8], &[0, 2]]),
        "HoldEvent.acquire",
    );
    bad(kind::REGISTERED, &cat(&[&id, &[2]]), "Registered.result");
    bad(
        kind::REPLY,
        &cat(&[&id, &[3], &1u32.to_le_bytes(), &[0, 3]]),
        "Outcome",
    );
    bad(
        kind::REPLY,
        &cat(&[&id, &[2], &1u32.to_le_bytes(), &[0, 2]]),
        "ReplyBody::Frames.slot",
    );
    bad(
        kind::REQUEST,
        &cat(&[&id, &[3], &1u32.to_le_bytes(), &[0; 16], &[7]]),
        "Op::MergeAt.slot",
    );
    // Region declarations.
    let region = |addr: u64, pages: u32| {
        cat(&[
            &id,
            &1u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &addr.to_le_bytes(),
            &pages.to_le_bytes(),
        ])
    };
    bad(kind::REGISTER, &region(4097, 1), "RegionDecl.addr");
    bad(kind::REGISTER, &region(4096, 0), "RegionDecl.pages");
    bad(
        kind::REGISTER,
        &region(u64::MAX - 4095, 1),
        "RegionDecl.pages",
    );
    assert!(decode(&raw(kind::REGISTER, &region(u64::MAX - 8191, 1))).is_ok());
    // Strings: not UTF-8, control characters, too long.
    bad(kind::HELLO, &[2, 0xC3, 0x28], "Hello.name");
    bad(kind::HELLO, &[3, b'a', b'\n', b'b'], "Hello.name");
    bad(kind::ERROR, &[8, 1, 0x1B], "Error.text");
    let mut long = vec![65u8];
    long.extend_from_slice(&[b'a'; 65]);
    assert_eq!(
        decode(&raw(kind::HELLO, &long)),
        Err(WireError::TooMany {
            field: "Hello.name",
            count: 65,
            max: MAX_STRING
        })
    );
}

#[test]
fn encode_refuses_what_decode_would_reject() {
    let pages = vec![
        PageRef {
            region: 0,
            index: 0
        };
        MAX_PAGES_PER_REQUEST + 1
    ];
    let mut out = vec![1, 2, 3];
    let e = encode(
        &Msg::Request {
            id: 1,
            op: Op::Protect(pages),
        },
        &mut out,
    );
    assert_eq!(
        e,
        Err(WireError::TooMany {
            field: "Op::Protect",
            count: MAX_PAGES_PER_REQUEST + 1,
            max: MAX_PAGES_PER_REQUEST
        })
    );
    assert_eq!(
        out,
        [1, 2, 3],
        "a failed encode leaves the buffer as it was"
    );

    let name = "x".repeat(MAX_STRING + 1);
    assert!(matches!(
        encode(&Msg::Hello { name }, &mut out),
        Err(WireError::TooMany { .. })
    ));
    assert_eq!(
        encode(
            &Msg::Hello {
                name: "a\u{0}".into()
            },
            &mut out
        ),
        Err(WireError::BadValue {
            field: "Hello.name"
        })
    );
    let region = RegionDecl {
        region: 0,
        addr: 1,
        pages: 1,
    };
    assert_eq!(
        encode(
            &Msg::Register {
                id: 0,
                regions: vec![region]
            },
            &mut out
        ),
        Err(WireError::BadValue {
            field: "RegionDecl.addr"
        })
    );
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn the_largest_messages_fit_a_frame() {
    let n = MAX_PAGES_PER_REQUEST;
    let p = PageRef {
        region: u32::MAX,
        index: u32::MAX,
    };
    let worst = ErrorCode::MapCountLimit {
        limit: u64::MAX,
        mappings: u64::MAX,
    };
    let msgs = [
        Msg::Request {
            id: u64::MAX,
            op: Op::MergeAt(vec![(p, u64::MAX, Some(u64::MAX)); n]),
        },
        Msg::Request {
            id: u64::MAX,
            op: Op::CanonicalizeAt(vec![(p, u64::MAX, u64::MAX); n]),
        },
        Msg::Reply {
            id: 0,
            body: ReplyBody::Tokens(vec![Err(worst); n]),
        },
        Msg::Reply {
            id: 0,
            body: ReplyBody::Frames(vec![Err(worst); n]),
        },
        Msg::Written {
            pages: vec![WrittenPage { page: p, gen: 1 }; n],
        },
        Msg::Reply {
            id: 0,
            body: ReplyBody::Reclaimed(vec![Err(worst); n]),
        },
        Msg::Request {
            id: u64::MAX,
            op: Op::Reclaim(vec![p; n]),
        },
        Msg::Pools {
            id: u64::MAX,
            regions: vec![u32::MAX; n],
        },
        Msg::Register {
            id: 0,
            regions: vec![
                RegionDecl {
                    region: 1,
                    addr: 0,
                    pages: u32::MAX
                };
                n
            ],
        },
    ];
    for msg in msgs {
        let bytes = frame(&msg);
        assert!(bytes.len() <= MAX_FRAME);
        assert_eq!(decode(&bytes), Ok(msg));
    }
}

#[test]
fn conversions_to_and_from_page_memory() {
    for o in [
        MergeOutcome::Merged,
        MergeOutcome::Changed,
        MergeOutcome::Differs,
    ] {
        assert_eq!(MergeOutcome::from(Outcome::from(o)), o);
    }
    let page = PageId {
        region: RegionId(2),
        index: 5,
    };
    let region = RegionId(2);
    assert_eq!(
        ErrorCode::Stale.into_page_error(page, region),
        PageError::Stale(page)
    );
    assert_eq!(
        ErrorCode::NoSuchRegion.into_page_error(page, region),
        PageError::NoSuchRegion(region)
    );
    assert!(matches!(
        ErrorCode::Os { errno: 12 }.into_page_error(page, region),
        PageError::Os { errno: 12, .. }
    ));
    assert_eq!(
        ErrorCode::from_page_error(&PageError::Unsupported("anything")),
        ErrorCode::Unsupported
    );
    assert_eq!(
        ErrorCode::from_page_error(&PageError::Os {
            op: "mremap",
            errno: 22
        }),
        ErrorCode::Os { errno: 22 }
    );
    assert_eq!(ErrorCode::Pinned.to_string(), "page pinned");
}

#[test]
fn error_text_fits_the_wire() {
    let text = error_text(&format!("bad\nframe {}", "é".repeat(40)));
    assert!(text.len() <= MAX_STRING);
    assert!(text.starts_with("bad frame é"));
    let msg = Msg::Error {
        code: ErrorCode::Protocol,
        text,
    };
    assert_eq!(decode(&frame(&msg)), Ok(msg));
}

// ---------------------------------------------------------------------------------------
// Fuzz inputs and the seed corpus

/// Valid frames of every kind: the seeds of `fuzz/corpus/wire_decode/`.
fn seed_frames() -> Vec<(&'static str, Vec<u8>)> {
    let p = |region, index| PageRef { region, index };
    let msgs = [
        (
            "hello",
            Msg::Hello {
                name: "vmm-1".into(),
            },
        ),
        (
            "register",
            Msg::Register {
                id: 1,
                regions: vec![
                    RegionDecl {
                        region: 0,
                        addr: 0x7f00_0000_0000,
                        pages: 256,
                    },
                    RegionDecl {
                        region: 1,
                        addr: 0x7f10_0000_0000,
                        pages: 16,
                    },
                ],
            },
        ),
        ("unregister", Msg::Unregister { id: 2, region: 1 }),
        (
            "reply-tokens",
            Msg::Reply {
                id: 3,
                body: ReplyBody::Tokens(vec![Ok(17), Err(ErrorCode::Pinned)]),
            },
        ),
        (
            "reply-done",
            Msg::Reply {
                id: 4,
                body: ReplyBody::Done(vec![Ok(()), Err(ErrorCode::Os { errno: 12 })]),
            },
        ),
        (
            "reply-frames",
            Msg::Reply {
                id: 5,
                body: ReplyBody::Frames(vec![Ok(Some(9)), Ok(None), Err(ErrorCode::Stale)]),
            },
        ),
        (
            "reply-outcomes",
            Msg::Reply {
                id: 6,
                body: ReplyBody::Outcomes(vec![
                    Ok(Outcome::Merged),
                    Ok(Outcome::Changed),
                    Ok(Outcome::Differs),
                    Err(ErrorCode::MapCountLimit {
                        limit: 65530,
                        mappings: 65000,
                    }),
                ]),
            },
        ),
        (
            "holds",
            Msg::Holds {
                events: vec![
                    HoldEvent {
                        slot: 4,
                        kind: HoldKind::Slot,
                        acquire: true,
                    },
                    HoldEvent {
                        slot: 4,
                        kind: HoldKind::Tomb,
                        acquire: false,
                    },
                ],
            },
        ),
        (
            "written",
            Msg::Written {
                pages: vec![WrittenPage {
                    page: p(0, 12),
                    gen: 3,
                }],
            },
        ),
        (
            "mappings",
            Msg::Mappings {
                in_use: 800,
                limit: 65530,
            },
        ),
        (
            "pools",
            Msg::Pools {
                id: 13,
                regions: vec![0, 2],
            },
        ),
        (
            "reply-reclaimed",
            Msg::Reply {
                id: 14,
                body: ReplyBody::Reclaimed(vec![Ok(true), Ok(false), Err(ErrorCode::NoSuchPage)]),
            },
        ),
        (
            "welcome",
            Msg::Welcome {
                domain: 1,
                store_slots: 1 << 20,
            },
        ),
        (
            "registered",
            Msg::Registered {
                id: 1,
                result: Err(ErrorCode::Denied),
            },
        ),
        (
            "request-protect",
            Msg::Request {
                id: 7,
                op: Op::Protect(vec![p(0, 1), p(0, 2), p(1, 0)]),
            },
        ),
        (
            "request-unprotect",
            Msg::Request {
                id: 8,
                op: Op::Unprotect(vec![p(0, 1)]),
            },
        ),
        (
            "request-canonicalize",
            Msg::Request {
                id: 9,
                op: Op::CanonicalizeAt(vec![(p(0, 2), 17, 5)]),
            },
        ),
        (
            "request-merge",
            Msg::Request {
                id: 10,
                op: Op::MergeAt(vec![(p(0, 3), 18, Some(5)), (p(1, 0), 19, None)]),
            },
        ),
        (
            "request-recycle",
            Msg::Request {
                id: 11,
                op: Op::Recycle(vec![p(1, 7)]),
            },
        ),
        (
            "request-unmerge",
            Msg::Request {
                id: 12,
                op: Op::Unmerge(p(0, 3)),
            },
        ),
        (
            "request-reclaim",
            Msg::Request {
                id: 15,
                op: Op::Reclaim(vec![p(0, 4), p(0, 5), p(2, 0)]),
            },
        ),
        (
            "error",
            Msg::Error {
                code: ErrorCode::Protocol,
                text: "malformed frame".into(),
            },
        ),
    ];
    msgs.into_iter()
        .map(|(name, msg)| (name, frame(&msg)))
        .collect()
}

#[test]
fn hand_written_fuzz_inputs() {
    let mut inputs: Vec<(String, Vec<u8>)> = seed_frames()
        .into_iter()
        .map(|(name, bytes)| (name.to_owned(), bytes))
        .collect();
    // Every kind of message, cut and extended and with each byte flipped.
    for (name, bytes) in seed_frames() {
        inputs.push((format!("{name} cut"), bytes[..bytes.len() - 1].to_vec()));
        let mut longer = bytes.clone();
        longer.push(0);
        inputs.push((format!("{name} extended"), longer));
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0xFF;
            inputs.push((format!("{name} byte {i} flipped"), flipped));
        }
    }
    for (name, data) in &inputs {
        eprintln!("wire_decode: input {name:?} ({} bytes)", data.len());
        wire_decode::run(data);
    }
    // Every seed is a valid frame and kinds are covered.
    let kinds: std::collections::BTreeSet<u16> = seed_frames()
        .iter()
        .map(|(_, bytes)| decode(bytes).expect("a seed decodes").kind())
        .collect();
    assert_eq!(kinds.len(), 12);
}

/// Writes [`seed_frames`] to `fuzz/corpus/wire_decode/seed-<name>`:
/// `cargo test -p pageoned --test wire -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes the fuzz corpus's seeds into the source tree"]
fn write_seed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/wire_decode");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seed_frames() {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Sockets

/// A fresh directory for one test's socket, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pageoned-{}-{test}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).expect("creating the test's directory");
        TempDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A connected pair: (service end, agent end).
fn pair(dir: &TempDir) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    let listener = socket::listen(&dir.socket()).expect("listen");
    let agent = socket::connect(&dir.socket()).expect("connect");
    let service = socket::accept(&listener).expect("accept");
    (service, agent)
}

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

#[test]
fn a_memfd_travels_with_a_frame() {
    let dir = TempDir::new("memfd");
    let (service, agent) = pair(&dir);
    let memfd = rustix::fs::memfd_create("pageoned-test", rustix::fs::MemfdFlags::CLOEXEC)
        .expect("memfd_create");
    let mut store = File::from(memfd);
    store.set_len(PAGE_SIZE as u64).unwrap();
    store.write_all(b"from the service").unwrap();
    let welcome = Msg::Welcome {
        domain: 1,
        store_slots: 1,
    };
    socket::send(&service, &frame(&welcome), &[store.as_fd()]).expect("send");

    let mut buf = Vec::new();
    let got = socket::recv(&agent, &mut buf, WAIT)
        .expect("recv")
        .expect("a frame");
    assert!(!got.truncated && !got.fds_dropped);
    assert_eq!(got.len, buf.len());
    assert_eq!(decode(&buf), Ok(welcome));
    let [fd]: [_; 1] = got.fds.try_into().expect("one descriptor");
    let mapped = File::from(fd);
    let mut seen = [0; 16];
    mapped.read_exact_at(&mut seen, 0).unwrap();
    assert_eq!(&seen, b"from the service");
    // Received close-on-exec.
    let flags = rustix::io::fcntl_getfd(&mapped).unwrap();
    assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    // Written through one descriptor, read through the other.
    mapped.write_all_at(b"from the agent", 100).unwrap();
    let mut seen = [0; 14];
    store.read_exact_at(&mut seen, 100).unwrap();
    assert_eq!(&seen, b"from the agent");
}

#[test]
fn peer_credentials_are_this_process() {
    let dir = TempDir::new("cred");
    let (service, agent) = pair(&dir);
    let me = socket::PeerCred {
        pid: std::process::id() as i32,
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    };
    assert_eq!(socket::peer_cred(&service).unwrap(), me);
    assert_eq!(socket::peer_cred(&agent).unwrap(), me);
}

#[test]
fn end_of_stream_after_the_peer_closes() {
    let dir = TempDir::new("eof");
    let (service, agent) = pair(&dir);
    let hello = frame(&Msg::Hello { name: "a".into() });
    socket::send(&agent, &hello, &[]).unwrap();
    drop(agent);
    let mut buf = Vec::new();
    // A frame sent before the close still arrives, then end of stream.
    let got = socket::recv(&service, &mut buf, WAIT).unwrap().unwrap();
    assert_eq!(buf, hello);
    assert!(got.fds.is_empty());
    assert!(socket::recv(&service, &mut buf, WAIT).unwrap().is_none());
    assert!(buf.is_empty());
    assert!(socket::recv(&service, &mut buf, None).unwrap().is_none());
    // Sending to a closed peer is an error (EPIPE), not SIGPIPE.
    assert!(socket::send(&service, &hello, &[]).is_err());
}

#[test]
fn shutdown_ends_the_peers_stream() {
    let dir = TempDir::new("shutdown");
    let (service, agent) = pair(&dir);
    socket::shutdown(&service).unwrap();
    let mut buf = Vec::new();
    assert!(socket::recv(&agent, &mut buf, WAIT).unwrap().is_none());
    socket::shutdown(&service).unwrap();
}

#[test]
fn recv_times_out_when_nothing_comes() {
    let dir = TempDir::new("timeout");
    let (service, _agent) = pair(&dir);
    let mut buf = Vec::new();
    let start = Instant::now();
    let e = socket::recv(&service, &mut buf, Some(Duration::from_millis(50))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert!(start.elapsed() >= Duration::from_millis(50));
    let e = socket::recv(&service, &mut buf, Some(Duration::ZERO)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
}

#[test]
fn an_oversized_datagram_is_reported_truncated() {
    let dir = TempDir::new("oversized");
    let (service, agent) = pair(&dir);
    let mut big = vec![0xA5; MAX_FRAME + 1];
    big[..8].copy_from_slice(&raw(kind::HELLO, &[])[..8]);
    // `send` refuses it; sent by hand, the receiver sees it cut at MAX_FRAME.
    let e = socket::send(&agent, &big, &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let sent = rustix::net::send(&agent, &big, rustix::net::SendFlags::empty()).unwrap();
    assert_eq!(sent, big.len());
    let mut buf = Vec::new();
    let got = socket::recv(&service, &mut buf, WAIT).unwrap().unwrap();
    assert!(got.truncated);
    assert_eq!(got.len, MAX_FRAME);
    assert_eq!(buf, big[..MAX_FRAME]);

    // A frame of exactly MAX_FRAME bytes is whole.
    let exact = &big[..MAX_FRAME];
    socket::send(&agent, exact, &[]).unwrap();
    let got = socket::recv(&service, &mut buf, WAIT).unwrap().unwrap();
    assert!(!got.truncated);
    assert_eq!(buf, exact);
    assert!(socket::send(&agent, &[], &[]).is_err(), "no empty frames");
}

#[test]
fn descriptors_beyond_the_limit_are_closed() {
    let dir = TempDir::new("fds");
    let (service, agent) = pair(&dir);
    let files: Vec<_> = (0..MAX_FDS + 2)
        .map(|_| File::open("/dev/null").unwrap())
        .collect();
    let fds: Vec<_> = files.iter().map(AsFd::as_fd).collect();
    assert_eq!(
        socket::send(&agent, b"x", &fds).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(6))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(
        &agent,
        &[std::io::IoSlice::new(b"x")],
        &mut control,
        rustix::net::SendFlags::empty(),
    )
    .unwrap();
    let mut buf = Vec::new();
    let got = socket::recv(&service, &mut buf, WAIT).unwrap().unwrap();
    assert_eq!(got.fds.len(), MAX_FDS);
    assert!(got.fds_dropped);
    assert_eq!(buf, b"x");
}

#[test]
fn listen_replaces_only_a_stale_socket() {
    let dir = TempDir::new("listen");
    let path = dir.socket();
    let live = socket::listen(&path).unwrap();
    let e = socket::listen(&path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrInUse);
    drop(live);
    // The file stays behind; nobody listens: it is replaced.
    assert!(path.exists());
    let listener = socket::listen(&path).unwrap();
    let _agent = socket::connect(&path).unwrap();
    let _service = socket::accept(&listener).unwrap();

    // Something that is not a socket is never removed.
    let file = dir.0.join("file");
    std::fs::write(&file, b"keep").unwrap();
    let e = socket::listen(&file).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrInUse);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // Connecting where nothing listens fails.
    assert!(socket::connect(&dir.0.join("none")).is_err());
}
