//! The background pass (issue 15): registered probes are optimized by
//! the optimizer's thread without a call to `optimize_now`,
//! and a probe registered later is picked up by a later pass.

#![cfg(target_arch = "x86_64")]

mod runtime_jump_support;

use std::time::{Duration, Instant};

use rcu_registry::probes::kprobe::Kprobe;
use rcu_registry::probes::runtime::Live;
use runtime_jump_support::*;

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_background_pass_optimizes_new_probes_without_an_explicit_call() {
    let _g = serial();
    let live = Live::global();
    let reg = live.registry();
    let opt = live.jump_optimizer();
    let funcs = many();
    let first: Vec<Kprobe> = funcs[..16]
        .iter()
        .map(|&f| Kprobe::at(addr(f)).build())
        .collect();
    for p in &first {
        reg.register(p).unwrap();
    }
    assert!(
        first.iter().all(|p| !live.is_optimized(p)),
        "nothing before the pass"
    );
    assert!(opt.start_background(Duration::from_millis(20)));
    assert!(
        !opt.start_background(Duration::from_millis(20)),
        "started once"
    );
    eventually("the first 16 optimized", || {
        first.iter().all(|p| live.is_optimized(p))
    });
    for (k, &f) in funcs[..16].iter().enumerate() {
        assert_eq!(call(f, 1), 1 + k as u32);
    }
    let later = Kprobe::at(addr(funcs[16])).build();
    reg.register(&later).unwrap();
    eventually("a later probe optimized", || live.is_optimized(&later));
    assert_eq!(call(funcs[16], 1), 17);
    assert!(first.iter().all(|p| p.hits() == 1) && later.hits() == 1);
    assert!(opt.stop_background());
    assert!(!opt.stop_background());
    for p in first.iter().chain([&later]) {
        reg.unregister(p).unwrap();
    }
    for &f in &funcs[..17] {
        assert_eq!(code(addr(f), 1), [0x55], "original first byte back");
    }
}
