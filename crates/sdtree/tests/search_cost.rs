//! The tree reads each stored key at most once per search: a search over pages with a
//! long common prefix reads about one page of stored keys, where a comparison tree reads
//! the common prefix at every level.

use sdtree::SdTree;

const PAGE: usize = 4096;
const PREFIX: usize = 2000;
const N: usize = 10_000;

fn pages() -> Vec<Vec<u8>> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..N)
        .map(|_| {
            let mut p = vec![0x5Au8; PAGE];
            for b in &mut p[PREFIX..] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            p
        })
        .collect()
}

/// Bytes a memcmp-ordered binary search reads of stored keys to find `probe`.
fn comparison_search_bytes(sorted: &[&Vec<u8>], probe: &[u8]) -> usize {
    let (mut lo, mut hi, mut read) = (0, sorted.len(), 0);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let k = sorted[mid];
        let same = k.iter().zip(probe).take_while(|(a, b)| a == b).count();
        read += (same + 1).min(k.len());
        match k.as_slice().cmp(probe) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return read,
        }
    }
    read
}

#[test]
fn a_present_page_costs_one_page_of_stored_key_reads() {
    let pages = pages();
    let tree = SdTree::new(&pages);
    for h in 0..N {
        let _ = tree.insert_or_get(h);
    }
    let mut sorted: Vec<&Vec<u8>> = pages.iter().collect();
    sorted.sort();
    let mut worst = 0;
    let mut comparison_total = 0;
    for h in (0..N).step_by(97) {
        let (found, stats) = tree.get_with_stats(&pages[h]);
        assert_eq!(found, Some(h));
        assert!(
            stats.stored_key_bytes <= PAGE + 256,
            "search for page {h} read {} bytes of stored keys",
            stats.stored_key_bytes
        );
        worst = worst.max(stats.stored_key_bytes);
        comparison_total += comparison_search_bytes(&sorted, &pages[h]);
    }
    let searches = N.div_ceil(97);
    // The data really is the hard case: a comparison search reads the prefix per level.
    assert!(
        comparison_total / searches >= 13 * PREFIX,
        "comparison search read only {} bytes on average",
        comparison_total / searches
    );
    assert!(worst <= PAGE + 256);
}

#[test]
fn a_missing_page_is_rejected_after_reading_at_most_one_page() {
    let pages = pages();
    let tree = SdTree::new(&pages[..N - 1]);
    for h in 0..N - 1 {
        let _ = tree.insert_or_get(h);
    }
    let (found, stats) = tree.get_with_stats(&pages[N - 1]);
    assert_eq!(found, None);
    assert!(stats.stored_key_bytes <= PAGE + 256);
    // A random 10,000-key trie is about log2(n) deep, never near n.
    assert!(
        stats.nodes_visited < 64,
        "visited {} nodes",
        stats.nodes_visited
    );
}

/// Pages that begin with a random run of zero bytes (0 to 256, the seeds' hard case). Read
/// plainly, their first 1 bits form a comb thousands of nodes deep; the tree's zero-run
/// header keeps searches under 64 deep (about log2(n) on these random tails).
#[test]
fn zero_prefixed_pages_do_not_build_a_comb() {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pages: Vec<Vec<u8>> = (0..N)
        .map(|_| {
            let run = (next() % 257) as usize;
            let mut p = vec![0u8; PAGE];
            for b in &mut p[run..] {
                *b = next() as u8;
            }
            p
        })
        .collect();
    let tree = SdTree::new(&pages);
    for h in 0..N {
        let _ = tree.insert_or_get(h);
    }
    let mut deepest = 0;
    for h in (0..N).step_by(7) {
        let (found, stats) = tree.get_with_stats(&pages[h]);
        assert!(found.is_some());
        deepest = deepest.max(stats.nodes_visited);
        assert!(stats.stored_key_bytes <= PAGE + 256);
    }
    assert!(deepest < 64, "a search visited {deepest} nodes");
    // Still byte-ordered.
    let order: Vec<&Vec<u8>> = tree.iter().map(|h| &pages[h]).collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]));
}

/// Search depth on real pages: the distinct 4 KiB pages of the files under
/// `SDTREE_REAL_PAGES` (default `/usr/lib`), up to 200,000 of them; prints the average and
/// the deepest number of nodes a hit visits against log2(n). Ignored by default (it reads
/// the machine's files); run with
/// `cargo test -p sdtree --release --test search_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn real_pages_search_depth() {
    use std::collections::HashSet;
    use std::path::PathBuf;
    let root = std::env::var("SDTREE_REAL_PAGES").unwrap_or_else(|_| "/usr/lib".into());
    let mut seen = HashSet::new();
    let mut pages: Vec<Vec<u8>> = Vec::new();
    let mut dirs = vec![PathBuf::from(root)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let Ok(ty) = e.file_type() else { continue };
            if ty.is_dir() {
                dirs.push(e.path());
            } else if ty.is_file() {
                let Ok(data) = std::fs::read(e.path()) else {
                    continue;
                };
                for chunk in data.chunks_exact(PAGE) {
                    if pages.len() < 200_000 && seen.insert(chunk.to_vec()) {
                        pages.push(chunk.to_vec());
                    }
                }
            }
        }
    }
    let tree = SdTree::new(&pages);
    for h in 0..pages.len() {
        assert_eq!(tree.insert_or_get(h), sdtree::Insert::Inserted);
    }
    let (mut total, mut deepest) = (0usize, 0usize);
    for (h, page) in pages.iter().enumerate() {
        let (found, stats) = tree.get_with_stats(page);
        assert_eq!(found, Some(h));
        total += stats.nodes_visited;
        deepest = deepest.max(stats.nodes_visited);
    }
    let n = pages.len();
    let avg = total as f64 / n as f64;
    let log2n = (n as f64).log2();
    eprintln!(
        "{n} distinct real pages: hits visit {avg:.1} nodes on average ({:.2} x log2 n = {log2n:.1}), at most {deepest}",
        avg / log2n
    );
}
