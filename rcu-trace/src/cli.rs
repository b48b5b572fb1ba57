//! The command line (clap's derive API: the field docs are the `--help`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// How hits are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// `inprocess` when its agent is found and the request allows it (a
    /// spawned, dynamically linked command, no -f), else `ptrace`.
    Auto,
    /// An agent library preloaded into the command runs the probes inside
    /// it: a hit is one trap, a few µs, no context switch.
    Inprocess,
    /// The tracer stops the target's thread at each hit (ptrace) and runs
    /// the counting here: any program, no preparation, tens of µs per hit.
    Ptrace,
}

/// When the live table is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Live {
    /// When standard error is a terminal (and no events are printed there).
    Auto,
    /// Every second: pinned to the bottom lines of a terminal (what the
    /// program writes scrolls above it), as blocks of lines elsewhere.
    Always,
    /// Never: only the summary at the end.
    Never,
}

const SPECS_HELP: &str = "\
Probe specs:
  uprobe:PATH:SYMBOL          each call of SYMBOL (its first instruction)
  uprobe:PATH:SYMBOL+OFFSET   the instruction OFFSET bytes into SYMBOL
  uprobe:PATH:0xOFFSET        the instruction at file offset OFFSET (hex)
  uretprobe:PATH:SYMBOL       each call and its return: return values, latencies
  (u: and ur: are short for uprobe: and uretprobe:)

  PATH is a file (anything with a `/`: ./app, /usr/bin/sort) or a bare
  library name found as the dynamic linker finds it (libc.so.6, libz.so.1;
  with -p, among the process's own files first). A bare name without
  `.so` means the library NAME.so.N: `libc` is the C library.
  SYMBOL is a function name (memcpy@@GLIBC_2.14 picks a version) or a glob
  (`*`, `?`, `[a-z]`): uprobe:libc:str* attaches to every matching function
  of the file at once. IFUNC symbols (strlen, memcpy, ... in glibc) are
  resolvers, not the function: they are refused by name and left out of
  globs. `rcu-trace --list PATH[:GLOB]` shows what a glob matches.

Targets:
  rcu-trace SPECS -- CMD ARGS...   run CMD traced; its standard streams are
      rcu-trace's, untouched (rcu-trace writes to standard error, or with
      --json to standard output); rcu-trace exits with CMD's exit status
      (128+N if a signal N killed it, reported on standard error).
  rcu-trace SPECS -p PID [-p PID2]  attach to running processes; they run
      on, every probed byte restored, when rcu-trace ends.

Engines (--engine; the line `... (E engine)` on standard error names it):
  inprocess  the agent librcu_trace_agent.so, LD_PRELOADed into CMD (or,
             with one -p PID, loaded into it over ptrace), runs the probes
             inside it (one trap per hit, no context switch); no -f.
             Loaded over ptrace it refuses malloc, free and the other
             C-library functions the loader's TLS access can reach (the
             refusal names the chain); preloaded it takes them all.
  ptrace     rcu-trace serves each hit over ptrace: any target, -p and -f.
  auto       (default) inprocess for a dynamically linked CMD without -f
             when the agent is found, else ptrace (-p included).

  Ctrl-C (SIGINT), SIGTERM or SIGHUP detach from every target: the probed
  bytes are written back and the targets run on untraced, a spawned CMD
  included (rcu-trace does not wait for it then, and exits 128+N; after
  -p it exits 0). Everything is resolved before any process is started or
  touched: a bad spec, a missing symbol or a process that cannot be traced
  is one line on standard error and a non-zero exit (2 for a spec, 1 for
  a target, 127 for a command not found).

Examples:
  rcu-trace uretprobe:libc:getenv -- ls /
  rcu-trace --list libc:str*
  rcu-trace 'uprobe:libc:str*' uretprobe:./app:parse --json -p 4242
  rcu-trace ur:./app:work --trace-out work.json -- ./app   (open in Perfetto)";

/// A tracer to point at any program: counts, return values and latencies
/// of its functions, by uprobes served inside it (an agent library) or
/// over ptrace.
#[derive(Debug, Parser)]
#[command(name = "rcu-trace", version, after_help = SPECS_HELP)]
pub struct Cli {
    /// Probe specs (see below).
    #[arg(value_name = "SPEC")]
    pub specs: Vec<String>,

    /// List the functions a spec on PATH would attach to (GLOB: all of
    /// them if left out), with their file offsets and sizes, and exit.
    #[arg(long, value_name = "PATH[:GLOB]")]
    pub list: Option<String>,

    /// Attach to this running process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<i32>,

    /// How hits are served. The default, auto, is inprocess for a spawned
    /// dynamically linked command when the agent (librcu_trace_agent.so)
    /// is found and -f is not given, else ptrace (-p PID included: the
    /// agent is injected into a running process only with --engine
    /// inprocess). The line `rcu-trace: N probes in ... (E engine)` on
    /// standard error says which one a run uses.
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    pub engine: EngineKind,

    /// The in-process engine's agent library (else $RCU_TRACE_AGENT, else
    /// librcu_trace_agent.so next to rcu-trace or in its deps/).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,

    /// Keep the in-process engine's probes on the trap path: no jump
    /// optimization (by default a probe whose site the runtime can prove
    /// safe is served by a jump to a detour, without a trap; `--json`'s
    /// `hit` field says which each probe got).
    #[arg(long)]
    pub no_jump: bool,

    /// Trace the children the targets fork too (and what they exec).
    #[arg(short = 'f', long)]
    pub follow_forks: bool,

    /// Machine output: JSON objects, one per line, on standard output
    /// (events as they come, then one object per probe, then an `end`
    /// object).
    #[arg(long)]
    pub json: bool,

    /// Print each call with its first N integer arguments (at most 6).
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=6))]
    pub args: u8,

    /// Print each uretprobe's return value.
    #[arg(long)]
    pub retval: bool,

    /// Print at most N events (--args, --retval); counting goes on.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,

    /// Write every entry and return, with timestamps and thread ids, to
    /// FILE in the Chrome trace event format (Perfetto, chrome://tracing).
    #[arg(long, value_name = "FILE")]
    pub trace_out: Option<PathBuf>,

    /// When to draw the live table (once a second).
    #[arg(long, value_enum, default_value_t = Live::Auto)]
    pub live: Live,

    /// The command to run traced, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}
