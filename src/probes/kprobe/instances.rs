//! The per-thread table of kretprobe instances in flight, guarded by hashed
//! locks keyed by [`ThreadKey`].
//!
//! # Why per thread
//!
//! At the return trampoline the only things known are the current thread and
//! its stack pointer. Instances are therefore filed under the thread that
//! made the call: a [`HashedLocks`] array of chains, one stripe lock per
//! bucket, so two threads returning at once take different locks (one
//! global lock made every kretprobe in the system take turns, see seed 003).
//!
//! # Matching a return
//!
//! Each instance records the stack pointer its function will return with
//! ([`Arch::stack_pointer_at_return`](crate::probes::arch::Arch::stack_pointer_at_return)).
//! At the trampoline the thread's instances with exactly that stack pointer
//! are the returning call's (several, when several kretprobes sit on the same
//! function); instances of the same thread with a *lower* one belong to
//! frames that were abandoned (`longjmp`, unwinding) and are reclaimed then.
//! Chains are LIFO, so the newest matching instance comes first. Frames a
//! thread abandons with no tracked return above them (it exits, or jumps
//! out for good) are given back by the thread-exit flush or an explicit one
//! (`thread_exit.rs`, [`InstanceTable::take_thread`]).
//!
//! # Lock order
//!
//! An instance is taken from its kretprobe's pool (a lock-free set of free
//! flags, `kretprobe.rs`), prepared with no lock held, then filed (one
//! table stripe). At the return it is unlinked (one table stripe), its
//! handler runs with no lock held, and it goes back to its pool (one
//! release store). The pool has no lock, so nothing nests; no path takes
//! two stripes. (Were the pool ever locked again, the only permitted order
//! is **table stripe, then pool**, the order the kernel adopted in seed
//! 003.)
//!
//! The stripes are [`SpinLock`]s: no allocation, no system call while
//! uncontended, never a sleep (a contended waiter may yield the CPU). None
//! is held while user code runs, and the runtime refuses probes on its own
//! code, so a probe trap never lands inside a holder. A *signal* can: the
//! return path runs on the thread's ordinary stack with signals deliverable,
//! and a signal handler may call a kretprobed function on the same thread.
//! That is why the hit path takes a stripe (and an instance) only with the
//! thread's re-entrancy flag already set (see `hit.rs`): the nested hit
//! then runs no kretprobe entry and takes no lock. [`InstanceTable::file`]
//! and [`InstanceTable::take_returning`] assert the flag in debug builds.

use std::ptr::NonNull;

use super::kretprobe::ReturnProbe;
use crate::hashlock::{HashedLocks, SpinLock};
use crate::probes::reentry::in_kprobe_handler;
use crate::sync::UnsafeCell;

/// Identifies a thread, cheaply and async-signal-safely: the address of a
/// thread-local anchor (no system call, no allocation).
///
/// Keys of live threads are distinct; a key may be reused after its thread
/// exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ThreadKey(usize);

crate::sync::const_thread_local! {
    /// Its address is the thread's key; the value is never read.
    static ANCHOR: u8 = 0;
}

impl ThreadKey {
    /// The calling thread's key.
    #[inline]
    pub fn current() -> ThreadKey {
        ANCHOR.with(|a| ThreadKey(a as *const u8 as usize))
    }
}

/// The part of a kretprobe instance the table and the trampoline see,
/// whatever the kretprobe's data type.
///
/// Fields are `UnsafeCell`s: an instance has one owner at a time (its pool's
/// free list, the thread between entry and filing, a table stripe, or the
/// returning thread), and ownership passes through the pool and stripe
/// locks, which order every access.
pub(crate) struct InstanceHdr {
    next: UnsafeCell<*mut InstanceHdr>,
    thread: UnsafeCell<ThreadKey>,
    ret_sp: UnsafeCell<u64>,
    real_ret: UnsafeCell<u64>,
    /// The kretprobe the instance belongs to (set once at pool creation).
    owner: *const dyn ReturnProbe,
    /// Index in the owner's pool.
    pub(crate) index: u32,
}

/// A call being tracked: what the trampoline needs from an instance.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame {
    pub(crate) thread: ThreadKey,
    pub(crate) ret_sp: u64,
    pub(crate) real_ret: u64,
}

impl InstanceHdr {
    pub(crate) fn new(owner: *const dyn ReturnProbe, index: u32) -> Self {
        InstanceHdr {
            next: UnsafeCell::new(std::ptr::null_mut()),
            thread: UnsafeCell::new(ThreadKey(0)),
            ret_sp: UnsafeCell::new(0),
            real_ret: UnsafeCell::new(0),
            owner,
            index,
        }
    }

    /// Records the call the instance tracks.
    ///
    /// # Safety
    /// The caller owns the instance (taken from its pool, not yet filed).
    pub(crate) unsafe fn set_frame(&self, f: Frame) {
        // SAFETY: exclusive owner (caller's contract).
        unsafe {
            self.thread.with_mut(|p| *p = f.thread);
            self.ret_sp.with_mut(|p| *p = f.ret_sp);
            self.real_ret.with_mut(|p| *p = f.real_ret);
        }
    }

    /// The tracked call.
    ///
    /// # Safety
    /// The caller owns the instance or holds the stripe it is filed under.
    pub(crate) unsafe fn frame(&self) -> Frame {
        // SAFETY: no concurrent writer (caller's contract).
        unsafe {
            Frame {
                thread: self.thread.with(|p| *p),
                ret_sp: self.ret_sp.with(|p| *p),
                real_ret: self.real_ret.with(|p| *p),
            }
        }
    }

    /// The kretprobe owning the instance.
    ///
    /// # Safety
    /// The instance is out of its pool (filed or owned by the caller): the
    /// owner's memory lives at least until the instance is put back.
    pub(crate) unsafe fn owner(&self) -> &dyn ReturnProbe {
        // SAFETY: an owner is freed only when all its instances are back in
        // its pool (caller's contract says this one is not).
        unsafe { &*self.owner }
    }

    unsafe fn next(&self) -> *mut InstanceHdr {
        // SAFETY: the caller holds the instance's stripe or owns it.
        unsafe { self.next.with(|p| *p) }
    }

    unsafe fn set_next(&self, n: *mut InstanceHdr) {
        // SAFETY: the caller holds the instance's stripe or owns it.
        unsafe { self.next.with_mut(|p| *p = n) }
    }
}

/// One stripe's chain of filed instances (LIFO).
pub(crate) struct Chain {
    head: *mut InstanceHdr,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            head: std::ptr::null_mut(),
        }
    }
}

// SAFETY: the chain's instances are reached only through the stripe guard
// that owns the chain, whichever thread holds it.
unsafe impl Send for Chain {}
// SAFETY: spin-lock stripes are exclusive only (no shared guards), so a
// `&Chain` is never used by two threads at once.
unsafe impl Sync for Chain {}

/// Instances unlinked for one return, newest first; owned by the caller.
pub(crate) struct Taken {
    head: *mut InstanceHdr,
}

impl Taken {
    /// Whether nothing was taken.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    /// Pops the next instance (newest first), with its frame. The returned
    /// instance is the caller's to give back to its owner.
    pub(crate) fn pop(&mut self) -> Option<(NonNull<InstanceHdr>, Frame)> {
        let p = NonNull::new(self.head)?;
        // SAFETY: taken instances are owned by this list (no stripe holds
        // them any more); reading before handing the instance out.
        unsafe {
            let hdr = p.as_ref();
            self.head = hdr.next();
            hdr.set_next(std::ptr::null_mut());
            Some((p, hdr.frame()))
        }
    }
}

/// Unlinks from the chain at `head` every instance of `thread` whose call
/// returns with a stack pointer at or below `sp`, keeping their LIFO order.
///
/// # Safety
/// The caller holds the stripe that owns the chain.
unsafe fn unlink_frames(head: &mut *mut InstanceHdr, thread: ThreadKey, sp: u64) -> Taken {
    let mut taken = Taken {
        head: std::ptr::null_mut(),
    };
    let mut tail: *mut InstanceHdr = std::ptr::null_mut();
    let mut prev: *mut InstanceHdr = std::ptr::null_mut();
    // SAFETY: the chain's instances are filed under the stripe the caller
    // holds; unlinked ones become the caller's (in `taken`).
    unsafe {
        let mut p = *head;
        while let Some(i) = p.as_ref() {
            let next = i.next();
            let f = i.frame();
            if f.thread == thread && f.ret_sp <= sp {
                match prev.as_ref() {
                    None => *head = next,
                    Some(pr) => pr.set_next(next),
                }
                i.set_next(std::ptr::null_mut());
                match tail.as_ref() {
                    None => taken.head = p,
                    Some(t) => t.set_next(p),
                }
                tail = p;
            } else {
                prev = p;
            }
            p = next;
        }
    }
    taken
}

/// The per-thread instance table.
pub(crate) struct InstanceTable {
    locks: HashedLocks<ThreadKey, SpinLock, Chain>,
}

/// Every stripe of an instance table, held across a `fork` (`fork.rs`).
#[cfg(not(loom))]
pub(crate) struct StripesHold<'a> {
    _all: crate::hashlock::AllGuard<'a, SpinLock, Chain>,
}

impl InstanceTable {
    /// Takes every stripe, in index order, for the fork handlers. The
    /// caller's re-entrancy flag is up (a signal handler on this thread must
    /// not file or unlink an instance meanwhile).
    #[cfg(not(loom))]
    pub(crate) fn hold_for_fork(&self) -> StripesHold<'_> {
        debug_assert!(
            in_kprobe_handler(),
            "stripes taken before the re-entrancy flag"
        );
        StripesHold {
            _all: self.locks.lock_all(),
        }
    }

    /// A table of `stripes` stripes (rounded up to a power of two; 1 makes it
    /// one global lock, the benchmark's peer).
    pub(crate) fn new(stripes: usize) -> Self {
        let stripes = stripes.clamp(1, crate::hashlock::MAX_STRIPES);
        InstanceTable {
            locks: HashedLocks::new(stripes).expect("stripe count clamped to the valid range"),
        }
    }

    /// Number of stripes.
    pub(crate) fn stripes(&self) -> usize {
        self.locks.len()
    }

    /// The stripe `thread`'s instances are filed under.
    #[cfg(test)]
    pub(crate) fn stripe_of(&self, thread: ThreadKey) -> usize {
        self.locks.stripe_of(&thread)
    }

    /// Files `inst` under `thread`.
    ///
    /// # Safety
    /// The caller owns `inst` (its frame is set, it is in no chain).
    pub(crate) unsafe fn file(&self, thread: ThreadKey, inst: NonNull<InstanceHdr>) {
        debug_assert!(
            in_kprobe_handler(),
            "a stripe taken before the re-entrancy flag"
        );
        let mut chain = self.locks.lock(&thread);
        // SAFETY: owned by the caller until linked; linked under the stripe.
        unsafe { inst.as_ref().set_next(chain.head) };
        chain.head = inst.as_ptr();
        drop(chain);
        // This thread now has a frame to give back if it exits inside the
        // call (`thread_exit.rs`).
        super::thread_exit::arm();
    }

    /// Unlinks the instances of a call returning on `thread` with stack
    /// pointer `sp`: if any instance of `thread` has exactly `sp`, every
    /// instance of `thread` with a stack pointer at or below `sp` (the
    /// returning call's, and abandoned deeper frames'); otherwise nothing.
    pub(crate) fn take_returning(&self, thread: ThreadKey, sp: u64) -> Taken {
        debug_assert!(
            in_kprobe_handler(),
            "a stripe taken before the re-entrancy flag"
        );
        let mut chain = self.locks.lock(&thread);
        #[cfg(test)]
        test_hooks::while_locked();
        // SAFETY: every instance in the chain is filed under
        // this stripe, which we hold.
        unsafe {
            let mut p = chain.head;
            let mut matched = false;
            while let Some(i) = p.as_ref() {
                let f = i.frame();
                if f.thread == thread && f.ret_sp == sp {
                    matched = true;
                    break;
                }
                p = i.next();
            }
            if !matched {
                return Taken {
                    head: std::ptr::null_mut(),
                };
            }
        }
        // SAFETY: we hold the chain's stripe.
        unsafe { unlink_frames(&mut chain.head, thread, sp) }
    }

    /// Unlinks every instance of `thread` whose call returns with a stack
    /// pointer at or below `sp` (`u64::MAX`: all of them), newest first:
    /// frames the thread abandoned (it exited, or jumped past them). Takes
    /// one stripe, with the thread's re-entrancy flag up (see `file`).
    pub(crate) fn take_thread(&self, thread: ThreadKey, sp: u64) -> Taken {
        debug_assert!(
            in_kprobe_handler(),
            "a stripe taken before the re-entrancy flag"
        );
        let mut chain = self.locks.lock(&thread);
        // SAFETY: we hold the chain's stripe.
        unsafe { unlink_frames(&mut chain.head, thread, sp) }
    }

    /// Unlinks every filed instance (registry teardown).
    pub(crate) fn take_all(&self) -> Vec<NonNull<InstanceHdr>> {
        let mut out = Vec::new();
        for s in 0..self.locks.len() {
            let mut chain = self.locks.lock_stripe(s);
            let mut p = std::mem::replace(&mut chain.head, std::ptr::null_mut());
            while let Some(i) = NonNull::new(p) {
                // SAFETY: filed under the stripe we hold.
                unsafe {
                    p = i.as_ref().next();
                    i.as_ref().set_next(std::ptr::null_mut());
                }
                out.push(i);
            }
        }
        out
    }
}

/// A hook the unit tests run on the returning thread while
/// [`InstanceTable::take_returning`] holds its stripe: where a signal could
/// interrupt the thread on real code.
#[cfg(test)]
pub(crate) mod test_hooks {
    use std::cell::RefCell;

    std::thread_local! {
        static WHILE_LOCKED: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    }

    /// Runs `f` (once) the next time this thread is inside
    /// `take_returning`'s stripe.
    pub(crate) fn set_while_locked(f: impl FnOnce() + 'static) {
        WHILE_LOCKED.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    pub(super) fn while_locked() {
        if let Some(f) = WHILE_LOCKED.with(|h| h.borrow_mut().take()) {
            f();
        }
    }
}
