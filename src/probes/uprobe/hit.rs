//! The uprobe hit path: `(space, vaddr)` → mapping → `(file, offset)` →
//! uprobe → consumers, then the displaced instruction.
//!
//! Invariant: everything runs inside one read section of the registry's domain,
//! with lock-free lookups and loads only (hit cache `hitcache.rs`, short lists
//! `short.rs`): no lock, no reference count, no allocation (except an `Srcu`
//! domain's first section on a thread). The re-entrancy flag
//! (`probes/reentry.rs`) is up from before the first consumer runs until the
//! return is tracked (`returns.rs`); a single-step returns a [`UprobeStep`]
//! that keeps the read section open until it is dropped.
//!
//! The hit path, outcomes ([`UprobeFinished`]) and return tracking, in full:
//! [`crate::docs::algorithms::uprobes`].

use super::consumer::{ConsumerAction, UprobeHit};
use super::registry::{slice, Install, SpaceState, Uprobe, UprobeRegistry};
use super::space::{AddressSpace, SpaceId, UprobeKey};
use crate::probes::arch::{
    Arch, DataMemory, Regs, StepOutcome, StepState, XolPlan, XolRun, MAX_INSN_BYTES,
};
use crate::probes::reentry::UprobeScope;
use crate::probes::text::TextMemory;
use crate::probes::ProbeError;
use crate::rcu::Flavor;
use crate::seqtree::EntryHandle;
use core::ptr::NonNull;

/// How a uprobe hit finished with nothing left in flight: the
/// [`UprobeOutcome::Done`] values (a single-step is
/// [`UprobeOutcome::SingleStep`] instead).
#[must_use = "the outcome says how to resume the thread"]
#[derive(Debug)]
pub enum UprobeFinished {
    /// No uprobe is at the address and the breakpoint there is not ours:
    /// leave `regs` alone and chain to the previous handler.
    NotOurs,
    /// The uprobe was removed between the trap and the lookup (the original
    /// instruction is back), or, on the live trap path, its lookup raced
    /// writers and could not be confirmed: `regs.ip` now points at the
    /// probed address; resume (the original instruction runs, or the
    /// breakpoint traps again).
    Vanished,
    /// A handler changed `regs.ip` and asked to skip the displaced
    /// instruction: resume at `regs.ip`.
    Skipped,
    /// The displaced instruction was emulated on `regs` and memory: resume.
    Emulated,
    /// `regs.ip` points at a jump optimizer's detour for the install, which
    /// runs the displaced instructions and jumps back: resume.
    Detoured,
    /// `regs.ip` points at the XOL slot, which jumps back by itself: resume
    /// (one trap). A freed slot is only ever reused for the same address
    /// (the [reuse rule](crate::probes::xol::XolAllocator#reuse-rule)).
    Boosted {
        /// The slot's address.
        slot: u64,
    },
    /// The displaced instruction could not be completed: `regs` hold the
    /// state before it. The runtime decides (typically: deliver a fault).
    Failed(ProbeError),
}

/// What the trap handler must do after [`UprobeRegistry::on_breakpoint`].
#[must_use = "the outcome says how to resume the thread"]
pub enum UprobeOutcome<'r, F: Flavor + 'r> {
    /// Finished: nothing is in flight on the thread.
    Done(UprobeFinished),
    /// `regs` are set up to single-step the XOL slot: resume, and at the
    /// step trap call [`UprobeRegistry::on_step_complete`].
    SingleStep(UprobeStep<'r, F>),
}

impl<F: Flavor> std::fmt::Debug for UprobeOutcome<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UprobeOutcome::Done(o) => f.debug_tuple("Done").field(o).finish(),
            UprobeOutcome::SingleStep(s) => f
                .debug_tuple("SingleStep")
                .field(&s.plan().slot_addr)
                .finish(),
        }
    }
}

/// A single-step in flight. Holds the registry's read section open (so the
/// slot and plan stay valid); hand it to
/// [`UprobeRegistry::on_step_complete`] at the step trap, on the same
/// thread, and drop it when that says [`StepOutcome::Done`].
///
/// It holds a read guard, so it cannot move to another thread (the step
/// trap comes on the thread that trapped):
///
/// ```compile_fail
/// use rcu_registry::probes::uprobe::UprobeStep;
/// use rcu_registry::rcu::Srcu;
/// fn send<T: Send>() {}
/// send::<UprobeStep<'static, Srcu>>();
/// ```
///
/// The same check without the `Send` bound compiles (so the one above fails
/// for that reason alone):
///
/// ```
/// use rcu_registry::probes::uprobe::UprobeStep;
/// use rcu_registry::rcu::Srcu;
/// fn any<T>() {}
/// any::<UprobeStep<'static, Srcu>>();
/// ```
pub struct UprobeStep<'r, F: Flavor + 'r> {
    _guard: F::Guard<'r>,
    /// The install record's plan, kept alive by `_guard`'s read section
    /// (an install is freed only after a grace period of the domain). A
    /// pointer, not a copy: the step travels in the live runtime's
    /// fixed-size per-thread stash.
    plan: NonNull<XolPlan>,
    state: StepState,
}

impl<F: Flavor> UprobeStep<'_, F> {
    /// The XOL plan being stepped.
    pub fn plan(&self) -> &XolPlan {
        // SAFETY: the read section `_guard` holds keeps the install record,
        // and so the plan, alive as long as `self`.
        unsafe { self.plan.as_ref() }
    }

    /// What the arch backend saved for the fixups.
    pub fn state(&self) -> &StepState {
        &self.state
    }
}

/// An owned reference to a live uprobe, taken with increment-unless-zero:
/// it can only be made while the uprobe is in the tree, never by
/// resurrecting one whose last reference is gone.
pub struct UprobeRef<F: Flavor>(EntryHandle<UprobeKey, Uprobe<F>, F>);

impl<F: Flavor> UprobeRef<F> {
    /// The uprobe's key.
    pub fn key(&self) -> UprobeKey {
        *self.0.key()
    }

    /// Whether the uprobe is still in the registry's tree.
    pub fn is_linked(&self) -> bool {
        self.0.is_linked()
    }

    /// Consumers on the uprobe as seen now (never 0 for a uprobe that was
    /// ever reachable: the last consumer leaves by removing the uprobe).
    pub fn consumers(&self) -> usize {
        let g = self.0.consumers.domain().read();
        slice(self.0.consumers.load(&g)).len()
    }

    /// Missed hits and returns (see [`UprobeRegistry::nmissed`]).
    pub fn nmissed(&self) -> u64 {
        self.0.nmissed()
    }
}

/// A resolved hit: the space's state, the key, the uprobe, the install.
pub(super) type Resolved<'g, S, F> = (&'g SpaceState<S, F>, UprobeKey, &'g Uprobe<F>, &'g Install);

/// Why a hit's lookups found no uprobe.
pub(super) enum Unresolved<'g, S: AddressSpace, F: Flavor> {
    /// Not a uprobe: no such space (`None`), or nothing of its own there.
    Missing(Option<&'g SpaceState<S, F>>),
    /// A lock-free lookup raced writers and could not confirm a miss.
    Busy,
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// The chain of lookups, inside `guard`. `Err(None)`: no such space;
    /// `Err(Some(st))`: not a uprobe of the space.
    #[inline]
    fn resolve<'g>(
        &self,
        guard: &'g F::Guard<'_>,
        space: SpaceId,
        vaddr: u64,
    ) -> Result<Resolved<'g, S, F>, Option<&'g SpaceState<S, F>>> {
        match self.resolve_with::<false>(guard, space, vaddr) {
            Ok(found) => Ok(found),
            Err(Unresolved::Missing(st)) => Err(st),
            // Lookups with the locked fallback always answer.
            Err(Unresolved::Busy) => Err(None),
        }
    }

    /// [`resolve`](Self::resolve), with lock-free tree lookups only when
    /// `TRAP` (the live trap path: a miss writers kept from being confirmed
    /// is `Busy`, never a wait for a writer lock).
    #[inline]
    pub(super) fn resolve_with<'g, const TRAP: bool>(
        &self,
        guard: &'g F::Guard<'_>,
        space: SpaceId,
        vaddr: u64,
    ) -> Result<Resolved<'g, S, F>, Unresolved<'g, S, F>> {
        let st = if TRAP {
            self.spaces
                .get_in_trap(guard, &space)
                .map_err(|_| Unresolved::Busy)?
        } else {
            self.spaces.get(guard, &space)
        };
        let st = &**st.ok_or(Unresolved::Missing(None))?;
        let miss = || Unresolved::Missing(Some(st));
        let maps = slice(st.maps.load(guard));
        // Mappings are sorted and disjoint: the candidate is the last one
        // starting at or below `vaddr`.
        let i = maps.partition_point(|m| m.vaddr.start <= vaddr);
        let offset = i
            .checked_sub(1)
            .and_then(|i| maps[i].offset_of(vaddr).map(|o| (maps[i].file, o)));
        let (file, offset) = offset.ok_or_else(miss)?;
        let key = UprobeKey { file, offset };
        let up = if TRAP {
            match self.hot.get(guard, &key) {
                Some(u) => Some(u),
                None => self
                    .uprobes
                    .get_in_trap(guard, &key)
                    .map_err(|_| Unresolved::Busy)?,
            }
        } else {
            self.uprobe_at(guard, &key)
        };
        let up = up.ok_or_else(miss)?;
        let install = up.placed_at(guard, space, vaddr).ok_or_else(miss)?;
        Ok((st, key, up, install))
    }

    /// Whether a breakpoint of this registry is installed at `vaddr` in
    /// `space`, as the live trap path may ask it: lock-free, no C library,
    /// `true` when a lookup raced writers and cannot tell.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn installed_in_trap(&self, space: SpaceId, vaddr: u64) -> bool {
        let guard = self.domain.read_in_trap();
        match self.spaces.get_in_trap(&guard, &space) {
            Ok(Some(st)) => !matches!(st.installs.get_in_trap(&guard, &vaddr), Ok(None)),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// The uprobe a breakpoint at `vaddr` in `space` belongs to, if any
    /// (the hit path's lookup, without running anything).
    pub fn find(&self, space: SpaceId, vaddr: u64) -> Option<UprobeKey> {
        let g = self.domain.read();
        self.resolve(&g, space, vaddr).ok().map(|(_, k, _, _)| k)
    }

    /// As [`find`](Self::find), pinning the uprobe with
    /// increment-unless-zero (see [`UprobeRef`]).
    pub fn find_ref(&self, space: SpaceId, vaddr: u64) -> Option<UprobeRef<F>> {
        let key = self.find(space, vaddr)?;
        self.uprobes.get_handle(&key).map(UprobeRef)
    }

    /// Handles a breakpoint trap in `space`. `regs` are the registers at the
    /// trap; `mem` reaches the thread's stack for emulation.
    ///
    /// Runs the consumers' handlers in registration order (those whose
    /// filter wants `space`, and that did not ask for removal) with
    /// `regs.ip` at the probed address, inside a read section of the
    /// domain (they may sleep with the default `Srcu`), hijacks the return
    /// address when a consumer has a return handler (see
    /// [`on_return`](Self::on_return)), then completes the displaced
    /// instruction or says how to.
    ///
    /// On a thread already running uprobe handlers, runs none (`nmissed`)
    /// and only completes the displaced instruction.
    pub fn on_breakpoint<'r>(
        &'r self,
        space: SpaceId,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> UprobeOutcome<'r, F> {
        // The hit path reads without arming the reader's release at thread
        // exit (see `Flavor::read_in_trap`); arm it here.
        self.domain.arm_reader();
        let vaddr = self.arch.trap_address(regs);
        self.hit::<false>(space, vaddr, regs, mem, true)
    }

    /// [`on_breakpoint`](Self::on_breakpoint) calling no C-library function
    /// and never waiting for a writer lock (the live runtime's trap path,
    /// which arms the reader itself where that is safe).
    #[inline]
    // Used by the live runtime only, which loom builds leave out.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn on_breakpoint_in_trap<'r>(
        &'r self,
        space: SpaceId,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> UprobeOutcome<'r, F> {
        let vaddr = self.arch.trap_address(regs);
        self.hit::<true>(space, vaddr, regs, mem, true)
    }

    /// [`on_breakpoint`](Self::on_breakpoint) at `vaddr`. A miss that still
    /// finds a breakpoint in the text looks again once (`second_look`): the
    /// uprobe the thread trapped on may have been removed and another
    /// consumer's registration installed a breakpoint at the same place
    /// between the trap and the lookup; an install is published before its
    /// breakpoint is written, so the second lookup finds it if it is ours.
    ///
    /// With `TRAP` (the live trap path) the lookups never wait for a writer
    /// lock: a miss that writers kept from being confirmed resumes at the
    /// probed address (`Vanished`), where the thread traps again if the
    /// breakpoint is still there.
    fn hit<'r, const TRAP: bool>(
        &'r self,
        space: SpaceId,
        vaddr: u64,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        second_look: bool,
    ) -> UprobeOutcome<'r, F> {
        let guard = self.domain.read_in_trap();
        let (st, key, up, install) = match self.resolve_with::<TRAP>(&guard, space, vaddr) {
            Ok(found) => found,
            Err(Unresolved::Busy) => {
                regs.ip = vaddr;
                return UprobeOutcome::Done(UprobeFinished::Vanished);
            }
            Err(Unresolved::Missing(st)) => {
                return match self.miss(st, vaddr, regs) {
                    Some(outcome) => UprobeOutcome::Done(outcome),
                    None if second_look => self.hit::<TRAP>(space, vaddr, regs, mem, false),
                    None => UprobeOutcome::Done(UprobeFinished::NotOurs),
                };
            }
        };
        regs.ip = vaddr;
        match UprobeScope::enter() {
            Some(_scope) => {
                let hit = UprobeHit { space, vaddr, key };
                let list = slice(up.consumers.load(&guard));
                let mut wants_return = false;
                for m in list {
                    let ran = m.run(&hit, regs);
                    if ran.action == ConsumerAction::SkipInstruction {
                        return UprobeOutcome::Done(UprobeFinished::Skipped);
                    }
                    wants_return |= ran.wants_return;
                }
                if wants_return {
                    let last_seq = list.last().map_or(0, |m| m.seq);
                    self.track_return(st, up, key, vaddr, last_seq, regs, mem);
                }
            }
            None => up.count_missed(),
        }
        // A jump optimizer has a detour for this install: the relocated
        // displaced instructions run there (`jump.rs`), never the ones in
        // the text, which it may be rewriting.
        let resume = up.jump_resume(vaddr);
        if resume != 0 {
            regs.ip = resume;
            return UprobeOutcome::Done(UprobeFinished::Detoured);
        }
        // The displaced instruction. The install record is read in place
        // (it lives as long as the guard): copying it out (about 300
        // bytes, a `memmove` call) showed as a tenth of a hit's time.
        let Some(plan) = &install.plan else {
            return UprobeOutcome::Done(match self.arch.emulate(&install.insn, regs, mem) {
                Ok(()) => UprobeFinished::Emulated,
                Err(e) => UprobeFinished::Failed(e),
            });
        };
        let plan = NonNull::from(plan);
        self.complete_out_of_line(plan, guard, regs)
    }

    /// Completes the displaced instruction from its XOL slot: boosted, or
    /// set up for a single-step that keeps `guard`.
    #[inline]
    fn complete_out_of_line<'r>(
        &'r self,
        plan_at: NonNull<XolPlan>,
        guard: F::Guard<'r>,
        regs: &mut Regs,
    ) -> UprobeOutcome<'r, F> {
        // SAFETY: `plan_at` points into an install record read under
        // `guard`'s read section, which is still open (the guard is here).
        let plan = unsafe { plan_at.as_ref() };
        if plan.boostable {
            // The plan is this registry's backend's own (made at install):
            // `boost`, without `prepare_step`'s per-call checks of that.
            return UprobeOutcome::Done(match self.arch.boost(plan, regs) {
                Ok(()) => UprobeFinished::Boosted {
                    slot: plan.slot_addr,
                },
                Err(e) => UprobeFinished::Failed(e),
            });
        }
        let state = match self.arch.prepare_step(plan, XolRun::SingleStep, regs) {
            Ok(s) => s,
            Err(e) => return UprobeOutcome::Done(UprobeFinished::Failed(e)),
        };
        UprobeOutcome::SingleStep(UprobeStep {
            _guard: guard,
            plan: plan_at,
            state,
        })
    }

    /// No uprobe: ours if the breakpoint is gone (removed after the trap);
    /// `None` if a breakpoint is still there (look again, see `hit`).
    #[cold]
    fn miss(
        &self,
        st: Option<&SpaceState<S, F>>,
        vaddr: u64,
        regs: &mut Regs,
    ) -> Option<UprobeFinished> {
        let Some(st) = st else {
            return Some(UprobeFinished::NotOurs);
        };
        let bp = self.arch.breakpoint();
        // Two words, not a byte array: a debug build zeroes a byte array with
        // a `memset` call, and the live trap path calls no C-library function.
        let mut words = [0u64; MAX_INSN_BYTES / 8];
        // SAFETY: `words` is MAX_INSN_BYTES bytes of plain integers; any byte
        // pattern is valid for both views.
        let buf: &mut [u8; MAX_INSN_BYTES] = unsafe { &mut *words.as_mut_ptr().cast() };
        let found = &mut buf[..bp.len()];
        match st.space.text().read(vaddr, found) {
            // Byte by byte: a slice comparison calls `memcmp`.
            Ok(()) if !found.iter().zip(bp).all(|(a, b)| a == b) => {
                regs.ip = vaddr;
                Some(UprobeFinished::Vanished)
            }
            Ok(()) => None,
            Err(e) => {
                // Not dropped: `ProbeError`'s drop glue can free a heap
                // variant (a read never builds one), and the live trap path
                // calls no C-library function, `free` included.
                std::mem::forget(e);
                Some(UprobeFinished::NotOurs)
            }
        }
    }

    /// Handles the step trap after [`UprobeOutcome::SingleStep`]: applies
    /// the arch fixups so `regs` look as if the instruction ran in place.
    /// On [`StepOutcome::Repeat`] resume with the step armed and call again
    /// with the same `step`; on `Done` drop it.
    ///
    /// # Errors
    /// What [`Arch::finish_step`] reports; `regs` are then unchanged.
    pub fn on_step_complete(
        &self,
        step: &UprobeStep<'_, F>,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> Result<StepOutcome, ProbeError> {
        self.arch.finish_step(step.plan(), &step.state, regs, mem)
    }
}
