//! Jump-optimized kprobes and live uprobes (x86_64, this process): a hit
//! without a trap.
//!
//! A registered kprobe or uprobe is an `int3`: every hit costs a SIGTRAP
//! and an `rt_sigreturn`, microseconds. The [`JumpOptimizer`] replaces the
//! `int3` and the bytes after it with a `jmp rel32` to a per-site *detour*
//! (`jump/detour.rs`) that saves the registers, runs the same hit path
//! (`kprobe/jump.rs`, `uprobe/jump.rs`), restores them, runs the displaced
//! instructions relocated and jumps back: tens of nanoseconds.
//!
//! # One optimizer, two registries
//!
//! The kprobe registry ([`Live`](super::Live)) and the live uprobes
//! ([`LiveUprobes`](super::uprobes::LiveUprobes)) each have an optimizer of
//! this one implementation, which sees its registry through
//! `jump/sites.rs`'s `JumpSites`: the candidates (a uprobe's: each mapped
//! install), the function extents, the original text, the grace period,
//! the text, and the detour's hit path (the slot names the registry). What
//! "the registry's writer mutex" means below: for kprobes that mutex, held
//! by the pass throughout; for uprobes, which have a lock per file rather
//! than one writer, a pass lock of the runtime's (one pass at a time) and
//! the optimizer's own state lock, which every uprobe writer takes in the
//! hook before it touches text. The pass releases the state lock across
//! its grace periods and quiescence waits (steps 3 and 4, the reclaim): a
//! uprobe writer waits in the hook with a file's stripe held, and the
//! dynamic linker's thread may wait for a stripe inside a read section, so
//! no stripe holder may wait for a grace period. The batch's sites are
//! *pending* meanwhile: a hook that meets one takes it back (its resume
//! cell cleared, its detour retired) and the pass leaves it alone; before
//! step 5 the pass checks, locked again, that the site still has its
//! `int3`. A uprobe writer that restores original bytes keeps the state
//! lock from its hook until they are written (`to_trap_path_held`): a pass
//! that collected the site before the hook could otherwise mark it pending
//! after it, pass that check and write its tail or `jmp` before the
//! restore (found by `loom-tests/tests/uprobe_jump_pass.rs`). The shared pieces the two registries give the optimizer (the
//! hook, the candidate, the resume cell) are `probes/jump_sites.rs`.
//!
//! # When a site is optimized
//!
//! When [`optimize_now`](JumpOptimizer::optimize_now) is called
//! ([`Live::optimize_now`](super::Live::optimize_now)): explicit and
//! batched, for tests and benchmarks; or, once
//! [`start_background`](JumpOptimizer::start_background) was called, by a
//! thread that runs the same pass at most every [`OPTIMIZE_DELAY`] (or the
//! period given) when there is something to do (`jump/background.rs`). A
//! site is a candidate when it is armed, no member has a post
//! handler or opted out ([`Kprobe::set_jump_opt_out`]), and optimization
//! is on ([`JumpOptimizer::set_enabled`]). It is optimized only if
//! [`analyze_jump_site`] accepts it (whole instructions, no branch into the
//! displaced bytes, no indirect jump in the function, relocatable), the
//! displaced bytes hold no other probe and touch no refused range, and a
//! detour slot is within reach. Otherwise the probe keeps its `int3`, and
//! [`refusal`](JumpOptimizer::refusal) tells why ([`JumpRefusal`]).
//!
//! # Optimizing a batch
//!
//! With the registry's writer mutex held throughout:
//!
//! 1. each accepted site's detour is written (relocated instructions for
//!    the detour's address, jump back, slot and stub words);
//! 2. each site's trap hits are pointed at the detour (`DetourCell`): a hit
//!    on the `int3` runs its pre handlers and resumes in the detour, never
//!    inside the displaced bytes;
//! 3. a grace period: every trap hit that chose the old way (the XOL slot or
//!    the emulation, which resume *inside* the displaced bytes when there
//!    are several instructions) has been sent on its way;
//! 4. one quiescence wait (`quiesce.rs`) over every site's displaced bytes
//!    after its first and every site's XOL slot: every thread is seen
//!    outside them (or exited), with no signal handler that may hide an
//!    interrupted IP inside. No thread can enter them afterwards: no branch
//!    lands inside (the analysis), trap hits go to the detour (2). Without
//!    a proof the whole batch is refused ([`JumpRefusal::NotQuiescent`]);
//! 5. the tail bytes (the `jmp`'s displacement) are written while the
//!    `int3` still guards the first byte; every core is synced
//!    (`membarrier` SYNC_CORE, `in_process.rs`);
//! 6. the slots' state goes live; then the first byte becomes `e9`; cores
//!    synced again.
//!
//! # Back to the trap path
//!
//! [`to_trap_path`](JumpHook::to_trap_path), the registry's hook, called
//! with its writer mutex held before it restores the original first byte
//! (unregistration, disable), decodes a function with an optimized site in
//! it (a registration), or adds a member with a post handler or an opt-out:
//!
//! 1. `int3` over the `e9`, cores synced: new hits trap, and the trap path
//!    sends them to the detour (the `DetourCell` is still set);
//! 2. the slot's state goes off: a hit already in the detour's stub but not
//!    yet in its read section redirects to the `int3` (nothing ran);
//! 3. for a post handler only: a grace period, so no hit that saw the state
//!    live is still running pre handlers when the member appears;
//! 4. the original tail, cores synced (no thread is inside the displaced
//!    bytes: trap hits still go to the detour);
//! 5. the `DetourCell` is cleared: trap hits complete the first instruction
//!    themselves again, resuming inside bytes that are the originals.
//!
//! # Freeing a detour
//!
//! A detour left by step 5 may still be running (a thread preempted in it,
//! or on its way back into it from the stub). [`reclaim`](JumpOptimizer::reclaim)
//! (run at the start of every `optimize_now`) waits a grace period (every
//! trap hit that read the old `DetourCell` has been sent), then one
//! quiescence wait over the detours, the shared stub and the Rust half's own
//! code (`jump_entry`, `entering`, extents from the symbol table): a thread
//! between its read section and the `ret` into a detour is in one of them.
//! A thread still inside the read section saw the state off and will not
//! return into the detour. Only a proving wait lets the detour area
//! recycle the slot; otherwise (or when the symbols are missing) it is
//! parked for the same address (`xol.rs`'s reuse rule: refilled only with
//! the same bytes, as the same leaked `JumpSlot` and the same analysis
//! give).
//!
//! # Limits
//!
//! - A thread the quiescence wait cannot observe (blocking the signal,
//!   inside another handler) keeps the batch on the trap path.
//! - The argument for freeing assumes the read guard's release is inlined
//!   into `entering` (the registry's hit path is `#[inline]`); in a debug
//!   build it may be a call, and a thread preempted inside that call after
//!   the release could be missed by the wait.
//! - `fork()`: detours live in their own [`XolArea`], whose chunks the
//!   `fork` handlers copy for the child like every XOL chunk; every detour
//!   write and every optimizer state change happens under the registry's
//!   writer mutex, which the handlers hold across the fork (for the live
//!   uprobes: the pass lock, then the state lock, which their hook takes
//!   alone; `fork.rs`), so a fork waits for a pass under way and the child
//!   finds both free (`tests/runtime_jump_uprobes.rs` forks during a
//!   paused uprobe pass).
//! - The refused ranges (`refuse.rs`) do not list the stubs and the Rust
//!   half yet: a kprobe on them takes the trap path, which serves it, but
//!   it is not refused.
//! - Uprobes: a uprobe's trap hits have one resume cell, so one install
//!   per uprobe is optimized (`JumpRefusal::SharedUprobe`); a cell cleared
//!   is pointed at another address only after a grace period (a pass
//!   forgets its stale sites before its reclaim's grace period). A
//!   function with another registry's breakpoint in it is refused
//!   (`OtherProbeInside`): it would decode as other code.

mod background;
pub(crate) mod detour;
pub(crate) mod sites;
pub(crate) mod stubs;

pub use background::OPTIMIZE_DELAY;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use self::detour::{detour_bytes, jump_to, JumpSlot, DETOUR_BYTES, RELOCATED_AT};
use self::sites::{JumpSites, JumpView};
use self::stubs::Stub;
use super::in_process::sync_cores;
use super::quiesce::{quiesce, QUIESCE_TIMEOUT};
use super::symbols::ProcessSymbols;
use super::xol::{XolArea, XolStats};
use crate::probes::arch::x86_64::jump::{
    analyze_jump_site, JumpRefusal, JumpSite, JUMP_LEN, MAX_DISPLACED,
};
use crate::probes::jump_sites::{DetourCell, JumpCandidate, JumpHold, JumpHook};
use crate::probes::resolve::SymbolResolver;
use crate::probes::text::{TextIdentity, TextMemory};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::Mutex;

#[allow(unused_imports)]
use crate::probes::kprobe::Kprobe;

/// One optimized site.
#[derive(Debug)]
struct Optimized {
    site: JumpSite,
    detour: u64,
    slot: &'static JumpSlot,
    text_id: TextIdentity,
    cell: DetourCell,
}

#[derive(Debug, Default)]
struct State {
    optimized: BTreeMap<u64, Optimized>,
    /// One leaked slot per address ever optimized (module docs).
    slots: HashMap<u64, &'static JumpSlot>,
    /// Detours no longer jumped to, waiting for [`JumpOptimizer::reclaim`].
    retired: Vec<u64>,
    /// Why the last pass left a site on the trap path.
    refusals: BTreeMap<u64, JumpRefusal>,
    /// Sites of the pass under way between steps 2 and 5 (their detours
    /// written, their trap hits sent there, the state unlocked for the
    /// waits); the hook takes them back.
    pending: BTreeMap<u64, Pending>,
}

/// The optimizer's state lock, held across a `fork`
/// ([`JumpOptimizer::hold_state_for_fork`]); dropped in the parent and
/// the child alike.
pub(crate) struct StateHold<'a>(#[allow(dead_code)] std::sync::MutexGuard<'a, State>);

/// A site of the pass under way, between steps 2 and 5.
#[derive(Debug)]
struct Pending {
    displaced: Range<u64>,
    detour: u64,
    cell: DetourCell,
}

/// A site accepted by a pass, with its detour and slot.
type Ready = (JumpCandidate, JumpSite, u64, &'static JumpSlot);

/// What one [`JumpOptimizer::optimize_now`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JumpReport {
    /// Sites optimized by this pass.
    pub optimized: usize,
    /// Sites optimized before and still optimized.
    pub already: usize,
    /// Sites left on the trap path, and why.
    pub refused: Vec<(u64, JumpRefusal)>,
    /// Retired detours freed by the pass's reclaim.
    pub reclaimed: usize,
    /// Of those, freed with a quiescence proof (recyclable for any site).
    pub reclaimed_proven: usize,
}

/// The jump optimizer of one live registry (module docs): the kprobe
/// registry's ([`Live::jump_optimizer`](super::Live::jump_optimizer)) or
/// the live uprobes'
/// ([`LiveUprobes::jump_optimizer`](super::uprobes::LiveUprobes::jump_optimizer)).
pub struct JumpOptimizer {
    enabled: AtomicBool,
    registry: OnceLock<&'static dyn JumpSites>,
    symbols: OnceLock<ProcessSymbols>,
    detours: XolArea,
    state: Mutex<State>,
    /// The background pass's thread, if started (`jump/background.rs`).
    background: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: AtomicBool,
}

impl std::fmt::Debug for JumpOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JumpOptimizer")
            .field("enabled", &self.is_enabled())
            .finish_non_exhaustive()
    }
}

impl JumpOptimizer {
    /// An optimizer not yet bound to its registry.
    pub(crate) fn new() -> Arc<JumpOptimizer> {
        stubs::detect_vector_width();
        Arc::new(JumpOptimizer {
            enabled: AtomicBool::new(true),
            registry: OnceLock::new(),
            symbols: OnceLock::new(),
            detours: XolArea::new(DETOUR_BYTES),
            state: Mutex::new(State::default()),
            background: Mutex::new(None),
            stop: AtomicBool::new(false),
        })
    }

    /// Binds the registry (once, after it is leaked) and the symbols the
    /// Rust half's extents are looked up in.
    pub(crate) fn bind(&self, registry: &'static dyn JumpSites, symbols: ProcessSymbols) {
        let _ = self.registry.set(registry);
        let _ = self.symbols.set(symbols);
    }

    fn registry(&self) -> &'static dyn JumpSites {
        *self
            .registry
            .get()
            .expect("a live registry binds its optimizer")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the state lock for the `fork` handlers (`fork.rs`): the live
    /// uprobes' hook takes it without the pass lock, so holding the pass
    /// lock alone does not keep it free at the fork.
    pub(crate) fn hold_state_for_fork(&self) -> StateHold<'_> {
        StateHold(self.lock())
    }

    /// Whether optimization is on (the global opt-out).
    pub fn is_enabled(&self) -> bool {
        // Relaxed: a setting read by writers under the registry's mutex.
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns optimization on or off. Off puts every optimized site back on
    /// the trap path before returning.
    pub fn set_enabled(&self, on: bool) {
        // Relaxed: see `is_enabled`.
        self.enabled.store(on, Ordering::Relaxed);
        if !on {
            self.registry()
                .with_writer(&mut |_| self.to_trap_path(0..u64::MAX, false));
        }
    }

    /// The state, under the registry's writer mutex first: every state
    /// change happens under both (the lock order, and what the `fork`
    /// handlers rely on: they hold the writer mutex, so no thread holds the
    /// state's mutex at a fork).
    fn read_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let mut f = Some(f);
        let mut out = None;
        self.registry().with_writer(&mut |_| {
            if let Some(f) = f.take() {
                out = Some(f(&self.lock()));
            }
        });
        out.expect("with_writer runs its closure")
    }

    /// Runs `f` with the registry's view and the state locked (in that
    /// order: see `read_state`).
    fn with_state<R>(&self, f: impl FnOnce(&dyn JumpView, &mut State) -> R) -> R {
        let mut f = Some(f);
        let mut out = None;
        self.registry().with_writer(&mut |view| {
            if let Some(f) = f.take() {
                out = Some(f(view, &mut self.lock()));
            }
        });
        out.expect("with_writer runs its closure")
    }

    /// Whether the site at `addr` is optimized now. Takes the registry's
    /// writer mutex (as every method here does): never from a probe
    /// handler, whose read section a pass holding the mutex may wait for.
    /// A site whose text went away (and was perhaps mapped again, not
    /// holding its `jmp`) is not, though the next pass has yet to forget it.
    pub fn is_optimized(&self, addr: u64) -> bool {
        self.read_state(|st| st.optimized.get(&addr).is_some_and(|o| self.holds_jump(o)))
    }

    /// Whether the text at `o`'s site holds its `jmp`.
    fn holds_jump(&self, o: &Optimized) -> bool {
        let jmp = jump_to(o.site.addr, o.detour).expect("it was written");
        let mut now = [0u8; JUMP_LEN];
        self.registry().text().read(o.site.addr, &mut now).is_ok() && now == jmp
    }

    /// Why the last pass left the site at `addr` on the trap path, if it
    /// did.
    pub fn refusal(&self, addr: u64) -> Option<JumpRefusal> {
        self.read_state(|st| st.refusals.get(&addr).copied())
    }

    /// The detour area's counters.
    pub fn detour_stats(&self) -> XolStats {
        self.detours.stats()
    }

    /// Optimizes every candidate site of the registry now (module docs,
    /// "Optimizing a batch"), after freeing the detours retired since the
    /// last pass. Waits for a grace period and one or two quiescence
    /// rounds; never call it from a probe handler.
    pub fn optimize_now(&self) -> JumpReport {
        let mut report = None;
        self.registry()
            .with_writer(&mut |view| report = Some(self.pass(view)));
        report.expect("with_writer runs its closure")
    }

    /// [`optimize_now`](Self::optimize_now) inside the registry's view.
    /// The state is locked around each step that reads or changes it, and
    /// released across the grace periods and quiescence waits: a uprobe
    /// writer waits in the hook for the lock with a file's stripe held,
    /// and the dynamic linker's thread, inside a read section, may wait for
    /// that stripe (kprobe writers wait for the writer mutex, which the
    /// kprobe registry's view holds throughout).
    fn pass(&self, view: &dyn JumpView) -> JumpReport {
        let registry = self.registry();
        let mut report = JumpReport::default();
        let cands = view.candidates();
        // Sites whose text went away (a library unloaded: the registry
        // detached them without restoring anything), that are no longer
        // armed, or whose text does not hold their `jmp` (text mapped again
        // at the same address): forget them. The writes check the text's
        // identity and bytes, so nothing is written into code that
        // replaced them.
        let retired = {
            let mut st = self.lock();
            let stale: Vec<u64> = st
                .optimized
                .iter()
                .filter(|(a, o)| {
                    !self.holds_jump(o)
                        || !cands
                            .iter()
                            .any(|c| c.addr == **a && c.armed && c.text_id == o.text_id)
                })
                .map(|(&a, _)| a)
                .collect();
            for a in stale {
                if let Some(o) = st.optimized.remove(&a) {
                    self.unoptimize(&mut st, o, false);
                }
            }
            std::mem::take(&mut st.retired)
        };
        // After the stale sites: a resume cell one of them cleared is
        // pointed elsewhere only after this grace period (`uprobe/jump.rs`).
        self.reclaim_list(retired, &mut report);
        if !self.is_enabled() {
            return report;
        }
        let Some(ready) = self.prepare_batch(view, &cands, &mut report) else {
            return report;
        };
        // 3 and 4, unlocked.
        registry.synchronize();
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for (c, site, _, _) in &ready {
            ranges.push(site.addr + 1..site.resume_addr());
            if let Some(s) = c.slot {
                ranges.push(s..s + crate::probes::arch::MAX_XOL_SLOT as u64);
            }
        }
        let proof = quiesce(&ranges, QUIESCE_TIMEOUT).proves_quiescence();
        let mut st = self.lock();
        // A site the hook put back meanwhile is no longer pending (its
        // cell cleared, its detour retired): left alone.
        let ready: Vec<_> = ready
            .into_iter()
            .filter(|(c, ..)| st.pending.remove(&c.addr).is_some())
            .collect();
        if !proof {
            for (c, _, detour, _) in ready {
                c.detour.set(0);
                st.retired.push(detour);
                st.refusals.insert(c.addr, JumpRefusal::NotQuiescent);
                report.refused.push((c.addr, JumpRefusal::NotQuiescent));
            }
            return report;
        }
        // 5: the tails, under the int3 (checked first: no registry writes
        // the site's first byte without the hook, which waits for the lock
        // held from here on).
        let text = registry.text();
        let mut written = Vec::new();
        for (c, site, detour, slot) in ready {
            let jmp = jump_to(site.addr, detour).expect("checked by write_detour");
            let tail = &site.bytes()[1..JUMP_LEN];
            let mut first = [0u8; 1];
            let guarded = text.read(site.addr, &mut first).is_ok() && first == [0xcc];
            let wrote = if guarded {
                text.write_in(&c.text_id, site.addr + 1, tail, &jmp[1..])
            } else {
                Err(crate::probes::ProbeError::TextGone { addr: site.addr })
            };
            match wrote {
                Ok(()) => written.push((c, site, detour, slot, jmp)),
                Err(_) => {
                    c.detour.set(0);
                    st.retired.push(detour);
                    st.refusals.insert(c.addr, JumpRefusal::TextAccess);
                    report.refused.push((c.addr, JumpRefusal::TextAccess));
                }
            }
        }
        sync_cores();
        // 6: live, then the first bytes.
        for (c, site, detour, slot, jmp) in written {
            // Release pairs with the Acquire load in the detour's Rust
            // half: a hit that sees it live sees everything written before.
            slot.live.store(true, Ordering::Release);
            if text
                .write_in(&c.text_id, site.addr, &[0xcc], &jmp[..1])
                .is_err()
            {
                slot.live.store(false, Ordering::Release);
                let _ = text.write_in(
                    &c.text_id,
                    site.addr + 1,
                    &jmp[1..],
                    &site.bytes()[1..JUMP_LEN],
                );
                c.detour.set(0);
                st.retired.push(detour);
                st.refusals.insert(c.addr, JumpRefusal::TextAccess);
                report.refused.push((c.addr, JumpRefusal::TextAccess));
                continue;
            }
            st.refusals.remove(&c.addr);
            report.optimized += 1;
            st.optimized.insert(
                c.addr,
                Optimized {
                    site,
                    detour,
                    slot,
                    text_id: c.text_id,
                    cell: c.detour,
                },
            );
        }
        sync_cores();
        report
    }

    /// Steps 1 and 2 under the state lock: the accepted candidates' detours
    /// written, their trap hits pointed there, each site pending until
    /// step 5. `None` when there is none.
    fn prepare_batch(
        &self,
        view: &dyn JumpView,
        cands: &[JumpCandidate],
        report: &mut JumpReport,
    ) -> Option<Vec<Ready>> {
        let mut st = self.lock();
        let mut batch: Vec<(JumpCandidate, (JumpSite, Stub))> = Vec::new();
        for c in cands {
            if st.optimized.contains_key(&c.addr) {
                report.already += 1;
                continue;
            }
            let shared = st
                .optimized
                .iter()
                .map(|(&a, o)| (a, &o.cell))
                .chain(batch.iter().map(|(b, _)| (b.addr, &b.detour)))
                .find(|(_, cell)| cell.same_cell(&c.detour));
            if let Some((with, _)) = shared {
                let r = JumpRefusal::SharedUprobe { with };
                st.refusals.insert(c.addr, r);
                report.refused.push((c.addr, r));
                continue;
            }
            match self.prepare(view, &st, cands, c) {
                Ok(site) => batch.push((c.clone(), site)),
                Err(r) => {
                    st.refusals.insert(c.addr, r);
                    report.refused.push((c.addr, r));
                }
            }
        }
        let mut ready = Vec::new();
        for (c, (site, stub)) in batch {
            match self.write_detour(&mut st, &site, stub) {
                Ok((detour, slot)) => ready.push((c, site, detour, slot)),
                Err(r) => {
                    st.refusals.insert(c.addr, r);
                    report.refused.push((c.addr, r));
                }
            }
        }
        // 2: trap hits resume in the detours.
        for (c, site, detour, _) in &ready {
            c.detour.set(detour + RELOCATED_AT);
            st.pending.insert(
                c.addr,
                Pending {
                    displaced: site.addr..site.resume_addr(),
                    detour: *detour,
                    cell: c.detour.clone(),
                },
            );
        }
        (!ready.is_empty()).then_some(ready)
    }

    /// Frees the detours retired since the last pass (module docs,
    /// "Freeing a detour"). Returns how many, and how many with a proof.
    pub fn reclaim(&self) -> (usize, usize) {
        let mut report = JumpReport::default();
        self.registry().with_writer(&mut |_| {
            let retired = std::mem::take(&mut self.lock().retired);
            self.reclaim_list(retired, &mut report);
        });
        (report.reclaimed, report.reclaimed_proven)
    }

    /// Frees `retired`, taken from the state: waits unlocked.
    fn reclaim_list(&self, retired: Vec<u64>, report: &mut JumpReport) {
        if retired.is_empty() {
            return;
        }
        self.registry().synchronize();
        let mut ranges: Vec<Range<u64>> = retired
            .iter()
            .map(|&d| d..d + DETOUR_BYTES as u64)
            .collect();
        ranges.extend(stubs::stub_ranges());
        let mut known = true;
        for f in detour::entry_functions() {
            match self.symbols.get().and_then(|s| s.function_containing(f)) {
                Some(sym) => ranges.push(sym.start..sym.end()),
                None => known = false,
            }
        }
        let proof = known && quiesce(&ranges, QUIESCE_TIMEOUT).proves_quiescence();
        if proof {
            // Marks the slots proven (a second, short wait on them alone).
            crate::probes::xol::XolAllocator::quiesce(&self.detours, &retired);
            report.reclaimed_proven += retired.len();
        }
        report.reclaimed += retired.len();
        for d in retired {
            crate::probes::xol::XolAllocator::free(&self.detours, d);
        }
    }

    /// Accepts or refuses one candidate (no write).
    fn prepare(
        &self,
        view: &dyn JumpView,
        st: &State,
        cands: &[JumpCandidate],
        c: &JumpCandidate,
    ) -> Result<(JumpSite, Stub), JumpRefusal> {
        if !c.armed || c.needs_trap {
            return Err(JumpRefusal::NeedsTrapPath);
        }
        if c.opted_out {
            return Err(JumpRefusal::OptedOut);
        }
        let registry = self.registry();
        let func = view
            .function_containing(c.addr)
            .ok_or(JumpRefusal::NoFunction)?;
        let mut text = vec![0u8; (func.end - func.start) as usize];
        view.original_text(func.start, &mut text)
            .map_err(|_| JumpRefusal::TextAccess)?;
        // Another registry's breakpoint in the function would decode as a
        // one-byte instruction: the analysis would be of other code.
        if let Some(at) = (func.start..func.end)
            .zip(&text)
            .find(|&(a, &b)| b == 0xcc && registry.text().holder_at(a).is_some())
            .map(|(a, _)| a)
        {
            return Err(JumpRefusal::OtherProbeInside { at });
        }
        // Other optimized sites of the function: their original bytes.
        for (&a, o) in st.optimized.range(func.start..func.end) {
            let at = (a - func.start) as usize;
            let b = o.site.bytes();
            let n = b.len().min(text.len() - at);
            text[at..at + n].copy_from_slice(&b[..n]);
        }
        let site = analyze_jump_site(func.start, &text, c.addr)?;
        if let Some(o) = cands
            .iter()
            .find(|o| o.addr > site.addr && o.addr < site.resume_addr())
        {
            return Err(JumpRefusal::OtherProbeInside { at: o.addr });
        }
        if registry
            .text()
            .refused_at(site.addr, usize::from(site.len))
            .is_some()
        {
            return Err(JumpRefusal::RefusedRange);
        }
        // The entry stub where the calling convention says what is live.
        let stub = if site.addr == func.start {
            Stub::Entry
        } else {
            Stub::Full
        };
        Ok((site, stub))
    }

    /// Step 1: the detour's slot and bytes.
    fn write_detour(
        &self,
        st: &mut State,
        site: &JumpSite,
        stub: Stub,
    ) -> Result<(u64, &'static JumpSlot), JumpRefusal> {
        use crate::probes::xol::XolAllocator as _;
        let registry = self.registry();
        let slot = *st.slots.entry(site.addr).or_insert_with(|| {
            Box::leak(Box::new(JumpSlot {
                addr: site.addr,
                registry,
                live: AtomicBool::new(false),
            }))
        });
        let detour = self
            .detours
            .alloc(site.addr)
            .map_err(|_| JumpRefusal::NoDetourSlot)?;
        let bytes = jump_to(site.addr, detour)
            .and_then(|_| site.relocate(detour + RELOCATED_AT).ok())
            .and_then(|r| detour_bytes(detour, &r, site.resume_addr(), slot, stub));
        let Some(bytes) = bytes else {
            // Never jumped to: no thread can be in it.
            self.detours.free(detour);
            return Err(JumpRefusal::NoDetourSlot);
        };
        if self.detours.fill(detour, &bytes).is_err() {
            self.detours.free(detour);
            return Err(JumpRefusal::NoDetourSlot);
        }
        Ok((detour, slot))
    }

    /// Puts `o` back on the trap path (module docs, "Back to the trap
    /// path"). Registry writer mutex and state lock held.
    fn unoptimize(&self, st: &mut State, o: Optimized, add_post: bool) {
        let registry = self.registry();
        let text = registry.text();
        let jmp = jump_to(o.site.addr, o.detour).expect("it was written");
        // 1. The int3 back over the e9. A failure means the text went away
        // (unmapped or replaced): nothing of ours is left to undo there.
        let gone = text
            .write_in(&o.text_id, o.site.addr, &jmp[..1], &[0xcc])
            .is_err();
        sync_cores();
        // 2. Release pairs with the Acquire load in the Rust half.
        o.slot.live.store(false, Ordering::Release);
        // 3.
        if add_post {
            registry.synchronize();
        }
        // 4.
        if !gone {
            let _ = text.write_in(
                &o.text_id,
                o.site.addr + 1,
                &jmp[1..],
                &o.site.bytes()[1..JUMP_LEN],
            );
            sync_cores();
        }
        // 5.
        o.cell.set(0);
        st.retired.push(o.detour);
    }
}

impl JumpHook for JumpOptimizer {
    fn to_trap_path(&self, range: Range<u64>, add_post: bool) {
        let mut st = self.lock();
        self.to_trap_path_locked(&mut st, range, add_post);
    }

    fn to_trap_path_held(&self, ranges: &[Range<u64>]) -> JumpHold<'_> {
        let mut st = self.lock();
        for r in ranges {
            self.to_trap_path_locked(&mut st, r.clone(), false);
        }
        JumpHold::new(Held { opt: self, st })
    }
}

/// [`JumpHook::to_trap_path_held`]'s hold: the state lock, and the
/// optimizer to put more sites back under it.
struct Held<'a> {
    opt: &'a JumpOptimizer,
    st: std::sync::MutexGuard<'a, State>,
}

impl crate::probes::jump_sites::Holding for Held<'_> {
    fn to_trap_path(&mut self, range: Range<u64>) -> bool {
        self.opt.to_trap_path_locked(&mut self.st, range, false)
    }
}

impl JumpOptimizer {
    /// [`JumpHook::to_trap_path`] with the state locked. Returns whether an
    /// optimized site's text was put back (a pending site's text is still
    /// the `int3` and its original bytes: taking it back writes nothing).
    fn to_trap_path_locked(&self, st: &mut State, range: Range<u64>, add_post: bool) -> bool {
        // Pending sites of a pass under way (waiting unlocked): back to
        // completing their first instruction themselves; the pass leaves
        // them alone when it resumes.
        let pending: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.displaced.start < range.end && p.displaced.end > range.start)
            .map(|(&a, _)| a)
            .collect();
        for a in pending {
            if let Some(p) = st.pending.remove(&a) {
                p.cell.set(0);
                st.retired.push(p.detour);
            }
        }
        if st.optimized.is_empty() {
            return false;
        }
        // A site's displaced bytes start at most `MAX_DISPLACED` before
        // any address they hold.
        let from = range.start.saturating_sub(MAX_DISPLACED as u64);
        let hit: Vec<u64> = st
            .optimized
            .range(from..range.end)
            .filter(|(_, o)| o.site.addr < range.end && o.site.resume_addr() > range.start)
            .map(|(&a, _)| a)
            .collect();
        let changed = !hit.is_empty();
        for a in hit {
            if let Some(o) = st.optimized.remove(&a) {
                self.unoptimize(st, o, add_post);
            }
        }
        changed
    }
}
