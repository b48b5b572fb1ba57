//! [`Kretprobe`]: a probe on a function's return, built from an entry probe
//! that hijacks the return address.
//!
//! # Entry
//!
//! The kretprobe's entry probe sits on the function's first instruction. On
//! a hit it takes a preallocated instance from the kretprobe's pool (none
//! free: `nmissed`, the call goes untracked), lets the `entry_handler`
//! fill the instance's data or decline (the instance goes straight back),
//! replaces the return address with the registry's trampoline
//! ([`Arch::hijack_return`]), and files the instance under the calling thread
//! in the registry's [`InstanceTable`](super::instances). The hit path never
//! allocates: the pool (instances, their data and the free list's capacity)
//! is allocated when the kretprobe is built.
//!
//! # Return
//!
//! When the function returns into the trampoline, the registry's
//! [`on_return`](super::KprobeRegistry::on_return) finds the thread's
//! instances for that stack pointer, runs each return handler with the
//! instance's data and the return value, restores the real return address
//! and gives the instances back to their pools.
//!
//! # Orphans
//!
//! Unregistering a kretprobe marks it orphaned before its grace period: from
//! then on entries track nothing and returns run no handler. Calls already in
//! flight keep their instances; when they return, the trampoline still finds
//! them, restores the real return address and puts them back. The pool's
//! memory is freed by the registry once every instance is back (checked by
//! each later registry operation and at drop), never from the trap path, so
//! nothing leaks and no pointer dangles. A call that never returns (its
//! thread exits inside it) gives its instance back through the thread-exit
//! flush (`thread_exit.rs`), orphaned or not.

use std::fmt;
use std::ptr::NonNull;
// `std`'s Arc even under loom, as in `rcu/callbacks.rs`: loom's Arc cannot coerce
// to `Arc<dyn ReturnProbe>`, and reference counts are not what the models check.
use std::sync::{Arc, Weak};

use super::instances::InstanceHdr;
use super::probe::{Handlers, Kprobe, ProbeId, Target};
use crate::probes::arch::Regs;
use crate::probes::percpu::HitCounter;
use crate::probes::ProbeError;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::UnsafeCell;

/// What an entry handler decides for the call it sees: whether its return
/// is tracked. Not an [`Action`](crate::probes::outcome::Action): an entry
/// handler cannot skip the function's first instruction, it decides about
/// the return (see `Action` for the three answers and why they differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryAction {
    /// Track the call: the return handler runs when it returns.
    Track,
    /// Do not track this call: the instance goes back to the pool and the
    /// return address is left alone.
    Decline,
}

/// An entry handler: sees the registers at the function's entry and the
/// instance's data (left as the previous call that used the instance left
/// it, `D::default()` the first time).
pub type EntryHandler<D> = Box<dyn Fn(&mut D, &mut Regs) -> EntryAction + Send + Sync>;

/// A return handler: sees the instance's data, the registers at the return
/// and the integer return value.
pub type ReturnHandler<D> = Box<dyn Fn(&mut D, &mut Regs, u64) + Send + Sync>;

/// A kretprobe as the registry sees it, whatever its data type.
pub(crate) trait ReturnProbe: Send + Sync + 'static {
    /// Gives the returns counter its per-CPU slots (`probes/percpu.rs`):
    /// the site may be served without a trap. Allocates.
    fn count_per_cpu(&self);

    /// The entry probe was hit (handlers may run: not re-entered): takes
    /// an instance and runs the entry handler on it. `None` when the call
    /// is not to be tracked (unregistered, the pool empty: a miss counted,
    /// or the entry handler declined). The registry hijacks the return and
    /// files the instance (`hit.rs`, `track_call`), or gives it back with
    /// [`abandon`](Self::abandon): the registry knows its architecture and
    /// memory as concrete types, this trait object does not.
    fn begin(&self, regs: &mut Regs) -> Option<NonNull<InstanceHdr>>;

    /// Gives back an instance from [`begin`](Self::begin) whose call cannot
    /// be tracked (its return address is unreadable): counted as missed.
    ///
    /// # Safety
    /// `inst` came from this kretprobe's `begin` and was never filed.
    unsafe fn abandon(&self, inst: NonNull<InstanceHdr>);

    /// The call tracked by `inst` returned: runs the return handler when
    /// `run_handler` and the kretprobe is not orphaned, then puts the
    /// instance back. The kretprobe may be freed as soon as this returns.
    ///
    /// # Safety
    /// `inst` is one of this kretprobe's instances, unlinked from the table
    /// and owned by the caller.
    unsafe fn on_return(
        &self,
        inst: NonNull<InstanceHdr>,
        regs: &mut Regs,
        retval: u64,
        run_handler: bool,
    );

    /// Puts back an instance whose call will never return through the
    /// trampoline (abandoned frame, registry teardown).
    ///
    /// # Safety
    /// As for [`on_return`](Self::on_return).
    unsafe fn recycle(&self, inst: NonNull<InstanceHdr>);

    /// Stops tracking new calls and running handlers (unregistration).
    fn orphan(&self);

    /// Tracks calls again (registration).
    fn adopt(&self);

    /// Instances not in the pool (tracked calls, entries in progress).
    fn instances_out(&self) -> usize;
}

#[repr(C)]
struct Instance<D> {
    hdr: InstanceHdr,
    data: UnsafeCell<D>,
}

/// A kretprobe's preallocated instances and their free set: one flag per
/// instance, true while the instance is free.
///
/// Taking an instance is one compare-and-swap of a free flag (the first
/// free one from the start of the set), giving it back a release store: no
/// lock, one locked instruction per tracked call (the spin lock, free-list
/// vector and separate in-flight counter this replaced took four), and at
/// most `slots.len()` instances are ever out, which is what `maxactive`
/// promises. A taker that loses a flag to another thread goes on to the
/// next (lock-free: some thread won). The set is always consistent, so a
/// `fork` needs nothing held: an instance out in the parent is out in the
/// child too, exactly as with the lock (the thread that had it does not
/// exist there). Taking scans the flags, `maxactive` at worst (an empty
/// pool); the flags are packed, 64 to a cache line.
struct Pool<D> {
    slots: Box<[Instance<D>]>,
    /// `free[i]`: instance `i` is free.
    free: Box<[AtomicBool]>,
}

impl<D> Pool<D> {
    fn new(slots: Box<[Instance<D>]>) -> Self {
        let free = (0..slots.len()).map(|_| AtomicBool::new(true)).collect();
        Pool { slots, free }
    }

    fn get(&self) -> Option<u32> {
        self.free
            .iter()
            .position(|f| {
                // Relaxed: only picks a candidate; the CAS decides.
                f.load(Ordering::Relaxed)
                    // Acquire pairs with the Release store in `put`: the
                    // previous user's accesses to the instance happen-before
                    // ours.
                    && f.compare_exchange(true, false, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
            })
            .map(|i| i as u32)
    }

    /// Gives `idx` back. The pool (and its kretprobe) may be freed as soon as
    /// the flag is visible: nothing may touch them afterwards.
    fn put(&self, idx: u32) {
        let f = &self.free[idx as usize];
        // Relaxed: a debug check of this thread's own instance.
        debug_assert!(
            !f.load(Ordering::Relaxed),
            "kretprobe instance given back twice"
        );
        // Release pairs with the Acquire CAS in `get` (the next user) and the
        // Acquire loads in `out` (the registry's reaper): every use of the
        // instance and the pool happens-before either.
        f.store(true, Ordering::Release);
    }

    /// Instances not free.
    fn out(&self) -> usize {
        self.free
            .iter()
            // Acquire pairs with the Release store in `put`.
            .filter(|f| !f.load(Ordering::Acquire))
            .count()
    }
}

impl<D> Drop for Pool<D> {
    fn drop(&mut self) {
        // A pool is freed only when every instance is back: the registry
        // reaps orphans at `out == 0` and recycles filed instances before it
        // drops. (Under loom this access also checks that the last `put` is
        // ordered before the free.)
        debug_assert_eq!(self.out(), 0, "kretprobe pool freed with instances out");
    }
}

pub(crate) struct KretShared<D> {
    entry: Option<EntryHandler<D>>,
    handler: Option<ReturnHandler<D>>,
    pool: Pool<D>,
    orphaned: AtomicBool,
    nmissed: AtomicU64,
    /// Per-CPU slots: counted on every return without a locked instruction
    /// (`probes/percpu.rs`).
    returns: HitCounter,
}

// SAFETY: instance data is used by one thread at a time (handed over via the
// pool and table locks), so `D: Send` suffices; owner pointers are self-refs.
unsafe impl<D: Send> Send for KretShared<D> {}
// SAFETY: as above; shared access goes through atomics, locks, or the
// one-owner-at-a-time instance protocol.
unsafe impl<D: Send> Sync for KretShared<D> {}

impl<D: Send + 'static> ReturnProbe for KretShared<D> {
    fn count_per_cpu(&self) {
        self.returns.per_cpu();
    }

    fn begin(&self, regs: &mut Regs) -> Option<NonNull<InstanceHdr>> {
        // Acquire pairs with the Release in `orphan`; the grace period of the
        // unregistration is what guarantees no entry runs after it.
        if self.orphaned.load(Ordering::Acquire) {
            return None;
        }
        let Some(idx) = self.pool.get() else {
            // Relaxed: statistics counter.
            self.nmissed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let inst = &self.pool.slots[idx as usize];
        if let Some(entry) = &self.entry {
            // SAFETY: the instance is ours alone: out of the pool, not filed.
            let act = inst.data.with_mut(|d| entry(unsafe { &mut *d }, regs));
            if act == EntryAction::Decline {
                self.pool.put(idx);
                return None;
            }
        }
        Some(NonNull::from(&inst.hdr))
    }

    /// # Safety
    /// As [`ReturnProbe::abandon`].
    unsafe fn abandon(&self, inst: NonNull<InstanceHdr>) {
        // Relaxed: statistics counter.
        self.nmissed.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's instance, of this pool (contract).
        self.pool.put(unsafe { inst.as_ref().index });
    }

    /// # Safety
    /// As [`ReturnProbe::on_return`].
    unsafe fn on_return(
        &self,
        inst: NonNull<InstanceHdr>,
        regs: &mut Regs,
        retval: u64,
        run_handler: bool,
    ) {
        // SAFETY: the caller owns the instance (contract).
        let idx = unsafe { inst.as_ref().index };
        let slot = &self.pool.slots[idx as usize];
        if !run_handler {
            // Relaxed: statistics counter.
            self.nmissed.fetch_add(1, Ordering::Relaxed);
        // Acquire pairs with `orphan`'s Release (see `on_entry`).
        } else if !self.orphaned.load(Ordering::Acquire) {
            self.returns.add_one();
            if let Some(h) = &self.handler {
                // SAFETY: the instance is ours alone until `put`.
                slot.data.with_mut(|d| h(unsafe { &mut *d }, regs, retval));
            }
        }
        self.pool.put(idx);
    }

    /// # Safety
    /// As [`ReturnProbe::recycle`].
    unsafe fn recycle(&self, inst: NonNull<InstanceHdr>) {
        // SAFETY: the caller owns the instance (contract).
        let idx = unsafe { inst.as_ref().index };
        self.pool.put(idx);
    }

    fn orphan(&self) {
        // Release: pairs with the Acquire loads on the hit paths.
        self.orphaned.store(true, Ordering::Release);
    }

    fn adopt(&self) {
        // Release: as `orphan`; the registration's publication also orders it.
        self.orphaned.store(false, Ordering::Release);
    }

    fn instances_out(&self) -> usize {
        self.pool.out()
    }
}

/// A probe on a function's return, with per-call data `D`.
///
/// Clones are handles to the same kretprobe. Register it with
/// [`KprobeRegistry::register_kretprobe`](super::KprobeRegistry::register_kretprobe).
///
/// # Handler contract
///
/// The entry handler runs **inside the SIGTRAP handler** (a kprobe at the
/// function's entry), the return handler in the return trampoline on the
/// returning thread's stack; both are held to the kprobe handlers' rules:
/// async-signal-safe work only, never a lock the probed code may hold (it
/// deadlocks), no allocation unless no probe is on the allocator's locked
/// paths, no `println!`, stack headroom for the hit (about 4 KiB, plus the
/// trampoline's saved vector state), and **a panic aborts the process**
/// with a message on stderr. In full:
/// [the handler contract](crate::docs::patterns#the-handler-contract).
///
/// ```
/// use rcu_registry::probes::kprobe::{EntryAction, Kretprobe};
///
/// // Measure each call's return value, remembering the first argument.
/// let krp = Kretprobe::symbol("parse", 0).data::<u64>()
///     .maxactive(4)
///     .entry_handler(|arg, regs| {
///         *arg = regs.arg(0).unwrap_or_default();
///         EntryAction::Track
///     })
///     .handler(|arg, _regs, ret| println!("parse({arg}) = {ret}"))
///     .build()
///     .unwrap();
/// assert_eq!(krp.maxactive(), 4);
/// ```
pub struct Kretprobe<D: Send + 'static = ()> {
    probe: Kprobe,
    shared: Arc<KretShared<D>>,
}

impl<D: Send + 'static> Clone for Kretprobe<D> {
    fn clone(&self) -> Self {
        Kretprobe {
            probe: self.probe.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Kretprobe {
    /// A builder for a kretprobe on the function starting at `addr`, with no
    /// per-call data; [`KretprobeBuilder::data`] adds some.
    pub fn at(addr: u64) -> KretprobeBuilder<()> {
        KretprobeBuilder::new(Target::Address(addr))
    }

    /// A builder for a kretprobe at `offset` bytes into the function `name`,
    /// as [`Kprobe::symbol`]. A kretprobe must sit on the function's first
    /// instruction: any `offset` but 0 is refused at registration
    /// ([`ProbeError::NotAtFunctionEntry`]); the parameter is there so both
    /// kinds are placed the same way.
    pub fn symbol(name: impl Into<String>, offset: u64) -> KretprobeBuilder<()> {
        KretprobeBuilder::new(Target::Symbol {
            name: name.into(),
            offset,
        })
    }
}

impl<D: Send + 'static> Kretprobe<D> {
    /// The entry probe (its hits count the entries seen).
    pub fn probe(&self) -> &Kprobe {
        &self.probe
    }

    /// The probe's identity (that of its entry probe).
    pub fn id(&self) -> ProbeId {
        self.probe.id()
    }

    /// Size of the instance pool: the most calls tracked at once.
    pub fn maxactive(&self) -> usize {
        self.shared.pool.slots.len()
    }

    /// Calls whose return handler did not run although they entered the
    /// function while the kretprobe was registered and enabled, whatever
    /// the reason: the entry hit came while the thread was already running
    /// a probe handler (counted on the entry probe too:
    /// `probe().nmissed()`), the pool was empty, the return address could
    /// not be read, or the return came while the thread was running a
    /// probe handler. Calls an entry handler
    /// [declined](EntryAction::Decline) are not missed. So for calls that
    /// started and ended while registered, `returns() + nmissed()` plus the
    /// declined ones is the number of calls. The one meaning for both
    /// kinds: a hit whose handlers did not run ([`Kprobe::nmissed`] is the
    /// part of this count at the entry).
    pub fn nmissed(&self) -> u64 {
        // Relaxed: statistics counters.
        self.shared.nmissed.load(Ordering::Relaxed) + self.probe.nmissed()
    }

    /// Returns seen: calls tracked from entry to return whose return ran the
    /// return handler (or would have, without one).
    pub fn returns(&self) -> u64 {
        self.shared.returns.get()
    }

    /// Calls currently tracked (instances out of the pool), counted by
    /// entries: each execution of the probed instruction while registered
    /// is an entry, whether or not a `bl`/`call` led there. So a function
    /// whose own loop branches back to its first instruction (hand-written
    /// code; compilers put a prologue there) is entered again at every
    /// iteration, its return address (already the trampoline) hijacked
    /// again, until the pool is empty ([`maxactive`](Self::maxactive) in
    /// flight for one frame, and [`nmissed`](Self::nmissed) growing); its
    /// one real return then unwinds every tracked entry, one return each.
    ///
    /// Unregistering does not end a call in flight: it keeps its instance
    /// (which holds the real return address) until it returns, so this
    /// still counts it afterwards, and it reaches 0 only once those calls
    /// returned (their return handlers no longer run).
    pub fn in_flight(&self) -> usize {
        self.shared.instances_out()
    }
}

impl<D: Send + 'static> super::probe::AsKprobe for Kretprobe<D> {
    fn as_kprobe(&self) -> &Kprobe {
        &self.probe
    }
}

impl<D: Send + 'static> fmt::Debug for Kretprobe<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kretprobe")
            .field("probe", &self.probe)
            .field("maxactive", &self.maxactive())
            .field("nmissed", &self.nmissed())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Builds a [`Kretprobe`].
#[must_use = "a builder does nothing until built"]
pub struct KretprobeBuilder<D> {
    target: Target,
    maxactive: Option<usize>,
    entry: Option<EntryHandler<D>>,
    handler: Option<ReturnHandler<D>>,
}

/// The default pool size: `max(10, 2 x CPUs)`, as the kernel sizes it (each
/// CPU can be inside the function twice, e.g. once in an interrupt).
pub fn default_maxactive() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cpus).max(10)
}

impl KretprobeBuilder<()> {
    /// Gives each tracked call a `E` (default-initialised once per pool
    /// instance), which the entry handler fills and the return handler
    /// reads: `Kretprobe::at(a).data::<Instant>()`. Handlers set before keep
    /// running and ignore the data; set them after to see it.
    pub fn data<E: Send + Default + 'static>(self) -> KretprobeBuilder<E> {
        let entry = self.entry.map(|f| -> EntryHandler<E> {
            Box::new(move |_: &mut E, regs: &mut Regs| f(&mut (), regs))
        });
        let handler = self.handler.map(|f| -> ReturnHandler<E> {
            Box::new(move |_: &mut E, regs: &mut Regs, ret| f(&mut (), regs, ret))
        });
        KretprobeBuilder {
            target: self.target,
            maxactive: self.maxactive,
            entry,
            handler,
        }
    }
}

impl<D: Send + Default + 'static> KretprobeBuilder<D> {
    fn new(target: Target) -> Self {
        KretprobeBuilder {
            target,
            maxactive: None,
            entry: None,
            handler: None,
        }
    }

    /// The most calls tracked at once (default [`default_maxactive`]).
    pub fn maxactive(mut self, n: usize) -> Self {
        self.maxactive = Some(n);
        self
    }

    /// Sets the entry handler.
    pub fn entry_handler(
        mut self,
        f: impl Fn(&mut D, &mut Regs) -> EntryAction + Send + Sync + 'static,
    ) -> Self {
        self.entry = Some(Box::new(f));
        self
    }

    /// Sets the return handler.
    pub fn handler(mut self, f: impl Fn(&mut D, &mut Regs, u64) + Send + Sync + 'static) -> Self {
        self.handler = Some(Box::new(f));
        self
    }

    /// The kretprobe, with its pool allocated.
    ///
    /// # Errors
    /// [`ProbeError::MaxActiveZero`] for `maxactive(0)`.
    ///
    /// # Panics
    /// If `maxactive` exceeds `u32::MAX`.
    pub fn build(self) -> Result<Kretprobe<D>, ProbeError> {
        let n = self.maxactive.unwrap_or_else(default_maxactive);
        if n == 0 {
            return Err(ProbeError::MaxActiveZero);
        }
        assert!(u32::try_from(n).is_ok(), "maxactive {n} exceeds u32::MAX");
        let (entry, handler) = (self.entry, self.handler);
        let shared = Arc::new_cyclic(|me: &Weak<KretShared<D>>| {
            let owner: *const dyn ReturnProbe = me.as_ptr();
            KretShared {
                entry,
                handler,
                pool: Pool::new(
                    (0..n as u32)
                        .map(|i| Instance {
                            hdr: InstanceHdr::new(owner, i),
                            data: UnsafeCell::new(D::default()),
                        })
                        .collect(),
                ),
                orphaned: AtomicBool::new(false),
                nmissed: AtomicU64::new(0),
                returns: HitCounter::new(),
            }
        });
        let probe = Kprobe::from_parts(
            self.target,
            Handlers::Return(Arc::clone(&shared) as Arc<dyn ReturnProbe>),
            true,
        );
        Ok(Kretprobe { probe, shared })
    }
}
