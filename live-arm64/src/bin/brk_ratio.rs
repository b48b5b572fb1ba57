//! Probe hit cost against a raw breakpoint round trip, in the same run
//! (issue 16's benchmark: under emulation only the ratio means anything).
//!
//! `cargo run -p live-arm64 --release --bin brk_ratio --target
//! aarch64-unknown-linux-gnu` (after sourcing scripts/arm64-env): measures
//! nanoseconds per call for a raw `brk` whose handler only steps over it,
//! and for a live kprobe on a simulated `b` (one trap per hit), on an
//! `add` run from its XOL slot boosted (one trap: the copy jumps back with
//! `b`), and on the same `add` single-stepped because the probe has a post
//! handler (two traps: the probe's `brk`, then the step marker after the
//! copy), each minus a call of the unprobed function. Fifteen rounds of 5,000 calls, each measuring all
//! three back to back, so a round's ratios compare figures taken within a
//! few milliseconds (the shared machine's load moves between rounds);
//! prints the median of the per-round ratios and their range.

#[cfg(target_arch = "aarch64")]
fn main() {
    use live_arm64::raw_trap::{trap_once, with_raw_trap};
    use live_arm64::targets::{addr, la_add1, la_branch};
    use rcu_registry::probes::kprobe::{Action, Kprobe};
    use rcu_registry::probes::runtime::Live;
    use std::time::Instant;

    const N: u32 = 5_000;
    const ROUNDS: usize = 15;
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..N {
            f();
        }
        t.elapsed().as_nanos() as f64 / f64::from(N)
    };
    let call = |f: unsafe extern "C" fn(u32) -> u32| {
        // SAFETY: complete C-ABI functions.
        std::hint::black_box(unsafe { f(std::hint::black_box(1)) });
    };
    let reg = Live::global().registry();
    let mut rows: Vec<[f64; 4]> = Vec::new();
    for _ in 0..ROUNDS {
        let (raw, traps) = with_raw_trap(|| time(&trap_once));
        assert_eq!(traps, u64::from(N));
        let mut hit = [0.0; 3];
        let variants = [
            (la_branch as unsafe extern "C" fn(u32) -> u32, false),
            (la_add1, false),
            (la_add1, true),
        ];
        for (k, (f, post)) in variants.into_iter().enumerate() {
            let bare = time(&|| call(f));
            let b = Kprobe::at(addr(f as *const ())).pre(|_, _| Action::Continue);
            let p = if post {
                b.post(|_, _| {}).build()
            } else {
                b.build()
            };
            reg.register(&p).expect("register");
            hit[k] = time(&|| call(f)) - bare;
            reg.unregister(&p).expect("unregister");
            assert_eq!(p.hits(), u64::from(N));
        }
        rows.push([raw, hit[0], hit[1], hit[2]]);
    }
    // (median, min, max) over the rounds.
    let stat = |f: &dyn Fn(&[f64; 4]) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (raw, raw_lo, raw_hi) = stat(&|r| r[0]);
    let (sim, sim_lo, sim_hi) = stat(&|r| r[1] / r[0]);
    let (boost, boost_lo, boost_hi) = stat(&|r| r[2] / r[0]);
    let (step, step_lo, step_hi) = stat(&|r| r[3] / r[0]);
    // The least-disturbed figure of each kind: on a shared machine the
    // load only ever adds time, so the minima over the rounds are the
    // closest to the undisturbed costs (their ratio is reported beside the
    // median of ratios, not instead of it).
    let least = |k: usize| rows.iter().map(|r| r[k]).fold(f64::INFINITY, f64::min);
    println!(
        "ratios of the per-kind minima: simulated b {:.2}, boosted add {:.2}, stepped add {:.2}",
        least(1) / least(0),
        least(2) / least(0),
        least(3) / least(0)
    );
    println!("raw brk round trip: median {raw:.0} ns ({raw_lo:.0}..{raw_hi:.0}), {ROUNDS} rounds");
    println!("hit / raw, simulated b:          median {sim:.2} ({sim_lo:.2}..{sim_hi:.2})");
    println!("hit / raw, boosted add:          median {boost:.2} ({boost_lo:.2}..{boost_hi:.2})");
    println!(
        "hit / raw, stepped add, 2 traps: median {step:.2} ({step_lo:.2}..{step_hi:.2}), \
         {:.2} per trap",
        step / 2.0
    );
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    println!("skipped: brk_ratio measures arm64 code; run it cross-built under qemu-aarch64");
}
