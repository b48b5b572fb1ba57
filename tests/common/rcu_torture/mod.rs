//! Building blocks of the RCU torture test (`tests/rcu_torture.rs`).

pub mod domain;
pub mod flood;
pub mod fork;
pub mod pool;
pub mod rng;
pub mod threads;
