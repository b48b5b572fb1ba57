//! Jump-optimized live uprobes (issue 15): a uprobe on a fixture library's
//! function and on a C-library function optimized by
//! [`LiveUprobes::optimize_now`], counted exactly from several threads with
//! the right registers; the file's bytes back after unregistration; a
//! library unloaded while optimized and loaded again gets no write from the
//! old site; a consumer that opts out puts the uprobe back on the trap
//! path; a fork child counts; with the optimizer off the trap path stays;
//! a return handler on an optimized entry; a `dlopen` and a registration
//! while a pass waits for its grace period wait for nothing; the
//! background pass; an optimized uretprobe's return through the assembly
//! trampoline with no trap (four threads, counted exactly, in a child that
//! blocks SIGTRAP, with the trap path as the control); a uretprobe and a
//! kretprobe on one return (tail calls, both orders); a uretprobe on a
//! recursive function; a uretprobe frame left by `longjmp`; a thread that
//! exits inside a uretprobed call; a fork during a paused optimizer pass; a
//! uprobe registered inside an optimized uprobe's displaced bytes. The racing stress is
//! `runtime_jump_uprobes_stress.rs`.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod dl_support;

use dl_support::Lib;
use rcu_registry::probes::runtime::LiveUprobes;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeKey, UprobeTarget};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn live() -> &'static LiveUprobes {
    LiveUprobes::global().expect("live uprobes in a dynamically linked test binary")
}

/// `fx_add3(x) = x + 3`: `mov eax, edi; add eax, 3; ret`, five bytes of
/// two relocatable instructions before the `ret` (what a `jmp rel32`
/// displaces).
const ADD3: &[u8] = &dl_support::add_k_bytes(3);

fn fixture(name: &str) -> PathBuf {
    dl_support::build_so(
        "jumpuprobes",
        &format!("lib{name}.so"),
        &dl_support::add_k_source(&[("fx_add3", 3)]),
        &[],
    )
}

fn code_at(addr: u64, n: usize) -> Vec<u8> {
    // SAFETY: `addr` is mapped code of a loaded library or the C library
    // (the caller holds it loaded), readable.
    unsafe { std::slice::from_raw_parts(addr as *const u8, n) }.to_vec()
}

/// A consumer counting hits at `at` whose first argument is in `args`
/// (all when empty), and counting in `wrong` those whose `regs.ip` is not
/// `at` (filled in when known: 0 checks nothing).
struct Counted {
    hits: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
    consumer: Consumer,
}

fn counted(at: Arc<AtomicU64>, args: Vec<u64>, opt_out: bool) -> Counted {
    let hits = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let (h, w) = (Arc::clone(&hits), Arc::clone(&wrong));
    let consumer = Consumer::builder()
        .handler(move |hit, regs| {
            if !args.is_empty() && !regs.arg(0).is_some_and(|a| args.contains(&a)) {
                return ConsumerAction::Continue;
            }
            let want = at.load(Ordering::SeqCst);
            if want != 0 && (regs.ip != want || hit.vaddr != want) {
                w.fetch_add(1, Ordering::SeqCst);
            }
            h.fetch_add(1, Ordering::SeqCst);
            ConsumerAction::Continue
        })
        .jump_opt_out(opt_out)
        .build();
    Counted {
        hits,
        wrong,
        consumer,
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

/// One pass, and the uprobe at `key` must be optimized by it.
fn optimized(key: UprobeKey) {
    let r = live().optimize_now();
    assert!(
        live().is_optimized(key),
        "not optimized: {:?} ({r:?})",
        live().jump_refusal(key)
    );
}

fn register_add3(so: &std::path::Path, c: &Consumer) -> UprobeKey {
    live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "fx_add3"), c)
        .unwrap()
        .key()
}

#[test]
fn a_uprobe_on_a_library_function_is_optimized_and_counts_every_call_of_several_threads() {
    let _g = serial();
    let so = fixture("jupthreads");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let at = f as usize as u64;
    let c = counted(Arc::new(AtomicU64::new(at)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    assert_eq!(code_at(at, 1), [0xcc]);
    optimized(key);
    assert_eq!(code_at(at, 1), [0xe9], "a jmp at the site");
    assert_eq!(live().installed_addresses(key), vec![at]);
    const THREADS: i32 = 4;
    const CALLS: i32 = 20_000;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for x in 0..CALLS {
                    assert_eq!(f(x * t), x * t + 3);
                }
            });
        }
    });
    assert_eq!(load(&c.hits), (THREADS * CALLS) as u64);
    assert_eq!(load(&c.wrong), 0, "a handler saw the wrong ip");
    assert_eq!(live().registry().nmissed(key), 0);
    assert!(live().is_optimized(key), "still optimized");
    // A pass keeps it as it is (not taken for stale: its text holds the
    // optimizer's `jmp`, not the registry's `int3`).
    let r = live().optimize_now();
    assert!(r.already >= 1, "{r:?}");
    assert!(live().is_optimized(key), "kept by a second pass");
    assert_eq!(code_at(at, 1), [0xe9]);
    // Unregistered: the file's bytes, exactly.
    live().unregister(key, &c.consumer).unwrap();
    assert_eq!(code_at(at, ADD3.len()), ADD3);
    assert!(!live().is_optimized(key));
    for x in 0..10 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&c.hits), (THREADS * CALLS) as u64);
    // The detour is freed by the next pass.
    live().optimize_now();
    lib.close();
}

#[test]
fn a_handler_on_an_optimized_uprobe_sees_the_arguments_and_may_change_them() {
    let _g = serial();
    let so = fixture("jupargs");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let c = Consumer::builder()
        .handler(move |_hit, regs| {
            let x = regs.arg(0).unwrap();
            s.lock().unwrap().push(x as u32 as i32);
            // The probed code sees the change: 100 becomes 200.
            if x as u32 == 100 {
                regs.gprs[7] = 200;
            }
            ConsumerAction::Continue
        })
        .build();
    let key = register_add3(&so, &c);
    optimized(key);
    assert_eq!(f(7), 10);
    assert_eq!(f(-5), -2);
    assert_eq!(f(100), 203, "the handler's change to rdi reached the code");
    assert_eq!(*seen.lock().unwrap(), vec![7, -5, 100]);
    live().unregister(key, &c).unwrap();
    lib.close();
}

/// A C-library function: `bsearch` (six bytes of register pushes at its
/// entry; loops further on), counted by its first argument, a key of ours
/// (other threads of the harness may search too).
#[test]
fn a_uprobe_on_a_c_library_function_is_optimized_and_counted_exactly() {
    let _g = serial();
    let table: Vec<i32> = (0..64).collect();
    let keys: Vec<i32> = (0..200).map(|i| i % 64).collect();
    let ptrs: Vec<u64> = keys.iter().map(|k| k as *const i32 as u64).collect();
    let c = counted(Arc::new(AtomicU64::new(0)), ptrs, false);
    let resolved = live()
        .register(
            &UprobeTarget::parse("libc.so.6:bsearch").unwrap(),
            &c.consumer,
        )
        .unwrap();
    let key = resolved.key();
    let at = live().installed_addresses(key)[0];
    optimized(key);
    assert_eq!(code_at(at, 1), [0xe9]);
    extern "C" fn cmp(a: *const libc::c_void, b: *const libc::c_void) -> libc::c_int {
        // SAFETY: bsearch passes our key and an element of our table.
        unsafe { (*(a as *const i32)).cmp(&*(b as *const i32)) as libc::c_int }
    }
    let table = &table;
    std::thread::scope(|s| {
        for chunk in keys.chunks(50) {
            s.spawn(move || {
                for k in chunk {
                    // SAFETY: a sorted table of 64 i32, our key, a matching
                    // comparator.
                    let found = unsafe {
                        libc::bsearch(
                            (k as *const i32).cast(),
                            table.as_ptr().cast(),
                            table.len(),
                            4,
                            Some(cmp),
                        )
                    };
                    assert_eq!(found as usize, &table[*k as usize] as *const i32 as usize);
                }
            });
        }
    });
    assert_eq!(load(&c.hits), 200);
    live().unregister(key, &c.consumer).unwrap();
    // The C library's bytes again, exactly.
    let file = std::fs::read(&resolved.path).unwrap();
    let off = resolved.offset as usize;
    assert_eq!(code_at(at, 16), file[off..off + 16].to_vec());
}

/// The optimized library unloaded, then loaded again (at the same address
/// when the kernel puts it there): the uprobe, still registered, is
/// installed in the new text with a plain `int3` and nothing else of the
/// old site (no `jmp`, no displacement) is written there; a new pass
/// optimizes the new text afresh.
#[test]
fn an_optimized_library_unloaded_and_loaded_again_gets_no_write_from_the_old_site() {
    let _g = serial();
    let so = fixture("jupdlclose");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let old = f as usize as u64;
    let c = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    optimized(key);
    for x in 0..50 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&c.hits), 50);
    lib.close();
    assert!(!live().is_optimized(key), "no install left");
    // A pass over nothing (the text is gone: a write would fault).
    live().optimize_now();

    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let new = f as usize as u64;
    if new != old {
        eprintln!("reloaded at {new:#x}, not {old:#x}: the same-address case is not exercised");
    }
    let mut want = ADD3.to_vec();
    want[0] = 0xcc;
    assert_eq!(
        code_at(new, ADD3.len()),
        want,
        "the int3 only, no stale jmp"
    );
    for x in 0..7 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&c.hits), 57, "counted on the trap path");
    optimized(key);
    assert_eq!(code_at(new, 1), [0xe9]);
    for x in 0..3 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&c.hits), 60);

    // Unloaded while optimized and registered, loaded again, unregistered:
    // the new text is written by the registry only (the int3 in, then out).
    lib.close();
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let newer = f as usize as u64;
    assert_eq!(code_at(newer, ADD3.len()), want);
    // Before any pass forgot the old site: not optimized (no jmp here),
    // and calls are counted on the trap path.
    assert!(!live().is_optimized(key));
    assert_eq!(f(2), 5);
    assert_eq!(load(&c.hits), 61);
    live().optimize_now();
    live().unregister(key, &c.consumer).unwrap();
    assert_eq!(code_at(newer, ADD3.len()), ADD3);
    live().optimize_now();
    assert_eq!(code_at(newer, ADD3.len()), ADD3, "the pass wrote nothing");
    assert_eq!(f(1), 4);
    lib.close();
}

/// A consumer that opted out joins an optimized uprobe: the uprobe goes
/// back to the trap path before it joins, and passes leave it there while
/// it stays; both consumers count every call.
#[test]
fn a_consumer_that_opts_out_puts_the_uprobe_back_on_the_trap_path() {
    let _g = serial();
    let so = fixture("jupoptout");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let at = f as usize as u64;
    let a = counted(Arc::new(AtomicU64::new(at)), Vec::new(), false);
    let key = register_add3(&so, &a.consumer);
    optimized(key);
    for x in 0..10 {
        assert_eq!(f(x), x + 3);
    }
    let b = counted(Arc::new(AtomicU64::new(at)), Vec::new(), true);
    live().registry().register(key, &b.consumer).unwrap();
    assert!(!live().is_optimized(key));
    assert_eq!(code_at(at, 1), [0xcc]);
    let r = live().optimize_now();
    assert!(!live().is_optimized(key), "{r:?}");
    assert_eq!(
        live().jump_refusal(key),
        Some(rcu_registry::probes::arch::x86_64::jump::JumpRefusal::OptedOut)
    );
    for x in 0..10 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&a.hits), 20);
    assert_eq!(load(&b.hits), 10);
    // It leaves: optimized again.
    live().unregister(key, &b.consumer).unwrap();
    optimized(key);
    assert_eq!(f(1), 4);
    assert_eq!(load(&a.hits), 21);
    assert_eq!(load(&a.wrong) + load(&b.wrong), 0);
    live().unregister(key, &a.consumer).unwrap();
    assert_eq!(code_at(at, ADD3.len()), ADD3);
    lib.close();
}

#[test]
fn a_fork_child_counts_its_calls_through_the_detour() {
    let _g = serial();
    let so = fixture("jupfork");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let c = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    optimized(key);
    let hits = Arc::clone(&c.hits);
    // SAFETY: the child calls, checks and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let before = hits.load(Ordering::SeqCst);
        let ok = (0..20).all(|x| f(x) == x + 3);
        let ok = ok && hits.load(Ordering::SeqCst) == before + 20;
        let ok = ok && code_at(f as usize as u64, 1) == [0xe9];
        // SAFETY: ends the child without the parent's exit hooks.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "the child did not count");
    assert_eq!(f(1), 4);
    assert_eq!(load(&c.hits), 1, "the child's calls are the child's");
    live().unregister(key, &c.consumer).unwrap();
    lib.close();
}

#[test]
fn with_the_optimizer_off_a_uprobe_stays_on_the_trap_path() {
    let _g = serial();
    let so = fixture("jupoff");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let at = f as usize as u64;
    let c = counted(Arc::new(AtomicU64::new(at)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    optimized(key);
    // Off: put back on the trap path at once, and passes do nothing.
    live().jump_optimizer().set_enabled(false);
    assert!(!live().is_optimized(key));
    assert_eq!(code_at(at, 1), [0xcc]);
    let r = live().optimize_now();
    live().jump_optimizer().set_enabled(true);
    assert_eq!(r.optimized, 0);
    assert!(!live().is_optimized(key));
    assert_eq!(code_at(at, 1), [0xcc]);
    for x in 0..10 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&c.hits), 10);
    live().unregister(key, &c.consumer).unwrap();
    assert_eq!(code_at(at, ADD3.len()), ADD3);
    lib.close();
}

/// A return handler on an optimized entry: the entry hijacks the return
/// without a trap (the return lands in the assembly trampoline), and
/// every call's return value is seen once.
#[test]
fn a_return_handler_on_an_optimized_entry_sees_every_return() {
    let _g = serial();
    let so = fixture("jupret");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let sum = Arc::new(AtomicU64::new(0));
    let rets = Arc::new(AtomicU64::new(0));
    let (s, r) = (Arc::clone(&sum), Arc::clone(&rets));
    let c = Consumer::builder()
        .ret_handler(move |ret, _regs| {
            s.fetch_add(ret.retval as u32 as u64, Ordering::SeqCst);
            r.fetch_add(1, Ordering::SeqCst);
        })
        .build();
    let key = register_add3(&so, &c);
    optimized(key);
    std::thread::scope(|sc| {
        for _ in 0..3 {
            sc.spawn(|| {
                for x in 0..1000 {
                    assert_eq!(f(x), x + 3);
                }
            });
        }
    });
    assert_eq!(load(&rets), 3000);
    assert_eq!(load(&sum), 3 * (0..1000u64).map(|x| x + 3).sum::<u64>());
    assert_eq!(c.ret_hits(), 3000);
    live().unregister(key, &c).unwrap();
    assert_eq!(code_at(f as usize as u64, ADD3.len()), ADD3);
    lib.close();
}

/// A pass waiting for its grace period (held up by this thread's read
/// section) while another thread `dlopen`s a library with a pending uprobe
/// (installed by the loader's thread inside its own read section) and
/// registers a second uprobe in it (the registry's hook, with the file's
/// stripe held): neither waits for the pass, which finishes once the read
/// section ends. Were the pass to hold its state lock across the grace
/// period, the registration would wait for it, and the test would hang.
#[test]
fn a_dlopen_and_a_registration_during_a_pass_do_not_wait_for_it() {
    let _g = serial();
    let so = fixture("juppass");
    let other = dl_support::build_so(
        "jumpuprobes",
        "libjuppass2.so",
        &dl_support::add_k_source(&[("fx_add3", 3), ("fx_add5", 5)]),
        &[],
    );
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let c = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    // Pending for the library not loaded yet.
    let pend = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
    let pend_key = live()
        .register(
            &UprobeTarget::symbol(other.to_str().unwrap(), "fx_add3"),
            &pend.consumer,
        )
        .unwrap()
        .key();
    let guard = rcu_registry::rcu::Rcu::global().read();
    let pass_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let pass = s.spawn(|| {
            let r = live().optimize_now();
            pass_done.store(true, Ordering::SeqCst);
            r
        });
        let loader = s.spawn(|| {
            let lib2 = Lib::open(&other);
            let five = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
            let k5 = live()
                .register(
                    &UprobeTarget::symbol(other.to_str().unwrap(), "fx_add5"),
                    &five.consumer,
                )
                .unwrap()
                .key();
            let (f3, f5) = (lib2.func(c"fx_add3"), lib2.func(c"fx_add5"));
            assert_eq!(f3(1), 4);
            assert_eq!(f5(1), 6);
            assert_eq!(load(&five.hits), 1);
            (lib2, k5, five)
        });
        let (lib2, k5, five) = loader.join().unwrap();
        if pass_done.load(Ordering::SeqCst) {
            eprintln!("the pass ended before the read section: the race was not exercised");
        }
        drop(guard);
        let r = pass.join().unwrap();
        eprintln!("pass during the dlopen: {r:?}");
        live().unregister(k5, &five.consumer).unwrap();
        live().unregister(pend_key, &pend.consumer).unwrap();
        lib2.close();
    });
    assert_eq!(load(&pend.hits), 1);
    for x in 0..5 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&c.hits), 5);
    live().unregister(key, &c.consumer).unwrap();
    assert_eq!(code_at(f as usize as u64, ADD3.len()), ADD3);
    lib.close();
}

/// The background pass of the uprobe optimizer: a uprobe registered after
/// it started is optimized without a call to `optimize_now`.
#[test]
fn the_background_pass_optimizes_a_new_uprobe() {
    let _g = serial();
    let so = fixture("jupbackground");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let opt = live().jump_optimizer();
    assert!(opt.start_background(std::time::Duration::from_millis(20)));
    let c = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    // Bounded wait (the pass runs every 20 ms).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !live().is_optimized(key) {
        assert!(
            std::time::Instant::now() < deadline,
            "not optimized within 10 s: {:?}",
            live().jump_refusal(key)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(opt.stop_background());
    for x in 0..10 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&c.hits), 10);
    live().unregister(key, &c.consumer).unwrap();
    assert_eq!(code_at(f as usize as u64, ADD3.len()), ADD3);
    lib.close();
}

/// A kprobe at an address inside an optimized uprobe's displaced bytes
/// (the `jmp`'s displacement is there now) is refused, with the uprobe's
/// text and hits unchanged.
#[test]
fn a_kprobe_inside_an_optimized_uprobes_displaced_bytes_is_refused() {
    let _g = serial();
    let so = fixture("jupkprobe");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let at = f as usize as u64;
    let c = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    optimized(key);
    let before = code_at(at, ADD3.len());
    let kp = rcu_registry::probes::kprobe::Kprobe::at(at + 2).build();
    let r = rcu_registry::probes::runtime::Live::global()
        .registry()
        .register(&kp);
    eprintln!("kprobe inside the displaced bytes: {r:?}");
    assert!(r.is_err(), "registered inside the jmp: {r:?}");
    assert_eq!(code_at(at, ADD3.len()), before);
    assert_eq!(f(1), 4);
    assert_eq!(load(&c.hits), 1);
    live().unregister(key, &c.consumer).unwrap();
    assert_eq!(code_at(at, ADD3.len()), ADD3);
    lib.close();
}

/// The return trampoline of the live uprobes is the kretprobes' assembly
/// trampoline (a return without a trap).
fn returns_through_the_assembly_trampoline() {
    use rcu_registry::probes::uprobe::AddressSpace;
    assert_eq!(
        live().space().return_trampoline(),
        Some(rcu_registry::probes::runtime::trampoline_address()),
        "the uprobe space's trampoline is the assembly one"
    );
}

/// Runs `body` in a fork child whose threads have SIGTRAP blocked: a trap
/// then kills the child with SIGTRAP (the kernel unblocks a synchronous
/// signal and resets its handler). The child's exit status: 0 if `body`
/// returned true.
fn in_child_without_traps(body: impl FnOnce() -> bool) -> libc::c_int {
    // SAFETY: the child runs `body` and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // Threads this one starts inherit the mask.
        // SAFETY: a set built from empty, SIGTRAP added, blocked here.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTRAP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let ok = body();
        // SAFETY: ends the child without the parent's exit hooks.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

/// A return-handler consumer counting returns and summing the 32-bit
/// return values.
struct Returns {
    rets: Arc<AtomicU64>,
    sum: Arc<AtomicU64>,
    consumer: Consumer,
}

fn returns(opt_out: bool) -> Returns {
    let rets = Arc::new(AtomicU64::new(0));
    let sum = Arc::new(AtomicU64::new(0));
    let (r, s) = (Arc::clone(&rets), Arc::clone(&sum));
    let consumer = Consumer::builder()
        .ret_handler(move |ret, _regs| {
            s.fetch_add(ret.retval as u32 as u64, Ordering::SeqCst);
            r.fetch_add(1, Ordering::SeqCst);
        })
        .jump_opt_out(opt_out)
        .build();
    Returns {
        rets,
        sum,
        consumer,
    }
}

/// An optimized uretprobe: entry through the detour, return through the
/// assembly trampoline, so neither takes a trap. Counted exactly from four
/// threads (return values summed) in this process; then in a fork child
/// whose threads block SIGTRAP, where any trap would kill the child, the
/// same calls are counted exactly and the child lives. The control: the
/// same child with the uprobe on the trap path (an opted-out consumer) is
/// killed by SIGTRAP at the first call.
#[test]
fn an_optimized_uretprobe_returns_without_a_trap_from_four_threads() {
    let _g = serial();
    returns_through_the_assembly_trampoline();
    let so = fixture("jupretnotrap");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let r = returns(false);
    let key = register_add3(&so, &r.consumer);
    optimized(key);
    const THREADS: i32 = 4;
    const CALLS: i32 = 20_000;
    let run = move || {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..THREADS)
                .map(|t| {
                    s.spawn(move || {
                        (0..CALLS).all(|x| f(x + t) == x + t + 3)
                            && live().registry().return_depth(live().space_id()) == 0
                    })
                })
                .collect();
            hs.into_iter().all(|h| h.join().unwrap())
        })
    };
    let want_sum: u64 = (0..THREADS)
        .flat_map(|t| (0..CALLS).map(move |x| (x + t + 3) as u64))
        .sum();
    let want = (THREADS * CALLS) as u64;
    assert!(run(), "a wrong result or a frame left");
    assert_eq!(load(&r.rets), want);
    assert_eq!(load(&r.sum), want_sum, "every return value seen once");
    assert_eq!(live().registry().nmissed(key), 0);
    let (rets, sum) = (Arc::clone(&r.rets), Arc::clone(&r.sum));
    let status = in_child_without_traps(|| {
        let before = (load(&rets), load(&sum));
        run() && load(&rets) == before.0 + want && load(&sum) == before.1 + want_sum
    });
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child with SIGTRAP blocked: status {status:#x} (signal {})",
        libc::WTERMSIG(status)
    );
    // The control: a trap-path entry in such a child is fatal.
    let trap = returns(true);
    assert_eq!(register_add3(&so, &trap.consumer), key);
    assert!(
        !live().is_optimized(key),
        "the opt-out put it on the trap path"
    );
    let status = in_child_without_traps(|| f(1) == 4);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTRAP,
        "a trap with SIGTRAP blocked must kill the child: status {status:#x}"
    );
    live().unregister(key, &trap.consumer).unwrap();
    live().unregister(key, &r.consumer).unwrap();
    assert_eq!(code_at(f as usize as u64, ADD3.len()), ADD3);
    lib.close();
}

/// `fx_inner(x) = x + 3` (the add-k bytes) and `fx_outer(x) =
/// fx_inner(2x)` by a tail call: `add edi, edi; jmp fx_inner`, so both
/// entries see the same return address slot.
fn chain_fixture(name: &str) -> PathBuf {
    dl_support::build_so(
        "jumpuprobes",
        &format!("lib{name}.so"),
        "__asm__(\n\
         \".text\\n.p2align 4\\n.globl fx_inner\\n.type fx_inner,@function\\nfx_inner:\\n\"\n\
         \".Linner:\\n.byte 0x89, 0xf8, 0x83, 0xc0, 0x03, 0xc3\\n.size fx_inner, . - fx_inner\\n\"\n\
         \".p2align 4\\n.globl fx_outer\\n.type fx_outer,@function\\nfx_outer:\\n\"\n\
         \"add %edi, %edi\\njmp .Linner\\n.size fx_outer, . - fx_outer\\n\"\n);\n",
        &[],
    )
}

/// A uretprobe and a kretprobe on one call's return: a kretprobed function
/// tail-calls a uretprobed one (the kretprobe hijacks the return first and
/// the uprobe entry finds the trampoline already there), and the other
/// way round. Both return handlers run once per call with the return
/// value, the call returns to its caller with the right value, and
/// neither leaves a frame behind.
#[test]
fn a_uretprobe_and_a_kretprobe_on_one_return_both_run() {
    use rcu_registry::probes::kprobe::Kretprobe;
    let _g = serial();
    let so = chain_fixture("jupchain");
    let lib = Lib::open(&so);
    let (outer, inner) = (lib.func(c"fx_outer"), lib.func(c"fx_inner"));
    let kreg = rcu_registry::probes::runtime::Live::global().registry();
    for uprobe_outside in [false, true] {
        let (ufn, kfn) = if uprobe_outside {
            ("fx_outer", inner)
        } else {
            ("fx_inner", outer)
        };
        let r = returns(false);
        let key = live()
            .register(
                &UprobeTarget::symbol(so.to_str().unwrap(), ufn),
                &r.consumer,
            )
            .unwrap()
            .key();
        let ksum = Arc::new(AtomicU64::new(0));
        let k2 = Arc::clone(&ksum);
        let krp = Kretprobe::at(kfn as usize as u64)
            .handler(move |_, _regs, ret| {
                k2.fetch_add(ret as u32 as u64, Ordering::SeqCst);
            })
            .build()
            .unwrap();
        kreg.register(&krp).unwrap();
        let report = live().optimize_now();
        eprintln!(
            "uprobe on {ufn}: optimized {} ({report:?})",
            live().is_optimized(key)
        );
        const CALLS: i32 = 1000;
        std::thread::scope(|s| {
            for t in 0..2 {
                s.spawn(move || {
                    for x in 0..CALLS {
                        assert_eq!(outer(x + t), 2 * (x + t) + 3);
                    }
                });
            }
        });
        let want: u64 = (0..2)
            .flat_map(|t| (0..CALLS).map(move |x| (2 * (x + t) + 3) as u64))
            .sum();
        assert_eq!(load(&r.rets), 2 * CALLS as u64, "uprobe on {ufn}");
        assert_eq!(load(&r.sum), want, "uprobe on {ufn}");
        assert_eq!(krp.returns(), 2 * CALLS as u64, "uprobe on {ufn}");
        assert_eq!(load(&ksum), want, "uprobe on {ufn}");
        assert_eq!((krp.nmissed(), krp.in_flight()), (0, 0));
        assert_eq!(live().registry().nmissed(key), 0);
        assert_eq!(live().registry().return_depth(live().space_id()), 0);
        kreg.unregister(&krp).unwrap();
        live().unregister(key, &r.consumer).unwrap();
    }
    assert_eq!(outer(1), 5);
    lib.close();
}

/// A uretprobe on a recursive function: every level's return is seen with
/// its own return value, innermost first, and the stack is empty after.
#[test]
fn a_uretprobe_on_a_recursive_function_sees_every_level() {
    let _g = serial();
    let so = dl_support::build_so(
        "jumpuprobes",
        "libjuprec.so",
        "__attribute__((noinline)) int fx_rec(int n) {\n\
         \x20   if (n <= 0) return 0;\n\
         \x20   return n + fx_rec(n - 1);\n\
         }\n",
        &["-fno-optimize-sibling-calls"],
    );
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_rec");
    // Level n returns n(n+1)/2; the innermost (n = 0) returns first.
    let seen = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let (s2, w2) = (Arc::clone(&seen), Arc::clone(&wrong));
    let c = Consumer::builder()
        .ret_handler(move |ret, _regs| {
            let n = s2.fetch_add(1, Ordering::SeqCst);
            if ret.retval as u32 as u64 != n * (n + 1) / 2 {
                w2.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build();
    let key = live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "fx_rec"), &c)
        .unwrap()
        .key();
    let report = live().optimize_now();
    eprintln!("fx_rec optimized {} ({report:?})", live().is_optimized(key));
    const DEPTH: i32 = 40;
    assert_eq!(f(DEPTH), DEPTH * (DEPTH + 1) / 2);
    assert_eq!(load(&seen), DEPTH as u64 + 1, "each level once");
    assert_eq!(load(&wrong), 0, "innermost first, each with its value");
    assert_eq!(live().registry().nmissed(key), 0);
    assert_eq!(live().registry().return_depth(live().space_id()), 0);
    live().unregister(key, &c).unwrap();
    lib.close();
}

/// A uretprobe on a function left by `longjmp`: the abandoned frame stays
/// on the thread's return stack until the next tracked entry at the same
/// depth drops it; the calls that return run the handler once each, and
/// nothing is left after.
#[test]
fn a_uretprobe_frame_left_by_longjmp_is_dropped_by_the_next_entry() {
    let _g = serial();
    let so = dl_support::build_so(
        "jumpuprobes",
        "libjuplongjmp.so",
        "#include <setjmp.h>\n\
         static jmp_buf jb;\n\
         __attribute__((noinline)) int fx_leave(int x) {\n\
         \x20   if (x < 0) longjmp(jb, 1);\n\
         \x20   return x + 3;\n\
         }\n\
         __attribute__((noinline)) int fx_try(int x) {\n\
         \x20   if (setjmp(jb)) return -1;\n\
         \x20   return fx_leave(x);\n\
         }\n",
        &["-fno-optimize-sibling-calls"],
    );
    let lib = Lib::open(&so);
    let try_ = lib.func(c"fx_try");
    let r = returns(false);
    let key = live()
        .register(
            &UprobeTarget::symbol(so.to_str().unwrap(), "fx_leave"),
            &r.consumer,
        )
        .unwrap()
        .key();
    let report = live().optimize_now();
    eprintln!(
        "fx_leave optimized {} ({report:?})",
        live().is_optimized(key)
    );
    let depth = || live().registry().return_depth(live().space_id());
    for round in 0..3 {
        assert_eq!(try_(-1), -1, "round {round}");
        assert_eq!(depth(), 1, "round {round}: the abandoned frame");
        assert_eq!(try_(4), 7, "round {round}");
        assert_eq!(depth(), 0, "round {round}: dropped by the entry");
    }
    assert_eq!(load(&r.rets), 3, "only the calls that returned");
    assert_eq!(load(&r.sum), 21);
    live().unregister(key, &r.consumer).unwrap();
    lib.close();
}

/// A thread that exits (`pthread_exit`) inside a uretprobed call: its
/// return stack goes back to the pool at its exit (the unwinder stops at
/// the hijacked return address, the assembly trampoline, which has no
/// unwind information, and the thread ends there), no return handler runs
/// for it, and a later call on another thread returns through the
/// trampoline as usual.
#[test]
fn a_thread_exiting_inside_a_uretprobed_call_gives_its_return_stack_back() {
    let _g = serial();
    let so = dl_support::build_so(
        "jumpuprobes",
        "libjupexit.so",
        "#include <pthread.h>\n\
         __attribute__((noinline)) int fx_quit(int x) {\n\
         \x20   if (x < 0) pthread_exit(0);\n\
         \x20   return x + 3;\n\
         }\n\
         static void *fx_body(void *a) {\n\
         \x20   static volatile int out;\n\
         \x20   out = fx_quit((int)(long)a);\n\
         \x20   return 0;\n\
         }\n\
         int fx_thread(int x) {\n\
         \x20   pthread_t t;\n\
         \x20   if (pthread_create(&t, 0, fx_body, (void *)(long)x)) return -1;\n\
         \x20   return pthread_join(t, 0);\n\
         }\n",
        &["-pthread"],
    );
    let lib = Lib::open(&so);
    let spawn = lib.func(c"fx_thread");
    let r = returns(false);
    let key = live()
        .register(
            &UprobeTarget::symbol(so.to_str().unwrap(), "fx_quit"),
            &r.consumer,
        )
        .unwrap()
        .key();
    let report = live().optimize_now();
    eprintln!(
        "fx_quit optimized {} ({report:?})",
        live().is_optimized(key)
    );
    let in_use = || live().registry().return_stacks_in_use(live().space_id());
    let before = in_use();
    for round in 0..3 {
        assert_eq!(spawn(-1), 0, "round {round}");
        assert_eq!(in_use(), before, "round {round}: the exit gave it back");
        assert_eq!(load(&r.rets), round, "no handler for a call never returned");
        assert_eq!(spawn(4), 0, "round {round}");
        assert_eq!(load(&r.rets), round + 1);
        assert_eq!(in_use(), before);
    }
    assert_eq!(load(&r.sum), 3 * 7);
    assert_eq!(live().registry().nmissed(key), 0);
    live().unregister(key, &r.consumer).unwrap();
    lib.close();
}

/// The fork-during-a-pass test's rendezvous: the pass paused with its lock
/// held, the fork handler about to take that lock. `SeqCst` throughout:
/// flags of one test, read in loops, nothing else published through them.
static PASS_PAUSED: AtomicU64 = AtomicU64::new(0);
static FORK_WAITING: AtomicU64 = AtomicU64::new(0);
/// Whether the paused pass saw the fork handler arrive (within its bound).
static PASS_SAW_FORK: AtomicU64 = AtomicU64::new(0);

/// The pass hook: the first pass after it is set pauses until the fork
/// handler is about to take the pass lock (bounded: without the handler's
/// hold the fork never tells, and the pass goes on after 20 s).
fn pause_pass_until_fork() {
    if PASS_PAUSED.swap(1, Ordering::SeqCst) != 0 {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while FORK_WAITING.load(Ordering::SeqCst) == 0 {
        if std::time::Instant::now() > deadline {
            return;
        }
        std::thread::yield_now();
    }
    PASS_SAW_FORK.store(1, Ordering::SeqCst);
}

fn note_fork_waiting() {
    FORK_WAITING.store(1, Ordering::SeqCst);
}

/// A `fork` while a uprobe optimizer pass is under way (paused by a test
/// hook with its pass lock held, the fork started once it is): the fork
/// handler waits for the pass (it holds the pass lock and the optimizer's
/// state lock across the fork), so the child finds them free and can run
/// a pass that optimizes a uprobe it registers, count through it, and
/// unregister both uprobes, the text back to the file's bytes. Were the
/// lock left held, the child's pass would wait for good (its alarm kills
/// it and the test fails).
#[test]
fn a_fork_during_a_uprobe_pass_leaves_the_child_able_to_optimize_and_unregister() {
    use rcu_registry::__internals::runtime::uprobe_jump::{set_fork_hook, set_pass_hook};
    let _g = serial();
    let so = dl_support::build_so(
        "jumpuprobes",
        "libjupforkpass.so",
        &dl_support::add_k_source(&[("fx_add3", 3), ("fx_add5", 5)]),
        &[],
    );
    let lib = Lib::open(&so);
    let (f3, f5) = (lib.func(c"fx_add3"), lib.func(c"fx_add5"));
    let c = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
    let key = register_add3(&so, &c.consumer);
    PASS_PAUSED.store(0, Ordering::SeqCst);
    FORK_WAITING.store(0, Ordering::SeqCst);
    PASS_SAW_FORK.store(0, Ordering::SeqCst);
    set_fork_hook(Some(note_fork_waiting));
    set_pass_hook(Some(pause_pass_until_fork));
    let (pid, report) = std::thread::scope(|s| {
        let pass = s.spawn(|| live().optimize_now());
        while PASS_PAUSED.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // SAFETY: the child works through `live()`, then leaves by _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // A lock left held would make the child wait for good.
            // SAFETY: a watchdog alarm for the child alone.
            unsafe { libc::alarm(30) };
            let five = counted(Arc::new(AtomicU64::new(0)), Vec::new(), false);
            let k5 = live()
                .register(
                    &UprobeTarget::symbol(so.to_str().unwrap(), "fx_add5"),
                    &five.consumer,
                )
                .unwrap()
                .key();
            let _ = live().optimize_now();
            let mut ok = live().is_optimized(k5) && live().is_optimized(key);
            ok &= f5(1) == 6 && load(&five.hits) == 1;
            ok &= live().unregister(k5, &five.consumer).is_ok();
            ok &= live().unregister(key, &c.consumer).is_ok();
            ok &= code_at(f3 as usize as u64, ADD3.len()) == ADD3;
            ok &= f3(1) == 4 && f5(1) == 6;
            // SAFETY: ends the child without the parent's exit hooks.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        (pid, pass.join().unwrap())
    });
    set_pass_hook(None);
    set_fork_hook(None);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child could not optimize and unregister: status {status:#x} (signal {})",
        libc::WTERMSIG(status)
    );
    assert_eq!(
        load(&PASS_SAW_FORK),
        1,
        "the fork handler did not wait for the paused pass ({report:?})"
    );
    assert!(live().is_optimized(key), "the parent's pass: {report:?}");
    assert_eq!(f3(1), 4);
    assert_eq!(load(&c.hits), 1, "the child's calls are the child's");
    live().unregister(key, &c.consumer).unwrap();
    assert_eq!(code_at(f3 as usize as u64, ADD3.len()), ADD3);
    lib.close();
}

/// A uprobe registered inside an optimized uprobe's displaced bytes (the
/// `add` two bytes into `fx_add3`, where the `jmp`'s displacement is):
/// the optimized site goes back to the trap path first, so the new one is
/// installed over the original instruction, not over the displacement.
/// Both count every call; after both are gone the file's bytes are back,
/// exactly.
#[test]
fn a_uprobe_registered_inside_an_optimized_uprobes_displaced_bytes_is_installed_on_the_original_code(
) {
    let _g = serial();
    let so = fixture("jupinside");
    let lib = Lib::open(&so);
    let f = lib.func(c"fx_add3");
    let at = f as usize as u64;
    let entry = counted(Arc::new(AtomicU64::new(at)), Vec::new(), false);
    let key = register_add3(&so, &entry.consumer);
    optimized(key);
    assert_eq!(code_at(at, 1), [0xe9]);
    let inner = counted(Arc::new(AtomicU64::new(at + 2)), Vec::new(), false);
    let inner_key = live()
        .register(
            &UprobeTarget::symbol(so.to_str().unwrap(), "fx_add3").offset(2),
            &inner.consumer,
        )
        .expect("a uprobe inside the displaced bytes registers")
        .key();
    assert!(
        !live().is_optimized(key),
        "the entry is back on the trap path"
    );
    assert_eq!(
        code_at(at, 3),
        [0xcc, ADD3[1], 0xcc],
        "two breakpoints on the original code"
    );
    for x in 0..100 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(load(&entry.hits), 100);
    assert_eq!(load(&inner.hits), 100);
    assert_eq!(
        load(&entry.wrong) + load(&inner.wrong),
        0,
        "a handler saw the wrong ip"
    );
    // A pass leaves the entry on the trap path: the other uprobe is inside.
    live().optimize_now();
    assert!(!live().is_optimized(key));
    assert_eq!(f(1), 4);
    assert_eq!((load(&entry.hits), load(&inner.hits)), (101, 101));
    live().unregister(inner_key, &inner.consumer).unwrap();
    live().unregister(key, &entry.consumer).unwrap();
    assert_eq!(code_at(at, ADD3.len()), ADD3);
    assert_eq!(f(2), 5);
    live().optimize_now();
    lib.close();
}
