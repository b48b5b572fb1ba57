//! Shared by the seqtree loom models.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Runs `f` under loom with preemption bound 3, prints how many executions
/// were explored, and fails if only one was: with loom 0.7 a model whose
/// spawned thread loads an object it later stores is never preempted
/// (tokio-rs/loom#392) and would silently check nothing.
pub fn model(f: impl Fn() + Sync + Send + 'static) {
    // A std atomic: it counts outside the model.
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f()
    });
    let runs = runs.load(Ordering::Relaxed);
    println!("explored {runs} executions");
    assert!(
        runs > 1,
        "loom explored one execution only: the model checks nothing"
    );
}
