//! Tree entries and owned handles to them.
//!
//! # One allocation per entry
//!
//! An entry is one heap node holding its tree links, key, value and a
//! reference count. The hot fields of a lookup (the two child pointers and
//! the key) come first, so a lookup step usually touches one cache line.
//!
//! # Who holds references
//!
//! The tree holds one reference for as long as the entry is linked; every
//! [`EntryHandle`] holds one more. Unlinking drops the tree's reference at
//! once. The entry is freed when the count reaches zero, and even then only
//! after a grace period of the tree's domain (see `reclaim`), because lock-free
//! readers inside a read section may still be standing on it.
//!
//! # `inc_not_zero`, and the race it prevents
//!
//! A reader that finds an entry inside its read section may turn it into a
//! handle that outlives the section. It must do so with an *increment unless
//! zero*: a count of zero means the last reference is gone and the entry's
//! free is already queued behind the grace period that the reader's own read
//! section is holding up. A plain increment would move the count from 0 to 1
//! on such an entry; the reader would then leave its read section, the grace
//! period would end, the entry would be freed, and the reader would keep a
//! handle to freed memory (and free it a second time when dropping it). This
//! is the race found in the 2024 review of RCU-ified uprobe lookups.
//!
//! A failed `inc_not_zero` means the entry was removed (or replaced) while the
//! reader looked at it; the lookup is then simply redone.
//!
//! The crate carries the broken plain increment behind the
//! `rcu_registry_broken_inc` cfg, used only to prove that the loom model in
//! `loom-tests/tests/seqtree_handles.rs` catches this race.

use core::fmt;
use core::ops::Deref;
use core::ptr::NonNull;

use super::rbtree::{Balance, Children, RbNode};
use super::reclaim::{FreeBatch, OwnedNode};
use crate::rcu::{Flavor, Rcu};
#[cfg(loom)]
use crate::sync::atomic::AtomicBool;
use crate::sync::atomic::{fence, AtomicUsize, Ordering};

/// Counts above this abort the process (as `Arc` does): handles leaked in a
/// loop must not be able to wrap the count around to zero.
const MAX_REFS: usize = isize::MAX as usize;

/// A [`SeqTree`](super::SeqTree) entry.
#[repr(C)]
pub(crate) struct Node<K, V> {
    /// First: the child pointers a lookup follows.
    children: Children<Node<K, V>>,
    /// Right after them: compared at every lookup step.
    pub(crate) key: K,
    pub(crate) value: V,
    /// Writer-only, off the lookup path, except `balance.node_flag`, which
    /// is the entry's *linked* flag: cleared when the tree unlinks the entry;
    /// a hint for handle holders (kept in `Balance`'s padding, see there).
    balance: Balance<Node<K, V>>,
    /// The tree's reference (while linked) plus one per handle.
    refs: AtomicUsize,
    /// Set when a loom build poisons a freed node (see `reclaim`).
    #[cfg(loom)]
    freed: AtomicBool,
}

// SAFETY: `children`/`balance` return the node's only link fields (the tree
// uses copy 0) and the key is never mutated after construction.
unsafe impl<K: Ord, V> RbNode for Node<K, V> {
    type Key = K;

    #[inline(always)]
    fn children(&self, _copy: usize) -> &Children<Self> {
        &self.children
    }

    #[inline(always)]
    fn balance(&self, _copy: usize) -> &Balance<Self> {
        &self.balance
    }

    #[inline(always)]
    fn key(&self) -> &K {
        &self.key
    }
}

impl<K, V> Node<K, V> {
    /// A new unlinked node holding the tree's reference.
    pub(crate) fn alloc(key: K, value: V) -> *mut Self {
        Box::into_raw(Box::new(Node {
            children: Children::new(),
            key,
            value,
            balance: Balance::new(true),
            refs: AtomicUsize::new(1),
            #[cfg(loom)]
            freed: AtomicBool::new(false),
        }))
    }

    /// Takes a reference unless the count is zero (`inc_not_zero`).
    #[cfg(not(rcu_registry_broken_inc))]
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        // Relaxed loads and CAS: the node's memory is kept alive by the
        // caller's read section while we look, and the count's own
        // modification order decides the race with the last `release` (a
        // CAS from n >= 1 is either before the decrement to zero, or fails).
        // Nothing is published through a successful increment.
        let mut n = self.refs.load(Ordering::Relaxed);
        loop {
            if n == 0 {
                // Acquire fence: pairs with the release decrement that
                // reached zero, which the tree made after unlinking the node.
                // The caller's next walk therefore cannot reach this node
                // again (nor validate a miss against a stale count), so a
                // retry loop ends. Without it a retry could keep finding the
                // same dying node through stale pointers.
                fence(Ordering::Acquire);
                return false;
            }
            if n >= MAX_REFS {
                std::process::abort();
            }
            match self
                .refs
                .compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
    }

    /// DELIBERATELY BROKEN: a plain increment that resurrects a zero count.
    /// Compiled only under `--cfg rcu_registry_broken_inc`, for the loom
    /// model that must catch it. Never use this configuration otherwise.
    #[cfg(rcu_registry_broken_inc)]
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        // Relaxed: mirrors the correct variant; the bug is the missing zero
        // check, not the ordering.
        self.refs.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes one more reference when the caller already holds one.
    #[inline]
    fn acquire_another(&self) {
        // Relaxed, as in `Arc::clone`: the caller's reference keeps the count
        // above zero, so no decision depends on this increment's ordering.
        if self.refs.fetch_add(1, Ordering::Relaxed) >= MAX_REFS {
            std::process::abort();
        }
    }

    /// Drops one reference; `true` if it was the last (the caller must then
    /// queue the node for reclamation).
    #[inline]
    pub(crate) fn release(&self) -> bool {
        // Release: every use of the entry by this reference holder happens
        // before the decrement. The acquire fence below, run only by the last
        // holder, pairs with it, so all uses happen before the free. Relaxed
        // would let the free race with another holder's last read.
        if self.refs.fetch_sub(1, Ordering::Release) != 1 {
            return false;
        }
        fence(Ordering::Acquire);
        true
    }

    /// Marks the entry unlinked (the tree's reference is about to go).
    #[inline]
    pub(crate) fn mark_unlinked(&self) {
        // Relaxed: a hint for handle holders, not a synchronisation point.
        self.balance.node_flag.store(false, Ordering::Relaxed);
    }

    /// Marks `node` unlinked and drops the tree's reference to it; if that
    /// was the last reference, `node` joins `batch`.
    ///
    /// # Safety
    ///
    /// `node` is unlinked from the tree (or the tree is being dropped) and
    /// the caller gives up the tree's reference, which keeps it allocated
    /// until this call. The caller must not touch `node` afterwards.
    pub(crate) unsafe fn drop_tree_ref(node: *mut Self, batch: &mut FreeBatch<Self>) {
        // SAFETY: the tree's reference keeps `node` allocated until the
        // release; after a non-final release it is not touched again.
        unsafe {
            (*node).mark_unlinked();
            if (*node).release() {
                batch.push(node);
            }
        }
    }

    /// Moves the value out of a node nobody else can reach, freeing the rest.
    ///
    /// # Safety
    ///
    /// `node` came from [`Node::alloc`], its count is zero and no reader can
    /// reach it any more (a grace period has passed since it was unlinked).
    pub(crate) unsafe fn into_value(node: *mut Self) -> V {
        // SAFETY: the caller guarantees sole ownership of a Box allocation.
        let node = unsafe { Box::from_raw(node) };
        node.value
    }

    #[cfg(loom)]
    fn assert_live(&self) {
        // SeqCst: model-checking aid only; the strongest ordering lets loom
        // report every interleaving in which the poison is visible.
        assert!(
            !self.freed.load(Ordering::SeqCst),
            "use after free: a handle outlived its entry (refcount resurrected from zero?)"
        );
    }
}

impl<K, V> OwnedNode for Node<K, V> {
    unsafe fn free(node: *mut Self) {
        #[cfg(not(loom))]
        {
            // SAFETY: `OwnedNode::free` contract: a Box allocation that nobody
            // can reach any more.
            drop(unsafe { Box::from_raw(node) });
        }
        #[cfg(loom)]
        {
            // SAFETY: as above; the memory is poisoned instead of freed, so it
            // stays valid for the assertions below and in `assert_live`.
            unsafe {
                // SeqCst: model-checking aid (see `assert_live`).
                assert!(
                    !(*node).freed.swap(true, Ordering::SeqCst),
                    "entry freed twice: a reference count was resurrected from zero"
                );
                core::ptr::drop_in_place(core::ptr::addr_of_mut!((*node).key));
                core::ptr::drop_in_place(core::ptr::addr_of_mut!((*node).value));
            }
        }
    }
}

/// An owned reference to a [`SeqTree`](super::SeqTree) entry that outlives
/// the read section it was obtained in.
///
/// Obtained with [`SeqTree::get_handle`](super::SeqTree::get_handle), which
/// succeeds only while the entry is live (`inc_not_zero`; see the
/// [module docs](self)). The handle keeps the key and value alive even after
/// the entry is removed from the tree; the entry is reclaimed after the last
/// handle is dropped and a grace period has passed.
pub struct EntryHandle<K, V, F = Rcu>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    node: NonNull<Node<K, V>>,
    domain: F,
}

// SAFETY: like `Arc<(K, V)>`: the handle hands out `&K`/`&V` on whichever
// thread holds it (needs Sync) and may free the entry there (needs Send).
unsafe impl<K, V, F> Send for EntryHandle<K, V, F>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
    F: Flavor,
{
}

// SAFETY: `&EntryHandle` hands out `&K`/`&V` (Sync) and can be cloned and the
// clone dropped on another thread, freeing the entry there (Send).
unsafe impl<K, V, F> Sync for EntryHandle<K, V, F>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
    F: Flavor,
{
}

impl<K, V, F> EntryHandle<K, V, F>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    /// Takes a handle to `node` unless its count already reached zero.
    ///
    /// # Safety
    ///
    /// `node` is a node of a tree reclaimed through `domain`, reached inside
    /// a read section of `domain` that is still open (or under the tree's
    /// writer lock while linked).
    #[inline]
    pub(crate) unsafe fn try_new(node: *mut Node<K, V>, domain: &F) -> Option<Self> {
        // SAFETY: the open read section keeps the node allocated.
        let live = unsafe { (*node).try_acquire() };
        if !live {
            return None;
        }
        Some(EntryHandle {
            // SAFETY: nodes come from Box::into_raw, never null.
            node: unsafe { NonNull::new_unchecked(node) },
            domain: domain.clone(),
        })
    }

    #[inline]
    fn node(&self) -> &Node<K, V> {
        // SAFETY: this handle's reference keeps the node from being freed.
        let node = unsafe { self.node.as_ref() };
        #[cfg(loom)]
        node.assert_live();
        node
    }

    /// The entry's key.
    #[inline]
    pub fn key(&self) -> &K {
        &self.node().key
    }

    /// The entry's value.
    #[inline]
    pub fn value(&self) -> &V {
        &self.node().value
    }

    /// Whether the entry is still in its tree. A hint: it can be removed
    /// right after this returns `true`.
    #[inline]
    pub fn is_linked(&self) -> bool {
        // Relaxed: a hint (see `mark_unlinked`).
        self.node().balance.node_flag.load(Ordering::Relaxed)
    }
}

impl<K, V, F> Deref for EntryHandle<K, V, F>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    type Target = V;

    #[inline]
    fn deref(&self) -> &V {
        self.value()
    }
}

impl<K, V, F> Clone for EntryHandle<K, V, F>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    fn clone(&self) -> Self {
        self.node().acquire_another();
        EntryHandle {
            node: self.node,
            domain: self.domain.clone(),
        }
    }
}

impl<K, V, F> Drop for EntryHandle<K, V, F>
where
    K: Send + 'static,
    V: Send + 'static,
    F: Flavor,
{
    fn drop(&mut self) {
        if self.node().release() {
            // Last reference: the tree already unlinked the entry, but a
            // reader may still be standing on it, so free after a grace
            // period.
            let mut batch = FreeBatch::new();
            // SAFETY: the count reached zero, so nobody else owns the node
            // and `try_acquire` can no longer succeed on it; it is unlinked
            // because the tree's own reference is gone.
            unsafe { batch.push(self.node.as_ptr()) };
            batch.defer(&self.domain);
        }
    }
}

impl<K, V, F> fmt::Debug for EntryHandle<K, V, F>
where
    K: Send + fmt::Debug + 'static,
    V: Send + fmt::Debug + 'static,
    F: Flavor,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryHandle")
            .field("key", self.key())
            .field("value", self.value())
            .field("linked", &self.is_linked())
            .finish()
    }
}
