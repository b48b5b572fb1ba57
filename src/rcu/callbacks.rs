//! Deferred callbacks, which both domains share: a lock-free queue and
//! one worker per domain that runs them after a grace period.
//!
//! Invariant: a batch runs only after one grace period that started after the
//! worker took it, in queue order; past [`HIGH_WATERMARK`] pending, a caller
//! that may sleep waits, so memory stays bounded.
//!
//! The queue, the worker, batching and `barrier()`, in full:
//! [`crate::docs::algorithms::callbacks`].

use super::gp::{synchronize, GracePeriod, SLEEP_SLICE};
use super::slots::fork_generation;
use crate::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use crate::sync::{thread, Backoff, Event, RawThread};
// std's Arc even under loom: loom's Arc supports neither unsized coercion
// nor `self: &Arc<Self>`; these Arcs only manage lifetimes, not ordering.
use std::cell::Cell;
use std::ptr;
use std::sync::Arc;
#[cfg(not(loom))]
use std::time::Duration;

/// Pending callbacks past which a caller that may sleep waits for the worker
/// (bounds memory under a callback flood: ~48 bytes a small callback).
pub(crate) const HIGH_WATERMARK: usize = 1 << 18;

/// How long the worker lets a small batch of callbacks grow before it starts
/// a grace period for it. Callbacks only free memory, so a millisecond of
/// extra latency is cheap, while back-to-back grace periods are not: each
/// one sends membarrier IPIs to every core running a reader (a writer that
/// retires one node per operation would otherwise start tens of thousands
/// of grace periods a second). `barrier()` cuts the wait short.
#[cfg(not(loom))]
const BATCH_DELAY: Duration = Duration::from_millis(1);
/// A batch this large starts its grace period at once.
#[cfg(not(loom))]
const BATCH_FULL: usize = 1024;

/// Header shared by every callback node; the closure follows it.
#[repr(C)]
struct Node {
    next: *mut Node,
    /// Runs (`true`) or just drops (`false`) the closure, then frees the node.
    invoke: unsafe fn(*mut Node, bool),
}

#[repr(C)]
struct TypedNode<C> {
    header: Node,
    f: C,
}

/// # Safety
/// `node` must come from `Box::into_raw(Box<TypedNode<C>>)` and be invoked
/// at most once.
unsafe fn invoke<C: FnOnce()>(node: *mut Node, run: bool) {
    // SAFETY: per the contract, `node` is the header of a boxed TypedNode<C>
    // (repr(C), header first) that we now own.
    let boxed = unsafe { Box::from_raw(node.cast::<TypedNode<C>>()) };
    if run {
        (boxed.f)();
    }
}

/// Counters a domain exposes through `stats()`.
#[derive(Debug, Default)]
pub(crate) struct CallbackCounts {
    pub(crate) invoked: AtomicU64,
    pub(crate) batches: AtomicU64,
    /// Callers waiting in `throttle` right now: lets a test see the
    /// throttle engage without guessing from timing (`Rcu::throttled_callers`).
    pub(crate) throttled: AtomicUsize,
}

crate::sync::const_thread_local! {
    /// Set on callback worker threads: a callback that calls `barrier()`
    /// would wait for itself.
    static ON_WORKER: Cell<bool> = Cell::new(false);
}

/// A domain's deferred-callback queue and its worker.
pub(crate) struct CallbackQueue {
    /// Newest first (a Treiber stack).
    head: AtomicPtr<Node>,
    /// Queued and not yet run.
    pending: AtomicUsize,
    /// `WORKER_SLEEPING` while the worker sleeps (or is about to).
    worker_word: Event,
    /// Fork generation the worker was started in; `u64::MAX` before it is.
    worker_gen: AtomicU64,
    /// Who is starting the worker: `gen << 1 | 1` while a thread of fork
    /// generation `gen` spawns it, `gen << 1` once done. Not a lock, so a
    /// fork in the middle of a start cannot leave the child blocked: the
    /// child's generation differs and it simply claims again.
    start_claim: AtomicU64,
    /// The worker's join handle (boxed), or null.
    handle: AtomicPtr<RawThread>,
    shutdown: AtomicBool,
    /// Someone waits for the queue (`barrier`): do not let the batch grow.
    urgent: AtomicBool,
    pub(crate) counts: CallbackCounts,
}

const WORKER_AWAKE: u32 = 0;
const WORKER_SLEEPING: u32 = 1;
/// Letting a small batch grow (woken only by `barrier` or shutdown).
#[cfg(not(loom))]
const WORKER_DELAYING: u32 = 2;
const NO_WORKER: u64 = u64::MAX;

// SAFETY: the raw node pointers are only handed between threads through the
// atomic stack; each node's closure is `Send`.
unsafe impl Send for CallbackQueue {}
// SAFETY: all shared mutation goes through atomics or the mutex.
unsafe impl Sync for CallbackQueue {}

impl CallbackQueue {
    pub(crate) fn new() -> Self {
        CallbackQueue {
            head: AtomicPtr::new(ptr::null_mut()),
            pending: AtomicUsize::new(0),
            worker_word: Event::new(WORKER_AWAKE),
            worker_gen: AtomicU64::new(NO_WORKER),
            start_claim: AtomicU64::new(0),
            handle: AtomicPtr::new(ptr::null_mut()),
            shutdown: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
            counts: CallbackCounts::default(),
        }
    }

    /// Callbacks queued and not yet run.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Queues `f`. `may_wait` is false inside a read section (throttling
    /// there could deadlock) and on the worker itself.
    pub(crate) fn call<C: FnOnce() + Send + 'static>(
        self: &Arc<Self>,
        gp: &Arc<dyn GracePeriod>,
        f: C,
        may_wait: bool,
    ) {
        let node = Box::into_raw(Box::new(TypedNode {
            header: Node {
                next: ptr::null_mut(),
                invoke: invoke::<C>,
            },
            f,
        }));
        // Count before publishing: once pushed, the worker may run the
        // callback and decrement at once, and `pending` must never dip
        // below the number of queued-but-unrun callbacks (`barrier`'s fast
        // path reads it). Relaxed: a caller that later calls `barrier`
        // sees its own increment by program order; the worker's Release
        // decrements order the callbacks' effects (see `barrier`).
        let backlog = self.pending.fetch_add(1, Ordering::Relaxed) + 1;
        self.push(node.cast());
        self.ensure_worker(gp);
        self.kick_worker();
        if backlog > HIGH_WATERMARK && may_wait && !ON_WORKER.with(|w| w.get()) {
            self.throttle(gp);
        }
    }

    fn push(&self, node: *mut Node) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until the CAS below publishes it.
            unsafe { (*node).next = head };
            // Release publishes the node (and the closure's captures, and
            // whatever the caller unlinked before calling) to the worker's
            // Acquire swap.
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    #[inline]
    fn kick_worker(&self) {
        // Store-buffering handshake with the worker's idle path: (push;
        // fence; load worker_word) against (store WORKER_SLEEPING; fence;
        // load head). The SeqCst fences forbid both loads missing the other
        // side's store: either the worker sees our node or we see it asleep.
        fence(Ordering::SeqCst);
        if self.worker_word.word().load(Ordering::Relaxed) == WORKER_SLEEPING {
            self.worker_word
                .word()
                .store(WORKER_AWAKE, Ordering::Relaxed);
            self.worker_word.wake();
        }
    }

    /// Makes a caller past the high watermark wait until every callback
    /// queued before it has run, so the backlog it adds to stays bounded.
    ///
    /// A barrier, not "wait until the backlog is below some level": after
    /// fork(), callbacks that the parent's worker had taken off the stack
    /// still count as pending in the child but never run there, so a
    /// backlog-level wait could wedge the child for good.
    #[cold]
    fn throttle(self: &Arc<Self>, gp: &Arc<dyn GracePeriod>) {
        // Relaxed (both): a gauge read only by tests, which learn from it
        // nothing but that a caller is inside; the barrier orders the rest.
        self.counts.throttled.fetch_add(1, Ordering::Relaxed);
        self.barrier(gp);
        self.counts.throttled.fetch_sub(1, Ordering::Relaxed);
    }

    /// Starts the worker if there is none in this process image.
    #[inline]
    fn ensure_worker(self: &Arc<Self>, gp: &Arc<dyn GracePeriod>) {
        // Relaxed: a stale value only sends us to the locked slow path.
        if self.worker_gen.load(Ordering::Relaxed) != fork_generation() {
            self.start_worker(gp);
        }
    }

    #[cold]
    fn start_worker(self: &Arc<Self>, gp: &Arc<dyn GracePeriod>) {
        let gen = fork_generation();
        let mine = gen << 1 | 1;
        loop {
            // Acquire pairs with the Release store below: a worker started
            // in our generation is fully set up when we see its generation.
            if self.worker_gen.load(Ordering::Acquire) == gen {
                return;
            }
            let claim = self.start_claim.load(Ordering::Acquire);
            if claim == mine {
                // Another thread of this process is spawning it right now.
                thread::yield_now();
                continue;
            }
            // A claim of another generation belongs to a thread that did not
            // survive a fork (or is complete): take it over.
            if self
                .start_claim
                .compare_exchange(claim, mine, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let queue = Arc::clone(self);
            let gp = Arc::clone(gp);
            let spawned = Box::into_raw(Box::new(spawn_worker(move || queue.worker_loop(&*gp))));
            let old = self.handle.swap(spawned, Ordering::AcqRel);
            if !old.is_null() {
                // SAFETY: handles are only ever boxed by this function.
                let old = unsafe { Box::from_raw(old) };
                // The previous worker ran in our parent and does not exist
                // here: its handle is meaningless, dropped without a join.
                old.abandon();
            }
            self.worker_gen.store(gen, Ordering::Release);
            self.start_claim.store(gen << 1, Ordering::Release);
            return;
        }
    }

    fn worker_loop(&self, gp: &dyn GracePeriod) {
        ON_WORKER.with(|w| w.set(true));
        loop {
            #[cfg(not(loom))]
            self.let_batch_grow();
            // Acquire pairs with the pushers' Release CAS.
            let list = self.head.swap(ptr::null_mut(), Ordering::Acquire);
            if list.is_null() {
                if self.shutdown.load(Ordering::Acquire) {
                    return;
                }
                self.worker_word
                    .word()
                    .store(WORKER_SLEEPING, Ordering::Relaxed);
                // The worker's half of the handshake in `kick_worker`.
                fence(Ordering::SeqCst);
                if self.head.load(Ordering::Relaxed).is_null()
                    && !self.shutdown.load(Ordering::Relaxed)
                {
                    self.worker_word.wait(WORKER_SLEEPING, SLEEP_SLICE * 10);
                }
                self.worker_word
                    .word()
                    .store(WORKER_AWAKE, Ordering::Relaxed);
                continue;
            }
            // One grace period that starts after the batch was taken covers
            // every callback in it (each was pushed before the swap).
            synchronize(gp, false);
            let n = run_batch(reverse(list));
            self.counts.invoked.fetch_add(n as u64, Ordering::Relaxed);
            self.counts.batches.fetch_add(1, Ordering::Relaxed);
            // Release: a `barrier` caller that sees the count drop (Acquire)
            // also sees the callbacks' effects.
            self.pending.fetch_sub(n, Ordering::Release);
        }
    }

    /// Waits up to [`BATCH_DELAY`] for more callbacks when the queue holds
    /// a small batch that nobody is waiting for.
    #[cfg(not(loom))]
    fn let_batch_grow(&self) {
        // Relaxed: a heuristic; the swap after us is what takes the batch.
        if self.head.load(Ordering::Relaxed).is_null()
            || self.urgent.swap(false, Ordering::Relaxed)
            || self.pending.load(Ordering::Relaxed) >= BATCH_FULL
        {
            return;
        }
        self.worker_word
            .word()
            .store(WORKER_DELAYING, Ordering::Relaxed);
        // Our half of a store-buffering handshake with `barrier`: (store
        // DELAYING; fence; load urgent) against (store urgent; fence; store
        // AWAKE; wake). Either we see `urgent`, or the futex wait sees the
        // word changed, or it is woken.
        fence(Ordering::SeqCst);
        if !self.urgent.load(Ordering::Relaxed) && !self.shutdown.load(Ordering::Relaxed) {
            self.worker_word.wait(WORKER_DELAYING, BATCH_DELAY);
        }
        self.worker_word
            .word()
            .store(WORKER_AWAKE, Ordering::Relaxed);
    }

    /// Returns once every callback queued before the call has run.
    pub(crate) fn barrier(self: &Arc<Self>, gp: &Arc<dyn GracePeriod>) {
        assert!(
            !ON_WORKER.with(|w| w.get()),
            "barrier() called from an RCU callback: it would wait for itself"
        );
        // Acquire pairs with the worker's Release decrement: if nothing is
        // pending, every callback queued before now (whose increment
        // happened-before this load) has run and its effects are visible.
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        // Before queueing the marker, so the batch that holds it does not
        // wait to grow (see `let_batch_grow`); the marker's push and kick
        // then wake a sleeping worker, and the wake below a delaying one.
        self.urgent.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let done = Arc::new(Event::new(0));
        let flag = Arc::clone(&done);
        self.call(
            gp,
            move || {
                // Release pairs with the Acquire load in the wait below.
                flag.word().store(1, Ordering::Release);
                flag.wake();
            },
            false,
        );
        // The push woke a sleeping worker; a delaying one needs this.
        #[cfg(not(loom))]
        {
            self.worker_word
                .word()
                .store(WORKER_AWAKE, Ordering::Relaxed);
            self.worker_word.wake();
        }
        let mut backoff = Backoff::new();
        while done.word().load(Ordering::Acquire) == 0 {
            if backoff.is_completed() {
                done.wait(0, SLEEP_SLICE);
            } else {
                backoff.snooze();
            }
        }
    }

    /// Stops the worker once it has run everything queued; waits for it
    /// unless called on the worker itself.
    pub(crate) fn shutdown(&self) {
        // Release pairs with the worker's Acquire load of `shutdown`; the
        // fence is our half of the idle handshake (as in `kick_worker`).
        self.shutdown.store(true, Ordering::Release);
        fence(Ordering::SeqCst);
        self.worker_word
            .word()
            .store(WORKER_AWAKE, Ordering::Relaxed);
        self.worker_word.wake();
        let handle = self.handle.swap(ptr::null_mut(), Ordering::AcqRel);
        if !handle.is_null() {
            // SAFETY: boxed by `start_worker`; the swap made it ours alone.
            let h = *unsafe { Box::from_raw(handle) };
            if self.worker_gen.load(Ordering::Relaxed) != fork_generation() {
                // The worker ran in our parent and does not exist here:
                // nothing to join.
                h.abandon();
            } else if ON_WORKER.with(|w| w.get()) {
                // Called on the worker itself, which cannot wait for itself.
                h.detach();
            } else {
                h.join();
            }
        }
    }
}

impl Drop for CallbackQueue {
    fn drop(&mut self) {
        // Anything left (the worker is gone: it was never started, or did
        // not survive a fork) can no longer be referenced by a reader that
        // the domain protects, since the domain itself is going away; the
        // closures are dropped without running, as after a process exit.
        let list = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        let mut p = list;
        while !p.is_null() {
            // SAFETY: every node on the stack is an unrun boxed TypedNode.
            unsafe {
                let next = (*p).next;
                ((*p).invoke)(p, false);
                p = next;
            }
        }
    }
}

fn reverse(mut p: *mut Node) -> *mut Node {
    let mut out = ptr::null_mut();
    while !p.is_null() {
        // SAFETY: the worker owns the whole detached list.
        unsafe {
            let next = (*p).next;
            (*p).next = out;
            out = p;
            p = next;
        }
    }
    out
}

fn run_batch(mut p: *mut Node) -> usize {
    let mut n = 0;
    while !p.is_null() {
        // SAFETY: each node of the detached list is an unrun boxed TypedNode
        // owned by the worker; we read its link before invoking (freeing) it.
        let next = unsafe { (*p).next };
        let node = p;
        // A panicking callback must not kill the worker (every later
        // callback and barrier would hang): report it and go on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: as above; the node is invoked exactly once.
            unsafe { ((*node).invoke)(node, true) }
        }));
        if outcome.is_err() {
            eprintln!("rcu-registry: an RCU callback panicked; continuing with the next one");
        }
        p = next;
        n += 1;
    }
    n
}

/// A worker's thread: made with `pthread_create` (`sync/raw_thread.rs`:
/// a forked child starts its workers afresh, and `std::thread::spawn` can
/// block forever there on a lock of the standard library's that a parent
/// thread held at the fork); loom's own thread under loom (`sync.rs`).
fn spawn_worker(f: impl FnOnce() + Send + 'static) -> RawThread {
    RawThread::spawn(c"rcu-callbacks", f).expect("failed to spawn the RCU callback worker thread")
}
