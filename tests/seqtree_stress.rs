//! Stress test: one writer, several readers, for a fixed time.
//!
//! Duration: `SEQTREE_STRESS_SECS` (default 2 s; at least 10 s when
//! `CI=true`). Meant for release builds:
//!
//! ```text
//! SEQTREE_STRESS_SECS=10 cargo test --release --test seqtree_stress -- --ignored --nocapture
//! ```
//!
//! The writer inserts and removes keys continuously (and replaces stable
//! keys now and then); readers look up random keys. Any stable key missing,
//! never-inserted key found or value belonging to another key fails the test.
//! The test prints lookups, writer operations, and for `SeqTree` the retries
//! and lock fallbacks readers needed.

mod seqtree_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rcu_registry::seqtree::{LatchTree, SeqTree};
use seqtree_common::{duration_from_env, key_of, value_of, Rng, TestMap};

const KEYS: u64 = 1 << 14;
const READERS: u64 = 3;

fn is_stable(k: u64) -> bool {
    k % 2 == 0
}

/// Runs the writer/readers protocol against any tree through closures.
/// `lookup(key)` returns the value found; returns (lookups, writer ops).
fn run<L, W>(name: &str, lookup: L, mut write: W) -> (u64, u64)
where
    L: Fn(u64) -> Option<u64> + Send + Sync + 'static,
    W: FnMut(&mut Rng, u64),
{
    let duration = duration_from_env("SEQTREE_STRESS_SECS", 2.0, 10.0);
    let lookup = Arc::new(lookup);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (lookup, stop, errors) = (lookup.clone(), stop.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(1000 + r);
                let mut n = 0u64;
                // One batch before looking at `stop`: the final check wants
                // lookups on any schedule.
                while n == 0 || !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        let k = rng.below(KEYS + KEYS / 8);
                        let bad = match lookup(k) {
                            None => k < KEYS && is_stable(k),
                            Some(v) => k >= KEYS || key_of(v) != k,
                        };
                        if bad {
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    n += 256;
                }
                n
            })
        })
        .collect();
    let start = Instant::now();
    let mut rng = Rng::new(42);
    let mut ops = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            ops += 1;
            write(&mut rng, ops);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lookups: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    let errors = errors.load(Ordering::SeqCst);
    println!(
        "{name}: {:.1} s, {lookups} lookups by {READERS} readers, {ops} writer ops, {errors} errors",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(errors, 0, "{name}: readers saw wrong or missing answers");
    assert!(lookups > 0 && ops > 0);
    (lookups, ops)
}

/// The writer's step: toggle a volatile key; every 4096th step replace a
/// stable key (which must stay visible throughout).
fn writer_step(rng: &mut Rng, op: u64) -> (u64, bool) {
    if op % 4096 == 0 {
        (rng.below(KEYS / 2) * 2, true)
    } else {
        (rng.below(KEYS / 2) * 2 + 1, false)
    }
}

/// Fills `t` with the stable keys, runs the protocol, prints the tree's
/// read statistics and checks its invariants.
fn stress<M: TestMap>(name: &str, t: M) {
    let t = Arc::new(t);
    for k in (0..KEYS).filter(|&k| is_stable(k)) {
        t.put(k, value_of(k, 0));
    }
    let r = t.clone();
    run(
        name,
        move |k| r.lookup(k),
        |rng, op| {
            let (k, replace) = writer_step(rng, op);
            if replace || !t.delete(k) {
                t.put(k, value_of(k, op));
            }
        },
    );
    println!("{name}: {}", t.report());
    t.check().unwrap();
}

#[test]
#[ignore = "stress test: run in release with --ignored (scripts/test-all does)"]
fn seqtree_one_writer_many_readers_no_wrong_or_missing_answers() {
    stress("SeqTree", SeqTree::<u64, u64>::new());
}

#[test]
#[ignore = "stress test: run in release with --ignored (scripts/test-all does)"]
fn latch_tree_one_writer_many_readers_no_wrong_or_missing_answers() {
    stress("LatchTree", LatchTree::<u64, u64>::new());
}
