//! The per-thread table of kretprobe instances in flight: each thread's
//! instances in a stripe it owns, filed and taken without a locked
//! instruction, with hashed spin-locked stripes for the threads beyond.
//!
//! # Why per thread
//!
//! At the return trampoline the only things known are the current thread and
//! its stack pointer. Instances are therefore filed under the thread that
//! made the call. One global lock made every kretprobe in the system take
//! turns (see seed 003); hashed stripes, one spin lock each, let two threads
//! return at once, but still cost a locked instruction at every entry and
//! every return, a third of an optimized kretprobe's budget.
//!
//! # Own stripes
//!
//! A thread's first tracked call in a table claims one of the table's own
//! stripes (one CAS, once per thread and table; the claim is cached in a
//! thread-local array). From then on only that thread files and takes
//! there, so it needs no lock, only to keep out the rare other thread that
//! must touch its chain: an explicit [`flush`](super::KprobeRegistry::flush_thread)
//! of it, the registry's teardown. That is an asymmetric handshake, the
//! one `Rcu` readers use:
//!
//! - the owner raises its stripe's `busy` flag, issues a *light* barrier (a
//!   compiler fence when the process has the expedited `membarrier`), and
//!   looks at the `remote` flag: down, it works on the chain and lowers
//!   `busy`; up, it lowers `busy` and takes the stripe's spin lock;
//! - the other thread (one at a time: the table's `remote` mutex) raises
//!   `remote`, issues a *heavy* barrier (`membarrier`: a full barrier on
//!   every running thread), waits until `busy` is down, takes the lock,
//!   works, and lowers `remote`.
//!
//! With a full barrier on each side, at least one of them sees the other's
//! flag (store buffering cannot hide both), so the owner's lock-free section
//! and the other thread's never overlap. The owner pays two plain stores
//! and a load. `loom-tests/tests/kprobe.rs` (model 8) checks the handshake.
//!
//! A claim is given back when the thread's instances are flushed at its
//! exit (`thread_exit.rs`). A thread that exits without the flush (no exit
//! hook: the process ran out of thread-specific keys) keeps its stripe; a
//! later thread with the same key (the same thread-local address) takes it
//! over, and its returns sort out the stale frames as abandoned ones. A
//! thread that finds every own stripe claimed, or its claim array full,
//! or that still has instances in the shared stripes, files in the shared
//! stripes: a [`HashedLocks`] array of chains keyed by [`ThreadKey`], one
//! spin lock per stripe. One call's instances are therefore never split
//! between the two. A claim entry of a registry that was dropped is taken
//! over by the thread's next claim once the array is full: tables list
//! their ids in a global set of live tables while they exist (`LIVE`), and
//! an entry whose table is not listed there is free. (With more than
//! 256 tables alive at once (`LIVE_TABLES`) the set cannot list them all, and
//! no entry is taken over while an unlisted table lives.)
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
//! # Fork
//!
//! The fork handlers hold the `remote` mutex, every own stripe's lock and
//! every shared stripe (owners in their lock-free sections need none of
//! them). In the child, which has only the forking thread, the other
//! threads' own stripes are forgotten (`StripesHold::forget_other_threads`):
//! their instances stay out of their pools there, as in the shared stripes.
//!
//! # Lock order
//!
//! An instance is taken from its kretprobe's pool (a lock-free set of free
//! flags, `kretprobe.rs`), prepared with no lock held, then filed (the own
//! stripe's handshake, or one shared stripe). At the return it is unlinked
//! the same way, its handler runs with no lock held, and it goes back to
//! its pool (one release store). Nothing nests: no path holds two stripes
//! (the fork hold aside), and the `remote` mutex is taken only off the hit
//! path, before a stripe. (Were the pool ever locked again, the only
//! permitted order is **table stripe, then pool**, the order the kernel
//! adopted in seed 003.)
//!
//! The stripe locks are [`SpinLock`]s: no allocation, no system call while
//! uncontended, never a sleep (a contended waiter may yield the CPU). None
//! is held, and no owner is inside its lock-free section, while user code
//! runs, and the runtime refuses probes on its own code, so a probe trap
//! never lands inside one. A *signal* can: the return path runs on the
//! thread's ordinary stack with signals deliverable, and a signal handler
//! may call a kretprobed function on the same thread. That is why the hit
//! path touches the table only with the thread's re-entrancy flag already
//! set (see `hit.rs`): the nested hit then runs no kretprobe entry and
//! touches no chain. [`InstanceTable::file`] and
//! [`InstanceTable::take_returning`] assert the flag in debug builds.

use std::cell::Cell;
use std::ptr::NonNull;

use crossbeam_utils::CachePadded;

use super::kretprobe::ReturnProbe;
use super::this_thread::{in_kprobe_handler, ThisThread, ThreadKey, MAX_CLAIMS};
use crate::hashlock::{HashedLocks, SpinLock, StripeLock};
use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use crate::sync::{heavy_barrier, light_barrier, spin_loop, Mutex, UnsafeCell};

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
    fn empty() -> Taken {
        Taken {
            head: std::ptr::null_mut(),
        }
    }

    /// How many instances are in the list.
    fn len(&self) -> usize {
        let mut n = 0;
        let mut p = self.head;
        // SAFETY: taken instances are owned by this list.
        while let Some(i) = unsafe { p.as_ref() } {
            n += 1;
            // SAFETY: as above.
            p = unsafe { i.next() };
        }
        n
    }

    /// Puts `more` after this list's instances.
    fn append(&mut self, more: Taken) {
        let Some(mut last) = NonNull::new(self.head) else {
            *self = more;
            return;
        };
        // SAFETY: taken instances are owned by this list.
        unsafe {
            while let Some(n) = NonNull::new(last.as_ref().next()) {
                last = n;
            }
            last.as_ref().set_next(more.head);
        }
    }

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

/// Own stripes a table gives by default: threads beyond this many (at
/// once, in one table) file their instances in the shared stripes.
pub const DEFAULT_OWN_STRIPES: usize = 64;

/// Source of table ids. `std`'s atomic even under loom: an identity,
/// published by nothing, unique across model executions too.
static NEXT_TABLE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Tables the live set ([`LIVE`]) lists at once.
const LIVE_TABLES: usize = 256;

/// The ids of the tables alive now (0: an empty place), so that a thread
/// whose claim array is full can tell an entry left by a dropped table
/// (module docs, "Own stripes"). `std`'s atomics even under loom, as
/// [`NEXT_TABLE_ID`]: a table is listed before any thread can reach it and
/// unlisted after the last one is done with it (the registry's teardown),
/// so what a claim reads here is ordered by the table's own publication,
/// not by these atomics.
static LIVE: [std::sync::atomic::AtomicU64; LIVE_TABLES] =
    [const { std::sync::atomic::AtomicU64::new(0) }; LIVE_TABLES];

/// Tables alive but not listed in [`LIVE`] (it was full when they were
/// made). While there is one, no claim entry is taken as free: its table
/// might be one of them.
static UNLISTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Lists the new table `id` in [`LIVE`] (or counts it in [`UNLISTED`]).
fn list_table(id: u64) {
    use std::sync::atomic::Ordering as O;
    // Relaxed (all three): see `LIVE`; the CAS makes each place one table's.
    let listed = LIVE.iter().any(|p| {
        p.load(O::Relaxed) == 0 && p.compare_exchange(0, id, O::Relaxed, O::Relaxed).is_ok()
    });
    if !listed {
        UNLISTED.fetch_add(1, O::Relaxed);
    }
}

/// Takes the dropped table `id` out of [`LIVE`] (or [`UNLISTED`]).
fn unlist_table(id: u64) {
    use std::sync::atomic::Ordering as O;
    // Relaxed (all three): see `LIVE`.
    match LIVE.iter().find(|p| p.load(O::Relaxed) == id) {
        Some(p) => p.store(0, O::Relaxed),
        None => {
            UNLISTED.fetch_sub(1, O::Relaxed);
        }
    }
}

/// Whether the table `id` (an id a claim entry holds) was dropped: not in
/// [`LIVE`], with every live table listed. Ids are never reused, so a
/// dropped table's id never comes back. Async-signal-safe (loads only).
fn table_dropped(id: u64) -> bool {
    use std::sync::atomic::Ordering as O;
    // Relaxed (both): see `LIVE`.
    UNLISTED.load(O::Relaxed) == 0 && !LIVE.iter().any(|p| p.load(O::Relaxed) == id)
}

/// Where a thread's instances are filed in a table
/// ([`InstanceTable::filed`]).
pub(crate) enum Filed<'a> {
    /// In the thread's own stripe.
    Own(&'a OwnStripe),
    /// In the shared stripes.
    Shared,
}

/// A stripe one thread claimed for its own instances (module docs, "Own
/// stripes").
pub(crate) struct OwnStripe {
    /// The owner's [`ThreadKey`]; 0 while free.
    owner: AtomicUsize,
    /// Up while the owner works on `chain` without the lock.
    busy: AtomicBool,
    /// Up while another thread works on (or waits to work on) `chain`: the
    /// owner then takes `lock` too.
    remote: AtomicBool,
    lock: SpinLock,
    chain: UnsafeCell<Chain>,
}

// SAFETY: the chain is touched by its owner inside the `busy`/`remote`
// handshake or by any thread under `lock` (see `as_owner`, `as_remote`);
// its instances pass between threads only through those.
unsafe impl Sync for OwnStripe {}
// SAFETY: as above; a stripe holds raw pointers to instances, no thread's.
unsafe impl Send for OwnStripe {}

impl OwnStripe {
    fn new() -> Self {
        OwnStripe {
            owner: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            remote: AtomicBool::new(false),
            lock: SpinLock::new(),
            chain: UnsafeCell::new(Chain::default()),
        }
    }

    /// Runs `f` on the chain as its owner: no lock unless another thread
    /// is at it (module docs).
    #[inline]
    fn as_owner<R>(&self, f: impl FnOnce(&mut Chain) -> R) -> R {
        // Relaxed: ordered by the barrier below.
        self.busy.store(true, Ordering::Relaxed);
        // Pairs with the heavy barrier in `as_remote`: either that thread
        // sees `busy` up and waits, or we see `remote` up (store-buffering
        // with a full barrier on both sides).
        light_barrier();
        // Acquire pairs with the Release store that ends `as_remote`: what
        // the other thread did to the chain happens-before our use.
        if !self.remote.load(Ordering::Acquire) {
            // SAFETY: `remote` was down after `busy` went up: no other
            // thread touches the chain until `busy` is down again.
            let r = self.chain.with_mut(|c| f(unsafe { &mut *c }));
            // Release pairs with the Acquire loads in `as_remote`'s wait:
            // our use of the chain happens-before the other thread's.
            self.busy.store(false, Ordering::Release);
            return r;
        }
        // Release: as above (a waiting remote may go on).
        self.busy.store(false, Ordering::Release);
        let _g = self.lock.lock();
        // SAFETY: under the lock, which every non-owner access holds.
        self.chain.with_mut(|c| f(unsafe { &mut *c }))
    }

    /// Runs `f` on the chain from a thread that is not its owner. The
    /// caller holds the table's `remote` mutex (one such thread at a time:
    /// `remote` is a flag, not a count).
    fn as_remote<R>(&self, f: impl FnOnce(&mut Chain) -> R) -> R {
        // Relaxed: ordered by the barrier below.
        self.remote.store(true, Ordering::Relaxed);
        // Pairs with the owner's light barrier in `as_owner`.
        heavy_barrier();
        // Acquire pairs with the owner's Release store of `busy`.
        while self.busy.load(Ordering::Acquire) {
            spin_loop();
        }
        let r = {
            let _g = self.lock.lock();
            // SAFETY: the owner is out of its lock-free section and will
            // take the lock for any other until `remote` is down.
            self.chain.with_mut(|c| f(unsafe { &mut *c }))
        };
        // Release pairs with the owner's Acquire load of `remote`.
        self.remote.store(false, Ordering::Release);
        r
    }
}

/// The per-thread instance table (module docs).
pub(crate) struct InstanceTable {
    /// Names the table in the threads' claim arrays (`this_thread.rs`); never
    /// reused.
    id: u64,
    own: Box<[CachePadded<OwnStripe>]>,
    shared: HashedLocks<ThreadKey, SpinLock, Chain>,
    /// Held by a thread working on another thread's own stripe.
    remote: Mutex<()>,
}

/// Every stripe of an instance table, held across a `fork` (`fork.rs`).
#[cfg(not(loom))]
pub(crate) struct StripesHold<'a> {
    table: &'a InstanceTable,
    _remote: crate::sync::MutexGuard<'a, ()>,
    _own: Vec<crate::hashlock::SpinGuard<'a>>,
    _shared: crate::hashlock::AllGuard<'a, SpinLock, Chain>,
}

#[cfg(not(loom))]
impl StripesHold<'_> {
    /// In the child of a `fork` (one thread: the caller): forgets every own
    /// stripe but the caller's. Their owners do not exist here; what they
    /// had filed stays out of its pools, as their instances in the shared
    /// stripes do, and a chain one of them was changing when the process
    /// forked is never read.
    pub(crate) fn forget_other_threads(&self) {
        let me = ThreadKey::current().0;
        for s in self.table.own.iter() {
            // Relaxed: the child has one thread.
            if s.owner.load(Ordering::Relaxed) != me {
                s.owner.store(0, Ordering::Relaxed);
                s.busy.store(false, Ordering::Relaxed);
                // SAFETY: one thread, and its lock held by this hold.
                s.chain
                    .with_mut(|c| unsafe { (*c).head = std::ptr::null_mut() });
            }
        }
    }
}

impl Drop for InstanceTable {
    fn drop(&mut self) {
        // Threads' claim entries for this table become free (module docs).
        unlist_table(self.id);
    }
}

impl InstanceTable {
    /// Takes every stripe for the fork handlers: the remote mutex, each own
    /// stripe's lock (owners in their lock-free sections need none of them
    /// and never wait for one), then the shared stripes in index order. The
    /// caller's re-entrancy flag is up (a signal handler on this thread
    /// must not file or unlink an instance meanwhile).
    #[cfg(not(loom))]
    pub(crate) fn hold_for_fork(&self) -> StripesHold<'_> {
        debug_assert!(
            in_kprobe_handler(),
            "stripes taken before the re-entrancy flag"
        );
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        StripesHold {
            table: self,
            _remote: remote,
            _own: self.own.iter().map(|s| s.lock.lock()).collect(),
            _shared: self.shared.lock_all(),
        }
    }

    /// A table of `own` own stripes and `shared` shared ones (rounded up to
    /// a power of two; 1 makes them one global lock, the benchmark's peer).
    pub(crate) fn new(own: usize, shared: usize) -> Self {
        let shared = shared.clamp(1, crate::hashlock::MAX_STRIPES);
        // Relaxed: only uniqueness matters.
        let id = NEXT_TABLE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        list_table(id);
        InstanceTable {
            id,
            own: (0..own)
                .map(|_| CachePadded::new(OwnStripe::new()))
                .collect(),
            shared: HashedLocks::new(shared).expect("stripe count clamped to the valid range"),
            remote: Mutex::new(()),
        }
    }

    /// Number of shared stripes.
    pub(crate) fn stripes(&self) -> usize {
        self.shared.len()
    }

    /// Number of own stripes.
    pub(crate) fn own_stripes(&self) -> usize {
        self.own.len()
    }

    /// The shared stripe `thread`'s instances are filed under when it holds
    /// no own stripe.
    #[cfg(test)]
    pub(crate) fn stripe_of(&self, thread: ThreadKey) -> usize {
        self.shared.stripe_of(&thread)
    }

    /// Whether the calling thread holds an own stripe of this table.
    #[cfg(test)]
    pub(crate) fn holds_own_stripe(&self) -> bool {
        self.mine(ThisThread::get()).is_some()
    }

    /// The calling thread's own stripe, if it holds one.
    #[inline]
    fn mine(&self, me: ThisThread) -> Option<&OwnStripe> {
        let (_, idx) = me
            .block()
            .claims
            .iter()
            .map(Cell::get)
            .find(|&(id, _)| id == self.id)?;
        let s = self.own.get(idx as usize)?;
        // Relaxed: only this thread sets its own key in a stripe; a fork
        // child's reset runs on this thread too.
        (s.owner.load(Ordering::Relaxed) == me.key().0).then_some(&**s)
    }

    /// Where the calling thread `thread` has its instances filed here, if
    /// anywhere: its own stripe when it holds one, else the shared stripes
    /// when it may have some there. Never both: a thread claims only with
    /// nothing in the shared stripes (its count of them is never below
    /// the truth), and files nothing there once it holds an own stripe.
    /// `None` is exact (a thread files only through `file`).
    #[inline]
    pub(crate) fn filed(&self, me: ThisThread) -> Option<Filed<'_>> {
        match self.mine(me) {
            Some(s) => Some(Filed::Own(s)),
            None => (me.block().in_shared.get() != 0).then_some(Filed::Shared),
        }
    }

    /// Claims an own stripe for the calling thread: a free one (or one a
    /// dead thread with the same key left behind), when the thread has a
    /// free claim entry and nothing in the shared stripes. One CAS, once
    /// per thread and table.
    #[cold]
    fn claim(&self, me: ThisThread) -> Option<&OwnStripe> {
        let block = me.block();
        if self.own.is_empty() || block.in_shared.get() != 0 {
            return None;
        }
        let claims: [(u64, u32); MAX_CLAIMS] = std::array::from_fn(|i| block.claims[i].get());
        let entry = claims
            .iter()
            .position(|&(id, _)| id == self.id)
            .or_else(|| claims.iter().position(|&(id, _)| id == 0))
            // Full: an entry a dropped table left is free (module docs).
            .or_else(|| claims.iter().position(|&(id, _)| table_dropped(id)))?;
        let n = self.own.len();
        // Spread threads' starting points (keys are thread-local addresses,
        // far apart and aligned alike).
        // (Under loom keys change from one execution to the next, and the
        // model must be deterministic: the scan starts at 0.)
        let start = if cfg!(loom) {
            0
        } else {
            (me.key().0.wrapping_mul(0x9e37_79b9_7f4a_7c15_u64 as usize) >> 16) % n
        };
        for k in 0..n {
            let i = (start + k) % n;
            let s = &self.own[i];
            // Relaxed: a candidate only; the CAS decides.
            let cur = s.owner.load(Ordering::Relaxed);
            // A key equal to ours belongs to a thread that exited without
            // flushing (no exit hook): its chain is for our `take` to sort.
            if (cur == 0 || cur == me.key().0)
                // Acquire pairs with the Release store in `release_own`:
                // the previous owner's last use of the chain happens-before
                // ours.
                && s.owner
                    .compare_exchange(cur, me.key().0, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                block.claims[entry].set((self.id, i as u32));
                return Some(s);
            }
        }
        None
    }

    /// Gives the calling thread's own stripe back (it exits; its chain was
    /// just flushed).
    fn release_own(&self, me: ThisThread) {
        let Some(s) = self.mine(me) else { return };
        debug_assert!(s.as_owner(|c| c.head.is_null()), "released with instances");
        // Release pairs with the Acquire CAS in `claim`.
        s.owner.store(0, Ordering::Release);
        for c in me.block().claims.iter().filter(|c| c.get().0 == self.id) {
            c.set((0, 0));
        }
    }

    /// Files `inst` under the calling thread `me`.
    ///
    /// # Safety
    /// The caller owns `inst` (its frame is set, it is in no chain).
    pub(crate) unsafe fn file(&self, me: ThisThread, inst: NonNull<InstanceHdr>) {
        debug_assert!(
            in_kprobe_handler(),
            "a stripe taken before the re-entrancy flag"
        );
        let push = |chain: &mut Chain| {
            // SAFETY: owned by the caller until linked; linked under the
            // chain's exclusion.
            unsafe { inst.as_ref().set_next(chain.head) };
            chain.head = inst.as_ptr();
        };
        match self.mine(me).or_else(|| self.claim(me)) {
            Some(s) => s.as_owner(push),
            None => {
                push(&mut self.shared.lock(&me.key()));
                let n = &me.block().in_shared;
                n.set(n.get() + 1);
            }
        }
        // This thread now has a frame to give back if it exits inside the
        // call (`thread_exit.rs`).
        super::thread_exit::arm(me);
    }

    /// Unlinks the instances of a call returning on the calling thread
    /// `me` with stack pointer `sp`: if any instance of the thread has
    /// exactly `sp`, every instance of the thread with a stack pointer at or
    /// below `sp` (the returning call's, and abandoned deeper frames');
    /// otherwise nothing.
    /// `filed` is where [`filed`](Self::filed) found them.
    pub(crate) fn take_returning(&self, me: ThisThread, sp: u64, filed: Filed<'_>) -> Taken {
        debug_assert!(
            in_kprobe_handler(),
            "a stripe taken before the re-entrancy flag"
        );
        let thread = me.key();
        let take = |chain: &mut Chain| {
            #[cfg(test)]
            test_hooks::while_locked();
            // SAFETY: the caller has the chain to itself.
            unsafe { take_matching(&mut chain.head, thread, sp) }
        };
        match filed {
            Filed::Own(s) => s.as_owner(take),
            Filed::Shared => {
                let taken = take(&mut self.shared.lock(&thread));
                let n = &me.block().in_shared;
                n.set(n.get().saturating_sub(taken.len()));
                taken
            }
        }
    }

    /// Unlinks every instance of `thread` whose call returns with a stack
    /// pointer at or below `sp` (`u64::MAX`: all of them), newest first:
    /// frames the thread abandoned (it exited, or jumped past them). With
    /// the thread's re-entrancy flag up (see `file`); `thread` may be
    /// another thread (an explicit flush), which then waits while that
    /// thread is inside its own stripe's lock-free section.
    pub(crate) fn take_thread(&self, thread: ThreadKey, sp: u64) -> Taken {
        debug_assert!(
            in_kprobe_handler(),
            "a stripe taken before the re-entrancy flag"
        );
        let unlink = |chain: &mut Chain| {
            // SAFETY: the caller has the chain to itself.
            unsafe { unlink_frames(&mut chain.head, thread, sp) }
        };
        let me = ThisThread::get();
        let mine = thread == me.key();
        let mut taken = if mine {
            let t = self.mine(me).map(|s| s.as_owner(unlink));
            if sp == u64::MAX {
                self.release_own(me);
            }
            t.unwrap_or_else(Taken::empty)
        } else {
            let _one = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            // Relaxed: a thread's key is in at most one stripe (it claims
            // once per table); a stale read finds a stripe whose chain holds
            // none of its frames, which is harmless.
            let s = self
                .own
                .iter()
                .find(|s| s.owner.load(Ordering::Relaxed) == thread.0);
            s.map_or_else(Taken::empty, |s| s.as_remote(unlink))
        };
        let more = unlink(&mut self.shared.lock(&thread));
        if mine {
            let n = &me.block().in_shared;
            n.set(n.get().saturating_sub(more.len()));
        }
        taken.append(more);
        taken
    }

    /// Unlinks every filed instance (registry teardown).
    pub(crate) fn take_all(&self) -> Vec<NonNull<InstanceHdr>> {
        let mut out = Vec::new();
        let mut drain = |chain: &mut Chain| {
            let mut p = std::mem::replace(&mut chain.head, std::ptr::null_mut());
            while let Some(i) = NonNull::new(p) {
                // SAFETY: unlinked from a chain we have to ourselves.
                unsafe {
                    p = i.as_ref().next();
                    i.as_ref().set_next(std::ptr::null_mut());
                }
                out.push(i);
            }
        };
        {
            let _one = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            // A stripe no thread holds has an empty chain: its last owner
            // flushed it before giving it back (`release_own`), and a fork
            // child's reset empties it. Relaxed: a claim is made in `file`,
            // on the hit path, whose read sections the teardown's grace
            // period waited for.
            for s in self
                .own
                .iter()
                .filter(|s| s.owner.load(Ordering::Relaxed) != 0)
            {
                s.as_remote(&mut drain);
            }
        }
        for s in 0..self.shared.len() {
            drain(&mut self.shared.lock_stripe(s));
        }
        out
    }
}

/// Unlinks, from the chain at `head`, the instances of a call returning on
/// `thread` with `sp` (see [`InstanceTable::take_returning`]).
///
/// # Safety
/// The caller has the chain to itself.
unsafe fn take_matching(head: &mut *mut InstanceHdr, thread: ThreadKey, sp: u64) -> Taken {
    // SAFETY: the chain is the caller's (contract).
    unsafe {
        // The common case first: the call's instance alone in the chain
        // (one tracked call in flight on the thread): taken without the
        // walks below, which would find nothing else.
        if let Some(h) = (*head).as_ref() {
            let f = h.frame();
            if f.thread == thread && f.ret_sp == sp && h.next().is_null() {
                let taken = Taken { head: *head };
                *head = std::ptr::null_mut();
                return taken;
            }
        }
        let mut p = *head;
        while let Some(i) = p.as_ref() {
            let f = i.frame();
            if f.thread == thread && f.ret_sp == sp {
                return unlink_frames(head, thread, sp);
            }
            p = i.next();
        }
    }
    Taken::empty()
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

#[cfg(all(test, not(loom)))]
mod claim_tests {
    use super::*;

    #[test]
    fn a_claim_entry_a_dropped_table_left_is_taken_over_and_a_live_ones_never() {
        // A thread of its own: its claim array starts empty.
        std::thread::spawn(|| {
            let me = ThisThread::get();
            let mut tables: Vec<InstanceTable> =
                (0..MAX_CLAIMS).map(|_| InstanceTable::new(2, 1)).collect();
            for t in &tables {
                assert!(t.claim(me).is_some(), "a free entry, a free stripe");
            }
            let next = InstanceTable::new(2, 1);
            assert!(
                next.claim(me).is_none(),
                "every entry is a live table's: none may be taken over"
            );
            assert!(next.mine(me).is_none());
            // The second table is dropped with the claim still in the array
            // (as a registry dropped while the thread lives).
            drop(tables.remove(1));
            assert!(
                next.claim(me).is_some(),
                "the dropped table's entry is free"
            );
            assert!(next.mine(me).is_some());
            for t in &tables {
                assert!(t.mine(me).is_some(), "the live tables' claims stay");
            }
            assert_eq!(
                me.block()
                    .claims
                    .iter()
                    .filter(|c| c.get().0 == next.id)
                    .count(),
                1,
                "one entry for the new table"
            );
        })
        .join()
        .unwrap();
    }
}
