//! The calling thread's return stacks: a fixed-size table binding
//! `(registry, space)` to a stack the thread holds from that space's pool
//! (`retpool.rs`), and the give-back of those stacks when the thread exits.
//!
//! [`MAX_SPACES_PER_THREAD`] entries in a `const` thread-local with no
//! destructor, reached only with the uprobe re-entrancy flag up and through a
//! `RefCell` that refuses a second borrow. Registry ids are never reused, so a
//! stale binding is never mistaken for a later registry's. A thread-exit key
//! (`probes/exit_key.rs`) gives stacks back at exit; under loom there is no exit
//! hook (a model thread's destructors run after its execution's objects are
//! gone): the models flush explicitly.
//!
//! The table and thread exit, in full: [`crate::docs::algorithms::uretprobes`].

use std::cell::{Cell, RefCell};

use super::retpool::{Held, ReturnPool};
use super::returns::ReturnInstance;
use super::space::SpaceId;
use crate::probes::reentry::{in_uprobe_handler, UprobeScope};

/// Spaces a thread can be inside tracked calls of at once (a call in a
/// fifth counts `nmissed`). A thread runs in one address space; more than
/// one happens only with simulated spaces or nested registries.
pub const MAX_SPACES_PER_THREAD: usize = 4;

/// Odd 64-bit constant (2^64 / golden ratio) spreading threads' starting
/// points over a pool.
const SPREAD: usize = 0x9e37_79b9_7f4a_7c15_u64 as usize;

#[derive(Clone, Copy)]
struct Binding {
    /// The registry's id; 0: the entry is free.
    registry: u64,
    space: SpaceId,
    held: Option<Held>,
}

const UNBOUND: Binding = Binding {
    registry: 0,
    space: SpaceId(0),
    held: None,
};

struct Table {
    bound: [Binding; MAX_SPACES_PER_THREAD],
    /// Where the thread's next claim starts scanning a pool: its last
    /// stack's index (its cache line is likely still ours), spread by the
    /// table's address until the first claim.
    hint: Option<usize>,
}

// `std::cell::Cell`: touched only by its own thread.
crate::sync::const_thread_local! {
    /// Entries of the calling thread's table that are bound: whether a
    /// return can be this thread's at all, read without the table
    /// ([`holds_any`]). Changed only with the table borrowed.
    static BOUND: Cell<usize> = Cell::new(0);
}

/// Whether the calling thread holds a return stack of any registry: false
/// means no return of this thread is a tracked one (the live runtime asks
/// every registry about every return into the shared trampoline, and a
/// kretprobe's return is not the uprobes'). Needs no re-entrancy flag: a
/// stack bound or given back by a handler nested in between changes
/// nothing for the return being asked about.
#[inline]
pub(super) fn holds_any() -> bool {
    BOUND.try_with(Cell::get).unwrap_or(1) != 0
}

/// Sets entry `i` of the table to `b`, keeping [`BOUND`] in step.
#[inline]
fn set_entry(t: &mut Table, i: usize, b: Binding) {
    let was = t.bound[i].registry != 0;
    let now = b.registry != 0;
    t.bound[i] = b;
    if was != now {
        let _ = BOUND.try_with(|n| n.set(if now { n.get() + 1 } else { n.get() - 1 }));
    }
}

// `std::cell::RefCell`, not a shim type: the table is only ever touched by
// its own thread (and signal handlers on it, kept out by the re-entrancy
// flag), never shared; the thread-local itself comes from the shim.
crate::sync::const_thread_local! {
    /// The calling thread's bindings.
    static TABLE: RefCell<Table> = RefCell::new(Table {
        bound: [UNBOUND; MAX_SPACES_PER_THREAD],
        hint: None,
    });
}

/// Runs `f` on the calling thread's stack for `(registry, space)` with its
/// pool's depth. When the thread holds none and `pool` is given, claims one
/// from it first. Gives the stack back when `f` leaves it empty.
///
/// `None` (`f` not run): no stack held and none claimable (no `pool`, the
/// pool or the table exhausted), the thread is exiting, or the table is in
/// use on this thread (cannot happen with the re-entrancy flag up; refused
/// rather than trusted).
#[inline]
pub(super) fn with_stack<R>(
    registry: u64,
    space: SpaceId,
    pool: Option<&ReturnPool>,
    f: impl FnOnce(&mut Vec<ReturnInstance>, usize) -> R,
) -> Option<R> {
    debug_assert!(
        in_uprobe_handler(),
        "return stacks reached before the re-entrancy flag"
    );
    TABLE
        .try_with(|t| {
            let mut t = t.try_borrow_mut().ok()?;
            let i = match t
                .bound
                .iter()
                .position(|b| b.registry == registry && b.space == space)
            {
                Some(i) => i,
                None => bind(&mut t, registry, space, pool?)?,
            };
            let held = t.bound[i].held.expect("a bound entry holds a stack");
            // SAFETY: the entry's stack was claimed by this thread and not
            // given back (entries are cleared before their stack is), and
            // `f` cannot reach the table (we hold its borrow).
            let (out, empty) = unsafe {
                held.with_frames(|frames| {
                    let out = f(frames, held.depth());
                    (out, frames.is_empty())
                })
            };
            if empty {
                set_entry(&mut t, i, UNBOUND);
                // SAFETY: held by this thread, its entry just cleared; the
                // registry is alive (the caller runs on its behalf).
                unsafe { held.release() };
            }
            Some(out)
        })
        .ok()
        .flatten()
}

/// Claims a stack from `pool` into a free entry; its index.
#[inline]
fn bind(t: &mut Table, registry: u64, space: SpaceId, pool: &ReturnPool) -> Option<usize> {
    let i = t.bound.iter().position(|b| b.registry == 0)?;
    let start = match t.hint {
        Some(h) => h,
        None => first_hint(t),
    };
    let held = pool.claim(start)?;
    t.hint = Some(held.index());
    set_entry(
        t,
        i,
        Binding {
            registry,
            space,
            held: Some(held),
        },
    );
    hook::arm();
    Some(i)
}

/// A starting point that differs between threads: their tables' addresses,
/// hashed.
#[cold]
fn first_hint(t: &Table) -> usize {
    (t as *const Table as usize).wrapping_mul(SPREAD) >> (usize::BITS / 2)
}

/// Gives back every stack the calling thread holds for a registry
/// (`Some(id)`) or for any (`None`), dropping their instances; returns how
/// many instances were dropped. Raises the re-entrancy flag first (kept up
/// if the caller's scope has it up).
#[cold]
pub(super) fn release(registry: Option<u64>) -> usize {
    let _scope = UprobeScope::enter();
    TABLE
        .try_with(|t| {
            let Ok(mut t) = t.try_borrow_mut() else {
                return 0;
            };
            let mut dropped = 0;
            for i in 0..MAX_SPACES_PER_THREAD {
                let b = t.bound[i];
                if b.registry == 0 || registry.is_some_and(|r| r != b.registry) {
                    continue;
                }
                let held = b.held.expect("a bound entry holds a stack");
                set_entry(&mut t, i, UNBOUND);
                // SAFETY: held by this thread, its entry just cleared.
                dropped += unsafe { held.release_anywhere() };
            }
            dropped
        })
        .unwrap_or(0)
}

/// Puts `held` in the calling thread's table as its stack for
/// `(registry, space)` (a stack held on behalf of another thread,
/// `proxy.rs`); false (nothing changed) if the thread has a stack for them
/// already or no free entry. The caller has the re-entrancy flag up.
pub(super) fn install(registry: u64, space: SpaceId, held: Held) -> bool {
    TABLE
        .try_with(|t| {
            let Ok(mut t) = t.try_borrow_mut() else {
                return false;
            };
            if t.bound
                .iter()
                .any(|b| b.registry == registry && b.space == space)
            {
                return false;
            }
            let Some(i) = t.bound.iter().position(|b| b.registry == 0) else {
                return false;
            };
            set_entry(
                &mut t,
                i,
                Binding {
                    registry,
                    space,
                    held: Some(held),
                },
            );
            true
        })
        .unwrap_or(false)
}

/// Takes the calling thread's stack for `(registry, space)` out of its
/// table (the counterpart of [`install`]): the stack, still held, or `None`
/// if the thread has none (it was given back when it emptied). The caller
/// has the re-entrancy flag up.
pub(super) fn uninstall(registry: u64, space: SpaceId) -> Option<Held> {
    TABLE
        .try_with(|t| {
            let mut t = t.try_borrow_mut().ok()?;
            let i = t
                .bound
                .iter()
                .position(|b| b.registry == registry && b.space == space)?;
            let held = t.bound[i].held;
            set_entry(&mut t, i, UNBOUND);
            held
        })
        .ok()
        .flatten()
}

/// Creates the thread-exit key (once per process). Called when a pool is
/// built.
pub(super) fn prepare_exit_hook() {
    hook::prepare();
}

#[cfg(not(loom))]
mod hook {
    use std::cell::Cell;

    use crate::probes::exit_key::ExitKey;

    static KEY: ExitKey = ExitKey::new();

    // `std::cell::Cell`: touched only by its own thread.
    crate::sync::const_thread_local! {
        /// Whether this thread armed the key (its exit gives its stacks back).
        static ARMED: Cell<bool> = Cell::new(false);
    }

    /// The key's destructor: gives back the exiting thread's stacks.
    ///
    /// # Safety
    /// Called by the C library at thread exit, on the exiting thread, with
    /// the marker value the thread stored (never dereferenced).
    unsafe extern "C" fn release_on_exit(_value: *mut libc::c_void) {
        // `const` thread-locals without destructors stay accessible this
        // late in thread exit.
        ARMED.with(|a| a.set(false));
        super::release(None);
    }

    pub(super) fn prepare() {
        KEY.prepare(release_on_exit);
    }

    #[inline]
    pub(super) fn arm() {
        if !ARMED.with(Cell::get) && KEY.arm() {
            ARMED.with(|a| a.set(true));
        }
    }
}

#[cfg(loom)]
mod hook {
    /// No exit hook under loom (module docs).
    pub(super) fn prepare() {}

    /// No exit hook under loom (module docs).
    #[inline]
    pub(super) fn arm() {}
}
