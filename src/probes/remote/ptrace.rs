//! The `ptrace` requests and `waitpid` calls the remote tracer makes, as
//! small safe functions over the raw system calls. Every request is made by
//! the thread that attached the tracee (the kernel's rule: a tracee has one
//! tracing *thread*), which is why the tracer is `!Send`.

use std::io;

/// A thread id (`gettid`) of a traced thread; a process's main thread has
/// the process id.
pub type Tid = libc::pid_t;

/// `PTRACE_O_*` options set at every seize: threads, forks, `vfork`s and
/// `exec`s are reported as events.
pub(super) const OPTIONS: libc::c_int = libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACEEXEC;

fn request(req: libc::c_uint, tid: Tid, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every request made here passes either integers or a pointer
    // to a live, correctly sized buffer owned by the caller (see each
    // wrapper); the kernel validates the tracee.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `PTRACE_SEIZE` with [`OPTIONS`] (plus `extra`): the thread is traced
/// from now on without being stopped.
pub(super) fn seize(tid: Tid, extra: libc::c_int) -> io::Result<()> {
    seize_with(tid, OPTIONS | extra)
}

/// `PTRACE_SEIZE` with exactly the `PTRACE_O_*` `options`.
pub(super) fn seize_with(tid: Tid, options: libc::c_int) -> io::Result<()> {
    request(libc::PTRACE_SEIZE, tid, 0, options as usize).map(drop)
}

/// `PTRACE_INTERRUPT`: the thread stops (an event stop) soon.
pub(super) fn interrupt(tid: Tid) -> io::Result<()> {
    request(libc::PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}

/// Resumes a stopped thread, delivering `sig` (0: none).
pub(super) fn cont(tid: Tid, sig: libc::c_int) -> io::Result<()> {
    request(libc::PTRACE_CONT, tid, 0, sig as usize).map(drop)
}

/// Resumes a stopped thread for one instruction, delivering `sig`.
pub(super) fn single_step(tid: Tid, sig: libc::c_int) -> io::Result<()> {
    request(libc::PTRACE_SINGLESTEP, tid, 0, sig as usize).map(drop)
}

/// Leaves a thread in a group-stop stopped, to be told when it resumes.
pub(super) fn listen(tid: Tid) -> io::Result<()> {
    request(libc::PTRACE_LISTEN, tid, 0, 0).map(drop)
}

/// Stops tracing a stopped thread, which resumes with `sig`.
pub(super) fn detach(tid: Tid, sig: libc::c_int) -> io::Result<()> {
    request(libc::PTRACE_DETACH, tid, 0, sig as usize).map(drop)
}

/// The general registers of a stopped thread.
pub(super) fn get_regs(tid: Tid) -> io::Result<libc::user_regs_struct> {
    let mut regs = std::mem::MaybeUninit::<libc::user_regs_struct>::zeroed();
    request(libc::PTRACE_GETREGS, tid, 0, regs.as_mut_ptr() as usize)?;
    // SAFETY: zero-initialised plain integers, filled by the kernel.
    Ok(unsafe { regs.assume_init() })
}

/// Sets the general registers of a stopped thread.
pub(super) fn set_regs(tid: Tid, regs: &libc::user_regs_struct) -> io::Result<()> {
    request(
        libc::PTRACE_SETREGS,
        tid,
        0,
        regs as *const libc::user_regs_struct as usize,
    )
    .map(drop)
}

/// `NT_X86_XSTATE`: the `XSAVE` area (x87, SSE, AVX and later state) as
/// a register set of `PTRACE_GETREGSET`.
const NT_X86_XSTATE: usize = 0x202;

/// Bytes read for the `XSAVE` area: above every size the CPUs have now
/// (AVX-512 is 2,696 bytes, AMX tile data 11,008); the kernel copies its
/// real size and says how much.
const XSTATE_BUF: usize = 16 << 10;

/// The extended FP/vector state (`XSAVE` area) of a stopped thread, as
/// many bytes as the kernel keeps for it. `EINVAL`/`ENODEV` on a kernel or
/// CPU without `XSAVE`: [`get_fpregs`] then.
pub(super) fn get_xstate(tid: Tid) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_BUF];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    request(
        libc::PTRACE_GETREGSET,
        tid,
        NT_X86_XSTATE,
        &mut iov as *mut libc::iovec as usize,
    )?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Sets the extended FP/vector state of a stopped thread to `xstate`
/// (what [`get_xstate`] returned).
pub(super) fn set_xstate(tid: Tid, xstate: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        // The kernel only reads through this pointer (SETREGSET).
        iov_base: xstate.as_ptr() as *mut libc::c_void,
        iov_len: xstate.len(),
    };
    request(
        libc::PTRACE_SETREGSET,
        tid,
        NT_X86_XSTATE,
        &mut iov as *mut libc::iovec as usize,
    )
    .map(drop)
}

/// The x87 and SSE state (`FXSAVE` area) of a stopped thread.
pub(super) fn get_fpregs(tid: Tid) -> io::Result<libc::user_fpregs_struct> {
    let mut fp = std::mem::MaybeUninit::<libc::user_fpregs_struct>::zeroed();
    request(libc::PTRACE_GETFPREGS, tid, 0, fp.as_mut_ptr() as usize)?;
    // SAFETY: zero-initialised plain integers, filled by the kernel.
    Ok(unsafe { fp.assume_init() })
}

/// Sets the x87 and SSE state of a stopped thread.
pub(super) fn set_fpregs(tid: Tid, fp: &libc::user_fpregs_struct) -> io::Result<()> {
    request(
        libc::PTRACE_SETFPREGS,
        tid,
        0,
        fp as *const libc::user_fpregs_struct as usize,
    )
    .map(drop)
}

/// The message of the event the thread stopped for (a new thread's or
/// child's id).
pub(super) fn event_msg(tid: Tid) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    request(
        libc::PTRACE_GETEVENTMSG,
        tid,
        0,
        &mut msg as *mut libc::c_ulong as usize,
    )?;
    Ok(msg)
}

/// The `siginfo` of the signal the thread stopped with.
pub(super) fn siginfo(tid: Tid) -> io::Result<libc::siginfo_t> {
    let mut si = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    request(libc::PTRACE_GETSIGINFO, tid, 0, si.as_mut_ptr() as usize)?;
    // SAFETY: zero-initialised plain data, filled by the kernel.
    Ok(unsafe { si.assume_init() })
}

/// `waitpid(tid, __WALL | __WNOTHREAD | flags)`, retried on `EINTR`: the
/// thread that changed state and its status; `None` with `WNOHANG` and
/// nothing to report. `__WNOTHREAD`: only this thread's children and
/// tracees, never a child another thread of the program waits for.
pub(super) fn wait(tid: Tid, flags: libc::c_int) -> io::Result<Option<(Tid, libc::c_int)>> {
    loop {
        match wait_once(tid, flags) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

/// [`wait`] for any tracee, but `None` when a signal handler ran
/// (`EINTR`): the tracer's loop looks at what the handler recorded.
pub(super) fn wait_interruptible(flags: libc::c_int) -> io::Result<Option<(Tid, libc::c_int)>> {
    match wait_once(-1, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(None),
        r => r,
    }
}

fn wait_once(tid: Tid, flags: libc::c_int) -> io::Result<Option<(Tid, libc::c_int)>> {
    let mut status = 0;
    // SAFETY: `status` is a live c_int.
    let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::__WNOTHREAD | flags) };
    match r {
        r if r > 0 => Ok(Some((r, status))),
        0 => Ok(None),
        _ => Err(io::Error::last_os_error()),
    }
}

/// What a `waitpid` status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// The thread exited with this code (a process exits with its last).
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(libc::c_int),
    /// A `PTRACE_EVENT_*` stop (`event`), with the stop's signal.
    Event {
        event: libc::c_int,
        sig: libc::c_int,
    },
    /// A signal-delivery stop: `sig` is about to be delivered.
    Signal(libc::c_int),
}

/// Decodes a `waitpid` status.
pub(super) fn decode(status: libc::c_int) -> Stop {
    if libc::WIFEXITED(status) {
        return Stop::Exited(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        return Stop::Killed(libc::WTERMSIG(status));
    }
    let sig = libc::WSTOPSIG(status);
    let event = (status >> 16) & 0xff;
    if event != 0 {
        Stop::Event { event, sig }
    } else {
        Stop::Signal(sig)
    }
}

/// Whether `sig` is pending for thread `tid` itself (`SigPnd` in
/// `/proc/<tid>/status`: signals sent to the thread, a trap's included,
/// not yet taken).
pub(super) fn pending_for_thread(tid: Tid, sig: libc::c_int) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    signal_mask(&status, "SigPnd:") & (1u64 << (sig - 1)) != 0
}

/// The signals queued for thread `tid` alone that it would take as soon
/// as it runs: pending (`SigPnd`) and not blocked (`SigBlk`), as a mask
/// (bit `n - 1`: signal `n`; 0 if its status cannot be read).
pub(super) fn deliverable_for_thread(tid: Tid) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return 0;
    };
    signal_mask(&status, "SigPnd:") & !signal_mask(&status, "SigBlk:")
}

/// The signal mask `field` (`SigPnd:`, `SigBlk:`, ...) of a
/// `/proc/<tid>/status` text.
fn signal_mask(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}
