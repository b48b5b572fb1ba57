//! loom model of owned handles: `inc_not_zero` never resurrects an entry
//! whose last reference is gone (the find_uprobe race of the 2024 review).
//!
//! The same test runs in two configurations:
//!
//! - normal: must pass (no interleaving yields a handle to a freed entry);
//! - `--cfg rcu_registry_broken_inc` (the plain-increment variant): must
//!   FAIL, i.e. loom must find the interleaving in which the reader bumps a
//!   zero count and then uses or frees the entry after it was freed. The
//!   test is `should_panic` under that cfg, so "the model caught the bug"
//!   is a passing run:
//!
//! ```text
//! RUSTFLAGS="--cfg loom --cfg rcu_registry_broken_inc" \
//!   cargo test -p loom-tests --release --target-dir target/loom-broken --test seqtree_handles
//! ```
//!
//! Under loom, freed entries are poisoned, not deallocated, so a use after
//! free or a double free is an assertion failure rather than undefined
//! behaviour.
//!
//! Model shape: the lookup runs on a spawned thread, the removal on the main
//! thread (the other way round loom 0.7 explores one execution only:
//! tokio-rs/loom#392).
//!
//! What this model does NOT cover:
//! - handle clones racing each other (plain increments on a count the
//!   cloner already holds above zero; `Arc`'s argument);
//! - the real `Rcu`/`Srcu` domains (the model uses `ModelDomain`);
//! - replacement (`insert` over a present key) racing a handle lookup,
//!   which shares the unlink-then-release path checked here.
#![cfg(loom)]

mod seqtree_common;

use loom::sync::Arc;
use loom::thread;
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
use rcu_registry::seqtree::SeqTree;

#[test]
#[cfg_attr(
    rcu_registry_broken_inc,
    should_panic(expected = "resurrected from zero")
)]
fn a_handle_is_never_taken_on_an_entry_whose_last_reference_is_gone() {
    seqtree_common::model(|| {
        let t = Arc::new(SeqTree::<u8, u8, ModelDomain>::with_domain(
            ModelDomain::new(),
        ));
        t.insert(1, 10);
        let reader = {
            let t = t.clone();
            thread::spawn(move || {
                // The handle outlives get_handle's own read section.
                if let Some(h) = t.get_handle(&1) {
                    assert_eq!(*h, 10);
                    drop(h);
                }
            })
        };
        assert!(t.remove(&1));
        reader.join().unwrap();
        assert!(t.get_handle(&1).is_none());
    });
}
