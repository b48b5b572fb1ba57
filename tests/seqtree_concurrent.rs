//! Concurrent differential tests: while one writer inserts, removes and
//! replaces entries, readers check that
//!
//! - a key present for the whole duration of their read is always found,
//!   with its own value (never another key's, never a torn one);
//! - a key never inserted is never found;
//! - a range scan returns keys strictly increasing, inside the range, and
//!   includes every key present throughout the scan;
//! - an owned handle to a key present throughout is always granted.
//!
//! Both `SeqTree` (on the global `Rcu` and on an `Srcu` instance) and
//! `LatchTree` are checked. Operation counts are fixed, so the tests run in
//! about a second in debug builds.

mod seqtree_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::rcu::{Flavor, Rcu};
use rcu_registry::seqtree::{LatchTree, SeqTree};
use seqtree_common::{key_of, value_of, Rng};

const KEYS: u64 = 2048;
/// Stable keys (multiples of 4) are present from start to end.
fn is_stable(k: u64) -> bool {
    k % 4 == 0
}
const WRITER_OPS: u64 = 20_000;
const READERS: u64 = 2;

/// What a reader saw that it must never see.
#[derive(Default)]
struct Failures {
    missing_stable: AtomicU64,
    found_absent: AtomicU64,
    wrong_value: AtomicU64,
    bad_scan: AtomicU64,
    missing_handle: AtomicU64,
}

impl Failures {
    fn assert_none(&self, what: &str, reads: u64) {
        let f = [
            (
                "stable key missing",
                self.missing_stable.load(Ordering::SeqCst),
            ),
            (
                "never-inserted key found",
                self.found_absent.load(Ordering::SeqCst),
            ),
            ("wrong value", self.wrong_value.load(Ordering::SeqCst)),
            ("bad range scan", self.bad_scan.load(Ordering::SeqCst)),
            (
                "handle refused for a stable key",
                self.missing_handle.load(Ordering::SeqCst),
            ),
        ];
        println!("{what}: {reads} reads checked, failures {f:?}");
        assert!(f.iter().all(|(_, n)| *n == 0), "{what}: {f:?}");
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::SeqCst);
}

/// Writer: toggles volatile keys, and now and then replaces a stable key's
/// value (replacement must never make it disappear).
fn write_ops(seed: u64, mut insert: impl FnMut(u64, u64), mut remove: impl FnMut(u64) -> bool) {
    let mut rng = Rng::new(seed);
    for gen in 1..=WRITER_OPS {
        let k = rng.below(KEYS);
        if is_stable(k) {
            if gen % 32 == 0 {
                insert(k, value_of(k, gen));
            }
        } else if !remove(k) {
            insert(k, value_of(k, gen));
        }
    }
}

fn seqtree_readers_never_miss_present_keys<F: Flavor>(domain: F, name: &str) {
    let t = Arc::new(SeqTree::<u64, u64, F>::with_domain(domain));
    for k in (0..KEYS).filter(|&k| is_stable(k)) {
        t.insert(k, value_of(k, 0));
    }
    let done = Arc::new(AtomicBool::new(false));
    let fails = Arc::new(Failures::default());
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (t, done, fails) = (t.clone(), done.clone(), fails.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + r);
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    reads += 1;
                    let k = rng.below(KEYS + KEYS / 4);
                    let g = t.domain().read();
                    match t.get(&g, &k) {
                        None if k < KEYS && is_stable(k) => bump(&fails.missing_stable),
                        Some(_) if k >= KEYS => bump(&fails.found_absent),
                        Some(&v) if key_of(v) != k => bump(&fails.wrong_value),
                        _ => {}
                    }
                    if reads % 128 == 0 {
                        let lo = rng.below(KEYS) & !3;
                        let hi = lo + 64;
                        let seen: Vec<u64> = t
                            .range(&g, lo..hi)
                            .map(|(&k, &v)| if key_of(v) == k { k } else { u64::MAX })
                            .collect();
                        let increasing = seen.windows(2).all(|w| w[0] < w[1]);
                        let inside = seen.iter().all(|k| (lo..hi).contains(k));
                        let stable_all = (lo..hi.min(KEYS))
                            .filter(|&k| is_stable(k))
                            .all(|k| seen.contains(&k));
                        if !(increasing && inside && stable_all) {
                            bump(&fails.bad_scan);
                        }
                    }
                    drop(g);
                    if reads % 64 == 0 {
                        let k = rng.below(KEYS) & !3;
                        match t.get_handle(&k) {
                            Some(h) if *h.key() == k && key_of(*h) == k => {}
                            _ => bump(&fails.missing_handle),
                        }
                    }
                }
                reads
            })
        })
        .collect();
    let w = t.clone();
    write_ops(7, |k, v| _ = w.insert(k, v), |k| w.remove(&k));
    done.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    let stats = t.stats();
    println!(
        "{name}: retries {}, lock fallbacks {}",
        stats.retries, stats.fallbacks
    );
    fails.assert_none(name, reads);
    t.check_invariants().unwrap();
}

#[test]
fn seqtree_on_rcu_readers_always_find_keys_present_throughout() {
    seqtree_readers_never_miss_present_keys(Rcu::default(), "SeqTree<Rcu>");
}

#[test]
fn seqtree_on_srcu_readers_always_find_keys_present_throughout() {
    seqtree_readers_never_miss_present_keys(rcu_registry::rcu::Srcu::new(), "SeqTree<Srcu>");
}

#[test]
fn latch_tree_readers_always_find_keys_present_throughout() {
    let t = Arc::new(LatchTree::<u64, u64>::new());
    for k in (0..KEYS).filter(|&k| is_stable(k)) {
        t.insert(k, value_of(k, 0));
    }
    let done = Arc::new(AtomicBool::new(false));
    let fails = Arc::new(Failures::default());
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (t, done, fails) = (t.clone(), done.clone(), fails.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(200 + r);
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    reads += 1;
                    let k = rng.below(KEYS + KEYS / 4);
                    let g = t.domain().read();
                    match t.get(&g, &k) {
                        None if k < KEYS && is_stable(k) => bump(&fails.missing_stable),
                        Some(_) if k >= KEYS => bump(&fails.found_absent),
                        Some(&v) if key_of(v) != k => bump(&fails.wrong_value),
                        _ => {}
                    }
                }
                reads
            })
        })
        .collect();
    let w = t.clone();
    write_ops(9, |k, v| _ = w.insert(k, v), |k| w.remove(&k));
    done.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    println!("LatchTree: retries {}", t.retries());
    fails.assert_none("LatchTree", reads);
    t.check_invariants().unwrap();
}
