//! Unit tests of the trees' single-threaded and lifetime guarantees, on the
//! reader-counting [`ModelDomain`] (deterministic reclamation).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::model_domain::ModelDomain;
use super::{LatchTree, SeqTree};
use crate::__internals::seqtree::CheckInvariants;
use crate::rcu::Flavor;

type Tree<V> = SeqTree<u32, V, ModelDomain>;

/// A value that counts its drops.
#[derive(Debug)]
struct Tracked(u32, Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

fn drops() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

#[test]
fn every_insertion_and_removal_order_keeps_red_black_invariants() {
    // Ascending, descending and interleaved orders exercise every rotation
    // case of insert and erase.
    let n = 200u32;
    let orders: Vec<Vec<u32>> = vec![
        (0..n).collect(),
        (0..n).rev().collect(),
        (0..n).map(|i| (i * 7919) % n).collect(),
    ];
    for ins in &orders {
        for del in &orders {
            let t: Tree<u32> = SeqTree::with_domain(ModelDomain::new());
            for &k in ins {
                assert_eq!(t.insert(k, k * 2), None);
                t.check_invariants().unwrap();
            }
            assert_eq!(t.len(), n as usize);
            for (i, &k) in del.iter().enumerate() {
                assert!(t.remove(&k));
                assert!(!t.remove(&k), "second removal of {k} reports absent");
                t.check_invariants().unwrap();
                assert_eq!(t.len(), n as usize - i - 1);
                assert_eq!(t.get_cloned(&k), None);
            }
            assert!(t.is_empty());
        }
    }
}

#[test]
fn get_finds_exactly_the_inserted_keys() {
    let t: Tree<String> = SeqTree::with_domain(ModelDomain::new());
    for k in (0..100).step_by(2) {
        t.insert(k, format!("v{k}"));
    }
    let g = t.domain().read();
    for k in 0..100 {
        let want = (k % 2 == 0).then(|| format!("v{k}"));
        assert_eq!(t.get(&g, &k), want.as_ref());
    }
    assert_eq!(t.get_key_value(&g, &4), Some((&4, &"v4".to_string())));
}

#[test]
fn replacing_returns_the_old_value_only_after_readers_holding_it_are_done() {
    let domain = ModelDomain::new();
    let t = Arc::new(SeqTree::<u32, String, ModelDomain>::with_domain(domain));
    t.insert(1, "old".into());
    let reader_done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let reader = {
        let (t, done) = (t.clone(), reader_done.clone());
        std::thread::spawn(move || {
            let g = t.domain().read();
            let v = t.get(&g, &1).unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            // The writer replaced the value meanwhile; our reference still
            // shows the old one, unchanged.
            assert_eq!(v, "old");
            done.store(true, Ordering::SeqCst);
            drop(g);
        })
    };
    rx.recv().unwrap();
    let old = t.insert(1, "new".into());
    assert!(
        reader_done.load(Ordering::SeqCst),
        "insert returned the old value while a reader still held it"
    );
    assert_eq!(old.as_deref(), Some("old"));
    assert_eq!(t.get_cloned(&1).as_deref(), Some("new"));
    assert_eq!(t.len(), 1);
    reader.join().unwrap();
    t.check_invariants().unwrap();
}

#[test]
#[should_panic(expected = "inside a read section")]
fn replacing_inside_a_read_section_panics_instead_of_deadlocking() {
    let t: Tree<u32> = SeqTree::with_domain(ModelDomain::new());
    t.insert(1, 1);
    let _g = t.domain().read();
    t.insert(1, 2);
}

#[test]
fn inserting_a_new_key_inside_a_read_section_is_fine() {
    let t: Tree<u32> = SeqTree::with_domain(ModelDomain::new());
    let g = t.domain().read();
    assert_eq!(t.insert(1, 1), None);
    assert!(t.remove(&1));
    assert_eq!(t.get(&g, &1), None);
}

#[test]
fn handle_outlives_guard_and_removal_and_frees_on_last_drop() {
    let d = drops();
    let t: Tree<Tracked> = SeqTree::with_domain(ModelDomain::new());
    t.insert(7, Tracked(70, d.clone()));
    let h = t.get_handle(&7).expect("present key gives a handle");
    let h2 = h.clone();
    assert!(h.is_linked());
    assert!(t.remove(&7));
    assert!(!h.is_linked());
    assert_eq!(t.get_handle(&7).map(|h| h.0), None);
    assert_eq!((h.key(), h.0, h2.value().0), (&7, 70, 70));
    assert_eq!(d.load(Ordering::SeqCst), 0, "pinned value is alive");
    drop(h);
    assert_eq!(d.load(Ordering::SeqCst), 0, "one handle still pins it");
    drop(h2);
    t.domain().barrier();
    assert_eq!(
        d.load(Ordering::SeqCst),
        1,
        "freed once after the last handle"
    );
}

#[test]
fn replacing_a_pinned_entry_leaves_the_old_value_with_its_handles() {
    let d = drops();
    let t: Tree<Tracked> = SeqTree::with_domain(ModelDomain::new());
    t.insert(1, Tracked(1, d.clone()));
    let h = t.get_handle(&1).unwrap();
    assert!(t.insert(1, Tracked(2, d.clone())).is_none());
    assert_eq!(h.0, 1, "the handle keeps the old value");
    assert_eq!(t.get_cloned_with(&1, |v| v.0), Some(2));
    assert_eq!(t.len(), 1);
    drop(h);
    t.domain().barrier();
    assert_eq!(d.load(Ordering::SeqCst), 1);
    drop(t);
    assert_eq!(
        d.load(Ordering::SeqCst),
        2,
        "dropping the tree frees the rest"
    );
}

#[test]
fn get_or_insert_with_makes_only_when_absent_and_a_panicking_make_changes_nothing() {
    let t: Tree<u32> = SeqTree::with_domain(ModelDomain::new());
    let calls = AtomicUsize::new(0);
    let g = t.domain().read();
    let v = t.get_or_insert_with(&g, 3, || {
        calls.fetch_add(1, Ordering::SeqCst);
        30
    });
    assert_eq!(*v, 30);
    let v = t.get_or_insert_with(&g, 3, || unreachable!("present key"));
    assert_eq!(*v, 30);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    drop(g);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let g = t.domain().read();
        t.get_or_insert_with(&g, 4, || panic!("make failed"));
    }));
    assert!(r.is_err());
    assert_eq!(t.len(), 1);
    assert!(!t.contains_key(&4));
    t.check_invariants().unwrap();
    // The lock was poisoned by the panic; writers carry on.
    t.insert(5, 50);
    let h = t.get_or_insert_handle_with(6, || 60);
    assert_eq!(*h, 60);
    assert_eq!(*t.get_or_insert_handle_with(5, || 0), 50);
}

#[test]
fn range_and_iter_yield_keys_in_order_within_bounds() {
    let t: Tree<u32> = SeqTree::with_domain(ModelDomain::new());
    for k in [5, 1, 9, 3, 7] {
        t.insert(k, k * 10);
    }
    let g = t.domain().read();
    let all: Vec<_> = t.iter(&g).map(|(k, v)| (*k, *v)).collect();
    assert_eq!(all, vec![(1, 10), (3, 30), (5, 50), (7, 70), (9, 90)]);
    let keys = |r: Vec<(&u32, &u32)>| r.into_iter().map(|(k, _)| *k).collect::<Vec<_>>();
    assert_eq!(keys(t.range(&g, 3..7).collect()), vec![3, 5]);
    assert_eq!(keys(t.range(&g, 3..=7).collect()), vec![3, 5, 7]);
    assert_eq!(keys(t.range(&g, 4..).collect()), vec![5, 7, 9]);
    assert_eq!(keys(t.range(&g, ..=1).collect()), vec![1]);
    assert_eq!(keys(t.range(&g, 10..).collect()), Vec::<u32>::new());
    assert_eq!(format!("{t:?}"), "{1: 10, 3: 30, 5: 50, 7: 70, 9: 90}");
}

#[test]
fn retain_and_clear_free_removed_values_in_one_batch_after_a_grace_period() {
    let d = drops();
    let t: Tree<Tracked> = SeqTree::with_domain(ModelDomain::new());
    for k in 0..10 {
        t.insert(k, Tracked(k, d.clone()));
    }
    let g = t.domain().read();
    let survivor = t.get(&g, &0).unwrap();
    assert_eq!(t.retain(|k, _| k % 2 == 1), 5);
    // Still inside the read section: nothing may be freed yet.
    assert_eq!(d.load(Ordering::SeqCst), 0);
    assert_eq!(survivor.0, 0);
    drop(g);
    t.domain().barrier();
    assert_eq!(d.load(Ordering::SeqCst), 5);
    t.check_invariants().unwrap();
    t.clear();
    t.domain().barrier();
    assert_eq!(d.load(Ordering::SeqCst), 10);
    assert!(t.is_empty());
    t.check_invariants().unwrap();
}

#[test]
fn a_panicking_retain_predicate_leaves_the_tree_unchanged() {
    let t: Tree<u32> = SeqTree::with_domain(ModelDomain::new());
    for k in 0..10 {
        t.insert(k, k);
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.retain(|k, _| if *k == 5 { panic!("no") } else { false })
    }));
    assert!(r.is_err());
    assert_eq!(t.len(), 10);
    t.check_invariants().unwrap();
}

#[test]
fn references_from_get_survive_dropping_the_tree_until_the_guard_ends() {
    let d = drops();
    let domain = ModelDomain::new();
    let t: Tree<Tracked> = SeqTree::with_domain(domain.clone());
    t.insert(1, Tracked(11, d.clone()));
    let g = domain.read();
    let v = t.get(&g, &1).unwrap();
    drop(t);
    assert_eq!(v.0, 11);
    assert_eq!(d.load(Ordering::SeqCst), 0);
    drop(g);
    domain.barrier();
    assert_eq!(d.load(Ordering::SeqCst), 1);
}

#[test]
#[should_panic(expected = "different domain")]
fn a_guard_of_another_domain_instance_is_refused() {
    let t: Tree<u32> = SeqTree::with_domain(ModelDomain::new());
    let other = ModelDomain::new();
    let g = other.read();
    let _ = t.get(&g, &1);
}

#[test]
fn latch_tree_matches_its_inserts_and_removes_in_both_copies() {
    let d = drops();
    let t: LatchTree<u32, Tracked, ModelDomain> = LatchTree::with_domain(ModelDomain::new());
    for k in (0..300).map(|i| (i * 7919) % 300) {
        assert!(t.insert(k, Tracked(k, d.clone())).is_none());
    }
    t.check_invariants().unwrap();
    let g = t.domain().read();
    for k in 0..300 {
        assert_eq!(t.get(&g, &k).map(|v| v.0), Some(k));
    }
    assert!(t.get(&g, &300).is_none());
    drop(g);
    for k in (0..300).step_by(3) {
        assert!(t.remove(&k));
        assert!(!t.remove(&k));
    }
    t.check_invariants().unwrap();
    assert_eq!(t.len(), 200);
    let old = t.insert(1, Tracked(1001, d.clone())).unwrap();
    assert_eq!(old.0, 1);
    drop(old);
    assert!(t.contains_key(&1));
    t.domain().barrier();
    assert_eq!(d.load(Ordering::SeqCst), 101);
    drop(t);
    assert_eq!(d.load(Ordering::SeqCst), 301);
}

impl<V: Send + 'static> SeqTree<u32, V, ModelDomain> {
    /// Test helper: maps the value for `key` inside a read section.
    fn get_cloned_with<R>(&self, key: &u32, f: impl FnOnce(&V) -> R) -> Option<R> {
        let g = self.domain().read();
        self.get(&g, key).map(f)
    }
}
