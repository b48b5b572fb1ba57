//! Torture test for the RCU domains, modeled on the kernel's rcutorture.
//!
//! # What runs at once
//!
//! For [`RUN_SECS_VAR`] seconds (default 3; at least 10 when `CI=true`):
//! - two pools of versioned objects, one protected by an [`Rcu`] domain and
//!   one by an [`Srcu`] domain, each with two busy readers and two writers
//!   that retire continuously, one through `synchronize()` and one through
//!   `call()` (see `common/rcu_torture/pool.rs` for the checks and the age
//!   bound);
//! - a callback flood on its own `Rcu` domain, with stalls that push it to
//!   the documented memory bound: a forced one that every run completes,
//!   then periodic ones (`common/rcu_torture/flood.rs`);
//! - short-lived reader threads started and ending all the time, some of
//!   them exiting inside an `Rcu` read section whose guard they leaked;
//! - an `Srcu` reader that sleeps in its section while `Rcu` grace periods
//!   (and the other `Srcu` instance's) must keep completing;
//! - a thread that forks while all of the above runs and while a holder
//!   thread sits inside an `Rcu` and an `Srcu` section; the child must
//!   complete grace periods and callbacks (`common/rcu_torture/fork.rs`).
//!
//! Nothing the test asserts is left to the scheduler: every coverage
//! condition it checks (reads, retired objects seen, grace periods, a stall
//! at the watermark, a fork, a sleeper episode, a short-lived thread) is
//! forced or done at least once by its thread before the thread looks at the
//! stop flag, so a loaded machine makes the run longer, not red.
//!
//! A watchdog aborts the process if the run overstays its time by
//! [`WATCHDOG_GRACE`], so a wedged grace period fails CI instead of hanging it.
//!
//! The long test is `#[ignore]`d so that debug `cargo test` runs skip it;
//! run it in release (as `scripts/test-all` does, with `CI=true`):
//!
//! `RCU_TORTURE_SECS=10 cargo test --release --test rcu_torture -- --include-ignored --nocapture`

#[path = "common/rcu_torture/mod.rs"]
mod torture;

use rcu_registry::rcu::{Rcu, Srcu};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use torture::domain::{Mismatched, TortureDomain};
use torture::flood::{self, FloodCounters, DOCUMENTED_HIGH_WATERMARK, SLACK};
use torture::fork::{self, ForkTargets};
use torture::pool::{Pool, AGE_BUCKETS};
use torture::threads::{churn, forker, spawn_pool_threads, srcu_sleeper, staller, watchdog, Run};

/// Environment variable with the run length in seconds.
const RUN_SECS_VAR: &str = "RCU_TORTURE_SECS";
/// Run length when the variable is unset.
const DEFAULT_SECS: f64 = 3.0;
/// Shortest run under CI (`CI=true`).
const CI_MIN_SECS: f64 = 10.0;
/// How long past its planned end the run may take before the watchdog
/// aborts the process (joins, barriers, a last fork child).
const WATCHDOG_GRACE: Duration = Duration::from_secs(120);
/// Objects per pool.
const POOL_SIZE: usize = 4096;

/// The torture tests share the machine's two cores: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn run_length() -> Duration {
    let secs = std::env::var(RUN_SECS_VAR)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(DEFAULT_SECS);
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    Duration::from_secs_f64(if ci { secs.max(CI_MIN_SECS) } else { secs })
}

fn pool_report<D: TortureDomain>(pool: &Pool<D>) -> String {
    let t = pool.tally.lock().unwrap().clone();
    let e = &pool.errors;
    let mut ages = String::new();
    for (i, n) in t.ages.iter().enumerate() {
        let label = if i + 1 == AGE_BUCKETS {
            format!(">={i}")
        } else {
            i.to_string()
        };
        ages.push_str(&format!(" {label}:{n}"));
    }
    format!(
        "{name:<5} reads {reads} (nested {nested}, delayed {delayed}), grace periods {gps}, \
         retired {rs} by synchronize + {rc} by call, callbacks run {cbs}, alloc stalls {st}\n\
         \x20     age histogram [current:{cur}{ages}] max age {max}\n\
         \x20     errors: poison seen {p}, corrupt {c}, recycled under reader {r}, too old {o}, \
         early reclaim {er}, double reclaim {dr}",
        name = D::NAME,
        reads = t.reads,
        nested = t.nested,
        delayed = t.delayed,
        gps = pool.domain().completed_gps(),
        rs = pool.retired_sync.load(Ordering::Relaxed),
        rc = pool.retired_call.load(Ordering::Relaxed),
        cbs = pool.domain().callbacks_invoked(),
        st = pool.alloc_stalls.load(Ordering::Relaxed),
        cur = t.current,
        max = t.max_age,
        p = e.poison_seen.load(Ordering::Relaxed),
        c = e.corrupt.load(Ordering::Relaxed),
        r = e.recycled_under_reader.load(Ordering::Relaxed),
        o = e.too_old.load(Ordering::Relaxed),
        er = e.early_reclaim.load(Ordering::Relaxed),
        dr = e.double_reclaim.load(Ordering::Relaxed),
    )
}

/// Checks that must hold after a correct run of a pool.
fn check_pool<D: TortureDomain>(pool: &Pool<D>, failures: &mut Vec<String>) {
    let t = pool.tally.lock().unwrap().clone();
    if pool.errors.total() != 0 {
        failures.push(format!(
            "{}: {} reader/reclaim errors",
            D::NAME,
            pool.errors.total()
        ));
    }
    if let Err(e) = pool.audit() {
        failures.push(e);
    }
    let did_work = t.reads >= 1000
        && t.ages.iter().sum::<u64>() > 0
        && pool.retired_sync.load(Ordering::Relaxed) > 0
        && pool.retired_call.load(Ordering::Relaxed) > 0
        && pool.domain().completed_gps() >= 10;
    if !did_work {
        failures.push(format!(
            "{}: the run did too little to prove anything (reads {}, retired objects seen {}, \
             grace periods {})",
            D::NAME,
            t.reads,
            t.ages.iter().sum::<u64>(),
            pool.domain().completed_gps()
        ));
    }
}

#[test]
#[ignore = "torture test: run in release with --ignored (scripts/test-all does, with CI=true)"]
fn rcu_torture_readers_never_see_reclaimed_or_overage_objects_and_grace_periods_keep_completing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let length = run_length();
    let done = watchdog(length + WATCHDOG_GRACE);
    let started = Instant::now();

    let rcu_pool = Pool::new(Rcu::new(), POOL_SIZE);
    let srcu_pool = Pool::new(Srcu::new(), POOL_SIZE);
    let flood_rcu = Rcu::new();
    let flood_counters: &'static FloodCounters = Box::leak(Box::default());
    let targets = ForkTargets {
        flood: flood_rcu.clone(),
        held_srcu: Srcu::new(),
        pool_rcu: rcu_pool.domain().clone(),
        pool_srcu: srcu_pool.domain().clone(),
    };
    let run = Arc::new(Run::new());
    // Start the flood domain's worker before any thread can fork: a fork
    // while another thread starts a worker wedges the child (the known bug
    // of `a_child_forked_while_a_worker_is_being_started_...`, tested there).
    flood_rcu.call(|| {});
    flood_rcu.barrier();

    let mut threads = Vec::new();
    spawn_pool_threads(&rcu_pool, &run, 0, &mut threads);
    spawn_pool_threads(&srcu_pool, &run, 100, &mut threads);
    {
        let (d, r) = (flood_rcu.clone(), run.clone());
        threads.push(thread::spawn(move || {
            flood::flood(&d, flood_counters, &r.stop)
        }));
        let (d, r) = (flood_rcu.clone(), run.clone());
        threads.push(thread::spawn(move || staller(&d, flood_counters, &r)));
    }
    {
        let (rp, sp, r) = (rcu_pool.clone(), srcu_pool.clone(), run.clone());
        threads.push(thread::spawn(move || churn(&rp, &sp, &r)));
        let (rcu, srcu, r) = (Rcu::new(), srcu_pool.domain().clone(), run.clone());
        threads.push(thread::spawn(move || srcu_sleeper(&rcu, &srcu, &r)));
        let (t, r) = (targets.clone(), run.clone());
        threads.push(thread::spawn(move || forker(&t, &r)));
    }

    thread::sleep(length);
    run.stop.store(true, Ordering::Relaxed);
    for t in threads {
        if t.join().is_err() {
            run.fail("a torture thread panicked".into());
        }
    }
    rcu_pool.domain().barrier();
    srcu_pool.domain().barrier();
    flood_rcu.barrier();
    let elapsed = started.elapsed();
    let _ = done.send(());

    let fc = flood_counters;
    let (queued, ran) = (
        fc.queued.load(Ordering::Relaxed),
        fc.ran.load(Ordering::Relaxed),
    );
    let (peak_live, peak_pending) = (
        fc.peak_live.load(Ordering::Relaxed),
        fc.peak_pending.load(Ordering::Relaxed),
    );
    let bound = DOCUMENTED_HIGH_WATERMARK + SLACK;
    let (blocked, overran, timed_out) = (
        fc.stalls_blocked.load(Ordering::Relaxed),
        fc.stalls_overran.load(Ordering::Relaxed),
        fc.stalls_timed_out.load(Ordering::Relaxed),
    );
    println!(
        "rcu_torture: ran {elapsed:.1?} (planned {length:?})\n  {}\n  {}\n  \
         flood: queued {queued}, ran {ran}, peak pending {peak_pending} (own count {peak_live}, \
         bound {bound}), early {early}, stalls: blocked at the watermark {blocked}, \
         overran {overran}, timed out {timed_out}\n  \
         churn: threads started {cs}, exited inside a leaked Rcu section {cl}\n  \
         srcu sleeper: episodes {se}, {sn} ms asleep in its section, meanwhile Rcu grace \
         periods {sr} and other-Srcu grace periods {ss}\n  \
         fork: children {forks} all completed grace periods and callbacks (slowest {fm} ms)\n  \
         process-wide Rcu grace periods {gps}",
        pool_report(&rcu_pool),
        pool_report(&srcu_pool),
        early = fc.early.load(Ordering::Relaxed),
        cs = run.churn_started.load(Ordering::Relaxed),
        cl = run.churn_leaked_guard.load(Ordering::Relaxed),
        se = run.sleeper_episodes.load(Ordering::Relaxed),
        sn = run.sleeper_nap_ms.load(Ordering::Relaxed),
        sr = run.sleeper_rcu_gps.load(Ordering::Relaxed),
        ss = run.sleeper_srcu_gps.load(Ordering::Relaxed),
        forks = run.forks.load(Ordering::Relaxed),
        fm = run.fork_max_child_ms.load(Ordering::Relaxed),
        gps = Rcu::global().stats().grace_periods,
    );

    let mut failures = std::mem::take(&mut *run.failures.lock().unwrap());
    check_pool(&rcu_pool, &mut failures);
    check_pool(&srcu_pool, &mut failures);
    if peak_pending > bound || peak_live > bound {
        failures.push(format!(
            "callback flood exceeded its memory bound: peak pending {peak_pending}, \
             own count {peak_live}, bound {bound}"
        ));
    }
    if overran > 0 {
        failures.push(format!(
            "the flood overran the watermark in {overran} stalls"
        ));
    }
    if blocked == 0 {
        failures.push("no stall pushed the flood to the watermark: the bound went untested".into());
    }
    if ran != queued || fc.live.load(Ordering::Relaxed) != 0 {
        failures.push(format!("flood: queued {queued} callbacks but {ran} ran"));
    }
    if fc.early.load(Ordering::Relaxed) != 0 {
        failures.push("flood callbacks ran before a grace period completed".into());
    }
    if run.churn_started.load(Ordering::Relaxed) == 0 {
        failures.push("no short-lived reader thread ran".into());
    }
    if run.sleeper_episodes.load(Ordering::Relaxed) == 0 {
        failures.push("the sleeping Srcu reader never completed an episode".into());
    }
    if run.forks.load(Ordering::Relaxed) == 0 {
        failures.push("no fork completed".into());
    }
    assert!(
        failures.is_empty(),
        "rcu_torture failed:\n  {}",
        failures.join("\n  ")
    );
}

/// The checks must be able to fail: against a domain whose grace periods
/// ignore the readers, they catch poisoned, recycled and overage objects.
///
/// The random readers and writers run first for a while (what they catch
/// depends on the schedule and is only reported); then two read sections
/// are forced to overlap writers, so every error kind is caught on every
/// run: inside the first, this thread retires the object being read and
/// completes three (broken) grace periods, which poison it (poison seen,
/// and too old); inside the second, it retires objects until the one being
/// read has gone through the quarantine and been reused (recycled).
#[test]
fn torture_checks_catch_a_domain_whose_grace_periods_ignore_readers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let limit = Duration::from_secs(2);
    let done = watchdog(limit + WATCHDOG_GRACE);
    let pool = Pool::new(Mismatched::default(), 2048);
    let run = Arc::new(Run::new());
    let mut threads = Vec::new();
    spawn_pool_threads(&pool, &run, 0, &mut threads);

    let e = &pool.errors;
    let all_seen = || {
        e.poison_seen.load(Ordering::Relaxed) > 0
            && e.too_old.load(Ordering::Relaxed) > 0
            && e.recycled_under_reader.load(Ordering::Relaxed) > 0
    };
    let start = Instant::now();
    while !all_seen() && start.elapsed() < limit {
        thread::sleep(Duration::from_millis(10));
    }
    run.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    pool.domain().barrier();
    println!(
        "broken domain, random threads, after {:.1?}:\n  {}",
        start.elapsed(),
        pool_report(&pool)
    );

    // The forced overlaps, on this thread alone (Mismatched's grace periods
    // do not wait for its readers, so no deadlock).
    let (poison, old, recycled) = (
        e.poison_seen.load(Ordering::Relaxed),
        e.too_old.load(Ordering::Relaxed),
        e.recycled_under_reader.load(Ordering::Relaxed),
    );
    let mut tally = torture::pool::Tally::default();
    pool.read_around(&mut tally, false, || {
        for _ in 0..3 {
            pool.retire_with_synchronize();
        }
        true
    });
    pool.read_around(&mut tally, false, || {
        // The quarantine holds at most 512 objects; the free list is a
        // stack, so the read object is reused as soon as it leaves it.
        for _ in 0..1024 {
            pool.retire_with_synchronize();
        }
        true
    });
    pool.merge(&tally);
    pool.domain().barrier();
    let _ = done.send(());
    println!(
        "broken domain, after the forced overlaps:\n  {}",
        pool_report(&pool)
    );
    assert!(
        e.poison_seen.load(Ordering::Relaxed) > poison
            && e.too_old.load(Ordering::Relaxed) > old
            && e.recycled_under_reader.load(Ordering::Relaxed) > recycled,
        "the torture checks missed a broken domain in a forced overlap: {:?}",
        pool.errors
    );
}

/// A child forked while the parent's callback worker has taken a large batch
/// off the queue (and waits for its grace period) must still be able to
/// queue callbacks: the batch did not survive the fork, so it must not
/// count against the child's backlog limit.
#[test]
fn a_child_forked_while_the_worker_holds_a_large_batch_can_still_queue_callbacks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let domain = Rcu::new();
    // Occupy the worker inside a callback while the big batch is queued.
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    domain.call(move || {
        entered_tx.send(()).unwrap();
        gate_rx.recv().unwrap();
    });
    entered_rx.recv().unwrap();
    // The big batch, headed by a callback that holds the worker: all of it
    // is queued while the worker is busy above, so the worker takes it off
    // the queue in one piece, and once the head callback has entered, the
    // worker sits on the rest of the batch, unrun, at the fork. (No sleep
    // guesses when the worker got there.)
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (leave_tx, leave_rx) = mpsc::channel::<()>();
    domain.call(move || {
        held_tx.send(()).unwrap();
        leave_rx.recv().unwrap();
    });
    let big = DOCUMENTED_HIGH_WATERMARK - 1000;
    for _ in 0..big {
        domain.call(|| {});
    }
    gate_tx.send(()).unwrap();
    held_rx.recv().unwrap();
    let outcome = fork::fork_and_run(|| {
        for _ in 0..2000 {
            domain.call(|| {});
        }
        domain.barrier();
        0
    });
    leave_tx.send(()).unwrap();
    domain.barrier();
    outcome.unwrap();
}

/// A child forked while another thread is starting a domain's callback
/// worker must still be able to queue callbacks on that domain.
///
/// Regression test: `CallbackQueue::start_worker` used to hold a mutex while
/// spawning the worker; a child forked meanwhile inherited it locked by a
/// thread that does not exist in the child, and its first `call()` blocked
/// forever. Starting is now claimed with an atomic word tagged by fork
/// generation, which a child takes over.
#[test]
fn a_child_forked_while_a_worker_is_being_started_can_still_queue_callbacks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let current: Arc<Mutex<Option<Rcu>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let starter = {
        let (current, stop) = (current.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let d = Rcu::new();
                *current.lock().unwrap() = Some(d.clone());
                // The first call starts the domain's worker thread.
                d.call(|| {});
            }
        })
    };
    let mut failures = Vec::new();
    for _ in 0..50 {
        let Some(d) = current.lock().unwrap().clone() else {
            thread::sleep(Duration::from_millis(1));
            continue;
        };
        if let Err(e) = fork::fork_and_run(|| {
            d.call(|| {});
            d.barrier();
            0
        }) {
            failures.push(e);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    starter.join().unwrap();
    assert!(
        failures.is_empty(),
        "a forked child failed: {:?}",
        failures.first()
    );
}
