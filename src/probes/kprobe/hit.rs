//! The hit path: what a trap handler calls, and what it is told to do next.
//!
//! # Signal safety
//!
//! [`on_breakpoint`](KprobeRegistry::on_breakpoint),
//! [`on_step_complete`](KprobeRegistry::on_step_complete) and
//! [`on_return`](KprobeRegistry::on_return) are written to run inside a
//! SIGTRAP handler: they allocate nothing, take no lock (the kretprobe paths
//! use the thread's own instance-table stripe, lock-free, or else take a
//! short spin lock, see `instances.rs`) and make no system call
//! (the arch backend's trap-context methods promise the same; a miss reads
//! the text memory once, whose `read` must then be signal-safe, as the
//! in-process one is: a plain copy). Lookups run under an `Rcu` read guard,
//! which is a thread-local store ([`Rcu::read_in_trap`](crate::rcu::Rcu):
//! a thread's first one claims its reader slot without calling the C
//! library). The live runtime's trap path calls no C-library function at
//! all, so this code must not either, nor drop a `ProbeError` (its drop
//! glue can reach `free`): `tests/runtime_refuse.rs` walks the machine
//! code to prove it.
//!
//! # Re-entrancy
//!
//! A per-thread flag (a `const` thread-local `Cell`: no lazy initialisation,
//! no destructor registration) is set while handlers run. A hit on a thread
//! whose flag is set (a handler called probed code) runs no handler: it
//! counts `nmissed` on the probes and completes the displaced instruction,
//! never recursing.
//!
//! **The flag goes up before any lock.** The kretprobe paths take a spin
//! lock (an instance-table stripe), and a signal handler may
//! interrupt the thread while it holds one and run probed code on the same
//! thread. Had that nested hit been allowed to run handlers, a kretprobe
//! entry would take the same stripe its own interrupted
//! frame holds, and spin forever. So every hit-path entry sets the flag
//! first and locks after: [`on_breakpoint`](KprobeRegistry::on_breakpoint)
//! runs kretprobe entries (a lock-free instance, then a stripe) only inside its
//! handler scope, and [`on_return`](KprobeRegistry::on_return) enters the
//! scope before it takes the stripe. A hit nested anywhere inside those
//! locks therefore finds the flag set and takes no lock at all. (A return
//! into the trampoline is never nested inside another return's locks: a call
//! made while the flag is set is not hijacked.) `instances.rs` asserts the
//! flag wherever the hit path takes a stripe, in debug builds.
//!
//! # Single-steps in flight
//!
//! A single-stepped hit leaves the read section when the trap handler
//! returns, but the thread still runs the XOL slot and will run the post
//! handlers at the step trap. That trap is either the hardware single-step
//! (x86 trap flag) or a breakpoint on the slot's step marker
//! ([`StepToken::step_marker`]): the caller tells the two apart from a probe
//! hit by the marker's address, which no probe ever has (slots are not
//! probed code), and hands the token to
//! [`on_step_complete`](KprobeRegistry::on_step_complete) either way. The [`StepToken`] it carries holds a count on
//! the member list it ran the pre handlers from (`Members::inflight`);
//! unregistration frees a retired list only after its grace period *and*
//! after that count dropped to zero. The token is `!Send` and borrows the
//! registry; dropping it without completing the step gives the count back.

use std::marker::PhantomData;
use std::ptr::NonNull;

use super::instances::Frame;
use super::kretprobe::ReturnProbe;
use super::probe::{Action, Handlers};
use super::registry::KprobeRegistry;
use super::table::{Members, Site};
use super::this_thread::{KprobeScope, ThisThread};
use crate::probes::arch::{
    Arch, DataMemory, Regs, StepOutcome, StepState, XolPlan, XolRun, MAX_INSN_BYTES,
};
use crate::probes::outcome::ReturnOutcome;
use crate::probes::text::TextMemory;
use crate::probes::ProbeError;
use crate::rcu::RcuGuard;
use crate::sync::atomic::{fence, Ordering};

/// Members with an index below this are tracked exactly (bit set) for
/// "ran its pre handler"; later ones are assumed to have run if enabled.
const TRACKED_MEMBERS: usize = u64::BITS as usize;

/// What the trap handler must do after [`KprobeRegistry::on_breakpoint`].
#[must_use = "the outcome says how to resume the thread"]
#[derive(Debug)]
pub enum HitOutcome<'r> {
    /// No probe of this registry is at the address and the breakpoint there
    /// is not ours: leave `regs` alone and chain to the previous handler.
    NotOurs,
    /// The probe was removed between the trap and the lookup (the original
    /// instruction is back): `regs.ip` now points at it; resume.
    Vanished,
    /// A pre handler changed `regs.ip` and asked to skip the displaced
    /// instruction: resume at `regs.ip`.
    Skipped,
    /// The displaced instruction was emulated on `regs` and memory, the post
    /// handlers ran: resume.
    Emulated,
    /// `regs.ip` points at the XOL slot, which jumps back by itself: resume
    /// (one trap, no post handler). The thread runs the slot after its trap
    /// handler has returned, in no read section and counted nowhere: an
    /// unregistration cannot wait for it, which is why a freed slot is only
    /// ever reused for the same address (the
    /// [reuse rule](crate::probes::xol::XolAllocator#reuse-rule)).
    Boosted {
        /// The slot's address.
        slot: u64,
    },
    /// `regs` are set up to single-step the XOL slot (IP at the slot's step
    /// entry, step armed: the trap flag set, or a step marker waiting at
    /// [`StepToken::step_marker`]): resume, and at the step trap (the
    /// trap-flag trap, or the breakpoint trap on the marker) call
    /// [`KprobeRegistry::on_step_complete`] with the token.
    SingleStep(StepToken<'r>),
    /// The displaced instruction could not be completed (emulation or step
    /// preparation failed, e.g. an unreadable stack): `regs` hold the state
    /// before it. The runtime decides (typically: deliver a fault).
    Failed(ProbeError),
}

/// A single-step in flight: hand it to
/// [`KprobeRegistry::on_step_complete`] at the step trap, on the same thread.
///
/// Dropping it without completing gives up the step (no fixup, no post
/// handler) and lets unregistration proceed.
///
/// It is not `Send`: the step trap comes on the thread that trapped, and the
/// token points into a member list only that thread's step keeps alive.
///
/// ```compile_fail
/// use rcu_registry::probes::kprobe::StepToken;
/// fn send<T: Send>() {}
/// send::<StepToken<'static>>();
/// ```
///
/// The same check without the `Send` bound compiles:
///
/// ```
/// use rcu_registry::probes::kprobe::StepToken;
/// fn any<T>() {}
/// any::<StepToken<'static>>();
/// ```
pub struct StepToken<'r> {
    members: NonNull<Members>,
    /// The parity of the site's post epoch this step is counted under, when
    /// it will run post handlers (`SiteExec::post_step_started`).
    post_epoch: Option<usize>,
    /// The list's length the pre handlers saw: members appended later ran
    /// no pre handler and get no post.
    len: usize,
    state: StepState,
    ran_pre: u64,
    run_post: bool,
    /// Borrows the registry; `NonNull` already makes the token `!Send`.
    _registry: PhantomData<&'r ()>,
}

impl StepToken<'_> {
    fn members(&self) -> &Members {
        // SAFETY: the token holds a count in `inflight`, and a retired list
        // is freed only once that count is zero.
        unsafe { self.members.as_ref() }
    }

    /// The XOL plan being stepped.
    pub fn plan(&self) -> &XolPlan {
        self.members()
            .exec
            .plan
            .as_ref()
            .expect("a step token is only made for a site with an XOL plan")
    }

    /// The slot's address.
    pub fn slot(&self) -> u64 {
        self.plan().slot_addr
    }

    /// Where the step ends on a breakpoint: the address of the slot's step
    /// marker, whose trap ([`Arch::trap_address`] equal to it) completes this
    /// step. `None` when the step ends on the hardware single-step trap.
    #[inline]
    pub fn step_marker(&self) -> Option<u64> {
        self.plan().step_marker
    }

    /// What the arch backend saved for the step's fixups.
    pub fn state(&self) -> &StepState {
        &self.state
    }
}

impl Drop for StepToken<'_> {
    fn drop(&mut self) {
        if let Some(parity) = self.post_epoch {
            // Before the list's count: once that is zero the list (and with
            // the site's last list, the exec) may be freed.
            self.members().exec.post_step_done(parity);
        }
        // Release pairs with the reaper's Acquire load in `wait_for_steps`:
        // the post handlers and fixups this token ran happen-before the list
        // is freed. Nothing touches the list after this.
        self.members().inflight.fetch_sub(1, Ordering::Release);
    }
}

impl std::fmt::Debug for StepToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepToken")
            .field("slot", &format_args!("{:#x}", self.slot()))
            .field("run_post", &self.run_post)
            .finish_non_exhaustive()
    }
}

/// Result of [`KprobeRegistry::on_step_complete`].
#[must_use = "the result says how to resume the thread"]
#[derive(Debug)]
pub enum StepResult<'r> {
    /// Fixups applied, post handlers ran: resume at `regs.ip`.
    Done,
    /// The instruction is not finished (an x86 `rep` iteration): resume with
    /// the step still armed and call again with this token at the next trap.
    Repeat(StepToken<'r>),
    /// A fixup failed; `regs` are unchanged. The runtime decides.
    Failed(ProbeError),
}

/// Runs the post handlers of the members below `len` whose pre handlers
/// ran (`mask`), also of members removed since: a removed probe with a
/// post handler keeps its pointer, marked, and the commit waits for the
/// steps that ran its pre handler (`table.rs`, "wait for post handlers").
/// A marked slot is dereferenced only through a set bit of `mask`: the
/// probe behind one whose pre handler this step did not run may have been
/// given back already.
///
/// Members from index [`TRACKED_MEMBERS`] on are not tracked: their post
/// handlers run if they are still members (not removed) and enabled, so a
/// member that far along removed while the step is in flight loses the
/// post handler of a pre handler that ran.
///
/// The caller is in a read section (for members cleared since: one still
/// seen began before the grace period their removal waits for ended) and,
/// for a single-step, holds a count in the list's `inflight` and, if
/// `mask` has bits set, in the site's post epoch.
fn run_posts(members: &Members, len: usize, mask: u64, regs: &mut Regs) {
    for i in 0..len {
        let p = if i < TRACKED_MEMBERS {
            if mask & (1 << i) == 0 {
                continue;
            }
            // SAFETY: this step ran the member's pre handler (bit set), so
            // the caller's contract above is `get_for_post`'s.
            unsafe { members.get_for_post(i) }
        } else {
            members.get(i).filter(|p| p.is_enabled())
        };
        if let Some(p) = p {
            p.run_post(regs);
        }
    }
}

impl<A: Arch, T: TextMemory> KprobeRegistry<A, T> {
    /// Handles a breakpoint trap. `regs` are the registers at the trap (the
    /// trap address is [`Arch::trap_address`]); `mem` reaches the thread's
    /// stack for emulation and return hijacks.
    ///
    /// Looks the address up lock-free under an `Rcu` read guard, runs the
    /// enabled probes' pre handlers in registration order (or counts them
    /// missed on a re-entered hit) with `regs.ip` set to the probed address,
    /// then completes the displaced instruction or says how to. See
    /// [`HitOutcome`]. Async-signal-safe (see the module docs).
    pub fn on_breakpoint<'r>(
        &'r self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> HitOutcome<'r> {
        // The hit path reads without arming the reader slot's release at
        // thread exit (see `Rcu::read_in_trap`); arm it here.
        crate::rcu::Rcu::arm_reader();
        self.on_breakpoint_in_trap(regs, mem)
    }

    /// [`on_breakpoint`](Self::on_breakpoint) calling no C-library function
    /// (for the live runtime's trap path, which arms the thread's reader
    /// slot itself where calling the C library is safe). The hit itself is
    /// inlined into the caller (the live dispatcher): one call less on every
    /// trap; a miss goes out of line ([`miss`](Self::miss)).
    #[inline(always)]
    pub(crate) fn on_breakpoint_in_trap<'r>(
        &'r self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> HitOutcome<'r> {
        let addr = self.arch.trap_address(regs);
        let guard = self.rcu.read_in_trap();
        match self.table.lookup(addr, &guard) {
            Some(site) => self.hit(site, addr, &guard, regs, mem),
            None => {
                drop(guard);
                self.miss(addr, regs, mem)
            }
        }
    }

    /// [`on_breakpoint_in_trap`](Self::on_breakpoint_in_trap) inside the
    /// caller's read section `guard`, without one of its own: the live
    /// runtime's trap path holds one already (for its dispatcher table),
    /// and every `Rcu` domain shares the readers, so that section protects
    /// this registry's structures as the registry's own would
    /// (`Flavor::protects`). A nested section cost an emulated arm64 hit
    /// two thread-local accesses and a dozen instructions each way.
    ///
    /// The outcome goes to `then` (with the registers), called on the hit's
    /// and on the miss's path each: inlined in each, the caller's match on
    /// the outcome meets every `return` of the hit directly, where one
    /// outcome joined from both paths went through memory and was decoded
    /// again (a dozen instructions of an emulated arm64 hit).
    #[inline(always)]
    // Called by the live runtime only (Linux, not under loom).
    #[cfg_attr(not(all(target_os = "linux", not(loom))), allow(dead_code))]
    pub(crate) fn on_breakpoint_in_section<'r, R>(
        &'r self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        guard: &RcuGuard<'_>,
        then: impl FnOnce(HitOutcome<'r>, &mut Regs) -> R,
    ) -> R {
        let addr = self.arch.trap_address(regs);
        match self.table.lookup(addr, guard) {
            Some(site) => {
                let outcome = self.hit(site, addr, guard, regs, mem);
                then(outcome, regs)
            }
            // Inside the caller's section still: the miss reads the text
            // and looks again in a section of its own, nested.
            None => {
                let outcome = self.miss(addr, regs, mem);
                then(outcome, regs)
            }
        }
    }

    /// A kretprobe's entry on a trap hit: [`track_call`](Self::track_call)
    /// out of line: inlined in `hit`, its loads were hoisted onto every
    /// hit, kretprobe or not (a dozen instructions of an emulated arm64
    /// hit). Called only by a hit that raised the kprobe family's handler
    /// flag itself, which a nested trap never does: the refusal walk stops
    /// here (`runtime/callgraph/flag_up.rs`), so the C library it calls
    /// (arming the thread-exit flush: `pthread_setspecific`) stays
    /// probeable. Keep the name in step with that list.
    #[inline(never)]
    fn return_entry(
        &self,
        r: &dyn ReturnProbe,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        me: ThisThread,
    ) {
        self.track_call(r, regs, mem, me);
    }

    /// A kretprobe's entry: an instance from the kretprobe (which runs its
    /// entry handler), the return address replaced by the trampoline's, and
    /// the instance filed under the calling thread `me`, whose handler flag
    /// is up. Done here, where the
    /// architecture is a concrete type (and the memory too, on the jump
    /// path, once inlined), not inside the kretprobe's trait object: its
    /// calls through `dyn Arch` and `dyn DataMemory` and their large
    /// `Result`s were a fifth of an optimized kretprobe entry's
    /// instructions.
    #[inline(always)]
    pub(super) fn track_call(
        &self,
        r: &dyn ReturnProbe,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        me: ThisThread,
    ) {
        let Some(inst) = r.begin(regs) else { return };
        let ret_sp = self.arch.stack_pointer_at_return(regs);
        let trampoline = self.trampoline.unwrap_or(0);
        match self.arch.hijack_return(regs, mem, trampoline) {
            // SAFETY: `begin` handed the instance to us, out of its pool and
            // in no chain; filing hands it to the table.
            Ok(real_ret) => unsafe {
                inst.as_ref().set_frame(Frame {
                    thread: me.key(),
                    ret_sp,
                    real_ret,
                });
                self.instances.file(me, inst);
            },
            // The return address is unreadable: the call cannot be tracked.
            // SAFETY: from `begin`, never filed.
            Err(_) => unsafe { r.abandon(inst) },
        }
    }

    /// After a lookup at `addr` missed: a breakpoint removed since the trap
    /// ([`HitOutcome::Vanished`]), someone else's, or ours after all. A
    /// miss that still finds a breakpoint in the text looks once more: the
    /// probe the thread trapped on may have been removed and another one
    /// registered at the address between the trap and the lookup. A site is
    /// published before its breakpoint is written, so the second lookup,
    /// made after seeing the breakpoint, finds it if it is ours.
    #[cold]
    #[inline(never)]
    fn miss<'r>(&'r self, addr: u64, regs: &mut Regs, mem: &mut dyn DataMemory) -> HitOutcome<'r> {
        if !self.breakpoint_at(addr) {
            // Removed after the trap: the original instruction is back.
            regs.ip = addr;
            return HitOutcome::Vanished;
        }
        let guard = self.rcu.read_in_trap();
        if let Some(site) = self.table.lookup(addr, &guard) {
            return self.hit(site, addr, &guard, regs, mem);
        }
        drop(guard);
        if !self.breakpoint_at(addr) {
            regs.ip = addr;
            return HitOutcome::Vanished;
        }
        HitOutcome::NotOurs
    }

    /// A hit on `site`, found at `addr` in the read section `guard`.
    #[inline(always)]
    fn hit<'r>(
        &'r self,
        site: &Site,
        addr: u64,
        guard: &RcuGuard<'_>,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> HitOutcome<'r> {
        let members = site.members(guard);
        // Before any slot: a removal marked before the epoch read is seen
        // below (`SiteExec::epoch_relaxed`).
        let epoch = members.exec.epoch_relaxed();
        // One length for the whole hit: the pre handlers, the mask and the
        // posts agree on which members exist.
        let len = members.len_relaxed();
        // Acquire: one fence for the two loads above, before any slot is
        // read. It pairs with the Release store of the epoch in
        // `bump_epoch` (the removals marked before it) and with the Release
        // store of the length in `Members::push` (the slots below it); see
        // `SiteExec::epoch_relaxed` for why a fence.
        fence(Ordering::Acquire);
        regs.ip = addr;
        let me = ThisThread::get();
        let scope = me.enter_handlers();
        let mut mask = 0u64;
        let mut any_post = false;
        if scope.is_some() {
            for i in 0..len {
                let Some(p) = members.get(i) else { continue };
                if !p.is_enabled() {
                    continue;
                }
                p.count_hit();
                if i < TRACKED_MEMBERS {
                    mask |= 1 << i;
                }
                any_post |= p.has_post();
                let action = match &p.inner.handlers {
                    Handlers::Plain { .. } => p.run_pre(regs),
                    Handlers::Return(r) => {
                        self.return_entry(&**r, regs, mem, me);
                        Action::Continue
                    }
                };
                if action == Action::SkipInstruction {
                    return HitOutcome::Skipped;
                }
            }
        } else {
            for i in 0..len {
                match members.get(i) {
                    Some(p) if p.is_enabled() => p.count_missed(),
                    _ => {}
                }
            }
        }
        let run_post = scope.is_some() && any_post;
        // The handlers have run: the flag goes down before the displaced
        // instruction is completed, which runs no handler, takes no lock
        // and touches no per-thread state (post handlers raise it again:
        // an emulated hit's below, a step's at the step trap). Dropped
        // here, not at each return below,
        // each return reaches the trap path's own match directly: joined
        // behind the drop, the outcome went through memory and was
        // decoded again (a dozen instructions of an emulated arm64 hit).
        drop(scope);
        let exec = &*members.exec;
        if !run_post {
            // Relaxed, then an acquire fence only for a detour found: the
            // fence pairs with the Release store in `set_detour` (the
            // detour's bytes were written before its address). Most sites
            // have none (arm64 never has one), and their hits then pay no
            // barrier (under qemu-user an acquire load is a locked host
            // instruction; the fence's load-load ordering is not).
            let detour = exec.detour.load(Ordering::Relaxed);
            if detour != 0 {
                fence(Ordering::Acquire);
                // The displaced instructions run from the site's jump
                // detour, which jumps back past them by itself: no trap hit
                // resumes inside bytes the optimizer rewrites. A fault there
                // is reported at `addr`, as for a boosted slot.
                regs.ip = detour;
                return HitOutcome::Boosted { slot: detour };
            }
        }
        let Some(plan) = exec.plan.as_ref() else {
            if let Err(e) = self.arch.emulate(&exec.insn, regs, mem) {
                return HitOutcome::Failed(e);
            }
            // The post handlers under the flag again, as at a step trap
            // (`run_post` says this hit held it: it is free now).
            if run_post {
                if let Some(_scope) = KprobeScope::enter() {
                    run_posts(members, len, mask, regs);
                }
            }
            return HitOutcome::Emulated;
        };
        if plan.boostable && !run_post {
            // The plan is this registry's backend's own (made at
            // registration): `boost`, without `prepare_step`'s per-call
            // checks of that.
            if let Err(e) = self.arch.boost(plan, regs) {
                return HitOutcome::Failed(e);
            }
            return HitOutcome::Boosted {
                slot: plan.slot_addr,
            };
        }
        let state = match self.arch.prepare_step(plan, XolRun::SingleStep, regs) {
            Ok(s) => s,
            Err(e) => return HitOutcome::Failed(e),
        };
        // Relaxed: the increment happens inside the read section, and the
        // grace period an unregistration waits for orders every access of
        // the section before the reaper's load.
        members.inflight.fetch_add(1, Ordering::Relaxed);
        // Counted only if it will run post handlers: what the commit of a
        // removed member's post handler waits for.
        let post_epoch = run_post.then(|| exec.post_step_started(epoch));
        HitOutcome::SingleStep(StepToken {
            members: NonNull::from(members),
            post_epoch,
            len,
            state,
            ran_pre: mask,
            run_post,
            _registry: PhantomData,
        })
    }

    /// After a lookup missed: whether a breakpoint is still at `addr` (an
    /// unreadable address counts as one: the trap is then not ours).
    #[cold]
    fn breakpoint_at(&self, addr: u64) -> bool {
        let bp = self.arch.breakpoint();
        // Two words, not a byte array: a debug build zeroes a byte array
        // with a `memset` call, and the live trap path calls no C-library
        // function.
        let mut words = [0u64; MAX_INSN_BYTES / 8];
        // SAFETY: `words` is MAX_INSN_BYTES bytes of plain integers; any
        // byte pattern is valid for both views.
        let buf: &mut [u8; MAX_INSN_BYTES] = unsafe { &mut *words.as_mut_ptr().cast() };
        let found = &mut buf[..bp.len()];
        match self.text.read(addr, found) {
            // Byte by byte: a slice comparison calls `memcmp`.
            Ok(()) => found.iter().zip(bp).all(|(a, b)| a == b),
            Err(e) => {
                // Not dropped: `ProbeError`'s drop glue can free a heap
                // variant (a read never builds one), and the trap path calls
                // no C-library function, `free` included.
                std::mem::forget(e);
                true
            }
        }
    }

    /// Handles the step trap after [`HitOutcome::SingleStep`] (the
    /// trap-flag trap, or the breakpoint trap on the token's
    /// [step marker](StepToken::step_marker), with `regs` as that trap
    /// reports them): applies the arch fixups (IP back into the original
    /// code, scratch register, return address) and runs the post handlers of
    /// the probes whose pre handlers ran. Async-signal-safe. Takes no read
    /// guard for the fixups: the token keeps the member list alive; the posts
    /// run in one (see `run_posts`).
    pub fn on_step_complete<'r>(
        &'r self,
        token: StepToken<'r>,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
    ) -> StepResult<'r> {
        match self.arch.finish_step(token.plan(), &token.state, regs, mem) {
            Ok(StepOutcome::Repeat) => StepResult::Repeat(token),
            Ok(StepOutcome::Done) => {
                if token.run_post {
                    if let Some(_scope) = KprobeScope::enter() {
                        // A read section: the members are borrowed pointers
                        // whose removal is covered by a grace period (see
                        // `run_posts`). Async-signal-safe (a thread-local
                        // store).
                        let _guard = self.rcu.read_in_trap();
                        run_posts(token.members(), token.len, token.ran_pre, regs);
                    }
                }
                drop(token);
                StepResult::Done
            }
            Err(e) => StepResult::Failed(e),
        }
    }

    /// Handles a return into the trampoline: `regs` as the function returned
    /// (stack pointer past the return address). Finds this thread's
    /// kretprobe instances for this stack pointer, runs their return
    /// handlers (newest first) with the return value, gives the instances
    /// back, reclaims instances of abandoned deeper frames, and sets
    /// `regs.ip` to the real return address.
    ///
    /// Runs no handler of an unregistered kretprobe (the return address is
    /// still restored) and none on a thread already running a handler
    /// (`nmissed`). Allocates nothing, makes no system call; takes the
    /// thread's instance-table stripe (its own: no lock; the pools are
    /// lock-free), and
    /// only once the thread's re-entrancy flag is up (module docs).
    pub fn on_return(&self, regs: &mut Regs) -> ReturnOutcome {
        let guard = self.rcu.read();
        self.on_return_in_section(regs, &guard)
    }

    /// [`on_return`](Self::on_return) inside the caller's read section
    /// `_guard`, without one of its own: the live runtime's return path
    /// holds one already (for its dispatcher table), and every `Rcu` domain
    /// shares the readers (see
    /// [`on_breakpoint_in_section`](Self::on_breakpoint_in_section)).
    #[inline(always)]
    pub(crate) fn on_return_in_section(
        &self,
        regs: &mut Regs,
        _guard: &RcuGuard<'_>,
    ) -> ReturnOutcome {
        let Some(trampoline) = self.trampoline else {
            return ReturnOutcome::NotOurs;
        };
        let me = ThisThread::get();
        // A thread with nothing filed here (a uretprobe's return, asked of
        // every dispatcher, or another registry's) is answered with one
        // thread-local access and a few loads (`instances.rs`).
        let Some(filed) = self.instances.filed(me) else {
            return ReturnOutcome::NotOurs;
        };
        // Before any lock: a signal handler that runs probed code while this
        // thread holds the stripe below must see the flag and stay away from
        // the kretprobe locks (module docs, "Re-entrancy").
        let scope = me.enter_handlers();
        let run_handlers = scope.is_some();
        let sp = regs.sp;
        let mut taken = self.instances.take_returning(me, sp, filed);
        if taken.is_empty() {
            return ReturnOutcome::NotOurs;
        }
        let retval = self.arch.return_value(regs);
        let mut real = None;
        while let Some((inst, frame)) = taken.pop() {
            // SAFETY: a taken instance is ours and out of its pool, so its
            // owner lives until we put it back (inside the calls below).
            let owner = unsafe { inst.as_ref().owner() };
            if frame.ret_sp == sp {
                // Newest first: the last assignment is the oldest hijack's,
                // which saved the caller's address (later kretprobes on the
                // same function saved the trampoline).
                if frame.real_ret != trampoline {
                    real = Some(frame.real_ret);
                }
                // SAFETY: as above; not used after this call.
                unsafe { owner.on_return(inst, regs, retval, run_handlers) };
            } else {
                // A deeper frame the thread left without returning.
                // SAFETY: as above.
                unsafe { owner.recycle(inst) };
            }
        }
        match real {
            Some(to) => {
                regs.ip = to;
                ReturnOutcome::Returned { to }
            }
            // Every matching instance had saved the trampoline itself: no
            // caller address was ever recorded (cannot happen through
            // `hijack_return` at a real call).
            None => ReturnOutcome::NotOurs,
        }
    }
}
