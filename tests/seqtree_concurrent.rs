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

use rcu_registry::rcu::{Flavor, Rcu, Srcu};
use rcu_registry::seqtree::{LatchTree, SeqTree};
use seqtree_common::{key_of, value_of, Rng, TestMap};

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

/// Readers check random lookups (and run `extra` checks every so often)
/// while `write_ops` runs on this thread; fails on any wrong answer.
fn readers_never_miss<M, X>(name: &str, t: M, seed: u64, extra: X)
where
    M: TestMap,
    X: Fn(&M, &mut Rng, &Failures) + Send + Sync + 'static,
{
    let t = Arc::new(t);
    for k in (0..KEYS).filter(|&k| is_stable(k)) {
        t.put(k, value_of(k, 0));
    }
    let done = Arc::new(AtomicBool::new(false));
    let fails = Arc::new(Failures::default());
    let extra = Arc::new(extra);
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (t, done, fails, extra) = (t.clone(), done.clone(), fails.clone(), extra.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed * 100 + r);
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    reads += 1;
                    let k = rng.below(KEYS + KEYS / 4);
                    match t.lookup(k) {
                        None if k < KEYS && is_stable(k) => bump(&fails.missing_stable),
                        Some(_) if k >= KEYS => bump(&fails.found_absent),
                        Some(v) if key_of(v) != k => bump(&fails.wrong_value),
                        _ => {}
                    }
                    if reads % 64 == 0 {
                        extra(&t, &mut rng, &fails);
                    }
                }
                reads
            })
        })
        .collect();
    write_ops(seed, |k, v| t.put(k, v), |k| t.delete(k));
    done.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    println!("{name}: {}", t.report());
    fails.assert_none(name, reads);
    t.check().unwrap();
}

/// `SeqTree`-only checks: a range scan and an owned handle.
fn scan_and_handle<F: Flavor>(t: &SeqTree<u64, u64, F>, rng: &mut Rng, fails: &Failures) {
    let lo = rng.below(KEYS) & !3;
    let hi = lo + 64;
    let g = t.domain().read();
    let seen: Vec<u64> = t
        .range(&g, lo..hi)
        .map(|(&k, &v)| if key_of(v) == k { k } else { u64::MAX })
        .collect();
    drop(g);
    let increasing = seen.windows(2).all(|w| w[0] < w[1]);
    let inside = seen.iter().all(|k| (lo..hi).contains(k));
    let stable_all = (lo..hi.min(KEYS))
        .filter(|&k| is_stable(k))
        .all(|k| seen.contains(&k));
    if !(increasing && inside && stable_all) {
        bump(&fails.bad_scan);
    }
    match t.get_handle(&lo) {
        Some(h) if *h.key() == lo && key_of(*h) == lo => {}
        _ => bump(&fails.missing_handle),
    }
}

#[test]
fn seqtree_on_rcu_readers_always_find_keys_present_throughout() {
    let t = SeqTree::<u64, u64, Rcu>::new();
    readers_never_miss("SeqTree<Rcu>", t, 7, scan_and_handle);
}

#[test]
fn seqtree_on_srcu_readers_always_find_keys_present_throughout() {
    let t = SeqTree::<u64, u64, Srcu>::with_domain(Srcu::new());
    readers_never_miss("SeqTree<Srcu>", t, 8, scan_and_handle);
}

#[test]
fn latch_tree_readers_always_find_keys_present_throughout() {
    let t = LatchTree::<u64, u64>::new();
    readers_never_miss("LatchTree", t, 9, |_, _, _| {});
}
