//! `rcu-trace-agent`: the in-process engine of `rcu-trace`.
//!
//! Built as `librcu_trace_agent.so` (a cdylib), it is `LD_PRELOAD`ed into
//! a command `rcu-trace --engine inprocess` spawns and runs the plan's
//! probes there with `rcu-registry`'s live uprobes: a hit is one trap in
//! the target and no context switch ([`agent`]). Built as an rlib, it is
//! what `rcu-trace` shares with it: the allocation-free counters and
//! histograms ([`stats`]) both keep per probe, and the [`wire`] protocol
//! between them. [`ring`] is the lock-free buffer events take from the hit
//! path to the agent's thread.
//!
//! Layer: above `probes::runtime` (see the workspace's `ARCHITECTURE.md`),
//! beside `rcu-trace`; nothing in the library depends on it.
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod agent;
pub mod ring;
pub mod stats;
pub mod wire;
