//! `rcu-trace`: a tracer to point at any program, built only on
//! `rcu-registry`'s public API.
//!
//! # The pieces, in the order a run meets them
//!
//! - [`cli`]: the command line (clap).
//! - [`spec`]: probe specs (`uprobe:PATH:SYMBOL[+OFFSET]`,
//!   `uretprobe:PATH:SYMBOL`, `uprobe:PATH:0xOFFSET`), on the library's
//!   own target text form; [`glob`] for `SYMBOL` globs.
//! - [`resolve`]: every spec to uprobe keys (file, offset) from the ELF
//!   files on disk, as the dynamic linker or the traced process would
//!   find them, before anything is touched.
//! - [`engine`]: what installs the probes and serves the hits: `ptrace`
//!   (the library's `RemoteTracer`) and `inprocess` (the agent,
//!   `rcu-trace-agent`, running the live uprobes inside the target).
//! - [`record`] and [`stats`]: counting and latencies without allocating
//!   on the hit path (`stats` is shared with the agent), printed events,
//!   the Chrome trace.
//! - [`report`]: the live table, the summary, `--json`.
//! - [`run`]: one run, from arguments to exit code.
//!
//! Layer: above `probes::remote` and `probes::uprobe` (see the workspace's
//! `ARCHITECTURE.md`); nothing in the library depends on it.
#![deny(missing_docs)]

pub mod cli;
pub mod engine;
pub mod glob;
pub mod record;
pub mod report;
pub mod resolve;
pub mod run;
pub mod spec;

/// Counting without allocating (shared with the agent, which keeps the
/// same counters inside the target).
pub use rcu_trace_agent::stats;
