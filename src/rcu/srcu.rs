//! `Srcu`: the sleepable domain, isolated per instance.
//!
//! # Counters
//!
//! Each `Srcu` keeps, for every reader thread, two pairs of counters indexed
//! by a one-bit *index*: sections begun (`lock[i]`) and sections ended
//! (`unlock[i]`). A reader reads the domain's current index, increments
//! `lock[index]` of its own thread, and on leaving increments `unlock[index]`
//! of the same pair. Only the owning thread writes its counters, so both are
//! a plain load and store plus a compiler fence, as cheap as `Rcu`'s read side
//! (a guard turned into a [`SrcuToken`] and released on another thread adds
//! to a separate `unlock_remote` counter with an atomic add).
//!
//! Counters are found through the thread's reader slot index (shared with
//! `Rcu`), in chunks allocated on a thread's first section in the domain.
//!
//! # Grace periods: flip, and two scans
//!
//! An index `i` has no readers when the sum of all threads' `unlock[i]`,
//! read first, equals the sum of `lock[i]`, read after a heavy barrier:
//! counters only grow, so equality means that at the barrier no section was
//! open on that index, except possibly ones that had read the index but not
//! yet incremented. A grace period waits for the *inactive* index (stragglers
//! of the previous flip), flips the index with heavy barriers on both sides,
//! then waits for the previously active index. A reader stalled between
//! reading the index and incrementing can slip past one scan, but its
//! section then starts after the flip's barrier and sees every update made
//! before the grace period; it is waited for by the next grace period's
//! first scan. Readers never wait and may sleep in their sections; only this
//! instance's updaters wait for them, sleeping with a bounded backoff.
//!
//! Barriers are asymmetric as in `Rcu`: the updater's `membarrier` stands in
//! for the full barriers that the classic algorithm puts in the reader.

use super::callbacks::CallbackQueue;
use super::gp::{self, GpSeq, GracePeriod};
use super::sched::DomainStats;
use super::slots;
use super::{Flavor, GpCookie, ReadSection};
use crate::sync::atomic::{fence, AtomicPtr, AtomicUsize, Ordering};
#[cfg(loom)]
use crate::sync::thread;
use crate::sync::{heavy_barrier, light_barrier, Backoff};
use crossbeam_utils::CachePadded;
use std::fmt;
use std::marker::PhantomData;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// Counter records per chunk.
#[cfg(not(loom))]
const CHUNK: usize = 64;
/// Chunks in the directory: at most `CHUNK * DIR_LEN` (65,536) reader
/// threads alive at once per process.
#[cfg(not(loom))]
const DIR_LEN: usize = 1024;
// Under loom every atomic is a model object: keep the arrays tiny.
#[cfg(loom)]
const CHUNK: usize = 4;
#[cfg(loom)]
const DIR_LEN: usize = 2;
/// Longest sleep between scans while readers remain (readers may sleep for
/// any time, so the updater polls rather than asking readers to wake it,
/// which would cost every reader an extra load).
const MAX_POLL_SLEEP: Duration = Duration::from_millis(1);

/// One thread's counters in one domain.
#[derive(Default)]
struct Counters {
    lock: [AtomicUsize; 2],
    unlock: [AtomicUsize; 2],
    unlock_remote: [AtomicUsize; 2],
    /// Guards this thread turned into tokens (owner-written).
    tokens_out: AtomicUsize,
}

type Chunk = [CachePadded<Counters>; CHUNK];

struct SrcuState {
    /// The current index is `idx & 1`; incremented by each flip.
    idx: AtomicUsize,
    seq: GpSeq,
    dir: Box<[AtomicPtr<Chunk>]>,
}

/// Owner-only increment: a plain load and store (see the module docs).
#[inline(always)]
fn bump(c: &AtomicUsize) {
    // Relaxed: only the owning thread writes this counter; ordering against
    // the updater comes from the light/heavy barrier pairs.
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

impl SrcuState {
    fn new() -> Self {
        SrcuState {
            idx: AtomicUsize::new(0),
            seq: GpSeq::new(),
            dir: (0..DIR_LEN)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
        }
    }

    #[inline(always)]
    fn counters(&self, index: usize) -> &Counters {
        // Acquire pairs with the Release CAS that published the chunk.
        let chunk = self
            .dir
            .get(index / CHUNK)
            .map(|d| d.load(Ordering::Acquire));
        match chunk {
            Some(p) if !p.is_null() => {
                // SAFETY: published chunks live as long as the state.
                unsafe { &(*p)[index % CHUNK] }
            }
            _ => self.counters_slow(index),
        }
    }

    #[cold]
    fn counters_slow(&self, index: usize) -> &Counters {
        let Some(entry) = self.dir.get(index / CHUNK) else {
            panic!(
                "Srcu: more than {} reader threads alive at once",
                CHUNK * DIR_LEN
            );
        };
        let fresh: Box<Chunk> = Box::new(std::array::from_fn(|_| {
            CachePadded::new(Counters::default())
        }));
        let fresh = Box::into_raw(fresh);
        // Release publishes the zeroed counters; Acquire on failure pairs
        // with the winner's Release.
        let chunk = match entry.compare_exchange(
            ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => fresh,
            Err(winner) => {
                // SAFETY: `fresh` was never published.
                drop(unsafe { Box::from_raw(fresh) });
                winner
            }
        };
        // SAFETY: published chunks live as long as the state.
        unsafe { &(*chunk)[index % CHUNK] }
    }

    /// Counters of this thread, if it ever read in this domain.
    fn my_counters(&self) -> Option<&Counters> {
        let slot = slots::current_if_any()?;
        let p = self.dir.get(slot.index() / CHUNK)?.load(Ordering::Acquire);
        // SAFETY: published chunks live as long as the state.
        (!p.is_null()).then(|| unsafe { &*(*p)[slot.index() % CHUNK] })
    }

    fn sum(&self, f: impl Fn(&Counters) -> usize) -> usize {
        let mut total = 0usize;
        slots::for_each_slot(|s| {
            // Counters of threads that did not survive fork() are skipped
            // in both sums, consistently (see slots.rs).
            if s.is_dead() {
                return;
            }
            let Some(d) = self.dir.get(s.index() / CHUNK) else {
                return;
            };
            let p = d.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: published chunks live as long as the state.
                total = total.wrapping_add(f(unsafe { &(*p)[s.index() % CHUNK] }));
            }
        });
        total
    }

    /// True when no section may be open on index `i` (see the module docs).
    fn index_idle(&self, i: usize) -> bool {
        // Relaxed loads: the heavy barrier between the sums (barrier "A"
        // of the classic algorithm) orders them, paired with the readers'
        // light barriers after `lock` and before `unlock` increments.
        let unlocks = self.sum(|c| {
            c.unlock[i]
                .load(Ordering::Relaxed)
                .wrapping_add(c.unlock_remote[i].load(Ordering::Relaxed))
        });
        heavy_barrier();
        let locks = self.sum(|c| c.lock[i].load(Ordering::Relaxed));
        locks == unlocks
    }

    fn wait_idle(&self, i: usize, expedited: bool) {
        let mut backoff = Backoff::new();
        let mut sleep = Duration::from_micros(2);
        while !self.index_idle(i) {
            if !backoff.is_completed() || expedited {
                backoff.snooze();
                continue;
            }
            #[cfg(not(loom))]
            std::thread::sleep(sleep);
            #[cfg(loom)]
            thread::yield_now();
            sleep = (sleep * 2).min(MAX_POLL_SLEEP);
        }
    }
}

impl GracePeriod for SrcuState {
    fn seq(&self) -> &GpSeq {
        &self.seq
    }

    fn run(&self, expedited: bool) {
        // Heavy barrier: the updates made before this grace period was
        // requested are visible to every section our scans do not count.
        heavy_barrier();
        // Relaxed: only the leader writes `idx`.
        let cur = self.idx.load(Ordering::Relaxed);
        self.wait_idle((cur & 1) ^ 1, expedited);
        // Barriers "D" and "E" of the classic algorithm around the flip:
        // scans before it complete first, and readers that see the new index
        // also see everything before it.
        heavy_barrier();
        self.idx.store(cur.wrapping_add(1), Ordering::Relaxed);
        heavy_barrier();
        self.wait_idle(cur & 1, expedited);
        // Every section we waited out finished its accesses before the
        // caller's next step; pairs with the light barrier before `unlock`.
        heavy_barrier();
    }
}

impl Drop for SrcuState {
    fn drop(&mut self) {
        for d in self.dir.iter() {
            let p = d.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: chunks came from Box::into_raw; we are the last user.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// A sleepable RCU domain: read sections may block for any time, and only
/// this instance's updaters wait for them.
///
/// `Srcu` is a cheap handle: clones share the instance. Instances are
/// isolated: a long reader of one never delays another's grace periods.
/// `read()` allocates on a thread's first section in an instance and is not
/// async-signal-safe (use [`Rcu`](super::Rcu) from signal handlers).
///
/// # Examples
///
/// ```
/// use rcu_registry::rcu::{Flavor, RcuCell, Srcu};
///
/// let domain = Srcu::new();
/// let cell = RcuCell::new_in(vec![1, 2, 3], domain.clone());
/// let guard = domain.read();
/// std::thread::sleep(std::time::Duration::from_millis(1)); // allowed
/// assert_eq!(cell.load(&guard).map(Vec::len), Some(3));
/// ```
#[derive(Clone)]
pub struct Srcu {
    state: Arc<SrcuState>,
    gp: Arc<dyn GracePeriod>,
    queue: Arc<CallbackQueue>,
    _owner: Arc<SrcuOwner>,
}

/// Stops the callback worker when the last handle goes.
struct SrcuOwner(Arc<CallbackQueue>);

impl Drop for SrcuOwner {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl fmt::Debug for Srcu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Srcu")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for Srcu {
    /// A new, independent instance.
    fn default() -> Self {
        Srcu::new()
    }
}

impl Srcu {
    /// Creates an independent domain.
    pub fn new() -> Srcu {
        slots::init();
        let state = Arc::new(SrcuState::new());
        let queue = Arc::new(CallbackQueue::new());
        Srcu {
            gp: state.clone(),
            state,
            queue: Arc::clone(&queue),
            _owner: Arc::new(SrcuOwner(queue)),
        }
    }

    /// Begins a read section of this domain; it may block for any time.
    #[inline]
    pub fn read(&self) -> SrcuGuard<'_> {
        let slot = slots::current();
        let counters = self.state.counters(slot.index());
        // Relaxed: a stale index is tolerated by the two-scan grace period.
        let idx = self.state.idx.load(Ordering::Relaxed) & 1;
        bump(&counters.lock[idx]);
        // Barrier "B": the lock increment before the section's loads. Pairs
        // with the heavy barrier between the updater's sums.
        light_barrier();
        SrcuGuard {
            domain: self,
            counters,
            idx,
            _not_send: PhantomData,
        }
    }

    /// Whether the calling thread holds a read guard of this domain.
    pub fn in_read_section(&self) -> bool {
        self.state.my_counters().is_some_and(|c| {
            let l = c.lock[0]
                .load(Ordering::Relaxed)
                .wrapping_add(c.lock[1].load(Ordering::Relaxed));
            let u = c.unlock[0]
                .load(Ordering::Relaxed)
                .wrapping_add(c.unlock[1].load(Ordering::Relaxed));
            l.wrapping_sub(u)
                .wrapping_sub(c.tokens_out.load(Ordering::Relaxed))
                != 0
        })
    }

    #[track_caller]
    fn assert_not_reading(&self, what: &str) {
        assert!(
            !self.in_read_section(),
            "Srcu::{what}() called inside a read section of the same Srcu domain: \
             it would wait for the caller's own section and deadlock"
        );
    }

    /// Waits until every read section of this domain that began before the
    /// call has ended. Concurrent callers share grace periods.
    ///
    /// # Panics
    ///
    /// If called inside a read section of this domain on this thread.
    #[track_caller]
    pub fn synchronize(&self) {
        self.assert_not_reading("synchronize");
        gp::synchronize(&*self.gp, false);
    }

    /// Like [`synchronize`](Self::synchronize), but spins and yields instead
    /// of sleeping between scans.
    ///
    /// # Panics
    ///
    /// If called inside a read section of this domain on this thread.
    #[track_caller]
    pub fn synchronize_expedited(&self) {
        self.assert_not_reading("synchronize_expedited");
        gp::synchronize(&*self.gp, true);
    }

    /// Queues `f` to run on this domain's worker after a grace period.
    pub fn call<C: FnOnce() + Send + 'static>(&self, f: C) {
        let may_wait = !self.in_read_section();
        self.queue.call(&self.gp, f, may_wait);
    }

    /// Returns once every callback queued on this domain before the call has
    /// run.
    ///
    /// # Panics
    ///
    /// If called inside a read section of this domain, or from a callback.
    #[track_caller]
    pub fn barrier(&self) {
        self.assert_not_reading("barrier");
        self.queue.barrier(&self.gp);
    }

    /// Takes a cookie for the first grace period that starts after now and
    /// makes sure one will run.
    pub fn start_poll(&self) -> GpCookie {
        let seq = self.state.seq.snapshot();
        self.queue.call(&self.gp, || {}, false);
        GpCookie { seq }
    }

    /// Whether the grace period named by `cookie` has completed.
    pub fn poll(&self, cookie: &GpCookie) -> bool {
        self.state.seq.done(cookie.seq)
    }

    /// Waits for the grace period named by `cookie`, unless it completed.
    ///
    /// # Panics
    ///
    /// If it must wait and is called inside a read section of this domain.
    #[track_caller]
    pub fn cond_synchronize(&self, cookie: GpCookie) {
        if !self.poll(&cookie) {
            self.assert_not_reading("cond_synchronize");
            self.state.seq.wait_for(cookie.seq, &*self.gp, false);
        }
    }

    /// Counters for monitoring.
    pub fn stats(&self) -> DomainStats {
        DomainStats {
            grace_periods: self.state.seq.completed(),
            callbacks_invoked: self.queue.counts.invoked.load(Ordering::Relaxed),
            callback_batches: self.queue.counts.batches.load(Ordering::Relaxed),
            callbacks_pending: self.queue.pending(),
        }
    }

    /// Callers of `call` on this domain waiting right now because the
    /// backlog passed the high watermark. A test hook, reached through
    /// `__internals::rcu::DomainGauges`.
    #[cfg(not(loom))]
    pub(crate) fn throttled_callers(&self) -> usize {
        // Relaxed: see `CallbackQueue::throttle`.
        self.queue.counts.throttled.load(Ordering::Relaxed)
    }

    /// Read sections of this domain open right now, on both indices, every
    /// thread's (tokens not yet dropped included): sections begun minus
    /// sections ended. A test hook, reached through
    /// `__internals::rcu::SrcuSections`.
    #[cfg(not(loom))]
    pub(crate) fn open_sections(&self) -> usize {
        // Relaxed: a gauge; the test reads it when the threads that could
        // change it have been joined.
        let ended = self.state.sum(|c| {
            (0..2).fold(0usize, |t, i| {
                t.wrapping_add(c.unlock[i].load(Ordering::Relaxed))
                    .wrapping_add(c.unlock_remote[i].load(Ordering::Relaxed))
            })
        });
        let begun = self.state.sum(|c| {
            c.lock[0]
                .load(Ordering::Relaxed)
                .wrapping_add(c.lock[1].load(Ordering::Relaxed))
        });
        begun.wrapping_sub(ended)
    }

    /// `synchronize()` callers of this domain that have taken their
    /// grace-period snapshot and not yet returned. A test hook, reached
    /// through `__internals::rcu::DomainGauges`.
    #[cfg(not(loom))]
    pub(crate) fn sync_waiters(&self) -> usize {
        // Relaxed: see `gp::synchronize`.
        self.state.seq.waiters.load(Ordering::Relaxed)
    }

    fn same_domain(&self, other: &Srcu) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

/// A read section of an [`Srcu`] domain; it ends when the guard drops.
///
/// Not `Send`: use [`into_token`](Self::into_token) to end the section on
/// another thread.
///
/// ```compile_fail
/// use rcu_registry::rcu::Srcu;
/// fn assert_send<T: Send>(_: T) {}
/// let d = Srcu::new();
/// assert_send(d.read());
/// ```
///
/// Its token is `Send`:
///
/// ```
/// use rcu_registry::rcu::Srcu;
/// fn assert_send<T: Send>(_: T) {}
/// let d = Srcu::new();
/// assert_send(d.read().into_token());
/// ```
#[must_use = "the read section ends when the guard is dropped"]
pub struct SrcuGuard<'a> {
    domain: &'a Srcu,
    counters: &'a Counters,
    idx: usize,
    _not_send: PhantomData<*const ()>,
}

impl ReadSection for SrcuGuard<'_> {}

impl fmt::Debug for SrcuGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SrcuGuard").field("idx", &self.idx).finish()
    }
}

impl SrcuGuard<'_> {
    /// Turns the section into a token that may be sent to, and ended on,
    /// another thread. The section stays open until the token is dropped.
    pub fn into_token(self) -> SrcuToken {
        bump(&self.counters.tokens_out);
        let token = SrcuToken {
            state: Arc::clone(&self.domain.state),
            counters: self.counters as *const Counters,
            idx: self.idx,
        };
        std::mem::forget(self);
        token
    }
}

impl Drop for SrcuGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Barrier "C": the section's accesses before the unlock increment.
        // Pairs with the updater's heavy barriers around its sums.
        light_barrier();
        bump(&self.counters.unlock[self.idx]);
    }
}

/// An open [`Srcu`] read section detached from its thread; the section ends
/// when the token is dropped, on any thread.
///
/// A token keeps its domain's state alive, but only guards borrowed from a
/// live [`Srcu`] handle can be used to read data.
pub struct SrcuToken {
    state: Arc<SrcuState>,
    counters: *const Counters,
    idx: usize,
}

// SAFETY: the token only performs an atomic add on counters that live as
// long as `state`, which it keeps alive; that is valid from any thread.
unsafe impl Send for SrcuToken {}
// SAFETY: a shared token offers no operation at all.
unsafe impl Sync for SrcuToken {}

impl fmt::Debug for SrcuToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SrcuToken").field("idx", &self.idx).finish()
    }
}

impl Drop for SrcuToken {
    fn drop(&mut self) {
        let _keep_alive = &self.state;
        // The section's accesses (on whichever threads) before the release;
        // a real fence because this thread is not the counters' owner and
        // the RMW below is not covered by the owner's light barriers.
        fence(Ordering::SeqCst);
        // SAFETY: counters live in a chunk owned by `self.state`, alive.
        let c = unsafe { &*self.counters };
        // Release: pairs with the updater's heavy barrier/Acquire chain;
        // atomic RMW because other threads may release tokens concurrently.
        c.unlock_remote[self.idx].fetch_add(1, Ordering::Release);
    }
}

impl Flavor for Srcu {
    type Guard<'a> = SrcuGuard<'a>;

    #[inline]
    fn read(&self) -> SrcuGuard<'_> {
        Srcu::read(self)
    }

    #[inline]
    fn protects(&self, guard: &SrcuGuard<'_>) -> bool {
        self.same_domain(guard.domain)
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

    fn start_poll(&self) -> GpCookie {
        Srcu::start_poll(self)
    }

    fn poll(&self, cookie: &GpCookie) -> bool {
        Srcu::poll(self, cookie)
    }

    fn cond_synchronize(&self, cookie: GpCookie) {
        Srcu::cond_synchronize(self, cookie)
    }
}
