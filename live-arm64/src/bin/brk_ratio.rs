//! Probe hit cost against a raw breakpoint round trip, in the same run
//! (issue 16's benchmark: under emulation only the ratio means anything).
//!
//! `cargo run -p live-arm64 --release --bin brk_ratio --target
//! aarch64-unknown-linux-gnu` (after sourcing scripts/arm64-env): prints
//! nanoseconds per call for a raw `brk` whose handler only steps over it,
//! and for a live kprobe with an empty pre handler on a simulated `b` (one
//! trap per hit) and on a stepped `add` (two traps: the probe's `brk`, then
//! the step marker after the copy in the XOL slot), each minus a call of
//! the unprobed function, and the ratios. Three rounds; the medians.

#[cfg(target_arch = "aarch64")]
fn main() {
    use live_arm64::raw_trap::{trap_once, with_raw_trap};
    use live_arm64::targets::{addr, la_add1, la_branch};
    use rcu_registry::probes::kprobe::{Action, Kprobe};
    use rcu_registry::probes::runtime::Live;
    use std::time::Instant;

    const N: u32 = 20_000;
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
    let mut rows: Vec<[f64; 3]> = Vec::new();
    for _ in 0..3 {
        let (raw, traps) = with_raw_trap(|| time(&trap_once));
        assert_eq!(traps, u64::from(N));
        let mut hit = [0.0; 2];
        for (k, f) in [la_branch as unsafe extern "C" fn(u32) -> u32, la_add1]
            .into_iter()
            .enumerate()
        {
            let bare = time(&|| call(f));
            let p = Kprobe::at(addr(f as *const ()))
                .pre(|_, _| Action::Continue)
                .build();
            reg.register(&p).expect("register");
            hit[k] = time(&|| call(f)) - bare;
            reg.unregister(&p).expect("unregister");
            assert_eq!(p.hits(), u64::from(N));
        }
        rows.push([raw, hit[0], hit[1]]);
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (raw, sim, step) = (median(0), median(1), median(2));
    println!("raw brk round trip:           {raw:9.0} ns");
    println!(
        "probe hit, simulated b:       {sim:9.0} ns  ratio {:.2}",
        sim / raw
    );
    println!(
        "probe hit, stepped add (2 traps): {step:5.0} ns  ratio {:.2} ({:.2} per trap)",
        step / raw,
        step / raw / 2.0
    );
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    println!("skipped: brk_ratio measures arm64 code; run it cross-built under qemu-aarch64");
}
