//! loom models of the quiescence ack protocol (`AckTable`,
//! `src/probes/runtime/quiesce/ack.rs`): the generations, the handler's
//! CAS that expects this generation's pending value, and the waiter's
//! poll and re-arm.
//!
//! The signal handler is modelled as a **thread** that runs the real
//! `AckTable::ack` with the target thread's tid and reads the target's IP
//! from an atomic (the real handler runs on the target thread and reads its
//! interrupted IP from the signal frame). Spawning that thread after a step
//! of the waiter models "the signal is sent after that step"; the thread
//! may run at any later point, which models delivery at any later point,
//! including a late delivery of an older round's signal.
//!
//! 1. `a_late_ack_from_an_older_round_never_counts_for_the_new_one`: round 1
//!    (ranges `OLD`) signals the target and is abandoned (timed out); round
//!    2 (ranges `NEW`) signals it again. The target sits inside `NEW` and
//!    outside `OLD`, so the only correct verdict for round 2 is *inside*; the
//!    old round's handler, whenever it runs, must not make the waiter
//!    conclude *outside*. Round 1 also lists another thread first, so a
//!    handler that reads the entries torn between the two layouts is
//!    covered.
//! 2. The same model with the handler's CAS replaced by a plain store of
//!    the verdict tagged with the generation it read
//!    (`ack_with_plain_store`, built only under loom): must FAIL with
//!    "wrong verdict" (the test is `should_panic`), i.e. the model catches
//!    the broken protocol.
//! 3. `an_outside_verdict_means_the_thread_has_left`: one round; the target
//!    starts inside and moves out at any point; the waiter re-arms and
//!    signals again (once) while it is seen inside. Whenever the
//!    waiter concludes *outside*, the target's IP it then reads is outside
//!    (the Release CAS / Acquire poll pairing carries the handler's
//!    observation to the waiter).
//!
//! Mutations checked by hand (edit `ack.rs`, run, revert): making the ack
//! CAS and the poll `Relaxed` fails model 3; making the handler's load of
//! the generation `Relaxed` fails model 1 (it can pair a new generation
//! with the old ranges). Dropping the odd "rewriting" generation from
//! `publish` still passes both, as the module docs of `ack.rs` claim: it
//! only spares handlers a torn read, it is not what makes acks sound.
//!
//! Run (each model in well under a minute):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" nice -n 10 cargo test -p loom-tests --release \
//!   --target-dir target/loom --test quiesce
//! ```
//!
//! What these models do NOT cover:
//! - the kernel side: `tgkill`, signal queueing and delivery, the real
//!   handler running *on* the target thread (program order with its code is
//!   stronger than the atomic IP the model reads), `rt_sigreturn`;
//! - the nested-handler test (the interrupted signal mask; no concurrency,
//!   covered by tests/runtime_quiesce.rs on real signals), the blocked-mask
//!   detection through `/proc`, timeouts, exited threads, batches beyond one
//!   table, range merging;
//! - more than one target thread or more than two rounds, the waiter mutex
//!   (waiters are serialized by it; the model has one waiter);
//! - the XOL area's use of the verdict (recycling), and executions beyond
//!   the preemption bound.
#![cfg(loom)]

mod seqtree_common;

use std::ops::Range;

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use rcu_registry::__internals::quiesce_ack::{Ack, AckTable};
// Preemption bound 3: enough for the old round's handler to be preempted
// between its loads and its write and the waiter between its steps, and
// each model still finishes in well under a minute.
use seqtree_common::model;

const TARGET: i32 = 7;
const OTHER: i32 = 9;
const OLD: Range<u64> = 10..20;
const NEW: Range<u64> = 30..40;
/// Inside `NEW`, outside `OLD`.
const IN_NEW: u64 = 35;
/// Outside both.
const AWAY: u64 = 50;

type Table = AckTable<2, 1>;

/// The handler as a thread: reads the target's IP and acks, with the
/// protocol's CAS or (`broken`) the plain store.
fn signal(table: &Arc<Table>, ip: &Arc<AtomicU64>, broken: bool) -> thread::JoinHandle<()> {
    let (table, ip) = (Arc::clone(table), Arc::clone(ip));
    thread::spawn(move || {
        // Relaxed: the real handler reads its own frame; see the header.
        let at = ip.load(Ordering::Relaxed);
        if broken {
            table.ack_with_plain_store(TARGET, at, false);
        } else {
            table.ack(TARGET, at, false);
        }
    })
}

/// Waits for entry `i` of `round` to be answered.
fn poll_answered(
    table: &Table,
    round: rcu_registry::__internals::quiesce_ack::Round,
    i: usize,
) -> Ack {
    loop {
        match table.poll(round, i) {
            Ack::Pending => thread::yield_now(),
            answered => return answered,
        }
    }
}

fn late_ack_model(broken: bool) {
    model(move || {
        let table = Arc::new(Table::new());
        let ip = Arc::new(AtomicU64::new(IN_NEW));
        table.publish(&[OLD], &[OTHER, TARGET]);
        let old_round = signal(&table, &ip, broken);
        // Round 1 is abandoned (as after a timeout); round 2 lists the
        // target first.
        let round = table.publish(&[NEW], &[TARGET]);
        let new_round = signal(&table, &ip, broken);
        let verdict = poll_answered(&table, round, 0);
        assert_eq!(
            verdict,
            Ack::Inside,
            "wrong verdict: the target is inside the new round's range"
        );
        old_round.join().unwrap();
        new_round.join().unwrap();
    });
}

#[test]
fn a_late_ack_from_an_older_round_never_counts_for_the_new_one() {
    late_ack_model(false);
}

#[test]
#[should_panic(expected = "wrong verdict")]
fn the_model_catches_a_plain_store_in_place_of_the_generation_checked_cas() {
    late_ack_model(true);
}

#[test]
fn an_outside_verdict_means_the_thread_has_left() {
    model(|| {
        let table = Arc::new(Table::new());
        let ip = Arc::new(AtomicU64::new(IN_NEW));
        let round = table.publish(&[NEW], &[TARGET]);
        let mover = {
            let ip = Arc::clone(&ip);
            // Relaxed: the target's own progress; only the handler's read
            // of it is modelled.
            thread::spawn(move || ip.store(AWAY, Ordering::Relaxed))
        };
        let mut signals = vec![signal(&table, &ip, false)];
        let verdict = loop {
            match poll_answered(&table, round, 0) {
                Ack::Inside if signals.len() < 2 => {
                    table.rearm(round, 0);
                    signals.push(signal(&table, &ip, false));
                }
                v => break v,
            }
        };
        if verdict == Ack::Outside {
            // Relaxed on purpose: only the protocol's Release/Acquire may
            // order the handler's read before this one.
            assert_eq!(
                ip.load(Ordering::Relaxed),
                AWAY,
                "wrong verdict: outside while the target is still inside"
            );
        } else {
            assert_eq!(verdict, Ack::Inside, "no nested acks in this model");
        }
        for s in signals {
            s.join().unwrap();
        }
        mover.join().unwrap();
    });
}
