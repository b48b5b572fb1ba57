//! A probed instruction that faults (issue 11): an application that
//! recovers from SIGSEGV (as JITs and WebAssembly runtimes do) must see the
//! fault at the probed instruction's own address, never in the XOL slot,
//! and a single-stepped fault must leave nothing in flight.
//!
//! The fixtures' first instruction loads through their pointer argument
//! (`mov rax, [rdi]; ret`). The tests' SIGSEGV handler (`SA_SIGINFO`,
//! installed after the live registry and before the registration, so the
//! runtime must re-claim the signal at registration) records `si_addr` and
//! the frame's RIP, then resumes at the fixture's `ret` with a sentinel in
//! `rax`, as a JIT resumes at a landing pad. Every test takes the binary's
//! serial lock (they share the signal handlers and the registry).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use rcu_registry::__internals::runtime::steps_in_flight;
use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::Live;

std::arch::global_asm!(
    ".pushsection .text.rf_functions,\"ax\",@progbits",
    ".p2align 4",
    ".globl rf_boosted",
    ".type rf_boosted,@function",
    "rf_boosted:",
    ".byte 0x48, 0x8b, 0x07", // mov rax, [rdi]
    ".byte 0xc3",             // ret
    ".size rf_boosted, . - rf_boosted",
    ".p2align 4",
    ".globl rf_stepped",
    ".type rf_stepped,@function",
    "rf_stepped:",
    ".byte 0x48, 0x8b, 0x07", // mov rax, [rdi]
    ".byte 0xc3",             // ret
    ".size rf_stepped, . - rf_stepped",
    ".p2align 4",
    ".globl rf_child",
    ".type rf_child,@function",
    "rf_child:",
    ".byte 0x48, 0x8b, 0x07", // mov rax, [rdi]
    ".byte 0xc3",             // ret
    ".size rf_child, . - rf_child",
    ".p2align 4",
    ".globl rf_riprel",
    ".type rf_riprel,@function",
    "rf_riprel:",
    "mov rax, rdi",
    // RIP-relative and misaligned: #GP, a SIGSEGV. The slot runs it as
    // `movaps xmm0, [rax + disp]` with the scratch register (rax) loaded.
    "movaps xmm0, xmmword ptr [rip + rf_data + 1]",
    "ret",
    ".size rf_riprel, . - rf_riprel",
    ".p2align 4",
    ".globl rf_div",
    ".type rf_div,@function",
    "rf_div:",
    "xor edx, edx",
    "mov rax, rdi",
    "div rsi", // 48 f7 f6: SIGFPE (#DE) for rsi == 0
    "ret",
    ".size rf_div, . - rf_div",
    ".popsection",
    ".pushsection .data.rf_data,\"aw\",@progbits",
    ".p2align 4",
    "rf_data:",
    ".quad 0, 0, 0, 0",
    ".popsection",
);

extern "C" {
    fn rf_boosted(p: *const u64) -> u64;
    fn rf_stepped(p: *const u64) -> u64;
    fn rf_child(p: *const u64) -> u64;
    fn rf_riprel(x: *const u64) -> u64;
    fn rf_div(x: u64, d: u64) -> u64;
}

type Load = unsafe extern "C" fn(*const u64) -> u64;

/// Length of the probed `mov rax, [rdi]`: the `ret` follows it.
const LOAD_LEN: u64 = 3;
/// What the handler leaves in `rax` for a recovered fault.
const SENTINEL: u64 = 0x5e9f_a017;
/// An unmapped address (the first page is never mapped).
const BAD: *const u64 = 0x18 as *const u64;
/// How long `unregister` may take before the test calls it hung.
const HANG_LIMIT: Duration = Duration::from_secs(20);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn addr(f: Load) -> u64 {
    f as usize as u64
}

/// Calls through a black-boxed pointer so the compiler cannot fold the call.
#[inline(never)]
fn call(f: Load, p: *const u64) -> u64 {
    let f = std::hint::black_box(f);
    // SAFETY: the fixtures are complete C-ABI functions; a bad `p` faults
    // in the first instruction, which the tests' SIGSEGV handler recovers.
    unsafe { f(std::hint::black_box(p)) }
}

/// Where the handler resumes a fault (the fixture's `ret`); 0: not armed.
static RESUME: AtomicU64 = AtomicU64::new(0);
/// The RIP and `si_addr` of the last fault the handler saw.
static SEEN_RIP: AtomicU64 = AtomicU64::new(0);
static SEEN_ADDR: AtomicU64 = AtomicU64::new(0);
/// The frame's RAX at the last fault.
static SEEN_RAX: AtomicU64 = AtomicU64::new(0);
/// Faults the handler recovered.
static FAULTS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // SAFETY: the kernel (or the runtime, chaining) passes a valid siginfo
    // and ucontext for an SA_SIGINFO handler.
    let (info, uc) = unsafe { (&*info, &mut *uctx.cast::<libc::ucontext_t>()) };
    let g = &mut uc.uc_mcontext.gregs;
    SEEN_RIP.store(g[libc::REG_RIP as usize] as u64, Ordering::Relaxed);
    SEEN_RAX.store(g[libc::REG_RAX as usize] as u64, Ordering::Relaxed);
    // SAFETY: a SIGSEGV's siginfo carries the faulting address.
    SEEN_ADDR.store(unsafe { info.si_addr() } as u64, Ordering::Relaxed);
    let resume = RESUME.load(Ordering::Relaxed);
    if resume == 0 {
        // Not a fault of ours: die of it.
        // SAFETY: signal() and re-faulting with SIG_DFL are fine here.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    FAULTS.fetch_add(1, Ordering::Relaxed);
    g[libc::REG_RAX as usize] = SENTINEL as i64;
    g[libc::REG_RIP as usize] = resume as i64;
}

/// Builds the live registry first (it installs its handlers), then puts the
/// application's SIGSEGV handler over them, as an application that
/// installs its handler late does. The registration that follows must take
/// the signal back, chained to this handler.
fn install_app_handler(fixture: Load) {
    install_app_handler_resuming_at(addr(fixture) + LOAD_LEN);
}

/// [`install_app_handler`], resuming faults at `resume`.
fn install_app_handler_resuming_at(resume: u64) {
    install_app_handler_for(libc::SIGSEGV, resume);
}

/// [`install_app_handler_resuming_at`] for the signal `sig`.
fn install_app_handler_for(sig: libc::c_int, resume: u64) {
    let _ = Live::global();
    RESUME.store(resume, Ordering::Relaxed);
    SEEN_RIP.store(0, Ordering::Relaxed);
    SEEN_ADDR.store(0, Ordering::Relaxed);
    FAULTS.store(0, Ordering::Relaxed);
    // SAFETY: zeroed is a valid sigaction; the handler has the SA_SIGINFO
    // signature.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_segv as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        assert_eq!(libc::sigaction(sig, &act, std::ptr::null_mut()), 0);
    }
}

fn counting(at: u64, pre: &Arc<AtomicU64>, post: Option<&Arc<AtomicU64>>) -> Arc<Kprobe> {
    let pre = Arc::clone(pre);
    let b = Kprobe::at(at).pre(move |_p, _r| {
        pre.fetch_add(1, Ordering::Relaxed);
        Action::Continue
    });
    let b = match post {
        Some(post) => {
            let post = Arc::clone(post);
            b.post(move |_p, _r| {
                post.fetch_add(1, Ordering::Relaxed);
            })
        }
        None => b,
    };
    Arc::new(b.build())
}

/// Unregisters `p` on another thread; fails if that takes longer than
/// [`HANG_LIMIT`] (a step leaked by a fault would make it wait forever).
fn unregister_promptly(p: &Arc<Kprobe>) {
    let (tx, rx) = mpsc::channel();
    let p = Arc::clone(p);
    std::thread::spawn(move || {
        let r = Live::global().registry().unregister(&p);
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(HANG_LIMIT) {
        Ok(r) => r.expect("unregister"),
        Err(_) => panic!("unregister hung for {HANG_LIMIT:?}: a faulted step is still in flight"),
    }
}

/// A boosted probe (pre handler only, no fixups): the application's handler
/// sees the fault at the probed address, and the pre handler ran.
#[test]
fn a_fault_in_a_boosted_slot_is_reported_at_the_probed_address() {
    let _g = serial();
    install_app_handler(rf_boosted);
    let at = addr(rf_boosted);
    let pre = Arc::new(AtomicU64::new(0));
    let p = counting(at, &pre, None);
    Live::global().registry().register(&p).unwrap();

    assert_eq!(call(rf_boosted, BAD), SENTINEL);
    assert_eq!(FAULTS.load(Ordering::Relaxed), 1);
    assert_eq!(
        SEEN_RIP.load(Ordering::Relaxed),
        at,
        "the handler saw the fault in the slot, not at the probed address"
    );
    assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), BAD as u64);
    assert_eq!(pre.load(Ordering::Relaxed), 1);
    for _ in 0..49 {
        assert_eq!(call(rf_boosted, BAD), SENTINEL);
        assert_eq!(SEEN_RIP.load(Ordering::Relaxed), at);
    }

    // A normal call after the faults still hits, with exact counts.
    let word = 0x1234_5678_9abc_def0u64;
    for _ in 0..100 {
        assert_eq!(call(rf_boosted, &word), word);
    }
    assert_eq!(pre.load(Ordering::Relaxed), 150);
    assert_eq!(FAULTS.load(Ordering::Relaxed), 50);
    assert_eq!(steps_in_flight(), 0);
    unregister_promptly(&p);
    assert_eq!(call(rf_boosted, &word), word);
    assert_eq!(pre.load(Ordering::Relaxed), 150);
}

/// A single-stepped probe (a post handler forces the step): the fault is
/// reported at the probed address, the step is abandoned (no post handler,
/// nothing in flight), fifty faults never reach the nesting limit, and
/// `unregister` returns promptly.
#[test]
fn a_fault_in_a_single_stepped_slot_aborts_the_step_and_leaks_nothing() {
    let _g = serial();
    install_app_handler(rf_stepped);
    let at = addr(rf_stepped);
    let (pre, post) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let p = counting(at, &pre, Some(&post));
    Live::global().registry().register(&p).unwrap();

    for i in 1..=50 {
        assert_eq!(call(rf_stepped, BAD), SENTINEL);
        assert_eq!(steps_in_flight(), 0, "fault {i} left its step in flight");
        assert_eq!(
            SEEN_RIP.load(Ordering::Relaxed),
            at,
            "fault {i}: the handler saw the fault in the slot, not at the probed address"
        );
        assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), BAD as u64);
    }
    assert_eq!(FAULTS.load(Ordering::Relaxed), 50);
    assert_eq!(pre.load(Ordering::Relaxed), 50);
    assert_eq!(
        post.load(Ordering::Relaxed),
        0,
        "an aborted step runs no post handler"
    );

    // A normal call after the faults still hits, with exact counts.
    let word = 0x0fed_cba9_8765_4321u64;
    for _ in 0..100 {
        assert_eq!(call(rf_stepped, &word), word);
    }
    assert_eq!(pre.load(Ordering::Relaxed), 150);
    assert_eq!(post.load(Ordering::Relaxed), 100);
    assert_eq!(steps_in_flight(), 0);
    unregister_promptly(&p);
    assert_eq!(call(rf_stepped, &word), word);
    assert_eq!(pre.load(Ordering::Relaxed), 150);
}

/// A stepped RIP-relative instruction (rewritten in its slot around a
/// scratch register) that faults: the application sees the probed address
/// and the scratch register's own value, not the one the slot used.
#[test]
fn a_fault_of_a_rewritten_rip_relative_instruction_restores_its_scratch_register() {
    let _g = serial();
    let at = addr(rf_riprel) + 3; // the movaps, after `mov rax, rdi`
    let movaps_len = 7;
    install_app_handler_resuming_at(at + movaps_len);
    let pre = Arc::new(AtomicU64::new(0));
    let p = counting(at, &pre, None);
    Live::global().registry().register(&p).unwrap();
    for i in 0..20u64 {
        let marker = 0x7777_0000 + i;
        assert_eq!(call(rf_riprel, marker as *const u64), SENTINEL);
        assert_eq!(steps_in_flight(), 0, "fault {i} left its step in flight");
        assert_eq!(SEEN_RIP.load(Ordering::Relaxed), at, "fault {i}: RIP");
        assert_eq!(
            SEEN_RAX.load(Ordering::Relaxed),
            marker,
            "fault {i}: the scratch register still holds the slot's value"
        );
    }
    assert_eq!(pre.load(Ordering::Relaxed), 20);
    unregister_promptly(&p);
}

/// Another signal: a `div` by zero (SIGFPE) under a boosted and then a
/// stepped probe is reported at the probed `div`.
#[test]
fn a_division_by_zero_in_a_slot_is_reported_at_the_probed_address() {
    let _g = serial();
    let at = rf_div as *const () as usize as u64 + 5; // after `xor edx, edx; mov rax, rdi`
    install_app_handler_for(libc::SIGFPE, at + 3);
    let div = |x: u64, d: u64| {
        let f = std::hint::black_box(rf_div as unsafe extern "C" fn(u64, u64) -> u64);
        // SAFETY: a complete C-ABI function; a zero divisor faults in the
        // `div`, which the tests' handler recovers.
        unsafe { f(std::hint::black_box(x), std::hint::black_box(d)) }
    };
    for stepped in [false, true] {
        let pre = Arc::new(AtomicU64::new(0));
        let post = Arc::new(AtomicU64::new(0));
        let p = counting(at, &pre, stepped.then_some(&post));
        Live::global().registry().register(&p).unwrap();
        for i in 0..20 {
            assert_eq!(div(42, 0), SENTINEL);
            assert_eq!(
                steps_in_flight(),
                0,
                "stepped {stepped}, fault {i}: in flight"
            );
            assert_eq!(
                SEEN_RIP.load(Ordering::Relaxed),
                at,
                "stepped {stepped}, fault {i}"
            );
        }
        assert_eq!(div(42, 5), 8);
        assert_eq!(pre.load(Ordering::Relaxed), 21);
        assert_eq!(post.load(Ordering::Relaxed), u64::from(stepped));
        unregister_promptly(&p);
    }
}

/// How a traced child ended: its wait status, and its RIP at its exit
/// (`None` if it could not be traced).
struct Death {
    status: libc::c_int,
    rip: Option<u64>,
}

/// Child exit code: `PTRACE_TRACEME` was refused (then it runs untraced).
const UNTRACED: libc::c_int = 6;

/// Follows the child `pid`, which asked to be traced and stopped itself:
/// passes every signal on unchanged (the probes' SIGTRAPs, the fault),
/// reads its registers at its exit event, and reaps it. Fails after
/// [`HANG_LIMIT`].
fn follow(pid: libc::pid_t, traced: bool) -> Death {
    let start = std::time::Instant::now();
    let mut rip = None;
    let mut first = traced;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if r == 0 {
            if start.elapsed() > HANG_LIMIT {
                // SAFETY: our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("the child hung");
            }
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if !libc::WIFSTOPPED(status) {
            return Death { status, rip };
        }
        let mut pass = libc::WSTOPSIG(status);
        if first {
            // Its own SIGSTOP after PTRACE_TRACEME: ask for the exit event.
            first = false;
            pass = 0;
            // SAFETY: our stopped tracee.
            let r = unsafe {
                libc::ptrace(
                    libc::PTRACE_SETOPTIONS,
                    pid,
                    0,
                    libc::PTRACE_O_TRACEEXIT as usize,
                )
            };
            assert_eq!(r, 0, "PTRACE_SETOPTIONS");
        } else if status >> 8 == (libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8)) {
            pass = 0;
            // SAFETY: zeroed is a valid user_regs_struct, filled by the call
            // for our stopped tracee.
            let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
            // SAFETY: see above.
            let r = unsafe {
                libc::ptrace(
                    libc::PTRACE_GETREGS,
                    pid,
                    0,
                    &mut regs as *mut libc::user_regs_struct,
                )
            };
            if r == 0 {
                rip = Some(regs.rip);
            }
        }
        // SAFETY: resumes our stopped tracee with the signal it stopped for
        // (none for our own stops).
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, pass as usize) };
    }
}

/// With no application handler (`SIG_DFL`), or with a handler that
/// restores `SIG_DFL` and returns to re-fault (as Rust's own does), a
/// forked child that faults under a boosted or a stepped probe dies of
/// SIGSEGV (not SIGTRAP, not an abort), and at the probed address: its RIP
/// at its exit (read through `ptrace`) is the probed instruction's, not
/// the slot's. Where `ptrace` is refused, the RIP check is reported as not
/// run and only the death is checked.
#[test]
fn with_no_application_handler_the_process_dies_of_the_fault() {
    let _g = serial();
    let _ = Live::global();
    let at = addr(rf_child);
    for (stepped, default) in [(false, true), (true, true), (false, false), (true, false)] {
        // SAFETY: fork; the child only runs the block below and dies or
        // leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: no core file for the expected death; zeroed is a
            // valid sigaction (SIG_DFL); ptrace and raise on ourselves.
            let traced = unsafe {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                if default {
                    let dfl: libc::sigaction = std::mem::zeroed();
                    libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
                } else {
                    // Whichever handler the runtime chains to (Rust's, or
                    // the tests' disarmed one) restores SIG_DFL and returns
                    // to re-fault.
                    RESUME.store(0, Ordering::Relaxed);
                }
                let traced = libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == 0;
                if traced {
                    libc::raise(libc::SIGSTOP);
                }
                traced
            };
            let pre = Arc::new(AtomicU64::new(0));
            let post = Arc::new(AtomicU64::new(0));
            let p = counting(at, &pre, stepped.then_some(&post));
            if Live::global().registry().register(&p).is_err() {
                // SAFETY: leaves the child.
                unsafe { libc::_exit(3) };
            }
            let word = 7u64;
            if call(rf_child, &word) != 7 || pre.load(Ordering::Relaxed) != 1 {
                // SAFETY: as above.
                unsafe { libc::_exit(4) };
            }
            if !traced {
                // SAFETY: as above: tells the parent, who then expects
                // nothing but this code.
                unsafe { libc::_exit(UNTRACED) };
            }
            call(rf_child, BAD);
            // SAFETY: as above: surviving the fault is a failure.
            unsafe { libc::_exit(5) };
        }
        let death = follow(pid, true);
        let how = if libc::WIFSIGNALED(death.status) {
            format!("killed by signal {}", libc::WTERMSIG(death.status))
        } else {
            format!("exited with {}", libc::WEXITSTATUS(death.status))
        };
        if libc::WIFEXITED(death.status) && libc::WEXITSTATUS(death.status) == UNTRACED {
            eprintln!("ptrace refused: the RIP at death is not checked; rerunning untraced");
            untraced_death(stepped, default);
            continue;
        }
        assert!(
            libc::WIFSIGNALED(death.status) && libc::WTERMSIG(death.status) == libc::SIGSEGV,
            "stepped {stepped}, SIG_DFL {default}: the child was {how}, not killed by SIGSEGV"
        );
        assert_eq!(
            death.rip,
            Some(at),
            "stepped {stepped}, SIG_DFL {default}: the child died away from the probed address {at:#x}"
        );
    }
}

/// [`with_no_application_handler_the_process_dies_of_the_fault`] where
/// `ptrace` is refused: the death only.
fn untraced_death(stepped: bool, default: bool) {
    // SAFETY: fork; the child only runs the block below.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as in the traced run.
        unsafe {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            if default {
                let dfl: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
            } else {
                RESUME.store(0, Ordering::Relaxed);
            }
        }
        let pre = Arc::new(AtomicU64::new(0));
        let post = Arc::new(AtomicU64::new(0));
        let p = counting(addr(rf_child), &pre, stepped.then_some(&post));
        if Live::global().registry().register(&p).is_err() {
            // SAFETY: leaves the child.
            unsafe { libc::_exit(3) };
        }
        call(rf_child, BAD);
        // SAFETY: as above.
        unsafe { libc::_exit(5) };
    }
    let death = follow(pid, false);
    assert!(
        libc::WIFSIGNALED(death.status) && libc::WTERMSIG(death.status) == libc::SIGSEGV,
        "stepped {stepped}, SIG_DFL {default}: not killed by SIGSEGV"
    );
}

/// The disposition the chaining handler replaced (ours), and the pipe it
/// reports each call on.
static CHAINED_OLD: AtomicU64 = AtomicU64::new(0);
static CHAINED_PIPE: AtomicU64 = AtomicU64::new(0);

/// An application handler that owns no fault and chains each one to the
/// handler it replaced, as JITs do: one byte on the pipe per call.
extern "C" fn chaining_handler(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    let fd = CHAINED_PIPE.load(Ordering::Relaxed) as libc::c_int;
    // SAFETY: write(2) is async-signal-safe.
    unsafe { libc::write(fd, b"c".as_ptr().cast(), 1) };
    let old = CHAINED_OLD.load(Ordering::Relaxed) as usize;
    // SAFETY: the replaced handler was installed with SA_SIGINFO (ours).
    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
        unsafe { std::mem::transmute(old) };
    f(sig, info, uc);
}

/// An application handler installed over the runtime's chains to the
/// `oldact` it got, which is the runtime's handler: that nested call must
/// go to the disposition before (here Rust's, which restores `SIG_DFL` and
/// returns), not back to the application's handler forever. The child runs
/// the application's handler once and dies of SIGSEGV.
#[test]
fn an_application_handler_that_chains_to_the_runtime_is_not_called_again() {
    let _g = serial();
    let _ = Live::global();
    let mut fds = [0; 2];
    // SAFETY: a pipe for the child's reports.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fork; the child only runs the block below.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        CHAINED_PIPE.store(fds[1] as u64, Ordering::Relaxed);
        // SAFETY: no core file; zeroed sigactions are valid; the handler has
        // the SA_SIGINFO signature.
        unsafe {
            libc::close(fds[0]);
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            // The original disposition the runtime recorded may be the
            // tests' handler (installed earlier in this process): disarm it
            // so that it restores SIG_DFL and returns, as Rust's does.
            RESUME.store(0, Ordering::Relaxed);
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = chaining_handler as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGSEGV, &act, &mut old);
            CHAINED_OLD.store(old.sa_sigaction as u64, Ordering::Relaxed);
        }
        let pre = Arc::new(AtomicU64::new(0));
        let p = counting(addr(rf_child), &pre, Some(&Arc::new(AtomicU64::new(0))));
        if Live::global().registry().register(&p).is_err() {
            // SAFETY: leaves the child.
            unsafe { libc::_exit(3) };
        }
        call(rf_child, BAD);
        // SAFETY: as above.
        unsafe { libc::_exit(5) };
    }
    // SAFETY: the parent keeps the read end only.
    unsafe { libc::close(fds[1]) };
    let death = follow(pid, false);
    let mut calls = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reading our pipe into a local buffer.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        calls.extend_from_slice(&buf[..n as usize]);
    }
    // SAFETY: our descriptor.
    unsafe { libc::close(fds[0]) };
    assert!(
        libc::WIFSIGNALED(death.status) && libc::WTERMSIG(death.status) == libc::SIGSEGV,
        "the child did not die of SIGSEGV (status {:#x})",
        death.status
    );
    assert_eq!(
        calls.len(),
        1,
        "the application's handler ran {} times for one fault",
        calls.len()
    );
}

/// The byte stores and loads a text write batch makes (issue 12: a
/// breakpoint written or restored while a `dlclose` on another thread
/// unmaps the library) fault into an error the runtime's fault handler
/// returns, not the process's death, even with an application handler
/// installed over the runtime's (the batch claims the signals back first);
/// the application's own faults still reach its handler, and a thread that
/// blocks SIGSEGV gets no such store at all.
#[test]
fn text_stores_and_loads_into_unmapped_or_read_only_pages_report_instead_of_crashing() {
    use rcu_registry::__internals::runtime::poke::{load_byte, store_byte};
    let _g = serial();
    install_app_handler(rf_boosted);
    let page = 4096usize;
    // SAFETY: a fresh private anonymous mapping of three pages, ours.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let (rw, ro, gone) = (
        base as u64,
        base as u64 + page as u64,
        base as u64 + 2 * page as u64,
    );
    // SAFETY: pages of the mapping above: the second made read-only, the
    // third unmapped.
    unsafe {
        *(ro as *mut u8) = 7;
        assert_eq!(libc::mprotect(ro as *mut _, page, libc::PROT_READ), 0);
        assert_eq!(libc::munmap(gone as *mut _, page), 0);
    }
    // SAFETY: every address is in the test's own mapping (or its unmapped
    // third page): a store or load there is harmless.
    unsafe {
        assert_eq!(store_byte(rw, 0xcc), Some(true));
        assert_eq!(*(rw as *const u8), 0xcc);
        assert_eq!(load_byte(rw), Some(Some(0xcc)));
        assert_eq!(store_byte(ro, 0xcc), Some(false), "read-only page");
        assert_eq!(*(ro as *const u8), 7);
        assert_eq!(load_byte(ro), Some(Some(7)));
        assert_eq!(store_byte(gone, 0xcc), Some(false), "unmapped page");
        assert_eq!(load_byte(gone), Some(None), "unmapped page");
    }
    assert_eq!(
        FAULTS.load(Ordering::Relaxed),
        0,
        "the application's handler saw a fault of the runtime's stores"
    );
    // The application's own fault still reaches its handler.
    assert_eq!(call(rf_boosted, BAD), SENTINEL);
    assert_eq!(FAULTS.load(Ordering::Relaxed), 1);
    // A thread that blocks SIGSEGV: a fault would kill the process without
    // any handler, so no store is made (the writer falls back to a system
    // call that reports it).
    let blocked = std::thread::spawn(move || {
        // SAFETY: blocks SIGSEGV for this thread only; zeroed sigset is valid.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGSEGV);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            (store_byte(rw, 0x90), load_byte(rw))
        }
    })
    .join()
    .unwrap();
    assert_eq!(blocked, (None, None));
    // SAFETY: as above.
    assert_eq!(unsafe { *(rw as *const u8) }, 0xcc);
    RESUME.store(0, Ordering::Relaxed);
    // SAFETY: the two pages still mapped.
    unsafe { libc::munmap(base, 2 * page) };
}
