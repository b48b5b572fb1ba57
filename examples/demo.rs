//! The main job: RCU domains at work.
//!
//! Readers on every core look up a shared, versioned configuration inside
//! `Rcu` read sections; updaters publish new versions and retire the old ones
//! through `call` (and, for one updater, `synchronize`); an `Srcu` reader
//! sleeps inside its section the whole time to show that `Rcu` grace periods
//! do not wait for it. A table refreshes every half second with read rates,
//! grace periods, callbacks and the oldest version any reader saw; at the end
//! the demo checks that every retired object was freed exactly once and that
//! no reader ever saw a freed one.
//!
//! ```text
//! cargo run --release --example demo [-- --secs N --readers N --updaters N]
//! ```

use rcu_registry::rcu::{Rcu, RcuCell, Srcu};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const POISON: u64 = 0xdead_beef_dead_beef;

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
        self.freed.fetch_add(1, Ordering::Relaxed);
    }
}

struct Options {
    secs: u64,
    readers: usize,
    updaters: usize,
}

fn parse_options() -> Options {
    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    let mut o = Options {
        secs: 5,
        readers: cores,
        updaters: 2,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match (args[i].as_str(), value) {
            ("--secs", Some(v)) => o.secs = v,
            ("--readers", Some(v)) => o.readers = v as usize,
            ("--updaters", Some(v)) => o.updaters = v.max(1) as usize,
            _ => {
                eprintln!("usage: demo [--secs N] [--readers N] [--updaters N]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    o
}

fn main() {
    let opts = parse_options();
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
        "rcu-registry demo: {} readers, {} updaters, {} s (membarrier-backed Rcu readers)",
        opts.readers, opts.updaters, opts.secs
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
            let mut local = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..256 {
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
                    local += 1;
                }
                reads.fetch_add(256, Ordering::Relaxed);
            }
            local
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
                thread::sleep(Duration::from_micros(50));
            }
            0
        }));
    }

    // A sleeping Srcu reader: Rcu grace periods keep completing regardless.
    let srcu = Srcu::new();
    let srcu_guard = srcu.read();

    let start = Instant::now();
    let mut last_reads = 0;
    let mut last = Instant::now();
    println!(
        "{:>6} {:>14} {:>12} {:>14} {:>14} {:>10} {:>8}",
        "time", "reads/s", "grace per.", "callbacks run", "cb pending", "max lag", "errors"
    );
    while start.elapsed() < Duration::from_secs(opts.secs) {
        thread::sleep(Duration::from_millis(500));
        let r = reads.load(Ordering::Relaxed);
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        let s = rcu.stats();
        println!(
            "{:>5.1}s {:>14.0} {:>12} {:>14} {:>14} {:>10} {:>8}",
            start.elapsed().as_secs_f64(),
            (r - last_reads) as f64 / dt,
            s.grace_periods,
            s.callbacks_invoked,
            s.callbacks_pending,
            max_lag.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed)
        );
        last_reads = r;
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("worker thread panicked");
    }
    drop(srcu_guard);
    srcu.synchronize();

    // Retire the last version and wait for every callback.
    drop(current.swap(None));
    rcu.barrier();
    let published = published.load(Ordering::Relaxed);
    let freed_n = freed.load(Ordering::Relaxed);
    let s = rcu.stats();
    println!();
    println!(
        "summary: {} reads, {} versions published, {} freed",
        reads.load(Ordering::Relaxed),
        published,
        freed_n
    );
    println!(
        "         {} grace periods, {} callbacks in {} batches ({:.1} callbacks per grace period)",
        s.grace_periods,
        s.callbacks_invoked,
        s.callback_batches,
        s.callbacks_invoked as f64 / s.callback_batches.max(1) as f64
    );
    let errors = errors.load(Ordering::Relaxed);
    // Every version ever created (the initial one plus each published one)
    // must have been freed exactly once, and no reader saw a poisoned one.
    let ok = errors == 0 && freed_n == published + 1;
    println!("check: {}", if ok { "OK" } else { "FAILED" });
    if !ok {
        std::process::exit(1);
    }
}
