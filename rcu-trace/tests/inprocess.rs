//! The `inprocess` engine (the agent preloaded into the command): exact
//! counts from several threads, jump-optimized (the default) and on the
//! trap path (`--no-jump`) alike, the same counts, probes and return values
//! as the ptrace engine, `--json` and `--trace-out` read back with a real
//! JSON parser, Ctrl-C leaving the program running with the bytes of its
//! file, the agent's own C-library calls not counted, a command of the
//! base system traced with its output unchanged, and the C library's
//! allocator (`malloc`, `free`, ...) probed in process with the counts the
//! ptrace engine finds, in the fixture and in `sort` and `python3`; the
//! injected agent still refuses `malloc`, which its trap path can reach.
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
fn jump_optimized_hits_count_what_trap_hits_and_ptrace_stops_count() {
    need_tracing!();
    let spec = format!("uprobe:{}:fx_work", fx());
    let ret = format!("uretprobe:{}:fx_work", fx());
    let fx_args = ["work", "5000", "4"];
    let jump = run_json("inprocess", &[&spec, &ret], &fx_args);
    let trap = run_json("inprocess", &["--no-jump", &spec, &ret], &fx_args);
    let stop = run_json("ptrace", &[&spec, &ret], &fx_args);
    // By default the agent optimizes what it can (fx_work's entry: plain
    // moves and arithmetic); --no-jump keeps every probe on the trap path;
    // the ptrace engine stops the thread. The counts are the same.
    for (objs, hit) in [(&jump, "jump"), (&trap, "trap"), (&stop, "ptrace-stop")] {
        for s in [&spec, &ret] {
            let p = probe(objs, s);
            assert_eq!(p["hit"], hit, "{p}");
            assert_eq!(p["calls"], 20_000, "{p}");
        }
        assert_eq!(probe(objs, &ret)["returns"], 20_000);
    }
    assert_eq!(summary(&jump), summary(&trap));
    assert_eq!(summary(&jump), summary(&stop));
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
    // fx_work's entry is jump-optimized (the default): a `jmp` over its
    // first instructions, which Ctrl-C must take back whole.
    assert_eq!(mem(pid, at, 1)[0], 0xe9, "the jump is in place");
    assert_ne!(mem(pid, at, 5), file[..5], "the jump is in place");
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
    // It reads the clock for every event, and allocates (its thread's
    // start, the standard library's buffers) on its own thread.
    let specs = [
        "uprobe:libc:write",
        "uprobe:libc:read",
        "uprobe:libc:clock_gettime",
        "uprobe:libc:malloc",
        "uprobe:libc:free",
    ];
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
    let target = Running::gate(&go, &done, &stop, 2000, 3);
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

/// The C-library functions the allocator workload calls (fixture `alloc`).
const LIBC_SPECS: [&str; 9] = [
    "uprobe:libc:malloc",
    "uprobe:libc:calloc",
    "uprobe:libc:realloc",
    "uprobe:libc:free",
    "uprobe:libc:strdup",
    "uprobe:libc:getenv",
    "uprobe:libc:clock_gettime",
    "uprobe:libc:read",
    "uretprobe:libc:malloc",
];

#[test]
fn the_c_library_allocator_is_probed_in_process_with_the_counts_ptrace_finds() {
    need_tracing!();
    // Refused in process before: the agent's trap path reached the
    // loader's `__tls_get_addr`, whose slow paths allocate.
    let fx_args = ["alloc", "2000", "3"];
    let mut args: Vec<&str> = LIBC_SPECS.to_vec();
    args.push("--retval"); // events: the agent thread works, allocates
    let a = run_json("inprocess", &args, &fx_args);
    let b = run_json("ptrace", &args, &fx_args);
    assert_eq!(summary(&a), summary(&b));
    // At least the workload's own calls (3 threads x 2000 rounds); free
    // three times a round.
    for s in LIBC_SPECS {
        let calls = probe(&a, s)["calls"].as_u64().unwrap();
        let least = if s.ends_with(":free") { 18_000 } else { 6_000 };
        if s.ends_with(":read") {
            assert!(calls >= 1, "{s}: {calls}");
        } else {
            assert!(calls >= least, "{s}: {calls}");
        }
    }
    let r = probe(&a, "uretprobe:libc:malloc");
    assert_eq!(r["calls"], r["returns"]);
}

/// `rcu-trace --engine ENGINE --json SPECS -- CMD...`: checks it exits 0
/// and the command printed what it prints untraced; returns the probes'
/// summaries.
fn run_command(
    engine: &str,
    specs: &[&str],
    cmd: &[&str],
    env: &[(&str, &str)],
) -> BTreeMap<String, (Value, Value)> {
    let untraced = Command::new(cmd[0])
        .args(&cmd[1..])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(untraced.status.success(), "{cmd:?}");
    let out = Command::new(RCU_TRACE)
        .args(["--engine", engine, "--json"])
        .args(specs)
        .arg("--")
        .args(cmd)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{engine}: {err}");
    assert!(err.contains(&format!("({engine} engine)")), "{err}");
    assert!(
        out.stdout.starts_with(&untraced.stdout),
        "{engine}: the command's output"
    );
    summary(&json_lines(&out.stdout[untraced.stdout.len()..]))
}

#[test]
fn sort_and_python_under_allocator_probes_print_what_they_print_untraced_and_both_engines_count_alike(
) {
    need_tracing!();
    let specs = [
        "uprobe:libc:malloc",
        "uprobe:libc:free",
        "uprobe:libc:getenv",
        "uprobe:libc:strdup",
        "uprobe:libc:realloc",
    ];
    let input = path("words");
    let words: String = (0..3000)
        .map(|i| format!("w{:05}\n", (i * 7919) % 3000))
        .collect();
    std::fs::write(&input, words).unwrap();
    let sort = ["sort", "--parallel=1", input.to_str().unwrap()];
    let a = run_command("inprocess", &specs, &sort, &[]);
    let b = run_command("ptrace", &specs, &sort, &[]);
    assert_eq!(a, b);
    assert!(a["uprobe:libc:malloc"].0.as_u64().unwrap() > 0, "{a:?}");
    // The base system's interpreter (not a wrapper script that forks
    // first: the children would not be traced).
    let python = "/usr/bin/python3";
    if !std::path::Path::new(python).exists() {
        eprintln!("SKIPPED (python3 part): no {python} here");
        return;
    }
    // The hash seed fixed: the interpreter's allocations the same run to
    // run.
    let py = [
        python,
        "-S",
        "-c",
        "import json; print(json.dumps(sorted({str(i): i for i in range(500)}.items())[:3]))",
    ];
    let env = [("PYTHONHASHSEED", "0")];
    let a = run_command("inprocess", &specs, &py, &env);
    let b = run_command("ptrace", &specs, &py, &env);
    assert_eq!(a, b);
    assert!(a["uprobe:libc:malloc"].0.as_u64().unwrap() > 100, "{a:?}");
}

#[test]
fn the_injected_agent_still_refuses_malloc_which_its_trap_path_reaches_through_the_loader() {
    need_tracing!();
    // Loaded with dlopen, the agent's thread-locals are in dynamic TLS:
    // the trap path's access to them is the loader's `__tls_get_addr`,
    // which allocates a thread's block on its first access. The runtime
    // cannot settle them, walks from `__tls_get_addr` and refuses what it
    // reaches; the refusal names the chain.
    let (go, done, stop) = (path("go"), path("done"), path("stop"));
    let _stop_anyway = CreateOnDrop(stop.clone());
    // Waiting for its go file (a sleep in the C library: a safe point to
    // load the agent at once; a loop of system calls such as `until`'s
    // offers one only when an interrupt lands between two of them).
    let target = Running::gate(&go, &done, &stop, 10, 1);
    let pid = target.pid().to_string();
    for spec in [
        "uprobe:libc:malloc",
        "uprobe:libc:free",
        "uprobe:/lib64/ld-linux-x86-64.so.2:__tls_get_addr",
    ] {
        if spec.contains("/lib64/") && !std::path::Path::new("/lib64/ld-linux-x86-64.so.2").exists()
        {
            eprintln!("SKIPPED ({spec}): no such loader here");
            continue;
        }
        let out = Command::new(RCU_TRACE)
            .args(["--engine", "inprocess", spec, "-p", &pid])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{spec}: {err}");
        assert!(err.contains("refusing to patch"), "{spec}: {err}");
        assert!(
            err.contains("(the trap path: __tls_get_addr (the loader's thread-local access"),
            "{spec}: {err}"
        );
        // The process runs on, untraced, every byte as it was.
        assert!(common::runs_untraced(target.pid()), "{spec}");
    }
    // It does its work as untraced: fx_work(0..10), the sum of 3x + 1.
    std::fs::write(&go, b"").unwrap();
    std::fs::write(&stop, b"").unwrap();
    let out = std::mem::replace(&mut { target }.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&done).unwrap(), "145\n");
}
