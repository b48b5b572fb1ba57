//! What a registry shares with a jump optimizer (`runtime/jump.rs`),
//! kprobes and uprobes alike: the hook it calls before it touches text an
//! optimizer may have rewritten, where a detour's hit path sends the
//! thread, and what the optimizer reads of one probe site.
//!
//! The registries' own sides are `kprobe/jump.rs` and `uprobe/jump.rs`;
//! the protocol (batches, grace periods, quiescence proofs) is the
//! optimizer's, one implementation for both.

use std::ops::Range;
use std::sync::Arc;

use crate::probes::text::TextIdentity;

/// What a jump optimizer does before a registry touches text it may have
/// rewritten. See `kprobe/jump.rs` and `uprobe/jump.rs`.
pub trait JumpHook: Send + Sync + 'static {
    /// Puts every optimized site whose displaced bytes intersect `range`
    /// back on the trap path (`int3` at its first byte, its original bytes
    /// after it, no hit running handlers from its detour that began before
    /// the call) before returning. Called with the registry's writer mutex
    /// (kprobes) or the file's stripe (uprobes) held; `add_post` is true
    /// when a kprobe member the detour must not run (a post handler) is
    /// about to join the site at `range.start` (the only case that needs a
    /// grace period; uprobes never ask for one: they hold a stripe, and
    /// their detour hit path redirects to the trap when it meets a
    /// consumer that opted out).
    fn to_trap_path(&self, range: Range<u64>, add_post: bool);

    /// [`to_trap_path`](Self::to_trap_path) for each of `ranges` (no post
    /// handler joining), and no optimizer write until the returned hold is
    /// dropped: the caller restores its original bytes under it, so no
    /// pass writes a `jmp` (or its tail) between the two. A uprobe
    /// writer's stripe does not keep a pass out the way the kprobe
    /// registry's writer mutex does: a pass that collected its candidates
    /// before the call could otherwise mark a site pending after it and
    /// write there before the restore (`loom-tests/tests/uprobe_jump_pass.rs`).
    /// Never wait for a grace period while holding it; more sites go back
    /// under the same hold with [`JumpHold::to_trap_path`]. The default
    /// runs `to_trap_path` and holds nothing.
    fn to_trap_path_held(&self, ranges: &[Range<u64>]) -> JumpHold<'_> {
        for r in ranges {
            self.to_trap_path(r.clone(), false);
        }
        JumpHold(Box::new(Unheld(self)))
    }
}

/// The default hold: nothing held, later ranges through the hook itself.
struct Unheld<'a, H: ?Sized>(&'a H);

impl<H: JumpHook + ?Sized> Holding for Unheld<'_, H> {
    fn to_trap_path(&mut self, range: Range<u64>) -> bool {
        self.0.to_trap_path(range, false);
        // Unknown: say the text may have changed.
        true
    }
}

/// What [`JumpHook::to_trap_path_held`] holds (the optimizer's state lock):
/// released when dropped.
#[must_use = "the restore must be written while it is held"]
pub struct JumpHold<'a>(Box<dyn Holding + 'a>);

impl JumpHold<'_> {
    /// Puts the optimized sites whose displaced bytes intersect `range`
    /// back on the trap path under this hold (as
    /// [`JumpHook::to_trap_path`], no post handler joining): a writer that
    /// touches several places takes the hold once, before it reads any of
    /// them, and adds each as it reaches it. Returns whether a site's text
    /// may have changed (bytes read before the call are stale then).
    pub fn to_trap_path(&mut self, range: Range<u64>) -> bool {
        self.0.to_trap_path(range)
    }
}

impl<'a> JumpHold<'a> {
    /// A hold of `what` (dropped with the hold).
    // Made by the live x86_64 optimizer only.
    #[cfg_attr(
        not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
        allow(dead_code)
    )]
    pub(crate) fn new(what: impl Holding + 'a) -> Self {
        JumpHold(Box::new(what))
    }
}

impl std::fmt::Debug for JumpHold<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JumpHold").finish_non_exhaustive()
    }
}

/// What a [`JumpHold`] keeps until it is dropped: the optimizer's state
/// lock, and how to put more sites back under it.
pub trait Holding {
    /// [`JumpHold::to_trap_path`].
    fn to_trap_path(&mut self, range: Range<u64>) -> bool;
}

/// Where a detour sends the thread after a registry's `on_jump_hit`.
#[must_use = "the outcome says where the thread goes"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JumpHit {
    /// Run the relocated displaced instructions, then jump back past them.
    Continue,
    /// A pre handler asked to skip the displaced instructions: resume at
    /// `regs.ip`.
    Skip,
    /// Nothing ran: the site is not optimized any more (or is gone). Resume
    /// at the probed address with the registers unchanged; the `int3` (or
    /// the original code) is there.
    Redirect,
}

/// Where a site's trap hits resume, as a registry stores it (a kprobe
/// site's exec, a uprobe's cell): see [`DetourCell`].
pub(crate) trait ResumeCell: Send + Sync + 'static {
    /// Trap hits at `addr` resume at `resume` from now on (0: they
    /// complete the displaced instruction themselves again). Called by the
    /// optimizer only, one call at a time.
    fn set_resume(&self, addr: u64, resume: u64);

    /// The identity of the cell (two candidates with one cell share it).
    fn cell_id(&self) -> usize;
}

/// A site's "resume in the detour" address, as the optimizer holds it: trap
/// hits that read a non-zero value (after their handlers) resume there
/// instead of completing the displaced instruction themselves, so no trap
/// hit resumes inside the displaced bytes once the detour exists.
#[cfg_attr(
    not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
    allow(dead_code)
)]
#[derive(Clone)]
pub(crate) struct DetourCell {
    addr: u64,
    cell: Arc<dyn ResumeCell>,
}

impl std::fmt::Debug for DetourCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DetourCell({:#x})", self.addr)
    }
}

#[cfg_attr(
    not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
    allow(dead_code)
)]
impl DetourCell {
    /// The cell of the site at `addr`.
    pub(crate) fn new(addr: u64, cell: Arc<dyn ResumeCell>) -> Self {
        DetourCell { addr, cell }
    }

    /// Points the site's trap hits at `detour` (0: back to completing the
    /// displaced instruction). Called by the optimizer with its state
    /// locked.
    pub(crate) fn set(&self, detour: u64) {
        self.cell.set_resume(self.addr, detour);
    }

    /// Whether `self` and `other` are one cell (two installs of one uprobe
    /// share their uprobe's: at most one of them may be optimized).
    pub(crate) fn same_cell(&self, other: &DetourCell) -> bool {
        self.cell.cell_id() == other.cell.cell_id()
    }
}

/// What the optimizer reads of one site.
#[cfg_attr(
    not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
    allow(dead_code)
)]
#[derive(Clone, Debug)]
pub(crate) struct JumpCandidate {
    pub(crate) addr: u64,
    /// The breakpoint is written (only an armed site is optimized).
    pub(crate) armed: bool,
    /// Some member needs the trap path (a post handler).
    pub(crate) needs_trap: bool,
    /// Some member opted out.
    pub(crate) opted_out: bool,
    /// The site's XOL slot, where a trap hit may be on its way back into
    /// the displaced bytes.
    pub(crate) slot: Option<u64>,
    pub(crate) text_id: TextIdentity,
    /// Where the site's trap hits resume.
    pub(crate) detour: DetourCell,
}
