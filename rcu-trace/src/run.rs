//! One run of `rcu-trace`, from the parsed command line to the exit code.
//!
//! Order matters: the specs are parsed, the `-p` processes checked, every
//! file and symbol resolved and the trace file created **before** the
//! engine starts a command or touches a process; any failure there is one
//! line on standard error and a non-zero exit with nothing touched.

use std::io::{IsTerminal, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use rcu_registry::probes::remote::ExitStatus;

use crate::cli::{Cli, EngineKind, Live};
use crate::engine::{self, Ending, Target};
use crate::record::{Options, Recorder};
use crate::report::{self, LiveTable};
use crate::resolve::{self, Scope};
use crate::spec::Spec;

/// Exit code of a usage or spec error.
const EXIT_USAGE: i32 = 2;
/// Exit code of a target that cannot be traced or a failure while tracing.
const EXIT_TARGET: i32 = 1;

fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("rcu-trace: {msg}");
    code
}

/// Why `pid` cannot be traced, as far as `/proc` tells before trying
/// (the attach itself has the last word).
fn check_pid(pid: i32) -> Result<(), String> {
    if pid <= 0 {
        return Err(format!("{pid} is not a process id"));
    }
    if pid as u32 == std::process::id() {
        return Err(format!("process {pid} is rcu-trace itself"));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| format!("no process {pid}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    if matches!(field("State:").chars().next(), Some('Z' | 'X')) {
        return Err(format!("process {pid} has exited"));
    }
    match field("TracerPid:").parse::<i32>() {
        Ok(0) | Err(_) => {}
        Ok(t) => {
            return Err(format!(
            "process {pid} is traced already by process {t} (a debugger, strace, another tracer)"
        ))
        }
    }
    // SAFETY: geteuid takes nothing and cannot fail.
    let me = unsafe { libc::geteuid() };
    let uid = field("Uid:").split_whitespace().next().unwrap_or("");
    if me != 0 && uid.parse::<u32>().is_ok_and(|u| u != me) {
        return Err(format!(
            "process {pid} runs as user {uid}: tracing it needs that user or root"
        ));
    }
    Ok(())
}

/// Checks that `program` can be run, as `execvp` would find it (a name
/// with a `/` as it is, else in `PATH`): else the shell's exit code (127
/// not found, 126 not executable) and one line.
fn find_command(program: &std::ffi::OsStr) -> Result<(), (i32, String)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let shown = program.to_string_lossy();
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.as_bytes().contains(&b'/') {
        let p = std::path::Path::new(program);
        if !p.exists() {
            return Err((127, format!("{shown}: no such file")));
        }
        runnable(p)
    } else {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let candidates: Vec<std::path::PathBuf> = std::env::split_paths(&path)
            .map(|d| d.join(program))
            .collect();
        if !candidates.iter().any(|p| p.exists()) {
            return Err((127, format!("{shown}: command not found")));
        }
        candidates.iter().any(|p| runnable(p))
    };
    match found {
        true => Ok(()),
        false => Err((126, format!("{shown}: not an executable file"))),
    }
}

/// A signal's name, for a person.
fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    format!("{name} ({sig})")
}

/// Runs `rcu-trace` as `cli` says; returns the exit code.
pub fn run(cli: Cli) -> i32 {
    for &pid in &cli.pids {
        if let Err(e) = check_pid(pid) {
            return fail(EXIT_TARGET, e);
        }
    }
    let scope = match cli.pids.is_empty() {
        true => Scope::System,
        false => Scope::Processes(cli.pids.clone()),
    };
    if let Some(what) = &cli.list {
        if !cli.specs.is_empty() || !cli.command.is_empty() {
            return fail(EXIT_USAGE, "--list takes no probe spec and no command");
        }
        return list(what, &scope, cli.json);
    }
    if cli.specs.is_empty() {
        return fail(EXIT_USAGE, "no probe spec given (see --help)");
    }
    let target = match (cli.command.is_empty(), cli.pids.is_empty()) {
        (true, true) => {
            return fail(
                EXIT_USAGE,
                "nothing to trace: give -- CMD ARGS... or -p PID",
            )
        }
        (false, false) => return fail(EXIT_USAGE, "give a command or -p PID, not both"),
        (false, true) => {
            if let Err((code, why)) = find_command(&cli.command[0]) {
                return fail(code, why);
            }
            let mut cmd = Command::new(&cli.command[0]);
            cmd.args(&cli.command[1..]);
            Target::Spawn(cmd)
        }
        (true, false) => Target::Attach(cli.pids.clone()),
    };
    let mut specs = Vec::new();
    for s in &cli.specs {
        match Spec::parse(s) {
            Ok(spec) => specs.push(spec),
            Err(e) => return fail(EXIT_USAGE, e),
        }
    }
    let plan = match resolve::plan(specs, &scope) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let trace = match &cli.trace_out {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some(f),
            Err(e) => return fail(EXIT_TARGET, format!("{}: {e}", path.display())),
        },
        None => None,
    };
    let opts = Options {
        args: usize::from(cli.args),
        retval: cli.retval,
        limit: cli.limit,
        json: cli.json,
    };
    let events_on_stderr = !cli.json && (cli.args > 0 || cli.retval);
    let rec = match Recorder::new(&plan, opts, trace) {
        Ok(r) => Arc::new(r),
        Err(e) => return fail(EXIT_TARGET, format!("--trace-out: {e}")),
    };
    let spawned = matches!(target, Target::Spawn(_));
    let (kind, agent) =
        match engine::choose(cli.engine, cli.agent.as_deref(), &target, cli.follow_forks) {
            Ok(k) => k,
            Err(e) => return fail(EXIT_TARGET, e),
        };
    let mut engine = engine::new(kind, cli.follow_forks, agent, !cli.no_jump);
    let started = Instant::now();
    let (pids, warnings) = match engine.start(&plan, &rec, target) {
        Ok(s) => s,
        // Chosen by `auto`, the agent refused a probe (code its own trap
        // path reaches) and the command was killed before its `main`:
        // started again under ptrace.
        Err(e) if e.ptrace_may_serve && cli.engine == EngineKind::Auto => {
            eprintln!("rcu-trace: warning: {}: using the ptrace engine", e.message);
            let mut cmd = Command::new(&cli.command[0]);
            cmd.args(&cli.command[1..]);
            engine = engine::new(EngineKind::Ptrace, cli.follow_forks, None, false);
            match engine.start(&plan, &rec, Target::Spawn(cmd)) {
                Ok(s) => s,
                Err(e) => return fail(e.exit_code, e.message),
            }
        }
        Err(e) => return fail(e.exit_code, e.message),
    };
    for w in &warnings {
        eprintln!("rcu-trace: warning: {w}");
    }
    {
        // Also with --json (whose objects go to standard output): the
        // line that says the probes are in place.
        let functions = plan.probes.len();
        eprintln!(
            "rcu-trace: {functions} probe{} in {} {} ({} engine); Ctrl-C to detach",
            if functions == 1 { "" } else { "s" },
            if pids.len() == 1 {
                "process"
            } else {
                "processes"
            },
            pids.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            engine.name()
        );
    }
    let terminal = std::io::stderr().is_terminal();
    let live = match cli.live {
        Live::Always => true,
        Live::Never => false,
        Live::Auto => terminal && !events_on_stderr,
    };
    let table = live.then(|| LiveTable::start(Arc::clone(&rec), terminal));
    let ending = engine.run();
    if let Some(t) = table {
        t.stop();
    }
    let elapsed = started.elapsed();
    let mut code = 0;
    if let Err(e) = rec.finish() {
        code = fail(EXIT_TARGET, format!("--trace-out: {e}"));
    }
    let (how, end_code) = match ending {
        Err(e) => (format!("failed: {e}"), EXIT_TARGET),
        Ok(Ending::Terminated(sig)) => (
            format!(
                "detached on {}: the traced processes run on",
                signal_name(sig)
            ),
            if spawned { 128 + sig } else { 0 },
        ),
        Ok(Ending::Ended) if spawned => match engine.exit_status(pids[0]) {
            Some(ExitStatus::Code(c)) => (format!("the command exited with status {c}"), c),
            Some(ExitStatus::Signal(s)) => (
                format!("the command was killed by {}", signal_name(s)),
                128 + s,
            ),
            None => ("the command's end was not seen".to_string(), EXIT_TARGET),
        },
        Ok(Ending::Ended) => ("every traced process has exited".to_string(), 0),
    };
    if code == 0 {
        code = end_code;
    }
    if cli.json {
        let mut out = std::io::stdout().lock();
        for line in report::probes_json(&rec, &plan.specs) {
            let _ = writeln!(out, "{line}");
        }
        let end = serde_json::json!({
            "type": "end",
            "how": how,
            "exit_code": code,
            "duration_ns": elapsed.as_nanos() as u64,
            "pids": pids,
        });
        let _ = writeln!(out, "{end}");
        let _ = out.flush();
    } else {
        let mut err = std::io::stderr().lock();
        for line in report::table(&rec, None, elapsed, None) {
            let _ = writeln!(err, "{line}");
        }
        if rec.dropped() > 0 {
            let _ = writeln!(
                err,
                "rcu-trace: {} events dropped (the agent's ring was full); counts are exact",
                rec.dropped()
            );
        }
        for r in rec.rows() {
            let untimed = r.unmatched();
            if r.latency().is_some() && untimed > 0 {
                let _ = writeln!(
                    err,
                    "rcu-trace: {}: {untimed} returns without a timed entry",
                    r.probe.label
                );
            }
        }
        let _ = writeln!(err, "rcu-trace: {how}");
    }
    code
}

/// `--list PATH[:GLOB]`: one line per function (offset, size, name, other
/// matching names) on standard output.
fn list(what: &str, scope: &Scope, json: bool) -> i32 {
    let (path, found) = match resolve::list(what, scope) {
        Ok(x) => x,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let mut out = std::io::stdout().lock();
    for m in &found {
        let also: Vec<&str> = m
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| *n != m.name)
            .collect();
        let _ = if json {
            let obj = serde_json::json!({
                "type": "function",
                "path": path.display().to_string(),
                "offset": m.offset,
                "size": m.size,
                "name": m.name,
                "aliases": also,
            });
            writeln!(out, "{obj}")
        } else {
            let size = m.size.map_or("-".to_string(), |s| s.to_string());
            match also.is_empty() {
                true => writeln!(out, "{:#010x} {size:>7} {}", m.offset, m.name),
                false => writeln!(
                    out,
                    "{:#010x} {size:>7} {} (also {})",
                    m.offset,
                    m.name,
                    also.join(", ")
                ),
            }
        };
    }
    drop(out);
    if !json {
        eprintln!(
            "rcu-trace: {} function{} of {}",
            found.len(),
            if found.len() == 1 { "" } else { "s" },
            path.display()
        );
    }
    0
}
