//! Giving back the kretprobe instances of threads that will never return
//! through their tracked calls: at thread exit, and on request.
//!
//! # The leak it closes
//!
//! An instance goes back to its pool when its call returns into the
//! trampoline, or when a return above it on the same thread finds it
//! abandoned (`instances.rs`). A thread that exits while inside a
//! kretprobed function (`pthread_exit`, cancellation, a panic that ends the
//! thread) or jumps out of it (`longjmp`) and never returns through a
//! tracked frame above would keep its instances forever: the pool shrinks
//! for good, later calls count `nmissed`, and an unregistered kretprobe's
//! orphaned pool is never freed. Worse, a [`ThreadKey`] is the address of
//! thread-local memory, reused by later threads, whose returns could then
//! match the dead thread's stale frames.
//!
//! # Explicit flushes
//!
//! [`KprobeRegistry::flush_thread`] gives back every instance of one
//! thread; [`KprobeRegistry::flush_abandoned_frames`] those of the calling
//! thread whose calls would return at or below a stack pointer (after a
//! `longjmp` to a frame with that stack pointer, every call tracked deeper
//! is abandoned, and every call still live encloses the frame, so returns
//! above it).
//!
//! # At thread exit
//!
//! A POSIX thread-specific key (`probes/exit_key.rs`), created once when
//! the first registry is built, carries a destructor that flushes the
//! exiting thread from every live registry's instance table. A thread arms
//! it the first time it files an instance (`pthread_setspecific` with a
//! non-null value; the same signal-safety caveat as the RCU reader slots
//! applies: glibc stores it without allocating for the process's first 32
//! keys). The live tables are listed in a process-wide, mutex-guarded list.
//! (Should the key not be creatable, the process being out of keys, threads
//! are not flushed at exit; the explicit flushes still work.) A registry
//! removes its table from the list, under that mutex, before it frees
//! anything; a destructor flushes while holding the mutex. So every table,
//! instance and pool a destructor touches is alive.
//!
//! # Lock order
//!
//! list mutex → one instance-table stripe (released before the instances
//! go back to their lock-free pools, `instances.rs`). The hit path never takes the list mutex; a registry's drop
//! takes it alone, before any other lock. As on every path that takes a
//! stripe, the thread's re-entrancy flag goes up first (`hit.rs`), so a
//! signal handler running probed code during the flush takes no stripe.
//!
//! # Orphans
//!
//! An instance of an unregistered kretprobe goes back to its orphaned pool
//! like any other; the registry frees the pool once every instance is back
//! (checked at its next operation, e.g. [`KprobeRegistry::orphans`]).

use super::instances::{InstanceTable, Taken};
use super::registry::KprobeRegistry;
use super::this_thread::{KprobeScope, ThisThread, ThreadKey};
use crate::probes::arch::Arch;
use crate::probes::text::TextMemory;

/// Gives every instance of `taken` back to its pool; returns how many.
fn recycle_all(mut taken: Taken) -> usize {
    let mut n = 0;
    while let Some((inst, _frame)) = taken.pop() {
        // SAFETY: a taken instance is ours and out of its pool, so its owner
        // lives until we put it back (which is the last use of it here).
        unsafe { inst.as_ref().owner().recycle(inst) };
        n += 1;
    }
    n
}

impl InstanceTable {
    /// Gives back `thread`'s instances whose calls return at or below `sp`.
    pub(crate) fn flush(&self, thread: ThreadKey, sp: u64) -> usize {
        // Before the stripe (module docs, "Lock order"). Already up when
        // called from a handler: then it stays up, as the caller's scope
        // wants.
        let _scope = KprobeScope::enter();
        recycle_all(self.take_thread(thread, sp))
    }
}

impl<A: Arch, T: TextMemory> KprobeRegistry<A, T> {
    /// Gives back to their pools every kretprobe instance filed for
    /// `thread`, and returns how many there were. No return handler runs.
    ///
    /// Threads that *exit* are flushed automatically (module docs); this is
    /// for a runtime that learns another way that a thread abandoned its
    /// frames, e.g. a thread about to be cancelled or reused.
    ///
    /// **CALL IT ONLY FOR A THREAD THAT WILL NEVER RETURN THROUGH ANY OF ITS
    /// TRACKED CALLS.** A tracked call that returns after the flush lands in
    /// the trampoline with nothing left to say where it came from
    /// ([`on_return`](Self::on_return) answers `NotOurs`), and the runtime
    /// cannot resume it.
    pub fn flush_thread(&self, thread: ThreadKey) -> usize {
        self.instances.flush(thread, u64::MAX)
    }

    /// Gives back the calling thread's kretprobe instances whose calls
    /// would return with a stack pointer at or below `sp`, and returns how
    /// many there were: after a `longjmp` (or a similar non-local exit) to a
    /// frame whose stack pointer is `sp`, every call tracked deeper was
    /// abandoned, while every call still live encloses that frame and
    /// returns above it. No return handler runs.
    ///
    /// **`sp` MUST BE THE STACK POINTER OF A FRAME THE THREAD IS NOW RUNNING
    /// IN, AFTER THE JUMP.** A higher value gives back instances of calls
    /// that are still live, whose returns then cannot be resumed (see
    /// [`flush_thread`](Self::flush_thread)).
    pub fn flush_abandoned_frames(&self, sp: u64) -> usize {
        self.instances.flush(ThreadKey::current(), sp)
    }
}

/// Adds `table` to the tables flushed at thread exit. `table` must stay at
/// its address until [`untrack`] (the registry boxes it).
pub(crate) fn track(table: &InstanceTable) {
    #[cfg(not(loom))]
    hook::track(table);
    #[cfg(loom)]
    let _ = table;
}

/// Removes `table` from the tables flushed at thread exit, waiting for any
/// flush in progress. Called first thing when a registry is dropped.
pub(crate) fn untrack(table: &InstanceTable) {
    #[cfg(not(loom))]
    hook::untrack(table);
    #[cfg(loom)]
    let _ = table;
}

/// Makes sure the calling thread is flushed when it exits. Called on the
/// hit path after filing an instance: a thread-local test, and once per
/// thread a `pthread_setspecific`.
#[inline]
pub(crate) fn arm(me: ThisThread) {
    #[cfg(not(loom))]
    hook::arm(me);
    #[cfg(loom)]
    let _ = me;
    // Under loom there is no thread-exit hook (a thread-local destructor of
    // a model thread would run after the execution's objects are gone); the
    // models call the explicit flush.
}

#[cfg(not(loom))]
pub(crate) use hook::{hold_for_fork, TablesHold};

#[cfg(not(loom))]
mod hook {
    use super::super::instances::InstanceTable;
    use super::ThisThread;
    use crate::probes::exit_key::ExitKey;
    use crate::sync::Mutex;

    /// A tracked table.
    struct TablePtr(*const InstanceTable);

    // SAFETY: the pointer is only dereferenced under `TABLES`, and a table
    // is removed under `TABLES` before it is freed; `InstanceTable` is Sync.
    unsafe impl Send for TablePtr {}

    /// Every live registry's instance table.
    static TABLES: Mutex<Vec<TablePtr>> = Mutex::new(Vec::new());

    /// The thread-exit key, created by the first `track`.
    static KEY: ExitKey = ExitKey::new();

    fn tables() -> crate::sync::MutexGuard<'static, Vec<TablePtr>> {
        // Every critical section pushes, removes or reads whole entries: a
        // panic elsewhere cannot leave the list half-changed.
        TABLES.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key's destructor: flushes the exiting thread from every tracked
    /// table.
    ///
    /// # Safety
    /// Called by the C library at thread exit, on the exiting thread, with
    /// the value that thread stored (never dereferenced).
    unsafe extern "C" fn flush_on_exit(_value: *mut libc::c_void) {
        // The value is only a marker. A const thread-local without
        // destructor stays accessible this late in thread exit.
        let me = ThisThread::get();
        me.block().exit_armed.set(false);
        let thread = me.key();
        let tables = tables();
        for t in tables.iter() {
            // SAFETY: tracked tables are alive while listed, and we hold the
            // list (module docs, "At thread exit").
            let table = unsafe { &*t.0 };
            table.flush(thread, u64::MAX);
        }
    }

    /// The list's mutex, held across a `fork` (`fork.rs`): no flush is under
    /// way when the process forks, and the child's list is unlocked.
    pub(crate) struct TablesHold {
        _guard: crate::sync::MutexGuard<'static, Vec<TablePtr>>,
    }

    /// Takes the list's mutex for the fork handlers.
    pub(crate) fn hold_for_fork() -> TablesHold {
        TablesHold { _guard: tables() }
    }

    pub(super) fn track(table: &InstanceTable) {
        KEY.prepare(flush_on_exit);
        tables().push(TablePtr(table));
    }

    pub(super) fn untrack(table: &InstanceTable) {
        let me: *const InstanceTable = table;
        tables().retain(|t| !std::ptr::eq(t.0, me));
    }

    #[inline]
    pub(super) fn arm(me: ThisThread) {
        // The flag is the block's (`this_thread.rs`): whether this thread
        // set the key (its exit will flush it).
        let armed = &me.block().exit_armed;
        if !armed.get() && KEY.arm() {
            armed.set(true);
        }
    }
}
