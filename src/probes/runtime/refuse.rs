//! Code the live runtime refuses to patch.
//!
//! # Why
//!
//! A breakpoint in the code a trap runs before the registry's re-entrancy
//! flag is set (the SIGTRAP handler, the dispatcher table walk, the `Rcu`
//! read side, the registry's lookup) would trap again inside the trap
//! handler, recursively, until the stack overflows. A breakpoint in the
//! signal return trampoline (`__restore_rt`) would trap on the way *out* of
//! every signal handler. A breakpoint in the kretprobe trampoline would trap
//! with the return address already replaced. [`refused_ranges`] lists that
//! code; [`InProcess`](crate::probes::text::InProcess) refuses any write that
//! overlaps it with [`ProbeError::RefusedTarget`](crate::probes::ProbeError)
//! and leaves the text unchanged.
//!
//! # What is covered
//!
//! - every function whose symbol names this crate (`rcu_registry::`, which
//!   includes the monomorphized registry hit path, the `Rcu` read side, the
//!   arch backend's trap-time methods, the hashed spin locks kretprobes use,
//!   and the runtime itself);
//! - the SIGTRAP handler and the kretprobe trampoline, by address, even when
//!   the executable has no symbol table;
//! - `__restore_rt`, by the address the C library registered with our
//!   handler (`sa_restorer`);
//! - the C library functions the trap path calls (`memcpy`, `memmove`,
//!   `memset`, `memcmp`, `bcmp`, `syscall`, `getpid`, `process_vm_readv`,
//!   `__errno_location`, `raise`, `abort`, `write`, `sigaction`): their
//!   exported entry points and, through `dlsym`, the implementation an IFUNC
//!   selected (its whole extent when the library has a symbol table, else
//!   its first byte).
//!
//! # Limitation
//!
//! Generic functions of `core`/`std` that the trap path calls out of line
//! (rare in optimized builds: they are inlined) are not named after this
//! crate and are not refused, nor are C library internals behind the entry
//! points above when the library is stripped. Probing them from a handler's
//! thread can recurse. User probe handlers are *not* refused: a probe hit
//! inside a handler is counted as missed by the registry, never recursed
//! into.

use crate::probes::symbols::ProcessSymbols;
use crate::probes::text::RefusedRange;

/// What each refused range is, for error messages.
pub const RUNTIME_CODE: &str = "the live probe runtime's own code (the trap path)";
/// See [`RUNTIME_CODE`].
pub const SIGTRAP_HANDLER: &str = "the runtime's SIGTRAP handler";
/// See [`RUNTIME_CODE`].
pub const KRETPROBE_TRAMPOLINE: &str = "the kretprobe return trampoline";
/// See [`RUNTIME_CODE`].
pub const SIGNAL_RETURN: &str = "the signal return trampoline (__restore_rt)";
/// See [`RUNTIME_CODE`].
pub const LIBC_TRAP_PATH: &str = "a C library function the trap path calls";

/// C library functions the trap path may call.
const LIBC_FUNCTIONS: &[&str] = &[
    "memcpy",
    "memmove",
    "memset",
    "memcmp",
    "bcmp",
    "syscall",
    "getpid",
    "process_vm_readv",
    "__errno_location",
    "raise",
    "abort",
    "write",
    "sigaction",
    "__restore_rt",
];

/// The range of the function at `addr` per `symbols`, else one byte.
fn extent(symbols: &ProcessSymbols, addr: u64) -> (u64, u64) {
    match symbols.function_at(addr) {
        Some(f) => (f.start, f.start + f.size),
        None => (addr, addr + 1),
    }
}

/// Every range the live runtime must never patch (see the module docs).
pub fn refused_ranges(symbols: &ProcessSymbols) -> Vec<RefusedRange> {
    let mut out: Vec<RefusedRange> = symbols
        .functions()
        .iter()
        .filter(|f| f.name.contains("rcu_registry::"))
        .map(|f| RefusedRange {
            start: f.start,
            end: f.start + f.size,
            what: RUNTIME_CODE,
        })
        .collect();
    let (s, e) = extent(symbols, super::signal::handler_address());
    out.push(RefusedRange {
        start: s,
        end: e,
        what: SIGTRAP_HANDLER,
    });
    let (s, e) = super::trampoline::trampoline_range();
    out.push(RefusedRange {
        start: s,
        end: e,
        what: KRETPROBE_TRAMPOLINE,
    });
    if let Some(r) = super::signal::restorer_address() {
        let (s, e) = extent(symbols, r);
        out.push(RefusedRange {
            start: s,
            // `__restore_rt` is `mov eax, 15; syscall` (9 bytes) when the
            // library has no symbol for it.
            end: e.max(r + 9),
            what: SIGNAL_RETURN,
        });
    }
    for name in LIBC_FUNCTIONS {
        let what = if *name == "__restore_rt" {
            SIGNAL_RETURN
        } else {
            LIBC_TRAP_PATH
        };
        if let Some(f) = symbols.function(name) {
            out.push(RefusedRange {
                start: f.start,
                end: f.start + f.size,
                what,
            });
        }
        let c = std::ffi::CString::new(*name).expect("no NUL in a C function name");
        // SAFETY: dlsym with RTLD_DEFAULT and a valid C string; an IFUNC is
        // resolved to the implementation the loader selected.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) } as u64;
        if p != 0 {
            let (s, e) = extent(symbols, p);
            out.push(RefusedRange {
                start: s,
                end: e,
                what,
            });
        }
    }
    out
}
