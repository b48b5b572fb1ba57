//! The threads of the torture run and the state they share.
//!
//! Each function here is the body of one kind of thread in
//! `tests/rcu_torture.rs`; they stop when [`Run::stop`] is set and record
//! what they did in [`Run`]'s counters (or in the pools' tallies).
//!
//! Whatever the test asserts that a thread did (reads, grace periods, a
//! fork, an episode, a stall at the watermark) the thread does at least once
//! before it looks at [`Run::stop`], so the coverage checks hold on any
//! schedule: a starved thread makes the run longer, never the test fail.

use super::domain::TortureDomain;
use super::flood::{self, FloodCounters};
use super::fork::{self, ForkTargets, Hold};
use super::pool::{Pool, Tally};
use super::rng::Rng;
use rcu_registry::rcu::{Rcu, Srcu};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Time between forks.
const FORK_PERIOD: Duration = Duration::from_millis(300);
/// Time between flood stalls.
const STALL_PERIOD: Duration = Duration::from_millis(1500);
/// Time between sleeping-`Srcu`-reader episodes.
const SLEEPER_PERIOD: Duration = Duration::from_millis(700);
/// How long the `Srcu` reader sleeps in its section per episode (at least).
const SLEEPER_NAP: Duration = Duration::from_millis(60);
/// How often the sleeper says it is still waiting for the other `Srcu`
/// instance's grace period (it waits on: a grace period that never comes is
/// the run watchdog's to report, slowness under load is no failure).
const PROGRESS_NOTE: Duration = Duration::from_secs(10);
/// Read sections each busy reader runs at least (two readers: the pool's
/// check wants 1000).
const MIN_READS: u64 = 512;
/// `synchronize()` calls the synchronous writer makes at least: each waits
/// for a grace period of its own, so the pool's check of 10 always holds.
const MIN_SYNC_RETIRES: u64 = 10;
/// Short-lived reader threads alive at once.
const CHURN_THREADS: usize = 3;
/// Longest life of a short-lived reader thread.
const CHURN_MAX_LIFE_US: u64 = 20_000;

/// State every torture thread sees.
pub struct Run {
    /// Set when the run is over; every thread then winds down.
    pub stop: AtomicBool,
    /// Taken by the staller and the sleeper so that a stall (which blocks
    /// `Rcu` grace periods on purpose) never overlaps a progress check.
    pub episode: Mutex<()>,
    /// Failures found by the threads (the test asserts it stays empty).
    pub failures: Mutex<Vec<String>>,
    // Counters for the report: what the threads did.
    pub churn_started: AtomicU64,
    pub churn_leaked_guard: AtomicU64,
    pub sleeper_episodes: AtomicU64,
    pub sleeper_rcu_gps: AtomicU64,
    pub sleeper_srcu_gps: AtomicU64,
    pub sleeper_nap_ms: AtomicU64,
    pub forks: AtomicU64,
    pub fork_max_child_ms: AtomicU64,
}

impl Run {
    /// A run that has not been stopped.
    pub fn new() -> Self {
        Run {
            stop: AtomicBool::new(false),
            episode: Mutex::new(()),
            failures: Mutex::new(Vec::new()),
            churn_started: AtomicU64::new(0),
            churn_leaked_guard: AtomicU64::new(0),
            sleeper_episodes: AtomicU64::new(0),
            sleeper_rcu_gps: AtomicU64::new(0),
            sleeper_srcu_gps: AtomicU64::new(0),
            sleeper_nap_ms: AtomicU64::new(0),
            forks: AtomicU64::new(0),
            fork_max_child_ms: AtomicU64::new(0),
        }
    }

    /// Whether the run is over.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Records a failure (also printed at once).
    pub fn fail(&self, msg: String) {
        eprintln!("rcu_torture: FAILURE: {msg}");
        self.failures.lock().unwrap().push(msg);
    }

    /// Sleeps up to `d`, returning early (false) once the run stops.
    pub fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.stopped() {
                return false;
            }
            thread::sleep(Duration::from_millis(5).min(d));
        }
        !self.stopped()
    }
}

/// A busy reader: read sections with all checks until the run stops.
fn reader<D: TortureDomain>(pool: &Pool<D>, run: &Run, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    while tally.reads < MIN_READS || !run.stopped() {
        for _ in 0..256 {
            pool.read_and_check(&mut rng, &mut tally);
        }
    }
    pool.merge(&tally);
}

/// A writer retiring through `synchronize()` as fast as it can.
fn sync_writer<D: TortureDomain>(pool: &Pool<D>, run: &Run) {
    let mut n = 0;
    while n < MIN_SYNC_RETIRES || !run.stopped() {
        pool.retire_with_synchronize();
        n += 1;
    }
}

/// A writer retiring through `call()` as fast as it can. Its first
/// retirement happens under its own read section, so a reader sees a
/// retired object (and checks its age and contents) on every run rather
/// than only when the scheduler interleaves readers and writers.
fn call_writer<D: TortureDomain>(pool: &Arc<Pool<D>>, run: &Run) {
    let mut tally = Tally::default();
    pool.read_across_retire(&mut tally);
    pool.merge(&tally);
    while !run.stopped() {
        pool.retire_with_call();
    }
}

/// Starts a pool's two busy readers (seeded from `seed`) and its two
/// writers, one retiring through `synchronize()` and one through `call()`.
pub fn spawn_pool_threads<D: TortureDomain>(
    pool: &Arc<Pool<D>>,
    run: &Arc<Run>,
    seed: u64,
    threads: &mut Vec<thread::JoinHandle<()>>,
) {
    for s in seed..seed + 2 {
        let (p, r) = (pool.clone(), run.clone());
        threads.push(thread::spawn(move || reader(&p, &r, s)));
    }
    let (p, r) = (pool.clone(), run.clone());
    threads.push(thread::spawn(move || sync_writer(&p, &r)));
    let (p, r) = (pool.clone(), run.clone());
    threads.push(thread::spawn(move || call_writer(&p, &r)));
}

/// Keeps [`CHURN_THREADS`] short-lived readers alive, each reading both
/// pools for a random time; one in eight exits inside a leaked `Rcu`
/// section.
pub fn churn(rcu_pool: &Arc<Pool<Rcu>>, srcu_pool: &Arc<Pool<Srcu>>, run: &Arc<Run>) {
    let mut rng = Rng::new(0xc4u64);
    let mut alive: Vec<thread::JoinHandle<()>> = Vec::new();
    // The first round of threads starts before `stop` is looked at.
    loop {
        alive.retain(|h| !h.is_finished());
        while alive.len() < CHURN_THREADS {
            let (rp, sp, r) = (rcu_pool.clone(), srcu_pool.clone(), run.clone());
            let seed = rng.next();
            r.churn_started.fetch_add(1, Ordering::Relaxed);
            alive.push(thread::spawn(move || {
                let mut rng = Rng::new(seed);
                let life = Duration::from_micros(rng.below(CHURN_MAX_LIFE_US));
                let born = Instant::now();
                let (mut rt, mut st) = (Tally::default(), Tally::default());
                while born.elapsed() < life && !r.stopped() {
                    rp.read_and_check(&mut rng, &mut rt);
                    sp.read_and_check(&mut rng, &mut st);
                }
                rp.merge(&rt);
                sp.merge(&st);
                if rng.one_in(8) {
                    // The thread exits inside this section: grace periods
                    // must not wait for it forever.
                    std::mem::forget(rp.domain().read());
                    r.churn_leaked_guard.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        thread::sleep(Duration::from_micros(500));
        if run.stopped() {
            break;
        }
    }
    for h in alive {
        h.join().unwrap();
    }
}

/// Episodes of an `Srcu` reader sleeping in its section: meanwhile three
/// `Rcu` grace periods (run by the sleeper itself) and one of the other
/// `Srcu` instance (run by a helper thread; a broken isolation leaves the
/// sleeper waiting, with a note every [`PROGRESS_NOTE`], until the run
/// watchdog aborts) complete, while a grace period of the sleeper's own
/// instance does not. The sleeper drives every grace period it checks, so
/// the check does not depend on other threads still running. The first
/// episode runs at once, before `stop` is looked at.
pub fn srcu_sleeper(rcu: &Rcu, other_srcu: &Srcu, run: &Run) {
    let sleepy = Srcu::new();
    loop {
        let episode = run.episode.lock().unwrap();
        let rcu_before = rcu.stats().grace_periods;
        let other_before = other_srcu.stats().grace_periods;
        let start = Instant::now();
        let guard = sleepy.read();
        let cookie = sleepy.start_poll();
        let (other_done, other_waited) = mpsc::channel::<()>();
        let helper = {
            let other = other_srcu.clone();
            thread::spawn(move || {
                other.synchronize();
                let _ = other_done.send(());
            })
        };
        for _ in 0..3 {
            // Allowed: an Rcu grace period does not wait for Srcu readers.
            rcu.synchronize();
            thread::sleep(SLEEPER_NAP / 3);
        }
        let mut other_ok = false;
        while !other_ok {
            match other_waited.recv_timeout(PROGRESS_NOTE) {
                Ok(()) => other_ok = true,
                Err(mpsc::RecvTimeoutError::Timeout) => eprintln!(
                    "rcu_torture: the other Srcu instance's synchronize() has not returned \
                     after {:?} while an Srcu reader sleeps; still waiting",
                    start.elapsed()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let rcu_gps = rcu.stats().grace_periods - rcu_before;
        let other_gps = other_srcu.stats().grace_periods - other_before;
        let own_done_early = sleepy.poll(&cookie);
        let napped = start.elapsed();
        drop(guard);
        helper.join().unwrap();
        if rcu_gps >= 3 && other_ok {
            run.sleeper_rcu_gps.fetch_add(rcu_gps, Ordering::Relaxed);
            run.sleeper_srcu_gps.fetch_add(other_gps, Ordering::Relaxed);
        } else {
            run.fail(format!(
                "while an Srcu reader slept {napped:?}: {rcu_gps} Rcu grace periods (want 3), \
                 the other Srcu instance's synchronize() {}",
                if other_ok {
                    "returned"
                } else {
                    "did not return"
                }
            ));
        }
        if own_done_early {
            run.fail("an Srcu grace period completed while its reader slept".into());
        }
        sleepy.cond_synchronize(cookie);
        run.sleeper_episodes.fetch_add(1, Ordering::Relaxed);
        run.sleeper_nap_ms
            .fetch_add(napped.as_millis() as u64, Ordering::Relaxed);
        drop(episode);
        if !run.pause(SLEEPER_PERIOD) {
            break;
        }
    }
}

/// Forks at once and then every [`FORK_PERIOD`] while the holder sits inside
/// an `Rcu` and an `Srcu` section and everything else keeps running.
pub fn forker(targets: &ForkTargets, run: &Run) {
    let (requests, incoming) = mpsc::channel::<Hold>();
    let holder = {
        let (rcu, srcu) = (targets.pool_rcu.clone(), targets.held_srcu.clone());
        thread::spawn(move || fork::holder(incoming, rcu, srcu))
    };
    loop {
        // Make sure the global domain has a worker in the parent, so the
        // child must notice that it did not survive the fork.
        Rcu::global().call(|| {});
        let (inside_tx, inside_rx) = mpsc::sync_channel(1);
        let (release_tx, release_rx) = mpsc::sync_channel(1);
        requests
            .send(Hold {
                inside: inside_tx,
                release: release_rx,
            })
            .unwrap();
        inside_rx.recv().unwrap();
        let outcome = fork::fork_and_check(targets);
        let _ = release_tx.send(());
        match outcome {
            Ok(took) => {
                run.forks.fetch_add(1, Ordering::Relaxed);
                run.fork_max_child_ms
                    .fetch_max(took.as_millis() as u64, Ordering::Relaxed);
            }
            Err(e) => run.fail(e),
        }
        if !run.pause(FORK_PERIOD) {
            break;
        }
    }
    drop(requests);
    holder.join().unwrap();
}

/// At once the forced flood stall, then every [`STALL_PERIOD`] a periodic
/// one (see `flood.rs`).
pub fn staller(flood_rcu: &Rcu, counters: &FloodCounters, run: &Run) {
    {
        let _episode = run.episode.lock().unwrap();
        flood::stall(flood_rcu, counters, &run.stop, true);
    }
    while run.pause(STALL_PERIOD) {
        let _episode = run.episode.lock().unwrap();
        flood::stall(flood_rcu, counters, &run.stop, false);
    }
}

/// Aborts the process unless `done` is signalled within `limit`.
pub fn watchdog(limit: Duration) -> mpsc::Sender<()> {
    let (done, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("rcu_torture: WATCHDOG: the run did not finish within {limit:?}; aborting");
            std::process::abort();
        }
    });
    done
}
