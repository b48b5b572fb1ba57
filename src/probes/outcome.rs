//! What a registry's return path tells the runtime that called it, and what
//! a hit handler asks of the hit path. Shared by the kprobe and uprobe
//! registries: a return is handled the same way for both (the return
//! handlers ran and the thread goes to its real caller, or the return was
//! not one of ours), and so is a handler's answer about the displaced
//! instruction ([`Action`]).

/// What a hit handler (a kprobe pre handler; a uprobe consumer's handler
/// through [`ConsumerAction`](crate::probes::uprobe::ConsumerAction), which
/// converts from it) asks the hit path to do next. One idea, one type for
/// both registries.
///
/// The three handler answers in the crate, and why they are not one enum:
/// - `Action` (this): what happens to the displaced instruction. Same for
///   kprobes and uprobes.
/// - [`ConsumerAction`](crate::probes::uprobe::ConsumerAction): `Action`'s
///   two answers plus `Remove`. A uprobe consumer may ask to be reaped later
///   because its registry defers removal to
///   `reap_removed`; a kprobe has no such
///   path (its owner unregisters it, and a handler cannot wait for the grace
///   period its own hit holds up), so `Remove` would be an answer kprobes
///   could only ignore.
/// - [`EntryAction`](crate::probes::kprobe::EntryAction) (kretprobe entry
///   handlers): whether to *track the call's return*, not what to do with
///   an instruction. A kretprobe's entry cannot skip the function (the
///   instruction runs either way), so `SkipInstruction` has no meaning
///   there, and `Decline` none in a pre handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the displaced instruction (out of line or emulated), then the
    /// post handlers. Any change the handler made to `regs.ip` is discarded.
    Continue,
    /// The handler set `regs.ip` itself: do not run the displaced
    /// instruction, run no later handler at this hit and no post handler,
    /// resume at `regs.ip`.
    SkipInstruction,
}

/// Result of a return probe's trampoline or breakpoint: `KprobeRegistry::on_return`
/// and `UprobeRegistry::on_return` alike.
#[must_use = "the outcome says where the thread returns to"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnOutcome {
    /// Return handlers ran; `regs.ip` is the real return address `to`.
    Returned {
        /// The caller's return address.
        to: u64,
    },
    /// No instance of this thread returns with this stack pointer.
    NotOurs,
}
