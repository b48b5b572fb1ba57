//! [`RemoteTracer`]: uprobes in other processes, served over `ptrace`.
//!
//! # How a hit is served
//!
//! A traced thread executes a breakpoint and stops (a `SIGTRAP`
//! signal-delivery stop). The tracer reads its registers, asks the
//! registry ([`UprobeRegistry::on_breakpoint`], with the process's memory as
//! data memory), runs the consumers' handlers here, in the tracer (a
//! handler's changes to [`Regs`](crate::probes::arch::Regs) are written back), and resumes the thread
//! as the registry says: in the XOL slot, which jumps back by itself
//! (boosted: **one stop per hit**), after an emulation, or with a
//! single-step of the slot (a second stop). A return through the space's
//! trampoline runs the return handlers ([`UprobeRegistry::on_return`]).
//! Signals that are not ours go back to the thread unchanged; a group-stop
//! is left as a group-stop (`PTRACE_LISTEN`).
//!
//! # The process's life
//!
//! - **Libraries loaded later**: the registry registers its own uprobe on
//!   the dynamic linker's rendezvous function (`_dl_debug_state`, where
//!   `r_debug.r_brk` points; the loader calls it after every change of its
//!   link map, `dlopen`, `dlclose` and the libraries of the start-up alike).
//!   At each hit the process's executable file mappings are read again
//!   (`/proc/<pid>/maps`) and the differences fed to
//!   [`UprobeRegistry::on_mmap`] / [`on_munmap`](UprobeRegistry::on_munmap)
//!   while the thread that loaded them is still stopped: a uprobe
//!   registered before `dlopen` is in place before the library's
//!   constructors run.
//! - **Threads** are traced as they are created (`PTRACE_O_TRACECLONE`).
//!   Each has its own return stack for uretprobes ([`ProxyReturns`]): the
//!   registry keeps calls per calling thread, and this thread serves them
//!   all.
//! - **`fork`**: the child gets the parent's text, breakpoints included, and
//!   the forking thread's stack, hijacked return addresses included. The
//!   tracer writes back the original byte at every address ever probed in
//!   the space (a breakpoint removed from the parent after the `fork` is
//!   still in the child's copy) and the real return addresses, then follows
//!   the child as a process of its own or lets it go
//!   ([`follow_forks`](RemoteTracer::follow_forks)). A `vfork` child shares
//!   its parent's memory: it is served as one more thread of the parent's
//!   space until it `exec`s or exits.
//! - **`exec`**: the old space is forgotten; the new image is a new space,
//!   set up at the `exec` stop (its first instruction), and gets the
//!   uprobes of the files it maps.
//! - **Exit** and `kill -9`: the space's records are dropped (no byte to
//!   restore).
//!
//! Attaching seizes every thread and waits for each to stop (`seize.rs`,
//! shared with [`repair`](RemoteTracer::repair) and
//! [`load_library`](super::load_library), which visits a process without
//! staying).
//!
//! No `waitpid` waits on one thread: an exiting process's leader is
//! reported only once its other threads have been reaped, so a wait for a
//! given thread collects the others' stops for later (`stops.rs`).
//!
//! # Registering while the targets run, several tracer threads
//!
//! [`register`](RemoteTracer::register) and
//! [`unregister`](RemoteTracer::unregister) stop this tracer's threads
//! (`PTRACE_INTERRUPT`), change the registry and the text, and resume
//! them; stops that arrive meanwhile are kept and served by the next
//! [`run`](RemoteTracer::run). A new XOL chunk is mapped in the process
//! with an `mmap` made by one of its stopped threads (`inject.rs`).
//!
//! The kernel ties a tracee to the thread that attached it, so a tracer is
//! `!Send`; several tracers on several threads share one registry
//! ([`with_registry`](RemoteTracer::with_registry)): each serves the hits of
//! its own processes, concurrently, and a registration through any of them
//! is written into every process of every tracer while their threads run
//! and hit (the registry's ordering makes that safe, as for live code in
//! this process: the slot is written before the breakpoint, a trap on a
//! breakpoint removed meanwhile goes back to the instruction, and a freed
//! slot is only reused for its address). [`unregister_nosync`](RemoteTracer::unregister_nosync)
//! and [`commit`](RemoteTracer::commit) batch removals behind one grace
//! period.
//!
//! # Colocation
//!
//! A hit wakes the tracer, then the traced thread. On an idle machine each
//! wake-up may be an idle CPU's, which costs more than the rest of the
//! hit; [`colocate`](RemoteTracer::colocate) pins the tracer and every
//! thread it serves to one CPU (each thread's own affinity saved, and
//! written back when it is let go) and the tracer then blocks at once
//! instead of polling. It is opt-in: it changes the traced program
//! (`colocate.rs`).
//!
//! # Detach, termination, and a tracer that dies
//!
//! [`detach`](RemoteTracer::detach) stops the process, writes back every
//! original byte ([`UprobeRegistry::detach_space`]), steps any thread out of
//! an XOL slot, sends a thread stopped on the return trampoline on to its
//! caller and writes back the real return address of every call still in
//! flight, unmaps the XOL area (kept only if a signal was ever delivered to
//! a thread inside a slot: the handler's frame holds the slot's address),
//! and lets every thread go. Dropping a tracer detaches everything
//! ([`detach_all`](RemoteTracer::detach_all));
//! [`detach_on_termination`](RemoteTracer::detach_on_termination) makes
//! `SIGINT`, `SIGTERM` and `SIGHUP` do the same before `run` returns.
//!
//! A tracer killed with `SIGKILL` cannot detach. A command it spawned dies
//! with it (`PTRACE_O_EXITKILL`). A process it attached to is detached by
//! the kernel and runs on with every breakpoint in place (and, colocated,
//! pinned to the tracer's CPU: `taskset -a -p` restores it): the next one it
//! executes kills it with `SIGTRAP`, and so does the return of a call
//! tracked for its return handlers. To recover, stop it (`kill -STOP`) if
//! it can be stopped in time, call [`repair`](RemoteTracer::repair) from a
//! new tracer (the text is restored from its files; a hijacked return
//! address cannot be), then `kill -CONT`. The window is the time between
//! the tracer's death and the next breakpoint the process executes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::marker::PhantomData;
use std::process::Command;
use std::sync::Arc;

use super::colocate::Colocation;
use super::mem::RemoteMemory;
use super::ptrace::{self, Stop, Tid};
use super::regs;
use super::space::{file_mappings, RemoteSpace};
use super::stops::Stops;
use crate::probes::arch::StepOutcome;
use crate::probes::arch::X86_64;
use crate::probes::outcome::ReturnOutcome;
use crate::probes::procmaps::Maps;
use crate::probes::uprobe::{
    AddressSpace, CallInFlight, Consumer, ConsumerAction, FileMapping, ProxyReturns,
    ResolvedTarget, SpaceId, TargetResolver, UprobeFinished, UprobeKey, UprobeOutcome,
    UprobeRegistry, UprobeTarget,
};
use crate::probes::ProbeError;
use crate::rcu::Rcu;

/// The registry a [`RemoteTracer`] serves: one uprobe, every traced
/// process that maps its file.
pub type RemoteRegistry = UprobeRegistry<X86_64, RemoteSpace, Rcu>;

/// `si_code` of a breakpoint (`int3`) trap.
const SI_KERNEL: i32 = 0x80;
/// The dynamic linker's rendezvous function.
const RENDEZVOUS: &str = "_dl_debug_state";

/// `waitpid(WNOHANG)` polls before a blocking wait (see
/// `RemoteTracer::next_stop`): about 30-60 µs of polling at most.
const SPIN_POLLS: usize = 64;

/// Space ids, unique across the tracers that share a registry.
static NEXT_SPACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// Whether a loader consumer ran on this thread since its tracer last
    /// looked: the hit this thread just served was the loader's rendezvous
    /// (a hit of any tracer's loader consumer counts: it is this thread's
    /// hit).
    static LOADER_HIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };

    /// The traced thread whose stop this thread serves now
    /// ([`serving_thread`]).
    static SERVING: std::cell::Cell<Option<TracedThread>> = const { std::cell::Cell::new(None) };
}

/// A traced thread: its process and its own thread id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TracedThread {
    /// The process (its thread group id).
    pub pid: Tid,
    /// The thread.
    pub tid: Tid,
}

/// The traced thread whose hit or return the calling thread is serving:
/// `Some` inside a consumer's handler or return handler run by a
/// [`RemoteTracer`] (which runs them on its own thread, so a handler has
/// no other way to know whose call it sees), `None` anywhere else. For a
/// `vfork` child served in its parent's space, `pid` is the parent's.
/// A thread-local read: no system call, no allocation.
pub fn serving_thread() -> Option<TracedThread> {
    SERVING.with(|s| s.get())
}

/// Sets [`serving_thread`] for its lifetime (what it was is put back).
struct Serving(Option<TracedThread>);

impl Serving {
    fn enter(pid: Tid, tid: Tid) -> Serving {
        Serving(SERVING.with(|s| s.replace(Some(TracedThread { pid, tid }))))
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.with(|s| s.set(self.0));
    }
}

/// Why a remote operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RemoteError {
    /// A system call on the target failed: which, and why.
    Os {
        /// What was being done.
        what: String,
        /// The error.
        error: std::io::Error,
    },
    /// No such process (or it exited while being attached to).
    NoSuchProcess(Tid),
    /// The kernel refused to let this tracer attach, and why.
    NotPermitted {
        /// The process.
        pid: Tid,
        /// What stands in the way.
        why: Refusal,
    },
    /// The pid is not traced by this tracer.
    NotTraced(Tid),
    /// The pid is traced already.
    AlreadyTraced(Tid),
    /// The program (`what`: its path, or the process) is an ELF file for
    /// another machine than this tracer's (`e_machine`; 62 is x86_64).
    ForeignArchitecture {
        /// The program or process.
        what: String,
        /// Its ELF `e_machine`.
        machine: u16,
    },
    /// Setting up the traced process failed.
    Setup(ProbeError),
    /// The target resolves to no file the process maps
    /// ([`RemoteTracer::register_in`]).
    NotInProcess {
        /// The process.
        pid: Tid,
        /// The target, as written.
        target: String,
    },
    /// The registry or the resolver refused ([`RemoteTracer::register_in`]).
    Probe(ProbeError),
    /// The library to load ([`load_library`](super::load_library)) does
    /// not exist or is not a regular file.
    NoSuchLibrary {
        /// The path, as given.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The process maps no C library (or `libdl`) exporting `dlopen`,
    /// `dlerror` and `dlsym` (a statically linked program).
    NoLoader(Tid),
    /// No thread of the process came to a safe point to be borrowed for a
    /// load ([`load`](super::load), "Safe points"); nothing was called.
    NoSafePoint(Tid),
    /// `dlopen` failed in the process: `dlerror`'s message. Nothing was
    /// loaded.
    LoadFailed {
        /// The process.
        pid: Tid,
        /// The library.
        library: std::path::PathBuf,
        /// What `dlerror` said.
        message: String,
    },
    /// The init function is not a function the library exports.
    InitSymbolMissing {
        /// The library.
        library: std::path::PathBuf,
        /// The symbol.
        symbol: String,
        /// Whether the library stays loaded in the process: false when
        /// its file has no such function (found before the process was
        /// touched), true when `dlsym` did not find it after `dlopen` (a
        /// function local to the file).
        loaded: bool,
    },
    /// A function called in the process raised a fault: the thread was
    /// restored and let go, but what the call held (the loader's lock)
    /// stays held.
    CallFaulted {
        /// The process.
        pid: Tid,
        /// The fault's signal.
        signal: i32,
        /// Where.
        addr: u64,
    },
    /// The program received this signal (`SIGINT`, `SIGTERM` or `SIGHUP`)
    /// after [`RemoteTracer::detach_on_termination`]: every traced process
    /// was detached, as [`RemoteTracer::detach_all`] does.
    Terminated(i32),
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::Os { what, error } => write!(f, "{what}: {error}"),
            RemoteError::NoSuchProcess(pid) => write!(f, "no process {pid}"),
            RemoteError::NotPermitted { pid, why } => {
                write!(f, "not permitted to trace process {pid}: {why}")
            }
            RemoteError::NotTraced(pid) => write!(f, "process {pid} is not traced by this tracer"),
            RemoteError::AlreadyTraced(pid) => write!(f, "process {pid} is traced already"),
            RemoteError::ForeignArchitecture { what, machine } => write!(
                f,
                "{what} is built for ELF machine {machine}, not x86_64 (62)"
            ),
            RemoteError::Setup(e) => write!(f, "setting up the traced process: {e}"),
            RemoteError::NotInProcess { pid, target } => {
                write!(f, "{target} is in no file process {pid} maps")
            }
            RemoteError::Probe(e) => write!(f, "{e}"),
            RemoteError::NoSuchLibrary { path, error } => {
                write!(f, "no library {}: {error}", path.display())
            }
            RemoteError::NoLoader(pid) => write!(
                f,
                "process {pid} maps no C library exporting dlopen (statically linked?)"
            ),
            RemoteError::NoSafePoint(pid) => write!(
                f,
                "no thread of process {pid} came to a safe point to load a library"
            ),
            RemoteError::LoadFailed {
                pid,
                library,
                message,
            } => write!(
                f,
                "process {pid} could not load {}: {message}",
                library.display()
            ),
            RemoteError::InitSymbolMissing {
                library,
                symbol,
                loaded,
            } => write!(
                f,
                "{} exports no function {symbol}{}",
                library.display(),
                if *loaded {
                    " (the library stays loaded)"
                } else {
                    ""
                }
            ),
            RemoteError::CallFaulted { pid, signal, addr } => write!(
                f,
                "a call in process {pid} raised signal {signal} at {addr:#x}"
            ),
            RemoteError::Terminated(sig) => {
                write!(
                    f,
                    "terminated by signal {sig}: every traced process detached"
                )
            }
        }
    }
}

impl std::error::Error for RemoteError {}

pub(super) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RemoteError {
    let what = what.into();
    move |error| RemoteError::Os { what, error }
}

/// Why `ptrace` refused to attach (what `/proc` says about the target, read
/// after the kernel said `EPERM`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Another tracer traces it already (a debugger, `strace`, another
    /// tracer of this program): its thread id.
    OtherTracer(Tid),
    /// It runs as another user and this process may not trace it (no
    /// `CAP_SYS_PTRACE`): its real user id.
    OtherUser(u32),
    /// Yama's `kernel.yama.ptrace_scope` forbids it (the setting: 1, only
    /// descendants; 2, only with `CAP_SYS_PTRACE`; 3, never).
    PtraceScope(u8),
    /// None of those: a non-dumpable (setuid) process or a security
    /// module; the `errno`.
    Other(i32),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OtherTracer(t) => write!(f, "already traced by thread {t}"),
            Refusal::OtherUser(uid) => {
                write!(f, "it runs as user {uid} and this process may not trace it")
            }
            Refusal::PtraceScope(v) => write!(f, "kernel.yama.ptrace_scope is {v}"),
            Refusal::Other(e) => write!(f, "{}", std::io::Error::from_raw_os_error(*e)),
        }
    }
}

/// The ELF `e_machine` of `path` if it is an ELF file for another machine
/// than x86_64 (a script or an unreadable file: `None`, the `exec` says).
pub(super) fn foreign_machine(path: &std::path::Path) -> Option<u16> {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    let machine = u16::from_le_bytes([head[18], head[19]]);
    (head[..4] == *b"\x7fELF" && machine != EM_X86_64).then_some(machine)
}

/// ELF `e_machine` of x86_64.
const EM_X86_64: u16 = 62;

/// The error `spawn` carries for a program built for another machine.
#[derive(Debug)]
pub(super) struct ForeignMachine(pub(super) u16);

impl std::fmt::Display for ForeignMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ELF machine {}", self.0)
    }
}

impl std::error::Error for ForeignMachine {}

/// How a traced process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// One traced process.
struct Proc {
    space: Arc<RemoteSpace>,
    threads: BTreeSet<Tid>,
    /// The executable file mappings the registry was told of.
    maps: Vec<FileMapping>,
    /// Each thread's return stack (its uretprobe calls in flight): the
    /// registry's stacks are per calling thread, and this thread serves
    /// them all.
    returns: HashMap<Tid, ProxyReturns>,
    /// A signal was delivered to a thread inside an XOL slot: its handler's
    /// frame holds the slot's address, so the area stays mapped at detach.
    signal_in_slot: bool,
}

/// A tracer of other processes (see the [module docs](self)). It makes the
/// `ptrace` requests from the thread that created it, so it stays on that
/// thread:
///
/// ```compile_fail
/// fn send<T: Send>() {}
/// send::<rcu_registry::probes::remote::RemoteTracer>();
/// ```
///
/// (Without the bound the same check compiles:)
///
/// ```
/// fn any<T>() {}
/// any::<rcu_registry::probes::remote::RemoteTracer>();
/// ```
pub struct RemoteTracer {
    registry: Arc<RemoteRegistry>,
    resolver: TargetResolver,
    procs: BTreeMap<Tid, Proc>,
    /// Thread -> the process whose space it runs in (a `vfork` child runs
    /// in its parent's).
    owner: HashMap<Tid, Tid>,
    /// `vfork` children served in their parent's space until they `exec`.
    vforked: BTreeSet<Tid>,
    /// Threads in a group-stop (`SIGSTOP` and the like), left there with
    /// `PTRACE_LISTEN`: a stop of the world puts them back in it.
    group_stopped: BTreeSet<Tid>,
    /// Stops collected while the world was being stopped, served first.
    stops: Arc<Stops>,
    /// New threads and children whose first stop came before their
    /// creator's event: served when the event names them.
    early: HashMap<Tid, libc::c_int>,
    exits: BTreeMap<Tid, ExitStatus>,
    /// The tracer's own consumer on the loader's rendezvous (it raises
    /// [`LOADER_HIT`] on the thread that serves the hit).
    loader: Consumer,
    loader_files: BTreeSet<UprobeKey>,
    /// Whether `SIGINT`/`SIGTERM`/`SIGHUP` detach everything
    /// ([`detach_on_termination`](Self::detach_on_termination)).
    on_termination: bool,
    /// Whether `fork` children (and `vfork` children once they `exec`)
    /// are traced as processes of their own ([`follow_forks`](Self::follow_forks)).
    follow: bool,
    /// The tracer and its traced threads on one CPU
    /// ([`colocate`](Self::colocate)).
    coloc: Option<Colocation>,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for RemoteTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTracer")
            .field("processes", &self.procs.keys().collect::<Vec<_>>())
            .field("uprobes", &self.registry.len())
            .finish_non_exhaustive()
    }
}

/// Dropping a tracer detaches every process it traces
/// ([`detach_all`](RemoteTracer::detach_all)).
impl Drop for RemoteTracer {
    fn drop(&mut self) {
        self.detach_all();
        // A shared registry outlives this tracer: its loader consumer goes.
        for key in std::mem::take(&mut self.loader_files) {
            let _ = self.registry.unregister(key, &self.loader);
        }
        if self.on_termination {
            super::terminate::deregister();
        }
        self.stop_colocating();
    }
}

impl Default for RemoteTracer {
    fn default() -> Self {
        RemoteTracer::new()
    }
}

impl RemoteTracer {
    /// A tracer with no process and a registry of its own, with no uprobe.
    pub fn new() -> RemoteTracer {
        RemoteTracer::with_registry(Arc::new(UprobeRegistry::with_domain(X86_64, Rcu::new())))
    }

    /// A tracer with no process that serves `registry`, which other tracers
    /// (on other threads) may serve too: each traces its own processes and
    /// serves their hits on its own thread, concurrently; a uprobe
    /// registered through any of them, or through the registry itself, is
    /// installed in every process each of them traces (the registry's
    /// readers are the tracer threads' hits, its writers take its locks).
    ///
    /// A process's XOL area grows only through its own tracer (a new chunk
    /// is mapped by one of its stopped threads): a registration through
    /// another tracer uses the slots already mapped there (16,383 in the
    /// first chunk, plus those parked per address) and leaves a process
    /// whose slots are exhausted without that uprobe
    /// ([`ProbeError::XolExhausted`] counted by the registry for that space
    /// only).
    pub fn with_registry(registry: Arc<RemoteRegistry>) -> RemoteTracer {
        let loader = Consumer::new(|_, _| {
            LOADER_HIT.with(|h| h.set(true));
            ConsumerAction::Continue
        });
        RemoteTracer {
            registry,
            resolver: TargetResolver::new(),
            procs: BTreeMap::new(),
            owner: HashMap::new(),
            vforked: BTreeSet::new(),
            group_stopped: BTreeSet::new(),
            stops: Arc::default(),
            early: HashMap::new(),
            exits: BTreeMap::new(),
            loader,
            loader_files: BTreeSet::new(),
            on_termination: false,
            follow: false,
            coloc: None,
            _not_send: PhantomData,
        }
    }

    /// The registry (counts, `nmissed`, installs per space).
    pub fn registry(&self) -> &RemoteRegistry {
        &self.registry
    }

    /// The registry, to share with tracers on other threads
    /// ([`with_registry`](Self::with_registry)).
    pub fn shared_registry(&self) -> Arc<RemoteRegistry> {
        Arc::clone(&self.registry)
    }

    /// The space of traced process `pid`.
    pub fn space(&self, pid: Tid) -> Option<&Arc<RemoteSpace>> {
        self.procs.get(&pid).map(|p| &p.space)
    }

    /// The processes traced now.
    pub fn pids(&self) -> Vec<Tid> {
        self.procs.keys().copied().collect()
    }

    /// Whether every thread of traced process `pid` is in a group-stop
    /// (stopped by `SIGSTOP` or a terminal stop signal, as the tracer has
    /// seen it; left stopped until `SIGCONT`).
    pub fn group_stopped(&self, pid: Tid) -> bool {
        self.procs.get(&pid).is_some_and(|p| {
            !p.threads.is_empty() && p.threads.iter().all(|t| self.group_stopped.contains(t))
        })
    }

    /// How `pid` ended, once it has.
    pub fn exit_status(&self, pid: Tid) -> Option<ExitStatus> {
        self.exits.get(&pid).copied()
    }

    /// Starts `cmd` traced: at its first instruction (the `exec` stop) the
    /// uprobes of the files mapped so far (the program, the dynamic linker)
    /// are put in place, those of its libraries as the loader maps them;
    /// its stops are served by [`run`](Self::run). Its standard streams are
    /// this process's.
    ///
    /// # Errors
    /// The program cannot be found or started, or the process cannot be
    /// set up (nothing is left running).
    pub fn spawn(&mut self, cmd: &Command) -> Result<Tid, RemoteError> {
        let what = format!("{:?}", cmd.get_program());
        let pid = super::spawn::spawn(cmd).map_err(|e| {
            match e.get_ref().and_then(|i| i.downcast_ref::<ForeignMachine>()) {
                Some(m) => RemoteError::ForeignArchitecture {
                    what: what.clone(),
                    machine: m.0,
                },
                None => os(format!("starting {what}"))(e),
            }
        })?;
        if let Err(e) = self.adopt(pid, [pid].into()) {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = ptrace::wait(pid, 0);
            return Err(e);
        }
        // It runs from here; its stops wait for `run`.
        ptrace::cont(pid, 0).map_err(os(format!("resuming {pid}")))?;
        Ok(pid)
    }

    /// Attaches to the running process `pid` (every thread, with
    /// `PTRACE_SEIZE`), installs the uprobes of the files it maps, and lets
    /// it run on under [`run`](Self::run).
    ///
    /// # Errors
    /// [`RemoteError::NoSuchProcess`] (none, or it exited meanwhile),
    /// [`RemoteError::NotPermitted`] with the [`Refusal`] (another tracer,
    /// another user, `ptrace_scope`), [`RemoteError::AlreadyTraced`] (by
    /// this tracer); nothing is left stopped or patched.
    pub fn attach(&mut self, pid: Tid) -> Result<(), RemoteError> {
        if self.procs.contains_key(&pid) {
            return Err(RemoteError::AlreadyTraced(pid));
        }
        if let Some(machine) = foreign_machine(std::path::Path::new(&format!("/proc/{pid}/exe"))) {
            return Err(RemoteError::ForeignArchitecture {
                what: format!("process {pid}"),
                machine,
            });
        }
        let threads = self.seize_all(pid)?;
        if let Err(e) = self.adopt(pid, threads.clone()) {
            for &tid in &threads {
                let _ = ptrace::detach(tid, 0);
            }
            return Err(e);
        }
        for &tid in &threads {
            if !self.stops.has(tid) {
                ptrace::cont(tid, 0).map_err(os(format!("resuming {tid}")))?;
            }
        }
        Ok(())
    }

    /// Seizes every thread of `pid` and waits until each is stopped
    /// (`seize.rs`; the stops that are not the seizing interrupt are kept).
    /// On an error nothing stays seized.
    pub(super) fn seize_all(&mut self, pid: Tid) -> Result<BTreeSet<Tid>, RemoteError> {
        super::seize::seize_all(&self.stops, pid, ptrace::OPTIONS)
    }

    /// Every collected stop (for `repair.rs`), the queue left empty.
    pub(super) fn stops_take_all(&mut self) -> VecDeque<(Tid, libc::c_int)> {
        self.stops.take_all()
    }

    /// Puts stops back (for `repair.rs`).
    pub(super) fn stops_put_back(&mut self, older: VecDeque<(Tid, libc::c_int)>) {
        self.stops.put_back(older);
    }

    /// Waits for the interrupt stop of `tid`; another stop that comes first
    /// is kept for [`run`](Self::run) (the thread stays stopped).
    ///
    /// The interrupt's stop can be reported before a trap the thread has
    /// already taken: it executed a breakpoint or the return trampoline
    /// (its instruction pointer is past the `int3`) and the `SIGTRAP` is
    /// still queued. Left so, a detach would let it go one byte into an
    /// instruction, or step it through the trampoline's `int3`s. The
    /// thread is resumed for that signal, which the kernel takes before
    /// any instruction runs, and its trap stop is kept like any other.
    fn await_stop(&mut self, tid: Tid) -> Result<(), RemoteError> {
        let status = self
            .stops
            .wait_for(tid)
            .map_err(os(format!("waiting for {tid}")))?;
        if !matches!(
            ptrace::decode(status),
            Stop::Event {
                event: libc::PTRACE_EVENT_STOP,
                sig: libc::SIGTRAP,
            }
        ) {
            self.stops.push(tid, status);
            return Ok(());
        }
        if ptrace::pending_for_thread(tid, libc::SIGTRAP) && ptrace::cont(tid, 0).is_ok() {
            let status = self
                .stops
                .wait_for(tid)
                .map_err(os(format!("waiting for {tid}")))?;
            self.stops.push(tid, status);
        }
        Ok(())
    }

    /// Sets up the space of `pid` (stopped, `threads` traced): the XOL area
    /// near its executable, its mappings fed to the registry, the loader's
    /// rendezvous probed.
    fn adopt(&mut self, pid: Tid, threads: BTreeSet<Tid>) -> Result<(), RemoteError> {
        let maps = Maps::read_pid(pid).map_err(os(format!("reading /proc/{pid}/maps")))?;
        let near = file_mappings(&maps).first().map_or(0, |m| m.vaddr.start);
        // Relaxed: only uniqueness matters (the counter's modification
        // order gives it); nothing is published with the id.
        let id = SpaceId(NEXT_SPACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let tid = *threads.first().expect("a traced process has a thread");
        let space = Arc::new(
            RemoteSpace::new(id, pid, tid, near, &self.stops).map_err(RemoteError::Setup)?,
        );
        for &t in &threads {
            self.owner.insert(t, pid);
            if let Some(c) = &mut self.coloc {
                c.pin(t);
            }
        }
        self.procs.insert(
            pid,
            Proc {
                space,
                threads,
                maps: Vec::new(),
                returns: HashMap::new(),
                signal_in_slot: false,
            },
        );
        self.rescan(pid, tid);
        Ok(())
    }

    /// Reads `pid`'s executable file mappings again and tells the registry
    /// what changed (`tid`: a stopped thread of it, lent for a new XOL
    /// chunk). Probes the loader's rendezvous the first time its file is
    /// seen.
    fn rescan(&mut self, pid: Tid, tid: Tid) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let Ok(maps) = Maps::read_pid(pid) else {
            return;
        };
        let now = file_mappings(&maps);
        let space = Arc::clone(&p.space);
        let _lent = space.lender.lend(tid, &self.stops);
        for gone in p.maps.iter().filter(|m| !now.contains(m)) {
            self.registry.on_munmap(space.id(), gone.vaddr.clone());
        }
        for new in now.iter().filter(|m| !p.maps.contains(m)) {
            // A failed install (an unsupported instruction, someone else's
            // patch) leaves the others; the uprobe stays for later spaces.
            let _ = self.registry.on_mmap(&space, new.clone());
        }
        p.maps = now;
        let linkers: Vec<String> = maps
            .mappings
            .iter()
            .filter(|m| m.prot & libc::PROT_EXEC != 0 && is_dynamic_linker(&m.path))
            .map(|m| m.path.clone())
            .collect();
        for path in linkers {
            let target = UprobeTarget::symbol(path.as_str(), RENDEZVOUS);
            if let Ok(r) = self.resolver.resolve(&target) {
                if self.loader_files.insert(r.key()) {
                    let _ = self.registry.register(r.key(), &self.loader);
                }
            }
        }
    }

    /// Registers `consumer` on `target` as process `pid` sees it: a bare
    /// library name (`libc.so.6`) is looked up among the files `pid` maps
    /// (by file name or `DT_SONAME`, read through `/proc/<pid>/root`, so a
    /// process in another mount namespace, a container, gets its own
    /// library), and the file must be one `pid` maps now. Then as
    /// [`register`](Self::register): installed in every traced process that
    /// maps that file (consumers' filters choose processes).
    ///
    /// # Errors
    /// [`RemoteError::NotTraced`]; [`RemoteError::NotInProcess`] if the
    /// target resolves to no file `pid` maps; [`RemoteError::Probe`] as
    /// [`register`](Self::register). Nothing changes on an error.
    pub fn register_in(
        &mut self,
        pid: Tid,
        target: &UprobeTarget,
        consumer: &Consumer,
    ) -> Result<ResolvedTarget, RemoteError> {
        if !self.procs.contains_key(&pid) {
            return Err(RemoteError::NotTraced(pid));
        }
        let maps = Maps::read_pid(pid).map_err(os(format!("reading /proc/{pid}/maps")))?;
        let mapped: Vec<&crate::probes::procmaps::Mapping> = maps
            .mappings
            .iter()
            .filter(|m| m.prot & libc::PROT_EXEC != 0 && m.path.starts_with('/'))
            .collect();
        let mut paths: Vec<std::path::PathBuf> = mapped
            .iter()
            .map(|m| format!("/proc/{pid}/root{}", m.path).into())
            .collect();
        paths.dedup();
        let not_in = || RemoteError::NotInProcess {
            pid,
            target: target.to_string(),
        };
        let resolved = match TargetResolver::new().with_loaded(paths).resolve(target) {
            Ok(r) => r,
            Err(ProbeError::LibraryNotFound { .. }) => return Err(not_in()),
            Err(e) => return Err(RemoteError::Probe(e)),
        };
        let key = resolved.key();
        if !mapped
            .iter()
            .any(|m| m.device == key.file.dev && m.inode == key.file.inode)
        {
            return Err(not_in());
        }
        let stopped = self.stop_all();
        let r = {
            let _lent = self.lend_all(&stopped);
            match &resolved.function {
                Some(f) => self.registry.register_in_function(key, f.offset, consumer),
                None => self.registry.register(key, consumer),
            }
        };
        self.resume(&stopped);
        r.map(|()| resolved).map_err(RemoteError::Probe)
    }

    /// Registers `consumer` on `target` in every traced process that maps
    /// its file now or later. The traced processes are stopped for the
    /// change and resumed. A bare library name is looked up as this process
    /// would load it; [`register_in`](Self::register_in) looks it up as a
    /// traced process sees it.
    ///
    /// # Errors
    /// As [`UprobeRegistry::register`] and the resolver; nothing changes.
    pub fn register(
        &mut self,
        target: &UprobeTarget,
        consumer: &Consumer,
    ) -> Result<ResolvedTarget, ProbeError> {
        let resolved = self.resolver.resolve(target)?;
        let stopped = self.stop_all();
        let r = {
            let _lent = self.lend_all(&stopped);
            match &resolved.function {
                Some(f) => self
                    .registry
                    .register_in_function(resolved.key(), f.offset, consumer),
                None => self.registry.register(resolved.key(), consumer),
            }
        };
        self.resume(&stopped);
        r.map(|()| resolved)
    }

    /// Unregisters `consumer` from `key`; its breakpoints come out of every
    /// traced process (stopped for the change) when it was the last.
    ///
    /// # Errors
    /// As [`UprobeRegistry::unregister`].
    pub fn unregister(&mut self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        let stopped = self.stop_all();
        let r = self.registry.unregister(key, consumer);
        self.resume(&stopped);
        r
    }

    /// [`unregister`](Self::unregister) without waiting for a grace period
    /// of the registry: the breakpoints are out when it returns, but a hit
    /// that another tracer thread is serving may still run the consumer
    /// until [`commit`](Self::commit) returns.
    ///
    /// # Errors
    /// As [`UprobeRegistry::unregister_nosync`].
    pub fn unregister_nosync(
        &mut self,
        key: UprobeKey,
        consumer: &Consumer,
    ) -> Result<(), ProbeError> {
        let stopped = self.stop_all();
        let r = self.registry.unregister_nosync(key, consumer);
        self.resume(&stopped);
        r
    }

    /// Waits until no hit that began before it is still running a consumer
    /// unregistered with [`unregister_nosync`](Self::unregister_nosync)
    /// (one grace period of the registry, for any number of them).
    pub fn commit(&self) {
        self.registry.commit();
    }

    /// One stopped thread of every process lent to its space's XOL area.
    fn lend_all(&self, stopped: &[Tid]) -> Vec<super::xol::Lent<'_>> {
        self.procs
            .iter()
            .filter_map(|(pid, p)| {
                let t = stopped.iter().find(|t| self.owner.get(t) == Some(pid))?;
                Some(p.space.lender.lend(*t, &self.stops))
            })
            .collect()
    }

    /// Interrupts every traced thread not stopped already and waits for
    /// each; returns those it stopped (to resume).
    fn stop_all(&mut self) -> Vec<Tid> {
        let tids: Vec<Tid> = self
            .procs
            .values()
            .flat_map(|p| p.threads.iter().copied())
            .chain(self.vforked.iter().copied())
            .collect();
        let mut stopped = Vec::new();
        for tid in tids {
            // A thread with a stop collected (while waiting for the
            // others) is stopped already.
            if self.stops.has(tid) {
                continue;
            }
            if ptrace::interrupt(tid).is_ok() && self.await_stop(tid).is_ok() {
                // Stopped by our interrupt unless it left a stop pending.
                if !self.stops.has(tid) {
                    stopped.push(tid);
                }
            }
        }
        stopped
    }

    /// Lets the threads `stop_all` stopped go on: running ones resume, those
    /// that were in a group-stop go back to it.
    fn resume(&self, stopped: &[Tid]) {
        for &tid in stopped {
            let _ = match self.group_stopped.contains(&tid) {
                true => ptrace::listen(tid),
                false => ptrace::cont(tid, 0),
            };
        }
    }

    /// Serves stops until no traced process is left.
    ///
    /// # Errors
    /// `waitpid` fails for another reason than having no child;
    /// [`RemoteError::Terminated`] after
    /// [`detach_on_termination`](Self::detach_on_termination).
    pub fn run(&mut self) -> Result<(), RemoteError> {
        while !self.procs.is_empty() || !self.vforked.is_empty() {
            self.check_termination()?;
            self.serve_one(true)?;
        }
        Ok(())
    }

    /// Serves stops for `how_long` (or until no traced process is left).
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub fn run_for(&mut self, how_long: std::time::Duration) -> Result<(), RemoteError> {
        let end = std::time::Instant::now() + how_long;
        while (!self.procs.is_empty() || !self.vforked.is_empty())
            && std::time::Instant::now() < end
        {
            self.check_termination()?;
            if !self.serve_one(false)? {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// From now on, `SIGINT`, `SIGTERM` or `SIGHUP` sent to this program
    /// make [`run`](Self::run) and [`run_for`](Self::run_for) detach every
    /// traced process (every byte restored, no thread left in an XOL slot)
    /// and return [`RemoteError::Terminated`]; the program then exits as it
    /// likes. The handlers are process-wide and stay installed (they only
    /// record the signal: the program no longer dies of it by itself); a
    /// watcher thread wakes the tracer threads that asked (module
    /// `terminate.rs`), within about 10 ms of the signal.
    ///
    /// # Errors
    /// The handlers or the watcher thread could not be set up.
    pub fn detach_on_termination(&mut self) -> Result<(), RemoteError> {
        super::terminate::register().map_err(os("installing the termination handlers"))?;
        self.on_termination = true;
        Ok(())
    }

    /// Whether the children a traced process creates with `fork` are traced
    /// too (default: no). Either way a child starts with its parent's text
    /// cleaned: the inherited breakpoints replaced by the original bytes,
    /// the forking thread's calls in flight sent back to their callers
    /// (their return handlers do not run in the child). Followed, the child
    /// is then a process of its own, with a space of its own: the uprobes of
    /// the files it maps are installed in it before it runs its first
    /// instruction after `fork` (its inherited copy of the parent's XOL
    /// area stays mapped and unused). Not followed, it is let go untraced.
    /// A `vfork` child runs in its parent's space until it `exec`s; then,
    /// followed, its new image is traced like a spawned program's.
    pub fn follow_forks(&mut self, follow: bool) {
        self.follow = follow;
    }

    /// Opt-in colocation: pins this tracer thread, and every thread it
    /// traces (those traced now and those to come: new threads, children,
    /// new images), to one CPU, `cpu` or the one this thread runs on now.
    /// Returns the CPU.
    ///
    /// A remote hit is two wake-ups (the tracer's, at the stop; the traced
    /// thread's, at the resume). On separate CPUs each may be an idle
    /// CPU's; on one CPU each is a switch on the same run queue, and the
    /// tracer blocks at once instead of polling. Measured on this 2-vCPU
    /// guest, idle: a remote uprobe hit costs about half as much
    /// colocated (`BENCHMARKS.md`, benches/remote.rs). The price: the
    /// traced program's threads share one CPU with each other and the
    /// tracer while traced, so a program that needs its parallelism runs
    /// slower. It is a change to the traced program, hence never the
    /// default.
    ///
    /// Each thread's own affinity is saved when it is pinned (a new
    /// thread's or child's is its creator's) and written back when it is
    /// let go: [`detach`](Self::detach), a `fork` child not followed,
    /// [`stop_colocating`](Self::stop_colocating), or dropping the tracer,
    /// which also writes back the tracer thread's own. A thread that cannot
    /// be pinned (another user's, without `CAP_SYS_NICE`) runs where it
    /// ran. A tracer killed with `SIGKILL` leaves its processes pinned:
    /// `taskset -a -p <mask> <pid>` gives them their CPUs back. Calling it
    /// again moves everything to the new CPU (the saved affinities stay
    /// the ones from before the first call).
    ///
    /// # Errors
    /// [`RemoteError::Os`] if this thread could not run on `cpu` before
    /// colocation (its affinity or cpuset excludes it, or no such CPU):
    /// nothing changes, a colocation in place stays where it was.
    pub fn colocate(&mut self, cpu: Option<usize>) -> Result<usize, RemoteError> {
        let what = || format!("pinning the tracer to CPU {cpu:?}");
        match &mut self.coloc {
            Some(c) => c.move_to(cpu).map_err(os(what()))?,
            None => self.coloc = Some(Colocation::start(cpu).map_err(os(what()))?),
        }
        let cpu = self.coloc.as_ref().expect("set above").cpu();
        self.pin_all();
        Ok(cpu)
    }

    /// Pins every traced thread ([`colocate`](Self::colocate)).
    fn pin_all(&mut self) {
        let threads: Vec<Tid> = self.owner.keys().copied().collect();
        if let Some(c) = &mut self.coloc {
            for t in threads {
                c.pin(t);
            }
        }
    }

    /// The CPU of a [`colocate`](Self::colocate)d tracer.
    pub fn colocated(&self) -> Option<usize> {
        self.coloc.as_ref().map(|c| c.cpu())
    }

    /// Ends the [`colocate`](Self::colocate) of this tracer: every traced
    /// thread and the tracer thread get their own affinity back. Nothing if
    /// it was not colocated.
    pub fn stop_colocating(&mut self) {
        if let Some(c) = self.coloc.take() {
            c.end();
        }
    }

    /// Lets traced thread `tid` go (`PTRACE_DETACH`, delivering `sig`),
    /// its own CPU affinity written back first.
    fn let_go(&mut self, tid: Tid, sig: libc::c_int) {
        if let Some(c) = &mut self.coloc {
            c.restore(tid);
        }
        let _ = ptrace::detach(tid, sig);
    }

    /// [`RemoteError::Terminated`] (everything detached) if a termination
    /// signal came and this tracer asked to detach on it.
    fn check_termination(&mut self) -> Result<(), RemoteError> {
        match super::terminate::requested() {
            Some(sig) if self.on_termination => {
                self.detach_all();
                super::terminate::deregister();
                self.on_termination = false;
                Err(RemoteError::Terminated(sig))
            }
            _ => Ok(()),
        }
    }

    /// Detaches every traced process ([`detach`](Self::detach) each, the
    /// processes this tracer started included: they run on untraced).
    pub fn detach_all(&mut self) {
        for pid in self.pids() {
            let _ = self.detach(pid);
        }
        // vfork children whose parent is gone already.
        for tid in std::mem::take(&mut self.vforked) {
            self.owner.remove(&tid);
            self.let_go(tid, 0);
        }
    }

    /// Serves one stop (waiting for it if `block`); false if none came.
    fn serve_one(&mut self, block: bool) -> Result<bool, RemoteError> {
        let next = match self.stops.pop() {
            Some(s) => Some(s),
            None => match self.next_stop(block) {
                Ok(s) => s,
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    self.procs.clear();
                    self.vforked.clear();
                    if let Some(c) = &mut self.coloc {
                        c.forget_all();
                    }
                    return Ok(false);
                }
                Err(e) => return Err(os("waitpid")(e)),
            },
        };
        let Some((tid, status)) = next else {
            return Ok(false);
        };
        self.serve(tid, status);
        Ok(true)
    }

    /// The next stop of any tracee: polled (`WNOHANG`) up to
    /// [`SPIN_POLLS`] times before a blocking wait when `block`. A thread
    /// resumed from a hit usually stops again within microseconds; a
    /// tracer that went to sleep pays the wake-up of an idle CPU on top
    /// (measured on this 2-vCPU guest, idle: a bare stop round trip 18 µs
    /// blocking, 11-13 µs polling first).
    fn next_stop(&mut self, block: bool) -> std::io::Result<Option<(Tid, libc::c_int)>> {
        // Colocated, the thread that would stop waits for this CPU: no
        // polling.
        if block && self.coloc.is_none() {
            for _ in 0..SPIN_POLLS {
                if let Some(s) = ptrace::wait_interruptible(libc::WNOHANG)? {
                    return Ok(Some(s));
                }
            }
        }
        ptrace::wait_interruptible(if block { 0 } else { libc::WNOHANG })
    }

    fn serve(&mut self, tid: Tid, status: libc::c_int) {
        let Some(&pid) = self.owner.get(&tid) else {
            // A new thread or child whose creator's event has not come yet.
            self.early.insert(tid, status);
            return;
        };
        let stop = ptrace::decode(status);
        if !matches!(
            stop,
            Stop::Event {
                event: libc::PTRACE_EVENT_STOP,
                ..
            }
        ) {
            // Whatever stopped it, it was running: not in a group-stop.
            self.group_stopped.remove(&tid);
        }
        match stop {
            Stop::Exited(code) => self.thread_gone(pid, tid, ExitStatus::Code(code)),
            Stop::Killed(sig) => self.thread_gone(pid, tid, ExitStatus::Signal(sig)),
            Stop::Event { event, sig } => self.event(pid, tid, event, sig),
            Stop::Signal(libc::SIGTRAP) => self.trap(pid, tid),
            Stop::Signal(sig) => {
                self.note_signal_in_slot(pid, tid);
                let _ = ptrace::cont(tid, sig);
            }
        }
    }

    fn thread_gone(&mut self, pid: Tid, tid: Tid, how: ExitStatus) {
        self.owner.remove(&tid);
        if let Some(c) = &mut self.coloc {
            c.forget(tid);
        }
        let Some(p) = self.procs.get_mut(&pid) else {
            self.vforked.remove(&tid);
            return;
        };
        p.returns.remove(&tid);
        if self.vforked.remove(&tid) {
            return;
        }
        p.threads.remove(&tid);
        if tid == pid {
            // The process is gone: its memory with it.
            let p = self.procs.remove(&pid).expect("looked up above");
            self.registry.on_munmap(p.space.id(), 0..u64::MAX);
            for t in p.threads {
                self.owner.remove(&t);
                if let Some(c) = &mut self.coloc {
                    c.forget(t);
                }
            }
            self.exits.insert(pid, how);
        }
    }

    fn event(&mut self, pid: Tid, tid: Tid, event: libc::c_int, sig: libc::c_int) {
        match event {
            libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                let Ok(new) = ptrace::event_msg(tid) else {
                    let _ = ptrace::cont(tid, 0);
                    return;
                };
                let new = new as Tid;
                if let Some(c) = &mut self.coloc {
                    // Created pinned: its own affinity is its creator's.
                    c.inherit(new, tid);
                }
                match event {
                    libc::PTRACE_EVENT_CLONE => {
                        self.owner.insert(new, pid);
                        if let Some(p) = self.procs.get_mut(&pid) {
                            p.threads.insert(new);
                        }
                        self.first_stop(new);
                    }
                    libc::PTRACE_EVENT_VFORK => {
                        // Same memory as the parent: its space serves it.
                        self.owner.insert(new, pid);
                        self.vforked.insert(new);
                        self.first_stop(new);
                    }
                    _ => self.fork_child(pid, tid, new),
                }
                let _ = ptrace::cont(tid, 0);
            }
            libc::PTRACE_EVENT_EXEC => self.exec(pid, tid),
            libc::PTRACE_EVENT_STOP => {
                if matches!(
                    sig,
                    libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                ) {
                    // A group-stop: stays stopped until SIGCONT.
                    self.group_stopped.insert(tid);
                    let _ = ptrace::listen(tid);
                } else {
                    // Out of a group-stop (SIGCONT), or an interrupt.
                    self.group_stopped.remove(&tid);
                    let _ = ptrace::cont(tid, 0);
                }
            }
            _ => {
                let _ = ptrace::cont(tid, 0);
            }
        }
    }

    /// Waits for a new tracee's first stop (unless it came early) and lets
    /// it run.
    fn first_stop(&mut self, tid: Tid) {
        if self.early.remove(&tid).is_none() {
            let _ = self.stops.wait_for(tid);
        }
        let _ = ptrace::cont(tid, 0);
    }

    /// A `fork` child of `pid` (forked by its thread `parent`): its
    /// inherited breakpoints replaced by the original bytes and its
    /// hijacked return addresses by the real ones, then traced as a process
    /// of its own ([`follow_forks`](Self::follow_forks)) or let go.
    fn fork_child(&mut self, pid: Tid, parent: Tid, child: Tid) {
        if self.early.remove(&child).is_none() {
            let _ = self.stops.wait_for(child);
        }
        if let (Some(p), Ok(mem)) = (self.procs.get(&pid), RemoteMemory::open(child)) {
            // Every breakpoint the child may have inherited: those in the
            // parent now, and those removed from it since the `fork` (the
            // registry may be changed by another thread meanwhile), so
            // every address ever probed whose byte in the child is still
            // the breakpoint.
            for (vaddr, orig) in p.space.memory().ever_patched() {
                let mut now = [0u8];
                if mem.read_at(vaddr, &mut now).is_ok() && now[0] == super::mem::INT3 {
                    let _ = mem.write_at(vaddr, &[orig]);
                }
            }
            // The forking thread's calls in flight, in the child's copy of
            // its stack, return to their callers.
            if let (Some(t), Some(proxy)) = (p.space.return_trampoline(), p.returns.get(&parent)) {
                unhijack(&mem, t, &proxy.calls());
            }
        }
        if self.follow && self.adopt(child, [child].into()).is_ok() {
            let _ = ptrace::cont(child, 0);
            return;
        }
        self.let_go(child, 0);
    }

    /// `pid` (thread `tid`) ran `exec`: the old space is gone, the new
    /// image gets a space of its own.
    fn exec(&mut self, pid: Tid, tid: Tid) {
        if self.vforked.remove(&tid) {
            // A vfork child left its parent's memory: let it go.
            self.owner.remove(&tid);
            if let Some(p) = self.procs.get_mut(&pid) {
                p.returns.remove(&tid);
            }
            // Followed, its new image is a process of its own (after
            // `exec` its only thread has its process id).
            if self.follow && self.adopt(tid, [tid].into()).is_ok() {
                let _ = ptrace::cont(tid, 0);
                return;
            }
            self.let_go(tid, 0);
            return;
        }
        if let Some(p) = self.procs.remove(&pid) {
            self.registry.on_munmap(p.space.id(), 0..u64::MAX);
            for t in p.threads {
                self.owner.remove(&t);
                // The other threads are gone with the old image.
                if let (Some(c), true) = (&mut self.coloc, t != pid) {
                    c.forget(t);
                }
            }
        }
        // After exec the thread has the process's id.
        if self.adopt(pid, [pid].into()).is_err() {
            self.let_go(pid, 0);
            return;
        }
        let _ = ptrace::cont(pid, 0);
    }

    /// A `SIGTRAP` stop of `tid`: a breakpoint of ours, a return through
    /// the trampoline, or the program's own trap (delivered).
    ///
    /// No `PTRACE_GETSIGINFO` on the way (a system call less per hit): a
    /// trap right after a breakpoint the registry installed, or after the
    /// trampoline, is one; anything else the registry does not claim
    /// (`NotOurs`) goes to the program as the `SIGTRAP` it was.
    fn trap(&mut self, pid: Tid, tid: Tid) {
        let Some(p) = self.procs.get_mut(&pid) else {
            let _ = ptrace::cont(tid, libc::SIGTRAP);
            return;
        };
        let _serving = Serving::enter(pid, tid);
        let space = Arc::clone(&p.space);
        let registry = &self.registry;
        let proxy = p
            .returns
            .entry(tid)
            .or_insert_with(|| registry.proxy_returns(space.id()));
        let Ok(mut user) = ptrace::get_regs(tid) else {
            return;
        };
        let mut r = regs::from_user(&user);
        let mut mem = space.memory().clone();
        // The signal to resume with, and whether `r` is to be written back
        // (not when the trap goes to the program as it was).
        let mut deliver = 0;
        let mut write_back = true;
        if space.return_trampoline() == Some(r.ip.wrapping_sub(1)) {
            match registry.serving(proxy, || registry.on_return(space.id(), &mut r)) {
                ReturnOutcome::Returned { .. } => {}
                _ => (deliver, write_back) = (libc::SIGTRAP, false),
            }
        } else {
            match registry.serving(proxy, || {
                registry.on_breakpoint(space.id(), &mut r, &mut mem)
            }) {
                UprobeOutcome::Done(UprobeFinished::NotOurs) => {
                    (deliver, write_back) = (libc::SIGTRAP, false)
                }
                // The registers hold the state before the instruction: the
                // program gets the fault it would have had.
                UprobeOutcome::Done(UprobeFinished::Failed(_)) => deliver = libc::SIGSEGV,
                UprobeOutcome::Done(_) => {}
                UprobeOutcome::SingleStep(step) => {
                    regs::to_user(&r, &mut user);
                    if ptrace::set_regs(tid, &user).is_err() {
                        return;
                    }
                    // A step ends on the slot's marker `int3` (resume and
                    // wait for it) or, without one, after one instruction
                    // (the trap flag: `PTRACE_SINGLESTEP`).
                    let marker = step.plan().step_marker;
                    let mut held = Vec::new();
                    loop {
                        let resumed = match marker {
                            Some(_) => ptrace::cont(tid, 0),
                            None => ptrace::single_step(tid, 0),
                        };
                        if resumed.is_err() {
                            return;
                        }
                        let Ok(st) = self.stops.wait_for(tid) else {
                            return;
                        };
                        match ptrace::decode(st) {
                            Stop::Signal(libc::SIGTRAP) => {}
                            Stop::Signal(sig) => {
                                held.push(sig);
                                continue;
                            }
                            Stop::Event { .. } => continue,
                            Stop::Exited(_) | Stop::Killed(_) => {
                                self.stops.push(tid, st);
                                return;
                            }
                        }
                        let Ok(now) = ptrace::get_regs(tid) else {
                            return;
                        };
                        user = now;
                        r = regs::from_user(&user);
                        match self.registry.on_step_complete(&step, &mut r, &mut mem) {
                            Ok(StepOutcome::Repeat) => {
                                regs::to_user(&r, &mut user);
                                let _ = ptrace::set_regs(tid, &user);
                            }
                            Ok(StepOutcome::Done) => break,
                            Err(_) => {
                                (deliver, write_back) = (libc::SIGSEGV, false);
                                break;
                            }
                        }
                    }
                    drop(step);
                    // Signals that came during the step: the first with the
                    // resume, the others sent again.
                    let mut held = held.into_iter();
                    if deliver == 0 {
                        deliver = held.next().unwrap_or(0);
                    }
                    for sig in held {
                        // SAFETY: tgkill with plain integers; a thread that
                        // is gone makes it fail harmlessly.
                        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
                    }
                }
            }
        }
        if write_back {
            regs::to_user(&r, &mut user);
            let _ = ptrace::set_regs(tid, &user);
        }
        self.after_loader(pid, tid);
        let _ = ptrace::cont(tid, deliver);
    }

    /// After a hit: if it was the loader's rendezvous, the mappings again.
    fn after_loader(&mut self, pid: Tid, tid: Tid) {
        if LOADER_HIT.with(|h| h.replace(false)) {
            self.rescan(pid, tid);
        }
    }

    /// A signal is about to be delivered to `tid`: if it is inside an XOL
    /// slot, the handler's frame will hold the slot's address (the area
    /// must then outlive a detach). Signals are rare; a hit never comes
    /// here.
    fn note_signal_in_slot(&mut self, pid: Tid, tid: Tid) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        if p.signal_in_slot {
            return;
        }
        if let Ok(u) = ptrace::get_regs(tid) {
            let slots = p.space.xol_slots().chunk_ranges();
            p.signal_in_slot = slots.iter().any(|&(s, len)| (s..s + len).contains(&u.rip));
        }
    }

    /// A thread of `p` stopped at (or just after the trap of) the return
    /// trampoline: its call's instance popped and the thread sent to the
    /// real return address (the return handlers run if the uprobe is still
    /// there).
    fn finish_return(&self, p: &mut Proc, tid: Tid, u: &mut libc::user_regs_struct) {
        let Some(proxy) = p.returns.get_mut(&tid) else {
            return;
        };
        let mut r = regs::from_user(u);
        let id = p.space.id();
        let _serving = Serving::enter(p.space.pid(), tid);
        let registry = &self.registry;
        if let ReturnOutcome::Returned { .. } =
            registry.serving(proxy, || registry.on_return(id, &mut r))
        {
            regs::to_user(&r, u);
            let _ = ptrace::set_regs(tid, u);
        }
    }

    /// Stops tracing `pid`: every original byte written back, no thread
    /// left inside an XOL slot, every thread let go. The process runs on as
    /// if it had never been traced (its XOL area stays mapped).
    ///
    /// # Errors
    /// [`RemoteError::NotTraced`].
    pub fn detach(&mut self, pid: Tid) -> Result<(), RemoteError> {
        if !self.procs.contains_key(&pid) {
            return Err(RemoteError::NotTraced(pid));
        }
        let _stopped = self.stop_all();
        let mut p = self.procs.remove(&pid).expect("checked above");
        self.registry.detach_space(p.space.id());
        let trampoline = p.space.return_trampoline();
        // Its vfork children (sharing its memory) go with it.
        let vforked: Vec<Tid> = self
            .vforked
            .iter()
            .copied()
            .filter(|t| self.owner.get(t) == Some(&pid))
            .collect();
        for t in &vforked {
            self.vforked.remove(t);
        }
        let slots = p.space.xol_slots().chunk_ranges();
        let in_slot = |rip: u64| slots.iter().any(|&(s, len)| (s..s + len).contains(&rip));
        // Stops of this process's threads collected meanwhile: a breakpoint
        // trap whose byte is gone now resumes at the instruction itself.
        let mut signals: HashMap<Tid, libc::c_int> = HashMap::new();
        let mut keep = VecDeque::new();
        for (tid, status) in self.stops.take_all() {
            if self.owner.get(&tid) != Some(&pid) {
                keep.push_back((tid, status));
                continue;
            }
            if let Stop::Signal(sig) = ptrace::decode(status) {
                let ours = sig == libc::SIGTRAP
                    && ptrace::siginfo(tid).map(|si| si.si_code).ok() == Some(SI_KERNEL);
                if ours {
                    if let Ok(mut u) = ptrace::get_regs(tid) {
                        let mut b = [0u8];
                        if trampoline == Some(u.rip.wrapping_sub(1)) {
                            // A return through the trampoline: on to the
                            // caller.
                            self.finish_return(&mut p, tid, &mut u);
                        } else if p.space.memory().read_at(u.rip - 1, &mut b).is_ok()
                            && b[0] != 0xcc
                        {
                            u.rip -= 1;
                            let _ = ptrace::set_regs(tid, &u);
                        }
                    }
                } else {
                    signals.insert(tid, sig);
                }
            }
        }
        self.stops.put_back(keep);
        let threads: Vec<Tid> = p.threads.iter().copied().chain(vforked).collect();
        for &tid in &threads {
            // Out of any XOL slot first (a boosted slot jumps back after
            // its one instruction).
            for _ in 0..4 {
                match ptrace::get_regs(tid) {
                    Ok(u) if in_slot(u.rip) => {
                        if ptrace::single_step(tid, 0).is_err() {
                            break;
                        }
                        match self.stops.wait_for(tid) {
                            Ok(st) if ptrace::decode(st) == Stop::Signal(libc::SIGTRAP) => {}
                            // Gone, or stopped by something else: kept
                            // for the loop.
                            Ok(st) => {
                                self.stops.push(tid, st);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    _ => break,
                }
            }
            // A thread stopped on the trampoline before its trap: on to
            // the caller. Calls still in flight return there directly.
            if let Ok(mut u) = ptrace::get_regs(tid) {
                if trampoline == Some(u.rip) {
                    self.finish_return(&mut p, tid, &mut u);
                }
            }
            if let (Some(t), Some(proxy)) = (trampoline, p.returns.get(&tid)) {
                unhijack(p.space.memory(), t, &proxy.calls());
            }
        }
        // The XOL area goes too, unless a signal handler's frame may still
        // hold a slot's address: no thread is in a slot now and no tracked
        // return address points at the trampoline. One stopped thread
        // makes the `munmap`s.
        if !p.signal_in_slot {
            let lender = threads
                .iter()
                .copied()
                .find(|&t| !self.stops.has(t) && ptrace::get_regs(t).is_ok());
            if let Some(t) = lender {
                let _lent = p.space.lender.lend(t, &self.stops);
                p.space.xol_slots().unmap_all();
            }
        }
        for &tid in &threads {
            self.owner.remove(&tid);
            self.let_go(tid, signals.get(&tid).copied().unwrap_or(0));
        }
        self.resume(
            &_stopped
                .into_iter()
                .filter(|t| self.owner.contains_key(t))
                .collect::<Vec<_>>(),
        );
        Ok(())
    }
}

/// Writes each call's real return address back where the trampoline's
/// was put (a detached process's thread, or a `fork` child's copy of the
/// forking thread's stack): the call then returns as it would have
/// untraced, its return handlers unrun. On x86_64 the return address is
/// the word below the stack pointer the call returns with. A slot that no
/// longer holds the trampoline's address (the frame is gone, the program
/// rewrote it) is left alone. Returns how many were written.
fn unhijack(mem: &RemoteMemory, trampoline: u64, calls: &[CallInFlight]) -> usize {
    let mut written = 0;
    for c in calls {
        let slot = c.ret_sp.wrapping_sub(8);
        let mut word = [0u8; 8];
        if mem.read_at(slot, &mut word).is_ok()
            && u64::from_le_bytes(word) == trampoline
            && mem.write_at(slot, &c.real_ret.to_le_bytes()).is_ok()
        {
            written += 1;
        }
    }
    written
}

/// Whether `path` is the dynamic linker (`ld-linux*.so*`, `ld.so*`).
pub(super) fn is_dynamic_linker(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    name.starts_with("ld-linux") || name.starts_with("ld.so") || name.starts_with("ld64.so")
}
