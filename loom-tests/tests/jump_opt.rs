//! loom model of the jump optimizer's state machine (`runtime/jump.rs`):
//! one site goes trap -> optimizing -> optimized -> unoptimizing (a post
//! handler joins, as `disable` and unregistration also un-optimize) ->
//! trap with its detour retired -> freed, then the original byte comes
//! back, while another thread calls the probed code once.
//!
//! The model is a transcription of the protocol, not the runtime's code
//! (which patches real text and cannot run under loom). What it stands for:
//!
//! - the text: `byte0` (`int3`, `jmp` or the original byte) and `tail`
//!   (original or the `jmp`'s displacement), SeqCst stores;
//! - `sync_cores` (membarrier SYNC_CORE): the writer waits until no
//!   instruction fetch that started before it is still in progress (a
//!   thread counts itself in `fetching` while it reads the bytes of the
//!   instruction at the probe);
//! - the quiescence waits (`quiesce.rs`, an IP sample of every thread):
//!   the writer waits until no thread counts itself in the displaced bytes
//!   (a trap hit sent back into them) or in the detour;
//! - the grace periods: `ModelDomain` (reader-counting RCU);
//! - the `DetourCell` (trap hits resume in the detour) and the slot's
//!   `live` flag, with the orderings the runtime uses.
//!
//! Checked: no thread ever executes rewritten bytes as an instruction
//! (a trap hit resuming inside the displaced bytes finds the original
//! tail; a `jmp` is always fetched whole); no jump-path hit runs a pre
//! handler once a post handler has joined (it could not run the post);
//! the detour is freed only when no thread is in it; a call counts one hit
//! on whichever path, and a redirected one never two.
//!
//! The unmutated model explores 1,081 executions at the default bound (3),
//! in a fraction of a second. Mutations the model catches (each a
//! `should_panic` test): writing the
//! tail without the quiescence wait, clearing the `DetourCell` before the
//! tail is restored, adding the post handler without the grace period,
//! freeing the detour without the wait.
//!
//! A second, smaller model (`UprobeCell`) covers the uprobe resume cell
//! (`uprobe/jump.rs`): one `(address, resume)` pair per uprobe, which trap
//! hits at one install read (resume with Acquire, address Relaxed) while
//! the optimizer points it at one install, clears it and points it at
//! another install (a file mapped twice): with the grace period between
//! clearing and re-pointing, no trap hit resumes in another install's
//! detour; without it (the mutation) one can.
//!
//! What it does NOT cover: the detour's register save and restore, the
//! relocation, more than one calling thread, batches of sites, signals
//! (a thread inside another handler: the runtime refuses without a proof),
//! and executions beyond the preemption bound.

#![cfg(loom)]

mod probe_common;

use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use probe_common::model;
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
use rcu_registry::rcu::Flavor;

const INT3: u8 = 0xcc;
const JMP: u8 = 0xe9;
const ORIG: u8 = 0x55;
const ORIG_TAIL: u8 = 1;
const REL: u8 = 2;

/// A step of the protocol left out, to prove the model catches it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mutation {
    None,
    TailWithoutQuiescence,
    CellClearedBeforeTail,
    PostWithoutGracePeriod,
    FreeWithoutWait,
}

struct Site {
    rcu: ModelDomain,
    byte0: AtomicU8,
    tail: AtomicU8,
    cell: AtomicBool,
    live: AtomicBool,
    post: AtomicBool,
    fetching: AtomicUsize,
    in_displaced: AtomicUsize,
    in_detour: AtomicUsize,
    freed: AtomicBool,
    hits: AtomicUsize,
}

/// The writer's side of a core sync or a quiescence wait. The SeqCst
/// fence (with the caller's after its count) stands for `membarrier`: loom
/// models SeqCst fences, not a total order of SeqCst accesses, so without
/// the pair a caller could count itself after the wait and still read the
/// byte from before the store (found by this model while it was written).
fn wait_zero(n: &AtomicUsize) {
    loop {
        fence(Ordering::SeqCst);
        if n.load(Ordering::SeqCst) == 0 {
            return;
        }
        thread::yield_now();
    }
}

impl Site {
    /// The relocated instructions and the jump back.
    fn run_detour(&self) {
        assert!(
            !self.freed.load(Ordering::SeqCst),
            "detour freed under a thread"
        );
        self.in_detour.fetch_sub(1, Ordering::SeqCst);
    }

    /// One call of the probed code. Returns whether it ran the original
    /// code (after the probe went away).
    fn call(&self) -> bool {
        loop {
            self.fetching.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let b = self.byte0.load(Ordering::SeqCst);
            if b == JMP {
                let t = self.tail.load(Ordering::SeqCst);
                assert_eq!(t, REL, "a torn jmp was fetched");
                self.in_detour.fetch_add(1, Ordering::SeqCst);
            } else if b == ORIG {
                let t = self.tail.load(Ordering::SeqCst);
                assert_eq!(t, ORIG_TAIL, "the original instruction with a jmp's tail");
            }
            self.fetching.fetch_sub(1, Ordering::SeqCst);
            match b {
                ORIG => return true,
                INT3 => {
                    // The trap path: a read section, the pre handler, then
                    // the displaced instruction.
                    let g = self.rcu.read();
                    self.hits.fetch_add(1, Ordering::SeqCst);
                    // Acquire pairs with the writer's Release stores.
                    if self.cell.load(Ordering::Acquire) {
                        self.in_detour.fetch_add(1, Ordering::SeqCst);
                        drop(g);
                        self.run_detour();
                    } else {
                        // Resumes in the XOL slot, then inside the
                        // displaced bytes.
                        self.in_displaced.fetch_add(1, Ordering::SeqCst);
                        drop(g);
                        let t = self.tail.load(Ordering::SeqCst);
                        assert_eq!(t, ORIG_TAIL, "a trap hit resumed inside rewritten bytes");
                        self.in_displaced.fetch_sub(1, Ordering::SeqCst);
                    }
                    return false;
                }
                _ => {
                    // The detour's stub, then its read section.
                    let g = self.rcu.read();
                    if !self.live.load(Ordering::Acquire) {
                        // Redirect: nothing ran; back to the probed address.
                        drop(g);
                        self.in_detour.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    assert!(
                        !self.post.load(Ordering::SeqCst),
                        "a jump hit ran a pre handler whose post handler it cannot run"
                    );
                    self.hits.fetch_add(1, Ordering::SeqCst);
                    drop(g);
                    self.run_detour();
                    return false;
                }
            }
        }
    }

    /// The optimizer and the hook, in the registry's writer order.
    fn writer(&self, m: Mutation) {
        // trap -> optimizing: trap hits resume in the detour.
        self.cell.store(true, Ordering::Release);
        self.rcu.synchronize();
        if m != Mutation::TailWithoutQuiescence {
            wait_zero(&self.in_displaced);
        }
        self.tail.store(REL, Ordering::SeqCst);
        wait_zero(&self.fetching);
        self.live.store(true, Ordering::Release);
        self.byte0.store(JMP, Ordering::SeqCst);
        wait_zero(&self.fetching);
        // optimized -> unoptimizing (a post handler joins).
        self.byte0.store(INT3, Ordering::SeqCst);
        wait_zero(&self.fetching);
        self.live.store(false, Ordering::Release);
        if m != Mutation::PostWithoutGracePeriod {
            self.rcu.synchronize();
        }
        if m == Mutation::CellClearedBeforeTail {
            self.cell.store(false, Ordering::Release);
        }
        self.tail.store(ORIG_TAIL, Ordering::SeqCst);
        wait_zero(&self.fetching);
        self.cell.store(false, Ordering::Release);
        self.post.store(true, Ordering::SeqCst);
        // The detour retired: reclaim.
        self.rcu.synchronize();
        if m != Mutation::FreeWithoutWait {
            wait_zero(&self.in_detour);
        }
        self.freed.store(true, Ordering::SeqCst);
        // Unregistration: the original byte back.
        self.byte0.store(ORIG, Ordering::SeqCst);
    }
}

fn run(m: Mutation) {
    model(move || {
        let site = Arc::new(Site {
            rcu: ModelDomain::new(),
            byte0: AtomicU8::new(INT3),
            tail: AtomicU8::new(ORIG_TAIL),
            cell: AtomicBool::new(false),
            live: AtomicBool::new(false),
            post: AtomicBool::new(false),
            fetching: AtomicUsize::new(0),
            in_displaced: AtomicUsize::new(0),
            in_detour: AtomicUsize::new(0),
            freed: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
        });
        let s = Arc::clone(&site);
        let caller = thread::spawn(move || {
            let original = s.call();
            let hits = s.hits.load(Ordering::SeqCst);
            assert_eq!(hits, usize::from(!original), "one hit per probed call");
        });
        site.writer(m);
        caller.join().unwrap();
    });
}

#[test]
fn a_call_racing_optimization_and_unoptimization_is_served_once_and_safely() {
    run(Mutation::None);
}

#[test]
#[should_panic(expected = "resumed inside rewritten bytes")]
fn the_model_catches_a_tail_written_without_the_quiescence_wait() {
    run(Mutation::TailWithoutQuiescence);
}

#[test]
#[should_panic(expected = "resumed inside rewritten bytes")]
fn the_model_catches_the_detour_cell_cleared_before_the_tail_is_restored() {
    run(Mutation::CellClearedBeforeTail);
}

#[test]
#[should_panic(expected = "cannot run")]
fn the_model_catches_a_post_handler_added_without_the_grace_period() {
    run(Mutation::PostWithoutGracePeriod);
}

#[test]
#[should_panic(expected = "freed under a thread")]
fn the_model_catches_a_detour_freed_without_the_wait() {
    run(Mutation::FreeWithoutWait);
}

/// The uprobe resume cell (`uprobe/jump.rs`, `UprobeCell::set_resume`,
/// `Uprobe::jump_resume`).
struct UprobeCell {
    rcu: ModelDomain,
    resume: AtomicU64,
    at: AtomicU64,
}

const INSTALL_A: u64 = 0x1000;
const INSTALL_B: u64 = 0x2000;
const DETOUR_A: u64 = 0xa0;
const DETOUR_B: u64 = 0xb0;

impl UprobeCell {
    fn set(&self, addr: u64, resume: u64) {
        self.at.store(addr, Ordering::Relaxed);
        self.resume.store(resume, Ordering::Release);
    }

    /// A trap hit at `vaddr`: where it resumes (0: completes the
    /// instruction itself).
    fn trap_hit(&self, vaddr: u64) -> u64 {
        let _g = self.rcu.read();
        let r = self.resume.load(Ordering::Acquire);
        if r != 0 && self.at.load(Ordering::Relaxed) == vaddr {
            r
        } else {
            0
        }
    }
}

fn run_cell(grace_period: bool) {
    model(move || {
        let cell = Arc::new(UprobeCell {
            rcu: ModelDomain::new(),
            resume: AtomicU64::new(0),
            at: AtomicU64::new(0),
        });
        cell.set(INSTALL_A, DETOUR_A);
        let c = Arc::clone(&cell);
        let hit_b = thread::spawn(move || {
            let r = c.trap_hit(INSTALL_B);
            assert!(
                r == 0 || r == DETOUR_B,
                "a trap hit resumed in another install's detour"
            );
        });
        // Un-optimized (a pass's stale site), then the other install
        // optimized: the reclaim's grace period comes between.
        cell.resume.store(0, Ordering::Release);
        if grace_period {
            cell.rcu.synchronize();
        }
        cell.set(INSTALL_B, DETOUR_B);
        hit_b.join().unwrap();
    });
}

#[test]
fn a_uprobe_trap_hit_resumes_only_in_its_own_installs_detour() {
    run_cell(true);
}

#[test]
#[should_panic(expected = "another install's detour")]
fn the_model_catches_a_resume_cell_pointed_elsewhere_without_a_grace_period() {
    run_cell(false);
}
