//! Helpers shared by the live runtime's cross-built tests (`tests/`): the
//! same tests run natively on x86_64 and, cross-built, on aarch64 under
//! `qemu-aarch64` (`scripts/test-arm64`).

#![deny(missing_docs)]

pub mod fork_child;
pub mod raw_trap;
pub mod rcu_checks;
pub mod targets;
