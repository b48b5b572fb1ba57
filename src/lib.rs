//! # rcu-registry
//!
//! Read-mostly registries for hot paths: the machinery behind the Linux
//! kernel's kprobe and uprobe tables, made generic and safe to use.
//!
//! - [`rcu`]: RCU domains. [`Rcu`](rcu::Rcu) has the cheapest possible read
//!   side and works from signal handlers; [`Srcu`](rcu::Srcu) lets readers
//!   sleep. Both share grace periods between updaters and batch deferred
//!   callbacks.
//! - [`hashlock`]: arrays of cache-padded lock stripes keyed by typed keys.
//! - [`probes`]: probe registries with kprobe and uprobe semantics over
//!   pluggable architecture backends.
//! - [`docs`]: how it all works, what it costs, what it does not do yet, and
//!   how a tracer builds on it (prose only, no items).

#![deny(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]

mod sync;
#[cfg(target_os = "linux")]
mod sys;

#[doc(hidden)]
pub mod __internals;
pub mod docs;
pub mod hashlock;
pub mod probes;
pub mod rcu;
pub mod seqtree;

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme_example {}
