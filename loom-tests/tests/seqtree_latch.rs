//! loom models of `LatchTree`: lookups racing a writer never miss a present
//! key and never wait (the reader makes progress in every interleaving,
//! including those where the writer is preempted mid-update).
//!
//! What these models do NOT cover:
//! - a reader that interrupts the writer on the *same* thread (a signal
//!   handler): loom has no signals; `tests/seqtree_signal.rs` covers it on
//!   real threads;
//! - the real `Rcu` domain (the models use the reader-counting
//!   `ModelDomain`);
//! - more than one writer operation or more than one reader per model.
//!
//! Model shape: lookups on a spawned thread, the write on the main thread
//! (see `seqtree.rs` for why: tokio-rs/loom#392).
#![cfg(loom)]

mod seqtree_common;

use loom::sync::Arc;
use loom::thread;
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
use rcu_registry::__internals::seqtree::CheckInvariants;
use rcu_registry::rcu::Flavor;
use rcu_registry::seqtree::LatchTree;
use seqtree_common::model;

type Tree = LatchTree<u8, u8, ModelDomain>;

fn tree(keys: &[u8]) -> Arc<Tree> {
    let t = Arc::new(Tree::with_domain(ModelDomain::new()));
    for &k in keys {
        t.insert(k, k * 10);
    }
    t
}

#[test]
fn latch_lookup_racing_a_rotating_insert_never_misses() {
    model(|| {
        let t = tree(&[1, 2]);
        let r = {
            let t = t.clone();
            thread::spawn(move || {
                let g = t.domain().read();
                assert_eq!(t.get(&g, &1), Some(&10));
                assert_eq!(t.get(&g, &2), Some(&20));
            })
        };
        assert_eq!(t.insert(3, 30), None);
        r.join().unwrap();
        t.check_invariants().unwrap();
    });
}

#[test]
fn latch_lookup_racing_a_remove_never_misses() {
    model(|| {
        let t = tree(&[2, 1, 3]);
        let r = {
            let t = t.clone();
            thread::spawn(move || {
                let g = t.domain().read();
                assert_eq!(t.get(&g, &1), Some(&10));
                assert_eq!(t.get(&g, &3), Some(&30));
                let v = t.get(&g, &2);
                assert!(v.is_none() || v == Some(&20));
            })
        };
        assert!(t.remove(&2));
        r.join().unwrap();
        t.check_invariants().unwrap();
    });
}
