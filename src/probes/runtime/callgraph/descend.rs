//! Recursive descent into code without a symbol (the internals of a
//! stripped C library, PLT stubs).
//!
//! # The descent
//!
//! With no extent to sweep, the code is followed as the processor would:
//! from the entry, conditional branches both ways, an unconditional jump
//! to its target, a call to its callee (queued as an edge) *and* to the
//! next instruction. A path ends at a return, an indirect jump (a PLT
//! stub's `jmp [GOT]` is queued as an edge through its slot first), a
//! breakpoint or undefined instruction, an instruction already decoded,
//! flow into a function with a symbol (queued as an edge), or a fall-through
//! into a function start of the unwind index (after a `noreturn` call). The
//! instructions decoded are exactly what is refused.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction};

use super::{merge, near_target, Reached, Walker, MAX_ANONYMOUS_INSNS, MAX_INSN};
use crate::probes::runtime::in_process::read_text;

impl Walker<'_> {
    /// Recursive descent into code without a symbol, from `entry`.
    pub(super) fn descend(&mut self, entry: u64, via: Option<u64>) {
        self.stats.anonymous += 1;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut paths = vec![entry];
        let mut budget = MAX_ANONYMOUS_INSNS;
        'paths: while let Some(mut at) = paths.pop() {
            // Whether `at` follows the previous instruction in memory (as
            // opposed to being a branch target).
            let mut fell_through = false;
            loop {
                if self.decoded.contains(&at) {
                    continue 'paths;
                }
                if fell_through && self.starts.binary_search(&at).is_ok() {
                    self.stats.fallthrough_stops += 1;
                    continue 'paths;
                }
                if self.symbols.function_at(at).is_some() {
                    // Flowed into a function with a symbol: an edge.
                    self.queue
                        .push((at, ranges.last().map(|&(s, _)| s).or(via)));
                    continue 'paths;
                }
                let Some(text_end) = self.text_end(at) else {
                    self.stats.outside_text += 1;
                    continue 'paths;
                };
                if budget == 0 {
                    self.stats.truncated += 1;
                    break 'paths;
                }
                budget -= 1;
                let mut buf = [0u8; MAX_INSN];
                let n = MAX_INSN.min((text_end - at) as usize);
                if read_text(at, &mut buf[..n]).is_err() {
                    continue 'paths;
                }
                let mut decoder = Decoder::with_ip(64, &buf[..n], at, DecoderOptions::NONE);
                let insn = decoder.decode();
                self.stats.instructions += 1;
                if insn.is_invalid() {
                    continue 'paths;
                }
                self.decoded.insert(at);
                ranges.push((at, insn.next_ip()));
                match insn.flow_control() {
                    FlowControl::Next => {
                        if let Some(t) = self.address_taken(&insn) {
                            self.queue.push((t, Some(at)));
                        }
                    }
                    FlowControl::Call => {
                        if let Some(t) = near_target(&insn) {
                            self.queue.push((t, Some(at)));
                        }
                    }
                    FlowControl::IndirectCall => {
                        self.indirect(&insn);
                    }
                    FlowControl::ConditionalBranch => {
                        if let Some(t) = near_target(&insn) {
                            paths.push(t);
                        }
                    }
                    FlowControl::UnconditionalBranch => match near_target(&insn) {
                        Some(t) => {
                            at = t;
                            fell_through = false;
                            continue;
                        }
                        None => continue 'paths,
                    },
                    FlowControl::IndirectBranch => {
                        // A PLT stub's `jmp [GOT]` is followed as an edge;
                        // either way this path ends here.
                        self.indirect(&insn);
                        continue 'paths;
                    }
                    FlowControl::Interrupt if is_system_call(&insn) => {}
                    FlowControl::Return
                    | FlowControl::Interrupt
                    | FlowControl::Exception
                    | FlowControl::XbeginXabortXend => continue 'paths,
                }
                at = insn.next_ip();
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

/// `syscall`/`sysenter`: the kernel returns to the next instruction
/// (`rt_sigreturn`'s does not, which only adds the few bytes after it).
fn is_system_call(insn: &Instruction) -> bool {
    matches!(insn.code(), Code::Syscall | Code::Sysenter)
}
