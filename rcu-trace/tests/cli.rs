//! The command line: help, bad specs, missing symbols and commands, fail
//! in one line with nothing run; `--list` shows what a glob matches.

#[macro_use]
mod common;

use std::process::Command;

use assert_cmd::Command as Cmd;
use common::{fx, json_lines, RCU_TRACE};

fn rcu_trace() -> Cmd {
    Cmd::new(RCU_TRACE)
}

#[test]
fn help_explains_specs_targets_and_the_engines() {
    let out = rcu_trace().arg("--help").assert().success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    for want in [
        "uprobe:PATH:SYMBOL",
        "uretprobe:PATH:SYMBOL",
        "uprobe:PATH:0xOFFSET",
        "--list PATH[:GLOB]",
        "-- CMD ARGS",
        "-p PID",
        "Ctrl-C",
        "inprocess",
        "--trace-out",
    ] {
        assert!(text.contains(want), "--help lacks `{want}`:\n{text}");
    }
}

/// One line on standard error, a non-zero exit, nothing on standard
/// output: the command never ran (the fixture would print its sum).
fn fails_in_one_line(args: &[&str], code: i32) -> String {
    common::need_tracing_or_panic();
    let out = rcu_trace().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("rcu-trace: "), "{err}");
    assert!(out.stdout.is_empty(), "{args:?} ran something");
    err
}

#[test]
fn bad_specs_fail_in_one_line_before_the_command_runs() {
    need_tracing!();
    let fx = fx();
    for bad in [
        "getpid".to_string(),
        "kprobe:libc:getpid".into(),
        format!("uprobe:{fx}"),
        format!("uprobe:{fx}:"),
        format!("uprobe:{fx}:fx_work+zz"),
        format!("uretprobe:{fx}:fx_work+4"),
        format!("uretprobe:{fx}:0x10"),
        format!("uprobe:{fx}:fx_*+4"),
        format!("uprobe:{fx}:fx_[ab"),
    ] {
        let err = fails_in_one_line(&[&bad, "--", &fx, "work", "10", "1"], 2);
        assert!(err.contains(&bad), "{err}");
    }
}

#[test]
fn missing_symbols_files_and_libraries_fail_in_one_line_before_the_command_runs() {
    need_tracing!();
    let fx = fx();
    let cases = [
        (format!("uprobe:{fx}:no_such_function"), "no_such_function"),
        (format!("uprobe:{fx}:nomatch_*"), "matches"),
        ("uprobe:/no/such/file:f".to_string(), "/no/such/file"),
        ("uprobe:libnosuchlib:f".to_string(), "libnosuchlib"),
        ("uprobe:libc:strlen".to_string(), "IFUNC"),
        (format!("uprobe:{fx}:0xffffffff"), "0xffffffff"),
    ];
    for (spec, says) in cases {
        // A good spec first: nothing of it is installed either.
        let good = format!("uprobe:{fx}:fx_work");
        let err = fails_in_one_line(&[&good, &spec, "--", &fx, "work", "10", "1"], 2);
        assert!(err.contains(&spec) && err.contains(says), "{err}");
    }
}

#[test]
fn usage_errors_and_a_missing_command_fail_in_one_line() {
    need_tracing!();
    let spec = format!("uprobe:{}:fx_work", fx());
    fails_in_one_line(&[&spec], 2);
    fails_in_one_line(&[&spec, "-p", "1", "--", "true"], 2);
    let err = fails_in_one_line(&[&spec, "--", "/no/such/command"], 127);
    assert!(err.contains("/no/such/command"), "{err}");
    let err = fails_in_one_line(&[&spec, "--", "no-such-command-here"], 127);
    assert!(err.contains("no-such-command-here"), "{err}");
    let err = fails_in_one_line(&[&spec, "--", env!("CARGO_MANIFEST_DIR")], 126);
    assert!(err.contains("not an executable"), "{err}");
    fails_in_one_line(&[&spec, "-p", "999999999"], 1);
}

#[test]
fn list_shows_what_a_glob_matches_one_line_per_function_with_its_offset() {
    need_tracing!();
    let fx = fx();
    let out = rcu_trace()
        .args(["--list", &format!("{fx}:fx_*a")])
        .assert()
        .success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    // fx_delta_a is fx_alpha's alias: one function, named plainly.
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["fx_alpha", "fx_beta", "fx_gamma"], "{text}");
    assert!(text.contains("fx_alpha (also fx_delta_a)"), "{text}");
    // The offsets are those of the whole listing, and resolve by name.
    let all = Command::new(RCU_TRACE)
        .args(["--json", "--list", &fx])
        .output()
        .unwrap();
    let all = json_lines(&all.stdout);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let offset = u64::from_str_radix(f.next().unwrap().trim_start_matches("0x"), 16).unwrap();
        let name = f.nth(1).unwrap();
        assert!(
            all.iter()
                .any(|o| o["name"] == name && o["offset"].as_u64() == Some(offset)),
            "{name} at {offset:#x} not in the full listing"
        );
        assert_eq!(common::offset_of(name), offset);
    }
    // A bare `libc` is the C library, and its IFUNCs are left out.
    let out = rcu_trace()
        .args(["--list", "libc:strtol"])
        .assert()
        .success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert_eq!(text.lines().count(), 1, "{text}");
    let out = rcu_trace()
        .args(["--list", "libc:strlen"])
        .assert()
        .success();
    assert!(out.get_output().stdout.is_empty());
}
