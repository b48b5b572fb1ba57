//! `fork()` with live probes (issue 11): after a fork each process owns its
//! XOL slots (the chunks were a shared memfd, so one process's unregister or
//! slot reuse broke the other), and a fork while another thread is inside a
//! registry write operation leaves the child with every lock free.
//!
//! Every child reports through its exit status (0: all checks passed) and
//! leaves with `libc::_exit`; the parent waits for it at most
//! [`CHILD_LIMIT`] (a failure detector only: a passing child exits in
//! milliseconds), then kills it and fails.

mod runtime_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::Live;
use runtime_support::*;

/// How long a child may take before it counts as hung.
const CHILD_LIMIT: Duration = Duration::from_secs(20);

fn live() -> &'static Live {
    Live::global()
}

fn counting(at: u64, count: &Arc<AtomicU64>) -> Kprobe {
    let c = Arc::clone(count);
    Kprobe::at(at)
        .pre(move |_p, _regs| {
            c.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build()
}

/// The XOL slot of the site at `at`.
fn slot_of(at: u64) -> Option<u64> {
    live()
        .registry()
        .sites()
        .into_iter()
        .find(|s| s.addr == at)
        .and_then(|s| s.slot)
}

/// Calls `f` `n` times, checking each result against `want`; returns the
/// first wrong one.
fn calls(f: Func, want: fn(u32) -> u32, n: u32) -> Result<(), String> {
    for x in 0..n {
        let got = call(f, x);
        if got != want(x) {
            return Err(format!("f({x}) = {got}, want {}", want(x)));
        }
    }
    Ok(())
}

fn add1(x: u32) -> u32 {
    x + 1
}
fn mul3(x: u32) -> u32 {
    3 * x
}
fn alt(_: u32) -> u32 {
    777
}

/// A pipe: (read end, write end).
fn pipe() -> (libc::c_int, libc::c_int) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

fn send(fd: libc::c_int, b: u8) {
    // SAFETY: one byte from a live buffer to a descriptor we own.
    assert_eq!(unsafe { libc::write(fd, [b].as_ptr().cast(), 1) }, 1);
}

/// The next byte from `fd`, or `None` on end of file, an error or after
/// [`CHILD_LIMIT`].
fn recv(fd: libc::c_int) -> Option<u8> {
    recv_within(fd, CHILD_LIMIT.as_millis() as libc::c_int)
}

/// Calls `f` with `want` in batches, checking every result, until a byte
/// arrives on `fd`; returns it and the number of calls made.
fn calls_until(f: Func, want: fn(u32) -> u32, fd: libc::c_int) -> Result<(u8, u64), String> {
    let start = Instant::now();
    let mut made = 0u64;
    loop {
        calls(f, want, 64)?;
        made += 64;
        if let Some(b) = recv_within(fd, 0) {
            return Ok((b, made));
        }
        if start.elapsed() > CHILD_LIMIT {
            return Err("no message from the other process".into());
        }
    }
}

/// The next byte from `fd` within `ms` milliseconds.
fn recv_within(fd: libc::c_int, ms: libc::c_int) -> Option<u8> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut p, 1, ms) } != 1 {
        return None;
    }
    let mut b = [0u8];
    // SAFETY: one byte into a live buffer.
    (unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) } == 1).then_some(b[0])
}

/// Runs `body` as the child: exit status 0 if it returns `Ok`, else 1 (its
/// message on stderr), 2 on a panic.
fn child(body: impl FnOnce() -> Result<(), String>) -> ! {
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("child: {e}");
            1
        }
        Err(_) => 2,
    };
    // SAFETY: leaves the child without running the parent's atexit handlers
    // or unwinding into the test harness.
    unsafe { libc::_exit(code) }
}

/// Waits for `pid` at most [`CHILD_LIMIT`]; kills it if it is still running.
/// `Err` describes how it ended if not with status 0.
fn reap(pid: libc::pid_t) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if r == pid {
            return if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else if libc::WIFEXITED(status) {
                Err(format!("child exited with {}", libc::WEXITSTATUS(status)))
            } else if libc::WIFSIGNALED(status) {
                Err(format!("child killed by signal {}", libc::WTERMSIG(status)))
            } else {
                Err(format!("child status {status:#x}"))
            };
        }
        if start.elapsed() > CHILD_LIMIT {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(format!("child hung for {CHILD_LIMIT:?} (killed)"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn check(what: &str, got: u64, want: u64) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: {got}, want {want}"))
    }
}

/// Parent and child each own their slots: both keep hitting with exact
/// counts; the parent's unregister and reuse of a slot for another probe
/// leave the child's probe running right; the child's unregister and reuse
/// leave the parent's; both register new probes and commit.
#[test]
fn parent_and_child_own_their_slots_after_fork() {
    let _g = serial();
    let reg = live().registry();
    let (a1, m3, al) = (addr(rtp_add1), addr(rtp_mul3), addr(rtp_alt));
    let orig: Vec<_> = [a1, m3, al].iter().map(|&a| code(a, 8)).collect();
    const N: u32 = 2000;

    let c1 = Arc::new(AtomicU64::new(0));
    let p1 = counting(a1, &c1);
    reg.register(&p1).unwrap();
    let s1 = slot_of(a1).expect("rtp_add1 is boosted: it has a slot");
    calls(rtp_add1, add1, N).unwrap();
    assert_eq!(c1.load(Ordering::Relaxed), u64::from(N));

    let (to_child_r, to_child_w) = pipe();
    let (to_parent_r, to_parent_w) = pipe();
    // SAFETY: fork; the child only runs `child`, which ends in `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        child(|| {
            // Both keep hitting: exact counts, each its own.
            calls(rtp_add1, add1, N)?;
            check(
                "child: p1 hits after fork",
                c1.load(Ordering::Relaxed),
                2 * u64::from(N),
            )?;
            send(to_parent_w, b'a');
            // The child keeps calling while the parent unregisters p1 and
            // gives its slot to a probe on rtp_mul3, and after: ours still
            // runs rtp_add1's instruction.
            let (b, made) = calls_until(rtp_add1, add1, to_child_r)?;
            if b != b'b' {
                return Err(format!("child: got {b:?}, not 'b'"));
            }
            calls(rtp_add1, add1, N)?;
            check(
                "child: p1 hits after the parent's reuse",
                c1.load(Ordering::Relaxed),
                3 * u64::from(N) + made,
            )?;
            // Now the child unregisters and reuses the slot.
            reg.unregister(&p1).map_err(|e| e.to_string())?;
            let c3 = Arc::new(AtomicU64::new(0));
            let p3 = counting(al, &c3);
            reg.register(&p3).map_err(|e| e.to_string())?;
            if slot_of(al) != Some(s1) {
                return Err(format!(
                    "child: rtp_alt got {:x?}, not the recycled {s1:#x}",
                    slot_of(al)
                ));
            }
            calls(rtp_alt, alt, N)?;
            check("child: p3 hits", c3.load(Ordering::Relaxed), u64::from(N))?;
            calls(rtp_add1, add1, N)?;
            check(
                "child: p1 after unregister",
                c1.load(Ordering::Relaxed),
                3 * u64::from(N) + made,
            )?;
            send(to_parent_w, b'c');
            (recv(to_child_r) == Some(b'd'))
                .then_some(())
                .ok_or("no 'd' from the parent")?;
            // The parent committed its own changes: ours are unaffected.
            calls(rtp_alt, alt, N)?;
            calls(rtp_mul3, mul3, N)?;
            check(
                "child: p3 hits after the parent's commit",
                c3.load(Ordering::Relaxed),
                2 * u64::from(N),
            )?;
            // A new probe, then a batch unregistration and commit.
            let c5 = Arc::new(AtomicU64::new(0));
            let p5 = counting(a1, &c5);
            reg.register(&p5).map_err(|e| e.to_string())?;
            calls(rtp_add1, add1, N)?;
            check("child: p5 hits", c5.load(Ordering::Relaxed), u64::from(N))?;
            reg.unregister_nosync(&p3).map_err(|e| e.to_string())?;
            reg.unregister_nosync(&p5).map_err(|e| e.to_string())?;
            reg.commit();
            for (a, o) in [a1, m3, al].iter().zip(&orig) {
                if code(*a, 8) != *o {
                    return Err(format!("child: text at {a:#x} not restored"));
                }
            }
            calls(rtp_add1, add1, N)?;
            check(
                "child: p5 after commit",
                c5.load(Ordering::Relaxed),
                u64::from(N),
            )?;
            Ok(())
        });
    }

    let result = (|| -> Result<(), String> {
        calls(rtp_add1, add1, N)?;
        check(
            "parent: p1 hits after fork",
            c1.load(Ordering::Relaxed),
            2 * u64::from(N),
        )?;
        (recv(to_parent_r) == Some(b'a'))
            .then_some(())
            .ok_or("no 'a' from the child")?;
        // Unregister p1 and give its slot to a probe on rtp_mul3.
        reg.unregister(&p1).map_err(|e| e.to_string())?;
        let c2 = Arc::new(AtomicU64::new(0));
        let p2 = counting(m3, &c2);
        reg.register(&p2).map_err(|e| e.to_string())?;
        if slot_of(m3) != Some(s1) {
            return Err(format!(
                "parent: rtp_mul3 got {:x?}, not the recycled {s1:#x}",
                slot_of(m3)
            ));
        }
        calls(rtp_mul3, mul3, N)?;
        check("parent: p2 hits", c2.load(Ordering::Relaxed), u64::from(N))?;
        send(to_child_w, b'b');
        // The parent keeps calling while the child unregisters p1 and
        // reuses the slot for rtp_alt, and after: our probe on rtp_mul3
        // still runs its own instruction.
        let (c, made) = calls_until(rtp_mul3, mul3, to_parent_r)?;
        if c != b'c' {
            return Err(format!("parent: got {c:?}, not 'c'"));
        }
        calls(rtp_mul3, mul3, N)?;
        check(
            "parent: p2 hits after the child's reuse",
            c2.load(Ordering::Relaxed),
            2 * u64::from(N) + made,
        )?;
        calls(rtp_add1, add1, N)?;
        check(
            "parent: p1 after unregister",
            c1.load(Ordering::Relaxed),
            2 * u64::from(N),
        )?;
        // A new probe, then a batch unregistration and commit.
        let c4 = Arc::new(AtomicU64::new(0));
        let p4 = counting(al, &c4);
        reg.register(&p4).map_err(|e| e.to_string())?;
        calls(rtp_alt, alt, N)?;
        check("parent: p4 hits", c4.load(Ordering::Relaxed), u64::from(N))?;
        reg.unregister_nosync(&p2).map_err(|e| e.to_string())?;
        reg.unregister_nosync(&p4).map_err(|e| e.to_string())?;
        reg.commit();
        send(to_child_w, b'd');
        for (a, o) in [a1, m3, al].iter().zip(&orig) {
            if code(*a, 8) != *o {
                return Err(format!("parent: text at {a:#x} not restored"));
            }
        }
        calls(rtp_mul3, mul3, N)?;
        check(
            "parent: p2 after commit",
            c2.load(Ordering::Relaxed),
            2 * u64::from(N) + made,
        )?;
        Ok(())
    })();
    let child_result = reap(pid);
    for fd in [to_child_r, to_child_w, to_parent_r, to_parent_w] {
        // SAFETY: our own descriptors, closed once.
        unsafe { libc::close(fd) };
    }
    let _ = reg.unregister(&p1);
    assert!(
        result.is_ok() && child_result.is_ok(),
        "parent: {result:?}; child: {child_result:?}"
    );
}

// The thread parked inside a registry write operation (test 2).
std::thread_local! {
    static PARK_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
/// One park is armed: the next `malloc` on a `PARK_HERE` thread parks.
static PARK_ARMED: AtomicBool = AtomicBool::new(false);
/// The parked thread is parked (it holds the writer lock).
static PARKED: AtomicBool = AtomicBool::new(false);
/// Lets the parked thread go on.
static RELEASE: AtomicBool = AtomicBool::new(false);

/// Whether thread `tid` is asleep (from `/proc`).
fn sleeping(tid: libc::pid_t) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    matches!(
        s.rfind(')').and_then(|i| s[i + 2..].chars().next()),
        Some('S' | 'D')
    )
}

/// Set by this test's own `atfork` prepare handler, which runs before the
/// runtime's (registered later, so run first): the forking thread is
/// inside `fork`.
static IN_FORK: AtomicBool = AtomicBool::new(false);

extern "C" fn note_fork() {
    IN_FORK.store(true, Ordering::Release);
}

/// A fork while another thread holds the registry's writer lock (parked
/// deterministically: a probe on `malloc` whose handler parks that thread at
/// its first allocation inside `register(Kprobe::at(..))`, which happens
/// under the lock): the child completes `sites`, `register`, hits and
/// `unregister`, 60 times. The parked thread is released once the forking
/// thread sleeps inside `fork` (in a fixed runtime: in the prepare handler,
/// waiting for that lock) or once `fork` returned (before the fix: the child
/// then inherited the lock held).
#[test]
fn fork_during_a_registry_write_leaves_the_child_every_lock_free() {
    let _g = serial();
    let reg = live().registry();
    let park = Kprobe::symbol("malloc", 0)
        .pre(|_p, _regs| {
            if PARK_HERE.with(|p| p.get()) && PARK_ARMED.swap(false, Ordering::Relaxed) {
                // Acquire/Release: plain flags between threads of a test.
                PARKED.store(true, Ordering::Release);
                while !RELEASE.load(Ordering::Acquire) {
                    // SAFETY: a system call with no arguments.
                    unsafe { libc::sched_yield() };
                }
            }
            Action::Continue
        })
        .build();
    reg.register(&park).expect("malloc is probeable");
    static NOTE: std::sync::Once = std::sync::Once::new();
    // SAFETY: a prepare handler that only stores an atomic.
    NOTE.call_once(|| unsafe {
        libc::pthread_atfork(Some(note_fork), None, None);
    });
    // SAFETY: gettid has no arguments.
    let me = unsafe { libc::gettid() };
    let (m3, a1) = (addr(rtp_mul3), addr(rtp_add1));
    let mut held_at_fork = 0;
    let mut failure = None;
    for i in 0..60 {
        PARKED.store(false, Ordering::Relaxed);
        RELEASE.store(false, Ordering::Relaxed);
        PARK_ARMED.store(true, Ordering::Relaxed);
        let forked = Arc::new(AtomicBool::new(false));
        let q = Arc::new(Kprobe::at(m3).pre(|_p, _r| Action::Continue).build());
        let writer = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                PARK_HERE.with(|p| p.set(true));
                let r = live().registry().register(&q);
                PARK_HERE.with(|p| p.set(false));
                r
            })
        };
        while !PARKED.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        // The releaser: when this thread sleeps inside `fork` (waiting for
        // the lock in the runtime's prepare handler) or when fork has
        // returned.
        IN_FORK.store(false, Ordering::Release);
        let releaser = {
            let forked = Arc::clone(&forked);
            std::thread::spawn(move || loop {
                if forked.load(Ordering::Acquire) {
                    RELEASE.store(true, Ordering::Release);
                    return false;
                }
                if IN_FORK.load(Ordering::Acquire) && sleeping(me) {
                    RELEASE.store(true, Ordering::Release);
                    return true;
                }
                std::thread::sleep(Duration::from_micros(200));
            })
        };
        // SAFETY: fork; the child only runs `child`, which ends in `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            child(|| {
                let reg = live().registry();
                let _ = reg.sites();
                let c = Arc::new(AtomicU64::new(0));
                let p = counting(a1, &c);
                reg.register(&p).map_err(|e| e.to_string())?;
                calls(rtp_add1, add1, 100)?;
                check("child hits", c.load(Ordering::Relaxed), 100)?;
                reg.unregister(&p).map_err(|e| e.to_string())?;
                calls(rtp_add1, add1, 100)?;
                check(
                    "child hits after unregister",
                    c.load(Ordering::Relaxed),
                    100,
                )?;
                Ok(())
            });
        }
        forked.store(true, Ordering::Release);
        if releaser.join().unwrap() {
            held_at_fork += 1;
        }
        writer.join().unwrap().unwrap();
        let r = reap(pid);
        reg.unregister(&q).unwrap();
        if let Err(e) = r {
            failure = Some(format!("iteration {i}: {e}"));
            break;
        }
    }
    PARK_ARMED.store(false, Ordering::Relaxed);
    reg.unregister(&park).unwrap();
    if let Some(f) = failure {
        panic!("{f}");
    }
    // Coverage, not a verdict: how many forks found the lock held.
    eprintln!("{held_at_fork} of 60 forks waited for the writer lock held by the parked thread");
}
