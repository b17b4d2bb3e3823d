//! Deduplicate a set of 4 KiB pages with the SD tree: every page is looked up with
//! `insert_or_get`; a page whose contents are already indexed comes back as the handle of
//! its canonical copy. Run with `cargo run --release --example sdtree_dedup`.

use std::thread;

use dynamic_vm::sdtree::{Insert, SdTree};

const PAGE: usize = 4096;

fn main() {
    // 30,000 pages drawn from 10,000 distinct contents that share a 2 KiB prefix.
    let distinct = 10_000;
    let mut x: u64 = 0x853C_49E6_748F_EA9B;
    let contents: Vec<Vec<u8>> = (0..distinct)
        .map(|_| {
            let mut p = vec![0u8; PAGE];
            for b in &mut p[2048..] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            p
        })
        .collect();
    let pages: Vec<&[u8]> = (0..3 * distinct)
        .map(|i| contents[(i * 7919) % distinct].as_slice())
        .collect();

    // Two threads index the pages concurrently; the tree reads pages in place.
    let tree = SdTree::new(&pages);
    let merged: Vec<usize> = thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let (tree, pages) = (&tree, &pages);
                s.spawn(move || {
                    let mut merged = 0;
                    for h in (t..pages.len()).step_by(2) {
                        match tree.insert_or_get(h) {
                            Insert::Inserted => {}
                            Insert::Present(canonical) => {
                                assert_eq!(pages[canonical], pages[h]);
                                merged += 1;
                            }
                            Insert::Refused => unreachable!("pages do not change here"),
                        }
                    }
                    merged
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });

    let (hit, stats) = tree.get_with_stats(pages[0]);
    println!("pages:          {}", pages.len());
    println!("canonical:      {}", tree.len());
    println!(
        "merged:         {} (per thread: {merged:?})",
        merged.iter().sum::<usize>()
    );
    println!(
        "memory saved:   {} MiB of {} MiB",
        (merged.iter().sum::<usize>() * PAGE) >> 20,
        (pages.len() * PAGE) >> 20
    );
    println!(
        "one lookup:     found {:?}, {} nodes visited, {} bytes of stored pages read",
        hit, stats.nodes_visited, stats.stored_key_bytes
    );
    println!(
        "tree metadata:  {} bytes per canonical page (one {}-byte node each)",
        dynamic_vm::sdtree::NODE_BYTES,
        dynamic_vm::sdtree::NODE_BYTES
    );
}
