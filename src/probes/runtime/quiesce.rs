//! Quiescence of code ranges: wait until every thread of the process has
//! been seen with its instruction pointer outside a set of ranges (the XOL
//! slots being retired), a process-level stand-in for the kernel's RCU Tasks.
//!
//! # Why
//!
//! A thread sent into a *boosted* XOL slot runs the slot after its SIGTRAP
//! handler has returned: in no `Rcu` read section, counted nowhere. It can
//! be preempted at the slot's first byte, so the grace period of `commit`
//! does not prove that it has left. Observing every thread's IP does: a
//! thread seen *outside* the slots after the grace period (after which no
//! trap sends anyone there) can never be inside them again (but see "What a
//! wait proves" for threads inside another signal's handler).
//!
//! # The round
//!
//! 1. The ranges and one ack entry per thread listed in `/proc/self/task`
//!    (the caller excepted) are written to a preallocated static table,
//!    under a new *generation* number (`probes/quiesce_ack.rs`, `AckTable`).
//! 2. Each thread gets the quiescence signal with `tgkill`. Its handler
//!    reads the interrupted IP from the `ucontext_t`, and stores *outside*
//!    or *inside* into its entry with a compare-and-swap that expects this
//!    generation's *pending* value: an ack from a late signal of an older
//!    round can never be counted for this one (the loom model
//!    `loom-tests/tests/quiesce.rs` checks this, and that a plain store
//!    would not do).
//! 3. The caller polls the entries, sleeping between polls. A thread seen
//!    inside is signalled again after [`QUIESCE_RESEND_INTERVAL`]; a thread that
//!    exited (`tgkill` fails with `ESRCH`, checked again with signal 0 for a
//!    thread whose answer is overdue: one listed while it was exiting takes
//!    the signal and never answers) is quiescent.
//! 4. A thread whose signal stays unanswered and whose mask
//!    (`/proc/self/task/<tid>/status`, `SigBlk`) holds the signal at two
//!    checks [`QUIESCE_SIGNAL_BLOCKED_AFTER`] apart is given up on and counted in
//!    [`QuiesceReport::blocked`]. After the timeout, threads that have not
//!    acked or are still inside are counted in [`QuiesceReport::timed_out`].
//!
//! # What a wait proves
//!
//! A thread seen outside the ranges *after the caller's grace period* (after
//! which nothing sends a thread into them) cannot be in them later, with one
//! exception: the IP read is the innermost frame's. A thread interrupted
//! inside a range by *another* signal, and still in that signal's handler,
//! is seen at the handler's IP, and returns into the range when the handler
//! returns. The handler also reads the interrupted signal mask: the kernel
//! runs a handler with its own signal blocked (unless `SA_NODEFER`) and its
//! `sa_mask` added, so a thread interrupted with an **empty** mask is in no
//! such handler, except one installed with `SA_NODEFER` and an empty
//! `sa_mask`, which the waiter looks for among the current dispositions
//! after the acks (if there is one, no outside ack counts as proof).
//! Threads seen outside with a non-empty mask are counted in
//! [`QuiesceReport::nested`]; they do not hold the wait up (a thread that
//! keeps some signal blocked for good would otherwise always time out).
//!
//! [`QuiesceReport::proves_quiescence`] is true when every thread was seen
//! outside with an empty mask or exited. Only then does the XOL area hand
//! the retired slots out for other code; otherwise it relies on its reuse
//! rule (a slot is only ever refilled with the same bytes for the same
//! address), which is safe without quiescence.
//!
//! # The signal
//!
//! The first real-time signal from `SIGRTMIN + 3` up whose disposition is
//! `SIG_DFL` (i.e. no one uses it), chosen once per process; see
//! [`quiesce_signal`]. Its handler is installed with `SA_SIGINFO |
//! SA_RESTART`, is async-signal-safe (atomics on static memory, `gettid`),
//! and saves `errno`. The SIGTRAP handler blocks every asynchronous signal,
//! so a thread in a trap is observed after it, never in the middle.
//!
//! # Limits
//!
//! - Nested handlers are detected through the mask (above), not by walking
//!   the signal frames: a run of an `SA_NODEFER` handler with an empty
//!   `sa_mask` that is still going after its disposition was changed is not
//!   seen as one, and a thread that keeps a signal blocked for good never
//!   yields a proof.
//! - System calls that are never restarted after a handler (`poll`,
//!   `epoll_wait`, `nanosleep`, ...) return `EINTR` in the signalled threads,
//!   as with any signal. The wait is only run when boosted slots are retired.
//! - A thread that exits unanswered while its tid is already reused by a new
//!   thread (which never got the signal) is waited for until the timeout,
//!   then counted in `timed_out`: slow and unproven, never wrong.
//! - Threads beyond [`QUIESCE_ACKS_PER_ROUND`] are handled in successive rounds.

use std::ops::Range;
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::sync::atomic::{AtomicI32, Ordering};
use crate::sync::Mutex;

use crate::probes::quiesce_ack::{Ack, AckTable};

/// Ack entries per round: threads beyond it are handled in further rounds.
/// 1024 covers ordinary thread pools at 12 KiB of static memory.
pub const QUIESCE_ACKS_PER_ROUND: usize = 1024;

/// Distinct ranges the handler checks; more are merged into their hull
/// (a larger range only makes the wait more conservative).
const MAX_RANGES: usize = 64;

/// The default total wait before the fallback: long enough for a preempted
/// thread to be scheduled on a loaded machine, short enough for `commit`.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a thread seen inside is left before it is asked again: a slot is
/// a couple of instructions, so a thread seen inside was preempted there and
/// needs a scheduling slice, not a spin.
pub const QUIESCE_RESEND_INTERVAL: Duration = Duration::from_millis(1);

/// How long an unanswered signal, and then a blocked mask, must last before
/// a thread is taken as blocking the signal for good: far longer than an
/// IPI or a scheduler slice, far shorter than [`QUIESCE_TIMEOUT`].
pub const QUIESCE_SIGNAL_BLOCKED_AFTER: Duration = Duration::from_millis(20);

/// First and last poll sleep: most threads ack within microseconds (an IPI
/// to a running thread), a descheduled one within a scheduler tick.
const FIRST_POLL: Duration = Duration::from_micros(20);
const MAX_POLL: Duration = Duration::from_millis(1);

/// Offset of the first candidate signal above `SIGRTMIN`: glibc reserves
/// none above `SIGRTMIN` itself, but some runtimes take the first few.
const SIGNAL_OFFSET: libc::c_int = 3;

/// What one quiescence wait saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuiesceReport {
    /// Threads signalled (every thread but the caller).
    pub threads: usize,
    /// Threads that exited before acking.
    pub exited: usize,
    /// Extra signals sent to threads seen inside the ranges.
    pub resent: usize,
    /// Threads that did not ack outside before the timeout: the caller falls
    /// back to the reuse rule for them.
    pub timed_out: usize,
    /// Threads found blocking the signal (twice, [`QUIESCE_SIGNAL_BLOCKED_AFTER`] apart) and
    /// not waited for any longer: the reuse rule covers them too.
    pub blocked: usize,
    /// Threads seen outside the ranges but possibly inside another signal's
    /// handler, whose interrupted IP (in an outer frame, not inspected)
    /// could be inside them: interrupted with a non-empty signal mask (a
    /// handler runs with its own signal blocked, unless `SA_NODEFER`), or
    /// any thread seen outside while some handler is installed with
    /// `SA_NODEFER` and an empty `sa_mask` (its runs leave no trace in the
    /// mask). The wait does not hold them up; the reuse rule covers them.
    pub nested: usize,
}

impl QuiesceReport {
    /// Whether the wait *proves* that no thread can execute the ranges any
    /// more: every thread was seen outside them with an empty signal mask,
    /// or exited (no thread timed out, blocked the signal or was
    /// [`nested`](Self::nested)). Only then may the XOL area hand the
    /// retired slots out for other code.
    pub fn proves_quiescence(&self) -> bool {
        self.timed_out == 0 && self.blocked == 0 && self.nested == 0
    }

    /// Threads the wait could not prove outside (timed out, blocked or
    /// nested).
    pub fn unproven(&self) -> usize {
        self.timed_out + self.blocked + self.nested
    }
}

/// The round's ranges and ack entries: static, because the signal handler
/// reaches them without a pointer.
static TABLE: AckTable<QUIESCE_ACKS_PER_ROUND, MAX_RANGES> = AckTable::new();
/// Serializes waiters: the table holds one round at a time.
static WAITER: Mutex<()> = Mutex::new(());

/// Takes the waiters' lock for the fork handlers: no round is under way
/// when the process forks (its table is idle in the child) and the child's
/// lock is free.
pub(crate) fn hold_for_fork() -> crate::sync::MutexGuard<'static, ()> {
    WAITER.lock().unwrap_or_else(|e| e.into_inner())
}

static INSTALL: Once = Once::new();
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The real-time signal used for quiescence (installed on first call), or
/// `None` if every candidate was already in use.
pub fn quiesce_signal() -> Option<libc::c_int> {
    INSTALL.call_once(|| {
        for sig in (libc::SIGRTMIN() + SIGNAL_OFFSET)..=libc::SIGRTMAX() {
            // SAFETY: all-zero is a valid sigaction; a null new action only
            // reads the current disposition.
            let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: see above.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } != 0
                || cur.sa_sigaction != libc::SIG_DFL
            {
                continue;
            }
            // SAFETY: all-zero is valid; the mask call only writes `new`.
            let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
            new.sa_sigaction = handle_quiesce as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            // SAFETY: see above.
            unsafe { libc::sigemptyset(&mut new.sa_mask) };
            // SAFETY: `new` is initialised, its handler has the SA_SIGINFO
            // signature.
            if unsafe { libc::sigaction(sig, &new, std::ptr::null_mut()) } == 0 {
                // Relaxed: `Once` orders it before every caller's load.
                SIGNAL.store(sig, Ordering::Relaxed);
                return;
            }
        }
    });
    // Relaxed: written inside the `Once`, which synchronizes with us.
    Some(SIGNAL.load(Ordering::Relaxed)).filter(|&s| s != 0)
}

/// The quiescence signal's handler: acks with the interrupted IP's side,
/// and whether the interrupted signal mask was empty.
extern "C" fn handle_quiesce(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    uctx: *mut libc::c_void,
) {
    // SAFETY: errno is a thread-local int; async-signal-safe to access.
    let errno = unsafe { *libc::__errno_location() };
    let uctx = uctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a valid ucontext for an SA_SIGINFO handler.
    let ip = super::context::frame_ip(unsafe { &*uctx });
    // SAFETY: as above; `sigset_t` is at least 8 bytes, 8-aligned, and the
    // kernel's 64-signal mask is its first word on x86_64 and arm64.
    let mask = unsafe { *std::ptr::addr_of!((*uctx).uc_sigmask).cast::<u64>() };
    // SAFETY: gettid is async-signal-safe and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    TABLE.ack(tid, ip, mask != 0);
    // Every thread takes this signal: its x87 state is marked unused again
    // if it is (`x87_state.rs`).
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the ucontext the kernel passed us, ours alone.
    unsafe {
        super::x87_state::settle_x87(uctx)
    };
    // SAFETY: see above.
    unsafe { *libc::__errno_location() = errno };
}

/// Whether some signal has a handler installed with `SA_NODEFER` and an
/// empty `sa_mask`: such a handler runs with the mask it interrupted, so a
/// thread inside it may be seen with an empty mask (see
/// [`QuiesceReport::nested`]).
#[cold]
fn unmasked_handler_installed() -> bool {
    (1..=libc::SIGRTMAX()).any(|sig| {
        // SAFETY: all-zero is a valid sigaction; a null new action only
        // reads the current disposition.
        let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
            return false;
        }
        let handler = cur.sa_sigaction != libc::SIG_DFL && cur.sa_sigaction != libc::SIG_IGN;
        // SAFETY: `sa_mask` is an initialised set; sigismember only reads it.
        let empty_mask = (1..=64).all(|s| unsafe { libc::sigismember(&cur.sa_mask, s) } != 1);
        handler && cur.sa_flags & libc::SA_NODEFER != 0 && empty_mask
    })
}

/// Sorted, merged ranges, at most [`MAX_RANGES`] (else their hull).
fn normalize(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    if out.len() > MAX_RANGES {
        let hull = out[0].start..out[out.len() - 1].end;
        out = vec![hull];
    }
    out
}

/// The process's threads, the caller excepted.
fn other_threads() -> Vec<i32> {
    // SAFETY: gettid cannot fail.
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&t| t != me)
        .collect()
}

/// Sends `sig` (the quiescence signal, or 0 to check existence only) to
/// `tid`; false if it has exited.
fn signal(sig: libc::c_int, tid: i32) -> bool {
    // SAFETY: tgkill with our own pid only delivers a signal whose handler
    // we installed (or, for 0, nothing).
    let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
    // SAFETY: errno is thread-local.
    r == 0 || unsafe { *libc::__errno_location() } != libc::ESRCH
}

/// Waits until every other thread of the process has been seen with its IP
/// outside `ranges`, or `timeout` has passed; the live registry's `commit`
/// runs it on retired boosted XOL slots with [`QUIESCE_TIMEOUT`].
///
/// Each thread listed in `/proc/self/task` (the caller excepted) gets the
/// [quiescence signal](quiesce_signal) with `tgkill`; its handler reads the
/// interrupted IP and acks *outside* or *inside*. A thread seen inside is
/// signalled again every [`QUIESCE_RESEND_INTERVAL`]; one that exited counts as
/// quiescent. A thread that keeps the signal blocked is given up on after
/// about 2 x [`QUIESCE_SIGNAL_BLOCKED_AFTER`] ([`QuiesceReport::blocked`]); threads not seen
/// outside by the deadline are counted in [`QuiesceReport::timed_out`].
/// Waits are serialized process-wide. Empty `ranges` return at once.
///
/// Side effect on the signalled threads: a system call the kernel does not
/// restart after a handler (`poll`, `epoll_wait`, ...) returns `EINTR`.
/// A thread that was interrupted inside a range by *another* signal and is
/// still in that handler is seen at the handler's IP (outer frames are not
/// inspected): the wait returns, but such a thread (recognised by its
/// non-empty interrupted signal mask) is counted in
/// [`QuiesceReport::nested`], and the report then does not
/// [prove quiescence](QuiesceReport::proves_quiescence).
///
/// Never call it from a signal handler: it allocates, locks and sleeps.
pub fn quiesce(ranges: &[Range<u64>], timeout: Duration) -> QuiesceReport {
    let ranges = normalize(ranges);
    let mut report = QuiesceReport::default();
    if ranges.is_empty() {
        return report;
    }
    let Some(sig) = quiesce_signal() else {
        let n = other_threads().len();
        return QuiesceReport {
            threads: n,
            blocked: n,
            ..report
        };
    };
    let _serial = WAITER.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = Instant::now() + timeout;
    let tids = other_threads();
    report.threads = tids.len();
    let mut outside = 0;
    for batch in tids.chunks(QUIESCE_ACKS_PER_ROUND) {
        outside += round(sig, &ranges, batch, deadline, &mut report);
    }
    // Checked after the acks (so a handler installed during the wait is
    // seen too), and only when it decides the verdict: the scan is 64
    // `sigaction` calls, 15-35 us.
    if report.proves_quiescence() && outside > 0 && unmasked_handler_installed() {
        report.nested += outside;
    }
    report
}

/// Whether `tid`, whose signal sent at `sent` is still unanswered, blocks
/// it and has for at least [`QUIESCE_SIGNAL_BLOCKED_AFTER`]: checked from
/// `/proc/self/task/<tid>/status` (`SigBlk`) once the signal is
/// [`QUIESCE_SIGNAL_BLOCKED_AFTER`] old, and again [`QUIESCE_SIGNAL_BLOCKED_AFTER`] after a first sighting
/// (a thread in a probe handler blocks it briefly).
#[cold]
fn blocked_for_good(
    sig: libc::c_int,
    tid: i32,
    sent: Instant,
    since: &mut Option<Instant>,
) -> bool {
    let due = match *since {
        None => sent.elapsed() >= QUIESCE_SIGNAL_BLOCKED_AFTER,
        Some(t) => t.elapsed() >= QUIESCE_SIGNAL_BLOCKED_AFTER,
    };
    if !due {
        return false;
    }
    if !blocks(sig, tid) {
        *since = None;
        return false;
    }
    match *since {
        None => {
            *since = Some(Instant::now());
            false
        }
        Some(_) => true,
    }
}

/// Whether `tid`'s signal mask (`SigBlk` in its status file) holds `sig`.
fn blocks(sig: libc::c_int, tid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1u64 << (sig - 1)) != 0)
}

/// One round over at most [`QUIESCE_ACKS_PER_ROUND`] threads; returns how many were
/// seen outside with an empty signal mask (what the caller discounts if a
/// handler installed with `SA_NODEFER` and an empty `sa_mask` exists).
#[cold]
fn round(
    sig: libc::c_int,
    ranges: &[Range<u64>],
    tids: &[i32],
    deadline: Instant,
    report: &mut QuiesceReport,
) -> usize {
    let round = TABLE.publish(ranges, tids);
    let mut done = vec![false; tids.len()];
    let mut sent = vec![Instant::now(); tids.len()];
    let mut blocked_since: Vec<Option<Instant>> = vec![None; tids.len()];
    for (i, &tid) in tids.iter().enumerate() {
        if !signal(sig, tid) {
            done[i] = true;
            report.exited += 1;
        }
    }
    let mut poll = FIRST_POLL;
    let mut outside = 0;
    loop {
        let mut left = 0;
        for i in 0..tids.len() {
            if done[i] {
                continue;
            }
            match TABLE.poll(round, i) {
                Ack::Outside => {
                    done[i] = true;
                    outside += 1;
                }
                Ack::OutsideNested => {
                    done[i] = true;
                    report.nested += 1;
                }
                Ack::Inside if sent[i].elapsed() >= QUIESCE_RESEND_INTERVAL => {
                    TABLE.rearm(round, i);
                    sent[i] = Instant::now();
                    report.resent += 1;
                    if !signal(sig, tids[i]) {
                        done[i] = true;
                        report.exited += 1;
                        continue;
                    }
                    left += 1;
                }
                Ack::Inside => left += 1,
                Ack::Pending => {
                    // A thread listed while it was exiting takes the signal
                    // and never answers: once the answer is overdue, check
                    // that it still exists (signal 0 only checks).
                    if sent[i].elapsed() >= QUIESCE_RESEND_INTERVAL && !signal(0, tids[i]) {
                        done[i] = true;
                        report.exited += 1;
                        continue;
                    }
                    if blocked_for_good(sig, tids[i], sent[i], &mut blocked_since[i]) {
                        done[i] = true;
                        report.blocked += 1;
                        continue;
                    }
                    left += 1;
                }
            }
        }
        if left == 0 {
            return outside;
        }
        if Instant::now() >= deadline {
            report.timed_out += left;
            return outside;
        }
        crate::sync::thread::sleep(poll);
        poll = (poll * 2).min(MAX_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_sorted_merged_and_capped_to_their_hull() {
        assert_eq!(normalize(&[5..9, 1..3, 2..4, 7..7]), vec![1..4, 5..9]);
        let many: Vec<_> = (0..100u64).map(|i| i * 10..i * 10 + 1).collect();
        assert_eq!(normalize(&many), vec![0..991]);
    }
}
