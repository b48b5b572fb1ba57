//! Per-sample results and the end-of-run summary of `benches/rcu.rs`.
//!
//! Every measurement records its ns/op per criterion sample under a key; the
//! summary prints the median of each key and the ratios the design targets.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Records one criterion sample (`elapsed` for `iters` operations) under
/// `key` and hands `elapsed` back to criterion.
pub fn record(key: &str, elapsed: Duration, iters: u64) -> Duration {
    if iters > 0 {
        let ns = elapsed.as_nanos() as f64 / iters as f64;
        SAMPLES
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .push(ns);
    }
    elapsed
}

fn median(key: &str) -> Option<f64> {
    let samples = SAMPLES.lock().unwrap();
    let mut v = samples.get(key)?.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn ratio_line(what: &str, num: &str, den: &str, target: &str, ok: impl Fn(f64) -> bool) {
    match (median(num), median(den)) {
        (Some(a), Some(b)) => {
            let r = a / b;
            let verdict = if ok(r) { "met" } else { "MISSED" };
            println!("  {what:<62} {r:>7.3}x   target {target:<8} {verdict}");
        }
        _ => println!("  {what:<62}   (not measured in this run)"),
    }
}

/// Prints the medians and the ratios against the targets.
pub fn summary() {
    println!("\n== RCU domains: medians of per-sample ns/op ==");
    let samples: Vec<String> = SAMPLES.lock().unwrap().keys().cloned().collect();
    for key in samples {
        let m = median(&key).unwrap();
        if key.ends_with("/grace_periods") {
            println!("  {key:<58} {m:>10.3} grace periods per synchronize() call");
        } else if key.starts_with("call/") {
            println!("  {key:<58} {m:>10.2} ns   ({:.2} M/s)", 1e3 / m);
        } else {
            println!("  {key:<58} {m:>10.2} ns");
        }
    }
    println!("\n== RCU domains: ratios against the targets ==");
    for t in ["1t", "2t"] {
        ratio_line(
            &format!("read pair {t}: Rcu / crossbeam-epoch pin()"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/crossbeam_epoch_pin"),
            "<= 0.15",
            |r| r <= 0.15,
        );
        ratio_line(
            &format!("read pair {t}: Rcu / liburcu-memb"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/liburcu_memb"),
            "<= 1.0",
            |r| r <= 1.0,
        );
        ratio_line(
            &format!("read pair {t}: Srcu / Rcu"),
            &format!("read_pair/{t}/srcu"),
            &format!("read_pair/{t}/rcu"),
            "<= 1.5",
            |r| r <= 1.5,
        );
        ratio_line(
            &format!("read pair {t}: Rcu / arc-swap load()"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/arc_swap_load"),
            "(info)",
            |_| true,
        );
        ratio_line(
            &format!("read pair {t}: Rcu / RwLock::read()"),
            &format!("read_pair/{t}/rcu"),
            &format!("read_pair/{t}/rwlock_read"),
            "(info)",
            |_| true,
        );
    }
    for busy in 0..=2 {
        let target = if busy == 1 { "<= 1.5" } else { "(info)" };
        ratio_line(
            &format!("synchronize, {busy} busy readers: Rcu / liburcu-memb"),
            &format!("synchronize/{busy}/rcu"),
            &format!("synchronize/{busy}/liburcu_memb"),
            target,
            |r| busy != 1 || r <= 1.5,
        );
    }
    ratio_line(
        "synchronize, one slow reader: Rcu / liburcu-memb",
        "synchronize/slow/rcu",
        "synchronize/slow/liburcu_memb",
        "(info)",
        |_| true,
    );
    for group in [
        "concurrent_synchronize",
        "concurrent_synchronize_slow_reader",
    ] {
        for n in [4, 8] {
            ratio_line(
                &format!("{group} {n}: Rcu / liburcu-memb"),
                &format!("{group}/{n}/rcu"),
                &format!("{group}/{n}/liburcu_memb"),
                "(info)",
                |_| true,
            );
        }
    }
    match median("call/rcu_call") {
        Some(ns) => {
            let rate = 1e3 / ns;
            let verdict = if rate >= 5.0 { "met" } else { "MISSED" };
            println!(
                "  {:<54} {rate:>7.2}M/s target >= 5M/s  {verdict}",
                "call() throughput, one thread"
            );
        }
        None => println!("  call() throughput: (not measured in this run)"),
    }
}
