//! The kretprobe return trampoline: where a hijacked return lands.
//!
//! # Without a trap
//!
//! At a kretprobe's entry the registry replaces the return address with
//! [`trampoline_address`]. When the function returns, `ret` jumps here with
//! the stack pointer already past the return address, exactly as the caller
//! will see it. Instead of a breakpoint (a second trap per call) the
//! trampoline is a small piece of assembly that:
//!
//! 1. reserves the word just below the caller's stack pointer for the real
//!    return address (the final `ret` pops it, leaving the stack pointer as
//!    the caller expects);
//! 2. pushes the sixteen general registers in [`Regs`] order (rax first in
//!    memory), so the frame *is* an array the Rust side indexes by hardware
//!    number;
//! 3. saves the x87/SSE state with `fxsave64` (the return value may be in
//!    `xmm0`/`xmm1` or `st0`, and the Rust code and the handlers may use
//!    vector registers) on a 64-byte aligned area, which also aligns the
//!    stack for the call;
//! 4. calls `trampoline_return(frame)`, which builds a [`Regs`] (stack
//!    pointer = the caller's, IP = the trampoline), offers it to the
//!    attached dispatchers (the registry finds this thread's instance for
//!    this stack pointer, runs the return handlers, and answers the real
//!    return address in `regs.ip`), and writes the registers and the return
//!    address back into the frame;
//! 5. restores everything and returns to the real return address.
//!
//! Return handlers run on the thread's ordinary stack, outside any signal
//! handler. Changes a handler makes to the general registers (e.g. the
//! return value in `rax`) take effect; a changed stack pointer is ignored.
//! Flags are not preserved (the ABI does not preserve them across a return
//! either).
//!
//! # Limitations
//!
//! - The AVX upper halves of `ymm`/`zmm` registers are not saved: a function
//!   returning a 256-bit vector by value loses its upper half if a handler
//!   clobbers it.
//! - The trampoline has no unwind information: a panic unwinding through a
//!   function whose return was hijacked cannot find the caller and aborts.
//! - If no instance claims a return (its record was lost), the real return
//!   address is unknown: the process is aborted with a message.

use std::arch::global_asm;

use super::dispatch::dispatch_return;
use crate::probes::arch::Regs;

/// Words in the trampoline frame: sixteen registers and the return address.
const FRAME_WORDS: usize = 17;
/// Index of the real return address in the frame.
const RET_SLOT: usize = 16;
/// Hardware number of `rsp`, kept in [`Regs::sp`] instead.
const RSP: usize = 4;

global_asm!(
    ".pushsection .text.rcu_registry_kretprobe_trampoline,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_kretprobe_trampoline",
    ".hidden __rcu_registry_kretprobe_trampoline",
    ".type __rcu_registry_kretprobe_trampoline,@function",
    "__rcu_registry_kretprobe_trampoline:",
    "sub rsp, 8",
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
    // The rsp slot: a placeholder (the Rust side computes the caller's).
    "push rax",
    "push rbx",
    "push rdx",
    "push rcx",
    "push rax",
    "mov rbx, rsp",
    "sub rsp, 512",
    "and rsp, -64",
    "fxsave64 [rsp]",
    "mov rdi, rbx",
    "call {handler}",
    "fxrstor64 [rsp]",
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
    "ret",
    ".globl __rcu_registry_kretprobe_trampoline_end",
    ".hidden __rcu_registry_kretprobe_trampoline_end",
    "__rcu_registry_kretprobe_trampoline_end:",
    ".size __rcu_registry_kretprobe_trampoline, . - __rcu_registry_kretprobe_trampoline",
    ".popsection",
    handler = sym trampoline_return,
);

extern "C" {
    fn __rcu_registry_kretprobe_trampoline();
    fn __rcu_registry_kretprobe_trampoline_end();
}

/// The address kretprobe entries write as the return address.
pub fn trampoline_address() -> u64 {
    __rcu_registry_kretprobe_trampoline as *const () as usize as u64
}

/// `[start, end)` of the trampoline's code (refused as a probe target).
pub(crate) fn trampoline_range() -> (u64, u64) {
    (
        trampoline_address(),
        __rcu_registry_kretprobe_trampoline_end as *const () as usize as u64,
    )
}

/// The trampoline's Rust half (see the module docs). `frame` points to
/// [`FRAME_WORDS`] words: the registers by hardware number, then the slot
/// for the real return address; the caller's stack pointer is just past it.
extern "C" fn trampoline_return(frame: *mut [u64; FRAME_WORDS]) {
    // SAFETY: the assembly passes its own stack frame, 17 initialised,
    // aligned words that nothing else references during the call.
    let f = unsafe { &mut *frame };
    let mut regs = Regs::default();
    for n in (0..16).filter(|&n| n != RSP) {
        regs.gprs[n] = f[n];
    }
    regs.sp = frame as u64 + (FRAME_WORDS * 8) as u64;
    regs.ip = trampoline_address();
    if !dispatch_return(&mut regs) {
        super::signal::fatal_message(
            "rcu-registry: a return reached the kretprobe trampoline but no kretprobe \
             instance claimed it; the real return address is lost",
        );
    }
    for n in (0..16).filter(|&n| n != RSP) {
        f[n] = regs.gprs[n];
    }
    f[RET_SLOT] = regs.ip;
}
