//! Key bytes read per lookup, SD tree against KSM's red-black tree (issue 3). Not timed.
//!
//! ```text
//! cargo run --release --example sdtree_bytes_read            # 10k and 100k keys
//! cargo run --release --example sdtree_bytes_read -- 1M      # any sizes
//! ```
//!
//! For each data set it stores the same keys as the benchmark (`benches/sdtree.rs`) in an
//! SD tree and in a red-black tree ordered by `memcmp`, looks up hit and miss probes and
//! prints a Markdown table: SD tree nodes visited and stored-key bytes read
//! ([`sdtree::SearchStats`]), red-black tree comparisons and stored-key bytes read by
//! them (each `memcmp` counted up to the 8-byte word holding the first difference, the
//! same rounding as the SD tree's count).

#[path = "../benches/common/mod.rs"]
mod common;

use common::{rb_get, rb_insert_or_get, CountingRef, DataSet, Layout, RbAdapter};
use intrusive_collections::RBTree;

/// Probes measured per data set and kind.
const PROBES: usize = 20_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<usize> = if args.is_empty() {
        vec![10_000, 100_000]
    } else {
        args.iter()
            .map(|s| {
                let (num, mul) = match s.as_bytes().last() {
                    Some(b'k' | b'K') => (&s[..s.len() - 1], 1_000),
                    Some(b'm' | b'M') => (&s[..s.len() - 1], 1_000_000),
                    _ => (&s[..], 1),
                };
                num.parse::<usize>().expect("a size like 100k or 1M") * mul
            })
            .collect()
    };
    println!("| keys | data set | probe | SD tree nodes | SD tree stored-key bytes | RB tree comparisons | RB tree stored-key bytes | RB bytes / SD bytes |");
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for &n in &sizes {
        for ds in DataSet::ALL {
            let layout = Layout::new(n);
            let arena = layout.arena(ds);
            let sd = sdtree::SdTree::new(arena.keys());
            let mut rb: RBTree<RbAdapter<CountingRef>> = RBTree::new(RbAdapter::new());
            for i in 0..n {
                assert_eq!(sd.insert_or_get(i), sdtree::Insert::Inserted);
                assert_eq!(
                    rb_insert_or_get(&mut rb, CountingRef(arena.page_ref(i)), i),
                    None
                );
            }
            let probes = PROBES.min(layout.h);
            for (kind, first, hit) in [
                ("hit", layout.hits(), true),
                ("miss", layout.misses(), false),
            ] {
                let (mut nodes, mut sd_bytes) = (0u64, 0u64);
                CountingRef::reset();
                for p in first..first + probes {
                    let (found, stats) = sd.get_with_stats(arena.page(p));
                    assert_eq!(found.is_some(), hit);
                    nodes += stats.nodes_visited as u64;
                    sd_bytes += stats.stored_key_bytes as u64;
                    assert_eq!(rb_get(&rb, &CountingRef(arena.page_ref(p))).is_some(), hit);
                }
                let (cmps, rb_bytes) = CountingRef::counts();
                let per = |x: u64| x as f64 / probes as f64;
                println!(
                    "| {n} | {} | {kind} | {:.1} | {:.0} | {:.1} | {:.0} | {:.1} |",
                    ds.label(),
                    per(nodes),
                    per(sd_bytes),
                    per(cmps),
                    per(rb_bytes),
                    rb_bytes as f64 / sd_bytes.max(1) as f64,
                );
            }
            // Free the red-black tree's nodes before the arena goes.
            drop(rb);
        }
    }
}
