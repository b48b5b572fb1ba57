//! loom models for rcu-registry live in `tests/`; this library is empty.
//!
//! Run them with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release --target-dir target/loom
//! ```
