//! Shared by the jump-optimization test binaries: functions with known
//! machine code (each test knows which instructions an optimized probe
//! displaces, and which refusal a site must get), and helpers.

#![allow(dead_code)]

use std::arch::global_asm;
use std::sync::{Mutex, MutexGuard};

global_asm!(
    ".pushsection .text.rj_functions,\"ax\",@progbits",
    // rj_prologue(x) = x + 5: push rbp; mov rbp, rsp; lea eax, [rdi + 5];
    // pop rbp; ret. Displaced: push, mov, lea (7 bytes).
    ".p2align 4",
    ".globl rj_prologue",
    ".type rj_prologue,@function",
    "rj_prologue:",
    ".byte 0x55",
    ".byte 0x48, 0x89, 0xe5",
    ".byte 0x8d, 0x47, 0x05",
    ".byte 0x5d",
    ".byte 0xc3",
    ".size rj_prologue, . - rj_prologue",
    // rj_alt(_) = 777: where a pre handler sends the thread.
    ".p2align 4",
    ".globl rj_alt",
    ".type rj_alt,@function",
    "rj_alt:",
    ".byte 0xb8, 0x09, 0x03, 0x00, 0x00",
    ".byte 0xc3",
    ".size rj_alt, . - rj_alt",
    // rj_double(x) = 2x: push rbp; mov rbp, rsp; lea eax, [rdi + rdi];
    // pop rbp; ret (kretprobe fixture).
    ".p2align 4",
    ".globl rj_double",
    ".type rj_double,@function",
    "rj_double:",
    ".byte 0x55",
    ".byte 0x48, 0x89, 0xe5",
    ".byte 0x8d, 0x04, 0x3f",
    ".byte 0x5d",
    ".byte 0xc3",
    ".size rj_double, . - rj_double",
    // rj_riprel(x) = rj_data + x: mov rax, [rip + rj_data] (7 bytes,
    // relocated with a new displacement); add rax, rdi; ret.
    ".p2align 4",
    ".globl rj_riprel",
    ".type rj_riprel,@function",
    "rj_riprel:",
    "mov rax, qword ptr [rip + rj_data]",
    "add rax, rdi",
    "ret",
    ".size rj_riprel, . - rj_riprel",
    // rj_loop(n) = max(n, 1): xor eax, eax; 1: add eax, 1; cmp eax, edi;
    // jb 1b; ret. The jb lands 2 bytes into the displaced bytes.
    ".p2align 4",
    ".globl rj_loop",
    ".type rj_loop,@function",
    "rj_loop:",
    ".byte 0x31, 0xc0",
    ".byte 0x83, 0xc0, 0x01",
    ".byte 0x39, 0xf8",
    ".byte 0x72, 0xf9",
    ".byte 0xc3",
    ".size rj_loop, . - rj_loop",
    // rj_table(x) = x + 2 for x <= 1000: mov eax, edi; add eax, 2;
    // cmp edi, 1000; ja 1f; ret; 1: jmp rax (an indirect jump never taken).
    ".p2align 4",
    ".globl rj_table",
    ".type rj_table,@function",
    "rj_table:",
    ".byte 0x89, 0xf8",
    ".byte 0x83, 0xc0, 0x02",
    ".byte 0x81, 0xff, 0xe8, 0x03, 0x00, 0x00",
    ".byte 0x77, 0x01",
    ".byte 0xc3",
    ".byte 0xff, 0xe0",
    ".size rj_table, . - rj_table",
    // rj_call(x) = x + 5: push rbx; call rj_prologue; pop rbx; ret. The call
    // is among the displaced bytes.
    ".p2align 4",
    ".globl rj_call",
    ".type rj_call,@function",
    "rj_call:",
    "push rbx",
    "call rj_prologue",
    "pop rbx",
    "ret",
    ".size rj_call, . - rj_call",
    // rj_mid(x) = (x < 10): cmp edi, 10; [probe] mov eax, 0; setb al; ret.
    // The flags set before the probe are read after it.
    ".p2align 4",
    ".globl rj_mid",
    ".type rj_mid,@function",
    "rj_mid:",
    ".byte 0x83, 0xff, 0x0a",
    ".globl rj_mid_probe",
    "rj_mid_probe:",
    ".byte 0xb8, 0x00, 0x00, 0x00, 0x00",
    ".byte 0x0f, 0x92, 0xc0",
    ".byte 0xc3",
    ".size rj_mid, . - rj_mid",
    // rj_redzone(x) = x: mov [rsp - 8], rdi; [probe] mov eax, 7;
    // mov rax, [rsp - 8]; ret. A leaf keeping data in its red zone.
    ".p2align 4",
    ".globl rj_redzone",
    ".type rj_redzone,@function",
    "rj_redzone:",
    ".byte 0x48, 0x89, 0x7c, 0x24, 0xf8",
    ".globl rj_redzone_probe",
    "rj_redzone_probe:",
    ".byte 0xb8, 0x07, 0x00, 0x00, 0x00",
    ".byte 0x48, 0x8b, 0x44, 0x24, 0xf8",
    ".byte 0xc3",
    ".size rj_redzone, . - rj_redzone",
    // rj_vec(src, dst): vmovdqu ymm0, [rdi]; [probe] mov eax, 1;
    // vmovdqu [rsi], ymm0; vzeroupper; ret. ymm0 is live across the probe.
    ".p2align 4",
    ".globl rj_vec",
    ".type rj_vec,@function",
    "rj_vec:",
    "vmovdqu ymm0, ymmword ptr [rdi]",
    ".globl rj_vec_probe",
    "rj_vec_probe:",
    ".byte 0xb8, 0x01, 0x00, 0x00, 0x00",
    "vmovdqu ymmword ptr [rsi], ymm0",
    "vzeroupper",
    "ret",
    ".size rj_vec, . - rj_vec",
    // rj_vsum(dst): dst = ymm0 + ymm1 + ymm7 (u32 lanes): vpaddd ymm0,
    // ymm0, ymm1; vpaddd ymm0, ymm0, ymm7 (both displaced at the entry);
    // vmovdqu [rdi], ymm0; vzeroupper; ret. Vector arguments live at entry.
    ".p2align 4",
    ".globl rj_vsum",
    ".type rj_vsum,@function",
    "rj_vsum:",
    ".byte 0xc5, 0xfd, 0xfe, 0xc1",
    ".byte 0xc5, 0xfd, 0xfe, 0xc7",
    "vmovdqu ymmword ptr [rdi], ymm0",
    "vzeroupper",
    "ret",
    ".size rj_vsum, . - rj_vsum",
    // rj_flags() = CF | OF << 1 | ZF << 2 as the caller left them (outside
    // the ABI, to see the entry stub's flag restore): mov eax, 0;
    // setc al; seto cl; ...
    ".p2align 4",
    ".globl rj_flags",
    ".type rj_flags,@function",
    "rj_flags:",
    ".byte 0xb8, 0x00, 0x00, 0x00, 0x00",
    "setc al",
    "seto cl",
    "setz dl",
    "shl cl, 1",
    "shl dl, 2",
    "or al, cl",
    "or al, dl",
    "ret",
    ".size rj_flags, . - rj_flags",
    // rj_xmm_mid(x) = x through xmm9: movq xmm9, rdi; [probe] mov eax, 1;
    // movq rax, xmm9; ret. xmm9 is live across a mid-function probe.
    ".p2align 4",
    ".globl rj_xmm_mid",
    ".type rj_xmm_mid,@function",
    "rj_xmm_mid:",
    "movq xmm9, rdi",
    ".globl rj_xmm_mid_probe",
    "rj_xmm_mid_probe:",
    ".byte 0xb8, 0x01, 0x00, 0x00, 0x00",
    "movq rax, xmm9",
    "ret",
    ".size rj_xmm_mid, . - rj_xmm_mid",
    // rj_avx512_mid(src, dst, mask) = mask through k1, *dst = *src
    // through zmm17: vmovdqu64 zmm17, [rdi]; kmovq k1, rdx; [probe]
    // mov eax, 1; vmovdqu64 [rsi], zmm17; kmovq rax, k1; ret.
    ".p2align 4",
    ".globl rj_avx512_mid",
    ".type rj_avx512_mid,@function",
    "rj_avx512_mid:",
    "vmovdqu64 zmm17, zmmword ptr [rdi]",
    "kmovq k1, rdx",
    ".globl rj_avx512_mid_probe",
    "rj_avx512_mid_probe:",
    ".byte 0xb8, 0x01, 0x00, 0x00, 0x00",
    "vmovdqu64 zmmword ptr [rsi], zmm17",
    "kmovq rax, k1",
    "ret",
    ".size rj_avx512_mid, . - rj_avx512_mid",
    // rj_x87(): returns 3.5 in st0 (as a long double function does):
    // fld qword ptr [rip + rj_three_half]; ret.
    ".p2align 4",
    ".globl rj_x87",
    ".type rj_x87,@function",
    "rj_x87:",
    "fld qword ptr [rip + rj_three_half]",
    "ret",
    ".size rj_x87, . - rj_x87",
    ".popsection",
    ".pushsection .rodata.rj_three_half,\"a\",@progbits",
    ".p2align 3",
    "rj_three_half:",
    ".double 3.5",
    ".popsection",
    ".pushsection .data.rj_data,\"aw\",@progbits",
    ".p2align 3",
    ".globl rj_data",
    "rj_data:",
    ".quad 0x5000",
    ".popsection",
);

extern "C" {
    pub fn rj_prologue(x: u32) -> u32;
    pub fn rj_alt(x: u32) -> u32;
    pub fn rj_double(x: u32) -> u32;
    pub fn rj_riprel(x: u64) -> u64;
    pub fn rj_loop(n: u32) -> u32;
    pub fn rj_table(x: u32) -> u32;
    pub fn rj_call(x: u32) -> u32;
    pub fn rj_mid(x: u32) -> u32;
    pub fn rj_mid_probe();
    pub fn rj_redzone(x: u64) -> u64;
    pub fn rj_redzone_probe();
    pub fn rj_vec(src: *const u8, dst: *mut u8) -> u32;
    pub fn rj_vec_probe();
    pub fn rj_vsum(dst: *mut u8);
    pub fn rj_flags() -> u32;
    pub fn rj_x87();
    pub fn rj_xmm_mid(x: u64) -> u64;
    pub fn rj_xmm_mid_probe();
    pub fn rj_avx512_mid(src: *const u8, dst: *mut u8, mask: u64) -> u64;
    pub fn rj_avx512_mid_probe();
}

/// A test function taking and returning a u32.
pub type Func = unsafe extern "C" fn(u32) -> u32;

/// Calls `f(x)` through a black box (never inlined or folded).
pub fn call(f: Func, x: u32) -> u32 {
    let f = std::hint::black_box(f);
    // SAFETY: every rj_* function of this type is a complete C-ABI function.
    unsafe { f(std::hint::black_box(x)) }
}

/// Address of a test function.
pub fn addr(f: Func) -> u64 {
    f as usize as u64
}

/// `n` bytes of code at `addr`.
pub fn code(addr: u64, n: usize) -> Vec<u8> {
    // SAFETY: test code addresses are mapped and readable.
    unsafe { std::slice::from_raw_parts(addr as *const u8, n) }.to_vec()
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Serializes the tests of one binary (they share the registry and code).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// 128 functions rj_many_k(x) = x + k for k in 0..128: push rbp;
// mov rbp, rsp; lea eax, [rdi + k]; pop rbp; ret. Their addresses are in
// rj_many_table.
global_asm!(
    ".pushsection .text.rj_many,\"ax\",@progbits",
    ".altmacro",
    ".macro rj_many_fn n",
    ".p2align 4",
    ".globl rj_many_\\n",
    ".type rj_many_\\n,@function",
    "rj_many_\\n:",
    ".byte 0x55, 0x48, 0x89, 0xe5, 0x8d, 0x47, \\n, 0x5d, 0xc3",
    ".size rj_many_\\n, . - rj_many_\\n",
    ".endm",
    ".set rj_k, 0",
    ".rept 128",
    "rj_many_fn %rj_k",
    ".set rj_k, rj_k + 1",
    ".endr",
    ".popsection",
    ".pushsection .data.rj_many_table,\"aw\",@progbits",
    ".p2align 3",
    ".globl rj_many_table",
    "rj_many_table:",
    ".macro rj_many_addr n",
    ".quad rj_many_\\n",
    ".endm",
    ".set rj_k, 0",
    ".rept 128",
    "rj_many_addr %rj_k",
    ".set rj_k, rj_k + 1",
    ".endr",
    ".noaltmacro",
    ".popsection",
);

extern "C" {
    static rj_many_table: [u64; 128];
}

/// The 128 functions `rj_many_k(x) = x + k`.
pub fn many() -> [Func; 128] {
    // SAFETY: the table holds the addresses of 128 complete C-ABI
    // functions of this type, written by the assembler.
    std::array::from_fn(|k| unsafe {
        std::mem::transmute::<usize, Func>(rj_many_table[k] as usize)
    })
}
