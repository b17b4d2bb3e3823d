//! A red-black tree whose nodes live in an arena and are named by `u32` indices.
//!
//! It has the shape of Linux's `<linux/rbtree.h>`, which `mm/ksm.c` uses for both of its
//! trees: the *caller* walks down from the root with its own comparisons (KSM compares
//! page contents with `memcmp`, reading pages that may change under it), then links the
//! new node where the walk fell off ([`link`], KSM's `rb_link_node` + `rb_insert_color`)
//! or removes a node it holds ([`erase`], `rb_erase`). Balancing depends only on colours,
//! never on keys, so a tree whose keys changed after insertion (KSM's *unstable* tree)
//! stays balanced even though searches in it may miss.
//!
//! The links of a node are three `u32`s (12 bytes: left, right, parent with the colour in
//! the top bit), embedded in the arena's element type (the rmap item for the unstable
//! tree, the stable node for the stable tree), as KSM embeds `struct rb_node`.

/// "No node": an empty subtree, the root's parent.
pub(crate) const NIL: u32 = 0x7FFF_FFFF;
/// Colour bit in `parent_color`.
const RED: u32 = 0x8000_0000;

/// The links of one tree node (12 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RbLinks {
    /// Left child (smaller keys), or [`NIL`].
    pub(crate) left: u32,
    /// Right child (larger keys), or [`NIL`].
    pub(crate) right: u32,
    /// Parent index (or [`NIL`]) in the low 31 bits; the top bit set means red.
    parent_color: u32,
}

impl RbLinks {
    /// Links of a node in no tree.
    pub(crate) const UNLINKED: RbLinks = RbLinks {
        left: NIL,
        right: NIL,
        parent_color: NIL,
    };

    /// Links of a node in no tree, with `left` used to hold a value (a stable item's dup).
    pub(crate) const fn holding(value: u32) -> RbLinks {
        RbLinks {
            left: value,
            right: NIL,
            parent_color: NIL,
        }
    }

    fn parent(&self) -> u32 {
        self.parent_color & !RED
    }

    fn is_red(&self) -> bool {
        self.parent_color & RED != 0
    }
}

/// Storage of tree nodes: anything that can hand out the links of node `n`.
pub(crate) trait RbArena {
    /// The links of node `n`.
    fn links(&self, n: u32) -> &RbLinks;
    /// The links of node `n`, to change them.
    fn links_mut(&mut self, n: u32) -> &mut RbLinks;
}

fn parent<A: RbArena + ?Sized>(a: &A, n: u32) -> u32 {
    a.links(n).parent()
}

fn left<A: RbArena + ?Sized>(a: &A, n: u32) -> u32 {
    a.links(n).left
}

fn right<A: RbArena + ?Sized>(a: &A, n: u32) -> u32 {
    a.links(n).right
}

/// Whether `n` is red ([`NIL`] is black).
fn is_red<A: RbArena + ?Sized>(a: &A, n: u32) -> bool {
    n != NIL && a.links(n).is_red()
}

fn set_parent<A: RbArena + ?Sized>(a: &mut A, n: u32, p: u32) {
    let l = a.links_mut(n);
    l.parent_color = (l.parent_color & RED) | p;
}

fn set_red<A: RbArena + ?Sized>(a: &mut A, n: u32, red: bool) {
    let l = a.links_mut(n);
    l.parent_color = if red {
        l.parent_color | RED
    } else {
        l.parent_color & !RED
    };
}

/// Makes `new` take `old`'s place as a child of `old`'s parent (or as the root).
fn replace_child<A: RbArena + ?Sized>(a: &mut A, root: &mut u32, p: u32, old: u32, new: u32) {
    if p == NIL {
        *root = new;
    } else if left(a, p) == old {
        a.links_mut(p).left = new;
    } else {
        a.links_mut(p).right = new;
    }
}

fn rotate_left<A: RbArena + ?Sized>(a: &mut A, root: &mut u32, x: u32) {
    let y = right(a, x);
    let yl = left(a, y);
    a.links_mut(x).right = yl;
    if yl != NIL {
        set_parent(a, yl, x);
    }
    let p = parent(a, x);
    set_parent(a, y, p);
    replace_child(a, root, p, x, y);
    a.links_mut(y).left = x;
    set_parent(a, x, y);
}

fn rotate_right<A: RbArena + ?Sized>(a: &mut A, root: &mut u32, x: u32) {
    let y = left(a, x);
    let yr = right(a, y);
    a.links_mut(x).left = yr;
    if yr != NIL {
        set_parent(a, yr, x);
    }
    let p = parent(a, x);
    set_parent(a, y, p);
    replace_child(a, root, p, x, y);
    a.links_mut(y).right = x;
    set_parent(a, x, y);
}

/// Links `node` as the `go_left` child of `parent` (or as the root when `parent` is
/// [`NIL`]), where a search that ended at `parent` fell off, and rebalances: KSM's
/// `rb_link_node` followed by `rb_insert_color`.
pub(crate) fn link<A: RbArena + ?Sized>(
    a: &mut A,
    root: &mut u32,
    node: u32,
    parent_node: u32,
    go_left: bool,
) {
    *a.links_mut(node) = RbLinks {
        left: NIL,
        right: NIL,
        parent_color: parent_node | RED,
    };
    if parent_node == NIL {
        *root = node;
    } else if go_left {
        a.links_mut(parent_node).left = node;
    } else {
        a.links_mut(parent_node).right = node;
    }
    insert_fixup(a, root, node);
}

fn insert_fixup<A: RbArena + ?Sized>(a: &mut A, root: &mut u32, mut z: u32) {
    while is_red(a, parent(a, z)) {
        let p = parent(a, z);
        // A red node is never the root, so the grandparent exists.
        let g = parent(a, p);
        if p == left(a, g) {
            let uncle = right(a, g);
            if is_red(a, uncle) {
                set_red(a, p, false);
                set_red(a, uncle, false);
                set_red(a, g, true);
                z = g;
            } else {
                if z == right(a, p) {
                    z = p;
                    rotate_left(a, root, z);
                }
                let p = parent(a, z);
                let g = parent(a, p);
                set_red(a, p, false);
                set_red(a, g, true);
                rotate_right(a, root, g);
            }
        } else {
            let uncle = left(a, g);
            if is_red(a, uncle) {
                set_red(a, p, false);
                set_red(a, uncle, false);
                set_red(a, g, true);
                z = g;
            } else {
                if z == left(a, p) {
                    z = p;
                    rotate_right(a, root, z);
                }
                let p = parent(a, z);
                let g = parent(a, p);
                set_red(a, p, false);
                set_red(a, g, true);
                rotate_left(a, root, g);
            }
        }
    }
    let r = *root;
    set_red(a, r, false);
}

/// Puts subtree `v` where subtree `u` was (CLRS "transplant").
fn transplant<A: RbArena + ?Sized>(a: &mut A, root: &mut u32, u: u32, v: u32) {
    let p = parent(a, u);
    replace_child(a, root, p, u, v);
    if v != NIL {
        set_parent(a, v, p);
    }
}

/// Removes `z` from the tree rooted at `*root` and rebalances: KSM's `rb_erase`. The
/// links of `z` are reset to [`RbLinks::UNLINKED`].
pub(crate) fn erase<A: RbArena + ?Sized>(a: &mut A, root: &mut u32, z: u32) {
    let (x, x_parent, removed_red);
    if left(a, z) == NIL {
        x = right(a, z);
        x_parent = parent(a, z);
        removed_red = is_red(a, z);
        transplant(a, root, z, x);
    } else if right(a, z) == NIL {
        x = left(a, z);
        x_parent = parent(a, z);
        removed_red = is_red(a, z);
        transplant(a, root, z, x);
    } else {
        // The successor y (leftmost of the right subtree) takes z's place and colour.
        let mut y = right(a, z);
        while left(a, y) != NIL {
            y = left(a, y);
        }
        removed_red = is_red(a, y);
        x = right(a, y);
        if parent(a, y) == z {
            x_parent = y;
        } else {
            x_parent = parent(a, y);
            transplant(a, root, y, x);
            let zr = right(a, z);
            a.links_mut(y).right = zr;
            set_parent(a, zr, y);
        }
        transplant(a, root, z, y);
        let zl = left(a, z);
        a.links_mut(y).left = zl;
        set_parent(a, zl, y);
        let z_red = is_red(a, z);
        set_red(a, y, z_red);
    }
    *a.links_mut(z) = RbLinks::UNLINKED;
    if !removed_red {
        erase_fixup(a, root, x, x_parent);
    }
}

fn erase_fixup<A: RbArena + ?Sized>(a: &mut A, root: &mut u32, mut x: u32, mut xp: u32) {
    // `x` carries an extra black; its sibling exists (black heights were equal before).
    while x != *root && !is_red(a, x) {
        if x == left(a, xp) {
            let mut w = right(a, xp);
            if is_red(a, w) {
                set_red(a, w, false);
                set_red(a, xp, true);
                rotate_left(a, root, xp);
                w = right(a, xp);
            }
            if !is_red(a, left(a, w)) && !is_red(a, right(a, w)) {
                set_red(a, w, true);
                x = xp;
                xp = parent(a, x);
            } else {
                if !is_red(a, right(a, w)) {
                    let wl = left(a, w);
                    set_red(a, wl, false);
                    set_red(a, w, true);
                    rotate_right(a, root, w);
                    w = right(a, xp);
                }
                let xp_red = is_red(a, xp);
                set_red(a, w, xp_red);
                set_red(a, xp, false);
                let wr = right(a, w);
                set_red(a, wr, false);
                rotate_left(a, root, xp);
                x = *root;
                break;
            }
        } else {
            let mut w = left(a, xp);
            if is_red(a, w) {
                set_red(a, w, false);
                set_red(a, xp, true);
                rotate_right(a, root, xp);
                w = left(a, xp);
            }
            if !is_red(a, left(a, w)) && !is_red(a, right(a, w)) {
                set_red(a, w, true);
                x = xp;
                xp = parent(a, x);
            } else {
                if !is_red(a, left(a, w)) {
                    let wr = right(a, w);
                    set_red(a, wr, false);
                    set_red(a, w, true);
                    rotate_left(a, root, w);
                    w = left(a, xp);
                }
                let xp_red = is_red(a, xp);
                set_red(a, w, xp_red);
                set_red(a, xp, false);
                let wl = left(a, w);
                set_red(a, wl, false);
                rotate_right(a, root, xp);
                x = *root;
                break;
            }
        }
    }
    if x != NIL {
        set_red(a, x, false);
    }
}

/// Checks the red-black invariants of the tree at `root` (parent links, no red node with
/// a red child, equal black heights, black root) and returns its nodes in order.
#[cfg(test)]
pub(crate) fn check<A: RbArena + ?Sized>(a: &A, root: u32) -> Result<Vec<u32>, String> {
    fn walk<A: RbArena + ?Sized>(
        a: &A,
        n: u32,
        expected_parent: u32,
        out: &mut Vec<u32>,
    ) -> Result<usize, String> {
        if n == NIL {
            return Ok(1);
        }
        if parent(a, n) != expected_parent {
            return Err(format!("node {n}: parent link is wrong"));
        }
        if is_red(a, n) && (is_red(a, left(a, n)) || is_red(a, right(a, n))) {
            return Err(format!("node {n}: red node with a red child"));
        }
        let lh = walk(a, left(a, n), n, out)?;
        out.push(n);
        let rh = walk(a, right(a, n), n, out)?;
        if lh != rh {
            return Err(format!("node {n}: black heights {lh} and {rh}"));
        }
        Ok(lh + usize::from(!is_red(a, n)))
    }
    if is_red(a, root) {
        return Err("red root".into());
    }
    let mut out = Vec::new();
    walk(a, root, NIL, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Nodes keyed by an integer; node index = slot in the vector.
    struct Arena {
        keys: Vec<u32>,
        links: Vec<RbLinks>,
    }

    impl RbArena for Arena {
        fn links(&self, n: u32) -> &RbLinks {
            &self.links[n as usize]
        }
        fn links_mut(&mut self, n: u32) -> &mut RbLinks {
            &mut self.links[n as usize]
        }
    }

    impl Arena {
        /// Finds `key`, or inserts it as node `slot`, the way KSM's tree walks do.
        fn search_insert(&mut self, root: &mut u32, key: u32, slot: u32) -> Option<u32> {
            let (mut cur, mut parent_node, mut go_left) = (*root, NIL, false);
            while cur != NIL {
                parent_node = cur;
                match key.cmp(&self.keys[cur as usize]) {
                    std::cmp::Ordering::Less => {
                        go_left = true;
                        cur = self.links[cur as usize].left;
                    }
                    std::cmp::Ordering::Greater => {
                        go_left = false;
                        cur = self.links[cur as usize].right;
                    }
                    std::cmp::Ordering::Equal => return Some(cur),
                }
            }
            self.keys[slot as usize] = key;
            link(self, root, slot, parent_node, go_left);
            None
        }

        fn find(&self, root: u32, key: u32) -> Option<u32> {
            let mut cur = root;
            while cur != NIL {
                match key.cmp(&self.keys[cur as usize]) {
                    std::cmp::Ordering::Less => cur = self.links[cur as usize].left,
                    std::cmp::Ordering::Greater => cur = self.links[cur as usize].right,
                    std::cmp::Ordering::Equal => return Some(cur),
                }
            }
            None
        }
    }

    proptest! {
        /// Random inserts and removals keep the invariants and the contents of a BTreeSet.
        #[test]
        fn matches_a_btreeset(ops in proptest::collection::vec((any::<bool>(), 0u32..64), 1..400)) {
            let n = 64;
            let mut a = Arena { keys: vec![0; n], links: vec![RbLinks::UNLINKED; n] };
            let mut root = NIL;
            let mut model = BTreeSet::new();
            // Node slot k holds key k, so a key's slot is free exactly when it is absent.
            for (insert, key) in ops {
                if insert {
                    let found = a.search_insert(&mut root, key, key);
                    prop_assert_eq!(found.is_some(), !model.insert(key));
                } else if let Some(node) = a.find(root, key) {
                    erase(&mut a, &mut root, node);
                    prop_assert!(model.remove(&key));
                    prop_assert_eq!(a.links[node as usize], RbLinks::UNLINKED);
                } else {
                    prop_assert!(!model.contains(&key));
                }
                let order = check(&a, root).map_err(TestCaseError::fail)?;
                let keys: Vec<u32> = order.iter().map(|&k| a.keys[k as usize]).collect();
                prop_assert_eq!(keys, model.iter().copied().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn ascending_inserts_stay_logarithmic() {
        let n = 1 << 12;
        let mut a = Arena {
            keys: vec![0; n],
            links: vec![RbLinks::UNLINKED; n],
        };
        let mut root = NIL;
        for k in 0..n as u32 {
            assert!(a.search_insert(&mut root, k, k).is_none());
        }
        check(&a, root).unwrap();
        fn height(a: &Arena, n: u32) -> usize {
            if n == NIL {
                0
            } else {
                1 + height(a, a.links[n as usize].left).max(height(a, a.links[n as usize].right))
            }
        }
        // A red-black tree of n nodes is at most 2 log2(n + 1) high.
        assert!(height(&a, root) <= 2 * 13);
        for k in (0..n as u32).step_by(2) {
            let node = a.find(root, k).unwrap();
            erase(&mut a, &mut root, node);
        }
        let order = check(&a, root).unwrap();
        assert_eq!(order.len(), n / 2);
    }
}
