//! The agent's conversation with `rcu-trace`: text lines over one Unix
//! stream socket (a `socketpair` whose agent end the spawned command
//! inherits, its number in [`FD_ENV`]).
//!
//! ```text
//! tracer -> agent    o EVENTS ARGS JUMP       options: stream events? args read?
//!                                             jump-optimize (trap-free hits)?
//!                    p ROW SPEC e|r FUNC OFF PATH   a probe (FUNC: entry offset or -)
//!                    g                        register them all, now
//!                    q                        unregister everything, say goodbye
//! agent -> tracer    h                        hello: an agent started (first, and
//!                                             again after each exec of the process)
//!                    k ROW                    registered
//!                    n ROW WHY                refused (nothing is registered then)
//!                    j ROW 0|1                its hits trap (0) or are trap-free
//!                                             (1: jump-optimized; sent before r)
//!                    r                        every probe in place: main may run
//!                    c ROW CALLS RETURNS UNMATCHED LOST MAX BUCKETS
//!                                             a probe's counters (BUCKETS: i:n,...
//!                                             or - for a probe without latencies)
//!                    e ROW TID TS A0..A5      an entry (TS: CLOCK_MONOTONIC ns)
//!                    x ROW TID TS RETVAL      a return
//!                    d N                      N events dropped so far (ring full)
//!                    b                        final counts sent: goodbye (also after
//!                                             refusals: the process waits to be killed)
//! ```
//!
//! Closing the socket means `q` to the agent; to the tracer, the end of
//! the counts (the last `c` lines sent are the totals). An agent's counts
//! start at 0: after a `h` the tracer sends the plan again and adds what
//! the image before the `exec` counted to what the new one sends.

use std::io::Write;

use crate::stats::{Counters, Snapshot, Summary, BUCKETS};

/// The environment variable naming the agent's socket descriptor.
pub const FD_ENV: &str = "RCU_TRACE_AGENT_FD";

/// Integer arguments an entry event carries.
pub const ARGS: usize = 6;

/// One probe of the plan, as the agent gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedProbe {
    /// Its row in the tracer's table.
    pub row: usize,
    /// Its spec (one consumer, one batch per spec).
    pub spec: usize,
    /// A uretprobe.
    pub ret: bool,
    /// The enclosing function's entry offset, if known.
    pub func: Option<u64>,
    /// The probed instruction's file offset.
    pub offset: u64,
    /// The file.
    pub path: String,
}

/// A line to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToAgent {
    /// Stream events (entries and returns) or not; arguments to read.
    Options {
        /// Stream them.
        events: bool,
        /// How many integer arguments to read (0..=6).
        args: usize,
        /// Jump-optimize the probes (trap-free hits) where the runtime
        /// can.
        jump: bool,
    },
    /// One probe.
    Probe(PlannedProbe),
    /// Register everything.
    Go,
    /// Unregister everything and say goodbye.
    Quit,
}

/// A line from the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FromAgent {
    /// An agent started and waits for the plan.
    Hello,
    /// A probe registered.
    Registered(usize),
    /// A probe refused, why.
    Refused(usize, String),
    /// A registered probe's hits are trap-free (jump-optimized) or trap.
    HitPath(usize, bool),
    /// Everything in place.
    Ready,
    /// A probe's counters.
    Counts(usize, Summary),
    /// An entry.
    Entry {
        /// The probe's row.
        row: usize,
        /// The thread.
        tid: i32,
        /// `CLOCK_MONOTONIC`, ns.
        ts: u64,
        /// Its first integer arguments.
        args: [u64; ARGS],
    },
    /// A return.
    Return {
        /// The probe's row.
        row: usize,
        /// The thread.
        tid: i32,
        /// `CLOCK_MONOTONIC`, ns.
        ts: u64,
        /// The return value.
        retval: u64,
    },
    /// Events dropped so far.
    Dropped(u64),
    /// The last counts have been sent.
    Bye,
}

impl ToAgent {
    /// The line, with its newline.
    pub fn line(&self) -> String {
        match self {
            ToAgent::Options { events, args, jump } => {
                format!("o {} {args} {}\n", u8::from(*events), u8::from(*jump))
            }
            ToAgent::Probe(PlannedProbe {
                row,
                spec,
                ret,
                func,
                offset,
                path,
            }) => format!(
                "p {row} {spec} {} {} {offset} {path}\n",
                if *ret { 'r' } else { 'e' },
                func.map_or("-".to_string(), |f| f.to_string())
            ),
            ToAgent::Go => "g\n".into(),
            ToAgent::Quit => "q\n".into(),
        }
    }

    /// Reads a line (without its newline); `None` if it is not one.
    pub fn parse(line: &str) -> Option<ToAgent> {
        let mut f = line.splitn(2, ' ');
        let (tag, rest) = (f.next()?, f.next().unwrap_or(""));
        Some(match tag {
            "o" => {
                let mut w = rest.split(' ');
                ToAgent::Options {
                    events: w.next()? == "1",
                    args: w.next()?.parse::<usize>().ok()?.min(ARGS),
                    jump: w.next()? == "1",
                }
            }
            "p" => {
                let mut w = rest.splitn(6, ' ');
                let row = w.next()?.parse().ok()?;
                let spec = w.next()?.parse().ok()?;
                let ret = w.next()? == "r";
                let func = match w.next()? {
                    "-" => None,
                    f => Some(f.parse().ok()?),
                };
                let offset = w.next()?.parse().ok()?;
                let path = w.next()?.to_string();
                ToAgent::Probe(PlannedProbe {
                    row,
                    spec,
                    ret,
                    func,
                    offset,
                    path,
                })
            }
            "g" => ToAgent::Go,
            "q" => ToAgent::Quit,
            _ => return None,
        })
    }
}

/// Writes a `c` line: `head` is row, calls, returns, unmatched, lost and
/// max; `buckets` the latency buckets that are not 0 (`None`: no latency).
/// Writes straight into `w`: nothing allocated for a writer that does not.
fn write_counts_parts<W: Write>(
    w: &mut W,
    head: [u64; 6],
    buckets: Option<impl Iterator<Item = (usize, u64)>>,
) -> std::io::Result<()> {
    write!(w, "c")?;
    for v in head {
        write!(w, " {v}")?;
    }
    match buckets {
        None => w.write_all(b" -\n"),
        Some(it) => {
            let mut first = true;
            for (i, n) in it {
                write!(w, "{}{i}:{n}", if first { " " } else { "," })?;
                first = false;
            }
            w.write_all(if first { b" :\n" } else { b"\n" })
        }
    }
}

/// Writes row `row`'s `c` line from its counters as they are now, without
/// allocating (what [`FromAgent::Counts`] of their summary would say).
///
/// # Errors
/// As `w`'s writes.
pub fn write_counts<W: Write>(w: &mut W, row: usize, c: &Counters) -> std::io::Result<()> {
    let max = c.latency().map_or(0, |h| h.max());
    let head = [
        row as u64,
        c.calls(),
        c.returns(),
        c.unmatched(),
        c.lost(),
        max,
    ];
    let buckets = c.latency().map(|h| {
        (0..BUCKETS)
            .map(|i| (i, h.bucket(i)))
            .filter(|&(_, n)| n > 0)
    });
    write_counts_parts(w, head, buckets)
}

/// Writes an event's line (`e` or `x`) without allocating.
///
/// # Errors
/// As `w`'s writes.
pub fn write_event<W: Write>(w: &mut W, e: &crate::ring::Event) -> std::io::Result<()> {
    if e.ret {
        return writeln!(w, "x {} {} {} {}", e.row, e.tid, e.ts, e.vals[0]);
    }
    write!(w, "e {} {} {}", e.row, e.tid, e.ts)?;
    for a in e.vals {
        write!(w, " {a}")?;
    }
    w.write_all(b"\n")
}

impl FromAgent {
    /// The line, with its newline.
    pub fn line(&self) -> String {
        match self {
            FromAgent::Hello => "h\n".into(),
            FromAgent::Registered(row) => format!("k {row}\n"),
            FromAgent::Refused(row, why) => format!("n {row} {}\n", why.replace('\n', " ")),
            FromAgent::HitPath(row, jump) => format!("j {row} {}\n", u8::from(*jump)),
            FromAgent::Ready => "r\n".into(),
            FromAgent::Counts(row, s) => {
                let mut v = Vec::new();
                let buckets = s
                    .latency
                    .as_ref()
                    .map(|h| h.counts.iter().copied().enumerate().filter(|&(_, n)| n > 0));
                let max = s.latency.as_ref().map_or(0, |h| h.max);
                let head = [*row as u64, s.calls, s.returns, s.unmatched, s.lost, max];
                write_counts_parts(&mut v, head, buckets).expect("a Vec takes it");
                String::from_utf8(v).expect("ASCII")
            }
            FromAgent::Entry { row, tid, ts, args } => {
                let a: Vec<String> = args.iter().map(u64::to_string).collect();
                format!("e {row} {tid} {ts} {}\n", a.join(" "))
            }
            FromAgent::Return {
                row,
                tid,
                ts,
                retval,
            } => format!("x {row} {tid} {ts} {retval}\n"),
            FromAgent::Dropped(n) => format!("d {n}\n"),
            FromAgent::Bye => "b\n".into(),
        }
    }

    /// Reads a line (without its newline); `None` if it is not one.
    pub fn parse(line: &str) -> Option<FromAgent> {
        let mut w = line.split(' ');
        let tag = w.next()?;
        let mut num = || w.next()?.parse::<u64>().ok();
        Some(match tag {
            "h" => FromAgent::Hello,
            "k" => FromAgent::Registered(num()? as usize),
            "n" => {
                let mut f = line.splitn(3, ' ');
                f.next();
                let row = f.next()?.parse().ok()?;
                FromAgent::Refused(row, f.next().unwrap_or("").to_string())
            }
            "j" => {
                let row = num()? as usize;
                FromAgent::HitPath(row, num()? == 1)
            }
            "r" => FromAgent::Ready,
            "c" => {
                let row = num()? as usize;
                let (calls, returns, unmatched, lost, max) =
                    (num()?, num()?, num()?, num()?, num()?);
                let latency = match w.next()? {
                    "-" => None,
                    b => {
                        let mut counts = vec![0u64; BUCKETS];
                        for pair in b.split(',').filter(|p| *p != ":") {
                            let (i, n) = pair.split_once(':')?;
                            *counts.get_mut(i.parse::<usize>().ok()?)? = n.parse().ok()?;
                        }
                        Some(Snapshot { counts, max })
                    }
                };
                FromAgent::Counts(
                    row,
                    Summary {
                        calls,
                        returns,
                        unmatched,
                        lost,
                        latency,
                    },
                )
            }
            "e" => {
                let (row, tid, ts) = (num()? as usize, num()? as i32, num()?);
                let mut args = [0u64; ARGS];
                for a in &mut args {
                    *a = num()?;
                }
                FromAgent::Entry { row, tid, ts, args }
            }
            "x" => FromAgent::Return {
                row: num()? as usize,
                tid: num()? as i32,
                ts: num()?,
                retval: num()?,
            },
            "d" => FromAgent::Dropped(num()?),
            "b" => FromAgent::Bye,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_written_in_place_read_back_as_their_summary() {
        for ret in [false, true] {
            let c = Counters::new(ret, 4);
            c.entry(0, 0x1000, 10);
            c.ret(0, 0x1008, 250);
            c.ret(0, 0x2008, 300);
            let mut v = Vec::new();
            write_counts(&mut v, 7, &c).unwrap();
            let line = String::from_utf8(v).unwrap();
            assert_eq!(line, FromAgent::Counts(7, c.summary()).line());
            assert_eq!(
                FromAgent::parse(line.trim_end()),
                Some(FromAgent::Counts(7, c.summary()))
            );
        }
    }

    #[test]
    fn every_line_reads_back_as_itself() {
        let mut h = Snapshot {
            counts: vec![0; BUCKETS],
            max: 900,
        };
        h.counts[3] = 7;
        h.counts[80] = 2;
        let from = [
            FromAgent::Hello,
            FromAgent::Registered(3),
            FromAgent::Refused(2, "no such thing".into()),
            FromAgent::HitPath(2, true),
            FromAgent::HitPath(0, false),
            FromAgent::Ready,
            FromAgent::Counts(1, Summary::default()),
            FromAgent::Counts(
                1,
                Summary {
                    calls: 9,
                    returns: 9,
                    unmatched: 1,
                    lost: 0,
                    latency: Some(h),
                },
            ),
            FromAgent::Counts(
                0,
                Summary {
                    latency: Some(Snapshot {
                        counts: vec![0; BUCKETS],
                        max: 0,
                    }),
                    ..Summary::default()
                },
            ),
            FromAgent::Entry {
                row: 1,
                tid: 77,
                ts: 5,
                args: [1, 2, 3, u64::MAX, 5, 6],
            },
            FromAgent::Return {
                row: 1,
                tid: 77,
                ts: 6,
                retval: u64::MAX,
            },
            FromAgent::Dropped(4),
            FromAgent::Bye,
        ];
        for m in from {
            let l = m.line();
            assert_eq!(FromAgent::parse(l.trim_end_matches('\n')), Some(m), "{l}");
        }
        let to = [
            ToAgent::Options {
                events: true,
                args: 2,
                jump: true,
            },
            ToAgent::Options {
                events: false,
                args: 0,
                jump: false,
            },
            ToAgent::Probe(PlannedProbe {
                row: 4,
                spec: 1,
                ret: true,
                func: Some(16),
                offset: 16,
                path: "/a dir/lib x.so".into(),
            }),
            ToAgent::Probe(PlannedProbe {
                row: 0,
                spec: 0,
                ret: false,
                func: None,
                offset: 99,
                path: "/bin/true".into(),
            }),
            ToAgent::Go,
            ToAgent::Quit,
        ];
        for m in to {
            let l = m.line();
            assert_eq!(ToAgent::parse(l.trim_end_matches('\n')), Some(m), "{l}");
        }
    }
}
