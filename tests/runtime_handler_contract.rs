//! The handler contract's panic clause: a probe handler that panics runs
//! inside the SIGTRAP handler (or the kretprobe trampoline), where unwinding
//! cannot continue. The process must die of SIGABRT with a message on stderr
//! that names the cause, not hang and not unwind through the signal frame.
//!
//! Each case re-runs this test binary as a child process with one test
//! selected and `RTP_PANIC_CHILD` set: the child registers a probe whose
//! handler panics and calls the probed function; the parent checks how the
//! child ended.

mod runtime_support;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcu_registry::probes::kprobe::{Kprobe, Kretprobe};
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
        other => unreachable!("unknown case {other}"),
    }
    // Reached only if the panic did not end the process.
    eprintln!("child survived a panicking handler");
    std::process::exit(0);
}

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
        err.contains("handler panic on purpose"),
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
