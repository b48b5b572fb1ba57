//! The two shared stubs a jump detour calls: they save what the probed
//! code may have live, build a [`Regs`] in place on the stack, call the
//! detour's Rust half (`jump/detour.rs`) and restore.
//!
//! # The two stubs
//!
//! Each site's detour calls one of two shared stubs, chosen per site when
//! it is optimized:
//!
//! - **the full stub**, for a probe inside a function: `pushfq`, `cld` (the
//!   Rust code assumes the ABI's clear direction flag), the sixteen general
//!   registers in [`Regs`] order (rax lowest, as the kretprobe trampoline
//!   does), then the vector state, of which anything may be live
//!   mid-function: where `xgetbv` with ECX = 1 (XINUSE) shows the x87
//!   state and the upper halves of `ymm`/`zmm0-15` in their initial state,
//!   `xmm0-15`, MXCSR and, where in use, the opmasks and `zmm16-31`, by
//!   moves (the upper state cleaned again after the Rust half);
//!   otherwise the whole state, `xsave64` of x87, SSE, AVX and AVX-512 on a
//!   64-byte aligned area below (the trampoline's
//!   [`XsavePlan`](super::super::trampoline::XsavePlan); `fxsave64` without
//!   `xsave`), with the upper state cleaned for the Rust half;
//!
//!   The kernel marks x87 state in use at every signal return (every
//!   probe is a trap before it is optimized, and the quiescence proofs
//!   signal every thread), which would send every mid-function hit of a
//!   process this runtime serves through the full save; the runtime's own
//!   signal handlers mark an unused x87 state unused again in their frames
//!   (`runtime/x87_state.rs`), so the fast path is what a thread that
//!   does not use x87 gets (measured: 50-55 ns added per mid-function hit
//!   against 111 ns with the full save). A thread that uses x87, or that
//!   took a signal of the program's own, pays the full save. The x87
//!   stack's TOP field cannot stand in for the bit mid-function (TOP is 0
//!   both when the stack is empty and when all eight registers are live,
//!   and telling the two apart takes `fnstenv`/`fldenv`, about 60 ns
//!   here); the return trampoline, where the ABI leaves the stack empty
//!   but for a return value, reads TOP.
//! - **the entry stub**, for a probe at a function's first instruction (its
//!   symbol's start): what the System V calling convention can make live
//!   there and a handler (ABI-conforming code) may clobber: the general
//!   registers, the status flags (`lahf`/`seto`, restored with the
//!   `add al, 0x7f`/`sahf` idiom: `popfq` alone costs 12 ns here) and the
//!   vector argument registers `xmm0-7` at their widest enabled width
//!   (`zmm0-7` with AVX-512, `ymm0-7` with AVX). The other vector
//!   registers, the opmasks and the x87 stack are caller-saved and hold no
//!   argument at a call, so nothing the caller relies on lives there; the
//!   control words (MXCSR, x87 CW) are callee-saved, so a handler preserves
//!   them. DF is 0 at a call (the ABI), and is not restored.
//!
//! # The upper halves
//!
//! Where every upper half of the argument registers (bits 128 and up of
//! `ymm0-7`/`zmm0-7`) is zero, the entry stub saves the low 128 bits only
//! and ends with `vzeroupper`, which puts the zeros back and leaves the
//! upper state clean; the return trampoline does the same for `xmm0`/
//! `xmm1`. Otherwise both save the registers whole. Two ways to tell,
//! chosen once per process ([`detect_vector_width`]):
//!
//! - **by value** ([`VALUE_CHECK`]): `vptest` of each `ymm` against a mask
//!   of its upper half, or with AVX-512 `vptestmq` of each `zmm` (a bit
//!   per nonzero quadword, the two low ones dropped). Zero halves the
//!   processor still counts as in use are cleaned with a `vzeroupper`
//!   before the Rust half (the values are the same);
//! - **by XINUSE** (`xgetbv` with ECX = 1): the AVX and ZMM_Hi256
//!   components in their initial state.
//!
//! On the AMD EPYC VM this was measured on, `xgetbv` costs about 11 ns: a
//! bare detour (stub and return, no registry work) took 25 ns with it and
//! 14 ns without, and an optimized kretprobe paid it twice (entry and
//! return): by value, 75-80 ns added per kretprobe call became 57-61 ns
//! and a kprobe hit 26 ns became 20 ns (paired runs). Values are what every
//! processor with AVX and no AVX-512 uses (eight 256-bit tests), and AMD
//! and Hygon processors with AVX-512 (512-bit instructions run at full
//! clock there). Intel processors with AVX-512 ask XINUSE instead: a
//! 512-bit instruction on every hit could hold a Skylake-to-Cascade-Lake
//! core at a lower frequency licence, and an earlier ablation on this
//! project's Xeon VM measured `xgetbv` there at 1-3 ns. A processor
//! without XINUSE and without the value tests (none known) would save the
//! registers whole on every hit. The tests run every way the processor
//! allows, at every width up to its own (test hooks in `__internals`).
//!
//! Measured on this machine (a 2-core Xeon VM), one save and restore pair:
//! `xsave64` of x87/SSE/AVX/AVX-512 100-215 ns, `xsavec64` 100-180 ns,
//! `fxsave64` (no `ymm` upper halves: not enough) 60-80 ns, `zmm0-7` by
//! moves 5 ns, `ymm0-7` 4.5 ns: a full save alone is four times the
//! 25 ns budget of a hit, so entry sites (where every kprobe benchmark and
//! most tracing probes sit) get the entry stub. The price is an
//! assumption: code entered at a function symbol follows the calling
//! convention. Hand-written functions with their own (a TLS descriptor
//! resolver that preserves every register, say) must opt out
//! (`Kprobe::set_jump_opt_out`); `docs::limitations` says so.
//!
//! Either stub calls the Rust half with the frame, restores everything and
//! leaves with `ret 128`: the return address slot (the word
//! the detour's `call` pushed) holds where to continue, and `ret 128` pops it
//! and steps back over the red zone in one instruction, so the thread
//! continues with every register, the flags and `rsp` as they were (or as a
//! pre handler set them), at the relocated instructions (the `call`'s own
//! return address, unchanged), at a pre handler's new IP, or at the probed
//! address (redirect).
//!

use std::arch::global_asm;

use super::detour::jump_entry;
use crate::probes::arch::Regs;
use crate::sync::atomic::Ordering;

/// The stubs build a [`Regs`] in place on the stack (sixteen registers
/// pushed in hardware order, rax lowest, as the kretprobe trampoline does;
/// above them the rest of `Regs`), just below the detour's return address,
/// and pass the Rust half a pointer to it: no copy in, no copy out.
const REGS_BYTES: usize = std::mem::size_of::<Regs>();
const _: () = assert!(REGS_BYTES == 34 * 8 && std::mem::align_of::<Regs>() == 8);
/// Bytes of `Regs` above the sixteen pushed registers.
const ABOVE_BYTES: usize = REGS_BYTES - 16 * 8;
const SP_OFF: usize = std::mem::offset_of!(Regs, sp);
const IP_OFF: usize = std::mem::offset_of!(Regs, ip);
const FLAGS_OFF: usize = std::mem::offset_of!(Regs, flags);
/// The red zone the detour steps over.
const RED_ZONE: usize = 128;
/// The probed code's stack pointer, from the start of `Regs`: past it, the
/// return address and the red zone.
const ORIG_SP: usize = REGS_BYTES + 8 + RED_ZONE;
/// The entry stub's vector width: 0 `xmm0-7`, 1 `ymm0-7`, 2 `zmm0-7`;
/// plus 4 when `xgetbv` with ECX = 1 (XINUSE) is available, plus 8 with
/// AVX512BW (64-bit opmasks), plus [`VALUE_CHECK`] where the entry stub and
/// the return trampoline test the upper halves' values instead of asking
/// XINUSE (module docs, "The upper halves"). Set once by
/// [`detect_vector_width`] before any detour exists; read by the assembly.
/// Every access is Relaxed: the detected value reaches the threads that
/// run detours through the detours' own publication, and a test hook's
/// switch ([`set_upper_check`], [`set_vector_width`]) is made on the thread
/// that then makes the calls (or before the threads that make them start).
pub(crate) static ENTRY_VECTORS: crate::sync::atomic::AtomicU32 =
    crate::sync::atomic::AtomicU32::new(0);

/// [`ENTRY_VECTORS`] bit: test the upper halves' values (`vptest`,
/// `vptestmq`) rather than XINUSE (`xgetbv`).
pub(crate) const VALUE_CHECK: u32 = 16;

/// The `vptest` mask of a `ymm` register's upper half: bits 128-255.
#[repr(C, align(32))]
pub(crate) struct Upper128([u8; 32]);

/// Read by the entry stub and the return trampoline (`vptest`).
pub(crate) static UPPER_128: Upper128 = Upper128({
    let mut m = [0u8; 32];
    let mut i = 16;
    while i < 32 {
        m[i] = 0xff;
        i += 1;
    }
    m
});

/// Whether the upper halves are best told by their values: with AVX and no
/// AVX-512 (eight 256-bit `vptest`s), with AVX-512 on AMD and Hygon
/// processors (eight 512-bit `vptestmq`s: they run there at full clock),
/// and wherever XINUSE cannot be read. On Intel processors with AVX-512 a
/// 512-bit instruction on every hit could hold the core at a lower
/// frequency licence (Skylake to Cascade Lake), so they ask XINUSE (an
/// earlier session's ablation measured `xgetbv` at 1-3 ns on its host),
/// where the AMD EPYC this was measured on pays 11 ns for each `xgetbv`
/// (the entry stub's and the trampoline's: 25 ns a bare detour, 14 ns
/// without).
fn check_values(width: u32, xinuse: bool) -> bool {
    let leaf0 = core::arch::x86_64::__cpuid(0);
    let vendor = [leaf0.ebx, leaf0.edx, leaf0.ecx];
    let amd = vendor == [0x6874_7541, 0x6974_6e65, 0x444d_4163] // "AuthenticAMD"
        || vendor == [0x6f67_7948, 0x6e65_476e, 0x656e_6975]; // "HygonGenuine"
    match width {
        1 => true,
        2 => amd || !xinuse,
        _ => false,
    }
}

/// How the entry stub and the return trampoline tell whether the vector
/// registers' upper halves hold anything (module docs, "The upper halves").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpperCheck {
    /// No AVX: there are no upper halves.
    None,
    /// Their values are tested (`vptest`, `vptestmq`).
    Values,
    /// XINUSE is asked (`xgetbv` with ECX = 1).
    Xinuse,
    /// Neither: the entry stub saves and restores them whole, the
    /// trampoline takes its full save (a processor without XINUSE, before
    /// the value tests).
    Width,
}

/// The check in use (detected with the trampoline's address).
pub fn upper_check() -> UpperCheck {
    super::super::trampoline::trampoline_address();
    // Relaxed: see `ENTRY_VECTORS`.
    let v = ENTRY_VECTORS.load(Ordering::Relaxed);
    if v & 3 == 0 {
        UpperCheck::None
    } else if v & VALUE_CHECK != 0 {
        UpperCheck::Values
    } else if v & 4 != 0 {
        UpperCheck::Xinuse
    } else {
        UpperCheck::Width
    }
}

/// Switches the check, for the tests of each path. The caller makes sure
/// no detour hit or trampoline return is in flight (the tests hold their
/// serial lock). `Xinuse` only where the processor has it (which the
/// detection found), `None` only at width 0 (no AVX, or
/// [`set_vector_width`]); anything else is refused with the check in use.
/// (`Width` turns XINUSE off for the full stub too: its fast path then
/// stays unused.)
pub fn set_upper_check(check: UpperCheck) -> Result<(), UpperCheck> {
    let now = upper_check();
    // Relaxed (both): see `ENTRY_VECTORS` and `DETECTED_XINUSE`.
    let v = ENTRY_VECTORS.load(Ordering::Relaxed);
    let xinuse = DETECTED_XINUSE.load(Ordering::Relaxed);
    let base = v & !(VALUE_CHECK | 4);
    let new = match check {
        UpperCheck::None if v & 3 == 0 => v,
        UpperCheck::Values if v & 3 != 0 => base | VALUE_CHECK | if xinuse { 4 } else { 0 },
        UpperCheck::Xinuse if v & 3 != 0 && xinuse => base | 4,
        UpperCheck::Width if v & 3 != 0 => base,
        _ => return Err(now),
    };
    // Relaxed: see `ENTRY_VECTORS`.
    ENTRY_VECTORS.store(new, Ordering::Relaxed);
    Ok(())
}

/// The vector width the entry stub and the trampoline work at (see
/// [`set_vector_width`]).
pub fn vector_width() -> u32 {
    super::super::trampoline::trampoline_address();
    // Relaxed: see `ENTRY_VECTORS`.
    ENTRY_VECTORS.load(Ordering::Relaxed) & 3
}

/// Narrows the vector width the entry stub and the trampoline work at to
/// `width` (0 `xmm`, 1 `ymm`, 2 `zmm`) for the tests of the narrower
/// paths on a wider processor, or puts the detected one back; wider than
/// detected is refused with the detected width. Only for code that uses no
/// wider register than `width` while it is in force: the wider registers'
/// upper parts are not kept then. No hit or return may be in flight (as
/// for [`set_upper_check`]).
pub fn set_vector_width(width: u32) -> Result<(), u32> {
    super::super::trampoline::trampoline_address();
    // Relaxed: written once by the detection, which the call above ran
    // (its `Once` orders it).
    let detected = DETECTED_WIDTH.load(Ordering::Relaxed);
    if width > detected {
        return Err(detected);
    }
    // Relaxed (all): see `ENTRY_VECTORS` and `DETECTED_XINUSE`.
    let v = ENTRY_VECTORS.load(Ordering::Relaxed);
    let xinuse = DETECTED_XINUSE.load(Ordering::Relaxed);
    // The check goes back to what the detection picks for this width.
    let check = if check_values(width, xinuse) {
        VALUE_CHECK
    } else {
        0
    };
    ENTRY_VECTORS.store((v & !(3 | VALUE_CHECK)) | width | check, Ordering::Relaxed);
    Ok(())
}

/// The width [`detect_vector_width`] found.
static DETECTED_WIDTH: crate::sync::atomic::AtomicU32 = crate::sync::atomic::AtomicU32::new(0);

/// Whether the processor has XINUSE (`xgetbv` with ECX = 1), as detected.
static DETECTED_XINUSE: crate::sync::atomic::AtomicBool =
    crate::sync::atomic::AtomicBool::new(false);

/// Sets [`ENTRY_VECTORS`] from the components the OS enabled (`XCR0`).
pub(crate) fn detect_vector_width() {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    let xcr0 = if leaf1.ecx & (1 << 27) == 0 {
        0
    } else {
        let (lo, hi): (u32, u32);
        // SAFETY: OSXSAVE is set, so `xgetbv` with ECX = 0 (XCR0) is
        // allowed in user mode; it only reads a register.
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        u64::from(hi) << 32 | u64::from(lo)
    };
    let width = if xcr0 & 0xe6 == 0xe6 {
        2
    } else if xcr0 & 0x6 == 0x6 {
        1
    } else {
        0
    };
    // CPUID.(EAX=0DH, ECX=1):EAX[2]: XGETBV with ECX = 1 (leaf 0DH exists
    // when OSXSAVE is set, checked by `xcr0 != 0`).
    let xinuse = xcr0 != 0 && core::arch::x86_64::__cpuid_count(0xd, 1).eax & 4 != 0;
    // Relaxed (both): read by the test hooks, after the detection's `Once`.
    DETECTED_XINUSE.store(xinuse, Ordering::Relaxed);
    DETECTED_WIDTH.store(width, Ordering::Relaxed);
    let width = width | if xinuse { 4 } else { 0 };
    // AVX512BW: 64-bit opmasks (`kmovq`), for the full stub's fast path.
    let bw = width & 3 == 2 && core::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 30) != 0;
    let width = width | if bw { 8 } else { 0 };
    let width = width
        | if check_values(width & 3, xinuse) {
            VALUE_CHECK
        } else {
            0
        };
    // Relaxed: published to the threads that run detours by the detours'
    // own publication (their bytes are written, cores synced, and the
    // site's state stored with Release after this).
    ENTRY_VECTORS.store(width, Ordering::Relaxed);
}

global_asm!(
    ".pushsection .text.rcu_registry_jump_stub,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_jump_stub_entry",
    ".hidden __rcu_registry_jump_stub_entry",
    ".type __rcu_registry_jump_stub_entry,@function",
    "__rcu_registry_jump_stub_entry:",
    // Regs is built in place: the words above the sixteen pushed registers
    // (gprs[16..31], sp, ip, flags) first (lea: no flag changes).
    "lea rsp, [rsp - {above}]",
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
    // The rsp slot (gprs[4]): a placeholder, never popped (Regs::sp has it).
    "push rax",
    "push rbx",
    "push rdx",
    "push rcx",
    "push rax",
    // rflags' low byte is lahf's AH; OF is bit 11; bit 1 is always set.
    "lahf",
    "seto al",
    "movzx ecx, ah",
    "movzx edx, al",
    "shl edx, 11",
    "or ecx, edx",
    "or ecx, 2",
    "mov qword ptr [rsp + {flags_off}], rcx",
    // Regs::sp: the probed code's stack pointer, above Regs, the return
    // address and the red zone; Regs::ip (set by the Rust half) and the
    // arm64-only gprs[16..31] zeroed.
    "lea rcx, [rsp + {orig_sp}]",
    "mov qword ptr [rsp + {sp_off}], rcx",
    "xor ecx, ecx",
    "mov qword ptr [rsp + {ip_off}], rcx",
    // Fifteen words zeroed with seven 16-byte stores and one 8-byte one
    // (2-3 ns a hit fewer than fifteen 8-byte stores: the stub's stores
    // are what a hit waits on). xmm8 is caller-saved and carries no
    // argument at a call, so nothing live is in it at a function's entry;
    // a legacy-SSE write leaves the upper state as it was.
    "pxor xmm8, xmm8",
    "movdqu xmmword ptr [rsp + 128], xmm8",
    "movdqu xmmword ptr [rsp + 144], xmm8",
    "movdqu xmmword ptr [rsp + 160], xmm8",
    "movdqu xmmword ptr [rsp + 176], xmm8",
    "movdqu xmmword ptr [rsp + 192], xmm8",
    "movdqu xmmword ptr [rsp + 208], xmm8",
    "movdqu xmmword ptr [rsp + 224], xmm8",
    "mov qword ptr [rsp + 240], rcx",
    "cld",
    "mov rbx, rsp",
    "sub rsp, 512",
    "and rsp, -64",
    "mov ecx, dword ptr [rip + {width}]",
    // Every upper half of `ymm0-7`/`zmm0-7` zero: save the low 128 bits
    // only, and `vzeroupper` puts the zeros back, leaving the state clean.
    // Touching the upper halves when they are clean dirties them, and the
    // Rust half's SSE code then pays a state-transition stall (measured:
    // 240 ns a hit). Where the mode says so (bit 4, `VALUE_CHECK`), the
    // upper halves' values are tested (below, at 8); else XINUSE (bit 2 of
    // the mode): AVX (bit 2) and ZMM_Hi256 (bit 6) in their initial state.
    "test ecx, 16",
    "jnz 8f",
    "test ecx, 4",
    "jz 7f",
    "mov r8d, ecx",
    "mov ecx, 1",
    "xgetbv",
    "mov ecx, r8d",
    "test eax, 0x44",
    "jnz 7f",
    "9:",
    "movdqu xmmword ptr [rsp + 0], xmm0",
    "movdqu xmmword ptr [rsp + 16], xmm1",
    "movdqu xmmword ptr [rsp + 32], xmm2",
    "movdqu xmmword ptr [rsp + 48], xmm3",
    "movdqu xmmword ptr [rsp + 64], xmm4",
    "movdqu xmmword ptr [rsp + 80], xmm5",
    "movdqu xmmword ptr [rsp + 96], xmm6",
    "movdqu xmmword ptr [rsp + 112], xmm7",
    "mov rdi, rbx",
    "call {entry}",
    "movdqu xmm0, xmmword ptr [rsp + 0]",
    "movdqu xmm1, xmmword ptr [rsp + 16]",
    "movdqu xmm2, xmmword ptr [rsp + 32]",
    "movdqu xmm3, xmmword ptr [rsp + 48]",
    "movdqu xmm4, xmmword ptr [rsp + 64]",
    "movdqu xmm5, xmmword ptr [rsp + 80]",
    "movdqu xmm6, xmmword ptr [rsp + 96]",
    "movdqu xmm7, xmmword ptr [rsp + 112]",
    "test byte ptr [rip + {width}], 3",
    "jz 6f",
    "vzeroupper",
    "jmp 6f",
    // By width; the wide paths clean the upper state (`vzeroupper`) for the
    // Rust half after saving it, and the restore puts it back.
    "7:",
    "and ecx, 3",
    "cmp ecx, 2",
    "je 4f",
    "cmp ecx, 1",
    "je 5f",
    "movdqu xmmword ptr [rsp + 0], xmm0",
    "movdqu xmmword ptr [rsp + 16], xmm1",
    "movdqu xmmword ptr [rsp + 32], xmm2",
    "movdqu xmmword ptr [rsp + 48], xmm3",
    "movdqu xmmword ptr [rsp + 64], xmm4",
    "movdqu xmmword ptr [rsp + 80], xmm5",
    "movdqu xmmword ptr [rsp + 96], xmm6",
    "movdqu xmmword ptr [rsp + 112], xmm7",
    "mov rdi, rbx",
    "call {entry}",
    "movdqu xmm0, xmmword ptr [rsp + 0]",
    "movdqu xmm1, xmmword ptr [rsp + 16]",
    "movdqu xmm2, xmmword ptr [rsp + 32]",
    "movdqu xmm3, xmmword ptr [rsp + 48]",
    "movdqu xmm4, xmmword ptr [rsp + 64]",
    "movdqu xmm5, xmmword ptr [rsp + 80]",
    "movdqu xmm6, xmmword ptr [rsp + 96]",
    "movdqu xmm7, xmmword ptr [rsp + 112]",
    "jmp 6f",
    "4:",
    "vmovdqu64 zmmword ptr [rsp + 0], zmm0",
    "vmovdqu64 zmmword ptr [rsp + 64], zmm1",
    "vmovdqu64 zmmword ptr [rsp + 128], zmm2",
    "vmovdqu64 zmmword ptr [rsp + 192], zmm3",
    "vmovdqu64 zmmword ptr [rsp + 256], zmm4",
    "vmovdqu64 zmmword ptr [rsp + 320], zmm5",
    "vmovdqu64 zmmword ptr [rsp + 384], zmm6",
    "vmovdqu64 zmmword ptr [rsp + 448], zmm7",
    "vzeroupper",
    "mov rdi, rbx",
    "call {entry}",
    "vmovdqu64 zmm0, zmmword ptr [rsp + 0]",
    "vmovdqu64 zmm1, zmmword ptr [rsp + 64]",
    "vmovdqu64 zmm2, zmmword ptr [rsp + 128]",
    "vmovdqu64 zmm3, zmmword ptr [rsp + 192]",
    "vmovdqu64 zmm4, zmmword ptr [rsp + 256]",
    "vmovdqu64 zmm5, zmmword ptr [rsp + 320]",
    "vmovdqu64 zmm6, zmmword ptr [rsp + 384]",
    "vmovdqu64 zmm7, zmmword ptr [rsp + 448]",
    "jmp 6f",
    "5:",
    "vmovdqu ymmword ptr [rsp + 0], ymm0",
    "vmovdqu ymmword ptr [rsp + 32], ymm1",
    "vmovdqu ymmword ptr [rsp + 64], ymm2",
    "vmovdqu ymmword ptr [rsp + 96], ymm3",
    "vmovdqu ymmword ptr [rsp + 128], ymm4",
    "vmovdqu ymmword ptr [rsp + 160], ymm5",
    "vmovdqu ymmword ptr [rsp + 192], ymm6",
    "vmovdqu ymmword ptr [rsp + 224], ymm7",
    "vzeroupper",
    "mov rdi, rbx",
    "call {entry}",
    "vmovdqu ymm0, ymmword ptr [rsp + 0]",
    "vmovdqu ymm1, ymmword ptr [rsp + 32]",
    "vmovdqu ymm2, ymmword ptr [rsp + 64]",
    "vmovdqu ymm3, ymmword ptr [rsp + 96]",
    "vmovdqu ymm4, ymmword ptr [rsp + 128]",
    "vmovdqu ymm5, ymmword ptr [rsp + 160]",
    "vmovdqu ymm6, ymmword ptr [rsp + 192]",
    "vmovdqu ymm7, ymmword ptr [rsp + 224]",
    "6:",
    // The status flags back: OF from `add cl, 0x7f` (0x7f + 1 overflows),
    // the rest from sahf. Nothing after this changes a flag (mov, pop, lea).
    "mov rax, qword ptr [rbx + {flags_off}]",
    "mov rcx, rax",
    "shr ecx, 11",
    "and cl, 1",
    "add cl, 0x7f",
    "mov ah, al",
    "sahf",
    "mov rsp, rbx",
    "pop rax",
    "pop rcx",
    "pop rdx",
    "pop rbx",
    "lea rsp, [rsp + 8]",
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
    "lea rsp, [rsp + {above}]",
    "ret 128",
    // The values of the upper halves (module docs, "The upper halves"):
    // any bit set, the by-width path; none, `vzeroupper` (zero halves may
    // still be marked in use, which the Rust half's SSE code would pay
    // for) and the low halves only. `ymm8-15`, `zmm16-31` and the opmasks
    // hold no argument at a call: `k1`/`k2` are free here.
    "8:",
    "test ecx, 2",
    "jnz 12f",
    "vptest ymm0, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vptest ymm1, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vptest ymm2, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vptest ymm3, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vptest ymm4, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vptest ymm5, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vptest ymm6, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vptest ymm7, ymmword ptr [rip + {upper}]",
    "jnz 7b",
    "vzeroupper",
    "jmp 9b",
    // zmm: a bit per nonzero quadword, the two low ones (xmm) dropped.
    "12:",
    "vptestmq k1, zmm0, zmm0",
    "vptestmq k2, zmm1, zmm1",
    "korw k1, k1, k2",
    "vptestmq k2, zmm2, zmm2",
    "korw k1, k1, k2",
    "vptestmq k2, zmm3, zmm3",
    "korw k1, k1, k2",
    "vptestmq k2, zmm4, zmm4",
    "korw k1, k1, k2",
    "vptestmq k2, zmm5, zmm5",
    "korw k1, k1, k2",
    "vptestmq k2, zmm6, zmm6",
    "korw k1, k1, k2",
    "vptestmq k2, zmm7, zmm7",
    "korw k1, k1, k2",
    "kshiftrw k1, k1, 2",
    "kortestw k1, k1",
    "jnz 7b",
    "vzeroupper",
    "jmp 9b",
    ".globl __rcu_registry_jump_stub_entry_end",
    ".hidden __rcu_registry_jump_stub_entry_end",
    "__rcu_registry_jump_stub_entry_end:",
    ".size __rcu_registry_jump_stub_entry, . - __rcu_registry_jump_stub_entry",
    ".popsection",
    entry = sym jump_entry,
    width = sym ENTRY_VECTORS,
    upper = sym UPPER_128,
    orig_sp = const ORIG_SP,
    sp_off = const SP_OFF,
    ip_off = const IP_OFF,
    flags_off = const FLAGS_OFF,
    above = const ABOVE_BYTES,
);

global_asm!(
    ".pushsection .text.rcu_registry_jump_stub,\"ax\",@progbits",
    ".p2align 4",
    ".globl __rcu_registry_jump_stub",
    ".hidden __rcu_registry_jump_stub",
    ".type __rcu_registry_jump_stub,@function",
    "__rcu_registry_jump_stub:",
    // Regs::flags is the word just below the return address.
    "pushfq",
    "cld",
    "lea rsp, [rsp - {above} + 8]",
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
    // The rsp slot (gprs[4]): a placeholder, never popped (Regs::sp has it).
    "push rax",
    "push rbx",
    "push rdx",
    "push rcx",
    "push rax",
    // Regs::sp: the probed code's stack pointer, above Regs, the return
    // address and the red zone; Regs::ip (set by the Rust half) and the
    // arm64-only gprs[16..31] zeroed.
    "lea rcx, [rsp + {orig_sp}]",
    "mov qword ptr [rsp + {sp_off}], rcx",
    "xor ecx, ecx",
    "mov qword ptr [rsp + {ip_off}], rcx",
    "mov qword ptr [rsp + 128], rcx",
    "mov qword ptr [rsp + 136], rcx",
    "mov qword ptr [rsp + 144], rcx",
    "mov qword ptr [rsp + 152], rcx",
    "mov qword ptr [rsp + 160], rcx",
    "mov qword ptr [rsp + 168], rcx",
    "mov qword ptr [rsp + 176], rcx",
    "mov qword ptr [rsp + 184], rcx",
    "mov qword ptr [rsp + 192], rcx",
    "mov qword ptr [rsp + 200], rcx",
    "mov qword ptr [rsp + 208], rcx",
    "mov qword ptr [rsp + 216], rcx",
    "mov qword ptr [rsp + 224], rcx",
    "mov qword ptr [rsp + 232], rcx",
    "mov qword ptr [rsp + 240], rcx",
    "mov rbx, rsp",
    // The fast path: with XINUSE, x87, AVX (ymm upper halves) and
    // ZMM_Hi256 (zmm0-15 upper halves) in their initial state, what may be
    // live is xmm0-15 and MXCSR, plus the opmasks and zmm16-31 where those
    // are in use: saved by moves (xsave64 of even the SSE state alone costs
    // 120 ns on the development machine), the upper state cleaned again
    // after the Rust half (the handler may have dirtied it). Anything else
    // takes the full save below.
    "mov ecx, dword ptr [rip + {width}]",
    "test ecx, 4",
    "jz 8f",
    "mov ecx, 1",
    "xgetbv",
    // x87, AVX or ZMM_Hi256 in use: the full save.
    "test eax, 0x45",
    "jnz 8f",
    // Opmasks in use need AVX512BW's 64-bit kmovq (mode bit 3).
    "test eax, 0x20",
    "jz 10f",
    "test byte ptr [rip + {width}], 8",
    "jz 8f",
    "10:",
    "mov r9d, eax",
    "sub rsp, 1360",
    "and rsp, -64",
    "movdqu xmmword ptr [rsp + 1024], xmm0",
    "movdqu xmmword ptr [rsp + 1040], xmm1",
    "movdqu xmmword ptr [rsp + 1056], xmm2",
    "movdqu xmmword ptr [rsp + 1072], xmm3",
    "movdqu xmmword ptr [rsp + 1088], xmm4",
    "movdqu xmmword ptr [rsp + 1104], xmm5",
    "movdqu xmmword ptr [rsp + 1120], xmm6",
    "movdqu xmmword ptr [rsp + 1136], xmm7",
    "movdqu xmmword ptr [rsp + 1152], xmm8",
    "movdqu xmmword ptr [rsp + 1168], xmm9",
    "movdqu xmmword ptr [rsp + 1184], xmm10",
    "movdqu xmmword ptr [rsp + 1200], xmm11",
    "movdqu xmmword ptr [rsp + 1216], xmm12",
    "movdqu xmmword ptr [rsp + 1232], xmm13",
    "movdqu xmmword ptr [rsp + 1248], xmm14",
    "movdqu xmmword ptr [rsp + 1264], xmm15",
    "stmxcsr dword ptr [rsp + 1344]",
    "test r9d, 0x20",
    "jz 11f",
    "kmovq qword ptr [rsp + 1280], k0",
    "kmovq qword ptr [rsp + 1288], k1",
    "kmovq qword ptr [rsp + 1296], k2",
    "kmovq qword ptr [rsp + 1304], k3",
    "kmovq qword ptr [rsp + 1312], k4",
    "kmovq qword ptr [rsp + 1320], k5",
    "kmovq qword ptr [rsp + 1328], k6",
    "kmovq qword ptr [rsp + 1336], k7",
    "11:",
    "test r9d, 0x80",
    "jz 12f",
    "vmovdqu64 zmmword ptr [rsp + 0], zmm16",
    "vmovdqu64 zmmword ptr [rsp + 64], zmm17",
    "vmovdqu64 zmmword ptr [rsp + 128], zmm18",
    "vmovdqu64 zmmword ptr [rsp + 192], zmm19",
    "vmovdqu64 zmmword ptr [rsp + 256], zmm20",
    "vmovdqu64 zmmword ptr [rsp + 320], zmm21",
    "vmovdqu64 zmmword ptr [rsp + 384], zmm22",
    "vmovdqu64 zmmword ptr [rsp + 448], zmm23",
    "vmovdqu64 zmmword ptr [rsp + 512], zmm24",
    "vmovdqu64 zmmword ptr [rsp + 576], zmm25",
    "vmovdqu64 zmmword ptr [rsp + 640], zmm26",
    "vmovdqu64 zmmword ptr [rsp + 704], zmm27",
    "vmovdqu64 zmmword ptr [rsp + 768], zmm28",
    "vmovdqu64 zmmword ptr [rsp + 832], zmm29",
    "vmovdqu64 zmmword ptr [rsp + 896], zmm30",
    "vmovdqu64 zmmword ptr [rsp + 960], zmm31",
    "12:",
    "mov qword ptr [rsp + 1352], r9",
    "mov rdi, rbx",
    "call {entry}",
    "mov r9, qword ptr [rsp + 1352]",
    "test r9d, 0x80",
    "jz 13f",
    "vmovdqu64 zmm16, zmmword ptr [rsp + 0]",
    "vmovdqu64 zmm17, zmmword ptr [rsp + 64]",
    "vmovdqu64 zmm18, zmmword ptr [rsp + 128]",
    "vmovdqu64 zmm19, zmmword ptr [rsp + 192]",
    "vmovdqu64 zmm20, zmmword ptr [rsp + 256]",
    "vmovdqu64 zmm21, zmmword ptr [rsp + 320]",
    "vmovdqu64 zmm22, zmmword ptr [rsp + 384]",
    "vmovdqu64 zmm23, zmmword ptr [rsp + 448]",
    "vmovdqu64 zmm24, zmmword ptr [rsp + 512]",
    "vmovdqu64 zmm25, zmmword ptr [rsp + 576]",
    "vmovdqu64 zmm26, zmmword ptr [rsp + 640]",
    "vmovdqu64 zmm27, zmmword ptr [rsp + 704]",
    "vmovdqu64 zmm28, zmmword ptr [rsp + 768]",
    "vmovdqu64 zmm29, zmmword ptr [rsp + 832]",
    "vmovdqu64 zmm30, zmmword ptr [rsp + 896]",
    "vmovdqu64 zmm31, zmmword ptr [rsp + 960]",
    "13:",
    "test r9d, 0x20",
    "jz 14f",
    "kmovq k0, qword ptr [rsp + 1280]",
    "kmovq k1, qword ptr [rsp + 1288]",
    "kmovq k2, qword ptr [rsp + 1296]",
    "kmovq k3, qword ptr [rsp + 1304]",
    "kmovq k4, qword ptr [rsp + 1312]",
    "kmovq k5, qword ptr [rsp + 1320]",
    "kmovq k6, qword ptr [rsp + 1328]",
    "kmovq k7, qword ptr [rsp + 1336]",
    "14:",
    "ldmxcsr dword ptr [rsp + 1344]",
    "movdqu xmm0, xmmword ptr [rsp + 1024]",
    "movdqu xmm1, xmmword ptr [rsp + 1040]",
    "movdqu xmm2, xmmword ptr [rsp + 1056]",
    "movdqu xmm3, xmmword ptr [rsp + 1072]",
    "movdqu xmm4, xmmword ptr [rsp + 1088]",
    "movdqu xmm5, xmmword ptr [rsp + 1104]",
    "movdqu xmm6, xmmword ptr [rsp + 1120]",
    "movdqu xmm7, xmmword ptr [rsp + 1136]",
    "movdqu xmm8, xmmword ptr [rsp + 1152]",
    "movdqu xmm9, xmmword ptr [rsp + 1168]",
    "movdqu xmm10, xmmword ptr [rsp + 1184]",
    "movdqu xmm11, xmmword ptr [rsp + 1200]",
    "movdqu xmm12, xmmword ptr [rsp + 1216]",
    "movdqu xmm13, xmmword ptr [rsp + 1232]",
    "movdqu xmm14, xmmword ptr [rsp + 1248]",
    "movdqu xmm15, xmmword ptr [rsp + 1264]",
    "test byte ptr [rip + {width}], 3",
    "jz 3f",
    "vzeroupper",
    "jmp 3f",
    "8:",
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
    // Clean upper halves for the Rust half's SSE code (a dirty upper state
    // makes it stall); xrstor64 puts them back.
    "test byte ptr [rip + {xsave_mask}], 4",
    "jz 9f",
    "vzeroupper",
    "9:",
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
    "lea rsp, [rsp + 8]",
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
    "lea rsp, [rsp + {above} - 8]",
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
    width = sym ENTRY_VECTORS,
    orig_sp = const ORIG_SP,
    sp_off = const SP_OFF,
    ip_off = const IP_OFF,
    above = const ABOVE_BYTES,
);

extern "C" {
    fn __rcu_registry_jump_stub();
    fn __rcu_registry_jump_stub_end();
    fn __rcu_registry_jump_stub_entry();
    fn __rcu_registry_jump_stub_entry_end();
}

/// `[start, end)` of each stub: part of every quiescence wait that
/// retires a detour (a thread in a stub returns into one).
pub(crate) fn stub_ranges() -> [std::ops::Range<u64>; 2] {
    let f = |a: unsafe extern "C" fn(), b: unsafe extern "C" fn()| {
        a as *const () as usize as u64..b as *const () as usize as u64
    };
    [
        f(__rcu_registry_jump_stub, __rcu_registry_jump_stub_end),
        f(
            __rcu_registry_jump_stub_entry,
            __rcu_registry_jump_stub_entry_end,
        ),
    ]
}

/// Which stub a site's detour calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stub {
    /// At a function's first instruction: the calling convention's live
    /// state only (module docs).
    Entry,
    /// Anywhere else: everything, `xsave64` included.
    Full,
}

impl Stub {
    pub(crate) fn address(self) -> u64 {
        match self {
            Stub::Entry => __rcu_registry_jump_stub_entry as *const () as usize as u64,
            Stub::Full => __rcu_registry_jump_stub as *const () as usize as u64,
        }
    }
}
