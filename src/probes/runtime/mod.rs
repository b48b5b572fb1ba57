//! Live probes on the running process (x86_64 and arm64 Linux): real text
//! patching, trap dispatch from a SIGTRAP handler, out-of-line slots and
//! the kretprobe trampoline.
//!
//! The module is built on every Linux target; [`symbols`] (the process's
//! ELF symbols) is arch-neutral. The rest is built on x86_64 and arm64
//! (aarch64), behind the same API. On arm64
//! the breakpoint is `brk` (the trap reports its own address), every
//! single-step ends on the step-marker `brk` after the copy in its slot
//! (never the trap flag), a boosted copy jumps back with `b` (slots within
//! ±128 MiB of the code), code is written one atomic word at a time
//! followed by cache maintenance (`arm64/cache.rs`), and the hit path
//! below reads "`brk`" for "`int3`"; see `docs::limitations`, "arm64 under
//! qemu", for what the emulated tests prove.
//!
//! # The pieces
//!
//! - [`InProcess`] text memory (`in_process.rs`) writes
//!   breakpoints into the process's own code (checked, protection restored,
//!   cores synced, int3-first for multi-byte patches).
//! - The fault handlers (`faults.rs`) report a fault of a displaced
//!   instruction in its slot at the probed address.
//! - The SIGTRAP handler (`signal.rs`), installed once and chained to the
//!   previous disposition, converts the signal frame to [`Regs`] and offers
//!   each trap to the attached [`TrapDispatcher`]s (`dispatch.rs`) under an
//!   `Rcu` read guard: no allocation, no lock, no system call of its own.
//! - [`XolArea`] hands out executable slots within +/-2 GiB of the probed
//!   code (`xol.rs`).
//! - The kretprobe trampoline (`trampoline.rs`) runs return handlers without
//!   a trap.
//! - [`quiesce`] (`quiesce.rs`) waits until every thread has been seen
//!   outside the XOL slots being retired: `commit` calls it (through the
//!   area) so that it returns only when no thread is still in a boosted
//!   slot.
//! - `refuse.rs` lists the code that must never be patched;
//!   [`ProcessSymbols`](symbols::ProcessSymbols) resolves names
//!   (`symbols.rs`), and `maps.rs` reads `/proc/self/maps`.
//! - [`LoaderWatch`] (`loader.rs`) follows the dynamic linker's debugger
//!   rendezvous and tells its subscribers about every object loaded or
//!   unloaded, before a new object's constructors run.
//! - [`Live`] puts them together around a
//!   [`KprobeRegistry`](crate::probes::kprobe::KprobeRegistry).
//!
//! # A hit, end to end
//!
//! 1. A thread runs into the `int3`; the kernel delivers SIGTRAP
//!    (`si_code == SI_KERNEL`) with the IP just past it.
//! 2. The handler reads the registers from the signal frame and calls the
//!    registry's `on_breakpoint`, which finds the probe under its `Rcu` read
//!    guard and runs the pre handlers (or counts `nmissed` if the thread is
//!    already in a handler).
//! 3. The displaced instruction completes in one of four ways:
//!    - **emulated** (relative jumps and calls, `push`, `nop`): the backend
//!      applies its effect to the registers and the stack; resume after it;
//!    - **boosted** (no post handler, no fixup needed): resume in the XOL
//!      slot, which runs the instruction and jumps back: one trap per hit;
//!    - **single-step**: resume in the slot's stepped copy. An instruction
//!      that falls through runs into the `int3` step marker after it (a
//!      second `SI_KERNEL` SIGTRAP, recognised by its address as this step's
//!      end); one that may branch (`ret`, indirect `jmp`/`call`) runs with
//!      the trap flag set and the next instruction boundary raises SIGTRAP
//!      (`TRAP_TRACE`). Either way the registry then applies the fixups and
//!      runs the post handlers; two traps per hit;
//!    - **skipped**: a pre handler changed the IP; resume there.
//! 4. The handler writes the registers back into the signal frame;
//!    `rt_sigreturn` resumes the thread with them.
//!
//! For a kretprobe, step 2 also replaces the return address with the
//! trampoline; the function's `ret` lands in the trampoline, which calls the
//! return handlers and returns to the real caller.
//!
//! # A displaced instruction that faults
//!
//! An instruction that faults in place faults in its slot too. As Linux does
//! for uprobes (`arch_uprobe_abort_xol`), the runtime's handlers for SIGSEGV,
//! SIGBUS, SIGFPE and SIGILL (and the SIGTRAP handler, for a trap no probe
//! claims) report such a fault at the probed address: a single-step whose
//! copy faulted is abandoned (scratch register and trap flag restored, token
//! dropped, step popped: nothing in flight, no post handler), a boosted run
//! (remembered per thread by the SIGTRAP handler) gets its IP back, and the
//! signal then goes to the application's disposition as the kernel would
//! deliver it (`SIG_DFL` dies with the fixed frame). The handlers are put
//! back on top of any the application installed since at every registration
//! that takes an XOL slot, and by [`claim_fault_signals`]. `faults.rs` has
//! the details and the limits.
//!
//! # `fork()`
//!
//! A child process owns everything it inherits: the first [`Live`]
//! registers `pthread_atfork` handlers (`fork.rs`) that cover every `Live`.
//!
//! - **Slots**: the XOL chunks are shared memory (a `memfd` mapped twice),
//!   so before the fork each chunk is copied into a new memfd, and the
//!   child maps its copies over both views of every chunk: the child's
//!   slots are its own, at the same addresses with the same bytes, and
//!   neither process's unregistrations, recycling or refills reach the
//!   other. The trampoline is ordinary text (private after a fork).
//! - **Locks**: every lock the child may need (the registries' reclaim,
//!   writer and deferred-free mutexes, the kretprobe instance-table stripes
//!   (the pools are lock-free), the XOL areas, the text lock, the thread-exit table
//!   list, the quiescence and attach locks) is taken before the fork in one
//!   documented order and released in the parent and the child, as the C
//!   library does for `malloc`; the RCU domains survive by their own
//!   handler (`rcu/slots.rs`). The child can register, hit, unregister and
//!   commit.
//! - **Lost in the child**: what other threads had in flight (their
//!   kretprobe instances and single-steps; a site with a step in flight on
//!   another thread cannot be unregistered in the child). A `fork` from a
//!   probe handler or an `Rcu` read section takes no lock (it could
//!   deadlock with a grace period waiting for that section).
//! - **`exec`** replaces the process image: outside this scope (the slot
//!   memfds are close-on-exec).
//!
//! # Quick start
//!
//! ```no_run
//! use rcu_registry::probes::kprobe::{Action, Kprobe};
//! use rcu_registry::probes::runtime::Live;
//!
//! let live = Live::global();
//! let probe = Kprobe::symbol("my_crate::parse", 0)
//!     .pre(|_p, _regs| Action::Continue)
//!     .build();
//! live.registry().register(&probe).unwrap();
//! // ... the program runs; probe.hits() counts calls ...
//! live.registry().unregister(&probe).unwrap();
//! ```

// Arch-neutral (any Linux).
pub mod symbols;

// The live runtime on x86_64 and arm64. Most files serve both; where the
// architectures differ, the arm64 twin of a file sits in `arm64/` with the
// same interface (the signal frame, the trampoline) or is arm64's alone
// (cache maintenance).
#[cfg(target_arch = "aarch64")]
#[path = "arm64/cache.rs"]
mod cache;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod callgraph;
#[cfg(target_arch = "x86_64")]
mod context;
#[cfg(target_arch = "aarch64")]
#[path = "arm64/context.rs"]
mod context;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod dispatch;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod faults;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod fork;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod holders;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod in_process;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod in_trap;
#[cfg(target_arch = "x86_64")]
pub mod jump;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod live;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod loader;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod maps;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod poke;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod quiesce;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod refuse;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod signal;
#[cfg(target_arch = "x86_64")]
pub(crate) mod trampoline;
#[cfg(target_arch = "aarch64")]
#[path = "arm64/trampoline.rs"]
pub(crate) mod trampoline;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod trap_thread;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod trap_tls;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod uprobes;
#[cfg(target_arch = "x86_64")]
mod x87_state;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod xol;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use context::ThreadMemory;
#[cfg(target_arch = "aarch64")]
pub use context::{fpsimd, FpSimd, FPSIMD_MAGIC};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use dispatch::{
    attach, try_attach, Attachment, StepStash, TrapDispatcher, Verdict, MAX_DISPATCHERS,
    MAX_NESTED_STEPS,
};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use faults::claim_fault_signals;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use in_process::{InProcess, RefusedRange};
#[cfg(target_arch = "x86_64")]
pub use jump::{JumpOptimizer, JumpReport, OPTIMIZE_DELAY};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use live::{Live, LiveError, LiveRegistry};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use loader::{
    LoadSegment, LoadedObject, LoaderError, LoaderEvent, LoaderStats, LoaderSubscription,
    LoaderWatch, Rendezvous,
};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use quiesce::{quiesce, QuiesceReport, QUIESCE_TIMEOUT};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use signal::{install, is_installed};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use trampoline::trampoline_address;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use uprobes::{
    LiveUprobeRegistry, LiveUprobeStats, LiveUprobes, LiveUprobesError, ThisProcess,
};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub use xol::{XolArea, XolStats};

#[cfg(target_arch = "x86_64")]
#[allow(unused_imports)]
use crate::probes::arch::Regs;
