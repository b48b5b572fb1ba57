//! Engines: what puts the probes into the targets and serves their hits.
//!
//! An [`Engine`] gets the [`Plan`] (every probe resolved to its uprobe
//! keys), the [`Recorder`] its hits go to, and a [`Target`]; it installs,
//! starts or attaches, and serves until the targets end or a termination
//! signal detaches it. The CLI knows nothing else of it.
//!
//! # `ptrace` (built)
//!
//! [`PtraceEngine`]: the library's [`RemoteTracer`]. Each spec is one
//! [`Consumer`] registered on all its keys in one batch
//! (`register_many`), before the command exists or the processes are
//! attached, so the attach (or the command's `exec`, or the loader mapping
//! a library) writes every breakpoint of a file at once. A hit stops the
//! traced thread; the consumer runs on the tracer thread, finds its probe
//! by key (a binary search in a table built up front) and calls the
//! recorder with the thread [`serving_thread`] names.
//!
//! # `inprocess` (built for spawned commands)
//!
//! [`InprocessEngine`]: an agent library (`rcu-trace-agent`, built as
//! `librcu_trace_agent.so`) runs the plan's probes with the live uprobes
//! of `probes::runtime` inside the target, so a hit is one trap and no
//! context switch. For a spawned command the engine makes a socket pair,
//! sets `LD_PRELOAD` to the agent and `RCU_TRACE_AGENT_FD` to the
//! command's end, and starts it; the agent's constructor reads the plan
//! (each probe as file path, offset, kind and spec), registers each spec's
//! probes in one batch, answers, and only then returns, so every probe is
//! in place before `main`. The agent counts into the same allocation-free
//! [`Counters`](crate::stats::Counters) the [`Recorder`] rows hold; its
//! thread streams them (and, for `--args`, `--retval` and `--trace-out`,
//! the events its handlers pushed through a lock-free ring) every 100 ms
//! and at the program's exit, and the engine mirrors them into the rows
//! ([`Counters::absorb`](crate::stats::Counters::absorb)) and feeds the
//! events to [`Recorder::entry_event`] / [`Recorder::ret_event`]: the
//! table, `--json` and `--trace-out` are the ptrace engine's, in form.
//! The wire protocol is `rcu_trace_agent::wire`.
//!
//! A termination signal sends the agent `q`: it unregisters everything,
//! sends its final counts and the program runs on, its bytes restored.
//!
//! `-p PID` (one process): the agent is loaded into the running process
//! over ptrace (`probes::remote::load_library`: a thread at a safe point
//! is borrowed to call `dlopen`, then every thread is let go), and its
//! start function `rcu_trace_agent_start` is called with the path of a
//! Unix socket the engine listens on; the agent connects, and from then
//! on it is as for a command, without ptrace (an `exec` of that process
//! ends the trace). Only when asked for (`--engine inprocess`): `auto`
//! serves `-p` with ptrace. Not built: `-f` (the agent leaves children
//! untraced): `auto` picks ptrace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rcu_registry::probes::remote::{serving_thread, ExitStatus, RemoteError, RemoteTracer};
use rcu_registry::probes::uprobe::{AddressSpace, Consumer, ConsumerAction, UprobeKey};

use crate::cli::EngineKind;
use crate::record::{Recorder, Thread, MAX_ARGS};
use crate::resolve::Plan;
use crate::spec::Kind;

/// What to trace.
#[derive(Debug)]
pub enum Target {
    /// A command to start traced.
    Spawn(Command),
    /// Running processes to attach to.
    Attach(Vec<i32>),
}

/// How serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every traced process ended.
    Ended,
    /// A termination signal (this number) came: every target was detached
    /// and runs on.
    Terminated(i32),
}

/// Why an engine could not start, with the exit code it means.
#[derive(Debug)]
pub struct EngineError {
    /// One line.
    pub message: String,
    /// 127 for a command not found, 1 otherwise.
    pub exit_code: i32,
    /// The in-process agent refused a probe before the command's `main`
    /// ran (the command was killed then): the ptrace engine may serve it.
    pub ptrace_may_serve: bool,
}

impl EngineError {
    pub(crate) fn new(message: String) -> EngineError {
        EngineError {
            message,
            exit_code: 1,
            ptrace_may_serve: false,
        }
    }
}

/// Puts probes into targets and serves their hits (see the module docs).
pub trait Engine {
    /// Its name, as `--engine` spells it.
    fn name(&self) -> &'static str;

    /// Installs the plan's probes, reporting hits to `recorder`, and starts
    /// or attaches to `target`. Returns the traced process ids and
    /// warnings (probes that could not be installed somewhere).
    ///
    /// # Errors
    /// Nothing is left traced or patched.
    fn start(
        &mut self,
        plan: &Plan,
        recorder: &Arc<Recorder>,
        target: Target,
    ) -> Result<(Vec<i32>, Vec<String>), EngineError>;

    /// Serves hits until every target ended or a termination signal came.
    ///
    /// # Errors
    /// Serving failed (one line); the targets are detached.
    fn run(&mut self) -> Result<Ending, String>;

    /// How traced process `pid` ended, once it has.
    fn exit_status(&self, pid: i32) -> Option<ExitStatus>;
}

mod inprocess;

pub use inprocess::{find_agent, preload_refused, InprocessEngine, AGENT_ENV, AGENT_FILE};

/// The engine `kind` names (`Auto` resolved: see [`choose`]).
pub fn new(
    kind: EngineKind,
    follow_forks: bool,
    agent: Option<PathBuf>,
    jump: bool,
) -> Box<dyn Engine> {
    match (kind, agent) {
        (EngineKind::Inprocess, Some(agent)) => Box::new(InprocessEngine::new(agent, jump)),
        _ => Box::new(PtraceEngine::new(follow_forks)),
    }
}

/// The engine a request gets: `asked` unless it is `Auto`, which is
/// `inprocess` when the agent is found and the request allows it (a
/// spawned dynamically linked command, no `-f`), else `ptrace` (`-p`
/// included: the agent is injected into a running process only when
/// `--engine inprocess` asks for it). Returns
/// the engine and, for `inprocess`, the agent; `Err` (one line) when
/// `inprocess` was asked for and cannot serve.
pub fn choose(
    asked: EngineKind,
    explicit_agent: Option<&Path>,
    target: &Target,
    follow_forks: bool,
) -> Result<(EngineKind, Option<PathBuf>), String> {
    let why_not = || -> Result<PathBuf, String> {
        let program = match target {
            // Injected over ptrace (`load_library`): asked for only.
            Target::Attach(_) if asked == EngineKind::Auto => {
                return Err("auto serves -p with ptrace".into())
            }
            Target::Attach(_) => return find_agent(explicit_agent),
            Target::Spawn(cmd) => cmd.get_program(),
        };
        if follow_forks {
            return Err("--engine inprocess: -f needs the ptrace engine (the agent leaves children untraced)".into());
        }
        let agent = find_agent(explicit_agent)?;
        if let Some(path) = which(program) {
            if let Some(why) = preload_refused(&path) {
                return Err(format!("--engine inprocess: {why}"));
            }
        }
        Ok(agent)
    };
    match asked {
        EngineKind::Ptrace => Ok((EngineKind::Ptrace, None)),
        EngineKind::Inprocess => why_not().map(|a| (EngineKind::Inprocess, Some(a))),
        EngineKind::Auto => Ok(match why_not() {
            Ok(a) => (EngineKind::Inprocess, Some(a)),
            Err(_) => (EngineKind::Ptrace, None),
        }),
    }
}

/// `program` as `execvp` finds it.
fn which(program: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The ptrace engine (see the module docs).
pub struct PtraceEngine {
    tracer: RemoteTracer,
}

impl PtraceEngine {
    /// An engine with a tracer of its own (following forks or not).
    pub fn new(follow_forks: bool) -> PtraceEngine {
        let mut tracer = RemoteTracer::new();
        tracer.follow_forks(follow_forks);
        PtraceEngine { tracer }
    }

    /// Registers one consumer per spec on all the spec's keys.
    fn register(&mut self, plan: &Plan, recorder: &Arc<Recorder>) -> Result<(), EngineError> {
        for (si, spec) in plan.specs.iter().enumerate() {
            let mut table: Vec<(UprobeKey, usize)> = Vec::new();
            let mut items: Vec<(UprobeKey, Option<u64>)> = Vec::new();
            let mut labels: Vec<&str> = Vec::new();
            for (row, p) in plan.probes.iter().enumerate().filter(|(_, p)| p.spec == si) {
                for &(key, func) in &p.keys {
                    table.push((key, row));
                    // A uretprobe sits on the function's entry.
                    items.push((
                        key,
                        if p.kind == Kind::Return {
                            Some(key.offset)
                        } else {
                            func
                        },
                    ));
                    labels.push(&p.label);
                }
            }
            table.sort_unstable_by_key(|&(k, _)| k);
            let consumer = consumer(spec.kind, table.into(), Arc::clone(recorder));
            let results = self.tracer.registry().register_many(&items, &consumer);
            for (r, label) in results.into_iter().zip(labels) {
                r.map_err(|e| EngineError::new(format!("{label}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Probes whose file a traced process maps where no breakpoint is (an
    /// instruction the library cannot step, say), and, for processes
    /// attached to (`attached`: their libraries are loaded already),
    /// probes in a file the process does not map (yet).
    fn not_installed(&self, plan: &Plan, attached: bool) -> Vec<String> {
        let reg = self.tracer.registry();
        let mut out = Vec::new();
        for pid in self.tracer.pids() {
            let Some(space) = self.tracer.space(pid) else {
                continue;
            };
            let maps = reg.mappings_of(space.id());
            for p in &plan.probes {
                let mapped = p
                    .keys
                    .iter()
                    .any(|(k, _)| maps.iter().any(|m| m.file == k.file));
                if attached && !mapped {
                    out.push(format!(
                        "{}: process {pid} does not map {} (yet): the probe waits for it to be loaded",
                        p.label,
                        p.path.display()
                    ));
                }
                for (key, _) in &p.keys {
                    let at: Vec<u64> = maps
                        .iter()
                        .filter(|m| m.file == key.file)
                        .filter_map(|m| m.vaddr_of(key.offset))
                        .collect();
                    if at
                        .iter()
                        .any(|&v| reg.installed_at(space.id(), v) != Some(*key))
                    {
                        out.push(format!("{} is not installed in process {pid}", p.label));
                    }
                }
            }
        }
        out
    }
}

/// The consumer of one spec: finds the probe by key and records.
fn consumer(kind: Kind, table: Arc<[(UprobeKey, usize)]>, rec: Arc<Recorder>) -> Consumer {
    let row_of = |table: &[(UprobeKey, usize)], key: UprobeKey| {
        table
            .binary_search_by_key(&key, |&(k, _)| k)
            .ok()
            .map(|i| table[i].1)
    };
    let who = || {
        serving_thread()
            .map(|t| Thread {
                pid: t.pid,
                tid: t.tid,
            })
            .unwrap_or_default()
    };
    let (entry_table, entry_rec) = (Arc::clone(&table), Arc::clone(&rec));
    let entry = move |hit: &rcu_registry::probes::uprobe::UprobeHit,
                      regs: &mut rcu_registry::probes::arch::Regs| {
        if let Some(row) = row_of(&entry_table, hit.key) {
            let mut args = [0u64; MAX_ARGS];
            for (i, a) in args.iter_mut().enumerate() {
                *a = regs.arg(i).unwrap_or(0);
            }
            entry_rec.entry(row, hit.space.0, who(), regs.sp, &args);
        }
        ConsumerAction::Continue
    };
    match kind {
        Kind::Entry => Consumer::new(entry),
        Kind::Return => Consumer::builder()
            .handler(entry)
            .ret_handler(move |ret, regs| {
                if let Some(row) = row_of(&table, ret.key) {
                    rec.ret(row, ret.space.0, who(), regs.sp, ret.retval);
                }
            })
            .build(),
    }
}

impl Engine for PtraceEngine {
    fn name(&self) -> &'static str {
        "ptrace"
    }

    fn start(
        &mut self,
        plan: &Plan,
        recorder: &Arc<Recorder>,
        target: Target,
    ) -> Result<(Vec<i32>, Vec<String>), EngineError> {
        self.register(plan, recorder)?;
        self.tracer
            .detach_on_termination()
            .map_err(|e| EngineError::new(e.to_string()))?;
        let attached = matches!(target, Target::Attach(_));
        let pids = match target {
            Target::Spawn(cmd) => {
                let what = cmd.get_program().to_string_lossy().into_owned();
                let pid = self.tracer.spawn(&cmd).map_err(|e| match e {
                    RemoteError::Os { error, .. }
                        if error.kind() == std::io::ErrorKind::NotFound =>
                    {
                        EngineError {
                            message: format!("{what}: command not found"),
                            exit_code: 127,
                            ptrace_may_serve: false,
                        }
                    }
                    e => EngineError::new(format!("{what}: {e}")),
                })?;
                vec![pid]
            }
            Target::Attach(pids) => {
                for &pid in &pids {
                    if let Err(e) = self.tracer.attach(pid) {
                        // Those attached already are let go, restored.
                        self.tracer.detach_all();
                        return Err(EngineError::new(e.to_string()));
                    }
                }
                pids
            }
        };
        let warnings = self.not_installed(plan, attached);
        Ok((pids, warnings))
    }

    fn run(&mut self) -> Result<Ending, String> {
        match self.tracer.run() {
            Ok(()) => Ok(Ending::Ended),
            Err(RemoteError::Terminated(sig)) => Ok(Ending::Terminated(sig)),
            Err(e) => {
                self.tracer.detach_all();
                Err(e.to_string())
            }
        }
    }

    fn exit_status(&self, pid: i32) -> Option<ExitStatus> {
        self.tracer.exit_status(pid)
    }
}
