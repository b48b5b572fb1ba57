//! A registry's locks, held across a `fork()`.
//!
//! The live runtime's fork handlers (`runtime/fork.rs`) take them before
//! the process forks and release them on both sides afterwards, as the C
//! library does for `malloc`: the child then never inherits a lock held by
//! a thread that does not exist there, nor state half-changed under one.
//! The order extends the registry's documented one (`mod.rs`, "Lock
//! order"): `reclaim_lock` → writer mutex → the deferred-free state's mutex
//! → (re-entrancy flag up) every instance-table stripe, in index order →
//! every kretprobe pool lock (stripe before pool is the order
//! `instances.rs` permits; nothing takes a mutex while holding a stripe or
//! a pool lock). The process-wide list of instance tables, which the
//! thread-exit flush holds while it takes a stripe, is taken before all of
//! them (`runtime/fork.rs`). Registry operations never call `fork`
//! themselves.

use std::collections::HashSet;
use std::sync::Arc;

pub(crate) use super::thread_exit::{hold_for_fork as hold_tables_for_fork, TablesHold};

use super::deferred::DeferredHold;
use super::instances::StripesHold;
use super::kretprobe::ReturnProbe;
use super::registry::{KprobeRegistry, Writer};
use super::unregister::Retired;
use crate::probes::arch::Arch;
use crate::probes::reentry::KprobeScope;
use crate::probes::text::TextMemory;
use crate::sync::MutexGuard;

/// A registry's locks, held; [`release`](Self::release) gives them back in
/// reverse order.
pub(crate) struct RegistryHold<'a> {
    /// Kretprobes whose pool lock is held (each once), kept alive here.
    pools: Vec<Arc<dyn ReturnProbe>>,
    stripes: StripesHold<'a>,
    scope: Option<KprobeScope>,
    deferred: DeferredHold<'a>,
    writer: MutexGuard<'a, Writer>,
    reclaim: MutexGuard<'a, ()>,
}

/// Every kretprobe whose pool a thread may touch: registered, unregistered
/// and not yet committed, or orphaned with calls in flight; each once.
fn return_probes(w: &Writer) -> Vec<Arc<dyn ReturnProbe>> {
    let registered = w
        .all_sites()
        .flat_map(|s| s.probes())
        .filter_map(|k| k.return_probe());
    let pending = w.pending.iter().filter_map(|r| match r {
        Retired::Probe(k) | Retired::MembersWith(_, k) => k.return_probe(),
        Retired::Return(r) => Some(r),
        Retired::Members(_) | Retired::Site(_) => None,
    });
    let mut seen = HashSet::new();
    registered
        .chain(pending)
        .chain(w.orphans.iter())
        .filter(|r| seen.insert(Arc::as_ptr(r).cast::<()>()))
        .cloned()
        .collect()
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
        // no stripe and no pool lock.
        let scope = KprobeScope::enter();
        let stripes = self.instances.hold_for_fork();
        let pools = return_probes(&writer);
        for p in &pools {
            p.lock_pool_for_fork();
        }
        RegistryHold {
            pools,
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
            pools,
            stripes,
            scope,
            deferred,
            writer,
            reclaim,
        } = self;
        for p in &pools {
            // SAFETY: `hold_for_fork` took each of these once, on this thread
            // (the child's only thread is the one that forked).
            unsafe { p.unlock_pool_after_fork() };
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
        // Last: dropping a kretprobe's last reference may free its pool.
        drop(pools);
    }
}

/// Whether this thread runs a probe handler (or a flush that took a
/// stripe): the fork handlers then take no lock.
pub(crate) fn in_probe_handler() -> bool {
    crate::probes::reentry::in_kprobe_handler()
}
