//! Hand-written inputs run through the checker the `pip_validate` fuzz target runs
//! (`tests/common/hostile.rs`), so plain `cargo test` keeps them passing. The checked-in
//! corpus (`fuzz/corpus/pip_validate/`, not part of this package) is replayed by the
//! workspace's `fuzz-corpus` crate.

#[path = "common/hostile.rs"]
mod hostile;

fn replay_one(name: &str, data: &[u8]) {
    // The input's name goes to the test's output, so a failure says which one it was.
    eprintln!("pip_validate: input {name:?} ({} bytes)", data.len());
    hostile::run(data);
}

/// The pool part of an input: 2 shards of 2 slots, pool id 1, the secret
/// `0x5EC0_0000_0000_0001`, frame limit `1 << 20`, then the slot `VALUE`s.
fn pool(slots: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0, 1, 1, 0];
    out.extend_from_slice(&0x5EC0_0000_0000_0001u64.to_le_bytes());
    out.push(1);
    out.extend_from_slice(&slots);
    out
}

/// One scan: `op`, the frame `VALUE`, indicator / pool / slot selectors, no tampering.
fn scan(op: u8, frame: u8, ind: u8, pl: u8, sl: u8) -> Vec<u8> {
    vec![op, frame, ind, pl, sl, 0, 0]
}

#[test]
fn hand_written_inputs() {
    let mut inputs: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("raw header of zeros", vec![1]),
        ("raw header all ones", vec![0xff; 80]),
        ("counting", (0..=255u8).collect()),
    ];
    // A valid raw header: magic, version 1, ready, 1 shard of 2 slots, slots at 128.
    let mut header = vec![3u8];
    header.extend_from_slice(&pip::MAGIC.to_le_bytes());
    header.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    header.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
    header.extend_from_slice(&[0; 8]);
    header.extend_from_slice(&2u64.to_le_bytes());
    header.extend_from_slice(&128u64.to_le_bytes());
    inputs.push(("valid raw header", header));

    // Slot 1 offers frame 3, slot 2 frame 2; the rest empty.
    let offered = pool([0, 3, 2, 0]);
    let mut every_move = offered.clone();
    // Frame 3, the secret, this pool, slot 1: claimed, then restored (1), dropped (2),
    // scanned with a failing recycle (3), restored (5), dropped (6), completed (0). Every
    // fourth scan also runs the guest's hooks: there, scan frame 0 (refused, no change).
    for (op, frame) in [
        (1, 0),
        (1, 3),
        (2, 3),
        (3, 3),
        (1, 0),
        (5, 3),
        (6, 3),
        (0, 3),
    ] {
        every_move.extend(scan(op, frame, 0, 0, 4));
    }
    inputs.push(("every host move on a valid offer", every_move));

    let mut bad = offered.clone();
    bad.extend(scan(0, 3, 1, 0, 4)); // no indicator
    bad.extend(scan(0, 0, 0, 0, 4)); // frame 0
    bad.extend(scan(0, 4 + 8 * 4, 0, 0, 4)); // frame 1 << 20: at the limit
    bad.extend(scan(0, 3, 0, 1, 4)); // pool 0
    bad.extend(scan(0, 3, 0, 0, 1)); // slot = slot_count
    bad.extend(scan(0, 3, 0, 0, 2)); // slot u32::MAX
    bad.extend(scan(0, 3, 0, 0, 8)); // slot 2 holds frame 2
    bad.extend(scan(0, 13, 0, 0, 4)); // 13 = 5 + 8 * 1: INTERESTING[1] | CLAIMED = 3 | CLAIMED
    inputs.push(("every invalid reason", bad));

    // The guest withdraws (empties slot 1) between validation and claim; then it writes
    // garbage into a claimed slot.
    let mut tampered = offered;
    tampered.extend([0, 3, 0, 0, 4, 3, 1, 0, 0]);
    tampered.extend([1, 2, 0, 0, 8, 0, 3, 2, 6]);
    tampered.extend_from_slice(&u64::MAX.to_le_bytes());
    inputs.push(("guest rewrites slots mid-claim", tampered));

    for (name, data) in &inputs {
        replay_one(name, data);
    }
}
