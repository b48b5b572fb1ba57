//! [`SeqTree`]: the seqcount-validated RCU red-black tree.
//!
//! How it works: [`crate::docs::algorithms::trees`].

use core::borrow::Borrow;
use core::fmt;
use core::marker::PhantomData;
use core::ops::Bound;

use crossbeam_utils::CachePadded;

use super::entry::{EntryHandle, Node};
use super::rbtree::{RbRoot, Slot, Walk};
use super::reclaim::FreeBatch;
use super::seqcount::SeqCount;
use crate::rcu::{Flavor, Rcu};
use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// Lock-free attempts a lookup makes before it takes the writer lock.
///
/// A writer holds the count odd for one insert or erase (well under a
/// microsecond), so a reader that overlapped one nearly always succeeds on
/// the next attempt. Four attempts make the lock fallback rare (the stress
/// test reports how rare) while bounding a reader's time when writers never
/// pause.
pub(crate) const LOCKLESS_ATTEMPTS: usize = 4;

/// Read-side statistics of a [`SeqTree`], from [`SeqTree::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Lock-free attempts that had to be redone: a miss overlapped by a
    /// writer, a walk longer than any valid tree, or a handle lookup that met
    /// an entry being freed.
    pub retries: u64,
    /// Reads that gave up on lock-free attempts and took the writer lock.
    pub fallbacks: u64,
}

/// Relaxed event counters; on their own cache line so that counting never
/// slows down the fields every lookup reads.
#[derive(Default)]
struct Counters {
    retries: AtomicU64,
    fallbacks: AtomicU64,
}

/// A red-black tree with lock-free, RCU-protected lookups.
///
/// - **Readers** take no lock. [`get`](SeqTree::get) walks the tree inside a
///   read section of the tree's domain `F`; a hit is returned at once, a miss
///   is redone and checked against the tree's [`SeqCount`], and retried if a
///   writer overlapped it; after a few failed attempts the reader takes the
///   writer lock, so every read finishes. Lookups are linearizable: a key present
///   for the whole call is always found.
/// - **Writers** ([`insert`](SeqTree::insert), [`remove`](SeqTree::remove),
///   ...) are serialized by an internal lock and never wait for readers,
///   except `insert` replacing a value (it waits for one grace period).
///   Removed entries are freed through the domain's `call`, after a grace
///   period, batched where one operation removes several.
///
/// Lookups from code that may have interrupted a writer on its own thread
/// (a signal handler) must use [`LatchTree`](super::LatchTree) instead: a
/// `SeqTree` reader may fall back to the writer lock.
///
/// # Thread safety
///
/// `SeqTree<K, V, F>` is `Send` when `K` and `V` are (it owns them), and
/// `Sync` when they are also `Sync`: readers on many threads get `&K`/`&V`,
/// and entries inserted on one thread are dropped on another (the domain's
/// callback thread). These follow from the `PhantomData<Box<_>>` marker; the
/// raw atomics would otherwise make the tree `Sync` for any `K`, `V`:
///
/// ```compile_fail
/// use std::cell::Cell;
/// use rcu_registry::seqtree::SeqTree;
/// fn shared<T: Sync>(_: &T) {}
/// let t: SeqTree<u32, Cell<u32>> = SeqTree::new();
/// shared(&t); // Cell is not Sync: readers could race on it
/// ```
///
/// With a value that is `Sync` (an atomic instead of a `Cell`) it compiles:
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use rcu_registry::seqtree::SeqTree;
/// fn shared<T: Sync>(_: &T) {}
/// let t: SeqTree<u32, AtomicU32> = SeqTree::new();
/// shared(&t);
/// ```
///
/// # References do not outlive the read section
///
/// ```compile_fail
/// use rcu_registry::rcu::{Flavor, Rcu};
/// use rcu_registry::seqtree::SeqTree;
/// let t: SeqTree<u32, String> = SeqTree::new();
/// t.insert(1, "one".into());
/// let v = {
///     let guard = t.domain().read();
///     t.get(&guard, &1).unwrap()
/// }; // guard dropped here: the entry may be freed
/// println!("{v}");
/// ```
///
/// With the guard taken outside the block, the same code compiles:
///
/// ```
/// use rcu_registry::rcu::{Flavor, Rcu};
/// use rcu_registry::seqtree::SeqTree;
/// let t: SeqTree<u32, String> = SeqTree::new();
/// t.insert(1, "one".into());
/// let guard = t.domain().read();
/// let v = {
///     t.get(&guard, &1).unwrap()
/// }; // the guard outlives the reference
/// println!("{v}");
/// ```
#[repr(C)]
pub struct SeqTree<K, V, F = Rcu>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    /// Read by every lookup, written only when the root node changes: on a
    /// cache line of its own, so a hit never touches a line that every
    /// write dirties.
    pub(super) root: CachePadded<RbRoot<Node<K, V>>>,
    /// Written at every change (with the lock word and `len` beside it);
    /// read by lookups only to validate a miss.
    pub(super) seq: SeqCount,
    writer: Mutex<()>,
    pub(super) len: AtomicUsize,
    pub(super) domain: F,
    stats: CachePadded<Counters>,
    /// The tree owns its entries (see "Thread safety").
    _owns: PhantomData<Box<Node<K, V>>>,
}

/// A lookup that could not be confirmed without waiting for a writer
/// ([`SeqTree::get_in_trap`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

impl<K, V, F> SeqTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    /// An empty tree in the default instance of domain `F` (for [`Rcu`], the
    /// process-wide domain).
    pub fn new() -> Self {
        Self::with_domain(F::default())
    }

    /// An empty tree whose readers use `domain` and whose removed entries
    /// are reclaimed through it.
    pub fn with_domain(domain: F) -> Self {
        SeqTree {
            root: CachePadded::new(RbRoot::new()),
            seq: SeqCount::new(),
            domain,
            writer: Mutex::new(()),
            len: AtomicUsize::new(0),
            stats: CachePadded::new(Counters::default()),
            _owns: PhantomData,
        }
    }

    /// The tree's RCU domain: start read sections for [`get`](SeqTree::get)
    /// with `tree.domain().read()`.
    #[inline]
    pub fn domain(&self) -> &F {
        &self.domain
    }

    /// The number of entries. Exact when no writer is running; otherwise
    /// the count before or after a concurrent change.
    #[inline]
    pub fn len(&self) -> usize {
        // Relaxed: a snapshot; it orders nothing else.
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the tree has no entries (same caveat as [`len`](SeqTree::len)).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How often readers had to retry or fall back to the lock so far.
    pub fn stats(&self) -> ReadStats {
        // Relaxed: statistics only.
        ReadStats {
            retries: self.stats.retries.load(Ordering::Relaxed),
            fallbacks: self.stats.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// The writer lock. Poisoning is ignored: a panic under the lock (in a
    /// user's `Ord`, `make` or `keep` closure) always happens before the
    /// tree's structure is touched, so the tree is consistent.
    pub(super) fn lock(&self) -> MutexGuard<'_, ()> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[inline(always)]
    pub(super) fn check_guard(&self, guard: &F::Guard<'_>) {
        if !self.domain.protects(guard) {
            wrong_guard();
        }
    }

    #[inline(always)]
    pub(super) fn count_retry(&self) {
        // Relaxed: statistics only.
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
    }

    #[cold]
    pub(super) fn count_fallback(&self) {
        // Relaxed: statistics only.
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Finds `key`'s node. The caller is inside a read section of the
    /// tree's domain (or holds the writer lock), which keeps the returned
    /// node allocated.
    #[inline]
    pub(super) fn lookup<Q>(&self, key: &Q) -> Option<*mut Node<K, V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // First an optimistic walk without a snapshot: a hit compared equal
        // to `key`, so it is a real entry whatever a writer was doing, and
        // skipping the sequence count keeps hits off the cache line that
        // every write dirties. Only a miss goes on to validated attempts.
        // SAFETY: the caller's read section keeps every reachable node
        // allocated (nodes are freed only after a grace period).
        if let Walk::Found(n) = unsafe { self.root.find(0, key) } {
            return Some(n);
        }
        self.lookup_validated(key)
    }

    /// The validated attempts of a lookup whose optimistic walk missed.
    #[inline(never)]
    fn lookup_validated<Q>(&self, key: &Q) -> Option<*mut Node<K, V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        for _ in 0..LOCKLESS_ATTEMPTS {
            let start = self.seq.read_begin();
            // SAFETY: as in `lookup`.
            match unsafe { self.root.find(0, key) } {
                // A hit compared equal to `key`: a real entry, whatever the
                // writer was doing.
                Walk::Found(n) => return Some(n),
                // A miss is only an answer if no writer overlapped the walk.
                Walk::Missing if !self.seq.read_retry(start) => return None,
                Walk::Missing | Walk::TooDeep => self.count_retry(),
            }
            crate::sync::spin_loop();
        }
        self.lookup_locked(key)
    }

    /// As [`lookup`](Self::lookup) without the locked fallback: `Err(Busy)`
    /// when no validated attempt could confirm a miss (writers kept
    /// changing the tree).
    #[inline]
    fn lookup_lockless<Q>(&self, key: &Q) -> Result<Option<*mut Node<K, V>>, Busy>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        // SAFETY: as in `lookup`.
        if let Walk::Found(n) = unsafe { self.root.find(0, key) } {
            return Ok(Some(n));
        }
        for _ in 0..LOCKLESS_ATTEMPTS {
            let start = self.seq.read_begin();
            // SAFETY: as in `lookup`.
            match unsafe { self.root.find(0, key) } {
                Walk::Found(n) => return Ok(Some(n)),
                Walk::Missing if !self.seq.read_retry(start) => return Ok(None),
                Walk::Missing | Walk::TooDeep => self.count_retry(),
            }
            crate::sync::spin_loop();
        }
        Err(Busy)
    }

    #[cold]
    #[inline(never)]
    fn lookup_locked<Q>(&self, key: &Q) -> Option<*mut Node<K, V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.count_fallback();
        let _w = self.lock();
        // SAFETY: writer lock held.
        match unsafe { self.root.search(0, key) } {
            Slot::Occupied(n) => Some(n),
            Slot::Vacant { .. } => None,
        }
    }

    /// The first node inside `lower`, validated against the sequence count
    /// (so no entry inside `lower` that was present for the whole call is
    /// skipped). The caller is inside a read section of the tree's domain.
    pub(super) fn lower_bound<Q>(&self, lower: Bound<&Q>) -> Option<*mut Node<K, V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        for _ in 0..LOCKLESS_ATTEMPTS {
            let start = self.seq.read_begin();
            // SAFETY: as in `lookup`.
            let walk = unsafe { self.root.lower_bound(0, lower) };
            if !self.seq.read_retry(start) {
                match walk {
                    Walk::Found(n) => return Some(n),
                    Walk::Missing => return None,
                    // Impossible for a tree that did not change during the
                    // walk; treated as a failed attempt all the same.
                    Walk::TooDeep => {}
                }
            }
            self.count_retry();
            crate::sync::spin_loop();
        }
        self.count_fallback();
        let _w = self.lock();
        // SAFETY: writer lock held: the tree is stable.
        match unsafe { self.root.lower_bound(0, lower) } {
            Walk::Found(n) => Some(n),
            _ => None,
        }
    }

    /// The value for `key`, valid for as long as `guard` lives.
    ///
    /// Lock-free unless writers keep overlapping the lookup (see the
    /// [type docs](SeqTree)). If the entry is removed or replaced while the
    /// reference is held, the reference keeps showing the old value,
    /// unchanged, until the guard is dropped.
    ///
    /// # Panics
    ///
    /// If `guard` is a read section of a different domain instance than the
    /// tree's (possible with [`Srcu`](crate::rcu::Srcu)): the tree's grace
    /// periods would not wait for it.
    #[inline]
    pub fn get<'g, Q>(&self, guard: &'g F::Guard<'_>, key: &Q) -> Option<&'g V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.get_key_value(guard, key).map(|(_, v)| v)
    }

    /// The stored key and the value for `key`, valid for as long as `guard`
    /// lives. As [`get`](SeqTree::get).
    #[inline]
    pub fn get_key_value<'g, Q>(&self, guard: &'g F::Guard<'_>, key: &Q) -> Option<(&'g K, &'g V)>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.check_guard(guard);
        let n = self.lookup(key)?;
        // SAFETY: `n` was reached inside `guard`'s read section, which the tree's domain protects
        // (checked above); nodes are freed only after a grace period, so `n` outlives `'g`. Key and
        // value are never mutated in place.
        let node = unsafe { &*n };
        Some((&node.key, &node.value))
    }

    /// As [`get`](SeqTree::get), for a trap handler that must neither block
    /// nor call the C library: a miss that writers kept from being
    /// confirmed is `Err(Busy)` instead of a wait for the writer lock (which
    /// the interrupted thread may hold). Writers change the tree only with
    /// pointer updates (nodes are allocated before the sequence count goes
    /// odd), so a handler interrupting a writer cannot see it stuck.
    #[doc(hidden)]
    #[inline]
    pub fn get_in_trap<'g, Q>(
        &self,
        guard: &'g F::Guard<'_>,
        key: &Q,
    ) -> Result<Option<&'g V>, Busy>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.check_guard(guard);
        Ok(self.lookup_lockless(key)?.map(|n| {
            // SAFETY: as in `get_key_value`: reached inside `guard`'s read
            // section of the tree's domain; values are never mutated in place.
            unsafe { &(*n).value }
        }))
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

    /// An owned handle to `key`'s entry that outlives the read section.
    ///
    /// Succeeds only while the entry is live: the handle is taken with
    /// `inc_not_zero` on the entry's reference count, never by resurrecting a
    /// count that already reached zero (see [`EntryHandle`]). If the entry is
    /// being removed or replaced concurrently, the lookup is redone, so a key
    /// present for the whole call is always returned.
    pub fn get_handle<Q>(&self, key: &Q) -> Option<EntryHandle<K, V, F>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let _guard = self.domain.read();
        loop {
            let n = self.lookup(key)?;
            // SAFETY: `n` was reached inside `_guard`'s read section of the
            // tree's own domain, which is still open.
            if let Some(h) = unsafe { EntryHandle::try_new(n, &self.domain) } {
                return Some(h);
            }
            // The entry's last reference is gone: it was unlinked after our
            // walk reached it. The key may have a live replacement.
            self.count_retry();
            crate::sync::spin_loop();
        }
    }

    /// [`get_handle`](Self::get_handle) for a writer that expects `key` to
    /// be absent (a registration of a new key): the walk is validated from
    /// the start, so a miss costs one walk instead of an optimistic one and
    /// a validated one. A hit pays a read of the sequence count's cache
    /// line, which the writer dirties anyway.
    pub(crate) fn get_handle_expecting_miss<Q>(&self, key: &Q) -> Option<EntryHandle<K, V, F>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let _guard = self.domain.read();
        loop {
            let n = self.lookup_validated(key)?;
            // SAFETY: as in `get_handle`.
            if let Some(h) = unsafe { EntryHandle::try_new(n, &self.domain) } {
                return Some(h);
            }
            self.count_retry();
            crate::sync::spin_loop();
        }
    }

    /// [`contains_key`](Self::contains_key) for a writer that expects `key`
    /// to be absent: one validated walk (see
    /// [`get_handle_expecting_miss`](Self::get_handle_expecting_miss)).
    pub(crate) fn contains_key_expecting_miss<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let _guard = self.domain.read();
        self.lookup_validated(key).is_some()
    }

    /// Checks the red-black invariants, search order, parent links and the
    /// entry count. For tests; takes the writer lock.
    /// Reached through `__internals::seqtree::CheckInvariants`.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let _w = self.lock();
        let len = self.len();
        // SAFETY: writer lock held.
        let count = unsafe { self.root.check(0, len) }?;
        if count != len {
            return Err(format!("{count} nodes reachable but len is {len}"));
        }
        Ok(())
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn wrong_guard() -> ! {
    panic!("SeqTree: the guard is a read section of a different domain than the tree's")
}

impl<K, V, F> Default for SeqTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V, F> Drop for SeqTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    fn drop(&mut self) {
        let mut nodes = Vec::new();
        // SAFETY: `&mut self`: no writer can run.
        unsafe { self.root.collect(0, &mut nodes) };
        let mut batch = FreeBatch::new();
        for n in nodes {
            // SAFETY: `&mut self`: nothing else uses the tree's references,
            // which we give up here.
            unsafe { Node::drop_tree_ref(n, &mut batch) };
        }
        // Not freed at once: a reader may still hold `&V` from `get`, whose
        // lifetime is tied to its guard, not to the tree.
        batch.defer(&self.domain);
    }
}

impl<K, V, F> fmt::Debug for SeqTree<K, V, F>
where
    K: Ord + Send + fmt::Debug + 'static,
    V: Send + fmt::Debug + 'static,
    F: Flavor,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let guard = self.domain.read();
        f.debug_map().entries(self.iter(&guard)).finish()
    }
}
