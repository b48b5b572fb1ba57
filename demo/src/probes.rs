//! Phase 2: live probes on the demo's own functions.
//!
//! # What runs
//!
//! The functions of the [workload](crate::work) are found by name in the
//! executable's own ELF symbol table (`Live::global().symbols()`). Each
//! target gets two probes at its first instruction, which share one
//! breakpoint (one site):
//!
//! - a **kprobe** whose pre handler counts its own runs;
//! - a **kretprobe** whose entry handler stores the entry time in the
//!   call's instance data and whose return handler records the time from
//!   entry to return in a [`Histogram`].
//!
//! Then the worker threads start, a table refreshes with every probe's hits,
//! missed hits and latency percentiles, and when the time is up the workers
//! stop and every probe is unregistered in one batch: `unregister_nosync`
//! for each, then one `commit()` (one grace period for all).
//!
//! # The check
//!
//! The workers count their own calls exactly, and the probes went in before
//! the workers started and came out after they stopped, so for every
//! target: kprobe hits = pre handler runs = kretprobe entries = return
//! handler runs = latencies recorded = calls, with nothing missed and no
//! call still in flight. Afterwards the functions' bytes must be exactly as
//! before, the registry empty, every call's result correct, and a call
//! after `commit()` must hit nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
use iced_x86::{Decoder, DecoderOptions};
use rcu_registry::probes::kprobe::{Action, EntryAction, Kprobe, Kretprobe};
use rcu_registry::probes::runtime::{Live, LiveRegistry};
use rcu_registry::probes::ProbeError;

use crate::histogram::{fmt_ns, Histogram, SPARK_COLS, SPARK_LABEL};
use crate::view::View;
use crate::work::{Func, Workload, FUNCS};
use crate::ProbeOptions;

/// Bytes of each function compared before and after (the longest x86
/// instruction is 15 bytes; a breakpoint is one, or one 4-byte word on
/// arm64).
const SNAPSHOT_BYTES: u64 = 32;
/// Kretprobe instances beyond two per worker. A worker has at most one call
/// of a probed function in flight (none calls another), so `2 x workers + 8`
/// is headroom, and the check can demand that no call goes untracked.
const SPARE_INSTANCES: usize = 8;

/// Data a kretprobe keeps per call: when the call entered.
type EntryTime = Option<Instant>;

/// One probed function and its two probes.
struct Probed {
    func: Func,
    addr: u64,
    before: Vec<u8>,
    kprobe: Kprobe,
    pre_runs: Arc<AtomicU64>,
    kretprobe: Kretprobe<EntryTime>,
    returns: Arc<AtomicU64>,
    latency: Arc<Histogram>,
}

impl Probed {
    fn new(func: Func, addr: u64, size: u64, maxactive: usize) -> Result<Probed, ProbeError> {
        let pre_runs = Arc::new(AtomicU64::new(0));
        let runs = Arc::clone(&pre_runs);
        let kprobe = Kprobe::symbol(func.symbol(), 0)
            .pre(move |_probe, _regs| {
                // Relaxed: a counter read after `commit`, which orders it.
                runs.fetch_add(1, Ordering::Relaxed);
                Action::Continue
            })
            .build();
        let returns = Arc::new(AtomicU64::new(0));
        let latency = Arc::new(Histogram::new());
        let (rets, lat) = (Arc::clone(&returns), Arc::clone(&latency));
        let kretprobe = Kretprobe::symbol(func.symbol(), 0)
            .data::<EntryTime>()
            .maxactive(maxactive)
            .entry_handler(|entered, _regs| {
                // clock_gettime through the vDSO: async-signal-safe.
                *entered = Some(Instant::now());
                EntryAction::Track
            })
            .handler(move |entered, _regs, _ret| {
                if let Some(t) = entered.take() {
                    lat.record(t.elapsed().as_nanos() as u64);
                }
                // Relaxed: as `pre_runs`.
                rets.fetch_add(1, Ordering::Relaxed);
            })
            .build()?;
        Ok(Probed {
            func,
            addr,
            before: code(addr, size.min(SNAPSHOT_BYTES)),
            kprobe,
            pre_runs,
            kretprobe,
            returns,
            latency,
        })
    }

    fn missed(&self) -> u64 {
        // The kretprobe's count includes its entry probe's misses.
        self.kprobe.nmissed() + self.kretprobe.nmissed()
    }
}

/// The `n` bytes at `addr`, read while no probe is being written.
fn code(addr: u64, n: u64) -> Vec<u8> {
    (0..n)
        .map(|i| {
            // SAFETY: `[addr, addr + n)` lies inside a function of this
            // executable (its symbol's extent), mapped readable for the life
            // of the process; callers read only while no probe is being
            // registered or unregistered, so no write races with the read.
            unsafe { std::ptr::read_volatile((addr + i) as *const u8) }
        })
        .collect()
}

/// The first instruction at `addr` (mnemonic and length).
#[cfg(target_arch = "x86_64")]
fn first_instruction(bytes: &[u8], addr: u64) -> String {
    let mut decoder = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    let insn = decoder.decode();
    let len = insn.len();
    format!(
        "{} ({len} byte{})",
        format!("{:?}", insn.mnemonic()).to_lowercase(),
        if len == 1 { "" } else { "s" }
    )
}

/// The first instruction at `addr` (its word, and how a probe there
/// completes it: the arm64 backend's classification).
#[cfg(target_arch = "aarch64")]
fn first_instruction(bytes: &[u8], addr: u64) -> String {
    use rcu_registry::probes::arch::{Arm64, InsnClass};
    let Some(word) = bytes.first_chunk::<4>().map(|w| u32::from_le_bytes(*w)) else {
        return "(unreadable)".to_string();
    };
    let how = match Arm64.classify(addr, word) {
        Ok(InsnClass::Emulated(e)) => format!("simulated: {e:?}"),
        Ok(InsnClass::OutOfLine) => "runs out of line".to_string(),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("refused: {e}"),
    };
    format!("{word:#010x} (4 bytes, {how})")
}

/// Runs the phase; `true` when its check passed.
pub fn run(opts: &ProbeOptions) -> bool {
    println!(
        "== phase 2: live probes: {} worker threads, {:.1} s, targets {}",
        opts.threads,
        opts.duration.as_secs_f64(),
        opts.targets
            .iter()
            .map(|f| f.short())
            .collect::<Vec<_>>()
            .join(",")
    );
    let t0 = Instant::now();
    let live = Live::global();
    let symbols = live.symbols();
    println!(
        "symbols: {} functions from {} objects, loaded in {} ms",
        symbols.functions().len(),
        symbols.objects().len(),
        t0.elapsed().as_millis()
    );
    let maxactive = 2 * opts.threads + SPARE_INSTANCES;
    let mut probed = Vec::new();
    for &func in &opts.targets {
        let Some(f) = symbols.function(&func.symbol()) else {
            println!(
                "error: `{}` is not in the executable's symbol table (stripped binary?)",
                func.symbol()
            );
            return false;
        };
        match Probed::new(func, f.start, f.size, maxactive) {
            Ok(p) => {
                println!(
                    "  {:<22} {:#x}, {:>4} bytes, first instruction {}",
                    f.name,
                    f.start,
                    f.size,
                    first_instruction(&p.before, f.start)
                );
                probed.push(p);
            }
            Err(e) => {
                println!("error: building the probes of {}: {e}", func.symbol());
                return false;
            }
        }
    }

    // The workload's set-up calls (the checksum table) happen before any
    // probe goes in: they are neither counted nor hit.
    let workload = Workload::new(opts.threads);
    let reg = live.registry();
    let t0 = Instant::now();
    if let Err(e) = register_all(reg, &probed) {
        println!("error: {e}");
        return false;
    }
    println!(
        "registered {} probes on {} sites by symbol in {} µs",
        reg.len(),
        reg.sites().len(),
        t0.elapsed().as_micros()
    );
    for site in reg.sites() {
        let name = probed
            .iter()
            .find(|p| p.addr == site.addr)
            .map_or_else(|| "?".to_string(), |p| p.func.symbol());
        let how = match site.slot {
            Some(slot) => format!("runs out of line in XOL slot {slot:#x}"),
            None => "is emulated".to_string(),
        };
        println!(
            "  site {:#x} {name}: {} probes, its first instruction {how}",
            site.addr,
            site.probes.len()
        );
    }

    let handles = workload.start();
    let mut view = View::new();
    let start = Instant::now();
    let mut last = (Instant::now(), 0u64);
    while start.elapsed() < opts.duration {
        thread::sleep(view.period().min(opts.duration));
        let calls = workload.calls();
        let total: u64 = calls.iter().sum();
        let rate = (total - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), total);
        let rows: Vec<String> = probed.iter().map(|p| row(p, &calls)).collect();
        let xol = live.xol_stats();
        let status = format!(
            "{:.1} s of {:.1} s · {:.0} calls/s · {} XOL slots in use · RCU routing table replaced {} times",
            start.elapsed().as_secs_f64(),
            opts.duration.as_secs_f64(),
            rate,
            xol.in_use,
            workload.republished()
        );
        view.refresh(start.elapsed(), &header(), &rows, &status);
    }
    workload.stop();
    for h in handles {
        h.join().expect("workload thread panicked");
    }

    let t0 = Instant::now();
    let batch = unregister_all(reg, &probed);
    let took = t0.elapsed();
    match batch {
        Ok(n) => println!(
            "unregistered {n} probes in one batch (unregister_nosync x{n} + one commit) in {} µs",
            took.as_micros()
        ),
        Err(e) => {
            println!("error: unregistering: {e}");
            return false;
        }
    }
    summary(live, &probed, &workload)
}

fn header() -> Vec<String> {
    vec![format!(
        "{:<20} {:>10} {:>11} {:>10} {:>6} {:>8} {:>8} {:>8} {:>8}  {:<SPARK_COLS$}",
        "function",
        "calls",
        "kprobe hits",
        "returns",
        "missed",
        "p50",
        "p90",
        "p99",
        "max",
        SPARK_LABEL
    )]
}

fn row(p: &Probed, calls: &[u64; FUNCS]) -> String {
    let lat = p.latency.snapshot();
    let q = |x| lat.quantile(x).map_or_else(|| "-".into(), fmt_ns);
    format!(
        "{:<20} {:>10} {:>11} {:>10} {:>6} {:>8} {:>8} {:>8} {:>8}  {}",
        p.func.symbol(),
        calls[p.func.index()],
        p.kprobe.hits(),
        // Relaxed: a statistics snapshot.
        p.returns.load(Ordering::Relaxed),
        p.missed(),
        q(0.50),
        q(0.90),
        q(0.99),
        fmt_ns(lat.max()),
        lat.sparkline()
    )
}

/// Registers every probe; on an error unregisters those already in and
/// returns the error.
fn register_all(reg: &LiveRegistry, probed: &[Probed]) -> Result<(), String> {
    let mut done: Vec<&Kprobe> = Vec::new();
    for p in probed {
        let failed = match reg.register(&p.kprobe) {
            Err(e) => Some(("kprobe", e)),
            Ok(()) => {
                done.push(&p.kprobe);
                match reg.register(&p.kretprobe) {
                    Err(e) => Some(("kretprobe", e)),
                    Ok(()) => {
                        done.push(p.kretprobe.probe());
                        None
                    }
                }
            }
        };
        if let Some((what, e)) = failed {
            let undo = match reg.unregister_many(&done) {
                Ok(()) => String::new(),
                Err(u) => format!(" (and undoing the others: {u})"),
            };
            return Err(format!(
                "registering the {what} on {}: {e}{undo}",
                p.func.symbol()
            ));
        }
    }
    Ok(())
}

/// Unregisters every probe in one batch: `unregister_nosync` each, then one
/// `commit`. Returns how many.
fn unregister_all(reg: &LiveRegistry, probed: &[Probed]) -> Result<usize, ProbeError> {
    let mut n = 0;
    let mut result = Ok(());
    for p in probed {
        for probe in [&p.kprobe, p.kretprobe.probe()] {
            match reg.unregister_nosync(probe) {
                Ok(()) => n += 1,
                Err(e) => result = Err(e),
            }
        }
    }
    // Always commit what was taken out, even after an error: the handlers'
    // counters are read next and must have stopped.
    reg.commit();
    result.map(|()| n)
}

/// Prints the summary and checks every count; `true` when all hold.
fn summary(live: &Live, probed: &[Probed], workload: &Workload) -> bool {
    let reg = live.registry();
    let calls = workload.calls();
    let mut failures: Vec<String> = Vec::new();
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6}  text",
        "function",
        "calls",
        "kp hits",
        "pre runs",
        "kret hits",
        "returns",
        "latencies",
        "missed",
        "flight"
    );
    for p in probed {
        let n = calls[p.func.index()];
        let lat = p.latency.snapshot();
        // Relaxed: `commit` returned, so every handler has finished and its
        // increments happen-before these loads.
        let counts = [
            ("kprobe hits", p.kprobe.hits()),
            ("pre handler runs", p.pre_runs.load(Ordering::Relaxed)),
            ("kretprobe entries", p.kretprobe.probe().hits()),
            ("return handler runs", p.returns.load(Ordering::Relaxed)),
            ("latencies recorded", lat.total()),
        ];
        let restored = code(p.addr, p.before.len() as u64) == p.before;
        println!(
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6}  {}",
            p.func.symbol(),
            n,
            counts[0].1,
            counts[1].1,
            counts[2].1,
            counts[3].1,
            counts[4].1,
            p.missed(),
            p.kretprobe.in_flight(),
            if restored { "restored" } else { "CHANGED" }
        );
        for (what, got) in counts {
            if got != n {
                failures.push(format!("{}: {what} {got} != calls {n}", p.func.short()));
            }
        }
        if p.missed() != 0 {
            failures.push(format!("{}: {} hits missed", p.func.short(), p.missed()));
        }
        if p.kretprobe.in_flight() != 0 {
            failures.push(format!("{}: calls still tracked", p.func.short()));
        }
        if !restored {
            failures.push(format!("{}: bytes differ from before", p.func.short()));
        }
        if n == 0 {
            failures.push(format!("{}: never called", p.func.short()));
        }
    }
    let unprobed: Vec<String> = Func::ALL
        .iter()
        .filter(|f| !probed.iter().any(|p| p.func == **f))
        .map(|f| format!("{} {}", f.short(), calls[f.index()]))
        .collect();
    if !unprobed.is_empty() {
        println!("not probed (calls): {}", unprobed.join(", "));
    }
    println!(
        "latency from entry to return, all probed calls: {}",
        probed
            .iter()
            .map(|p| {
                let s = p.latency.snapshot();
                let q = |x| s.quantile(x).map_or_else(|| "-".into(), fmt_ns);
                format!("{} p50 {} p99 {}", p.func.short(), q(0.5), q(0.99))
            })
            .collect::<Vec<_>>()
            .join("; ")
    );

    // After commit: no probe left, no hit on a call, right results.
    let hits_before: Vec<u64> = probed.iter().map(|p| p.kprobe.hits()).collect();
    let results_ok = workload.call_each_uncounted();
    let hits_after: Vec<u64> = probed.iter().map(|p| p.kprobe.hits()).collect();
    if hits_after != hits_before {
        failures.push("a call after commit() was still hit".into());
    }
    if !results_ok {
        failures.push("a function returned a wrong result after unregistration".into());
    }
    if workload.errors() != 0 {
        failures.push(format!(
            "{} calls returned wrong results under probes",
            workload.errors()
        ));
    }
    if !reg.is_empty() || reg.pending() != 0 {
        failures.push(format!(
            "registry not empty after commit: {} registered, {} pending",
            reg.len(),
            reg.pending()
        ));
    }
    let xol = live.xol_stats();
    println!(
        "registry empty: {}; XOL slots: {} allocated, {} returned so far, {} in use; {} wrong results; RCU routing table replaced {} times",
        reg.is_empty(),
        xol.allocs,
        xol.frees,
        xol.in_use,
        workload.errors(),
        workload.republished()
    );
    if failures.is_empty() {
        println!(
            "probe check: ok (hits = handler runs = returns = calls for every probe, nothing missed, text restored)"
        );
        true
    } else {
        for f in &failures {
            println!("probe check: FAILED: {f}");
        }
        false
    }
}
