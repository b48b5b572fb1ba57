//! loom model of the per-CPU hit counters' protocol (`src/probes/percpu.rs`):
//! one slot per CPU, written only by the thread that holds that CPU for
//! the whole read-CPU-to-commit sequence (the guarantee the kernel's
//! restartable sequence gives: a thread preempted, migrated or signalled
//! before its commit starts over), summed by readers that take no lock.
//! Three threads count on two modelled CPUs (a lock per CPU; which CPU a
//! thread runs on is chosen per increment) while a reader sums twice:
//! every sum it sees is within the increments made and the second is never
//! below the first, and the final sum after the joins is exact.
//!
//! What this model does NOT cover:
//! - the crate's own code: loom cannot run a restartable sequence, so
//!   under `cfg(loom)` `HitCounter` takes its fallback (`fetch_add` on a
//!   shared word) and the registry models count through that; the real
//!   sequence (descriptor, abort handler and its signature, the `add`
//!   commit) is exercised by the unit test in `src/probes/percpu.rs` and
//!   the live tests (`tests/runtime_jump_probes.rs`: exact counts on
//!   several threads, and in a `fork` child);
//! - the real increment is a plain `add` to memory; the model increments
//!   with a relaxed `fetch_add` under the CPU's lock, which is the same
//!   with the lock held (loom 0.7 trips internal assertions on plain stores
//!   read by a concurrent reader: tokio-rs/loom issues 252 and 389);
//! - more CPUs or threads, and executions beyond the preemption bound (3).
//!
//! A second model covers the slots' lazy publication (`HitCounter::per_cpu`:
//! a counter counts in one shared word until a writer publishes its slots
//! with a Release compare-and-swap; increments and reads load the pointer
//! with Acquire): an increment racing the publication lands in the shared
//! word or in a zeroed slot, never lost, and a reader's sums stay within
//! what was added and never go backwards. It models the pointer with a
//! loom `AtomicPtr` to a leaked box (freed after the joins, as the
//! counter's drop does once no increment runs).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release
//! --target-dir target/loom --test percpu`

#![cfg(loom)]

mod probe_common;

use loom::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use probe_common::model;

/// Two modelled CPUs, each with its slot and the exclusion the kernel's
/// restart gives it.
struct PerCpu {
    slots: [AtomicU64; 2],
    cpus: [Mutex<()>; 2],
}

impl PerCpu {
    fn add_one(&self, cpu: usize) {
        let _on_cpu = self.cpus[cpu].lock().unwrap();
        self.slots[cpu].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.slots.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

#[test]
fn per_cpu_increments_sum_exactly_and_never_go_backwards() {
    model(|| {
        let c = Arc::new(PerCpu {
            slots: [AtomicU64::new(0), AtomicU64::new(0)],
            cpus: [Mutex::new(()), Mutex::new(())],
        });
        // Each thread migrates between its two increments.
        let counters: Vec<_> = (0..2)
            .map(|t| {
                let c = c.clone();
                thread::spawn(move || {
                    c.add_one(t);
                    c.add_one(1 - t);
                })
            })
            .collect();
        let reader = {
            let c = c.clone();
            thread::spawn(move || {
                let first = c.get();
                let second = c.get();
                assert!(first <= second, "went backwards: {first} then {second}");
                assert!(second <= 5, "more than was added: {second}");
            })
        };
        c.add_one(0);
        for t in counters {
            t.join().unwrap();
        }
        reader.join().unwrap();
        assert_eq!(c.get(), 5);
    });
}

/// The counter with lazily published slots (`HitCounter`'s shape): the
/// shared word, and the slots once `per_cpu` published them.
struct Lazy {
    shared: AtomicU64,
    slots: AtomicPtr<PerCpu>,
}

impl Lazy {
    fn per_cpu(&self) {
        let made = Box::into_raw(Box::new(PerCpu {
            slots: [AtomicU64::new(0), AtomicU64::new(0)],
            cpus: [Mutex::new(()), Mutex::new(())],
        }));
        if self
            .slots
            .compare_exchange(
                std::ptr::null_mut(),
                made,
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_err()
        {
            // SAFETY: never published.
            drop(unsafe { Box::from_raw(made) });
        }
    }

    fn part(&self) -> Option<&PerCpu> {
        let p = self.slots.load(Ordering::Acquire);
        // SAFETY: published once, freed only after every thread joined.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    fn add_one(&self, cpu: usize) {
        match self.part() {
            Some(pc) => pc.add_one(cpu),
            None => {
                self.shared.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn get(&self) -> u64 {
        let shared = self.shared.load(Ordering::Relaxed);
        shared + self.part().map_or(0, PerCpu::get)
    }
}

#[test]
fn slots_published_while_threads_count_lose_no_increment() {
    model(|| {
        let c = Arc::new(Lazy {
            shared: AtomicU64::new(0),
            slots: AtomicPtr::new(std::ptr::null_mut()),
        });
        let counter = {
            let c = c.clone();
            thread::spawn(move || {
                c.add_one(0);
                c.add_one(1);
            })
        };
        let publisher = {
            let c = c.clone();
            thread::spawn(move || c.per_cpu())
        };
        let first = c.get();
        c.add_one(1);
        let second = c.get();
        assert!(first <= second && second <= 3, "{first} then {second}");
        counter.join().unwrap();
        publisher.join().unwrap();
        assert_eq!(c.get(), 3);
        let p = c.slots.load(Ordering::Relaxed);
        // SAFETY: published by `per_cpu`; every thread that used it joined.
        drop(unsafe { Box::from_raw(p) });
    });
}
