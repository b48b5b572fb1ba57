//! Uprobes in other processes over ptrace (`probes::remote`): a fixture
//! program built here and a command of the base system, traced from spawn
//! or attached to while it runs.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcu_registry::probes::remote::{ExitStatus, Refusal, RemoteError, RemoteTracer};
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeTarget};
use rcu_registry::probes::ProbeError;

#[path = "remote_support/mod.rs"]
mod remote_support;
use remote_support::{dir, fixture, fixture_lib, Running};

/// A consumer counting its hits.
fn counter() -> (Consumer, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&n);
    let consumer = Consumer::new(move |_, _| {
        c.fetch_add(1, Ordering::Relaxed);
        ConsumerAction::Continue
    });
    (consumer, n)
}

fn run_untraced(args: &[&str]) -> String {
    let out = dir().join(format!("untraced-{}", args.join("-").replace('/', "_")));
    let st = Command::new(fixture())
        .arg(&out)
        .args(args)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read_to_string(out).unwrap()
}

fn fixture_cmd(out: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(fixture());
    c.arg(out).args(args);
    c
}

fn fixture_file() -> String {
    fixture().to_str().unwrap().to_string()
}

/// Registers a counter on `target` (before the program exists: installed
/// at its exec stop, or when the loader maps the file), runs the fixture
/// with `args` traced to its end, and checks that it exited 0, that the
/// counter saw `calls`, and that it wrote what it writes untraced.
fn traced_run(target: UprobeTarget, args: &[&str], calls: u64) {
    let mut t = RemoteTracer::new();
    let (c, hits) = counter();
    t.register(&target, &c).unwrap();
    let out = dir().join(format!("traced-{}", args[0]));
    let pid = t.spawn(&fixture_cmd(&out, args)).unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    assert_eq!(hits.load(Ordering::Relaxed), calls);
    assert_eq!(std::fs::read_to_string(out).unwrap(), run_untraced(args));
}

#[test]
fn a_spawned_program_counts_every_call_from_two_threads_and_writes_what_it_writes_untraced() {
    let target = UprobeTarget::symbol(fixture_file().as_str(), "rt_work");
    traced_run(target, &["work", "5000", "2"], 10_000);
}

#[test]
fn a_c_library_function_is_probed_once_the_loader_has_mapped_the_library() {
    traced_run(
        UprobeTarget::symbol("libc.so.6", "getppid"),
        &["libc", "777"],
        777,
    );
}

#[test]
fn a_fork_child_is_let_go_with_its_original_text_and_the_parent_keeps_counting() {
    // The parent's calls only; the child ran untraced and exited 7.
    let target = UprobeTarget::symbol(fixture_file().as_str(), "rt_work");
    traced_run(target, &["fork", "300"], 300);
}

/// Four threads hit `rt_work` while the tracer registers and removes a
/// second uprobe (on `rt_other`, which they also call: breakpoints written
/// and restored under their feet) and a second consumer on `rt_work`, over
/// and over until the program ends: the first consumer counts every call,
/// the program's output is the untraced one, nothing crashes.
#[test]
fn registration_churn_while_four_threads_hit_changes_no_count_and_no_output() {
    let file = fixture_file();
    let mut t = RemoteTracer::new();
    let (steady, hits) = counter();
    t.register(&UprobeTarget::symbol(file.as_str(), "rt_work"), &steady)
        .unwrap();
    let (churn, churned) = counter();
    let out = dir().join("traced-churn");
    let args = ["work", "20000", "4"];
    let pid = t.spawn(&fixture_cmd(&out, &args)).unwrap();
    let mut cycles = 0u64;
    while !t.pids().is_empty() {
        let a = t.register(&UprobeTarget::symbol(file.as_str(), "rt_other"), &churn);
        let b = t.register(&UprobeTarget::symbol(file.as_str(), "rt_work"), &churn);
        t.run_for(Duration::from_millis(2)).unwrap();
        for r in [a, b].into_iter().flatten() {
            let _ = t.unregister(r.key(), &churn);
        }
        t.run_for(Duration::from_millis(2)).unwrap();
        cycles += 1;
    }
    eprintln!(
        "{cycles} churn cycles; churned consumer saw {} hits",
        churned.load(Ordering::Relaxed)
    );
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    assert_eq!(hits.load(Ordering::Relaxed), 80_000);
    assert_eq!(std::fs::read_to_string(out).unwrap(), run_untraced(&args));
}

/// `kill -9` of a traced program while its thread waits in a ptrace stop
/// at a breakpoint the tracer has not served: the tracer reports the signal
/// and forgets the space.
#[test]
fn a_program_killed_while_traced_is_reported_and_forgotten() {
    let stop = dir().join("stop-kill");
    let out = dir().join("traced-kill");
    let mut t = RemoteTracer::new();
    let (c, hits) = counter();
    on_rt_work(&mut t, &c);
    let pid = t
        .spawn(&fixture_cmd(&out, &["until", stop.to_str().unwrap()]))
        .unwrap();
    let space = space_of(&t, pid);
    let start = std::time::Instant::now();
    while hits.load(Ordering::Relaxed) < 10 && start.elapsed() < Duration::from_secs(20) {
        t.run_for(Duration::from_millis(5)).unwrap();
    }
    assert!(t.registry().installs_in(space) > 0);
    // Not served now: its thread stops at its next call of `rt_work` and
    // waits there, in a ptrace stop ("t"), when the signal comes.
    let start = std::time::Instant::now();
    while stat_state(pid) != 't' && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(stat_state(pid), 't', "stopped at a breakpoint");
    // SAFETY: a signal to the traced child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Signal(libc::SIGKILL)));
    assert!(t.pids().is_empty());
    assert_eq!(t.registry().installs_in(space), 0, "its installs forgotten");
}

/// A traced program stopped with `SIGSTOP` stays stopped through a
/// registration (which stops and resumes every thread) and goes on at
/// `SIGCONT`.
#[test]
fn a_stopped_program_stays_stopped_through_a_registration() {
    let stop = dir().join("stop-sigstop");
    let out = dir().join("traced-sigstop");
    let file = fixture_file();
    let mut t = RemoteTracer::new();
    let (c, hits) = counter();
    t.register(&UprobeTarget::symbol(file.as_str(), "rt_work"), &c)
        .unwrap();
    let pid = t
        .spawn(&fixture_cmd(&out, &["until", stop.to_str().unwrap()]))
        .unwrap();
    let state = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        s.rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let served_until = |t: &mut RemoteTracer, done: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !done() && start.elapsed() < Duration::from_secs(20) {
            t.run_for(Duration::from_millis(5)).unwrap();
        }
    };
    served_until(&mut t, &|| hits.load(Ordering::Relaxed) > 0);
    // SAFETY: a signal to the traced child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Served until the tracer has seen the group-stop (a hit pending before
    // the signal is served first).
    let start = std::time::Instant::now();
    while !t.group_stopped(pid) && start.elapsed() < Duration::from_secs(20) {
        t.run_for(Duration::from_millis(5)).unwrap();
    }
    assert!(t.group_stopped(pid), "in its group-stop");
    assert_eq!(state(), "t");
    let (other, _) = counter();
    let r = t
        .register(&UprobeTarget::symbol(file.as_str(), "rt_other"), &other)
        .unwrap();
    let before = hits.load(Ordering::Relaxed);
    t.run_for(Duration::from_millis(50)).unwrap();
    assert_eq!(state(), "t", "still stopped after the registration");
    assert_eq!(
        hits.load(Ordering::Relaxed),
        before,
        "no call while stopped"
    );
    t.unregister(r.key(), &other).unwrap();
    // SAFETY: a signal to the traced child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    served_until(&mut t, &|| hits.load(Ordering::Relaxed) > before);
    assert!(
        hits.load(Ordering::Relaxed) > before,
        "runs again after SIGCONT"
    );
    std::fs::write(&stop, b"").unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
}

/// A uprobe and a uretprobe registered before the program runs, on a
/// library it opens with `dlopen`, closes and opens again: every call and
/// every return value counted.
#[test]
fn a_library_opened_later_is_probed_at_each_dlopen_and_its_returns_are_seen() {
    let lib = fixture_lib();
    let mut t = RemoteTracer::new();
    // lib_add(i) = i + 5: the sum of the return values is checked.
    let (consumer, calls, rets) = entries_and_returns();
    t.register(
        &UprobeTarget::symbol(lib.to_str().unwrap(), "lib_add"),
        &consumer,
    )
    .unwrap();
    let out = dir().join("traced-dlopen");
    let pid = t
        .spawn(&fixture_cmd(
            &out,
            &["dlopen", lib.to_str().unwrap(), "200"],
        ))
        .unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    assert_eq!(calls.load(Ordering::Relaxed), 400);
    let per_round: u64 = (0..200).map(|i| i + 5).sum();
    assert_eq!(rets.load(Ordering::Relaxed), 2 * per_round);
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        run_untraced(&["dlopen", lib.to_str().unwrap(), "200"])
    );
}

/// `ls` (a command of the base system, run through `sh -c`, which `exec`s
/// it): a probe on the C library's `readdir64` fires in the new image, and
/// the listing is the untraced one.
#[test]
fn a_base_system_command_after_exec_is_traced_and_its_output_is_unchanged() {
    let Ok(ls) = which("ls") else {
        eprintln!("skipped: no `ls` in PATH");
        return;
    };
    let untraced = Command::new(&ls)
        .args(["-1", "/usr/lib"])
        .output()
        .unwrap()
        .stdout;
    let mut t = RemoteTracer::new();
    let (c, hits) = counter();
    t.register(&UprobeTarget::symbol("libc.so.6", "readdir64"), &c)
        .unwrap();
    let out = dir().join("traced-ls");
    let script = format!("exec {} -1 /usr/lib > {}", ls.display(), out.display());
    let pid = t.spawn(Command::new("sh").args(["-c", &script])).unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    assert!(hits.load(Ordering::Relaxed) > 0, "readdir64 was called");
    assert_eq!(std::fs::read(out).unwrap(), untraced);
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::split_paths(&std::env::var_os("PATH").ok_or(())?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The state letter of process `pid` (`/proc/<pid>/stat`).
fn stat_state(pid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .chars()
        .next()
        .unwrap()
}

/// The space id of traced process `pid`.
fn space_of(t: &RemoteTracer, pid: i32) -> rcu_registry::probes::uprobe::SpaceId {
    use rcu_registry::probes::uprobe::AddressSpace;
    t.space(pid).expect("traced").id()
}

/// Where the uprobe `key` sits in traced process `pid`, as the registry
/// mapped it.
fn probe_address(t: &RemoteTracer, pid: i32, key: rcu_registry::probes::uprobe::UprobeKey) -> u64 {
    t.registry()
        .mappings_of(space_of(t, pid))
        .iter()
        .filter(|m| m.file == key.file)
        .find_map(|m| m.vaddr_of(key.offset))
        .expect("the program's text is mapped")
}

/// `len` bytes of the fixture program's file at `offset`.
fn fixture_bytes(offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(fixture())
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

/// The code bytes of `symbol` in `pid`, through its memory file.
fn code_of(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, addr).unwrap();
    b
}

/// Registers `c` on the fixture's `rt_work`.
fn on_rt_work(t: &mut RemoteTracer, c: &Consumer) {
    t.register(&UprobeTarget::symbol(fixture_file().as_str(), "rt_work"), c)
        .unwrap();
}

/// The fixture started untraced in its `until` mode (it calls `rt_work`
/// until the stop file exists): the program, the stop file, its output.
fn until_running(name: &str) -> (Running, PathBuf, PathBuf) {
    let stop = dir().join(format!("stop-{name}"));
    let out = dir().join(format!("traced-until-{name}"));
    let _ = std::fs::remove_file(&stop);
    let child = Running(
        fixture_cmd(&out, &["until", stop.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    (child, stop, out)
}

/// Serves `t`'s stops until `hits` has moved past `past` (the program
/// calls the function in a loop; the bound is for a machine that does not
/// schedule it at all).
fn serve_until_counted(t: &mut RemoteTracer, hits: &AtomicU64, past: u64) {
    let start = std::time::Instant::now();
    while hits.load(Ordering::Relaxed) == past && start.elapsed() < Duration::from_secs(20) {
        t.run_for(Duration::from_millis(10)).unwrap();
    }
}

#[test]
fn attach_and_detach_cycles_leave_a_running_program_unaware() {
    let (mut child, stop, out) = until_running("attach");
    let pid = child.0.id() as i32;
    let mut t = RemoteTracer::new();
    let (c, hits) = counter();
    let resolved = t
        .register(
            &UprobeTarget::symbol(fixture_file().as_str(), "rt_work"),
            &c,
        )
        .unwrap();
    // Where the uprobe sits in the process, as the registry mapped it at
    // the first attach; the original bytes are the file's.
    let key = resolved.key();
    let original = fixture_bytes(key.offset, 4);
    let mut at = None;
    let mut last = 0;
    for round in 0..3 {
        t.attach(pid).unwrap();
        let here = probe_address(&t, pid, key);
        let at = *at.get_or_insert(here);
        assert_eq!(here, at, "round {round}: the same place");
        assert_eq!(code_of(pid, at, 1), [0xcc], "round {round}: installed");
        serve_until_counted(&mut t, &hits, last);
        let chunks = t.space(pid).unwrap().xol_slots().chunk_ranges();
        assert!(!chunks.is_empty());
        t.detach(pid).unwrap();
        assert_eq!(code_of(pid, at, 4), original, "round {round}: restored");
        // Its XOL area is gone from its address space.
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        for (start, _) in chunks {
            assert!(
                !maps.lines().any(|l| l.starts_with(&format!("{start:x}-"))),
                "round {round}: XOL chunk {start:#x} unmapped"
            );
        }
        let now = hits.load(Ordering::Relaxed);
        assert!(now > last, "round {round}: counted while attached");
        last = now;
    }
    assert_eq!(
        hits.load(Ordering::Relaxed),
        last,
        "nothing counted detached"
    );
    std::fs::write(&stop, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(out).unwrap(), "checksum 1\n");
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let mut t = RemoteTracer::new();
    // No such process.
    assert!(matches!(
        t.attach(i32::MAX - 1),
        Err(RemoteError::NoSuchProcess(p)) if p == i32::MAX - 1
    ));
    // A process that has exited (a zombie its parent has not reaped: what
    // a process exiting during the attach becomes).
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id() as i32;
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{gone_pid}/stat"))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .starts_with('Z')
        && start.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(matches!(
        t.attach(gone_pid),
        Err(RemoteError::NoSuchProcess(p)) if p == gone_pid
    ));
    assert!(t.pids().is_empty());
    gone.wait().unwrap();
    // A symbol that is not there.
    let (c, _) = counter();
    assert!(matches!(
        t.register(
            &UprobeTarget::symbol(fixture_file().as_str(), "no_such_function"),
            &c
        ),
        Err(ProbeError::SymbolNotInFile { .. })
    ));
    assert_eq!(t.registry().len(), 0);
    // A program that does not exist.
    assert!(matches!(
        t.spawn(&Command::new("/no/such/program")),
        Err(RemoteError::Os { .. })
    ));
    assert!(t.pids().is_empty());
    // A program for another machine (an ELF header saying AArch64, 183):
    // refused before anything starts.
    let foreign = dir().join("arm64-program");
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1; // version
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    std::fs::write(&foreign, &elf).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(
        t.spawn(&Command::new(&foreign)),
        Err(RemoteError::ForeignArchitecture { machine: 183, .. })
    ));
    assert!(t.pids().is_empty());
    // Attaching twice.
    let (mut child, stop, _) = until_running("twice");
    let pid = child.0.id() as i32;
    t.attach(pid).unwrap();
    assert!(matches!(t.attach(pid), Err(RemoteError::AlreadyTraced(p)) if p == pid));
    // A target in no file the process maps (by bare name, by path): a
    // typed error, nothing registered, its text unchanged.
    let (other, _) = counter();
    let lib = fixture_lib();
    let before = (
        t.registry().len(),
        t.registry().installs_in(space_of(&t, pid)),
    );
    for target in [
        UprobeTarget::symbol("libremotefix.so", "lib_add"),
        UprobeTarget::symbol(lib.to_str().unwrap(), "lib_add"),
    ] {
        assert!(
            matches!(
                t.register_in(pid, &target, &other),
                Err(RemoteError::NotInProcess { pid: p, .. }) if p == pid
            ),
            "{target}"
        );
    }
    assert_eq!(
        (
            t.registry().len(),
            t.registry().installs_in(space_of(&t, pid))
        ),
        before
    );
    assert!(matches!(
        t.register_in(
            i32::MAX - 1,
            &UprobeTarget::symbol("libc.so.6", "getppid"),
            &other
        ),
        Err(RemoteError::NotTraced(_))
    ));
    // A bare name as the process sees it: the C library it maps (once its
    // loader has mapped it: it may have been attached to right after its
    // `exec`), read through its own root.
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .contains("/libc.so.6")
        && start.elapsed() < Duration::from_secs(20)
    {
        t.run_for(Duration::from_millis(5)).unwrap();
    }
    let before = (
        t.registry().len(),
        t.registry().installs_in(space_of(&t, pid)),
    );
    let r = t
        .register_in(pid, &UprobeTarget::symbol("libc.so.6", "getppid"), &other)
        .unwrap();
    assert!(r.path.starts_with(format!("/proc/{pid}/root/")), "{r:?}");
    // Installed there once the tracer has served the loader's report of
    // the mapping (its rendezvous stop may still be pending).
    let start = std::time::Instant::now();
    while t.registry().installs_in(space_of(&t, pid)) < before.1 + 1
        && start.elapsed() < Duration::from_secs(20)
    {
        t.run_for(Duration::from_millis(5)).unwrap();
    }
    assert_eq!(t.registry().installs_in(space_of(&t, pid)), before.1 + 1);
    t.unregister(r.key(), &other).unwrap();
    // Another tracer (a second one, on another thread) is refused and
    // told by whom; the first one's process is untouched.
    let before = t.registry().installs_in(space_of(&t, pid));
    let other = std::thread::spawn(move || match RemoteTracer::new().attach(pid) {
        Err(RemoteError::NotPermitted {
            why: Refusal::OtherTracer(by),
            ..
        }) => Ok(by),
        other => Err(format!("{other:?}")),
    })
    .join()
    .unwrap();
    assert!(other.is_ok(), "{other:?}");
    assert_eq!(t.registry().installs_in(space_of(&t, pid)), before);
    t.detach(pid).unwrap();
    assert!(matches!(t.detach(pid), Err(RemoteError::NotTraced(_))));
    std::fs::write(&stop, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
}

/// A consumer counting entries and summing return values.
fn entries_and_returns() -> (Consumer, Arc<AtomicU64>, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let rets = Arc::new(AtomicU64::new(0));
    let (c1, r1) = (Arc::clone(&calls), Arc::clone(&rets));
    let consumer = Consumer::builder()
        .handler(move |_, _| {
            c1.fetch_add(1, Ordering::Relaxed);
            ConsumerAction::Continue
        })
        .ret_handler(move |ret, _| {
            r1.fetch_add(ret.retval, Ordering::Relaxed);
        })
        .build();
    (consumer, calls, rets)
}

/// Four threads call `rt_work` (`3x + 1`) with a return handler on it:
/// every return is seen with its value. The tracer serves every thread's
/// hits on its own thread; each traced thread has its own return stack (one
/// shared by all would drop one thread's calls at another's entry, and
/// their returns would die of the trampoline's trap).
#[test]
fn four_threads_returning_through_the_trampoline_see_every_return() {
    let (consumer, calls, rets) = entries_and_returns();
    let mut t = RemoteTracer::new();
    on_rt_work(&mut t, &consumer);
    let args = ["work", "3000", "4"];
    let out = dir().join("traced-rets4");
    let pid = t.spawn(&fixture_cmd(&out, &args)).unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    assert_eq!(calls.load(Ordering::Relaxed), 12_000);
    let per_thread: u64 = (0..3000).map(|i| 3 * i + 1).sum();
    assert_eq!(rets.load(Ordering::Relaxed), 4 * per_thread);
    assert_eq!(std::fs::read_to_string(out).unwrap(), run_untraced(&args));
}

/// A handler learns which traced thread's call it sees from
/// `serving_thread` (the tracer runs every handler on its own thread):
/// four threads' entries and returns are each told their own thread of
/// the spawned process, and outside a handler there is none.
#[test]
fn handlers_are_told_the_traced_thread_whose_entry_or_return_they_serve() {
    use rcu_registry::probes::remote::serving_thread;
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Seen = Arc<Mutex<HashMap<(i32, i32), (u64, u64)>>>;
    let seen: Seen = Arc::default();
    let (at_entry, at_return) = (Arc::clone(&seen), Arc::clone(&seen));
    let consumer = Consumer::builder()
        .handler(move |_, _| {
            let t = serving_thread().expect("inside a handler");
            at_entry
                .lock()
                .unwrap()
                .entry((t.pid, t.tid))
                .or_default()
                .0 += 1;
            ConsumerAction::Continue
        })
        .ret_handler(move |_, _| {
            let t = serving_thread().expect("inside a return handler");
            at_return
                .lock()
                .unwrap()
                .entry((t.pid, t.tid))
                .or_default()
                .1 += 1;
        })
        .build();
    let mut t = RemoteTracer::new();
    t.register(
        &UprobeTarget::symbol(fixture_file().as_str(), "rt_work"),
        &consumer,
    )
    .unwrap();
    assert_eq!(serving_thread(), None);
    let out = dir().join("traced-serving");
    let pid = t.spawn(&fixture_cmd(&out, &["work", "500", "4"])).unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    assert_eq!(serving_thread(), None);
    let seen = seen.lock().unwrap();
    // Four worker threads of `pid` (not its main thread, which only
    // joins them), each with its own 500 entries and 500 returns.
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (&(p, tid), &counts) in seen.iter() {
        assert_eq!(p, pid);
        assert_ne!(tid, pid);
        assert_eq!(counts, (500, 500), "thread {tid}");
    }
}

/// `rt_fork` forks inside a call tracked for its return: the parent's
/// return is seen, and the child (let go with its text and its copy of the
/// stack cleaned) returns from it to its caller and exits 7 as it does
/// untraced.
#[test]
fn a_fork_inside_a_call_tracked_for_its_return_lets_the_child_return_normally() {
    assert_eq!(
        fork_inside_a_tracked_call(false),
        200,
        "the parent's calls only"
    );
}

/// Runs the fixture's `forkin 200` (with children followed or not), a
/// uretprobe on `rt_fork` and a counter on `rt_work`; checks the exit, the
/// one entry and the parent's return (the child's pid) and the output
/// (its checksum includes the child's exit status, 7); returns the calls
/// of `rt_work` counted.
fn fork_inside_a_tracked_call(follow: bool) -> u64 {
    let (consumer, calls, rets) = entries_and_returns();
    let (work, worked) = counter();
    let file = fixture_file();
    let mut t = RemoteTracer::new();
    t.follow_forks(follow);
    t.register(&UprobeTarget::symbol(file.as_str(), "rt_fork"), &consumer)
        .unwrap();
    t.register(&UprobeTarget::symbol(file.as_str(), "rt_work"), &work)
        .unwrap();
    let args = ["forkin", "200"];
    let out = dir().join(format!("traced-forkin-{follow}"));
    let pid = t.spawn(&fixture_cmd(&out, &args)).unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    assert_ne!(rets.load(Ordering::Relaxed), 0, "the parent's return");
    assert_eq!(std::fs::read_to_string(out).unwrap(), run_untraced(&args));
    worked.load(Ordering::Relaxed)
}

/// The instruction pointer of thread `pid` of a process stopped outside a
/// system call, from `/proc/<pid>/syscall` (`-1 sp pc`).
fn stopped_pc(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    let mut f = s.split_whitespace();
    (f.next()? == "-1").then_some(())?;
    let pc = f.nth(1)?;
    u64::from_str_radix(pc.trim_start_matches("0x"), 16).ok()
}

/// Runs program `args` (single-threaded, until `stop` exists) attached to,
/// with `consumer` on `symbol`; at the `nth` hit the handler stops the
/// program with `SIGSTOP` (its thread stops right where the hit resumed
/// it); then detaches, lets it go on, and checks that it ends as untraced.
/// `check` sees the tracer and the stopped pc before the detach.
fn detach_at_a_forced_stop(
    symbol: &str,
    mode: &str,
    nth: u64,
    with_returns: bool,
    check: impl FnOnce(&RemoteTracer, i32, u64),
) {
    let stop = dir().join(format!("stop-forced-{symbol}"));
    let out = dir().join(format!("traced-forced-{symbol}"));
    let _ = std::fs::remove_file(&stop);
    let mut child = Running(
        fixture_cmd(&out, &[mode, stop.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id() as i32;
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let mut b = Consumer::builder().handler(move |_, _| {
        if h.fetch_add(1, Ordering::Relaxed) + 1 == nth {
            // SAFETY: a signal to the traced child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        ConsumerAction::Continue
    });
    if with_returns {
        b = b.ret_handler(|_, _| {});
    }
    let consumer = b.build();
    let mut t = RemoteTracer::new();
    t.register(
        &UprobeTarget::symbol(fixture_file().as_str(), symbol),
        &consumer,
    )
    .unwrap();
    t.attach(pid).unwrap();
    let start = std::time::Instant::now();
    while !t.group_stopped(pid) && start.elapsed() < Duration::from_secs(30) {
        t.run_for(Duration::from_millis(5)).unwrap();
    }
    assert!(t.group_stopped(pid), "stopped at hit {nth}");
    let pc = stopped_pc(pid).expect("a stopped thread's pc");
    check(&t, pid, pc);
    t.detach(pid).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), nth, "no hit after the stop");
    // SAFETY: a signal to our child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    std::fs::write(&stop, b"").unwrap();
    let st = child.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "checksum 1\n");
}

/// A thread stopped inside an XOL slot (sent there by a boosted hit, then
/// stopped by `SIGSTOP` before it ran the displaced instruction) when the
/// process is detached: the detach steps it out first, and the program
/// runs on unaware.
#[test]
fn a_detach_while_a_thread_sits_in_an_xol_slot_steps_it_out_first() {
    detach_at_a_forced_stop("rt_work", "until", 5, false, |t, pid, pc| {
        let slots = t.space(pid).unwrap().xol_slots().chunk_ranges();
        assert!(
            slots.iter().any(|&(s, len)| (s..s + len).contains(&pc)),
            "pc {pc:#x} in an XOL slot {slots:x?}"
        );
    });
}

/// A detach while a call tracked for its return is in flight (stopped
/// inside `rt_slow` right after its entry): the real return address is
/// written back, and the call returns to its caller instead of the
/// trampoline (whose trap would kill the program).
#[test]
fn a_detach_while_a_call_is_tracked_for_its_return_sends_it_back_to_its_caller() {
    detach_at_a_forced_stop("rt_slow", "slow", 3, true, |t, pid, pc| {
        let slots = t.space(pid).unwrap().xol_slots().chunk_ranges();
        assert!(
            !slots.iter().any(|&(s, len)| (s..s + len).contains(&pc)),
            "the entry was emulated: pc {pc:#x} in rt_slow"
        );
    });
}

/// `SIGTERM` to a program whose tracer asked to detach on termination: the
/// tracer detaches first (the attached program's text is restored, it is
/// no longer traced, it runs on and ends as untraced) and the tracer's
/// `run` returns `Terminated`. The tracer runs in a second process (this
/// test binary again, running this test in the tracer's role), which
/// starts the program and attaches to it.
#[test]
fn a_tracer_told_to_terminate_detaches_first_and_the_program_runs_on() {
    if std::env::var_os("REMOTE_TERM_ROLE").is_some() {
        return termination_tracer();
    }
    let stop = dir().join("stop-term");
    let out = dir().join("traced-term");
    let (mut helper, pid, at, original) = start_tracer_helper(&stop, &out, false);
    assert_eq!(code_of(pid, at, 1), [0xcc], "probed while the tracer runs");
    // SAFETY: a signal to our child.
    assert_eq!(unsafe { libc::kill(helper.id() as i32, libc::SIGTERM) }, 0);
    let st = helper.wait().unwrap();
    assert!(
        st.success(),
        "the tracer saw Terminated and detached: {st:?}"
    );
    assert_eq!(code_of(pid, at, 1), [original], "restored");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l == "TracerPid:\t0"),
        "no longer traced"
    );
    stop_and_check_untraced_end(&stop, &out);
}

/// Ends a fixture in `until` mode that is not this process's child (the
/// helper started it): creates `stop`, and waits for the output it writes
/// untraced.
fn stop_and_check_untraced_end(stop: &Path, out: &Path) {
    std::fs::write(stop, b"").unwrap();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(out).unwrap_or_default() != "checksum 1\n"
        && start.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(out).unwrap(), "checksum 1\n");
}

/// The name of the test whose tracer's role the helper process plays.
const TRACER_ROLE_TEST: &str = "a_tracer_told_to_terminate_detaches_first_and_the_program_runs_on";

/// Starts this test binary in the tracer's role (`termination_tracer`):
/// it starts the fixture in `until` mode (stopped by `stop`, writing to
/// `out`), attaches to it with a uprobe on `rt_work`, and once that has hit
/// prints its pid, the probe's address and the original byte there.
/// With `group_stop`, the helper then stops the program with `SIGSTOP`,
/// serves it until it is in its group-stop, and says `stopped`.
fn start_tracer_helper(
    stop: &Path,
    out: &Path,
    group_stop: bool,
) -> (std::process::Child, i32, u64, u8) {
    use std::io::BufRead;
    let _ = std::fs::remove_file(stop);
    let _ = std::fs::remove_file(out);
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            TRACER_ROLE_TEST,
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("REMOTE_TERM_ROLE", "tracer")
        .env("REMOTE_TERM_STOP", stop)
        .env("REMOTE_TERM_OUT", out)
        .env("REMOTE_TERM_GROUP_STOP", if group_stop { "1" } else { "" })
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(helper.stdout.take().unwrap()).lines();
    // (On the harness's "test ... " line, which has no newline yet.)
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split_once("ready ").map(|(_, r)| r.to_string()))
        .expect("the tracer's ready line");
    if group_stop {
        assert!(
            lines
                .by_ref()
                .map_while(Result::ok)
                .any(|l| l.contains("stopped")),
            "the tracer's stopped line"
        );
    }
    // The rest is drained: a closed pipe would fail the helper's output.
    std::thread::spawn(move || lines.for_each(drop));
    let f: Vec<u64> = ready.split(' ').map(|v| v.parse().unwrap()).collect();
    (helper, f[0] as i32, f[1], f[2] as u8)
}

/// A tracer killed with `SIGKILL` leaves its breakpoints in the program it
/// attached to; `repair` from another tracer puts the text back from the
/// program's files, and the program (stopped meanwhile, or its next call
/// would have killed it) runs on and ends as untraced.
#[test]
fn a_program_left_with_breakpoints_by_a_killed_tracer_is_repaired_from_its_files() {
    let stop = dir().join("stop-repair");
    let out = dir().join("traced-repair");
    // The helper stops the program (in its group-stop, where the tracer's
    // death leaves it) before it is killed.
    let (mut helper, pid, at, original) = start_tracer_helper(&stop, &out, true);
    let state = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_string()
        };
        (field("State:"), field("TracerPid:"))
    };
    helper.kill().unwrap();
    helper.wait().unwrap();
    // The kernel detached it (the tracer thread's exit did, before the
    // helper could be reaped): back in its group-stop (once it has run
    // into it again), untraced, the breakpoint still in.
    let start = std::time::Instant::now();
    while !state().0.starts_with('T') && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(state().0.starts_with('T'), "stopped: {:?}", state());
    assert_eq!(state().1, "0", "no tracer any more");
    assert_eq!(code_of(pid, at, 1), [0xcc], "left behind");
    let mut t = RemoteTracer::new();
    let restored = t.repair(pid).unwrap();
    assert!(restored.contains(&at), "{restored:x?}");
    assert_eq!(code_of(pid, at, 1), [original], "repaired");
    // Let go: woken to go back into its group-stop, where it stays.
    let start = std::time::Instant::now();
    while !state().0.starts_with('T') && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(state().0.starts_with('T'), "still stopped: {:?}", state());
    assert_eq!(state().1, "0", "let go");
    // No such process: a typed error.
    assert!(matches!(
        t.repair(i32::MAX - 1),
        Err(RemoteError::NoSuchProcess(_))
    ));
    // SAFETY: a signal to the fixture.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    stop_and_check_untraced_end(&stop, &out);
}

/// The tracer's role in the tests above.
fn termination_tracer() {
    let stop = std::env::var_os("REMOTE_TERM_STOP").unwrap();
    let out = PathBuf::from(std::env::var_os("REMOTE_TERM_OUT").unwrap());
    let child = fixture_cmd(&out, &["until", stop.to_str().unwrap()])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut t = RemoteTracer::new();
    let (c, hits) = counter();
    let resolved = t
        .register(
            &UprobeTarget::symbol(fixture_file().as_str(), "rt_work"),
            &c,
        )
        .unwrap();
    t.detach_on_termination().unwrap();
    t.attach(pid).unwrap();
    let start = std::time::Instant::now();
    while hits.load(Ordering::Relaxed) == 0 && start.elapsed() < Duration::from_secs(20) {
        t.run_for(Duration::from_millis(5)).unwrap();
    }
    assert!(hits.load(Ordering::Relaxed) > 0);
    let key = resolved.key();
    let at = probe_address(&t, pid, key);
    let orig = fixture_bytes(key.offset, 1);
    println!("ready {pid} {at} {}", orig[0]);
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    if std::env::var("REMOTE_TERM_GROUP_STOP").is_ok_and(|v| v == "1") {
        // SAFETY: a signal to our child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let start = std::time::Instant::now();
        while !t.group_stopped(pid) && start.elapsed() < Duration::from_secs(20) {
            t.run_for(Duration::from_millis(5)).unwrap();
        }
        assert!(t.group_stopped(pid));
        println!("\nstopped");
        std::io::stdout().flush().unwrap();
    }
    let r = t.run();
    assert!(
        matches!(r, Err(RemoteError::Terminated(libc::SIGTERM))),
        "{r:?}"
    );
    assert!(t.pids().is_empty());
    // The program runs on, untraced; the test process ends it.
    std::mem::forget(child);
}

/// Starts the fixture with `args` under `t`, serves it to its end, and
/// returns what it wrote.
fn serve_program(mut t: RemoteTracer, name: &str, args: &[&str]) -> String {
    let out = dir().join(format!("traced-shared-{name}"));
    let pid = t.spawn(&fixture_cmd(&out, args)).unwrap();
    t.run().unwrap();
    assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
    std::fs::read_to_string(out).unwrap()
}

/// Two tracer threads share one registry, each serving the hits of a
/// program it started (two threads each), while a third thread registers
/// and removes a second consumer on both functions through a tracer of its
/// own (breakpoints written into both programs while they run and hit):
/// the steady consumer counts every call and every return, both programs
/// write what they write untraced.
#[test]
fn two_tracer_threads_share_a_registry_while_a_third_churns_registrations() {
    let file = fixture_file();
    let first = RemoteTracer::new();
    let registry = first.shared_registry();
    let (steady, calls, rets) = entries_and_returns();
    let args = ["work", "4000", "2"];
    // The steady consumer is in before either program starts.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reg_a = Arc::clone(&registry);
    let file_a = file.clone();
    let a = std::thread::spawn(move || {
        let mut t = RemoteTracer::with_registry(reg_a);
        t.register(&UprobeTarget::symbol(file_a.as_str(), "rt_work"), &steady)
            .unwrap();
        ready_tx.send(()).unwrap();
        serve_program(t, "a", &args)
    });
    ready_rx.recv().unwrap();
    let reg_b = Arc::clone(&registry);
    let b =
        std::thread::spawn(move || serve_program(RemoteTracer::with_registry(reg_b), "b", &args));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = Arc::clone(&done);
    let file_c = file.clone();
    let reg_c = Arc::clone(&registry);
    let churner = std::thread::spawn(move || {
        let mut t = RemoteTracer::with_registry(reg_c);
        let (churn, churned) = counter();
        let mut cycles = 0u64;
        while !d.load(Ordering::Relaxed) {
            let x = t.register(&UprobeTarget::symbol(file_c.as_str(), "rt_other"), &churn);
            let y = t.register(&UprobeTarget::symbol(file_c.as_str(), "rt_work"), &churn);
            std::thread::sleep(Duration::from_millis(1));
            for r in [x, y].into_iter().flatten() {
                t.unregister_nosync(r.key(), &churn).unwrap();
            }
            t.commit();
            cycles += 1;
        }
        (cycles, churned.load(Ordering::Relaxed))
    });
    let out_a = a.join().unwrap();
    let out_b = b.join().unwrap();
    done.store(true, Ordering::Relaxed);
    let (cycles, churned) = churner.join().unwrap();
    eprintln!("{cycles} churn cycles, {churned} churned hits");
    assert!(cycles > 0);
    let untraced = run_untraced(&args);
    assert_eq!(out_a, untraced);
    assert_eq!(out_b, untraced);
    assert_eq!(calls.load(Ordering::Relaxed), 2 * 2 * 4000);
    let per_thread: u64 = (0..4000).map(|i| 3 * i + 1).sum();
    assert_eq!(rets.load(Ordering::Relaxed), 4 * per_thread);
    drop(first);
}

/// Followed: a `fork` child is traced as a process of its own. `rt_fork`
/// forks inside a call tracked for its return: the parent's return is
/// seen; in the child that call returns to its caller untracked (its
/// inherited return address put back), and its own calls of `rt_work` are
/// counted with the parent's.
#[test]
fn a_followed_fork_child_is_traced_as_a_process_of_its_own() {
    assert_eq!(
        fork_inside_a_tracked_call(true),
        400,
        "the parent's and the child's"
    );
}

/// A shell (a command of the base system) that forks to run `ls`: with
/// children followed, `ls`'s calls of the C library's `readdir64` are
/// counted (its image is traced after its `exec`); not followed, the
/// child runs untraced and none is. Both listings are the untraced one.
#[test]
fn a_shell_s_child_command_is_traced_only_when_children_are_followed() {
    let (Ok(sh), Ok(ls)) = (which("sh"), which("ls")) else {
        eprintln!("skipped: no `sh` or `ls` in PATH");
        return;
    };
    let untraced = Command::new(&ls)
        .args(["-1", "/usr/lib"])
        .output()
        .unwrap()
        .stdout;
    for follow in [false, true] {
        let mut t = RemoteTracer::new();
        t.follow_forks(follow);
        let (c, hits) = counter();
        t.register(&UprobeTarget::symbol("libc.so.6", "readdir64"), &c)
            .unwrap();
        let out = dir().join(format!("traced-sh-{follow}"));
        // Two commands: the shell forks for the first (it `exec`s the last).
        let script = format!("{} -1 /usr/lib > {}; true", ls.display(), out.display());
        let pid = t.spawn(Command::new(&sh).args(["-c", &script])).unwrap();
        t.run().unwrap();
        assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)));
        assert_eq!(std::fs::read(&out).unwrap(), untraced, "follow {follow}");
        match follow {
            true => assert!(hits.load(Ordering::Relaxed) > 0, "ls traced"),
            false => assert_eq!(hits.load(Ordering::Relaxed), 0, "ls untraced"),
        }
    }
}

/// The CPUs thread `tid` may run on, as `/proc` lists them (`0-1`, `1`).
fn cpus_of(pid: i32, tid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// The thread ids of `pid`.
fn tids_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The last CPU this thread may run on.
fn last_allowed_cpu() -> usize {
    let list = cpus_of(std::process::id() as i32, gettid());
    let last = list.rsplit([',', '-']).next().unwrap();
    last.parse().unwrap()
}

fn gettid() -> i32 {
    // SAFETY: gettid takes nothing and cannot fail.
    unsafe { libc::gettid() }
}

/// A colocated tracer serves a program whose four threads are created
/// while it is traced: every thread of it, and the tracer, run on the one
/// CPU at every hit checked; counts and output are the untraced ones; the
/// tracer's own CPUs come back when it stops colocating.
#[test]
fn a_colocated_program_runs_every_thread_on_the_tracer_s_cpu_and_counts_stay_exact() {
    let me = std::process::id() as i32;
    let tracer_cpus = cpus_of(me, gettid());
    let cpu = last_allowed_cpu();
    let mut t = RemoteTracer::new();
    assert_eq!(t.colocate(Some(cpu)).unwrap(), cpu);
    assert_eq!(t.colocated(), Some(cpu));
    assert_eq!(cpus_of(me, gettid()), cpu.to_string());
    let pid = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let checked = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let consumer = {
        let (pid, checked, hits) = (Arc::clone(&pid), Arc::clone(&checked), Arc::clone(&hits));
        Consumer::new(move |_, _| {
            if hits.fetch_add(1, Ordering::Relaxed) % 500 == 0 {
                let pid = pid.load(Ordering::Relaxed);
                for tid in tids_of(pid) {
                    assert_eq!(cpus_of(pid, tid), cpu.to_string(), "thread {tid} pinned");
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            }
            ConsumerAction::Continue
        })
    };
    on_rt_work(&mut t, &consumer);
    let args = ["work", "2000", "4"];
    let out = dir().join("traced-colocated");
    pid.store(
        t.spawn(&fixture_cmd(&out, &args)).unwrap(),
        Ordering::Relaxed,
    );
    t.run().unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 8_000);
    assert_eq!(std::fs::read_to_string(out).unwrap(), run_untraced(&args));
    // The main thread and at least one worker at each of 16 checks.
    assert!(checked.load(Ordering::Relaxed) >= 16 * 2);
    t.stop_colocating();
    assert_eq!(t.colocated(), None);
    assert_eq!(cpus_of(me, gettid()), tracer_cpus);
}

/// Attached to a running program, a colocated tracer pins it and gives it
/// its own CPUs back at detach, twice; a CPU this thread may not use is a
/// typed error that changes nothing (a colocation in place stays).
#[test]
fn a_colocated_attach_gives_the_program_its_cpus_back_at_detach_and_a_bad_cpu_changes_nothing() {
    let me = std::process::id() as i32;
    let tracer_cpus = cpus_of(me, gettid());
    let (mut child, stop, out) = until_running("colocated");
    let pid = child.0.id() as i32;
    let program_cpus = cpus_of(pid, pid);
    let cpu = last_allowed_cpu();
    let mut t = RemoteTracer::new();
    let (c, hits) = counter();
    on_rt_work(&mut t, &c);
    let bad = libc::CPU_SETSIZE as usize + 1;
    assert!(matches!(t.colocate(Some(bad)), Err(RemoteError::Os { .. })));
    assert_eq!(t.colocated(), None);
    assert_eq!(cpus_of(me, gettid()), tracer_cpus);
    for round in 0..2 {
        t.attach(pid).unwrap();
        // Colocated after the attach in the first round, before it in the
        // second.
        if round == 0 {
            t.colocate(Some(cpu)).unwrap();
        }
        assert_eq!(cpus_of(pid, pid), cpu.to_string(), "round {round}: pinned");
        assert!(t.colocate(Some(bad)).is_err());
        assert_eq!(t.colocated(), Some(cpu), "round {round}: still colocated");
        assert_eq!(
            cpus_of(pid, pid),
            cpu.to_string(),
            "round {round}: still pinned"
        );
        let before = hits.load(Ordering::Relaxed);
        serve_until_counted(&mut t, &hits, before);
        assert!(
            hits.load(Ordering::Relaxed) > before,
            "round {round}: counted"
        );
        t.detach(pid).unwrap();
        assert_eq!(
            cpus_of(pid, pid),
            program_cpus,
            "round {round}: its CPUs back"
        );
    }
    drop(t);
    assert_eq!(cpus_of(me, gettid()), tracer_cpus, "the tracer's CPUs back");
    std::fs::write(&stop, b"").unwrap();
    assert!(child.0.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(out).unwrap(), "checksum 1\n");
}
