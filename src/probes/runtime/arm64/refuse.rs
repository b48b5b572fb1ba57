//! Code the live runtime refuses to patch, on arm64.
//!
//! # Why
//!
//! As on x86_64 (`runtime/refuse.rs`): a breakpoint in code the trap path
//! runs would trap again inside the SIGTRAP handler, recursively; one in
//! the kretprobe trampoline would trap with the return address already
//! replaced. [`refused_ranges`] lists that code and
//! [`InProcess`](crate::probes::runtime::InProcess) refuses any write that
//! overlaps it.
//!
//! # What is refused, and how it is found: by name
//!
//! - every function whose symbol names this crate (`rcu_registry::`);
//! - the SIGTRAP handler, the kretprobe trampoline and the text stores of
//!   `poke.rs`, by address (even without a symbol table);
//! - the compiler's helpers the trap path's own code calls, by name:
//!   the outline atomics (`__aarch64_cas8_acq_rel`, `__aarch64_ldadd4_relax`,
//!   ...: rustc's aarch64 Linux target calls them for every atomic
//!   read-modify-write, so the RCU read guard and every counter of the hit
//!   path go through them), and `memcpy`, `memmove` and `memset`, which
//!   code generation may call for a large move.
//!
//! # What is missing: the walk
//!
//! On x86_64 the trap path is not named by hand: the machine code is
//! walked from the handler (`runtime/callgraph.rs`), and whatever it can
//! reach is refused, `core` and `std` functions that were not inlined
//! included, and the walk proves that the path calls no C-library function.
//! The arm64 walk is not written yet (issue 16). Until it is, a function
//! of `core` or `std` that the trap path calls out of line, and that is
//! not listed above, can be probed, and a hit there would recurse until the
//! stack overflows. The list above is what the x86_64 walk found outside
//! this crate for the same Rust code, plus the arm64-only helpers.

use super::in_process::RefusedRange;
use super::symbols::ProcessSymbols;

/// What each refused range is, for error messages.
pub const RUNTIME_CODE: &str = "the live probe runtime's own code (the trap path)";
/// See [`RUNTIME_CODE`].
pub const SIGTRAP_HANDLER: &str = "the runtime's SIGTRAP handler";
/// See [`RUNTIME_CODE`].
pub const KRETPROBE_TRAMPOLINE: &str = "the kretprobe return trampoline";
/// See [`RUNTIME_CODE`]: a compiler helper the trap path calls.
pub const TRAP_PATH_HELPER: &str =
    "a compiler helper the trap path calls (outline atomics, memcpy, memset)";

/// Whether `name` is a helper the trap path's code calls (module docs).
pub fn is_trap_path_helper(name: &str) -> bool {
    name.starts_with("__aarch64_") || matches!(name, "memcpy" | "memmove" | "memset")
}

/// The range of the function at `addr` per `symbols`, else one instruction.
fn extent(symbols: &ProcessSymbols, addr: u64) -> (u64, u64) {
    match symbols.function_at(addr) {
        Some(f) => (f.start, f.start + f.size),
        None => (addr, addr + 4),
    }
}

/// Every range the live runtime must never patch (see the module docs).
pub fn refused_ranges(symbols: &ProcessSymbols) -> Vec<RefusedRange> {
    // Earlier entries name the range in errors when several overlap.
    let mut out: Vec<RefusedRange> = symbols
        .functions()
        .iter()
        .filter_map(|f| {
            let what = if f.name.contains("rcu_registry::") {
                RUNTIME_CODE
            } else if is_trap_path_helper(&f.name) {
                TRAP_PATH_HELPER
            } else {
                return None;
            };
            Some(RefusedRange {
                start: f.start,
                end: f.start + f.size,
                what,
            })
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
    // The text stores: the fault handler recognises them by address.
    let (s, e) = super::poke::range();
    out.push(RefusedRange {
        start: s,
        end: e,
        what: RUNTIME_CODE,
    });
    out
}
