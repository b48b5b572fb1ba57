//! A few probe hits of each kind `brk_ratio` times, and a few raw `brk`
//! round trips, for an instruction trace of the trap path under qemu
//! (`scripts/arm64-trap-trace`, which runs this under `qemu-aarch64 -d
//! in_asm,exec,nochain` and counts the guest instructions of each handler
//! run). The same probes as the bench: a simulated `b` (`la_branch`) and a
//! boosted `add` (`la_add1`), each with a pre handler only.
//!
//! Usage: `hit_trace [HITS]` (default 4 of each kind, in this order: raw
//! `brk`, simulated `b`, boosted `add`).

#[cfg(target_arch = "aarch64")]
fn main() {
    use live_arm64::raw_trap::{trap_once, with_raw_trap};
    use live_arm64::targets::{addr, la_add1, la_branch};
    use rcu_registry::probes::kprobe::{Action, Kprobe};
    use rcu_registry::probes::runtime::Live;

    let hits: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("HITS: a number"))
        .unwrap_or(4);
    let reg = Live::global().registry();
    let ((), traps) = with_raw_trap(|| (0..hits).for_each(|_| trap_once()));
    assert_eq!(traps, u64::from(hits));
    for f in [
        la_branch as unsafe extern "C" fn(u32) -> u32,
        la_add1 as unsafe extern "C" fn(u32) -> u32,
    ] {
        let p = Kprobe::at(addr(f as *const ()))
            .pre(|_, _| Action::Continue)
            .build();
        reg.register(&p).expect("register");
        for _ in 0..hits {
            // SAFETY: complete C-ABI functions.
            std::hint::black_box(unsafe { f(std::hint::black_box(1)) });
        }
        reg.unregister(&p).expect("unregister");
        assert_eq!(p.hits(), u64::from(hits));
    }
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    println!("skipped: hit_trace traces arm64 code; run it cross-built under qemu-aarch64");
}
