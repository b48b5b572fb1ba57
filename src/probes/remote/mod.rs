//! Uprobes in other processes, over `ptrace` (x86_64 Linux): no kernel
//! module, no BPF, no privilege beyond what `ptrace` itself needs.
//!
//! [`RemoteTracer`] starts a command ([`spawn`](RemoteTracer::spawn),
//! stopped at its first instruction so that probes are in place before
//! `main`) or attaches to a running process
//! ([`attach`](RemoteTracer::attach)); each traced process is a
//! [`RemoteSpace`] of one [`RemoteRegistry`], so one uprobe on a file is
//! installed in every traced process that maps it (consumers' filters choose
//! processes by [`SpaceId`](crate::probes::uprobe::SpaceId)). Its text is
//! written through `/proc/<pid>/mem` ([`RemoteMemory`], checked old bytes as
//! everywhere), its XOL slots live in an area the tracer maps inside it
//! ([`RemoteXol`]) near its code, with the uretprobe trampoline. The
//! tracer's loop ([`RemoteTracer::run`]) serves each stop through the
//! registry's hit path; how, and what follows the process's life (threads,
//! libraries loaded later, `fork`, `exec`, exit), is in [`tracer`]'s docs.
//!
//! [`load_library`] visits a running process instead of tracing it: it
//! stops it, borrows one of its threads at a safe point to `dlopen` a
//! library and call the library's init function, restores the thread and
//! lets the process go, untraced (how, and what remains a risk: [`load`]'s
//! docs). That is how an in-process agent gets into a process that was not
//! started with it; the agent then works without `ptrace`.
//!
//! Layer: beside the live runtime (`probes::runtime`), above the uprobe
//! registry; it uses neither the live runtime nor its signal handlers.
//! Where a hit and a registration go: `ARCHITECTURE.md`.

mod call;
mod colocate;
mod inject;
pub mod load;
mod mem;
mod ptrace;
mod regs;
mod repair;
mod safepoint;
mod scratch;
mod seize;
mod space;
mod spawn;
mod stops;
mod terminate;
mod threads;
pub mod tracer;
mod xol;

pub use load::{load_library, LoadedLibrary};
pub use mem::RemoteMemory;
pub use ptrace::Tid;
pub use safepoint::SafePoint;
pub use space::RemoteSpace;
pub use tracer::{
    serving_thread, ExitStatus, Refusal, RemoteError, RemoteRegistry, RemoteTracer, TracedThread,
};
pub use xol::{RemoteXol, REMOTE_XOL_CHUNK_BYTES};
