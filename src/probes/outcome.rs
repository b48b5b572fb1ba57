//! What a registry's return path tells the runtime that called it. Shared by
//! the kprobe and uprobe registries: a return is handled the same way for
//! both (the return handlers ran and the thread goes to its real caller, or
//! the return was not one of ours).

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
