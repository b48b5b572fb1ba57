//! A callback flood, and the stalls that push it against the memory bound.
//!
//! # Flood
//!
//! One thread queues small callbacks on a dedicated [`Rcu`] domain as fast as
//! it can, outside any read section (so `call()` may throttle it). Each
//! callback records the completed grace-period count when it was queued and
//! checks, when it runs, that a grace period has completed since; its token
//! counts live callbacks independently of the domain's own statistics.
//!
//! # Stalls
//!
//! Left alone, the worker keeps up and the backlog stays small, so the bound
//! would never be tested. A *staller* therefore holds an `Rcu` read section
//! (blocking every `Rcu` grace period) until one of:
//! - the flood stops making progress with the backlog at the documented high
//!   watermark: `call()` is throttling it (*blocked*, the expected outcome);
//! - the flood queued more than the watermark plus slack during the stall
//!   (*overran*: the throttle does not work; the bound check then fails);
//! - a time limit (*timed out*: the flood was too slow to get there).

use rcu_registry::rcu::Rcu;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The callback backlog past which `call()` throttles callers that may
/// sleep: `HIGH_WATERMARK` in src/rcu/callbacks.rs, documented there as bounding
/// memory under a flood.
pub const DOCUMENTED_HIGH_WATERMARK: usize = 1 << 18;
/// Allowed overshoot: callers increment the backlog before they check it.
pub const SLACK: usize = 1024;
/// How long the flood must make no progress to count as throttled.
const BLOCKED_AFTER: Duration = Duration::from_millis(50);
/// Longest stall.
const STALL_LIMIT: Duration = Duration::from_secs(4);

/// Counters shared by the flood thread, its callbacks and the staller.
#[derive(Debug, Default)]
pub struct FloodCounters {
    /// Callbacks queued.
    pub queued: AtomicU64,
    /// Callbacks run.
    pub ran: AtomicU64,
    /// Callbacks queued and not yet run or dropped (own count).
    pub live: AtomicUsize,
    /// Highest `live` seen by the flood thread.
    pub peak_live: AtomicUsize,
    /// Highest `callbacks_pending` the domain reported to the flood thread.
    pub peak_pending: AtomicUsize,
    /// Callbacks that ran before a grace period had completed.
    pub early: AtomicU64,
    /// Stalls that ended with the flood throttled at the watermark.
    pub stalls_blocked: AtomicU64,
    /// Stalls during which the flood overran the watermark.
    pub stalls_overran: AtomicU64,
    /// Stalls that hit the time limit first.
    pub stalls_timed_out: AtomicU64,
}

/// One flood callback's payload.
struct Token {
    counters: &'static FloodCounters,
    queued_at_gp: u64,
}

impl Token {
    fn run(self, domain_gps: u64) {
        if domain_gps < self.queued_at_gp + 1 {
            self.counters.early.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.ran.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.counters.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The flood thread: queues callbacks on `domain` until `stop`.
pub fn flood(domain: &Rcu, c: &'static FloodCounters, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            let live = c.live.fetch_add(1, Ordering::Relaxed) + 1;
            c.peak_live.fetch_max(live, Ordering::Relaxed);
            let token = Token {
                counters: c,
                queued_at_gp: domain.stats().grace_periods,
            };
            domain.call(move || token.run(Rcu::global().stats().grace_periods));
            c.queued.fetch_add(1, Ordering::Relaxed);
            let pending = domain.stats().callbacks_pending;
            c.peak_pending.fetch_max(pending, Ordering::Relaxed);
        }
    }
}

/// One stall: holds an `Rcu` read section until the flood is throttled,
/// overruns, or the time limit passes (see the module docs), or the run
/// stops (the flood then stops too: such a stall counts as nothing).
pub fn stall(domain: &Rcu, c: &FloodCounters, stop: &AtomicBool) {
    let guard = domain.read();
    let start = Instant::now();
    let queued_at_start = c.queued.load(Ordering::Relaxed);
    let mut last = queued_at_start;
    let mut last_progress = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(2));
        let q = c.queued.load(Ordering::Relaxed);
        if (q - queued_at_start) as usize > DOCUMENTED_HIGH_WATERMARK + SLACK {
            c.stalls_overran.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if q != last {
            last = q;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= BLOCKED_AFTER
            && domain.stats().callbacks_pending >= DOCUMENTED_HIGH_WATERMARK
        {
            c.stalls_blocked.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if start.elapsed() > STALL_LIMIT {
            c.stalls_timed_out.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    drop(guard);
}
