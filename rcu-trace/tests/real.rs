//! Commands of the base system, traced: their output passes through byte
//! for byte, and what they call is counted.

#[macro_use]
mod common;

use std::process::Command;

use common::{json_lines, probe, RCU_TRACE};

#[test]
fn env_s_unsetenv_calls_are_counted_by_each_engine_and_echo_s_output_passes_through() {
    need_tracing!();
    // coreutils env calls unsetenv once per -u, then execs echo (a new
    // image, probed again: echo calls no unsetenv).
    let args = [
        "env",
        "-u",
        "A",
        "-u",
        "B",
        "-u",
        "C",
        "echo",
        "hello, world",
    ];
    let spec = "uprobe:libc:unsetenv";
    // Each engine: the in-process agent follows the exec as ptrace does.
    for engine in ["ptrace", "inprocess"] {
        let out = Command::new(RCU_TRACE)
            .args(["--engine", engine, "--json", spec, "--"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.starts_with(b"hello, world\n"), "{engine}");
        let objs = json_lines(&out.stdout);
        assert_eq!(probe(&objs, spec)["calls"], 3, "{engine}");
    }
}

#[test]
fn sort_s_output_is_byte_identical_under_tracing_of_malloc_and_a_glob() {
    need_tracing!();
    let input = common::path("words");
    let words: String = (0..2000)
        .map(|i| format!("w{:05}\n", (i * 7919) % 2000))
        .collect();
    std::fs::write(&input, words).unwrap();
    let untraced = Command::new("sort").arg(&input).output().unwrap();
    assert!(untraced.status.success());
    let out = Command::new(RCU_TRACE)
        .args(["uretprobe:libc:malloc", "uprobe:libc:str*", "--", "sort"])
        .arg(&input)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(out.stdout, untraced.stdout);
    assert!(err.contains("uretprobe:libc:malloc"), "{err}");
    // The same with --json: the objects follow sort's output, and malloc
    // was called and returned.
    let out = Command::new(RCU_TRACE)
        .args(["--json", "uretprobe:libc:malloc", "--", "sort"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout.starts_with(&untraced.stdout));
    let objs = json_lines(&out.stdout[untraced.stdout.len()..]);
    let m = probe(&objs, "uretprobe:libc:malloc");
    assert!(m["calls"].as_u64().unwrap() > 0);
    assert_eq!(m["calls"], m["returns"]);
}
