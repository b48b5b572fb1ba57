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
//! - the flood thread waits inside `call()` in the throttle
//!   (`DomainGauges::throttled_callers`, a test hook) with the backlog at the
//!   documented high watermark (*blocked*, the expected outcome);
//! - the flood queued more than the watermark plus slack during the stall
//!   (*overran*: the throttle does not work; the bound check then fails);
//! - for the periodic stalls only, a time limit (*timed out*: the flood was
//!   too slow to get there; reported, not a failure).
//!
//! The first stall is *forced*: it has no time limit and outlasts the end
//! of the run, and the flood keeps going until it is over, so every run
//! pushes the flood to the watermark whatever the scheduler does. While our
//! reader holds, no grace period that could drain the backlog can start, so
//! the flood must reach the watermark and then either wait in the throttle
//! (which it cannot leave before we do) or overrun: no timing decides the
//! outcome. A wedged stall is the run watchdog's to report.

use rcu_registry::__internals::rcu::DomainGauges;
use rcu_registry::rcu::Rcu;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The callback backlog past which `call()` throttles callers that may
/// sleep: `HIGH_WATERMARK` in src/rcu/callbacks.rs, documented there as bounding
/// memory under a flood.
pub const DOCUMENTED_HIGH_WATERMARK: usize = 1 << 18;
/// Allowed overshoot: callers increment the backlog before they check it.
pub const SLACK: usize = 1024;
/// Longest periodic (not forced) stall.
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
    /// Set once the forced stall is over: the flood runs until then.
    pub forced_stall_done: AtomicBool,
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

/// The flood thread: queues callbacks on `domain` until `stop`, and at
/// least until the forced stall is over.
pub fn flood(domain: &Rcu, c: &'static FloodCounters, stop: &AtomicBool) {
    // Acquire pairs with the staller's Release store: nothing to order, but
    // the flood must not stop before the forced stall saw its outcome.
    while !stop.load(Ordering::Relaxed) || !c.forced_stall_done.load(Ordering::Acquire) {
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

/// One stall: holds an `Rcu` read section until the flood is throttled or
/// overruns, or (a periodic stall only: `forced` false) the time limit
/// passes or the run stops (the flood then stops too: such a stall counts
/// as nothing). See the module docs.
pub fn stall(domain: &Rcu, c: &FloodCounters, stop: &AtomicBool, forced: bool) {
    let guard = domain.read();
    let start = Instant::now();
    let queued_at_start = c.queued.load(Ordering::Relaxed);
    loop {
        if !forced && stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
        let q = c.queued.load(Ordering::Relaxed);
        if (q - queued_at_start) as usize > DOCUMENTED_HIGH_WATERMARK + SLACK {
            c.stalls_overran.fetch_add(1, Ordering::Relaxed);
            break;
        }
        // The flood thread is the only caller on this domain: a throttled
        // caller is the flood, made to wait at the watermark (from then on
        // it cannot leave the throttle before our reader does).
        if domain.throttled_callers() > 0
            && domain.stats().callbacks_pending >= DOCUMENTED_HIGH_WATERMARK
        {
            c.stalls_blocked.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if !forced && start.elapsed() > STALL_LIMIT {
            c.stalls_timed_out.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    drop(guard);
    if forced {
        // Release: see `flood`.
        c.forced_stall_done.store(true, Ordering::Release);
    }
}
