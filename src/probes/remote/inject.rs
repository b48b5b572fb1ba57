//! System calls made *in* a traced process: a stopped thread is borrowed,
//! its registers set up for the call, its instruction pointer put on a
//! `syscall` instruction already in the process, one instruction stepped,
//! the result read and every register put back. This is how the tracer maps
//! the process's XOL area (`mmap`) without a helper library.
//!
//! No byte of the process is changed: the `syscall` instruction is one the
//! thread has just executed (a thread stopped in a system call sits right
//! after it) or two bytes `0f 05` found in the vDSO or another executable
//! mapping. A single-step runs exactly the instruction at the address set,
//! whatever the code around it, so the bytes need not be the start of an
//! instruction the process itself would run.
//!
//! `orig_rax` is set to -1 for the call: a thread stopped inside an
//! interrupted system call would otherwise have the kernel's restart logic
//! rewind its instruction pointer when it resumes. The saved registers
//! (the original `orig_rax` included) are restored afterwards, so the
//! interrupted call restarts as it would have.

use std::io;

use super::mem::RemoteMemory;
use super::ptrace::{self, Stop, Tid};
use super::stops::Stops;
use crate::probes::procmaps::Maps;

/// The `syscall` instruction.
const SYSCALL: [u8; 2] = [0x0f, 0x05];

/// Event stops tolerated before an injected system call's step completes.
const EVENT_RETRIES: usize = 64;
/// Signals held back at most before it completes: above a real-time
/// signal queue's usual backlog (the default `RLIMIT_SIGPENDING` of a user
/// is in the tens of thousands on a machine of some size, but a burst
/// that keeps coming faster than a step is a sender gone wild).
const SIGNAL_RETRIES: usize = 1 << 16;

/// Where a `syscall` instruction is in `pid`'s memory: right before the
/// thread's `rip` if it just made one, else the first found in the vDSO,
/// else in any executable mapping.
pub(super) fn find_syscall(mem: &RemoteMemory, rip: u64) -> io::Result<u64> {
    let mut before = [0u8; 2];
    if rip >= 2 && mem.read_at(rip - 2, &mut before).is_ok() && before == SYSCALL {
        return Ok(rip - 2);
    }
    let maps = Maps::read_pid(mem.pid())?;
    let exec = |m: &&crate::probes::procmaps::Mapping| m.prot & libc::PROT_EXEC != 0;
    let vdso = maps
        .mappings
        .iter()
        .filter(exec)
        .filter(|m| m.path == "[vdso]");
    let others = maps
        .mappings
        .iter()
        .filter(exec)
        .filter(|m| m.path != "[vdso]");
    for m in vdso.chain(others) {
        let len = (m.end - m.start).min(1 << 20) as usize;
        let mut bytes = vec![0u8; len];
        if mem.read_at(m.start, &mut bytes).is_err() {
            continue;
        }
        if let Some(i) = bytes.windows(2).position(|w| w == SYSCALL) {
            return Ok(m.start + i as u64);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no syscall instruction in the traced process",
    ))
}

/// Makes system call `nr` with `args` in the stopped thread `tid` of
/// process `pid`, using the `syscall` instruction at `gadget`. Returns the
/// call's raw result (a negative errno on failure). The thread's registers
/// are as before; a signal that arrived meanwhile is sent again.
pub(super) fn syscall(
    stops: &Stops,
    pid: Tid,
    tid: Tid,
    gadget: u64,
    nr: i64,
    args: [u64; 6],
) -> io::Result<i64> {
    let saved = ptrace::get_regs(tid)?;
    let mut call = saved;
    call.rax = nr as u64;
    call.orig_rax = u64::MAX;
    call.rdi = args[0];
    call.rsi = args[1];
    call.rdx = args[2];
    call.r10 = args[3];
    call.r8 = args[4];
    call.r9 = args[5];
    call.rip = gadget;
    ptrace::set_regs(tid, &call)?;
    let mut held = Vec::new();
    let result = step_over_call(stops, tid, &mut held);
    // Whatever happened, the thread gets its registers back.
    let restored = ptrace::set_regs(tid, &saved);
    for sig in held {
        // SAFETY: tgkill with plain integers; a thread that is gone makes
        // it fail harmlessly.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    }
    let rax = result?;
    restored?;
    Ok(rax)
}

/// Steps the thread over the `syscall` set up in its registers and returns
/// `rax`. A signal that arrives meanwhile stops the thread before the step
/// completes: it is held back (pushed on `held`, sent again by the caller
/// once the registers are back, since delivering it with the registers
/// borrowed would run the process's handler in the wrong state) and the
/// step retried. Each such stop takes one signal off the thread's queue,
/// so a backlog of queued (real-time) signals costs one retry each: only
/// retries for other stops count against [`EVENT_RETRIES`], and signals
/// against [`SIGNAL_RETRIES`] (a queue that never drains).
fn step_over_call(stops: &Stops, tid: Tid, held: &mut Vec<libc::c_int>) -> io::Result<i64> {
    let mut events = 0;
    while events < EVENT_RETRIES && held.len() < SIGNAL_RETRIES {
        ptrace::single_step(tid, 0)?;
        let status = stops.wait_for(tid)?;
        match ptrace::decode(status) {
            Stop::Signal(libc::SIGTRAP) => {
                let regs = ptrace::get_regs(tid)?;
                return Ok(regs.rax as i64);
            }
            Stop::Exited(_) | Stop::Killed(_) => {
                // The tracer's loop learns of the exit from the same stop.
                stops.push(tid, status);
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the traced thread exited during an injected system call",
                ));
            }
            Stop::Signal(sig) => held.push(sig),
            // An event stop before the step: retry.
            Stop::Event { .. } => events += 1,
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "an injected system call never completed its step",
    ))
}

/// `mmap(hint, len, prot, flags, -1, 0)` in the process: the address, or
/// the error.
#[allow(clippy::too_many_arguments)]
pub(super) fn mmap(
    stops: &Stops,
    pid: Tid,
    tid: Tid,
    gadget: u64,
    hint: u64,
    len: u64,
    prot: libc::c_int,
    flags: libc::c_int,
) -> io::Result<u64> {
    let r = syscall(
        stops,
        pid,
        tid,
        gadget,
        libc::SYS_mmap,
        [hint, len, prot as u64, flags as u64, u64::MAX, 0],
    )?;
    if (-4095..0).contains(&r) {
        return Err(io::Error::from_raw_os_error(-r as i32));
    }
    Ok(r as u64)
}
