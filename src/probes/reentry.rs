//! Per-thread re-entrancy flags for probe handlers: the scope both
//! registries use, and the uprobe family's flag ([`UprobeFlag`]; the kprobe
//! family's is a field of the kprobe paths' per-thread block,
//! `kprobe/this_thread.rs`).
//!
//! Invariant: every hit-path entry (breakpoint, return, thread exit) raises its
//! family's flag ([`Flag`]) before it runs a handler, touches per-thread state
//! or takes a lock, and [`HandlerScope`] lowers it on drop, also on unwind; a
//! hit that finds it up runs no handler (and no uprobe filter), counts
//! `nmissed` and completes the displaced instruction. A signal between the test
//! and the set of [`HandlerScope::enter`] runs its own scope to completion, so
//! no atomic instruction is needed.
//!
//! Why, in full: [`crate::docs::algorithms::kprobe_hit_path`].

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
/// unwind). Holds the address of the thread's flag, so the drop clears it
/// without a second thread-local access (on the trap path each costs a
/// handful of instructions; under qemu-user every one counts against the
/// raw `brk` round trip). The pointer also keeps the scope on its thread
/// (not `Send`).
pub(crate) struct HandlerScope<F: Flag>(*const Cell<bool>, PhantomData<F>);

impl<F: Flag> HandlerScope<F> {
    /// `None` if the thread already runs `F`'s handlers (a re-entered hit).
    #[inline]
    pub(crate) fn enter() -> Option<Self> {
        // SAFETY: `F::with` hands out the calling thread's own flag.
        F::with(|f| unsafe { Self::enter_on(f) })
    }

    /// [`enter`](Self::enter) on `flag`, reached by the caller.
    ///
    /// # Safety
    /// `flag` is the calling thread's `F` flag (the one `F::with` reaches):
    /// a `const` thread-local without a destructor, live as long as the
    /// thread.
    #[inline(always)]
    pub(crate) unsafe fn enter_on(flag: &Cell<bool>) -> Option<Self> {
        if flag.get() {
            None
        } else {
            flag.set(true);
            Some(HandlerScope(flag, PhantomData))
        }
    }
}

impl<F: Flag> Drop for HandlerScope<F> {
    #[inline]
    fn drop(&mut self) {
        // The scope is not `Send`; the flag is a `const` thread-local
        // without a destructor, live as long as the thread.
        // SAFETY: the calling thread's own flag, live (see above).
        unsafe { (*self.0).set(false) };
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
    /// The uprobe family's re-entrancy flag: up while this thread runs
    /// uprobe handlers, filters or return handlers.
    pub(crate) enum UprobeFlag;
}

/// Marks the thread as running uprobe handlers; cleared on drop.
pub(crate) type UprobeScope = HandlerScope<UprobeFlag>;

/// Whether the calling thread is running uprobe handlers.
pub(crate) fn in_uprobe_handler() -> bool {
    UprobeFlag::is_up()
}
