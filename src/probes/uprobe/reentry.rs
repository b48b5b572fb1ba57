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
//! The flag is the uprobes' own (the scope and its rules are shared with
//! kprobes, in `probes::reentry`): kprobe and uprobe handlers nest into
//! each other at most once each (a uprobe handler may hit a kprobe, whose
//! handler may hit a uprobe, which then finds this flag up).

use crate::probes::reentry::{handler_flag, Flag};

handler_flag! {
    /// The uprobe family's re-entrancy flag.
    pub(crate) enum UprobeFlag;
}

/// Whether the calling thread is running uprobe handlers.
pub(crate) fn in_uprobe_handler() -> bool {
    UprobeFlag::is_up()
}

/// Marks the thread as running uprobe handlers; cleared on drop (also on
/// unwind).
pub(crate) type HandlerScope = crate::probes::reentry::HandlerScope<UprobeFlag>;
