//! The one error type of the probe layer.
//!
//! # Policy
//!
//! Every bad input to a probe registry, an arch backend or a text memory is
//! answered with a [`ProbeError`] and **changes nothing**: no byte of text is
//! written, no registry state is published. The variants name the input that
//! was refused and carry the addresses and bytes a user needs to see why
//! (e.g. the bytes found where a breakpoint was to go when someone else
//! already patched the site).
//!
//! # Stability
//!
//! The enum is `#[non_exhaustive]`: new failure kinds are added as new
//! variants, existing ones keep their meaning. The same holds for
//! [`Unsupported`], the reason an instruction is refused.

use std::fmt;

/// Everything that can go wrong when validating, installing or removing a
/// probe, or when an arch backend plans or emulates an instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeError {
    /// `addr` is inside the instruction that starts at `insn_start` (found by
    /// decoding from the function's start), not at its first byte.
    NotOnInstructionBoundary {
        /// The refused probe address.
        addr: u64,
        /// Start of the instruction that contains `addr`.
        insn_start: u64,
    },
    /// The instruction at `addr` cannot be probed; `reason` says why.
    UnsupportedInstruction {
        /// Address of the refused instruction.
        addr: u64,
        /// Why the backend refuses it.
        reason: Unsupported,
    },
    /// `addr` is not a multiple of the architecture's instruction alignment.
    Misaligned {
        /// The refused address.
        addr: u64,
        /// The required alignment in bytes.
        align: u64,
    },
    /// The text at `addr` does not hold the bytes the caller expected: someone
    /// else patched it (or the caller's view is stale). Nothing was written.
    AlreadyPatched {
        /// Address of the checked range.
        addr: u64,
        /// The bytes the caller expected to replace.
        expected: CodeBytes,
        /// The bytes actually found there.
        found: CodeBytes,
    },
    /// Another probe registry's breakpoint is at `addr` (a kprobe where a
    /// uprobe was to go, or the other way round): two writers never share
    /// a byte. Nothing changed.
    HeldBy {
        /// The probed address.
        addr: u64,
        /// Who holds it, as the text memory names it (e.g. "a live kprobe
        /// registry").
        holder: String,
    },
    /// The same probe was registered twice.
    AlreadyRegistered {
        /// Where the probe is.
        site: ProbeSite,
    },
    /// Unregistration (or enable/disable) of a probe the registry does not hold.
    UnknownProbe {
        /// Where the caller said the probe is.
        site: ProbeSite,
    },
    /// A return probe (a kretprobe, or a uprobe with a return handler) must
    /// sit on the first instruction of a function: only there is the return
    /// address where the backend's hijack expects it. For uprobes both
    /// fields are file offsets.
    NotAtFunctionEntry {
        /// The refused address.
        addr: u64,
        /// The function's entry, when known.
        func_start: Option<u64>,
    },
    /// A kretprobe with `maxactive == 0` could never track a single call.
    MaxActiveZero,
    /// A uprobe's file offset is outside the mapping it was checked against.
    OffsetOutsideMapping {
        /// The refused file offset.
        offset: u64,
        /// First file offset covered by the mapping.
        start: u64,
        /// One past the last file offset covered by the mapping.
        end: u64,
    },
    /// A consumer (or probe) with neither a handler nor a return handler would
    /// never do anything when hit.
    NoHandler,
    /// A symbol resolver did not know `name`.
    UnknownSymbol {
        /// The symbol that was looked up.
        name: String,
    },
    /// A text memory could not read or write `len` bytes at `addr`.
    TextAccess {
        /// First byte of the refused access.
        addr: u64,
        /// Length of the refused access.
        len: usize,
        /// What failed.
        failure: TextFailure,
    },
    /// A patch whose expected old bytes and new bytes differ in length.
    PatchLengthMismatch {
        /// Length of the expected old bytes.
        expected: usize,
        /// Length of the new bytes.
        new: usize,
    },
    /// Emulation or a step fixup could not read or write data memory (for
    /// example the stack word a `push` or `call` stores).
    MemoryFault {
        /// First byte of the faulting access.
        addr: u64,
        /// Length of the faulting access.
        len: usize,
    },
    /// An arch backend was handed a plan or instruction it did not produce
    /// (for example an arm64 emulation on the x86_64 backend, or a boosted run
    /// of a plan that is not boostable).
    PlanMismatch {
        /// What did not match.
        what: &'static str,
    },
    /// No known function contains `addr`, so the instruction boundary cannot
    /// be checked by decoding from the function's start.
    NoFunction {
        /// The refused address.
        addr: u64,
    },
    /// A kretprobe was registered with a registry that has no return
    /// trampoline address configured.
    NoReturnTrampoline,
    /// The XOL slot allocator has no free slot (near `near`).
    XolExhausted {
        /// The probed address the slot was wanted for.
        near: u64,
    },
    /// The live runtime refuses to patch `addr`: it is code the trap path
    /// itself runs (`what` names it), where a breakpoint would trap again
    /// inside the trap handler.
    RefusedTarget {
        /// The refused address.
        addr: u64,
        /// What the code at `addr` is, e.g. `"the SIGTRAP handler"`.
        what: &'static str,
    },
    /// A `name + offset` target whose offset is not inside the function
    /// (`offset >= size`): it would land in whatever follows the function.
    OffsetPastEnd {
        /// The function named by the target.
        name: String,
        /// The function's size in bytes.
        size: u64,
        /// The refused offset.
        offset: u64,
    },
    /// The symbol `name` is defined in several loaded objects (listed by
    /// path, in load order): qualify it as `object:name`.
    AmbiguousSymbol {
        /// The symbol asked for (without qualifier).
        name: String,
        /// Paths of the objects that define it.
        objects: Vec<String>,
    },
    /// The text a probe site was prepared in is no longer mapped at `addr`:
    /// the object was unloaded (`dlclose`, `munmap`) and nothing or another
    /// mapping is there now. Nothing is written to such text; the site's
    /// probes can only be unregistered (see
    /// [`TextMemory::write_in`](crate::probes::text::TextMemory::write_in)).
    TextGone {
        /// The probed address.
        addr: u64,
    },
    /// The file of a uprobe target cannot be used: `failure` says why.
    TargetFile {
        /// The file, as it was opened.
        path: String,
        /// Why it cannot be used.
        failure: FileFailure,
    },
    /// A bare library name (no `/`) that none of the places the dynamic
    /// linker would look holds, for this process's ELF class and machine.
    LibraryNotFound {
        /// The name asked for, e.g. `libz.so.1`.
        name: String,
        /// Where it was looked for, in order.
        searched: Vec<String>,
    },
    /// The file defines no function `name` (in `.symtab` or `.dynsym`).
    SymbolNotInFile {
        /// The file searched.
        path: String,
        /// The symbol asked for.
        name: String,
    },
    /// `name` is defined at several addresses in one file (two local
    /// functions of that name, say): a probe would be a guess. Each is
    /// reachable by its file offset.
    DuplicateSymbol {
        /// The file.
        path: String,
        /// The symbol asked for.
        name: String,
        /// The file offsets of its definitions, ascending.
        offsets: Vec<u64>,
    },
    /// `name` is an IFUNC (`STT_GNU_IFUNC`, like `strlen` or `memcpy` in the
    /// C library): its address is a resolver that the dynamic linker calls
    /// once to pick the implementation every call then reaches. Which one
    /// it picks is known only in the running process, not from the file.
    IfuncSymbol {
        /// The file.
        path: String,
        /// The symbol asked for.
        name: String,
        /// File offset of the resolver (what `path:0x…` would probe).
        resolver_offset: u64,
    },
    /// A file offset outside every executable segment of the file.
    NotInCode {
        /// The file.
        path: String,
        /// The refused file offset.
        offset: u64,
    },
    /// A symbol whose address is not in the file part of an executable
    /// segment (a data symbol, or one in no loadable segment).
    SymbolNotInCode {
        /// The file.
        path: String,
        /// The symbol.
        name: String,
        /// Its virtual address as the file states it.
        vaddr: u64,
    },
}

/// Why the file of a uprobe target cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileFailure {
    /// An operating-system call failed (`op` names it, `errno` is its error;
    /// `ENOENT` for a path that does not exist).
    Os {
        /// The failing operation, e.g. `"open"`.
        op: &'static str,
        /// The OS error number.
        errno: i32,
    },
    /// Not a regular file (a directory, a device, a FIFO): never a
    /// library or an executable.
    NotRegularFile,
    /// Not an ELF file (no ELF magic, or an unknown class or byte order).
    NotElf,
    /// An ELF file whose headers or tables cannot be read.
    Malformed(String),
    /// An ELF file with no loadable segment (a relocatable object, a core
    /// file): nothing of it is ever mapped.
    NotLoadable,
}

/// Why an arch backend refuses to probe an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// The bytes do not decode to a valid instruction.
    Undecodable,
    /// The bytes end before the instruction does.
    Truncated,
    /// A breakpoint or debug trap instruction (x86 `int3`, `int1`, `into`;
    /// arm64 `brk`): probing it would confuse our own trap with the program's.
    Breakpoint,
    /// A system call or software interrupt (`syscall`, `sysenter`, `int n`,
    /// arm64 `svc`): it must not run from an XOL slot, the kernel may observe
    /// or restart at the slot's address.
    SystemCall,
    /// Only allowed at a higher privilege level (`hlt`, `cli`/`sti`,
    /// `in`/`out`, `mov cr`/`dr`, `lgdt`, arm64 `hvc`/`smc`...).
    Privileged,
    /// Raises an exception by design (`ud0`/`ud1`/`ud2`, arm64 `udf`, `hlt`).
    ExceptionGenerating,
    /// A far transfer or interrupt return (`jmp far`, `call far`, `retf`,
    /// `iret`): changes the code segment, no fixup can relocate it.
    FarTransfer,
    /// Reads or writes the trap flag used for single-stepping (`pushf`,
    /// `popf`): stepped under TF it would leak or lose the flag.
    TouchesTrapFlag,
    /// Delays the single-step trap past the next instruction (`mov ss`,
    /// `pop ss`), so the step would run beyond the XOL slot's instruction.
    InhibitsSingleStep,
    /// A transactional-memory region start (`xbegin`): its abort target is
    /// relative to the instruction and the breakpoint aborts it anyway.
    Transactional,
    /// A relative branch form the backend neither emulates nor relocates
    /// (x86 `loop`/`jrcxz`, 16-bit operand-size branches whose meaning
    /// differs between Intel and AMD).
    RelativeBranchForm,
    /// A PC-relative instruction with no free scratch register to rewrite it.
    NoScratchRegister,
    /// An exclusive load/store (arm64 `ldxr`/`stxr`...): the breakpoint trap
    /// clears the exclusive monitor, so the sequence would never succeed.
    Exclusive,
    /// The address lies inside an exclusive load/store sequence.
    InsideExclusiveSequence,
    /// A system instruction (arm64 `msr`/`mrs` of system state, barriers
    /// with side effects the XOL slot cannot reproduce...).
    System,
    /// Any other reason, spelled out.
    Other(&'static str),
}

/// Where a probe sits: the key a registry uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProbeSite {
    /// A kprobe-style probe on an address.
    Address(u64),
    /// A uprobe-style probe on a file offset.
    File {
        /// Device of the file.
        dev: u64,
        /// Inode of the file.
        inode: u64,
        /// Offset in the file.
        offset: u64,
    },
}

/// Why a text memory access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TextFailure {
    /// The range is not (entirely) inside the text memory.
    OutOfRange,
    /// An operating-system call failed (`op` names it, `errno` is its error).
    Os {
        /// The failing operation, e.g. `"mprotect"`.
        op: &'static str,
        /// The OS error number.
        errno: i32,
    },
    /// A failure injected by a test (see `Image::fail_writes_after`).
    Injected,
}

/// Up to [`CodeBytes::CAPACITY`] bytes of code, shown in hex by `Display`.
///
/// Errors carry code bytes by value so that they stay `Clone + Eq` and cost
/// no allocation; longer inputs are truncated (the length says how many were
/// kept).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CodeBytes {
    len: u8,
    bytes: [u8; CodeBytes::CAPACITY],
}

impl CodeBytes {
    /// The most bytes one value holds: an x86 instruction is at most 15.
    pub const CAPACITY: usize = 16;

    /// Copies at most [`CodeBytes::CAPACITY`] bytes of `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        let len = bytes.len().min(Self::CAPACITY);
        let mut out = CodeBytes {
            len: len as u8,
            bytes: [0; Self::CAPACITY],
        };
        out.bytes[..len].copy_from_slice(&bytes[..len]);
        out
    }

    /// The bytes held.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for CodeBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodeBytes[{self}]")
    }
}

impl fmt::Display for CodeBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ProbeSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeSite::Address(a) => write!(f, "address {a:#x}"),
            ProbeSite::File { dev, inode, offset } => {
                write!(f, "file (dev {dev:#x}, inode {inode}) offset {offset:#x}")
            }
        }
    }
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Unsupported::Undecodable => "the bytes are not a valid instruction",
            Unsupported::Truncated => "the instruction runs past the end of the given bytes",
            Unsupported::Breakpoint => "it is a breakpoint or debug trap instruction",
            Unsupported::SystemCall => "it is a system call or software interrupt",
            Unsupported::Privileged => "it is a privileged instruction",
            Unsupported::ExceptionGenerating => "it raises an exception by design",
            Unsupported::FarTransfer => "it is a far transfer or interrupt return",
            Unsupported::TouchesTrapFlag => {
                "it reads or writes the trap flag used for single-stepping"
            }
            Unsupported::InhibitsSingleStep => "it delays the single-step trap (mov/pop ss)",
            Unsupported::Transactional => "it starts a hardware transaction",
            Unsupported::RelativeBranchForm => {
                "it is a relative branch form that is neither emulated nor relocatable"
            }
            Unsupported::NoScratchRegister => {
                "no scratch register is free to rewrite its PC-relative operand"
            }
            Unsupported::Exclusive => "it is an exclusive load/store",
            Unsupported::InsideExclusiveSequence => {
                "it lies inside an exclusive load/store sequence"
            }
            Unsupported::System => "it is a system instruction",
            Unsupported::Other(s) => s,
        };
        f.write_str(s)
    }
}

impl fmt::Display for FileFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileFailure::Os { op, errno } => write!(
                f,
                "{op} failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            FileFailure::NotRegularFile => f.write_str("it is not a regular file"),
            FileFailure::NotElf => f.write_str("it is not an ELF file"),
            FileFailure::Malformed(what) => write!(f, "malformed ELF file: {what}"),
            FileFailure::NotLoadable => f.write_str("it has no loadable segment"),
        }
    }
}

impl fmt::Display for TextFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextFailure::OutOfRange => f.write_str("the range is outside the text memory"),
            TextFailure::Os { op, errno } => write!(f, "{op} failed with errno {errno}"),
            TextFailure::Injected => f.write_str("injected failure"),
        }
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NotOnInstructionBoundary { addr, insn_start } => write!(
                f,
                "address {addr:#x} is not on an instruction boundary: it is inside the \
                 instruction starting at {insn_start:#x}"
            ),
            ProbeError::UnsupportedInstruction { addr, reason } => {
                write!(f, "cannot probe the instruction at {addr:#x}: {reason}")
            }
            ProbeError::Misaligned { addr, align } => write!(
                f,
                "address {addr:#x} is misaligned: instructions are {align}-byte aligned"
            ),
            ProbeError::HeldBy { addr, holder } => {
                write!(f, "{addr:#x} already holds a breakpoint of {holder}")
            }
            ProbeError::AlreadyPatched {
                addr,
                expected,
                found,
            } => write!(
                f,
                "text at {addr:#x} was already patched by someone else: expected [{expected}], \
                 found [{found}]"
            ),
            ProbeError::AlreadyRegistered { site } => {
                write!(f, "a probe at {site} is already registered")
            }
            ProbeError::UnknownProbe { site } => {
                write!(f, "no probe at {site} is registered")
            }
            ProbeError::NotAtFunctionEntry { addr, func_start } => match func_start {
                Some(start) => write!(
                    f,
                    "a return probe must be at a function entry: {addr:#x} is not the entry \
                     {start:#x}"
                ),
                None => write!(
                    f,
                    "a return probe must be at a function entry: {addr:#x} is not one"
                ),
            },
            ProbeError::MaxActiveZero => {
                f.write_str("a kretprobe needs maxactive >= 1 (0 could never track a call)")
            }
            ProbeError::OffsetOutsideMapping { offset, start, end } => write!(
                f,
                "file offset {offset:#x} is outside the mapping of offsets \
                 [{start:#x}, {end:#x})"
            ),
            ProbeError::NoHandler => {
                f.write_str("a probe consumer needs a handler or a return handler")
            }
            ProbeError::UnknownSymbol { name } => write!(f, "unknown symbol `{name}`"),
            ProbeError::TextAccess { addr, len, failure } => write!(
                f,
                "text access of {len} bytes at {addr:#x} failed: {failure}"
            ),
            ProbeError::PatchLengthMismatch { expected, new } => write!(
                f,
                "patch of {new} new bytes over {expected} expected old bytes: lengths must match"
            ),
            ProbeError::MemoryFault { addr, len } => {
                write!(f, "data memory access of {len} bytes at {addr:#x} failed")
            }
            ProbeError::PlanMismatch { what } => {
                write!(f, "arch backend was given a plan it did not make: {what}")
            }
            ProbeError::NoFunction { addr } => write!(
                f,
                "no known function contains {addr:#x}: its instruction boundary cannot be checked"
            ),
            ProbeError::NoReturnTrampoline => {
                f.write_str("a kretprobe needs a registry with a return trampoline address")
            }
            ProbeError::XolExhausted { near } => {
                write!(
                    f,
                    "no free out-of-line execution slot for a probe at {near:#x}"
                )
            }
            ProbeError::RefusedTarget { addr, what } => {
                write!(f, "refusing to patch {addr:#x}: it is {what}")
            }
            ProbeError::OffsetPastEnd { name, size, offset } => write!(
                f,
                "offset {offset:#x} is past the end of `{name}` ({size:#x} bytes)"
            ),
            ProbeError::TextGone { addr } => write!(
                f,
                "the text at {addr:#x} is no longer the mapping the probe was armed in \
                 (unloaded or replaced)"
            ),
            ProbeError::AmbiguousSymbol { name, objects } => write!(
                f,
                "symbol `{name}` is defined in {} objects ({}): qualify it as `object:{name}`",
                objects.len(),
                objects.join(", ")
            ),
            ProbeError::TargetFile { path, failure } => {
                write!(f, "cannot use `{path}` as a probe target: {failure}")
            }
            ProbeError::LibraryNotFound { name, searched } => write!(
                f,
                "library `{name}` not found for this process's ELF class and machine \
                 (searched: {})",
                searched.join(", ")
            ),
            ProbeError::SymbolNotInFile { path, name } => {
                write!(f, "`{path}` defines no function `{name}`")
            }
            ProbeError::DuplicateSymbol {
                path,
                name,
                offsets,
            } => {
                write!(
                    f,
                    "`{name}` is defined {} times in `{path}`, at file offsets",
                    offsets.len()
                )?;
                for (i, o) in offsets.iter().enumerate() {
                    write!(f, "{}{o:#x}", if i == 0 { " " } else { ", " })?;
                }
                f.write_str(": probe one by its file offset")
            }
            ProbeError::IfuncSymbol {
                path,
                name,
                resolver_offset,
            } => write!(
                f,
                "`{name}` in `{path}` is an IFUNC: the implementation calls reach is chosen \
                 by the dynamic linker at run time, not known from the file (probe an \
                 implementation by name, or the resolver itself at `{path}:{resolver_offset:#x}`)"
            ),
            ProbeError::NotInCode { path, offset } => write!(
                f,
                "file offset {offset:#x} is outside every executable segment of `{path}`"
            ),
            ProbeError::SymbolNotInCode { path, name, vaddr } => write!(
                f,
                "`{name}` in `{path}` (address {vaddr:#x}) is not in an executable segment"
            ),
        }
    }
}

impl std::error::Error for ProbeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_address_and_the_found_bytes() {
        let e = ProbeError::AlreadyPatched {
            addr: 0x1000,
            expected: CodeBytes::new(&[0x55]),
            found: CodeBytes::new(&[0xcc]),
        };
        let s = e.to_string();
        assert!(
            s.contains("0x1000") && s.contains("[55]") && s.contains("[cc]"),
            "{s}"
        );
        let e = ProbeError::UnsupportedInstruction {
            addr: 0x20,
            reason: Unsupported::SystemCall,
        };
        assert_eq!(
            e.to_string(),
            "cannot probe the instruction at 0x20: it is a system call or software interrupt"
        );
    }

    #[test]
    fn code_bytes_keep_at_most_capacity_bytes() {
        let b = CodeBytes::new(&[1u8; 40]);
        assert_eq!(b.as_slice().len(), CodeBytes::CAPACITY);
        assert_eq!(CodeBytes::new(&[0xde, 0xad]).to_string(), "de ad");
    }
}
