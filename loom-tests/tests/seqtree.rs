//! loom models of `SeqTree`: a lock-free lookup racing with an insert or a
//! remove that rotates or splices the tree (2 to 4 keys).
//!
//! What these models do NOT cover:
//! - the real `Rcu`/`Srcu` domains: the models use the reader-counting
//!   `ModelDomain` (same contract, far fewer states); the domains have their
//!   own models;
//! - trees larger than 4 keys, more than one writer operation per model, or
//!   more than one reader: preemption bounds keep each model in seconds;
//! - the walk-depth bound (`MAX_WALK`) is never reached here: the store
//!   orderings leave no cycle to cut, which is part of what is checked
//!   (a cycle would make a reader spin until loom gives up);
//! - `get_in_trap` (no locked fallback) is modelled against one removal
//!   only;
//! - `range` scans, `clear`, and `retain` removing at most half of the
//!   entries (same validation and unlink paths as `get` and `remove`,
//!   exercised by the stress tests instead); `retain` removing most
//!   entries rebuilds the tree, modelled once (3 keys, 2 removed) with one
//!   reader of the kept key.
//!
//! Model shape: the lookup runs on a spawned thread and the write on the
//! model's main thread. The other way round, loom 0.7 explores a single
//! execution (tokio-rs/loom#392: a spawned thread that loads an object it
//! later stores is never preempted); `model()` fails if that ever happens.
#![cfg(loom)]

mod seqtree_common;

use loom::sync::Arc;
use loom::thread;
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
use rcu_registry::__internals::seqtree::CheckInvariants;
use rcu_registry::rcu::Flavor;
use rcu_registry::seqtree::SeqTree;
use seqtree_common::model;

type Tree = SeqTree<u8, u8, ModelDomain>;

fn tree(keys: &[u8]) -> Arc<Tree> {
    let t = Arc::new(Tree::with_domain(ModelDomain::new()));
    for &k in keys {
        t.insert(k, k * 10);
    }
    t
}

/// Looks up every key in `present` (must be found with its value) and
/// `maybe` (found with its value, or not at all).
fn read_all(t: &Tree, present: &[u8], maybe: &[u8]) {
    let g = t.domain().read();
    for k in present {
        assert_eq!(t.get(&g, k), Some(&(k * 10)), "present key {k} missed");
    }
    for k in maybe {
        let v = t.get(&g, k);
        assert!(
            v.is_none() || v == Some(&(k * 10)),
            "key {k} has a foreign value"
        );
    }
}

#[test]
fn lookup_racing_an_insert_that_rotates_the_root_finds_present_keys() {
    // 1, 2 then 3: the insert fix-up rotates left at the root (2 moves up).
    model(|| {
        let t = tree(&[1, 2]);
        let r = {
            let t = t.clone();
            thread::spawn(move || read_all(&t, &[1, 2], &[3]))
        };
        assert_eq!(t.insert(3, 30), None);
        r.join().unwrap();
        t.check_invariants().unwrap();
    });
}

#[test]
fn lookup_racing_an_inner_double_rotation_finds_present_keys() {
    // 3, 1 then 2: inner grandchild, rotate left at 1 then right at 3.
    model(|| {
        let t = tree(&[3, 1]);
        let r = {
            let t = t.clone();
            thread::spawn(move || read_all(&t, &[3, 1], &[2]))
        };
        assert_eq!(t.insert(2, 20), None);
        r.join().unwrap();
        t.check_invariants().unwrap();
    });
}

#[test]
fn lookup_racing_a_remove_with_fixup_rotation_finds_present_keys() {
    // Tree 2(B) [1(B), 3(B) [-, 4(R)]]: removing 1 rotates left at 2.
    model(|| {
        let t = tree(&[2, 1, 3, 4]);
        let r = {
            let t = t.clone();
            thread::spawn(move || read_all(&t, &[2, 3, 4], &[1]))
        };
        assert!(t.remove(&1));
        r.join().unwrap();
        t.check_invariants().unwrap();
        assert_eq!(t.len(), 3);
    });
}

#[test]
fn lookup_racing_removal_of_a_two_child_node_finds_the_moved_successor() {
    // Removing the root 2 of [1, 2, 3, 4] moves its successor 3 up.
    model(|| {
        let t = tree(&[2, 1, 3, 4]);
        let r = {
            let t = t.clone();
            thread::spawn(move || read_all(&t, &[3, 1, 4], &[2]))
        };
        assert!(t.remove(&2));
        r.join().unwrap();
        t.check_invariants().unwrap();
    });
}

#[test]
fn lookup_racing_a_retain_that_rebuilds_finds_the_kept_key() {
    // Keeping 1 key of 3 empties the tree and links the kept node again
    // inside one write section: a reader of the kept key finds it (retrying
    // its misses), the removed ones are found or missed, never foreign.
    model(|| {
        let t = tree(&[2, 1, 3]);
        let r = {
            let t = t.clone();
            thread::spawn(move || read_all(&t, &[3], &[1, 2]))
        };
        assert_eq!(t.retain(|k, _| *k == 3), 2);
        r.join().unwrap();
        t.check_invariants().unwrap();
        assert_eq!(t.len(), 1);
    });
}

#[test]
fn lookup_racing_a_replacement_sees_old_or_new_never_neither() {
    model(|| {
        let t = Arc::new(Tree::with_domain(ModelDomain::new()));
        t.insert(1, 1);
        t.insert(2, 2);
        let r = {
            let t = t.clone();
            thread::spawn(move || {
                let g = t.domain().read();
                let v = t.get(&g, &1).copied();
                assert!(
                    v == Some(1) || v == Some(100),
                    "replacement hid the key: {v:?}"
                );
            })
        };
        assert_eq!(t.insert(1, 100), Some(1));
        r.join().unwrap();
        assert_eq!(t.get_cloned(&1), Some(100));
    });
}

#[test]
fn a_trap_lookup_racing_a_rotating_remove_finds_present_keys_and_never_waits() {
    // `get_in_trap` (the live trap path's lookup): no locked fallback. A key
    // present throughout is found; the removed one is found, missed, or
    // `Busy` (a miss writers kept from being confirmed), never a foreign
    // value; nothing takes the writer lock, so the model cannot block on it.
    model(|| {
        let t = tree(&[1, 2, 3, 4]);
        let r = {
            let t = t.clone();
            thread::spawn(move || {
                let g = t.domain().read();
                for k in [1u8, 2, 4] {
                    assert_eq!(
                        t.get_in_trap(&g, &k),
                        Ok(Some(&(k * 10))),
                        "present key {k}"
                    );
                }
                let v = t.get_in_trap(&g, &3);
                assert!(
                    matches!(v, Ok(None) | Ok(Some(&30)) | Err(_)),
                    "key 3: {v:?}"
                );
            })
        };
        assert!(t.remove(&3));
        r.join().unwrap();
        t.check_invariants().unwrap();
    });
}
