//! [`Live`]: a kprobe registry over the running process's own code, wired
//! to the SIGTRAP handler and the kretprobe trampoline.
//!
//! # Assembly
//!
//! [`Live::new`] puts together:
//!
//! - the backend of the architecture it runs on ([`NativeArch`]: x86_64 or
//!   arm64);
//! - [`InProcess`] text, refusing the ranges of `refuse.rs`;
//! - [`LiveSymbols`] as the registry's resolver (names to addresses, and
//!   the function around an address for the boundary check), refreshed
//!   when the loader has loaded or unloaded objects since the last lookup;
//! - an [`XolArea`] for out-of-line slots near the probed code;
//! - the [trampoline](super::trampoline_address) for kretprobes;
//!
//! builds a [`LiveRegistry`], leaks it (trap handlers and single-steps in
//! flight may refer to it at any time, so it lives as long as the process)
//! and [attaches](super::attach) it to the SIGTRAP handler.
//!
//! # The registry as a dispatcher
//!
//! Any [`KprobeRegistry`] is a [`TrapDispatcher`]: its hit path maps onto
//! the runtime's verdicts one to one. A single-step's
//! [`StepToken`] travels in the thread's [`StepStash`] from the breakpoint
//! trap to the step trap, and its [step marker](StepToken::step_marker), if
//! it has one, tells the runtime which `int3` is that step trap
//! ([`Verdict::StepToMarker`]; [`Verdict::Step`] for the trap flag).
//!
//! A `Live` registry is attached as such ([`try_attach_live`]): the
//! SIGTRAP handler calls its hit path directly, inlined, inside the
//! handler's own read section ([`LiveRegistry::trap_in_section`]), not
//! through the trait object; the trait's methods serve everything else.

use std::sync::{Arc, OnceLock};

use super::dispatch::{
    failed, try_attach_live, StepStash, Taken, TrapDispatcher, Verdict, MAX_DISPATCHERS,
};
use super::trap_thread::TrapThread;
use super::xol::{XolArea, XolStats};
use crate::probes::arch::{Arch, DataMemory, NativeArch, Regs};
use crate::probes::kprobe::{HitOutcome, KprobeRegistry, StepResult, StepToken};
use crate::probes::outcome::ReturnOutcome;
use crate::probes::runtime::in_process::InProcess;
use crate::probes::runtime::symbols::{LiveSymbols, ProcessSymbols};
use crate::probes::text::TextMemory;
use crate::probes::xol::XolAllocator;
use crate::rcu::RcuGuard;

/// A kprobe registry over this process's code, with the backend of the
/// architecture it runs on (x86_64 or arm64).
pub type LiveRegistry = KprobeRegistry<NativeArch, InProcess>;

impl<A: Arch, T: TextMemory + 'static> TrapDispatcher for KprobeRegistry<A, T> {
    #[inline]
    fn on_breakpoint(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
    ) -> Verdict {
        let at = self.arch().trap_address(regs);
        breakpoint_verdict(self.on_breakpoint_in_trap(regs, mem), at, stash)
    }

    #[inline]
    fn on_step(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
    ) -> Verdict {
        let Some(token) = stash.take::<StepToken<'static>>() else {
            return Verdict::NotOurs;
        };
        match self.on_step_complete(token, regs, mem) {
            StepResult::Done => Verdict::Resume,
            StepResult::Repeat(token) => {
                let marker = token.step_marker();
                let _ = stash.put::<StepToken<'static>>(token);
                step_verdict(marker)
            }
            StepResult::Failed(e) => Verdict::Failed(e),
        }
    }

    #[cold]
    fn on_fault(&'static self, regs: &mut Regs, stash: &mut StepStash) -> bool {
        // Only a fault of the stepped copy itself (its first byte: it did not
        // complete) is the step's: any other IP leaves the step in flight.
        let ours = stash
            .peek::<StepToken<'static>>()
            .is_some_and(|t| t.plan().step_entry == regs.ip);
        if !ours {
            return false;
        }
        // Undone through the stashed token, then taken and dropped: no owned
        // token is alive across a call that could unwind (its landing pad
        // would call the unwinder, `_Unwind_Resume`, from the trap path).
        if let Some(token) = stash.peek::<StepToken<'static>>() {
            self.arch().abort_step(token.plan(), token.state(), regs);
        }
        // Dropping the token gives back its in-flight count: unregistration
        // no longer waits for this step.
        drop(stash.take::<StepToken<'static>>());
        true
    }

    #[inline]
    fn on_return(&'static self, regs: &mut Regs) -> bool {
        matches!(
            KprobeRegistry::on_return(self, regs),
            ReturnOutcome::Returned { .. }
        )
    }

    #[inline]
    fn claims(&'static self, addr: u64) -> bool {
        self.has_site_in_trap(addr)
    }
}

impl LiveRegistry {
    /// [`TrapDispatcher::on_breakpoint`] of the live registry inside the
    /// trap's read section `guard` (the runtime's, held for its dispatcher
    /// table: the registry takes none of its own). The runtime calls this
    /// directly, not through the trait object, for an entry attached with
    /// [`try_attach_live`]: inlined into the SIGTRAP handler, no indirect
    /// call and no second read section on every hit (under qemu-user each
    /// indirect branch is a lookup of the translated code).
    ///
    /// Answers with what is left for the trap path to do (`None`: not
    /// this registry's trap), not a [`Verdict`]: a failure aborts the
    /// process here (`dispatch.rs`, `failed`), so no `ProbeError` payload
    /// travels back through the handler (the conversions of the large
    /// enums were a tenth of an emulated hit's instructions). `t` is the
    /// calling thread's trap state, which the handler reached on entry.
    #[inline(always)]
    pub(crate) fn trap_in_section(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
        guard: &RcuGuard<'_>,
        t: &TrapThread,
    ) -> Option<Taken> {
        let at = self.arch().trap_address(regs);
        self.on_breakpoint_in_section(
            regs,
            mem,
            guard,
            #[inline(always)]
            |outcome, regs| match outcome {
                HitOutcome::NotOurs => None,
                HitOutcome::Vanished | HitOutcome::Skipped | HitOutcome::Emulated => {
                    Some(Taken::Resume)
                }
                HitOutcome::Boosted { slot } => {
                    // A fault of the copy in the slot is reported at `at`.
                    super::dispatch::note_boost_in(t, slot, at);
                    Some(Taken::Resume)
                }
                HitOutcome::SingleStep(token) => {
                    let marker = token.step_marker();
                    // The stash is empty: the runtime reserved a fresh entry.
                    let _ = stash.put::<StepToken<'static>>(token);
                    Some(Taken::Step { d: self, marker })
                }
                HitOutcome::Failed(e) => failed(regs.ip, e),
            },
        )
    }
}

/// The verdict of a breakpoint trap at `at` the registry handled with
/// `outcome`; a single-step's token goes into `stash`.
#[inline(always)]
fn breakpoint_verdict(outcome: HitOutcome<'static>, at: u64, stash: &mut StepStash) -> Verdict {
    match outcome {
        HitOutcome::NotOurs => Verdict::NotOurs,
        HitOutcome::Vanished | HitOutcome::Skipped | HitOutcome::Emulated => Verdict::Resume,
        HitOutcome::Boosted { slot } => {
            // A fault of the copy in the slot is reported at `at`.
            super::dispatch::note_boost(slot, at);
            Verdict::Resume
        }
        HitOutcome::SingleStep(token) => {
            let marker = token.step_marker();
            // The stash is empty: the runtime reserved a fresh entry.
            let _ = stash.put::<StepToken<'static>>(token);
            step_verdict(marker)
        }
        HitOutcome::Failed(e) => Verdict::Failed(e),
    }
}

/// How a step under way ends: on its marker, or on the trap flag.
#[inline]
fn step_verdict(marker: Option<u64>) -> Verdict {
    match marker {
        Some(marker) => Verdict::StepToMarker { marker },
        None => Verdict::Step,
    }
}

/// Why [`Live::new`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum LiveError {
    /// The executable's ELF symbols could not be read or parsed.
    Symbols(std::io::Error),
    /// `max` trap dispatchers are attached already (every [`Live`] stays
    /// attached for the life of the process).
    TooManyDispatchers {
        /// [`MAX_DISPATCHERS`].
        max: usize,
    },
}

impl std::fmt::Display for LiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiveError::Symbols(e) => write!(f, "reading the process's ELF symbols: {e}"),
            LiveError::TooManyDispatchers { max } => write!(
                f,
                "no room for another live registry: {max} trap dispatchers are attached \
                 (use Live::global)"
            ),
        }
    }
}

impl std::error::Error for LiveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LiveError::Symbols(e) => Some(e),
            LiveError::TooManyDispatchers { .. } => None,
        }
    }
}

impl From<std::io::Error> for LiveError {
    fn from(e: std::io::Error) -> Self {
        LiveError::Symbols(e)
    }
}

/// For callers that use `?` in a function returning `std::io::Result`.
impl From<LiveError> for std::io::Error {
    fn from(e: LiveError) -> Self {
        match e {
            LiveError::Symbols(e) => e,
            other => std::io::Error::other(other),
        }
    }
}

/// A live registry with the pieces it was built from.
pub struct Live {
    registry: LiveRegistry,
    symbols: ProcessSymbols,
    live_symbols: LiveSymbols,
    xol: Arc<XolArea>,
    #[cfg(target_arch = "x86_64")]
    jump: Arc<super::jump::JumpOptimizer>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("registry", &self.registry)
            .field("xol", &self.xol)
            .finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<&'static Live> = OnceLock::new();

impl Live {
    /// Builds a registry over the process's code (see the module docs),
    /// leaks it and attaches it to the SIGTRAP handler.
    ///
    /// Every `Live` stays attached for the life of the process, so at most
    /// [`MAX_DISPATCHERS`] can exist (fewer if other dispatchers are
    /// attached). One `Live` serves the whole process, libraries loaded
    /// later included: prefer [`Live::global`].
    ///
    /// # Errors
    /// - [`LiveError::Symbols`]: the executable's symbols cannot be read;
    /// - [`LiveError::TooManyDispatchers`]: the dispatcher table is full.
    ///
    /// Either way nothing is attached and nothing stays allocated.
    pub fn new() -> Result<&'static Live, LiveError> {
        let symbols = ProcessSymbols::load()?;
        let owner = super::holders::new_owner();
        let text = InProcess::new()
            .refuse_all(super::refuse::refused_ranges(&symbols))
            .owned_by(owner);
        let xol = Arc::new(XolArea::default());
        let live_symbols = LiveSymbols::new(symbols.clone());
        #[cfg(target_arch = "x86_64")]
        let jump = super::jump::JumpOptimizer::new();
        let builder = KprobeRegistry::builder(
            NativeArch::default(),
            text,
            live_symbols.clone(),
            Arc::clone(&xol) as Arc<dyn XolAllocator>,
        )
        .trampoline(super::trampoline::trampoline_address());
        #[cfg(target_arch = "x86_64")]
        let builder =
            builder.jump_hook(Arc::clone(&jump) as Arc<dyn crate::probes::kprobe::JumpHook>);
        let registry = builder.build();
        let raw = Box::into_raw(Box::new(Live {
            registry,
            symbols,
            live_symbols,
            xol,
            #[cfg(target_arch = "x86_64")]
            jump,
        }));
        // SAFETY: `raw` is a fresh box; it is freed below only if it was
        // never attached (nothing else can have seen it), else leaked.
        let live: &'static Live = unsafe { &*raw };
        // Attached for the life of the process (the registry is leaked):
        // dropping the attachment without `detach` keeps it attached.
        let Some(attachment) = try_attach_live(&live.registry) else {
            // SAFETY: not attached, not tracked, no probe registered: this
            // is the only reference to the box, and it is not used again.
            drop(unsafe { Box::from_raw(raw) });
            return Err(LiveError::TooManyDispatchers {
                max: MAX_DISPATCHERS,
            });
        };
        drop(attachment);
        #[cfg(target_arch = "x86_64")]
        live.jump.bind(&live.registry, live.symbols.clone());
        // A breakpoint another registry finds here is named as ours.
        super::holders::add(
            owner,
            Box::new(move |addr| {
                live.registry
                    .has_site(addr)
                    .then(|| "a live kprobe registry".to_string())
            }),
        );
        // Its locks and slots are handled across fork() (`fork.rs`).
        super::fork::track(live);
        Ok(live)
    }

    /// The process-wide live registry, built on first use.
    ///
    /// # Panics
    /// If it cannot be built (see [`Live::new`]).
    pub fn global() -> &'static Live {
        GLOBAL.get_or_init(|| match Live::new() {
            Ok(live) => live,
            Err(e) => panic!("building the process's live registry: {e}"),
        })
    }

    /// The registry: register, enable, unregister probes here. (Every
    /// `Live` is leaked, so from `&'static Live` this is `'static` too.)
    pub fn registry(&self) -> &LiveRegistry {
        &self.registry
    }

    /// The symbols as loaded when this `Live` was built (what the refused
    /// ranges were computed from). Probes are resolved against
    /// [`current_symbols`](Self::current_symbols), which also knows the
    /// objects loaded (and forgets those unloaded) since.
    pub fn symbols(&self) -> &ProcessSymbols {
        &self.symbols
    }

    /// The symbols probes are resolved against now: refreshed first if the
    /// loader has loaded or unloaded objects since the last lookup.
    pub fn current_symbols(&self) -> ProcessSymbols {
        self.live_symbols.current()
    }

    /// Why the runtime refuses to patch `addr`: the chain of calls by which
    /// its trap path reaches that code, from a root (the SIGTRAP handler, a
    /// dispatcher method) to the refused function, outermost first. `None`
    /// if the trap-path walk does not reach `addr` (it may still be refused
    /// as this crate's own code). A diagnostic, off the hot path (see
    /// `refuse.rs`).
    pub fn explain_refusal(&self, addr: u64) -> Option<String> {
        super::refuse::explain(&self.symbols, addr)
    }

    /// XOL slot counters.
    pub fn xol_stats(&self) -> XolStats {
        self.xol.stats()
    }

    /// The jump optimizer (x86_64; see `runtime/jump.rs`).
    #[cfg(target_arch = "x86_64")]
    pub fn jump_optimizer(&self) -> &Arc<super::jump::JumpOptimizer> {
        &self.jump
    }

    /// Jump-optimizes every candidate probe site now (x86_64): see
    /// [`JumpOptimizer::optimize_now`](super::jump::JumpOptimizer::optimize_now).
    #[cfg(target_arch = "x86_64")]
    pub fn optimize_now(&self) -> super::jump::JumpReport {
        self.jump.optimize_now()
    }

    /// Whether `probe`'s site is jump-optimized now (x86_64).
    #[cfg(target_arch = "x86_64")]
    pub fn is_optimized(&self, probe: &crate::probes::kprobe::Kprobe) -> bool {
        probe.is_registered() && probe.address().is_some_and(|a| self.jump.is_optimized(a))
    }

    /// The per-probe opt-out (x86_64): `out` keeps `probe`'s site on the
    /// trap path (put back there now if it is optimized).
    #[cfg(target_arch = "x86_64")]
    pub fn set_jump_opt_out(&self, probe: &crate::probes::kprobe::Kprobe, out: bool) {
        use crate::probes::kprobe::JumpHook as _;
        let _w = self.registry.lock_writer();
        probe.set_jump_opt_out(out);
        if let (true, Some(a)) = (out, probe.address()) {
            self.jump.to_trap_path(a..a + 1, false);
        }
    }

    /// The XOL area, shared (the live uprobes' space takes its slots here).
    pub(crate) fn xol_arc(&self) -> Arc<XolArea> {
        Arc::clone(&self.xol)
    }

    /// The XOL area (for the fork handlers).
    pub(crate) fn xol_area(&self) -> &XolArea {
        &self.xol
    }
}
