//! `-p PID`: exact counts from attach to detach; Ctrl-C (SIGINT) detaches
//! mid-run and the program runs on with the bytes of its file; a bad spec,
//! a missing symbol, a pid that cannot be traced touch nothing.

#[macro_use]
mod common;

use std::process::Command;

use common::{
    file_bytes, fixture, fx, json_lines, kill, mem, path, probe, runs_untraced, status_field,
    stderr_until, vaddr_in, wait_for_file, Running, RCU_TRACE,
};

/// The first `n` bytes of `fx_work` in `pid` and in the fixture file.
fn fx_work_bytes(pid: u32, n: usize) -> (Vec<u8>, Vec<u8>) {
    let off = common::offset_of("fx_work");
    let at = vaddr_in(pid, &fixture(), off);
    (mem(pid, at, n), file_bytes(&fixture(), off, n))
}

#[test]
fn attach_counts_every_call_until_detach_and_the_program_runs_on_unaware() {
    need_tracing!();
    let (go, done, stop) = (path("go"), path("done"), path("stop"));
    let mut target = Running::gate(&go, &done, &stop, 3000, 3);
    let pid = target.pid();
    let spec = format!("uretprobe:{}:fx_work", fx());
    let mut tracer =
        Running::start(Command::new(RCU_TRACE).args(["--json", &spec, "-p", &pid.to_string()]));
    stderr_until(&mut tracer.0, "Ctrl-C to detach");
    assert_eq!(status_field(pid, "TracerPid:"), tracer.pid().to_string());
    // Every call of the program's run happens while it is traced.
    std::fs::write(&go, b"").unwrap();
    wait_for_file(&done);
    kill(tracer.pid(), libc::SIGINT);
    let out = std::mem::replace(&mut tracer.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objs = json_lines(&out.stdout);
    let p = probe(&objs, &spec);
    assert_eq!(
        (p["calls"].as_u64(), p["returns"].as_u64()),
        (Some(9000), Some(9000))
    );
    // Detached: untraced, running, its text the file's again; it ends as
    // it would have untraced.
    assert!(runs_untraced(pid));
    let (now, file) = fx_work_bytes(pid, 16);
    assert_eq!(now, file);
    let per_thread: u64 = (0..3000).map(|x| 3 * x + 1).sum();
    assert_eq!(
        std::fs::read_to_string(&done).unwrap(),
        format!("{}\n", 3 * per_thread)
    );
    std::fs::write(&stop, b"").unwrap();
    assert!(target.0.wait().unwrap().success());
}

#[test]
fn sigint_mid_run_detaches_and_the_program_runs_on_with_the_bytes_of_its_file() {
    need_tracing!();
    let stop = path("stop");
    let mut target =
        Running::start(Command::new(fixture()).args(["until", stop.to_str().unwrap()]));
    let pid = target.pid();
    // Its text is the file's before the attach (the loader has mapped it
    // once /proc shows the mapping: read it until it does).
    let spec = format!("uprobe:{}:fx_work", fx());
    let mut tracer = Running::start(Command::new(RCU_TRACE).args([
        &spec,
        "--args",
        "1",
        "--limit",
        "1",
        "-p",
        &pid.to_string(),
    ]));
    stderr_until(&mut tracer.0, "Ctrl-C to detach");
    let (now, file) = fx_work_bytes(pid, 16);
    assert_eq!(now[0], 0xcc, "the breakpoint is in place while attached");
    assert_eq!(now[1..], file[1..]);
    // A hit was served: the one event --limit 1 lets through.
    stderr_until(&mut tracer.0, "fx_work(0x");
    kill(tracer.pid(), libc::SIGINT);
    let out = std::mem::replace(&mut tracer.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("detached on SIGINT"), "{err}");
    assert!(runs_untraced(pid));
    let (now, file) = fx_work_bytes(pid, 16);
    assert_eq!(now, file, "every probed byte restored");
    // It runs on: it ends by itself when told, with its own output.
    std::fs::write(&stop, b"").unwrap();
    let out = std::mem::replace(&mut target.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert!(out.status.success());
    let own = String::from_utf8_lossy(&out.stdout);
    let calls: u64 = own.split_whitespace().next().unwrap().parse().unwrap();
    assert!(calls > 0 && own.trim_end().ends_with(" 1"), "{own}");
}

#[test]
fn a_bad_spec_or_a_missing_symbol_leaves_a_running_target_untouched() {
    need_tracing!();
    let (go, done, stop) = (path("go"), path("done"), path("stop"));
    let mut target = Running::gate(&go, &done, &stop, 10, 1);
    let pid = target.pid();
    let fx = fx();
    // The fixture is mapped once its file shows in /proc/PID/maps.
    let before = loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        if maps.contains(fixture().canonicalize().unwrap().to_str().unwrap()) {
            break fx_work_bytes(pid, 16).0;
        }
        std::thread::yield_now();
    };
    for (bad, code) in [
        (format!("uprobe:{fx}:no_such_symbol"), 2),
        (format!("uprobe:{fx}:fx_work+zz"), 2),
        (format!("uretprobe:{fx}:0x10"), 2),
        ("uprobe:libnosuchlib:f".to_string(), 2),
    ] {
        let good = format!("uprobe:{fx}:fx_work");
        let out = Command::new(RCU_TRACE)
            .args([&good, &bad, "-p", &pid.to_string()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{bad}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(runs_untraced(pid), "{bad} stopped or traced it");
        assert_eq!(fx_work_bytes(pid, 16).0, before, "{bad} changed its text");
    }
    // It was never stopped or changed: it runs its course.
    std::fs::write(&go, b"").unwrap();
    wait_for_file(&done);
    std::fs::write(&stop, b"").unwrap();
    assert!(target.0.wait().unwrap().success());
}

#[test]
fn a_pid_that_cannot_be_traced_fails_in_one_line() {
    need_tracing!();
    let spec = format!("uprobe:{}:fx_work", fx());
    // No such process; rcu-trace itself.
    for pid in ["999999999".to_string(), "0".to_string()] {
        let out = Command::new(RCU_TRACE)
            .args([&spec, "-p", &pid])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // A process another tracer holds: this test's own child, traced by
    // a first rcu-trace.
    let stop = path("stop");
    let target = Running::start(Command::new(fixture()).args(["until", stop.to_str().unwrap()]));
    let pid = target.pid().to_string();
    let mut first = Running::start(Command::new(RCU_TRACE).args([&spec, "-p", &pid]));
    stderr_until(&mut first.0, "Ctrl-C to detach");
    let out = Command::new(RCU_TRACE)
        .args([&spec, "-p", &pid])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("traced already"), "{err}");
    kill(first.pid(), libc::SIGINT);
    assert_eq!(first.0.wait().unwrap().code(), Some(0));
    std::fs::write(&stop, b"").unwrap();
}

#[test]
fn two_processes_attached_at_once_are_each_counted_exactly() {
    need_tracing!();
    let mut targets = Vec::new();
    let mut gates = Vec::new();
    for n in [1000, 2000] {
        let (go, done, stop) = (path("go"), path("done"), path("stop"));
        targets.push(Running::gate(&go, &done, &stop, n, 2));
        gates.push((go, done, stop));
    }
    let spec = format!("uprobe:{}:fx_work", fx());
    let (a, b) = (targets[0].pid().to_string(), targets[1].pid().to_string());
    let mut tracer =
        Running::start(Command::new(RCU_TRACE).args(["--json", &spec, "-p", &a, "-p", &b]));
    let started = stderr_until(&mut tracer.0, "Ctrl-C to detach");
    assert!(
        started
            .last()
            .unwrap()
            .contains(&format!("processes {a}, {b}")),
        "{started:?}"
    );
    for (go, done, _) in &gates {
        std::fs::write(go, b"").unwrap();
        wait_for_file(done);
    }
    // Both end: rcu-trace ends with them, with every call counted.
    for ((_, _, stop), t) in gates.iter().zip(&mut targets) {
        std::fs::write(stop, b"").unwrap();
        assert!(t.0.wait().unwrap().success());
    }
    let out = std::mem::replace(&mut tracer.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let objs = json_lines(&out.stdout);
    assert_eq!(probe(&objs, &spec)["calls"], 2 * 1000 + 2 * 2000);
    assert_eq!(
        objs.last().unwrap()["how"],
        "every traced process has exited"
    );
}

#[test]
fn sigterm_detaches_from_a_spawned_command_which_runs_on_untraced() {
    need_tracing!();
    let stop = path("stop");
    let _ends = common::CreateOnDrop(stop.clone());
    let spec = format!("uprobe:{}:fx_work", fx());
    let mut tracer = Running::start(Command::new(RCU_TRACE).args([
        &spec,
        "--args",
        "1",
        "--limit",
        "1",
        "--",
        fixture().to_str().unwrap(),
        "until",
        stop.to_str().unwrap(),
    ]));
    let started = stderr_until(&mut tracer.0, "Ctrl-C to detach");
    let pid: u32 = started
        .last()
        .unwrap()
        .split("in process ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{started:?}"));
    stderr_until(&mut tracer.0, "fx_work(0x");
    kill(tracer.pid(), libc::SIGTERM);
    // (Not to the end of its output: the command, running on, holds the
    // same pipes.)
    stderr_until(&mut tracer.0, "detached on SIGTERM");
    let status = tracer.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    // Its command runs on, untraced, with the bytes of its file, and ends
    // when told (reaped by whoever adopted it).
    assert!(runs_untraced(pid));
    let (now, file) = fx_work_bytes(pid, 16);
    assert_eq!(now, file);
    std::fs::write(&stop, b"").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| !s.contains("State:\tZ"))
    {
        assert!(std::time::Instant::now() < deadline, "{pid} never ended");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn the_live_table_is_drawn_while_the_program_runs() {
    need_tracing!();
    let stop = path("stop");
    let spec = format!("uretprobe:{}:fx_work", fx());
    let mut tracer = Running::start(Command::new(RCU_TRACE).args([
        "--live",
        "always",
        &spec,
        "--",
        fixture().to_str().unwrap(),
        "until",
        stop.to_str().unwrap(),
    ]));
    stderr_until(&mut tracer.0, "Ctrl-C to detach");
    // A block (header and one row) comes each second while it runs.
    let head = stderr_until(&mut tracer.0, "rate/s");
    assert!(head.last().unwrap().contains("p99"), "{head:?}");
    let row = stderr_until(&mut tracer.0, ":fx_work");
    assert!(row.len() == 1, "{row:?}");
    std::fs::write(&stop, b"").unwrap();
    let out = std::mem::replace(&mut tracer.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn a_probe_in_a_file_the_process_does_not_map_is_a_warning_not_an_error() {
    need_tracing!();
    let stop = path("stop");
    let _ends = common::CreateOnDrop(stop.clone());
    let target = Running::start(Command::new(fixture()).args(["until", stop.to_str().unwrap()]));
    let pid = target.pid().to_string();
    // The maths library: glibc's own, which the fixture never loads.
    let mut tracer = Running::start(Command::new(RCU_TRACE).args([
        &format!("uprobe:{}:fx_work", fx()),
        "uprobe:libm:feclearexcept",
        "-p",
        &pid,
    ]));
    let lines = stderr_until(&mut tracer.0, "Ctrl-C to detach");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("warning") && l.contains("does not map")),
        "{lines:?}"
    );
    kill(tracer.pid(), libc::SIGINT);
    assert_eq!(tracer.0.wait().unwrap().code(), Some(0));
}
