//! loom models of uprobe return handlers: a call's entry and return racing
//! the unregistration of a consumer with a return handler.
//!
//! 1. Another consumer stays: the call is always tracked (the breakpoint
//!    stays) and always returns to its caller; the removed consumer's
//!    return handler either ran ordered before `unregister` returned (the
//!    model poisons its data right after; an unordered access is a loom
//!    data race) or did not run; the remaining consumer's always runs.
//! 2. The last consumer goes (the uprobe leaves the tree): a call that was
//!    tracked still returns to its caller through the trampoline, with its
//!    instance freed, and the return handler obeys the same ordering.
//!
//! 3. A consumer registered while a call is in flight: its return handler
//!    runs exactly when its handler saw the call's entry (sequence numbers:
//!    a consumer that joined after the entry is not called at the return).
//!
//! What these models do NOT cover:
//! - the real `Srcu` domain: the registry runs on the reader-counting
//!   `ModelDomain` (same grace-period contract; `Srcu` has its own models).
//!   `ModelDomain::call` waits for readers inline, so the list replacement
//!   alone may already order the handler before `unregister` returns: a
//!   missing `synchronize` in `unregister` is NOT caught here (checked:
//!   removing it still passes); tests/uprobe_ret.rs
//!   `unregister_waits_for_a_ret_handler_that_is_running` catches it on
//!   `Srcu` (checked);
//! - the per-thread return stacks themselves: they are thread-private
//!   (a thread-local touched only by its thread), so there is no race in
//!   them to model; their LIFO, chaining, depth and abandoned-frame rules
//!   are specified by tests/uprobe_ret.rs;
//! - filters, several hitting threads,
//!   nested or re-entered hits, mmap/munmap racing the call, arm64;
//! - executions beyond the preemption bound (3).

#![cfg(loom)]

use std::sync::atomic::{AtomicBool as StdBool, AtomicU64 as StdU64, Ordering as StdOrd};

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use rcu_registry::probes::arch::{DataMemory, Regs, X86_64};
use rcu_registry::probes::kprobe::{HitOutcome, ReturnOutcome, XolAllocator, XolArena};
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::uprobe::{
    AddressSpace, Consumer, FileId, FileMapping, SpaceId, UprobeKey, UprobeOutcome, UprobeRegistry,
};
use rcu_registry::probes::ProbeError;
use rcu_registry::seqtree::model_domain::ModelDomain;

const BASE: u64 = 0x1000;
const FILE: FileId = FileId { dev: 1, inode: 2 };
/// The probed function's entry (a `nop`, emulated).
const KEY: UprobeKey = UprobeKey {
    file: FILE,
    offset: 0,
};
const TRAMPOLINE: u64 = 0x20_0000;
const CALLER: u64 = 0x30_0000;
/// The stack pointer at the function's entry: the return address is there.
const SP: u64 = 0x8000;
const LIVE: u64 = 7;
const POISON: u64 = 0xdead;

struct Space {
    text: Image,
    xol: XolArena,
}

impl AddressSpace for Space {
    type Text = Image;
    fn id(&self) -> SpaceId {
        SpaceId(1)
    }
    fn text(&self) -> &Image {
        &self.text
    }
    fn xol(&self) -> &dyn XolAllocator {
        &self.xol
    }
    fn mappings(&self) -> Vec<FileMapping> {
        vec![mapping()]
    }
    fn return_trampoline(&self) -> Option<u64> {
        Some(TRAMPOLINE)
    }
}

fn mapping() -> FileMapping {
    FileMapping {
        vaddr: BASE..BASE + 2,
        file: FILE,
        file_offset: 0,
    }
}

type Reg = UprobeRegistry<X86_64, Space, ModelDomain>;

/// A registry with one space mapping the file `nop; ret`.
fn setup() -> (Arc<Reg>, std::sync::Arc<Space>) {
    let reg = Arc::new(Reg::with_domain(X86_64, ModelDomain::new()));
    let space = std::sync::Arc::new(Space {
        text: Image::new(BASE, vec![0x90, 0xc3]),
        xol: XolArena::new(0x10_0000, 1, X86_64::XOL_SLOT_SIZE),
    });
    reg.on_mmap(&space, mapping()).unwrap();
    (reg, space)
}

/// Data whose accesses loom race-checks.
struct Val(UnsafeCell<u64>);

// SAFETY: accesses are ordered by the registry's protocol; loom checks that.
unsafe impl Sync for Val {}
// SAFETY: as above.
unsafe impl Send for Val {}

impl Val {
    fn touch(&self) {
        // SAFETY: exclusive access; a race with `poison` is a loom failure.
        self.0.with_mut(|p| unsafe {
            assert_eq!(*p, LIVE, "return handler ran after unregister returned");
        });
    }
    fn poison(&self) {
        // SAFETY: as above.
        self.0.with_mut(|p| unsafe { *p = POISON });
    }
}

/// The thread's stack: one word, the return address at `SP`.
struct Slot(u64);

impl DataMemory for Slot {
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

/// The thread calls the probed function from `CALLER` and it returns.
/// Returns whether the call was tracked (went through the trampoline);
/// either way it ends at `CALLER`.
fn call_and_return(reg: &Reg, space: &Space) -> bool {
    let mut stack = Slot(CALLER);
    let mut b = [0u8; 1];
    space.text.read(BASE, &mut b).unwrap();
    if b[0] == 0xcc {
        let mut regs = Regs {
            ip: BASE + 1,
            sp: SP,
            ..Regs::default()
        };
        match reg.on_breakpoint(SpaceId(1), &mut regs, &mut stack) {
            UprobeOutcome::Done(HitOutcome::Emulated | HitOutcome::Vanished) => {}
            UprobeOutcome::Done(other) => panic!("trapped on our breakpoint, got {other:?}"),
            UprobeOutcome::SingleStep(_) => panic!("a nop is emulated"),
        }
    }
    if stack.0 != TRAMPOLINE {
        assert_eq!(
            stack.0, CALLER,
            "an untracked call keeps its return address"
        );
        return false;
    }
    let mut regs = Regs {
        ip: TRAMPOLINE,
        sp: SP + 8,
        ..Regs::default()
    };
    assert_eq!(
        reg.on_return(SpaceId(1), &mut regs),
        ReturnOutcome::Returned { to: CALLER }
    );
    assert_eq!(reg.return_depth(SpaceId(1)), 0, "the instance is freed");
    true
}

/// Runs `f` under loom and fails if loom explored a single execution.
fn model(f: impl Fn() + Sync + Send + 'static) {
    // A std atomic: it counts outside the model.
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(move || {
        counter.fetch_add(1, StdOrd::Relaxed);
        f()
    });
    let runs = runs.load(StdOrd::Relaxed);
    println!("explored {runs} executions");
    assert!(runs > 1, "loom explored one execution only");
}

/// A consumer whose return handler touches `data`.
fn touching(data: &Arc<Val>) -> Consumer {
    let data = data.clone();
    Consumer::builder()
        .ret_handler(move |r, _| {
            assert_eq!((r.func, r.ret_addr), (BASE, CALLER));
            data.touch();
        })
        .build()
}

#[test]
fn a_return_racing_the_removal_of_a_consumer_never_runs_it_late() {
    model(|| {
        let (reg, space) = setup();
        let data = Arc::new(Val(UnsafeCell::new(LIVE)));
        let gone = touching(&data);
        let kept_runs = std::sync::Arc::new(StdU64::new(0));
        let kept = {
            let n = kept_runs.clone();
            Consumer::builder()
                .ret_handler(move |_, _| {
                    n.fetch_add(1, StdOrd::SeqCst);
                })
                .build()
        };
        reg.register_in_function(KEY, 0, &gone).unwrap();
        reg.register_in_function(KEY, 0, &kept).unwrap();
        let caller = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                assert!(call_and_return(&reg, &space), "a consumer stays: tracked");
            })
        };
        reg.unregister(KEY, &gone).unwrap();
        data.poison();
        caller.join().unwrap();
        assert_eq!(kept_runs.load(StdOrd::SeqCst), 1);
        assert_eq!(reg.consumers(KEY), 1);
    });
}

#[test]
fn a_call_in_flight_when_its_uprobe_goes_still_returns_to_its_caller() {
    model(|| {
        let (reg, space) = setup();
        let data = Arc::new(Val(UnsafeCell::new(LIVE)));
        let ran = std::sync::Arc::new(StdBool::new(false));
        let c = {
            let (data, ran) = (data.clone(), ran.clone());
            Consumer::builder()
                .ret_handler(move |_, _| {
                    data.touch();
                    ran.store(true, StdOrd::SeqCst);
                })
                .build()
        };
        reg.register_in_function(KEY, 0, &c).unwrap();
        let caller = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                call_and_return(&reg, &space);
            })
        };
        reg.unregister(KEY, &c).unwrap();
        data.poison();
        caller.join().unwrap();
        assert!(reg.is_empty());
        assert_eq!(space.text.snapshot(), vec![0x90, 0xc3]);
    });
}

#[test]
fn a_consumer_registered_during_a_call_sees_both_its_entry_and_return_or_neither() {
    model(|| {
        let (reg, space) = setup();
        let first = Consumer::builder().ret_handler(|_, _| {}).build();
        reg.register_in_function(KEY, 0, &first).unwrap();
        let late = Consumer::builder()
            .handler(|_, _| rcu_registry::probes::uprobe::ConsumerAction::Continue)
            .ret_handler(|_, _| {})
            .build();
        let caller = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                assert!(call_and_return(&reg, &space), "`first` stays: tracked");
            })
        };
        reg.register_in_function(KEY, 0, &late).unwrap();
        caller.join().unwrap();
        assert_eq!(first.ret_hits(), 1);
        assert_eq!(
            late.hits(),
            late.ret_hits(),
            "a return handler runs exactly for the calls whose entry it saw"
        );
    });
}
