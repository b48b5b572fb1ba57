//! Benchmarks for `rcu_registry::hashlock`, each against its peer in the
//! same run:
//!
//! - `false_sharing`: two threads (pinned to CPUs 0 and 1) each lock/unlock
//!   their *own* stripe, the two stripes neighbours in memory: padded against
//!   compact layout.
//! - `uncontended`: one thread's lock/unlock through a hashed array against a
//!   single global `Mutex<()>`: with one key (the cost of hashing and
//!   indexing) and with a key that changes every iteration; and the stripe
//!   hash against SipHash.
//! - `contended`: two threads on random keys: a 64-stripe array against one
//!   global `Mutex<()>` (what striping is for).
//!
//! Criterion reports each case's time. The ratios printed at the end come
//! from a second, *paired* measurement: the two cases of a pair run in
//! alternation, round after round, and the report gives the median and the
//! quartiles of the per-round ratios. On a shared machine whose load changes
//! from second to second, that compares the cases under the same conditions,
//! which two criterion runs seconds apart do not.
//!
//! Run: `cargo bench --bench hashlock -- --warm-up-time 1 --measurement-time 2`

use std::hash::{Hash, Hasher};
use std::hint::black_box;
use std::sync::{Barrier, Mutex, RwLock};
use std::time::{Duration, Instant};

use criterion::Criterion;
use crossbeam_utils::CachePadded;
use rcu_registry::hashlock::{Compact, HashedLocks, Padded, SpinLock, StripeLayout, StripeLock};

/// Stripes in every array: the kernel's kprobe table size, small enough that
/// the whole array sits in L1 even padded (8 KiB).
const STRIPES: usize = 64;

/// Rounds of a paired measurement: odd, so the median is one round.
const PAIRED_ROUNDS: usize = 41;

/// Target length of one timed run in a paired round: long enough to dwarf
/// thread start-up (tens of microseconds), short enough that a round rarely
/// straddles a change in machine load.
const PAIRED_RUN: Duration = Duration::from_millis(4);

/// The peer of the uncontended cases: one process-wide lock, as a `static`
/// on its own cache line (unpadded, it shared a line with other data and ran
/// twice as slow as the same lock alone).
static GLOBAL: CachePadded<Mutex<()>> = CachePadded::new(Mutex::new(()));

/// A benchmark case: runs `iters` iterations and returns the time they took.
struct Case {
    id: String,
    run: Box<dyn Fn(u64) -> Duration + Sync>,
}

fn case(id: &str, run: impl Fn(u64) -> Duration + Sync + 'static) -> Case {
    Case {
        id: id.to_string(),
        run: Box::new(run),
    }
}

/// Pins the calling thread to CPU `cpu` so that the two benchmark threads
/// never share a core (which would hide false sharing). Best effort: on
/// failure the scheduler places the thread.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: `set` is a plain bitmask owned by this frame; CPU_ZERO/CPU_SET
    // write only inside it, and sched_setaffinity(0, ..) reads it for the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Runs `work(thread, iters)` on two threads pinned to CPUs 0 and 1 and
/// started together; returns the slower thread's time.
fn two_threads(iters: u64, work: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let (start, work) = (&start, &work);
                s.spawn(move || {
                    pin_to_cpu(t);
                    start.wait();
                    let t0 = Instant::now();
                    work(t, iters);
                    t0.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

/// Times `iters` calls of `step(k)` on this thread, `k` changing each call.
fn one_thread(iters: u64, mut step: impl FnMut(u64)) -> Duration {
    let t0 = Instant::now();
    for k in 0..iters {
        step(black_box(k));
    }
    t0.elapsed()
}

fn leak<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}

/// Two threads each lock/unlock their own stripe; the stripes are 0 and 1,
/// neighbours in memory.
fn false_sharing_case<L: StripeLock + 'static, P: StripeLayout>(lock: &str) -> Case {
    let locks: &HashedLocks<u64, L, (), P> = leak(HashedLocks::new(STRIPES).unwrap());
    let on = |stripe| (0u64..).find(|k| locks.stripe_of(k) == stripe).unwrap();
    let keys = [on(0), on(1)];
    case(&format!("false_sharing/{lock}/{}", P::NAME), move |iters| {
        two_threads(iters, |t, iters| {
            for _ in 0..iters {
                drop(black_box(locks.lock(black_box(&keys[t]))));
            }
        })
    })
}

fn uncontended_cases() -> Vec<Case> {
    let mutexes: &HashedLocks<u64, Mutex<()>> = leak(HashedLocks::new(STRIPES).unwrap());
    let compact: &HashedLocks<u64, Mutex<()>, (), Compact> =
        leak(HashedLocks::new(STRIPES).unwrap());
    let spins: &HashedLocks<u64, SpinLock> = leak(HashedLocks::new(STRIPES).unwrap());
    let rw: &HashedLocks<u64, RwLock<()>> = leak(HashedLocks::new(STRIPES).unwrap());
    vec![
        case("uncontended/global Mutex", |n| {
            one_thread(n, |_| {
                drop(black_box(GLOBAL.lock().unwrap_or_else(|e| e.into_inner())))
            })
        }),
        // One key, hence one lock, like the global case: isolates the cost
        // of hashing and indexing from the access pattern.
        case("uncontended/Mutex padded, one key", move |n| {
            one_thread(n, |_| drop(black_box(mutexes.lock(black_box(&42)))))
        }),
        case("uncontended/Mutex padded", move |n| {
            one_thread(n, |k| drop(black_box(mutexes.lock(&k))))
        }),
        case("uncontended/Mutex compact", move |n| {
            one_thread(n, |k| drop(black_box(compact.lock(&k))))
        }),
        case("uncontended/SpinLock padded", move |n| {
            one_thread(n, |k| drop(black_box(spins.lock(&k))))
        }),
        case("uncontended/RwLock write", move |n| {
            one_thread(n, |k| drop(black_box(rw.lock(&k))))
        }),
        case("uncontended/RwLock read", move |n| {
            one_thread(n, |k| drop(black_box(rw.read(&k))))
        }),
        case("uncontended/stripe_of only", move |n| {
            one_thread(n, |k| {
                black_box(spins.stripe_of(&k));
            })
        }),
        // The same top-bits index from std's SipHash-1-3 (`DefaultHasher`,
        // fixed keys): the hasher the module docs explain not using.
        case("uncontended/SipHash stripe only", |n| {
            one_thread(n, |k| {
                let mut h = std::hash::DefaultHasher::new();
                k.hash(&mut h);
                black_box((h.finish() >> (64 - STRIPES.trailing_zeros())) as usize);
            })
        }),
    ]
}

/// Two threads, each on its own pseudo-random key sequence, incrementing a
/// counter under the key's lock.
fn contended_case(name: &str, striped: bool) -> Case {
    let global: &Mutex<u64> = leak(Mutex::new(0));
    let stripes: &HashedLocks<u64, Mutex<()>, u64> = leak(HashedLocks::new(STRIPES).unwrap());
    case(&format!("contended/{name}"), move |iters| {
        two_threads(iters, |t, iters| {
            let mut key = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t as u64 + 1);
            for _ in 0..iters {
                key = key.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                if striped {
                    *stripes.lock(&key) += 1;
                } else {
                    *global.lock().unwrap() += 1;
                }
            }
        })
    })
}

/// Iterations that take about `PAIRED_RUN` for `case`.
fn calibrate(case: &Case) -> u64 {
    let probe = 10_000;
    let took = (case.run)(probe).max(Duration::from_nanos(1));
    (probe as f64 * PAIRED_RUN.as_secs_f64() / took.as_secs_f64()).max(1_000.0) as u64
}

/// Runs `slower` and `faster` in alternation and prints the median and
/// quartiles of the per-round ratios of their time per iteration.
fn paired(label: &str, cases: &[Case], slower: &str, faster: &str, rounds: usize) {
    let find = |id: &str| cases.iter().find(|c| c.id == id).expect(id);
    let (a, b) = (find(slower), find(faster));
    let (na, nb) = (calibrate(a), calibrate(b));
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|round| {
            // Alternate which case goes first, so neither always runs on the
            // heels of the other.
            let (ta, tb) = if round % 2 == 0 {
                let ta = (a.run)(na);
                (ta, (b.run)(nb))
            } else {
                let tb = (b.run)(nb);
                ((a.run)(na), tb)
            };
            (ta.as_secs_f64() / na as f64) / (tb.as_secs_f64() / nb as f64)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let q = |f: f64| ratios[((ratios.len() - 1) as f64 * f).round() as usize];
    println!(
        "{label:<56} median {:>5.2}x  (quartiles {:.2}x .. {:.2}x, {rounds} rounds)",
        q(0.5),
        q(0.25),
        q(0.75)
    );
}

fn main() {
    let mut cases = uncontended_cases();
    cases.push(false_sharing_case::<SpinLock, Padded>("SpinLock"));
    cases.push(false_sharing_case::<SpinLock, Compact>("SpinLock"));
    cases.push(false_sharing_case::<Mutex<()>, Padded>("Mutex"));
    cases.push(false_sharing_case::<Mutex<()>, Compact>("Mutex"));
    cases.push(contended_case("global Mutex", false));
    cases.push(contended_case("64 Mutex stripes", true));

    let mut c = Criterion::default().configure_from_args();
    for case in &cases {
        c.bench_function(&case.id, |b| b.iter_custom(|iters| (case.run)(iters)));
    }
    c.final_summary();

    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then one round per pair is enough to prove the code runs.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        PAIRED_ROUNDS
    } else {
        1
    };
    println!("\nhashlock paired ratios (time per iteration, first / second):");
    if rounds == 1 {
        println!("(smoke run under `cargo test`: one round, not a measurement)");
    }
    for lock in ["SpinLock", "Mutex"] {
        paired(
            &format!("false sharing, {lock}: compact / padded"),
            &cases,
            &format!("false_sharing/{lock}/compact"),
            &format!("false_sharing/{lock}/padded"),
            rounds,
        );
    }
    for hashed in [
        "Mutex padded, one key",
        "Mutex padded",
        "Mutex compact",
        "SpinLock padded",
        "RwLock write",
        "RwLock read",
    ] {
        paired(
            &format!("uncontended: {hashed} / global Mutex"),
            &cases,
            &format!("uncontended/{hashed}"),
            "uncontended/global Mutex",
            rounds,
        );
    }
    paired(
        "hash: SipHash stripe / stripe_of",
        &cases,
        "uncontended/SipHash stripe only",
        "uncontended/stripe_of only",
        rounds,
    );
    paired(
        "contended, 2 threads: global Mutex / 64 Mutex stripes",
        &cases,
        "contended/global Mutex",
        "contended/64 Mutex stripes",
        rounds,
    );
}
