//! `probes::remote::load_library`: a running process made to load a
//! library and call its init function over `ptrace`, then let go. The
//! targets are the fixture program (`remote_support/fixture.c`) and
//! `sleep` from the base system; the library is built here with `cc`: its
//! constructor appends a line to a marker file, its `agent_start` the
//! argument it gets to another (both named by the target's pid).

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcu_registry::probes::remote::{load_library, Refusal, RemoteError, RemoteTracer, SafePoint};

#[path = "remote_support/mod.rs"]
mod remote_support;
use remote_support::{dir, fixture, Running};

/// What `agent_start` returns.
const AGENT_RETURNS: u64 = 42;

/// Runs `cc -O1 -pthread ARGS -o OUT SRC`: its error output if it fails.
fn cc(out: &Path, src: &Path, args: &[&str]) -> Result<(), String> {
    let run = Command::new("cc")
        .args(["-O1", "-pthread"])
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .expect("running cc");
    match run.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&run.stderr).into_owned()),
    }
}

/// Builds `<dir>/<name>` (`.so` with `-shared`) from C `source`.
fn build(name: &str, source: &str, args: &[&str]) -> PathBuf {
    let src = dir().join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let shared = args.contains(&"-shared");
    let out = dir().join(if shared {
        format!("{name}.so")
    } else {
        name.to_string()
    });
    cc(&out, &src, args).unwrap();
    out
}

/// Builds `name` from C `source` as a shared library.
fn build_lib(name: &str, source: &str) -> PathBuf {
    build(name, source, &["-shared", "-fPIC"])
}

/// The agent: its constructor appends `loaded` to `<dir>/marker-<pid>`,
/// `agent_start(arg)` appends `arg` to `<dir>/arg-<pid>` and returns 42;
/// `agent_thread(arg)` starts a thread that appends `thread <arg>` and
/// waits in `pause` for ever (an agent's own thread); `agent_crash` reads
/// address 8 (`SIGSEGV`); `agent_stop` sends
/// the process `SIGSTOP`; `agent_raise(sig)` raises signal number `sig` on the calling thread;
/// `hidden_start` is `agent_start`, local to the file.
fn agent() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let source = format!(
                r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static void append(const char *what, const char *line) {{
    char path[512];
    snprintf(path, sizeof path, "{dir}/%s-%d", what, (int)getpid());
    FILE *f = fopen(path, "a");
    if (f) {{ fprintf(f, "%s\n", line); fclose(f); }}
}}
__attribute__((constructor)) static void on_load(void) {{ append("marker", "loaded"); }}
int agent_start(const char *arg) {{ append("arg", arg); return {ret}; }}
static char thread_line[256];
static void *agent_main(void *unused) {{
    (void)unused;
    append("arg", thread_line);
    for (;;) pause();
    return 0;
}}
int agent_thread(const char *arg) {{
    snprintf(thread_line, sizeof thread_line, "thread %s", arg);
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    return pthread_create(&t, &a, agent_main, 0);
}}
int agent_crash(const char *unused) {{ (void)unused; return *(volatile int *)8; }}
int agent_stop(const char *unused) {{ (void)unused; return kill(getpid(), SIGSTOP); }}
int agent_raise(const char *sig) {{ append("arg", sig); return raise(atoi(sig)); }}
__attribute__((used)) static int hidden_start(const char *arg) {{ append("arg", arg); return 1; }}
"#,
                dir = dir().display(),
                ret = AGENT_RETURNS
            );
            build_lib("libagent", &source)
        })
        .clone()
}

/// A library `dlopen(RTLD_NOW)` refuses: it needs a function nothing
/// defines.
fn unresolvable_lib() -> PathBuf {
    build_lib(
        "libunresolvable",
        "extern int no_such_function_anywhere(void);\nint f(void) { return no_such_function_anywhere(); }\n",
    )
}

fn marker(pid: i32) -> String {
    std::fs::read_to_string(dir().join(format!("marker-{pid}"))).unwrap_or_default()
}

fn args_seen(pid: i32) -> String {
    std::fs::read_to_string(dir().join(format!("arg-{pid}"))).unwrap_or_default()
}

/// The pid of a program started untraced.
fn pid_of(r: &Running) -> i32 {
    r.0.id() as i32
}

/// The fixture in `until` (or `slow`) mode, writing to `out`, until
/// `stop` exists; started once its C library is mapped.
fn start_fixture(name: &str, mode: &str) -> (Running, PathBuf, PathBuf) {
    let stop = dir().join(format!("stop-{name}"));
    let out = dir().join(format!("out-{name}"));
    let _ = std::fs::remove_file(&stop);
    let _ = std::fs::remove_file(&out);
    let child = Running(
        Command::new(fixture())
            .arg(&out)
            .args([mode, stop.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    wait_for_calls(pid_of(&child), &fixture());
    (child, stop, out)
}

/// The fixture's call counter (its `calls`) in process `pid` running
/// `exe`, read from its memory; 0 before its program is mapped.
fn fixture_calls(pid: i32, exe: &Path) -> u64 {
    let mut word = [0u8; 8];
    read_variable(pid, exe, "calls", &mut word);
    u64::from_le_bytes(word)
}

/// Reads `buf.len()` bytes of the program's variable `name` in process
/// `pid` running `exe` (zeroes before its program is mapped and readable:
/// right after `exec` the maps may already name it while `/proc/<pid>/mem`
/// still fails).
fn read_variable(pid: i32, exe: &Path, name: &str, buf: &mut [u8]) {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let data = std::fs::read(exe).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .expect("the program's variable")
        .address();
    let first = file.segments().map(|s| s.address()).min().unwrap() & !0xfff;
    let Some(base) = maps(pid).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 6 && Path::new(f[5]) == exe && u64::from_str_radix(f[2], 16) == Ok(0))
            .then(|| u64::from_str_radix(f[0].split_once('-').unwrap().0, 16).unwrap())
    }) else {
        buf.fill(0);
        return;
    };
    let read = std::fs::File::open(format!("/proc/{pid}/mem"))
        .and_then(|mem| mem.read_exact_at(buf, base - first + sym));
    if read.is_err() {
        buf.fill(0);
    }
}

/// Waits until the fixture has called its work function (it is in its
/// loop: a stop file now ends it with `checksum 1`).
fn wait_for_calls(pid: i32, exe: &Path) {
    wait_until(|| fixture_calls(pid, exe) > 0);
}

/// Ends a fixture: `stop` created, it exits 0 and wrote what it writes
/// untraced (`checksum 1`).
fn end_fixture(mut child: Running, stop: &Path, out: &Path) {
    std::fs::write(stop, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(out).unwrap(), "checksum 1\n");
}

/// Waits for `cond`; the bound is only for a machine that never schedules
/// the program.
#[track_caller]
fn wait_until(cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(cond(), "condition not reached in 30 s");
}

fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

/// `State:` and `TracerPid:` of `/proc/<pid>/status`.
fn status(pid: i32) -> (char, i32) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_string()
    };
    (
        field("State:").chars().next().unwrap(),
        field("TracerPid:").parse().unwrap(),
    )
}

/// Running (or sleeping), not traced, not stopped.
fn assert_running_untraced(pid: i32) {
    let (state, tracer) = status(pid);
    assert!(matches!(state, 'R' | 'S'), "state {state}");
    assert_eq!(tracer, 0, "not traced");
}

/// The bytes of every executable mapping of the fixture's file in `pid`.
fn fixture_text(pid: i32) -> Vec<u8> {
    let exe = fixture();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut text = Vec::new();
    for l in maps(pid).lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || Path::new(f[5]) != exe {
            continue;
        }
        let (a, b) = f[0].split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        mem.read_exact_at(&mut buf, a).unwrap();
        text.extend(buf);
    }
    assert!(!text.is_empty());
    text
}

#[test]
fn a_running_program_loads_the_agent_runs_its_init_and_ends_as_if_untraced() {
    let (child, stop, out) = start_fixture("running", "until");
    let pid = pid_of(&child);
    let lib = agent();
    let text = fixture_text(pid);
    let loaded = load_library(pid, &lib, Some(("agent_start", "first"))).unwrap();
    eprintln!(
        "loaded in {:?} (safe point {:?} at look {})",
        loaded.took, loaded.safe_point, loaded.looks
    );
    assert!(loaded.newly_loaded);
    assert_eq!(
        loaded.init_returned.map(|r| r as u32 as u64),
        Some(AGENT_RETURNS)
    );
    assert_eq!(loaded.path, std::fs::canonicalize(&lib).unwrap());
    assert_ne!(loaded.handle, 0);
    assert_eq!(marker(pid), "loaded\n");
    assert_eq!(args_seen(pid), "first\n");
    let base = format!("{:x}-", loaded.base);
    assert!(
        maps(pid)
            .lines()
            .any(|l| l.starts_with(&base) && l.ends_with(lib.to_str().unwrap())),
        "mapped at {base}"
    );
    // No scratch page left, the text as it was, running untraced.
    assert_running_untraced(pid);
    assert_eq!(fixture_text(pid), text, "text untouched");
    // Twice: dlopen counts a reference, the constructor does not run
    // again, the init function does.
    let again = load_library(pid, &lib, Some(("agent_start", "second"))).unwrap();
    assert!(!again.newly_loaded);
    assert_eq!(again.handle, loaded.handle);
    assert_eq!(again.base, loaded.base);
    assert_eq!(marker(pid), "loaded\n");
    assert_eq!(args_seen(pid), "first\nsecond\n");
    // Without an init function.
    let third = load_library(pid, &lib, None).unwrap();
    assert_eq!(third.init_returned, None);
    assert_eq!(args_seen(pid), "first\nsecond\n");
    assert_running_untraced(pid);
    assert_eq!(fixture_text(pid), text, "text untouched");
    // An init function that starts the agent's own thread: created while
    // the process is traced, it runs on untraced.
    let threaded = load_library(pid, &lib, Some(("agent_thread", "bg"))).unwrap();
    assert_eq!(threaded.init_returned.map(|r| r as u32), Some(0));
    wait_until(|| args_seen(pid).ends_with("thread bg\n"));
    let threads = tids(pid);
    assert_eq!(threads.len(), 2, "{threads:?}");
    for t in threads {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap();
        assert!(s.lines().any(|l| l == "TracerPid:\t0"), "thread {t} let go");
    }
    end_fixture(child, &stop, &out);
}

#[test]
fn a_program_sleeping_between_calls_gets_the_library_and_runs_on() {
    let (child, stop, out) = start_fixture("slow", "slow");
    let pid = pid_of(&child);
    let loaded = load_library(pid, &agent(), Some(("agent_start", "slow"))).unwrap();
    eprintln!(
        "loaded in {:?} (safe point {:?} at look {})",
        loaded.took, loaded.safe_point, loaded.looks
    );
    assert_eq!(marker(pid), "loaded\n");
    assert_eq!(args_seen(pid), "slow\n");
    assert_running_untraced(pid);
    end_fixture(child, &stop, &out);
}

/// The general registers (`user_regs_struct`: 27 words) and the `XSAVE`
/// area of process `pid`'s only thread, read by seizing it and letting it
/// go (a thread in a group-stop goes back to it).
fn registers(pid: i32) -> ([u64; 27], Vec<u8>) {
    let req = |r: libc::c_uint, addr: usize, data: usize| {
        // SAFETY: each request below passes integers or a pointer to a
        // live buffer of the size the request writes.
        let rc = unsafe { libc::ptrace(r, pid, addr, data) };
        assert_ne!(rc, -1, "ptrace {r}: {}", std::io::Error::last_os_error());
    };
    req(libc::PTRACE_SEIZE, 0, 0);
    req(libc::PTRACE_INTERRUPT, 0, 0);
    let mut st = 0;
    // SAFETY: our child; `st` is a live c_int.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, libc::__WALL) }, pid);
    let mut regs = [0u64; 27];
    req(libc::PTRACE_GETREGS, 0, regs.as_mut_ptr() as usize);
    let mut xstate = vec![0u8; 16 << 10];
    let mut iov = libc::iovec {
        iov_base: xstate.as_mut_ptr().cast(),
        iov_len: xstate.len(),
    };
    req(
        libc::PTRACE_GETREGSET,
        0x202, // NT_X86_XSTATE
        &mut iov as *mut libc::iovec as usize,
    );
    xstate.truncate(iov.iov_len);
    req(libc::PTRACE_DETACH, 0, 0);
    (regs, xstate)
}

/// `sleep` blocked in `clock_nanosleep`: its thread is borrowed right
/// there. Stopped (`SIGSTOP`), it stays stopped through the load, its
/// registers and vector state exactly as before; running, it keeps
/// sleeping.
#[test]
fn a_program_blocked_in_a_system_call_gets_the_library_stopped_or_running() {
    let sleeper = Running(Command::new("sleep").arg("300").spawn().unwrap());
    let pid = pid_of(&sleeper);
    // (After a stop, the sleep goes on as `restart_syscall`.)
    let in_nanosleep = || {
        std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| {
            [libc::SYS_clock_nanosleep, libc::SYS_restart_syscall]
                .iter()
                .any(|n| s.starts_with(&format!("{n} ")))
        })
    };
    wait_until(in_nanosleep);
    // SAFETY: a signal to our child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until(|| status(pid).0 == 'T');
    let before = registers(pid);
    // (A thread let go from a group-stop is woken to go back into it.)
    wait_until(|| status(pid).0 == 'T');
    let loaded = load_library(pid, &agent(), Some(("agent_start", "stopped"))).unwrap();
    assert_eq!(
        loaded.safe_point,
        SafePoint::Blocked {
            syscall: libc::SYS_clock_nanosleep
        }
    );
    assert_eq!(marker(pid), "loaded\n");
    assert_eq!(args_seen(pid), "stopped\n");
    wait_until(|| status(pid) == ('T', 0));
    let after = registers(pid);
    assert_eq!(after.0, before.0, "general registers");
    assert_eq!(after.1, before.1, "XSAVE area");
    // SAFETY: a signal to our child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_until(|| status(pid).0 == 'S' && in_nanosleep());
    // Running: loaded again (one more reference), and it sleeps on.
    let again = load_library(pid, &agent(), Some(("agent_start", "running"))).unwrap();
    assert!(!again.newly_loaded);
    assert!(matches!(again.safe_point, SafePoint::Blocked { .. }));
    assert_eq!(args_seen(pid), "stopped\nrunning\n");
    wait_until(in_nanosleep);
    assert_running_untraced(pid);
    assert!(maps(pid).contains(agent().to_str().unwrap()));
}

/// Every refusal is typed and leaves the program running untraced, its
/// text as it was; it then ends as if nothing had happened.
#[test]
fn every_error_is_typed_and_leaves_the_program_running_and_unaware() {
    let (child, stop, out) = start_fixture("errors", "until");
    let pid = pid_of(&child);
    let text = fixture_text(pid);
    let lib = agent();
    let unchanged = |what: &str| {
        assert_running_untraced(pid);
        assert_eq!(fixture_text(pid), text, "{what}: text untouched");
        assert!(!maps(pid).contains("libagent"), "{what}: nothing loaded");
    };
    // Checked before the process is touched.
    let r = load_library(i32::MAX - 1, &lib, None);
    assert!(
        matches!(r, Err(RemoteError::NoSuchProcess(p)) if p == i32::MAX - 1),
        "{r:?}"
    );
    let r = load_library(pid, Path::new("/no/such/libagent.so"), None);
    assert!(matches!(r, Err(RemoteError::NoSuchLibrary { .. })), "{r:?}");
    unchanged("no such library");
    let r = load_library(pid, &dir(), None);
    assert!(matches!(r, Err(RemoteError::NoSuchLibrary { .. })), "{r:?}");
    let foreign = dir().join("libarm64.so");
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    std::fs::write(&foreign, &elf).unwrap();
    let r = load_library(pid, &foreign, None);
    assert!(
        matches!(
            r,
            Err(RemoteError::ForeignArchitecture { machine: 183, .. })
        ),
        "{r:?}"
    );
    unchanged("foreign library");
    let r = load_library(pid, &lib, Some(("no_such_start", "x")));
    assert!(
        matches!(r, Err(RemoteError::InitSymbolMissing { loaded: false, .. })),
        "{r:?}"
    );
    assert_eq!(marker(pid), "", "no constructor ran");
    unchanged("missing init symbol");
    // dlopen's own refusal, with dlerror's text.
    let r = load_library(pid, &unresolvable_lib(), None);
    match &r {
        Err(RemoteError::LoadFailed { message, .. }) => {
            assert!(message.contains("no_such_function_anywhere"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!maps(pid).contains("libunresolvable"));
    unchanged("dlopen failed");
    // Traced already (by a tracer of this program): refused, and told by
    // whom.
    let mut t = RemoteTracer::new();
    t.attach(pid).unwrap();
    let r = load_library(pid, &lib, None);
    assert!(
        matches!(
            r,
            Err(RemoteError::NotPermitted {
                why: Refusal::OtherTracer(_),
                ..
            })
        ),
        "{r:?}"
    );
    t.detach(pid).unwrap();
    drop(t);
    unchanged("traced already");
    // Found by the loader only: a function local to the file. The library
    // stays loaded (said by the error), its constructor ran.
    let r = load_library(pid, &lib, Some(("hidden_start", "x")));
    assert!(
        matches!(r, Err(RemoteError::InitSymbolMissing { loaded: true, .. })),
        "{r:?}"
    );
    assert_eq!(marker(pid), "loaded\n");
    assert_eq!(args_seen(pid), "");
    assert_running_untraced(pid);
    assert_eq!(fixture_text(pid), text);
    // An init function that crashes: the fault is the error, the thread
    // is put back where it was and the program runs on (the library was
    // loaded already: the fault held no lock of the loader's).
    let r = load_library(pid, &lib, Some(("agent_crash", "")));
    assert!(
        matches!(
            r,
            Err(RemoteError::CallFaulted {
                signal: libc::SIGSEGV,
                ..
            })
        ),
        "{r:?}"
    );
    assert_running_untraced(pid);
    assert_eq!(fixture_text(pid), text);
    end_fixture(child, &stop, &out);
}

/// A statically linked program has no `dlopen` to call: refused before it
/// is touched.
#[test]
fn a_static_program_is_refused_for_want_of_a_loader() {
    let exe = dir().join("fixture-static");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/remote_support/fixture.c");
    if let Err(e) = cc(&exe, &src, &["-static"]) {
        // (No static C library installed: nothing to test.)
        eprintln!("skipped: {e}");
        return;
    }
    let stop = dir().join("stop-static");
    let out = dir().join("out-static");
    let _ = std::fs::remove_file(&stop);
    let child = Running(
        Command::new(&exe)
            .arg(&out)
            .args(["until", stop.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    let pid = pid_of(&child);
    wait_for_calls(pid, &exe);
    let r = load_library(pid, &agent(), None);
    assert!(
        matches!(r, Err(RemoteError::NoLoader(p)) if p == pid),
        "{r:?}"
    );
    assert_running_untraced(pid);
    end_fixture(child, &stop, &out);
}

/// A program of four threads: three spin in their own code (each counts
/// its rounds in `spins[i]`), the main one sleeps until the stop file
/// exists, then joins them and writes how many `SIGUSR1` and `SIGRTMIN`
/// (a real-time signal: each one sent is delivered) its handlers saw.
const SPINNER: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static volatile sig_atomic_t usr1;
static atomic_long rt;
static atomic_int stop;
volatile unsigned long spins[3];
static void on_usr1(int s) { (void)s; usr1++; }
static void on_rt(int s) { (void)s; atomic_fetch_add(&rt, 1); }
static void *spin(void *arg) {
    long i = (long)arg;
    unsigned long x = 1;
    while (!atomic_load(&stop)) {
        for (int k = 0; k < 1000; k++) x = x * 6364136223846793005UL + 1;
        spins[i]++;
    }
    return (void *)x;
}
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_rt;
    sigaction(SIGRTMIN, &sa, 0);
    pthread_t t[3];
    for (long i = 0; i < 3; i++) pthread_create(&t[i], 0, spin, (void *)i);
    while (access(argv[2], F_OK) != 0) usleep(1000);
    atomic_store(&stop, 1);
    for (int i = 0; i < 3; i++) pthread_join(t[i], 0);
    FILE *f = fopen(argv[1], "w");
    if (!f) return 3;
    fprintf(f, "usr1 %d rt %ld\n", (int)usr1, atomic_load(&rt));
    fclose(f);
    return 0;
}
"#;

fn spinner() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build("spinner", SPINNER, &[])).clone()
}

/// Starts the spinner (output `out`, stop file `stop`) and waits until
/// each of its three threads has spun.
fn start_spinner(name: &str) -> (Running, PathBuf, PathBuf) {
    let stop = dir().join(format!("stop-{name}"));
    let out = dir().join(format!("out-{name}"));
    let _ = std::fs::remove_file(&stop);
    let _ = std::fs::remove_file(&out);
    let child = Running(
        Command::new(spinner())
            .arg(&out)
            .arg(&stop)
            .spawn()
            .unwrap(),
    );
    let pid = pid_of(&child);
    wait_until(|| {
        let mut b = [0u8; 24];
        read_variable(pid, &spinner(), "spins", &mut b);
        b.chunks(8).all(|w| w.iter().any(|&x| x != 0))
    });
    (child, stop, out)
}

/// The thread ids of `pid`.
fn tids(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect()
}

/// A multi-threaded program: a thread spinning in the program's own code
/// is borrowed while the others run on; a signal raised during the call
/// (by the init function, on the borrowed thread) is held back and
/// reaches the program's handler once the thread is its own again; every
/// thread is let go, and the program ends as an untraced run that got one
/// `SIGUSR1` does.
#[test]
fn a_thread_in_the_program_s_own_code_is_borrowed_and_a_signal_raised_meanwhile_comes_after() {
    // Untraced, with one SIGUSR1.
    let (mut plain, stop, out) = start_spinner("spinner-plain");
    // SAFETY: a signal to our child.
    unsafe { libc::kill(pid_of(&plain), libc::SIGUSR1) };
    std::fs::write(&stop, b"").unwrap();
    assert!(plain.0.wait().unwrap().success());
    let untraced = std::fs::read_to_string(&out).unwrap();
    assert_eq!(untraced, "usr1 1 rt 0\n");

    let (mut child, stop, out) = start_spinner("spinner-loaded");
    let pid = pid_of(&child);
    let usr1 = libc::SIGUSR1.to_string();
    let loaded = load_library(pid, &agent(), Some(("agent_raise", &usr1))).unwrap();
    eprintln!(
        "loaded in {:?} (safe point {:?} at look {}, thread {})",
        loaded.took, loaded.safe_point, loaded.looks, loaded.thread
    );
    assert!(
        matches!(loaded.safe_point, SafePoint::Outside { .. }),
        "{:?}",
        loaded.safe_point
    );
    assert_ne!(
        loaded.thread, pid,
        "a spinning thread, not the sleeping one"
    );
    assert_eq!(loaded.init_returned.map(|r| r as u32), Some(0), "raise()");
    assert_eq!(marker(pid), "loaded\n");
    assert_eq!(args_seen(pid), format!("{usr1}\n"));
    for t in tids(pid) {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap();
        assert!(s.lines().any(|l| l == "TracerPid:\t0"), "thread {t} let go");
    }
    std::fs::write(&stop, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), untraced);
}

/// Two threads that wait for ever on one mutex: every thread is in a
/// `futex` wait, which is not a safe point (a thread waiting for one lock
/// may hold another).
const DEADLOCKED: &str = r#"
#include <pthread.h>
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static void *other(void *arg) { (void)arg; pthread_mutex_lock(&m); return 0; }
int main(void) {
    pthread_t t;
    pthread_mutex_lock(&m);
    pthread_create(&t, 0, other, 0);
    pthread_join(t, 0);
    return 0;
}
"#;

/// With no thread at a safe point (every one in a `futex` wait), the load
/// gives up after its bounded looks: nothing called, nothing loaded, the
/// program as it was (waiting, untraced).
#[test]
fn a_program_whose_threads_all_wait_on_locks_has_no_safe_point_and_is_left_alone() {
    let exe = build("deadlocked", DEADLOCKED, &[]);
    let child = Running(Command::new(&exe).spawn().unwrap());
    let pid = pid_of(&child);
    let all_in_futex = || {
        let t = tids(pid);
        t.len() == 2
            && t.iter().all(|t| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{t}/syscall"))
                    .is_ok_and(|s| s.starts_with(&format!("{} ", libc::SYS_futex)))
            })
    };
    wait_until(all_in_futex);
    let start = std::time::Instant::now();
    let r = load_library(pid, &agent(), Some(("agent_start", "never")));
    eprintln!("gave up after {:?}", start.elapsed());
    assert!(
        matches!(r, Err(RemoteError::NoSafePoint(p)) if p == pid),
        "{r:?}"
    );
    assert_eq!(marker(pid), "");
    assert!(!maps(pid).contains("libagent"));
    for t in tids(pid) {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap();
        assert!(s.lines().any(|l| l == "TracerPid:\t0"), "thread {t} let go");
    }
    wait_until(all_in_futex);
    assert_running_untraced(pid);
}

/// Fifty loads into the four-thread program while another thread of this
/// test sends it real-time signals (each one queued, none merged): every
/// signal reaches the program's handler exactly once, whichever thread it
/// came for (a bystander's passed through, the borrowed thread's held and
/// sent again), the constructor ran once and the init function fifty
/// times, and the program ends as an untraced run that got those signals.
#[test]
fn fifty_loads_under_a_stream_of_queued_signals_lose_and_duplicate_none() {
    const LOADS: usize = 50;
    const SIGNALS: usize = 2000;
    let (mut child, stop, out) = start_spinner("spinner-storm");
    let pid = pid_of(&child);
    let sender = std::thread::spawn(move || {
        for i in 0..SIGNALS {
            // SAFETY: a signal to our test's child (alive until joined).
            assert_eq!(unsafe { libc::kill(pid, libc::SIGRTMIN()) }, 0);
            if i % 16 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            if i % 400 == 0 {
                // A group-stop begun and ended while loads go on.
                // SAFETY: signals to our test's child.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_micros(500));
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        }
    });
    let mut safe_points = std::collections::BTreeMap::new();
    let start = std::time::Instant::now();
    for i in 0..LOADS {
        let arg = format!("load {i}");
        let l = load_library(pid, &agent(), Some(("agent_start", &arg))).unwrap();
        let kind = match l.safe_point {
            SafePoint::Outside { .. } => "outside",
            SafePoint::Blocked { .. } => "blocked",
        };
        *safe_points.entry(kind).or_insert(0) += 1;
    }
    eprintln!(
        "{LOADS} loads in {:?} under signals; safe points {safe_points:?}",
        start.elapsed()
    );
    sender.join().unwrap();
    assert_eq!(marker(pid), "loaded\n");
    let want: String = (0..LOADS).map(|i| format!("load {i}\n")).collect();
    assert_eq!(args_seen(pid), want);
    std::fs::write(&stop, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("usr1 0 rt {SIGNALS}\n")
    );
}

/// A group-stop that begins during the calls (the init function sends its
/// process `SIGSTOP`, which any of its threads may take): the load
/// finishes, every thread is let go (those that entered the stop while
/// the load let them run included) and the process is left stopped, as
/// the signal asked; `SIGCONT` resumes it and it ends as untraced.
#[test]
fn a_group_stop_begun_during_the_calls_is_left_in_place_and_every_thread_let_go() {
    let (mut child, stop, out) = start_spinner("spinner-stopped");
    let pid = pid_of(&child);
    load_library(pid, &agent(), Some(("agent_stop", ""))).unwrap();
    let untraced_and_stopped = || {
        tids(pid).iter().all(|t| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap();
            s.lines().any(|l| l == "TracerPid:\t0") && s.lines().any(|l| l.starts_with("State:\tT"))
        })
    };
    wait_until(untraced_and_stopped);
    // SAFETY: a signal to our child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    std::fs::write(&stop, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "usr1 0 rt 0\n");
}
