//! Benchmarks for `rcu_registry::hashlock`, each against its peer in the
//! same run:
//!
//! - `false_sharing`: two threads each lock/unlock their *own* stripe, the
//!   two stripes neighbours in memory: padded against compact layout.
//! - `uncontended`: one thread's lock/unlock through a hashed array against a
//!   single global `Mutex<()>` (the cost of hashing and indexing).
//! - `contended`: two threads on random keys: a 64-stripe array against one
//!   global `Mutex<()>` (what striping is for).
//!
//! The ratios are printed at the end. Run:
//! `cargo bench --bench hashlock -- --warm-up-time 1 --measurement-time 2`

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::hint::black_box;
use std::sync::{Barrier, Mutex, RwLock};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use rcu_registry::hashlock::{Compact, HashedLocks, Layout, Padded, SpinLock, StripeLock};

/// Stripes in every array: the kernel's kprobe table size, small enough that
/// the whole array sits in L1 even padded (8 KiB).
const STRIPES: usize = 64;

/// Nanoseconds per iteration of every sample, per benchmark, for the ratio
/// report. The report uses medians: on a shared 2-core machine a sample in
/// which another process took a core is an outlier, not the typical case.
static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

fn record(id: &str, elapsed: Duration, iters: u64) {
    let per_iter = elapsed.as_nanos() as f64 / iters.max(1) as f64;
    let mut samples = SAMPLES.lock().unwrap();
    samples.entry(id.to_string()).or_default().push(per_iter);
}

fn median_ns(id: &str) -> Option<f64> {
    let mut samples = SAMPLES.lock().unwrap().get(id)?.clone();
    samples.sort_by(f64::total_cmp);
    Some(samples[samples.len() / 2])
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

/// Two keys on stripes 0 and 1: neighbours in memory.
fn neighbour_keys<L: StripeLock, P: Layout>(locks: &HashedLocks<u64, L, (), P>) -> [u64; 2] {
    let on = |stripe| (0u64..).find(|k| locks.stripe_of(k) == stripe).unwrap();
    [on(0), on(1)]
}

fn false_sharing_case<L: StripeLock, P: Layout>(c: &mut Criterion, lock: &str) {
    let locks: HashedLocks<u64, L, (), P> = HashedLocks::new(STRIPES).unwrap();
    let keys = neighbour_keys(&locks);
    let id = format!("false_sharing/{lock}/{}", P::NAME);
    c.bench_function(&id, |b| {
        b.iter_custom(|iters| {
            let elapsed = two_threads(iters, |t, iters| {
                let key = &keys[t];
                for _ in 0..iters {
                    drop(black_box(locks.lock(black_box(key))));
                }
            });
            record(&id, elapsed, iters);
            elapsed
        })
    });
}

fn false_sharing(c: &mut Criterion) {
    false_sharing_case::<SpinLock, Padded>(c, "SpinLock");
    false_sharing_case::<SpinLock, Compact>(c, "SpinLock");
    false_sharing_case::<Mutex<()>, Padded>(c, "Mutex");
    false_sharing_case::<Mutex<()>, Compact>(c, "Mutex");
}

/// One thread locks and unlocks with a key that changes every iteration.
fn uncontended_case(c: &mut Criterion, id: &str, mut lock_unlock: impl FnMut(u64)) {
    c.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for k in 0..iters {
                lock_unlock(black_box(k));
            }
            let elapsed = t0.elapsed();
            record(id, elapsed, iters);
            elapsed
        })
    });
}

fn uncontended(c: &mut Criterion) {
    let global = Mutex::new(());
    uncontended_case(c, "uncontended/global Mutex", |_| {
        drop(black_box(global.lock().unwrap()))
    });
    let mutexes: HashedLocks<u64, Mutex<()>> = HashedLocks::new(STRIPES).unwrap();
    uncontended_case(c, "uncontended/Mutex padded", |k| {
        drop(black_box(mutexes.lock(&k)))
    });
    let compact: HashedLocks<u64, Mutex<()>, (), Compact> = HashedLocks::new(STRIPES).unwrap();
    uncontended_case(c, "uncontended/Mutex compact", |k| {
        drop(black_box(compact.lock(&k)))
    });
    let spins: HashedLocks<u64, SpinLock> = HashedLocks::new(STRIPES).unwrap();
    uncontended_case(c, "uncontended/SpinLock padded", |k| {
        drop(black_box(spins.lock(&k)))
    });
    let rw: HashedLocks<u64, RwLock<()>> = HashedLocks::new(STRIPES).unwrap();
    uncontended_case(c, "uncontended/RwLock write", |k| {
        drop(black_box(rw.lock(&k)))
    });
    uncontended_case(c, "uncontended/RwLock read", |k| {
        drop(black_box(rw.read(&k)))
    });
    uncontended_case(c, "uncontended/stripe_of only", |k| {
        black_box(spins.stripe_of(&k));
    });
    // The same top-bits index from std's SipHash-1-3 (`DefaultHasher`, fixed
    // keys): the hasher the module docs explain not using.
    uncontended_case(c, "uncontended/SipHash stripe only", |k| {
        let mut h = std::hash::DefaultHasher::new();
        k.hash(&mut h);
        black_box((h.finish() >> (64 - STRIPES.trailing_zeros())) as usize);
    });
}

/// Two threads, each on its own pseudo-random key sequence.
fn contended(c: &mut Criterion) {
    let global = Mutex::new(0u64);
    let striped: HashedLocks<u64, Mutex<()>, u64> = HashedLocks::new(STRIPES).unwrap();
    let mut group = c.benchmark_group("contended");
    for name in ["global Mutex", "64 Mutex stripes"] {
        let id = format!("contended/{name}");
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let elapsed = two_threads(iters, |t, iters| {
                    let mut key = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t as u64 + 1);
                    for _ in 0..iters {
                        key = key.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        if name == "global Mutex" {
                            *global.lock().unwrap() += 1;
                        } else {
                            *striped.lock(&key) += 1;
                        }
                    }
                });
                record(&id, elapsed, iters);
                elapsed
            })
        });
    }
    group.finish();
}

fn ratio(label: &str, slower: &str, faster: &str) {
    match (median_ns(slower), median_ns(faster)) {
        (Some(s), Some(f)) => {
            println!("{label:<58} {s:>8.2} ns / {f:>8.2} ns = {:>5.2}x", s / f)
        }
        _ => println!("{label:<58} (not run)"),
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    false_sharing(&mut c);
    uncontended(&mut c);
    contended(&mut c);
    c.final_summary();

    println!("\nhashlock ratios (median ns per iteration over all samples):");
    for lock in ["SpinLock", "Mutex"] {
        ratio(
            &format!("false sharing, {lock}: compact / padded"),
            &format!("false_sharing/{lock}/compact"),
            &format!("false_sharing/{lock}/padded"),
        );
    }
    for case in [
        "Mutex padded",
        "Mutex compact",
        "SpinLock padded",
        "RwLock write",
        "RwLock read",
    ] {
        ratio(
            &format!("uncontended: hashed {case} / global Mutex"),
            &format!("uncontended/{case}"),
            "uncontended/global Mutex",
        );
    }
    ratio(
        "uncontended: stripe_of / global Mutex lock+unlock",
        "uncontended/stripe_of only",
        "uncontended/global Mutex",
    );
    ratio(
        "hash: SipHash stripe / stripe_of",
        "uncontended/SipHash stripe only",
        "uncontended/stripe_of only",
    );
    ratio(
        "contended (2 threads): global Mutex / 64 Mutex stripes",
        "contended/global Mutex",
        "contended/64 Mutex stripes",
    );
}
