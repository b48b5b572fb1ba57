//! loom model of the uprobe optimizer pass's unlocked wait
//! (`runtime/jump.rs`, "One optimizer, two registries"; `uprobes/jump.rs`).
//!
//! For the live uprobes the pass cannot hold its state lock across its
//! grace period and quiescence wait: a uprobe writer (unregistration, a
//! consumer that opts out) calls the optimizer's hook with a file's stripe
//! held, and the dynamic linker's thread may wait for that stripe inside a
//! read section, so nothing that holds a stripe may wait for a grace
//! period. So the pass marks its batch's sites *pending* (detour written,
//! trap hits pointed at it), unlocks, waits, locks again and, before it
//! writes a site's `jmp`, checks that the site is still pending (a hook
//! that met it took it back: cleared its cell, retired its detour) and
//! still holds its `int3`. The writer's hook only takes the lock: it
//! never waits for the pass's grace period.
//!
//! The model: one site. The pass thread: locked, marks it pending and
//! points trap hits at the detour; unlocked, a grace period (`ModelDomain`,
//! with a trap-hit thread reading the cell in a read section); locked
//! again, the re-check (still pending, still its `int3`; otherwise the cell
//! cleared and the detour retired), then the `jmp` (one compare-and-swap
//! from `int3`: `InProcess` refuses a write over bytes the writer did not
//! expect; the tail and the first byte, written under one hold of the
//! lock, are one step here). The unregistering thread: the hook (locked: a
//! pending site is taken back, its detour retired; an optimized one is put
//! back on the trap path, its detour retired), then the original byte over
//! the `int3` (a compare-and-swap: finding a `jmp` there is a failed
//! restore, which the registry ignores, leaving the `jmp` and dropping its
//! records), written with the lock still held
//! (`JumpHook::to_trap_path_held`, as `uprobe/install.rs` does) or, the
//! old protocol, after it is released. Checked: the restore never finds a
//! `jmp`; no `jmp` is written to a retired detour; a detour is retired at
//! most once; the cell ends clear.
//!
//! Four tests:
//!
//! - the hook runs while the pass waits (the site pending before the
//!   writer starts): every order is safe;
//! - any order (the pass may mark the site pending after the hook ran:
//!   its candidates collected before it), the restore written under the
//!   hook's hold: every order is safe;
//! - the mutation, the pass writing its `jmp` without the pending
//!   re-check, is caught (`should_panic`);
//! - the old protocol, the restore written after the hook released the
//!   lock, is caught (`should_panic`): the re-check passes (the site is
//!   pending, its `int3` still there) and the pass writes its `jmp` before
//!   the restore. This model found that window in the runtime
//!   (`finish_removals` and `unprepare` called the hook, released it, and
//!   then restored the bytes); in the runtime a pass in it could also
//!   write its tail under the `int3` before the registry's restore put the
//!   original first byte back: the original byte before a `jmp`'s
//!   displacement, executed until the pass's failed first-byte write put
//!   the tail back. Now the hook's hold covers the restore.
//!
//! What it does NOT cover: the quiescence wait and the core syncs (the
//! `jump_opt.rs` model has them), the detour's contents and reclaim, more
//! than one site or writer, the background pass, `fork` (loom has no
//! processes: the live test forks during a paused pass,
//! `tests/runtime_jump_uprobes.rs`), and executions beyond the preemption
//! bound.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release
//! --target-dir target/loom --test uprobe_jump_pass`

#![cfg(loom)]

mod probe_common;

use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use probe_common::model;
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
use rcu_registry::rcu::Flavor;

const INT3: u8 = 0xcc;
const JMP: u8 = 0xe9;
const ORIG: u8 = 0x55;

/// The optimizer's state for the one site (under its state lock).
#[derive(Default)]
struct State {
    pending: bool,
    optimized: bool,
}

struct Site {
    rcu: ModelDomain,
    state: Mutex<State>,
    /// The site's first byte (SeqCst: the text, read whole).
    byte0: AtomicU8,
    /// Trap hits resume in the detour (the `DetourCell`).
    cell: AtomicBool,
    /// Times the detour was retired.
    retired: AtomicUsize,
}

impl Site {
    fn retire(&self) {
        // SeqCst: model bookkeeping, checked after the joins and by the
        // pass's `jmp` (which must never follow a retirement).
        let before = self.retired.fetch_add(1, Ordering::SeqCst);
        assert_eq!(before, 0, "a detour retired twice");
    }

    /// The pass: steps 1-2 locked, the grace period unlocked, the re-check
    /// and the `jmp` locked again.
    fn pass(&self, recheck: bool) {
        if self.mark_pending() {
            self.finish_pass(recheck);
        }
    }

    /// Locked again after the waits: the re-check, then the `jmp`.
    fn recheck_and_write(&self, recheck: bool) {
        let mut st = self.state.lock().unwrap();
        if recheck && !st.pending {
            // Taken back by the hook while the pass waited.
            return;
        }
        st.pending = false;
        if recheck && self.byte0.load(Ordering::SeqCst) != INT3 {
            // The text changed (restored): the site refused, its trap hits
            // back to completing the instruction themselves.
            self.cell.store(false, Ordering::Release);
            self.retire();
            return;
        }
        let wrote = self
            .byte0
            .compare_exchange(INT3, JMP, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if wrote {
            assert_eq!(
                self.retired.load(Ordering::SeqCst),
                0,
                "a jmp written to a retired detour"
            );
            st.optimized = true;
        } else {
            self.cell.store(false, Ordering::Release);
            self.retire();
        }
    }

    /// The pass's first locked step alone (steps 1 and 2).
    fn mark_pending(&self) -> bool {
        let mut st = self.state.lock().unwrap();
        if self.byte0.load(Ordering::SeqCst) != INT3 {
            return false;
        }
        st.pending = true;
        // Release: as in `pass`.
        self.cell.store(true, Ordering::Release);
        true
    }

    /// The rest of the pass after [`mark_pending`](Self::mark_pending).
    fn finish_pass(&self, recheck: bool) {
        self.rcu.synchronize();
        self.recheck_and_write(recheck);
    }

    /// Unregistration: the hook, then the original byte back, under the
    /// hook's hold of the lock (`held`) or after it.
    fn unregister(&self, held: bool) {
        {
            let mut st = self.state.lock().unwrap();
            if st.pending {
                st.pending = false;
                // Release: pairs with `trap_hit`'s Acquire (a hit that no
                // longer sees the cell completes the instruction itself).
                self.cell.store(false, Ordering::Release);
                self.retire();
            }
            if st.optimized {
                st.optimized = false;
                // Back to the trap path: `int3` over the `jmp`.
                self.byte0.store(INT3, Ordering::SeqCst);
                self.cell.store(false, Ordering::Release);
                self.retire();
            }
            if held {
                self.restore();
                return;
            }
        }
        self.restore();
    }

    /// The registry's restore, expecting its `int3`.
    fn restore(&self) {
        let restored = self
            .byte0
            .compare_exchange(INT3, ORIG, Ordering::SeqCst, Ordering::SeqCst);
        assert_eq!(restored, Ok(INT3), "the unregistration found a jmp");
    }

    /// A trap hit on the `int3`: in a read section, resumes in the detour
    /// if the cell says so.
    fn trap_hit(&self) {
        let _g = self.rcu.read();
        // Acquire pairs with the Release stores of the cell.
        let _ = self.cell.load(Ordering::Acquire);
    }
}

/// How the pass and the unregistration meet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// The site is pending before the unregistering thread starts.
    PendingFirst,
    /// Any order: the pass may mark the site pending after the hook.
    Free,
}

fn run(order: Order, recheck: bool, held: bool) {
    model(move || {
        let site = Arc::new(Site {
            rcu: ModelDomain::new(),
            state: Mutex::new(State::default()),
            byte0: AtomicU8::new(INT3),
            cell: AtomicBool::new(false),
            retired: AtomicUsize::new(0),
        });
        let (p, h) = (Arc::clone(&site), Arc::clone(&site));
        let pass = match order {
            Order::PendingFirst => {
                assert!(site.mark_pending());
                thread::spawn(move || p.finish_pass(recheck))
            }
            Order::Free => thread::spawn(move || p.pass(recheck)),
        };
        let hit = thread::spawn(move || h.trap_hit());
        site.unregister(held);
        pass.join().unwrap();
        hit.join().unwrap();
        assert_eq!(site.byte0.load(Ordering::SeqCst), ORIG);
        assert!(!site.cell.load(Ordering::SeqCst), "the cell left set");
    });
}

#[test]
fn a_site_taken_back_while_the_pass_waits_unlocked_gets_no_jmp() {
    run(Order::PendingFirst, true, true);
}

#[test]
fn a_pass_pending_after_the_hook_writes_nothing_before_a_held_restore() {
    run(Order::Free, true, true);
}

#[test]
#[should_panic(expected = "retired")]
fn the_model_catches_a_jmp_written_without_the_pending_recheck() {
    run(Order::PendingFirst, false, true);
}

/// The window the model found (module docs): the restore after the hook
/// released the lock.
#[test]
#[should_panic(expected = "the unregistration found a jmp")]
fn the_model_catches_a_restore_written_after_the_hook_let_go() {
    run(Order::Free, true, false);
}
