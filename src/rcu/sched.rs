//! `Rcu`: the sched-like domain, with the cheapest possible readers.
//!
//! # Read side
//!
//! Each thread owns a reader slot (see `slots.rs`) holding a counter: the
//! nesting depth in the low bits and a *phase* bit. The outermost `read()`
//! copies the global counter (`GP_CTR`, which carries the current phase and a
//! nesting count of one) into the slot; nested ones add one. Leaving
//! subtracts one. Both are a plain load and store by the owning thread
//! followed or preceded by a compiler fence: no read-modify-write, no fence
//! instruction, no allocation, no lock. A signal handler that interrupts
//! either step restores the counter before returning, so sections nest
//! correctly across signals too.
//!
//! # Asymmetric barriers
//!
//! The compiler fences are half of a barrier pair; the updater supplies the
//! other half with `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which runs
//! a full barrier on every running thread of the process. Where membarrier is
//! unavailable the readers' fences become real `SeqCst` fences (one predicted
//! branch on a process-wide flag decides).
//!
//! # Grace periods
//!
//! The updater (one leader at a time, see `gp.rs`): heavy barrier; wait until
//! no slot is inside a section that began in the *old* phase; flip the phase;
//! wait again; heavy barrier. Two waits are needed because a reader may have
//! read the phase just before a flip and stored it just after the updater
//! looked: the second flip's wait catches it. Waiting spins briefly, then
//! arms a futex and sleeps; the last reader to leave wakes it.
//!
//! All `Rcu` handles share the readers and the grace periods (readers are
//! process-wide, as in the kernel); each `Rcu::new()` has its own callback
//! queue, worker and barrier.

use super::callbacks::CallbackQueue;
use super::gp::{self, GpSeq, GracePeriod, SLEEP_SLICE};
use super::slots::{self, Slot, GP_FUTEX, GP_WAITING};
use super::{Flavor, GpCookie, ReadSection};
use crate::sync::atomic::{fence, AtomicUsize, Ordering};
use crate::sync::{heavy_barrier, light_barrier, light_barrier_in, membarrier_mode, Backoff};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// One nesting level in a reader counter.
const NEST_ONE: usize = 1;
/// The nesting-count bits of a reader counter.
const NEST_MASK: usize = (1 << (usize::BITS / 2)) - 1;
/// The phase bit, above the nesting count.
const PHASE: usize = 1 << (usize::BITS / 2);

/// The process-wide grace-period state shared by every `Rcu` handle.
struct Global {
    /// The value an outermost reader copies: current phase | NEST_ONE.
    gp_ctr: AtomicUsize,
    seq: GpSeq,
}

#[cfg(not(loom))]
static GLOBAL: Global = Global {
    gp_ctr: AtomicUsize::new(NEST_ONE),
    seq: GpSeq::new_const(),
};

#[cfg(loom)]
crate::sync::lazy_static! {
    static ref GLOBAL: Global = Global { gp_ctr: AtomicUsize::new(NEST_ONE), seq: GpSeq::new() };
}

/// The grace-period engine of the sched-like domain.
struct SchedGp;

impl GracePeriod for SchedGp {
    fn seq(&self) -> &GpSeq {
        &GLOBAL.seq
    }

    fn run(&self, expedited: bool) {
        // Heavy barrier: the updates made before this grace period was
        // requested (ordered before our start by GpSeq) are visible to every
        // reader whose counter store we do not see in the scan below. Pairs
        // with the light barrier after the counter store in `read()`.
        heavy_barrier();
        let phase = GLOBAL.gp_ctr.load(Ordering::Relaxed) & PHASE;
        wait_for_readers(phase, expedited);
        // SeqCst fences around the flip (writer-side only): the first wait's
        // loads complete before the flip is visible, and the flip is visible
        // before the second wait's loads.
        fence(Ordering::SeqCst);
        // Only the leader writes `gp_ctr`; Relaxed suffices for the store
        // itself, the fences order it.
        GLOBAL
            .gp_ctr
            .store(phase ^ PHASE | NEST_ONE, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        wait_for_readers(phase ^ PHASE, expedited);
        // Heavy barrier: every reader section we waited out completed its
        // accesses before what the caller does next (free memory). Pairs with
        // the light barrier before the counter store in `RcuGuard::drop`.
        heavy_barrier();
    }
}

/// Whether `slot` is inside a read section that began in a phase other than
/// `phase`.
#[inline]
fn is_old_reader(slot: &Slot, phase: usize) -> bool {
    // Relaxed: ordering comes from the heavy barriers around the scan.
    let v = slot.ctr.load(Ordering::Relaxed);
    v & NEST_MASK != 0 && (v & PHASE) != phase
}

fn any_old_reader(phase: usize) -> bool {
    let mut found = false;
    slots::for_each_slot(|s| found |= is_old_reader(s, phase));
    found
}

/// Scans a normal grace period makes, spinning, before it arms the futex and
/// sleeps until the last old reader wakes it. Spinning only, never
/// `yield_now()`: a reader wakes only a waiter that armed the futex, so a
/// waiter that yielded on a loaded machine stays off the CPU for whole time
/// slices after the reader has left (measured: median `synchronize()` behind
/// a reader with 1 ms sections 3.6 ms with crossbeam's spin-then-yield
/// backoff, 0.64 ms like this, as liburcu-memb's 100 busy attempts).
#[cfg(not(loom))]
const READER_SPINS: u32 = 100;
/// Under loom every spin is a yield: keep the model small.
#[cfg(loom)]
const READER_SPINS: u32 = 1;

fn wait_for_readers(phase: usize, expedited: bool) {
    let mut backoff = Backoff::new();
    let mut spins = 0;
    while any_old_reader(phase) {
        if expedited {
            backoff.snooze();
            continue;
        }
        if spins < READER_SPINS {
            spins += 1;
            crate::sync::spin_loop();
            continue;
        }
        // Arm the futex, then make the arming visible to every reader (and
        // every reader's counter to us) before the rescan: a reader leaving
        // after our rescan sees GP_WAITING in `notify_gp_waiter` and wakes
        // us. Pairs with the light barrier between the reader's counter
        // store and its load of GP_FUTEX.
        GP_FUTEX.store(GP_WAITING, Ordering::Relaxed);
        heavy_barrier();
        if !any_old_reader(phase) {
            break;
        }
        crate::sync::wait_on_timeout(&GP_FUTEX, GP_WAITING, SLEEP_SLICE);
    }
    GP_FUTEX.store(0, Ordering::Relaxed);
}

/// Statistics of a domain, for monitoring and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// Grace periods completed by the domain's engine (shared by all `Rcu`
    /// handles; per instance for `Srcu`).
    pub grace_periods: u64,
    /// Callbacks this domain has run.
    pub callbacks_invoked: u64,
    /// Callback batches this domain has run (one grace period each).
    pub callback_batches: u64,
    /// Callbacks queued and not yet run.
    pub callbacks_pending: usize,
}

/// The sched-like RCU domain: the cheapest possible readers, usable from
/// signal handlers.
///
/// A `Rcu` is a cheap handle; clones share one callback queue. Readers and
/// grace periods are process-wide: a read section of any `Rcu` handle delays
/// every `Rcu` grace period, so read sections must not block. Use
/// [`Srcu`](super::Srcu) for readers that sleep.
///
/// # Examples
///
/// ```
/// use rcu_registry::rcu::{Flavor, Rcu, RcuCell};
///
/// let config = RcuCell::new(String::from("v1"));
/// {
///     let guard = Rcu::global().read();
///     assert_eq!(config.load(&guard).map(String::as_str), Some("v1"));
/// }
/// config.replace(String::from("v2")); // "v1" is dropped after a grace period
/// Rcu::global().synchronize();
/// Rcu::global().barrier(); // ...and now it has been
/// ```
#[derive(Clone)]
pub struct Rcu {
    queue: Arc<CallbackQueue>,
    gp: Arc<dyn GracePeriod>,
    _owner: Arc<QueueOwner>,
}

/// Stops the callback worker when the last handle of a domain goes.
struct QueueOwner(Arc<CallbackQueue>);

impl Drop for QueueOwner {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl fmt::Debug for Rcu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rcu").field("stats", &self.stats()).finish()
    }
}

#[cfg(not(loom))]
static GLOBAL_RCU: std::sync::OnceLock<Rcu> = std::sync::OnceLock::new();

#[cfg(loom)]
crate::sync::lazy_static! {
    static ref GLOBAL_RCU: Rcu = Rcu::new();
}

impl Rcu {
    /// Creates a domain with its own callback queue and worker. Readers and
    /// grace periods are shared with every other `Rcu`.
    pub fn new() -> Rcu {
        slots::init();
        let queue = Arc::new(CallbackQueue::new());
        Rcu {
            queue: Arc::clone(&queue),
            gp: Arc::new(SchedGp),
            _owner: Arc::new(QueueOwner(queue)),
        }
    }

    /// The process-wide default domain.
    pub fn global() -> &'static Rcu {
        #[cfg(not(loom))]
        return GLOBAL_RCU.get_or_init(Rcu::new);
        #[cfg(loom)]
        return &GLOBAL_RCU;
    }

    /// The calling thread's reader for the live probe runtime's trap path,
    /// claimed as by [`read_in_trap`](Self::read_in_trap) (no C library),
    /// for [`read_in_trap_on`](Self::read_in_trap_on): one thread-local
    /// access where a trap reaches its reader once and reads on it later.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) fn trap_reader() -> TrapReader {
        TrapReader::of(slots::current_unarmed())
    }

    /// [`arm_reader`](Self::arm_reader) giving back the calling thread's
    /// reader (see [`trap_reader`](Self::trap_reader)): the arming and the
    /// read sections after it share one thread-local access.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) fn arm_trap_reader() -> TrapReader {
        TrapReader::of(slots::arm_current())
    }

    /// A read section for the live probe runtime's trap path, on the
    /// calling thread's `reader`, reached before:
    /// [`read_in_trap`](Self::read_in_trap) without a domain handle. Every
    /// `Rcu` shares the readers, so the section is the one any handle's
    /// would be; reaching [`global`](Self::global)'s handle would cost a
    /// `OnceLock` load with acquire ordering on every trap, for nothing the
    /// section uses. The runtime creates the global domain (which sets up
    /// the reader slots) before it installs its trap handler.
    #[cfg(not(loom))]
    #[inline(always)]
    pub(crate) fn read_in_trap_on(reader: TrapReader) -> RcuGuard<'static> {
        Self::read_on(reader.slot)
    }

    /// Begins a read-side critical section, which lasts until the guard is
    /// dropped. Sections nest. Async-signal-safe, also on a thread that has
    /// never used the library.
    ///
    /// A read section must not block: every `Rcu` grace period in the
    /// process waits for it.
    #[inline]
    pub fn read(&self) -> RcuGuard<'_> {
        Self::read_on(slots::current())
    }

    /// [`read`](Self::read) that calls no C-library function, for the live
    /// probe runtime's trap path: a thread's first read section claims its
    /// slot without arming its release at thread exit (a
    /// `pthread_setspecific`); [`arm_reader`](Self::arm_reader) does that,
    /// where calling the C library is safe.
    #[inline]
    pub(crate) fn read_in_trap(&self) -> RcuGuard<'_> {
        Self::read_on(slots::current_unarmed())
    }

    /// Claims the calling thread's reader slot if it has none, and makes
    /// sure the thread's exit gives it back (a C-library call the first
    /// time; one thread-local load after). See
    /// [`read_in_trap`](Self::read_in_trap).
    #[inline]
    pub(crate) fn arm_reader() {
        let _ = slots::arm_current();
    }

    #[inline(always)]
    fn read_on<'a>(slot: &'static slots::Slot) -> RcuGuard<'a> {
        // Relaxed: only this thread (or a signal handler on it, which
        // restores the value) writes the slot's counter.
        let v = slot.ctr.load(Ordering::Relaxed);
        if v & NEST_MASK == 0 {
            // Relaxed: a stale phase is what the updater's second wait is for.
            let gp = GLOBAL.gp_ctr.load(Ordering::Relaxed);
            slot.ctr.store(gp, Ordering::Relaxed);
            // Orders the counter store before the section's loads. Pairs with
            // the updater's first heavy barrier.
            light_barrier();
        } else {
            slot.ctr.store(v + NEST_ONE, Ordering::Relaxed);
        }
        RcuGuard {
            slot,
            _domain: PhantomData,
            _not_send: PhantomData,
        }
    }

    /// Whether the calling thread is inside an `Rcu` read section.
    pub fn in_read_section() -> bool {
        // Relaxed: the thread reads its own counter.
        slots::current_if_any().is_some_and(|s| s.ctr.load(Ordering::Relaxed) & NEST_MASK != 0)
    }

    #[track_caller]
    fn assert_not_reading(what: &str) {
        assert!(
            !Self::in_read_section(),
            "Rcu::{what}() called inside an Rcu read-side critical section: \
             it would wait for the caller's own section and deadlock"
        );
    }

    /// Waits until every `Rcu` read section that began before the call has
    /// ended. Concurrent callers share grace periods. Spins briefly, then
    /// sleeps until the last reader wakes it.
    ///
    /// # Panics
    ///
    /// If called inside an `Rcu` read section.
    #[track_caller]
    pub fn synchronize(&self) {
        Self::assert_not_reading("synchronize");
        gp::synchronize(&*self.gp, false);
    }

    /// Like [`synchronize`](Self::synchronize) but never sleeps: it spins
    /// and yields until the readers are gone. Lower latency, burns a core.
    ///
    /// # Panics
    ///
    /// If called inside an `Rcu` read section.
    #[track_caller]
    pub fn synchronize_expedited(&self) {
        Self::assert_not_reading("synchronize_expedited");
        gp::synchronize(&*self.gp, true);
    }

    /// Queues `f` to run on this domain's worker thread after a grace
    /// period. Callbacks queued together share one grace period. Never waits
    /// for a grace period; allocates once (not async-signal-safe).
    pub fn call<C: FnOnce() + Send + 'static>(&self, f: C) {
        let may_wait = !Self::in_read_section();
        self.queue.call(&self.gp, f, may_wait);
    }

    /// Returns once every callback queued on this domain (by any thread)
    /// before the call has run.
    ///
    /// # Panics
    ///
    /// If called inside an `Rcu` read section or from a callback.
    #[track_caller]
    pub fn barrier(&self) {
        Self::assert_not_reading("barrier");
        self.queue.barrier(&self.gp);
    }

    /// Takes a cookie for the first grace period that starts after now and
    /// makes sure one will run; check it with [`poll`](Self::poll).
    pub fn start_poll(&self) -> GpCookie {
        let seq = GLOBAL.seq.snapshot();
        // An empty callback makes the worker run a grace period, which
        // starts after the snapshot above.
        self.queue.call(&self.gp, || {}, false);
        GpCookie { seq }
    }

    /// Whether the grace period named by `cookie` has completed.
    pub fn poll(&self, cookie: &GpCookie) -> bool {
        GLOBAL.seq.done(cookie.seq)
    }

    /// Waits for the grace period named by `cookie`, unless it already
    /// completed.
    ///
    /// # Panics
    ///
    /// If it must wait and is called inside an `Rcu` read section.
    #[track_caller]
    pub fn cond_synchronize(&self, cookie: GpCookie) {
        if !self.poll(&cookie) {
            Self::assert_not_reading("cond_synchronize");
            GLOBAL.seq.wait_for(cookie.seq, &*self.gp, false);
        }
    }

    /// Counters for monitoring.
    pub fn stats(&self) -> DomainStats {
        DomainStats {
            grace_periods: GLOBAL.seq.completed(),
            callbacks_invoked: self.queue.counts.invoked.load(Ordering::Relaxed),
            callback_batches: self.queue.counts.batches.load(Ordering::Relaxed),
            callbacks_pending: self.queue.pending(),
        }
    }

    /// Callers of [`Rcu::call`] on this domain waiting right now because the
    /// backlog passed the high watermark. A test hook, reached through
    /// `__internals::rcu::DomainGauges`.
    #[cfg(not(loom))]
    pub(crate) fn throttled_callers(&self) -> usize {
        // Relaxed: see `CallbackQueue::throttle`.
        self.queue.counts.throttled.load(Ordering::Relaxed)
    }

    /// `synchronize()` callers of this domain that have taken their
    /// grace-period snapshot and not yet returned. A test hook, reached
    /// through `__internals::rcu::DomainGauges`.
    #[cfg(not(loom))]
    pub(crate) fn sync_waiters(&self) -> usize {
        // Relaxed: see `gp::synchronize`.
        self.gp.seq().waiters.load(Ordering::Relaxed)
    }
}

impl Default for Rcu {
    /// A handle to [`Rcu::global`].
    fn default() -> Self {
        Rcu::global().clone()
    }
}

/// The calling thread's `Rcu` reader, reached once by the live runtime's
/// trap path ([`Rcu::trap_reader`], [`Rcu::arm_trap_reader`]) and read on
/// later ([`Rcu::read_in_trap_on`]). Not `Send`: it is one thread's.
#[derive(Clone, Copy)]
#[cfg_attr(loom, allow(dead_code))]
pub(crate) struct TrapReader {
    slot: &'static Slot,
    _not_send: PhantomData<*const ()>,
}

impl TrapReader {
    #[cfg_attr(loom, allow(dead_code))]
    #[inline(always)]
    fn of(slot: &'static Slot) -> TrapReader {
        TrapReader {
            slot,
            _not_send: PhantomData,
        }
    }
}

/// An `Rcu` read-side critical section; it ends when the guard drops.
///
/// Not `Send`: the section belongs to the thread that began it.
///
/// ```compile_fail
/// use rcu_registry::rcu::Rcu;
/// fn assert_send<T: Send>(_: T) {}
/// assert_send(Rcu::global().read());
/// ```
///
/// The same call without the `Send` bound compiles:
///
/// ```
/// use rcu_registry::rcu::Rcu;
/// fn assert_any<T>(_: T) {}
/// assert_any(Rcu::global().read());
/// ```
#[must_use = "the read section ends when the guard is dropped"]
pub struct RcuGuard<'a> {
    slot: &'static Slot,
    _domain: PhantomData<&'a Rcu>,
    _not_send: PhantomData<*const ()>,
}

impl ReadSection for RcuGuard<'_> {}

impl fmt::Debug for RcuGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RcuGuard")
    }
}

impl Drop for RcuGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let slot = self.slot;
        // Relaxed: this thread's own counter (see `read`).
        let v = slot.ctr.load(Ordering::Relaxed);
        if v & NEST_MASK == NEST_ONE {
            // One load of the process-wide barrier mode serves both barriers.
            let asymmetric = membarrier_mode();
            // Orders the section's accesses before the counter store. Pairs
            // with the updater's final heavy barrier.
            light_barrier_in(asymmetric);
            slot.ctr.store(v - NEST_ONE, Ordering::Relaxed);
            // Orders the counter store before the futex-word load in
            // `notify_gp_waiter`. Pairs with the heavy barrier after the
            // updater arms the futex.
            light_barrier_in(asymmetric);
            slots::notify_gp_waiter();
        } else {
            slot.ctr.store(v - NEST_ONE, Ordering::Relaxed);
        }
    }
}

impl Flavor for Rcu {
    type Guard<'a> = RcuGuard<'a>;

    #[inline]
    fn read(&self) -> RcuGuard<'_> {
        Rcu::read(self)
    }

    #[inline]
    fn read_in_trap(&self) -> RcuGuard<'_> {
        Rcu::read_in_trap(self)
    }

    #[inline]
    fn arm_reader(&self) {
        Rcu::arm_reader()
    }

    #[inline]
    fn protects(&self, _guard: &RcuGuard<'_>) -> bool {
        // Every Rcu grace period waits for every Rcu reader.
        true
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

    fn start_poll(&self) -> GpCookie {
        Rcu::start_poll(self)
    }

    fn poll(&self, cookie: &GpCookie) -> bool {
        Rcu::poll(self, cookie)
    }

    fn cond_synchronize(&self, cookie: GpCookie) {
        Rcu::cond_synchronize(self, cookie)
    }
}
