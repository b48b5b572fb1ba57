//! The handler contract's clauses that end a process (see
//! `docs::patterns`, "The handler contract"):
//!
//! - a probe handler that panics runs inside the SIGTRAP handler (or the
//!   kretprobe trampoline), where unwinding cannot continue: the process
//!   must die of SIGABRT with a message on stderr that names the cause, not
//!   hang and not unwind through the signal frame;
//! - `println!` in a handler on the C library's `write`, hit by the
//!   program's own `println!`, re-borrows stdout's `RefCell`: that panic,
//!   and so the same abort;
//! - a handler that locks a `Mutex` the probed code holds waits forever:
//!   shown without timing, by the handler's thread found blocked in `futex`
//!   on that mutex after it said it was about to lock it.
//!
//! Each case re-runs this test binary as a child process with one test
//! selected and `RTP_PANIC_CHILD` set: the child registers the probe and
//! calls the probed function; the parent checks how the child ended (or,
//! for the deadlock, where it is stuck, then kills it).

mod runtime_support;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Mutex;

use rcu_registry::probes::kprobe::{Action, Kprobe, Kretprobe};
use rcu_registry::probes::runtime::Live;
use runtime_support::*;

const CHILD_ENV: &str = "RTP_PANIC_CHILD";

/// In the child: registers the probe `case` names and calls the function.
fn child_body(case: &str) {
    let reg = Live::global().registry();
    match case {
        "kprobe" => {
            let p = Kprobe::at(addr(rtp_add1))
                .pre(|_p, _regs| panic!("handler panic on purpose"))
                .build();
            reg.register(&p).unwrap();
            call(rtp_add1, 1);
        }
        "kretprobe" => {
            let krp = Kretprobe::at(addr(rtp_mul3))
                .handler(|_, _regs, _ret| panic!("handler panic on purpose"))
                .build()
                .unwrap();
            reg.register(&krp).unwrap();
            call(rtp_mul3, 1);
        }
        "println-on-write" => {
            // The C library's `write`, which `println!` ends in.
            let write_at = libc::write as *const () as usize as u64;
            let p = Kprobe::at(write_at)
                .pre(|_p, _regs| {
                    println!("printed from the handler");
                    Action::Continue
                })
                .build();
            reg.register(&p).unwrap();
            // The program's own printing: the handler runs inside this
            // `write`, with stdout's lock held and its `RefCell` borrowed.
            println!("printed by the probed program");
        }
        "mutex" => {
            let fd: libc::c_int = std::env::var(FD_ENV).unwrap().parse().unwrap();
            let p = Kprobe::at(addr(rtp_add1))
                .pre(move |_p, _regs| {
                    // Where the parent will find us waiting: this thread,
                    // and the mutex's bytes (its futex word is inside).
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u64;
                    let msg = [
                        tid,
                        &HELD as *const Mutex<u32> as u64,
                        std::mem::size_of::<Mutex<u32>>() as u64,
                    ];
                    // SAFETY: `msg` is 24 readable bytes; `fd` is the
                    // inherited pipe (a raw, async-signal-safe write).
                    let n = unsafe { libc::write(fd, msg.as_ptr().cast(), 24) };
                    assert_eq!(n, 24);
                    // The probed code holds it: this never returns.
                    let g = HELD.lock();
                    drop(g);
                    Action::Continue
                })
                .build();
            reg.register(&p).unwrap();
            let held = HELD.lock().unwrap();
            call(rtp_add1, 1);
            drop(held);
        }
        other => unreachable!("unknown case {other}"),
    }
    // Reached only if the handler did not end (or stop) the process.
    eprintln!("child survived the handler");
    std::process::exit(0);
}

/// The lock the probed code holds in the "mutex" case.
static HELD: Mutex<u32> = Mutex::new(0);

/// The child's end of the pipe in the "mutex" case.
const FD_ENV: &str = "RTP_CONTRACT_FD";

/// Runs test `name` in a child with `case`; returns its exit status and
/// stderr. Kills it after 60 s (a hang is a failure, reported as such).
fn run_child(name: &str, case: &str) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, case)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("the child with a panicking {case} handler hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status, err)
}

fn check(name: &str, case: &str) {
    check_abort(name, case, "handler panic on purpose");
}

/// Runs `case` in a child and checks it died of SIGABRT with the panic's
/// `message` and the runtime's abort message on stderr.
fn check_abort(name: &str, case: &str, message: &str) {
    if let Ok(c) = std::env::var(CHILD_ENV) {
        child_body(&c);
        return;
    }
    let (status, err) = run_child(name, case);
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "{case}: status {status:?}, stderr:\n{err}"
    );
    assert!(
        err.contains(message),
        "{case}: the panic message is on stderr:\n{err}"
    );
    assert!(
        err.contains("rcu-registry: a probe handler panicked"),
        "{case}: the abort names its cause:\n{err}"
    );
    assert!(!err.contains("child survived"), "{case}:\n{err}");
}

#[test]
fn a_panicking_kprobe_handler_aborts_with_a_message() {
    check("a_panicking_kprobe_handler_aborts_with_a_message", "kprobe");
}

/// `println!` in a handler on `write()`, hit by the program's own
/// `println!`: stdout's lock is reentrant, so the handler gets it on the
/// same thread and re-borrows the `RefCell` behind it, which panics, which
/// aborts with the runtime's message.
#[test]
fn println_in_a_handler_on_write_hit_by_println_aborts_with_a_message() {
    check_abort(
        "println_in_a_handler_on_write_hit_by_println_aborts_with_a_message",
        "println-on-write",
        "already borrowed",
    );
}

/// A handler that locks a `Mutex` the probed code holds: the child says it
/// is about to lock (pipe), and the parent waits until that thread is
/// blocked in `futex` on the mutex's own bytes. Being blocked there, on a
/// lock its own thread holds, is the deadlock; no time bound is asserted
/// (60 s is only a hang detector for a child that never gets there), then
/// the child is killed.
#[test]
fn a_handler_locking_a_mutex_the_probed_code_holds_deadlocks() {
    if std::env::var(CHILD_ENV).is_ok() {
        child_body(&std::env::var(CHILD_ENV).unwrap());
        return;
    }
    let name = "a_handler_locking_a_mutex_the_probed_code_holds_deadlocks";
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors. Close-on-exec, so
    // that children other tests spawn meanwhile do not hold the write end
    // (ours keeps it: see `pre_exec`).
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "mutex")
        .env(FD_ENV, wr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure only calls fcntl (async-signal-safe) between fork
    // and exec: the child keeps the write end across its exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::fcntl(wr, libc::F_SETFD, 0) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().unwrap();
    // SAFETY: our copy of the write end; the child has its own. Closed so
    // that the read sees end-of-file if the child dies before writing.
    unsafe { libc::close(wr) };
    let hang = Duration::from_secs(60);
    let mut msg = [0u64; 3];
    let start = Instant::now();
    // The parent's threads get the runtime's signals (other tests' probes):
    // interrupted calls are retried.
    let n = loop {
        let left = hang.saturating_sub(start.elapsed());
        let mut pfd = libc::pollfd {
            fd: rd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        if ready < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if ready != 1 {
            break -1;
        }
        // SAFETY: `msg` has room for 24 bytes.
        let n = unsafe { libc::read(rd, msg.as_mut_ptr().cast(), 24) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    // SAFETY: our read end, closed once.
    unsafe { libc::close(rd) };
    if n != 24 {
        let _ = child.kill();
        let status = child.wait().unwrap();
        panic!("the child never reached the handler's lock ({n}, {status:?})");
    }
    let [tid, mutex, size] = msg;
    let path = format!("/proc/{}/task/{tid}/syscall", child.id());
    let start = Instant::now();
    let blocked = loop {
        // "202 0x<uaddr> ..." while the thread is in futex(2) (x86_64
        // number 202), its first argument the futex word.
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut f = text.split_whitespace();
        let nr = f.next();
        let uaddr = f
            .next()
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
        if nr == Some("202") && uaddr.is_some_and(|a| (mutex..mutex + size).contains(&a)) {
            break true;
        }
        if child.try_wait().unwrap().is_some() || start.elapsed() > hang {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        blocked,
        "the handler's thread was not found waiting on the mutex ({status:?})"
    );
    assert_eq!(status.signal(), Some(libc::SIGKILL), "it was still there");
}

#[test]
fn a_panicking_kretprobe_handler_aborts_with_a_message() {
    check(
        "a_panicking_kretprobe_handler_aborts_with_a_message",
        "kretprobe",
    );
}

/// The stack a hit takes below the interrupted code's stack pointer before
/// the handler's own frame: the kernel's signal frame (with the extended
/// register state) and the runtime's dispatch. The handler contract states
/// it; this measures it and fails if it grows past what the docs promise.
#[test]
fn a_hit_takes_a_few_kib_of_the_threads_stack() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let _g = serial();
    let reg = Live::global().registry();
    let depth = Arc::new(AtomicU64::new(0));
    let d2 = depth.clone();
    let p = Kprobe::at(addr(rtp_add1))
        .pre(move |_p, regs| {
            let here = std::hint::black_box(0u8);
            let at = &here as *const u8 as u64;
            d2.store(regs.sp - at, Ordering::Relaxed);
            rcu_registry::probes::kprobe::Action::Continue
        })
        .build();
    reg.register(&p).unwrap();
    call(rtp_add1, 1);
    reg.unregister(&p).unwrap();
    let depth = depth.load(Ordering::Relaxed);
    println!("stack from the trapped instruction to the handler: {depth} bytes");
    assert!(depth > 0 && depth <= 16 * 1024, "{depth} bytes");
}
