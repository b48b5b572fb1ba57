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
//! trap sends anyone there) can never be inside them again.
//!
//! # The round
//!
//! 1. The ranges and one ack entry per thread listed in `/proc/self/task`
//!    (the caller excepted) are written to preallocated statics, under a new
//!    *generation* number.
//! 2. Each thread gets the quiescence signal with `tgkill`. Its handler
//!    reads the interrupted IP from the `ucontext_t`, and stores *outside*
//!    or *inside* into its entry with a compare-and-swap that expects this
//!    generation's *pending* value: an ack from a late signal of an older
//!    round can never be counted for this one.
//! 3. The caller polls the entries, sleeping between polls. A thread seen
//!    inside is signalled again after [`RESEND_INTERVAL`]; a thread that
//!    exited (`tgkill` fails with `ESRCH`) is quiescent.
//! 4. A thread whose signal stays unanswered and whose mask
//!    (`/proc/self/task/<tid>/status`, `SigBlk`) holds the signal at two
//!    checks [`BLOCKED_FOR`] apart is given up on and counted in
//!    [`QuiesceReport::blocked`]. After the timeout, threads that have not
//!    acked or are still inside are counted in [`QuiesceReport::timed_out`]. The caller then relies on the XOL
//!    area's reuse rule alone (a slot is only ever refilled with the same
//!    bytes for the same address), which is safe without quiescence.
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
//! - A thread interrupted *inside a slot* by another signal, and still in
//!   that signal's handler, is seen at its handler's IP: the slot IP is in
//!   the outer signal frame, which is not inspected.
//! - System calls that are never restarted after a handler (`poll`,
//!   `epoll_wait`, `nanosleep`, ...) return `EINTR` in the signalled threads,
//!   as with any signal. The wait is only run when boosted slots are retired.
//! - Threads beyond [`MAX_THREADS`] are handled in successive rounds.

use std::ops::Range;
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use crate::sync::Mutex;

/// Ack entries per round: threads beyond it are handled in further rounds.
/// 1024 covers ordinary thread pools at 16 KiB of static memory.
pub const MAX_THREADS: usize = 1024;

/// Distinct ranges the handler checks; more are merged into their hull
/// (a larger range only makes the wait more conservative).
const MAX_RANGES: usize = 64;

/// The default total wait before the fallback: long enough for a preempted
/// thread to be scheduled on a loaded machine, short enough for `commit`.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a thread seen inside is left before it is asked again: a slot is
/// a couple of instructions, so a thread seen inside was preempted there and
/// needs a scheduling slice, not a spin.
pub const RESEND_INTERVAL: Duration = Duration::from_millis(1);

/// How long an unanswered signal, and then a blocked mask, must last before
/// a thread is taken as blocking the signal for good: far longer than an
/// IPI or a scheduler slice, far shorter than [`QUIESCE_TIMEOUT`].
pub const BLOCKED_FOR: Duration = Duration::from_millis(20);

/// First and last poll sleep: most threads ack within microseconds (an IPI
/// to a running thread), a descheduled one within a scheduler tick.
const FIRST_POLL: Duration = Duration::from_micros(20);
const MAX_POLL: Duration = Duration::from_millis(1);

/// Offset of the first candidate signal above `SIGRTMIN`: glibc reserves
/// none above `SIGRTMIN` itself, but some runtimes take the first few.
const SIGNAL_OFFSET: libc::c_int = 3;

/// Ack states, in the low two bits of an entry's `ack` (the generation is
/// above them).
const PENDING: u64 = 0;
const OUTSIDE: u64 = 1;
const INSIDE: u64 = 2;

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
    /// Threads found blocking the signal (twice, [`BLOCKED_FOR`] apart) and
    /// not waited for any longer: the reuse rule covers them too.
    pub blocked: usize,
}

struct Entry {
    tid: AtomicI32,
    /// `generation << 2 | state`.
    ack: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ENTRY: Entry = Entry {
    tid: AtomicI32::new(0),
    ack: AtomicU64::new(0),
};
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

static ENTRIES: [Entry; MAX_THREADS] = [ENTRY; MAX_THREADS];
static ENTRY_COUNT: AtomicUsize = AtomicUsize::new(0);
/// `[start, end)` pairs.
static RANGES: [AtomicU64; 2 * MAX_RANGES] = [ZERO; 2 * MAX_RANGES];
static RANGE_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Even when stable, odd while the waiter rewrites ranges and entries.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Serializes waiters: the statics hold one round at a time.
static WAITER: Mutex<()> = Mutex::new(());

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

/// The quiescence signal's handler: acks with the interrupted IP's side.
extern "C" fn handle_quiesce(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    uctx: *mut libc::c_void,
) {
    // SAFETY: errno is a thread-local int; async-signal-safe to access.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid ucontext for an SA_SIGINFO handler.
    let ip = unsafe { (*uctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] }
        as u64;
    // SAFETY: gettid is async-signal-safe and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    ack(tid, ip);
    // SAFETY: see above.
    unsafe { *libc::__errno_location() = errno };
}

/// Records that thread `tid` was seen at `ip`, for the current generation.
fn ack(tid: i32, ip: u64) {
    // Acquire pairs with the Release store of the stable generation in
    // `publish`: the ranges and entries of that generation are visible.
    let gen = GENERATION.load(Ordering::Acquire);
    if gen & 1 != 0 {
        return; // being rewritten: the waiter signals again afterwards
    }
    // Relaxed (all below): ordered by the Acquire above; a value from a
    // newer, concurrent rewrite only makes the CAS below fail or be
    // overwritten by the waiter.
    let ranges = RANGE_COUNT.load(Ordering::Relaxed).min(MAX_RANGES);
    let inside = (0..ranges).any(|i| {
        let lo = RANGES[2 * i].load(Ordering::Relaxed);
        let hi = RANGES[2 * i + 1].load(Ordering::Relaxed);
        (lo..hi).contains(&ip)
    });
    let state = if inside { INSIDE } else { OUTSIDE };
    let n = ENTRY_COUNT.load(Ordering::Relaxed).min(MAX_THREADS);
    if let Some(e) = ENTRIES[..n]
        .iter()
        .find(|e| e.tid.load(Ordering::Relaxed) == tid)
    {
        // Release pairs with the waiter's Acquire poll (nothing else is
        // published, but the ack must not be seen before the IP was read).
        // Expecting this generation's PENDING: an ack from an older round's
        // late signal fails here.
        let _ = e.ack.compare_exchange(
            gen << 2 | PENDING,
            gen << 2 | state,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }
}

/// Writes a new generation's ranges and entries; returns the generation.
fn publish(ranges: &[Range<u64>], tids: &[i32]) -> u64 {
    let old = GENERATION.load(Ordering::Relaxed);
    let gen = old + 2;
    // Odd while rewriting: handlers that see it do nothing. SeqCst (store
    // and fence) so no rewrite below is seen before it by a handler that
    // then reads the stable value.
    GENERATION.store(old + 1, Ordering::SeqCst);
    crate::sync::atomic::fence(Ordering::SeqCst);
    RANGE_COUNT.store(ranges.len(), Ordering::Relaxed);
    for (i, r) in ranges.iter().enumerate() {
        RANGES[2 * i].store(r.start, Ordering::Relaxed);
        RANGES[2 * i + 1].store(r.end, Ordering::Relaxed);
    }
    ENTRY_COUNT.store(tids.len(), Ordering::Relaxed);
    for (e, &tid) in ENTRIES.iter().zip(tids) {
        e.ack.store(gen << 2 | PENDING, Ordering::Relaxed);
        e.tid.store(tid, Ordering::Relaxed);
    }
    // Release pairs with the handler's Acquire load: everything above is
    // visible to a handler that sees `gen`.
    GENERATION.store(gen, Ordering::Release);
    gen
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

/// Sends the quiescence signal to `tid`; false if it has exited.
fn signal(sig: libc::c_int, tid: i32) -> bool {
    // SAFETY: tgkill with our own pid only delivers a signal whose handler
    // we installed.
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
/// signalled again every [`RESEND_INTERVAL`]; one that exited counts as
/// quiescent. A thread that keeps the signal blocked is given up on after
/// about 2 x [`BLOCKED_FOR`] ([`QuiesceReport::blocked`]); threads not seen
/// outside by the deadline are counted in [`QuiesceReport::timed_out`]. Waits are
/// serialized process-wide. Empty `ranges` return at once.
///
/// Side effect on the signalled threads: a system call the kernel does not
/// restart after a handler (`poll`, `epoll_wait`, ...) returns `EINTR`.
/// A thread that was interrupted inside a range by *another* signal and is
/// still in that handler is seen at the handler's IP (outer frames are not
/// inspected).
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
    for batch in tids.chunks(MAX_THREADS) {
        round(sig, &ranges, batch, deadline, &mut report);
    }
    report
}

/// Whether `tid`, whose signal sent at `sent` is still unanswered, blocks
/// it and has for at least [`BLOCKED_FOR`]: checked from
/// `/proc/self/task/<tid>/status` (`SigBlk`) once the signal is
/// [`BLOCKED_FOR`] old, and again [`BLOCKED_FOR`] after a first sighting
/// (a thread in a probe handler blocks it briefly).
#[cold]
fn blocked_for_good(
    sig: libc::c_int,
    tid: i32,
    sent: Instant,
    since: &mut Option<Instant>,
) -> bool {
    let due = match *since {
        None => sent.elapsed() >= BLOCKED_FOR,
        Some(t) => t.elapsed() >= BLOCKED_FOR,
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

/// One round over at most [`MAX_THREADS`] threads.
#[cold]
fn round(
    sig: libc::c_int,
    ranges: &[Range<u64>],
    tids: &[i32],
    deadline: Instant,
    report: &mut QuiesceReport,
) {
    let gen = publish(ranges, tids);
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
    loop {
        let mut left = 0;
        for (i, e) in ENTRIES[..tids.len()].iter().enumerate() {
            if done[i] {
                continue;
            }
            // Acquire pairs with the handler's Release CAS.
            let ack = e.ack.load(Ordering::Acquire);
            match ack & 3 {
                OUTSIDE => done[i] = true,
                INSIDE if sent[i].elapsed() >= RESEND_INTERVAL => {
                    // Relaxed: the signal sent after it is what the handler
                    // answers, and the kernel's delivery orders the two.
                    let _ = e.ack.compare_exchange(
                        ack,
                        gen << 2 | PENDING,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    sent[i] = Instant::now();
                    report.resent += 1;
                    if !signal(sig, tids[i]) {
                        done[i] = true;
                        report.exited += 1;
                        continue;
                    }
                    left += 1;
                }
                _ => {
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
            return;
        }
        if Instant::now() >= deadline {
            report.timed_out += left;
            return;
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
