//! The `inprocess` engine, the tracer's side (see the `engine` module docs
//! and `rcu_trace_agent`'s for the agent's).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use rcu_registry::probes::remote::{load_library, ExitStatus};
use rcu_trace_agent::stats::Summary;
use rcu_trace_agent::wire::{FromAgent, PlannedProbe, ToAgent, FD_ENV};

use super::{Ending, Engine, EngineError, Target};
use crate::record::{HitPath, Recorder, Thread};
use crate::resolve::Plan;
use crate::spec::Kind;

/// The environment variable naming the agent library (after `--agent`).
pub const AGENT_ENV: &str = "RCU_TRACE_AGENT";
/// The agent library's file name.
pub const AGENT_FILE: &str = "librcu_trace_agent.so";

/// Where the agent is: `explicit` (`--agent`), else [`AGENT_ENV`], else
/// next to this executable (an installed pair, or cargo's target
/// directory: `target/debug/`, or its `deps/` where a build of rcu-trace
/// alone puts it). `Err` says what was looked at.
pub fn find_agent(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return match p.is_file() {
            true => Ok(p.to_path_buf()),
            false => Err(format!("--agent {}: no such file", p.display())),
        };
    }
    if let Some(p) = std::env::var_os(AGENT_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return match p.is_file() {
            true => Ok(p),
            false => Err(format!("{AGENT_ENV}={}: no such file", p.display())),
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("this executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    // Both may be there: cargo puts it in deps/ when it builds rcu-trace
    // (a dependency) and next to it when it builds the agent itself; the
    // newer one is the current build.
    let newest = [dir.join(AGENT_FILE), dir.join("deps").join(AGENT_FILE)]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    if let Some((_, p)) = newest {
        return Ok(p);
    }
    Err(format!(
        "no {AGENT_FILE} next to {} (build it: cargo build -p rcu-trace-agent; or give --agent PATH)",
        exe.display()
    ))
}

/// Why the agent cannot be `LD_PRELOAD`ed into `program` (a static or
/// set-user-id executable), if the file says; `None` if it can (or the
/// file is not an ELF file: a script's interpreter decides).
pub fn preload_refused(program: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(program).ok()?;
    if meta.permissions().mode() & 0o6000 != 0 {
        return Some(format!(
            "{} is set-user-id or set-group-id: the loader ignores LD_PRELOAD",
            program.display()
        ));
    }
    let mut head = Vec::new();
    std::fs::File::open(program)
        .ok()?
        .take(1 << 16)
        .read_to_end(&mut head)
        .ok()?;
    if head.get(..4) != Some(b"\x7fELF") || head.get(4) != Some(&2) {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
    let interp = (0..usize::from(phnum)).any(|i| {
        let o = phoff + i * usize::from(phentsize);
        head.get(o..o + 4) == Some(&3u32.to_le_bytes()[..])
    });
    match interp {
        true => None,
        false => Some(format!(
            "{} is statically linked: no agent can be preloaded",
            program.display()
        )),
    }
}

/// The signal that came (0: none), and the pipe that wakes the loop.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static WAKE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // Relaxed: the pipe write below is what the loop waits on; it reads
    // the number after reading the pipe (the write/read pair orders them).
    SIGNAL.store(sig, Ordering::Relaxed);
    // Relaxed: set once before the handler was installed.
    let fd = WAKE.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; one byte from a static.
    unsafe { libc::write(fd, b"s".as_ptr().cast(), 1) };
}

/// The in-process engine: spawns the command with the agent preloaded,
/// and feeds what the agent streams to the recorder.
pub struct InprocessEngine {
    agent: PathBuf,
    /// Jump-optimize (the agent's `o` option).
    jump: bool,
    child: Option<Child>,
    sock: Option<UnixStream>,
    /// The socket's reading half, kept from `start` to `run` with what it
    /// has buffered.
    reader: Option<BufReader<UnixStream>>,
    recorder: Option<Arc<Recorder>>,
    status: Option<ExitStatus>,
    pid: i32,
    /// The plan as sent (again to the agent of each new image).
    plan_text: String,
    /// The probes' labels (for refusals reported late).
    labels: Vec<String>,
    /// Per row: what the images before the last `exec` counted, and what
    /// the current one said last.
    bases: Vec<Summary>,
    last: Vec<Summary>,
}

impl InprocessEngine {
    /// An engine that preloads `agent`; `jump`: the agent jump-optimizes
    /// the probes it can.
    pub fn new(agent: PathBuf, jump: bool) -> InprocessEngine {
        InprocessEngine {
            agent,
            jump,
            child: None,
            sock: None,
            reader: None,
            recorder: None,
            status: None,
            pid: 0,
            plan_text: String::new(),
            labels: Vec::new(),
            bases: Vec::new(),
            last: Vec::new(),
        }
    }

    /// Handles one line from the agent; `true` for its goodbye.
    fn line(&mut self, line: &str, rec: &Recorder, sock: &UnixStream) -> bool {
        let pid = self.pid;
        let who = |tid| Thread { pid, tid };
        match FromAgent::parse(line) {
            Some(FromAgent::Counts(row, s)) => {
                if let (Some(r), Some(base), Some(last)) = (
                    rec.rows().get(row),
                    self.bases.get(row),
                    self.last.get_mut(row),
                ) {
                    r.counters.absorb(&base.plus(&s));
                    *last = s;
                }
            }
            Some(FromAgent::Entry { row, tid, ts, args }) => {
                rec.entry_event(row, who(tid), rec.from_monotonic(ts), &args)
            }
            Some(FromAgent::Return {
                row,
                tid,
                ts,
                retval,
            }) => rec.ret_event(row, who(tid), rec.from_monotonic(ts), retval),
            Some(FromAgent::Dropped(n)) => rec.set_dropped(n),
            Some(FromAgent::HitPath(row, jump)) => set_hit_path(rec, row, jump),
            Some(FromAgent::Hello) => {
                // The process ran `exec`: the new image's agent counts
                // from 0 and waits for the plan.
                for (b, l) in self.bases.iter_mut().zip(&mut self.last) {
                    *b = b.plus(&std::mem::take(l));
                }
                let _ = (&*sock).write_all(self.plan_text.as_bytes());
            }
            Some(FromAgent::Refused(row, why)) => eprintln!(
                "rcu-trace: warning: {}: {why} (in the image process {pid} exec'd)",
                self.labels.get(row).map_or("?", String::as_str)
            ),
            Some(FromAgent::Bye) => return true,
            _ => {}
        }
        false
    }

    fn wait_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            use std::os::unix::process::ExitStatusExt;
            if let Ok(st) = c.wait() {
                self.status = match (st.code(), st.signal()) {
                    (Some(c), _) => Some(ExitStatus::Code(c)),
                    (None, Some(s)) => Some(ExitStatus::Signal(s)),
                    _ => None,
                };
            }
        }
    }
}

/// Sets `fd` inheritable (or not) across `exec`.
fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_SETFD on a descriptor the caller owns; no memory passed.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    match r {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

impl Engine for InprocessEngine {
    fn name(&self) -> &'static str {
        "inprocess"
    }

    fn start(
        &mut self,
        plan: &Plan,
        recorder: &Arc<Recorder>,
        target: Target,
    ) -> Result<(Vec<i32>, Vec<String>), EngineError> {
        let mut cmd = match target {
            Target::Spawn(cmd) => cmd,
            Target::Attach(pids) => return self.inject(plan, recorder, &pids),
        };
        let what = cmd.get_program().to_string_lossy().into_owned();
        let err = |m: String| EngineError::new(format!("{what}: {m}"));
        let (mine, theirs) = UnixStream::pair().map_err(|e| err(e.to_string()))?;
        let fd = theirs.as_raw_fd();
        let mut preload = OsString::from(&self.agent);
        if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
            preload.push(":");
            preload.push(old);
        }
        cmd.env("LD_PRELOAD", preload).env(FD_ENV, fd.to_string());
        // SAFETY: the closure only calls fcntl (async-signal-safe) between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || set_cloexec(fd, false));
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError {
                message: format!("{what}: command not found"),
                exit_code: 127,
                ptrace_may_serve: false,
            },
            _ => err(e.to_string()),
        })?;
        drop(theirs);
        self.pid = child.id() as i32;
        self.child = Some(child);
        self.handshake(plan, recorder, mine, &err)
    }

    fn run(&mut self) -> Result<Ending, String> {
        self.serve()
    }

    fn exit_status(&self, pid: i32) -> Option<ExitStatus> {
        (pid == self.pid).then_some(self.status).flatten()
    }
}

impl InprocessEngine {
    /// `-p PID`: makes the process load the agent over ptrace
    /// (`load_library`, then detached) and call its start function with
    /// the path of a socket listened on here; then as for a command.
    fn inject(
        &mut self,
        plan: &Plan,
        recorder: &Arc<Recorder>,
        pids: &[i32],
    ) -> Result<(Vec<i32>, Vec<String>), EngineError> {
        let &[pid] = pids else {
            return Err(EngineError::new(
                "--engine inprocess takes one -p PID (the ptrace engine takes several)".into(),
            ));
        };
        let err = |m: String| EngineError::new(format!("process {pid}: {m}"));
        static N: AtomicI32 = AtomicI32::new(0);
        // Relaxed: a counter for unique names.
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("rcu-trace-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let arg = path.to_string_lossy().into_owned();
        let loaded = load_library(pid, &self.agent, Some(("rcu_trace_agent_start", &arg)));
        let accepted = match loaded {
            Ok(l) if l.init_returned == Some(0) => {
                listener.set_nonblocking(false).ok();
                listener
                    .accept()
                    .map(|(s, _)| s)
                    .map_err(|e| err(e.to_string()))
            }
            Ok(_) => Err(err(format!(
                "the agent could not connect to {}",
                path.display()
            ))),
            Err(e) => Err(EngineError {
                ptrace_may_serve: true,
                ..err(format!("loading the agent: {e}"))
            }),
        };
        let _ = std::fs::remove_file(&path);
        let sock = accepted?;
        self.pid = pid;
        self.handshake(plan, recorder, sock, &err)
    }

    /// Sends the plan and reads the answers up to ready.
    fn handshake(
        &mut self,
        plan: &Plan,
        recorder: &Arc<Recorder>,
        mine: UnixStream,
        err: &dyn Fn(String) -> EngineError,
    ) -> Result<(Vec<i32>, Vec<String>), EngineError> {
        let mut plan_text = ToAgent::Options {
            events: recorder.wants_events(),
            args: crate::record::MAX_ARGS,
            jump: self.jump,
        }
        .line();
        for (row, p) in plan.probes.iter().enumerate() {
            let path = p.path.to_string_lossy().into_owned();
            for (key, func) in &p.keys {
                plan_text.push_str(
                    &ToAgent::Probe(PlannedProbe {
                        row,
                        spec: p.spec,
                        ret: p.kind == Kind::Return,
                        func: *func,
                        offset: key.offset,
                        path: path.clone(),
                    })
                    .line(),
                );
            }
        }
        plan_text.push_str(&ToAgent::Go.line());
        self.plan_text = plan_text.clone();
        self.labels = plan.probes.iter().map(|p| p.label.clone()).collect();
        self.bases = vec![Summary::default(); plan.probes.len()];
        self.last = vec![Summary::default(); plan.probes.len()];
        let mut w = mine.try_clone().map_err(|e| err(e.to_string()))?;
        // A program that exits before reading (or never loads the agent)
        // closes its end: the write or the reads below see it.
        let _ = w.write_all(plan_text.as_bytes());
        let mut reader = BufReader::new(mine.try_clone().map_err(|e| err(e.to_string()))?);
        let mut refused = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).unwrap_or(0);
            if n == 0 || FromAgent::parse(line.trim_end_matches('\n')) == Some(FromAgent::Bye) {
                // The agent never answered: kill what runs (it would run
                // untraced) and say why.
                if let Some(c) = self.child.as_mut() {
                    let _ = c.kill();
                }
                self.wait_child();
                return Err(match refused.is_empty() {
                    true => err(
                        "the agent did not start in it (a static or set-user-id program, or LD_PRELOAD \
                         refused?): try --engine ptrace"
                            .into(),
                    ),
                    false => EngineError {
                        ptrace_may_serve: true,
                        ..EngineError::new(refused.join("; "))
                    },
                });
            }
            match FromAgent::parse(line.trim_end_matches('\n')) {
                Some(FromAgent::Ready) => break,
                Some(FromAgent::HitPath(row, jump)) => set_hit_path(recorder, row, jump),
                Some(FromAgent::Refused(row, why)) => refused.push(format!(
                    "{}: {why}",
                    plan.probes.get(row).map_or("?", |p| p.label.as_str())
                )),
                _ => {}
            }
        }
        self.sock = Some(mine);
        self.reader = Some(reader);
        self.recorder = Some(Arc::clone(recorder));
        Ok((vec![self.pid], Vec::new()))
    }

    /// Serves what the agent sends until its goodbye, the end of the
    /// socket, or a termination signal (then `q` and the goodbye).
    fn serve(&mut self) -> Result<Ending, String> {
        let (Some(sock), Some(mut reader), Some(rec)) =
            (self.sock.take(), self.reader.take(), self.recorder.clone())
        else {
            return Err("not started".into());
        };
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // Relaxed: stored before the handlers are installed (sigaction
        // orders it for them).
        WAKE.store(fds[1], Ordering::Relaxed);
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction is valid; the handler only does
            // async-signal-safe work; `prev` receives the old disposition.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                let mut prev: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, &sa, &mut prev);
                old.push((sig, prev));
            }
        }
        let mut quit_sent = false;
        let mut line = String::new();
        let mut ending = Ending::Ended;
        loop {
            let mut pfd = [
                libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: fds[0],
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if reader.buffer().is_empty() {
                // SAFETY: `pfd` holds two valid pollfds.
                unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
            } else {
                pfd[0].revents = libc::POLLIN;
            }
            if pfd[1].revents != 0 && !quit_sent {
                // Relaxed: read after the pipe said it came.
                let sig = SIGNAL.load(Ordering::Relaxed);
                ending = Ending::Terminated(sig);
                let _ = (&sock).write_all(ToAgent::Quit.line().as_bytes());
                quit_sent = true;
            }
            if pfd[0].revents != 0 {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if self.line(line.trim_end_matches('\n'), &rec, &sock) {
                            break;
                        }
                    }
                }
            }
        }
        for (sig, prev) in old {
            // SAFETY: puts back the disposition saved above.
            unsafe { libc::sigaction(sig, &prev, std::ptr::null_mut()) };
        }
        // SAFETY: the pipe's two descriptors, ours, closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        drop(reader);
        drop(sock);
        match ending {
            // The program runs on; not waited for.
            Ending::Terminated(_) => drop(self.child.take()),
            Ending::Ended => self.wait_child(),
        }
        Ok(ending)
    }
}

/// Records the agent's answer for one install of a probe: its hits trap,
/// or jump to a detour. A probe says `jump` only if every answer for it
/// (each key, each image after an `exec`) did: one trap answer stays.
fn set_hit_path(rec: &Recorder, row: usize, jump: bool) {
    if let Some(r) = rec.rows().get(row) {
        if !jump {
            r.set_hit_path(HitPath::Trap);
        } else if r.hit_path() != HitPath::Trap {
            r.set_hit_path(HitPath::Jump);
        }
    }
}
