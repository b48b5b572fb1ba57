//! RCU domains: read-copy-update for userspace.
//!
//! # The idea
//!
//! Readers run inside *read-side critical sections* (a guard returned by
//! `read()`) and never wait for anyone. Updaters publish a new version of the
//! data, unlink the old one, and reclaim it only after a *grace period*: a span
//! of time after which every read section that might have seen the old version
//! has ended. [`Flavor::synchronize`] waits for one grace period;
//! [`Flavor::call`] queues a callback to run after one, without waiting.
//!
//! # Two domains
//!
//! - [`Rcu`], *sched-like*: the cheapest possible read side (a thread-local
//!   store and a compiler fence, no atomic read-modify-write, no fence
//!   instruction, no allocation, no lock) and usable from a signal handler,
//!   even on a thread that has never touched the library. Read sections must
//!   not block for long: every `Rcu` updater in the process waits for them.
//! - [`Srcu`], *sleepable*: read sections may block for any time, and only
//!   updaters of the same `Srcu` instance wait for them.
//!
//! Both implement [`Flavor`], so data structures ([`RcuCell`],
//! [`SeqTree`](crate::seqtree::SeqTree)) are generic over the domain.
//!
//! # Grace periods are shared
//!
//! Every domain numbers its grace periods. A caller of `synchronize()` only
//! needs *some* grace period that started after it was called; concurrent
//! callers therefore share them, and N simultaneous callers cost one or two
//! grace periods, not N. Callbacks queued with `call()` are batched: one grace
//! period serves every callback queued before it started. [`GpCookie`]s from
//! `start_poll()` expose the same numbering to callers that prefer to poll.

mod callbacks;
mod cell;
mod gp;
mod sched;
mod slots;
mod srcu;

pub use cell::RcuCell;
pub(crate) use cell::Retirements;
#[cfg_attr(loom, allow(unused_imports))]
pub(crate) use sched::TrapReader;
pub use sched::{DomainStats, Rcu, RcuGuard};
pub use srcu::{Srcu, SrcuGuard, SrcuToken};

/// A grace-period cookie from `start_poll()`.
///
/// It names the first grace period that starts after the cookie was taken.
/// Once that grace period has completed, [`Flavor::poll`] returns `true` and
/// every read section that was running when the cookie was taken has ended.
/// A cookie is only meaningful to the domain that issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use = "a cookie does nothing unless polled"]
pub struct GpCookie {
    pub(crate) seq: u64,
}

/// A read-side critical section of some RCU domain: the marker trait every
/// domain's read guard ([`RcuGuard`], [`SrcuGuard`]) implements, and the
/// bound of [`Flavor::Guard`].
///
/// Data protected by the domain may be dereferenced for as long as the guard
/// lives. Guards are `!Send`: a read section belongs to the thread that began
/// it (see [`SrcuGuard::into_token`] for the one sanctioned exception).
pub trait ReadSection {}

/// An RCU domain: the operations data structures need, generic over
/// [`Rcu`] and [`Srcu`].
///
/// A `Flavor` value is a cheap, clonable *handle* to a domain: clones refer to
/// the same domain and share its grace periods and callback queue.
pub trait Flavor: Clone + Default + Send + Sync + 'static {
    /// The read guard of this domain.
    type Guard<'a>: ReadSection
    where
        Self: 'a;

    /// Begins a read-side critical section; it ends when the guard drops.
    /// Read sections nest.
    fn read(&self) -> Self::Guard<'_>;

    /// As [`read`](Self::read), for a probe runtime's trap path, which must
    /// call no C-library function: [`Rcu`]'s claims the thread's reader slot
    /// without arming its release at thread exit (a C-library call) until
    /// [`arm_reader`](Self::arm_reader). The default is `read` (for a domain
    /// whose read section may allocate, such as [`Srcu`]: not for a trap
    /// path).
    #[doc(hidden)]
    fn read_in_trap(&self) -> Self::Guard<'_> {
        self.read()
    }

    /// Arms what [`read_in_trap`](Self::read_in_trap) left unarmed for the
    /// calling thread (where calling the C library is safe). The default
    /// does nothing.
    #[doc(hidden)]
    fn arm_reader(&self) {}

    /// Whether `guard` is a read section that this domain's grace periods wait
    /// for. Data structures check this before trusting a caller's guard, so a
    /// guard of one [`Srcu`] cannot be used to read data that another `Srcu`
    /// instance reclaims. Always true for [`Rcu`] (its readers are
    /// process-wide).
    fn protects(&self, guard: &Self::Guard<'_>) -> bool;

    /// Waits until every read section that began before the call has ended.
    ///
    /// # Panics
    ///
    /// If called inside a read section of this domain (it would deadlock).
    fn synchronize(&self);

    /// Queues `f` to run on the domain's callback worker after a grace period.
    /// Never waits for a grace period (it may briefly wait for the worker to
    /// drain a flood of callbacks, and never inside a read section).
    fn call<C: FnOnce() + Send + 'static>(&self, f: C);

    /// Returns once every callback queued (by any thread) before the call
    /// has run.
    ///
    /// # Panics
    ///
    /// If called inside a read section of this domain, or from a callback.
    fn barrier(&self);

    /// Takes a cookie for the first grace period that starts after now, and
    /// makes sure such a grace period will happen without further calls.
    fn start_poll(&self) -> GpCookie;

    /// Whether the grace period named by `cookie` has completed.
    fn poll(&self, cookie: &GpCookie) -> bool;

    /// Waits for the grace period named by `cookie` unless it already
    /// completed (then returns at once).
    fn cond_synchronize(&self, cookie: GpCookie) {
        if !self.poll(&cookie) {
            self.synchronize();
        }
    }
}
