//! Differential checks of jump relocation (issue 15).
//!
//! 1. **Corpus**: every function of this process (the test binary, the C
//!    library and whatever else is loaded) is analysed at its entry as the
//!    optimizer would; for each accepted one the displaced instructions are
//!    relocated 256 MiB away and decoded again: the same instructions, the
//!    same operands, RIP-relative operands reaching the same absolute
//!    address, nothing else changed byte for byte.
//! 2. **Execution**: generated instruction sequences of each relocatable
//!    class (flag-setting ALU, push/pop, memory through a register,
//!    RIP-relative loads, stores, `lea`, read-modify-write, and an SSE
//!    load) run in place and relocated from random register, flag and
//!    memory states: every general register, the status flags, `xmm0` and
//!    the data page must come out identical.
//!
//! 3. **Real functions under the emulator**: one in four of the same accepted
//!    entries (a fixed sample), their
//!    displaced instructions run under unicorn from random register and
//!    flag states (half the registers pointing into a data page), in place
//!    and relocated 256 MiB away, every page they touch copied once from
//!    this process: every general register, the status flags and every
//!    memory write (address, size, value, in order) must be the same.
//!
//! The live tests run the detours themselves on real code (natively).

#![cfg(target_arch = "x86_64")]

mod arch_x86_support;

use std::arch::global_asm;
use std::collections::BTreeMap;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use arch_x86_support::GPR_IDS;
use iced_x86::{
    Code, Decoder, DecoderOptions, Encoder, Instruction, MemoryOperand, Mnemonic, Register,
};
use rcu_registry::probes::arch::x86_64::jump::{analyze_jump_site, JumpRefusal};
use rcu_registry::probes::runtime::symbols::ProcessSymbols;
use unicorn_engine::{Arch as UcArch, HookType, MemType, Mode, Prot, RegisterX86, Unicorn};

/// Readable, executable ranges of the process (`/proc/self/maps`).
fn code_ranges() -> Vec<(u64, u64)> {
    ranges(|perms, _| perms.starts_with("r-x"))
}

/// Readable ranges of the process, but the kernel's special pages.
fn readable_ranges() -> Vec<(u64, u64)> {
    ranges(|perms, line| {
        perms.starts_with('r') && !line.contains("[vvar") && !line.contains("[vsyscall]")
    })
}

/// The ranges of `/proc/self/maps` whose line `keep(perms, line)` accepts.
fn ranges(keep: impl Fn(&str, &str) -> bool) -> Vec<(u64, u64)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            if !keep(perms, l) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

fn kind(r: &JumpRefusal) -> &'static str {
    match r {
        JumpRefusal::PastFunctionEnd { .. } => "past the end",
        JumpRefusal::NotOnBoundary => "boundary",
        JumpRefusal::Undecodable { .. } => "undecodable",
        JumpRefusal::BranchIntoDisplaced { .. } => "branch into",
        JumpRefusal::IndirectJump { .. } => "indirect jump",
        JumpRefusal::DisplacedControlFlow { .. } => "control flow",
        JumpRefusal::NotRelocatable { .. } => "not relocatable",
        _ => "other",
    }
}

#[test]
fn every_accepted_entry_of_the_process_relocates_to_equivalent_instructions() {
    let symbols = ProcessSymbols::load().unwrap();
    let ranges = code_ranges();
    let mut accepted = 0usize;
    let mut rip_relative = 0usize;
    let mut out_of_reach = 0usize;
    let mut refused: BTreeMap<&str, usize> = BTreeMap::new();
    let mut libc_accepted = 0usize;
    for f in symbols.functions() {
        let end = f.start + f.size;
        if !ranges.iter().any(|&(a, b)| f.start >= a && end <= b) || f.size > 1 << 20 {
            continue;
        }
        // SAFETY: the range is mapped readable (checked just above).
        let text = unsafe { std::slice::from_raw_parts(f.start as *const u8, f.size as usize) };
        let site = match analyze_jump_site(f.start, text, f.start) {
            Ok(s) => s,
            Err(r) => {
                *refused.entry(kind(&r)).or_default() += 1;
                continue;
            }
        };
        let at = f.start + (256 << 20);
        let moved = match site.relocate(at) {
            Ok(m) => m,
            Err(_) => {
                out_of_reach += 1;
                continue;
            }
        };
        accepted += 1;
        if f.object.contains("libc.so") {
            libc_accepted += 1;
        }
        let a: Vec<Instruction> = Decoder::with_ip(64, site.bytes(), f.start, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let b: Vec<Instruction> = Decoder::with_ip(64, &moved, at, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert_eq!(a.len(), b.len(), "{}: instruction count", f.name);
        let mut from = 0usize;
        for (x, y) in a.iter().zip(&b) {
            assert!(!y.is_invalid(), "{}: relocated bytes decode", f.name);
            assert_eq!(x.code(), y.code(), "{}: same instruction", f.name);
            assert_eq!(x.op_count(), y.op_count());
            for i in 0..x.op_count() {
                assert_eq!(x.op_kind(i), y.op_kind(i), "{}", f.name);
                assert_eq!(x.op_register(i), y.op_register(i), "{}", f.name);
            }
            if x.is_ip_rel_memory_operand() {
                rip_relative += 1;
                assert!(y.is_ip_rel_memory_operand());
                assert_eq!(
                    x.ip_rel_memory_address(),
                    y.ip_rel_memory_address(),
                    "{}",
                    f.name
                );
                assert_eq!(x.immediate64(), y.immediate64());
            } else {
                let xb = &site.bytes()[from..from + x.len()];
                let yo = (y.ip() - at) as usize;
                assert_eq!(xb, &moved[yo..yo + y.len()], "{}: copied as is", f.name);
            }
            from += x.len();
        }
    }
    println!(
        "entries: {accepted} accepted ({libc_accepted} in libc, {rip_relative} RIP-relative \
         instructions relocated), {out_of_reach} out of reach at +256 MiB, refused: {refused:?}"
    );
    assert!(accepted >= 500, "a corpus worth the name: {accepted}");
    assert!(
        libc_accepted >= 100,
        "the C library's entries: {libc_accepted}"
    );
    assert!(
        rip_relative >= 50,
        "RIP-relative relocations: {rip_relative}"
    );
}

// The execution harness: rj_run(state, code) loads rax..r15 (not rsp), the
// flags and xmm0's low quadword from `state`, calls `code`, and stores them
// back. state: 16 registers by number, then flags at 128, xmm0 at 136.
global_asm!(
    ".pushsection .text.rj_run,\"ax\",@progbits",
    ".p2align 4",
    ".globl rj_run",
    ".type rj_run,@function",
    "rj_run:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "push rsi",
    "movq xmm0, qword ptr [rdi + 136]",
    "mov rax, qword ptr [rdi + 128]",
    "push rax",
    "popfq",
    "mov rax, qword ptr [rdi + 0]",
    "mov rcx, qword ptr [rdi + 8]",
    "mov rdx, qword ptr [rdi + 16]",
    "mov rbx, qword ptr [rdi + 24]",
    "mov rbp, qword ptr [rdi + 40]",
    "mov rsi, qword ptr [rdi + 48]",
    "mov r8, qword ptr [rdi + 64]",
    "mov r9, qword ptr [rdi + 72]",
    "mov r10, qword ptr [rdi + 80]",
    "mov r11, qword ptr [rdi + 88]",
    "mov r12, qword ptr [rdi + 96]",
    "mov r13, qword ptr [rdi + 104]",
    "mov r14, qword ptr [rdi + 112]",
    "mov r15, qword ptr [rdi + 120]",
    "mov rdi, qword ptr [rdi + 56]",
    "call qword ptr [rsp]",
    "push rdi",
    "mov rdi, qword ptr [rsp + 16]",
    "mov qword ptr [rdi + 0], rax",
    "mov qword ptr [rdi + 8], rcx",
    "mov qword ptr [rdi + 16], rdx",
    "mov qword ptr [rdi + 24], rbx",
    "mov qword ptr [rdi + 40], rbp",
    "mov qword ptr [rdi + 48], rsi",
    "mov qword ptr [rdi + 64], r8",
    "mov qword ptr [rdi + 72], r9",
    "mov qword ptr [rdi + 80], r10",
    "mov qword ptr [rdi + 88], r11",
    "mov qword ptr [rdi + 96], r12",
    "mov qword ptr [rdi + 104], r13",
    "mov qword ptr [rdi + 112], r14",
    "mov qword ptr [rdi + 120], r15",
    "pop rax",
    "mov qword ptr [rdi + 56], rax",
    "pushfq",
    "pop rax",
    "mov qword ptr [rdi + 128], rax",
    "movq qword ptr [rdi + 136], xmm0",
    "add rsp, 16",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".size rj_run, . - rj_run",
    ".popsection",
);

extern "C" {
    fn rj_run(state: *mut [u64; 18], code: u64);
}

/// The status flags compared: CF, PF, AF, ZF, SF, OF.
const STATUS: u64 = 0x8d5;

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// General registers a sequence may use: not rsp, not r12 (the data
/// page's base for register-based memory operands).
const REGS: [Register; 14] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// One instruction of `class`; `data` is the data page.
fn generate(class: usize, rng: &mut Rng, data: u64) -> Vec<Instruction> {
    let r = |rng: &mut Rng| REGS[rng.below(REGS.len() as u64) as usize];
    let imm = |rng: &mut Rng| rng.next() as i32;
    let target = |rng: &mut Rng| data + 8 * rng.below(500);
    let w = |r: Result<Instruction, iced_x86::IcedError>| r.unwrap();
    match class {
        // Flag-setting ALU with a 32-bit immediate, then another on registers.
        0 => {
            let codes = [
                Code::Add_rm64_imm32,
                Code::Sub_rm64_imm32,
                Code::Xor_rm64_imm32,
                Code::Cmp_rm64_imm32,
                Code::And_rm64_imm32,
            ];
            let c = codes[rng.below(5) as usize];
            let rr = [
                Code::Adc_rm64_r64,
                Code::Sbb_rm64_r64,
                Code::Or_rm64_r64,
                Code::Imul_r64_rm64,
            ];
            vec![
                w(Instruction::with2(c, r(rng), imm(rng))),
                w(Instruction::with2(
                    rr[rng.below(4) as usize],
                    r(rng),
                    r(rng),
                )),
            ]
        }
        // push, push, pop, pop (balanced; registers may differ): one-byte
        // encodings (no REX), so that with the padding nop all four are
        // displaced and the stack is balanced at the ret.
        1 => {
            let l = |rng: &mut Rng| REGS[rng.below(7) as usize];
            vec![
                w(Instruction::with1(Code::Push_r64, l(rng))),
                w(Instruction::with1(Code::Push_r64, l(rng))),
                w(Instruction::with1(Code::Pop_r64, l(rng))),
                w(Instruction::with1(Code::Pop_r64, l(rng))),
            ]
        }
        // Memory through a register base.
        2 => {
            let m = MemoryOperand::with_base_displ(Register::R12, 8 * rng.below(500) as i64);
            if rng.below(2) == 0 {
                vec![w(Instruction::with2(Code::Mov_r64_rm64, r(rng), m))]
            } else {
                vec![w(Instruction::with2(Code::Add_rm64_r64, m, r(rng)))]
            }
        }
        // RIP-relative load, store, lea, read-modify-write, compare.
        3 => {
            let m = MemoryOperand::with_base_displ(Register::RIP, target(rng) as i64);
            let i = match rng.below(5) {
                0 => Instruction::with2(Code::Mov_r64_rm64, r(rng), m),
                1 => Instruction::with2(Code::Mov_rm64_r64, m, r(rng)),
                2 => Instruction::with2(Code::Lea_r64_m, r(rng), m),
                3 => Instruction::with2(Code::Add_rm64_r64, m, r(rng)),
                _ => Instruction::with2(Code::Cmp_rm64_imm8, m, (rng.next() as i8) as i32),
            };
            vec![w(i)]
        }
        // SSE load RIP-relative.
        _ => {
            let m = MemoryOperand::with_base_displ(Register::RIP, target(rng) as i64);
            vec![w(Instruction::with2(
                Code::Movq_xmm_rm64,
                Register::XMM0,
                m,
            ))]
        }
    }
}

#[test]
fn generated_sequences_run_the_same_in_place_and_relocated() {
    const PAGE: usize = 4096;
    // SAFETY: a fresh anonymous mapping; no other code refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as u64;
    let (here, there, data) = (base, base + PAGE as u64 + 0x123, base + 2 * PAGE as u64);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut runs = [0usize; 5];
    for round in 0..2500 {
        let class = round % 5;
        let insns = generate(class, &mut rng, data);
        let mut bytes = Vec::new();
        for i in &insns {
            let mut e = Encoder::new(64);
            e.encode(i, here + bytes.len() as u64).unwrap();
            bytes.extend_from_slice(&e.take_buffer());
        }
        // Padding up to the jmp's five bytes, then the function's ret.
        while bytes.len() < 5 {
            bytes.push(0x90);
        }
        bytes.push(0xc3);
        let site = analyze_jump_site(here, &bytes, here).expect("a relocatable class");
        if class == 1 {
            assert_eq!(
                usize::from(site.len),
                bytes.len() - 1,
                "push/pop all displaced"
            );
        }
        let moved = site.relocate(there).unwrap();
        let mut a = site.bytes().to_vec();
        a.push(0xc3);
        let mut b = moved;
        b.push(0xc3);
        let mut init = [0u64; 18];
        for v in init.iter_mut() {
            *v = rng.next();
        }
        init[4] = 0;
        init[12] = data;
        init[16] = 0x202 | (rng.next() & STATUS);
        let page: Vec<u8> = (0..PAGE).map(|_| rng.next() as u8).collect();
        let mut outs = Vec::new();
        for (code_at, code) in [(here, &a), (there, &b)] {
            // SAFETY: both code ranges and the data page are inside the
            // mapping, written before being run, and nothing else runs them.
            unsafe {
                std::ptr::copy_nonoverlapping(code.as_ptr(), code_at as *mut u8, code.len());
                std::ptr::copy_nonoverlapping(page.as_ptr(), data as *mut u8, PAGE);
            }
            let mut st = init;
            // SAFETY: the code is a complete sequence ending in ret that
            // touches only the registers it loads and the data page.
            unsafe { rj_run(&mut st, code_at) };
            st[16] &= STATUS;
            // SAFETY: the data page is mapped.
            let mem = unsafe { std::slice::from_raw_parts(data as *const u8, PAGE) }.to_vec();
            outs.push((st, mem));
        }
        assert_eq!(
            outs[0].0, outs[1].0,
            "registers, flags, xmm0: class {class}, {insns:?}"
        );
        assert!(outs[0].1 == outs[1].1, "memory: class {class}, {insns:?}");
        runs[class] += 1;
    }
    println!("runs per class (alu, push/pop, mem, rip-relative, sse): {runs:?}");
    // SAFETY: unmapping what we mapped; nothing refers to it any more.
    unsafe { libc::munmap(base as *mut libc::c_void, 3 * PAGE) };
}

/// The emulated runs' data page (registers point into it) and stack page.
const EMU_DATA: u64 = 0x60_0000;
const EMU_STACK: u64 = 0x70_0000;

/// Pages copied from this process, once, shared by both runs of a
/// function (a page another test thread changes between the runs would
/// otherwise differ).
type Pages = Rc<RefCell<HashMap<u64, Vec<u8>>>>;

/// What an emulated run left: the general registers, the status flags,
/// and the writes made (address, size, value).
type EmuEnd = ([u64; 16], u64, Vec<(u64, usize, i64)>);

/// Runs from `start` until the IP reaches `until`, with `code` mapped at
/// its address and every other page the run touches copied from this
/// process (`readable`), from `regs`, `flags` and the random data and
/// stack pages.
fn emulate_until(
    code: (u64, &[u8]),
    start: u64,
    until: u64,
    state: &([u64; 16], u64, Vec<u8>, Vec<u8>),
    readable: &Rc<Vec<(u64, u64)>>,
    pages: &Pages,
) -> Result<EmuEnd, String> {
    let mut uc = Unicorn::new(UcArch::X86, Mode::MODE_64).expect("unicorn x86_64");
    uc.ctl_set_cpu_model(unicorn_engine::X86CpuModel::HASWELL as i32)
        .expect("cpu model");
    let page = code.0 & !0xfff;
    let len = ((code.0 + code.1.len() as u64 + 0xfff) & !0xfff) - page;
    uc.mem_map(page, len, Prot::ALL).unwrap();
    uc.mem_write(page, &vec![0xcc; len as usize]).unwrap();
    uc.mem_write(code.0, code.1).unwrap();
    uc.mem_map(EMU_DATA, 0x1000, Prot::READ | Prot::WRITE)
        .unwrap();
    uc.mem_write(EMU_DATA, &state.2).unwrap();
    uc.mem_map(EMU_STACK, 0x2000, Prot::READ | Prot::WRITE)
        .unwrap();
    uc.mem_write(EMU_STACK, &state.3).unwrap();
    let (readable, pages) = (Rc::clone(readable), Rc::clone(pages));
    let unmapped =
        HookType::MEM_READ_UNMAPPED | HookType::MEM_WRITE_UNMAPPED | HookType::MEM_FETCH_UNMAPPED;
    uc.add_mem_hook(unmapped, 1, 0, move |uc, _, addr, _, _| {
        let page = addr & !0xfff;
        if !readable
            .iter()
            .any(|&(a, b)| page >= a && page + 0x1000 <= b)
        {
            return false;
        }
        let bytes = pages
            .borrow_mut()
            .entry(page)
            .or_insert_with(|| {
                // SAFETY: the page lies in a readable mapping of this
                // process (checked above; the kernel's special pages are
                // left out).
                unsafe { std::slice::from_raw_parts(page as *const u8, 0x1000) }.to_vec()
            })
            .clone();
        uc.mem_map(page, 0x1000, Prot::ALL).is_ok() && uc.mem_write(page, &bytes).is_ok()
    })
    .unwrap();
    let writes = Rc::new(RefCell::new(Vec::new()));
    let w = Rc::clone(&writes);
    uc.add_mem_hook(HookType::MEM_WRITE, 1, 0, move |_, t, addr, size, value| {
        if t == MemType::WRITE {
            w.borrow_mut().push((addr, size, value));
        }
        true
    })
    .unwrap();
    for (i, id) in GPR_IDS.iter().enumerate() {
        uc.reg_write(*id, state.0[i]).unwrap();
    }
    uc.reg_write(RegisterX86::RFLAGS, state.1).unwrap();
    uc.emu_start(start, until, 0, 64)
        .map_err(|e| format!("{e:?}"))?;
    let ip = uc.reg_read(RegisterX86::RIP).unwrap();
    if ip != until {
        return Err(format!("stopped at {ip:#x}, not {until:#x}"));
    }
    let mut regs = [0u64; 16];
    for (i, id) in GPR_IDS.iter().enumerate() {
        regs[i] = uc.reg_read(*id).unwrap();
    }
    let flags = uc.reg_read(RegisterX86::RFLAGS).unwrap() & STATUS;
    let writes = writes.borrow().clone();
    Ok((regs, flags, writes))
}

#[test]
fn real_entries_run_the_same_in_place_and_relocated_under_the_emulator() {
    let symbols = ProcessSymbols::load().unwrap();
    let ranges = code_ranges();
    let readable = Rc::new(readable_ranges());
    let mut rng = Rng(0x5eed_d1ff);
    let (mut same, mut both_faulted, mut libc_same) = (0usize, 0usize, 0usize);
    let mut nondeterministic = 0usize;
    for f in symbols.functions() {
        let end = f.start + f.size;
        if !ranges.iter().any(|&(a, b)| f.start >= a && end <= b) || f.size > 1 << 20 {
            continue;
        }
        // SAFETY: the range is mapped readable (checked just above).
        let text = unsafe { std::slice::from_raw_parts(f.start as *const u8, f.size as usize) };
        // One entry in four (a fixed sample: two emulator runs each; the
        // relocation test above decodes them all).
        if rng.next() % 4 != 0 {
            continue;
        }
        let Ok(site) = analyze_jump_site(f.start, text, f.start) else {
            continue;
        };
        let at = f.start + (256 << 20);
        let Ok(moved) = site.relocate(at) else {
            continue;
        };
        // Instructions whose result differs from one run to the next, and
        // those that store the x87 environment, whose last-instruction
        // pointer is where the previous x87 instruction ran: relocated, it
        // is the copy's address (as for any out-of-line execution; only an
        // x87 exception handler reads it).
        let varies = Decoder::with_ip(64, site.bytes(), f.start, DecoderOptions::NONE)
            .into_iter()
            .any(|i| {
                matches!(
                    i.mnemonic(),
                    Mnemonic::Rdtsc
                        | Mnemonic::Rdtscp
                        | Mnemonic::Rdrand
                        | Mnemonic::Rdseed
                        | Mnemonic::Rdpid
                        | Mnemonic::Cpuid
                        | Mnemonic::Fnstenv
                        | Mnemonic::Fstenv
                        | Mnemonic::Fnsave
                        | Mnemonic::Fsave
                        | Mnemonic::Fxsave
                        | Mnemonic::Fxsave64
                        | Mnemonic::Xsave
                        | Mnemonic::Xsave64
                        | Mnemonic::Xsaveopt
                        | Mnemonic::Xsaveopt64
                        | Mnemonic::Xsavec
                        | Mnemonic::Xsavec64
                )
            });
        if varies {
            nondeterministic += 1;
            continue;
        }
        let mut regs = [0u64; 16];
        for r in regs.iter_mut() {
            *r = match rng.next() % 2 {
                0 => EMU_DATA + 0x400 + rng.next() % 0x800,
                _ => rng.next(),
            };
        }
        regs[4] = EMU_STACK + 0x1000 - 8 * (rng.next() % 16);
        let flags = 0x202 | (rng.next() & STATUS);
        let data: Vec<u8> = (0..0x1000).map(|_| rng.next() as u8).collect();
        let stack: Vec<u8> = (0..0x2000).map(|_| rng.next() as u8).collect();
        let state = (regs, flags, data, stack);
        let pages: Pages = Rc::default();
        let len = u64::from(site.len);
        let here = emulate_until(
            (f.start, site.bytes()),
            f.start,
            f.start + len,
            &state,
            &readable,
            &pages,
        );
        let there = emulate_until(
            (at, &moved),
            at,
            at + moved.len() as u64,
            &state,
            &readable,
            &pages,
        );
        match (here, there) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "{} ({}): in place / relocated", f.name, f.object);
                same += 1;
                if f.object.contains("libc.so") {
                    libc_same += 1;
                }
            }
            (Err(_), Err(_)) => both_faulted += 1,
            (a, b) => panic!("{}: in place {a:?}, relocated {b:?}", f.name),
        }
    }
    println!(
        "real entries under the emulator: {same} identical ({libc_same} in libc), \
         {both_faulted} faulted both ways (random pointers), {nondeterministic} left out \
         (rdtsc, cpuid, x87 environment stores and the like)"
    );
    assert!(same >= 500, "a corpus worth the name: {same}");
    assert!(libc_same >= 100, "the C library's entries: {libc_same}");
}
