//! Code the live runtime refuses to patch.
//!
//! # Why
//!
//! The SIGTRAP handler and the kretprobe trampoline's Rust half raise the
//! thread's trap flag before anything else (`in_trap.rs`). A trap that
//! finds it up is nested in the runtime's own work and takes the **missed
//! path**: the hit runs no handler, counts `nmissed` and completes its
//! displaced instruction. A breakpoint in code that path runs (the nested
//! handler's dispatch, the `Rcu` read, the lookup, step completion,
//! emulation, and whatever they call) would trap again inside it,
//! recursively, until the stack overflows; so would one in the few
//! instructions before the flag goes up. A breakpoint in the signal return
//! trampoline (`__restore_rt`) would trap on the way *out* of every signal
//! handler. A breakpoint in the kretprobe trampoline would trap with the
//! return address already replaced. [`refused_ranges`] lists that code;
//! [`InProcess`](crate::probes::runtime::InProcess) refuses any write that
//! overlaps it with [`ProbeError::RefusedTarget`](crate::probes::ProbeError)
//! and leaves the text unchanged.
//!
//! That code calls **no C-library function**: raw system calls
//! (`crate::sys`), `rep movsb` copies, no allocation, no drop of a value
//! whose drop glue could free. So the C library is not refused at all
//! (`tests/runtime_refuse.rs` checks the set: empty, but for the unwinder's
//! `_Unwind_Resume` as a dying-path entry; 53 exported
//! library functions were refused before, `free`, `calloc`, `mmap`,
//! `strlen`, `memcpy`, `clock_gettime` among them).
//!
//! The same holds on arm64, where the walk decodes arm64 code
//! (`callgraph/arm64.rs`) and there is no `__restore_rt` to refuse (signal
//! handlers return through the vDSO's trampoline, not patchable text); the
//! compiler's outline atomics (`__aarch64_*`), which every atomic
//! read-modify-write of the trap path calls, are among what it reaches.
//!
//! # How the trap path is found: a walk of the machine code
//!
//! The trap path is not named by hand: [`trap_path`] disassembles the
//! process's own code from the [`trap_path_roots`] and follows every direct
//! call and jump, tail calls, and calls through the GOT and PLT stubs into
//! other objects (to the implementation an IFUNC selected), as described in
//! [`callgraph`](super::callgraph). The roots are:
//!
//! - the SIGTRAP handler (it reaches the nested path, dispatch, step
//!   completion, the transient-breakpoint check and the chaining to a
//!   previous handler by direct calls);
//! - the kretprobe trampoline (its assembly calls the Rust half directly);
//! - `__restore_rt`, which every signal handler returns through;
//! - the loader's `__tls_get_addr`, when this crate is in a shared object
//!   whose thread-locals could not be settled in static TLS
//!   (`trap_tls.rs`): their standard access calls it through the
//!   `LocalKey`'s accessor, an indirect call the walk cannot follow;
//! - the targets of the indirect calls the nested path makes: the live
//!   registry's [`TrapDispatcher`] breakpoint, step and fault methods (the
//!   dispatcher table holds `&dyn TrapDispatcher`) and [`ThreadMemory`]'s
//!   [`DataMemory`] methods (the registry and the arch backend get the
//!   thread's memory as `&mut dyn DataMemory`).
//!
//! The walk **stops at the flag-up entries**
//! ([`callgraph::flag_up`](super::callgraph::flag_up)): the outer handler's
//! body and the trampoline's return path run only once the flag is up, and
//! may call the C library (a probe hit there is a nested trap). What they
//! share with the nested path is walked from there. The registry's
//! `on_return` is reached only past the trampoline's flag, so it is no
//! root.
//!
//! Nor does it follow the standard access of this crate's thread-locals
//! once they are settled in static TLS
//! ([`callgraph::settled_tls`](super::callgraph::settled_tls)): in a
//! shared library (the `rcu-trace` agent) that access is the loader's
//! `__tls_get_addr`, whose slow paths reach `malloc`, `realloc`, `free`,
//! the loader's lock and its error reporting (`strerror`, `getenv`). The
//! trap path reaches its thread-locals at the thread pointer plus an
//! offset instead (`sync/trap_local.rs`). Where static TLS cannot be proven
//! (the agent loaded with `dlopen`) the walk follows that access, and what
//! it reaches stays refused. [`explain`] (and
//! [`Live::explain_refusal`](super::Live::explain_refusal)) prints the chain
//! of calls by which the trap path reaches a refused address.
//!
//! The walk's result is computed once per process, at the first
//! [`Live`](super::Live) construction, and cached; [`trap_path`] gives its
//! size and the time it took.
//!
//! # What is refused
//!
//! - every function whose symbol names this crate (`rcu_registry::`): a
//!   belt over the walk's braces, covering crate code reached only through
//!   indirect calls (kretprobe entry hooks behind `dyn ReturnProbe`) or only
//!   past the trap flag;
//! - the SIGTRAP handler, the kretprobe trampoline, the text stores of
//!   [`poke`](super::poke) (the fault handler knows them by address) and
//!   `__restore_rt`, by address, even when the executable has no symbol
//!   table;
//! - everything the walk reached: whole functions where there is a symbol,
//!   the decoded instructions where there is none (a PLT stub,
//!   `__restore_rt` in a stripped C library);
//! - the entry functions of paths that only end the process (panics,
//!   `abort`, the runtime's fatal report, the unwinder's resume), refused
//!   but not walked into ([`callgraph::dying_path`](super::callgraph::dying_path)
//!   says why), and the flag-up entries (this crate's).
//!
//! # What is not refused, and why that is safe
//!
//! The walk stops at every indirect call it cannot resolve
//! ([`CallGraph::indirect_calls`] lists them; `tests/runtime_refuse.rs`
//! prints them by function). In this crate's trap path they are:
//!
//! - the dispatcher table's and the thread memory's `dyn` calls, whose
//!   targets are roots (above);
//! - user probe handlers and kretprobe entry hooks (`Box<dyn Fn>`,
//!   `dyn ReturnProbe`). They run with the thread's trap flag and the
//!   registry's handler flag up, so a probe hit there, or in anything they
//!   call, is counted missed and completed by the missed path (which is
//!   walked), never recursed into;
//! - the previous SIGTRAP handler, chained to for a trap that is not ours:
//!   foreign code, which a probe may hit once (the nested trap is ours and
//!   is not chained again).
//!
//! Also not refused:
//!
//! - code past a dying path's entry (the panic hook, formatting,
//!   allocation, backtraces): it runs at most once, on the way to `abort`;
//! - code past a flag-up entry (module docs above): `__errno_location`,
//!   `pthread_setspecific`, the kretprobe return path's spin-lock back-off
//!   (`sched_yield`), `catch_unwind`;
//! - trap dispatchers other than the live registry (a test's own attached
//!   with [`attach`](super::attach)): their methods are reached through the
//!   dispatcher table's `dyn` call and are not roots.
//!
//! # Limitations
//!
//! - A lazily bound GOT slot that was not yet resolved at the walk is
//!   followed to where it points then (the PLT's lazy path into the dynamic
//!   linker), not to the function it is later bound to. rustc links
//!   executables with `-z now`, so the trap path's slots are final by then.
//! - Code without a symbol is found by recursive descent, which stops at an
//!   indirect jump it cannot resolve.
//! - Breakpoints already in the code when the walk runs (someone else's)
//!   would derail the decoder at their address.
//! - The walk is static: it refuses what the code *can* call, not what it
//!   does call. That is why the trap path never drops a `ProbeError` (its
//!   drop glue can free a heap-owning variant the path never builds): the
//!   errors it meets are forgotten or handed to the fatal report.
//! - The boundary is by name: a flag-up entry renamed or inlined away
//!   would be walked into, and the test that every one is reached
//!   (`tests/runtime_refuse.rs`) fails.
//! - Libraries loaded after the walk (`dlopen`) are not walked: the trap
//!   path never calls into them.
//!
//! # What it costs
//!
//! Measured on `tests/runtime_refuse.rs` (2-core machine shared with other
//! builds), once per process, reading `/proc/self/maps` and the unwind
//! index included: release build 37 functions with symbols and 2 descents
//! (`__restore_rt`, a PLT stub), 2.9k instructions decoded, 14 KB refused,
//! about 19 ms; debug build (`opt-level = 1`, out-of-line `core` generics)
//! 73 functions. Before the trap path stopped calling the C library: 83
//! functions and 83 descents into C-library internals, 50 KB, in release.

use std::sync::OnceLock;

use super::callgraph::{flag_up, CallGraph, Root};
use super::context::ThreadMemory;
use super::dispatch::{StepStash, TrapDispatcher, Verdict};
use super::live::LiveRegistry;
use super::uprobes::LiveUprobes;
use crate::probes::arch::{DataMemory, Regs};
use crate::probes::runtime::in_process::RefusedRange;
use crate::probes::runtime::symbols::ProcessSymbols;
use crate::probes::ProbeError;

/// What each refused range is, for error messages.
pub const RUNTIME_CODE: &str = "the live probe runtime's own code (the trap path)";
/// See [`RUNTIME_CODE`].
pub const SIGTRAP_HANDLER: &str = "the runtime's SIGTRAP handler";
/// See [`RUNTIME_CODE`].
pub const KRETPROBE_TRAMPOLINE: &str = "the kretprobe return trampoline";
/// See [`RUNTIME_CODE`].
pub const SIGNAL_RETURN: &str = "the signal return trampoline (__restore_rt)";
/// See [`RUNTIME_CODE`]: a function outside this crate (`core`, `std`, the
/// C library) that the trap path calls, found by the walk.
pub const TRAP_PATH_CALLEE: &str = "code the trap path calls (found by walking its machine code)";
/// See [`RUNTIME_CODE`]: the entry of a path the trap path takes only on
/// its way to ending the process (refused, not walked into).
pub const DYING_PATH: &str = "a function the trap path calls only on its way to abort";
/// See [`RUNTIME_CODE`]: a function of the runtime that runs only with the
/// thread's trap flag up (refused, not walked into).
pub const FLAG_UP_ENTRY: &str = "the runtime's trap handling past its trap flag";
/// See [`RUNTIME_CODE`]: the live registry's and the thread memory's
/// methods the SIGTRAP handler reaches through `dyn` calls.
pub const TRAP_ENTRY: &str = "a trap-path entry reached through a dyn call";

/// See [`RUNTIME_CODE`]: the loader's thread-local access, which the trap
/// path calls when this crate is in a shared object whose thread-locals
/// could not be settled in static TLS (`trap_tls.rs`).
pub const LOADER_TLS_ACCESS: &str =
    "the loader's thread-local access (__tls_get_addr), which the trap path calls in a library without static TLS";

/// `__restore_rt` is `mov eax, 15; syscall` (9 bytes): refused in full even
/// when the C library has no symbol for it.
#[cfg(target_arch = "x86_64")]
const RESTORE_RT_BYTES: u64 = 9;

/// The range of the function at `addr` per `symbols`, else one byte.
fn extent(symbols: &ProcessSymbols, addr: u64) -> (u64, u64) {
    match symbols.function_at(addr) {
        Some(f) => (f.start, f.start + f.size),
        None => (addr, addr + 1),
    }
}

/// Where the walk of the trap path starts (see the module docs).
pub fn trap_path_roots() -> Vec<Root> {
    type OnBreakpoint =
        fn(&'static LiveRegistry, &mut Regs, &mut dyn DataMemory, &mut StepStash) -> Verdict;
    type OnFault = fn(&'static LiveRegistry, &mut Regs, &mut StepStash) -> bool;
    type Read = fn(&ThreadMemory, u64, &mut [u8]) -> Result<(), ProbeError>;
    type Write = fn(&mut ThreadMemory, u64, &[u8]) -> Result<(), ProbeError>;
    type ReadU64 = fn(&ThreadMemory, u64) -> Result<u64, ProbeError>;
    type WriteU64 = fn(&mut ThreadMemory, u64, u64) -> Result<(), ProbeError>;
    let on_breakpoint: OnBreakpoint = <LiveRegistry as TrapDispatcher>::on_breakpoint;
    let on_step: OnBreakpoint = <LiveRegistry as TrapDispatcher>::on_step;
    let on_fault: OnFault = <LiveRegistry as TrapDispatcher>::on_fault;
    // The live uprobes' dispatcher runs on the nested path too.
    type UpOnBreakpoint =
        fn(&'static LiveUprobes, &mut Regs, &mut dyn DataMemory, &mut StepStash) -> Verdict;
    type Claims<D> = fn(&'static D, u64) -> bool;
    let claims: Claims<LiveRegistry> = <LiveRegistry as TrapDispatcher>::claims;
    let read: Read = <ThreadMemory as DataMemory>::read;
    let write: Write = <ThreadMemory as DataMemory>::write;
    let read_u64: ReadU64 = <ThreadMemory as DataMemory>::read_u64;
    let write_u64: WriteU64 = <ThreadMemory as DataMemory>::write_u64;
    let mut roots = vec![
        Root {
            addr: super::signal::handler_address(),
            what: SIGTRAP_HANDLER,
        },
        Root {
            addr: super::trampoline::trampoline_address(),
            what: KRETPROBE_TRAMPOLINE,
        },
    ];
    {
        type UpOnFault = fn(&'static LiveUprobes, &mut Regs, &mut StepStash) -> bool;
        let up_on_breakpoint: UpOnBreakpoint = <LiveUprobes as TrapDispatcher>::on_breakpoint;
        let up_on_step: UpOnBreakpoint = <LiveUprobes as TrapDispatcher>::on_step;
        let up_on_fault: UpOnFault = <LiveUprobes as TrapDispatcher>::on_fault;
        let up_claims: Claims<LiveUprobes> = <LiveUprobes as TrapDispatcher>::claims;
        roots.extend(
            [
                up_on_breakpoint as usize,
                up_on_step as usize,
                up_on_fault as usize,
                up_claims as usize,
            ]
            .map(|addr| Root {
                addr: addr as u64,
                what: TRAP_ENTRY,
            }),
        );
    }
    roots.extend(
        [
            on_breakpoint as usize,
            on_step as usize,
            on_fault as usize,
            claims as usize,
            read as usize,
            write as usize,
            read_u64 as usize,
            write_u64 as usize,
        ]
        .map(|addr| Root {
            addr: addr as u64,
            what: TRAP_ENTRY,
        }),
    );
    // Thread-locals not settled in a shared object: their standard access
    // calls the loader (`trap_tls.rs`), through an indirect call the walk
    // cannot follow; so from here.
    if super::trap_tls::loader_on_trap_path() {
        // SAFETY: dlsym with RTLD_DEFAULT and a valid C string.
        let tls = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__tls_get_addr".as_ptr()) };
        if !tls.is_null() {
            roots.push(Root {
                addr: tls as u64,
                what: LOADER_TLS_ACCESS,
            });
        }
    }
    // arm64 returns from signal handlers through the vDSO's
    // `__kernel_rt_sigreturn` (qemu-user: its own signal trampoline page),
    // which is not in the process's symbols and not patchable text.
    #[cfg(target_arch = "x86_64")]
    if let Some(r) = super::signal::restorer_address() {
        roots.push(Root {
            addr: r,
            what: SIGNAL_RETURN,
        });
    }
    roots
}

static TRAP_PATH: OnceLock<CallGraph> = OnceLock::new();

/// The trap path's call graph: walked from [`trap_path_roots`] on first
/// use, then cached for the life of the process (the code it describes does
/// not change; libraries loaded later are not on the trap path).
///
/// # Panics
/// If `/proc/self/maps` cannot be read: the runtime cannot prove what it
/// must refuse (nor patch text at all: it restores protections from the
/// same file).
pub fn trap_path(symbols: &ProcessSymbols) -> &'static CallGraph {
    TRAP_PATH.get_or_init(|| {
        // Before the walk: whether the thread-locals' standard access
        // (the loader's `__tls_get_addr` in a shared library) is off the
        // trap path depends on it (`callgraph/settled_tls.rs`).
        super::trap_tls::settle();
        CallGraph::walk(symbols, &trap_path_roots())
            .expect("reading /proc/self/maps to walk the trap path")
    })
}

/// Every range the live runtime must never patch (see the module docs).
///
/// # Panics
/// As [`trap_path`].
pub fn refused_ranges(symbols: &ProcessSymbols) -> Vec<RefusedRange> {
    // Earlier entries name the range in errors when several overlap.
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
    // The text stores: the fault handler recognises them at their own
    // address only.
    let (s, e) = super::poke::range();
    out.push(RefusedRange {
        start: s,
        end: e,
        what: RUNTIME_CODE,
    });
    #[cfg(target_arch = "x86_64")]
    if let Some(r) = super::signal::restorer_address() {
        let (s, e) = extent(symbols, r);
        out.push(RefusedRange {
            start: s,
            end: e.max(r + RESTORE_RT_BYTES),
            what: SIGNAL_RETURN,
        });
    }
    for r in trap_path(symbols).reached() {
        let what = match (&r.stopped, &r.name) {
            (Some(_), Some(name)) if flag_up(name).is_some() => FLAG_UP_ENTRY,
            (Some(_), _) => DYING_PATH,
            (None, _) => TRAP_PATH_CALLEE,
        };
        out.extend(
            r.ranges
                .iter()
                .map(|&(start, end)| RefusedRange { start, end, what }),
        );
    }
    out
}

/// Why the runtime refuses to patch `addr`, as the chain of calls from a
/// trap-path root to the refused code, outermost first
/// (`root -> caller -> ... -> refused`), each named by its symbol, or by
/// its address (and the object holding it) when it has none. `None` if
/// the walk did not reach `addr` (it may still be refused for another
/// reason: this crate's own code, the signal return trampoline).
///
/// A diagnostic for a refusal that looks wrong ([`Live::explain_refusal`](super::Live::explain_refusal)):
/// it walks the trap path if that was not done yet (off the hot path).
///
/// # Panics
/// As [`trap_path`].
pub fn explain(symbols: &ProcessSymbols, addr: u64) -> Option<String> {
    let graph = trap_path(symbols);
    let chain = graph.path_to(addr);
    if chain.is_empty() {
        return None;
    }
    let roots = trap_path_roots();
    let name = |start: u64| match symbols.function_at(start) {
        Some(f) if f.start == start => f.name.clone(),
        Some(f) => format!("{}+{:#x}", f.name, start - f.start),
        None => {
            let object = symbols
                .objects()
                .iter()
                .filter(|(_, bias)| *bias <= start)
                .max_by_key(|(_, bias)| *bias)
                .map(|(path, bias)| format!(" ({path}+{:#x})", start - bias))
                .unwrap_or_default();
            format!("{start:#x}{object}")
        }
    };
    let mut parts: Vec<String> = chain
        .iter()
        .rev()
        .map(|&(_, start)| {
            let what = graph
                .function_at(start)
                .and_then(|r| r.stopped)
                .map(|why| format!(" [not walked into: {why}]"))
                .unwrap_or_default();
            format!("{}{what}", name(start))
        })
        .collect();
    if let Some(&(_, outer)) = chain.last() {
        if let Some(r) = roots.iter().find(|r| r.addr == outer) {
            parts[0] = format!("{} ({})", parts[0], r.what);
        }
    }
    Some(parts.join(" -> "))
}
