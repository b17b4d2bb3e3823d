//! The stable tree: canonical frames ordered by `memcmp`, with KSM's stable-node chains.
//!
//! A tree node ([`StableNode`], KSM's `struct ksm_stable_node` in the tree) stands for one
//! page content. It heads a list of *dups* ([`Dup`]): each dup is one canonical frame of
//! that content (KSM's KSM page, `kpfn`) and counts the pages mapping it (KSM's
//! `rmap_hlist_len`). A node with one dup is KSM's plain stable node; a node with two or
//! more is KSM's *stable node chain*, which exists because no frame may be shared by more
//! than `max_page_sharing` pages. Searches compare against the head dup's frame (all dups
//! of a node hold the same bytes) and pick, like KSM's `stable_node_dup()` when it is not
//! pruning, the first dup in the list that is below the limit, moving it to the head if
//! it can take one more.

use crate::rbtree::{self, RbArena, RbLinks, NIL};

/// One tree node: a page content (24 bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StableNode {
    pub(crate) links: RbLinks,
    /// First dup of the list, [`NIL`] when the slot is free.
    pub(crate) head: u32,
    /// Dups in the list.
    pub(crate) ndups: u32,
    /// The tree (trust-domain slot) the node is in.
    pub(crate) tree: u32,
}

/// One canonical frame of a node's content.
#[derive(Debug)]
pub(crate) struct Dup<F> {
    /// The frame: its bytes never change while this lives.
    pub(crate) frame: F,
    /// The tree node it belongs to.
    pub(crate) node: u32,
    prev: u32,
    next: u32,
    /// Pages mapping the frame that the scanner knows of (KSM's `rmap_hlist_len`).
    pub(crate) sharers: u32,
}

/// The nodes of all stable trees (one per trust-domain slot), their dups and the counts
/// KSM reports for chains.
pub(crate) struct StableTrees<F> {
    pub(crate) nodes: Nodes,
    dups: Vec<Option<Dup<F>>>,
    free_dups: Vec<u32>,
    /// Root per tree.
    pub(crate) roots: Vec<u32>,
    /// Nodes with two or more dups (KSM's `stable_node_chains`).
    pub(crate) chains: u64,
    /// Dups in those nodes (KSM's `stable_node_dups`).
    pub(crate) chain_dups: u64,
}

/// The node arena.
pub(crate) struct Nodes {
    pub(crate) v: Vec<StableNode>,
    free: Vec<u32>,
}

impl RbArena for Nodes {
    fn links(&self, n: u32) -> &RbLinks {
        &self.v[n as usize].links
    }
    fn links_mut(&mut self, n: u32) -> &mut RbLinks {
        &mut self.v[n as usize].links
    }
}

impl<F> StableTrees<F> {
    pub(crate) fn new() -> Self {
        StableTrees {
            nodes: Nodes {
                v: Vec::new(),
                free: Vec::new(),
            },
            dups: Vec::new(),
            free_dups: Vec::new(),
            roots: Vec::new(),
            chains: 0,
            chain_dups: 0,
        }
    }

    /// Makes sure tree `t` exists.
    pub(crate) fn ensure_tree(&mut self, t: u32) {
        while self.roots.len() <= t as usize {
            self.roots.push(NIL);
        }
    }

    pub(crate) fn dup(&self, d: u32) -> &Dup<F> {
        self.dups[d as usize]
            .as_ref()
            .expect("ksm-baseline: a stable item names a freed dup")
    }

    fn dup_mut(&mut self, d: u32) -> &mut Dup<F> {
        self.dups[d as usize]
            .as_mut()
            .expect("ksm-baseline: a stable item names a freed dup")
    }

    /// The frame a search compares node `n` by.
    pub(crate) fn node_frame(&self, n: u32) -> &F {
        &self.dup(self.nodes.v[n as usize].head).frame
    }

    /// A dup of node `n` that can take one more sharer (below `max` sharers), moved to the
    /// head of the list if it can take two; `None` if every dup is full.
    pub(crate) fn candidate(&mut self, n: u32, max: u32) -> Option<u32> {
        let head = self.nodes.v[n as usize].head;
        let mut d = head;
        while d != NIL {
            let dup = self.dup(d);
            if dup.sharers < max {
                if d != head && dup.sharers + 1 < max {
                    self.unlink_dup(d);
                    self.push_dup(n, d);
                }
                return Some(d);
            }
            d = dup.next;
        }
        None
    }

    fn alloc_dup(&mut self, dup: Dup<F>) -> u32 {
        match self.free_dups.pop() {
            Some(d) => {
                self.dups[d as usize] = Some(dup);
                d
            }
            None => {
                self.dups.push(Some(dup));
                (self.dups.len() - 1) as u32
            }
        }
    }

    /// Puts dup `d` at the head of node `n`'s list.
    fn push_dup(&mut self, n: u32, d: u32) {
        let old = self.nodes.v[n as usize].head;
        {
            let dup = self.dup_mut(d);
            dup.node = n;
            dup.prev = NIL;
            dup.next = old;
        }
        if old != NIL {
            self.dup_mut(old).prev = d;
        }
        self.nodes.v[n as usize].head = d;
    }

    fn unlink_dup(&mut self, d: u32) {
        let (n, prev, next) = {
            let dup = self.dup(d);
            (dup.node, dup.prev, dup.next)
        };
        if prev == NIL {
            self.nodes.v[n as usize].head = next;
        } else {
            self.dup_mut(prev).next = next;
        }
        if next != NIL {
            self.dup_mut(next).prev = prev;
        }
    }

    /// Adds `frame` as a new dup of node `n` (KSM's `stable_node_chain_add_dup`, which
    /// turns a plain node into a chain first).
    pub(crate) fn add_dup(&mut self, n: u32, frame: F) -> u32 {
        let d = self.alloc_dup(Dup {
            frame,
            node: n,
            prev: NIL,
            next: NIL,
            sharers: 0,
        });
        self.push_dup(n, d);
        let node = &mut self.nodes.v[n as usize];
        node.ndups += 1;
        match node.ndups {
            2 => {
                self.chains += 1;
                self.chain_dups += 2;
            }
            k if k > 2 => self.chain_dups += 1,
            _ => {}
        }
        d
    }

    /// Links a new node holding `frame` into tree `t` where a search fell off, and returns
    /// its dup.
    pub(crate) fn insert_node(&mut self, t: u32, frame: F, parent: u32, go_left: bool) -> u32 {
        let node = StableNode {
            links: RbLinks::UNLINKED,
            head: NIL,
            ndups: 0,
            tree: t,
        };
        let n = match self.nodes.free.pop() {
            Some(n) => {
                self.nodes.v[n as usize] = node;
                n
            }
            None => {
                self.nodes.v.push(node);
                (self.nodes.v.len() - 1) as u32
            }
        };
        let d = self.add_dup(n, frame);
        let mut root = self.roots[t as usize];
        rbtree::link(&mut self.nodes, &mut root, n, parent, go_left);
        self.roots[t as usize] = root;
        d
    }

    /// Adds a sharer to dup `d`; returns whether it was the first.
    pub(crate) fn add_sharer(&mut self, d: u32) -> bool {
        let dup = self.dup_mut(d);
        dup.sharers += 1;
        dup.sharers == 1
    }

    /// Removes a sharer from dup `d`; returns whether it was the last, in which case the
    /// dup is freed (its frame dropped) and its node too if it has no dup left.
    pub(crate) fn remove_sharer(&mut self, d: u32) -> bool {
        let dup = self.dup_mut(d);
        dup.sharers -= 1;
        if dup.sharers > 0 {
            return false;
        }
        let n = dup.node;
        self.unlink_dup(d);
        self.dups[d as usize] = None;
        self.free_dups.push(d);
        let node = &mut self.nodes.v[n as usize];
        node.ndups -= 1;
        match node.ndups {
            0 => {
                let t = node.tree;
                let mut root = self.roots[t as usize];
                rbtree::erase(&mut self.nodes, &mut root, n);
                self.roots[t as usize] = root;
                self.nodes.free.push(n);
            }
            1 => {
                self.chains -= 1;
                self.chain_dups -= 2;
            }
            _ => self.chain_dups -= 1,
        }
        true
    }

    /// Drops every node and dup (their frames with them).
    pub(crate) fn clear(&mut self) {
        self.nodes.v.clear();
        self.nodes.free.clear();
        self.dups.clear();
        self.free_dups.clear();
        for r in &mut self.roots {
            *r = NIL;
        }
        self.chains = 0;
        self.chain_dups = 0;
    }

    /// Bytes of metadata held (allocated capacity), frames not included.
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.nodes.v.capacity() * std::mem::size_of::<StableNode>()
            + self.dups.capacity() * std::mem::size_of::<Option<Dup<F>>>()
            + (self.nodes.free.capacity() + self.free_dups.capacity()) * 4
    }

    /// Live nodes and dups, for tests.
    #[cfg(test)]
    pub(crate) fn live(&self) -> (usize, usize) {
        (
            self.nodes.v.len() - self.nodes.free.len(),
            self.dups.len() - self.free_dups.len(),
        )
    }
}
