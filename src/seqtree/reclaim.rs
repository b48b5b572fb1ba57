//! Deferred, batched reclamation of unlinked nodes.
//!
//! Invariant: an unlinked node is freed only by a callback queued through the
//! domain's [`Flavor::call`], so never under a reader; operations that unlink
//! many nodes gather them in one [`FreeBatch`]. Under `--cfg loom` a freed node
//! is poisoned, not deallocated, so a use-after-free becomes an assertion.
//!
//! Why deferred, why batched, and the loom poisoning, in full:
//! [`crate::docs::algorithms::callbacks`].

use core::ptr::NonNull;

use crate::rcu::Flavor;

/// A node type that owns a heap allocation and knows how to free it.
pub(crate) trait OwnedNode: Sized {
    /// Frees the node (drops its key and value).
    ///
    /// # Safety
    ///
    /// `node` came from `Box::into_raw`, is unreachable for every reader (a
    /// grace period has passed since it was unlinked, or nobody ever saw it)
    /// and is not used afterwards.
    unsafe fn free(node: *mut Self);
}

/// Unlinked nodes waiting to be freed together after one grace period.
pub(crate) struct FreeBatch<N: OwnedNode> {
    nodes: Vec<NonNull<N>>,
}

// SAFETY: the batch exclusively owns its nodes (they are unlinked and no
// handle refers to them), so sending it sends the nodes' keys and values:
// fine exactly when the node type is `Send`.
unsafe impl<N: OwnedNode + Send> Send for FreeBatch<N> {}

impl<N: OwnedNode> FreeBatch<N> {
    pub(crate) fn new() -> Self {
        FreeBatch { nodes: Vec::new() }
    }

    /// Room for `n` nodes (a bulk removal knows how many go).
    pub(crate) fn with_capacity(n: usize) -> Self {
        FreeBatch {
            nodes: Vec::with_capacity(n),
        }
    }

    /// Adds `node` to the batch.
    ///
    /// # Safety
    ///
    /// `node` is unlinked and owned by nobody else (its last reference was
    /// dropped); it is freed by the batch.
    pub(crate) unsafe fn push(&mut self, node: *mut N) {
        if let Some(n) = NonNull::new(node) {
            self.nodes.push(n);
        }
    }

    /// Frees every node after a grace period of `domain`, in one callback.
    /// Does nothing (queues nothing) for an empty batch.
    pub(crate) fn defer<F: Flavor>(self, domain: &F)
    where
        N: Send + 'static,
    {
        if self.nodes.is_empty() {
            return;
        }
        let batch = self;
        // SAFETY: the callback runs after a grace period that began after
        // every node was unlinked (push contract), so no reader can reach
        // them any more.
        domain.call(move || unsafe { batch.free_now() });
    }

    /// Frees every node now.
    ///
    /// # Safety
    ///
    /// No reader can reach any node of the batch (a grace period has passed
    /// since they were unlinked, or nobody ever saw them).
    pub(crate) unsafe fn free_now(self) {
        for n in self.nodes {
            // SAFETY: the caller guarantees unreachability; the push contract
            // guarantees sole ownership, so each node is freed exactly once.
            unsafe { N::free(n.as_ptr()) };
        }
    }
}
