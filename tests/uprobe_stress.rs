//! Stress test of the uprobe registry: threads hit breakpoints in three
//! address spaces while consumers come and go and one space is unmapped
//! and mapped again.
//!
//! Checked: a trap on a breakpoint in a space that stays mapped is never
//! "not ours"; every hit on the consumer registered for the whole window
//! ran its handler exactly once; no transient consumer's handler runs after
//! its `unregister` returned; at the end every space's text is the file's.
//!
//! Return handlers: a consumer with a return handler stays on the function
//! entry at offset 0 for the whole window, and every other transient
//! consumer there has one too. Every hit there hijacks the return address;
//! the hitter then returns through the trampoline, which must send it back
//! to its caller and run the pinned return handler exactly once per call;
//! no transient return handler runs after its `unregister` returned.
//!
//! XOL slots: the churn removes and re-installs the out-of-line offsets far
//! faster than their slots' releases run; a re-install takes back the slot
//! still waiting for its grace period, so each space ends with one slot
//! bound per out-of-line address, all freed (checked at the end).
//!
//! Both run with the default hit cache and with a two-slot one (every
//! uprobe in one set: slots change hands under the hits).
//!
//! Duration: `UPROBE_STRESS_SECS` (default 2; at least 10 when `CI=true`),
//! per test.
//! Run: `cargo test --release --test uprobe_stress -- --ignored --nocapture`.

mod stress_time;
mod uprobe_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcu_registry::probes::arch::DataMemory;
use rcu_registry::probes::arch::StepOutcome;
use rcu_registry::probes::outcome::ReturnOutcome;
use rcu_registry::probes::text::TextMemory;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeOutcome};
use uprobe_support::*;

const BASES: [u64; 3] = [0x40_0000, 0x55_0000_0000, 0x7f00_0000_0000];
const HITTERS: usize = 3;
const OFFSETS: [u64; 4] = [OFF_NOP, OFF_PUSH, OFF_MOV, OFF_RIPREL];
/// Offsets in [`OFFSETS`] that run from an XOL slot (`OFF_MOV`,
/// `OFF_RIPREL`; the others are emulated).
const OUT_OF_LINE: usize = 2;

fn duration() -> Duration {
    stress_time::stress_duration("UPROBE_STRESS_SECS", 2.0, 10.0)
}

/// The hitters' simulated caller.
const CALLER: u64 = 0x9000_0000;

#[derive(Default)]
struct Counts {
    returns: AtomicU64,
    traps: AtomicU64,
    nop_emulated: AtomicU64,
    vanished: AtomicU64,
    not_ours_unstable: AtomicU64,
    steps: AtomicU64,
    boosted: AtomicU64,
}

#[test]
#[ignore = "stress test: run with --ignored (CI runs it in release)"]
fn hits_stay_exact_while_consumers_and_mappings_change() {
    stress(Registry::new(Default::default()));
}

/// The same with a two-slot hit cache: every uprobe competes for one set,
/// so publishing, overwriting and retracting slots race the hits all the
/// time, and most hits fall back to the tree.
#[test]
#[ignore = "stress test: run with --ignored (CI runs it in release)"]
fn hits_stay_exact_when_every_uprobe_shares_one_hit_cache_set() {
    stress(Registry::new(Default::default()).with_hit_cache_slots(2));
}

fn stress(reg: Registry) {
    let reg = Arc::new(reg);
    let spaces: Vec<_> = BASES
        .iter()
        .enumerate()
        .map(|(i, &b)| MemSpace::with_file(i as u64 + 1, b))
        .collect();
    for s in &spaces {
        mmap_file(&reg, s);
    }
    let pinned_runs = Arc::new(AtomicU64::new(0));
    let pinned = {
        let n = Arc::clone(&pinned_runs);
        Consumer::new(move |_, _| {
            n.fetch_add(1, Ordering::Relaxed);
            ConsumerAction::Continue
        })
    };
    reg.register(key(OFF_NOP), &pinned).unwrap();
    let pinned_ret = Consumer::builder().ret_handler(|_, _| {}).build();
    reg.register_in_function(key(FN0), FN0, &pinned_ret)
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let late = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration();
    let mut threads = Vec::new();

    for t in 0..HITTERS {
        let (reg, spaces, stop, counts) = (
            Arc::clone(&reg),
            spaces.clone(),
            Arc::clone(&stop),
            Arc::clone(&counts),
        );
        threads.push(std::thread::spawn(move || {
            let mut i = t;
            let mut stack = Stack::new();
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(1);
                let s = &spaces[i % spaces.len()];
                let off = OFFSETS[(i / spaces.len()) % OFFSETS.len()];
                let vaddr = s.base() + off;
                if s.byte(vaddr) != 0xcc {
                    continue;
                }
                counts.traps.fetch_add(1, Ordering::Relaxed);
                let stable = s.id.0 != 3;
                let mut regs = trap_regs(vaddr);
                // The caller's return address, where a call leaves it.
                stack.write(Stack::top(), &CALLER.to_le_bytes()).unwrap();
                match reg.on_breakpoint(s.id, &mut regs, &mut stack) {
                    UprobeOutcome::Done(UprobeFinished::Emulated) => {
                        if off == OFF_NOP {
                            counts.nop_emulated.fetch_add(1, Ordering::Relaxed);
                        }
                        if off == FN0 {
                            return_through_trampoline(&reg, s, &mut stack);
                            counts.returns.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    UprobeOutcome::Done(UprobeFinished::Vanished) => {
                        assert!(
                            off != OFF_NOP || !stable,
                            "the pinned uprobe vanished from a mapped space"
                        );
                        counts.vanished.fetch_add(1, Ordering::Relaxed);
                    }
                    UprobeOutcome::Done(UprobeFinished::NotOurs) if !stable => {
                        counts.not_ours_unstable.fetch_add(1, Ordering::Relaxed);
                    }
                    UprobeOutcome::Done(UprobeFinished::Boosted { .. }) => {
                        counts.boosted.fetch_add(1, Ordering::Relaxed);
                    }
                    UprobeOutcome::SingleStep(step) => {
                        let len = if off == OFF_MOV { 3 } else { 6 };
                        regs.ip = step_trap_ip(step.plan(), len);
                        let r = reg.on_step_complete(&step, &mut regs, &mut stack).unwrap();
                        assert_eq!(r, StepOutcome::Done);
                        assert_eq!(regs.ip, vaddr + len);
                        counts.steps.fetch_add(1, Ordering::Relaxed);
                    }
                    UprobeOutcome::Done(other) => {
                        panic!("space {:?} offset {off:#x}: {other:?}", s.id)
                    }
                }
            }
        }));
    }

    // Churn: transient consumers on every offset, including a second one
    // next to the pinned consumer.
    let churn = {
        let (reg, stop, late) = (Arc::clone(&reg), Arc::clone(&stop), Arc::clone(&late));
        std::thread::spawn(move || {
            let mut ops = 0u64;
            let mut i = 0usize;
            // One round before looking at `stop` (the final check wants it).
            while ops == 0 || !stop.load(Ordering::Relaxed) {
                i += 1;
                let off = OFFSETS[i % OFFSETS.len()];
                let alive = Arc::new(AtomicBool::new(true));
                let c = {
                    let (alive, late) = (Arc::clone(&alive), Arc::clone(&late));
                    let (alive2, late2) = (Arc::clone(&alive), Arc::clone(&late));
                    let b = Consumer::builder().handler(move |_, _| {
                        if !alive.load(Ordering::SeqCst) {
                            late.fetch_add(1, Ordering::Relaxed);
                        }
                        ConsumerAction::Continue
                    });
                    if off == FN0 {
                        b.ret_handler(move |_, _| {
                            if !alive2.load(Ordering::SeqCst) {
                                late2.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                        .build()
                    } else {
                        b.build()
                    }
                };
                reg.register_in_function(key(off), if off == FN0 { FN0 } else { 0 }, &c)
                    .unwrap();
                std::thread::sleep(Duration::from_micros(200));
                reg.unregister(key(off), &c).unwrap();
                alive.store(false, Ordering::SeqCst);
                ops += 2;
            }
            ops
        })
    };

    // Mapper: space 3 goes away and comes back with fresh file pages.
    let mapper = {
        let (reg, s, stop) = (Arc::clone(&reg), Arc::clone(&spaces[2]), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut cycles = 0u64;
            let file = file_bytes();
            // One cycle before looking at `stop` (the final check wants it).
            while cycles == 0 || !stop.load(Ordering::Relaxed) {
                reg.on_munmap(s.id, s.base()..s.base() + FILE_LEN as u64);
                for off in OFFSETS {
                    let a = s.base() + off;
                    let orig = file[off as usize];
                    let _ = s.text.write(a, &[0xcc], &[orig]);
                }
                std::thread::sleep(Duration::from_micros(100));
                reg.on_mmap(&s, s.whole(FILE)).unwrap();
                cycles += 1;
            }
            cycles
        })
    };

    // Past the deadline until the hitters have both hit the pinned `nop`
    // and returned through the trampoline: when they first do is the
    // scheduler's business, so the run goes on rather than the test failing.
    while Instant::now() < deadline
        || counts.nop_emulated.load(Ordering::Relaxed) == 0
        || counts.returns.load(Ordering::Relaxed) == 0
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let ops = churn.join().unwrap();
    let cycles = mapper.join().unwrap();
    reg.unregister(key(OFF_NOP), &pinned).unwrap();
    reg.unregister(key(FN0), &pinned_ret).unwrap();

    let c = &*counts;
    let nop = c.nop_emulated.load(Ordering::Relaxed);
    let returns = c.returns.load(Ordering::Relaxed);
    println!(
        "uprobe stress: {} traps ({} nop, {returns} returns through the trampoline, {} boosted, {} steps, {} vanished, {} not-ours in the remapped space), {ops} register/unregister, {cycles} munmap/mmap cycles",
        c.traps.load(Ordering::Relaxed),
        nop,
        c.boosted.load(Ordering::Relaxed),
        c.steps.load(Ordering::Relaxed),
        c.vanished.load(Ordering::Relaxed),
        c.not_ours_unstable.load(Ordering::Relaxed),
    );
    assert!(
        nop > 0 && returns > 0 && ops > 0 && cycles > 0,
        "every actor made progress"
    );
    assert_eq!(
        pinned_ret.ret_hits(),
        returns,
        "the pinned return handler ran exactly once per tracked call"
    );
    assert_eq!(
        pinned_runs.load(Ordering::Relaxed),
        nop,
        "the pinned consumer ran exactly once per emulated hit"
    );
    assert_eq!(
        late.load(Ordering::Relaxed),
        0,
        "a handler ran after unregister returned"
    );
    assert!(reg.is_empty());
    for s in &spaces {
        assert_eq!(s.text.snapshot(), file_bytes(), "space {:?} restored", s.id);
    }
    // Every slot comes back once its releases have run; a re-install that
    // took back a slot still waiting for its grace period allocated none.
    reg.domain().barrier();
    for s in &spaces {
        println!(
            "  space {:?}: {} XOL allocations, {} frees, {} slots bound (of {XOL_SLOTS})",
            s.id,
            s.xol.allocs(),
            s.xol.frees(),
            s.xol.parked(),
        );
        assert_eq!(s.xol.in_use(), 0, "space {:?}: every slot freed", s.id);
        assert!(
            s.xol.parked() <= OUT_OF_LINE,
            "space {:?}: one slot per out-of-line address, however fast the churn",
            s.id
        );
        assert_eq!(s.xol.allocs(), s.xol.frees(), "space {:?}", s.id);
    }
}

/// The function entered at `FN0` returns: its return address must be the
/// trampoline (the pinned consumer wants every call), and `on_return` must
/// send the thread back to [`CALLER`] and free the instance.
fn return_through_trampoline(reg: &Registry, s: &MemSpace, stack: &mut Stack) {
    let mut slot = [0u8; 8];
    stack.read(Stack::top(), &mut slot).unwrap();
    let tramp = s.trampoline.unwrap();
    assert_eq!(
        u64::from_le_bytes(slot),
        tramp,
        "the entry hijacked the return"
    );
    let mut regs = rcu_registry::probes::arch::Regs {
        ip: tramp,
        sp: Stack::top() + 8,
        ..Default::default()
    };
    assert_eq!(
        reg.on_return(s.id, &mut regs),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(reg.return_depth(s.id), 0, "the instance is freed");
}
