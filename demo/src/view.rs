//! A table that refreshes in place on a terminal and prints plain periodic
//! lines otherwise.
//!
//! # Two modes
//!
//! - **Terminal** (stdout is a TTY): the header and rows are drawn, and each
//!   refresh moves the cursor back up over them (`ESC [ n A`) and redraws
//!   every line after clearing it (`ESC [ 2 K`), several times a second.
//!   Line wrapping is switched off while drawing (`ESC [ ? 7 l`, back on with
//!   `ESC [ ? 7 h`): on a narrow terminal a long line is clipped instead of
//!   taking two rows, which would throw off the count of lines to move up.
//! - **Plain** (a pipe or a file): the header is printed once, then each
//!   refresh appends its rows prefixed with the elapsed time, once a second,
//!   so logs stay short and readable.

use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Refresh period on a terminal.
const TTY_PERIOD: Duration = Duration::from_millis(250);
/// Refresh period into a pipe or file: one block of lines a second.
const PLAIN_PERIOD: Duration = Duration::from_secs(1);

/// A refreshing table on stdout.
pub struct View {
    tty: bool,
    /// Lines drawn by the last terminal refresh (to move back over).
    drawn: usize,
    header_printed: bool,
}

impl View {
    /// A view choosing its mode from whether stdout is a terminal.
    pub fn new() -> View {
        View {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            header_printed: false,
        }
    }

    /// How long to wait between refreshes.
    pub fn period(&self) -> Duration {
        if self.tty {
            TTY_PERIOD
        } else {
            PLAIN_PERIOD
        }
    }

    /// Shows the table: `header` lines, then `rows`, each plain row prefixed
    /// with `elapsed` (plain mode); a terminal also gets `status` under the
    /// rows.
    pub fn refresh(&mut self, elapsed: Duration, header: &[String], rows: &[String], status: &str) {
        let mut out = std::io::stdout().lock();
        // Errors writing to stdout (a closed pipe) are not worth dying for in
        // the middle of the run: the summary and exit code still matter.
        let _ = if self.tty {
            self.draw_tty(&mut out, header, rows, status)
        } else {
            self.draw_plain(&mut out, elapsed, header, rows)
        };
        let _ = out.flush();
    }

    fn draw_tty(
        &mut self,
        out: &mut impl Write,
        header: &[String],
        rows: &[String],
        status: &str,
    ) -> std::io::Result<()> {
        if self.drawn > 0 {
            write!(out, "\x1b[{}A", self.drawn)?;
        }
        write!(out, "\x1b[?7l")?;
        let lines = header.iter().chain(rows).map(String::as_str);
        let lines = lines.chain(std::iter::once(status));
        self.drawn = 0;
        for line in lines {
            writeln!(out, "\x1b[2K{line}")?;
            self.drawn += 1;
        }
        write!(out, "\x1b[?7h")
    }

    fn draw_plain(
        &mut self,
        out: &mut impl Write,
        elapsed: Duration,
        header: &[String],
        rows: &[String],
    ) -> std::io::Result<()> {
        if !self.header_printed {
            for line in header {
                writeln!(out, "       {line}")?;
            }
            self.header_printed = true;
        }
        let t = format!("{:>5.1}s", elapsed.as_secs_f64());
        for (i, row) in rows.iter().enumerate() {
            let prefix = if i == 0 { t.as_str() } else { "" };
            writeln!(out, "{prefix:>6} {row}")?;
        }
        Ok(())
    }
}
