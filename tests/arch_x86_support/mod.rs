//! Differential harness for the x86_64 backend, on the unicorn emulator.
//!
//! One instruction is run twice from the same machine state:
//!
//! - **in place**: its bytes at `INSN_AT`, one instruction executed (a `rep`
//!   string instruction is resumed until it leaves its address);
//! - **through the backend**: the original bytes overwritten by `int3`, then
//!   either [`Arch::emulate`] on the register file, or the XOL plan written at
//!   a slot (near: within 2 GiB, jump back `jmp rel32`; far: absolute jump
//!   back), run by `prepare_step`, then:
//!   - a step-marker plan: the slot is run from the step entry until the IP
//!     reaches the marker (every iteration of a `rep` instruction), the
//!     marker's own `int3` is executed (it must be one, and the emulator
//!     reports the IP after it, as the CPU does), then `finish_step`;
//!   - a trap-flag plan (the backend's choice for instructions that may not
//!     fall through, or any instruction through
//!     [`X86_64::plan_xol_trap_flag`]): one emulated instruction (the
//!     single-step), `finish_step` (repeated while it answers `Repeat`);
//!   - for boostable plans, a boosted run until the IP leaves the slot.
//!
//! The two final states are compared: the 16 general registers, RIP, RFLAGS,
//! XMM0-15, the data pages and the stack page. A run that faults in place must
//! fault through the backend with the same error, and is then counted as a
//! skip, never as a pass.

#![allow(dead_code)]

use rcu_registry::probes::arch::{
    Arch, DataMemory, Insn, InsnClass, Regs, StepOutcome, X86Reg, XolRun, X86_64,
};
use rcu_registry::probes::ProbeError;
use unicorn_engine::{Arch as UcArch, HookType, Mode, Prot, RegisterX86, Unicorn};

/// Code region (64 KiB) and the probed instruction's address in it.
pub const CODE: u64 = 0x40_0000;
pub const CODE_SIZE: u64 = 0x1_0000;
pub const INSN_AT: u64 = CODE + 0x8000;
/// Slot within +/-2 GiB of the code: the jump back is `jmp rel32`.
pub const SLOT_NEAR: u64 = 0x50_0040;
/// Slot far away: the jump back is the absolute `jmp [rip+0]; dq`.
pub const SLOT_FAR: u64 = 0x7f12_3400_0080;
/// Data pages that memory operands point into.
pub const DATA: u64 = 0x60_0000;
pub const DATA_SIZE: u64 = 0x2000;
/// Stack page; RSP starts in its middle.
pub const STACK: u64 = 0x70_0000;
pub const STACK_SIZE: u64 = 0x2000;

/// The emulator's ids of the 16 general registers, in `X86Reg::ALL` order.
pub const GPR_IDS: [RegisterX86; 16] = [
    RegisterX86::RAX,
    RegisterX86::RCX,
    RegisterX86::RDX,
    RegisterX86::RBX,
    RegisterX86::RSP,
    RegisterX86::RBP,
    RegisterX86::RSI,
    RegisterX86::RDI,
    RegisterX86::R8,
    RegisterX86::R9,
    RegisterX86::R10,
    RegisterX86::R11,
    RegisterX86::R12,
    RegisterX86::R13,
    RegisterX86::R14,
    RegisterX86::R15,
];

const TF: u64 = 1 << 8;
/// Bits of RFLAGS a user program controls and we randomize: CF PF AF ZF SF
/// DF OF.
pub const USER_FLAGS: u64 = 0x0cd5;

/// The full machine state the comparison covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub regs: Regs,
    pub xmm: [u128; 16],
    pub data: Vec<u8>,
    pub stack: Vec<u8>,
}

/// How a run ended.
// A test harness value compared once per run: boxing the large variant
// would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed; the final state.
    Done(Machine),
    /// Faulted (emulator error, or a backend memory fault on emulation).
    Fault(String),
}

/// Small deterministic generator (the tests take seeds from proptest).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Machine {
    /// A random state: about half of the general registers point into the
    /// data pages (so base-register memory operands hit mapped memory), the
    /// rest are random; RSP is in the stack page; flags and XMM are random;
    /// data and stack bytes are random. `rcx` is small when `small_rcx` (for
    /// `rep` instructions).
    pub fn random(rng: &mut Rng, small_rcx: bool) -> Machine {
        let mut regs = Regs::default();
        for r in X86Reg::ALL {
            let v = if rng.next() % 2 == 0 {
                DATA + 0x800 + (rng.next() % 0x800)
            } else {
                rng.next()
            };
            regs[r] = v;
        }
        regs[X86Reg::Rsp] = STACK + 0x1000 - 8 * (rng.next() % 16);
        if rng.next() % 4 == 0 {
            regs[X86Reg::Rbp] = STACK + 0x1000 + 8 * (rng.next() % 16);
        }
        if small_rcx {
            regs[X86Reg::Rcx] = rng.next() % 8;
        }
        regs.flags = 0x2 | (rng.next() & USER_FLAGS);
        regs.ip = INSN_AT;
        let mut xmm = [0u128; 16];
        for x in &mut xmm {
            *x = u128::from(rng.next()) << 64 | u128::from(rng.next());
        }
        let mut data = vec![0u8; DATA_SIZE as usize];
        let mut stack = vec![0u8; STACK_SIZE as usize];
        for b in data.iter_mut().chain(stack.iter_mut()) {
            *b = rng.next() as u8;
        }
        // Some words that are valid code addresses, so indirect branches and
        // returns through memory land somewhere mapped.
        for i in 0..16 {
            let w = CODE + 0x100 + 0x10 * i;
            let at = (rng.next() % (DATA_SIZE / 8)) as usize * 8;
            data[at..at + 8].copy_from_slice(&w.to_le_bytes());
            let at = (rng.next() % (STACK_SIZE / 8)) as usize * 8;
            stack[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
        Machine {
            regs,
            xmm,
            data,
            stack,
        }
    }
}

/// An emulator loaded with `m`, code region filled with `nop`s, plus `code`
/// written at the given addresses.
fn emulator(m: &Machine, code: &[(u64, &[u8])]) -> Unicorn<'static, ()> {
    let mut uc = Unicorn::new(UcArch::X86, Mode::MODE_64).expect("unicorn x86_64");
    // A recent model, so SSE4/POPCNT/BMI and friends decode in both runs.
    uc.ctl_set_cpu_model(unicorn_engine::X86CpuModel::HASWELL as i32)
        .expect("cpu model");
    uc.mem_map(CODE, CODE_SIZE, Prot::ALL).unwrap();
    uc.mem_write(CODE, &vec![0x90u8; CODE_SIZE as usize])
        .unwrap();
    for slot in [SLOT_NEAR, SLOT_FAR] {
        let page = slot & !0xfff;
        uc.mem_map(page, 0x1000, Prot::ALL).unwrap();
        uc.mem_write(page, &[0xcc; 0x1000]).unwrap();
    }
    // The emulator fetches at the new IP before it honours the instruction
    // count, so a branch to unmapped code would fault although the branch
    // itself completed. Map such pages on demand (filled with int3, never
    // executed): only the instruction under test runs.
    uc.add_mem_hook(HookType::MEM_FETCH_UNMAPPED, 1, 0, |uc, _, addr, _, _| {
        let page = addr & !0xfff;
        uc.mem_map(page, 0x1000, Prot::ALL).is_ok() && uc.mem_write(page, &[0xcc; 0x1000]).is_ok()
    })
    .unwrap();
    uc.mem_map(DATA, DATA_SIZE, Prot::READ | Prot::WRITE)
        .unwrap();
    uc.mem_map(STACK, STACK_SIZE, Prot::READ | Prot::WRITE)
        .unwrap();
    uc.mem_write(DATA, &m.data).unwrap();
    uc.mem_write(STACK, &m.stack).unwrap();
    for (addr, bytes) in code {
        uc.mem_write(*addr, bytes).unwrap();
    }
    load_regs(&mut uc, &m.regs);
    for (i, x) in m.xmm.iter().enumerate() {
        uc.reg_write_long(RegisterX86::XMM0 as i32 + i as i32, &x.to_le_bytes())
            .unwrap();
    }
    uc
}

fn load_regs(uc: &mut Unicorn<'static, ()>, regs: &Regs) {
    for (i, id) in GPR_IDS.iter().enumerate() {
        uc.reg_write(*id, regs[X86Reg::ALL[i]]).unwrap();
    }
    uc.reg_write(RegisterX86::RIP, regs.ip).unwrap();
    // The emulator does not model the debug trap; the single step is "run
    // one instruction". TF stays in the register file the runtime sees.
    uc.reg_write(RegisterX86::RFLAGS, regs.flags & !TF).unwrap();
}

fn read_regs(uc: &Unicorn<'static, ()>) -> Regs {
    let mut regs = Regs::default();
    for (i, id) in GPR_IDS.iter().enumerate() {
        regs[X86Reg::ALL[i]] = uc.reg_read(*id).unwrap();
    }
    regs.ip = uc.reg_read(RegisterX86::RIP).unwrap();
    regs.flags = uc.reg_read(RegisterX86::RFLAGS).unwrap();
    regs
}

fn snapshot(uc: &Unicorn<'static, ()>, regs: Regs) -> Machine {
    let mut xmm = [0u128; 16];
    for (i, x) in xmm.iter_mut().enumerate() {
        let b = uc
            .reg_read_long(RegisterX86::XMM0 as i32 + i as i32)
            .unwrap();
        *x = u128::from_le_bytes(b[..16].try_into().unwrap());
    }
    Machine {
        regs,
        xmm,
        data: uc.mem_read_as_vec(DATA, DATA_SIZE as usize).unwrap(),
        stack: uc.mem_read_as_vec(STACK, STACK_SIZE as usize).unwrap(),
    }
}

/// Runs exactly one instruction at the current RIP.
fn step_one(uc: &mut Unicorn<'static, ()>) -> Result<(), String> {
    let ip = uc.reg_read(RegisterX86::RIP).unwrap();
    uc.emu_start(ip, u64::MAX, 0, 1)
        .map_err(|e| format!("{e:?}"))
}

std::thread_local! {
    /// `StepOutcome::Repeat` answers seen by the last single-stepped run.
    pub static REPEATS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Upper bound on the iterations of one `rep` instruction in a test.
const MAX_REPEATS: usize = 64;

/// Runs the instruction `bytes` in place at `INSN_AT`.
pub fn run_in_place(m: &Machine, bytes: &[u8]) -> Outcome {
    let mut uc = emulator(m, &[(INSN_AT, bytes)]);
    for _ in 0..MAX_REPEATS {
        if let Err(e) = step_one(&mut uc) {
            return Outcome::Fault(e);
        }
        // A rep string instruction stops after each iteration in the
        // emulator, like under the trap flag; run it to completion.
        if uc.reg_read(RegisterX86::RIP).unwrap() != INSN_AT || !is_rep_string(bytes) {
            let regs = read_regs(&uc);
            return Outcome::Done(snapshot(&uc, regs));
        }
    }
    panic!("rep instruction did not finish in {MAX_REPEATS} iterations");
}

/// Whether `bytes` is a `rep`/`repe`/`repne` string instruction (these stop
/// after each iteration when stepped).
pub fn is_rep_string(bytes: &[u8]) -> bool {
    let ins = iced_x86::Decoder::with_ip(64, bytes, INSN_AT, 0).decode();
    ins.is_string_instruction()
        && (ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix())
}

/// Data memory view of the emulator for `emulate` and `finish_step`.
pub struct UcMem<'a>(pub &'a mut Unicorn<'static, ()>);

impl DataMemory for UcMem<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        self.0
            .mem_read(addr, buf)
            .map_err(|_| ProbeError::MemoryFault {
                addr,
                len: buf.len(),
            })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        // All or nothing: probe every byte's mapping before writing.
        let mut probe = vec![0u8; bytes.len()];
        self.read(addr, &mut probe)?;
        self.0
            .mem_write(addr, bytes)
            .map_err(|_| ProbeError::MemoryFault {
                addr,
                len: bytes.len(),
            })
    }
}

/// The fault an emulation reports when its stack access fails.
const EMULATED_FAULT: &str = "emulated memory fault";

/// Which way the backend completes the hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `emulate()` (only for emulated instructions).
    Emulate,
    /// XOL single-step from the given slot address, as `plan_xol` plans it
    /// (a step marker where the instruction falls through, else the trap
    /// flag).
    Step(u64),
    /// XOL single-step under the trap flag from the given slot address
    /// ([`X86_64::plan_xol_trap_flag`]), whatever the instruction.
    StepTrapFlag(u64),
    /// XOL boosted run from the given slot address.
    Boost(u64),
}

/// Runs `insn` through the backend. The original bytes at `INSN_AT` are
/// replaced by `int3` + the rest, as a probe leaves them.
pub fn run_via(m: &Machine, insn: &Insn, via: Via) -> Outcome {
    run_via_plan(m, insn, via, |_| {})
}

/// Like [`run_via`], with a hook that may tamper with the plan (to prove the
/// harness notices a wrong fixup).
pub fn run_via_plan(
    m: &Machine,
    insn: &Insn,
    via: Via,
    tamper: impl FnOnce(&mut rcu_registry::probes::arch::XolPlan),
) -> Outcome {
    let arch = X86_64;
    let mut patched = insn.bytes().to_vec();
    patched[0] = 0xcc;
    match via {
        Via::Emulate => {
            let mut uc = emulator(m, &[(INSN_AT, &patched)]);
            let mut regs = m.regs;
            let result = arch.emulate(insn, &mut regs, &mut UcMem(&mut uc));
            match result {
                Ok(()) => Outcome::Done(snapshot(&uc, regs)),
                Err(ProbeError::MemoryFault { .. }) => {
                    assert_eq!(regs, m.regs, "failed emulation changed registers");
                    Outcome::Fault(EMULATED_FAULT.into())
                }
                Err(e) => panic!("emulate failed: {e}"),
            }
        }
        Via::Step(slot) | Via::StepTrapFlag(slot) | Via::Boost(slot) => {
            let mut plan = match via {
                Via::StepTrapFlag(_) => arch.plan_xol_trap_flag(insn, slot),
                _ => arch.plan_xol(insn, slot),
            }
            .expect("plan");
            tamper(&mut plan);
            let mut uc = emulator(m, &[(INSN_AT, &patched), (slot, plan.slot_bytes())]);
            let mut regs = m.regs;
            let run = if matches!(via, Via::Boost(_)) {
                XolRun::Boosted
            } else {
                XolRun::SingleStep
            };
            let state = arch.prepare_step(&plan, run, &mut regs).expect("prepare");
            REPEATS.with(|r| r.set(0));
            load_regs(&mut uc, &regs);
            if let (XolRun::SingleStep, Some(marker)) = (run, plan.step_marker) {
                assert_eq!(regs.flags & TF, 0, "a marker step arms no trap flag");
                assert_eq!(regs.ip, plan.step_entry, "a step starts at its copy");
                return run_to_marker(&mut uc, &plan, marker, |now, uc| {
                    match arch.finish_step(&plan, &state, now, &mut UcMem(uc)) {
                        Ok(StepOutcome::Done) => {}
                        Ok(StepOutcome::Repeat) => panic!("Repeat from a marker step"),
                        Err(e) => panic!("finish_step failed: {e}"),
                    }
                });
            }
            let tf = regs.flags & TF;
            let slot_end = slot + plan.slot_bytes().len() as u64;
            for _ in 0..MAX_REPEATS {
                if let Err(e) = step_one(&mut uc) {
                    return Outcome::Fault(e);
                }
                let mut now = read_regs(&uc);
                match run {
                    XolRun::SingleStep => {
                        now.flags |= tf;
                        let before = now;
                        match arch.finish_step(&plan, &state, &mut now, &mut UcMem(&mut uc)) {
                            Ok(StepOutcome::Done) => return Outcome::Done(snapshot(&uc, now)),
                            Ok(StepOutcome::Repeat) => {
                                REPEATS.with(|r| r.set(r.get() + 1));
                                assert_eq!(now, before, "Repeat must not touch registers");
                                load_regs(&mut uc, &now);
                            }
                            Err(e) => panic!("finish_step failed: {e}"),
                        }
                    }
                    XolRun::Boosted => {
                        // Still inside the slot (the jump back, or a rep
                        // instruction between iterations): keep running.
                        if !(slot..slot_end).contains(&now.ip) {
                            return Outcome::Done(snapshot(&uc, now));
                        }
                    }
                }
            }
            panic!("XOL run did not complete in {MAX_REPEATS} steps");
        }
    }
}

/// Runs a step-marker plan from the IP loaded in `uc` (the step entry):
/// emulated instructions until the IP reaches `marker` (one per `rep`
/// iteration), never leaving the stepped copy; then the marker itself, which
/// must be an `int3` that traps with the IP just past it; then `finish` on
/// the registers the trap reports. A fault on the way is the run's outcome.
fn run_to_marker(
    uc: &mut Unicorn<'static, ()>,
    plan: &rcu_registry::probes::arch::XolPlan,
    marker: u64,
    finish: impl FnOnce(&mut Regs, &mut Unicorn<'static, ()>),
) -> Outcome {
    for _ in 0..MAX_REPEATS {
        let ip = uc.reg_read(RegisterX86::RIP).unwrap();
        if ip == marker {
            break;
        }
        assert!(
            (plan.step_entry..marker).contains(&ip),
            "a marker step left its copy: rip {ip:#x}, copy {:#x}..{marker:#x}",
            plan.step_entry
        );
        if let Err(e) = step_one(uc) {
            return Outcome::Fault(e);
        }
    }
    assert_eq!(
        uc.reg_read(RegisterX86::RIP).unwrap(),
        marker,
        "the step did not reach its marker in {MAX_REPEATS} steps"
    );
    let mut byte = [0u8];
    uc.mem_read(marker, &mut byte).unwrap();
    assert_eq!(byte[0], 0xcc, "the step marker is not an int3");
    // Execute the marker: an int3 reaches the interrupt hook as vector 3.
    let vector = std::rc::Rc::new(std::cell::Cell::new(None));
    let seen = std::rc::Rc::clone(&vector);
    let hook = uc
        .add_intr_hook(move |uc, intno| {
            seen.set(Some(intno));
            uc.emu_stop().unwrap();
        })
        .unwrap();
    let trapped = step_one(uc);
    uc.remove_hook(hook).unwrap();
    trapped.expect("the marker traps");
    assert_eq!(vector.get(), Some(3), "the marker raised #BP");
    let mut now = read_regs(uc);
    assert_eq!(now.ip, marker + 1, "int3 reports the byte after itself");
    finish(&mut now, uc);
    Outcome::Done(snapshot(uc, now))
}

/// The ways `insn` can be completed by the backend: emulation, or single-step
/// from a near and a far slot (as planned, and under the trap flag), plus
/// boosted runs when the plan allows.
pub fn ways(insn: &Insn) -> Vec<Via> {
    match insn.class {
        InsnClass::Emulated(_) => vec![Via::Emulate],
        _ => {
            let mut v = vec![
                Via::Step(SLOT_NEAR),
                Via::Step(SLOT_FAR),
                Via::StepTrapFlag(SLOT_NEAR),
            ];
            // Boosted from every slot whose plan allows it (a RIP-relative
            // operand is boostable only from a slot within its reach).
            for slot in [SLOT_NEAR, SLOT_FAR] {
                if X86_64.plan_xol(insn, slot).expect("plan").boostable {
                    v.push(Via::Boost(slot));
                }
            }
            v
        }
    }
}

/// Result of one differential check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Same final state both ways.
    Same,
    /// Faulted the same way both ways (not a proof of anything; counted).
    BothFault,
    /// The backend's run differs from the run in place.
    Differs(String),
}

/// Compares an in-place outcome with a backend outcome.
pub fn judge(native: &Outcome, probed: &Outcome, insn: &Insn, via: Via) -> Verdict {
    match (native, probed) {
        (Outcome::Done(a), Outcome::Done(b)) if a == b => Verdict::Same,
        // The same fault both ways: the slot copy faults like the original
        // (same emulator error), and an emulation refuses exactly when the
        // real instruction's stack write faults.
        (Outcome::Fault(a), Outcome::Fault(b)) if a == b => Verdict::BothFault,
        (Outcome::Fault(a), Outcome::Fault(b))
            if via == Via::Emulate
                && matches!(a.as_str(), "WRITE_UNMAPPED" | "WRITE_PROT")
                && b == EMULATED_FAULT =>
        {
            Verdict::BothFault
        }
        (a, b) => Verdict::Differs(describe(a, b, insn, via)),
    }
}

fn describe(a: &Outcome, b: &Outcome, insn: &Insn, via: Via) -> String {
    let head = format!(
        "instruction {:02x?} ({:?}) via {via:x?}:",
        insn.bytes(),
        insn.class
    );
    match (a, b) {
        (Outcome::Done(a), Outcome::Done(b)) => {
            let mut s = head;
            for r in X86Reg::ALL {
                if a.regs[r] != b.regs[r] {
                    s += &format!(" {r:?} {:#x} vs {:#x};", a.regs[r], b.regs[r]);
                }
            }
            if a.regs.ip != b.regs.ip {
                s += &format!(" rip {:#x} vs {:#x};", a.regs.ip, b.regs.ip);
            }
            if a.regs.flags != b.regs.flags {
                s += &format!(" rflags {:#x} vs {:#x};", a.regs.flags, b.regs.flags);
            }
            for i in 0..16 {
                if a.xmm[i] != b.xmm[i] {
                    s += &format!(" xmm{i} differs;");
                }
            }
            if a.data != b.data {
                s += " data memory differs;";
            }
            if a.stack != b.stack {
                s += " stack memory differs;";
            }
            s
        }
        (a, b) => format!("{head} in place {} / via backend {}", brief(a), brief(b)),
    }
}

fn brief(o: &Outcome) -> String {
    match o {
        Outcome::Done(m) => format!("completed (rip {:#x})", m.regs.ip),
        Outcome::Fault(e) => format!("faulted ({e})"),
    }
}

/// Loads `func` at `INSN_AT`, applies the backend's return hijack at its
/// entry, then runs it instruction by instruction until it returns (the IP
/// leaves the function). Returns the final state and the original return
/// address the hijack handed back.
pub fn run_hijacked(m: &Machine, func: &[u8], trampoline: u64) -> (Machine, u64) {
    let mut uc = emulator(m, &[(INSN_AT, func)]);
    let mut regs = m.regs;
    let original = X86_64
        .hijack_return(&mut regs, &mut UcMem(&mut uc), trampoline)
        .expect("hijack");
    load_regs(&mut uc, &regs);
    let end = INSN_AT + func.len() as u64;
    while (INSN_AT..end).contains(&uc.reg_read(RegisterX86::RIP).unwrap()) {
        step_one(&mut uc).expect("function runs");
    }
    let regs = read_regs(&uc);
    (snapshot(&uc, regs), original)
}
