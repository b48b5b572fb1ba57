//! The hit cache in front of the uprobe tree (`with_hit_cache_slots`): with
//! any number of slots, including too few for the uprobes and none, every
//! hit finds its own uprobe, and a removed uprobe is never found.

mod uprobe_support;

use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeOutcome};
use uprobe_support::*;

const A: u64 = 0x40_0000;
/// Offsets holding `nop`s (the test file is `nop`s past its first
/// instructions).
const NOPS: [u64; 8] = [0x10, 0x11, 0x12, 0x18, 0x20, 0x21, 0x30, 0x3f];

fn counting() -> Consumer {
    Consumer::new(|_, _| ConsumerAction::Continue)
}

/// Hits `offset` in `space` once; whether a consumer ran is read from the
/// consumers' counters by the caller.
fn hit(reg: &Registry, space: &MemSpace, offset: u64) -> UprobeFinished {
    let mut regs = trap_regs(A + offset);
    match reg.on_breakpoint(space.id, &mut regs, &mut Stack::new()) {
        UprobeOutcome::Done(o) => o,
        UprobeOutcome::SingleStep(_) => panic!("a nop is emulated"),
    }
}

/// Registers a consumer on every offset of [`NOPS`], hits each, removes
/// every other one, hits all again, and re-registers the removed ones.
fn every_hit_finds_its_own_uprobe(reg: Registry) {
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let cs: Vec<Consumer> = NOPS.iter().map(|_| counting()).collect();
    for (o, c) in NOPS.iter().zip(&cs) {
        reg.register(key(*o), c).unwrap();
    }
    for o in NOPS {
        assert!(matches!(hit(&reg, &a, o), UprobeFinished::Emulated));
    }
    assert!(cs.iter().all(|c| c.hits() == 1), "each ran once: {cs:?}");
    for (o, c) in NOPS.iter().zip(&cs).step_by(2) {
        reg.unregister(key(*o), c).unwrap();
    }
    for (i, o) in NOPS.iter().enumerate() {
        let out = hit(&reg, &a, *o);
        if i % 2 == 0 {
            // The breakpoint is gone: the trap raced its removal.
            assert!(
                matches!(out, UprobeFinished::Vanished),
                "offset {o:#x}: {out:?}"
            );
        } else {
            assert!(
                matches!(out, UprobeFinished::Emulated),
                "offset {o:#x}: {out:?}"
            );
        }
        assert_eq!(reg.find(a.id, A + o).is_some(), i % 2 == 1);
    }
    let expect: Vec<u64> = (0..NOPS.len()).map(|i| 1 + (i % 2) as u64).collect();
    assert_eq!(cs.iter().map(Consumer::hits).collect::<Vec<_>>(), expect);
    for (o, c) in NOPS.iter().zip(&cs).step_by(2) {
        reg.register(key(*o), c).unwrap();
    }
    for o in NOPS {
        assert!(matches!(hit(&reg, &a, o), UprobeFinished::Emulated));
    }
    // The removed ones missed the middle round.
    let expect: Vec<u64> = (0..NOPS.len()).map(|i| 2 + (i % 2) as u64).collect();
    assert_eq!(cs.iter().map(Consumer::hits).collect::<Vec<_>>(), expect);
}

#[test]
fn hits_find_their_uprobe_with_the_default_cache() {
    every_hit_finds_its_own_uprobe(Registry::new(Default::default()));
}

#[test]
fn hits_find_their_uprobe_when_all_share_one_two_slot_set() {
    every_hit_finds_its_own_uprobe(Registry::new(Default::default()).with_hit_cache_slots(2));
}

#[test]
fn hits_find_their_uprobe_with_the_cache_off() {
    every_hit_finds_its_own_uprobe(Registry::new(Default::default()).with_hit_cache_slots(0));
}

#[test]
fn an_odd_slot_count_is_rounded_up_and_works() {
    every_hit_finds_its_own_uprobe(Registry::new(Default::default()).with_hit_cache_slots(3));
}
