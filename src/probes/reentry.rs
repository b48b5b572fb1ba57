//! Per-thread re-entrancy flags for probe handlers, shared by the kprobe and
//! uprobe hit paths.
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

        impl $crate::probes::reentry::Flag for $name {
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
pub(crate) use handler_flag;
