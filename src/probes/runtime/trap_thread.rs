//! The runtime's per-thread trap state, in one thread-local reached once
//! per trap.
//!
//! What the SIGTRAP handler keeps per thread (the trap flag and the
//! recorded `errno` location of `in_trap.rs`, the single-steps in flight
//! and the recent boosted runs of `dispatch.rs`) lives in one
//! [`TrapThread`], a `const` thread-local without a destructor, not four.
//! The handler reaches it once, on entry, and hands it down the trap path
//! (`signal.rs`, `dispatch.rs`, `live.rs`): every further use is a load or
//! store at a fixed offset from that one address. Each thread-local access
//! of the trap path (a settled [`TrapLocal`](crate::sync::TrapLocal): the
//! offset's load, its check, the thread pointer) cost an emulated arm64
//! hit about six instructions; three of them per hit went this way.
//!
//! The fields keep their owners' rules: the flag and `errno` are
//! `in_trap.rs`'s, the step stack and the boost ring `dispatch.rs`'s, which
//! say who touches them and when. Code outside the handler (the return
//! trampolines, the jump detours, the fault handlers) reaches the block
//! itself with [`with`].

use std::cell::Cell;

use super::dispatch::{BoostRing, PendingStack};
use crate::sync::UnsafeCell;

/// This thread's trap state (module docs).
pub(crate) struct TrapThread {
    /// Up while this thread runs the runtime's trap handling (`in_trap.rs`).
    pub(super) in_trap: Cell<bool>,
    /// This thread's `errno`, recorded by the outer trap handling (null
    /// before the thread's first trap; `in_trap.rs`).
    pub(super) errno: Cell<*mut libc::c_int>,
    /// The recent boosted runs (`dispatch.rs`).
    pub(super) boosts: UnsafeCell<BoostRing>,
    /// The single-steps in flight (`dispatch.rs`: why a stack, and why no
    /// destructor).
    pub(super) steps: UnsafeCell<PendingStack>,
}

crate::sync::const_thread_local! {
    /// This thread's trap state (module docs).
    static TRAP_THREAD: TrapThread = TrapThread {
        in_trap: Cell::new(false),
        errno: Cell::new(std::ptr::null_mut()),
        boosts: UnsafeCell::new(BoostRing::new()),
        steps: UnsafeCell::new(PendingStack::new()),
    };
}

/// Runs `f` on the calling thread's trap state: one thread-local access.
#[inline(always)]
pub(crate) fn with<R>(f: impl FnOnce(&TrapThread) -> R) -> R {
    TRAP_THREAD.with(f)
}

/// Whether the block is reached without the dynamic loader (for the test of
/// `trap_tls.rs`).
#[cfg(test)]
pub(crate) fn settled_for_test() -> bool {
    TRAP_THREAD.is_settled()
}
