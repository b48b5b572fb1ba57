//! The agent itself: what runs inside the traced program.
//!
//! # Start
//!
//! The library's constructor (`init`, in `.init_array`) runs when the
//! dynamic linker loads it, before the program's `main`: it does nothing
//! unless [`FD_ENV`] names a socket (so the rlib linked into `rcu-trace`
//! stays inert). Then it removes [`FD_ENV`] and itself from `LD_PRELOAD`
//! (the program's children are not traced, as with the ptrace engine
//! without `-f`), starts the agent thread and waits for it: that thread
//! reads the plan, registers every spec's probes with
//! [`LiveUprobes::register_many`] (one consumer per spec), answers each
//! probe, says ready, lets the constructor return and goes on serving:
//! the probes are in place before `main`. The work is the agent thread's,
//! not the program's thread's, so that what the standard library does
//! for it there (allocations, a thread-local destructor it registers with
//! the C library, which the C library frees at the thread's exit) is not
//! counted as the program's calls. The thread is a bare `pthread_create`,
//! marking itself as the agent's before anything else runs on it.
//!
//! A refusal (code the runtime will not patch) is answered with the chain
//! of calls by which the runtime's trap path reaches it
//! ([`Live::explain_refusal`](rcu_registry::probes::runtime::Live::explain_refusal)).
//! Preloaded, the agent's thread-locals are in static TLS and the C
//! library's allocator is probeable; injected with `dlopen` (`-p`) they
//! are not, and what the loader's `__tls_get_addr` reaches (`malloc`,
//! `free`, ...) is refused (`rcu-registry`'s `sync/trap_local.rs`).
//!
//! # Hits
//!
//! A hit runs the spec's consumer inside the SIGTRAP handler: it finds the
//! probe's row by key (a binary search in a table built before
//! registering), counts into that row's [`Counters`] (atomics; the clock
//! is read only for a uretprobe or when events are streamed), and, when
//! events are streamed, pushes one into the [`Ring`]. No allocation, no
//! lock. Calls the agent makes are not the program's, and are passed
//! over: those on its own thread and on the program's thread while it runs
//! the exit flush (the handlers compare the thread pointer, read from a
//! register: no C-library call, no TLS access), and those its code makes
//! anywhere (the standard library's destructors it left on the program's
//! threads, its strings dropped): a probe at a function's entry whose
//! return address (at the stack pointer) lies in the agent's own code.
//!
//! # The agent thread
//!
//! Every 100 ms (or when a `q` line or end of file comes) it drains the
//! ring into `e`/`x` lines and sends every row's counts (`c` lines). On
//! `q` or end of file it unregisters everything in one batch (one grace
//! period), sends the final counts and `b`, and ends: the program runs on
//! with its bytes restored. At the program's exit an `atexit` handler
//! sends the counts, and the agent's probe on `_exit` (after the C
//! library's last flush of its streams) the final counts and `b` (the
//! `atexit` handler does, if `_exit` could not be probed). Every send
//! takes one spin lock, so the ring has one consumer at a time. A forked child inherits the
//! probes and counts into its own copy; it sends nothing (the flush
//! checks the process id).

use std::cell::UnsafeCell;
use std::ffi::CString;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use rcu_registry::probes::arch::Regs;
use rcu_registry::probes::runtime::uprobes::LiveUprobes;
use rcu_registry::probes::uprobe::{
    Consumer, ConsumerAction, TargetPlace, UprobeHit, UprobeKey, UprobeReturn, UprobeTarget,
};
use rcu_registry::probes::ProbeError;

use crate::ring::{Event, Ring};
use crate::stats::Counters;
use crate::wire::{write_counts, write_event, FromAgent, PlannedProbe, ToAgent, ARGS, FD_ENV};

/// Events the ring holds between two drains (100 ms): 64 Ki events, 5 MiB.
const RING: usize = 1 << 16;
/// Buckets of each uretprobe's table of calls in flight (as the tracer's).
const PENDING_BUCKETS: usize = 256;
/// Bytes formatted before each write(2) of a send.
const SEND_BUFFER: usize = 1 << 16;
/// How often the agent thread drains and sends.
const PERIOD: Duration = Duration::from_millis(100);

/// The agent thread's thread pointer (0: none yet).
static AGENT_TP: AtomicUsize = AtomicUsize::new(0);
/// The program thread running agent code now (the exit flush).
static BORROWED_TP: AtomicUsize = AtomicUsize::new(0);
/// The process the agent started in (a forked child sends nothing).
static PID: AtomicI32 = AtomicI32::new(0);
/// Final counts sent (by the agent thread on `q`, or at exit).
static DONE: AtomicBool = AtomicBool::new(false);
/// Whether an `exec` of the process is followed (a command rcu-trace
/// spawned; not a process the agent was loaded into).
static FOLLOW_EXEC: AtomicBool = AtomicBool::new(false);
/// Whether `_exit` is probed (its hit sends the goodbye, not `atexit`).
static EXIT_PROBED: AtomicBool = AtomicBool::new(false);
/// What the exit flush needs.
static AGENT: OnceLock<Arc<Agent>> = OnceLock::new();

/// The calling thread's thread pointer: its TCB's address, unique among
/// live threads, read without a call.
#[inline(always)]
fn thread_pointer() -> usize {
    let tp: usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads the TCB's self-pointer at %fs:0 (the x86_64 TLS ABI);
    // touches no other memory or register.
    unsafe {
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: reads the thread register; touches nothing else.
    unsafe {
        std::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nostack, nomem, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        tp = 0;
    }
    tp
}

/// Whether the calling thread is running agent code (its calls are not
/// the program's).
#[inline(always)]
fn on_agent_thread() -> bool {
    let tp = thread_pointer();
    // Relaxed (both): a thread only ever finds its own thread pointer
    // there, which it stored itself (program order); any other value
    // differs from its own whatever its age.
    tp == AGENT_TP.load(Ordering::Relaxed) || tp == BORROWED_TP.load(Ordering::Relaxed)
}

/// The agent library's executable code, `[start, end)` (0, 0: unknown).
static OWN_TEXT: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// `dl_iterate_phdr` callback: records in [`OWN_TEXT`] the executable
/// segment of the object holding `data` (an address of this library's
/// code).
///
/// # Safety
/// `info` valid for the call.
// SAFETY: an unsafe fn: its callers keep the contract above.
unsafe extern "C" fn find_own_text(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut std::ffi::c_void,
) -> libc::c_int {
    let code = data as usize;
    // SAFETY: the caller's contract.
    let info = unsafe { &*info };
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: the loader gives `dlpi_phnum` program headers at `dlpi_phdr`.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    for ph in phdrs {
        let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
        let end = start + ph.p_memsz as usize;
        if ph.p_type == libc::PT_LOAD
            && ph.p_flags & libc::PF_X != 0
            && (start..end).contains(&code)
        {
            // Relaxed (both): stored before the probes are registered,
            // which publishes them to the handlers.
            OWN_TEXT[0].store(start, Ordering::Relaxed);
            OWN_TEXT[1].store(end, Ordering::Relaxed);
            return 1;
        }
    }
    0
}

/// Finds [`OWN_TEXT`].
fn find_own_text_once() {
    let code = find_own_text_once as fn() as usize;
    // SAFETY: the callback matches dl_iterate_phdr's signature; `data` is
    // an address, never dereferenced.
    unsafe { libc::dl_iterate_phdr(Some(find_own_text), code as *mut std::ffi::c_void) };
}

/// Whether a call returning to `ret` was made by the agent's own code
/// (the Rust standard library linked into it included): its allocations,
/// the thread-local destructors it left on the program's threads, what
/// its thread does before it knows its own thread pointer. Not the
/// program's calls.
#[inline(always)]
fn called_by_agent(ret: u64) -> bool {
    // Relaxed (both): see where they are stored.
    let (s, e) = (
        OWN_TEXT[0].load(Ordering::Relaxed),
        OWN_TEXT[1].load(Ordering::Relaxed),
    );
    (s as u64..e as u64).contains(&ret)
}

/// At a function's entry: the return address (x86_64: the one the call
/// pushed; arm64: the link register).
#[inline(always)]
fn return_address(regs: &Regs) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: at a function's entry (the only probes this is read
        // for) the stack pointer points at the return address the call
        // pushed, in the thread's mapped stack.
        unsafe { (regs.sp as *const u64).read_unaligned() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        regs.gprs[30]
    }
}

/// `CLOCK_MONOTONIC` now, in ns (the vDSO: no system call).
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The calling thread's id (a system call: only for events).
fn gettid() -> i32 {
    // SAFETY: gettid takes nothing and cannot fail; async-signal-safe.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The agent's state, shared by the handlers, its thread and the exit
/// flush.
struct Agent {
    rows: Box<[Counters]>,
    /// Per row: the probe is at its function's entry (the return address
    /// is at the stack pointer: [`called_by_agent`]).
    at_entry: Box<[bool]>,
    ring: Ring,
    events: bool,
    args: usize,
    /// The socket (kept open by `_sock`).
    fd: RawFd,
    _sock: UnixStream,
    /// Taken by whoever sends (the agent thread, the exit flush, a hit on
    /// `execve` or `_exit`): a spin lock, as a hit may take it inside the
    /// SIGTRAP handler. It makes the ring's consumer one at a time, and
    /// guards `buf`.
    sending: AtomicBool,
    /// What is sent is formatted here (allocated up front).
    buf: UnsafeCell<Box<[u8]>>,
    /// Jump-optimize the probes (the tracer's `--no-jump` says no).
    jump: bool,
    /// Every (key, consumer) registered (what the goodbye unregisters).
    registered: Mutex<Vec<(UprobeKey, Consumer)>>,
}

// SAFETY: `buf`, the one field that is not Sync, is only touched by the
// holder of `sending` (see `Agent::send`).
unsafe impl Sync for Agent {}

/// Formats into a borrowed buffer and writes it to a descriptor with
/// write(2) whenever it fills: no allocation, async-signal-safe.
struct FdWriter<'a> {
    fd: RawFd,
    buf: &'a mut [u8],
    len: usize,
}

impl FdWriter<'_> {
    fn drain(&mut self) -> std::io::Result<()> {
        let mut at = 0;
        while at < self.len {
            let rest = &self.buf[at..self.len];
            // SAFETY: writes from a live buffer of `rest.len()` bytes.
            let n = unsafe { libc::write(self.fd, rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                self.len = 0;
                return Err(e);
            }
            at += n as usize;
        }
        self.len = 0;
        Ok(())
    }
}

impl Write for FdWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.len + b.len() > self.buf.len() {
            self.drain()?;
        }
        let n = b.len().min(self.buf.len());
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.drain()
    }
}

impl Agent {
    /// Drains the ring and sends every row's counts (and `b` if `last`,
    /// once: nothing is sent after it). No allocation, no lock but the
    /// `sending` spin lock: callable from a handler.
    /// Takes the `sending` spin lock.
    fn lock(&self) {
        // Acquire: pairs with the Release in `unlock`, so the last
        // holder's use of what the lock guards came before ours.
        while self
            .sending
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // SAFETY: sched_yield takes nothing; async-signal-safe.
            unsafe { libc::sched_yield() };
        }
    }

    /// Lets go of the `sending` spin lock.
    fn unlock(&self) {
        // Release: pairs with the Acquire in `lock`.
        self.sending.store(false, Ordering::Release);
    }

    fn send(&self, last: bool) {
        self.lock();
        // Acquire: pairs with the Release store below (a goodbye sent by
        // the last holder).
        if !DONE.load(Ordering::Acquire) {
            // SAFETY: `sending` is ours, so is `buf` (see the Sync impl).
            let buf = unsafe { &mut *self.buf.get() };
            let mut w = FdWriter {
                fd: self.fd,
                buf,
                len: 0,
            };
            let _ = self.write_all_lines(&mut w, last);
            let _ = w.drain();
            if last {
                // Release: read by the next holder and by the agent
                // thread (Acquire loads).
                DONE.store(true, Ordering::Release);
            }
        }
        self.unlock();
    }

    fn write_all_lines(&self, w: &mut FdWriter<'_>, last: bool) -> std::io::Result<()> {
        // At most a ringful per send: the program's threads push while it
        // drains, and a trap-free probe pushes faster than the events are
        // written and read, so "until empty" could keep the agent thread
        // here for good (a Ctrl-C's `q` unread: seen, 210 s). What is
        // left goes with the next send; a full ring drops, counted.
        for _ in 0..self.ring.capacity() {
            let Some(e) = self.ring.pop() else { break };
            write_event(w, &e)?;
        }
        if self.events {
            writeln!(w, "d {}", self.ring.dropped())?;
        }
        for (row, c) in self.rows.iter().enumerate() {
            write_counts(w, row, c)?;
        }
        if last {
            w.write_all(b"b\n")?;
        }
        Ok(())
    }

    /// Unregisters everything (one grace period).
    fn unregister_all(&self) {
        let regs = std::mem::take(&mut *self.registered.lock().unwrap_or_else(|e| e.into_inner()));
        if let Ok(live) = LiveUprobes::global() {
            let pairs: Vec<(UprobeKey, &Consumer)> = regs.iter().map(|(k, c)| (*k, c)).collect();
            let _ = live.unregister_many(&pairs);
        }
    }
}

/// The library's constructor (see the module docs).
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

/// Starts the agent if the environment asks for it (see the module docs).
extern "C" fn init() {
    let Some(fd) = std::env::var(FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    if !from_tracer(fd) {
        // Inherited by a process rcu-trace did not start (a shell keeps
        // its environment as it found it): not ours to trace.
        forget_environment();
        return;
    }
    let preload = std::env::var("LD_PRELOAD").unwrap_or_default();
    forget_environment();
    // SAFETY: `fd` is the socket rcu-trace handed this process for the
    // agent (FD_ENV); nothing else in the process owns it.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: F_SETFD on a descriptor we own; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // Relaxed: read by this process's handlers after the registration
    // (whose batch publishes it).
    FOLLOW_EXEC.store(true, Ordering::Relaxed);
    // The agent's work runs on its own thread, the program's waiting for
    // the probes to be in place: what the standard library does for it
    // (allocations, thread-local destructors it registers with the C
    // library and the C library frees at the thread's exit) stays off the
    // program's thread.
    static READY: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());
    let started = spawn_agent_thread(move || {
        run(sock, Some(&preload), || {
            *READY.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            READY.1.notify_all();
        })
    });
    if started {
        let mut ready = READY.0.lock().unwrap_or_else(|e| e.into_inner());
        while !*ready {
            ready = READY.1.wait(ready).unwrap_or_else(|e| e.into_inner());
        }
    } else {
        eprintln!("rcu-trace agent: starting the agent thread failed");
    }
}

/// The agent thread's whole life: [`start`], then `ready`, then [`serve`]
/// until the goodbye.
fn run(sock: UnixStream, preload: Option<&str>, ready: impl FnOnce()) {
    match start(sock, preload) {
        Ok(Some((agent, reader))) => {
            ready();
            serve(agent, reader);
        }
        Ok(None) => ready(),
        Err(e) => {
            eprintln!("rcu-trace agent: {e}");
            ready();
        }
    }
}

/// What an `exec` of the traced process gets back: the environment
/// entries that load the agent in the new image, and the table its
/// environment is rebuilt in (allocated up front: it is built inside the
/// SIGTRAP handler).
struct ExecEnv {
    preload: CString,
    fd: CString,
    table: UnsafeCell<Box<[*const libc::c_char]>>,
}

// SAFETY: `table` is only touched by the holder of the agent's `sending`
// lock (see `exec_hit`); the rest is read-only.
unsafe impl Sync for ExecEnv {}
// SAFETY: as for Sync: the pointers are only used under that lock.
unsafe impl Send for ExecEnv {}

/// Environment entries an `exec` passes on with the agent's.
const EXEC_ENV_MAX: usize = 8192;

static EXEC_ENV: OnceLock<ExecEnv> = OnceLock::new();

/// Whether the C string `entry` starts with `prefix`.
///
/// # Safety
/// `entry` points to a NUL-terminated string.
// SAFETY: an unsafe fn: its callers keep the contract above.
unsafe fn starts_with(entry: *const libc::c_char, prefix: &[u8]) -> bool {
    for (i, &b) in prefix.iter().enumerate() {
        // SAFETY: the string is NUL-terminated and `b` is not NUL, so a
        // shorter string stops the loop at its NUL before reading past it.
        if unsafe { *entry.add(i) } as u8 != b {
            return false;
        }
    }
    true
}

/// A hit on `execve` in the traced process: sends what was counted, and
/// makes the new image load the agent again on the same socket (the
/// socket kept across the `exec`, the environment argument replaced by a
/// copy with the agent's entries), as the ptrace engine follows an `exec`
/// of a traced process. No allocation, no lock but the `sending` spin
/// lock.
fn exec_hit(agent: &Agent, regs: &mut Regs) {
    agent.send(false);
    // Relaxed: see where it is stored.
    if !FOLLOW_EXEC.load(Ordering::Relaxed) {
        // Loaded into a running process (-p): its socket closes at the
        // exec, which ends the trace.
        return;
    }
    let Some(env) = EXEC_ENV.get() else {
        return;
    };
    let Some(envp) = regs.arg(2) else {
        return;
    };
    agent.lock();
    // SAFETY: `sending` is held, so `table` is ours (see ExecEnv's Sync).
    let table = unsafe { &mut *env.table.get() };
    let envp = envp as *const *const libc::c_char;
    let mut n = 0;
    let mut fits = true;
    let mut i = 0;
    while !envp.is_null() {
        // SAFETY: execve's envp is a NULL-terminated array of C strings
        // (the caller's contract with execve; a bad one faults in execve
        // too).
        let e = unsafe { *envp.add(i) };
        if e.is_null() {
            break;
        }
        i += 1;
        // SAFETY: `e` is one of envp's NUL-terminated strings.
        let ours = unsafe { starts_with(e, b"LD_PRELOAD=") || starts_with(e, FD_ENV.as_bytes()) };
        if ours {
            continue;
        }
        if n + 3 > table.len() {
            fits = false;
            break;
        }
        table[n] = e;
        n += 1;
    }
    if fits {
        table[n] = env.preload.as_ptr();
        table[n + 1] = env.fd.as_ptr();
        table[n + 2] = std::ptr::null();
        // SAFETY: F_SETFD on the agent's own socket: kept across the exec.
        unsafe { libc::fcntl(agent.fd, libc::F_SETFD, 0) };
        // Always a register (the third argument).
        let _ = regs.set_arg(2, table.as_ptr() as u64);
    }
    agent.unlock();
}

/// Starts the agent in a process rcu-trace made load it over ptrace
/// (`-p PID`: `probes::remote::load_library` calls this on a borrowed
/// thread): connects to the Unix socket at `path` and goes on on a thread
/// of its own (hello, the plan, the registration, then serving), so the
/// borrowed thread is given back at once. Returns 0 when connected, 1
/// otherwise.
///
/// # Safety
/// `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn rcu_trace_agent_start(path: *const libc::c_char) -> u64 {
    if path.is_null() {
        return 1;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(path) };
    let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path.to_bytes()));
    let Ok(sock) = UnixStream::connect(&path) else {
        return 1;
    };
    let started = spawn_agent_thread(move || run(sock, None, || {}));
    u64::from(!started)
}

/// Whether `fd` is a socket whose other end rcu-trace holds, rcu-trace
/// being this process's parent: the traced process itself (its first
/// image or one it `exec`ed), not a descendant that inherited the
/// environment (and maybe the descriptor).
fn from_tracer(fd: i32) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for getsockopt to write; a bad
    // descriptor is an error return.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: getppid takes nothing and cannot fail.
    r == 0 && cred.pid != 0 && cred.pid == unsafe { libc::getppid() }
}

/// Removes [`FD_ENV`] and this library from `LD_PRELOAD`: the program's
/// children run untraced.
fn forget_environment() {
    std::env::remove_var(FD_ENV);
    let Ok(pre) = std::env::var("LD_PRELOAD") else {
        return;
    };
    let rest: Vec<&str> = pre
        .split([':', ' '])
        .filter(|p| !p.is_empty() && !p.ends_with("librcu_trace_agent.so"))
        .collect();
    match rest.is_empty() {
        true => std::env::remove_var("LD_PRELOAD"),
        false => std::env::set_var("LD_PRELOAD", rest.join(":")),
    }
}

/// What [`serve`] needs: the agent, the socket's reading end.
type Serving = (Arc<Agent>, BufReader<UnixStream>);

/// Reads the plan, registers it, answers; returns what [`serve`] needs.
/// On the agent thread. `Ok(None)`: nothing to serve (the tracer quit, or
/// a refusal in a process the agent was loaded into).
fn start(sock: UnixStream, preload: Option<&str>) -> Result<Option<Serving>, String> {
    let mut reader = BufReader::new(sock.try_clone().map_err(|e| e.to_string())?);
    let mut out = sock;
    out.write_all(FromAgent::Hello.line().as_bytes())
        .map_err(|e| format!("greeting the tracer: {e}"))?;
    let (mut events, mut args, mut jump) = (false, 0, false);
    let mut plan: Vec<PlannedProbe> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the tracer went away before the plan".into());
        }
        match ToAgent::parse(line.trim_end_matches('\n')) {
            Some(ToAgent::Options {
                events: e,
                args: a,
                jump: j,
            }) => (events, args, jump) = (e, a, j),
            Some(ToAgent::Probe(p)) => plan.push(p),
            Some(ToAgent::Go) => break,
            Some(ToAgent::Quit) => return Ok(None),
            None => return Err(format!("a line not understood: {line:?}")),
        }
    }
    let live = LiveUprobes::global().map_err(|e| e.to_string())?;
    find_own_text_once();
    let nrows = plan.iter().map(|p| p.row + 1).max().unwrap_or(0);
    let mut rets = vec![false; nrows];
    let mut at_entry = vec![false; nrows];
    for p in &plan {
        rets[p.row] = p.ret;
        at_entry[p.row] = p.func == Some(p.offset);
    }
    // The descriptor the agent keeps (and an `exec` passes on).
    let keep = out.try_clone().map_err(|e| e.to_string())?;
    let _ = EXEC_ENV.set(ExecEnv {
        preload: CString::new(format!("LD_PRELOAD={}", preload.unwrap_or(""))).unwrap_or_default(),
        fd: CString::new(format!("{FD_ENV}={}", keep.as_raw_fd())).unwrap_or_default(),
        table: UnsafeCell::new(vec![std::ptr::null(); EXEC_ENV_MAX].into_boxed_slice()),
    });
    let agent = Arc::new(Agent {
        rows: rets
            .iter()
            .map(|&r| Counters::new(r, PENDING_BUCKETS))
            .collect(),
        at_entry: at_entry.into(),
        ring: Ring::new(if events { RING } else { 2 }),
        events,
        args,
        fd: keep.as_raw_fd(),
        _sock: keep,
        sending: AtomicBool::new(false),
        buf: UnsafeCell::new(vec![0u8; SEND_BUFFER].into_boxed_slice()),
        registered: Mutex::new(Vec::new()),
        jump,
    });
    let mut answer = String::new();
    let mut refused = false;
    // Every registered probe and its row, for the hit-path answers.
    let mut placed: Vec<(UprobeKey, usize)> = Vec::new();
    let nspecs = plan.iter().map(|p| p.spec + 1).max().unwrap_or(0);
    for spec in 0..nspecs {
        let mine: Vec<&PlannedProbe> = plan.iter().filter(|p| p.spec == spec).collect();
        if mine.is_empty() {
            continue;
        }
        // The keys first (each file opened once), for the consumer's table.
        let mut table: Vec<(UprobeKey, usize)> = Vec::new();
        let mut targets = Vec::new();
        let mut rows = Vec::new();
        let mut files = std::collections::HashMap::new();
        for p in &mine {
            let place = TargetPlace::FileOffset(p.offset);
            let key = files
                .entry(p.path.clone())
                .or_insert_with(|| live.resolver().open_file(&p.path))
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|f| f.key_of(&place).map_err(|e| e.to_string()));
            match key {
                Ok((k, _)) => {
                    table.push((k, p.row));
                    targets.push(UprobeTarget::file_offset(p.path.clone(), p.offset));
                    rows.push(p.row);
                }
                Err(e) => {
                    refused = true;
                    answer.push_str(&FromAgent::Refused(p.row, e).line());
                }
            }
        }
        table.sort_unstable_by_key(|&(k, _)| k);
        let consumer = consumer(mine[0].ret, table.into(), Arc::clone(&agent));
        let results = live.register_many(&targets, &consumer);
        let mut reg = agent.registered.lock().unwrap_or_else(|e| e.into_inner());
        for (r, row) in results.into_iter().zip(rows) {
            match r {
                Ok(k) => {
                    reg.push((k, consumer.clone()));
                    placed.push((k, row));
                    answer.push_str(&FromAgent::Registered(row).line());
                }
                Err(e) => {
                    refused = true;
                    answer.push_str(&FromAgent::Refused(row, refusal(&e)).line());
                }
            }
        }
    }
    if refused {
        // Nothing stays, and `main` must not run: the tracer reports the
        // refusal and kills this process (or goes away: then it ends).
        agent.unregister_all();
        answer.push_str(&FromAgent::Bye.line());
        let _ = out.write_all(answer.as_bytes());
        if preload.is_none() {
            // Loaded into a running process (-p): it runs on, untouched.
            return Ok(None);
        }
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
        // SAFETY: _exit ends the process at once; nothing is unwound.
        unsafe { libc::_exit(1) };
    }
    answer.push_str(&hit_paths(live, &placed, jump));
    answer.push_str(&FromAgent::Ready.line());
    // Relaxed: read back only by this process (`at_exit`), after this
    // thread's own store or in a forked child holding its copy.
    // SAFETY: getpid takes nothing and cannot fail.
    PID.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    let _ = AGENT.set(Arc::clone(&agent));
    watch_lifecycle(live, &agent);
    // SAFETY: `at_exit` is an `extern "C" fn()` that lives as long as the
    // process (this library is never unloaded while probes exist).
    unsafe { libc::atexit(at_exit) };
    out.write_all(answer.as_bytes())
        .map_err(|e| format!("answering the tracer: {e}"))?;
    Ok(Some((agent, reader)))
}

/// Jump-optimizes the registered probes if `jump` (one batch: one grace
/// period and one quiescence wait, before `main` runs for a spawned
/// command; the agent thread's periodic pass, [`serve`], optimizes the
/// probes of libraries loaded later) and answers each probe's hit path
/// (`j` lines).
/// A probe the optimizer refuses (an instruction it cannot relocate, a
/// function it cannot prove safe, a thread it cannot observe) keeps its
/// `int3`: the trap path counts it the same.
#[cfg(target_arch = "x86_64")]
fn hit_paths(live: &LiveUprobes, placed: &[(UprobeKey, usize)], jump: bool) -> String {
    if jump {
        let _ = live.optimize_now();
    } else {
        live.jump_optimizer().set_enabled(false);
    }
    placed
        .iter()
        .map(|&(k, row)| FromAgent::HitPath(row, jump && live.is_optimized(k)).line())
        .collect()
}

/// Every probe traps: jump optimization is x86_64 only.
#[cfg(not(target_arch = "x86_64"))]
fn hit_paths(_live: &LiveUprobes, placed: &[(UprobeKey, usize)], _jump: bool) -> String {
    placed
        .iter()
        .map(|&(_, row)| FromAgent::HitPath(row, false).line())
        .collect()
}

/// A registration's error as the tracer reports it: a refusal of code
/// the trap path calls says by which chain of calls it does.
fn refusal(e: &ProbeError) -> String {
    match e {
        ProbeError::RefusedTarget { addr, .. } => {
            match rcu_registry::probes::runtime::Live::global().explain_refusal(*addr) {
                Some(chain) => format!("{e} (the trap path: {chain})"),
                None => e.to_string(),
            }
        }
        _ => e.to_string(),
    }
}

/// The consumer of one spec (see the module docs).
fn consumer(ret: bool, table: Arc<[(UprobeKey, usize)]>, agent: Arc<Agent>) -> Consumer {
    fn row_of(table: &[(UprobeKey, usize)], key: UprobeKey) -> Option<usize> {
        table
            .binary_search_by_key(&key, |&(k, _)| k)
            .ok()
            .map(|i| table[i].1)
    }
    let (entry_table, entry_agent) = (Arc::clone(&table), Arc::clone(&agent));
    let entry = move |hit: &UprobeHit, regs: &mut Regs| {
        if on_agent_thread() {
            return ConsumerAction::Continue;
        }
        let Some(row) = row_of(&entry_table, hit.key) else {
            return ConsumerAction::Continue;
        };
        let a = &entry_agent;
        if a.at_entry[row] && called_by_agent(return_address(regs)) {
            return ConsumerAction::Continue;
        }
        let c = &a.rows[row];
        let now = if c.timed() || a.events { now_ns() } else { 0 };
        c.entry(0, regs.sp, now);
        if a.events {
            let mut vals = [0u64; ARGS];
            for (i, v) in vals.iter_mut().enumerate().take(a.args) {
                *v = regs.arg(i).unwrap_or(0);
            }
            a.ring.push(&Event {
                ret: false,
                row,
                tid: gettid(),
                ts: now,
                vals,
            });
        }
        ConsumerAction::Continue
    };
    match ret {
        false => Consumer::new(entry),
        true => Consumer::builder()
            .handler(entry)
            .ret_handler(move |r: &UprobeReturn, regs: &mut Regs| {
                if on_agent_thread() {
                    return;
                }
                let Some(row) = row_of(&table, r.key) else {
                    return;
                };
                if called_by_agent(r.ret_addr) {
                    return;
                }
                let now = now_ns();
                agent.rows[row].ret(0, regs.sp, now);
                if agent.events {
                    let mut vals = [0u64; ARGS];
                    vals[0] = r.retval;
                    agent.ring.push(&Event {
                        ret: true,
                        row,
                        tid: gettid(),
                        ts: now,
                        vals,
                    });
                }
            })
            .build(),
    }
}

/// The agent thread's start routine: marks the thread as the agent's
/// before anything else runs on it, then runs the boxed body.
extern "C" fn agent_thread(body: *mut libc::c_void) -> *mut libc::c_void {
    // Relaxed: this thread's own marker (see `on_agent_thread`).
    AGENT_TP.store(thread_pointer(), Ordering::Relaxed);
    // SAFETY: names the calling thread with a NUL-terminated string of
    // fewer than 16 bytes.
    unsafe { libc::pthread_setname_np(libc::pthread_self(), c"rcu-trace-agent".as_ptr()) };
    // SAFETY: `spawn_agent_thread` passed a leaked `Box<Box<dyn FnOnce()>>`
    // to this thread alone.
    let body = unsafe { Box::from_raw(body.cast::<Box<dyn FnOnce() + Send>>()) };
    body();
    std::ptr::null_mut()
}

/// Starts the agent thread running `body`: a bare `pthread_create`, not
/// `std::thread`, whose start-up code would run (allocate, register
/// thread-local destructors through the C library) before the thread
/// could mark itself as the agent's, and be counted as the program's
/// calls. Detached. Returns whether it started.
fn spawn_agent_thread(body: impl FnOnce() + Send + 'static) -> bool {
    let body: Box<Box<dyn FnOnce() + Send>> = Box::new(Box::new(body));
    let arg = Box::into_raw(body);
    // SAFETY: all-zero is a valid pthread_t to be written by create.
    let mut thread: libc::pthread_t = unsafe { std::mem::zeroed() };
    // SAFETY: `agent_thread` has the start routine's signature and takes
    // ownership of `arg`.
    let r =
        unsafe { libc::pthread_create(&mut thread, std::ptr::null(), agent_thread, arg.cast()) };
    if r != 0 {
        // SAFETY: the thread did not start: `arg` is still ours.
        drop(unsafe { Box::from_raw(arg) });
        return false;
    }
    // SAFETY: the thread just created; nobody joins it.
    unsafe { libc::pthread_detach(thread) };
    true
}

/// The agent thread (see the module docs).
fn serve(agent: Arc<Agent>, mut reader: BufReader<UnixStream>) {
    let _ = reader.get_ref().set_read_timeout(Some(PERIOD));
    let mut buf = [0u8; 64];
    loop {
        match reader.read(&mut buf) {
            // `q` or the end: the goodbye.
            Ok(0) => break,
            Ok(n) if buf[..n].contains(&b'q') => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
        // Acquire: pairs with the Release in `at_exit`: once the exit
        // flush is done there is nothing left to send.
        if DONE.load(Ordering::Acquire) {
            return;
        }
        agent.send(false);
        background_pass(&agent);
    }
    agent.unregister_all();
    agent.send(true);
}

/// The jump optimizer's background pass, on the agent thread (its calls
/// are not the program's, which a thread of the optimizer's own would
/// make: a probed `malloc` would count them): optimizes the probes of
/// libraries loaded since (and the lifecycle probes) when there are any.
fn background_pass(agent: &Agent) {
    #[cfg(target_arch = "x86_64")]
    if agent.jump {
        if let Ok(live) = LiveUprobes::global() {
            let _ = live.jump_optimizer().optimize_pending();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = agent;
}

/// At the program's exit: the counts (final if `_exit` is not probed).
extern "C" fn at_exit() {
    // SAFETY: getpid takes nothing and cannot fail.
    let me = unsafe { libc::getpid() };
    // Relaxed: see where `PID` is stored.
    if me != PID.load(Ordering::Relaxed) {
        return;
    }
    let Some(agent) = AGENT.get() else {
        return;
    };
    // Relaxed: this thread's own marker.
    BORROWED_TP.store(thread_pointer(), Ordering::Relaxed);
    // The C library flushes its streams after the `atexit` handlers (the
    // program's last `write`s): with `_exit` probed, that hit says
    // goodbye. Relaxed: stored by this process's constructor, before.
    agent.send(!EXIT_PROBED.load(Ordering::Relaxed));
    // Relaxed: this thread's own marker.
    BORROWED_TP.store(0, Ordering::Relaxed);
}

/// The consumer on the C library's `execve` (every `exec*` function calls
/// it) and `_exit` (which `exit` calls after the `atexit` handlers): what
/// the agent counted so far is sent before the image is replaced or the
/// process ends without `atexit` (`_exit` directly: the goodbye). Runs in
/// the SIGTRAP handler: `Agent::send` allocates nothing.
fn lifecycle_consumer(agent: Arc<Agent>, last: bool) -> Consumer {
    Consumer::new(move |_hit: &UprobeHit, regs: &mut Regs| {
        // SAFETY: getpid takes nothing and cannot fail.
        let me = unsafe { libc::getpid() };
        // Relaxed: see where `PID` is stored.
        if !on_agent_thread() && me == PID.load(Ordering::Relaxed) {
            match last {
                true => agent.send(true),
                false => exec_hit(&agent, regs),
            }
        }
        ConsumerAction::Continue
    })
}

/// Registers `lifecycle_consumer`s on `execve` and `_exit`; one refused
/// (code the runtime will not patch) leaves that path to `atexit` and the
/// periodic sends.
fn watch_lifecycle(live: &LiveUprobes, agent: &Arc<Agent>) {
    for (name, last) in [("execve", false), ("_exit", true)] {
        let c = lifecycle_consumer(Arc::clone(agent), last);
        if let Ok(r) = live.register(&UprobeTarget::symbol("libc.so.6", name), &c) {
            // Relaxed: read by `at_exit` on a thread that started later
            // or by this one.
            EXIT_PROBED.fetch_or(last, Ordering::Relaxed);
            agent
                .registered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((r.key(), c));
        }
    }
}
