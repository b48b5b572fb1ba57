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
//!    return address (the final jump goes through it, leaving the stack
//!    pointer as the caller expects);
//! 2. builds a [`Regs`] in place below it: the sixteen general registers
//!    pushed in hardware order (rax lowest, as `Regs::gprs` holds them),
//!    the words above them written (`sp` the caller's stack pointer, `ip`
//!    the trampoline, the rest 0), so the Rust half works on the frame
//!    itself, with no copy in or out;
//! 3. saves the vector and x87 state (the return value may be in `xmm0`/
//!    `xmm1`, `ymm0`, `zmm0` or `st0`, and the Rust code and the handlers
//!    may use vector registers) on a 64-byte aligned area below the frame,
//!    which also aligns the stack for the call: with `xsave64` of the x87,
//!    SSE, AVX and AVX-512 components the OS enabled (see [`XsavePlan`]),
//!    or with `fxsave64` where the processor has no `xsave`;
//!
//!    **The vector state**: a full `xsave64` costs 100-250 ns on the
//!    development machine, more than the rest of a return. Where the
//!    x87 stack is empty (its TOP field is 0: no `st0`/`st1` return value;
//!    XINUSE's x87 bit cannot tell, because the kernel sets it in every
//!    signal frame, which sent every return of a process that had handled
//!    a signal through the full save) and whether `ymm0`/`ymm1`'s (`zmm`)
//!    upper halves hold anything can be told (by their values, or by
//!    XINUSE: `jump/stubs.rs`, "The upper halves"), only what a return can
//!    carry is saved: `xmm0`/`xmm1` (`ymm`/`zmm` when their upper halves
//!    hold anything), and the upper state is cleaned for the Rust half
//!    (`vzeroupper`) and restored after. Every other vector register, the opmasks and MXCSR's
//!    status bits are caller-saved across the call being returned from, so
//!    the caller holds nothing there. The x86_64 jump stubs
//!    (`jump/stubs.rs`) share the detection (`ENTRY_VECTORS`).
//! 4. calls `trampoline_return(&mut regs)`, which offers the registers to
//!    the attached dispatchers (the registry finds this thread's instance
//!    for this stack pointer, runs the return handlers, and answers the
//!    real return address in `regs.ip`) and writes that address into the
//!    reserved word;
//! 5. restores everything and jumps to the real return address: an
//!    indirect `jmp` through the reserved word (now just below the stack
//!    pointer, in the red zone no signal frame touches), not a `ret`. The
//!    hijacked return already consumed the return-stack predictor's entry
//!    for this call; a `ret` here would pop the caller's caller's entry,
//!    mispredict, and leave every return above misaligned with the
//!    predictor.
//!
//! Return handlers run on the thread's ordinary stack, outside any signal
//! handler. Changes a handler makes to the general registers (e.g. the
//! return value in `rax`) take effect; a changed stack pointer is ignored.
//! Flags are not preserved (the ABI does not preserve them across a return
//! either).
//!
//! # Limitations
//!
//! - The `xsave` area is sized at run time (about 2.7 KiB with AVX-512) and
//!   taken from the returning thread's stack, below the caller's frame.
//!   Components other than x87, SSE, AVX and AVX-512 (AMX tiles, PKRU, ...)
//!   are not saved: no return value lives in them, and saving AMX state
//!   would fault in processes that never asked for it.
//! - The trampoline has no unwind information: a panic unwinding through a
//!   function whose return was hijacked cannot find the caller and aborts.
//! - If no instance claims a return (its record was lost), the real return
//!   address is unknown: the process is aborted with a message.

use crate::sync::atomic::{AtomicU64, Ordering};
use std::arch::global_asm;
use std::sync::Once;

use super::dispatch::dispatch_return;
use super::in_trap::TrapScope;
use crate::probes::arch::Regs;

/// Bytes of [`Regs`] above the sixteen registers the trampoline pushes
/// (rax lowest, in hardware order, as `Regs::gprs` holds them): the
/// trampoline builds `Regs` in place on the stack, below the slot for the
/// real return address, and the Rust half works on it there.
const ABOVE_BYTES: usize = std::mem::size_of::<Regs>() - 16 * 8;
/// The caller's stack pointer, from the start of `Regs`: past `Regs` and
/// the return slot.
const CALLER_SP: usize = std::mem::size_of::<Regs>() + 8;
const _: () = assert!(std::mem::size_of::<Regs>() == 34 * 8 && std::mem::align_of::<Regs>() == 8);

global_asm!(
    ".pushsection .text.rcu_registry_kretprobe_trampoline,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_kretprobe_trampoline",
    ".hidden __rcu_registry_kretprobe_trampoline",
    ".type __rcu_registry_kretprobe_trampoline,@function",
    "__rcu_registry_kretprobe_trampoline:",
    // The return slot, then the words of `Regs` above the sixteen pushed
    // registers (lea: no flag changes; none need keeping at a return).
    "lea rsp, [rsp - 8 - {above}]",
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
    // The rsp slot (gprs[4]): unused on x86_64 (`Regs::sp` has it), 0.
    "push 0",
    "push rbx",
    "push rdx",
    "push rcx",
    "push rax",
    "mov rbx, rsp",
    // `Regs` in place: gprs[16..31] (arm64's) zeroed with 16-byte stores
    // from xmm2 (caller-saved and no return register: dead at a return; a
    // legacy-SSE write leaves the upper state as it was), `sp` the
    // caller's (past the return slot), `ip` the trampoline, `flags` 0.
    "pxor xmm2, xmm2",
    "movdqu xmmword ptr [rsp + 128], xmm2",
    "movdqu xmmword ptr [rsp + 144], xmm2",
    "movdqu xmmword ptr [rsp + 160], xmm2",
    "movdqu xmmword ptr [rsp + 176], xmm2",
    "movdqu xmmword ptr [rsp + 192], xmm2",
    "movdqu xmmword ptr [rsp + 208], xmm2",
    "movdqu xmmword ptr [rsp + 224], xmm2",
    "xor ecx, ecx",
    "mov qword ptr [rsp + 240], rcx",
    "mov qword ptr [rsp + {flags_off}], rcx",
    "lea rcx, [rsp + {caller_sp}]",
    "mov qword ptr [rsp + {sp_off}], rcx",
    "lea rcx, [rip + __rcu_registry_kretprobe_trampoline]",
    "mov qword ptr [rsp + {ip_off}], rcx",
    // The fast path (see "The vector state" in the module docs): with
    // XINUSE, x87 in its initial state (no `st0`/`st1` return value) means
    // the caller can only be waiting for xmm0/xmm1 (ymm/zmm with their upper
    // halves in use): save those, clean the upper state for the Rust half,
    // restore them. Anything else takes the full save below.
    "mov ecx, dword ptr [rip + {vectors}]",
    // Where the mode says so (`VALUE_CHECK`), the upper halves' values are
    // tested instead of XINUSE (at 9 below, `jump/stubs.rs`).
    "test ecx, {value_check}",
    "jnz 9f",
    "test ecx, 4",
    "jz 8f",
    "mov r8d, ecx",
    "mov ecx, 1",
    "xgetbv",
    "mov ecx, r8d",
    // XINUSE's x87 bit says nothing here: the processor sets it when a
    // process first returns from a signal handler and never clears it. The
    // x87 stack's TOP field says whether the function left a return value
    // there (the ABI empties the stack otherwise): 0, none.
    "mov r8d, eax",
    "fnstsw ax",
    "test ax, 0x3800",
    "jnz 8f",
    "mov eax, r8d",
    "sub rsp, 128",
    "and rsp, -64",
    "test eax, 0x44",
    "jnz 5f",
    "4:",
    "movdqu xmmword ptr [rsp + 0], xmm0",
    "movdqu xmmword ptr [rsp + 16], xmm1",
    "mov rdi, rbx",
    "call {handler}",
    "movdqu xmm0, xmmword ptr [rsp + 0]",
    "movdqu xmm1, xmmword ptr [rsp + 16]",
    "test byte ptr [rip + {vectors}], 3",
    "jz 3f",
    "vzeroupper",
    "jmp 3f",
    "5:",
    "and ecx, 3",
    "cmp ecx, 2",
    "je 6f",
    "cmp ecx, 1",
    "jne 7f",
    "vmovdqu ymmword ptr [rsp + 0], ymm0",
    "vmovdqu ymmword ptr [rsp + 32], ymm1",
    "vzeroupper",
    "mov rdi, rbx",
    "call {handler}",
    "vmovdqu ymm0, ymmword ptr [rsp + 0]",
    "vmovdqu ymm1, ymmword ptr [rsp + 32]",
    "jmp 3f",
    "6:",
    "vmovdqu64 zmmword ptr [rsp + 0], zmm0",
    "vmovdqu64 zmmword ptr [rsp + 64], zmm1",
    "vzeroupper",
    "mov rdi, rbx",
    "call {handler}",
    "vmovdqu64 zmm0, zmmword ptr [rsp + 0]",
    "vmovdqu64 zmm1, zmmword ptr [rsp + 64]",
    "jmp 3f",
    "7:",
    // Upper halves in use without AVX enabled cannot happen; be safe.
    "mov rsp, rbx",
    "8:",
    // rax, rcx and rdx are saved in the frame: free to use until the pops.
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
    "call {handler}",
    "mov eax, dword ptr [rip + {xsave_mask}]",
    "mov edx, dword ptr [rip + {xsave_mask} + 4]",
    "xrstor64 [rsp]",
    "jmp 3f",
    "2:",
    "sub rsp, 512",
    "and rsp, -64",
    "fxsave64 [rsp]",
    "mov rdi, rbx",
    "call {handler}",
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
    // Not `ret`: the hijacked return already used the return-stack
    // predictor's entry for this call, so a `ret` here would pop the
    // caller's caller's entry and mispredict, and leave every return above
    // misaligned with the predictor. An indirect jump is predicted by the
    // branch target buffer instead. The word just below the stack pointer
    // is in the red zone, which no signal frame overwrites.
    "lea rsp, [rsp + {above} + 8]",
    "jmp qword ptr [rsp - 8]",
    // The values of the return registers' upper halves: any bit set, the
    // by-width save (at 5); none, `vzeroupper` (zero halves may still be
    // marked in use, which the Rust half's SSE code would pay for) and the
    // low halves only (at 4). First the x87 stack, as above. `k1`/`k2` hold
    // nothing at a return.
    "9:",
    "fnstsw ax",
    "test ax, 0x3800",
    "jnz 8b",
    "sub rsp, 128",
    "and rsp, -64",
    "test ecx, 2",
    "jnz 12f",
    "vptest ymm0, ymmword ptr [rip + {upper}]",
    "jnz 5b",
    "vptest ymm1, ymmword ptr [rip + {upper}]",
    "jnz 5b",
    "vzeroupper",
    "jmp 4b",
    "12:",
    "vptestmq k1, zmm0, zmm0",
    "vptestmq k2, zmm1, zmm1",
    "korw k1, k1, k2",
    "kshiftrw k1, k1, 2",
    "kortestw k1, k1",
    "jnz 5b",
    "vzeroupper",
    "jmp 4b",
    ".globl __rcu_registry_kretprobe_trampoline_end",
    ".hidden __rcu_registry_kretprobe_trampoline_end",
    "__rcu_registry_kretprobe_trampoline_end:",
    ".size __rcu_registry_kretprobe_trampoline, . - __rcu_registry_kretprobe_trampoline",
    ".popsection",
    handler = sym trampoline_return,
    xsave_bytes = sym XSAVE_BYTES,
    xsave_mask = sym XSAVE_MASK,
    vectors = sym super::jump::stubs::ENTRY_VECTORS,
    value_check = const super::jump::stubs::VALUE_CHECK,
    upper = sym super::jump::stubs::UPPER_128,
    above = const ABOVE_BYTES,
    caller_sp = const CALLER_SP,
    sp_off = const std::mem::offset_of!(Regs, sp),
    ip_off = const std::mem::offset_of!(Regs, ip),
    flags_off = const std::mem::offset_of!(Regs, flags),
);

/// Bytes the trampoline reserves for `xsave64` (0: use `fxsave64`), plus 64
/// for the alignment. Written once by [`XsavePlan::install`] before any
/// return can be hijacked; read by the assembly.
pub(crate) static XSAVE_BYTES: AtomicU64 = AtomicU64::new(0);
/// The `xsave64`/`xrstor64` component mask (EDX:EAX), see [`XsavePlan`].
pub(crate) static XSAVE_MASK: AtomicU64 = AtomicU64::new(0);

/// x87, SSE, AVX (`ymm` upper halves), and the three AVX-512 components
/// (opmask, `zmm0-15` upper halves, `zmm16-31`): every register a return
/// value or a handler's vector code can touch.
const VECTOR_COMPONENTS: u64 = 0b1110_0111;

/// What the trampoline saves around the return handlers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsavePlan {
    /// `xsave64` component mask (0 when the trampoline uses `fxsave64`).
    pub mask: u64,
    /// Bytes of the standard-format area those components need (0 with
    /// `fxsave64`, which uses 512).
    pub bytes: u64,
}

impl XsavePlan {
    /// Asks the processor: `xsave` enabled by the OS (`CPUID.1:ECX.OSXSAVE`),
    /// the components enabled in `XCR0`, and where each one ends in the
    /// standard-format area (`CPUID.(0DH, i)`).
    pub fn detect() -> XsavePlan {
        let leaf1 = core::arch::x86_64::__cpuid(1);
        if leaf1.ecx & (1 << 27) == 0 {
            return XsavePlan { mask: 0, bytes: 0 };
        }
        let (lo, hi): (u32, u32);
        // SAFETY: OSXSAVE is set, so `xgetbv` with ECX = 0 (XCR0) is allowed
        // in user mode; it only reads a register.
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        let mask = (u64::from(hi) << 32 | u64::from(lo)) & VECTOR_COMPONENTS;
        // The legacy area and the header: 576 bytes; each extended
        // component ends at its offset plus its size.
        let mut bytes = 576u64;
        for i in 2..64u32 {
            if mask & (1 << i) != 0 {
                // Leaf 0DH exists when OSXSAVE is set.
                let c = core::arch::x86_64::__cpuid_count(0xd, i);
                bytes = bytes.max(u64::from(c.ebx) + u64::from(c.eax));
            }
        }
        XsavePlan { mask, bytes }
    }

    /// Publishes the plan to the trampoline. Called once, before any
    /// return address is hijacked.
    fn install(self) {
        // Relaxed: the values are published to hijacked threads by the
        // registration that first writes the trampoline's address (its
        // release stores and the code patch's core sync), long before any
        // return lands there.
        XSAVE_MASK.store(self.mask, Ordering::Relaxed);
        XSAVE_BYTES.store(
            if self.mask == 0 { 0 } else { self.bytes + 64 },
            Ordering::Relaxed,
        );
    }
}

/// The plan the trampoline uses (detected on first use of
/// [`trampoline_address`]).
pub fn xsave_plan() -> XsavePlan {
    trampoline_address();
    // Relaxed: read after `install` on this thread or after the Once that
    // ran it (which orders it).
    let bytes = XSAVE_BYTES.load(Ordering::Relaxed);
    XsavePlan {
        mask: XSAVE_MASK.load(Ordering::Relaxed),
        bytes: bytes.saturating_sub(64),
    }
}

extern "C" {
    fn __rcu_registry_kretprobe_trampoline();
    fn __rcu_registry_kretprobe_trampoline_end();
}

/// The address kretprobe entries write as the return address. The first
/// call (from [`Live`](super::Live)'s constructor, never from a signal
/// handler) also detects what the trampoline must save ([`XsavePlan`]).
pub fn trampoline_address() -> u64 {
    static PLAN: Once = Once::new();
    PLAN.call_once(|| {
        XsavePlan::detect().install();
        super::jump::stubs::detect_vector_width();
    });
    __rcu_registry_kretprobe_trampoline as *const () as usize as u64
}

/// `[start, end)` of the trampoline's code (refused as a probe target).
pub(crate) fn trampoline_range() -> (u64, u64) {
    (
        trampoline_address(),
        __rcu_registry_kretprobe_trampoline_end as *const () as usize as u64,
    )
}

/// The trampoline's Rust half (see the module docs). `frame` points to the
/// [`Regs`] the assembly built on its stack; the slot for the real return
/// address is the word just above it, and the caller's stack pointer just
/// past that.
///
/// It raises the thread's trap flag first (`in_trap.rs`); a return that
/// finds it up is nested in the runtime's own work and runs no handler.
extern "C" fn trampoline_return(frame: *mut Regs) {
    let scope = TrapScope::enter();
    let missed = scope.is_none().then(super::in_trap::nested);
    returning(frame);
    drop(missed);
    drop(scope);
}

/// [`trampoline_return`] with the trap flag up: may call the C library (a
/// probe hit there is a nested trap). The call-graph walk stops here
/// (`callgraph/flag_up.rs`).
#[inline(never)]
extern "C" fn returning(frame: *mut Regs) {
    // SAFETY: the assembly passes the `Regs` it built on its own stack,
    // fully written, aligned, referenced by nothing else during the call.
    let regs = unsafe { &mut *frame };
    // Return handlers run inside `dispatch_return`: a panic there must not
    // unwind into the assembly (it has no unwind information).
    let claimed = super::signal::abort_on_panic(
        "rcu-registry: a probe handler panicked in the kretprobe return trampoline; \
         a panic cannot unwind through it, so the process aborts (see the handler \
         contract: rcu_registry::docs::patterns)",
        || dispatch_return(regs),
    );
    if !claimed {
        super::signal::fatal_message(
            "rcu-registry: a return reached the kretprobe trampoline but no kretprobe \
             instance claimed it; the real return address is lost",
        );
    }
    // The assembly pops the general registers from `regs` (a changed `sp`
    // is ignored) and jumps through the word just above it.
    // SAFETY: the return slot is the word just above `Regs` in the
    // assembly's frame, part of the same frame.
    unsafe { frame.add(1).cast::<u64>().write(regs.ip) };
}
