//! The trap path's call graph: every piece of machine code the runtime's
//! trap path can reach through direct calls and jumps, found by
//! disassembling the running process's own code.
//!
//! # Why a walk
//!
//! A breakpoint in code the SIGTRAP handler runs before the thread's trap
//! flag is up, or on the missed path a nested trap takes, would trap again
//! inside the trap handler, and again, until the stack overflows. Naming that code by hand (a crate
//! prefix, a list of C functions) misses whatever the compiler decided to
//! call out of line: a `core` generic, a `memcpy` the optimiser introduced,
//! the implementation an IFUNC selected, a C library internal. The walk
//! instead reads the code that will actually run.
//!
//! # The walk
//!
//! Starting from the [`Root`]s, a worklist of code addresses is drained:
//!
//! - **An address inside a symbol** (the ELF extents of
//!   [`ProcessSymbols`]): the whole function is decoded linearly with
//!   iced-x86, start to end. x86_64 compilers keep jump tables in read-only
//!   data, not between instructions, so a linear sweep of an extent sees
//!   every instruction, including the targets of indirect jumps within the
//!   function (jump tables) that a control-flow walk could not follow.
//! - **An address with no symbol** (the internals of a stripped C library,
//!   PLT stubs): a recursive descent from that address: conditional
//!   branches are followed both ways, an unconditional jump to its target,
//!   a call to its callee *and* to the next instruction; a return, an
//!   unresolvable indirect jump, a breakpoint or an undefined instruction
//!   ends a path. What is refused is exactly the instructions decoded. Flow
//!   that reaches a symbol's extent becomes an edge to that function. A path
//!   never *falls through* into a function start listed in the unwind index
//!   (`fde_starts.rs`): that is what follows a call to a `noreturn` function
//!   in code without symbols, not code the call returns to.
//! - **Edges** are the targets of direct `call`, `jmp` and `jcc` (a tail
//!   call is a `jmp` out of the extent) and of *calls and jumps through a
//!   pointer slot that cannot change*: a RIP-relative memory operand whose
//!   slot lies on a read-only page (the GOT after RELRO: how Rust code calls
//!   the C library) or in a `.got`/`.got.plt` section (a C library's PLT:
//!   written by the loader only). The slot is read, so an IFUNC is followed
//!   to the implementation the loader selected, never to its resolver.
//! - **Code addresses put in a register** count as calls: `lea reg,
//!   [rip + f]` (a function pointer made here) and `mov reg, [rip + slot]`
//!   from a constant slot (LLVM hoists a GOT load out of a loop and then
//!   calls through the register, as the spin lock's back-off does with
//!   `sched_yield`). The later `call reg` cannot be resolved, the address
//!   can; following it may refuse a function that is only passed around,
//!   never one that is called.
//!
//! On arm64 the same walk decodes arm64 words instead (`callgraph/arm64.rs`:
//! `bl`, `b`, the conditional branches, and code addresses built with
//! `adr`, `adrp` + `add` or `adrp` + `ldr` from a constant slot, which is
//! how a GOT call and a PLT or IFUNC stub reach their target).
//!
//! # Where the walk stops, and why that is safe
//!
//! - **Indirect calls and jumps through registers or writable memory**
//!   (`dyn Trait` methods, `Box<dyn Fn>` handlers, function pointers) end
//!   the walk: their targets are not in the code. The runtime names the
//!   targets that run on the missed path as extra roots (the live
//!   registry's `TrapDispatcher` methods, the thread memory's `DataMemory`
//!   methods; see `refuse.rs`). What remains behind an indirect call is
//!   mostly user code (probe handlers, kretprobe entry and return
//!   handlers), which runs with the thread's trap flag set: a probe
//!   hit there is counted missed and completed by the missed path, which
//!   *is* walked, never recursed into. [`CallGraph::indirect_calls`] lists
//!   the sites; `refuse.rs` says why each one in the trap path is safe.
//! - **Paths that only lead to the end of the process** ([`dying_path`]:
//!   the panic machinery, `abort`, the runtime's own fatal-error report)
//!   are refused at their entry but not walked into. They run at most once,
//!   on the way to `abort`; walking them would refuse most of `std` (the
//!   panic hook formats, allocates, captures backtraces) including `malloc`
//!   and `core::fmt`, which are fair probe targets. The worst a probe in
//!   them can do is turn an abort message into a crash one call deeper.
//! - **Code that runs only with the thread's trap flag up** ([`flag_up`](fn@flag_up):
//!   the outer SIGTRAP handler's body, the kretprobe trampoline's return
//!   path) is not walked into either: a probe hit there is a nested trap,
//!   which takes the missed path (walked), so it may call the C library.
//! - **The standard access of a settled thread-local**
//!   ([`settled_tls`](fn@settled_tls)): every thread-local of this crate
//!   is a `TrapLocal` reached at the thread pointer plus an offset once
//!   `trap_tls.rs` has proven static TLS, before the walk; its out-of-line
//!   fallback (in a shared library, the loader's `__tls_get_addr`, which
//!   can allocate) then never runs, and is refused but not walked into.
//!   Not proven (an object loaded with `dlopen`), it is walked, and
//!   `__tls_get_addr` is a root (`refuse.rs`).
//! - Addresses outside the process's executable mappings (the XOL area's
//!   slots are anonymous mappings and never probed code) are skipped and
//!   counted.
//!
//! # Cost
//!
//! One walk per process, at runtime initialisation (off the hot path; the
//! result is cached by `refuse.rs`). It reads `/proc/self/maps` once, the
//! code of the functions it reaches, and the section headers of an object
//! whose GOT is writable (a lazily bound C library). [`WalkStats::elapsed`]
//! reports the time.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::{Duration, Instant};

#[cfg(target_arch = "x86_64")]
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, MemorySize, Mnemonic, OpKind};
use object::{Object, ObjectSection};

use super::maps::Maps;

#[cfg(target_arch = "aarch64")]
mod arm64;
#[cfg(target_arch = "x86_64")]
mod descend;
mod dying;
mod fde_starts;
mod flag_up;
mod settled_tls;

use crate::probes::runtime::in_process::read_text;
use crate::probes::runtime::symbols::ProcessSymbols;
pub use dying::dying_path;
pub use flag_up::{flag_up, FLAG_UP_ENTRIES};
pub use settled_tls::{settled_tls, DYNAMIC_TLS_ACCESS};

/// Instructions one descent into code without a symbol may decode. A C
/// library's largest stripped internal routines are a few thousand
/// instructions; this bounds a walk that ran into data by mistake.
pub const MAX_ANONYMOUS_INSNS: usize = 50_000;

/// Longest x86 instruction.
#[cfg(target_arch = "x86_64")]
const MAX_INSN: usize = 15;

/// Where a walk starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    /// An address in the root's code (its first instruction).
    pub addr: u64,
    /// What it is (for reports).
    pub what: &'static str,
}

/// One piece of code the walk reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reached {
    /// Its first byte: the symbol's start, or the entry the descent began at.
    pub start: u64,
    /// The symbol's demangled name, `None` for code without a symbol.
    pub name: Option<String>,
    /// The code refused for it, `[start, end)` runs: the symbol's extent, or
    /// the instructions a descent decoded.
    pub ranges: Vec<(u64, u64)>,
    /// The call or jump that first reached it; `None` for a root.
    pub via: Option<u64>,
    /// `Some(reason)` if it is refused but was not walked into
    /// ([`dying_path`], [`flag_up`](fn@flag_up)).
    pub stopped: Option<&'static str>,
}

impl Reached {
    /// Whether `addr` is in its refused code.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| s <= addr && addr < e)
    }
}

/// What one walk did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Functions with a symbol reached (walked or stopped at).
    pub symbols: usize,
    /// Descents into code without a symbol.
    pub anonymous: usize,
    /// Functions refused but not walked into ([`dying_path`],
    /// [`flag_up`](fn@flag_up)).
    pub stopped: usize,
    /// Instructions decoded.
    pub instructions: usize,
    /// Bytes of code refused.
    pub bytes: u64,
    /// Calls and jumps followed through a constant pointer slot (GOT, PLT).
    pub through_slots: usize,
    /// Code addresses taken in walked code (`lea reg, [rip + f]`, or a
    /// function pointer loaded from a constant slot into a register, as
    /// LLVM does to hoist a GOT load out of a loop): followed as calls.
    pub addresses_taken: usize,
    /// Indirect calls the walk could not follow (see the module docs).
    pub indirect_calls: usize,
    /// Indirect jumps the walk could not follow: jump tables inside swept
    /// functions (their targets are swept anyway) and pointer tail calls.
    pub indirect_jumps: usize,
    /// Edges to addresses outside every executable mapping.
    pub outside_text: usize,
    /// Paths in code without a symbol that would have fallen through into
    /// the next function (after a `noreturn` call) and were ended there.
    pub fallthrough_stops: usize,
    /// Descents cut at [`MAX_ANONYMOUS_INSNS`] (0 unless something is wrong).
    pub truncated: usize,
    /// Wall time of the walk.
    pub elapsed: Duration,
}

/// The result of a walk: every piece of code reached, by start address.
#[derive(Clone, Debug)]
pub struct CallGraph {
    reached: Vec<Reached>,
    indirect_calls: Vec<u64>,
    stats: WalkStats,
}

impl CallGraph {
    /// Walks the code reachable from `roots` (see the module docs).
    ///
    /// # Errors
    /// If `/proc/self/maps` cannot be read: without the memory map the walk
    /// cannot tell code from data.
    pub fn walk(symbols: &ProcessSymbols, roots: &[Root]) -> io::Result<CallGraph> {
        let started = Instant::now();
        let mut w = Walker {
            symbols,
            maps: Maps::read()?,
            starts: fde_starts::fde_starts(),
            got: HashMap::new(),
            by_start: HashMap::new(),
            decoded: HashSet::new(),
            queue: Vec::new(),
            out: Vec::new(),
            indirect_calls: Vec::new(),
            stats: WalkStats::default(),
        };
        w.queue.extend(roots.iter().map(|r| (r.addr, None)));
        while let Some((addr, via)) = w.queue.pop() {
            w.visit(addr, via);
        }
        let mut reached = w.out;
        reached.sort_by_key(|r| r.start);
        let mut stats = w.stats;
        stats.bytes = reached
            .iter()
            .flat_map(|r| &r.ranges)
            .map(|&(s, e)| e - s)
            .sum();
        stats.elapsed = started.elapsed();
        let mut indirect_calls = w.indirect_calls;
        indirect_calls.sort_unstable();
        Ok(CallGraph {
            reached,
            indirect_calls,
            stats,
        })
    }

    /// Every piece of code reached, by start address.
    pub fn reached(&self) -> &[Reached] {
        &self.reached
    }

    /// The addresses of the indirect calls the walk could not follow
    /// (module docs: where the walk stops), sorted.
    pub fn indirect_calls(&self) -> &[u64] {
        &self.indirect_calls
    }

    /// What the walk did.
    pub fn stats(&self) -> &WalkStats {
        &self.stats
    }

    /// The reached code containing `addr`.
    pub fn function_at(&self, addr: u64) -> Option<&Reached> {
        let at = self.reached.partition_point(|r| r.start <= addr);
        // Ranges of a descent may lie before its entry (a backward branch):
        // look at every candidate, nearest first, for those.
        self.reached[..at]
            .iter()
            .rev()
            .find(|r| r.contains(addr))
            .or_else(|| self.reached[at..].iter().find(|r| r.contains(addr)))
    }

    /// The chain of calls that reached `addr`'s code, innermost first, as
    /// `(call site, function start)`: how the trap path gets there.
    pub fn path_to(&self, addr: u64) -> Vec<(Option<u64>, u64)> {
        let mut out = Vec::new();
        let mut at = self.function_at(addr);
        while let Some(r) = at {
            if out.iter().any(|&(_, s)| s == r.start) {
                break;
            }
            out.push((r.via, r.start));
            at = r.via.and_then(|site| self.function_at(site));
        }
        out
    }
}

struct Walker<'a> {
    symbols: &'a ProcessSymbols,
    maps: Maps,
    /// Function starts from the unwind index, sorted.
    starts: Vec<u64>,
    /// `.got`/`.got.plt` extents per object (keyed by load bias), loaded on
    /// first need.
    got: HashMap<u64, Vec<(u64, u64)>>,
    /// Symbol start to index in `out`.
    by_start: HashMap<u64, usize>,
    /// Instruction starts decoded by descents (code without a symbol).
    decoded: HashSet<u64>,
    queue: Vec<(u64, Option<u64>)>,
    out: Vec<Reached>,
    indirect_calls: Vec<u64>,
    stats: WalkStats,
}

impl Walker<'_> {
    /// The end of the executable mapping holding `addr`.
    fn text_end(&self, addr: u64) -> Option<u64> {
        let m = self.maps.find(addr)?;
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        (m.prot & rx == rx).then_some(m.end)
    }

    fn visit(&mut self, addr: u64, via: Option<u64>) {
        let Some(text_end) = self.text_end(addr) else {
            self.stats.outside_text += 1;
            return;
        };
        match self.symbols.function_at(addr) {
            Some(f) => {
                if self.by_start.contains_key(&f.start) {
                    return;
                }
                let (start, end) = (f.start, (f.start + f.size).min(text_end.max(f.start)));
                let stopped = dying_path(&f.name)
                    .or_else(|| flag_up(&f.name))
                    .or_else(|| settled_tls(&f.name));
                self.by_start.insert(start, self.out.len());
                self.out.push(Reached {
                    start,
                    name: Some(f.name.clone()),
                    ranges: vec![(start, end)],
                    via,
                    stopped,
                });
                self.stats.symbols += 1;
                if stopped.is_some() {
                    self.stats.stopped += 1;
                } else {
                    self.sweep(start, end);
                }
            }
            None => {
                if !self.decoded.contains(&addr) {
                    self.descend(addr, via);
                }
            }
        }
    }

    /// Decodes `[start, end)` linearly and queues every edge out of it.
    #[cfg(target_arch = "x86_64")]
    fn sweep(&mut self, start: u64, end: u64) {
        let mut bytes = vec![0u8; (end - start) as usize];
        if read_text(start, &mut bytes).is_err() {
            return;
        }
        let mut decoder = Decoder::with_ip(64, &bytes, start, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut insn);
            self.stats.instructions += 1;
            if insn.is_invalid() {
                continue;
            }
            match insn.flow_control() {
                FlowControl::Call
                | FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch => {
                    if let Some(t) = near_target(&insn) {
                        if !(start..end).contains(&t) {
                            self.queue.push((t, Some(insn.ip())));
                        }
                    }
                }
                FlowControl::IndirectCall | FlowControl::IndirectBranch => {
                    self.indirect(&insn);
                }
                FlowControl::Next => {
                    if let Some(t) = self.address_taken(&insn) {
                        if !(start..end).contains(&t) {
                            self.queue.push((t, Some(insn.ip())));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The code address an ordinary instruction puts in a register, if any:
    /// `lea reg, [rip + code]`, or `mov reg, [rip + slot]` from a constant
    /// slot that holds a code address. Either may be called later through
    /// the register, which the walk cannot see; following the address as if
    /// it were called errs on the side of refusing.
    #[cfg(target_arch = "x86_64")]
    fn address_taken(&mut self, insn: &Instruction) -> Option<u64> {
        if insn.op0_kind() != OpKind::Register
            || insn.op1_kind() != OpKind::Memory
            || !insn.is_ip_rel_memory_operand()
        {
            return None;
        }
        let t = match insn.mnemonic() {
            Mnemonic::Lea => insn.ip_rel_memory_address(),
            Mnemonic::Mov if insn.memory_size() == MemorySize::UInt64 => {
                self.constant_slot(insn.ip_rel_memory_address())?
            }
            _ => return None,
        };
        self.text_end(t)?;
        self.stats.addresses_taken += 1;
        Some(t)
    }

    /// Follows an indirect call or jump through a constant slot, or counts
    /// it as unresolved.
    #[cfg(target_arch = "x86_64")]
    fn indirect(&mut self, insn: &Instruction) {
        if let Some(t) = self.slot_target(insn) {
            self.stats.through_slots += 1;
            self.queue.push((t, Some(insn.ip())));
        } else if insn.flow_control() == FlowControl::IndirectCall {
            self.stats.indirect_calls += 1;
            self.indirect_calls.push(insn.ip());
        } else {
            self.stats.indirect_jumps += 1;
        }
    }

    /// The pointer a `call`/`jmp qword ptr [rip + disp]` reads, if its slot
    /// cannot change (module docs).
    #[cfg(target_arch = "x86_64")]
    fn slot_target(&mut self, insn: &Instruction) -> Option<u64> {
        if insn.op0_kind() != OpKind::Memory || !insn.is_ip_rel_memory_operand() {
            return None;
        }
        self.constant_slot(insn.ip_rel_memory_address())
    }

    /// The pointer in `slot`, if the slot cannot change (module docs).
    fn constant_slot(&mut self, slot: u64) -> Option<u64> {
        let m = self.maps.find(slot)?;
        if m.prot & libc::PROT_READ == 0 {
            return None;
        }
        if m.prot & libc::PROT_WRITE != 0 && !self.in_got(slot) {
            return None;
        }
        let mut word = [0u8; 8];
        read_text(slot, &mut word).ok()?;
        Some(u64::from_le_bytes(word))
    }

    /// Whether `slot` is in a `.got` or `.got.plt` section of the object
    /// mapped around it (the loaded object with the greatest load bias not
    /// above it).
    #[cold]
    fn in_got(&mut self, slot: u64) -> bool {
        let Some((path, bias)) = self
            .symbols
            .objects()
            .iter()
            .filter(|(_, bias)| *bias <= slot)
            .max_by_key(|(_, bias)| *bias)
            .cloned()
        else {
            return false;
        };
        let sections = self
            .got
            .entry(bias)
            .or_insert_with(|| got_sections(&path, bias).unwrap_or_default());
        sections.iter().any(|&(s, e)| s <= slot && slot < e)
    }
}

/// The target of a direct near branch or call.
#[cfg(target_arch = "x86_64")]
fn near_target(insn: &Instruction) -> Option<u64> {
    matches!(
        insn.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
    .then(|| insn.near_branch_target())
}

/// Sorted, merged runs of `ranges`.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The run-time extents of an object's `.got` and `.got.plt` sections.
#[cold]
fn got_sections(path: &str, bias: u64) -> io::Result<Vec<(u64, u64)>> {
    let data = std::fs::read(path)?;
    let file =
        object::File::parse(&*data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(file
        .sections()
        .filter(|s| matches!(s.name(), Ok(".got" | ".got.plt")))
        .map(|s| {
            let start = s.address().wrapping_add(bias);
            (start, start + s.size())
        })
        .collect())
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn overlapping_and_touching_runs_merge() {
        assert_eq!(
            merge(vec![(10, 12), (0, 4), (4, 6), (11, 15), (20, 21)]),
            vec![(0, 6), (10, 15), (20, 21)]
        );
    }

    #[inline(never)]
    fn leaf(x: u64) -> u64 {
        std::hint::black_box(x) ^ 0x5a
    }

    #[inline(never)]
    fn caller(x: u64) -> u64 {
        leaf(std::hint::black_box(x)).wrapping_add(1)
    }

    #[test]
    fn a_walk_reaches_a_directly_called_function_and_records_the_call() {
        let symbols = ProcessSymbols::load().unwrap();
        let root = caller as fn(u64) -> u64 as usize as u64;
        let leaf_at = leaf as fn(u64) -> u64 as usize as u64;
        let g = CallGraph::walk(
            &symbols,
            &[Root {
                addr: root,
                what: "test",
            }],
        )
        .unwrap();
        let r = g.function_at(leaf_at).expect("the callee is reached");
        assert_eq!(r.start, leaf_at);
        let site = r.via.expect("reached through a call");
        assert!(g.function_at(site).is_some_and(|c| c.start == root));
        assert_eq!(
            g.path_to(leaf_at),
            vec![(Some(site), leaf_at), (None, root)]
        );
        assert_eq!(caller(1), (1 ^ 0x5a) + 1);
    }

    #[test]
    fn a_c_library_plt_call_is_followed_to_the_implementation_its_ifunc_selected() {
        let symbols = ProcessSymbols::load().unwrap();
        // SAFETY: dlsym with RTLD_DEFAULT and valid C strings; for an IFUNC
        // it returns the implementation the loader selected.
        let (strdup, memcpy) = unsafe {
            (
                libc::dlsym(libc::RTLD_DEFAULT, c"strdup".as_ptr()) as u64,
                libc::dlsym(libc::RTLD_DEFAULT, c"memcpy".as_ptr()) as u64,
            )
        };
        let g = CallGraph::walk(
            &symbols,
            &[Root {
                addr: strdup,
                what: "test",
            }],
        )
        .unwrap();
        assert!(g.stats().through_slots > 0, "{:?}", g.stats());
        assert!(
            g.function_at(memcpy).is_some(),
            "strdup's memcpy (through the C library's own PLT) was not followed: {:?}",
            g.stats()
        );
    }
}
