//! Differential execution harness for the arm64 backend, under unicorn.
//!
//! One instruction word runs twice from the same random machine state:
//!
//! - **in place**: the word sits at [`ORIG`] and the emulator executes exactly
//!   one instruction from there;
//! - **probed**: [`ORIG`] holds the probe breakpoint instead. The emulator
//!   runs into it (proving the encoding traps, at the address
//!   `trap_address` reports), then the backend completes the hit its own way:
//!   simulation on `Regs` for an emulated instruction; for an out-of-line one,
//!   the XOL slot is written at [`SLOT`], far from [`ORIG`] in another 4 GiB
//!   region so that any PC-relative result computed from the wrong address
//!   differs, the emulator runs it until the step marker traps, and
//!   `finish_step` applies the fixups.
//!
//! The two end states are compared: x0..x30, sp, pc, NZCV, BTYPE, the 32
//! vector registers, the whole data region and the whole code region (but the
//! probed word itself, which differs by construction). A fault (undefined
//! instruction, unmapped access) counts as an end state: it must happen in
//! both runs, at the original address.

#![allow(dead_code)] // each test binary uses part of the harness

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::OnceLock;

use rcu_registry::probes::arch::arm64::{BREAKPOINT, STEP_MARKER};
use rcu_registry::probes::arch::{Arch, Arm64, DataMemory, InsnClass, Regs, XolRun};
use rcu_registry::probes::ProbeError;
use unicorn_engine::{
    uc_error, Arch as UcArch, Arm64CpuModel, HookType, Mode, Prot, RegisterARM64, Unicorn,
};

/// Address of the probed instruction. Not page aligned, so ADR and ADRP
/// results depend on every bit of it.
pub const ORIG: u64 = 0x0000_0040_0012_3454;
/// Start of the code window: every literal an `ldr` at [`ORIG`] can reach
/// (±1 MiB) lies in it and reads pseudo-random bytes.
pub const CODE_BASE: u64 = (ORIG & !0xfff) - (1 << 20);
/// Size of the code window.
pub const CODE_SIZE: u64 = (2 << 20) + PAGE;
/// Pages around [`ORIG`] mapped up front; the rest of the window is mapped
/// on first access (filling 2 MiB per run would dominate the test's time).
const EAGER_CODE_PAGES: u64 = 8;
/// Emulator page size.
const PAGE: u64 = 0x1000;
/// The XOL slot: another 4 GiB region, another page, another ±1 MiB window.
pub const SLOT: u64 = 0x0000_7f00_5a5a_0ff8;
/// Data region that most random registers point into.
pub const DATA_BASE: u64 = 0x0000_0000_1000_0000;
/// Size of the data region.
pub const DATA_SIZE: u64 = 256 << 10;

/// Unicorn's exception number for `brk` (QEMU's EXCP_BKPT).
const EXCP_BKPT: u32 = 7;
/// NZCV bits of PSTATE.
const NZCV_MASK: u64 = 0xf000_0000;
/// BTYPE bits of PSTATE.
const BTYPE_MASK: u64 = 0b11 << 10;
/// No wall-clock bound on an emulation: the instruction count bounds every
/// run (1 in place, 2 from the slot), and a timer would fire spuriously when
/// a loaded machine deschedules the test for long enough.
const EMU_TIMEOUT_US: u64 = 0;

/// Architectural state compared between runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// x0..x30.
    pub x: [u64; 31],
    /// Stack pointer.
    pub sp: u64,
    /// Program counter.
    pub pc: u64,
    /// PSTATE's NZCV (bits 31..28) and BTYPE (bits 11..10).
    pub flags: u64,
    /// q0..q31.
    pub q: [u128; 32],
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction completed.
    Completed {
        /// Registers after it.
        cpu: Box<Cpu>,
        /// Data region, then code region with the probed word zeroed.
        memory: Memory,
    },
    /// An exception or an emulator memory error, at this pc.
    Fault {
        /// What went wrong.
        kind: FaultKind,
        /// Where (the original address, for a fault taken in the slot).
        pc: u64,
    },
}

/// Kinds of fault a run can end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// An exception with unicorn's (QEMU's) number.
    Exception(u32),
    /// An unmapped or protected access.
    Memory,
}

/// Memory snapshot, compared without printing megabytes on a mismatch.
#[derive(PartialEq, Eq)]
pub struct Memory(Vec<u8>);

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sum = self
            .0
            .iter()
            .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
        write!(f, "Memory({} bytes, digest {sum:#018x})", self.0.len())
    }
}

impl Memory {
    /// First differing offset, as an address in the data or code region.
    pub fn first_difference(&self, other: &Memory) -> Option<u64> {
        let i = self.0.iter().zip(&other.0).position(|(a, b)| a != b)? as u64;
        Some(if i < DATA_SIZE {
            DATA_BASE + i
        } else {
            CODE_BASE + i - DATA_SIZE
        })
    }
}

/// What the backend made of the word, and the end state of the probed run.
#[derive(Debug)]
pub enum Probed {
    /// The backend refused the word.
    Refused(ProbeError),
    /// The backend simulated it.
    Simulated(Outcome),
    /// The backend stepped it out of line.
    Stepped(Outcome),
}

/// A small deterministic generator (xorshift64*), so that a failing seed
/// reproduces.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed: neighbouring seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A random machine state. Registers mix the values instructions care about:
/// zero, values with a zero low half (CBZ W vs X), small numbers, pointers
/// into the data region (so loads and stores land), and arbitrary bits.
pub fn random_cpu(seed: u64) -> Cpu {
    let mut rng = Rng::new(seed);
    let mut x = [0u64; 31];
    for r in &mut x {
        let v = rng.next_u64();
        *r = match rng.next_u64() % 8 {
            0 | 1 => 0,
            2 => v << 32,
            3 => v % 64,
            4 | 5 => DATA_BASE + v % DATA_SIZE,
            _ => v,
        };
    }
    let mut q = [0u128; 32];
    for r in &mut q {
        *r = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
    }
    Cpu {
        x,
        sp: DATA_BASE + DATA_SIZE / 2 - (rng.next_u64() % 1024) * 16,
        pc: ORIG,
        flags: (rng.next_u64() % 16) << 28,
        q,
    }
}

/// Pseudo-random contents of the code and data regions, the same for every
/// run so that the two runs of a case start from identical memory.
fn background() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let mut rng = Rng::new(0x5eed);
        (0..(CODE_SIZE + DATA_SIZE) / 8)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect()
    })
}

/// Maps the code-window page at `page` with its background bytes. Returns
/// false outside the window.
fn map_code_page(uc: &mut Unicorn<'_, ()>, page: u64) -> bool {
    if !(CODE_BASE..CODE_BASE + CODE_SIZE).contains(&page) {
        return false;
    }
    let at = (DATA_SIZE + page - CODE_BASE) as usize;
    uc.mem_map(page, PAGE, Prot::ALL).expect("map code page");
    uc.mem_write(page, &background()[at..at + PAGE as usize])
        .expect("fill code page");
    true
}

/// Maps every unmapped code-window page of `[addr, addr + len)`. Returns
/// false if any byte lies outside the window: the access faults.
fn map_code_range(uc: &mut Unicorn<'_, ()>, addr: u64, len: u64) -> bool {
    let last = addr.saturating_add(len.max(1) - 1);
    let mut page = addr & !(PAGE - 1);
    while page <= last {
        let mapped = uc.mem_read(page, &mut [0u8]).is_ok();
        if !mapped && !map_code_page(uc, page) {
            return false;
        }
        page += PAGE;
    }
    true
}

const X_REGS: [RegisterARM64; 31] = {
    use RegisterARM64::*;
    [
        X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15, X16, X17, X18, X19,
        X20, X21, X22, X23, X24, X25, X26, X27, X28, X29, X30,
    ]
};

const Q_REGS: [RegisterARM64; 32] = {
    use RegisterARM64::*;
    [
        Q0, Q1, Q2, Q3, Q4, Q5, Q6, Q7, Q8, Q9, Q10, Q11, Q12, Q13, Q14, Q15, Q16, Q17, Q18, Q19,
        Q20, Q21, Q22, Q23, Q24, Q25, Q26, Q27, Q28, Q29, Q30, Q31,
    ]
};

/// An emulator with the regions mapped, `word` at [`ORIG`] and `cpu` loaded.
fn machine(word: u32, cpu: &Cpu) -> Unicorn<'static, ()> {
    let mut uc = Unicorn::new(UcArch::ARM64, Mode::ARM).expect("unicorn aarch64");
    // The most capable model: LSE atomics, pointer authentication, BTI.
    uc.ctl_set_cpu_model(Arm64CpuModel::MAX as i32)
        .expect("cpu model");
    uc.mem_map(DATA_BASE, DATA_SIZE, Prot::READ | Prot::WRITE)
        .expect("map data");
    uc.mem_write(DATA_BASE, &background()[..DATA_SIZE as usize])
        .expect("fill data");
    let first = (ORIG & !(PAGE - 1)) - EAGER_CODE_PAGES / 2 * PAGE;
    for page in 0..EAGER_CODE_PAGES {
        map_code_page(&mut uc, first + page * PAGE);
    }
    uc.add_mem_hook(HookType::MEM_UNMAPPED, 1, 0, |uc, _, addr, size, _| {
        map_code_range(uc, addr, size as u64)
    })
    .expect("unmapped hook");
    uc.mem_write(ORIG, &word.to_le_bytes()).expect("write insn");
    for (reg, v) in X_REGS.iter().zip(cpu.x) {
        uc.reg_write(*reg, v).expect("x");
    }
    for (reg, v) in Q_REGS.iter().zip(cpu.q) {
        uc.reg_write_long(*reg, &v.to_le_bytes()).expect("q");
    }
    uc.reg_write(RegisterARM64::SP, cpu.sp).expect("sp");
    uc.reg_write(RegisterARM64::NZCV, cpu.flags & NZCV_MASK)
        .expect("nzcv");
    uc.reg_write(RegisterARM64::PC, cpu.pc).expect("pc");
    uc
}

fn read_cpu(uc: &Unicorn<'_, ()>) -> Cpu {
    let mut cpu = Cpu {
        x: [0; 31],
        sp: uc.reg_read(RegisterARM64::SP).expect("sp"),
        pc: uc.pc_read().expect("pc"),
        flags: uc.reg_read(RegisterARM64::PSTATE).expect("pstate") & (NZCV_MASK | BTYPE_MASK),
        q: [0; 32],
    };
    for (v, reg) in cpu.x.iter_mut().zip(X_REGS) {
        *v = uc.reg_read(reg).expect("x");
    }
    for (v, reg) in cpu.q.iter_mut().zip(Q_REGS) {
        let bytes = uc.reg_read_long(reg).expect("q");
        *v = u128::from_le_bytes(bytes[..16].try_into().expect("16 bytes"));
    }
    cpu
}

/// Data region, then the code window. A code page the run never touched
/// (so never mapped) holds its background bytes.
fn snapshot(uc: &Unicorn<'_, ()>) -> Memory {
    let mut bytes = background().to_vec();
    uc.mem_read(DATA_BASE, &mut bytes[..DATA_SIZE as usize])
        .expect("data");
    let code = &mut bytes[DATA_SIZE as usize..];
    for region in uc.mem_regions().expect("regions") {
        // Regions end inclusively.
        for page in (region.begin..=region.end).step_by(PAGE as usize) {
            if (CODE_BASE..CODE_BASE + CODE_SIZE).contains(&page) {
                let at = (page - CODE_BASE) as usize;
                uc.mem_read(page, &mut code[at..at + PAGE as usize])
                    .expect("code page");
            }
        }
    }
    let at = (ORIG - CODE_BASE) as usize;
    code[at..at + 4].fill(0);
    Memory(bytes)
}

fn completed(uc: &Unicorn<'_, ()>) -> Outcome {
    Outcome::Completed {
        cpu: Box::new(read_cpu(uc)),
        memory: snapshot(uc),
    }
}

/// Runs at most `count` instructions from `start`. `Ok(None)`: ran them all;
/// `Ok(Some(n))`: exception `n` was raised, the pc is where unicorn reports it;
/// `Err`: unicorn's memory error.
fn run(uc: &mut Unicorn<'static, ()>, start: u64, count: usize) -> Result<Option<u32>, uc_error> {
    let raised = Rc::new(Cell::new(None));
    let seen = Rc::clone(&raised);
    let hook = uc
        .add_intr_hook(move |uc, intno| {
            seen.set(Some(intno));
            uc.emu_stop().expect("stop");
        })
        .expect("intr hook");
    let result = uc.emu_start(start, 0, EMU_TIMEOUT_US, count);
    uc.remove_hook(hook).expect("remove hook");
    result.map(|()| raised.get())
}

/// Runs `word` at [`ORIG`] from `cpu`, one instruction.
pub fn run_in_place(word: u32, cpu: &Cpu) -> Outcome {
    let mut uc = machine(word, cpu);
    match run(&mut uc, ORIG, 1) {
        Ok(None) => completed(&uc),
        // The pc moved on: the instruction (a branch) completed, and only the
        // fetch at its target failed (unmapped, not executable, misaligned).
        Err(_) if uc.pc_read() != Ok(ORIG) => completed(&uc),
        Ok(Some(n)) => Outcome::Fault {
            kind: FaultKind::Exception(n),
            pc: uc.pc_read().expect("pc"),
        },
        Err(_) => Outcome::Fault {
            kind: FaultKind::Memory,
            pc: uc.pc_read().expect("pc"),
        },
    }
}

/// `DataMemory` over the emulator's memory. The code window is mapped on
/// first access as in the emulated run; mapping needs `&mut`, which
/// `DataMemory::read` does not give, hence the `RefCell`.
struct EmuMemory<'u>(RefCell<&'u mut Unicorn<'static, ()>>);

impl<'u> EmuMemory<'u> {
    fn new(uc: &'u mut Unicorn<'static, ()>) -> Self {
        EmuMemory(RefCell::new(uc))
    }
}

impl DataMemory for EmuMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        let mut uc = self.0.borrow_mut();
        if map_code_range(&mut uc, addr, buf.len() as u64) && uc.mem_read(addr, buf).is_ok() {
            return Ok(());
        }
        // Outside the code window: only what is already mapped is readable.
        uc.mem_read(addr, buf).map_err(|_| ProbeError::MemoryFault {
            addr,
            len: buf.len(),
        })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        self.0
            .get_mut()
            .mem_write(addr, bytes)
            .map_err(|_| ProbeError::MemoryFault {
                addr,
                len: bytes.len(),
            })
    }
}

fn regs_of(uc: &Unicorn<'_, ()>) -> Regs {
    let mut regs = Regs {
        sp: uc.reg_read(RegisterARM64::SP).expect("sp"),
        ip: uc.pc_read().expect("pc"),
        flags: uc.reg_read(RegisterARM64::PSTATE).expect("pstate"),
        ..Regs::default()
    };
    for (v, reg) in regs.gprs.iter_mut().zip(X_REGS) {
        *v = uc.reg_read(reg).expect("x");
    }
    regs
}

fn load_regs(uc: &mut Unicorn<'_, ()>, regs: &Regs) {
    for (reg, v) in X_REGS.iter().zip(regs.gprs) {
        uc.reg_write(*reg, v).expect("x");
    }
    uc.reg_write(RegisterARM64::SP, regs.sp).expect("sp");
    uc.reg_write(RegisterARM64::PSTATE, regs.flags)
        .expect("pstate");
    uc.reg_write(RegisterARM64::PC, regs.ip).expect("pc");
}

/// Runs `word` probed: breakpoint at [`ORIG`], then simulation or the XOL
/// slot at [`SLOT`] plus fixups. Panics if the breakpoint or the step marker
/// does not trap where the backend says it does.
pub fn run_probed(word: u32, cpu: &Cpu) -> Probed {
    let arch = Arm64;
    let insn = match arch.analyze(ORIG, &word.to_le_bytes()) {
        Ok(insn) => insn,
        Err(e) => return Probed::Refused(e),
    };
    let mut uc = machine(BREAKPOINT, cpu);
    assert_eq!(
        run(&mut uc, ORIG, 1),
        Ok(Some(EXCP_BKPT)),
        "the probe breakpoint must trap"
    );
    let mut regs = regs_of(&uc);
    assert_eq!(
        arch.trap_address(&regs),
        ORIG,
        "trap address of the breakpoint"
    );
    match insn.class {
        InsnClass::Emulated(_) => {
            let before = regs;
            let result = arch.emulate(&insn, &mut regs, &mut EmuMemory::new(&mut uc));
            Probed::Simulated(match result {
                Ok(()) => {
                    load_regs(&mut uc, &regs);
                    completed(&uc)
                }
                Err(ProbeError::MemoryFault { .. }) => {
                    assert_eq!(regs, before, "a failed simulation changes no register");
                    Outcome::Fault {
                        kind: FaultKind::Memory,
                        pc: ORIG,
                    }
                }
                Err(e) => panic!("simulation of {word:#010x} failed: {e}"),
            })
        }
        InsnClass::OutOfLine => Probed::Stepped(step_out_of_line(&arch, &insn, uc, regs)),
        other => panic!("arm64 produced a class it does not document: {other:?}"),
    }
}

fn step_out_of_line(
    arch: &Arm64,
    insn: &rcu_registry::probes::arch::Insn,
    mut uc: Unicorn<'static, ()>,
    mut regs: Regs,
) -> Outcome {
    let plan = arch
        .plan_xol(insn, SLOT)
        .expect("plan for an out-of-line insn");
    assert_eq!(plan.slot_bytes().len(), arch.xol_slot_size());
    // The stepped copy and its marker (after a boosted copy, or markers
    // where the slot is out of `b`'s reach, as here).
    let entry = plan.step_entry;
    assert_eq!(plan.step_marker, Some(entry + 4));
    // The slot may cross into the next page.
    uc.mem_map(SLOT & !0xfff, 0x2000, Prot::READ | Prot::EXEC)
        .expect("map slot");
    uc.mem_write(SLOT, plan.slot_bytes()).expect("write slot");
    let state = arch
        .prepare_step(&plan, XolRun::SingleStep, &mut regs)
        .expect("prepare");
    assert_eq!(regs.ip, entry);
    load_regs(&mut uc, &regs);
    let fault_pc = |uc: &Unicorn<'_, ()>| {
        let pc = uc.pc_read().expect("pc");
        if pc == entry {
            ORIG
        } else {
            pc
        }
    };
    match run(&mut uc, entry, 2) {
        Ok(Some(EXCP_BKPT)) if uc.pc_read() == Ok(entry + 4) => {
            let mut after = regs_of(&uc);
            let marker_word = uc.mem_read_as_vec(entry + 4, 4).expect("marker");
            assert_eq!(
                marker_word,
                STEP_MARKER.to_le_bytes(),
                "trapped on the step marker"
            );
            arch.finish_step(&plan, &state, &mut after, &mut EmuMemory::new(&mut uc))
                .expect("finish step");
            load_regs(&mut uc, &after);
            completed(&uc)
        }
        Ok(Some(n)) => Outcome::Fault {
            kind: FaultKind::Exception(n),
            pc: fault_pc(&uc),
        },
        Ok(None) => panic!("the slot of {:#010x} ran past its step marker", insn.addr),
        Err(_) => Outcome::Fault {
            kind: FaultKind::Memory,
            pc: fault_pc(&uc),
        },
    }
}

/// Runs `word` both ways from the state of `seed` and explains any
/// difference. `Ok` carries how the backend handled the word.
pub fn differential(word: u32, seed: u64) -> Result<&'static str, String> {
    let cpu = random_cpu(seed);
    let (kind, probed) = match run_probed(word, &cpu) {
        Probed::Refused(e) => {
            let why = e.to_string();
            return if matches!(e, ProbeError::UnsupportedInstruction { .. }) && !why.is_empty() {
                Ok("refused")
            } else {
                Err(format!("{word:#010x}: refused without a reason: {e:?}"))
            };
        }
        Probed::Simulated(o) => ("simulated", o),
        Probed::Stepped(o) => ("stepped", o),
    };
    let in_place = run_in_place(word, &cpu);
    if in_place == probed {
        return Ok(kind);
    }
    let detail = match (&in_place, &probed) {
        (Outcome::Completed { cpu: a, memory: ma }, Outcome::Completed { cpu: b, memory: mb }) => {
            let mut d = Vec::new();
            for i in 0..31 {
                if a.x[i] != b.x[i] {
                    d.push(format!(
                        "x{i}: {:#x} in place, {:#x} probed",
                        a.x[i], b.x[i]
                    ));
                }
            }
            for (name, p, q) in [
                ("sp", a.sp, b.sp),
                ("pc", a.pc, b.pc),
                ("flags", a.flags, b.flags),
            ] {
                if p != q {
                    d.push(format!("{name}: {p:#x} in place, {q:#x} probed"));
                }
            }
            if a.q != b.q {
                d.push("vector registers differ".into());
            }
            if let Some(at) = ma.first_difference(mb) {
                d.push(format!("memory differs first at {at:#x}"));
            }
            d.join("; ")
        }
        _ => format!("in place {in_place:?}, probed {probed:?}"),
    };
    Err(format!("{word:#010x} ({kind}, seed {seed:#x}): {detail}"))
}
