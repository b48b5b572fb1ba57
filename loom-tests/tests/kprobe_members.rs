//! loom models of an aggregated kprobe site's member list: probes appended
//! in place (a slot stored, then the length published with a Release
//! store), removed in place (the slot cleared, or marked when the probe has
//! a post handler) and compacted by `commit` (a copy without the removed
//! slots, published with a Release swap, the old list retired), racing a
//! hit on the site.
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
//!    still runs p's post, and the commit compacts the site (a copy
//!    published with a Release swap, the old list retired) and waits for
//!    the step before it returns (p's data poisoned right after).
//!
//! The models are known to bite: with the length's publication in
//! `Members::push` made `Relaxed`, both report a causality violation on q's
//! data; with the commit not compacting a site that lost a probe with a
//! post handler, model 2 reports p's post handler racing the poison.
//!
//! What these models do NOT cover:
//! - a list replaced because it is full (growth: the old list goes to the
//!   domain's callback worker; model 5 of `kprobe.rs` covers that
//!   retirement path with a step in flight, since a site's first join is a
//!   growth);
//! - compaction of a list whose removed probes had no post handler (same
//!   publication as model 2's, without the steps);
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

#[test]
fn a_hit_sees_a_member_appended_or_removed_in_place_fully_or_not_at_all() {
    join_leave_compact(F, false);
}

#[test]
fn a_step_in_flight_runs_the_post_handler_of_a_removed_member_before_commit_returns() {
    join_leave_compact(G, true);
}
