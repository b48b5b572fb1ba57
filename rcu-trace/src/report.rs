//! What a person or a program reads: the live table (once a second), the
//! summary at the end, and the JSON objects of `--json`.

use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::record::{Recorder, Row};
use crate::stats::Snapshot;

/// Columns of the small histogram.
const HIST_COLUMNS: u32 = 12;
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// `ns` for a person: `850ns`, `12.5µs`, `3.20ms`, `1.05s`.
pub fn human_ns(ns: u64) -> String {
    let f = ns as f64;
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{:.1}µs", f / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}ms", f / 1e6),
        _ => format!("{:.2}s", f / 1e9),
    }
}

/// The histogram's window: `HIST_COLUMNS` powers of two from the smallest
/// one any row has values in.
fn window(snaps: &[Option<Snapshot>]) -> Option<(u32, u32)> {
    let lo = snaps
        .iter()
        .flatten()
        .filter_map(|s| {
            let per = s.per_power(0, 63);
            per.iter().position(|&c| c > 0).map(|p| p as u32)
        })
        .min()?;
    Some((lo, (lo + HIST_COLUMNS - 1).min(63)))
}

fn sparkline(s: &Snapshot, (lo, hi): (u32, u32)) -> String {
    let per = s.per_power(lo, hi);
    let top = per.iter().copied().max().unwrap_or(0);
    per.iter()
        .map(|&c| match c {
            0 => '·',
            _ => BARS[((c * 8 - 1) / top.max(1)).min(7) as usize],
        })
        .collect()
}

/// Which rows a table shows: those with calls (all of them if none has
/// any), at most `max` of them (those with the most calls), in plan
/// order; and how many are left out.
fn shown_rows(rows: &[Row], max: Option<usize>) -> (Vec<usize>, usize) {
    let mut shown: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].calls() > 0).collect();
    if shown.is_empty() {
        shown = (0..rows.len()).collect();
    }
    if let Some(max) = max {
        if shown.len() > max {
            shown.sort_by_key(|&i| std::cmp::Reverse(rows[i].calls()));
            shown.truncate(max);
            shown.sort_unstable();
        }
    }
    let left_out = rows.len() - shown.len();
    (shown, left_out)
}

/// The table's lines: a header, one line per probe shown (those with
/// calls; at most `max_rows`, the busiest) and, if some are left out, a
/// line that says how many. `rates`: each row's calls per second, if
/// known.
pub fn table(
    rec: &Recorder,
    rates: Option<&[f64]>,
    elapsed: Duration,
    max_rows: Option<usize>,
) -> Vec<String> {
    let (shown, left_out) = shown_rows(rec.rows(), max_rows);
    let all = rec.rows();
    let rows: Vec<&Row> = shown.iter().map(|&i| &all[i]).collect();
    let width = rows
        .iter()
        .map(|r| r.probe.label.chars().count())
        .max()
        .unwrap_or(5)
        .clamp(8, 60);
    let snaps: Vec<Option<Snapshot>> = rows
        .iter()
        .map(|r| r.latency().map(|h| h.snapshot()))
        .collect();
    let win = window(&snaps);
    let hist_head = match win {
        Some((lo, hi)) => format!(
            "{}..{}",
            human_ns(1u64 << lo),
            human_ns(1u64.checked_shl(hi + 1).unwrap_or(u64::MAX))
        ),
        None => String::new(),
    };
    let mut out = vec![format!(
        "{:>6} {:<width$} {:>10} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8}  {hist_head}",
        "", "probe", "calls", "rate/s", "returns", "p50", "p90", "p99", "max"
    )];
    for (i, (&r, snap)) in rows.iter().zip(&snaps).enumerate() {
        let time = if i == 0 {
            format!("{:.1}s", elapsed.as_secs_f64())
        } else {
            String::new()
        };
        let rate = match rates {
            Some(rs) => format!("{:.0}", rs.get(shown[i]).copied().unwrap_or(0.0)),
            None => format!("{:.0}", r.calls() as f64 / elapsed.as_secs_f64().max(1e-9)),
        };
        // A long label keeps its end (the function), cut at the front.
        let n = r.probe.label.chars().count();
        let label: String = match n > width {
            true => std::iter::once('…')
                .chain(r.probe.label.chars().skip(n - width + 1))
                .collect(),
            false => r.probe.label.clone(),
        };
        let (pct, hist) = match (snap, win) {
            (Some(s), Some(w)) if s.total() > 0 => {
                let p = |q| human_ns(s.percentile(q).unwrap_or(0));
                (
                    format!(
                        "{:>8} {:>8} {:>8} {:>8}",
                        p(0.5),
                        p(0.9),
                        p(0.99),
                        human_ns(s.max)
                    ),
                    sparkline(s, w),
                )
            }
            _ => (
                format!("{:>8} {:>8} {:>8} {:>8}", "", "", "", ""),
                String::new(),
            ),
        };
        let returns = match r.latency() {
            Some(_) => r.returns().to_string(),
            None => String::new(),
        };
        out.push(format!(
            "{time:>6} {label:<width$} {:>10} {rate:>9} {returns:>10} {pct}  {hist}",
            r.calls()
        ));
    }
    if left_out > 0 {
        let busy = all.iter().filter(|r| r.calls() > 0).count() - busy_shown(&rows);
        let s = if left_out == 1 { "" } else { "s" };
        out.push(match busy {
            0 => format!("{:>6} ({left_out} more probe{s} not shown: no calls)", ""),
            b => format!(
                "{:>6} ({left_out} more probe{s} not shown: {b} with fewer calls, {} with none)",
                "",
                left_out - b
            ),
        });
    }
    out
}

/// How many of `rows` have calls.
fn busy_shown(rows: &[&Row]) -> usize {
    rows.iter().filter(|r| r.calls() > 0).count()
}

/// The terminal's size on standard error (rows, columns), if it is one.
fn terminal_size() -> Option<(usize, usize)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the valid pointer.
    let r = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row.into(), ws.ws_col.into()))
}

/// The live table, drawn by a thread of its own once a second until
/// [`LiveTable::stop`].
pub struct LiveTable {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// The bottom lines of a terminal kept for the table: the lines above
/// scroll as usual (a scrolling region), so what the traced program writes
/// to the same terminal is never drawn over.
struct Pinned {
    rows: usize,
    cols: usize,
    /// Lines kept at the bottom.
    height: usize,
}

impl Pinned {
    /// Keeps `height` lines (at most half the screen) at the bottom of a
    /// `rows` x `cols` terminal.
    fn open(rows: usize, cols: usize, height: usize) -> Pinned {
        let height = height.clamp(2, (rows / 2).max(2));
        // Make room (the lines above move up), come back, then limit
        // scrolling to the lines above; setting the region homes the
        // cursor, so it is saved and restored around it.
        let text = format!(
            "{}\x1b[{height}A\x1b7\x1b[1;{}r\x1b8",
            "\n".repeat(height),
            rows - height
        );
        let _ = std::io::stderr().write_all(text.as_bytes());
        Pinned { rows, cols, height }
    }

    /// Draws `lines` into the kept lines (cut to fit), the cursor left
    /// where the program's output goes on.
    fn draw(&self, lines: &[String]) {
        let mut text = String::from("\x1b7");
        for i in 0..self.height {
            let row = self.rows - self.height + 1 + i;
            let line: String = lines
                .get(i)
                .map(|l| l.chars().take(self.cols.saturating_sub(1)).collect())
                .unwrap_or_default();
            text.push_str(&format!("\x1b[{row};1H\x1b[2K{line}"));
        }
        text.push_str("\x1b8");
        let _ = std::io::stderr().write_all(text.as_bytes());
    }

    /// Clears the kept lines and gives the whole screen back to scrolling.
    fn close(self) {
        self.draw(&[]);
        let _ = std::io::stderr().write_all(b"\x1b7\x1b[r\x1b8");
    }
}

impl LiveTable {
    /// Starts drawing on standard error: pinned to the bottom of the
    /// screen when `terminal` (see `Pinned`), else as a block of lines
    /// each second.
    pub fn start(rec: Arc<Recorder>, terminal: bool) -> LiveTable {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut last = (Instant::now(), vec![0u64; rec.rows().len()]);
            // Header, a line per probe, and the "more" line.
            let pinned = terminal
                .then(terminal_size)
                .flatten()
                .filter(|&(rows, cols)| rows >= 6 && cols >= 20)
                .map(|(rows, cols)| Pinned::open(rows, cols, rec.rows().len() + 2));
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_secs(1))
            {
                let now = Instant::now();
                let calls: Vec<u64> = rec.rows().iter().map(Row::calls).collect();
                let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
                let rates: Vec<f64> = calls
                    .iter()
                    .zip(&last.1)
                    .map(|(&c, &l)| c.saturating_sub(l) as f64 / dt)
                    .collect();
                last = (now, calls);
                match &pinned {
                    Some(p) => {
                        // Header and "more" line around the busiest rows.
                        let max_rows = p.height.saturating_sub(2).max(1);
                        p.draw(&table(&rec, Some(&rates), start.elapsed(), Some(max_rows)));
                    }
                    None => {
                        let mut text = String::new();
                        for l in table(&rec, Some(&rates), start.elapsed(), None) {
                            text.push_str(&l);
                            text.push('\n');
                        }
                        let _ = std::io::stderr().lock().write_all(text.as_bytes());
                    }
                }
            }
            if let Some(p) = pinned {
                p.close();
            }
        });
        LiveTable { stop, thread }
    }

    /// Stops drawing (a table pinned to the screen is erased).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Latency percentiles in ns, as `--json` writes them.
#[derive(Debug, Serialize)]
pub struct LatencyJson {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// One probe's summary, as `--json` writes it.
#[derive(Debug, Serialize)]
pub struct ProbeJson<'a> {
    /// `"probe"`.
    #[serde(rename = "type")]
    pub kind_of_object: &'static str,
    /// The probe's name (`uretprobe:libc:strtol`).
    pub probe: &'a str,
    /// The spec it comes from.
    pub spec: &'a str,
    /// `uprobe` or `uretprobe`.
    pub kind: &'static str,
    /// The function, if known.
    pub function: Option<&'a str>,
    /// The file.
    pub path: String,
    /// File offset of the probed instruction.
    pub offset: u64,
    /// Calls.
    pub calls: u64,
    /// How its hits were served: `ptrace-stop` (the ptrace engine),
    /// `trap` or `jump` (in-process: a trap, or a jump-optimized site
    /// without one).
    pub hit: &'static str,
    /// Returns (uretprobes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub returns: Option<u64>,
    /// Entry-to-return times (uretprobes; `null` when no return was
    /// timed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ns: Option<Option<LatencyJson>>,
    /// Returns without a timed entry (uretprobes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untimed_returns: Option<u64>,
}

/// The summary objects of `--json`, one per probe.
pub fn probes_json(rec: &Recorder, specs: &[crate::spec::Spec]) -> Vec<String> {
    rec.rows()
        .iter()
        .map(|r| {
            let p = &r.probe;
            let lat = r.latency().map(|h| {
                let s = h.snapshot();
                s.percentile(0.5).map(|p50| LatencyJson {
                    p50,
                    p90: s.percentile(0.9).unwrap_or(0),
                    p99: s.percentile(0.99).unwrap_or(0),
                    max: s.max,
                })
            });
            let ret = r.latency().is_some();
            let obj = ProbeJson {
                kind_of_object: "probe",
                probe: &p.label,
                spec: &specs[p.spec].text,
                kind: p.kind.prefix(),
                function: p.function.as_deref(),
                path: p.path.display().to_string(),
                offset: p.offset,
                calls: r.calls(),
                hit: r.hit_path().name(),
                returns: ret.then(|| r.returns()),
                latency_ns: lat,
                untimed_returns: ret.then(|| r.unmatched()),
            };
            serde_json::to_string(&obj).expect("plain data serializes")
        })
        .collect()
}
