//! `RcuCell`: an RCU-protected, owned, optional pointer.
//!
//! Readers `load` through a read guard and get a reference whose lifetime is
//! tied to the guard; writers publish a new box with one atomic swap and hand
//! the old one to the domain's `call`, so it is dropped only after every
//! reader that could hold it has left.
//!
//! More: [`crate::docs::algorithms::callbacks`].

use super::{Flavor, Rcu};
use crate::sync::atomic::{AtomicPtr, Ordering};
use std::fmt;
use std::marker::PhantomData;
use std::ptr;

/// An RCU-protected `Option<Box<T>>`.
///
/// # Examples
///
/// ```
/// use rcu_registry::rcu::{Rcu, RcuCell};
///
/// let cell = RcuCell::new(1);
/// let rcu = Rcu::global();
/// let guard = rcu.read();
/// let one = cell.load(&guard);
/// cell.replace(2);                 // readers now see 2; `one` stays valid
/// assert_eq!(one, Some(&1));
/// assert_eq!(cell.load(&guard), Some(&2));
/// ```
///
/// A reference cannot outlive the guard it was loaded with:
///
/// ```compile_fail
/// use rcu_registry::rcu::{Rcu, RcuCell};
/// let cell = RcuCell::new(5);
/// let r = {
///     let guard = Rcu::global().read();
///     cell.load(&guard).unwrap()
/// };
/// println!("{r}");
/// ```
///
/// With the guard taken outside the block, so that it outlives the
/// reference, the same code compiles:
///
/// ```
/// use rcu_registry::rcu::{Rcu, RcuCell};
/// let cell = RcuCell::new(5);
/// let guard = Rcu::global().read();
/// let r = {
///     cell.load(&guard).unwrap()
/// };
/// println!("{r}");
/// ```
pub struct RcuCell<T: Send + Sync + 'static, F: Flavor = Rcu> {
    ptr: AtomicPtr<T>,
    domain: F,
    _owns: PhantomData<Box<T>>,
}

// SAFETY: the cell owns a `T` that readers on other threads may borrow
// (`Sync` needed) and that may be dropped on the callback worker (`Send`).
unsafe impl<T: Send + Sync + 'static, F: Flavor> Send for RcuCell<T, F> {}
// SAFETY: as above; all shared mutation is through the atomic pointer.
unsafe impl<T: Send + Sync + 'static, F: Flavor> Sync for RcuCell<T, F> {}

/// Moves a retired box to the callback worker.
struct Retired<T>(*mut T);
// SAFETY: the box is unreachable to readers once a grace period has passed,
// and `T: Send` lets it be dropped on another thread.
unsafe impl<T: Send> Send for Retired<T> {}

/// Old values of several [`RcuCell::replace_batched`] calls, dropped
/// together on the callback worker after one grace period: one callback
/// for a batch instead of one per replacement (a `dlclose` changes the
/// install lists of thousands of uprobes at once).
pub(crate) struct Retirements<T> {
    old: Vec<Retired<T>>,
}

impl<T: Send + Sync + 'static> Retirements<T> {
    /// Nothing retired yet.
    pub(crate) fn new() -> Self {
        Retirements { old: Vec::new() }
    }

    /// Drops every value gathered after a grace period of `domain`, which
    /// must be the domain of every cell they were published in. Does not
    /// wait.
    pub(crate) fn retire<F: Flavor>(self, domain: &F) {
        if self.old.is_empty() {
            return;
        }
        let old = self.old;
        domain.call(move || {
            for r in old {
                // SAFETY: each was unpublished before this call was queued,
                // so after the grace period no reader holds it; the boxes
                // are owned by this callback alone.
                drop(unsafe { Box::from_raw(r.0) });
            }
        });
    }
}

impl<T: Send + Sync + 'static> RcuCell<T, Rcu> {
    /// A cell holding `value`, protected by the global [`Rcu`] domain.
    pub fn new(value: T) -> Self {
        Self::new_in(value, Rcu::default())
    }

    /// An empty cell protected by the global [`Rcu`] domain.
    pub fn empty() -> Self {
        Self::empty_in(Rcu::default())
    }
}

impl<T: Send + Sync + 'static, F: Flavor> RcuCell<T, F> {
    /// A cell holding `value`, protected by `domain`.
    pub fn new_in(value: T, domain: F) -> Self {
        RcuCell {
            ptr: AtomicPtr::new(Box::into_raw(Box::new(value))),
            domain,
            _owns: PhantomData,
        }
    }

    /// An empty cell protected by `domain`.
    pub fn empty_in(domain: F) -> Self {
        RcuCell {
            ptr: AtomicPtr::new(ptr::null_mut()),
            domain,
            _owns: PhantomData,
        }
    }

    /// The domain protecting this cell.
    pub fn domain(&self) -> &F {
        &self.domain
    }

    /// The current value, valid for as long as `guard` lives.
    ///
    /// # Panics
    ///
    /// If `guard` belongs to a domain whose grace periods do not protect this
    /// cell (another [`Srcu`](super::Srcu) instance).
    #[inline]
    pub fn load<'g>(&'g self, guard: &'g F::Guard<'_>) -> Option<&'g T> {
        assert!(
            self.domain.protects(guard),
            "RcuCell::load: the guard belongs to another RCU domain"
        );
        // Acquire pairs with the Release in `publish`: the pointee's
        // initialisation is visible before we dereference it.
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: a non-null pointer was published by `publish` from a live box; it is retired only
        // through `domain.call` (or after the domain's synchronize), so it stays valid while
        // `guard`, a read section this domain waits for, lives.
        unsafe { p.as_ref() }
    }

    fn publish(&self, new: *mut T) -> *mut T {
        // AcqRel: Release publishes the new value's initialisation to
        // readers' Acquire loads; Acquire makes the old value's contents
        // ours to drop.
        self.ptr.swap(new, Ordering::AcqRel)
    }

    fn retire(&self, old: *mut T) {
        if old.is_null() {
            return;
        }
        let retired = Retired(old);
        self.domain.call(move || {
            let retired = retired;
            // SAFETY: unpublished before the call, so after the grace period
            // no reader holds it; the box is owned by this callback alone.
            drop(unsafe { Box::from_raw(retired.0) });
        });
    }

    /// Publishes `value`; the previous value (if any) is dropped on the
    /// domain's callback worker after a grace period. Does not wait.
    pub fn replace(&self, value: T) {
        let old = self.publish(Box::into_raw(Box::new(value)));
        self.retire(old);
    }

    /// Publishes `value` (or empties the cell) and hands the previous
    /// value to `into`, which drops it after a grace period of this cell's
    /// domain ([`Retirements::retire`]). Does not wait.
    pub(crate) fn replace_batched(&self, value: Option<T>, into: &mut Retirements<T>) {
        let new = value.map_or(ptr::null_mut(), |v| Box::into_raw(Box::new(v)));
        let old = self.publish(new);
        if !old.is_null() {
            into.old.push(Retired(old));
        }
    }

    /// Empties the cell; the previous value is dropped after a grace period.
    /// Returns whether there was one. Does not wait.
    pub fn take(&self) -> bool {
        let old = self.publish(ptr::null_mut());
        let had = !old.is_null();
        self.retire(old);
        had
    }

    /// Publishes `value` (or empties the cell), waits for a grace period and
    /// returns the previous value, which no reader can still see.
    ///
    /// # Panics
    ///
    /// If called inside a read section of the domain.
    pub fn swap(&self, value: Option<T>) -> Option<T> {
        let new = value.map_or(ptr::null_mut(), |v| Box::into_raw(Box::new(v)));
        let old = self.publish(new);
        self.domain.synchronize();
        // SAFETY: unpublished, and a grace period has passed: no reader
        // holds it; we own the box.
        (!old.is_null()).then(|| *unsafe { Box::from_raw(old) })
    }

    /// Exclusive access: no reader can hold a reference while `&mut self`
    /// exists (loads borrow the cell).
    pub fn get_mut(&mut self) -> Option<&mut T> {
        // Relaxed: `&mut self` means no other thread can touch the cell.
        let p = self.ptr.load(Ordering::Relaxed);
        // SAFETY: `&mut self` excludes every borrow from `load`, and the
        // pointer is either null or an owned live box.
        unsafe { p.as_mut() }
    }

    /// The value, if any.
    pub fn into_inner(self) -> Option<T> {
        // Relaxed: we own the cell.
        let p = self.ptr.swap(ptr::null_mut(), Ordering::Relaxed);
        // SAFETY: we own the cell and no reference from `load` can be alive
        // (they borrow the cell).
        (!p.is_null()).then(|| *unsafe { Box::from_raw(p) })
    }
}

impl<T: Send + Sync + 'static, F: Flavor> Drop for RcuCell<T, F> {
    fn drop(&mut self) {
        // Relaxed: dropping means exclusive ownership.
        let p = self.ptr.load(Ordering::Relaxed);
        if !p.is_null() {
            // SAFETY: loads borrow the cell, so none is alive while it drops;
            // the box is owned by the cell.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

impl<T: Send + Sync + 'static + fmt::Debug, F: Flavor> fmt::Debug for RcuCell<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let guard = self.domain.read();
        f.debug_struct("RcuCell")
            .field("value", &self.load(&guard))
            .finish()
    }
}
