//! loom model of the uprobe hit cache (`src/probes/uprobe/hitcache.rs`):
//! a slot changing hands under a hit.
//!
//! The registry has a two-slot cache (one set: every uprobe competes for
//! it). Uprobe A (file 1) is registered and owns a slot; then, at once:
//! one thread unregisters A's last consumer (retract, unlink, grace
//! period), another registers uprobe B on another file that no space maps
//! (it only enters the tree and the cache: a publish into the same set,
//! possibly into the slot A just left), and the main thread traps on A's
//! breakpoint. Checked: the hit either runs A's handler
//! before `unregister` returns (the handler's data is poisoned right after;
//! a handler not ordered before that is a loom data race, and a hit
//! through a stale slot pointer would read a freed node, which loom
//! reports) or misses cleanly (`Vanished`, or no trap); it never runs B's
//! handler for A's trap; afterwards only B is registered.
//!
//! What this model does NOT cover:
//! - the real `Srcu` domain: the registry runs on the reader-counting
//!   `ModelDomain` (same grace-period contract);
//! - more than two uprobes per set, overwriting a full set, and caches
//!   with more than one set (the set index is plain arithmetic);
//! - XOL single-steps, return tracking, several consumers (see
//!   `uprobe.rs` and `uprobe_ret.rs`);
//! - executions beyond the preemption bound (2).

#![cfg(loom)]

mod probe_common;

use std::sync::atomic::{AtomicBool as StdBool, Ordering as StdOrd};

use loom::sync::Arc;
use loom::thread;
use probe_common::{execute, model_with, Reg, Space, Val, BASE, FILE, KEY, S1};
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
use rcu_registry::probes::arch::X86_64;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, FileId, FileMapping, UprobeKey};

const FILE_A: FileId = FILE;
const FILE_B: FileId = FileId { dev: 1, inode: 3 };
const KEY_A: UprobeKey = KEY;
const KEY_B: UprobeKey = UprobeKey {
    file: FILE_B,
    offset: 0,
};

/// `file`'s one byte (a `nop`) mapped at `at`.
fn map(file: FileId, at: u64) -> FileMapping {
    FileMapping {
        vaddr: at..at + 1,
        file,
        file_offset: 0,
    }
}

#[test]
fn a_hit_while_its_cache_slot_changes_hands_runs_its_own_live_handler_or_misses() {
    // Three threads through the registry's locks and the domain's reader
    // counts take more scheduling points than loom's default allows.
    model_with(2, Some(20_000), || {
        let reg = Arc::new(Reg::with_domain(X86_64, ModelDomain::new()).with_hit_cache_slots(2));
        let space = std::sync::Arc::new(Space::new(S1, vec![0x90], map(FILE_A, BASE)));
        reg.on_mmap(&space, map(FILE_A, BASE)).unwrap();
        let data = Arc::new(Val::default());
        let a = {
            let data = data.clone();
            Consumer::new(move |hit, _| {
                assert_eq!(hit.key, KEY_A);
                data.touch();
                ConsumerAction::Continue
            })
        };
        let b_ran = Arc::new(StdBool::new(false));
        let b = {
            let b_ran = b_ran.clone();
            Consumer::new(move |hit, _| {
                assert_eq!(hit.key, KEY_B);
                b_ran.store(true, StdOrd::SeqCst);
                ConsumerAction::Continue
            })
        };
        reg.register(KEY_A, &a).unwrap();
        let remover = {
            let (reg, data) = (reg.clone(), data.clone());
            thread::spawn(move || {
                reg.unregister(KEY_A, &a).unwrap();
                data.poison();
            })
        };
        let adder = {
            let (reg, b) = (reg.clone(), b.clone());
            thread::spawn(move || reg.register(KEY_B, &b).unwrap())
        };
        match execute(&reg, &space) {
            None | Some(UprobeFinished::Vanished) | Some(UprobeFinished::Emulated) => {}
            Some(other) => panic!("trapped on A's breakpoint, got {other:?}"),
        }
        remover.join().unwrap();
        adder.join().unwrap();
        assert!(!b_ran.load(StdOrd::SeqCst), "B's handler ran for A's trap");
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.consumers(KEY_B), 1);
        assert_eq!(reg.find(S1, BASE), None);
    });
}
