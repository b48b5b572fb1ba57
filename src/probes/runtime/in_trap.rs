//! The runtime's per-thread "inside trap handling" flag: the boundary past
//! which the trap path may call the C library.
//!
//! # Why
//!
//! A probe hit inside the runtime's own trap handling must not recurse.
//! The registries' handler flags ([`KprobeScope`]) go up only once a hit is
//! looked up and its handlers are about to run; the code before that (the
//! signal handler's entry, the `Rcu` read, the lookup) and the kretprobe
//! trampoline's Rust half ran without any flag. So everything they called,
//! C library included, had to be refused as a probe target.
//!
//! Now the first thing the SIGTRAP handler and the trampoline's Rust half
//! do is raise this flag (a field of the thread's trap state,
//! `trap_thread.rs`, a `const` thread-local: a store relative to the
//! thread pointer, no C library, no lazy initialisation). A trap that
//! finds it up is *nested* in the runtime's own work: it takes the
//! **missed path**: the registry's handler flag is forced up for it
//! ([`nested`]), so the hit runs no handler, counts `nmissed` and completes
//! the displaced instruction out of line, never recursing.
//!
//! # The boundary
//!
//! Code that runs with the flag up *and only then* may call the C library:
//! a breakpoint there traps into the missed path. Code the missed path
//! itself runs (the nested SIGTRAP handler: dispatch, lookup, step
//! completion, emulation, the `Rcu` read) must not, or a probe there would
//! trap again forever; it calls raw system calls (`crate::sys`) instead.
//! The call-graph walk (`callgraph/flag_up.rs`) proves it: it walks the
//! handler and stops at the named functions that run only with the flag
//! raised by their caller (the outer handler's body in `signal.rs`, the
//! trampoline's `returning`).
//!
//! The nested path finds the hit's site and its XOL slot as published; it
//! claims nothing the runtime would have to give back. A thread's first
//! trap may nest before the outer handler armed its `Rcu` reader slot (a
//! probe on `__errno_location`): the nested read then claims the slot with
//! one CAS (`Rcu::read_in_trap`, no C library) and the outer handler arms
//! its release right after.
//!
//! # `errno`
//!
//! The C library's `errno` is reached through `__errno_location`, a
//! C-library function. The outer handler (flag up) saves and restores it
//! and records its address here ([`errno_location`]), so the nested path
//! can save and restore it around a chained handler without a call.

use std::cell::Cell;

use super::trap_thread::{self, TrapThread};
use crate::probes::kprobe::KprobeScope;
use crate::probes::reentry::UprobeScope;

// The flag and the recorded `errno` location are fields of the thread's
// trap state (`trap_thread.rs`), which the SIGTRAP handler reaches once.

/// This thread is inside the runtime's trap handling until drop. Holds the
/// address of the thread's flag, so the drop lowers it without a second
/// thread-local access (a handful of instructions on every trap; under
/// qemu-user each counts against the raw `brk` round trip); the pointer
/// also keeps the scope on its thread (not `Send`).
#[must_use = "the flag goes down when the scope is dropped"]
pub(crate) struct TrapScope {
    flag: *const Cell<bool>,
}

impl TrapScope {
    /// Raises the flag; `None` if it was up already (a nested trap or
    /// return: take the missed path, [`nested`]).
    #[inline(always)]
    pub(crate) fn enter() -> Option<TrapScope> {
        trap_thread::with(TrapScope::enter_on)
    }

    /// [`enter`](Self::enter) on the calling thread's trap state `t`,
    /// already reached (the SIGTRAP handler's).
    #[inline(always)]
    pub(crate) fn enter_on(t: &TrapThread) -> Option<TrapScope> {
        let f = &t.in_trap;
        if f.get() {
            None
        } else {
            f.set(true);
            Some(TrapScope { flag: f })
        }
    }

    /// The scope of the flag in `t`, raised by the caller's caller with
    /// [`enter_on`](Self::enter_on) and handed over (that scope forgotten,
    /// not dropped): this one lowers it. The SIGTRAP handler hands its
    /// scope to the outer handling it calls last, so the call is a tail
    /// call (`signal.rs`).
    #[inline(always)]
    pub(crate) fn adopt(t: &TrapThread) -> TrapScope {
        TrapScope { flag: &t.in_trap }
    }
}

impl Drop for TrapScope {
    #[inline(always)]
    fn drop(&mut self) {
        // The scope is not `Send`; the flag is a field of a `const`
        // thread-local without a destructor, live as long as the thread.
        // SAFETY: the calling thread's own flag, live (see above).
        unsafe { (*self.flag).set(false) };
    }
}

/// Whether the calling thread is inside the runtime's trap handling.
pub fn in_trap() -> bool {
    trap_thread::with(|t| t.in_trap.get())
}

/// For a trap or return nested in trap handling: forces both registry
/// families' missed paths (their handler flags up: kprobes and live
/// uprobes) for as long as the result lives. A flag that was already up (a
/// hit inside a handler) stays up and is not lowered by the result.
#[inline(always)]
pub(crate) fn nested() -> Nested {
    Nested {
        _kprobes: KprobeScope::enter(),
        _uprobes: UprobeScope::enter(),
    }
}

/// Both families' handler flags held up by [`nested`].
#[must_use = "the flags go down when this is dropped"]
pub(crate) struct Nested {
    _kprobes: Option<KprobeScope>,
    _uprobes: Option<UprobeScope>,
}

/// Records this thread's `errno` location in its trap state `t` (outer
/// trap handling only: the first time per thread it calls the C library)
/// and returns it. A thread's `errno` lives at one address for the
/// thread's life, so later traps reuse the recorded one: a probe on
/// `__errno_location` is not hit again by every trap.
#[inline]
pub(crate) fn record_errno_location(t: &TrapThread) -> *mut libc::c_int {
    let known = t.errno.get();
    if !known.is_null() {
        return known;
    }
    // SAFETY: __errno_location has no preconditions; it returns this
    // thread's errno, valid for the thread's life.
    let p = unsafe { libc::__errno_location() };
    t.errno.set(p);
    p
}

/// This thread's `errno` location as recorded in its trap state `t` by
/// its outer trap handling, if any (no C-library call).
#[inline(always)]
pub(crate) fn errno_location(t: &TrapThread) -> Option<*mut libc::c_int> {
    let p = t.errno.get();
    (!p.is_null()).then_some(p)
}
