//! Phase 1: RCU domains at work.
//!
//! # What runs
//!
//! Readers on every core look up a shared, versioned configuration inside
//! `Rcu` read sections; updaters publish new versions and retire the old
//! ones through `call` (and, for one updater, every 64th version through the
//! synchronous `swap`, which waits for a grace period); an `Srcu` reader
//! sleeps inside its section the whole time to show that `Rcu` grace
//! periods do not wait for it.
//!
//! # The check
//!
//! Dropping a version poisons it first, so a reader that could see a freed
//! version would see the poison. At the end every version ever created must
//! have been freed exactly once and no reader may have seen a bad one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rcu_registry::rcu::{Rcu, RcuCell, Srcu};

use crate::view::View;

const POISON: u64 = 0xdead_beef_dead_beef;
/// Pause between two publications of one updater: enough versions for many
/// grace periods without turning the updaters into busy loops.
const PUBLISH_PAUSE: Duration = Duration::from_micros(50);
/// Reads between two updates of the shared read counter.
const READ_BATCH: u64 = 256;

/// A published configuration version. Dropping it poisons it first, so a
/// reader that could see a freed version would notice the poison.
struct Version {
    number: u64,
    check: u64,
    freed: Arc<AtomicU64>,
}

impl Drop for Version {
    fn drop(&mut self) {
        self.check = POISON;
        // Relaxed: a counter read after `barrier`, which orders it.
        self.freed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Settings of the RCU phase.
pub struct RcuOptions {
    /// How long it runs.
    pub duration: Duration,
    /// Reader threads.
    pub readers: usize,
    /// Updater threads (at least one).
    pub updaters: usize,
}

/// Runs the phase; `true` when its check passed.
pub fn run(opts: &RcuOptions) -> bool {
    let rcu = Rcu::global();
    let freed = Arc::new(AtomicU64::new(0));
    let current = Arc::new(RcuCell::new(Version {
        number: 0,
        check: 0,
        freed: freed.clone(),
    }));
    let latest = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let max_lag = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));

    println!(
        "== phase 1: RCU domains: {} readers, {} updaters, {:.1} s (membarrier-backed Rcu readers)",
        opts.readers,
        opts.updaters,
        opts.duration.as_secs_f64()
    );

    let mut handles = Vec::new();
    for _ in 0..opts.readers {
        let (current, latest, stop, reads, max_lag, errors) = (
            current.clone(),
            latest.clone(),
            stop.clone(),
            reads.clone(),
            max_lag.clone(),
            errors.clone(),
        );
        handles.push(thread::spawn(move || {
            // Relaxed everywhere here: statistics and a stop flag; the
            // version's own fields are ordered by the RcuCell's publication.
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..READ_BATCH {
                    let g = rcu.read();
                    if let Some(v) = current.load(&g) {
                        if v.check != v.number.wrapping_mul(31) {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let lag = latest.load(Ordering::Relaxed).saturating_sub(v.number);
                        if lag > max_lag.load(Ordering::Relaxed) {
                            max_lag.fetch_max(lag, Ordering::Relaxed);
                        }
                    }
                }
                reads.fetch_add(READ_BATCH, Ordering::Relaxed);
            }
        }));
    }

    let published = Arc::new(AtomicU64::new(0));
    for u in 0..opts.updaters {
        let (current, latest, stop, freed, published) = (
            current.clone(),
            latest.clone(),
            stop.clone(),
            freed.clone(),
            published.clone(),
        );
        handles.push(thread::spawn(move || {
            // Relaxed: numbering and counters; publication orders the data.
            while !stop.load(Ordering::Relaxed) {
                let n = latest.fetch_add(1, Ordering::Relaxed) + 1;
                let v = Version {
                    number: n,
                    check: n.wrapping_mul(31),
                    freed: freed.clone(),
                };
                if u == 0 && n % 64 == 0 {
                    // The synchronous form: wait for readers, then drop here.
                    drop(current.swap(Some(v)));
                } else {
                    current.replace(v);
                }
                published.fetch_add(1, Ordering::Relaxed);
                thread::sleep(PUBLISH_PAUSE);
            }
        }));
    }

    // A sleeping Srcu reader: Rcu grace periods keep completing regardless.
    let srcu = Srcu::new();
    let srcu_guard = srcu.read();

    let mut view = View::new();
    let header = [format!(
        "{:>14} {:>12} {:>14} {:>12} {:>10} {:>8}",
        "reads/s", "grace per.", "callbacks run", "cb pending", "max lag", "errors"
    )];
    let start = Instant::now();
    let (mut last_reads, mut last) = (0, Instant::now());
    while start.elapsed() < opts.duration {
        thread::sleep(view.period().min(opts.duration));
        // Relaxed: statistics snapshots.
        let r = reads.load(Ordering::Relaxed);
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        let s = rcu.stats();
        let row = format!(
            "{:>14.0} {:>12} {:>14} {:>12} {:>10} {:>8}",
            (r - last_reads) as f64 / dt,
            s.grace_periods,
            s.callbacks_invoked,
            s.callbacks_pending,
            max_lag.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed)
        );
        let status = format!(
            "{:.1} s of {:.1} s; an Srcu reader sleeps in its read section throughout",
            start.elapsed().as_secs_f64(),
            opts.duration.as_secs_f64()
        );
        view.refresh(start.elapsed(), &header, &[row], &status);
        last_reads = r;
    }
    // Relaxed: the flag only ends the loops; join orders everything else.
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("rcu phase thread panicked");
    }
    drop(srcu_guard);
    srcu.synchronize();

    // Retire the last version and wait for every callback.
    drop(current.swap(None));
    rcu.barrier();
    // Relaxed: the threads are joined and `barrier` ran every callback.
    let published = published.load(Ordering::Relaxed);
    let freed_n = freed.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    let s = rcu.stats();
    println!(
        "rcu summary: {} reads, {} versions published, {} freed",
        reads.load(Ordering::Relaxed),
        published,
        freed_n
    );
    println!(
        "             {} grace periods, {} callbacks in {} batches ({:.1} callbacks per grace period)",
        s.grace_periods,
        s.callbacks_invoked,
        s.callback_batches,
        s.callbacks_invoked as f64 / s.callback_batches.max(1) as f64
    );
    // Every version ever created (the initial one plus each published one)
    // must have been freed exactly once, and no reader saw a poisoned one.
    let ok = errors == 0 && freed_n == published + 1;
    println!(
        "rcu check: {} ({} of {} versions freed exactly once, {} bad reads)",
        if ok { "ok" } else { "FAILED" },
        freed_n,
        published + 1,
        errors
    );
    ok
}
