//! Helpers shared by the seqtree integration tests.
#![allow(dead_code)]

use rcu_registry::__internals::seqtree::CheckInvariants;
use std::time::Duration;

/// A tiny xorshift generator: tests need cheap, reproducible randomness
/// per thread, not quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[path = "../stress_time/mod.rs"]
mod stress_time;

/// Duration of a time-bounded test: `$var` seconds (default `default_secs`),
/// and never less than `ci_min_secs` when `CI=true`.
pub fn duration_from_env(var: &str, default_secs: f64, ci_min_secs: f64) -> Duration {
    stress_time::stress_duration(var, default_secs, ci_min_secs)
}

/// The value every test stores for `key` in generation `gen`, so a reader
/// can tell a wrong entry from a right one.
pub fn value_of(key: u64, gen: u64) -> u64 {
    (key << 20) | (gen & 0xF_FFFF)
}

/// The key a value was stored for.
pub fn key_of(value: u64) -> u64 {
    value >> 20
}

/// The operations the concurrent tests drive, over both tree types (and
/// any domain), so each test body is written once.
pub trait TestMap: Send + Sync + 'static {
    fn lookup(&self, key: u64) -> Option<u64>;
    fn put(&self, key: u64, value: u64);
    fn delete(&self, key: u64) -> bool;
    /// Read-side statistics, for the test log.
    fn report(&self) -> String;
    fn check(&self) -> Result<(), String>;
}

impl<F: rcu_registry::rcu::Flavor> TestMap for rcu_registry::seqtree::SeqTree<u64, u64, F> {
    fn lookup(&self, key: u64) -> Option<u64> {
        let g = self.domain().read();
        self.get(&g, &key).copied()
    }
    fn put(&self, key: u64, value: u64) {
        let _old = self.insert(key, value);
    }
    fn delete(&self, key: u64) -> bool {
        self.remove(&key)
    }
    fn report(&self) -> String {
        let s = self.stats();
        format!("{} retries, {} lock fallbacks", s.retries, s.fallbacks)
    }
    fn check(&self) -> Result<(), String> {
        self.check_invariants()
    }
}

impl<F: rcu_registry::rcu::Flavor> TestMap for rcu_registry::seqtree::LatchTree<u64, u64, F> {
    fn lookup(&self, key: u64) -> Option<u64> {
        let g = self.domain().read();
        self.get(&g, &key).copied()
    }
    fn put(&self, key: u64, value: u64) {
        let _old = self.insert(key, value);
    }
    fn delete(&self, key: u64) -> bool {
        self.remove(&key)
    }
    fn report(&self) -> String {
        format!("{} retries", self.retries())
    }
    fn check(&self) -> Result<(), String> {
        self.check_invariants()
    }
}
