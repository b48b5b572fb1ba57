//! The red-black core shared by [`SeqTree`](super::SeqTree) (one copy of
//! the links per node) and [`LatchTree`](super::LatchTree) (two copies).
//!
//! Writers work under the tree's lock with relaxed loads; lock-free readers
//! follow only `root` and `child` (acquire loads). Every child store is a
//! release store, ordered so a reader never meets a cycle, and readers give up
//! after [`MAX_WALK`] steps; a miss must be validated by the caller, a hit is
//! always real. This module never frees a node: callers reclaim unlinked nodes
//! only after a grace period.
//!
//! Who touches what and the store order of each rotation and splice:
//! [`crate::docs::algorithms::trees`].

use core::borrow::Borrow;
use core::cmp::Ordering as CmpOrdering;
use core::ops::Bound;
use core::ptr;

use crate::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

pub(crate) const LEFT: usize = 0;
pub(crate) const RIGHT: usize = 1;

/// Longest walk a lock-free reader takes before it calls the attempt failed.
///
/// A red-black tree of `n` nodes is at most `2 * log2(n + 1)` high, so no
/// tree that fits in a 64-bit address space is 128 high. A longer walk can
/// only be a reader wandering through transient states of concurrent
/// rotations; it is abandoned and retried (and, after a few retries, redone
/// under the writer lock), which bounds every read.
pub(crate) const MAX_WALK: usize = 2 * usize::BITS as usize;

/// The child pointers of one copy of a node: all a lookup follows. Kept
/// apart from [`Balance`] so that node types can put them next to the key,
/// in the node's first cache line.
#[repr(C)]
pub(crate) struct Children<N> {
    /// `[left, right]`. Read by lock-free readers (acquire), written by the
    /// writer (release).
    child: [AtomicPtr<N>; 2],
}

impl<N> Children<N> {
    pub(crate) fn new() -> Self {
        Children {
            child: [
                AtomicPtr::new(ptr::null_mut()),
                AtomicPtr::new(ptr::null_mut()),
            ],
        }
    }
}

/// Writer-only balancing data of one copy of a node.
pub(crate) struct Balance<N> {
    parent: AtomicPtr<N>,
    /// `true` for red.
    red: AtomicBool,
    /// Not used by the tree: a flag the node type may use for its own
    /// purposes. It sits in bytes that would otherwise be padding after
    /// `red`, which keeps a [`SeqTree`](super::SeqTree) node (with `u64` keys
    /// and values) at 56 bytes: one 64-byte allocator chunk, so its child
    /// pointers and key always share a cache line, instead of an 80-byte
    /// chunk whose every fourth node has them on two lines.
    pub(crate) node_flag: AtomicBool,
}

impl<N> Balance<N> {
    /// Balancing data of a fresh node, with `node_flag` as given.
    pub(crate) fn new(node_flag: bool) -> Self {
        Balance {
            parent: AtomicPtr::new(ptr::null_mut()),
            red: AtomicBool::new(true),
            node_flag: AtomicBool::new(node_flag),
        }
    }
}

/// A node type the core can link.
///
/// # Safety
///
/// `children(c)` and `balance(c)` must return the same fields for the
/// node's whole life for every copy index `c` the owning tree uses, and
/// `key` must never change.
pub(crate) unsafe trait RbNode: Sized {
    type Key: Ord;
    fn children(&self, copy: usize) -> &Children<Self>;
    fn balance(&self, copy: usize) -> &Balance<Self>;
    fn key(&self) -> &Self::Key;
}

/// Asks the cache for `p`'s line (a hint: never faults, any address).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address
    // (null included); SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The root pointer of one copy of a tree.
pub(crate) struct RbRoot<N> {
    root: AtomicPtr<N>,
}

/// What a lock-free walk found.
pub(crate) enum Walk<N> {
    /// A node whose key compared equal (or the requested bound).
    Found(*mut N),
    /// A null pointer was reached: a miss, to be validated by the caller.
    Missing,
    /// The walk exceeded [`MAX_WALK`]: a failed attempt.
    TooDeep,
}

/// Where a key belongs, as seen by the writer.
pub(crate) enum Slot<N> {
    Occupied(*mut N),
    Vacant { parent: *mut N, dir: usize },
}

// ---------------------------------------------------------------------------
// Writer-side accessors (also used by the invariant checker in `rbcheck`). All `unsafe fn`s below share one contract:
//
// # Safety (writer functions)
//
// The caller holds the owning tree's writer lock, and every pointer passed in
// (and every node reachable from the root of `copy`) is a live node of that
// copy of the tree (or, for a node being linked in, a live unlinked node).

#[inline(always)]
unsafe fn kids<'a, N: RbNode>(n: *mut N, copy: usize) -> &'a Children<N> {
    // SAFETY: the caller passes a live node (writer contract above).
    unsafe { (*n).children(copy) }
}

#[inline(always)]
unsafe fn bal<'a, N: RbNode>(n: *mut N, copy: usize) -> &'a Balance<N> {
    // SAFETY: the caller passes a live node (writer contract above).
    unsafe { (*n).balance(copy) }
}

#[inline(always)]
pub(super) unsafe fn child<N: RbNode>(n: *mut N, copy: usize, dir: usize) -> *mut N {
    // Relaxed: only writers store links, and they are serialized by the lock
    // (whose acquire orders this after the previous writer's stores).
    // SAFETY: the caller passes a live node (writer contract above).
    unsafe { kids(n, copy) }.child[dir].load(Ordering::Relaxed)
}

#[inline(always)]
unsafe fn set_child<N: RbNode>(n: *mut N, copy: usize, dir: usize, c: *mut N) {
    // Release pairs with the readers' acquire loads in `find`/`lower_bound`:
    // a reader that reaches `c` through this pointer sees `c` initialised and
    // sees `c`'s own child stores that precede this one. Relaxed would let a
    // reader follow a pointer into a node whose links it cannot see yet.
    // SAFETY: the caller passes a live node (writer contract above).
    unsafe { kids(n, copy) }.child[dir].store(c, Ordering::Release);
}

#[inline(always)]
pub(super) unsafe fn parent<N: RbNode>(n: *mut N, copy: usize) -> *mut N {
    // Relaxed: writer-only field, ordered by the writer lock.
    // SAFETY: the caller passes a live node (writer contract above).
    unsafe { bal(n, copy) }.parent.load(Ordering::Relaxed)
}

#[inline(always)]
unsafe fn set_parent<N: RbNode>(n: *mut N, copy: usize, p: *mut N) {
    // Relaxed: writer-only field, ordered by the writer lock.
    // SAFETY: the caller passes a live node (writer contract above).
    unsafe { bal(n, copy) }.parent.store(p, Ordering::Relaxed);
}

#[inline(always)]
pub(super) unsafe fn is_red<N: RbNode>(n: *mut N, copy: usize) -> bool {
    // Null leaves are black. Relaxed: writer-only field, ordered by the lock.
    // SAFETY: the caller passes a live node (writer contract above).
    !n.is_null() && unsafe { bal(n, copy) }.red.load(Ordering::Relaxed)
}

/// Sets `n`'s colour, storing only if it changes. Fixups often "recolour" a
/// node to the colour it already has (every insert re-blackens the root); a
/// store of the same value would still take the node's cache line away from
/// every reader core, and the colour shares that line with the child pointers
/// and key a lookup reads. Readers skip hits' shared counters precisely to
/// stay off lines the writer dirties; this keeps the root's line clean too.
#[inline(always)]
unsafe fn set_red<N: RbNode>(n: *mut N, copy: usize, red: bool) {
    // SAFETY: the caller passes a live node (writer contract above).
    let b = unsafe { bal(n, copy) };
    // Relaxed (load and store): writer-only field, ordered by the writer lock.
    if b.red.load(Ordering::Relaxed) != red {
        b.red.store(red, Ordering::Relaxed);
    }
}

/// Which child of `p` is `c`.
#[inline(always)]
unsafe fn dir_of<N: RbNode>(p: *mut N, copy: usize, c: *mut N) -> usize {
    // SAFETY: writer contract.
    if unsafe { child(p, copy, LEFT) } == c {
        LEFT
    } else {
        RIGHT
    }
}

impl<N: RbNode> RbRoot<N> {
    pub(crate) fn new() -> Self {
        RbRoot {
            root: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The root for a writer (or for `Drop`, which has exclusive access).
    #[inline]
    pub(crate) fn root_relaxed(&self) -> *mut N {
        // Relaxed: callers hold the writer lock or `&mut` of the tree.
        self.root.load(Ordering::Relaxed)
    }

    /// Makes `new` the child of `p` that `old` was (or the root).
    ///
    /// # Safety
    ///
    /// Writer contract.
    unsafe fn replace_child(&self, copy: usize, p: *mut N, old: *mut N, new: *mut N) {
        if p.is_null() {
            // Release: as in `set_child`, pairs with the readers' acquire
            // load of the root.
            self.root.store(new, Ordering::Release);
        } else {
            // SAFETY: writer contract.
            unsafe { set_child(p, copy, dir_of(p, copy, old), new) };
        }
    }

    /// Rotates `x` down in direction `d`; its child on the other side moves
    /// up into its place.
    ///
    /// # Safety
    ///
    /// Writer contract, and `x` has a child on side `1 - d`.
    unsafe fn rotate(&self, copy: usize, x: *mut N, d: usize) {
        // SAFETY: writer contract; `y` exists by the caller's guarantee.
        unsafe {
            let y = child(x, copy, 1 - d);
            let inner = child(y, copy, d);
            let p = parent(x, copy);
            // 1. `x` lets go of `y` first, so that no moment has `x -> y` and
            //    `y -> x` both visible (a cycle for readers).
            set_child(x, copy, 1 - d, inner);
            if !inner.is_null() {
                set_parent(inner, copy, x);
            }
            // 2. `y` adopts `x`.
            set_child(y, copy, d, x);
            set_parent(x, copy, y);
            // 3. `y` is published in `x`'s old place.
            set_parent(y, copy, p);
            self.replace_child(copy, p, x, y);
        }
    }

    /// Where `key` is or belongs, walking with the writer's view.
    ///
    /// # Safety
    ///
    /// Writer contract.
    pub(crate) unsafe fn search<Q>(&self, copy: usize, key: &Q) -> Slot<N>
    where
        N::Key: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let mut p: *mut N = ptr::null_mut();
        let mut dir = LEFT;
        let mut n = self.root_relaxed();
        while !n.is_null() {
            // SAFETY: writer contract: `n` is a live node of this copy.
            let k = unsafe { (*n).key() };
            match key.cmp(k.borrow()) {
                CmpOrdering::Equal => return Slot::Occupied(n),
                CmpOrdering::Less => dir = LEFT,
                CmpOrdering::Greater => dir = RIGHT,
            }
            p = n;
            // SAFETY: writer contract.
            n = unsafe { child(n, copy, dir) };
        }
        Slot::Vacant { parent: p, dir }
    }

    /// Links the unlinked node `n` at the vacant slot found by [`search`]
    /// and rebalances.
    ///
    /// # Safety
    ///
    /// Writer contract; `(parent, dir)` came from [`search`] with no change
    /// since; `n` is not linked into this copy and its key belongs there.
    ///
    /// [`search`]: RbRoot::search
    pub(crate) unsafe fn link(&self, copy: usize, n: *mut N, parent: *mut N, dir: usize) {
        // SAFETY: writer contract.
        unsafe {
            // The node's own links are initialised before the release store
            // that publishes it.
            set_child(n, copy, LEFT, ptr::null_mut());
            set_child(n, copy, RIGHT, ptr::null_mut());
            set_red(n, copy, true);
            set_parent(n, copy, parent);
            if parent.is_null() {
                // Release: pairs with the readers' acquire root load.
                self.root.store(n, Ordering::Release);
            } else {
                set_child(parent, copy, dir, n);
            }
            self.insert_fixup(copy, n);
        }
    }

    unsafe fn insert_fixup(&self, copy: usize, mut z: *mut N) {
        // SAFETY (whole body): writer contract; every node named below is
        // non-null by the red-black invariants noted at each step.
        unsafe {
            loop {
                let p = parent(z, copy);
                if !is_red(p, copy) {
                    break;
                }
                // `p` is red, hence not the root: the grandparent exists.
                let g = parent(p, copy);
                let d = dir_of(g, copy, p);
                let uncle = child(g, copy, 1 - d);
                if is_red(uncle, copy) {
                    set_red(p, copy, false);
                    set_red(uncle, copy, false);
                    set_red(g, copy, true);
                    z = g;
                    continue;
                }
                let mut p = p;
                if z == child(p, copy, 1 - d) {
                    // Inner grandchild: rotate it to the outside first.
                    self.rotate(copy, p, d);
                    z = p;
                    p = parent(z, copy);
                }
                set_red(p, copy, false);
                set_red(g, copy, true);
                self.rotate(copy, g, 1 - d);
                break;
            }
            let root = self.root_relaxed();
            set_red(root, copy, false);
        }
    }

    /// Puts the unlinked node `new` in the place of the linked node `old`
    /// (same key) with a single publishing store.
    ///
    /// # Safety
    ///
    /// Writer contract; `old` is linked in this copy, `new` is not, and their
    /// keys compare equal.
    pub(crate) unsafe fn replace(&self, copy: usize, old: *mut N, new: *mut N) {
        // SAFETY: writer contract.
        unsafe {
            let l = child(old, copy, LEFT);
            let r = child(old, copy, RIGHT);
            let p = parent(old, copy);
            set_child(new, copy, LEFT, l);
            set_child(new, copy, RIGHT, r);
            set_parent(new, copy, p);
            set_red(new, copy, is_red(old, copy));
            if !l.is_null() {
                set_parent(l, copy, new);
            }
            if !r.is_null() {
                set_parent(r, copy, new);
            }
            self.replace_child(copy, p, old, new);
        }
    }

    /// Unlinks `z` and rebalances. `z`'s own links are left as they were, so
    /// a reader standing on `z` can still walk down from it.
    ///
    /// # Safety
    ///
    /// Writer contract; `z` is linked in this copy.
    pub(crate) unsafe fn erase(&self, copy: usize, z: *mut N) {
        // SAFETY (whole body): writer contract; nodes named below exist by
        // the shape checks right before their use.
        unsafe {
            let zl = child(z, copy, LEFT);
            let zr = child(z, copy, RIGHT);
            let zp = parent(z, copy);
            let removed_red;
            let x;
            let xp;
            if zl.is_null() || zr.is_null() {
                // At most one child: it takes `z`'s place.
                x = if zl.is_null() { zr } else { zl };
                xp = zp;
                removed_red = is_red(z, copy);
                if !x.is_null() {
                    set_parent(x, copy, zp);
                }
                self.replace_child(copy, zp, z, x);
            } else {
                // Two children: the successor `s` (leftmost of the right
                // subtree) moves into `z`'s place.
                let mut s = zr;
                loop {
                    let l = child(s, copy, LEFT);
                    if l.is_null() {
                        break;
                    }
                    s = l;
                }
                removed_red = is_red(s, copy);
                x = child(s, copy, RIGHT);
                if s == zr {
                    // `s` keeps its right subtree and adopts `z`'s left one.
                    xp = s;
                } else {
                    xp = parent(s, copy);
                    // Unhook `s` from its parent first (its right subtree
                    // takes its place), then give it `z`'s right subtree.
                    set_child(xp, copy, LEFT, x);
                    if !x.is_null() {
                        set_parent(x, copy, xp);
                    }
                    set_child(s, copy, RIGHT, zr);
                    set_parent(zr, copy, s);
                }
                set_child(s, copy, LEFT, zl);
                set_parent(zl, copy, s);
                set_parent(s, copy, zp);
                set_red(s, copy, is_red(z, copy));
                // Publish `s` in `z`'s place last.
                self.replace_child(copy, zp, z, s);
            }
            if !removed_red {
                self.erase_fixup(copy, x, xp);
            }
        }
    }

    unsafe fn erase_fixup(&self, copy: usize, mut x: *mut N, mut xp: *mut N) {
        // SAFETY (whole body): writer contract. `x` carries an extra black,
        // so while it is not the root its sibling `w` exists (black height).
        unsafe {
            while x != self.root_relaxed() && !is_red(x, copy) {
                let d = dir_of(xp, copy, x);
                let mut w = child(xp, copy, 1 - d);
                if is_red(w, copy) {
                    set_red(w, copy, false);
                    set_red(xp, copy, true);
                    self.rotate(copy, xp, d);
                    w = child(xp, copy, 1 - d);
                }
                if !is_red(child(w, copy, LEFT), copy) && !is_red(child(w, copy, RIGHT), copy) {
                    set_red(w, copy, true);
                    x = xp;
                    xp = parent(x, copy);
                } else {
                    if !is_red(child(w, copy, 1 - d), copy) {
                        set_red(child(w, copy, d), copy, false);
                        set_red(w, copy, true);
                        self.rotate(copy, w, 1 - d);
                        w = child(xp, copy, 1 - d);
                    }
                    set_red(w, copy, is_red(xp, copy));
                    set_red(xp, copy, false);
                    set_red(child(w, copy, 1 - d), copy, false);
                    self.rotate(copy, xp, d);
                    x = self.root_relaxed();
                    break;
                }
            }
            if !x.is_null() {
                set_red(x, copy, false);
            }
        }
    }

    /// Every node of this copy, in no particular order.
    ///
    /// # Safety
    ///
    /// Writer contract (or exclusive access to the tree).
    pub(crate) unsafe fn collect(&self, copy: usize, out: &mut Vec<*mut N>) {
        let mut stack = Vec::new();
        let root = self.root_relaxed();
        if !root.is_null() {
            stack.push(root);
        }
        while let Some(n) = stack.pop() {
            out.push(n);
            for d in [LEFT, RIGHT] {
                // SAFETY: writer contract.
                let c = unsafe { child(n, copy, d) };
                if !c.is_null() {
                    stack.push(c);
                }
            }
        }
    }

    /// Calls `visit` on every node of this copy, in key order (while the
    /// node was just reached: a caller that reads it finds it in cache).
    ///
    /// # Safety
    ///
    /// Writer contract (or exclusive access to the tree).
    pub(crate) unsafe fn for_each_in_order(&self, copy: usize, mut visit: impl FnMut(*mut N)) {
        let mut stack = Vec::new();
        let mut n = self.root_relaxed();
        while !n.is_null() || !stack.is_empty() {
            while !n.is_null() {
                stack.push(n);
                // The right child is visited after the whole left subtree:
                // fetched meanwhile, its miss overlaps the walk (a pass over
                // a large tree is one cache miss per node otherwise).
                // SAFETY: writer contract.
                prefetch(unsafe { child(n, copy, RIGHT) });
                // SAFETY: writer contract.
                n = unsafe { child(n, copy, LEFT) };
            }
            let top = stack.pop().expect("the loop condition");
            visit(top);
            // SAFETY: writer contract.
            n = unsafe { child(top, copy, RIGHT) };
        }
    }

    /// Forgets every node (they must be reclaimed by the caller).
    ///
    /// # Safety
    ///
    /// Writer contract; the caller owns the nodes from now on.
    pub(crate) unsafe fn clear(&self) {
        // Release: pairs with the readers' acquire root load (they then see
        // an empty tree, never a half-cleared one: links are untouched).
        self.root.store(ptr::null_mut(), Ordering::Release);
    }

    /// Lock-free lookup of `key` in copy `copy`.
    ///
    /// # Safety
    ///
    /// Every node reachable from this root must stay allocated until the
    /// call returns, and a returned node for as long as the caller uses it:
    /// the caller is inside a read section of the domain that reclaims the
    /// tree's nodes (or holds the writer lock).
    #[inline]
    pub(crate) unsafe fn find<Q>(&self, copy: usize, key: &Q) -> Walk<N>
    where
        N::Key: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // Acquire (here and for each child below) pairs with the writer's
        // release stores: the node reached is seen fully initialised.
        let mut n = self.root.load(Ordering::Acquire);
        let mut steps = 0;
        while !n.is_null() {
            if steps == MAX_WALK {
                return Walk::TooDeep;
            }
            steps += 1;
            // SAFETY: `n` was reached from the root inside the caller's read
            // section, so it is not reclaimed before the section ends.
            let node = unsafe { &*n };
            let ord = key.cmp(node.key().borrow());
            if ord == CmpOrdering::Equal {
                return Walk::Found(n);
            }
            // Both children are loaded (they share the node's cache line)
            // and one is *selected*, which compiles to a conditional move:
            // - not a branch, because which way a search goes is a coin flip
            //   at every level and a branch would be mispredicted half the
            //   time (the equality test above is almost always false and
            //   predicts well);
            // - not `child[(ord == Greater) as usize]` either: that indexes
            //   with a `setcc` into a byte register, which merges with the
            //   register's old contents, a false dependency that chains each
            //   lookup's first step to the previous lookup's last one and
            //   stops the CPU from overlapping consecutive lookups' cache
            //   misses (measured: 1.5x `BTreeMap::get` at 100,000 keys with
            //   the index, 1.0x with the select; see BENCHMARKS.md).
            let child = &node.children(copy).child;
            let left = child[0].load(Ordering::Acquire);
            let right = child[1].load(Ordering::Acquire);
            n = if ord == CmpOrdering::Greater {
                right
            } else {
                left
            };
        }
        Walk::Missing
    }

    /// Lock-free search for the first node whose key is inside `lower`
    /// (the smallest key `>= q`, `> q`, or the smallest key at all).
    /// Unlike an exact hit, the answer must always be validated by the
    /// caller: a concurrently moving node can hide a smaller candidate.
    ///
    /// # Safety
    ///
    /// As for [`find`](RbRoot::find).
    pub(crate) unsafe fn lower_bound<Q>(&self, copy: usize, lower: Bound<&Q>) -> Walk<N>
    where
        N::Key: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // Acquire: as in `find`.
        let mut n = self.root.load(Ordering::Acquire);
        let mut best: *mut N = ptr::null_mut();
        let mut steps = 0;
        while !n.is_null() {
            if steps == MAX_WALK {
                return Walk::TooDeep;
            }
            steps += 1;
            // SAFETY: as in `find`.
            let node = unsafe { &*n };
            let k: &Q = node.key().borrow();
            let inside = match lower {
                Bound::Unbounded => true,
                Bound::Included(q) => k >= q,
                Bound::Excluded(q) => k > q,
            };
            if inside {
                best = n;
            }
            n = node.children(copy).child[usize::from(!inside)].load(Ordering::Acquire);
        }
        if best.is_null() {
            Walk::Missing
        } else {
            Walk::Found(best)
        }
    }
}
