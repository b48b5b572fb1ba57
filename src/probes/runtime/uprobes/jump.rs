//! Jump-optimized live uprobes (x86_64): the uprobe registry served by the
//! same [`JumpOptimizer`] as kprobes (`runtime/jump.rs`: the batch, the
//! grace period, the quiescence proofs, un-optimizing, reclaim), through
//! [`JumpSites`].
//!
//! - Candidates: every install in this process (each mapped instance of a
//!   registered file offset) whose breakpoint is written, with the text
//!   identity of its mapping (so nothing is written into text that
//!   replaced it, `dlclose` and a new `dlopen` at the same address
//!   included: the writes also expect the bytes the optimizer left).
//! - The function extent for the analysis: the process's symbols
//!   ([`Live::current_symbols`](crate::probes::runtime::Live::current_symbols),
//!   the executable and every loaded object's ELF symbols), looked up
//!   before the optimizer's state is locked: a `dlopen` or `dlclose` that
//!   waits in the registry's hook (inside the dynamic linker) for a pass
//!   must not be waited for by that pass.
//! - The detour's hit path:
//!   [`UprobeRegistry::on_jump_hit`](crate::probes::uprobe::UprobeRegistry::on_jump_hit)
//!   in the registry's `Rcu` read section. Uretprobes hijack the return on
//!   entry without a trap; the return lands in the shared assembly
//!   trampoline, without a trap too (`uprobes.rs`, "Returns").
//! - The registry calls the optimizer's hook before it writes or restores
//!   a breakpoint (not in text just mapped or already gone: the loader's
//!   thread calls those inside a read section) or adds a consumer that
//!   opted out (`uprobe/jump.rs`); the optimizer holds its state lock only
//!   between its waits, so the hook never waits for a grace period.
//! - One pass at a time: [`JumpSites::with_writer`] takes the runtime's
//!   pass lock (the uprobe registry has no writer mutex to serialize them).
//! - `fork`: the handlers (`fork.rs`) take the pass lock, then the
//!   optimizer's state lock, before the runtime's other locks and hold them
//!   across the fork: a fork waits for a pass under way, and the child
//!   finds both free.

use std::ops::Range;
use std::sync::Arc;

use super::LiveUprobes;
use crate::probes::arch::x86_64::jump::JumpRefusal;
use crate::probes::arch::Regs;
use crate::probes::jump_sites::{JumpCandidate, JumpHit};
use crate::probes::resolve::SymbolResolver;
use crate::probes::runtime::context::ThreadMemory;
use crate::probes::runtime::in_process::InProcess;
use crate::probes::runtime::jump::detour::JumpSlot;
use crate::probes::runtime::jump::sites::{JumpSites, JumpView};
use crate::probes::runtime::jump::StateHold;
use crate::probes::runtime::jump::{JumpOptimizer, JumpReport};
use crate::probes::runtime::symbols::ProcessSymbols;
use crate::probes::runtime::Live;
use crate::probes::uprobe::UprobeKey;
use crate::probes::ProbeError;
use crate::sync::atomic::{AtomicUsize, Ordering};
use std::sync::MutexGuard;

/// The live uprobes as the optimizer reads them.
struct UprobeView<'a> {
    uprobes: &'a LiveUprobes,
    symbols: ProcessSymbols,
}

impl JumpView for UprobeView<'_> {
    fn candidates(&self) -> Vec<JumpCandidate> {
        self.uprobes.registry.jump_candidates(self.uprobes.space.id)
    }

    fn function_containing(&self, addr: u64) -> Option<Range<u64>> {
        self.symbols
            .function_containing(addr)
            .map(|f| f.start..f.end())
    }

    fn original_text(&self, start: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.uprobes
            .registry
            .original_text(self.uprobes.space.id, start, buf)
    }
}

/// A test's hooks: run by each pass (and query) with the pass lock held
/// ([`PASS_HOOK`]), and by the `fork` handler just before it takes the
/// pass lock ([`FORK_HOOK`]), so a test can fork during a paused pass
/// without guessing from timing. A `fn()` as a `usize`, 0: none.
static PASS_HOOK: AtomicUsize = AtomicUsize::new(0);
/// See [`PASS_HOOK`].
static FORK_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Sets (or clears) the hook every uprobe optimizer pass (and query: every
/// holder of the pass lock) runs with its pass lock held, before anything
/// else (tests: `__internals`).
pub fn set_pass_hook(hook: Option<fn()>) {
    // Release pairs with the Acquire in `run_hook`: a pass that sees the
    // pointer sees what the test wrote before setting it.
    PASS_HOOK.store(hook.map_or(0, |f| f as usize), Ordering::Release);
}

/// Sets (or clears) the hook the `fork` handler runs just before it takes
/// the uprobe pass lock (tests: `__internals`).
pub fn set_fork_hook(hook: Option<fn()>) {
    // Release: as in `set_pass_hook`.
    FORK_HOOK.store(hook.map_or(0, |f| f as usize), Ordering::Release);
}

fn run_hook(hook: &AtomicUsize) {
    // Acquire pairs with the Release in `set_pass_hook`/`set_fork_hook`.
    let f = hook.load(Ordering::Acquire);
    if f != 0 {
        // Only the setters store a non-zero value: a `fn()` as a `usize`.
        // SAFETY: `f` is a `fn()` (see above).
        let f = unsafe { std::mem::transmute::<usize, fn()>(f) };
        f();
    }
}

/// The live uprobes' pass lock and optimizer state lock, held across a
/// `fork`.
pub(crate) struct ForkHold {
    _state: StateHold<'static>,
    _pass: MutexGuard<'static, ()>,
}

/// Takes the pass lock (waiting for a pass under way: its grace periods
/// and quiescence waits, which the forking thread answers), then the
/// optimizer's state lock, for the `fork` handlers (`fork.rs`): the child
/// finds both free and can optimize and unregister. `None` when the live
/// uprobes are not built (or being built).
pub(crate) fn hold_for_fork() -> Option<ForkHold> {
    let uprobes = LiveUprobes::built()?;
    run_hook(&FORK_HOOK);
    let pass = uprobes.jump_pass.lock().unwrap_or_else(|e| e.into_inner());
    Some(ForkHold {
        _state: uprobes.jump.hold_state_for_fork(),
        _pass: pass,
    })
}

impl JumpSites for LiveUprobes {
    fn with_writer(&self, f: &mut dyn FnMut(&dyn JumpView)) {
        let _pass = self.jump_pass.lock().unwrap_or_else(|e| e.into_inner());
        run_hook(&PASS_HOOK);
        // Before the optimizer's state is locked (module docs).
        let symbols = Live::global().current_symbols();
        f(&UprobeView {
            uprobes: self,
            symbols,
        });
    }

    fn synchronize(&self) {
        self.registry.domain().synchronize();
    }

    fn text(&self) -> &InProcess {
        &self.space.text
    }

    #[inline]
    fn jump_hit(&self, slot: &JumpSlot, regs: &mut Regs) -> JumpHit {
        self.registry
            .on_jump_hit(self.space.id, slot.addr, regs, &mut ThreadMemory, || {
                // Acquire pairs with the Release stores in `jump.rs`
                // (`optimize_now`, `unoptimize`).
                slot.live.load(Ordering::Acquire)
            })
    }
}

impl LiveUprobes {
    /// The jump optimizer of the live uprobes (x86_64): the same protocol
    /// as kprobes' ([`Live::jump_optimizer`]), its own detours and state.
    /// Its [`set_enabled`](JumpOptimizer::set_enabled) is the global
    /// opt-out; [`start_background`](JumpOptimizer::start_background)
    /// optimizes new uprobes some time after they appear.
    pub fn jump_optimizer(&self) -> &Arc<JumpOptimizer> {
        &self.jump
    }

    /// Jump-optimizes every uprobe install that can be, now: one batch
    /// (one grace period, one quiescence wait), so call it once after a
    /// batch of registrations. Refused installs keep their `int3`; the
    /// report and [`jump_refusal`](Self::jump_refusal) say why. Never call
    /// it from a probe handler.
    pub fn optimize_now(&self) -> JumpReport {
        self.jump.optimize_now()
    }

    /// Where `key` is installed in this process (one address per mapping
    /// of its file).
    pub fn installed_addresses(&self, key: UprobeKey) -> Vec<u64> {
        self.registry
            .mappings_of(self.space.id)
            .iter()
            .filter(|m| m.file == key.file)
            .filter_map(|m| m.vaddr_of(key.offset))
            .filter(|&v| self.registry.installed_at(self.space.id, v) == Some(key))
            .collect()
    }

    /// Whether the uprobe at `key` is jump-optimized now (in some mapping
    /// of its file). Takes the optimizer's lock: never from a handler.
    pub fn is_optimized(&self, key: UprobeKey) -> bool {
        self.installed_addresses(key)
            .into_iter()
            .any(|v| self.jump.is_optimized(v))
    }

    /// Why the last pass left the uprobe at `key` on the trap path, if it
    /// did (the first such install).
    pub fn jump_refusal(&self, key: UprobeKey) -> Option<JumpRefusal> {
        self.installed_addresses(key)
            .into_iter()
            .find_map(|v| self.jump.refusal(v))
    }
}
