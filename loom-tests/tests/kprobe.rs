//! loom models of the kprobe registry's hit path against writers.
//!
//! 1. A hit racing `unregister_nosync` + `commit`: the hit either finds the
//!    probe and its handler's accesses happen-before `commit` returns (the
//!    model poisons the handler's data right after `commit`; a handler not
//!    ordered before that is a loom data race), or it finds the breakpoint
//!    gone (`Vanished`) and runs nothing. Never `NotOurs`.
//! 2. A hit racing `register`: a thread that traps on the new breakpoint
//!    always finds the site (published before the breakpoint is written).
//! 3. A kretprobe's pool against unregistration: a call entered before the
//!    unregistration returns to its caller through the orphaned instance;
//!    the pool (and each instance's data) is freed only after every
//!    instance came back, ordered after the handlers' and the trampoline's
//!    accesses (data poisoned on drop), and exactly once.
//!
//! The models are known to bite: with `commit` skipping its grace period,
//! model 1 reports a race; with the pool's last decrement `Relaxed` instead
//! of `Release`, model 3 does.
//!
//! What these models do NOT cover:
//! - single-steps in flight (`StepToken` counts): the models use an emulated
//!   instruction (`nop`), so no XOL slot, no `Rcu::call` worker thread;
//!   tests/kprobe.rs covers a commit waiting for a step in flight, and the
//!   stress test runs single-steps against commits on real threads;
//! - several probes aggregated on one address, enable/disable, more than
//!   one hit thread, nested (re-entered) hits, signal delivery;
//! - `membarrier`: under loom the RCU barriers are `SeqCst` fences (see the
//!   rcu models);
//! - executions beyond the preemption bound.

#![cfg(loom)]

use std::sync::atomic::{AtomicBool as StdBool, AtomicUsize as StdUsize, Ordering as StdOrd};
use std::sync::Arc;

use loom::cell::UnsafeCell;
use loom::thread;
use rcu_registry::probes::arch::{DataMemory, Regs, X86_64};
use rcu_registry::probes::kprobe::{
    Action, EntryAction, HitOutcome, Kprobe, KprobeRegistry, Kretprobe, ReturnOutcome, SymbolTable,
    XolArena,
};
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::ProbeError;
use rcu_registry::rcu::Rcu;

/// `f`: nop; ret
const F: u64 = 0x100;
const TRAMPOLINE: u64 = 0x1f0;
const SP: u64 = 0x8000;
const CALLER: u64 = 0x4444;

const LIVE: u64 = 7;
const POISON: u64 = 0xdead;

/// Data whose accesses loom race-checks.
struct Val(UnsafeCell<u64>);

// SAFETY: accesses are ordered by the registry's protocols; loom checks that
// they are.
unsafe impl Sync for Val {}
// SAFETY: as above.
unsafe impl Send for Val {}

impl Default for Val {
    fn default() -> Self {
        Val(UnsafeCell::new(LIVE))
    }
}

impl Val {
    fn touch(&self) {
        // SAFETY: exclusive write; a race with `poison` is a loom failure.
        self.0.with_mut(|p| unsafe {
            assert_eq!(*p, LIVE, "touched after being poisoned");
            *p = LIVE;
        });
    }
    fn poison(&self) {
        // SAFETY: as above.
        self.0.with_mut(|p| unsafe { *p = POISON });
    }
}

/// Poisons on drop: the pool's data is freed after every use of it.
#[derive(Default)]
struct Data(Val);

static DATA_DROPS: StdUsize = StdUsize::new(0);

impl Drop for Data {
    fn drop(&mut self) {
        self.0.poison();
        DATA_DROPS.fetch_add(1, StdOrd::SeqCst);
    }
}

/// One stack word, the return address slot.
struct Stack(u64);

impl DataMemory for Stack {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        if addr != SP || buf.len() != 8 {
            return Err(ProbeError::MemoryFault {
                addr,
                len: buf.len(),
            });
        }
        buf.copy_from_slice(&self.0.to_le_bytes());
        Ok(())
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        if addr != SP || bytes.len() != 8 {
            return Err(ProbeError::MemoryFault {
                addr,
                len: bytes.len(),
            });
        }
        self.0 = u64::from_le_bytes(bytes.try_into().unwrap());
        Ok(())
    }
}

type Reg = KprobeRegistry<X86_64, Image>;

fn registry() -> Reg {
    let mut code = vec![0xccu8; 0x100];
    code[0] = 0x90;
    code[1] = 0xc3;
    let mut syms = SymbolTable::new();
    syms.insert("f", F, 2);
    KprobeRegistry::builder(
        X86_64,
        Image::new(F, code),
        syms,
        Arc::new(XolArena::new(0x10_0000, 1, X86_64::XOL_SLOT_SIZE)),
    )
    .rcu(Rcu::new())
    .buckets(2)
    .instance_stripes(1)
    .trampoline(TRAMPOLINE)
    .build()
}

/// The thread "executes" `f`: it traps only if the breakpoint is there.
fn run_f(reg: &Reg, stack: &mut Stack) -> Option<(HitOutcome<'static>, Regs)> {
    let mut b = [0u8; 1];
    reg.text().read(F, &mut b).unwrap();
    if b[0] != 0xcc {
        return None;
    }
    let mut regs = Regs {
        ip: F + 1,
        sp: SP,
        ..Regs::default()
    };
    let out = match reg.on_breakpoint(&mut regs, stack) {
        HitOutcome::NotOurs => HitOutcome::NotOurs,
        HitOutcome::Vanished => HitOutcome::Vanished,
        HitOutcome::Emulated => HitOutcome::Emulated,
        other => panic!("unexpected outcome for a nop: {other:?}"),
    };
    Some((out, regs))
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

#[test]
fn a_hit_racing_commit_runs_its_handler_before_commit_returns_or_not_at_all() {
    model(|| {
        let reg = Arc::new(registry());
        let data = Arc::new(Val::default());
        let ran = Arc::new(StdBool::new(false));
        let p = {
            let (data, ran) = (data.clone(), ran.clone());
            Kprobe::at(F)
                .pre(move |_, _| {
                    data.touch();
                    ran.store(true, StdOrd::SeqCst);
                    Action::Continue
                })
                .build()
        };
        reg.register(&p).unwrap();
        let hitter = {
            let (reg, ran) = (reg.clone(), ran.clone());
            thread::spawn(move || {
                let mut stack = Stack(0);
                match run_f(&reg, &mut stack) {
                    None => {}
                    Some((HitOutcome::Emulated, regs)) => {
                        assert!(ran.load(StdOrd::SeqCst), "found the probe: ran it");
                        assert_eq!(regs.ip, F + 1);
                    }
                    Some((HitOutcome::Vanished, regs)) => {
                        assert!(!ran.load(StdOrd::SeqCst));
                        assert_eq!(regs.ip, F, "resumes at the restored instruction");
                    }
                    Some((other, _)) => panic!("a trap on our breakpoint was {other:?}"),
                }
            })
        };
        reg.unregister_nosync(&p).unwrap();
        reg.commit();
        // Any handler not finished before commit returned races with this.
        data.poison();
        hitter.join().unwrap();
    });
}

#[test]
fn a_thread_that_traps_on_a_new_breakpoint_always_finds_its_site() {
    model(|| {
        let reg = Arc::new(registry());
        let ran = Arc::new(StdBool::new(false));
        let p = {
            let ran = ran.clone();
            Kprobe::at(F)
                .pre(move |_, _| {
                    ran.store(true, StdOrd::SeqCst);
                    Action::Continue
                })
                .build()
        };
        let hitter = {
            let (reg, ran) = (reg.clone(), ran.clone());
            thread::spawn(move || {
                if let Some((out, _)) = run_f(&reg, &mut Stack(0)) {
                    assert!(matches!(out, HitOutcome::Emulated), "got {out:?}");
                    assert!(ran.load(StdOrd::SeqCst));
                }
            })
        };
        reg.register(&p).unwrap();
        hitter.join().unwrap();
    });
}

#[test]
fn a_kretprobe_pool_outlives_its_unregistration_until_the_call_returns() {
    model(|| {
        DATA_DROPS.store(0, StdOrd::SeqCst);
        let reg = Arc::new(registry());
        let krp = Kretprobe::<Data>::at(F)
            .maxactive(1)
            .entry_handler(|d, _| {
                d.0.touch();
                EntryAction::Track
            })
            .handler(|d, _, _| d.0.touch())
            .build()
            .unwrap();
        reg.register_kretprobe(&krp).unwrap();
        let caller = {
            let reg = reg.clone();
            thread::spawn(move || {
                let mut stack = Stack(CALLER);
                let Some((out, _)) = run_f(&reg, &mut stack) else {
                    return;
                };
                if stack.0 == TRAMPOLINE {
                    // Tracked: the function returns into the trampoline.
                    let mut regs = Regs {
                        ip: TRAMPOLINE,
                        sp: SP + 8,
                        ..Regs::default()
                    };
                    assert_eq!(
                        reg.on_return(&mut regs),
                        ReturnOutcome::Returned { to: CALLER }
                    );
                    assert_eq!(regs.ip, CALLER);
                } else {
                    assert!(
                        matches!(out, HitOutcome::Emulated | HitOutcome::Vanished),
                        "got {out:?}"
                    );
                }
            })
        };
        reg.unregister_kretprobe(&krp).unwrap();
        drop(krp);
        // The pool is freed (its data poisoned) once the call returned:
        // ordered only by the pool's in-flight count, not by the join.
        while reg.orphans() != 0 {
            thread::yield_now();
        }
        assert_eq!(DATA_DROPS.load(StdOrd::SeqCst), 1, "freed exactly once");
        caller.join().unwrap();
    });
}
