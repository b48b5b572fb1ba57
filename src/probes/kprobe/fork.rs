//! A registry's writer-side locks, held across a `fork()`.
//!
//! The live runtime's fork handlers (`runtime/fork.rs`) take them before
//! the process forks and release them on both sides afterwards, as the C
//! library does for `malloc`: the child then never inherits a lock held by
//! a thread that does not exist there, nor the writer state half-changed.
//! The order is the registry's documented one (`mod.rs`, "Lock order"):
//! `reclaim_lock` → writer mutex → the deferred-free state's mutex.
//! Registry operations never call `fork` themselves.

pub(crate) use super::thread_exit::{hold_for_fork as hold_tables_for_fork, TablesHold};

use super::deferred::DeferredHold;
use super::registry::{KprobeRegistry, Writer};
use crate::probes::arch::Arch;
use crate::probes::text::TextMemory;
use crate::sync::MutexGuard;

/// A registry's locks, held; drop (parent) or
/// [`after_fork_in_child`](Self::after_fork_in_child) releases them, in
/// reverse order.
pub(crate) struct RegistryHold<'a> {
    // Fields drop in declaration order: the innermost lock first.
    deferred: DeferredHold<'a>,
    _writer: MutexGuard<'a, Writer>,
    _reclaim: MutexGuard<'a, ()>,
}

impl<A: Arch, T: TextMemory> KprobeRegistry<A, T> {
    /// Takes the registry's writer-side locks in their documented order.
    /// Waits for a writer under way to finish (which may wait for a grace
    /// period or a quiescence round: the caller must not be in an `Rcu`
    /// read section).
    pub(crate) fn hold_for_fork(&self) -> RegistryHold<'_> {
        let reclaim = self.reclaim_lock.lock().unwrap_or_else(|e| e.into_inner());
        let writer = self.lock_writer();
        RegistryHold {
            deferred: self.deferred.hold_for_fork(),
            _writer: writer,
            _reclaim: reclaim,
        }
    }
}

impl RegistryHold<'_> {
    /// In the child (one thread, ours): fixes the state threads that did
    /// not survive left behind, then releases the locks.
    pub(crate) fn after_fork_in_child(self) {
        let RegistryHold {
            deferred,
            _writer,
            _reclaim,
        } = self;
        deferred.after_fork_in_child();
        drop(_writer);
        drop(_reclaim);
    }
}
