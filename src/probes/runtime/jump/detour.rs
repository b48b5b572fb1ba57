//! A jump detour: the per-site bytes an optimized probe's `jmp` lands in,
//! and the shared stub and Rust half they call.
//!
//! # Layout of one detour (one 64-byte slot within +/-2 GiB of the site)
//!
//! ```text
//!  0  lea rsp, [rsp - 128]      step over the red zone, touch nothing
//!  5  call qword [rip + 45]     -> the stub (address at 56); pushes 11
//! 11  <relocated displaced instructions>
//!     jmp rel32 <probe + len>   back past the displaced bytes
//!     int3 ...                  padding
//! 48  dq &'static JumpSlot      what the Rust half needs (site, registry, state)
//! 56  dq stub
//! ```
//!
//! `lea` and `call` change no flag. The code below the probed function's
//! stack pointer, down to 128 bytes, is its red zone (a leaf function keeps
//! data there without moving `rsp`); the detour writes nothing there: the
//! `call` pushes at `rsp - 136` and the stub saves below that.
//!
//! # The stub
//!
//! `pushfq`, `cld` (the Rust code assumes the ABI's clear direction flag),
//! the sixteen general registers in [`Regs`] order (rax lowest, as the
//! kretprobe trampoline does), then the vector state: `xsave64` of x87, SSE,
//! AVX and AVX-512 on a 64-byte aligned area below (the trampoline's
//! [`XsavePlan`](super::super::trampoline::XsavePlan); `fxsave64` without
//! `xsave`). Every site gets the full save, function entry or not:
//! `docs::limitations` ("Jump-optimized probes") has the measurements of
//! the alternatives and why. It calls the Rust half with the frame, restores
//! everything and leaves with `ret 128`: the return address slot (the word
//! the detour's `call` pushed) holds where to continue, and `ret 128` pops it
//! and steps back over the red zone in one instruction, so the thread
//! continues with every register, the flags and `rsp` as they were (or as a
//! pre handler set them), at the relocated instructions (the `call`'s own
//! return address, unchanged), at a pre handler's new IP, or at the probed
//! address (redirect).
//!
//! # The Rust half
//!
//! [`jump_entry`] raises the runtime's trap flag (`in_trap.rs`: a probe hit
//! inside runs no handler), builds [`Regs`] (IP = the probed address, SP =
//! the probed code's), and calls
//! [`on_jump_hit`](crate::probes::kprobe::KprobeRegistry::on_jump_hit) of
//! the registry the slot names, with the slot's state as `live`. Handlers run
//! on the thread's own stack, outside any signal handler. A changed stack
//! pointer is ignored; of the flags only the status flags and DF are taken
//! back.

use std::arch::global_asm;

use crate::probes::arch::Regs;
use crate::probes::kprobe::JumpHit;
use crate::probes::runtime::context::ThreadMemory;
use crate::probes::runtime::in_trap::TrapScope;
use crate::probes::runtime::LiveRegistry;
use crate::sync::atomic::{AtomicBool, Ordering};

/// Bytes of a detour (one slot of the detour area).
pub(crate) const DETOUR_BYTES: usize = 64;
/// Offset of the relocated instructions: the `call`'s return address.
pub(crate) const RELOCATED_AT: u64 = 11;
/// Offset of the `&'static JumpSlot` word.
const SLOT_WORD: usize = 48;
/// Offset of the stub's address.
const STUB_WORD: usize = 56;
/// Room for the relocated instructions and the jump back.
const CODE_ROOM: usize = SLOT_WORD - RELOCATED_AT as usize;

/// Words the stub saves: sixteen registers, the flags, the return address.
const FRAME_WORDS: usize = 18;
const FLAGS_WORD: usize = 16;
const RET_WORD: usize = 17;
/// Hardware number of `rsp`, kept in [`Regs::sp`] instead.
const RSP: usize = 4;
/// The red zone the detour steps over.
const RED_ZONE: u64 = 128;
/// Flags a pre handler may change: CF, PF, AF, ZF, SF, DF, OF (never TF,
/// IF, AC or the others `popfq` would act on).
const HANDLER_FLAGS: u64 = 0xed5;

global_asm!(
    ".pushsection .text.rcu_registry_jump_stub,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_jump_stub",
    ".hidden __rcu_registry_jump_stub",
    ".type __rcu_registry_jump_stub,@function",
    "__rcu_registry_jump_stub:",
    "pushfq",
    "cld",
    "push r15",
    "push r14",
    "push r13",
    "push r12",
    "push r11",
    "push r10",
    "push r9",
    "push r8",
    "push rdi",
    "push rsi",
    "push rbp",
    // The rsp slot: a placeholder (the Rust side computes the probed code's).
    "push rax",
    "push rbx",
    "push rdx",
    "push rcx",
    "push rax",
    "mov rbx, rsp",
    "mov rcx, qword ptr [rip + {xsave_bytes}]",
    "test rcx, rcx",
    "jz 2f",
    "sub rsp, rcx",
    "and rsp, -64",
    // The XSAVE header after the legacy area: XCOMP_BV and the reserved
    // bytes must be zero for XRSTOR (XSAVE writes only XSTATE_BV).
    "xor eax, eax",
    "mov qword ptr [rsp + 512], rax",
    "mov qword ptr [rsp + 520], rax",
    "mov qword ptr [rsp + 528], rax",
    "mov qword ptr [rsp + 536], rax",
    "mov qword ptr [rsp + 544], rax",
    "mov qword ptr [rsp + 552], rax",
    "mov qword ptr [rsp + 560], rax",
    "mov qword ptr [rsp + 568], rax",
    "mov eax, dword ptr [rip + {xsave_mask}]",
    "mov edx, dword ptr [rip + {xsave_mask} + 4]",
    "xsave64 [rsp]",
    "mov rdi, rbx",
    "call {entry}",
    "mov eax, dword ptr [rip + {xsave_mask}]",
    "mov edx, dword ptr [rip + {xsave_mask} + 4]",
    "xrstor64 [rsp]",
    "jmp 3f",
    "2:",
    "sub rsp, 512",
    "and rsp, -64",
    "fxsave64 [rsp]",
    "mov rdi, rbx",
    "call {entry}",
    "fxrstor64 [rsp]",
    "3:",
    "mov rsp, rbx",
    "pop rax",
    "pop rcx",
    "pop rdx",
    "pop rbx",
    "add rsp, 8",
    "pop rbp",
    "pop rsi",
    "pop rdi",
    "pop r8",
    "pop r9",
    "pop r10",
    "pop r11",
    "pop r12",
    "pop r13",
    "pop r14",
    "pop r15",
    "popfq",
    "ret 128",
    ".globl __rcu_registry_jump_stub_end",
    ".hidden __rcu_registry_jump_stub_end",
    "__rcu_registry_jump_stub_end:",
    ".size __rcu_registry_jump_stub, . - __rcu_registry_jump_stub",
    ".popsection",
    entry = sym jump_entry,
    xsave_bytes = sym crate::probes::runtime::trampoline::XSAVE_BYTES,
    xsave_mask = sym crate::probes::runtime::trampoline::XSAVE_MASK,
);

extern "C" {
    fn __rcu_registry_jump_stub();
    fn __rcu_registry_jump_stub_end();
}

/// `[start, end)` of the shared stub: part of every quiescence wait that
/// retires a detour (a thread in the stub returns into one).
pub(crate) fn stub_range() -> std::ops::Range<u64> {
    let start = __rcu_registry_jump_stub as *const () as usize as u64;
    start..__rcu_registry_jump_stub_end as *const () as usize as u64
}

/// The code addresses of the Rust half (the functions a thread runs
/// between its read section and the return into a detour), for the
/// quiescence wait that retires detours; their extents come from the
/// symbol table.
pub(crate) fn entry_functions() -> [u64; 2] {
    [
        jump_entry as *const () as usize as u64,
        entering as *const () as usize as u64,
    ]
}

/// What a detour's Rust half needs to know about its site. Leaked: one per
/// address ever optimized by a registry, reused when it is optimized again,
/// so that a detour refilled for the same address holds the same bytes.
#[derive(Debug)]
pub(crate) struct JumpSlot {
    /// The probed address.
    pub(crate) addr: u64,
    pub(crate) registry: &'static LiveRegistry,
    /// Whether the site's `jmp` is (about to be) written: a hit that reads
    /// false redirects to the probed address (`kprobe/jump.rs`).
    pub(crate) live: AtomicBool,
}

/// The bytes of the detour at `at` for a site whose relocated displaced
/// instructions are `relocated`, jumping back to `resume`. `None` if they
/// do not fit or `resume` is out of `rel32` reach.
pub(crate) fn detour_bytes(
    at: u64,
    relocated: &[u8],
    resume: u64,
    slot: &'static JumpSlot,
) -> Option<[u8; DETOUR_BYTES]> {
    if relocated.len() + 5 > CODE_ROOM {
        return None;
    }
    let mut b = [0xccu8; DETOUR_BYTES];
    b[..5].copy_from_slice(&[0x48, 0x8d, 0x64, 0x24, 0x80]);
    let call_disp = (STUB_WORD as u64 - RELOCATED_AT) as u32;
    b[5..7].copy_from_slice(&[0xff, 0x15]);
    b[7..11].copy_from_slice(&call_disp.to_le_bytes());
    let mut i = RELOCATED_AT as usize;
    b[i..i + relocated.len()].copy_from_slice(relocated);
    i += relocated.len();
    let next = at + i as u64 + 5;
    let rel = i32::try_from(resume.wrapping_sub(next) as i64).ok()?;
    b[i] = 0xe9;
    b[i + 1..i + 5].copy_from_slice(&rel.to_le_bytes());
    let slot_ptr = slot as *const JumpSlot as usize as u64;
    b[SLOT_WORD..SLOT_WORD + 8].copy_from_slice(&slot_ptr.to_le_bytes());
    let stub = __rcu_registry_jump_stub as *const () as usize as u64;
    b[STUB_WORD..STUB_WORD + 8].copy_from_slice(&stub.to_le_bytes());
    Some(b)
}

/// The `jmp rel32` from `addr` to the detour at `detour`, or `None` out of
/// reach.
pub(crate) fn jump_to(addr: u64, detour: u64) -> Option<[u8; 5]> {
    let rel = i32::try_from(detour.wrapping_sub(addr + 5) as i64).ok()?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

/// The stub's call (see the module docs). `frame` points to
/// [`FRAME_WORDS`] words: the registers by hardware number, the flags, and
/// the detour's return address, with the probed code's stack pointer 128
/// bytes above its end.
extern "C" fn jump_entry(frame: *mut [u64; FRAME_WORDS]) {
    let scope = TrapScope::enter();
    let missed = scope.is_none().then(super::super::in_trap::nested);
    entering(frame);
    drop(missed);
    drop(scope);
}

/// [`jump_entry`] with the trap flag up.
#[inline(never)]
extern "C" fn entering(frame: *mut [u64; FRAME_WORDS]) {
    // SAFETY: the stub passes its own stack frame, 18 initialised, aligned
    // words that nothing else references during the call.
    let f = unsafe { &mut *frame };
    let detour = f[RET_WORD] - RELOCATED_AT;
    // SAFETY: the return address is the detour's byte 11 (only detours call
    // the stub), and a detour's slot word holds a leaked `&'static
    // JumpSlot`; the detour is not freed while a thread is in its stub
    // (`jump.rs`, "Freeing a detour").
    let slot: &'static JumpSlot =
        unsafe { &*(((detour + SLOT_WORD as u64) as *const u64).read() as *const JumpSlot) };
    let mut regs = Regs::default();
    for n in (0..16).filter(|&n| n != RSP) {
        regs.gprs[n] = f[n];
    }
    regs.sp = frame as u64 + (FRAME_WORDS * 8) as u64 + RED_ZONE;
    regs.flags = f[FLAGS_WORD];
    regs.ip = slot.addr;
    let hit = super::super::signal::abort_on_panic(
        "rcu-registry: a probe handler panicked in a jump detour; a panic cannot \
         unwind through it, so the process aborts (see the handler contract: \
         rcu_registry::docs::patterns)",
        || {
            slot.registry
                .on_jump_hit(slot.addr, &mut regs, &mut ThreadMemory, || {
                    // Acquire pairs with the Release stores in `jump.rs`
                    // (`optimize_batch`, `unoptimize`).
                    slot.live.load(Ordering::Acquire)
                })
        },
    );
    match hit {
        JumpHit::Redirect => {
            f[RET_WORD] = slot.addr;
            return;
        }
        JumpHit::Skip => f[RET_WORD] = regs.ip,
        JumpHit::Continue => {}
    }
    for n in (0..16).filter(|&n| n != RSP) {
        f[n] = regs.gprs[n];
    }
    f[FLAGS_WORD] = (f[FLAGS_WORD] & !HANDLER_FLAGS) | (regs.flags & HANDLER_FLAGS);
}
