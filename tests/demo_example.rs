//! End to end: the README's main job (`./scripts/demo`, which runs the
//! `rcu-registry-demo` package's `demo` binary in release mode) runs both
//! phases, its own checks pass and it exits 0.
//!
//! The demo binary is built by cargo in the profile this test was built in
//! (`cargo test --release` builds and runs the release demo, the README's
//! main job), then run with short phases. The full run is ignored by
//! default: it runs a multi-threaded process for a few seconds, and what it
//! must prove (the workload functions keep their symbols, are not inlined or
//! merged) matters in release mode, where CI runs the ignored tests.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Seconds each of the demo's two phases runs here (the default is 3).
const PHASE_SECS: &str = "1";

/// `target/<profile>/`, from this test binary's `target/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds the demo in this test's profile and returns its path.
fn build_demo() -> PathBuf {
    let dir = profile_dir();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "-p",
            "rcu-registry-demo",
            "--bin",
            "demo",
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        // The target directory this test binary was built in.
        .arg("--target-dir")
        .arg(dir.parent().expect("target/<profile> has a parent"));
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some(profile) => {
            cargo.args(["--profile", profile]);
        }
        None => panic!("no profile directory name in {}", dir.display()),
    }
    let status = cargo.status().expect("running cargo build");
    assert!(status.success(), "cargo build -p rcu-registry-demo failed");
    let demo = dir.join("demo");
    assert!(demo.exists(), "no demo binary at {}", demo.display());
    demo
}

#[test]
#[ignore = "runs the demo binary for a few seconds; CI runs it in release mode"]
fn the_demo_runs_both_phases_and_its_checks_pass() {
    let demo = build_demo();
    let t0 = Instant::now();
    let out = Command::new(&demo)
        .args(["--secs", PHASE_SECS])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    println!("demo ran in {:?}", t0.elapsed());
    assert!(out.status.success(), "the demo exited with {}", out.status);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("rcu check: ok")));
    assert!(
        lines.iter().any(|l| l.starts_with("probe check: ok")),
        "the probe phase did not pass its check"
    );
    assert_eq!(lines.last(), Some(&"check: OK"));
}

#[test]
fn the_demo_refuses_an_unknown_target_with_usage_and_exit_code_2() {
    let demo = build_demo();
    let out = Command::new(&demo)
        .args(["--targets", "parse,no_such_function"])
        .output()
        .expect("running the demo");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown target `no_such_function`"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing ran");
}

/// The script itself, as the README runs it: the demo's two phases, then
/// phase 3, `rcu-trace` on `sort`, whose own check ends the run.
#[test]
#[ignore = "builds and runs the demo and rcu-trace in release; CI runs it"]
fn the_demo_script_ends_with_rcu_trace_on_sort_and_its_check() {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        eprintln!("SKIPPED: phase 3 (rcu-trace's ptrace engine) is x86_64 Linux only");
        return;
    }
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo"))
        .args(["--secs", PHASE_SECS])
        .output()
        .expect("running scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "scripts/demo exited with {}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines
        .iter()
        .any(|l| l.starts_with("== phase 3: rcu-trace on sort")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("sort's output is byte-identical")));
    assert_eq!(lines.last(), Some(&"check: OK"));
}
