//! How the crate works, what it costs, where it is still weak, and how to
//! build on it: prose only, no items (the way `arc-swap` keeps its docs).
//!
//! Most of the machinery lives in private modules, so their explanations are
//! collected here, where rustdoc shows them. Every page is a Markdown file
//! beside this one (`src/docs/*.md`), readable on GitHub as well.
//!
//! - [`algorithms`]: what each algorithm guarantees and costs, then how it
//!   works: RCU read sides and grace periods, `Srcu`, callbacks, the trees,
//!   the hashed locks, the kprobe hit path and unregistration, displaced
//!   instructions, XOL slots, quiescence, kretprobes, the live runtime,
//!   uprobes and uretprobes.
//! - [`performance`]: the measured costs, how they scale with threads and
//!   probes, on which machine; ratios against peers, not promises.
//! - [`limitations`]: everything known to be weak, missing or approximate.
//! - [`patterns`]: how a tracer uses the crate: probes by symbol, batched
//!   removal, per-call data for latency, uprobe consumers and filters, and
//!   what a handler may do.

#[doc = include_str!("algorithms.md")]
pub mod algorithms {
    #[doc = include_str!("algorithms/rcu.md")]
    pub mod rcu {}
    #[doc = include_str!("algorithms/srcu.md")]
    pub mod srcu {}
    #[doc = include_str!("algorithms/callbacks.md")]
    pub mod callbacks {}
    #[doc = include_str!("algorithms/trees.md")]
    pub mod trees {}
    #[doc = include_str!("algorithms/hashed_locks.md")]
    pub mod hashed_locks {}
    #[doc = include_str!("algorithms/kprobe_hit_path.md")]
    pub mod kprobe_hit_path {}
    #[doc = include_str!("algorithms/unregistration.md")]
    pub mod unregistration {}
    #[doc = include_str!("algorithms/instructions.md")]
    pub mod instructions {}
    #[doc = include_str!("algorithms/xol_slots.md")]
    pub mod xol_slots {}
    #[doc = include_str!("algorithms/quiescence.md")]
    pub mod quiescence {}
    #[doc = include_str!("algorithms/kretprobes.md")]
    pub mod kretprobes {}
    #[doc = include_str!("algorithms/live_runtime.md")]
    pub mod live_runtime {}
    #[doc = include_str!("algorithms/uprobes.md")]
    pub mod uprobes {}
    #[doc = include_str!("algorithms/uretprobes.md")]
    pub mod uretprobes {}
}

#[doc = include_str!("performance.md")]
pub mod performance {}

#[doc = include_str!("limitations.md")]
pub mod limitations {}

#[doc = include_str!("patterns.md")]
pub mod patterns {}
