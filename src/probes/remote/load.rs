//! [`load_library`]: a running process made to load a shared library (and
//! call one of its functions with a string), over `ptrace`, then let go to
//! run on untraced. This is how an agent gets into a process that was not
//! started with it (`LD_PRELOAD`): the agent then works inside, without
//! `ptrace`.
//!
//! # How
//!
//! 1. **Before touching the process**: the library must exist (its path is
//!    made absolute: the process has another working directory) and be an
//!    ELF file for x86_64; the init function, if any, must be a function of
//!    its file; the process must exist, run an x86_64 program and map a C
//!    library (or `libdl`) that exports `dlopen`, `dlerror` and `dlsym`,
//!    found in its maps and resolved from the file it maps (through
//!    `/proc/<pid>/root`, so a process in a container gets its own).
//! 2. **Stop**: every thread is seized and interrupted (`PTRACE_SEIZE` with
//!    `PTRACE_O_TRACECLONE` only, so that a thread created meanwhile is
//!    traced and let go too; `fork` children are not followed).
//! 3. **A safe point** (below): one thread is chosen to be borrowed; if none
//!    is safe, the threads run a little and are stopped again, up to
//!    [`SAFE_POINT_ROUNDS`] times.
//! 4. **Scratch page**: the borrowed thread makes an `mmap` (`inject.rs`):
//!    one page, read and execute only, written through `/proc/<pid>/mem`
//!    with the `int3` every call returns onto and the strings (library
//!    path, symbol, argument).
//! 5. **Calls** (`call.rs`, the thread's registers and whole FP/vector
//!    state saved first): `dlopen(path, RTLD_NOW)`; on `NULL`,
//!    `dlerror()`, whose text becomes [`RemoteError::LoadFailed`]. With an
//!    init function: `dlsym(handle, symbol)`, then `symbol(argument)`. The
//!    other threads run meanwhile (a thread that holds a lock `dlopen`
//!    needs must be able to release it); their signals and group-stops
//!    pass through.
//! 6. **Restore and let go**: the other threads are stopped again, the
//!    scratch page unmapped, the borrowed thread's state written back
//!    exactly (an interrupted system call restarts), and every thread let
//!    go (`PTRACE_DETACH`): signals that came for the borrowed thread
//!    during the calls are sent again to it then; a thread that was in a
//!    group-stop goes back into it.
//!
//! Afterwards the process has the library mapped and initialized (its
//! constructors ran in step 5, on the borrowed thread), and nothing else
//! changed: registers, memory (the stack below the borrowed thread's red
//! zone excepted, which the calls used as any call would), run state.
//! `dlopen` counts references: loading a library the process has loaded
//! already (itself, or by an earlier load) maps nothing new and runs no
//! constructor again ([`LoadedLibrary::newly_loaded`]); the init function
//! is called each time.
//!
//! # Safe points
//!
//! `dlopen` takes the dynamic linker's lock and `malloc`'s: a thread
//! stopped while it holds one of them must not be borrowed (it would wait
//! for itself for ever, or re-enter the loader half-way through a change).
//! Those locks are taken and released inside the C library and the
//! dynamic linker, so a thread is borrowed only
//! 1. if its instruction pointer is **outside the C library and the
//!    dynamic linker** ([`SafePoint::Outside`]; the main thread first), or
//! 2. if it is **blocked in a wait the program made for itself**: stopped
//!    inside a system call made from the C library (not from the dynamic
//!    linker) that is one of the sleeps, `poll`/`select`/`epoll` waits,
//!    `read`/`write`/`recv`/`send`/`accept`/`connect`, `wait4`/`waitid`,
//!    `pause` and signal waits (and `restart_syscall`, a timed wait going
//!    on after a stop), none of which glibc makes with those locks held
//!    ([`SafePoint::Blocked`]; a `futex` wait is not taken: a thread
//!    waiting for one lock may hold another).
//!
//! Threads in a group-stop are never resumed, so when the process is
//! stopped (`SIGSTOP`) every one of its threads must be at a safe point,
//! not only the one borrowed: one of them could hold the lock.
//!
//! This is how a process blocked in `sleep` or `poll` for minutes is
//! served at once, and a busy one within a few rounds. It needs no
//! breakpoint, so the program's text is never written.
//!
//! How others do it: the small injectors (`linux-inject` and its kind)
//! borrow the main thread wherever it stopped and call the C library's
//! private `__libc_dlopen_mode`, with nothing against a lock held there.
//! Frida borrows a thread only to call `pthread_create`, from code it maps
//! into the process, and runs `dlopen` and the agent's entry point on that
//! new thread while the whole process runs: the borrowed thread's exposure
//! is shorter (but `pthread_create` itself allocates the new thread's TLS
//! with `malloc`). Here the borrowed thread makes the calls itself (no code
//! of ours runs in the process, and the init function's result comes
//! back), so which thread is borrowed matters more: hence the rule, and
//! the other threads running meanwhile, so that a lock one of them holds
//! is released.
//!
//! `malloc` replacements shipped as libraries (jemalloc, tcmalloc,
//! mimalloc) count as the C library.
//!
//! **What remains a risk**: a signal handler that interrupted `malloc` runs
//! in the program's code with the lock held (the program's own bug, but
//! the load would deadlock that thread); a `malloc` linked into the
//! program itself (a Rust program's allocator crate) is the program's
//! code, so a thread inside it looks safe; callbacks the C library makes
//! with a lock held (a `dl_iterate_phdr` callback, the constructors of a
//! library being loaded) run outside it, and the borrowed thread re-enters
//! the loader's recursive lock, as a `dlopen` from a constructor does;
//! locks of the program's own, or `stdio`'s, which `dlopen` does not need
//! but the library's constructors and init function may; an init function
//! that forks (its child, untraced, returns onto the scratch page's
//! `int3` and dies of `SIGTRAP`); glibc's `malloc` reads
//! `/proc/sys/vm/overcommit_memory` once, with an arena's lock held, the
//! first time it shrinks a thread's heap: a thread stopped in that one
//! `read` looks blocked in a wait. The interrupt itself is `ptrace`'s: the
//! waits signal(7) lists as failing with `EINTR` after a stop
//! (`epoll_wait`, `sigtimedwait`, ...) may return `EINTR` to the program,
//! as under any `ptrace` attach (a debugger's included).
//!
//! # Cost
//!
//! Measured on the development machine (2 vCPUs, shared with other work;
//! `tests/remote_load.rs` with `--nocapture` prints each load): from the
//! first seize to the last detach, 0.5-6 ms for a single-threaded program
//! loading a small library for the first time (most of it `dlopen`'s own
//! system calls and the stops around each call), and 4-67 ms for a program
//! whose three other threads spin on both CPUs meanwhile (the borrowed
//! thread and the tracer wait for a CPU at each stop); fifty loads into
//! that program while it is sent 2,000 queued signals and a few
//! `SIGSTOP`/`SIGCONT` pairs take 1.3-6.6 s. The borrowed thread is away
//! from its own work for that long; the others only for the stops before
//! and after the calls.
//!
//! # Not covered
//!
//! A process this program traces already with a
//! [`RemoteTracer`](super::RemoteTracer) is refused like any traced one
//! ([`Refusal::OtherTracer`](super::Refusal::OtherTracer)): detach it first
//! (the tracer's own hit path would have to serve the breakpoints the
//! calls run into). The waits are for any tracee or child of the calling
//! thread (`waitpid(-1, __WALL | __WNOTHREAD)`, as the tracer's): an
//! untraced child of that thread that exits during the load is reaped
//! here. A library's path is the process's: the same file must be at the
//! same path in its mount namespace.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::call::{self, CallError, SavedThread};
use super::inject;
use super::mem::RemoteMemory;
use super::ptrace::Tid;
use super::safepoint::{self, Guarded, SafePoint};
use super::scratch::{Scratch, Strings};
use super::space::file_mappings;
use super::stops::Stops;
use super::threads::{State, Threads};
use super::tracer::{foreign_machine, os, RemoteError};
use crate::probes::procmaps::Maps;
use crate::probes::uprobe::{TargetResolver, UprobeTarget};
use crate::probes::ProbeError;

/// `dlopen`'s mode: every symbol bound before it returns (a library whose
/// symbols cannot be resolved fails now, with `dlerror`'s text, rather
/// than later in the process).
const RTLD_NOW: u64 = 2;

/// How many times the threads are let run and stopped again while none is
/// at a safe point.
pub const SAFE_POINT_ROUNDS: u32 = 200;

/// How long the threads run between two looks for a safe point: from
/// [`FIRST_GAP`], doubling, up to [`MAX_GAP`] (about 3 s over every round).
const FIRST_GAP: Duration = Duration::from_micros(50);
const MAX_GAP: Duration = Duration::from_millis(16);

/// Bytes of a `dlerror` message read at most.
const MAX_MESSAGE: usize = 4096;

/// A library loaded into a process by [`load_library`].
#[derive(Clone, Debug)]
pub struct LoadedLibrary {
    /// The process.
    pub pid: Tid,
    /// The absolute path `dlopen` was given.
    pub path: PathBuf,
    /// `dlopen`'s handle in the process.
    pub handle: u64,
    /// Where the library's first segment (file offset 0) is mapped.
    pub base: u64,
    /// Whether this load mapped it (false: it was loaded already, and
    /// `dlopen` only counted one more reference: its constructors did not
    /// run again).
    pub newly_loaded: bool,
    /// What the init function returned (`rax`), if one was called.
    pub init_returned: Option<u64>,
    /// The thread borrowed for the calls.
    pub thread: Tid,
    /// Why that thread was safe to borrow.
    pub safe_point: SafePoint,
    /// How many times the threads were stopped and looked at before one
    /// was at a safe point (1: at once).
    pub looks: u32,
    /// From the first thread seized to the last let go.
    pub took: Duration,
}

/// The process's `dlopen`, `dlerror` and `dlsym`.
struct Loader {
    dlopen: u64,
    dlerror: u64,
    dlsym: u64,
}

/// Makes process `pid` load the shared library `library` with
/// `dlopen(path, RTLD_NOW)` and, with `init = Some((symbol, argument))`,
/// call `symbol(argument)` (a function of the library taking one C
/// string), then lets it run on, untraced. How, which thread is borrowed
/// and what remains a risk: the [module docs](self).
///
/// # Errors
/// Each leaves the process as it was: running (or in the group-stop it
/// was in), no thread traced, registers and memory unchanged, except
/// where said.
/// - Before the process is touched: [`RemoteError::NoSuchLibrary`] (no such
///   file, or not a regular file), [`RemoteError::ForeignArchitecture`]
///   (the library or the process's program is built for another machine),
///   [`RemoteError::InitSymbolMissing`] with `loaded: false` (no function
///   of that name in the library's file), [`RemoteError::NoSuchProcess`],
///   [`RemoteError::NoLoader`] (no C library exporting `dlopen` mapped: a
///   static program), [`RemoteError::Os`] for a string with a NUL byte or
///   an unreadable `/proc` file.
/// - [`RemoteError::NotPermitted`] with its [`Refusal`](super::Refusal):
///   another tracer traces the process already
///   ([`Refusal::OtherTracer`](super::Refusal::OtherTracer), this
///   program's own [`RemoteTracer`](super::RemoteTracer)s included),
///   another user's, `ptrace_scope`.
/// - [`RemoteError::NoSafePoint`]: no thread came to a safe point within
///   [`SAFE_POINT_ROUNDS`] looks (or a thread in a group-stop is not at
///   one); nothing was called.
/// - [`RemoteError::LoadFailed`]: `dlopen` returned `NULL`; the message is
///   `dlerror`'s (nothing is loaded).
/// - [`RemoteError::InitSymbolMissing`] with `loaded: true`: `dlsym` did
///   not find the symbol (a function local to the library's file); the
///   library **stays loaded**, its constructors have run.
/// - [`RemoteError::CallFaulted`]: a call raised a fault (a crash in the
///   library's constructor or init function): the borrowed thread is
///   restored and let go, but whatever the faulting call held (the
///   loader's lock) stays held.
/// - [`RemoteError::Os`]: a `ptrace` request failed, or the process
///   exited meanwhile.
pub fn load_library(
    pid: Tid,
    library: &Path,
    init: Option<(&str, &str)>,
) -> Result<LoadedLibrary, RemoteError> {
    let (path, file) = check_library(library, init)?;
    let cstr = |s: &[u8]| CString::new(s).map_err(|e| os("a string with a NUL byte")(e.into()));
    let strings = Strings {
        path: cstr(path.as_os_str().as_bytes())?,
        symbol: init.map(|(s, _)| cstr(s.as_bytes())).transpose()?,
        argument: init.map(|(_, a)| cstr(a.as_bytes())).transpose()?,
    };
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(RemoteError::NoSuchProcess(pid));
    }
    if let Some(machine) = foreign_machine(Path::new(&format!("/proc/{pid}/exe"))) {
        return Err(RemoteError::ForeignArchitecture {
            what: format!("process {pid}"),
            machine,
        });
    }
    let maps = Maps::read_pid(pid).map_err(|_| RemoteError::NoSuchProcess(pid))?;
    let loader = find_loader(pid, &maps)?;
    let newly_loaded = !maps
        .mappings
        .iter()
        .any(|m| m.device == file.0 && m.inode == file.1);

    let start = Instant::now();
    let stops = Stops::default();
    let seized = super::seize::seize_all(&stops, pid, libc::PTRACE_O_TRACECLONE)?;
    let mut threads = Threads::seized(seized, stops.take_all());
    let visit = Visit {
        pid,
        stops: &stops,
        loader: &loader,
        strings: &strings,
    };
    let result = visit.run(&mut threads);
    // Whatever happened, every thread goes as it was found.
    threads.stop_all();
    threads.detach_all_but(None);
    let Borrowed {
        handle,
        init_returned,
        thread,
        safe_point,
        looks,
    } = result?;
    let base = Maps::read_pid(pid)
        .ok()
        .and_then(|maps| {
            maps.mappings
                .iter()
                .find(|m| m.device == file.0 && m.inode == file.1 && m.offset == 0)
                .map(|m| m.start)
        })
        .unwrap_or(0);
    Ok(LoadedLibrary {
        pid,
        path,
        handle,
        base,
        newly_loaded,
        init_returned,
        thread,
        safe_point,
        looks,
        took: start.elapsed(),
    })
}

/// The library's absolute path and its `(device, inode)`, checked as the
/// [errors](load_library#errors) say.
fn check_library(
    library: &Path,
    init: Option<(&str, &str)>,
) -> Result<(PathBuf, (u64, u64)), RemoteError> {
    let missing = |error| RemoteError::NoSuchLibrary {
        path: library.to_path_buf(),
        error,
    };
    let path = std::fs::canonicalize(library).map_err(missing)?;
    let meta = std::fs::metadata(&path).map_err(missing)?;
    if !meta.is_file() {
        return Err(missing(std::io::Error::other("not a regular file")));
    }
    if let Some(machine) = foreign_machine(&path) {
        return Err(RemoteError::ForeignArchitecture {
            what: path.display().to_string(),
            machine,
        });
    }
    if let Some((symbol, _)) = init {
        let target = UprobeTarget::symbol(path.to_string_lossy(), symbol);
        match TargetResolver::new().resolve(&target) {
            // (An IFUNC is a function too: `dlsym` answers its choice.)
            Ok(_) | Err(ProbeError::IfuncSymbol { .. }) => {}
            Err(ProbeError::SymbolNotInFile { .. } | ProbeError::SymbolNotInCode { .. }) => {
                return Err(RemoteError::InitSymbolMissing {
                    library: path,
                    symbol: symbol.to_string(),
                    loaded: false,
                })
            }
            Err(e) => return Err(RemoteError::Probe(e)),
        }
    }
    Ok((path, (meta.dev(), meta.ino())))
}

/// `dlopen`, `dlerror` and `dlsym` where process `pid` (whose maps are
/// `maps`) has them: exported by its C library (glibc 2.34 and later) or
/// by `libdl` (before).
fn find_loader(pid: Tid, maps: &Maps) -> Result<Loader, RemoteError> {
    let mappings = file_mappings(maps);
    let resolver = TargetResolver::new();
    let mut candidates: Vec<&str> = maps
        .mappings
        .iter()
        .filter(|m| m.prot & libc::PROT_EXEC != 0 && m.path.starts_with('/'))
        .map(|m| m.path.as_str())
        .filter(|p| {
            let name = p.rsplit('/').next().unwrap_or("");
            ["libc.so", "libc-", "libdl.so", "libdl-"]
                .iter()
                .any(|n| name.starts_with(n))
        })
        .collect();
    // The C library first: `libdl` of a glibc 2.34 or later is an empty
    // shell.
    candidates.sort_by_key(|p| !p.rsplit('/').next().unwrap_or("").starts_with("libc"));
    candidates.dedup();
    for path in candidates {
        let file = format!("/proc/{pid}/root{path}");
        let find = |name: &str| {
            let r = resolver
                .resolve(&UprobeTarget::symbol(file.as_str(), name))
                .ok()?;
            mappings
                .iter()
                .filter(|m| m.file == r.file)
                .find_map(|m| m.vaddr_of(r.offset))
        };
        if let (Some(dlopen), Some(dlerror), Some(dlsym)) =
            (find("dlopen"), find("dlerror"), find("dlsym"))
        {
            return Ok(Loader {
                dlopen,
                dlerror,
                dlsym,
            });
        }
    }
    Err(RemoteError::NoLoader(pid))
}

/// One load, from the threads seized to the calls made.
struct Visit<'a> {
    pid: Tid,
    stops: &'a Stops,
    loader: &'a Loader,
    strings: &'a Strings,
}

/// What the calls gave: the handle, the init function's result.
type Called = (u64, Option<u64>);

/// What a visit did: the calls' results, the thread borrowed and how it
/// was found.
struct Borrowed {
    handle: u64,
    init_returned: Option<u64>,
    thread: Tid,
    safe_point: SafePoint,
    looks: u32,
}

impl Visit<'_> {
    /// Finds a safe point, borrows that thread for the calls and gives it
    /// back (restored, let go); the other threads are left to the caller,
    /// stopped or running.
    fn run(&self, threads: &mut Threads) -> Result<Borrowed, RemoteError> {
        let (tid, safe_point, looks) = self.safe_point(threads)?;
        let was = threads.state(tid).unwrap_or(State::Stopped { sig: 0 });
        let saved = SavedThread::save(tid).map_err(os(format!("saving thread {tid}")))?;
        let mem =
            RemoteMemory::open(self.pid).map_err(os(format!("opening /proc/{}/mem", self.pid)))?;
        let gadget = inject::find_syscall(&mem, saved.regs().rip)
            .map_err(os(format!("finding a syscall instruction in {}", self.pid)))?;
        let scratch = Scratch::map(self.stops, self.pid, tid, gadget, &mem, self.strings)
            .map_err(os(format!("mapping a scratch page in {}", self.pid)))?;
        // The others run while it calls (module docs).
        threads.resume_all_but(Some(tid));
        let mut held = Vec::new();
        let called = self.calls(tid, &saved, &scratch, &mem, threads, &mut held);
        if matches!(called, Err(CallError::Gone)) {
            return Err(os(format!("loading into {}", self.pid))(
                std::io::Error::other("the process exited during the load"),
            ));
        }
        threads.stop_all();
        scratch.unmap(self.stops, self.pid, tid, gadget);
        let restored = saved.restore(tid);
        // Its own state back: it goes as it was found (a group-stop
        // included), then gets the signals held back meanwhile.
        threads.set(tid, was);
        threads.detach_all_but(None);
        for sig in held {
            // SAFETY: tgkill with plain integers; a thread that is gone
            // makes it fail harmlessly.
            unsafe { libc::syscall(libc::SYS_tgkill, self.pid, tid, sig) };
        }
        restored.map_err(os(format!("restoring thread {tid}")))?;
        let (handle, init) = called.map_err(|e| match e {
            CallError::Faulted { signal, addr } => RemoteError::CallFaulted {
                pid: self.pid,
                signal,
                addr,
            },
            e => os(format!("calling into {}", self.pid))(std::io::Error::other(e.to_string())),
        })??;
        Ok(Borrowed {
            handle,
            init_returned: init,
            thread: tid,
            safe_point,
            looks,
        })
    }

    /// A safe thread to borrow ([`safepoint`]): looked for among the
    /// stopped threads; if none is, the threads run a little and are
    /// stopped again, [`SAFE_POINT_ROUNDS`] times at most.
    /// Returns it, its safe point and the number of looks.
    fn safe_point(&self, threads: &mut Threads) -> Result<(Tid, SafePoint, u32), RemoteError> {
        let mut gap = FIRST_GAP;
        for look in 1..=SAFE_POINT_ROUNDS {
            let maps =
                Maps::read_pid(self.pid).map_err(|_| RemoteError::NoSuchProcess(self.pid))?;
            if let Some((tid, at)) = safepoint::choose(self.pid, threads, &Guarded::of(&maps)) {
                return Ok((tid, at, look));
            }
            // Nothing can move if every thread is in a group-stop.
            if threads.states().all(|(_, s)| s == State::GroupStopped) {
                break;
            }
            threads.resume_all_but(None);
            std::thread::sleep(gap);
            gap = (gap * 2).min(MAX_GAP);
            threads.stop_all();
            if threads.states().next().is_none() {
                return Err(RemoteError::NoSuchProcess(self.pid));
            }
        }
        Err(RemoteError::NoSafePoint(self.pid))
    }

    /// The calls, on borrowed thread `tid`: `Err` for a call that did not
    /// return, `Ok(Err)` for one whose result is an error.
    fn calls(
        &self,
        tid: Tid,
        saved: &SavedThread,
        scratch: &Scratch,
        mem: &RemoteMemory,
        threads: &mut Threads,
        held: &mut Vec<libc::c_int>,
    ) -> Result<Result<Called, RemoteError>, CallError> {
        let mut call = |func: u64, args: &[u64]| {
            call::call(
                tid,
                saved.regs(),
                func,
                args,
                scratch.start,
                mem,
                threads,
                held,
            )
        };
        let handle = call(self.loader.dlopen, &[scratch.path, RTLD_NOW])?;
        if handle == 0 {
            let message = read_message(mem, call(self.loader.dlerror, &[])?);
            return Ok(Err(RemoteError::LoadFailed {
                pid: self.pid,
                library: PathBuf::from(std::ffi::OsStr::from_bytes(self.strings.path.as_bytes())),
                message,
            }));
        }
        let Some(symbol) = &self.strings.symbol else {
            return Ok(Ok((handle, None)));
        };
        let f = call(self.loader.dlsym, &[handle, scratch.symbol])?;
        if f == 0 {
            return Ok(Err(RemoteError::InitSymbolMissing {
                library: PathBuf::from(std::ffi::OsStr::from_bytes(self.strings.path.as_bytes())),
                symbol: symbol.to_string_lossy().into_owned(),
                loaded: true,
            }));
        }
        let r = call(f, &[scratch.argument])?;
        Ok(Ok((handle, Some(r))))
    }
}

/// The C string at `addr` in the process (`dlerror`'s message; `NULL`: no
/// message).
fn read_message(mem: &RemoteMemory, addr: u64) -> String {
    if addr == 0 {
        return "(no message)".to_string();
    }
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < MAX_MESSAGE {
        // Up to the end of the page: the next one may be unmapped.
        let n = (4096 - (at % 4096)) as usize;
        let mut buf = vec![0u8; n.min(MAX_MESSAGE - out.len())];
        if mem.read_at(at, &mut buf).is_err() {
            break;
        }
        if let Some(end) = buf.iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..end]);
            break;
        }
        out.extend_from_slice(&buf);
        at += buf.len() as u64;
    }
    String::from_utf8_lossy(&out).into_owned()
}
