//! The lock a stripe is made of: the [`StripeLock`] contract, its
//! implementations for `std`'s `Mutex<()>` and `RwLock<()>`, and [`SpinLock`].
//!
//! # The contract
//!
//! A stripe lock is an RAII lock with nothing inside: `lock` returns a guard,
//! dropping the guard releases the lock. [`HashedLocks`](super::HashedLocks)
//! keeps the data a stripe protects beside the lock and hands out `&mut T`
//! while an exclusive guard lives, so the contract is `unsafe`: a lock that
//! let two exclusive guards coexist would let safe code alias `&mut T`.
//!
//! # Modes
//!
//! [`Exclusive`] and [`Shared`] name the two ways to hold a stripe. Every
//! [`StripeLock`] has the exclusive mode; a [`SharedStripeLock`] (such as
//! `RwLock<()>`) also lets several holders share a stripe for reading. The
//! array's guards are generic over the mode, so one set of guard types serves
//! `lock`/`read`, `lock_pair`/`read_pair` and `lock_all`/`read_all`.
//!
//! # Poisoning
//!
//! `std`'s locks are poisoned when a holder panics. A stripe guards `()`, so
//! the poison flag says nothing about the lock itself; the implementations
//! here ignore it (see [`StripeLock`]).
//!
//! # The spin lock
//!
//! [`SpinLock`] is test-and-test-and-set with exponential backoff; its docs
//! say when it beats `Mutex<()>`. Under loom the backoff yields, so a model
//! can schedule the holder the spinner waits for.

use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Backoff, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A lock usable as a stripe of a [`HashedLocks`](super::HashedLocks)
/// array: RAII, guarding nothing, constructible without arguments.
///
/// Implemented for `std::sync::Mutex<()>`, `std::sync::RwLock<()>` (write
/// mode; its read mode is [`SharedStripeLock`]) and [`SpinLock`]. The `std`
/// implementations ignore poisoning, as `parking_lot` does: a stripe guards
/// `()`, so the poison flag says nothing about the lock, and data kept in the
/// array is left as a panicking holder left it.
///
/// # Safety
///
/// Implementors guarantee mutual exclusion: while a [`Guard`](Self::Guard)
/// of a lock is alive, no other `Guard` of the same lock (and, for a
/// [`SharedStripeLock`], no [`ReadGuard`](SharedStripeLock::ReadGuard))
/// is alive; `try_lock` returns `None` rather than break that rule; and
/// dropping a guard happens-before the next acquisition of the same lock
/// returns (a release/acquire pair), so writes made under one guard are
/// visible under the next. `HashedLocks` hands out `&mut T` on the strength
/// of this promise.
pub unsafe trait StripeLock: Send + Sync + Sized {
    /// Proof of exclusive ownership; dropping it releases the lock.
    type Guard<'a>
    where
        Self: 'a;

    /// A new, unlocked lock.
    fn new() -> Self;

    /// Acquires the lock exclusively, waiting as long as it takes.
    fn lock(&self) -> Self::Guard<'_>;

    /// Acquires the lock exclusively if that needs no waiting.
    fn try_lock(&self) -> Option<Self::Guard<'_>>;
}

/// A [`StripeLock`] that can also be held shared, by several readers at once.
///
/// # Safety
///
/// In addition to the [`StripeLock`] contract: while a
/// [`ReadGuard`](Self::ReadGuard) is alive no exclusive
/// [`Guard`](StripeLock::Guard) of the same lock is alive, `try_read`
/// returns `None` rather than break that rule, and dropping an exclusive
/// guard happens-before the next shared acquisition returns.
pub unsafe trait SharedStripeLock: StripeLock {
    /// Proof of shared ownership; dropping it releases this reader's share.
    type ReadGuard<'a>
    where
        Self: 'a;

    /// Acquires the lock shared, waiting for any exclusive holder to leave.
    fn read(&self) -> Self::ReadGuard<'_>;

    /// Acquires the lock shared if that needs no waiting.
    fn try_read(&self) -> Option<Self::ReadGuard<'_>>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Exclusive {}
    impl Sealed for super::Shared {}
}

/// How a stripe is held: [`Exclusive`] or [`Shared`]. Sealed; it lets the
/// array's guard types serve both modes.
pub trait Access<L>: sealed::Sealed {
    /// The underlying lock's guard for this mode.
    type Guard<'a>
    where
        L: 'a;

    #[doc(hidden)]
    fn acquire(lock: &L) -> Self::Guard<'_>;

    #[doc(hidden)]
    fn try_acquire(lock: &L) -> Option<Self::Guard<'_>>;
}

/// Exclusive mode: one holder per stripe, which may mutate the stripe's data.
#[derive(Debug)]
pub enum Exclusive {}

/// Shared mode: any number of readers per stripe, no exclusive holder.
#[derive(Debug)]
pub enum Shared {}

impl<L: StripeLock> Access<L> for Exclusive {
    type Guard<'a>
        = L::Guard<'a>
    where
        L: 'a;

    #[inline]
    fn acquire(lock: &L) -> L::Guard<'_> {
        lock.lock()
    }

    #[inline]
    fn try_acquire(lock: &L) -> Option<L::Guard<'_>> {
        lock.try_lock()
    }
}

impl<L: SharedStripeLock> Access<L> for Shared {
    type Guard<'a>
        = L::ReadGuard<'a>
    where
        L: 'a;

    #[inline]
    fn acquire(lock: &L) -> L::ReadGuard<'_> {
        lock.read()
    }

    #[inline]
    fn try_acquire(lock: &L) -> Option<L::ReadGuard<'_>> {
        lock.try_read()
    }
}

/// Turns a `try_*` result into an `Option`, ignoring poisoning (see the
/// module docs): only "would block" means the lock was not taken.
fn unpoisoned<G>(result: std::sync::TryLockResult<G>) -> Option<G> {
    match result {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

// SAFETY: `Mutex` admits one guard at a time and its unlock/lock pair is a
// release/acquire pair; ignoring poison does not weaken either.
unsafe impl StripeLock for Mutex<()> {
    type Guard<'a> = MutexGuard<'a, ()>;

    #[inline]
    fn new() -> Self {
        Mutex::new(())
    }

    #[inline]
    fn lock(&self) -> MutexGuard<'_, ()> {
        Mutex::lock(self).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[inline]
    fn try_lock(&self) -> Option<MutexGuard<'_, ()>> {
        unpoisoned(Mutex::try_lock(self))
    }
}

// SAFETY: a write guard excludes every other guard, a read guard excludes
// write guards, and unlock/lock pairs synchronize (std `RwLock` contract).
unsafe impl StripeLock for RwLock<()> {
    type Guard<'a> = RwLockWriteGuard<'a, ()>;

    #[inline]
    fn new() -> Self {
        RwLock::new(())
    }

    #[inline]
    fn lock(&self) -> RwLockWriteGuard<'_, ()> {
        RwLock::write(self).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[inline]
    fn try_lock(&self) -> Option<RwLockWriteGuard<'_, ()>> {
        unpoisoned(RwLock::try_write(self))
    }
}

// SAFETY: see the `StripeLock` impl above; read guards exclude write guards.
unsafe impl SharedStripeLock for RwLock<()> {
    type ReadGuard<'a> = RwLockReadGuard<'a, ()>;

    #[inline]
    fn read(&self) -> RwLockReadGuard<'_, ()> {
        RwLock::read(self).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[inline]
    fn try_read(&self) -> Option<RwLockReadGuard<'_, ()>> {
        unpoisoned(RwLock::try_read(self))
    }
}

/// A test-and-test-and-set spin lock with exponential backoff (one byte).
///
/// Taking a free lock is one compare-and-swap. A waiter spins on plain loads
/// (the cache line stays shared among waiters instead of bouncing between
/// them on failed read-modify-writes), backing off exponentially and then
/// yielding to the OS scheduler, and retries the CAS only once the lock looks
/// free. It never sleeps: use it for short critical sections on machines with
/// at least as many cores as contending threads. Where threads outnumber
/// cores a holder can be descheduled while others spin; `Mutex<()>`, which
/// sleeps on a futex, is then the better stripe.
///
/// ```
/// use rcu_registry::hashlock::{SpinLock, StripeLock};
///
/// let lock = SpinLock::new();
/// let guard = lock.lock();
/// assert!(lock.try_lock().is_none());
/// drop(guard);
/// assert!(lock.try_lock().is_some());
/// ```
#[derive(Debug)]
pub struct SpinLock {
    locked: AtomicBool,
}

impl Default for SpinLock {
    fn default() -> Self {
        SpinLock::new()
    }
}

/// Holds a [`SpinLock`]; dropping it releases the lock.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct SpinGuard<'a> {
    lock: &'a SpinLock,
}

impl SpinLock {
    /// A new, unlocked spin lock.
    pub fn new() -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
        }
    }

    #[inline(always)]
    fn try_acquire(&self) -> bool {
        // Acquire on success pairs with the Release store in
        // `SpinGuard::drop`: the previous holder's critical section
        // happens-before ours. Relaxed would let our reads of the protected
        // data see stale values. Failure takes nothing, so Relaxed.
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// The contended path: spin on loads until the lock looks free, then CAS.
    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        let mut backoff = Backoff::new();
        loop {
            // Relaxed: this load is only a hint that the CAS may succeed; the
            // CAS's Acquire is what synchronizes with the releasing holder.
            while self.locked.load(Ordering::Relaxed) {
                backoff.snooze();
            }
            // Acquire pairs with the Release in `SpinGuard::drop`, as in
            // `try_acquire`; weak is fine inside a retry loop.
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

// SAFETY: `locked` goes false -> true only through a successful CAS, so at
// most one guard exists; the guard's Release store pairs with the next
// holder's Acquire CAS.
unsafe impl StripeLock for SpinLock {
    type Guard<'a> = SpinGuard<'a>;

    #[inline]
    fn new() -> Self {
        SpinLock::new()
    }

    #[inline]
    fn lock(&self) -> SpinGuard<'_> {
        if !self.try_acquire() {
            self.lock_contended();
        }
        SpinGuard { lock: self }
    }

    #[inline]
    fn try_lock(&self) -> Option<SpinGuard<'_>> {
        if self.try_acquire() {
            Some(SpinGuard { lock: self })
        } else {
            None
        }
    }
}

impl Drop for SpinGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release pairs with the Acquire CAS of the next holder: everything
        // written in this critical section is visible to it. Relaxed would
        // let those writes be reordered after the unlock.
        self.lock.locked.store(false, Ordering::Release);
    }
}
