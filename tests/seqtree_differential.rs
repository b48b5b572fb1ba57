//! Differential tests: random operation sequences applied to a `SeqTree` (and
//! a `LatchTree`) and to `std::collections::BTreeMap` must give the same
//! answers; in debug builds the red-black invariants, key order and parent
//! links are checked after every operation.

use std::collections::BTreeMap;
use std::ops::Bound;

use proptest::prelude::*;
use rcu_registry::__internals::seqtree::CheckInvariants;
use rcu_registry::seqtree::{LatchTree, SeqTree};

#[derive(Clone, Debug)]
enum Op {
    Insert(u16, u32),
    Remove(u16),
    Get(u16),
    GetOrInsert(u16, u32),
    Handle(u16),
    Range(u16, u16),
    RetainMultiplesOf(u16),
    Clear,
}

/// Keys from a small space so that inserts collide with existing keys and
/// removes hit present ones about half the time.
fn op() -> impl Strategy<Value = Op> {
    let key = 0u16..96;
    prop_oneof![
        8 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
        6 => key.clone().prop_map(Op::Remove),
        4 => key.clone().prop_map(Op::Get),
        2 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::GetOrInsert(k, v)),
        2 => key.clone().prop_map(Op::Handle),
        2 => (key.clone(), key.clone()).prop_map(|(a, b)| Op::Range(a.min(b), a.max(b))),
        1 => (2u16..5).prop_map(Op::RetainMultiplesOf),
        1 => Just(Op::Clear),
    ]
}

fn check(t: &SeqTree<u16, u32>, model: &BTreeMap<u16, u32>) {
    if cfg!(debug_assertions) {
        t.check_invariants().expect("red-black invariants");
    }
    assert_eq!(t.len(), model.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn seqtree_answers_like_btreemap(ops in proptest::collection::vec(op(), 1..200)) {
        let t: SeqTree<u16, u32> = SeqTree::new();
        let mut model = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(k, v) => prop_assert_eq!(t.insert(k, v), model.insert(k, v)),
                Op::Remove(k) => prop_assert_eq!(t.remove(&k), model.remove(&k).is_some()),
                Op::Get(k) => {
                    let g = t.domain().read();
                    prop_assert_eq!(t.get(&g, &k), model.get(&k));
                    prop_assert_eq!(t.contains_key(&k), model.contains_key(&k));
                }
                Op::GetOrInsert(k, v) => {
                    let g = t.domain().read();
                    let got = *t.get_or_insert_with(&g, k, || v);
                    prop_assert_eq!(got, *model.entry(k).or_insert(v));
                }
                Op::Handle(k) => {
                    let h = t.get_handle(&k);
                    prop_assert_eq!(h.as_ref().map(|h| (*h.key(), **h)), model.get(&k).map(|v| (k, *v)));
                }
                Op::Range(a, b) => {
                    let g = t.domain().read();
                    let got: Vec<_> = t.range(&g, (Bound::Included(a), Bound::Excluded(b))).collect();
                    let want: Vec<_> = model.range(a..b).collect();
                    prop_assert_eq!(got, want);
                    let got: Vec<_> = t.range(&g, a..=b).map(|(k, _)| *k).collect();
                    let want: Vec<_> = model.range(a..=b).map(|(k, _)| *k).collect();
                    prop_assert_eq!(got, want);
                }
                Op::RetainMultiplesOf(m) => {
                    let before = model.len();
                    model.retain(|k, _| k % m == 0);
                    prop_assert_eq!(t.retain(|k, _| k % m == 0), before - model.len());
                }
                Op::Clear => {
                    t.clear();
                    model.clear();
                }
            }
            check(&t, &model);
        }
        let g = t.domain().read();
        let all: Vec<_> = t.iter(&g).collect();
        prop_assert_eq!(all, model.iter().collect::<Vec<_>>());
    }

    #[test]
    fn latch_tree_answers_like_btreemap(ops in proptest::collection::vec(op(), 1..200)) {
        let t: LatchTree<u16, u32> = LatchTree::new();
        let mut model = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(k, v) | Op::GetOrInsert(k, v) => {
                    prop_assert_eq!(t.insert(k, v), model.insert(k, v));
                }
                Op::Remove(k) | Op::RetainMultiplesOf(k) => {
                    prop_assert_eq!(t.remove(&k), model.remove(&k).is_some());
                }
                Op::Get(k) | Op::Handle(k) | Op::Range(k, _) => {
                    let g = t.domain().read();
                    prop_assert_eq!(t.get(&g, &k), model.get(&k));
                    prop_assert_eq!(t.get_cloned(&k), model.get(&k).copied());
                }
                Op::Clear => {
                    for k in model.keys() {
                        prop_assert!(t.remove(k));
                    }
                    model.clear();
                }
            }
            if cfg!(debug_assertions) {
                t.check_invariants().expect("both copies valid");
            }
            prop_assert_eq!(t.len(), model.len());
        }
    }
}

#[test]
#[should_panic(expected = "different domain")]
fn a_guard_of_another_srcu_instance_is_refused() {
    use rcu_registry::rcu::{Flavor, Srcu};
    let t: SeqTree<u16, u32, Srcu> = SeqTree::with_domain(Srcu::new());
    t.insert(1, 1);
    let other = Srcu::new();
    let g = Flavor::read(&other);
    let _ = t.get(&g, &1);
}

#[test]
fn the_same_srcu_instance_guard_is_accepted() {
    use rcu_registry::rcu::{Flavor, Srcu};
    let d = Srcu::new();
    let t: SeqTree<u16, u32, Srcu> = SeqTree::with_domain(d.clone());
    t.insert(1, 1);
    let g = Flavor::read(&d);
    assert_eq!(t.get(&g, &1), Some(&1));
}
