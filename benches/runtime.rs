//! Per-hit cost of live probes, each against the peers in the same run:
//!
//! - `plain_call`: the function unprobed (what a hit adds to);
//! - `raw_int3`: an `int3` at the function's entry with an empty SIGTRAP
//!   handler (same `sa_flags` and mask as the runtime's): the floor any
//!   trap-based probe pays;
//! - `boosted`: a kprobe with a pre handler on an out-of-line instruction,
//!   run from the XOL slot with a jump back (one trap);
//! - `emulated`: a kprobe on `push rbx` (emulated, one trap, no slot);
//! - `single_step`: the same probe with a post handler: two `int3` traps,
//!   the probe's and the step marker's after the instruction's copy in the
//!   XOL slot;
//! - `step_trap_flag`: a probe with a post handler on the `ret` of the same
//!   function, which may not fall through and is single-stepped with the
//!   trap flag (an `int3` and a debug trap);
//! - `kretprobe`: entry trap (boosted) plus the return trampoline, no second
//!   trap;
//! - `uprobe` (Linux's own, through tracefs), where the machine allows;
//! - `jump_kprobe`, `jump_kretprobe`: the `boosted` and `kretprobe` probes
//!   on copies of the same function, jump-optimized (`Live::optimize_now`):
//!   no trap, a `jmp` to the site's detour (issue 15). Their cost added per
//!   call (minus `plain_call`) and their ratio to the trap probes are
//!   printed at the end, with what saving the vector state costs
//!   (`xsave64`, `xsavec64`, `fxsave64`, none: one save and restore pair);
//! - `jump_kprobe_mid`: a jump-optimized kprobe inside a function (two
//!   bytes in), served by the full stub, which saves the vector state by
//!   moves when the thread's x87 state is unused (`runtime/x87_state.rs`)
//!   and with `xsave64` otherwise.
//!
//! Ratios against `raw_int3` are printed at the end. Run:
//! `cargo bench --bench runtime -- --warm-up-time 1 --measurement-time 2`

#[path = "common/raw_trap.rs"]
mod raw_trap;
use std::arch::global_asm;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::Criterion;
use rcu_registry::probes::kprobe::{Action, Kprobe, Kretprobe};
use rcu_registry::probes::runtime::Live;

// Copies of `x + 1`, one per variant, so that no probe of one variant
// slows another; `rb_raw` starts with an int3, `rb_emul` with `push rbx`.
global_asm!(
    ".pushsection .text.rb_functions,\"ax\",@progbits",
    ".p2align 4",
    ".globl rb_plain",
    ".type rb_plain,@function",
    "rb_plain:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_plain, . - rb_plain",
    ".p2align 4",
    ".globl rb_raw",
    ".type rb_raw,@function",
    "rb_raw:",
    ".byte 0xcc, 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_raw, . - rb_raw",
    ".p2align 4",
    ".globl rb_boost",
    ".type rb_boost,@function",
    "rb_boost:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_boost, . - rb_boost",
    ".p2align 4",
    ".globl rb_emul",
    ".type rb_emul,@function",
    "rb_emul:",
    ".byte 0x53, 0x89, 0xf8, 0x83, 0xc0, 0x01, 0x5b, 0xc3",
    ".size rb_emul, . - rb_emul",
    ".p2align 4",
    ".globl rb_step",
    ".type rb_step,@function",
    "rb_step:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_step, . - rb_step",
    ".p2align 4",
    ".globl rb_steptf",
    ".type rb_steptf,@function",
    "rb_steptf:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_steptf, . - rb_steptf",
    ".p2align 4",
    ".globl rb_jump",
    ".type rb_jump,@function",
    "rb_jump:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_jump, . - rb_jump",
    ".p2align 4",
    ".globl rb_jkret",
    ".type rb_jkret,@function",
    "rb_jkret:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_jkret, . - rb_jkret",
    ".p2align 4",
    ".globl rb_jmid",
    ".type rb_jmid,@function",
    "rb_jmid:",
    // mov eax, edi; add eax, 1; add eax, 0; ret: probed at +2, the two
    // adds displaced (mid-function: the full stub).
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0x83, 0xc0, 0x00, 0xc3",
    ".size rb_jmid, . - rb_jmid",
    ".p2align 4",
    ".globl rb_kret",
    ".type rb_kret,@function",
    "rb_kret:",
    ".byte 0x89, 0xf8, 0x83, 0xc0, 0x01, 0xc3",
    ".size rb_kret, . - rb_kret",
    ".popsection",
);

extern "C" {
    fn rb_plain(x: u32) -> u32;
    fn rb_raw(x: u32) -> u32;
    fn rb_boost(x: u32) -> u32;
    fn rb_emul(x: u32) -> u32;
    fn rb_step(x: u32) -> u32;
    fn rb_steptf(x: u32) -> u32;
    fn rb_kret(x: u32) -> u32;
    fn rb_jump(x: u32) -> u32;
    fn rb_jkret(x: u32) -> u32;
    fn rb_jmid(x: u32) -> u32;
}

type Func = unsafe extern "C" fn(u32) -> u32;

fn addr(f: Func) -> u64 {
    f as usize as u64
}

/// Nanoseconds per call of every sample, per benchmark (medians reported).
static SAMPLES: Mutex<BTreeMap<&'static str, Vec<f64>>> = Mutex::new(BTreeMap::new());

fn run(f: Func, iters: u64) -> Duration {
    let f = black_box(f);
    let t0 = Instant::now();
    for i in 0..iters {
        // SAFETY: every rb_* function is a complete C-ABI function.
        let r = unsafe { f(black_box(i as u32)) };
        debug_assert_eq!(r, (i as u32).wrapping_add(1));
        black_box(r);
    }
    t0.elapsed()
}

fn bench(c: &mut Criterion, id: &'static str, f: Func) {
    c.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let d = run(f, iters);
            SAMPLES
                .lock()
                .unwrap()
                .entry(id)
                .or_default()
                .push(d.as_nanos() as f64 / iters.max(1) as f64);
            d
        })
    });
}

fn median(id: &str) -> Option<f64> {
    let mut v = SAMPLES.lock().unwrap().get(id)?.clone();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The fastest sample's ns per call: on a loaded machine, the one least
/// disturbed by other processes (a sample is a batch of calls timed
/// together; preemption only ever adds to it).
fn fastest(id: &str) -> Option<f64> {
    SAMPLES
        .lock()
        .unwrap()
        .get(id)?
        .iter()
        .copied()
        .min_by(f64::total_cmp)
}

/// Linux uprobes on `rb_plain` through tracefs, if the machine allows.
fn uprobe_column(c: &mut Criterion) -> Result<(), String> {
    let tracing = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .find(|d| std::path::Path::new(&format!("{d}/uprobe_events")).exists())
        .ok_or("no tracefs with uprobe_events mounted")?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| e.to_string())?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let at = addr(rb_plain);
    // File offset of rb_plain: from its mapping's start and file offset.
    let offset = maps
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (range, _perms, off) = (f.next()?, f.next()?, f.next()?);
            let (s, e) = range.split_once('-')?;
            let (s, e) = (
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            );
            (s..e)
                .contains(&at)
                .then(|| at - s + u64::from_str_radix(off, 16).unwrap_or(0))
        })
        .ok_or("rb_plain not found in /proc/self/maps")?;
    let events = format!("{tracing}/uprobe_events");
    let def = format!("p:rcu_registry_bench {}:{offset:#x}\n", exe.display());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&events)
        .and_then(|mut f| std::io::Write::write_all(&mut f, def.as_bytes()))
        .map_err(|e| format!("writing {events}: {e}"))?;
    let enable = format!("{tracing}/events/uprobes/rcu_registry_bench/enable");
    std::fs::write(&enable, "1").map_err(|e| format!("enabling: {e}"))?;
    bench(c, "uprobe", rb_plain);
    let _ = std::fs::write(&enable, "0");
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .open(&events)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"-:rcu_registry_bench\n"));
    Ok(())
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let live = Live::global();
    let reg = live.registry();

    bench(&mut c, "plain_call", rb_plain);

    let old = raw_trap::install_empty_handler();
    bench(&mut c, "raw_int3", rb_raw);
    raw_trap::restore_handler(&old);

    let p = Kprobe::at(addr(rb_boost))
        .pre(|_p, _r| Action::Continue)
        .build();
    reg.register(&p).unwrap();
    bench(&mut c, "boosted", rb_boost);
    reg.unregister(&p).unwrap();

    let p = Kprobe::at(addr(rb_emul))
        .pre(|_p, _r| Action::Continue)
        .build();
    reg.register(&p).unwrap();
    bench(&mut c, "emulated", rb_emul);
    reg.unregister(&p).unwrap();

    let p = Kprobe::at(addr(rb_step))
        .pre(|_p, _r| Action::Continue)
        .post(|_p, _r| {})
        .build();
    reg.register(&p).unwrap();
    bench(&mut c, "single_step", rb_step);
    reg.unregister(&p).unwrap();

    // The `ret` at offset 5: stepped with the trap flag.
    let p = Kprobe::at(addr(rb_steptf) + 5)
        .pre(|_p, _r| Action::Continue)
        .post(|_p, _r| {})
        .build();
    reg.register(&p).unwrap();
    bench(&mut c, "step_trap_flag", rb_steptf);
    reg.unregister(&p).unwrap();

    let k = Kretprobe::at(addr(rb_kret))
        .handler(|_, _, ret| {
            black_box(ret);
        })
        .build()
        .unwrap();
    reg.register(&k).unwrap();
    bench(&mut c, "kretprobe", rb_kret);
    reg.unregister(&k).unwrap();

    // The same two probes, jump-optimized.
    let p = Kprobe::at(addr(rb_jump))
        .pre(|_p, _r| Action::Continue)
        .build();
    reg.register(&p).unwrap();
    live.optimize_now();
    assert!(live.is_optimized(&p), "rb_jump optimized");
    bench(&mut c, "jump_kprobe", rb_jump);
    reg.unregister(&p).unwrap();
    let k = Kretprobe::at(addr(rb_jkret))
        .handler(|_, _, ret| {
            black_box(ret);
        })
        .build()
        .unwrap();
    reg.register(&k).unwrap();
    live.optimize_now();
    assert!(live.is_optimized(k.probe()), "rb_jkret optimized");
    bench(&mut c, "jump_kretprobe", rb_jkret);
    reg.unregister(&k).unwrap();
    // Mid-function: the full stub (`jump/stubs.rs`).
    let p = Kprobe::at(addr(rb_jmid) + 2)
        .pre(|_p, _r| Action::Continue)
        .build();
    reg.register(&p).unwrap();
    live.optimize_now();
    assert!(live.is_optimized(&p), "rb_jmid + 2 optimized");
    bench(&mut c, "jump_kprobe_mid", rb_jmid);
    reg.unregister(&p).unwrap();

    let uprobe = uprobe_column(&mut c);

    c.final_summary();
    // A filtered run (`cargo bench --bench runtime -- jump`) may leave out
    // the raw round trip: then no ratio table.
    if let Some(raw) = median("raw_int3") {
        println!("\nper-hit cost (median ns per call) and ratio to raw_int3:");
        for (id, target) in [
            ("plain_call", None),
            ("raw_int3", None),
            ("boosted", Some(1.15)),
            ("emulated", None),
            ("single_step", Some(2.3)),
            ("step_trap_flag", None),
            ("kretprobe", Some(1.3)),
            ("uprobe", None),
        ] {
            let Some(m) = median(id) else { continue };
            let ratio = m / raw;
            let verdict = match target {
                Some(t) if ratio <= t => format!("  (target <= {t}x: met)"),
                Some(t) => format!("  (target <= {t}x: MISSED)"),
                None => String::new(),
            };
            println!("  {id:<12} {m:>9.1} ns  {ratio:>6.3}x{verdict}");
        }
    }
    if let Err(why) = uprobe {
        println!("  uprobe       skipped: {why}");
    }
    jump_summary();
    jump_paired(live);
    vector_save_costs();
}

/// Added cost per call of the jump-optimized probes and their ratio to
/// the trap probes (issue 15's targets).
fn jump_summary() {
    let (Some(plain), Some(jk), Some(tk), Some(jr), Some(tr)) = (
        median("plain_call"),
        median("jump_kprobe"),
        median("boosted"),
        median("jump_kretprobe"),
        median("kretprobe"),
    ) else {
        return;
    };
    let added = |m: f64| m - plain;
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("\njump-optimized vs trap (median ns per call, added = minus plain_call):");
    println!(
        "  kprobe     jump {:>7.1} ns added, trap {:>8.1} ns added: {:>6.1}x cheaper \
         (targets: <= 25 ns {}, >= 50x {})",
        added(jk),
        added(tk),
        added(tk) / added(jk),
        met(added(jk) <= 25.0),
        met(added(tk) / added(jk) >= 50.0)
    );
    println!(
        "  kretprobe  jump {:>7.1} ns added, trap {:>8.1} ns added: {:>6.1}x cheaper \
         (target: <= 60 ns {})",
        added(jr),
        added(tr),
        added(tr) / added(jr),
        met(added(jr) <= 60.0)
    );
    if let Some(m) = median("jump_kprobe_mid") {
        println!(
            "  kprobe mid-function (full stub) jump {:>7.1} ns added",
            added(m)
        );
    }
    if let (Some(p), Some(k), Some(r)) = (
        fastest("plain_call"),
        fastest("jump_kprobe"),
        fastest("jump_kretprobe"),
    ) {
        println!(
            "  fastest samples (least disturbed by load): kprobe jump {:.1} ns added, \
             kretprobe jump {:.1} ns added",
            k - p,
            r - p
        );
    }
    match frida_added_ns() {
        Ok(f) => println!(
            "  frida      Interceptor.attach, native CModule onEnter: {f:.1} ns added; \
             jump kprobe / frida {:.3}x (target <= 0.2x: {})",
            added(jk) / f,
            met(added(jk) / f <= 0.2)
        ),
        Err(why) => println!("  frida      skipped: {why}"),
    }
}

/// Rounds and calls per round of the paired jump measurement.
const PAIRED_ROUNDS: usize = 41;
const PAIRED_CALLS: u64 = 2_000;

/// The jump-optimized probes again, **paired**: each round times
/// `PAIRED_CALLS` calls of the unprobed copy, then as many of each probed
/// one, back to back, so the host's slow and fast phases (which move
/// separate criterion runs here by 30% or more) fall on all of a round
/// alike; the median and the least of the per-round added costs (probed
/// minus unprobed). The mid-function probe runs in rounds of its own
/// after the others: its full stub saves `zmm16-31` with 512-bit moves
/// where glibc's string functions left them in use, which slowed the probes
/// timed right after it by 1.5-3 ns.
fn jump_paired(live: &Live) {
    let reg = live.registry();
    let p = Kprobe::at(addr(rb_jump))
        .pre(|_p, _r| Action::Continue)
        .build();
    let k = Kretprobe::at(addr(rb_jkret))
        .handler(|_, _, ret| {
            black_box(ret);
        })
        .build()
        .unwrap();
    let m = Kprobe::at(addr(rb_jmid) + 2)
        .pre(|_p, _r| Action::Continue)
        .build();
    reg.register(&p).unwrap();
    reg.register(&k).unwrap();
    reg.register(&m).unwrap();
    live.optimize_now();
    assert!(live.is_optimized(&p) && live.is_optimized(k.probe()) && live.is_optimized(&m));
    let per_call = |f: Func| run(f, PAIRED_CALLS).as_nanos() as f64 / PAIRED_CALLS as f64;
    let rounds = |probed: &[Func]| -> Vec<Vec<f64>> {
        let mut added = vec![Vec::new(); probed.len()];
        for _ in 0..PAIRED_ROUNDS {
            let plain = per_call(rb_plain);
            for (i, &f) in probed.iter().enumerate() {
                added[i].push(per_call(f) - plain);
            }
        }
        for v in &mut added {
            v.sort_by(f64::total_cmp);
        }
        added
    };
    let a = rounds(&[rb_jump, rb_jkret]);
    let b = rounds(&[rb_jmid]);
    reg.unregister(&p).unwrap();
    reg.unregister(&k).unwrap();
    reg.unregister(&m).unwrap();
    let med = |v: &[f64]| v[v.len() / 2];
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "\njump-optimized, paired ({PAIRED_ROUNDS} rounds of {PAIRED_CALLS} calls, ns added per \
         call: median, least):"
    );
    println!(
        "  kprobe {:.1}, {:.1} (target <= 25 ns: {}); kretprobe entry + return {:.1}, {:.1} \
         (target <= 60 ns: {}); kprobe mid-function (full stub) {:.1}, {:.1}",
        med(&a[0]),
        a[0][0],
        met(med(&a[0]) <= 25.0),
        med(&a[1]),
        a[1][0],
        met(med(&a[1]) <= 60.0),
        med(&b[0]),
        b[0][0]
    );
}

/// Frida's cheapest listener (`Interceptor.attach` with a native CModule
/// `onEnter` counting calls) on a copy of the probed function in another
/// process, measured by `benches/frida/driver.py` (`pip install frida`):
/// the ns it adds per call. Its copy of the function has the same bytes as
/// `rb_jump`. `RCU_BENCH_NO_FRIDA=1` leaves it out (it takes a minute).
fn frida_added_ns() -> Result<f64, String> {
    if std::env::var_os("RCU_BENCH_NO_FRIDA").is_some() {
        return Err("RCU_BENCH_NO_FRIDA is set".into());
    }
    let have = std::process::Command::new("python3")
        .args(["-c", "import frida"])
        .output()
        .map_err(|e| format!("no python3: {e}"))?;
    if !have.status.success() {
        return Err("no frida for python3 (pip install frida)".into());
    }
    let dir = std::env::temp_dir().join(format!("rcu-registry-frida-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/frida");
    let exe = dir.join("target");
    let built = std::process::Command::new("cc")
        .args(["-O1", "-rdynamic", "-o"])
        .arg(&exe)
        .arg(here.join("target.c"))
        .status()
        .map_err(|e| format!("cc: {e}"))?;
    if !built.success() {
        return Err("building benches/frida/target.c failed".into());
    }
    let out = std::process::Command::new("python3")
        .arg(here.join("driver.py"))
        .arg(&exe)
        .args(["2000000", "9"])
        .arg(&dir)
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("  {}", text.trim());
    text.split("added ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            format!(
                "no result from the driver: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// What one save and restore of the vector state costs, per option a
/// detour could use: the full `xsave64` of x87/SSE/AVX/AVX-512 (what the
/// detours and the kretprobe trampoline use), the compacted `xsavec64`
/// (init optimization: components in their initial state are not
/// written), `fxsave64` (x87 and SSE only: loses the upper halves of
/// `ymm`/`zmm`), and nothing. Median of 7 runs of 200,000 pairs, ymm0 in
/// use (dirty upper half) so that AVX state is live as in a probed loop.
fn vector_save_costs() {
    use std::arch::asm;
    let leaf1 = std::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 {
        println!("vector state: no xsave");
        return;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set: xgetbv with ecx = 0 reads XCR0.
    unsafe {
        asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    let mask = (u64::from(hi) << 32 | u64::from(lo)) & 0b1110_0111;
    let xsavec = std::arch::x86_64::__cpuid_count(0xd, 1).eax & 2 != 0;
    #[repr(C, align(64))]
    struct Area([u8; 8192]);
    let mut area = Box::new(Area([0; 8192]));
    let p = area.0.as_mut_ptr();
    const N: u32 = 200_000;
    let time = |f: &mut dyn FnMut()| {
        let mut v: Vec<f64> = (0..7)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_nanos() as f64 / f64::from(N)
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[3]
    };
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX present; dirties ymm0's upper half, declared.
        unsafe { asm!("vpcmpeqb ymm0, ymm0, ymm0", out("ymm0") _) };
    }
    let (ml, mh) = (mask as u32, (mask >> 32) as u32);
    let xsave = time(&mut || {
        for _ in 0..N {
            // SAFETY: `p` is 64-byte aligned, 8 KiB (more than the area of
            // the enabled components); the header is zeroed first, as the
            // detour stub does.
            unsafe {
                std::ptr::write_bytes(p.add(512), 0, 64);
                asm!("xsave64 [{p}]", "xrstor64 [{p}]", p = in(reg) p,
                    in("eax") ml, in("edx") mh, options(nostack));
            }
        }
    });
    let compact = xsavec.then(|| {
        time(&mut || {
            for _ in 0..N {
                // SAFETY: as above; xsavec writes the header itself.
                unsafe {
                    asm!("xsavec64 [{p}]", "xrstor64 [{p}]", p = in(reg) p,
                        in("eax") ml, in("edx") mh, options(nostack));
                }
            }
        })
    });
    let fx = time(&mut || {
        for _ in 0..N {
            // SAFETY: `p` is 16-byte aligned and 512 bytes are enough.
            unsafe { asm!("fxsave64 [{p}]", "fxrstor64 [{p}]", p = in(reg) p, options(nostack)) };
        }
    });
    let none = time(&mut || {
        for i in 0..N {
            black_box(i);
        }
    });
    println!(
        "\nvector state save+restore (ns per pair, XCR0 components {mask:#x}): \
         xsave64 {xsave:.1}, xsavec64 {}, fxsave64 {fx:.1} (no ymm/zmm uppers), none {none:.1}",
        compact.map_or("n/a".to_string(), |c| format!("{c:.1}"))
    );
    drop(area);
}
