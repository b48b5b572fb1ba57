//! Stress of remote uprobes (issue 13): two tracer threads share one
//! registry (one follows fork children, one lets them go) and run fixture
//! programs one after another, in turn: four threads calling a probed
//! function, a fork inside a call tracked for its return, a library
//! opened and closed twice, and a running program attached to and
//! detached from twice. A third thread registers and removes a second
//! consumer on the probed functions the whole time, through a tracer of
//! its own. For `REMOTE_STRESS_SECS` (default 2 s; at least 10 s when
//! `CI=true`).
//!
//! Checked for every program: it exits 0 and writes what it writes
//! untraced (0 crashed targets); the steady consumer counts exactly the
//! calls and return values each spawned program made in its own space (0
//! wrong counts). Printed: programs run per kind, churn cycles, hits.
//! Run with `cargo test --release --test remote_stress -- --ignored`.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcu_registry::probes::remote::{ExitStatus, RemoteRegistry, RemoteTracer};
use rcu_registry::probes::uprobe::{AddressSpace, Consumer, ConsumerAction, SpaceId, UprobeTarget};

#[path = "remote_support/mod.rs"]
mod remote_support;
mod stress_time;
use remote_support::{dir, fixture, fixture_lib, Running};

fn duration() -> Duration {
    stress_time::stress_duration("REMOTE_STRESS_SECS", 2.0, 10.0)
}

/// Per space: calls of `rt_work` seen, and the sum of its return values.
type PerSpace = Arc<Mutex<HashMap<SpaceId, (u64, u64)>>>;

fn steady() -> (Consumer, PerSpace) {
    let seen: PerSpace = Arc::default();
    let (a, b) = (Arc::clone(&seen), Arc::clone(&seen));
    let c = Consumer::builder()
        .handler(move |hit, _| {
            a.lock().unwrap().entry(hit.space).or_default().0 += 1;
            ConsumerAction::Continue
        })
        .ret_handler(move |ret, _| {
            b.lock().unwrap().entry(ret.space).or_default().1 += ret.retval;
        })
        .build();
    (c, seen)
}

/// What the fixture writes untraced with `args` (into a file of the
/// calling tracer thread's, `name`: the two run the same kinds at once).
fn untraced(args: &[String], name: &str) -> String {
    let out = dir().join(format!("untraced-{name}-{}", args[0]));
    assert!(Command::new(fixture())
        .arg(&out)
        .args(args)
        .status()
        .unwrap()
        .success());
    std::fs::read_to_string(out).unwrap()
}

/// The program kinds, with the exact `rt_work` calls and return-value sum
/// a spawned run makes in its own (the parent's) space.
fn kinds(lib: &Path) -> Vec<(Vec<String>, u64, u64)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let sum = |n: u64| (0..n).map(|i| 3 * i + 1).sum::<u64>();
    vec![
        (s(&["work", "1500", "4"]), 4 * 1500, 4 * sum(1500)),
        (s(&["forkin", "300"]), 300, sum(300)),
        (s(&["dlopen", lib.to_str().unwrap(), "200"]), 0, 0),
    ]
}

/// One tracer thread: programs in turn until `end`; returns how many of
/// each kind ran, and the attach cycles done.
fn tracer_thread(
    registry: Arc<RemoteRegistry>,
    follow: bool,
    end: Instant,
    seen: PerSpace,
    name: &'static str,
) -> (Vec<u64>, u64) {
    let lib = fixture_lib();
    let kinds = kinds(&lib);
    let expected: Vec<String> = kinds.iter().map(|(a, ..)| untraced(a, name)).collect();
    let mut t = RemoteTracer::with_registry(registry);
    t.follow_forks(follow);
    let mut runs = vec![0u64; kinds.len()];
    let mut attach_cycles = 0u64;
    let mut round = 0usize;
    // Every kind at least once, however slow the machine.
    while round <= kinds.len() || Instant::now() < end {
        let k = round % (kinds.len() + 1);
        round += 1;
        if k == kinds.len() {
            attach_cycles += attach_and_detach_twice(&mut t, name);
            continue;
        }
        let (args, calls, rets) = &kinds[k];
        let out = dir().join(format!("stress-{name}-{}", args[0]));
        let pid = t
            .spawn(Command::new(fixture()).arg(&out).args(args))
            .unwrap();
        let space = t.space(pid).unwrap().id();
        t.run().unwrap();
        assert_eq!(t.exit_status(pid), Some(ExitStatus::Code(0)), "{args:?}");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            expected[k],
            "{args:?}"
        );
        let got = seen
            .lock()
            .unwrap()
            .get(&space)
            .copied()
            .unwrap_or_default();
        assert_eq!(got, (*calls, *rets), "{args:?}: calls and return values");
        runs[k] += 1;
    }
    (runs, attach_cycles)
}

/// A program started untraced, attached to and detached from twice while
/// it calls `rt_work`, then stopped: it must end as untraced.
fn attach_and_detach_twice(t: &mut RemoteTracer, name: &str) -> u64 {
    let stop = dir().join(format!("stress-stop-{name}"));
    let out = dir().join(format!("stress-until-{name}"));
    let _ = std::fs::remove_file(&stop);
    let mut child = Running(
        Command::new(fixture())
            .arg(&out)
            .args(["until", stop.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id() as i32;
    for cycle in 0..2 {
        t.attach(pid).unwrap();
        t.run_for(Duration::from_millis(20)).unwrap();
        if let Err(e) = t.detach(pid) {
            panic!(
                "cycle {cycle}: detach: {e:?}; the program's end: {:?}",
                t.exit_status(pid)
            );
        }
    }
    std::fs::write(&stop, b"").unwrap();
    let st = child.0.wait().unwrap();
    assert!(st.success(), "detached twice, then ended with {st:?}");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "checksum 1\n");
    2
}

#[test]
#[ignore = "stress: run with --ignored (test-all does, in release)"]
fn remote_uprobes_under_churn_with_two_tracer_threads() {
    let file = fixture().to_str().unwrap().to_string();
    let lib = fixture_lib();
    let end = Instant::now() + duration();
    let mut first = RemoteTracer::new();
    let registry = first.shared_registry();
    let (consumer, seen) = steady();
    first
        .register(&UprobeTarget::symbol(file.as_str(), "rt_work"), &consumer)
        .unwrap();
    let threads: Vec<_> = [(false, "a"), (true, "b")]
        .into_iter()
        .map(|(follow, name)| {
            let (r, s) = (Arc::clone(&registry), Arc::clone(&seen));
            std::thread::spawn(move || tracer_thread(r, follow, end, s, name))
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let reg = Arc::clone(&registry);
    let churner = std::thread::spawn(move || {
        let mut t = RemoteTracer::with_registry(reg);
        let churned = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&churned);
        let churn = Consumer::new(move |_, _| {
            c.fetch_add(1, Ordering::Relaxed);
            ConsumerAction::Continue
        });
        let targets = [
            UprobeTarget::symbol(file.as_str(), "rt_work"),
            UprobeTarget::symbol(file.as_str(), "rt_other"),
            UprobeTarget::symbol(lib.to_str().unwrap(), "lib_add"),
        ];
        let mut cycles = 0u64;
        while !d.load(Ordering::Relaxed) {
            let keys: Vec<_> = targets
                .iter()
                .filter_map(|target| t.register(target, &churn).ok())
                .map(|r| r.key())
                .collect();
            std::thread::sleep(Duration::from_millis(2));
            for key in keys {
                t.unregister_nosync(key, &churn).unwrap();
            }
            t.commit();
            cycles += 1;
        }
        (cycles, churned.load(Ordering::Relaxed))
    });
    let mut runs = [0u64; 3];
    let mut attach_cycles = 0;
    for th in threads {
        let (r, a) = th.join().unwrap();
        for (t, n) in runs.iter_mut().zip(r) {
            *t += n;
        }
        attach_cycles += a;
    }
    done.store(true, Ordering::Relaxed);
    let (cycles, churned) = churner.join().unwrap();
    println!(
        "programs: {} threaded, {} forking, {} dlopen; {attach_cycles} attach/detach \
         cycles; {cycles} churn cycles ({churned} churned hits); steady hits {}",
        runs[0],
        runs[1],
        runs[2],
        consumer.hits()
    );
    // Every kind ran (each thread runs each at least once).
    assert!(runs.iter().all(|&n| n > 0) && attach_cycles > 0 && cycles > 0);
    drop(first);
}
