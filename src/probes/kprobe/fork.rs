//! A registry's locks, held across a `fork()`.
//!
//! The live runtime's fork handlers (`runtime/fork.rs`) take them before
//! the process forks and release them on both sides afterwards, as the C
//! library does for `malloc`: the child then never inherits a lock held by
//! a thread that does not exist there, nor state half-changed under one.
//! The order extends the registry's documented one (`mod.rs`, "Lock
//! order"): `reclaim_lock` → writer mutex → the deferred-free state's mutex
//! → (re-entrancy flag up) every instance-table stripe, in index order
//! (nothing takes a mutex while holding a stripe). The kretprobe pools
//! are lock-free bitmaps, always consistent: nothing to hold
//! (`kretprobe.rs`). The process-wide list of instance tables, which the
//! thread-exit flush holds while it takes a stripe, is taken before all of
//! them (`runtime/fork.rs`). Registry operations never call `fork`
//! themselves.

pub(crate) use super::thread_exit::{hold_for_fork as hold_tables_for_fork, TablesHold};

use super::deferred::DeferredHold;
use super::instances::StripesHold;
use super::registry::{KprobeRegistry, Writer};
use super::this_thread::KprobeScope;
use crate::probes::arch::Arch;
use crate::probes::text::TextMemory;
use crate::sync::MutexGuard;

/// A registry's locks, held; [`release`](Self::release) gives them back in
/// reverse order.
pub(crate) struct RegistryHold<'a> {
    stripes: StripesHold<'a>,
    scope: Option<KprobeScope>,
    deferred: DeferredHold<'a>,
    writer: MutexGuard<'a, Writer>,
    reclaim: MutexGuard<'a, ()>,
}

impl<A: Arch, T: TextMemory> KprobeRegistry<A, T> {
    /// Takes the registry's locks in the order of the module docs. Waits for
    /// a writer under way to finish (which may wait for a grace period or a
    /// quiescence round: the caller must be in no `Rcu` read section and
    /// run no probe handler).
    pub(crate) fn hold_for_fork(&self) -> RegistryHold<'_> {
        let reclaim = self.reclaim_lock.lock().unwrap_or_else(|e| e.into_inner());
        let writer = self.lock_writer();
        let deferred = self.deferred.hold_for_fork();
        // Up before the first stripe, as on every path that takes one: a
        // signal handler on this thread running kretprobed code then takes
        // no stripe.
        let scope = KprobeScope::enter();
        let stripes = self.instances.hold_for_fork();
        RegistryHold {
            stripes,
            scope,
            deferred,
            writer,
            reclaim,
        }
    }
}

impl RegistryHold<'_> {
    /// Releases the locks, innermost first. In the child (one thread, ours)
    /// it first clears what threads that did not survive left behind.
    pub(crate) fn release(self, in_child: bool) {
        let RegistryHold {
            stripes,
            scope,
            deferred,
            writer,
            reclaim,
        } = self;
        if in_child {
            stripes.forget_other_threads();
        }
        drop(stripes);
        drop(scope);
        if in_child {
            deferred.after_fork_in_child();
        } else {
            drop(deferred);
        }
        drop(writer);
        drop(reclaim);
    }
}

/// Whether this thread runs a probe handler (or a flush that took a
/// stripe): the fork handlers then take no lock.
pub(crate) fn in_probe_handler() -> bool {
    super::this_thread::in_kprobe_handler()
}
