//! The write side of [`SeqTree`]: insert, replace, remove, bulk removal.
//!
//! Invariant: user code (`Ord`, `make`, `keep`) never runs while the sequence
//! count is odd, and nothing waits for a grace period while holding the writer
//! lock (a reader's fallback may be waiting for that lock).
//!
//! The protocol in full: [`crate::docs::algorithms::trees`].

use core::borrow::Borrow;

use super::entry::{EntryHandle, Node};
use super::rbtree::Slot;
use super::reclaim::FreeBatch;
use super::tree::SeqTree;
use crate::rcu::Flavor;
use crate::sync::atomic::Ordering;

impl<K, V, F> SeqTree<K, V, F>
where
    K: Ord + Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    /// Inserts `key → value`, or replaces the value of an existing key.
    ///
    /// Returns `None` if the key was absent. Inserting a new key never waits.
    ///
    /// # Replacing
    ///
    /// A present key's entry is replaced by a new entry holding `value`,
    /// published with a single store: concurrent readers find either the old
    /// or the new entry, never neither. A reader already holding `&V` to the
    /// old value keeps seeing it, unchanged, until its guard drops. `insert`
    /// then **waits for one grace period** of the tree's domain, after which
    /// no read section can still see the old value, and returns it.
    ///
    /// If [`EntryHandle`]s still pin the old entry, its value cannot be moved
    /// out: it stays with the handles (they keep seeing it; it is dropped
    /// after the last one goes) and `insert` returns `None` without waiting.
    ///
    /// # Panics
    ///
    /// When replacing, if called inside a read section of the tree's domain
    /// (waiting for a grace period there would deadlock).
    pub fn insert(&self, key: K, value: V) -> Option<V> {
        let w = self.lock();
        // SAFETY: writer lock held.
        match unsafe { self.root.search(0, &key) } {
            Slot::Vacant { parent, dir } => {
                let n = Node::alloc(key, value);
                let _s = self.seq.write();
                // SAFETY: writer lock held, slot fresh from `search`.
                unsafe { self.root.link(0, n, parent, dir) };
                // Relaxed: `len` is a statistic ordered by the lock.
                self.len.fetch_add(1, Ordering::Relaxed);
                None
            }
            Slot::Occupied(old) => {
                let new = Node::alloc(key, value);
                {
                    let _s = self.seq.write();
                    // SAFETY: writer lock held; `old` is linked, `new` is not,
                    // and their keys are equal.
                    unsafe { self.root.replace(0, old, new) };
                }
                // SAFETY: `old` is still referenced by the tree (released
                // just below), so it is allocated.
                let last = unsafe {
                    (*old).mark_unlinked();
                    (*old).release()
                };
                // Never wait for a grace period under the writer lock: a
                // reader inside its read section may be waiting for the lock
                // (fallback), which would deadlock.
                drop(w);
                if !last {
                    return None;
                }
                self.domain.synchronize();
                // SAFETY: the count is zero (no handle), `old` is unlinked and
                // a grace period has passed since, so we own it alone.
                Some(unsafe { Node::into_value(old) })
            }
        }
    }

    /// The value for `key`, inserting `make()` first if the key is absent.
    /// The reference is valid for as long as `guard` lives.
    ///
    /// The lookup is lock-free; only a miss takes the writer lock, and
    /// `make` runs under it (so it runs at most once, and only if this call
    /// inserts). `make` must not use this tree's write operations (deadlock).
    /// If `make` panics, the tree is unchanged.
    ///
    /// # Panics
    ///
    /// If `guard` is not a read section of the tree's domain instance.
    pub fn get_or_insert_with<'g>(
        &self,
        guard: &'g F::Guard<'_>,
        key: K,
        make: impl FnOnce() -> V,
    ) -> &'g V {
        self.check_guard(guard);
        let n = match self.lookup(&key) {
            Some(n) => n,
            None => self.find_or_link(key, make),
        };
        // SAFETY: `n` was found or linked while `guard`'s read section of the
        // tree's domain was open, so it is freed only after `'g`.
        unsafe { &(*n).value }
    }

    /// An owned handle to `key`'s entry, inserting `make()` first if the key
    /// is absent. As [`get_or_insert_with`](SeqTree::get_or_insert_with) and
    /// [`get_handle`](SeqTree::get_handle).
    pub fn get_or_insert_handle_with(
        &self,
        key: K,
        make: impl FnOnce() -> V,
    ) -> EntryHandle<K, V, F> {
        {
            let _guard = self.domain.read();
            if let Some(n) = self.lookup(&key) {
                // SAFETY: `n` was reached inside `_guard`'s open read section.
                if let Some(h) = unsafe { EntryHandle::try_new(n, &self.domain) } {
                    return h;
                }
                // Found while being removed: settle it under the lock.
                self.count_retry();
            }
        }
        self.insert_handle_with(key, make)
    }

    /// [`get_or_insert_handle_with`](Self::get_or_insert_handle_with) for a
    /// writer that just saw `key` absent (and whose own locking keeps other
    /// writers from inserting it): straight to the writer lock, one walk
    /// instead of up to three.
    pub(crate) fn insert_handle_with(
        &self,
        key: K,
        make: impl FnOnce() -> V,
    ) -> EntryHandle<K, V, F> {
        let _w = self.lock();
        let n = self.find_or_link_locked(key, make);
        // SAFETY: under the writer lock `n` is linked, so the tree's reference
        // keeps it allocated and its count above zero.
        unsafe { EntryHandle::try_new(n, &self.domain) }
            .expect("a linked entry always has a live reference count")
    }

    /// `key`'s node, linking a new one made by `make` if absent.
    fn find_or_link(&self, key: K, make: impl FnOnce() -> V) -> *mut Node<K, V> {
        let _w = self.lock();
        self.find_or_link_locked(key, make)
    }

    /// As `find_or_link`; the caller holds the writer lock.
    fn find_or_link_locked(&self, key: K, make: impl FnOnce() -> V) -> *mut Node<K, V> {
        // SAFETY: the caller holds the writer lock.
        match unsafe { self.root.search(0, &key) } {
            Slot::Occupied(n) => n,
            Slot::Vacant { parent, dir } => {
                let n = Node::alloc(key, make());
                let _s = self.seq.write();
                // SAFETY: writer lock held, slot fresh from `search`.
                unsafe { self.root.link(0, n, parent, dir) };
                // Relaxed: statistic ordered by the lock.
                self.len.fetch_add(1, Ordering::Relaxed);
                n
            }
        }
    }

    /// Removes `key`; returns whether it was present. Never waits.
    ///
    /// Readers that already hold `&V` (or an [`EntryHandle`]) keep seeing the
    /// value; it is dropped after the last handle is gone and a grace period
    /// has passed.
    pub fn remove<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let w = self.lock();
        // SAFETY: writer lock held.
        let n = match unsafe { self.root.search(0, key) } {
            Slot::Occupied(n) => n,
            Slot::Vacant { .. } => return false,
        };
        let mut batch = FreeBatch::new();
        // SAFETY: writer lock held; `n` is linked.
        unsafe { self.unlink(n, &mut batch) };
        drop(w);
        // Queued after unlocking: `call` may wait for the callback worker,
        // which waits for readers, which may wait for the lock.
        batch.defer(&self.domain);
        true
    }

    /// Unlinks `n` and drops the tree's reference; if it was the last one,
    /// the node joins `batch`.
    ///
    /// # Safety
    ///
    /// Writer lock held; `n` is linked.
    unsafe fn unlink(&self, n: *mut Node<K, V>, batch: &mut FreeBatch<Node<K, V>>) {
        {
            let _s = self.seq.write();
            // SAFETY: caller's contract.
            unsafe { self.root.erase(0, n) };
        }
        // Relaxed: statistic ordered by the lock.
        self.len.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `n` was just unlinked; the tree's reference is given up.
        unsafe { Node::drop_tree_ref(n, batch) };
    }

    /// Removes every entry for which `keep` returns `false`; returns how many
    /// were removed. Writers wait meanwhile; readers do not. Removed entries
    /// are reclaimed in one batch after one grace period.
    ///
    /// `keep` runs under the writer lock, on every entry in key order,
    /// before anything is removed: if it panics, the tree is unchanged.
    ///
    /// When most entries go, the tree is rebuilt from the ones that stay
    /// (one sequence-count write section: the tree emptied, then the kept
    /// nodes linked again in key order) instead of erasing the others one by
    /// one: unregistering every probe of a library removes thousands of
    /// entries and keeps a handful. Readers meanwhile see the entries that
    /// stay at some point of the section, so a miss is retried as for any
    /// write, and a hit is still a real entry (kept, or being removed).
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) -> usize {
        let w = self.lock();
        let mut nodes = Vec::with_capacity(self.len());
        let mut stays = Vec::with_capacity(self.len());
        // SAFETY: writer lock held: every node visited is linked and
        // allocated (asked while just reached: one pass over the nodes).
        unsafe {
            self.root.for_each_in_order(0, |n| {
                nodes.push(n);
                stays.push(keep(&(*n).key, &(*n).value));
            })
        };
        let kept = stays.iter().filter(|&&s| s).count();
        let gone = nodes.len() - kept;
        let mut batch = FreeBatch::with_capacity(gone);
        if kept < gone {
            {
                let _s = self.seq.write();
                // SAFETY: writer lock held; every node is relinked or
                // released below.
                unsafe { self.root.clear() };
                for (&n, _) in nodes.iter().zip(&stays).filter(|(_, &s)| s) {
                    // SAFETY: writer lock held; `n` is not linked any more
                    // (the tree was emptied) and the kept keys are distinct,
                    // linked in order.
                    unsafe {
                        if let Slot::Vacant { parent, dir } = self.root.search(0, &(*n).key) {
                            self.root.link(0, n, parent, dir);
                        }
                    }
                }
            }
            // Relaxed: statistic ordered by the lock.
            self.len.store(kept, Ordering::Relaxed);
            for (&n, _) in nodes.iter().zip(&stays).filter(|(_, &s)| !s) {
                // SAFETY: `n` is unlinked (not relinked above) and still holds
                // the tree's reference, given up here.
                unsafe { Node::drop_tree_ref(n, &mut batch) };
            }
        } else {
            for (&n, _) in nodes.iter().zip(&stays).filter(|(_, &s)| !s) {
                // SAFETY: writer lock held; each node is still linked (only
                // nodes of this list are unlinked, each once).
                unsafe { self.unlink(n, &mut batch) };
            }
        }
        drop(w);
        batch.defer(&self.domain);
        gone
    }

    /// Removes every entry, reclaimed in one batch after one grace period.
    pub fn clear(&self) {
        let w = self.lock();
        let mut nodes = Vec::with_capacity(self.len());
        // SAFETY: writer lock held.
        unsafe { self.root.collect(0, &mut nodes) };
        {
            let _s = self.seq.write();
            // SAFETY: writer lock held; the nodes are released below.
            unsafe { self.root.clear() };
        }
        // Relaxed: statistic ordered by the lock.
        self.len.store(0, Ordering::Relaxed);
        let mut batch = FreeBatch::new();
        for n in nodes {
            // SAFETY: each node is unlinked (root cleared) and still holds
            // the tree's reference, given up here.
            unsafe { Node::drop_tree_ref(n, &mut batch) };
        }
        drop(w);
        batch.defer(&self.domain);
    }
}
