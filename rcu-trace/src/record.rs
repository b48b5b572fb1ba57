//! What an engine reports at each hit, and where it goes: the per-probe
//! counters and latencies ([`crate::stats`]), the printed events (`--args`,
//! `--retval`, `--limit`) and the Chrome trace (`--trace-out`).
//!
//! Engine-neutral: an engine calls [`Recorder::entry`] and
//! [`Recorder::ret`] with the probe's row, the address space, the traced
//! thread and the values it read. Counting allocates nothing and takes no
//! lock; an event printed is formatted into a buffer on the stack and
//! written with one `write`; a trace event is formatted into a buffered
//! writer whose buffer was allocated up front, under a lock taken only
//! when `--trace-out` is given.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::resolve::{Plan, Probe};
use crate::spec::Kind;
use crate::stats::{Counters, Histogram};

/// Most integer arguments `--args` prints (the x86_64 registers).
pub const MAX_ARGS: usize = 6;

/// Buckets of each uretprobe's table of calls in flight (8 ways each):
/// 2,048 calls in flight per function, 32 KiB.
const PENDING_BUCKETS: usize = 256;

/// Trace output buffered before each `write`.
const TRACE_BUFFER: usize = 1 << 20;

/// The traced thread a hit belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thread {
    /// Its process.
    pub pid: i32,
    /// The thread itself.
    pub tid: i32,
}

/// What to print and record besides the counts.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Print the first N integer arguments of each call (0: none).
    pub args: usize,
    /// Print each uretprobe's return value.
    pub retval: bool,
    /// Stop printing events after this many.
    pub limit: Option<u64>,
    /// Events as JSON lines on standard output (else text on standard
    /// error).
    pub json: bool,
}

/// One probe's counters.
pub struct Row {
    /// The probe.
    pub probe: Probe,
    /// Its name as a JSON string, quotes included (written into events
    /// without allocating).
    json_label: String,
    /// Calls, returns, latencies: counted here (ptrace) or mirrored from
    /// the agent's (in-process).
    pub counters: Counters,
    /// How its hits reach the counters ([`HitPath`] as a byte).
    hit_path: AtomicU8,
}

/// How a probe's hits reach its counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HitPath {
    /// A ptrace stop in the tracer (the ptrace engine).
    Stop = 0,
    /// A trap in the target, served by the agent (in-process).
    Trap = 1,
    /// A jump to a detour in the target, no trap (in-process,
    /// jump-optimized).
    Jump = 2,
}

impl HitPath {
    /// Its name in `--json` (`"hit"`).
    pub fn name(self) -> &'static str {
        match self {
            HitPath::Stop => "ptrace-stop",
            HitPath::Trap => "trap",
            HitPath::Jump => "jump",
        }
    }
}

impl Row {
    /// How its hits reach the counters.
    pub fn hit_path(&self) -> HitPath {
        // Relaxed: a label set by the engine before the run's counts.
        match self.hit_path.load(Ordering::Relaxed) {
            1 => HitPath::Trap,
            2 => HitPath::Jump,
            _ => HitPath::Stop,
        }
    }

    /// Says how its hits reach the counters (the in-process engine, from
    /// the agent's answer).
    pub fn set_hit_path(&self, path: HitPath) {
        // Relaxed: see `hit_path`.
        self.hit_path.store(path as u8, Ordering::Relaxed);
    }

    /// Calls seen.
    pub fn calls(&self) -> u64 {
        self.counters.calls()
    }

    /// Returns seen.
    pub fn returns(&self) -> u64 {
        self.counters.returns()
    }

    /// Returns without a latency: their entry time was dropped or not seen.
    pub fn unmatched(&self) -> u64 {
        self.counters.unmatched()
    }

    /// Entry-to-return times (uretprobes).
    pub fn latency(&self) -> Option<&Histogram> {
        self.counters.latency()
    }

    /// Entries whose time was dropped (a full bucket).
    pub fn lost(&self) -> u64 {
        self.counters.lost()
    }
}

/// The Chrome trace being written (`--trace-out`): a JSON array of trace
/// events, closed by [`Recorder::finish`].
struct TraceOut {
    out: Mutex<(BufWriter<File>, bool)>,
    failed: AtomicBool,
}

/// `CLOCK_MONOTONIC` now, in ns (what [`Instant`] reads on Linux, and the
/// agent's clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where an engine's hits go.
pub struct Recorder {
    rows: Vec<Row>,
    start: Instant,
    /// `start` on `CLOCK_MONOTONIC`, in ns: the clock of the agent's
    /// event times.
    start_mono: u64,
    opts: Options,
    printed: AtomicU64,
    /// Events an agent dropped (its ring was full).
    dropped: AtomicU64,
    trace: Option<TraceOut>,
}

/// Formats into a fixed buffer on the stack (no allocation); what does not
/// fit is cut.
struct StackLine {
    buf: [u8; 512],
    len: usize,
}

impl StackLine {
    fn new() -> StackLine {
        StackLine {
            buf: [0; 512],
            len: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for StackLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `ns` as microseconds with three decimals (what Chrome traces count in).
struct Micros(u64);

impl std::fmt::Display for Micros {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// `ns` as seconds with six decimals (the time of a printed event).
struct Secs(u64);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{:06}",
            self.0 / 1_000_000_000,
            self.0 / 1000 % 1_000_000
        )
    }
}

impl Recorder {
    /// Counters for every probe of `plan`; the trace file, if given, is
    /// created now (before any target is touched).
    ///
    /// # Errors
    /// The trace file cannot be created.
    pub fn new(plan: &Plan, opts: Options, trace: Option<File>) -> std::io::Result<Recorder> {
        let rows = plan
            .probes
            .iter()
            .map(|p| {
                let ret = p.kind == Kind::Return;
                Row {
                    json_label: serde_json::to_string(&p.label).expect("a string serializes"),
                    probe: p.clone(),
                    counters: Counters::new(ret, PENDING_BUCKETS),
                    hit_path: AtomicU8::new(HitPath::Stop as u8),
                }
            })
            .collect();
        let trace = match trace {
            Some(f) => {
                let mut w = BufWriter::with_capacity(TRACE_BUFFER, f);
                w.write_all(b"[\n")?;
                Some(TraceOut {
                    out: Mutex::new((w, true)),
                    failed: AtomicBool::new(false),
                })
            }
            None => None,
        };
        Ok(Recorder {
            rows,
            start: Instant::now(),
            start_mono: monotonic_ns(),
            opts,
            printed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            trace,
        })
    }

    /// Whether events are wanted (printed or traced): an agent streams
    /// them only then.
    pub fn wants_events(&self) -> bool {
        self.opts.args > 0 || self.opts.retval || self.trace.is_some()
    }

    /// Events the agent dropped so far (its ring was full), as it says.
    pub fn set_dropped(&self, n: u64) {
        // Relaxed: a statistic.
        self.dropped.store(n, Ordering::Relaxed);
    }

    /// Events dropped before they reached the recorder (in-process engine).
    pub fn dropped(&self) -> u64 {
        // Relaxed: a statistic.
        self.dropped.load(Ordering::Relaxed)
    }

    /// The probes' counters, in plan order.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Nanoseconds since the recorder was made.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// A call of probe `row` entered in address space `space` (any id
    /// unique among the spaces traced at once), on thread `who`, with the
    /// stack pointer `sp` at the probed instruction and `args` its first
    /// integer arguments (as many as the engine read: at least
    /// `Options::args`).
    pub fn entry(&self, row: usize, space: u64, who: Thread, sp: u64, args: &[u64]) {
        let Some(r) = self.rows.get(row) else {
            return;
        };
        let now = self.now_ns();
        r.counters.entry(space, sp, now);
        self.entry_event(row, who, now, args);
    }

    /// `CLOCK_MONOTONIC` time `mono` (ns) as the recorder's time (ns since
    /// it was made): an agent's event times.
    pub fn from_monotonic(&self, mono: u64) -> u64 {
        mono.saturating_sub(self.start_mono)
    }

    /// The output of an entry (printed event, trace event) without its
    /// counting: an entry counted elsewhere (by the agent), at `now` (ns
    /// since the recorder was made).
    pub fn entry_event(&self, row: usize, who: Thread, now: u64, args: &[u64]) {
        let Some(r) = self.rows.get(row) else {
            return;
        };
        if let Some(t) = &self.trace {
            let ph = if r.counters.timed() {
                "B"
            } else {
                "i\",\"s\":\"t"
            };
            self.trace_event(t, r, ph, who, now, None);
        }
        if self.opts.args > 0 && self.may_print() {
            let n = self.opts.args.min(args.len());
            let mut line = StackLine::new();
            let _ = if self.opts.json {
                write!(
                    line,
                    "{{\"type\":\"entry\",\"probe\":{},\"pid\":{},\"tid\":{},\"ts_ns\":{now},\"args\":[",
                    r.json_label, who.pid, who.tid
                )
            } else {
                write!(
                    line,
                    "{:>10} {}/{} {}(",
                    Secs(now),
                    who.pid,
                    who.tid,
                    r.probe.label
                )
            };
            for (i, a) in args[..n].iter().enumerate() {
                let _ = match (i, self.opts.json) {
                    (0, true) => write!(line, "{a}"),
                    (_, true) => write!(line, ",{a}"),
                    (0, false) => write!(line, "{a:#x}"),
                    (_, false) => write!(line, ", {a:#x}"),
                };
            }
            let _ = line.write_all(if self.opts.json { b"]}\n" } else { b")\n" });
            self.emit(&line);
        }
    }

    /// A call of probe `row` returned in `space` on thread `who`, with the
    /// stack pointer `sp` after the return and the return value `retval`.
    pub fn ret(&self, row: usize, space: u64, who: Thread, sp: u64, retval: u64) {
        let Some(r) = self.rows.get(row) else {
            return;
        };
        let now = self.now_ns();
        r.counters.ret(space, sp, now);
        self.ret_event(row, who, now, retval);
    }

    /// The output of a return without its counting (see
    /// [`entry_event`](Self::entry_event)).
    pub fn ret_event(&self, row: usize, who: Thread, now: u64, retval: u64) {
        let Some(r) = self.rows.get(row) else {
            return;
        };
        if let Some(t) = &self.trace {
            self.trace_event(t, r, "E", who, now, Some(retval));
        }
        if self.opts.retval && self.may_print() {
            let mut line = StackLine::new();
            let _ = if self.opts.json {
                writeln!(
                    line,
                    "{{\"type\":\"return\",\"probe\":{},\"pid\":{},\"tid\":{},\"ts_ns\":{now},\"retval\":{}}}",
                    r.json_label, who.pid, who.tid, retval as i64
                )
            } else {
                writeln!(
                    line,
                    "{:>10} {}/{} {} = {} ({retval:#x})",
                    Secs(now),
                    who.pid,
                    who.tid,
                    r.probe.label,
                    retval as i64
                )
            };
            self.emit(&line);
        }
    }

    /// Whether one more event may be printed (`--limit`); says so once
    /// when the limit is reached.
    fn may_print(&self) -> bool {
        // Relaxed: a statistic that caps output; nothing is published.
        let n = self.printed.fetch_add(1, Ordering::Relaxed);
        match self.opts.limit {
            Some(limit) if n == limit && !self.opts.json => {
                let _ = std::io::stderr()
                    .write_all(b"rcu-trace: --limit reached: no more events printed\n");
                false
            }
            Some(limit) => n < limit,
            None => true,
        }
    }

    /// Writes one event line, whole.
    fn emit(&self, line: &StackLine) {
        let _ = match self.opts.json {
            true => std::io::stdout().lock().write_all(line.bytes()),
            false => std::io::stderr().lock().write_all(line.bytes()),
        };
    }

    fn trace_event(
        &self,
        t: &TraceOut,
        r: &Row,
        ph: &str,
        who: Thread,
        now: u64,
        retval: Option<u64>,
    ) {
        let mut g = t.out.lock().unwrap_or_else(|p| p.into_inner());
        let (w, first) = &mut *g;
        let sep = if *first { "" } else { ",\n" };
        *first = false;
        let mut res = write!(
            w,
            "{sep}{{\"name\":{},\"cat\":\"{}\",\"ph\":\"{ph}\",\"pid\":{},\"tid\":{},\"ts\":{}",
            r.json_label,
            r.probe.kind.prefix(),
            who.pid,
            who.tid,
            Micros(now)
        );
        if let Some(v) = retval {
            res = res.and_then(|()| write!(w, ",\"args\":{{\"retval\":{}}}", v as i64));
        }
        if res.and_then(|()| w.write_all(b"}")).is_err() {
            // Relaxed: written and read (in `finish`) under `out`'s lock,
            // which orders them; the atomic only makes the type Sync.
            t.failed.store(true, Ordering::Relaxed);
        }
    }

    /// Closes the trace file (the JSON array's `]`) and flushes it.
    ///
    /// # Errors
    /// A write to it failed, now or at a hit.
    pub fn finish(&self) -> std::io::Result<()> {
        let Some(t) = &self.trace else {
            return Ok(());
        };
        let mut g = t.out.lock().unwrap_or_else(|p| p.into_inner());
        g.0.write_all(b"\n]\n")?;
        g.0.flush()?;
        // Relaxed: pairs with the store in `trace_event` through `out`'s
        // lock, held here.
        if t.failed.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("a trace event could not be written"));
        }
        Ok(())
    }
}
