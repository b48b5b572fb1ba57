//! Grace-period numbering with shared waiting, which both domains use (their
//! deferred callbacks are in `callbacks.rs`).
//!
//! # Grace-period numbers
//!
//! [`GpSeq`] holds `2 * completed + in_progress`. A caller that needs a grace
//! period takes a *snapshot*, the value the counter will have once a grace
//! period that starts after now has completed: `(seq + 3) & !1` (if one is
//! already running it may have started too early, so the next one is
//! needed). Any caller may then become the *leader* by moving the counter from
//! even to odd with a CAS and running the domain's scan; everyone else waits
//! until the counter passes their snapshot. N concurrent callers therefore
//! share grace periods: at most the one in progress plus one more.
//!
//! No lock is held while a grace period runs, so `fork()` cannot leave one
//! locked in the child. A leader that did not survive a fork is recognised by
//! the fork generation it recorded, and its half-done grace period is rolled
//! back (never counted as complete) so the child runs its own.

use super::slots::fork_generation;
#[cfg(not(loom))]
use crate::sync::atomic::AtomicUsize;
use crate::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use crate::sync::Backoff;
use std::time::Duration;

/// The longest a waiter sleeps before re-checking on its own. Wake-ups are
/// explicit; the timeout only bounds the damage of a wake-up we did not
/// foresee (a reader thread killed by a signal, say).
pub(crate) const SLEEP_SLICE: Duration = Duration::from_millis(10);

/// A domain's grace-period engine: how to run one, and its numbering.
pub(crate) trait GracePeriod: Send + Sync + 'static {
    /// The domain's grace-period numbering.
    fn seq(&self) -> &GpSeq;
    /// Runs one full grace period. Only ever called by the current leader,
    /// so calls never overlap. `expedited` forbids sleeping.
    fn run(&self, expedited: bool);
}

/// Grace-period numbering and leader election (see the module docs).
#[derive(Debug)]
pub(crate) struct GpSeq {
    /// `2 * completed + in_progress`.
    seq: AtomicU64,
    /// Fork generation of the process image the current leader runs in.
    leader_gen: AtomicU64,
    /// Bumped at each completion; non-leaders sleep on it.
    done_word: AtomicU32,
    /// Non-leaders asleep (or about to be) on `done_word`.
    sleepers: AtomicU32,
    /// `synchronize()` callers past their snapshot and not yet returned: a
    /// test hook (a test holds a reader until every caller it started has
    /// arrived, instead of guessing with a sleep). Not under loom: the
    /// models would explore its interleavings for nothing.
    #[cfg(not(loom))]
    pub(crate) waiters: AtomicUsize,
    /// Under loom, non-leaders block on a condition variable instead of a
    /// futex, so the model does not explore an endless spin.
    #[cfg(loom)]
    parking: (crate::sync::Mutex<()>, crate::sync::Condvar),
}

impl GpSeq {
    /// A `const` constructor for statics (std atomics only).
    #[cfg(not(loom))]
    pub(crate) const fn new_const() -> Self {
        GpSeq {
            seq: AtomicU64::new(0),
            leader_gen: AtomicU64::new(0),
            done_word: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            waiters: AtomicUsize::new(0),
        }
    }

    pub(crate) fn new() -> Self {
        GpSeq {
            seq: AtomicU64::new(0),
            leader_gen: AtomicU64::new(0),
            done_word: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            #[cfg(not(loom))]
            waiters: AtomicUsize::new(0),
            #[cfg(loom)]
            parking: (crate::sync::Mutex::new(()), crate::sync::Condvar::new()),
        }
    }

    /// The counter value at which a grace period starting after now is done.
    #[inline]
    pub(crate) fn snapshot(&self) -> u64 {
        // SeqCst fence: the caller's earlier updates (typically unlinking
        // what it will free) are ordered before this load. If the load reads
        // a value from before some leader's CAS, this fence precedes that
        // leader's SeqCst fence/heavy barrier in the single total order, so
        // the leader's scans (and the readers the heavy barrier reaches) see
        // the updates.
        fence(Ordering::SeqCst);
        let s = self.seq.load(Ordering::Relaxed);
        (s.wrapping_add(3)) & !1
    }

    /// Whether the counter has reached `snap`.
    #[inline]
    pub(crate) fn done(&self, snap: u64) -> bool {
        // Acquire pairs with the leader's Release store at completion: the
        // grace period's final heavy barrier (readers' sections ended)
        // happens-before what the caller does next (free memory).
        let s = self.seq.load(Ordering::Acquire);
        reached(s, snap)
    }

    /// Number of completed grace periods.
    pub(crate) fn completed(&self) -> u64 {
        self.seq.load(Ordering::Relaxed) / 2
    }

    /// Returns once the counter has reached `snap`, leading grace periods
    /// when nobody else is.
    pub(crate) fn wait_for(&self, snap: u64, gp: &dyn GracePeriod, expedited: bool) {
        let mut backoff = Backoff::new();
        loop {
            let s = self.seq.load(Ordering::Acquire);
            if reached(s, snap) {
                return;
            }
            if s & 1 == 0 {
                // Record our generation *before* the CAS that makes us leader,
                // so a waiter that sees the odd value (Acquire on `seq`) also
                // sees the generation of the process the leader runs in.
                self.leader_gen.store(fork_generation(), Ordering::Relaxed);
                // AcqRel: Acquire orders our scans after the previous
                // leader's completion; Release publishes `leader_gen`.
                if self
                    .seq
                    .compare_exchange(s, s + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    gp.run(expedited);
                    self.complete(s + 2);
                    backoff = Backoff::new();
                }
                continue;
            }
            if self.leader_gen.load(Ordering::Relaxed) != fork_generation() {
                // The leader ran in our parent and did not survive fork():
                // roll its grace period back (it never completed here).
                let _ = self
                    .seq
                    .compare_exchange(s, s - 1, Ordering::AcqRel, Ordering::Relaxed);
                continue;
            }
            if !backoff.is_completed() || expedited {
                backoff.snooze();
                continue;
            }
            self.sleep_until_changed(s);
        }
    }

    #[cold]
    #[cfg(loom)]
    fn sleep_until_changed(&self, s: u64) {
        let (lock, cv) = &self.parking;
        let mut held = lock.lock().unwrap();
        // Checked under the lock that `complete` takes before notifying, so
        // the notification cannot fall between the check and the wait.
        while self.seq.load(Ordering::Acquire) == s {
            held = cv.wait(held).unwrap();
        }
    }

    #[cold]
    #[cfg(not(loom))]
    fn sleep_until_changed(&self, s: u64) {
        let word = self.done_word.load(Ordering::Acquire);
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        // Store-buffering handshake with `complete`: (sleepers += 1; fence;
        // load seq) against (store seq; fence; load sleepers). The SeqCst
        // fences forbid both loads missing the other side's write, so either
        // the leader sees us counted and wakes us, or we see the new `seq`.
        // (Fences rather than SeqCst accesses: loom models SeqCst fences.)
        fence(Ordering::SeqCst);
        if self.seq.load(Ordering::Relaxed) == s {
            crate::sync::wait_on_timeout(&self.done_word, word, SLEEP_SLICE);
        }
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
    }

    fn complete(&self, new: u64) {
        // Release: pairs with the Acquire load in `done` (see there).
        self.seq.store(new, Ordering::Release);
        self.done_word.fetch_add(1, Ordering::Release);
        // The leader's half of the handshake in `sleep_until_changed`.
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::Relaxed) != 0 {
            crate::sync::wake_all(&self.done_word);
        }
        #[cfg(loom)]
        {
            drop(self.parking.0.lock().unwrap());
            self.parking.1.notify_all();
        }
    }
}

#[inline]
fn reached(seq: u64, snap: u64) -> bool {
    // Wrapping comparison: correct as long as fewer than 2^62 grace periods
    // separate a snapshot from its check.
    (seq.wrapping_sub(snap) as i64) >= 0
}

/// Waits for one grace period that starts after the call.
pub(crate) fn synchronize(gp: &dyn GracePeriod, expedited: bool) {
    let snap = gp.seq().snapshot();
    // Relaxed (both): a gauge read only by tests (`Rcu::sync_waiters`),
    // which learn from it nothing but that a caller has taken its snapshot.
    #[cfg(not(loom))]
    gp.seq().waiters.fetch_add(1, Ordering::Relaxed);
    gp.seq().wait_for(snap, gp, expedited);
    #[cfg(not(loom))]
    gp.seq().waiters.fetch_sub(1, Ordering::Relaxed);
}
