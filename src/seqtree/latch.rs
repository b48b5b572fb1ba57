//! [`LatchTree`]: a red-black tree whose lookups never miss and never wait
//! for a writer.
//!
//! # Two copies behind a latch
//!
//! Every entry carries two sets of tree links, so the same entries form two
//! independent red-black trees, copy 0 and copy 1. A writer changes them one
//! at a time under a [`SeqCount`] in *latch* mode: it bumps the count (now
//! odd, so readers go to copy 1), changes copy 0, bumps it again (even:
//! readers go to copy 0), and applies the same change to copy 1.
//!
//! A reader picks the copy named by the count's low bit, walks it, and
//! re-checks the count: if it moved, the walk may have met the writer and is
//! redone (on the copy the new count names). The copy a reader is sent to is
//! never the one being changed at that moment, so a reader never needs to
//! wait for a writer to finish, and every answer, hit or miss, comes from a
//! stable tree. In particular a reader that *interrupted* the writer on its
//! own thread (a signal handler) sees an unchanging count, succeeds on its
//! first walk and returns: it cannot deadlock, unlike a
//! [`SeqTree`](super::SeqTree) reader, which may need the writer lock.
//!
//! Lookups are lock-free, not wait-free: a reader overlapped by writer after
//! writer on other threads keeps redoing its walk (each redo means a write
//! completed).
//!
//! # The trade-off
//!
//! Every write is done twice (two link-and-rebalance passes), each entry
//! carries two sets of links (four more words per entry than a
//! [`SeqTree`](super::SeqTree) entry), and there are no owned handles. Use it
//! where a lookup may run in a context that must never wait; use `SeqTree`
//! elsewhere.
//!
//! Both copies undergo the same sequence of operations with the same
//! arguments, so they always have the same shape: the writer searches copy 0
//! once and reuses the slot for copy 1, which means no user code (`Ord`) runs
//! between the two halves of an update.

use core::borrow::Borrow;
use core::marker::PhantomData;

use super::rbtree::{Balance, Children, RbNode, RbRoot, Slot, Walk};
use super::reclaim::{FreeBatch, OwnedNode};
use super::seqcount::SeqCount;
use crate::rcu::{Flavor, Rcu};
use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// A [`LatchTree`] entry: one key and value, linked into both copies.
#[repr(C)]
struct LatchNode<K, V> {
    /// Key and both copies' child pointers first: a lookup in either copy
    /// touches only the start of the node.
    key: K,
    children: [Children<LatchNode<K, V>>; 2],
    value: V,
    balance: [Balance<LatchNode<K, V>>; 2],
}

// SAFETY: `children(c)`/`balance(c)` return the node's own, fixed link
// fields for copy `c`, and the key is never mutated after construction.
unsafe impl<K: Ord, V> RbNode for LatchNode<K, V> {
    type Key = K;

    #[inline(always)]
    fn children(&self, copy: usize) -> &Children<Self> {
        &self.children[copy]
    }

    #[inline(always)]
    fn balance(&self, copy: usize) -> &Balance<Self> {
        &self.balance[copy]
    }

    #[inline(always)]
    fn key(&self) -> &K {
        &self.key
    }
}

impl<K, V> OwnedNode for LatchNode<K, V> {
    unsafe fn free(node: *mut Self) {
        // SAFETY: `OwnedNode::free` contract: a Box allocation nobody can
        // reach any more.
        drop(unsafe { Box::from_raw(node) });
    }
}

/// A red-black tree with two copies behind a sequence latch: lookups never
/// miss a present key and never wait for a writer, so they are safe where
/// the reader may have interrupted a writer on its own thread (a signal
/// handler). See the [module docs](self) for the algorithm and its costs.
///
/// Reads run inside a read section of the domain `F` (by default the
/// process-wide [`Rcu`], whose read side is itself signal-safe); removed
/// entries are freed through that domain after a grace period.
///
/// ```compile_fail
/// use rcu_registry::rcu::Flavor;
/// use rcu_registry::seqtree::LatchTree;
/// let t: LatchTree<u32, u32> = LatchTree::new();
/// t.insert(1, 1);
/// let v = {
///     let guard = t.domain().read();
///     t.get(&guard, &1).unwrap()
/// }; // the reference cannot outlive the guard
/// assert_eq!(*v, 1);
/// ```
///
/// With the guard taken outside the block, the same code compiles:
///
/// ```
/// use rcu_registry::rcu::Flavor;
/// use rcu_registry::seqtree::LatchTree;
/// let t: LatchTree<u32, u32> = LatchTree::new();
/// t.insert(1, 1);
/// let guard = t.domain().read();
/// let v = {
///     t.get(&guard, &1).unwrap()
/// }; // the guard outlives the reference
/// assert_eq!(*v, 1);
/// ```
pub struct LatchTree<K, V, F = Rcu>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    seq: SeqCount,
    roots: [RbRoot<LatchNode<K, V>>; 2],
    domain: F,
    writer: Mutex<()>,
    len: AtomicUsize,
    retries: AtomicU64,
    /// Owns its entries: `Send`/`Sync` follow `K` and `V` as for `SeqTree`.
    _owns: PhantomData<Box<LatchNode<K, V>>>,
}

impl<K, V, F> LatchTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    /// An empty tree in the default instance of domain `F`.
    pub fn new() -> Self {
        Self::with_domain(F::default())
    }

    /// An empty tree whose readers use `domain`.
    pub fn with_domain(domain: F) -> Self {
        LatchTree {
            seq: SeqCount::new(),
            roots: [RbRoot::new(), RbRoot::new()],
            domain,
            writer: Mutex::new(()),
            len: AtomicUsize::new(0),
            retries: AtomicU64::new(0),
            _owns: PhantomData,
        }
    }

    /// The tree's RCU domain.
    #[inline]
    pub fn domain(&self) -> &F {
        &self.domain
    }

    /// The number of entries (exact when no writer is running).
    #[inline]
    pub fn len(&self) -> usize {
        // Relaxed: a snapshot that orders nothing.
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the tree has no entries.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many lookups were redone because a writer overlapped them.
    pub fn retries(&self) -> u64 {
        // Relaxed: statistics only.
        self.retries.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // Poisoning ignored: no user code runs while the copies differ.
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value for `key`, valid for as long as `guard` lives. Never waits
    /// for a writer and never takes a lock; a present key is always found.
    ///
    /// # Panics
    ///
    /// If `guard` is not a read section of the tree's domain instance.
    #[inline]
    pub fn get<'g, Q>(&self, guard: &'g F::Guard<'_>, key: &Q) -> Option<&'g V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        if !self.domain.protects(guard) {
            wrong_guard();
        }
        loop {
            let start = self.seq.read_begin();
            let copy = SeqCount::latch_copy(start);
            // SAFETY: `guard` is an open read section of the domain through
            // which nodes are reclaimed, so every reachable node stays
            // allocated for `'g`.
            let walk = unsafe { self.roots[copy].find(copy, key) };
            if self.seq.latch_retry(start) {
                // Relaxed: statistics only.
                self.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return match walk {
                // SAFETY: as above; values never change in place.
                Walk::Found(n) => Some(unsafe { &(*n).value }),
                Walk::Missing => None,
                Walk::TooDeep => too_deep(),
            };
        }
    }

    /// A clone of the value for `key`, read in a read section of its own.
    pub fn get_cloned<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
        V: Clone,
    {
        let guard = self.domain.read();
        self.get(&guard, key).cloned()
    }

    /// Whether `key` is present, checked in a read section of its own.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let guard = self.domain.read();
        self.get(&guard, key).is_some()
    }

    /// Inserts `key → value` or replaces the value of an existing key, with
    /// the same semantics as [`SeqTree::insert`](super::SeqTree::insert):
    /// readers see the old or the new entry, never neither; replacing waits
    /// for one grace period and returns the old value.
    ///
    /// # Panics
    ///
    /// When replacing, if called inside a read section of the tree's domain.
    pub fn insert(&self, key: K, value: V) -> Option<V> {
        let w = self.lock();
        // SAFETY: writer lock held.
        match unsafe { self.roots[0].search(0, &key) } {
            Slot::Vacant { parent, dir } => {
                let n = LatchNode::alloc(key, value);
                self.seq.latch_write(|copy| {
                    // SAFETY: writer lock held; the copies have the same
                    // shape (module docs), so copy 0's slot is this copy's.
                    unsafe { self.roots[copy].link(copy, n, parent, dir) };
                });
                // Relaxed: statistic ordered by the lock.
                self.len.fetch_add(1, Ordering::Relaxed);
                None
            }
            Slot::Occupied(old) => {
                let new = LatchNode::alloc(key, value);
                self.seq.latch_write(|copy| {
                    // SAFETY: writer lock held; `old` is linked in both
                    // copies, `new` in neither; equal keys.
                    unsafe { self.roots[copy].replace(copy, old, new) };
                });
                drop(w);
                self.domain.synchronize();
                // SAFETY: `old` is unlinked from both copies and a grace
                // period has passed: nobody else can reach it.
                Some(unsafe { LatchNode::into_value(old) })
            }
        }
    }

    /// Removes `key`; returns whether it was present. Never waits; the
    /// entry is freed after a grace period.
    pub fn remove<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let w = self.lock();
        // SAFETY: writer lock held.
        let n = match unsafe { self.roots[0].search(0, key) } {
            Slot::Occupied(n) => n,
            Slot::Vacant { .. } => return false,
        };
        self.seq.latch_write(|copy| {
            // SAFETY: writer lock held; `n` is linked in both copies.
            unsafe { self.roots[copy].erase(copy, n) };
        });
        // Relaxed: statistic ordered by the lock.
        self.len.fetch_sub(1, Ordering::Relaxed);
        drop(w);
        let mut batch = FreeBatch::new();
        // SAFETY: `n` is unlinked from both copies and owned by nobody else.
        unsafe { batch.push(n) };
        // After unlocking: `call` may wait for the callback worker.
        batch.defer(&self.domain);
        true
    }

    /// Checks both copies (red-black invariants, order, parent links), that
    /// they hold `len` entries each. For tests; takes the writer lock.
    /// Reached through `__internals::seqtree::CheckInvariants`.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let _w = self.lock();
        let len = self.len();
        for copy in 0..2 {
            // SAFETY: writer lock held.
            let count = unsafe { self.roots[copy].check(copy, len) }?;
            if count != len {
                return Err(format!("copy {copy}: {count} nodes but len is {len}"));
            }
        }
        Ok(())
    }
}

impl<K, V> LatchNode<K, V> {
    fn alloc(key: K, value: V) -> *mut Self {
        Box::into_raw(Box::new(LatchNode {
            key,
            children: [Children::new(), Children::new()],
            value,
            balance: [Balance::new(false), Balance::new(false)],
        }))
    }

    /// # Safety
    ///
    /// `node` came from `alloc` and nobody else can reach it.
    unsafe fn into_value(node: *mut Self) -> V {
        // SAFETY: the caller guarantees sole ownership of the allocation.
        unsafe { Box::from_raw(node) }.value
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn wrong_guard() -> ! {
    panic!("LatchTree: the guard is a read section of a different domain than the tree's")
}

/// A walk of a copy that did not change under it cannot be longer than a
/// red-black tree is high; reaching here means memory corruption.
#[cold]
#[inline(never)]
fn too_deep() -> ! {
    panic!("LatchTree: a stable copy is deeper than any red-black tree can be")
}

impl<K, V, F> Default for LatchTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V, F> Drop for LatchTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    fn drop(&mut self) {
        let mut nodes = Vec::new();
        // SAFETY: `&mut self`: no writer runs. Both copies hold the same
        // nodes; collecting copy 0 finds each once.
        unsafe { self.roots[0].collect(0, &mut nodes) };
        let mut batch = FreeBatch::new();
        for n in nodes {
            // SAFETY: the tree owned each node; they are now the batch's.
            unsafe { batch.push(n) };
        }
        // Deferred: readers may still hold `&V` tied to their guards.
        batch.defer(&self.domain);
    }
}

impl<K, V, F> core::fmt::Debug for LatchTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LatchTree")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}
