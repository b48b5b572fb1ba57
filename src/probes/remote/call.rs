//! Function calls made *in* a traced process: a stopped thread is
//! borrowed, its state saved, its registers set up for a System V call of
//! a function of the process, resumed until the function returns onto an
//! `int3` the tracer placed, and its state put back. `inject.rs` makes
//! system calls the same way with one step; a function runs for as long as
//! it likes (it may take locks, allocate, create threads), so the thread is
//! resumed and the other threads' stops that come meanwhile are handed to
//! the caller ([`OtherThreads`]).
//!
//! # The call
//!
//! - **State saved**: the general registers (`PTRACE_GETREGS`, `fs_base`
//!   and `orig_rax` included) and the whole extended FP/vector state
//!   (`PTRACE_GETREGSET NT_X86_XSTATE`: x87, SSE, AVX, AVX-512, whatever
//!   the CPU has; `PTRACE_GETFPREGS` where `XSAVE` is missing). The called
//!   code may clobber every caller-saved register, vector ones included;
//!   [`SavedThread::restore`] writes all of it back, FP state first.
//! - **Frame**: below the thread's stack pointer, past the 128-byte red
//!   zone a leaf function may be using, aligned to 16 bytes, with the
//!   return address (the tracer's `int3`) pushed: at the function's first
//!   instruction `rsp + 8` is a multiple of 16, as the ABI wants.
//!   Arguments in `rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`; `rax` 0 (no
//!   vector arguments, for variadic callees); the direction flag and the
//!   trap flag clear; the x87 and SSE control words at their ABI defaults
//!   (`FCW` 0x37f, `MXCSR` 0x1f80) with an empty x87 stack, whatever the
//!   interrupted code had.
//! - **System call restart**: a thread stopped inside an interrupted
//!   system call would have the kernel rewind its instruction pointer to
//!   restart it when resumed; `orig_rax` is set to -1 for the call (as
//!   `inject.rs` does), and the saved registers (the original `orig_rax`
//!   included) come back afterwards, so the interrupted call restarts as it
//!   would have.
//! - **The return**: the function returns onto the `int3`; the `SIGTRAP`
//!   stop with `rip` one past it is the call's end, `rax` its result.
//!
//! # Signals during the call
//!
//! A signal for the borrowed thread (sent to it, or to the process and
//! picked for it) stops it on its way; it is held back (the thread goes on
//! without it) and returned to the caller, which sends it again once the
//! thread's own state is back: its handler must run in the interrupted
//! code's context, not in the call's. A fault the call itself raises
//! (`SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, or `SIGTRAP` from an `int3`
//! other than ours, raised by the kernel) ends the call
//! with [`CallError::Faulted`]; the thread is left stopped there for the
//! caller to restore (whatever the called code had locked stays locked).

use std::io;

use super::mem::RemoteMemory;
use super::ptrace::{self, Stop, Tid};

/// The System V red zone: bytes below `rsp` a function may use without
/// moving it. The call's frame goes below them.
const RED_ZONE: u64 = 128;
/// `eflags` bits the ABI wants clear at a call: the trap flag (a stray
/// single-step) and the direction flag (string instructions go up).
const TF: u64 = 1 << 8;
const DF: u64 = 1 << 10;
/// The x87 control word and `MXCSR` a function may expect on entry (all
/// exceptions masked, round to nearest, double-extended precision).
const FCW_DEFAULT: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;
/// `si_code` above 0: a signal the kernel raised for an instruction (a
/// fault), not one sent with `kill`, `tgkill` or `sigqueue`.
const SI_FROM_KERNEL: i32 = 0;

/// A thread's FP/vector state, as the kernel gave it.
enum FpState {
    /// The `XSAVE` area.
    Xstate(Vec<u8>),
    /// The `FXSAVE` area (no `XSAVE`).
    Fxsave(Box<libc::user_fpregs_struct>),
}

/// Everything a call may change in a thread: its general registers and
/// its whole FP/vector state.
pub(super) struct SavedThread {
    regs: libc::user_regs_struct,
    fp: FpState,
}

impl SavedThread {
    /// Saves stopped thread `tid`'s state.
    pub(super) fn save(tid: Tid) -> io::Result<SavedThread> {
        let regs = ptrace::get_regs(tid)?;
        let fp = match ptrace::get_xstate(tid) {
            Ok(x) => FpState::Xstate(x),
            Err(_) => FpState::Fxsave(Box::new(ptrace::get_fpregs(tid)?)),
        };
        Ok(SavedThread { regs, fp })
    }

    /// The general registers saved.
    pub(super) fn regs(&self) -> &libc::user_regs_struct {
        &self.regs
    }

    /// Puts the saved state back into stopped thread `tid`: the FP/vector
    /// state, then the general registers.
    pub(super) fn restore(&self, tid: Tid) -> io::Result<()> {
        match &self.fp {
            FpState::Xstate(x) => ptrace::set_xstate(tid, x)?,
            FpState::Fxsave(f) => ptrace::set_fpregs(tid, f)?,
        }
        ptrace::set_regs(tid, &self.regs)
    }
}

/// What the caller does with the other threads of the process while a
/// call runs (they may be running: a thread that holds a lock the call
/// needs must be able to release it).
pub(super) trait OtherThreads {
    /// A `waitpid` status of another thread than the calling one (a thread
    /// the caller does not know yet is a new one, traced by the kernel
    /// since its creator was).
    fn stop(&mut self, tid: Tid, status: libc::c_int);
    /// The calling thread created thread `tid` (its first stop comes to
    /// [`stop`](Self::stop), before or after this).
    fn created(&mut self, tid: Tid);
}

/// Why a call did not return.
#[derive(Debug)]
pub(super) enum CallError {
    /// The called code raised this fault signal at this address; the
    /// thread is stopped there.
    Faulted {
        /// The signal.
        signal: libc::c_int,
        /// Where (`rip`).
        addr: u64,
    },
    /// The thread is gone (its process exited or was killed during the
    /// call).
    Gone,
    /// A `ptrace` request or `waitpid` failed.
    Os(io::Error),
}

impl From<io::Error> for CallError {
    fn from(e: io::Error) -> CallError {
        CallError::Os(e)
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Faulted { signal, addr } => {
                write!(f, "the call raised signal {signal} at {addr:#x}")
            }
            CallError::Gone => write!(f, "the thread exited during the call"),
            CallError::Os(e) => write!(f, "{e}"),
        }
    }
}

/// Calls `func(args...)` (at most six integer arguments) in stopped thread
/// `tid`, whose state before the call is `from` (the saved registers: the
/// stack the frame goes below), returning onto the `int3` at `ret`. The
/// thread is stopped on that `int3` afterwards, with the call's registers;
/// the caller restores it. Signals for the thread that came meanwhile are
/// pushed on `held` (module docs); the other threads' stops go to
/// `others`. Returns `rax`.
#[allow(clippy::too_many_arguments)]
pub(super) fn call(
    tid: Tid,
    from: &libc::user_regs_struct,
    func: u64,
    args: &[u64],
    ret: u64,
    mem: &RemoteMemory,
    others: &mut dyn OtherThreads,
    held: &mut Vec<libc::c_int>,
) -> Result<u64, CallError> {
    assert!(args.len() <= 6, "register arguments only");
    let mut r = *from;
    let frame = from.rsp.wrapping_sub(RED_ZONE) & !0xf;
    let sp = frame - 8;
    mem.write_at(sp, &ret.to_le_bytes())
        .map_err(|e| io::Error::other(format!("writing the call's return address: {e}")))?;
    let mut a = [0u64; 6];
    a[..args.len()].copy_from_slice(args);
    [r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9] = a;
    r.rax = 0;
    r.orig_rax = u64::MAX;
    r.rsp = sp;
    r.rip = func;
    r.eflags &= !(TF | DF);
    let mut fp = ptrace::get_fpregs(tid)?;
    fp.cwd = FCW_DEFAULT;
    fp.ftw = 0; // (the abridged tag word: every x87 register empty)
    fp.mxcsr = MXCSR_DEFAULT;
    ptrace::set_fpregs(tid, &fp)?;
    ptrace::set_regs(tid, &r)?;
    ptrace::cont(tid, 0)?;
    loop {
        let Some((t, status)) = ptrace::wait(-1, 0)? else {
            continue;
        };
        if t != tid {
            others.stop(t, status);
            continue;
        }
        match ptrace::decode(status) {
            Stop::Exited(_) | Stop::Killed(_) => return Err(CallError::Gone),
            Stop::Signal(libc::SIGTRAP) if ptrace::get_regs(tid)?.rip == ret + 1 => {
                return Ok(ptrace::get_regs(tid)?.rax);
            }
            Stop::Signal(
                sig @ (libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP),
            ) if ptrace::siginfo(tid)?.si_code > SI_FROM_KERNEL => {
                let addr = ptrace::get_regs(tid)?.rip;
                return Err(CallError::Faulted { signal: sig, addr });
            }
            Stop::Signal(sig) => {
                held.push(sig);
                ptrace::cont(tid, 0)?;
            }
            Stop::Event {
                event: libc::PTRACE_EVENT_CLONE,
                ..
            } => {
                others.created(ptrace::event_msg(tid)? as Tid);
                ptrace::cont(tid, 0)?;
            }
            // A group-stop that began meanwhile (the call goes on; the
            // thread rejoins the stop when it is let go), or any other
            // event.
            Stop::Event { .. } => ptrace::cont(tid, 0)?,
        }
    }
}
