//! rcu-trace's counts against the kernel's own uprobe on the same spec
//! (issue 14: "where tracefs is available, counts equal the kernel's own
//! uprobe count"): the same deterministic run is counted once by a tracefs
//! uprobe and once by rcu-trace; the two counts must be equal. The kernel
//! counts the fixture (a file only its runs map) by its probe's hits, and
//! `sort`'s calls of the C library's `strcoll` by the events recorded for
//! that one process (a filter on its pid: other processes call `strcoll`
//! too; this kernel has no histogram triggers). The two are never on at
//! once (both put a breakpoint at the same address).
//!
//! Needs root and tracefs (`/sys/kernel/tracing`, mounted here if it can
//! be); without them each test prints why and returns.

#[macro_use]
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use rcu_registry::probes::uprobe::{TargetResolver, UprobeTarget};

const TRACING: &str = "/sys/kernel/tracing";

/// Why the kernel's uprobes cannot be used here, if they cannot.
fn no_tracefs() -> Option<String> {
    let events = format!("{TRACING}/uprobe_events");
    if !Path::new(&events).exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", TRACING])
            .status();
    }
    if !Path::new(&events).exists() {
        return Some("no tracefs with uprobe_events (needs root)".into());
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(&events)
        .err()
        .map(|e| format!("{events} is not writable: {e}"))
}

fn append(file: &str, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(file)?;
    f.write_all(line.as_bytes())
}

/// A kernel uprobe on `symbol` in `file`; removed on drop.
struct KernelProbe {
    name: String,
    buffer_kb: Option<String>,
}

impl KernelProbe {
    fn new(file: &str, symbol: &str) -> KernelProbe {
        let r = TargetResolver::new()
            .resolve(&UprobeTarget::symbol(file, symbol))
            .unwrap();
        let name = format!("rcu_trace_cmp_{}", std::process::id());
        append(
            &format!("{TRACING}/uprobe_events"),
            &format!("p:{name} {}:{:#x}\n", r.path.display(), r.offset),
        )
        .expect("defining the kernel uprobe");
        KernelProbe {
            name,
            buffer_kb: None,
        }
    }

    fn file(&self, f: &str) -> String {
        format!("{TRACING}/events/uprobes/{}/{f}", self.name)
    }

    /// Its hits in every process (`uprobe_profile`): for a file only the
    /// test's program maps.
    fn hits(&self) -> u64 {
        std::fs::read_to_string(format!("{TRACING}/uprobe_profile"))
            .unwrap()
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(self.name.as_str()))
            .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
            .expect("the probe's line in uprobe_profile")
    }

    /// Records its events of thread `tid` only, into an emptied trace
    /// buffer made large enough (this kernel has no histogram triggers).
    fn record_thread(&mut self, tid: u32) {
        let kb = format!("{TRACING}/buffer_size_kb");
        self.buffer_kb = std::fs::read_to_string(&kb).ok();
        std::fs::write(&kb, "16384").expect("the trace buffer's size");
        std::fs::write(self.file("filter"), format!("common_pid == {tid}\n")).expect("the filter");
        std::fs::write(format!("{TRACING}/trace"), "").expect("emptying the trace");
        std::fs::write(self.file("enable"), "1").expect("enabling the event");
    }

    /// The events recorded, checked against the buffer's own count of
    /// those written (none lost).
    fn recorded(&self) -> u64 {
        let _ = std::fs::write(self.file("enable"), "0");
        let trace = std::fs::read_to_string(format!("{TRACING}/trace")).unwrap();
        let tag = format!(" {}:", self.name);
        let n = trace.lines().filter(|l| l.contains(&tag)).count() as u64;
        let counts = trace
            .lines()
            .find_map(|l| l.split("entries-in-buffer/entries-written:").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|c| c.split_once('/'))
            .map(|(a, b)| (a.to_string(), b.to_string()));
        if let Some((kept, written)) = counts {
            assert_eq!(kept, written, "the trace buffer lost events");
        }
        n
    }
}

impl Drop for KernelProbe {
    fn drop(&mut self) {
        let _ = std::fs::write(self.file("enable"), "0");
        let _ = std::fs::write(self.file("filter"), "0\n");
        let _ = append(
            &format!("{TRACING}/uprobe_events"),
            &format!("-:{}\n", self.name),
        );
        if let Some(kb) = &self.buffer_kb {
            let _ = std::fs::write(format!("{TRACING}/buffer_size_kb"), kb.trim());
        }
    }
}

/// The same, counted by rcu-trace (`--json`).
fn rcu_trace_count(spec: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> u64 {
    let out = Command::new(RCU_TRACE)
        .envs(env.iter().copied())
        .args(["--json", "--live", "never", spec, "--", program])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    probe(&json_lines(&out.stdout), spec)["calls"]
        .as_u64()
        .unwrap()
}

/// Both comparisons in one test: they share tracefs' files.
#[test]
fn counts_equal_the_kernel_uprobe_s_on_the_fixture_and_on_sort() {
    need_tracing!();
    if let Some(why) = no_tracefs() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    // The fixture (a file only its runs map): fx_work from four threads,
    // the kernel's count its probe's hits.
    let fx = fx();
    let args = ["work", "2500", "4"];
    let kernel = {
        let k = KernelProbe::new(&fx, "fx_work");
        std::fs::write(k.file("enable"), "1").expect("enabling the event");
        assert!(Command::new(&fx).args(args).status().unwrap().success());
        k.hits()
    };
    let ours = rcu_trace_count(&format!("uprobe:{fx}:fx_work"), &fx, &args, &[]);
    assert_eq!(kernel, 10_000, "the kernel's count of the fixture's calls");
    assert_eq!(ours, kernel, "rcu-trace and the kernel on the fixture");

    // A program of the base system: sort's strcoll calls (C.UTF-8), the
    // kernel's count its events of that process (sort runs one thread;
    // a shell waits for a line, then becomes sort, so the pid is known
    // before the first call).
    let lines = path("lines");
    let text: String = (0..3_000u64)
        .map(|i| format!("{:016x} {i}\n", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();
    std::fs::write(&lines, text).unwrap();
    let lines = lines.to_str().unwrap();
    let sort_args = ["-o", "/dev/null", lines];
    let env = [("LC_ALL", "C.UTF-8")];
    let kernel = {
        let mut k = KernelProbe::new("libc.so.6", "strcoll");
        let mut child = Command::new("sh")
            .envs(env)
            .args(["-c", "read _ && exec sort \"$@\"", "sh"])
            .args(sort_args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        k.record_thread(child.id());
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        assert!(child.wait().unwrap().success());
        k.recorded()
    };
    if kernel == 0 {
        eprintln!("SKIPPED (sort): strcoll is not called in C.UTF-8 here");
        return;
    }
    let ours = rcu_trace_count("uprobe:libc:strcoll", "sort", &sort_args, &env);
    assert_eq!(ours, kernel, "rcu-trace and the kernel on sort's strcoll");
    println!(
        "fixture: {kernel_fx} calls both ways; sort: {ours} strcoll calls both ways",
        kernel_fx = 10_000
    );
}
