//! [`Live`]: a kprobe registry over the running process's own code, wired
//! to the SIGTRAP handler and the kretprobe trampoline.
//!
//! # Assembly
//!
//! [`Live::new`] puts together:
//!
//! - the x86_64 backend;
//! - [`InProcess`] text, refusing the ranges of `refuse.rs`;
//! - [`ProcessSymbols`] as the registry's resolver (names to addresses, and
//!   the function around an address for the boundary check);
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

use std::sync::{Arc, OnceLock};

use super::dispatch::{attach, StepStash, TrapDispatcher, Verdict};
use super::xol::{XolArea, XolStats};
use crate::probes::arch::{Arch, DataMemory, Regs, X86_64};
use crate::probes::kprobe::{HitOutcome, KprobeRegistry, StepResult, StepToken};
use crate::probes::outcome::ReturnOutcome;
use crate::probes::runtime::in_process::InProcess;
use crate::probes::runtime::symbols::ProcessSymbols;
use crate::probes::text::TextMemory;
use crate::probes::xol::XolAllocator;

/// A kprobe registry over this process's code on x86_64.
pub type LiveRegistry = KprobeRegistry<X86_64, InProcess>;

impl<A: Arch, T: TextMemory + 'static> TrapDispatcher for KprobeRegistry<A, T> {
    #[inline]
    fn on_breakpoint(
        &'static self,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        stash: &mut StepStash,
    ) -> Verdict {
        let at = self.arch().trap_address(regs);
        match KprobeRegistry::on_breakpoint(self, regs, mem) {
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
        let Some(token) = stash.take::<StepToken<'static>>() else {
            return false;
        };
        self.arch().abort_step(token.plan(), token.state(), regs);
        // Dropping the token gives back its in-flight count: unregistration
        // no longer waits for this step.
        drop(token);
        true
    }

    #[inline]
    fn on_return(&'static self, regs: &mut Regs) -> bool {
        matches!(
            KprobeRegistry::on_return(self, regs),
            ReturnOutcome::Returned { .. }
        )
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

/// A live registry with the pieces it was built from.
pub struct Live {
    registry: LiveRegistry,
    symbols: ProcessSymbols,
    xol: Arc<XolArea>,
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
    /// # Errors
    /// If the executable's symbols cannot be read.
    pub fn new() -> std::io::Result<&'static Live> {
        let symbols = ProcessSymbols::load()?;
        let text = InProcess::new().refuse_all(super::refuse::refused_ranges(&symbols));
        let xol = Arc::new(XolArea::default());
        let registry = KprobeRegistry::builder(
            X86_64,
            text,
            symbols.clone(),
            Arc::clone(&xol) as Arc<dyn XolAllocator>,
        )
        .trampoline(super::trampoline::trampoline_address())
        .build();
        let live: &'static Live = Box::leak(Box::new(Live {
            registry,
            symbols,
            xol,
        }));
        // Attached for the life of the process (the registry is leaked):
        // dropping the attachment without `detach` keeps it attached.
        drop(attach(&live.registry));
        // Its locks and slots are handled across fork() (`fork.rs`).
        super::fork::track(live);
        Ok(live)
    }

    /// The process-wide live registry, built on first use.
    ///
    /// # Panics
    /// If the executable's symbols cannot be read (see [`Live::new`]).
    pub fn global() -> &'static Live {
        GLOBAL.get_or_init(|| Live::new().expect("loading the process's ELF symbols"))
    }

    /// The registry: register, enable, unregister probes here. (Every
    /// `Live` is leaked, so from `&'static Live` this is `'static` too.)
    pub fn registry(&self) -> &LiveRegistry {
        &self.registry
    }

    /// The symbols probes are resolved against.
    pub fn symbols(&self) -> &ProcessSymbols {
        &self.symbols
    }

    /// XOL slot counters.
    pub fn xol_stats(&self) -> XolStats {
        self.xol.stats()
    }

    /// The XOL area (for the fork handlers).
    pub(crate) fn xol_area(&self) -> &XolArea {
        &self.xol
    }
}
