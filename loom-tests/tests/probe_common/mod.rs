//! Shared by the probe loom models (`kprobe.rs`, `uprobe*.rs`,
//! `text_patch.rs`): the model runner and the fixtures the models have in
//! common.
//!
//! # The runner
//!
//! [`model`] and [`model_with`] run a closure under loom's `Builder`, with a
//! default preemption bound that `LOOM_MAX_PREEMPTIONS` overrides. They
//! count the executions loom explored (with a std atomic, outside the
//! model), print the count, and fail if it was one only: with loom 0.7 a
//! model whose spawned thread starts in a certain way is never preempted
//! (tokio-rs/loom#392; see `seqtree_common` and `text_patch.rs`) and would
//! silently check nothing.
//!
//! # The fixtures
//!
//! - [`Val`]: a word in a loom cell that handlers touch and writers poison
//!   once the handlers must be done; an unordered pair of accesses is a
//!   loom data race, a touch after the poison an assertion failure.
//! - [`Stack`] (one stack word, the return address at [`SP`]) and
//!   [`NoDataMemory`]: the data memory a trapped thread is given.
//! - [`Space`], [`Reg`], [`space`], [`setup`], [`execute`]: an address
//!   space mapping the file `nop; ret` at [`BASE`] and a uprobe registry on
//!   the reader-counting `ModelDomain`; a thread "executes" the `nop` and
//!   traps only if a breakpoint is there.
//! - [`uret_return`]: a uprobe call from [`URET_CALLER`] returns, through
//!   the trampoline at [`URET_TRAMPOLINE`] if its entry hijacked it.
//!
//! Each test binary compiles this module on its own and uses only part of
//! it, hence `dead_code` is allowed.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use loom::cell::UnsafeCell;
use rcu_registry::__internals::seqtree::model_domain::ModelDomain;
pub use rcu_registry::probes::arch::NoDataMemory;
use rcu_registry::probes::arch::{DataMemory, Regs, X86_64};
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{
    AddressSpace, FileId, FileMapping, SpaceId, UprobeKey, UprobeOutcome, UprobeRegistry,
};
use rcu_registry::probes::xol::{XolAllocator, XolArena};
use rcu_registry::probes::ProbeError;

/// Runs `f` under loom at preemption bound 3 (unless
/// `LOOM_MAX_PREEMPTIONS` sets one), prints how many executions it
/// explored, and fails if that was one only (the model would then check
/// nothing).
pub fn model(f: impl Fn() + Sync + Send + 'static) {
    model_with(3, None, f);
}

/// [`model`] with its own preemption bound (unless `LOOM_MAX_PREEMPTIONS`
/// sets one) and branch limit (`None`: loom's default).
pub fn model_with(bound: usize, max_branches: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    // A std atomic: it counts outside the model.
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(bound);
    }
    if let Some(n) = max_branches {
        b.max_branches = n;
    }
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f()
    });
    let runs = runs.load(Ordering::Relaxed);
    println!("explored {runs} executions");
    assert!(runs > 1, "loom explored one execution only");
}

/// The value a [`Val`] holds while handlers may touch it.
pub const LIVE: u64 = 7;
/// The value a [`Val`] holds once no handler may touch it any more.
pub const POISON: u64 = 0xdead;

/// Data whose accesses loom race-checks.
pub struct Val(UnsafeCell<u64>);

// SAFETY: accesses are ordered by the registries' protocols; loom checks
// that they are.
unsafe impl Sync for Val {}
// SAFETY: as above.
unsafe impl Send for Val {}

impl Default for Val {
    fn default() -> Self {
        Val(UnsafeCell::new(LIVE))
    }
}

impl Val {
    /// A handler's access: fails if the data was already poisoned.
    pub fn touch(&self) {
        // SAFETY: exclusive write; a race with `poison` is a loom failure.
        self.0.with_mut(|p| unsafe {
            assert_eq!(
                *p, LIVE,
                "handler ran after being poisoned (unregister returned)"
            );
            *p = LIVE;
        });
    }

    /// The writer's access once every handler must be done.
    pub fn poison(&self) {
        // SAFETY: as above.
        self.0.with_mut(|p| unsafe { *p = POISON });
    }
}

/// The stack pointer at a probed function's entry: the return address is
/// there.
pub const SP: u64 = 0x8000;

/// The thread's stack: one word, the return address at [`SP`].
pub struct Stack(pub u64);

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

/// Where the probed file's text is mapped.
pub const BASE: u64 = 0x1000;
/// The probed file.
pub const FILE: FileId = FileId { dev: 1, inode: 2 };
/// The uprobe on the file's first instruction (a `nop`, emulated).
pub const KEY: UprobeKey = UprobeKey {
    file: FILE,
    offset: 0,
};
/// The space most models run in.
pub const S1: SpaceId = SpaceId(1);

/// One address space mapping (part of) a file at [`BASE`].
pub struct Space {
    /// The space's id.
    pub id: SpaceId,
    /// The space's text at [`BASE`].
    pub text: Image,
    xol: XolArena,
    mapping: FileMapping,
    trampoline: Option<u64>,
}

impl Space {
    /// Space `id` holding `code` at [`BASE`], mapped by `mapping`, without a
    /// return trampoline.
    pub fn new(id: SpaceId, code: Vec<u8>, mapping: FileMapping) -> Self {
        Space {
            id,
            text: Image::new(BASE, code),
            xol: XolArena::new(0x10_0000, 1, X86_64::XOL_SLOT_SIZE),
            mapping,
            trampoline: None,
        }
    }

    /// The space's XOL slot allocator (one slot), for its counts.
    pub fn arena(&self) -> &XolArena {
        &self.xol
    }

    /// The same space with a return trampoline at `at`.
    pub fn with_return_trampoline(self, at: u64) -> Self {
        Space {
            trampoline: Some(at),
            ..self
        }
    }
}

impl AddressSpace for Space {
    type Text = Image;
    fn id(&self) -> SpaceId {
        self.id
    }
    fn text(&self) -> &Image {
        &self.text
    }
    fn xol(&self) -> &dyn XolAllocator {
        &self.xol
    }
    fn mappings(&self) -> Vec<FileMapping> {
        vec![self.mapping.clone()]
    }
    fn return_trampoline(&self) -> Option<u64> {
        self.trampoline
    }
}

/// The mapping of [`FILE`]'s `nop; ret` at [`BASE`].
pub fn mapping() -> FileMapping {
    FileMapping {
        vaddr: BASE..BASE + 2,
        file: FILE,
        file_offset: 0,
    }
}

/// Space `id` mapping the file `nop; ret` at [`BASE`].
pub fn nop_ret(id: SpaceId) -> Space {
    Space::new(id, vec![0x90, 0xc3], mapping())
}

/// [`nop_ret`], shared.
pub fn space(id: SpaceId) -> std::sync::Arc<Space> {
    std::sync::Arc::new(nop_ret(id))
}

/// The uprobe registry of the models, on the reader-counting domain.
pub type Reg = UprobeRegistry<X86_64, Space, ModelDomain>;

/// A registry with `space` mapping the file (`nop; ret` at [`BASE`]).
pub fn setup(space: Space) -> (loom::sync::Arc<Reg>, std::sync::Arc<Space>) {
    let reg = loom::sync::Arc::new(Reg::with_domain(X86_64, ModelDomain::new()));
    let space = std::sync::Arc::new(space);
    reg.on_mmap(&space, mapping()).unwrap();
    (reg, space)
}

/// The thread executes the probed `nop` at [`BASE`] in `space`: it traps
/// only if the breakpoint is there.
pub fn execute(reg: &Reg, space: &Space) -> Option<UprobeFinished> {
    let mut b = [0u8; 1];
    space.text.read(BASE, &mut b).unwrap();
    if b[0] != 0xcc {
        return None;
    }
    let mut regs = Regs {
        ip: BASE + 1,
        ..Regs::default()
    };
    match reg.on_breakpoint(space.id, &mut regs, &mut NoDataMemory) {
        UprobeOutcome::Done(o) => Some(o),
        UprobeOutcome::SingleStep(_) => panic!("a nop is emulated"),
    }
}

/// The return trampoline of the uprobe return models' spaces.
pub const URET_TRAMPOLINE: u64 = 0x20_0000;
/// Where the uprobe return models' calls come from.
pub const URET_CALLER: u64 = 0x30_0000;

/// The call whose entry left `stack` (its return address at [`SP`])
/// returns: into the trampoline and [`UprobeRegistry::on_return`] if the
/// entry hijacked it, straight to its caller otherwise. Whether it was
/// tracked; either way it ends at [`URET_CALLER`].
pub fn uret_return(reg: &Reg, space: &Space, stack: &Stack) -> bool {
    if stack.0 != URET_TRAMPOLINE {
        assert_eq!(
            stack.0, URET_CALLER,
            "an untracked call keeps its return address"
        );
        return false;
    }
    let mut regs = Regs {
        ip: URET_TRAMPOLINE,
        sp: SP + 8,
        ..Regs::default()
    };
    assert_eq!(
        reg.on_return(space.id, &mut regs),
        rcu_registry::probes::outcome::ReturnOutcome::Returned { to: URET_CALLER }
    );
    true
}
