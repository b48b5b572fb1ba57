//! Deferred freeing of the member lists (and failed sites) that
//! *registrations* retire, through the domain's `call`.
//!
//! # Why
//!
//! A registration that joins a probed address whose member list is full
//! publishes a list twice the size and retires the old one; a registration whose breakpoint write failed
//! after its site was published retires the site and its list. No
//! unregistration is involved, so nothing would wait a grace period for
//! them before the next one: a registry that only ever gains probes would
//! keep every list it ever replaced. They are handed to the registry's RCU
//! domain instead ([`Rcu::call`]) and freed after a grace period with no
//! further action, so the memory is bounded by the lists readers might still
//! hold.
//!
//! # Batches and their one owner
//!
//! Each retiring writer operation files what it retires as one numbered
//! *batch* here (under the writer mutex) and, once it released that mutex,
//! queues one callback for every batch whose callback is not queued yet.
//! The domain's queue lets one grace period serve every callback queued
//! before it, so a burst of registrations costs one grace period, not one
//! each. A batch is taken
//! exactly once, under this state's mutex: by its callback (after its grace
//! period), or by a committer whose grace period began after the batch was
//! retired (the batch's number is below the number the committer read
//! before its grace period), whichever comes first.
//!
//! # Steps in flight
//!
//! After the grace period no single-step can *start* on a retired list
//! (steps start inside read sections), but one started earlier may still be
//! on its way to the post handlers (`Members::inflight`). A callback never
//! waits for it: that would stall every other callback of the domain behind
//! a thread that may be descheduled for any time. A list with steps in
//! flight is parked as *stuck* instead; every later callback retries the
//! stuck lists, and every committer takes them and waits for their steps,
//! because its promise that no handler of its probes runs after it returns
//! covers handlers reached through *any* list that ever held them (see
//! `unregister.rs`). Stuck lists are not retried on a timer of their own:
//! they take a step that outlasts a whole grace period (a thread
//! descheduled mid-step), and a chain of retry callbacks would keep the
//! domain's worker running grace periods for a thread that may be stopped
//! for good; the next retirement's callback or the next commit frees them
//! (at most the lists retired while such steps were in flight are kept).
//!
//! # What a committer may assume
//!
//! When [`DeferredFree::finish_upto`] returns, every list retired before the
//! committer's snapshot is freed: taken and freed by the committer, or freed
//! by a callback (callbacks free outside the mutex, so user `Drop` code in
//! the probes' handlers never runs under it, and count themselves in
//! `freeing`, which the committer waits to reach zero).

use std::collections::VecDeque;
// `std`'s Arc: the callback closure must own the state ('static); reference
// counts are not what the models check (as in `kretprobe.rs`).
use std::sync::Arc;

use super::unregister::{finish, Retired};
use crate::rcu::Rcu;
use crate::sync::atomic::Ordering;
use crate::sync::{Mutex, MutexGuard};

/// What registrations retired and the callbacks have not taken yet.
struct Batch {
    seq: u64,
    items: Vec<Retired>,
}

/// Counts of the member lists that registrations retired, as
/// `__internals::kprobe::RetiredListCounts::retired_lists` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetiredLists {
    /// Member lists retired by registrations since the registry was built.
    pub retired: u64,
    /// Of those, freed (by a grace-period callback, or by a commit or a
    /// slot reclaim that took them first; counted when taken for freeing).
    /// `retired == freed + waiting_for_steps + (lists still waiting for
    /// their grace period)`.
    pub freed: u64,
    /// Past their grace period but kept because a single-step started on
    /// them has not completed; retried by later callbacks and commits.
    pub waiting_for_steps: usize,
}

struct State {
    /// Ordered by `seq` (pushed in increasing order, removed anywhere).
    queued: VecDeque<Batch>,
    /// Member lists past their grace period with steps still in flight.
    stuck: Vec<Retired>,
    next_seq: u64,
    /// Batches filed whose callback is not queued yet.
    unqueued: Vec<u64>,
    /// Callbacks freeing a batch outside the mutex.
    freeing: usize,
    stats: RetiredLists,
}

/// The registry's deferred-free state, shared with the callbacks it queued.
pub(crate) struct DeferredFree {
    state: Mutex<State>,
}

/// The deferred-free state's mutex, held across a `fork` (`fork.rs`).
#[cfg(not(loom))]
pub(crate) struct DeferredHold<'a>(MutexGuard<'a, State>);

#[cfg(not(loom))]
impl DeferredFree {
    /// Takes the state's mutex for the fork handlers.
    pub(crate) fn hold_for_fork(&self) -> DeferredHold<'_> {
        DeferredHold(self.lock())
    }
}

#[cfg(not(loom))]
impl DeferredHold<'_> {
    /// In the child: a callback that was freeing a batch outside the mutex
    /// ran on a thread that did not survive the fork and will never finish
    /// (its lists leak in the child), so nobody waits for it.
    pub(crate) fn after_fork_in_child(mut self) {
        self.0.freeing = 0;
    }
}

/// Whether `r` can be freed now without waiting (past its grace period).
fn steps_done(r: &Retired) -> bool {
    match r {
        Retired::Members(m) | Retired::MembersWith(m, _) => {
            // SAFETY: a retired list is freed only by whoever took it from
            // this state (we hold it, or are about to); it is live here.
            let m = unsafe { &**m };
            // Acquire pairs with the Release decrement in `StepToken::drop`:
            // the step's post handlers happen-before the free.
            m.inflight.load(Ordering::Acquire) == 0
        }
        _ => true,
    }
}

fn lists_in(items: &[Retired]) -> u64 {
    items
        .iter()
        .filter(|r| matches!(r, Retired::Members(_) | Retired::MembersWith(..)))
        .count() as u64
}

impl DeferredFree {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(DeferredFree {
            state: Mutex::new(State {
                queued: VecDeque::new(),
                stuck: Vec::new(),
                next_seq: 0,
                unqueued: Vec::new(),
                freeing: 0,
                stats: RetiredLists::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent (moves of
        // whole vectors, counter updates): poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files `items` (member lists and sites unreachable to new readers) as
    /// one batch. Called by writers with the registry's writer mutex held,
    /// which orders the batch numbers with the committers' snapshots (a
    /// probe's later unregistration, and so its committer's snapshot, comes
    /// after every list that held it was filed). The writer then calls
    /// [`queue_callbacks`](Self::queue_callbacks) once it released the mutex.
    pub(crate) fn retire(&self, items: Vec<Retired>) {
        if items.is_empty() {
            return;
        }
        let mut st = self.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.stats.retired += lists_in(&items);
        st.queued.push_back(Batch { seq, items });
        st.unqueued.push(seq);
    }

    /// Queues one callback on `rcu` for every batch filed whose callback is
    /// not queued yet (one closure for all of them: a burst of retirements
    /// costs one callback). Called without the writer mutex, since
    /// `Rcu::call` may wait for the domain's worker.
    pub(crate) fn queue_callbacks(self: &Arc<Self>, rcu: &Rcu) {
        let seqs = std::mem::take(&mut self.lock().unqueued);
        if seqs.is_empty() {
            return;
        }
        let me = Arc::clone(self);
        // After the batches were filed: the callback (which runs a grace
        // period after being queued, so after the retirements) finds them,
        // unless a committer took them first.
        rcu.call(move || me.run(&seqs));
    }

    /// The callback of batches `seqs`: frees them (and stuck lists whose
    /// steps have finished) unless a committer took them; parks lists with
    /// steps in flight. Never waits.
    fn run(&self, seqs: &[u64]) {
        let ready = {
            let mut st = self.lock();
            let mut items = std::mem::take(&mut st.stuck);
            for seq in seqs {
                if let Ok(i) = st.queued.binary_search_by_key(seq, |b| b.seq) {
                    items.extend(st.queued.remove(i).map_or_else(Vec::new, |b| b.items));
                }
            }
            let (ready, stuck): (Vec<_>, Vec<_>) = items.into_iter().partition(steps_done);
            st.stuck = stuck;
            st.stats.waiting_for_steps = st.stuck.len();
            if ready.is_empty() {
                return;
            }
            // Counted when taken, so that `retired = freed + waiting` holds
            // at every moment (freeing finishes before any committer that
            // could observe the lists returns: see `wait_for_callbacks`).
            st.stats.freed += lists_in(&ready);
            st.freeing += 1;
            ready
        };
        // Past the grace period and no step in flight: nothing refers to
        // them. Members and sites only, so no orphan comes back.
        let orphans = finish(ready);
        debug_assert!(orphans.is_empty());
        self.lock().freeing -= 1;
    }

    /// The number the next batch will get: a committer reads it (under the
    /// writer mutex) before its grace period; every batch below it is past
    /// that grace period once it ends.
    pub(crate) fn snapshot(&self) -> u64 {
        self.lock().next_seq
    }

    /// Whether a batch numbered below `upto` is still queued, or a list
    /// waits for its steps: work a committer's grace period would finish.
    pub(crate) fn outstanding_below(&self, upto: u64) -> bool {
        let st = self.lock();
        !st.stuck.is_empty() || st.queued.front().is_some_and(|b| b.seq < upto)
    }

    /// Frees every batch numbered below `upto` and every stuck list, waiting
    /// for their steps in flight, and waits for callbacks still freeing.
    /// The caller waited for a grace period that began after it read `upto`
    /// from [`snapshot`](Self::snapshot) (`u64::MAX`: everything, at
    /// registry teardown after a grace period).
    pub(crate) fn finish_upto(&self, upto: u64) {
        let mut taken = {
            let mut st = self.lock();
            let mut taken = std::mem::take(&mut st.stuck);
            while st.queued.front().is_some_and(|b| b.seq < upto) {
                let b = st.queued.pop_front().expect("front checked above");
                taken.extend(b.items);
            }
            st.stats.waiting_for_steps = 0;
            st.stats.freed += lists_in(&taken);
            taken
        };
        if !taken.is_empty() {
            // `finish` waits for each list's steps in flight, then frees it.
            let orphans = finish(std::mem::take(&mut taken));
            debug_assert!(orphans.is_empty());
        }
        self.wait_for_callbacks();
    }

    /// Waits until no callback is freeing a batch it took (a short wait:
    /// they never wait for anything themselves).
    pub(crate) fn wait_for_callbacks(&self) {
        let mut backoff = crate::sync::Backoff::new();
        while self.lock().freeing != 0 {
            backoff.snooze();
        }
    }

    /// The counters.
    pub(crate) fn stats(&self) -> RetiredLists {
        self.lock().stats
    }
}
