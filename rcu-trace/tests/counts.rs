//! A spawned fixture with known calls: exact counts from several threads,
//! return values, globs, `--json` and `--trace-out` read back with a real
//! JSON parser, and the command's exit status passed through.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;

use common::{fixture, fx, json_lines, probe, probes, RCU_TRACE};
use serde_json::Value;

/// What the fixture prints untraced with `args`.
fn untraced(args: &[&str]) -> Vec<u8> {
    let out = Command::new(fixture()).args(args).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Runs `rcu-trace --json SPECS OPTS -- fixture ARGS`; checks it exits 0
/// and that the fixture's own lines are those it prints untraced (events
/// printed while it runs are lines of their own among them; the summary
/// follows its output); returns the JSON objects.
fn traced_json(specs: &[String], opts: &[&str], args: &[&str]) -> Vec<Value> {
    let fx = fx();
    let out = Command::new(RCU_TRACE)
        .arg("--json")
        .args(specs)
        .args(opts)
        .arg("--")
        .arg(&fx)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    let own: String = text
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        own.as_bytes(),
        untraced(args),
        "the program's output changed"
    );
    let objs = json_lines(&out.stdout);
    let first_summary = objs.iter().position(|o| o["type"] == "probe").unwrap();
    let own_end = text.rfind(own.lines().last().unwrap()).unwrap();
    let summary_start = text.find("{\"type\":\"probe\"").unwrap();
    assert!(
        own_end < summary_start,
        "the summary comes after the program's output"
    );
    assert!(objs[first_summary..]
        .iter()
        .all(|o| o["type"] != "entry" && o["type"] != "return"));
    assert_eq!(objs.last().unwrap()["type"], "end", "{objs:?}");
    assert_eq!(objs.last().unwrap()["exit_code"], 0);
    objs
}

#[test]
fn every_call_from_four_threads_is_counted_exactly() {
    need_tracing!();
    let spec = format!("uprobe:{}:fx_work", fx());
    let objs = traced_json(std::slice::from_ref(&spec), &[], &["work", "2500", "4"]);
    let p = probe(&objs, &spec);
    assert_eq!(p["calls"], 10_000);
    assert_eq!(p["kind"], "uprobe");
    assert!(p.get("returns").is_none());
}

#[test]
fn uretprobe_return_values_are_each_calls_own_and_every_return_is_timed() {
    need_tracing!();
    let spec = format!("uretprobe:{}:fx_work", fx());
    let objs = traced_json(
        std::slice::from_ref(&spec),
        &["--retval", "--args", "1"],
        &["work", "300", "2"],
    );
    let p = probe(&objs, &spec);
    assert_eq!(
        (p["calls"].as_u64(), p["returns"].as_u64()),
        (Some(600), Some(600))
    );
    assert_eq!(p["untimed_returns"], 0);
    let lat = &p["latency_ns"];
    let q = |k: &str| lat[k].as_u64().unwrap();
    assert!(q("p50") > 0 && q("p50") <= q("p90") && q("p90") <= q("p99") && q("p99") <= q("max"));
    // fx_work(x) = 3x + 1, for x in 0..300 in each of two threads: each
    // argument seen twice, each return value 3x + 1 of one of them.
    let mut args: BTreeMap<i64, u32> = BTreeMap::new();
    let mut rets: BTreeMap<i64, u32> = BTreeMap::new();
    for o in &objs {
        match o["type"].as_str() {
            Some("entry") => *args.entry(o["args"][0].as_i64().unwrap()).or_default() += 1,
            Some("return") => *rets.entry(o["retval"].as_i64().unwrap()).or_default() += 1,
            _ => {}
        }
    }
    let want_args: BTreeMap<i64, u32> = (0..300).map(|x| (x, 2)).collect();
    let want_rets: BTreeMap<i64, u32> = (0..300).map(|x| (3 * x + 1, 2)).collect();
    assert_eq!(args, want_args);
    assert_eq!(rets, want_rets);
}

#[test]
fn a_glob_attaches_once_to_each_matching_function_and_aliases_are_one() {
    need_tracing!();
    let fx = fx();
    let objs = traced_json(&[format!("uprobe:{fx}:fx_*a")], &[], &["glob", "500"]);
    let calls: HashMap<String, u64> = probes(&objs)
        .iter()
        .map(|p| {
            (
                p["function"].as_str().unwrap().to_string(),
                p["calls"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: HashMap<String, u64> = [("fx_alpha", 500), ("fx_beta", 1000), ("fx_gamma", 1500)]
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .collect();
    assert_eq!(calls, want);
}

#[test]
fn json_holds_every_probe_of_several_specs_with_its_fields() {
    need_tracing!();
    let fx = fx();
    let gamma = common::offset_of("fx_gamma");
    let specs = [
        format!("uprobe:{fx}:fx_work"),
        format!("uretprobe:{fx}:fx_beta"),
        format!("uprobe:{fx}:{gamma:#x}"),
        format!("ur:{fx}:fx_alpha"),
    ];
    let objs = traced_json(&specs, &[], &["glob", "200"]);
    assert_eq!(probes(&objs).len(), 4, "{objs:#?}");
    let work = probe(&objs, &specs[0]);
    assert_eq!(work["calls"], 200);
    let beta = probe(&objs, &specs[1]);
    assert_eq!(
        (beta["calls"].as_u64(), beta["returns"].as_u64()),
        (Some(400), Some(400))
    );
    for k in ["p50", "p90", "p99", "max"] {
        assert!(beta["latency_ns"][k].as_u64().unwrap() > 0, "{beta}");
    }
    let g = probe(&objs, &specs[2]);
    assert_eq!(
        (g["calls"].as_u64(), g["function"].as_str()),
        (Some(600), Some("fx_gamma"))
    );
    assert_eq!(g["offset"], gamma);
    // `ur:` is `uretprobe:`, and the probe is named so.
    let a = probe(&objs, &format!("uretprobe:{fx}:fx_alpha"));
    assert_eq!(a["returns"], 200);
    for p in probes(&objs) {
        for k in ["probe", "spec", "kind", "path", "offset", "calls"] {
            assert!(!p[k].is_null(), "{k} missing: {p}");
        }
    }
}

#[test]
fn trace_out_holds_every_entry_and_return_per_thread_in_order() {
    need_tracing!();
    let fx = fx();
    let file = common::path("trace.json");
    let specs = [format!("uretprobe:{fx}:fx_work")];
    let opt = format!("--trace-out={}", file.display());
    traced_json(&specs, &[&opt], &["work", "400", "3"]);
    let events: Vec<Value> = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    // Per thread: 400 "B" and 400 "E", alternating, in time order.
    let mut per_tid: HashMap<i64, Vec<&Value>> = HashMap::new();
    for e in &events {
        assert_eq!(e["name"], specs[0].as_str());
        assert!(e["pid"].as_i64().unwrap() > 0);
        per_tid
            .entry(e["tid"].as_i64().unwrap())
            .or_default()
            .push(e);
    }
    assert_eq!(per_tid.len(), 3, "three worker threads");
    for (tid, evs) in per_tid {
        assert_eq!(evs.len(), 800, "thread {tid}");
        let mut last = -1.0;
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e["ph"], if i % 2 == 0 { "B" } else { "E" });
            let ts = e["ts"].as_f64().unwrap();
            assert!(ts >= last);
            last = ts;
            if i % 2 == 1 {
                assert_eq!(
                    e["args"]["retval"].as_i64().unwrap(),
                    3 * (i as i64 / 2) + 1
                );
            }
        }
    }
}

#[test]
fn the_commands_exit_status_and_death_by_signal_pass_through() {
    need_tracing!();
    let spec = "uprobe:libc:getpid";
    let run = |script: &str| {
        Command::new(RCU_TRACE)
            .args([spec, "--", "/bin/sh", "-c", script])
            .output()
            .unwrap()
    };
    let out = run("exit 7");
    assert_eq!(out.status.code(), Some(7));
    let out = run("kill -SEGV $$");
    assert_eq!(out.status.code(), Some(128 + libc::SIGSEGV));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("killed by SIGSEGV"), "{err}");
}

#[test]
fn follow_forks_counts_the_children_a_shell_starts() {
    need_tracing!();
    let fx = fx();
    let spec = format!("uprobe:{fx}:fx_work");
    let script = format!("{fx} work 100 2; {fx} work 50 1; true");
    let out = Command::new(RCU_TRACE)
        .args(["--json", "-f", &spec, "--", "/bin/sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objs = json_lines(&out.stdout);
    assert_eq!(probe(&objs, &spec)["calls"], 250);
    let own: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('{'))
        .collect();
    assert_eq!(own, ["29900", "3725"]);
}
