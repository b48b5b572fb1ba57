//! Shared fixtures of the uprobe tests: in-memory address spaces (an
//! `Image` per space) mapping one x86_64 "file" at different addresses.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use rcu_registry::probes::arch::{Arch, DataMemory, Regs, X86_64};
use rcu_registry::probes::text::{Image, TextMemory};
use rcu_registry::probes::uprobe::{
    AddressSpace, FileId, FileMapping, SpaceId, UprobeKey, UprobeRegistry,
};
use rcu_registry::probes::xol::{XolAllocator, XolArena};
use rcu_registry::probes::ProbeError;
use rcu_registry::rcu::Flavor;

/// The probed file.
pub const FILE: FileId = FileId { dev: 8, inode: 42 };
/// Another file, never probed.
pub const OTHER: FileId = FileId { dev: 8, inode: 7 };

/// `push rbp` (emulated).
pub const OFF_PUSH: u64 = 0x00;
/// `mov rbp, rsp` (out of line), 3 bytes.
pub const OFF_MOV: u64 = 0x01;
/// `nop` (emulated).
pub const OFF_NOP: u64 = 0x04;
/// `mov eax, [rip + 0x10]` (RIP-relative), 6 bytes.
pub const OFF_RIPREL: u64 = 0x05;
/// `syscall` (refused).
pub const OFF_SYSCALL: u64 = 0x0b;
/// `jmp +0` (emulated), 2 bytes.
pub const OFF_JMP: u64 = 0x0d;
/// Size of the file.
pub const FILE_LEN: usize = 0x40;

/// The file's bytes: the instructions above, then `nop`s.
pub fn file_bytes() -> Vec<u8> {
    let mut f = vec![
        0x55, // push rbp
        0x48, 0x89, 0xe5, // mov rbp, rsp
        0x90, // nop
        0x8b, 0x05, 0x10, 0x00, 0x00, 0x00, // mov eax, [rip+0x10]
        0x0f, 0x05, // syscall
        0xeb, 0x00, // jmp +0
        0xc3, // ret
    ];
    f.resize(FILE_LEN, 0x90);
    f
}

pub fn key(offset: u64) -> UprobeKey {
    UprobeKey { file: FILE, offset }
}

/// An address space whose whole text is one `Image` at `base`.
pub struct MemSpace {
    pub id: SpaceId,
    pub text: Image,
    pub xol: XolArena,
    pub maps: Mutex<Vec<FileMapping>>,
    /// The uretprobe trampoline (in the XOL area's page, past its slots).
    pub trampoline: Option<u64>,
}

impl MemSpace {
    /// A space with `text` at `base` and an XOL area far from it.
    pub fn new(id: u64, base: u64, text: Vec<u8>) -> Arc<Self> {
        Self::build(id, base, text, Some(trampoline_of(id)), XOL_SLOTS)
    }

    fn build(
        id: u64,
        base: u64,
        text: Vec<u8>,
        trampoline: Option<u64>,
        slots: usize,
    ) -> Arc<Self> {
        assert!(slots <= XOL_SLOTS, "the trampoline follows the XOL slots");
        Arc::new(MemSpace {
            id: SpaceId(id),
            text: Image::new(base, text),
            xol: XolArena::new(xol_base(id), slots, X86_64::XOL_SLOT_SIZE),
            maps: Mutex::new(Vec::new()),
            trampoline,
        })
    }

    /// A space mapping [`FILE`] at `base` that has no uretprobe trampoline.
    pub fn with_file_no_trampoline(id: u64, base: u64) -> Arc<Self> {
        Self::build(id, base, file_bytes(), None, XOL_SLOTS)
    }

    /// A space that maps [`FILE`] (whole) at `base` and has only `slots`
    /// XOL slots (at most [`XOL_SLOTS`]).
    pub fn with_file_and_slots(id: u64, base: u64, slots: usize) -> Arc<Self> {
        Self::build(id, base, file_bytes(), Some(trampoline_of(id)), slots)
    }

    /// A space that maps [`FILE`] (whole) at `base`.
    pub fn with_file(id: u64, base: u64) -> Arc<Self> {
        Self::new(id, base, file_bytes())
    }

    pub fn base(&self) -> u64 {
        self.text.base()
    }

    pub fn byte(&self, addr: u64) -> u8 {
        let mut b = [0u8];
        self.text.read(addr, &mut b).unwrap();
        b[0]
    }

    /// The mapping of `file` over the whole image.
    pub fn whole(&self, file: FileId) -> FileMapping {
        FileMapping {
            vaddr: self.base()..self.base() + self.text.len() as u64,
            file,
            file_offset: 0,
        }
    }
}

impl AddressSpace for MemSpace {
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
        self.maps.lock().unwrap().clone()
    }
    fn return_trampoline(&self) -> Option<u64> {
        self.trampoline
    }
}

/// XOL slots per space. A slot stays bound to the address it was first
/// used for (the reuse rule), and a removed install's slot is released only
/// after a grace period (plus the callback worker's batching delay). The
/// stress test removes and re-installs its two out-of-line addresses far
/// faster than that; when every re-install took a new slot, one address
/// could hold all 16 slots and the other then found none (`XolExhausted`,
/// seen once; the spaces had 64 slots for a while). A re-install now takes
/// back the slot still waiting for its release (`xolshare.rs` in the
/// uprobe registry), so each address holds one slot and 16 leave room.
pub const XOL_SLOTS: usize = 16;

fn xol_base(id: u64) -> u64 {
    0x7fff_0000_0000 + id * 0x10000
}

/// The trampoline address [`MemSpace::new`] gives space `id`: past its
/// [`XOL_SLOTS`] XOL slots.
pub fn trampoline_of(id: u64) -> u64 {
    xol_base(id) + 0x8000
}

pub type Registry = UprobeRegistry<X86_64, MemSpace>;

/// Tells the registry (and the space) that `space` maps `m`.
pub fn mmap<F: Flavor>(
    reg: &UprobeRegistry<X86_64, MemSpace, F>,
    space: &Arc<MemSpace>,
    m: FileMapping,
) -> Result<usize, ProbeError> {
    space.maps.lock().unwrap().push(m.clone());
    reg.on_mmap(space, m)
}

/// The whole image of `space` maps [`FILE`].
pub fn mmap_file(reg: &Registry, space: &Arc<MemSpace>) -> usize {
    mmap(reg, space, space.whole(FILE)).unwrap()
}

/// A small stack for emulated pushes and calls.
pub struct Stack {
    pub bytes: Vec<u8>,
}

pub const STACK_BASE: u64 = 0x10_0000;

impl Stack {
    pub fn new() -> Self {
        Stack {
            bytes: vec![0; 4096],
        }
    }
    pub fn top() -> u64 {
        STACK_BASE + 2048
    }
}

impl DataMemory for Stack {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        let o = addr.wrapping_sub(STACK_BASE) as usize;
        let s = self
            .bytes
            .get(o..o + buf.len())
            .ok_or(ProbeError::MemoryFault {
                addr,
                len: buf.len(),
            })?;
        buf.copy_from_slice(s);
        Ok(())
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        let o = addr.wrapping_sub(STACK_BASE) as usize;
        let len = bytes.len();
        let s = self
            .bytes
            .get_mut(o..o + len)
            .ok_or(ProbeError::MemoryFault { addr, len })?;
        s.copy_from_slice(bytes);
        Ok(())
    }
}

/// Registers as the CPU reports an `int3` at `addr`: IP past it.
pub fn trap_regs(addr: u64) -> Regs {
    Regs {
        ip: addr + 1,
        sp: Stack::top(),
        ..Regs::default()
    }
}

/// Everything an error must leave unchanged: the uprobe count, consumers
/// on the offsets used, the installs and the text bytes of every space.
pub fn snapshot<F: Flavor>(
    reg: &UprobeRegistry<X86_64, MemSpace, F>,
    spaces: &[&Arc<MemSpace>],
) -> impl PartialEq + std::fmt::Debug {
    let consumers: Vec<usize> = (0..FILE_LEN as u64)
        .map(|o| reg.consumers(key(o)))
        .collect();
    let per_space: Vec<(usize, Vec<u8>, Vec<FileMapping>)> = spaces
        .iter()
        .map(|s| {
            (
                reg.installs_in(s.id),
                s.text.snapshot(),
                reg.mappings_of(s.id),
            )
        })
        .collect();
    (reg.len(), consumers, per_space)
}

/// The IP the step trap reports once the slot's instruction (`len` bytes)
/// fell through: just past the step marker's `int3` for a marker plan, or
/// the end of the instruction in the slot for a trap-flag step.
pub fn step_trap_ip(plan: &rcu_registry::probes::arch::XolPlan, len: u64) -> u64 {
    match plan.step_marker {
        Some(marker) => marker + 1,
        None => plan.step_entry + len,
    }
}

/// Function entries of the file for return-handler tests: `f0` is the
/// `push rbp` at 0 (emulated); `f1`, `f2`, `f3` are `nop`s (emulated) past
/// the instruction samples.
pub const FN0: u64 = OFF_PUSH;
pub const FN1: u64 = 0x20;
pub const FN2: u64 = 0x28;
pub const FN3: u64 = 0x30;

/// One simulated thread making calls in a space: its stack memory, its
/// stack pointer, and the entry stack pointers of the calls it is in.
pub struct SimThread {
    pub stack: Stack,
    pub sp: u64,
    frames: Vec<u64>,
}

/// Where a simulated `ret` went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// Straight to this address (the return address was not hijacked).
    Direct(u64),
    /// Through the trampoline; `on_return` sent the thread to this address.
    Trampoline(u64),
}

impl SimThread {
    pub fn new() -> Self {
        SimThread {
            stack: Stack::new(),
            sp: Stack::top(),
            // Room for ordinary nesting up front: the simulated thread's
            // own bookkeeping must not allocate inside the calls the
            // allocation tests count.
            frames: Vec::with_capacity(16),
        }
    }

    /// Calls the function at `func` from `ret_addr`: pushes the return
    /// address, then traps on the entry breakpoint. Returns the outcome and
    /// the registers after the hit.
    pub fn call(
        &mut self,
        reg: &Registry,
        space: &MemSpace,
        func: u64,
        ret_addr: u64,
    ) -> rcu_registry::probes::uprobe::UprobeFinished {
        self.sp -= 8;
        self.stack.write(self.sp, &ret_addr.to_le_bytes()).unwrap();
        self.enter(reg, space, func)
    }

    /// Jumps to `func` from the current function after its epilogue (a tail
    /// call): the stack pointer is back at the current call's entry value.
    pub fn tail_call(
        &mut self,
        reg: &Registry,
        space: &MemSpace,
        func: u64,
    ) -> rcu_registry::probes::uprobe::UprobeFinished {
        self.sp = self.frames.pop().expect("a tail call from inside a call");
        self.enter(reg, space, func)
    }

    fn enter(
        &mut self,
        reg: &Registry,
        space: &MemSpace,
        func: u64,
    ) -> rcu_registry::probes::uprobe::UprobeFinished {
        self.frames.push(self.sp);
        let mut regs = trap_regs(func);
        regs.sp = self.sp;
        let out = match reg.on_breakpoint(space.id, &mut regs, &mut self.stack) {
            rcu_registry::probes::uprobe::UprobeOutcome::Done(o) => o,
            rcu_registry::probes::uprobe::UprobeOutcome::SingleStep(s) => {
                panic!(
                    "function entries here are emulated, got a step {:?}",
                    s.plan()
                )
            }
        };
        // The body runs; its stack use is balanced by its epilogue.
        self.sp = regs.sp;
        out
    }

    /// The return address the innermost call would return to now.
    pub fn return_slot(&self) -> u64 {
        let sp = *self.frames.last().expect("inside a call");
        let mut b = [0u8; 8];
        self.stack.read(sp, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    /// The innermost call returns `retval` (epilogue, then `ret`): a return
    /// into the trampoline goes through `on_return`.
    pub fn ret(&mut self, reg: &Registry, space: &MemSpace, retval: u64) -> Ret {
        let target = self.return_slot();
        let entry_sp = self.frames.pop().expect("inside a call");
        self.sp = entry_sp + 8;
        if Some(target) != space.trampoline {
            return Ret::Direct(target);
        }
        let mut regs = Regs {
            ip: target,
            sp: self.sp,
            ..Regs::default()
        };
        X86_64.set_return_value(&mut regs, retval);
        match reg.on_return(space.id, &mut regs) {
            rcu_registry::probes::outcome::ReturnOutcome::Returned { to } => {
                assert_eq!(regs.ip, to);
                Ret::Trampoline(to)
            }
            rcu_registry::probes::outcome::ReturnOutcome::NotOurs => {
                panic!(
                    "returned into the trampoline with no instance for sp {:#x}",
                    self.sp
                )
            }
        }
    }

    /// The innermost call is left without returning (`longjmp` to its
    /// caller): its frame is gone, its return address never used.
    pub fn abandon_innermost(&mut self) {
        let entry_sp = self.frames.pop().expect("inside a call");
        self.sp = entry_sp + 8;
    }

    /// Calls the thread is in.
    pub fn depth(&self) -> usize {
        self.frames.len()
    }
}
