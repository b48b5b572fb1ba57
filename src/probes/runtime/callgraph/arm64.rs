//! The walk's decoding on arm64: which instructions leave a piece of code,
//! and where to.
//!
//! # Edges
//!
//! Every instruction is one aligned word, so a linear sweep of a symbol's
//! extent sees every instruction (jump tables are in read-only data; a
//! literal word between functions decodes as something, at worst an edge
//! that refuses more). Edges are:
//!
//! - the targets of `bl` (a call), `b` (a jump: a tail call when it leaves
//!   the extent), `b.cond`, `cbz`/`cbnz`, `tbz`/`tbnz`;
//! - **code addresses built in a register**: `adr`, and `adrp` followed by
//!   `add` (a function pointer made here) or by `ldr` from a constant slot
//!   (a GOT entry: how code reaches another object, and how a PLT stub or
//!   a static binary's IFUNC stub, `adrp x16; ldr x17, [x16, #off]; br x17`,
//!   finds its target). Either may be called later through the register,
//!   which the walk cannot see; following the address as if it were called
//!   errs on the side of refusing. Only addresses where a function starts
//!   (a symbol's start, or an entry of the unwind index) count: a static
//!   binary keeps its read-only data in the executable segment, and the
//!   strings `adrp` + `add` builds are not code. A `br`/`blr` through a
//!   register whose value was so loaded is counted as a call through a
//!   slot.
//!
//! The register values are tracked per sweep or descent path, in program
//! order, without flow analysis: `adrp`, `add` and `ldr` of the forms above
//! set their destination, and any other instruction forgets the register
//! named in its bits 4..0 (the destination of nearly every arm64
//! instruction that writes one). A value kept too long can only add an
//! edge (more refused), never hide one: the instructions that do the
//! calling are walked regardless.
//!
//! Paths end at `ret`, `br` (after its slot edge), `eret`, `brk`, `hlt`,
//! `udf` and undecodable words; `svc` returns to the next instruction.

use super::{merge, Reached, Walker, MAX_ANONYMOUS_INSNS};
use crate::probes::runtime::in_process::read_text;

/// What one instruction does to the control flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// Falls through; may set a tracked register.
    Next,
    /// `bl target`.
    Call(u64),
    /// `b target`.
    Jump(u64),
    /// `b.cond`, `cbz`, `cbnz`, `tbz`, `tbnz`: to the target or the next.
    CondJump(u64),
    /// `blr xn` (and the authenticated forms).
    IndirectCall(u8),
    /// `br xn` (and the authenticated forms).
    IndirectJump(u8),
    /// `ret`, `eret`, `drps`, `brk`, `hlt`, `udf`: the path ends.
    End,
}

/// `field` (of `width` bits) sign-extended.
fn sext(field: u32, width: u32) -> i64 {
    let shift = 64 - width;
    ((u64::from(field) << shift) as i64) >> shift
}

/// `pc + offset`, as the hardware computes it.
fn rel(pc: u64, offset: i64) -> u64 {
    pc.wrapping_add(offset as u64)
}

/// The control flow of the instruction `w` at `pc`.
fn flow(w: u32, pc: u64) -> Flow {
    if w & 0xfc00_0000 == 0x9400_0000 {
        return Flow::Call(rel(pc, sext(w & 0x03ff_ffff, 26) * 4));
    }
    if w & 0xfc00_0000 == 0x1400_0000 {
        return Flow::Jump(rel(pc, sext(w & 0x03ff_ffff, 26) * 4));
    }
    if w & 0xff00_0010 == 0x5400_0000 {
        return Flow::CondJump(rel(pc, sext((w >> 5) & 0x7_ffff, 19) * 4));
    }
    if w & 0x7e00_0000 == 0x3400_0000 {
        return Flow::CondJump(rel(pc, sext((w >> 5) & 0x7_ffff, 19) * 4));
    }
    if w & 0x7e00_0000 == 0x3600_0000 {
        return Flow::CondJump(rel(pc, sext((w >> 5) & 0x3fff, 14) * 4));
    }
    if w & 0xfe00_0000 == 0xd600_0000 {
        // Unconditional branch (register): opc in bits 24..21.
        let rn = ((w >> 5) & 31) as u8;
        return match (w >> 21) & 0xf {
            0 | 8 => Flow::IndirectJump(rn),
            1 | 9 => Flow::IndirectCall(rn),
            _ => Flow::End,
        };
    }
    if w & 0xff00_0000 == 0xd400_0000 {
        // Exception generation: `svc` returns to the next instruction;
        // `brk`, `hlt`, `hvc`, `smc`, `dcps` end the path.
        return if w & 0xffe0_001f == 0xd400_0001 {
            Flow::Next
        } else {
            Flow::End
        };
    }
    if w >> 16 == 0 {
        // `udf #imm16`.
        return Flow::End;
    }
    Flow::Next
}

/// Register values known along one sweep or descent path (module docs).
#[derive(Default)]
struct Known {
    regs: [Option<u64>; 32],
    /// Registers whose value was loaded from a constant slot.
    from_slot: u32,
}

impl Walker<'_> {
    /// Applies `w` at `pc` to the known registers; returns a code address
    /// the instruction built in a register, if any (an edge).
    fn track(&mut self, known: &mut Known, w: u32, pc: u64) -> Option<u64> {
        let rd = (w & 31) as usize;
        let rn = ((w >> 5) & 31) as usize;
        let set = |known: &mut Known, v: Option<u64>, slot: bool| {
            known.regs[rd] = v;
            if slot {
                known.from_slot |= 1 << rd;
            } else {
                known.from_slot &= !(1 << rd);
            }
        };
        let imm_adr = || {
            let lo = (w >> 29) & 3;
            let hi = (w >> 5) & 0x7_ffff;
            sext(hi << 2 | lo, 21)
        };
        if w & 0x9f00_0000 == 0x9000_0000 {
            // adrp xd, page
            set(known, Some(rel(pc & !0xfff, imm_adr() << 12)), false);
            return None;
        }
        if w & 0x9f00_0000 == 0x1000_0000 {
            // adr xd, label
            let v = rel(pc, imm_adr());
            set(known, Some(v), false);
            return self.code_address(v);
        }
        if w & 0xff80_0000 == 0x9100_0000 {
            // add xd, xn, #imm{, lsl #12}
            let v = known.regs[rn].map(|b| {
                let imm = u64::from((w >> 10) & 0xfff) << if w & (1 << 22) != 0 { 12 } else { 0 };
                b.wrapping_add(imm)
            });
            set(known, v, false);
            return v.and_then(|v| self.code_address(v));
        }
        if w & 0xffc0_0000 == 0xf940_0000 {
            // ldr xt, [xn, #imm * 8]
            let v = known.regs[rn]
                .map(|b| b.wrapping_add(u64::from((w >> 10) & 0xfff) * 8))
                .and_then(|slot| self.constant_slot(slot));
            set(known, v, v.is_some());
            return v.and_then(|v| self.code_address(v));
        }
        if rd != 31 && flow(w, pc) == Flow::Next {
            set(known, None, false);
        }
        None
    }

    /// `addr` if it is the start of a function in executable code: a
    /// symbol's start, or a start in the unwind index. (Not merely any
    /// address in an executable mapping: a statically linked arm64 binary
    /// keeps its read-only data in the executable segment, and every string
    /// `adrp` + `add` builds would be followed into as code.)
    fn code_address(&mut self, addr: u64) -> Option<u64> {
        self.text_end(addr)?;
        let starts_function = self
            .symbols
            .function_at(addr)
            .is_some_and(|f| f.start == addr)
            || self.starts.binary_search(&addr).is_ok();
        if !starts_function {
            return None;
        }
        self.stats.addresses_taken += 1;
        Some(addr)
    }

    /// A `br`/`blr` through register `rn`: an edge if its value came from
    /// a constant slot, else an indirect call or jump the walk cannot
    /// follow.
    fn indirect_arm64(&mut self, known: &Known, rn: u8, call: bool, pc: u64) {
        let r = usize::from(rn);
        match known.regs[r] {
            Some(t) if known.from_slot & (1 << r) != 0 => {
                // Already queued when it was loaded; counted here.
                self.stats.through_slots += 1;
                self.queue.push((t, Some(pc)));
            }
            _ if call => {
                self.stats.indirect_calls += 1;
                self.indirect_calls.push(pc);
            }
            _ => self.stats.indirect_jumps += 1,
        }
    }

    /// Decodes `[start, end)` linearly and queues every edge out of it.
    pub(super) fn sweep(&mut self, start: u64, end: u64) {
        let mut bytes = vec![0u8; (end - start) as usize];
        if read_text(start, &mut bytes).is_err() {
            return;
        }
        let mut known = Known::default();
        let first = (start + 3) & !3;
        for (i, word) in bytes[(first - start) as usize..]
            .chunks_exact(4)
            .enumerate()
        {
            let pc = first + 4 * i as u64;
            let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            self.stats.instructions += 1;
            let inside = |t: u64| (start..end).contains(&t);
            match flow(w, pc) {
                Flow::Call(t) | Flow::Jump(t) | Flow::CondJump(t) => {
                    if !inside(t) {
                        self.queue.push((t, Some(pc)));
                    }
                }
                Flow::IndirectCall(rn) => self.indirect_arm64(&known, rn, true, pc),
                Flow::IndirectJump(rn) => self.indirect_arm64(&known, rn, false, pc),
                Flow::Next => {
                    if let Some(t) = self.track(&mut known, w, pc) {
                        if !inside(t) {
                            self.queue.push((t, Some(pc)));
                        }
                    }
                    continue;
                }
                Flow::End => {}
            }
            // A call clobbers the caller-saved registers; anything after a
            // branch may be reached from elsewhere.
            known = Known::default();
        }
    }

    /// Recursive descent into code without a symbol, from `entry` (as
    /// `descend.rs` does for x86_64).
    pub(super) fn descend(&mut self, entry: u64, via: Option<u64>) {
        self.stats.anonymous += 1;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut paths = vec![entry];
        let mut budget = MAX_ANONYMOUS_INSNS;
        'paths: while let Some(mut at) = paths.pop() {
            let mut fell_through = false;
            let mut known = Known::default();
            loop {
                if at % 4 != 0 || self.decoded.contains(&at) {
                    continue 'paths;
                }
                if fell_through && self.starts.binary_search(&at).is_ok() {
                    self.stats.fallthrough_stops += 1;
                    continue 'paths;
                }
                if self.symbols.function_at(at).is_some() {
                    self.queue
                        .push((at, ranges.last().map(|&(s, _)| s).or(via)));
                    continue 'paths;
                }
                if self.text_end(at).is_none() {
                    self.stats.outside_text += 1;
                    continue 'paths;
                }
                if budget == 0 {
                    self.stats.truncated += 1;
                    break 'paths;
                }
                budget -= 1;
                let mut word = [0u8; 4];
                if read_text(at, &mut word).is_err() {
                    continue 'paths;
                }
                let w = u32::from_le_bytes(word);
                self.stats.instructions += 1;
                self.decoded.insert(at);
                ranges.push((at, at + 4));
                match flow(w, at) {
                    Flow::Next => {
                        if let Some(t) = self.track(&mut known, w, at) {
                            self.queue.push((t, Some(at)));
                        }
                    }
                    Flow::Call(t) => {
                        self.queue.push((t, Some(at)));
                        known = Known::default();
                    }
                    Flow::IndirectCall(rn) => {
                        self.indirect_arm64(&known, rn, true, at);
                        known = Known::default();
                    }
                    Flow::CondJump(t) => paths.push(t),
                    Flow::Jump(t) => {
                        at = t;
                        fell_through = false;
                        continue;
                    }
                    Flow::IndirectJump(rn) => {
                        self.indirect_arm64(&known, rn, false, at);
                        continue 'paths;
                    }
                    Flow::End => continue 'paths,
                }
                at += 4;
                fell_through = true;
            }
        }
        if ranges.is_empty() {
            return;
        }
        self.out.push(Reached {
            start: entry,
            name: None,
            ranges: merge(ranges),
            via,
            stopped: None,
        });
    }
}
