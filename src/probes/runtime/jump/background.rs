//! The delayed, batched background pass: a thread that optimizes new
//! candidate sites some time after they appear, as the kernel's
//! `OPTIMIZE_DELAY` work does, so that a burst of registrations costs one
//! pass (one grace period, one quiescence wait) instead of one each.
//!
//! Off by default (tests and benchmarks call `optimize_now`); started by
//! [`JumpOptimizer::start_background`] and stopped by
//! [`JumpOptimizer::stop_background`]. Every `delay` the thread looks,
//! under the registry's writer mutex, for an armed site that is neither
//! optimized nor refused for good (a refusal for want of a quiescence
//! proof, a detour slot or a text write is retried, and so is one for a
//! post handler or an opt-out that no longer applies; the others wait for
//! an explicit pass), or for retired
//! detours to free, and runs [`JumpOptimizer::optimize_now`] only then:
//! an idle registry costs one mutex round trip per period and signals no
//! thread. A site refused for want of a quiescence proof is retried every
//! period, and each retry signals every thread. The thread is not recreated in a `fork` child.

use std::sync::Arc;
use std::time::Duration;

use super::sites::JumpView;
use super::{JumpOptimizer, JumpReport, State};
use crate::probes::arch::x86_64::jump::JumpRefusal;
use crate::sync::atomic::Ordering;

/// The default period: long enough to batch a burst of registrations,
/// short enough that a probe is optimized before a human notices.
pub const OPTIMIZE_DELAY: Duration = Duration::from_millis(100);

impl JumpOptimizer {
    /// Starts the background pass (once; a second call only changes
    /// nothing and returns false), running at most every `delay`.
    pub fn start_background(self: &Arc<Self>, delay: Duration) -> bool {
        let mut slot = self.background.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        // Relaxed: the flag is only polled; `stop_background` joins.
        self.stop.store(false, Ordering::Relaxed);
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("rcu-registry-jump-optimizer".into())
            .spawn(move || {
                // Relaxed: see above.
                while !me.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(delay);
                    let _ = me.optimize_pending();
                }
            })
            .expect("spawning the jump optimizer's thread");
        *slot = Some(handle);
        true
    }

    /// Stops the background pass and waits for its thread (a pass under
    /// way finishes first). Returns false if none was running.
    pub fn stop_background(&self) -> bool {
        let handle = self
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(handle) = handle else {
            return false;
        };
        // Relaxed: the thread polls it; the join orders the rest.
        self.stop.store(true, Ordering::Relaxed);
        let _ = handle.join();
        true
    }

    /// One step of the background pass on the calling thread: runs
    /// [`optimize_now`](Self::optimize_now) if optimization is on and a
    /// pass would do anything (a new candidate, a refusal that may not hold
    /// any more, retired detours to free); `None` when it would not (one
    /// mutex round trip, no thread signalled). For a caller with a periodic
    /// thread of its own instead of [`start_background`](Self::start_background)'s
    /// (a tracer's agent, whose own threads' calls are not the program's).
    /// Never from a probe handler.
    pub fn optimize_pending(&self) -> Option<JumpReport> {
        (self.is_enabled() && self.has_work()).then(|| self.optimize_now())
    }

    /// Whether a pass would do anything: a new candidate, one whose last
    /// refusal may not hold any more, or detours to free.
    fn has_work(&self) -> bool {
        self.with_state(|view, st| !st.retired.is_empty() || Self::new_work(view, st))
    }

    /// Whether a candidate of `view` is new, or its last refusal may not
    /// hold any more.
    fn new_work(view: &dyn JumpView, st: &State) -> bool {
        view.candidates().iter().any(|c| {
            c.armed
                && !c.needs_trap
                && !c.opted_out
                && !st.optimized.contains_key(&c.addr)
                && match st.refusals.get(&c.addr) {
                    None => true,
                    Some(r) => matches!(
                        r,
                        JumpRefusal::NotQuiescent
                            | JumpRefusal::NoDetourSlot
                            | JumpRefusal::TextAccess
                            | JumpRefusal::NeedsTrapPath
                            | JumpRefusal::OptedOut
                            | JumpRefusal::SharedUprobe { .. }
                            | JumpRefusal::NoFunction
                    ),
                }
        })
    }
}
