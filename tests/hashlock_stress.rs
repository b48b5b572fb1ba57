//! Stress test for `rcu_registry::hashlock`: more threads than cores mix
//! `lock`, `try_lock`, `lock_pair` (with crossed keys), `lock_all` and, for
//! `RwLock`, the read variants on a small, heavily colliding key space.
//!
//! Checked: mutual exclusion (an exclusive holder never meets another holder
//! of its stripe, a reader never meets a writer), no lost update (the stripe
//! counters add up to the increments made), and progress (a watchdog fails
//! the test if the threads stop finishing, i.e. a deadlock).
//!
//! Runs `HASHLOCK_STRESS_SECS` seconds (default 1) per lock kind and layout.

// The std locks are stripes only in normal builds; under `--cfg loom` the
// crate's stripes are loom's locks and the loom-tests crate does the testing.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rcu_registry::hashlock::{
    Compact, HashedLocks, Padded, SharedStripeLock, SpinLock, StripeLayout, StripeLock,
};

/// Threads per run: twice the cores of the CI machine, so holders get
/// preempted while others wait.
const THREADS: usize = 4;
/// Stripes per array: few, so pairs collide and `lock_all` contends.
const STRIPES: usize = 8;
/// Distinct keys: eight per stripe on average.
const KEYS: u64 = 64;
/// Extra time beyond the run after which silence means deadlock.
const WATCHDOG_GRACE: Duration = Duration::from_secs(30);

fn run_time() -> Duration {
    let secs = std::env::var("HASHLOCK_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    Duration::from_secs_f64(secs)
}

/// Per-stripe occupancy, tracked outside the locks under test.
struct Witness {
    writers: Vec<AtomicUsize>,
    readers: Vec<AtomicUsize>,
    violations: AtomicUsize,
    /// Increments made by exclusive sections, summed over all threads.
    increments: AtomicU64,
}

impl Witness {
    fn new() -> Self {
        Witness {
            writers: (0..STRIPES).map(|_| AtomicUsize::new(0)).collect(),
            readers: (0..STRIPES).map(|_| AtomicUsize::new(0)).collect(),
            violations: AtomicUsize::new(0),
            increments: AtomicU64::new(0),
        }
    }

    /// An exclusive section on `stripe`: must be alone; bumps the counter
    /// with a non-atomic read-modify-write that a second holder would break.
    fn exclusive(&self, stripe: usize, counter: &mut u64) {
        // SeqCst throughout: the witness must not itself be the reason a
        // violation goes unseen.
        let others = self.writers[stripe].fetch_add(1, Ordering::SeqCst);
        if others != 0 || self.readers[stripe].load(Ordering::SeqCst) != 0 {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
        let before = *counter;
        std::hint::black_box(before);
        std::hint::spin_loop();
        *counter = before + 1;
        self.writers[stripe].fetch_sub(1, Ordering::SeqCst);
        // Relaxed: a plain tally, read only after every thread is joined
        // (the join orders it).
        self.increments.fetch_add(1, Ordering::Relaxed);
    }

    /// A shared section on `stripe`: must meet no writer.
    fn shared(&self, stripe: usize, counter: &u64) {
        self.readers[stripe].fetch_add(1, Ordering::SeqCst);
        if self.writers[stripe].load(Ordering::SeqCst) != 0 {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
        std::hint::black_box(*counter);
        self.readers[stripe].fetch_sub(1, Ordering::SeqCst);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: plenty for picking operations and keys.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

type Array<L, P> = HashedLocks<u64, L, u64, P>;

/// A random choice: `dice` in 0..100 picks the operation, `a` and `b` are
/// its keys.
#[derive(Clone, Copy)]
struct Pick {
    dice: u64,
    a: u64,
    b: u64,
}

/// An operation on the array; returns its index in `OP_NAMES`.
type Op<L, P> = fn(&Array<L, P>, &Witness, Pick) -> usize;

/// One exclusive operation; returns its index in `OP_NAMES`.
fn exclusive_op<L: StripeLock, P: StripeLayout>(
    locks: &Array<L, P>,
    w: &Witness,
    pick: Pick,
) -> usize {
    let Pick { dice, a, b } = pick;
    match dice {
        0..=39 => {
            let mut g = locks.lock(&a);
            w.exclusive(g.stripe(), &mut g);
            0
        }
        40..=49 => {
            if let Some(mut g) = locks.try_lock(&a) {
                w.exclusive(g.stripe(), &mut g);
            }
            1
        }
        50..=97 => {
            // Crossed keys: other threads pass the same keys in either order.
            let (x, y) = if dice % 2 == 0 { (a, b) } else { (b, a) };
            let mut pair = locks.lock_pair(&x, &y);
            let (s1, s2) = pair.stripes();
            w.exclusive(s1, pair.first_mut());
            if s1 != s2 {
                w.exclusive(s2, pair.second_mut());
            }
            2
        }
        _ => {
            let mut all = locks.lock_all();
            for s in 0..STRIPES {
                w.exclusive(s, all.get_mut(s).unwrap());
            }
            3
        }
    }
}

/// One shared operation (for `SharedStripeLock`s); returns its index in
/// `OP_NAMES`.
fn shared_op<L: SharedStripeLock, P: StripeLayout>(
    locks: &Array<L, P>,
    w: &Witness,
    pick: Pick,
) -> usize {
    let Pick { dice, a, b } = pick;
    match dice {
        0..=59 => {
            let g = locks.read(&a);
            w.shared(g.stripe(), &g);
        }
        60..=97 => {
            let pair = locks.read_pair(&a, &b);
            let (s1, s2) = pair.stripes();
            w.shared(s1, pair.first());
            w.shared(s2, pair.second());
        }
        _ => {
            let all = locks.read_all();
            for (s, c) in all.iter().enumerate() {
                w.shared(s, c);
            }
        }
    }
    4
}

const OP_NAMES: [&str; 5] = ["lock", "try_lock", "lock_pair", "lock_all", "read*"];

/// Runs the mix on `locks`; `shared` (if any) handles half the operations.
fn stress<L: StripeLock + 'static, P: StripeLayout>(name: &str, shared: Option<Op<L, P>>) {
    let locks: Arc<Array<L, P>> = Arc::new(HashedLocks::new(STRIPES).unwrap());
    let witness = Arc::new(Witness::new());
    let stop = Arc::new(AtomicBool::new(false));
    let run = run_time();
    let (done_tx, done_rx) = mpsc::channel();
    for t in 0..THREADS {
        let (locks, witness, stop, done_tx) = (
            locks.clone(),
            witness.clone(),
            stop.clone(),
            done_tx.clone(),
        );
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
            let mut counts = [0u64; 5];
            // Relaxed: the flag only ends the loop; nothing is published
            // with it (results travel through the channel). One operation
            // at least before looking at it (the final check wants one).
            while counts == [0; 5] || !stop.load(Ordering::Relaxed) {
                let pick = Pick {
                    a: rng.next() % KEYS,
                    b: rng.next() % KEYS,
                    dice: rng.next() % 100,
                };
                let op = match shared {
                    Some(read) if rng.next() % 2 == 0 => read(&locks, &witness, pick),
                    _ => exclusive_op(&locks, &witness, pick),
                };
                counts[op] += 1;
            }
            done_tx.send(counts).unwrap();
        });
    }
    drop(done_tx);
    let started = Instant::now();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed); // see the load in the workers
    let mut totals = [0u64; 5];
    for _ in 0..THREADS {
        match done_rx.recv_timeout(WATCHDOG_GRACE) {
            Ok(counts) => totals.iter_mut().zip(counts).for_each(|(t, c)| *t += c),
            Err(_) => panic!("{name}: a thread stopped making progress: deadlock"),
        }
    }
    let elapsed = started.elapsed();
    let sum: u64 = locks.lock_all().iter().sum();
    // After every worker reported through the channel (which synchronizes),
    // Relaxed reads see their final tallies.
    let increments = witness.increments.load(Ordering::Relaxed);
    let violations = witness.violations.load(Ordering::SeqCst);
    let ops: Vec<String> = OP_NAMES
        .iter()
        .zip(totals)
        .filter(|(_, n)| *n > 0)
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    println!(
        "{name}: {THREADS} threads, {:.2} s: {}; {increments} increments, {violations} exclusion violations",
        elapsed.as_secs_f64(),
        ops.join(", ")
    );
    assert_eq!(violations, 0, "{name}: mutual exclusion violated");
    assert_eq!(sum, increments, "{name}: lost updates");
    assert!(
        totals.iter().sum::<u64>() > 0,
        "{name}: no operation completed"
    );
}

#[test]
fn spin_lock_stripes_keep_exclusion_and_progress_under_crossed_pairs_and_lock_all() {
    stress::<SpinLock, Padded>("SpinLock, padded", None);
    stress::<SpinLock, Compact>("SpinLock, compact", None);
}

#[test]
fn mutex_stripes_keep_exclusion_and_progress_under_crossed_pairs_and_lock_all() {
    stress::<Mutex<()>, Padded>("Mutex<()>, padded", None);
}

#[test]
fn rwlock_stripes_keep_exclusion_and_progress_with_readers_and_writers_mixed() {
    stress::<RwLock<()>, Padded>("RwLock<()>, padded", Some(shared_op::<RwLock<()>, Padded>));
}
