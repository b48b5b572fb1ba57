//! The uprobe re-entrancy guard: a per-thread flag raised while uprobe
//! handlers run.
//!
//! # Why
//!
//! A consumer's handler, filter or return handler is user code: it may call
//! a function that carries a uprobe (a logging helper, a probed allocator).
//! Running that nested hit's handlers would recurse, possibly without end,
//! and would touch the thread's return-instance stack while the outer hit
//! is in the middle of changing it. So a hit (or a return) on a thread whose
//! flag is up runs no user code: it counts `nmissed` on the uprobe and
//! completes the displaced instruction (a return still goes back to the
//! real return address).
//!
//! # The flag goes up first
//!
//! The same discipline as the kprobe hit path (`kprobe/hit.rs`), for the
//! same reason: every uprobe hit-path entry raises the flag before it
//! touches the thread's return instances, so a signal handler that
//! interrupts the thread there and runs probed code finds the flag up and
//! stays away. A nested hit never runs a filter either (a filter that hit
//! a uprobe would recurse through the miss path otherwise).
//!
//! The flag is the uprobes' own: kprobe and uprobe handlers nest into each
//! other at most once each (a uprobe handler may hit a kprobe, whose
//! handler may hit a uprobe, which then finds this flag up). The kprobe
//! flag is private to its module; the mechanism (a `const` thread-local
//! `Cell`, an RAII scope cleared also on unwind) is the same.

use std::cell::Cell;

// `std::cell::Cell`, not a shim type: the flag is only ever touched by its
// own thread (and signal handlers on it), never shared, so there is nothing
// for loom to check; the thread-local itself comes from the shim.
crate::sync::const_thread_local! {
    /// Set while this thread runs uprobe handlers.
    static IN_UPROBE_HANDLER: Cell<bool> = Cell::new(false);
}

/// Whether the calling thread is running uprobe handlers.
pub(crate) fn in_uprobe_handler() -> bool {
    IN_UPROBE_HANDLER.with(Cell::get)
}

/// Marks the thread as running uprobe handlers; cleared on drop (also on
/// unwind).
pub(crate) struct HandlerScope(());

impl HandlerScope {
    /// `None` if the thread already runs uprobe handlers (a re-entered hit).
    #[inline]
    pub(crate) fn enter() -> Option<HandlerScope> {
        IN_UPROBE_HANDLER.with(|f| {
            if f.get() {
                None
            } else {
                // A signal between the test and the set runs its own scope
                // to completion (set, clear) before we resume: still correct.
                f.set(true);
                Some(HandlerScope(()))
            }
        })
    }
}

impl Drop for HandlerScope {
    #[inline]
    fn drop(&mut self) {
        IN_UPROBE_HANDLER.with(|f| f.set(false));
    }
}
