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
//! A registration inside the site's displaced bytes (another uprobe at
//! the byte after its first, `UprobeRegistry::jump_hold`): the hook, the
//! install's read of the original instruction and its breakpoint under
//! one hold of the lock, against the pass writing the `jmp`'s
//! displacement over that byte (step 5, a compare-and-swap from the
//! original byte) and then its first byte. Checked: the install reads the
//! original byte and its breakpoint goes in; the site ends on the trap
//! path.
//!
//! Six tests:
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
//!   the tail back. Now the hook's hold covers the restore;
//! - a registration inside the displaced bytes under the hold: every order
//!   is safe;
//! - the registration's old protocol (the hook released before the
//!   install reads) is caught (`should_panic`): the pass writes its `jmp`
//!   between the two, and the install reads the displacement as the
//!   original instruction (or, a little later, has its breakpoint
//!   refused).
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
/// The original byte after the site's first: where a registration inside
/// the displaced bytes installs.
const ORIG1: u8 = 0x89;
/// The `jmp`'s displacement byte written over it.
const DISP: u8 = 0x17;

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
    /// The byte after it: under the `jmp`'s displacement once optimized.
    byte1: AtomicU8,
    /// Trap hits resume in the detour (the `DetourCell`).
    cell: AtomicBool,
    /// Times the detour was retired.
    retired: AtomicUsize,
}

impl Site {
    /// The site with its `int3` written and its original byte after it.
    fn new() -> Site {
        Site {
            rcu: ModelDomain::new(),
            state: Mutex::new(State::default()),
            byte0: AtomicU8::new(INT3),
            byte1: AtomicU8::new(ORIG1),
            cell: AtomicBool::new(false),
            retired: AtomicUsize::new(0),
        }
    }

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
        // Step 5, the tail under the `int3`, expecting the original byte
        // (`InProcess` refuses a write over bytes it did not expect); then
        // step 6, the first byte (the tail put back if that fails).
        let tail = self
            .byte1
            .compare_exchange(ORIG1, DISP, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        let wrote = tail
            && self
                .byte0
                .compare_exchange(INT3, JMP, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        if tail && !wrote {
            self.byte1.store(ORIG1, Ordering::SeqCst);
        }
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
            self.take_back(&mut st);
            if held {
                self.restore();
                return;
            }
        }
        self.restore();
    }

    /// The hook's work on the site, state locked: a pending site taken
    /// back, an optimized one put back on the trap path (`int3` over the
    /// `jmp`, the original byte over its displacement).
    fn take_back(&self, st: &mut State) {
        if st.pending {
            st.pending = false;
            // Release: pairs with `trap_hit`'s Acquire (a hit that no
            // longer sees the cell completes the instruction itself).
            self.cell.store(false, Ordering::Release);
            self.retire();
        }
        if st.optimized {
            st.optimized = false;
            self.byte0.store(INT3, Ordering::SeqCst);
            self.byte1.store(ORIG1, Ordering::SeqCst);
            self.cell.store(false, Ordering::Release);
            self.retire();
        }
    }

    /// A registration of another uprobe at the byte after the site (inside
    /// its displaced bytes): the hold, the hook, the install's read of
    /// "the original instruction", and its breakpoint (a compare-and-swap
    /// from what it read), all under the hold (`held`, as
    /// `UprobeRegistry::jump_hold` does) or, the old protocol, the read and
    /// the write after the hook let go.
    fn register_inside(&self, held: bool) {
        let mut st = self.state.lock().unwrap();
        self.take_back(&mut st);
        if !held {
            drop(st);
            return self.install_inside();
        }
        self.install_inside();
        drop(st);
    }

    /// The install's read and its breakpoint. Either failing means a pass
    /// wrote between the hook and the install: reading the displacement
    /// as the original instruction is the corruption; a refused write
    /// (`InProcess` checks the bytes it replaces) is a spurious error.
    fn install_inside(&self) {
        let read = self.byte1.load(Ordering::SeqCst);
        assert_eq!(
            read, ORIG1,
            "a pass wrote between the hook and the install: it read the jmp's displacement"
        );
        let wrote = self
            .byte1
            .compare_exchange(read, INT3, Ordering::SeqCst, Ordering::SeqCst);
        assert!(
            wrote.is_ok(),
            "a pass wrote between the hook and the install: its breakpoint was refused"
        );
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
        let site = Arc::new(Site::new());
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

/// A registration inside the site's displaced bytes racing the pass (any
/// order: the pass's candidates were collected before the registration).
fn run_inside(held: bool) {
    model(move || {
        let site = Arc::new(Site::new());
        let (p, h) = (Arc::clone(&site), Arc::clone(&site));
        let pass = thread::spawn(move || p.pass(true));
        let hit = thread::spawn(move || h.trap_hit());
        site.register_inside(held);
        pass.join().unwrap();
        hit.join().unwrap();
        // The install's breakpoint is in, over the original byte; the site
        // ends on the trap path (refused, or put back by the hook).
        assert_eq!(site.byte1.load(Ordering::SeqCst), INT3);
        assert_eq!(site.byte0.load(Ordering::SeqCst), INT3);
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

#[test]
fn a_registration_inside_the_displaced_bytes_under_the_hold_reads_the_original_code() {
    run_inside(true);
}

/// The window of the registration paths before the hold: the hook let go
/// before the install read the text, and a pass that had collected the
/// site wrote its `jmp` in between.
#[test]
#[should_panic(expected = "a pass wrote between the hook and the install")]
fn the_model_catches_an_install_that_reads_after_the_hook_let_go() {
    run_inside(false);
}
