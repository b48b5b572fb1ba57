//! Ordered maps with lock-free, RCU-protected lookups.
//!
//! # The structures
//!
//! - [`SeqCount`]: a sequence counter, the validation primitive on its own.
//! - [`SeqTree`]: a red-black tree. Writers are serialized by a lock and
//!   bump a sequence count around each change; readers walk the tree inside a
//!   read section of an RCU domain ([`Flavor`](crate::rcu::Flavor)) with no
//!   lock at all. [`EntryHandle`]s turn a found entry into an owned reference
//!   that outlives the read section.
//! - [`LatchTree`]: two copies of a red-black tree behind a sequence latch,
//!   for lookups that must never wait for a writer (signal handlers).
//!
//! # Lookups without locks
//!
//! A reader that walks a tree while a writer rotates it can be led astray: a
//! node it stands on may move above the key it wants. Three rules make this
//! harmless (the kernel's lockless rb-tree lookups follow the same idea):
//!
//! 1. *Nothing is freed under a reader.* Unlinked entries are reclaimed only
//!    after a grace period of the tree's domain, so every pointer a reader
//!    follows inside its read section points to a live node.
//! 2. *Every child-pointer store is a release store, ordered so the reader's
//!    graph never has a cycle* (see the red-black core for the exact orders).
//!    A walk is also cut off at twice the height any tree can have, so even a
//!    bug there would cost a retry, never a hang.
//! 3. *A hit is trusted, a miss is validated.* Keys never change, so a node
//!    whose key compares equal is a real entry: the first walk of a lookup
//!    does not even read the sequence count (hits stay off the cache line
//!    every write dirties). A miss may be false (the key moved above the
//!    reader), so it is redone between two reads of the sequence count and
//!    retried while writers overlap it; after a few failed attempts the
//!    reader takes the writer lock. Every lookup therefore finishes, and a
//!    key present throughout a lookup is always found.
//!
//! # Owned handles and the resurrection race
//!
//! An entry reached in a read section is only guaranteed to exist until the
//! section ends. [`SeqTree::get_handle`] pins it beyond that with an
//! *increment-unless-zero* on the entry's reference count. A plain increment
//! could bring a count back from zero after the entry's free was queued: the
//! handle would then outlive the entry. The crate can be built with that bug
//! (`--cfg rcu_registry_broken_inc`) only so that a loom model can show it
//! catches the race.
//!
//! # Choosing
//!
//! | | `SeqTree` | `LatchTree` |
//! |---|---|---|
//! | lookup | one walk; rare retries; lock as last resort | one walk per latch state; never waits |
//! | from a signal handler that interrupted a writer | may deadlock | safe |
//! | write cost | one rebalance | two rebalances |
//! | memory per entry | key, value, one set of links, refcount | key, value, two sets of links |
//! | owned handles, scans | yes | no |

pub mod entry;
pub mod iter;
pub mod latch;
mod rbcheck;
mod rbtree;
mod reclaim;
pub mod seqcount;
mod tree;
mod write;

#[cfg(any(test, loom))]
pub(crate) mod model_domain;

pub use entry::EntryHandle;
pub use iter::{Iter, Range};
pub use latch::LatchTree;
pub use seqcount::{SeqCount, SeqWriteGuard, WriteInProgress};
pub use tree::{Busy, ReadStats, SeqTree};

#[cfg(all(test, not(loom)))]
mod tests;
