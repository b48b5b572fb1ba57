//! loom models of `rcu_registry::hashlock`: crossed `lock_pair` calls and a
//! concurrent `lock_all` on a two-stripe array never deadlock and never let
//! two holders into one stripe, for the spin lock, `Mutex<()>` and
//! `RwLock<()>` (readers and writers mixed). Each model was checked to fail
//! when `lock_pair` takes its stripes in argument order (loom reports the
//! deadlock), and the spin-lock models to fail when the lock admits two
//! holders or its unlock store is weakened to `Relaxed` (loom reports the
//! racing `UnsafeCell` writes).
//!
//! What these models do NOT cover:
//! - arrays larger than two stripes, or more than three threads (the
//!   ordering argument does not depend on either; the state space does);
//! - three threads on the spin lock: with two spinners loom can schedule
//!   their yields to each other forever and reports an unbounded path even
//!   for a textbook test-and-test-and-set lock, so the spin lock is modelled
//!   with two threads (pair against crossed pair, pair against `lock_all`)
//!   and the three-thread mix runs on `Mutex<()>`;
//! - the hash: keys are chosen so that they land on distinct stripes;
//! - the padded layout (the same code on a different stride) and memory
//!   effects loom does not model (false sharing, real backoff timing);
//! - the real futex-based `std` locks: under loom, `Mutex` and `RwLock` are
//!   loom's models of them;
//! - fairness or starvation: loom explores schedules, it does not measure
//!   whether a spinning thread eventually wins;
//! - the debug lock-order check (models run in release builds);
//! - executions beyond the preemption bound (`LOOM_MAX_PREEMPTIONS`,
//!   default 3 here).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release
//! --target-dir target/loom --test hashlock`

#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::{Arc, Mutex, RwLock};
use loom::thread;
use rcu_registry::hashlock::{Compact, HashedLocks, SpinLock, StripeLock};

/// Preemption bound when `LOOM_MAX_PREEMPTIONS` is unset: keeps each model
/// well under a minute while still letting every thread be interrupted
/// inside its critical sections.
const DEFAULT_PREEMPTIONS: usize = 3;

/// Checks `f` under every schedule within the preemption bound and prints
/// how many executions that took.
fn model(f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(DEFAULT_PREEMPTIONS);
    }
    // A plain std counter, outside the model's view: counts executions only.
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    builder.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    println!(
        "{} executions (preemption bound {:?})",
        executions.load(Ordering::Relaxed),
        builder.preemption_bound
    );
}

/// One cell per stripe, kept outside the array: loom reports any two
/// accesses to a cell that are not ordered by happens-before, i.e. any hole
/// in the stripes' mutual exclusion.
struct Witness([UnsafeCell<u32>; 2]);

// SAFETY: each cell is touched only under its stripe's lock; that claim is
// exactly what loom checks on every access.
unsafe impl Sync for Witness {}

impl Witness {
    fn new() -> Self {
        Witness([UnsafeCell::new(0), UnsafeCell::new(0)])
    }

    fn write(&self, stripe: usize) {
        // SAFETY: the caller holds `stripe` exclusively (loom verifies).
        self.0[stripe].with_mut(|p| unsafe { *p += 1 });
    }

    fn read(&self, stripe: usize) -> u32 {
        // SAFETY: the caller holds `stripe` (loom verifies).
        self.0[stripe].with(|p| unsafe { *p })
    }
}

type Array<L> = HashedLocks<u32, L, u32, Compact>;

/// A two-stripe array and one key on each stripe.
fn setup<L: StripeLock>() -> (Arc<Array<L>>, u32, u32) {
    let locks: Array<L> = HashedLocks::new(2).unwrap();
    let on = |stripe| (0u32..).find(|k| locks.stripe_of(k) == stripe).unwrap();
    let (a, b) = (on(0), on(1));
    (Arc::new(locks), a, b)
}

/// One stripe operation of a model thread.
#[derive(Clone, Copy)]
enum Op {
    Pair(u32, u32),
    All,
}

/// Runs `ops` concurrently (the last on the main thread) on a two-stripe
/// array; each bumps the data and the witness of every stripe it holds.
/// Checks afterwards that no update was lost.
fn concurrently<L: StripeLock + 'static>(ops: impl Fn(u32, u32) -> Vec<Op>) {
    let (locks, a, b) = setup::<L>();
    let witness = Arc::new(Witness::new());
    let ops = ops(a, b);
    let run = |locks: &Array<L>, witness: &Witness, op: Op| match op {
        Op::Pair(x, y) => {
            let mut pair = locks.lock_pair(&x, &y);
            let (s1, s2) = pair.stripes();
            assert_ne!(s1, s2, "the keys were chosen on distinct stripes");
            witness.write(s1);
            witness.write(s2);
            *pair.first_mut() += 1;
            *pair.second_mut() += 1;
        }
        Op::All => {
            let mut all = locks.lock_all();
            for stripe in 0..2 {
                witness.write(stripe);
                *all.get_mut(stripe).unwrap() += 1;
            }
        }
    };
    let (last, spawned) = ops.split_last().unwrap();
    let threads: Vec<_> = spawned
        .iter()
        .map(|&op| {
            let (locks, witness) = (locks.clone(), witness.clone());
            thread::spawn(move || run(&locks, &witness, op))
        })
        .collect();
    run(&locks, &witness, *last);
    for t in threads {
        t.join().unwrap();
    }
    let all = locks.lock_all();
    let expected = ops.len() as u32;
    for stripe in 0..2 {
        assert_eq!(
            *all.get(stripe).unwrap(),
            expected,
            "an update under stripe {stripe} was lost"
        );
        assert_eq!(witness.read(stripe), expected);
    }
}

// The spin-lock models use two threads; see the file comment for why.

#[test]
fn spin_lock_crossed_pairs_never_deadlock_or_overlap() {
    model(|| concurrently::<SpinLock>(|a, b| vec![Op::Pair(a, b), Op::Pair(b, a)]));
}

#[test]
fn spin_lock_pair_against_lock_all_never_deadlocks_or_overlaps() {
    model(|| concurrently::<SpinLock>(|a, b| vec![Op::Pair(b, a), Op::All]));
}

#[test]
fn mutex_crossed_pairs_and_lock_all_never_deadlock_or_overlap() {
    model(|| concurrently::<Mutex<()>>(|a, b| vec![Op::Pair(a, b), Op::Pair(b, a), Op::All]));
}

#[test]
fn rwlock_readers_and_writers_on_crossed_pairs_never_deadlock_or_overlap() {
    model(|| {
        let (locks, a, b) = setup::<RwLock<()>>();
        let witness = Arc::new(Witness::new());
        let reader = {
            let (locks, witness) = (locks.clone(), witness.clone());
            thread::spawn(move || {
                let pair = locks.read_pair(&a, &b);
                let (s1, s2) = pair.stripes();
                // Readers read the witness: loom allows concurrent reads but
                // flags a read concurrent with a write.
                (
                    witness.read(s1),
                    witness.read(s2),
                    *pair.first(),
                    *pair.second(),
                )
            })
        };
        let writer = {
            let (locks, witness) = (locks.clone(), witness.clone());
            thread::spawn(move || {
                let mut pair = locks.lock_pair(&b, &a);
                let (s1, s2) = pair.stripes();
                witness.write(s1);
                witness.write(s2);
                *pair.first_mut() += 1;
                *pair.second_mut() += 1;
            })
        };
        let seen_by_read_all: Vec<u32> = locks.read_all().iter().copied().collect();
        let (w0, w1, d0, d1) = reader.join().unwrap();
        writer.join().unwrap();
        // A reader sees the writer's pair entirely or not at all.
        assert_eq!(w0, w1);
        assert_eq!(d0, d1);
        assert_eq!(seen_by_read_all[0], seen_by_read_all[1]);
        assert_eq!(*locks.read(&a), 1);
    });
}
