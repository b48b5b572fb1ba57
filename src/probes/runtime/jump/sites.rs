//! The registries a [`JumpOptimizer`](super::JumpOptimizer) serves: what it
//! asks of one ([`JumpSites`]), and the kprobe registry's answers (the
//! uprobe runtime's are in `uprobes/jump.rs`).
//!
//! One optimizer implementation (`jump.rs`: batches, grace periods,
//! quiescence proofs, un-optimizing, reclaim) serves both: it sees a
//! registry only through this trait, and a detour's Rust half calls the hit
//! path of the registry its slot names through [`JumpSites::jump_hit`].

use std::ops::Range;

use super::detour::JumpSlot;
use crate::probes::arch::Regs;
use crate::probes::jump_sites::{JumpCandidate, JumpHit};
use crate::probes::kprobe::JumpWriter;
use crate::probes::runtime::context::ThreadMemory;
use crate::probes::runtime::in_process::InProcess;
use crate::probes::runtime::LiveRegistry;
use crate::probes::ProbeError;
use crate::sync::atomic::Ordering;

/// What the optimizer reads of a registry while its writers are excluded
/// (see [`JumpSites::with_writer`]).
pub(crate) trait JumpView {
    /// Every site, as the optimizer needs it.
    fn candidates(&self) -> Vec<JumpCandidate>;
    /// The extent of the function holding `addr`, if a symbol covers it.
    fn function_containing(&self, addr: u64) -> Option<Range<u64>>;
    /// The bytes at `start` as the compiler left them, but for the
    /// optimizer's own writes (the registry's breakpoints undone).
    fn original_text(&self, start: u64, buf: &mut [u8]) -> Result<(), ProbeError>;
}

/// A registry the optimizer serves. Leaked (`'static`), like every live
/// registry.
pub(crate) trait JumpSites: Send + Sync + 'static {
    /// Runs `f` with the registry's view. Every state change of the
    /// optimizer happens inside it: for kprobes with the registry's writer
    /// mutex held (the hook is called under it too); for uprobes with no
    /// registry lock (their writers call the hook with a file's stripe
    /// held, and wait there for the optimizer's state lock, which `f`
    /// takes: the lock order stripe -> state).
    fn with_writer(&self, f: &mut dyn FnMut(&dyn JumpView));
    /// A grace period of the domain the registry's hit paths read in.
    fn synchronize(&self);
    /// The registry's text (its writes are named as its own).
    fn text(&self) -> &InProcess;
    /// The detour's hit path (`detour.rs`, on the probed thread's stack,
    /// with the runtime's trap flag up): no allocation, no lock, no C
    /// library. `regs.ip` is the probed address.
    fn jump_hit(&self, slot: &JumpSlot, regs: &mut Regs) -> JumpHit;
}

/// The kprobe registry under its writer mutex.
struct KprobeView<'a> {
    registry: &'a LiveRegistry,
    w: &'a JumpWriter,
}

impl JumpView for KprobeView<'_> {
    fn candidates(&self) -> Vec<JumpCandidate> {
        self.registry.jump_candidates(self.w)
    }

    fn function_containing(&self, addr: u64) -> Option<Range<u64>> {
        self.registry
            .resolver
            .function_containing(addr)
            .map(|f| f.start..f.end())
    }

    fn original_text(&self, start: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.registry.original_text(self.w, start, buf)
    }
}

impl JumpSites for LiveRegistry {
    fn with_writer(&self, f: &mut dyn FnMut(&dyn JumpView)) {
        let w = self.lock_writer();
        f(&KprobeView {
            registry: self,
            w: &w,
        });
    }

    fn synchronize(&self) {
        self.rcu.synchronize();
    }

    fn text(&self) -> &InProcess {
        LiveRegistry::text(self)
    }

    #[inline]
    fn jump_hit(&self, slot: &JumpSlot, regs: &mut Regs) -> JumpHit {
        self.on_jump_hit(slot.addr, regs, &mut ThreadMemory, || {
            // Acquire pairs with the Release stores in `jump.rs`
            // (`optimize_now`, `unoptimize`).
            slot.live.load(Ordering::Acquire)
        })
    }
}
