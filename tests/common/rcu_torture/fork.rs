//! `fork()` while readers, writers and callback workers are busy, and the
//! checks the child runs.
//!
//! # The child
//!
//! Only the forking thread exists in the child. It arms a watchdog
//! (`alarm`, whose default action kills it) so that a wedged grace period or
//! barrier ends the child instead of hanging the test, silences the panic
//! hook (printing could block on a lock some parent thread held at fork),
//! runs [`child_checks`] and leaves with `_exit`: no destructors, no atexit
//! handlers, no flushing of buffers inherited from the parent. Each failed
//! step exits with its own code, which the parent turns into a message.
//!
//! The child only runs callbacks that touch atomics: callbacks of the pools'
//! domains take the pools' mutexes, which a parent thread may have held at
//! the instant of the fork, so the child synchronizes those domains but does
//! not wait for their callbacks.

use rcu_registry::rcu::{Rcu, Srcu};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seconds before the child's watchdog kills it.
const CHILD_WATCHDOG_SECS: u32 = 20;
/// How long the parent waits for the child before killing it (longer than
/// the child's own watchdog, so the watchdog normally reports first).
const PARENT_WAIT: Duration = Duration::from_secs(30);

/// The domains the child exercises.
#[derive(Clone)]
pub struct ForkTargets {
    /// The callback-flood domain: the child inherits its backlog and must
    /// be able to queue more and run them.
    pub flood: Rcu,
    /// An `Srcu` instance a parent thread is reading at the fork.
    pub held_srcu: Srcu,
    /// The pools' domains: synchronized in the child, callbacks not awaited.
    pub pool_rcu: Rcu,
    /// See `pool_rcu`.
    pub pool_srcu: Srcu,
}

const EXIT_PANIC: i32 = 2;
const EXIT_STILL_READING: i32 = 10;
const EXIT_FRESH_RCU_CALLBACKS: i32 = 11;
const EXIT_GLOBAL_RCU_CALLBACKS: i32 = 12;
const EXIT_FLOOD_CALLBACKS: i32 = 13;
const EXIT_SRCU_CALLBACKS: i32 = 14;
const EXIT_POLL: i32 = 15;

fn describe_exit(code: i32) -> &'static str {
    match code {
        EXIT_PANIC => "a check panicked",
        EXIT_STILL_READING => "the forking thread believed it was inside an Rcu read section",
        EXIT_FRESH_RCU_CALLBACKS => "callbacks of an Rcu::new() made in the child did not all run",
        EXIT_GLOBAL_RCU_CALLBACKS => "Rcu::global() callbacks did not all run after barrier()",
        EXIT_FLOOD_CALLBACKS => "the flood domain's new callbacks did not run after barrier()",
        EXIT_SRCU_CALLBACKS => "Srcu callbacks did not run after barrier()",
        EXIT_POLL => "a polled Rcu cookie was not complete after cond_synchronize()",
        _ => "unknown failure",
    }
}

/// Runs `n` counting callbacks through `call` and waits with `barrier`;
/// true if all ran.
fn callbacks_run(call: impl Fn(Box<dyn FnOnce() + Send>), barrier: impl Fn(), n: usize) -> bool {
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..n {
        let ran = Arc::clone(&ran);
        call(Box::new(move || {
            ran.fetch_add(1, Ordering::Relaxed);
        }));
    }
    barrier();
    // Relaxed: barrier() orders the callbacks' effects before its return.
    ran.load(Ordering::Relaxed) == n
}

/// The child's steps, by the number it writes into its [`Stage`] before
/// each: what the parent names when the child's watchdog killed it.
const STAGES: [&str; 10] = [
    "starting",
    "Rcu::global().synchronize()",
    "the pools' Rcu synchronize()",
    "the pools' Srcu synchronize()",
    "the held Srcu's synchronize()",
    "call() and barrier() of an Rcu::new() made in the child",
    "Rcu::global() call() and barrier()",
    "the flood domain's call() and barrier()",
    "the held Srcu's call() and barrier()",
    "Rcu::global() start_poll() and cond_synchronize()",
];

/// A word the child shares with its parent (a shared anonymous page): the
/// step the child is in, so that a child its watchdog killed says where it
/// hung.
pub struct Stage(*mut AtomicU32);

impl Stage {
    /// A fresh page; `None` if it cannot be mapped (the checks run anyway,
    /// without the report).
    pub fn new() -> Option<Stage> {
        // SAFETY: an anonymous shared mapping of one page, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Stage(p.cast()))
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: the page is mapped (zeroed) until `drop`, and an
        // `AtomicU32` is valid for any bits.
        unsafe { &*self.0 }
    }

    /// The child: it is now in step `n`.
    fn set(&self, n: u32) {
        // Relaxed: read by the parent after `waitpid`, which orders it.
        self.word().store(n, Ordering::Relaxed);
    }

    /// The parent, after the child ended: the step it was last in.
    fn name(&self) -> &'static str {
        // Relaxed: see `set`.
        STAGES
            .get(self.word().load(Ordering::Relaxed) as usize)
            .copied()
            .unwrap_or("an unknown step")
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // SAFETY: the page mapped in `new`, unmapped once.
        unsafe { libc::munmap(self.0.cast(), 4096) };
    }
}

/// What the child checks: grace periods complete although threads that were
/// reading at the fork are gone, callbacks run (new workers replace the
/// parent's), polled cookies complete. Returns the exit code.
fn child_checks(t: &ForkTargets, stage: Option<&Stage>) -> i32 {
    let at = |n: u32| {
        if let Some(s) = stage {
            s.set(n);
        }
    };
    if Rcu::in_read_section() {
        return EXIT_STILL_READING;
    }
    let global = Rcu::global();
    at(1);
    global.synchronize();
    at(2);
    t.pool_rcu.synchronize();
    at(3);
    t.pool_srcu.synchronize();
    at(4);
    t.held_srcu.synchronize();

    at(5);
    let fresh = Rcu::new();
    if !callbacks_run(|f| fresh.call(f), || fresh.barrier(), 3) {
        return EXIT_FRESH_RCU_CALLBACKS;
    }
    at(6);
    if !callbacks_run(|f| global.call(f), || global.barrier(), 3) {
        return EXIT_GLOBAL_RCU_CALLBACKS;
    }
    at(7);
    if !callbacks_run(|f| t.flood.call(f), || t.flood.barrier(), 1000) {
        return EXIT_FLOOD_CALLBACKS;
    }
    at(8);
    if !callbacks_run(|f| t.held_srcu.call(f), || t.held_srcu.barrier(), 3) {
        return EXIT_SRCU_CALLBACKS;
    }
    at(9);
    let cookie = global.start_poll();
    global.cond_synchronize(cookie);
    if !global.poll(&cookie) {
        return EXIT_POLL;
    }
    0
}

fn child(checks: impl FnOnce() -> i32) -> ! {
    // SAFETY: alarm() only arms a timer; async-signal-safe.
    unsafe { libc::alarm(CHILD_WATCHDOG_SECS) };
    std::panic::set_hook(Box::new(|_| {}));
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks)).unwrap_or(EXIT_PANIC);
    // SAFETY: _exit ends the process without running any user-space
    // cleanup, which is what a forked child of a threaded process needs.
    unsafe { libc::_exit(code) }
}

/// Forks; the child runs [`child_checks`], the parent waits for it (killing
/// it after [`PARENT_WAIT`]). Returns how long the child took.
pub fn fork_and_check(t: &ForkTargets) -> Result<Duration, String> {
    let stage = Stage::new();
    fork_and_run(|| child_checks(t, stage.as_ref())).map_err(|e| match &stage {
        Some(s) => format!("{e}; its last step: {}", s.name()),
        None => e,
    })
}

/// Forks; the child runs `checks` (under the watchdog) and exits with the
/// code it returns; the parent waits for it as in [`fork_and_check`].
pub fn fork_and_run(checks: impl FnOnce() -> i32) -> Result<Duration, String> {
    let start = Instant::now();
    // SAFETY: the child only runs `child`, which sticks to work that glibc
    // supports after fork() in a threaded process (malloc, thread creation,
    // futexes, atomics) and ends with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork failed: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        child(checks);
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child, `status` a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            return Err(format!(
                "waitpid failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        if start.elapsed() > PARENT_WAIT {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(format!(
                "forked child hung for {PARENT_WAIT:?} and was killed"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(start.elapsed()),
            c => Err(format!("forked child exited {c}: {}", describe_exit(c))),
        }
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let why = if sig == libc::SIGALRM {
            " (its watchdog: a grace period, call() or barrier() hung in the child)"
        } else {
            ""
        };
        Err(format!("forked child killed by signal {sig}{why}"))
    } else {
        Err(format!("forked child ended with status {status:#x}"))
    }
}

/// A request to the holder thread: enter the sections, report, wait.
pub struct Hold {
    /// Signalled once the holder is inside its sections.
    pub inside: mpsc::SyncSender<()>,
    /// The holder leaves its sections when this is signalled (or dropped).
    pub release: mpsc::Receiver<()>,
}

/// The holder thread's loop: for every request, enter an `Rcu` and an `Srcu`
/// read section and stay inside until released, so that a fork happens
/// while a thread is inside both.
pub fn holder(requests: mpsc::Receiver<Hold>, rcu: Rcu, srcu: Srcu) {
    for req in requests {
        let r = rcu.read();
        let s = srcu.read();
        let _ = req.inside.send(());
        let _ = req.release.recv();
        drop(s);
        drop(r);
    }
}
