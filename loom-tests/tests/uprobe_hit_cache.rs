//! loom model of the uprobe hit cache (`src/probes/uprobe/hitcache.rs`):
//! a slot changing hands under a hit.
//!
//! The registry has a two-slot cache (one set: every uprobe competes for
//! it). Uprobe A (file 1) is registered and owns a slot; then, at once:
//! one thread unregisters A's last consumer (retract, unlink, grace
//! period), another registers uprobe B on another file that no space maps
//! (it only enters the tree and the cache: a publish into the same set,
//! possibly into the slot A just left), and the main thread traps on A's
//! breakpoint. Checked: the hit either runs A's handler
//! before `unregister` returns (the handler's data is poisoned right after;
//! a handler not ordered before that is a loom data race, and a hit
//! through a stale slot pointer would read a freed node, which loom
//! reports) or misses cleanly (`Vanished`, or no trap); it never runs B's
//! handler for A's trap; afterwards only B is registered.
//!
//! What this model does NOT cover:
//! - the real `Srcu` domain: the registry runs on the reader-counting
//!   `ModelDomain` (same grace-period contract);
//! - more than two uprobes per set, overwriting a full set, and caches
//!   with more than one set (the set index is plain arithmetic);
//! - XOL single-steps, return tracking, several consumers (see
//!   `uprobe.rs` and `uprobe_ret.rs`);
//! - executions beyond the preemption bound (2).

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
const FILE_A: FileId = FileId { dev: 1, inode: 2 };
const FILE_B: FileId = FileId { dev: 1, inode: 3 };
const KEY_A: UprobeKey = UprobeKey {
    file: FILE_A,
    offset: 0,
};
const KEY_B: UprobeKey = UprobeKey {
    file: FILE_B,
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
        vec![map(FILE_A, BASE)]
    }
}

/// `file`'s one byte (a `nop`) mapped at `at`.
fn map(file: FileId, at: u64) -> FileMapping {
    FileMapping {
        vaddr: at..at + 1,
        file,
        file_offset: 0,
    }
}

type Reg = UprobeRegistry<X86_64, Space, ModelDomain>;

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

/// The thread executes the `nop` at `at`: it traps only if a breakpoint
/// is there.
fn execute(reg: &Reg, space: &Space, at: u64) -> Option<HitOutcome<'static>> {
    let mut b = [0u8; 1];
    space.text.read(at, &mut b).unwrap();
    if b[0] != 0xcc {
        return None;
    }
    let mut regs = Regs {
        ip: at + 1,
        ..Regs::default()
    };
    match reg.on_breakpoint(SpaceId(1), &mut regs, &mut NoMemory) {
        UprobeOutcome::Done(o) => Some(o),
        UprobeOutcome::SingleStep(_) => panic!("a nop is emulated"),
    }
}

#[test]
fn a_hit_while_its_cache_slot_changes_hands_runs_its_own_live_handler_or_misses() {
    // A std atomic: it counts outside the model.
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    // Three threads through the registry's locks and the domain's reader
    // counts take more scheduling points than loom's default allows.
    b.max_branches = 20_000;
    b.check(move || {
        counter.fetch_add(1, StdOrd::Relaxed);
        let reg = Arc::new(Reg::with_domain(X86_64, ModelDomain::new()).with_hit_cache_slots(2));
        let space = std::sync::Arc::new(Space {
            text: Image::new(BASE, vec![0x90]),
            xol: XolArena::new(0x10_0000, 1, X86_64::XOL_SLOT_SIZE),
        });
        reg.on_mmap(&space, map(FILE_A, BASE)).unwrap();
        let data = Arc::new(Val(UnsafeCell::new(LIVE)));
        let a = {
            let data = data.clone();
            Consumer::new(move |hit, _| {
                assert_eq!(hit.key, KEY_A);
                data.touch();
                ConsumerAction::Continue
            })
        };
        let b_ran = Arc::new(StdBool::new(false));
        let b = {
            let b_ran = b_ran.clone();
            Consumer::new(move |hit, _| {
                assert_eq!(hit.key, KEY_B);
                b_ran.store(true, StdOrd::SeqCst);
                ConsumerAction::Continue
            })
        };
        reg.register(KEY_A, &a).unwrap();
        let remover = {
            let (reg, data) = (reg.clone(), data.clone());
            thread::spawn(move || {
                reg.unregister(KEY_A, &a).unwrap();
                data.poison();
            })
        };
        let adder = {
            let (reg, b) = (reg.clone(), b.clone());
            thread::spawn(move || reg.register(KEY_B, &b).unwrap())
        };
        match execute(&reg, &space, BASE) {
            None | Some(HitOutcome::Vanished) | Some(HitOutcome::Emulated) => {}
            Some(other) => panic!("trapped on A's breakpoint, got {other:?}"),
        }
        remover.join().unwrap();
        adder.join().unwrap();
        assert!(!b_ran.load(StdOrd::SeqCst), "B's handler ran for A's trap");
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.consumers(KEY_B), 1);
        assert_eq!(reg.find(SpaceId(1), BASE), None);
    });
    let runs = runs.load(StdOrd::Relaxed);
    println!("explored {runs} executions");
    assert!(runs > 1, "loom explored one execution only");
}
