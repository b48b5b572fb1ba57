//! The RCU domains the torture test drives, behind one small trait.
//!
//! Besides [`Rcu`] and [`Srcu`] there is [`Mismatched`], a deliberately
//! broken domain whose updaters wait for one `Srcu` instance while its
//! readers enter another: its grace periods ignore the readers. The torture
//! checks are run against it to prove they can fail.

use rcu_registry::rcu::{Rcu, RcuGuard, Srcu, SrcuGuard};

/// What the torture test needs from a domain.
pub trait TortureDomain: Clone + Send + Sync + 'static {
    /// A read-side critical section; it ends when dropped.
    type Guard<'a>
    where
        Self: 'a;

    /// Name used in the report.
    const NAME: &'static str;
    /// Whether readers may sleep inside their sections.
    const MAY_SLEEP: bool;

    /// Begins a read section.
    fn read(&self) -> Self::Guard<'_>;
    /// Waits for a grace period.
    fn synchronize(&self);
    /// Runs `f` after a grace period.
    fn call<C: FnOnce() + Send + 'static>(&self, f: C);
    /// Waits for every callback queued so far.
    fn barrier(&self);
    /// Grace periods this domain's updaters have completed.
    fn completed_gps(&self) -> u64;
    /// Callbacks this domain has run.
    fn callbacks_invoked(&self) -> u64;
}

impl TortureDomain for Rcu {
    type Guard<'a> = RcuGuard<'a>;
    const NAME: &'static str = "Rcu";
    const MAY_SLEEP: bool = false;

    fn read(&self) -> RcuGuard<'_> {
        Rcu::read(self)
    }
    fn synchronize(&self) {
        Rcu::synchronize(self)
    }
    fn call<C: FnOnce() + Send + 'static>(&self, f: C) {
        Rcu::call(self, f)
    }
    fn barrier(&self) {
        Rcu::barrier(self)
    }
    fn completed_gps(&self) -> u64 {
        self.stats().grace_periods
    }
    fn callbacks_invoked(&self) -> u64 {
        self.stats().callbacks_invoked
    }
}

impl TortureDomain for Srcu {
    type Guard<'a> = SrcuGuard<'a>;
    const NAME: &'static str = "Srcu";
    const MAY_SLEEP: bool = true;

    fn read(&self) -> SrcuGuard<'_> {
        Srcu::read(self)
    }
    fn synchronize(&self) {
        Srcu::synchronize(self)
    }
    fn call<C: FnOnce() + Send + 'static>(&self, f: C) {
        Srcu::call(self, f)
    }
    fn barrier(&self) {
        Srcu::barrier(self)
    }
    fn completed_gps(&self) -> u64 {
        self.stats().grace_periods
    }
    fn callbacks_invoked(&self) -> u64 {
        self.stats().callbacks_invoked
    }
}

/// A broken domain: readers use `readers`, grace periods and callbacks use
/// the unrelated `updaters`, so no grace period ever waits for a reader.
#[derive(Clone, Default)]
pub struct Mismatched {
    readers: Srcu,
    updaters: Srcu,
}

impl TortureDomain for Mismatched {
    type Guard<'a> = SrcuGuard<'a>;
    const NAME: &'static str = "Mismatched(broken)";
    const MAY_SLEEP: bool = true;

    fn read(&self) -> SrcuGuard<'_> {
        self.readers.read()
    }
    fn synchronize(&self) {
        self.updaters.synchronize()
    }
    fn call<C: FnOnce() + Send + 'static>(&self, f: C) {
        self.updaters.call(f)
    }
    fn barrier(&self) {
        self.updaters.barrier()
    }
    fn completed_gps(&self) -> u64 {
        self.updaters.stats().grace_periods
    }
    fn callbacks_invoked(&self) -> u64 {
        self.updaters.stats().callbacks_invoked
    }
}
