//! Per-thread re-entrancy flags for probe handlers: the scope both
//! registries use, and each family's flag ([`KprobeFlag`], [`UprobeFlag`]).
//!
//! # Why
//!
//! A handler (a kprobe's pre/post/entry/return handler, a uprobe consumer's
//! handler, filter or return handler) is user code: it may call a function
//! that carries a probe (a logging helper, a probed allocator). Running that
//! nested hit's handlers would recurse, possibly without end, and would
//! touch the thread's per-thread probe state (kretprobe instances, uprobe
//! return stacks) while the outer hit is in the middle of changing it.
//!
//! # The scope
//!
//! A hit raises its family's flag (a `const` thread-local `Cell<bool>`)
//! before it runs any handler or touches per-thread state, and lowers it
//! when the [`HandlerScope`] drops, also on unwind. A hit that finds the
//! flag already up was re-entered from a handler (or from a signal handler
//! that interrupted one) on the same thread: it runs no handler, counts
//! `nmissed` and completes the displaced instruction. Each family has its
//! own flag ([`Flag`]), so a kprobe handler may hit a uprobe and vice versa,
//! at most once each.
//!
//! # The flag goes up first
//!
//! Every hit-path entry (breakpoint, return, thread exit) raises its flag
//! before it touches the thread's per-thread state, so a signal handler that
//! interrupts the thread there and runs probed code finds the flag up and
//! stays away. A nested uprobe hit never runs a filter either (a filter that
//! hit a uprobe would recurse through the miss path otherwise).
//!
//! A signal arriving between the test and the set of [`HandlerScope::enter`]
//! runs its own scope to completion (set, clear) before the interrupted
//! thread resumes, so the test-and-set needs no atomic instruction.

use core::cell::Cell;
use core::marker::PhantomData;

/// A family of probes with its own per-thread handler flag.
pub(crate) trait Flag {
    /// Runs `f` on the calling thread's flag.
    fn with<R>(f: impl FnOnce(&Cell<bool>) -> R) -> R;

    /// Whether the calling thread runs this family's handlers.
    #[inline]
    fn is_up() -> bool {
        Self::with(Cell::get)
    }
}

/// Marks the thread as running `F`'s handlers; cleared on drop (also on
/// unwind).
pub(crate) struct HandlerScope<F: Flag>(PhantomData<F>);

impl<F: Flag> HandlerScope<F> {
    /// `None` if the thread already runs `F`'s handlers (a re-entered hit).
    #[inline]
    pub(crate) fn enter() -> Option<Self> {
        F::with(|f| {
            if f.get() {
                None
            } else {
                f.set(true);
                Some(HandlerScope(PhantomData))
            }
        })
    }
}

impl<F: Flag> Drop for HandlerScope<F> {
    #[inline]
    fn drop(&mut self) {
        F::with(|f| f.set(false));
    }
}

/// Defines a family's flag: a `const` thread-local and a type implementing
/// [`Flag`] for it.
macro_rules! handler_flag {
    ($(#[$attr:meta])* $vis:vis enum $name:ident;) => {
        $(#[$attr])*
        $vis enum $name {}

        impl Flag for $name {
            #[inline]
            fn with<R>(f: impl FnOnce(&core::cell::Cell<bool>) -> R) -> R {
                // `std::cell::Cell`, not a shim type: the flag is only ever
                // touched by its own thread (and signal handlers on it),
                // never shared, so there is nothing for loom to check; the
                // thread-local itself comes from the shim.
                $crate::sync::const_thread_local! {
                    static FLAG: core::cell::Cell<bool> = core::cell::Cell::new(false);
                }
                FLAG.with(f)
            }
        }
    };
}

handler_flag! {
    /// The kprobe family's re-entrancy flag: up while this thread runs
    /// kprobe handlers.
    pub(crate) enum KprobeFlag;
}

handler_flag! {
    /// The uprobe family's re-entrancy flag: up while this thread runs
    /// uprobe handlers, filters or return handlers.
    pub(crate) enum UprobeFlag;
}

/// Marks the thread as running kprobe handlers; cleared on drop.
pub(crate) type KprobeScope = HandlerScope<KprobeFlag>;

/// Marks the thread as running uprobe handlers; cleared on drop.
pub(crate) type UprobeScope = HandlerScope<UprobeFlag>;

/// Whether the calling thread is running kprobe handlers.
pub(crate) fn in_kprobe_handler() -> bool {
    KprobeFlag::is_up()
}

/// Whether the calling thread is running uprobe handlers.
pub(crate) fn in_uprobe_handler() -> bool {
    UprobeFlag::is_up()
}
