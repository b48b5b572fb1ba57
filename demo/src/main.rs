//! The main job: RCU domains at work, then live probes on running code.
//!
//! # Phase 1: RCU domains
//!
//! Readers on every core, updaters retiring versioned objects, a sleeping
//! `Srcu` reader; a table of read rates, grace periods and callbacks; a
//! check that every retired object was freed exactly once and that no reader
//! saw a freed one (`demo/rcu_phase.rs`).
//!
//! # Phase 2: live probes
//!
//! Worker threads call four `#[inline(never)]` functions of this program
//! (`demo::work::{parse, checksum, sort, lookup}`); a kprobe and a
//! kretprobe go on each, placed by symbol name resolved from the process's
//! own ELF symbol table; a table refreshes with hits, missed hits and the
//! entry-to-return latency percentiles; then all probes are unregistered in
//! one batch and the demo checks that the hits counted equal the calls the
//! workers made (`demo/probes.rs`, `demo/work.rs`).
//!
//! The run ends with `check: OK` (exit 0) or `check: FAILED` (exit 1).
//!
//! ```text
//! ./scripts/demo [--secs S --threads N --targets parse,sort
//!                 --readers N --updaters N --no-probes --no-rcu]
//! ```

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod histogram;
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod probes;
mod rcu_phase;
mod view;
mod work;

use std::time::Duration;

use rcu_phase::RcuOptions;
use work::Func;

/// Seconds each phase runs by default: both phases plus set-up take about
/// 6 to 7 seconds.
const DEFAULT_SECS: f64 = 3.0;

const USAGE: &str = "usage: demo [--secs S] [--threads N] [--targets parse,checksum,sort,lookup]
            [--readers N] [--updaters N] [--no-probes] [--no-rcu]

  --secs S        seconds each phase runs (default 3; fractions allowed)
  --threads N     probe phase: worker threads (default: cores, at least 2)
  --targets LIST  probe phase: functions to probe (default: all four)
  --readers N     RCU phase: reader threads (default: cores)
  --updaters N    RCU phase: updater threads (default 2)
  --no-probes     run only the RCU phase
  --no-rcu        run only the probe phase";

/// Settings of the probe phase.
pub struct ProbeOptions {
    /// How long the workload runs under the probes.
    pub duration: Duration,
    /// Worker threads.
    pub threads: usize,
    /// Functions to probe.
    pub targets: Vec<Func>,
}

struct Options {
    rcu: Option<RcuOptions>,
    probes: Option<ProbeOptions>,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("error: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn parse_options() -> Options {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut secs = DEFAULT_SECS;
    let mut threads = cores.max(2);
    let mut targets = Func::ALL.to_vec();
    let (mut readers, mut updaters) = (cores, 2);
    let (mut rcu, mut probes) = (true, true);

    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .unwrap_or_else(|| usage_error(&format!("{flag} needs {what}")))
        };
        let count = |v: String, min: usize| match v.parse::<usize>() {
            Ok(n) if n >= min => n,
            _ => usage_error(&format!("{flag} needs a whole number >= {min}, not `{v}`")),
        };
        match flag.as_str() {
            "--secs" => {
                let v = value("a number of seconds");
                secs = match v.parse::<f64>() {
                    Ok(s) if s > 0.0 && s.is_finite() => s,
                    _ => usage_error(&format!("--secs needs a positive number, not `{v}`")),
                };
            }
            "--threads" => threads = count(value("a thread count"), 1),
            "--readers" => readers = count(value("a thread count"), 0),
            "--updaters" => updaters = count(value("a thread count"), 1),
            "--targets" => {
                let v = value("a comma-separated list");
                targets = Vec::new();
                for name in v.split(',').filter(|n| !n.is_empty()) {
                    match Func::from_name(name) {
                        Some(f) if !targets.contains(&f) => targets.push(f),
                        Some(_) => {}
                        None => usage_error(&format!("unknown target `{name}`")),
                    }
                }
                if targets.is_empty() {
                    usage_error("--targets needs at least one function");
                }
            }
            "--no-probes" => probes = false,
            "--no-rcu" => rcu = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => usage_error(&format!("unknown argument `{other}`")),
        }
    }
    if !rcu && !probes {
        usage_error("--no-probes and --no-rcu leave nothing to run");
    }
    let duration = Duration::from_secs_f64(secs);
    Options {
        rcu: rcu.then_some(RcuOptions {
            duration,
            readers,
            updaters,
        }),
        probes: probes.then_some(ProbeOptions {
            duration,
            threads,
            targets,
        }),
    }
}

fn main() {
    let opts = parse_options();
    println!("rcu-registry demo");
    let mut ok = true;
    if let Some(rcu) = &opts.rcu {
        ok &= rcu_phase::run(rcu);
        println!();
    }
    if let Some(p) = &opts.probes {
        #[cfg(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        ))]
        {
            ok &= probes::run(p);
        }
        #[cfg(not(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        )))]
        println!(
            "== phase 2 skipped: live probes need x86_64 or arm64 Linux ({} targets asked for)",
            p.targets.len()
        );
        println!();
    }
    println!("check: {}", if ok { "OK" } else { "FAILED" });
    if !ok {
        std::process::exit(1);
    }
}
