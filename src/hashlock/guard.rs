//! The guards a [`HashedLocks`](super::HashedLocks) array hands out: one
//! stripe ([`StripeGuard`]), the stripes of two keys ([`PairGuard`]) and every
//! stripe ([`AllGuard`]), each in [`Exclusive`] or [`Shared`] mode.
//!
//! While a guard lives its stripes' locks are held in its mode; guards release
//! in the reverse of the order they acquired, and are not `Send` (the
//! compile-fail examples on [`StripeGuard`] pin this down). Why:
//! [`crate::docs::algorithms::hashed_locks`].

use core::fmt;
use core::ops::{Deref, DerefMut};

use super::lock::{Access, Exclusive, Shared, StripeLock};
use super::order::Held;
use crate::sync::UnsafeCell;

/// Holds one stripe; dereferences to the stripe's data (mutably in
/// [`Exclusive`] mode). Dropping it releases the stripe.
///
/// A guard is not `Send`: it must be released on the thread that took it
/// (`std`'s `MutexGuard` requires it, and the debug lock-order check keeps
/// its table per thread).
///
/// ```compile_fail,E0277
/// use rcu_registry::hashlock::HashedLocks;
///
/// let locks: HashedLocks<u32, std::sync::Mutex<()>> = HashedLocks::new(4).unwrap();
/// let guard = locks.lock(&7);
/// std::thread::scope(|s| {
///     s.spawn(move || drop(guard)); // error: the guard is not `Send`
/// });
/// ```
///
/// Released on the thread that took it, the same code compiles:
///
/// ```
/// use rcu_registry::hashlock::HashedLocks;
///
/// let locks: HashedLocks<u32, std::sync::Mutex<()>> = HashedLocks::new(4).unwrap();
/// let guard = locks.lock(&7);
/// std::thread::scope(|s| {
///     s.spawn(move || ());
/// });
/// drop(guard);
/// ```
///
/// A read guard gives no mutable access:
///
/// ```compile_fail,E0594
/// use rcu_registry::hashlock::HashedLocks;
///
/// let locks: HashedLocks<u32, std::sync::RwLock<()>, u64> = HashedLocks::new(4).unwrap();
/// let guard = locks.read(&7);
/// *guard = 1; // error: cannot assign through a shared-mode guard
/// ```
///
/// An exclusive guard of the same array gives it:
///
/// ```
/// use rcu_registry::hashlock::HashedLocks;
///
/// let locks: HashedLocks<u32, std::sync::RwLock<()>, u64> = HashedLocks::new(4).unwrap();
/// let mut guard = locks.lock(&7);
/// *guard = 1;
/// ```
#[must_use = "the stripe is released as soon as the guard is dropped"]
pub struct StripeGuard<'a, L: 'a, T, M: Access<L> = Exclusive> {
    // Field order is drop order: the lock is released before the debug
    // order record is removed; the order of those two is immaterial.
    _lock: M::Guard<'a>,
    data: &'a UnsafeCell<T>,
    stripe: usize,
    _held: Held,
}

impl<'a, L, T, M: Access<L>> StripeGuard<'a, L, T, M> {
    pub(crate) fn new(
        lock: M::Guard<'a>,
        data: &'a UnsafeCell<T>,
        stripe: usize,
        held: Held,
    ) -> Self {
        StripeGuard {
            _lock: lock,
            data,
            stripe,
            _held: held,
        }
    }

    /// The index of the held stripe.
    #[inline]
    pub fn stripe(&self) -> usize {
        self.stripe
    }
}

/// `&T` to a held stripe's data, valid while the borrow of its guard lives.
///
/// # Safety
///
/// The caller holds the stripe that owns `data` (in either mode) for at
/// least the returned lifetime.
#[inline(always)]
unsafe fn shared<T>(data: &UnsafeCell<T>) -> &T {
    // SAFETY: the stripe is held (caller's contract), so no exclusive guard
    // of it, and hence no `&mut T`, exists elsewhere (StripeLock contract).
    data.with(|p| unsafe { &*p })
}

/// `&mut T` to a held stripe's data, valid while the borrow of its guard
/// lives.
///
/// # Safety
///
/// The caller holds the stripe that owns `data` exclusively for at least the
/// returned lifetime, and creates no other reference to the same data during
/// it (callers borrow their guard mutably for that lifetime).
#[inline(always)]
#[allow(clippy::mut_from_ref)] // uniqueness comes from the exclusive hold, per the contract
unsafe fn exclusive<T>(data: &UnsafeCell<T>) -> &mut T {
    // SAFETY: exclusive hold (caller's contract) means no other guard of
    // this stripe exists (StripeLock contract), so this is the only path to
    // the data, and the caller makes it unique on its side.
    data.with_mut(|p| unsafe { &mut *p })
}

impl<L, T, M: Access<L>> Deref for StripeGuard<'_, L, T, M> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: `self` holds the stripe owning `data` for its whole life.
        unsafe { shared(self.data) }
    }
}

impl<L: StripeLock, T> DerefMut for StripeGuard<'_, L, T, Exclusive> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: exclusive mode; `&mut self` keeps this the only reference
        // to the data derived from this guard while it lives.
        unsafe { exclusive(self.data) }
    }
}

// SAFETY: through `&StripeGuard` one reaches only `&T` and the stripe index
// (the inner lock guard is private), so sharing the guard shares `&T`.
unsafe impl<L, T: Sync, M: Access<L>> Sync for StripeGuard<'_, L, T, M> {}

impl<L, T: fmt::Debug, M: Access<L>> fmt::Debug for StripeGuard<'_, L, T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeGuard")
            .field("stripe", &self.stripe)
            .field("data", &**self)
            .finish()
    }
}

/// Holds the stripes of two keys `a` and `b` (one stripe if they coincide).
///
/// `first` is the stripe of `a` and `second` the stripe of `b`, in the order
/// the keys were given, whatever order the stripes were locked in.
#[must_use = "the stripes are released as soon as the guard is dropped"]
pub struct PairGuard<'a, L: 'a, T, M: Access<L> = Exclusive> {
    // Field order is drop order: `high` (the later acquisition) is released
    // before `low`, the reverse of acquisition.
    _high: Option<M::Guard<'a>>,
    _low: M::Guard<'a>,
    first: &'a UnsafeCell<T>,
    second: &'a UnsafeCell<T>,
    stripes: (usize, usize),
    _held: Held,
}

/// Mutable access to both stripes of a [`PairGuard`].
#[derive(Debug)]
pub enum PairMut<'g, T> {
    /// Both keys hash to one stripe: its data, once.
    Single(&'g mut T),
    /// Two stripes: the data of `a`'s stripe, then of `b`'s.
    Distinct(&'g mut T, &'g mut T),
}

impl<'a, L, T, M: Access<L>> PairGuard<'a, L, T, M> {
    pub(crate) fn new(
        low: M::Guard<'a>,
        high: Option<M::Guard<'a>>,
        first: &'a UnsafeCell<T>,
        second: &'a UnsafeCell<T>,
        stripes: (usize, usize),
        held: Held,
    ) -> Self {
        debug_assert_eq!(high.is_none(), stripes.0 == stripes.1);
        PairGuard {
            _high: high,
            _low: low,
            first,
            second,
            stripes,
            _held: held,
        }
    }

    /// The stripes of `a` and `b`, in argument order.
    #[inline]
    pub fn stripes(&self) -> (usize, usize) {
        self.stripes
    }

    /// True when both keys hash to the same stripe, which is then locked
    /// once.
    #[inline]
    pub fn is_single(&self) -> bool {
        self.stripes.0 == self.stripes.1
    }

    /// True when this guard holds stripe `stripe`.
    #[inline]
    pub fn holds(&self, stripe: usize) -> bool {
        stripe == self.stripes.0 || stripe == self.stripes.1
    }

    /// The data of `a`'s stripe.
    #[inline]
    pub fn first(&self) -> &T {
        // SAFETY: `self` holds `a`'s stripe for its whole life.
        unsafe { shared(self.first) }
    }

    /// The data of `b`'s stripe (the same as [`first`](Self::first) when
    /// [`is_single`](Self::is_single)).
    #[inline]
    pub fn second(&self) -> &T {
        // SAFETY: `self` holds `b`'s stripe for its whole life.
        unsafe { shared(self.second) }
    }
}

impl<L: StripeLock, T> PairGuard<'_, L, T, Exclusive> {
    /// Mutable access to the data of `a`'s stripe.
    #[inline]
    pub fn first_mut(&mut self) -> &mut T {
        // SAFETY: exclusive mode; `&mut self` keeps the borrow unique.
        unsafe { exclusive(self.first) }
    }

    /// Mutable access to the data of `b`'s stripe.
    #[inline]
    pub fn second_mut(&mut self) -> &mut T {
        // SAFETY: exclusive mode; `&mut self` keeps the borrow unique.
        unsafe { exclusive(self.second) }
    }

    /// Mutable access to both stripes at once.
    #[inline]
    pub fn both_mut(&mut self) -> PairMut<'_, T> {
        if self.is_single() {
            // SAFETY: exclusive mode; one reference to the one stripe.
            PairMut::Single(unsafe { exclusive(self.first) })
        } else {
            // SAFETY: exclusive mode; the stripes differ, so the two cells
            // differ and the references do not alias.
            unsafe { PairMut::Distinct(exclusive(self.first), exclusive(self.second)) }
        }
    }
}

// SAFETY: as for `StripeGuard`: `&PairGuard` reaches only `&T` and indices.
unsafe impl<L, T: Sync, M: Access<L>> Sync for PairGuard<'_, L, T, M> {}

impl<L, T: fmt::Debug, M: Access<L>> fmt::Debug for PairGuard<'_, L, T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairGuard")
            .field("stripes", &self.stripes)
            .field("first", self.first())
            .field("second", self.second())
            .finish()
    }
}

/// Holds every stripe of an array; releases them from the last to the first.
#[must_use = "the stripes are released as soon as the guard is dropped"]
pub struct AllGuard<'a, L: 'a, T, M: Access<L> = Exclusive> {
    /// The lock guard of every stripe, in index order.
    locks: Vec<M::Guard<'a>>,
    /// The data of every stripe, in index order.
    data: Vec<&'a UnsafeCell<T>>,
    _held: Held,
}

impl<'a, L, T, M: Access<L>> AllGuard<'a, L, T, M> {
    pub(crate) fn new(locks: Vec<M::Guard<'a>>, data: Vec<&'a UnsafeCell<T>>, held: Held) -> Self {
        debug_assert_eq!(locks.len(), data.len());
        AllGuard {
            locks,
            data,
            _held: held,
        }
    }

    /// The data cells with their lifetime shortened to a borrow of `self`,
    /// so that iterators over them capture only that borrow.
    #[inline]
    fn cells(&self) -> &[&UnsafeCell<T>] {
        &self.data
    }

    /// The number of stripes held (all of them).
    #[inline]
    #[allow(clippy::len_without_is_empty)] // an array has at least one stripe
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// The data of stripe `stripe`, or `None` if out of range.
    #[inline]
    pub fn get(&self, stripe: usize) -> Option<&T> {
        // SAFETY: `self` holds every stripe for its whole life.
        self.data.get(stripe).map(|data| unsafe { shared(*data) })
    }

    /// The data of every stripe, in index order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &T> + '_ {
        // SAFETY: `self` holds every stripe for its whole life.
        self.cells().iter().map(|data| unsafe { shared(*data) })
    }
}

impl<L: StripeLock, T> AllGuard<'_, L, T, Exclusive> {
    /// Mutable access to the data of stripe `stripe`, or `None` if out of
    /// range.
    #[inline]
    pub fn get_mut(&mut self, stripe: usize) -> Option<&mut T> {
        // SAFETY: exclusive mode; `&mut self` keeps the borrow unique.
        self.data
            .get(stripe)
            .map(|data| unsafe { exclusive(*data) })
    }

    /// Mutable access to the data of every stripe, in index order.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = &mut T> + '_ {
        // SAFETY: exclusive mode; each entry is a distinct stripe, so the
        // references do not alias, and `&mut self` keeps them unique.
        self.cells().iter().map(|data| unsafe { exclusive(*data) })
    }
}

impl<L, T, M: Access<L>> Drop for AllGuard<'_, L, T, M> {
    fn drop(&mut self) {
        // Release in reverse index order, mirroring `lock_all`'s ascending
        // acquisition (a `Vec` would otherwise drop front to back).
        while let Some(lock) = self.locks.pop() {
            drop(lock);
        }
    }
}

// SAFETY: as for `StripeGuard`: `&AllGuard` reaches only `&T`.
unsafe impl<L, T: Sync, M: Access<L>> Sync for AllGuard<'_, L, T, M> {}

impl<L, T: fmt::Debug, M: Access<L>> fmt::Debug for AllGuard<'_, L, T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Read guards are the same types in [`Shared`] mode.
pub type StripeReadGuard<'a, L, T> = StripeGuard<'a, L, T, Shared>;
/// A [`PairGuard`] in [`Shared`] mode.
pub type PairReadGuard<'a, L, T> = PairGuard<'a, L, T, Shared>;
/// An [`AllGuard`] in [`Shared`] mode.
pub type AllReadGuard<'a, L, T> = AllGuard<'a, L, T, Shared>;
