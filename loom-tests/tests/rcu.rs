//! loom models of the RCU domains (`Rcu`, `Srcu`, callbacks, polling).
//!
//! Each model publishes a value whose payload lives in a loom `UnsafeCell`;
//! the updater unlinks it, waits for a grace period by the mechanism under
//! test, then writes a poison value into it. If the grace period did not
//! order every earlier reader's access before that write, loom reports a
//! causality violation (a data race on the cell), and readers also assert
//! they never read the poison.
//!
//! What these models do NOT cover:
//! - `membarrier`: under loom both sides of every asymmetric barrier pair are
//!   `SeqCst` fences. The models prove the algorithm for that pairing; the
//!   claim that `membarrier` + compiler fence is at least as strong rests on
//!   the kernel's documented semantics (and the torture test).
//! - Futex sleeping and timeouts (loom waits are yields), signal handlers,
//!   thread exit releasing a slot inside a leaked section, and `fork()`: the
//!   torture test and tests/rcu_api.rs exercise those on real threads.
//! - Counter wrap-around, more than one reader-slot chunk, and the callback
//!   flood throttle.
//! - Executions beyond each model's preemption bound. The bounds were chosen
//!   by mutation: each model fails when the step it covers is removed from
//!   the algorithm (Rcu: either reader wait; Srcu: either index scan, or a
//!   token ending the section early), and the bound is the smallest at which
//!   it does.

#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use loom::thread;
use rcu_registry::rcu::{Flavor, Rcu, RcuCell, Srcu};
use std::ptr;
use std::sync::Arc;

const LIVE: u64 = 7;
const POISON: u64 = 0xdead;

/// A payload whose reads and poisoning are race-checked by loom.
struct Val(UnsafeCell<u64>);

// SAFETY: accesses are coordinated by RCU; loom checks that they are.
unsafe impl Sync for Val {}

impl Val {
    fn new() -> Self {
        Val(UnsafeCell::new(LIVE))
    }
    fn check(&self) {
        // SAFETY: a shared read; loom flags it if it races with `poison`.
        let v = self.0.with(|p| unsafe { *p });
        assert_eq!(v, LIVE, "a reader saw a reclaimed (poisoned) value");
    }
    fn poison(&self) {
        // SAFETY: exclusive write; loom flags it if a reader's access is not
        // ordered before it by the grace period.
        self.0.with_mut(|p| unsafe { *p = POISON });
    }
}

/// Runs `f` under loom with at most `bound` preemptions (unless
/// `LOOM_MAX_PREEMPTIONS` overrides it).
fn model_bounded(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(bound);
    }
    b.check(f);
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(3, f);
}

/// Two published values protected by `domain`.
type Pair<F> = (Arc<RcuCell<Val, F>>, Arc<RcuCell<Val, F>>);

fn publish_pair<F: Flavor>(domain: &F) -> Pair<F> {
    (
        Arc::new(RcuCell::new_in(Val::new(), domain.clone())),
        Arc::new(RcuCell::new_in(Val::new(), domain.clone())),
    )
}

/// A reader thread that checks both values inside one read section.
fn spawn_pair_reader<F: Flavor>(domain: &F, pair: &Pair<F>) -> thread::JoinHandle<()> {
    let (domain, a, b) = (domain.clone(), pair.0.clone(), pair.1.clone());
    thread::spawn(move || {
        let g = domain.read();
        for cell in [&a, &b] {
            if let Some(v) = cell.load(&g) {
                v.check();
            }
        }
    })
}

/// One published value; a reader thread runs `read` on it while the main
/// thread unlinks it with `swap` (which waits for a grace period) and
/// poisons it.
fn swap_while_reading(read: fn(&Rcu, &RcuCell<Val, Rcu>)) {
    let rcu = Rcu::new();
    let cell = Arc::new(RcuCell::new_in(Val::new(), rcu.clone()));
    let reader = {
        let (rcu, cell) = (rcu.clone(), cell.clone());
        thread::spawn(move || read(&rcu, &cell))
    };
    let old = cell.swap(None).expect("value present");
    old.poison();
    reader.join().unwrap();
}

#[test]
fn rcu_reader_started_before_synchronize_never_sees_reclamation() {
    model(|| {
        swap_while_reading(|rcu, cell| {
            let g = rcu.read();
            if let Some(v) = cell.load(&g) {
                v.check();
            }
        })
    });
}

#[test]
fn rcu_nested_sections_stay_protected_until_the_outermost_ends() {
    model(|| {
        swap_while_reading(|rcu, cell| {
            let outer = rcu.read();
            let v = cell.load(&outer);
            drop(rcu.read());
            if let Some(v) = v {
                v.check();
            }
            drop(outer);
        })
    });
}

#[test]
fn srcu_index_flip_covers_a_reader_stalled_before_its_increment() {
    // The stall is any interleaving between the reader's index load and its
    // counter store; two grace periods make both flips (and the scan of the
    // "inactive" index that catches stragglers) part of the model.
    // Bound 5: the straggler case (index loaded before the first flip,
    // counter bumped after the first scan, section overlapping the second
    // grace period) needs that many preemptions; with bound 3 a grace period
    // that skips its scan of the inactive index passes unnoticed.
    model_bounded(5, || {
        let srcu = Srcu::new();
        let (first, second) = publish_pair(&srcu);
        let reader = spawn_pair_reader(&srcu, &(first.clone(), second.clone()));
        let a = first.swap(None).expect("value present");
        a.poison();
        let b = second.swap(None).expect("value present");
        b.poison();
        reader.join().unwrap();
    });
}

#[test]
fn srcu_token_released_on_another_thread_ends_the_section() {
    // The reader reads through the token (after `into_token`) and hands it
    // back to the main thread, which releases it; the writer runs
    // concurrently. If released tokens were miscounted (or tokens did not
    // keep the section open), the poison would race with the read.
    model(|| {
        let srcu = Srcu::new();
        let cell = Arc::new(RcuCell::new_in(Val::new(), srcu.clone()));
        let reader = {
            let (srcu, cell) = (srcu.clone(), cell.clone());
            thread::spawn(move || {
                let g = srcu.read();
                let v = cell.load(&g).map(|v| v as *const Val);
                let token = g.into_token();
                if let Some(v) = v {
                    // SAFETY: the section is still open through the token.
                    unsafe { (*v).check() };
                }
                token
            })
        };
        let writer = {
            let cell = cell.clone();
            thread::spawn(move || cell.swap(None).expect("value present").poison())
        };
        let token = reader.join().unwrap();
        drop(token);
        writer.join().unwrap();
    });
}

/// A raw pointer to a `Val` moved into a callback.
struct SendPtr(*mut Val);
// SAFETY: the callback is the pointer's only user after the unlink.
unsafe impl Send for SendPtr {}

#[test]
fn call_runs_after_the_grace_period_and_barrier_waits_for_it() {
    // The callback worker is a fourth thread: bound 2 keeps the model fast.
    model_bounded(2, || {
        let rcu = Rcu::new();
        let slot = Arc::new(AtomicPtr::new(Box::into_raw(Box::new(Val::new()))));
        let ran = Arc::new(AtomicUsize::new(0));
        let reader = {
            let (rcu, slot) = (rcu.clone(), slot.clone());
            thread::spawn(move || {
                let _g = rcu.read();
                let p = slot.load(Ordering::Acquire);
                if !p.is_null() {
                    // SAFETY: published and not yet reclaimed (RCU).
                    unsafe { (*p).check() };
                }
            })
        };
        let old = SendPtr(slot.swap(ptr::null_mut(), Ordering::AcqRel));
        let r = ran.clone();
        rcu.call(move || {
            let old = old;
            // SAFETY: unlinked before call(); a grace period has passed.
            let b = unsafe { Box::from_raw(old.0) };
            b.poison();
            r.fetch_add(1, Ordering::Relaxed);
        });
        rcu.barrier();
        assert_eq!(
            ran.load(Ordering::Relaxed),
            1,
            "barrier returned before the callback ran"
        );
        reader.join().unwrap();
    });
}

#[test]
fn polled_cookie_reports_done_only_after_prior_readers_left() {
    model_bounded(2, || {
        let rcu = Rcu::new();
        let slot = Arc::new(AtomicPtr::new(Box::into_raw(Box::new(Val::new()))));
        let reader = {
            let (rcu, slot) = (rcu.clone(), slot.clone());
            thread::spawn(move || {
                let _g = rcu.read();
                let p = slot.load(Ordering::Acquire);
                if !p.is_null() {
                    // SAFETY: published and not yet reclaimed (RCU).
                    unsafe { (*p).check() };
                }
            })
        };
        let old = slot.swap(ptr::null_mut(), Ordering::AcqRel);
        let cookie = rcu.start_poll();
        if !rcu.poll(&cookie) {
            // start_poll() promised a grace period without further calls:
            // once the worker has drained its queue, it has completed.
            rcu.barrier();
            assert!(rcu.poll(&cookie), "the cookie's grace period never ran");
        }
        // SAFETY: unlinked before the cookie; its grace period completed.
        let b = unsafe { Box::from_raw(old) };
        b.poison();
        reader.join().unwrap();
    });
}

#[test]
fn concurrent_synchronize_callers_each_get_a_full_grace_period() {
    // Bound 3: two back-to-back grace periods with a reader whose phase went
    // stale between them; with bound 2 a grace period that skips its first
    // (stale-phase) wait passes unnoticed.
    model_bounded(3, || {
        let rcu = Rcu::new();
        let (a, c) = publish_pair(&rcu);
        let reader = spawn_pair_reader(&rcu, &(a.clone(), c.clone()));
        let other = {
            let c = c.clone();
            thread::spawn(move || c.swap(None).expect("value present").poison())
        };
        a.swap(None).expect("value present").poison();
        other.join().unwrap();
        reader.join().unwrap();
    });
}
