//! Shared fixtures for the kprobe tests: a small x86_64 code image with
//! known functions, a stack memory, and helpers that drive the hit path the
//! way the trap runtime will (trap, single-step by hand, step trap, return).

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcu_registry::probes::arch::{DataMemory, Regs, X86Reg, X86_64};
use rcu_registry::probes::kprobe::{HitOutcome, KprobeRegistry, StepResult, StepToken};
use rcu_registry::probes::outcome::ReturnOutcome;
use rcu_registry::probes::resolve::SymbolTable;
use rcu_registry::probes::text::Image;
use rcu_registry::probes::xol::XolArena;
use rcu_registry::probes::ProbeError;

pub const BASE: u64 = 0x1000;

/// `f`: push rbp; mov rbp, rsp; mov eax, 1; pop rbp; ret
pub const F: u64 = 0x1000;
pub const F_PUSH: u64 = F; // emulated
pub const F_MOV_RBP: u64 = F + 1; // out of line, boostable
pub const F_MOV_EAX: u64 = F + 4; // out of line, boostable
pub const F_POP: u64 = F + 9;
pub const F_RET: u64 = F + 10;

/// `g`: nop; syscall; mov rax, [rip+0x10]; ret
pub const G: u64 = 0x1010;
pub const G_NOP: u64 = G;
pub const G_SYSCALL: u64 = G + 1;
pub const G_RIPREL: u64 = G + 3;

/// `h`: push rbp; mov rbp, rsp; mov eax, 42; pop rbp; ret
pub const H: u64 = 0x1020;

/// `k`: mov eax, 7; ret (entry is not a push)
pub const K: u64 = 0x1030;

/// Where the kretprobe trampoline is said to be.
pub const TRAMPOLINE: u64 = 0x1f00;

/// Bytes past the last function, not in any symbol.
pub const NOWHERE: u64 = 0x1040;

pub const XOL_BASE: u64 = 0x8000_0000;
pub const XOL_SLOTS: usize = 64;

pub const STACK_BASE: u64 = 0x7000_0000;
pub const STACK_SIZE: usize = 0x4000;

pub fn code() -> Vec<u8> {
    let mut c = vec![0xccu8; 0x1000];
    let f = [0x55, 0x48, 0x89, 0xe5, 0xb8, 0x01, 0, 0, 0, 0x5d, 0xc3];
    let g = [0x90, 0x0f, 0x05, 0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0xc3];
    let h = [0x55, 0x48, 0x89, 0xe5, 0xb8, 0x2a, 0, 0, 0, 0x5d, 0xc3];
    let k = [0xb8, 0x07, 0, 0, 0, 0xc3];
    for (at, bytes) in [(F, &f[..]), (G, &g[..]), (H, &h[..]), (K, &k[..])] {
        let o = (at - BASE) as usize;
        c[o..o + bytes.len()].copy_from_slice(bytes);
    }
    // Something that is not a breakpoint where no symbol is.
    c[(NOWHERE - BASE) as usize] = 0x90;
    c
}

pub fn symbols() -> SymbolTable {
    let mut t = SymbolTable::new();
    t.insert("f", F, 11)
        .insert("g", G, 11)
        .insert("h", H, 11)
        .insert("k", K, 6);
    t
}

pub type Reg = KprobeRegistry<X86_64, Image>;

pub struct Fixture {
    pub reg: Reg,
    pub xol: Arc<XolArena>,
}

pub fn fixture() -> Fixture {
    fixture_with(|b| b)
}

pub fn fixture_with(
    f: impl FnOnce(
        rcu_registry::probes::kprobe::RegistryBuilder<X86_64, Image>,
    ) -> rcu_registry::probes::kprobe::RegistryBuilder<X86_64, Image>,
) -> Fixture {
    let xol = Arc::new(XolArena::new(XOL_BASE, XOL_SLOTS, X86_64::XOL_SLOT_SIZE));
    let builder = KprobeRegistry::builder(X86_64, Image::new(BASE, code()), symbols(), xol.clone())
        .trampoline(TRAMPOLINE);
    Fixture {
        reg: f(builder).build(),
        xol,
    }
}

/// A thread's stack.
pub struct Stack {
    pub bytes: Vec<u8>,
}

impl Stack {
    pub fn new() -> Self {
        Stack {
            bytes: vec![0; STACK_SIZE],
        }
    }

    pub fn top() -> u64 {
        STACK_BASE + STACK_SIZE as u64 / 2
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, ProbeError> {
        let start = addr
            .checked_sub(STACK_BASE)
            .map(|o| o as usize)
            .filter(|&o| o + len <= self.bytes.len())
            .ok_or(ProbeError::MemoryFault { addr, len })?;
        Ok(start..start + len)
    }
}

impl Default for Stack {
    fn default() -> Self {
        Self::new()
    }
}

impl DataMemory for Stack {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        let r = self.range(addr, bytes.len())?;
        self.bytes[r].copy_from_slice(bytes);
        Ok(())
    }
}

/// Registers as the CPU reports an `int3` at `addr`: IP past the breakpoint.
pub fn trap_regs(addr: u64) -> Regs {
    Regs {
        ip: addr + 1,
        sp: Stack::top(),
        ..Regs::default()
    }
}

/// The IP the step trap reports after the slot's instruction fell through:
/// just past the step marker's `int3` (which reports the byte after
/// itself), or, for a trap-flag step, the end of the instruction in the slot.
pub fn step_trap_ip(token: &StepToken<'_>) -> u64 {
    match token.step_marker() {
        Some(marker) => marker + 1,
        None => {
            token
                .plan()
                .fixups
                .ip
                .expect("a single-stepped plan fixes the IP")
                .from
        }
    }
}

/// Pretends to execute the slot's instruction: applies `effect`, moves the
/// IP to where the step trap reports it ([`step_trap_ip`]).
pub fn execute_slot(token: &StepToken<'_>, regs: &mut Regs, effect: impl FnOnce(&mut Regs)) {
    effect(regs);
    regs.ip = step_trap_ip(token);
}

/// Traps at `addr` and completes the hit the way the runtime would, with
/// `effect` standing in for the instruction in the slot. Returns the first
/// outcome's kind (`"emulated"`, `"boosted"`, `"single-step"`, ...).
pub fn hit(reg: &Reg, addr: u64, regs: &mut Regs, stack: &mut Stack) -> &'static str {
    hit_with(reg, addr, regs, stack, |_| {})
}

pub fn hit_with(
    reg: &Reg,
    addr: u64,
    regs: &mut Regs,
    stack: &mut Stack,
    effect: impl FnOnce(&mut Regs),
) -> &'static str {
    regs.ip = addr + 1;
    match reg.on_breakpoint(regs, stack) {
        HitOutcome::NotOurs => "not-ours",
        HitOutcome::Vanished => "vanished",
        HitOutcome::Skipped => "skipped",
        HitOutcome::Emulated => "emulated",
        HitOutcome::Boosted { slot } => {
            assert_eq!(regs.ip, slot);
            "boosted"
        }
        HitOutcome::SingleStep(token) => {
            execute_slot(&token, regs, effect);
            match reg.on_step_complete(token, regs, stack) {
                StepResult::Done => "single-step",
                StepResult::Repeat(_) => panic!("unexpected repeat"),
                StepResult::Failed(e) => panic!("step failed: {e}"),
            }
        }
        HitOutcome::Failed(e) => panic!("hit failed: {e}"),
    }
}

/// Reads the byte at `addr` of the registry's image.
pub fn byte_at(reg: &Reg, addr: u64) -> u8 {
    reg.text().snapshot()[(addr - BASE) as usize]
}

pub fn rax(regs: &Regs) -> u64 {
    regs[X86Reg::Rax]
}

/// Calls `func` with the stack pointer at `sp` (the return address `ret` at
/// `[sp]`): the entry trap, completed. Returns the registers after the first
/// instruction.
pub fn enter(reg: &Reg, func: u64, sp: u64, ret: u64, rdi: u64, stack: &mut Stack) -> Regs {
    stack.write_u64(sp, ret).unwrap();
    let mut regs = trap_regs(func);
    regs.sp = sp;
    regs[X86Reg::Rdi] = rdi;
    let kind = hit(reg, func, &mut regs, stack);
    assert_eq!(kind, "emulated", "push rbp at the entry is emulated");
    regs
}

/// The function entered with `sp` returns `rax` into the trampoline.
pub fn leave(reg: &Reg, sp: u64, rax: u64) -> (ReturnOutcome, Regs) {
    let mut regs = Regs {
        ip: TRAMPOLINE,
        sp: sp + 8,
        ..Regs::default()
    };
    regs[X86Reg::Rax] = rax;
    let out = reg.on_return(&mut regs);
    (out, regs)
}

/// Per-call data that counts its drops: a kretprobe pool's memory is freed
/// exactly when every instance's data is dropped ([`tracked_drops`]; one
/// counter per test binary, so one test per binary may use it).
#[derive(Default)]
pub struct Tracked(pub u64);

static TRACKED_DROPS: AtomicUsize = AtomicUsize::new(0);

impl Drop for Tracked {
    fn drop(&mut self) {
        TRACKED_DROPS.fetch_add(1, Ordering::SeqCst);
    }
}

/// How many [`Tracked`] values were dropped in this test binary.
pub fn tracked_drops() -> usize {
    TRACKED_DROPS.load(Ordering::SeqCst)
}

/// Traps at `addr` on a probe that single-steps and leaves the step in
/// flight: the token, with `regs` set up for the slot.
pub fn start_step<'r>(
    reg: &'r Reg,
    addr: u64,
    regs: &mut Regs,
    stack: &mut Stack,
) -> StepToken<'r> {
    *regs = trap_regs(addr);
    match reg.on_breakpoint(regs, stack) {
        HitOutcome::SingleStep(token) => token,
        other => panic!("expected a single-step at {addr:#x}, got {other:?}"),
    }
}

/// Completes a step [`start_step`] left in flight (the slot's instruction
/// falls through; its post handlers run).
pub fn finish_step<'r>(reg: &'r Reg, token: StepToken<'r>, regs: &mut Regs, stack: &mut Stack) {
    execute_slot(&token, regs, |_| {});
    assert!(matches!(
        reg.on_step_complete(token, regs, stack),
        StepResult::Done
    ));
}
