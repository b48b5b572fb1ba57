//! loom models of an aggregated kprobe site's member list: probes appended
//! in place (a slot stored, then the length published with a Release
//! store), removed in place (the slot cleared, or marked when the probe has
//! a post handler), the commit's wait for the post handlers of removed
//! members (the site's post epoch bumped with a Release store, read by hits
//! relaxed with the length, both followed by one acquire fence before any
//! slot, as the site's list and bucket head are read; then the old epoch's
//! step count drained after the grace period) and its compaction (a copy
//! without the removed
//! slots, published with a Release swap, the old list retired, once removed
//! slots are half the list), racing a hit on the site.
//!
//! p and a second member (so that the list has room: a site's first list
//! holds its one probe) are registered before the hitter starts.
//!
//! 1. `nop` (emulated, no post handler): a hit racing "q joins in place;
//!    p leaves (its slot cleared); commit" (one removed slot of three and
//!    no post handler: the commit leaves the list uncompacted, so p's
//!    safety is the grace period alone) runs q's handler fully or not at
//!    all (q's data is written by the writer after the hitter started, so
//!    only q's publication orders that write before the handler's access; a
//!    hit that sees the new length without that order is a loom data race),
//!    and runs p's handler before `commit` returns or not at all (p's data
//!    is poisoned right after).
//! 2. `mov eax, 1` (single-stepped: the probes have post handlers): the
//!    same race with p's post handler on a step that may still be in
//!    flight when p leaves: p's slot is marked, not cleared, so the step
//!    still runs p's post, and the commit (no copy: one removed slot of
//!    three) bumps the site's post epoch and waits for the old epoch's
//!    steps before it returns (p's data poisoned right after).
//! 3. Two members with post handlers leave one after the other, each with
//!    its own `unregister` (a commit each: the post epoch goes round both
//!    parities, and the second commit also compacts, two removed slots of
//!    three), racing one single-stepped hit: each post handler runs before
//!    its own `unregister` returns or not at all.
//! 4. p (post handler) leaves, its handle dropped, then q, the site's last
//!    member, in the same batch (one commit), racing one single-stepped
//!    hit: p's handler (whose captured data is poisoned when it is
//!    dropped) outlives every step that may run it, on the site's final
//!    list, which the commit frees before it gives any probe back.
//!
//! The models are known to bite: with the length's publication in
//! `Members::push` made `Relaxed`, models 1 and 2 report a causality
//! violation on q's data; with the commit not waiting for the old epoch's
//! steps, or with the epoch's store made `Relaxed` (a hit that reads the
//! new epoch but p's slot from before the mark runs p's pre handler
//! uncounted), models 2 and 3 report p's post handler racing the poison;
//! with the hit's one acquire fence after the epoch and length loads
//! removed (2026-12-07), models 1 and 2 report a causality violation and
//! model 3 p's post handler racing the poison; with `finish` giving the probes back in batch order (p before
//! the final list it is still in), model 4 fails: p's post handler runs
//! after p was dropped, a use after free (here a SIGSEGV).
//!
//! What these models do NOT cover:
//! - a list replaced because it is full (growth: the old list goes to the
//!   domain's callback worker; model 5 of `kprobe.rs` covers that
//!   retirement path with a step in flight, since a site's first join is a
//!   growth);
//! - members past the 64 whose pre handlers a step tracks;
//! - more than one hitter, nested hits, enable/disable, kretprobes;
//! - executions beyond the preemption bound (2).

#![cfg(loom)]

mod probe_common;

use std::sync::Arc;

use loom::thread;
use probe_common::{model_with, Stack, Val, SP};
use rcu_registry::probes::arch::{Regs, X86_64};
use rcu_registry::probes::kprobe::{Action, HitOutcome, Kprobe, KprobeRegistry, StepResult};
use rcu_registry::probes::resolve::SymbolTable;
use rcu_registry::probes::text::Image;
use rcu_registry::probes::xol::XolArena;
use rcu_registry::rcu::Rcu;

/// `f`: nop; ret (emulated).
const F: u64 = 0x100;
/// `g`: mov eax, 1; ret (run out of line).
const G: u64 = 0x110;

type Reg = KprobeRegistry<X86_64, Image>;

fn registry() -> Reg {
    let mut code = vec![0xccu8; 0x100];
    code[0] = 0x90;
    code[1] = 0xc3;
    code[0x10..0x16].copy_from_slice(&[0xb8, 0x01, 0, 0, 0, 0xc3]);
    let mut syms = SymbolTable::new();
    syms.insert("f", F, 2).insert("g", G, 6);
    KprobeRegistry::builder(
        X86_64,
        Image::new(F, code),
        syms,
        Arc::new(XolArena::new(0x10_0000, 1, X86_64::XOL_SLOT_SIZE)),
    )
    .rcu(Rcu::new())
    .buckets(2)
    .instance_stripes(1)
    .build()
}

/// A probe at `at` whose pre handler (or, with `post`, post handler)
/// touches `data`.
fn touching(at: u64, data: &Arc<Val>, post: bool) -> Kprobe {
    let data = data.clone();
    if post {
        Kprobe::at(at).post(move |_, _| data.touch()).build()
    } else {
        Kprobe::at(at)
            .pre(move |_, _| {
                data.touch();
                Action::Continue
            })
            .build()
    }
}

/// One hit at `at` (its breakpoint stays written throughout: p or q is
/// registered at every moment), completing the single-step if it is one.
fn hit_once(reg: &Reg, at: u64) {
    hit(reg, at, false)
}

/// [`hit_once`] on a site that may leave (`may_vanish`: the hit may find
/// it gone, as a thread that trapped just before the last member left).
fn hit(reg: &Reg, at: u64, may_vanish: bool) {
    let mut regs = Regs {
        ip: at + 1,
        sp: SP,
        ..Regs::default()
    };
    let mut stack = Stack(0);
    match reg.on_breakpoint(&mut regs, &mut stack) {
        HitOutcome::Emulated => assert_eq!(at, F),
        HitOutcome::SingleStep(token) => {
            assert_eq!(at, G);
            // The slot's instruction ran; the step trap comes.
            regs.ip = token
                .step_marker()
                .map_or_else(|| token.plan().fixups.ip.unwrap().from, |m| m + 1);
            assert!(matches!(
                reg.on_step_complete(token, &mut regs, &mut stack),
                StepResult::Done
            ));
        }
        // The length read before q joined, p's slot read after p left:
        // no member with a post handler ran, no step needed.
        HitOutcome::Boosted { .. } => assert_eq!(at, G),
        // Trapped while the site was armed, looked up after it left.
        HitOutcome::Vanished if may_vanish => {}
        other => panic!("a hit on a site that stays armed was {other:?}"),
    }
}

/// p is registered; a hitter hits once while q joins (in place), p leaves
/// and the commit compacts the site. Then p's data is poisoned.
fn join_leave_compact(at: u64, post: bool) {
    // Bound 2: 20,283 and 31,738 executions, 10 s together in release
    // (bound 3: 445,339 and 928,851, nearly 6 minutes).
    model_with(2, None, move || {
        let reg = Arc::new(registry());
        let p_data = Arc::new(Val::default());
        let q_data = Arc::new(Val::default());
        let p = touching(at, &p_data, post);
        reg.register(&p).unwrap();
        // A second member makes the list one with room (a site's first
        // list holds its one probe): q then joins in place. Disabled, so
        // that the hit only checks it (fewer steps for loom to interleave).
        let room = Kprobe::at(at).disabled().build();
        reg.register(&room).unwrap();
        let hitter = {
            let reg = reg.clone();
            thread::spawn(move || hit_once(&reg, at))
        };
        // Written after the hitter started: only q's publication orders it
        // before q's handler.
        q_data.touch();
        let q = touching(at, &q_data, post);
        reg.register(&q).unwrap();
        reg.unregister_nosync(&p).unwrap();
        reg.commit();
        // Every handler of p finished before commit returned.
        p_data.poison();
        hitter.join().unwrap();
        assert!(p.hits() <= 1 && q.hits() <= 1);
        assert_eq!(room.hits(), 0, "a disabled member runs nothing");
        let sites = reg.sites();
        assert_eq!(sites.len(), 1);
        assert_eq!(sites[0].probes, vec![room.id(), q.id()]);
        reg.unregister_many(&[&room, &q]).unwrap();
    });
}

/// p1 and p2 (post handlers) and a disabled member are registered; a
/// hitter single-steps once while p1, then p2, are unregistered one by one;
/// each one's data is poisoned when its `unregister` returns.
fn leave_one_by_one() {
    model_with(2, None, move || {
        let reg = Arc::new(registry());
        let d1 = Arc::new(Val::default());
        let d2 = Arc::new(Val::default());
        let p1 = touching(G, &d1, true);
        let p2 = touching(G, &d2, true);
        let room = Kprobe::at(G).disabled().build();
        for p in [&p1, &p2, &room] {
            reg.register(p).unwrap();
        }
        let hitter = {
            let reg = reg.clone();
            thread::spawn(move || hit_once(&reg, G))
        };
        reg.unregister(&p1).unwrap();
        d1.poison();
        reg.unregister(&p2).unwrap();
        d2.poison();
        hitter.join().unwrap();
        assert!(p1.hits() <= 1 && p2.hits() <= 1);
        assert_eq!(reg.sites()[0].probes, vec![room.id()]);
        reg.unregister(&room).unwrap();
    });
}

/// Poisons its data when dropped (with the handler that holds it).
struct PoisonOnDrop(Arc<Val>);

impl Drop for PoisonOnDrop {
    fn drop(&mut self) {
        self.0.poison();
    }
}

/// p (post handler, its data poisoned when the handler is dropped) and q
/// are registered; a hitter single-steps once while p leaves (its handle
/// dropped) and q, the last member, leaves in the same batch.
fn leave_with_the_site() {
    model_with(2, None, move || {
        let reg = Arc::new(registry());
        let held = PoisonOnDrop(Arc::new(Val::default()));
        let p = Kprobe::at(G).post(move |_, _| held.0.touch()).build();
        let q = Kprobe::at(G).build();
        reg.register(&p).unwrap();
        reg.register(&q).unwrap();
        let hitter = {
            let reg = reg.clone();
            thread::spawn(move || hit(&reg, G, true))
        };
        reg.unregister_nosync(&p).unwrap();
        // The registry's handle (in the pending batch) is the last one.
        drop(p);
        reg.unregister_nosync(&q).unwrap();
        reg.commit();
        hitter.join().unwrap();
        assert!(reg.sites().is_empty());
    });
}

#[test]
fn a_hit_sees_a_member_appended_or_removed_in_place_fully_or_not_at_all() {
    join_leave_compact(F, false);
}

#[test]
fn a_step_in_flight_runs_the_post_handler_of_a_removed_member_before_commit_returns() {
    join_leave_compact(G, true);
}

#[test]
fn post_handlers_of_members_removed_one_by_one_finish_before_each_unregister_returns() {
    leave_one_by_one();
}

#[test]
fn a_probe_given_back_by_a_commit_outlives_the_steps_on_its_sites_final_list() {
    leave_with_the_site();
}
