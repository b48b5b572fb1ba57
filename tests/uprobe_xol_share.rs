//! XOL slots under install/remove churn faster than grace periods: a
//! re-install at an address whose previous install's slot is still waiting
//! for its grace period takes that same slot back (when the planned bytes
//! are identical), so churn at one address holds one slot, other addresses
//! still get theirs, and the slot is freed once, after its last owner.
//!
//! The registries here run on [`HeldDomain`]: `Srcu` whose callbacks are
//! held until `barrier` (or [`HeldDomain::release`]) runs them, after a
//! grace period. Holding callbacks longer than one grace period is allowed
//! by the RCU contract, and it makes "faster than grace periods"
//! deterministic: every removal's slot release is still queued while the
//! next install happens.

mod uprobe_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rcu_registry::probes::arch::{Arch, X86_64};
use rcu_registry::probes::text::TextMemory;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{
    Consumer, ConsumerAction, UprobeKey, UprobeOutcome, UprobeRegistry,
};
use rcu_registry::probes::ProbeError;
use rcu_registry::rcu::{Flavor, GpCookie, Srcu};
use uprobe_support::*;

const A: u64 = 0x40_0000;
/// Removals and re-installs per churn loop.
const CHURN: usize = 200;

type Callback = Box<dyn FnOnce() + Send>;

/// `Srcu` with its callbacks held until [`release`](Self::release) or
/// `barrier` (see the module docs). Clones share one queue.
#[derive(Clone, Default)]
struct HeldDomain {
    inner: Srcu,
    held: Arc<Mutex<Vec<Callback>>>,
    barriers: Arc<AtomicUsize>,
}

impl HeldDomain {
    /// Runs every held callback (and those they queue) after a grace period.
    fn release(&self) {
        loop {
            let batch = std::mem::take(&mut *self.held.lock().unwrap());
            if batch.is_empty() {
                return;
            }
            self.inner.synchronize();
            batch.into_iter().for_each(|f| f());
        }
    }

    /// Callbacks queued and not run yet.
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// `barrier` calls so far (the registry's wait for queued slot frees).
    fn barriers(&self) -> usize {
        self.barriers.load(Ordering::SeqCst)
    }
}

impl Flavor for HeldDomain {
    type Guard<'a> = <Srcu as Flavor>::Guard<'a>;

    fn read(&self) -> Self::Guard<'_> {
        Flavor::read(&self.inner)
    }
    fn protects(&self, guard: &Self::Guard<'_>) -> bool {
        self.inner.protects(guard)
    }
    fn synchronize(&self) {
        Flavor::synchronize(&self.inner)
    }
    fn call<C: FnOnce() + Send + 'static>(&self, f: C) {
        self.held.lock().unwrap().push(Box::new(f));
    }
    fn barrier(&self) {
        self.barriers.fetch_add(1, Ordering::SeqCst);
        self.release();
    }
    fn start_poll(&self) -> GpCookie {
        Flavor::start_poll(&self.inner)
    }
    fn poll(&self, cookie: &GpCookie) -> bool {
        Flavor::poll(&self.inner, cookie)
    }
}

type Held = UprobeRegistry<X86_64, MemSpace, HeldDomain>;

fn held_registry() -> Held {
    UprobeRegistry::with_domain(X86_64, HeldDomain::default())
}

fn noop() -> Consumer {
    Consumer::new(|_, _| ConsumerAction::Continue)
}

/// Traps on the breakpoint at `vaddr` and returns the XOL slot the hit sends
/// the thread to, after checking that the slot holds byte for byte what
/// `code` (the displaced instruction) plans for it.
fn slot_hit(reg: &Held, space: &MemSpace, vaddr: u64, code: &[u8]) -> u64 {
    let mut regs = trap_regs(vaddr);
    let mut stack = Stack::new();
    let slot = match reg.on_breakpoint(space.id, &mut regs, &mut stack) {
        UprobeOutcome::Done(UprobeFinished::Boosted { slot }) => slot,
        UprobeOutcome::SingleStep(step) => step.plan().slot_addr,
        UprobeOutcome::Done(other) => panic!("expected an out-of-line run, got {other:?}"),
    };
    let plan = X86_64
        .plan_xol(&X86_64.analyze(vaddr, code).unwrap(), slot)
        .unwrap();
    let held = space.xol.slot_bytes(slot).unwrap();
    assert_eq!(
        &held[..plan.slot_bytes().len()],
        plan.slot_bytes(),
        "the slot holds the planned bytes"
    );
    slot
}

const MOV: [u8; 3] = [0x48, 0x89, 0xe5];
const RIPREL: [u8; 6] = [0x8b, 0x05, 0x10, 0x00, 0x00, 0x00];

/// A held registry, a space with 2 XOL slots mapping the file at `A`, and a
/// consumer on the out-of-line `mov`: its slot, as the hit finds it.
fn mov_installed() -> (Held, Arc<MemSpace>, Consumer, u64) {
    let reg = held_registry();
    let a = MemSpace::with_file_and_slots(1, A, 2);
    mmap(&reg, &a, a.whole(FILE)).unwrap();
    let c = noop();
    reg.register(key(OFF_MOV), &c).unwrap();
    let slot = slot_hit(&reg, &a, A + OFF_MOV, &MOV);
    (reg, a, c, slot)
}

/// The space unmaps and re-maps the file (the breakpoint stays in the
/// text): the install is removed and re-installed.
fn remap(reg: &Held, a: &Arc<MemSpace>) {
    assert_eq!(reg.on_munmap(a.id, A..A + FILE_LEN as u64), 1);
    mmap(reg, a, a.whole(FILE)).unwrap();
}

#[test]
fn churning_one_address_faster_than_grace_periods_holds_one_slot_and_leaves_others_theirs() {
    let (reg, a, c, slot) = mov_installed();
    for i in 0..CHURN {
        // A space re-mapped (the breakpoint stays in the text) and a
        // consumer removed and added: two removals, two re-installs.
        remap(&reg, &a);
        reg.unregister(key(OFF_MOV), &c).unwrap();
        reg.register(key(OFF_MOV), &c).unwrap();
        assert_eq!(
            (a.xol.in_use(), a.xol.allocs(), a.xol.frees()),
            (1, 1, 0),
            "churn round {i}: one slot, shared"
        );
    }
    assert_eq!(slot_hit(&reg, &a, A + OFF_MOV, &MOV), slot);
    assert!(
        reg.domain().held() >= 2 * CHURN,
        "the removals' releases were all still queued"
    );
    // Another address gets the second slot at once, with no wait for
    // queued frees.
    reg.register(key(OFF_RIPREL), &noop()).unwrap();
    let other = slot_hit(&reg, &a, A + OFF_RIPREL, &RIPREL);
    assert_ne!(other, slot);
    assert_eq!((a.xol.in_use(), a.xol.allocs()), (2, 2));
    assert_eq!(reg.domain().barriers(), 0, "no slot had to be reclaimed");
}

#[test]
fn a_shared_slot_is_freed_exactly_once_after_its_last_owner_goes() {
    let (reg, a, c, slot) = mov_installed();
    for _ in 0..CHURN {
        remap(&reg, &a);
    }
    // Every queued release runs: the live install still owns the slot.
    reg.domain().release();
    assert_eq!(
        (a.xol.in_use(), a.xol.frees()),
        (1, 0),
        "not freed under a live install"
    );
    assert_eq!(slot_hit(&reg, &a, A + OFF_MOV, &MOV), slot);
    // The last owner goes: freed once its release runs, not before.
    reg.unregister(key(OFF_MOV), &c).unwrap();
    assert_eq!(a.xol.frees(), 0, "the release waits for its callback");
    reg.domain().release();
    assert_eq!((a.xol.in_use(), a.xol.frees(), a.xol.parked()), (0, 1, 1));
    reg.domain().barrier();
    assert_eq!(a.xol.frees(), 1, "freed exactly once");
    // The parked slot comes back for its own address (the reuse rule).
    reg.register(key(OFF_MOV), &c).unwrap();
    assert_eq!(slot_hit(&reg, &a, A + OFF_MOV, &MOV), slot);
    assert_eq!((a.xol.in_use(), a.xol.allocs()), (1, 2));
}

#[test]
fn a_re_install_whose_planned_bytes_differ_takes_a_fresh_slot() {
    let (reg, a, _c, old) = mov_installed();
    // The space maps other code at the same address: `mov rax, rsp` where
    // `mov rbp, rsp` was, while the old slot's release is still queued.
    reg.on_munmap(a.id, A..A + FILE_LEN as u64);
    let at = A + OFF_MOV;
    a.text.write(at, &[0xcc], &[MOV[0]]).unwrap();
    a.text.write(at + 2, &[MOV[2]], &[0xe0]).unwrap();
    mmap(&reg, &a, a.whole(OTHER)).unwrap();
    let other_key = UprobeKey {
        file: OTHER,
        offset: OFF_MOV,
    };
    reg.register(other_key, &noop()).unwrap();
    let new = slot_hit(&reg, &a, at, &[0x48, 0x89, 0xe0]);
    assert_ne!(new, old, "different bytes: not shared");
    assert_eq!((a.xol.in_use(), a.xol.allocs()), (2, 2));
    assert_eq!(
        a.xol.slot_bytes(old).unwrap()[..3],
        MOV,
        "the old slot keeps its bytes for a thread still in it"
    );
    reg.domain().release();
    assert_eq!(
        (a.xol.in_use(), a.xol.frees()),
        (1, 1),
        "the old slot is freed"
    );
}

#[test]
fn a_failed_re_install_gives_its_shared_owner_back_and_changes_nothing() {
    let (reg, a, c, _) = mov_installed();
    reg.unregister(key(OFF_MOV), &c).unwrap();
    // The slot's release is queued; the re-install shares it, then fails to
    // write the breakpoint.
    let before = snapshot(&reg, &[&a]);
    a.text.fail_writes_after(Some(0));
    assert!(matches!(
        reg.register(key(OFF_MOV), &c),
        Err(ProbeError::TextAccess { .. })
    ));
    a.text.fail_writes_after(None);
    assert_eq!(snapshot(&reg, &[&a]), before, "registry and text as before");
    assert_eq!((a.xol.allocs(), a.xol.frees()), (1, 0), "shared, not new");
    reg.domain().release();
    assert_eq!(
        (a.xol.in_use(), a.xol.frees()),
        (0, 1),
        "both owners gave it back: freed once"
    );
    // And the address installs again normally.
    reg.register(key(OFF_MOV), &c).unwrap();
    slot_hit(&reg, &a, A + OFF_MOV, &MOV);
}
