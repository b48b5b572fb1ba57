//! loom models of the uprobe registry: a hit lookup racing a consumer's
//! registration or unregistration.
//!
//! 1. A hit racing the unregistration of the last consumer: the hit either
//!    finds the uprobe, pinned with a live reference count (never a
//!    resurrected entry: a pinned uprobe still has its consumer), and its
//!    handler's accesses happen-before `unregister` returns (the model
//!    poisons the handler's data right after; a handler not ordered before
//!    that is a loom data race), or it misses: the breakpoint is gone
//!    (`Vanished`) or was never reached. Never `NotOurs` while trapped on
//!    our breakpoint.
//! 2. A hit racing a registration: a thread that traps on the new
//!    breakpoint always finds the uprobe (the install record is published
//!    before the breakpoint is written).
//!
//! What these models do NOT cover:
//! - the real `Srcu` domain: the registry runs on the reader-counting
//!   `ModelDomain` (same grace-period contract; `Srcu` has its own models;
//!   `Srcu`'s callback worker does not run under loom). Because
//!   `ModelDomain::call` waits for readers inline, the tree removal alone
//!   already orders the handler before `unregister` returns: this model
//!   does NOT catch a missing `synchronize` in `unregister` (checked:
//!   removing it still passes); tests/uprobe.rs
//!   `handlers_may_sleep_and_unregister_waits_for_them` does, on `Srcu`;
//! - XOL single-steps (the probed instruction is an emulated `nop`), filters,
//!   several consumers, handlers asking for removal;
//! - `on_mmap`/`on_munmap` racing hits or registrations (the per-file lock
//!   serializes them against registration; the stress test runs them
//!   against hits on real threads);
//! - more than one hit thread, and executions beyond the preemption bound.

#![cfg(loom)]

use std::sync::atomic::{AtomicBool as StdBool, Ordering as StdOrd};

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use rcu_registry::probes::arch::{DataMemory, Regs, X86_64};
use rcu_registry::probes::kprobe::{HitOutcome, XolAllocator, XolArena};
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::uprobe::{
    AddressSpace, Consumer, ConsumerAction, FileId, FileMapping, SpaceId, UprobeKey, UprobeOutcome,
    UprobeRegistry,
};
use rcu_registry::probes::ProbeError;
use rcu_registry::seqtree::model_domain::ModelDomain;

const BASE: u64 = 0x1000;
const FILE: FileId = FileId { dev: 1, inode: 2 };
const KEY: UprobeKey = UprobeKey {
    file: FILE,
    offset: 0,
};
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
            assert_eq!(*p, LIVE, "handler ran after unregister returned");
        });
    }
    fn poison(&self) {
        // SAFETY: as above.
        self.0.with_mut(|p| unsafe { *p = POISON });
    }
}

struct NoMemory;

impl DataMemory for NoMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        Err(ProbeError::MemoryFault {
            addr,
            len: buf.len(),
        })
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        Err(ProbeError::MemoryFault {
            addr,
            len: bytes.len(),
        })
    }
}

/// The thread executes the probed `nop`: it traps only if the breakpoint
/// is there.
fn execute(reg: &Reg, space: &Space) -> Option<HitOutcome<'static>> {
    let mut b = [0u8; 1];
    space.text.read(BASE, &mut b).unwrap();
    if b[0] != 0xcc {
        return None;
    }
    let mut regs = Regs {
        ip: BASE + 1,
        ..Regs::default()
    };
    match reg.on_breakpoint(SpaceId(1), &mut regs, &mut NoMemory) {
        UprobeOutcome::Done(o) => Some(o),
        UprobeOutcome::SingleStep(_) => panic!("a nop is emulated"),
    }
}

/// Runs `f` under loom and fails if loom explored a single execution (the
/// model would then check nothing; see loom-tests/tests/seqtree.rs).
fn model(f: impl Fn() + Sync + Send + 'static) {
    // A std atomic: it counts outside the model.
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b.check(move || {
        counter.fetch_add(1, StdOrd::Relaxed);
        f()
    });
    let runs = runs.load(StdOrd::Relaxed);
    println!("explored {runs} executions");
    assert!(runs > 1, "loom explored one execution only");
}

#[test]
fn a_hit_racing_the_last_unregister_finds_a_live_uprobe_or_misses() {
    model(|| {
        let (reg, space) = setup();
        let data = Arc::new(Val(UnsafeCell::new(LIVE)));
        let ran = Arc::new(StdBool::new(false));
        let c = {
            let (data, ran) = (data.clone(), ran.clone());
            Consumer::new(move |_, _| {
                data.touch();
                ran.store(true, StdOrd::SeqCst);
                ConsumerAction::Continue
            })
        };
        reg.register(KEY, &c).unwrap();
        let hitter = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || {
                if let Some(r) = reg.find_ref(SpaceId(1), BASE) {
                    assert_eq!(r.key(), KEY);
                    assert_eq!(r.consumers(), 1, "a pinned uprobe was resurrected");
                }
                match execute(&reg, &space) {
                    None | Some(HitOutcome::Vanished) => {}
                    Some(HitOutcome::Emulated) => {}
                    Some(other) => panic!("trapped on our breakpoint, got {other:?}"),
                }
            })
        };
        reg.unregister(KEY, &c).unwrap();
        data.poison();
        hitter.join().unwrap();
        assert!(reg.is_empty());
        assert_eq!(space.text.snapshot(), vec![0x90, 0xc3]);
    });
}

#[test]
fn a_hit_on_a_new_breakpoint_always_finds_its_uprobe() {
    model(|| {
        let (reg, space) = setup();
        let c = Consumer::new(|_, _| ConsumerAction::Continue);
        let hitter = {
            let (reg, space) = (reg.clone(), space.clone());
            thread::spawn(move || match execute(&reg, &space) {
                None | Some(HitOutcome::Emulated) => {}
                Some(other) => panic!("trapped on the new breakpoint, got {other:?}"),
            })
        };
        reg.register(KEY, &c).unwrap();
        hitter.join().unwrap();
        assert_eq!(space.text.snapshot(), vec![0xcc, 0xc3]);
    });
}
