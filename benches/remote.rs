//! Remote uprobes (issue 13, `probes::remote`): the cost a probe adds to
//! each call of a function in another process, against `ltrace` on the
//! same function and the kernel's own uprobe (tracefs), all in one run; and
//! the time to attach to a running process with 1,000 uprobes pending.
//!
//! The fixture (`tests/remote_support/fixture.c`, built here) calls
//! `rt_work` N times; each case runs it to its end and the cost per call is
//! `(traced - untraced) / N` of the wall time from start to exit (medians
//! of `ROUNDS` runs, untraced runs alternating with traced ones). Printed
//! at the end: per-call costs and the ratios `remote / ltrace` (target <=
//! 0.1x) and `remote / kernel uprobe`. `ltrace` (apt) and tracefs (root)
//! are optional: a case that cannot run says why.
//!
//! Colocated (`RemoteTracer::colocate`: the tracer and the traced program
//! on one CPU) is measured too, against ltrace colocated the same way
//! (ltrace and the program it starts pinned to that CPU): like for like.
//!
//! Run: `cargo bench --bench remote`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/remote_support/mod.rs"]
mod remote_support;
use remote_support::{dir, fixture};

use rcu_registry::probes::remote::RemoteTracer;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeTarget};

const ROUNDS: usize = 5;
/// Calls per run for the remote and kernel probes, and for ltrace (about
/// 0.2 ms per call: fewer, or a run takes seconds).
const CALLS: u64 = 20_000;
const LTRACE_CALLS: u64 = 2_000;

fn cmd(exe: &Path, calls: u64) -> Command {
    let mut c = Command::new(exe);
    c.arg(dir().join("out"))
        .args(["work", &calls.to_string(), "1"]);
    c
}

fn untraced(exe: &Path, calls: u64) -> Duration {
    let t = Instant::now();
    assert!(cmd(exe, calls).status().unwrap().success());
    t.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median over `ROUNDS` of `(traced() - untraced) / calls`, in ns.
fn per_call(exe: &Path, calls: u64, mut traced: impl FnMut() -> Option<Duration>) -> Option<f64> {
    let mut v = Vec::new();
    for _ in 0..ROUNDS {
        let base = untraced(exe, calls);
        let t = traced()?;
        v.push((t.as_nanos() as f64 - base.as_nanos() as f64) / calls as f64);
    }
    Some(median(v))
}

/// The CPU the colocated cases run on: the last one this thread may use.
fn colocation_cpu() -> usize {
    let mask = affinity();
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        // SAFETY: the index is below CPU_SETSIZE, inside the set.
        .find(|&c| unsafe { libc::CPU_ISSET(c, &mask) })
        .expect("a thread runs on some CPU")
}

fn affinity() -> libc::cpu_set_t {
    // SAFETY: all zeroes is the empty set; the kernel writes at most
    // `size_of::<cpu_set_t>()` bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        set
    }
}

fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: the kernel reads `size_of::<cpu_set_t>()` bytes of `set`.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
}

/// Runs `f` with this thread (and what it starts) pinned to `cpu`.
fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
    let before = affinity();
    // SAFETY: all zeroes is the empty set; `cpu` < CPU_SETSIZE (it came
    // from `colocation_cpu`).
    let only = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    set_affinity(&only);
    let r = f();
    set_affinity(&before);
    r
}

fn remote(exe: &Path, ret: bool, colocate: bool) -> Duration {
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let mut b = Consumer::builder().handler(move |_, _| {
        h.fetch_add(1, Ordering::Relaxed);
        ConsumerAction::Continue
    });
    if ret {
        b = b.ret_handler(|_, _| {});
    }
    let consumer = b.build();
    let mut t = RemoteTracer::new();
    if colocate {
        t.colocate(Some(colocation_cpu())).unwrap();
    }
    t.register(
        &UprobeTarget::symbol(exe.to_str().unwrap(), "rt_work"),
        &consumer,
    )
    .unwrap();
    let start = Instant::now();
    t.spawn(&cmd(exe, CALLS)).unwrap();
    t.run().unwrap();
    let d = start.elapsed();
    assert_eq!(hits.load(Ordering::Relaxed), CALLS, "every call counted");
    d
}

fn ltrace(exe: &Path) -> Result<Duration, String> {
    let lt = ["/usr/bin/ltrace", "/bin/ltrace"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .ok_or("no ltrace (apt-get install ltrace)")?;
    let start = Instant::now();
    let st = Command::new(lt)
        // `-x`: a breakpoint on a function of the program (not a PLT
        // call); `-f`: the fixture calls it from a thread.
        .args(["-f", "-x", "rt_work", "-o", "/dev/null"])
        .arg(exe)
        .arg(dir().join("out"))
        .args(["work", &LTRACE_CALLS.to_string(), "1"])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("ltrace exited with {st}"));
    }
    Ok(start.elapsed())
}

/// The tracefs directory, mounted if this process may.
fn tracefs() -> Result<&'static str, String> {
    let dir = "/sys/kernel/tracing";
    if !Path::new(&format!("{dir}/uprobe_events")).exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", dir])
            .status();
    }
    Path::new(&format!("{dir}/uprobe_events"))
        .exists()
        .then_some(dir)
        .ok_or_else(|| "no tracefs with uprobe_events (needs root)".to_string())
}

/// The file offset of `symbol` in `exe` (the fixture is linked at 0 and
/// its text mapped at its file offset, as `readelf -s` shows).
fn file_offset(exe: &Path, symbol: &str) -> u64 {
    let r = rcu_registry::probes::uprobe::TargetResolver::new()
        .resolve(&UprobeTarget::symbol(exe.to_str().unwrap(), symbol))
        .unwrap();
    r.offset
}

struct KernelUprobe {
    events: String,
    enable: String,
}

impl KernelUprobe {
    fn new(exe: &Path) -> Result<KernelUprobe, String> {
        let tracing = tracefs()?;
        let events = format!("{tracing}/uprobe_events");
        let def = format!(
            "p:rcu_registry_remote {}:{:#x}\n",
            exe.display(),
            file_offset(exe, "rt_work")
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&events)
            .and_then(|mut f| std::io::Write::write_all(&mut f, def.as_bytes()))
            .map_err(|e| format!("writing {events}: {e}"))?;
        let enable = format!("{tracing}/events/uprobes/rcu_registry_remote/enable");
        std::fs::write(&enable, "1").map_err(|e| format!("enabling: {e}"))?;
        Ok(KernelUprobe { events, enable })
    }
}

impl Drop for KernelUprobe {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.enable, "0");
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.events)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"-:rcu_registry_remote\n"));
    }
}

/// Attach to a running fixture with `n` uprobes registered on its C
/// library (pending: installed by the attach): the attach's time, and the
/// number installed.
fn attach_time(exe: &Path, n: usize) -> (Duration, usize) {
    let libc = rcu_registry::probes::uprobe::TargetResolver::new()
        .resolve(&UprobeTarget::symbol("libc.so.6", "getppid"))
        .unwrap()
        .path;
    let names = libc_functions(&libc);
    let stop = dir().join("stop");
    let _ = std::fs::remove_file(&stop);
    let mut child = Command::new(exe)
        .arg(dir().join("out-until"))
        .args(["until", stop.to_str().unwrap()])
        .spawn()
        .unwrap();
    let consumer = Consumer::new(|_, _| ConsumerAction::Continue);
    let mut t = RemoteTracer::new();
    let mut registered = 0;
    for name in &names {
        if registered == n {
            break;
        }
        let target = UprobeTarget::symbol(libc.to_str().unwrap(), name.as_str());
        if t.register(&target, &consumer).is_ok() {
            registered += 1;
        }
    }
    let pid = child.id() as i32;
    let start = Instant::now();
    t.attach(pid).unwrap();
    let d = start.elapsed();
    let installed = t.registry().installs_in(
        t.space(pid)
            .map(|s| {
                use rcu_registry::probes::uprobe::AddressSpace;
                s.id()
            })
            .unwrap(),
    );
    t.detach(pid).unwrap();
    std::fs::write(&stop, b"").unwrap();
    assert!(child.wait().unwrap().success());
    (d, installed)
}

/// Names of the sized, non-IFUNC functions of `path`, one per address.
fn libc_functions(path: &Path) -> Vec<String> {
    use object::{Object, ObjectSymbol, SymbolKind};
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let mut by_addr = std::collections::BTreeMap::new();
    let mut ifuncs = std::collections::BTreeSet::new();
    for s in elf.dynamic_symbols() {
        if s.is_undefined() || s.size() == 0 {
            continue;
        }
        if matches!(s.flags(), object::SymbolFlags::Elf { st_info, .. } if st_info & 0xf == object::elf::STT_GNU_IFUNC)
        {
            ifuncs.insert(s.address());
            continue;
        }
        if s.kind() != SymbolKind::Text {
            continue;
        }
        if let Ok(name) = s.name() {
            by_addr
                .entry(s.address())
                .or_insert_with(|| name.to_string());
        }
    }
    for a in &ifuncs {
        by_addr.remove(a);
    }
    by_addr.into_values().collect()
}

fn main() {
    let exe = fixture();
    let up = per_call(&exe, CALLS, || Some(remote(&exe, false, false))).unwrap();
    let uret = per_call(&exe, CALLS, || Some(remote(&exe, true, false))).unwrap();
    let up_co = per_call(&exe, CALLS, || Some(remote(&exe, false, true))).unwrap();
    let uret_co = per_call(&exe, CALLS, || Some(remote(&exe, true, true))).unwrap();
    let cpu = colocation_cpu();
    let (lt, lt_co) = match ltrace(&exe) {
        Ok(_) => (
            per_call(&exe, LTRACE_CALLS, || ltrace(&exe).ok()),
            per_call(&exe, LTRACE_CALLS, || on_cpu(cpu, || ltrace(&exe).ok())),
        ),
        Err(why) => {
            println!("ltrace: skipped ({why})");
            (None, None)
        }
    };
    // The kernel's uprobe, defined for each traced run only (the untraced
    // runs between must not hit it).
    let kernel = match KernelUprobe::new(&exe) {
        Ok(k) => {
            drop(k);
            per_call(&exe, CALLS, || {
                let _k = KernelUprobe::new(&exe).ok()?;
                Some(untraced(&exe, CALLS))
            })
        }
        Err(why) => {
            println!("kernel uprobe: skipped ({why})");
            None
        }
    };
    let (attach, installed) = attach_time(&exe, 1_000);
    println!("\nremote uprobes (medians of {ROUNDS} runs, cost added per call, 1 thread):");
    println!(
        "  remote: uprobe {:.2} us, uretprobe {:.2} us per call",
        up / 1e3,
        uret / 1e3
    );
    println!(
        "  remote: colocated uprobe {:.2} us, uretprobe {:.2} us per call",
        up_co / 1e3,
        uret_co / 1e3
    );
    let verdict = |r: f64| if r <= 0.1 { "met" } else { "MISSED" };
    if let Some(lt) = lt {
        println!(
            "  remote: ltrace {:.1} us per call; remote / ltrace {:.3}x (target <= 0.1x: {})",
            lt / 1e3,
            up / lt,
            verdict(up / lt)
        );
    }
    if let Some(lt_co) = lt_co {
        println!(
            "  remote: colocated ltrace {:.1} us per call; colocated remote / colocated ltrace {:.3}x (target <= 0.1x: {})",
            lt_co / 1e3,
            up_co / lt_co,
            verdict(up_co / lt_co)
        );
    }
    if let Some(k) = kernel {
        println!(
            "  remote: kernel uprobe {:.2} us per call; remote / kernel {:.2}x (no target)",
            k / 1e3,
            up / k
        );
    }
    println!(
        "  remote: attach to a running process with 1000 uprobes pending: {:.1} ms ({installed} installed)",
        attach.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(dir());
}
