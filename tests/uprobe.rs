//! Specification tests of the uprobe registry: several in-memory address
//! spaces map the same file at different addresses.

mod uprobe_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rcu_registry::probes::arch::StepOutcome;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, SpaceId, UprobeOutcome};
use uprobe_support::*;

const A: u64 = 0x40_0000;
const B: u64 = 0x55_5555_0000;
const C: u64 = 0x7f00_1234_0000;

fn counting(n: &Arc<AtomicU64>) -> Consumer {
    let n = Arc::clone(n);
    Consumer::new(move |_, _| {
        n.fetch_add(1, Ordering::Relaxed);
        ConsumerAction::Continue
    })
}

fn noop() -> Consumer {
    Consumer::new(|_, _| ConsumerAction::Continue)
}

fn hit(reg: &Registry, space: SpaceId, vaddr: u64) -> UprobeFinished {
    let mut regs = trap_regs(vaddr);
    let mut stack = Stack::new();
    match reg.on_breakpoint(space, &mut regs, &mut stack) {
        UprobeOutcome::Done(o) => o,
        UprobeOutcome::SingleStep(s) => panic!("unexpected single-step {:?}", s.plan()),
    }
}

#[test]
fn registering_installs_the_breakpoint_in_every_space_that_maps_the_file() {
    let reg = Registry::new(Default::default());
    let (a, b, c) = (
        MemSpace::with_file(1, A),
        MemSpace::with_file(2, B),
        MemSpace::with_file(3, C),
    );
    mmap_file(&reg, &a);
    mmap_file(&reg, &b);
    mmap(&reg, &c, c.whole(OTHER)).unwrap();
    reg.register(key(OFF_NOP), &noop()).unwrap();
    assert_eq!(a.byte(A + OFF_NOP), 0xcc);
    assert_eq!(b.byte(B + OFF_NOP), 0xcc);
    assert_eq!(
        c.text.snapshot(),
        file_bytes(),
        "a space mapping another file is untouched"
    );
    assert_eq!(reg.installed_at(a.id, A + OFF_NOP), Some(key(OFF_NOP)));
    assert_eq!(reg.installed_at(b.id, B + OFF_NOP), Some(key(OFF_NOP)));
    assert_eq!(reg.installs_in(c.id), 0);
}

#[test]
fn the_same_offset_resolves_to_the_same_uprobe_at_each_space_s_address() {
    let reg = Registry::new(Default::default());
    let (a, b) = (MemSpace::with_file(1, A), MemSpace::with_file(2, B));
    mmap_file(&reg, &a);
    mmap_file(&reg, &b);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let c = Consumer::new(move |h, regs| {
        s.lock().unwrap().push((h.space, h.vaddr, h.key, regs.ip));
        ConsumerAction::Continue
    });
    reg.register(key(OFF_NOP), &c).unwrap();
    assert_eq!(reg.find(a.id, A + OFF_NOP), Some(key(OFF_NOP)));
    assert_eq!(reg.find(b.id, B + OFF_NOP), Some(key(OFF_NOP)));
    assert_eq!(
        reg.find(a.id, B + OFF_NOP),
        None,
        "B's address means nothing in A"
    );
    assert!(matches!(
        hit(&reg, a.id, A + OFF_NOP),
        UprobeFinished::Emulated
    ));
    assert!(matches!(
        hit(&reg, b.id, B + OFF_NOP),
        UprobeFinished::Emulated
    ));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (a.id, A + OFF_NOP, key(OFF_NOP), A + OFF_NOP),
            (b.id, B + OFF_NOP, key(OFF_NOP), B + OFF_NOP)
        ],
        "handlers see the space, its address, the key, and ip at the probe"
    );
    assert_eq!(c.hits(), 2);
}

#[test]
fn a_mapping_made_after_registration_gets_the_breakpoint() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    reg.register(key(OFF_PUSH), &noop()).unwrap();
    assert_eq!(a.byte(A), 0x55);
    assert_eq!(mmap_file(&reg, &a), 1);
    assert_eq!(a.byte(A), 0xcc);
}

#[test]
fn a_mapping_of_part_of_the_file_installs_only_uprobes_in_its_range() {
    let reg = Registry::new(Default::default());
    reg.register(key(OFF_PUSH), &noop()).unwrap();
    reg.register(key(OFF_NOP), &noop()).unwrap();
    // Map file offsets 0x4.. at A (the image holds the file from 0x4 on).
    let a = MemSpace::new(1, A, file_bytes()[4..].to_vec());
    let m = rcu_registry::probes::uprobe::FileMapping {
        vaddr: A..A + (FILE_LEN as u64 - 4),
        file: FILE,
        file_offset: 4,
    };
    assert_eq!(mmap(&reg, &a, m).unwrap(), 1);
    assert_eq!(reg.installed_at(a.id, A), Some(key(OFF_NOP)));
    assert_eq!(a.byte(A), 0xcc);
    assert_eq!(reg.installs_in(a.id), 1);
}

#[test]
fn our_breakpoint_already_there_counts_as_installed() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let n = Arc::new(AtomicU64::new(0));
    let c = counting(&n);
    reg.register(key(OFF_PUSH), &c).unwrap();
    // A forked child inherits the patched text.
    let child = MemSpace::new(2, A, a.text.snapshot());
    let writes = child.text.writes_done();
    assert_eq!(mmap_file(&reg, &child), 0, "nothing written: it was there");
    assert_eq!(child.text.writes_done(), writes);
    assert_eq!(reg.installed_at(child.id, A), Some(key(OFF_PUSH)));
    let mut regs = trap_regs(A);
    regs.gprs[5] = 0xbeef;
    let mut stack = Stack::new();
    let out = reg.on_breakpoint(child.id, &mut regs, &mut stack);
    assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Emulated)));
    assert_eq!(regs.ip, A + 1);
    assert_eq!(regs.sp, Stack::top() - 8);
    assert_eq!(n.load(Ordering::Relaxed), 1);
    drop(out);
    reg.unregister(key(OFF_PUSH), &c).unwrap();
    assert_eq!(a.text.snapshot(), file_bytes());
    assert_eq!(
        child.text.snapshot(),
        file_bytes(),
        "the inherited breakpoint is removed too"
    );
}

#[test]
fn removing_the_last_consumer_restores_every_space_byte_for_byte() {
    let reg = Registry::new(Default::default());
    let (a, b) = (MemSpace::with_file(1, A), MemSpace::with_file(2, B));
    mmap_file(&reg, &a);
    mmap_file(&reg, &b);
    let (c1, c2) = (noop(), noop());
    reg.register(key(OFF_MOV), &c1).unwrap();
    reg.register(key(OFF_MOV), &c2).unwrap();
    assert_eq!(reg.consumers(key(OFF_MOV)), 2);
    reg.unregister(key(OFF_MOV), &c1).unwrap();
    assert_eq!(a.byte(A + OFF_MOV), 0xcc, "one consumer left: still armed");
    reg.unregister(key(OFF_MOV), &c2).unwrap();
    assert_eq!(a.text.snapshot(), file_bytes());
    assert_eq!(b.text.snapshot(), file_bytes());
    assert!(reg.is_empty());
    assert_eq!((reg.installs_in(a.id), reg.installs_in(b.id)), (0, 0));
    // Slots are freed by a callback after a grace period.
    reg.domain().barrier();
    assert_eq!((a.xol.in_use(), b.xol.in_use()), (0, 0));
}

#[test]
fn consumers_run_in_registration_order_and_a_skip_stops_the_rest() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let order = Arc::new(Mutex::new(Vec::new()));
    let mk = |tag: u8, act: ConsumerAction| {
        let o = Arc::clone(&order);
        Consumer::new(move |_, regs| {
            o.lock().unwrap().push(tag);
            if act == ConsumerAction::SkipInstruction {
                regs.ip = 0x1234;
            }
            act
        })
    };
    let (c1, c2, c3) = (
        mk(1, ConsumerAction::Continue),
        mk(2, ConsumerAction::SkipInstruction),
        mk(3, ConsumerAction::Continue),
    );
    for c in [&c1, &c2, &c3] {
        reg.register(key(OFF_NOP), c).unwrap();
    }
    let mut regs = trap_regs(A + OFF_NOP);
    let out = reg.on_breakpoint(a.id, &mut regs, &mut Stack::new());
    assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Skipped)));
    assert_eq!(regs.ip, 0x1234);
    assert_eq!(*order.lock().unwrap(), vec![1, 2]);
}

#[test]
fn a_filtered_consumer_is_installed_and_run_only_in_spaces_it_wants() {
    let reg = Registry::new(Default::default());
    let (a, b) = (MemSpace::with_file(1, A), MemSpace::with_file(2, B));
    mmap_file(&reg, &a);
    mmap_file(&reg, &b);
    let only_a = Consumer::filtered(|_, _| ConsumerAction::Continue, |s| s == SpaceId(1));
    reg.register(key(OFF_NOP), &only_a).unwrap();
    assert_eq!(a.byte(A + OFF_NOP), 0xcc);
    assert_eq!(
        b.text.snapshot(),
        file_bytes(),
        "B is not wanted: no breakpoint"
    );
    // A second, unfiltered consumer brings B in; the filtered one still
    // does not run there.
    let all = noop();
    reg.register(key(OFF_NOP), &all).unwrap();
    assert_eq!(b.byte(B + OFF_NOP), 0xcc);
    let _ = hit(&reg, b.id, B + OFF_NOP);
    assert_eq!((only_a.hits(), all.hits()), (0, 1));
    // Removing the unfiltered one takes B's breakpoint out, keeps A's.
    reg.unregister(key(OFF_NOP), &all).unwrap();
    assert_eq!(b.text.snapshot(), file_bytes());
    assert_eq!(a.byte(A + OFF_NOP), 0xcc);
}

#[test]
fn a_handler_that_asks_for_removal_is_not_called_again_and_is_reaped() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let once = Consumer::new(|_, _| ConsumerAction::Remove);
    reg.register(key(OFF_NOP), &once).unwrap();
    let _ = hit(&reg, a.id, A + OFF_NOP);
    let _ = hit(&reg, a.id, A + OFF_NOP);
    assert_eq!(once.hits(), 1);
    assert!(once.is_removed());
    assert_eq!(reg.reap_removed(), 1);
    assert!(reg.is_empty());
    assert_eq!(a.text.snapshot(), file_bytes());
}

#[test]
fn munmap_forgets_the_installs_and_a_new_mmap_installs_again() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    reg.register(key(OFF_NOP), &noop()).unwrap();
    assert_eq!(reg.on_munmap(a.id, A..A + FILE_LEN as u64), 1);
    assert_eq!(reg.installs_in(a.id), 0);
    assert!(reg.mappings_of(a.id).is_empty());
    assert_eq!(reg.find(a.id, A + OFF_NOP), None);
    // New pages from the file: the unmapped memory's breakpoint is gone.
    use rcu_registry::probes::text::TextMemory;
    a.text.write(A + OFF_NOP, &[0xcc], &[0x90]).unwrap();
    assert_eq!(reg.on_mmap(&a, a.whole(FILE)).unwrap(), 1);
    assert_eq!(a.byte(A + OFF_NOP), 0xcc);
    assert_eq!(reg.find(a.id, A + OFF_NOP), Some(key(OFF_NOP)));
}

#[test]
fn a_partial_munmap_keeps_the_rest_of_the_mapping() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    reg.register(key(OFF_PUSH), &noop()).unwrap();
    reg.register(key(OFF_NOP), &noop()).unwrap();
    assert_eq!(reg.on_munmap(a.id, A + 2..A + 0x10), 1);
    assert_eq!(reg.find(a.id, A), Some(key(OFF_PUSH)));
    assert_eq!(reg.find(a.id, A + OFF_NOP), None);
    let maps = reg.mappings_of(a.id);
    assert_eq!(maps.len(), 2);
    assert_eq!(maps[1].vaddr.start, A + 0x10);
    assert_eq!(maps[1].file_offset, 0x10);
}

#[test]
fn a_trap_that_raced_the_removal_is_reported_vanished() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let c = noop();
    reg.register(key(OFF_NOP), &c).unwrap();
    reg.unregister(key(OFF_NOP), &c).unwrap();
    let mut regs = trap_regs(A + OFF_NOP);
    let out = reg.on_breakpoint(a.id, &mut regs, &mut Stack::new());
    assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Vanished)));
    assert_eq!(regs.ip, A + OFF_NOP);
    assert!(matches!(hit(&reg, SpaceId(99), A), UprobeFinished::NotOurs));
}

#[test]
fn out_of_line_instructions_run_from_a_slot_of_the_hit_space() {
    let reg = Registry::new(Default::default());
    let (a, b) = (MemSpace::with_file(1, A), MemSpace::with_file(2, B));
    mmap_file(&reg, &a);
    mmap_file(&reg, &b);
    reg.register(key(OFF_MOV), &noop()).unwrap();
    reg.register(key(OFF_RIPREL), &noop()).unwrap();
    for (s, base) in [(&a, A), (&b, B)] {
        for off in [OFF_MOV, OFF_RIPREL] {
            let mut regs = trap_regs(base + off);
            let mut stack = Stack::new();
            match reg.on_breakpoint(s.id, &mut regs, &mut stack) {
                UprobeOutcome::Done(UprobeFinished::Boosted { slot }) => {
                    assert!(
                        s.xol.slot_bytes(slot).is_some(),
                        "slot in the space's own area"
                    );
                    assert_eq!(regs.ip, slot);
                }
                UprobeOutcome::SingleStep(step) => {
                    let slot = step.plan().slot_addr;
                    assert!(
                        s.xol.slot_bytes(slot).is_some(),
                        "slot in the space's own area"
                    );
                    assert_eq!(
                        step.plan().insn_addr,
                        base + off,
                        "analysed at this space's address"
                    );
                    // Pretend the slot ran: IP after the instruction in the slot.
                    let len = if off == OFF_MOV { 3 } else { 6 };
                    regs.ip = step_trap_ip(step.plan(), len);
                    loop {
                        match reg.on_step_complete(&step, &mut regs, &mut stack).unwrap() {
                            StepOutcome::Done => break,
                            StepOutcome::Repeat => continue,
                        }
                    }
                    assert_eq!(regs.ip, base + off + len, "back in the original code");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn handlers_may_sleep_and_unregister_waits_for_them() {
    let reg = Arc::new(Registry::new(Default::default()));
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let done = Arc::new(AtomicU64::new(0));
    let d = Arc::clone(&done);
    let slow = Consumer::new(move |_, _| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        d.store(1, Ordering::SeqCst);
        ConsumerAction::Continue
    });
    reg.register(key(OFF_NOP), &slow).unwrap();
    let r = Arc::clone(&reg);
    let space = a.id;
    let t = std::thread::spawn(move || {
        let _ = hit(&r, space, A + OFF_NOP);
    });
    while slow.hits() == 0 {
        std::thread::yield_now();
    }
    reg.unregister(key(OFF_NOP), &slow).unwrap();
    assert_eq!(
        done.load(Ordering::SeqCst),
        1,
        "unregister returned before the handler finished"
    );
    t.join().unwrap();
}

#[test]
fn a_kprobe_style_action_converts_to_the_same_consumer_answer() {
    use rcu_registry::probes::kprobe::Action;
    use rcu_registry::probes::outcome;
    use rcu_registry::probes::uprobe::ConsumerAction;
    assert_eq!(
        ConsumerAction::from(Action::Continue),
        ConsumerAction::Continue
    );
    assert_eq!(
        ConsumerAction::from(outcome::Action::SkipInstruction),
        ConsumerAction::SkipInstruction
    );
}

/// `unregister_many` with several consumers of one uprobe in the batch (the
/// general path: each removal sees the list the one before left), a uprobe
/// that keeps a consumer, and a uprobe whose only consumer goes (the
/// one-pass path); then a batch with a bad pair after good ones changes
/// nothing.
#[test]
fn unregister_many_handles_shared_uprobes_and_a_bad_pair_changes_nothing() {
    let reg = Registry::new(Default::default());
    let a = MemSpace::with_file(1, A);
    mmap_file(&reg, &a);
    let (c1, c2, c3) = (noop(), noop(), noop());
    // NOP: c1 and c2; MOV: c1 and c3; JMP: c1 alone.
    reg.register(key(OFF_NOP), &c1).unwrap();
    reg.register(key(OFF_NOP), &c2).unwrap();
    reg.register(key(OFF_MOV), &c1).unwrap();
    reg.register(key(OFF_MOV), &c3).unwrap();
    reg.register(key(OFF_JMP), &c1).unwrap();
    let before = a.text.snapshot();
    // A bad pair last: nothing changes, the good pairs before it included.
    let stranger = noop();
    assert!(reg
        .unregister_many(&[
            (key(OFF_NOP), &c1),
            (key(OFF_JMP), &c1),
            (key(OFF_MOV), &stranger),
        ])
        .is_err());
    assert_eq!(a.text.snapshot(), before);
    assert_eq!(reg.len(), 3);
    for off in [OFF_NOP, OFF_MOV, OFF_JMP] {
        assert_eq!(reg.installed_at(a.id, A + off), Some(key(off)));
    }
    // Both consumers of NOP, one of MOV's, JMP's only one.
    assert_eq!(
        reg.unregister_many(&[
            (key(OFF_NOP), &c1),
            (key(OFF_JMP), &c1),
            (key(OFF_MOV), &c1),
            (key(OFF_NOP), &c2),
        ]),
        Ok(4)
    );
    assert_eq!(reg.len(), 1, "MOV keeps c3");
    assert_eq!(reg.installed_at(a.id, A + OFF_MOV), Some(key(OFF_MOV)));
    assert_eq!(a.byte(A + OFF_MOV), 0xcc);
    assert_eq!(reg.installed_at(a.id, A + OFF_NOP), None);
    assert_eq!(reg.installed_at(a.id, A + OFF_JMP), None);
    let file = file_bytes();
    for off in [OFF_NOP, OFF_JMP] {
        assert_eq!(a.byte(A + off), file[off as usize], "restored at {off:#x}");
    }
    assert_eq!(reg.unregister_many(&[(key(OFF_MOV), &c3)]), Ok(1));
    assert_eq!(reg.len(), 0);
    assert_eq!(a.text.snapshot(), {
        let mut t = before.clone();
        for off in [OFF_NOP, OFF_MOV, OFF_JMP] {
            let at = (A + off - a.base()) as usize;
            t[at] = file[off as usize];
        }
        t
    });
}
