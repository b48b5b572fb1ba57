//! The `inprocess` engine (the agent preloaded into the command): exact
//! counts from several threads, the same counts, probes and return values
//! as the ptrace engine, `--json` and `--trace-out` read back with a real
//! JSON parser, Ctrl-C leaving the program running with the bytes of its
//! file, the agent's own C-library calls not counted, and a command of
//! the base system traced with its output unchanged.
//!
//! The agent (`librcu_trace_agent.so`) is built by cargo with rcu-trace
//! (a dependency: its cdylib lands in the target directory's `deps/`,
//! where rcu-trace looks for it), so `cargo test -p rcu-trace` needs no
//! other step.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use common::{
    file_bytes, fixture, fx, json_lines, mem, offset_of, path, probe, probes, stderr_until,
    vaddr_in, CreateOnDrop, Running, RCU_TRACE,
};
use serde_json::Value;

/// `rcu-trace --engine ENGINE --json ARGS -- fixture FX_ARGS`: checks it
/// exits 0, says which engine served, and that the fixture printed what it
/// prints untraced; returns the JSON objects.
fn run_json(engine: &str, args: &[&str], fx_args: &[&str]) -> Vec<Value> {
    let out = Command::new(RCU_TRACE)
        .args(["--engine", engine, "--json"])
        .args(args)
        .arg("--")
        .arg(fixture())
        .args(fx_args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains(&format!("({engine} engine)")), "{err}");
    let untraced = Command::new(fixture()).args(fx_args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let own: String = text
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(own.as_bytes(), untraced.stdout, "the program's output");
    json_lines(&out.stdout)
}

/// Each probe's summary, the fields both engines must agree on.
fn summary(objs: &[Value]) -> BTreeMap<String, (Value, Value)> {
    probes(objs)
        .into_iter()
        .map(|p| {
            (
                p["probe"].as_str().unwrap().to_string(),
                (p["calls"].clone(), p["returns"].clone()),
            )
        })
        .collect()
}

#[test]
fn every_call_from_four_threads_is_counted_exactly_in_process() {
    need_tracing!();
    let spec = format!("uprobe:{}:fx_work", fx());
    let ret = format!("uretprobe:{}:fx_work", fx());
    let objs = run_json("inprocess", &[&spec, &ret], &["work", "5000", "4"]);
    assert_eq!(probe(&objs, &spec)["calls"], 20_000);
    let r = probe(&objs, &ret);
    assert_eq!(r["calls"], 20_000);
    assert_eq!(r["returns"], 20_000);
    // Every return was paired with its entry: a latency for each.
    assert!(r["latency_ns"]["p50"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(objs.last().unwrap()["type"], "end");
    assert_eq!(objs.last().unwrap()["exit_code"], 0);
}

#[test]
fn both_engines_agree_on_probes_counts_and_return_values() {
    need_tracing!();
    let glob = format!("uprobe:{}:fx_*a", fx());
    let ret = format!("uretprobe:{}:fx_gamma", fx());
    let work = format!("uprobe:{}:fx_work", fx());
    let specs = [glob.as_str(), ret.as_str(), work.as_str(), "--retval"];
    let a = run_json("inprocess", &specs, &["glob", "300"]);
    let b = run_json("ptrace", &specs, &["glob", "300"]);
    assert_eq!(summary(&a), summary(&b));
    // fx_alpha (fx_delta_a is its alias), fx_beta, fx_gamma; fx_gamma's
    // return; fx_work.
    assert_eq!(summary(&a).len(), 5, "{:?}", summary(&a));
    // The same return values, as many times each.
    let rets = |objs: &[Value]| {
        let mut m: BTreeMap<i64, u64> = BTreeMap::new();
        for o in objs.iter().filter(|o| o["type"] == "return") {
            *m.entry(o["retval"].as_i64().unwrap()).or_default() += 1;
        }
        m
    };
    let (ra, rb) = (rets(&a), rets(&b));
    assert_eq!(ra, rb);
    assert_eq!(ra.values().sum::<u64>(), 900);
    assert_eq!(
        ra.get(&(299 + 3)),
        Some(&3),
        "fx_gamma(299) = 302, three times a round"
    );
}

#[test]
fn json_events_and_the_chrome_trace_parse_and_hold_every_call() {
    need_tracing!();
    let spec = format!("uretprobe:{}:fx_work", fx());
    let trace = path("trace.json");
    let objs = run_json(
        "inprocess",
        &[
            &spec,
            "--args",
            "1",
            "--retval",
            "--trace-out",
            trace.to_str().unwrap(),
        ],
        &["work", "500", "3"],
    );
    let entries: Vec<&Value> = objs.iter().filter(|o| o["type"] == "entry").collect();
    let returns: Vec<&Value> = objs.iter().filter(|o| o["type"] == "return").collect();
    assert_eq!((entries.len(), returns.len()), (1500, 1500));
    for e in &entries {
        let x = e["args"][0].as_i64().unwrap();
        assert!((0..500).contains(&x), "{e}");
    }
    let tids: std::collections::BTreeSet<i64> =
        entries.iter().map(|e| e["tid"].as_i64().unwrap()).collect();
    assert_eq!(tids.len(), 3, "three threads");
    let events: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(events.len(), 3000);
    let mut depth: BTreeMap<i64, i64> = BTreeMap::new();
    let mut last_ts = 0.0;
    for e in &events {
        let d = depth.entry(e["tid"].as_i64().unwrap()).or_default();
        match e["ph"].as_str().unwrap() {
            "B" => *d += 1,
            "E" => *d -= 1,
            ph => panic!("phase {ph}"),
        }
        assert!((0..=1).contains(d), "{e}");
        let ts = e["ts"].as_f64().unwrap();
        assert!(ts >= 0.0);
        last_ts = f64::max(last_ts, ts);
    }
    assert!(depth.values().all(|&d| d == 0));
    assert!(last_ts > 0.0);
}

#[test]
fn sigint_mid_run_unregisters_and_the_program_runs_on_with_the_bytes_of_its_file() {
    need_tracing!();
    let stop = path("stop");
    let _stop_anyway = CreateOnDrop(stop.clone());
    let own_out = path("own-out");
    let spec = format!("uprobe:{}:fx_work", fx());
    let mut tracer = Running(
        Command::new(RCU_TRACE)
            .args([
                "--engine",
                "inprocess",
                &spec,
                "--args",
                "1",
                "--limit",
                "1",
                "--",
            ])
            .arg(fixture())
            .args(["until", stop.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&own_out).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_until(&mut tracer.0, "Ctrl-C to detach");
    let pid: u32 = lines
        .last()
        .unwrap()
        .split(" in process ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("the traced program: process {pid}");
    let at = vaddr_in(pid, &fixture(), offset_of("fx_work"));
    let file = file_bytes(&fixture(), offset_of("fx_work"), 16);
    assert_eq!(mem(pid, at, 1)[0], 0xcc, "the breakpoint is in place");
    // A hit was served: the one event --limit 1 lets through.
    stderr_until(&mut tracer.0, "fx_work(0x");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(tracer.0.id() as i32, libc::SIGINT) };
    // Not to the end of its standard error: the program holds it open.
    let status = tracer.0.wait().unwrap();
    let lines = stderr_until(&mut tracer.0, "rcu-trace: detached on SIGINT");
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{lines:?}");
    assert_eq!(mem(pid, at, 16), file, "every probed byte restored");
    assert!(common::runs_untraced(pid));
    // It runs on and ends by itself when told, with its own output.
    std::fs::write(&stop, b"").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(std::time::Instant::now() < deadline, "it never ended");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let own = std::fs::read_to_string(&own_out).unwrap();
    let calls: u64 = own.split_whitespace().next().unwrap().parse().unwrap();
    assert!(calls > 0 && own.trim_end().ends_with(" 1"), "{own}");
}

#[test]
fn the_agents_own_c_library_calls_are_not_the_programs() {
    need_tracing!();
    // The agent writes to its socket (write) and reads from it (read) on
    // its thread and at the exit flush; the fixture writes its one line
    // with one write(2) (standard output is a pipe here: fully buffered).
    // (`read` and `clock_gettime`, which it calls too, are refused in
    // process: see the README's limits.)
    let specs = ["uprobe:libc:write"];
    let fx_args = ["work", "3000", "2"];
    let ret = format!("uretprobe:{}:fx_work", fx());
    let mut args: Vec<&str> = specs.to_vec();
    args.push(&ret);
    args.push("--retval"); // events: the agent thread works hard
    let a = run_json("inprocess", &args, &fx_args);
    let b = run_json("ptrace", &args, &fx_args);
    for s in specs {
        assert_eq!(probe(&a, s)["calls"], probe(&b, s)["calls"], "{s}");
    }
    assert_eq!(probe(&a, "uprobe:libc:write")["calls"], 1);
}

#[test]
fn a_base_system_command_runs_with_its_output_unchanged() {
    need_tracing!();
    // (env under each engine, the exec followed: tests/real.rs.)
    // sort, its input from a file, under a C-library probe: its output
    // byte for byte.
    let input = path("words");
    let words: String = (0..3000)
        .map(|i| format!("w{:05}\n", (i * 7919) % 3000))
        .collect();
    std::fs::write(&input, words).unwrap();
    let untraced = Command::new("sort").arg(&input).output().unwrap();
    let out = Command::new(RCU_TRACE)
        .args([
            "--engine",
            "inprocess",
            "--json",
            "uprobe:libc:setlocale",
            "uretprobe:libc:fflush",
            "--",
            "sort",
        ])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.starts_with(&untraced.stdout));
    let objs = json_lines(&out.stdout[untraced.stdout.len()..]);
    assert!(
        probe(&objs, "uprobe:libc:setlocale")["calls"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn the_agent_injected_into_a_running_process_counts_exactly_and_auto_picks_ptrace() {
    need_tracing!();
    let (go, done, stop) = (path("go"), path("done"), path("stop"));
    let _stop_anyway = CreateOnDrop(stop.clone());
    let target = Running::start(Command::new(fixture()).args([
        "gate",
        go.to_str().unwrap(),
        done.to_str().unwrap(),
        stop.to_str().unwrap(),
        "2000",
        "3",
    ]));
    let pid = target.pid().to_string();
    let spec = format!("uprobe:{}:fx_work", fx());
    // auto serves -p with ptrace: asked for, the agent is injected.
    let mut tracer = Running::start(Command::new(RCU_TRACE).args([
        "--engine",
        "inprocess",
        "--json",
        &spec,
        "-p",
        &pid,
    ]));
    let lines = stderr_until(&mut tracer.0, "Ctrl-C to detach");
    assert!(
        lines.last().unwrap().contains("(inprocess engine)"),
        "{lines:?}"
    );
    assert_eq!(
        common::status_field(target.pid(), "TracerPid:"),
        "0",
        "let go"
    );
    // Every call from the attach to the exit.
    std::fs::write(&go, b"").unwrap();
    common::wait_for_file(&done);
    std::fs::write(&stop, b"").unwrap();
    let out = std::mem::replace(&mut tracer.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let objs = json_lines(&out.stdout);
    assert_eq!(probe(&objs, &spec)["calls"], 6000);
    assert_eq!(
        objs.last().unwrap()["how"],
        "every traced process has exited"
    );
    // auto: ptrace for -p.
    let stop2 = path("stop");
    let _stop2_anyway = CreateOnDrop(stop2.clone());
    let other = Running::start(Command::new(fixture()).args(["until", stop2.to_str().unwrap()]));
    let mut tracer =
        Running::start(Command::new(RCU_TRACE).args([&spec, "-p", &other.pid().to_string()]));
    let lines = stderr_until(&mut tracer.0, "Ctrl-C to detach");
    assert!(
        lines.last().unwrap().contains("(ptrace engine)"),
        "{lines:?}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(tracer.0.id() as i32, libc::SIGINT) };
    assert_eq!(tracer.0.wait().unwrap().code(), Some(0));
}
