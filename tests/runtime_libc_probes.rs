//! The C library is probeable: the live runtime's trap path calls no
//! C-library function, so `free`, `calloc`, `clock_gettime`, `strlen` and
//! `memcpy` take kprobes (and `calloc` a kretprobe) resolved by name as a
//! user would, and their calls are counted exactly while other threads (and
//! the runtime itself) call the same functions. Before, every one of them
//! was refused as "code the trap path calls" (`RefusedTarget`).
//!
//! Counting is exact because each handler counts only calls with this
//! test's unique arguments (a pointer only this test passes, a size no one
//! else asks for): hits from other threads and from the runtime are seen
//! too, and must not disturb the count (nor crash the process).

mod runtime_support;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::__internals::runtime::in_trap;
use rcu_registry::probes::kprobe::{Action, EntryAction, Kprobe, Kretprobe};
use rcu_registry::probes::runtime::{Live, LiveRegistry};
use runtime_support::serial;

type StrLen = unsafe extern "C" fn(*const libc::c_char) -> usize;
type MemCpy =
    unsafe extern "C" fn(*mut libc::c_void, *const libc::c_void, usize) -> *mut libc::c_void;

type Calloc = unsafe extern "C" fn(libc::size_t, libc::size_t) -> *mut libc::c_void;
type Malloc = unsafe extern "C" fn(libc::size_t) -> *mut libc::c_void;
type Free = unsafe extern "C" fn(*mut libc::c_void);

/// The allocator's functions through opaque pointers: the compiler may not
/// elide a `calloc` whose result is only freed.
fn allocator() -> (Calloc, Malloc, Free) {
    black_box((
        libc::calloc as Calloc,
        libc::malloc as Malloc,
        libc::free as Free,
    ))
}

/// Calls with magic arguments per function.
const N: u64 = 200;
/// `calloc(CALLOC_N, CALLOC_SIZE)`: a size nobody else asks for.
const CALLOC_N: u64 = 7919;
const CALLOC_SIZE: u64 = 3;

/// A probe on `name` whose pre handler counts the hits `wanted` accepts.
fn counting(
    name: &str,
    count: &Arc<AtomicU64>,
    wanted: impl Fn(&rcu_registry::probes::arch::Regs) -> bool + Send + Sync + 'static,
) -> Kprobe {
    let c = Arc::clone(count);
    Kprobe::symbol(name, 0)
        .pre(move |_p, regs| {
            if wanted(regs) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            Action::Continue
        })
        .build()
}

fn register(reg: &LiveRegistry, p: &Kprobe, name: &str) {
    if let Err(e) = reg.register(p) {
        panic!("probing {name}: {e}");
    }
}

/// Threads calling the probed functions with ordinary arguments until
/// `stop`: their hits must not disturb the exact counts, nor the process.
fn noise(stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<u64>> {
    (0..2)
        .map(|_| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                let strlen = black_box(libc::strlen as StrLen);
                let memcpy = black_box(libc::memcpy as MemCpy);
                while !stop.load(Ordering::Relaxed) {
                    let v: Vec<u8> = (0..64).collect();
                    let mut w = vec![0u8; 64];
                    let s = std::ffi::CString::new("noise").unwrap();
                    let mut ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    // SAFETY: valid buffers and C strings; calloc's result
                    // is freed.
                    unsafe {
                        assert_eq!(strlen(s.as_ptr()), 5);
                        memcpy(w.as_mut_ptr().cast(), v.as_ptr().cast(), 64);
                        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
                        let (calloc, _, free) = allocator();
                        free(calloc(4, 4));
                    }
                    assert_eq!(v, w);
                    rounds += 1;
                }
                rounds
            })
        })
        .collect()
}

#[test]
fn free_calloc_clock_gettime_strlen_and_memcpy_are_counted_exactly() {
    let _g = serial();
    let reg = Live::global().registry();

    // free: N pointers this thread allocated, freed by this thread (another
    // thread may be given the same address after us and free it too).
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    // Only inside the calling loop: after it, this thread's own
    // allocations may get the same addresses back and free them.
    let ptrs: Arc<Vec<AtomicU64>> = Arc::new((0..N).map(|_| AtomicU64::new(0)).collect());
    let window = Arc::new(AtomicBool::new(false));
    let frees = Arc::new(AtomicU64::new(0));
    let (mine, open) = (Arc::clone(&ptrs), Arc::clone(&window));
    let free_probe = counting("free", &frees, move |regs| {
        let a = regs.arg(0).unwrap_or(0);
        // SAFETY: as above (the handler may call the C library).
        a != 0
            && open.load(Ordering::Relaxed)
            && unsafe { libc::gettid() } == me
            && mine.iter().any(|p| p.load(Ordering::Relaxed) == a)
    });
    // calloc: an entry probe and a kretprobe, both on the magic size.
    let callocs = Arc::new(AtomicU64::new(0));
    let calloc_probe = counting("calloc", &callocs, |regs| {
        regs.arg(0) == Some(CALLOC_N) && regs.arg(1) == Some(CALLOC_SIZE)
    });
    let calloc_returns = Arc::new(AtomicU64::new(0));
    let cr = Arc::clone(&calloc_returns);
    let calloc_ret = Kretprobe::symbol("calloc", 0)
        .data::<bool>()
        .entry_handler(|magic, regs| {
            *magic = regs.arg(0) == Some(CALLOC_N) && regs.arg(1) == Some(CALLOC_SIZE);
            EntryAction::Track
        })
        .handler(move |magic, _regs, ret| {
            if *magic && ret != 0 {
                cr.fetch_add(1, Ordering::Relaxed);
            }
        })
        .build()
        .unwrap();
    // clock_gettime: a timespec only this test passes.
    let ts = Box::new(libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    });
    let ts_at = &*ts as *const libc::timespec as u64;
    let clocks = Arc::new(AtomicU64::new(0));
    let clock_probe = counting("clock_gettime", &clocks, move |regs| {
        regs.arg(1) == Some(ts_at)
    });
    // strlen: a string only this test passes.
    let unique = std::ffi::CString::new("rcu-registry libc probe").unwrap();
    let unique_at = unique.as_ptr() as u64;
    let strlens = Arc::new(AtomicU64::new(0));
    let strlen_probe = counting("strlen", &strlens, move |regs| {
        regs.arg(0) == Some(unique_at)
    });
    // memcpy: a destination only this test passes.
    let mut dst = vec![0u8; 96];
    let dst_at = dst.as_mut_ptr() as u64;
    let memcpys = Arc::new(AtomicU64::new(0));
    let memcpy_probe = counting("memcpy", &memcpys, move |regs| regs.arg(0) == Some(dst_at));

    for (p, name) in [
        (&free_probe, "free"),
        (&calloc_probe, "calloc"),
        (&clock_probe, "clock_gettime"),
        (&strlen_probe, "strlen"),
        (&memcpy_probe, "memcpy"),
    ] {
        register(reg, p, name);
    }
    reg.register(&calloc_ret)
        .unwrap_or_else(|e| panic!("kretprobe on calloc: {e}"));

    let stop = Arc::new(AtomicBool::new(false));
    let threads = noise(&stop);
    let strlen = black_box(libc::strlen as StrLen);
    let memcpy = black_box(libc::memcpy as MemCpy);
    let src: Vec<u8> = (0..96).map(|i| i as u8 ^ 0x5a).collect();
    let mut ts = ts;
    let (calloc, malloc, free) = allocator();
    window.store(true, Ordering::Relaxed);
    for i in 0..N as usize {
        // SAFETY: valid C strings, buffers and out-pointers; what calloc and
        // malloc return is freed exactly once.
        unsafe {
            assert_eq!(strlen(black_box(unique.as_ptr())), 23);
            memcpy(black_box(dst.as_mut_ptr()).cast(), src.as_ptr().cast(), 96);
            assert_eq!(
                libc::clock_gettime(libc::CLOCK_MONOTONIC, black_box(&mut *ts)),
                0
            );
            let c = calloc(CALLOC_N as usize, CALLOC_SIZE as usize);
            assert!(!c.is_null());
            free(black_box(c));
            let p = malloc(32);
            assert!(!p.is_null());
            ptrs[i].store(p as u64, Ordering::Relaxed);
            free(black_box(p));
        }
        assert_eq!(dst, src);
    }
    window.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let rounds: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();

    for p in [
        &free_probe,
        &calloc_probe,
        &clock_probe,
        &strlen_probe,
        &memcpy_probe,
    ] {
        reg.unregister(p).unwrap();
    }
    reg.unregister(&calloc_ret).unwrap();
    println!(
        "counted exactly with {rounds} noise rounds on 2 threads; hits (all callers): \
         free {}, calloc {}, clock_gettime {}, strlen {}, memcpy {}",
        free_probe.hits(),
        calloc_probe.hits(),
        clock_probe.hits(),
        strlen_probe.hits(),
        memcpy_probe.hits()
    );
    assert_eq!(strlens.load(Ordering::Relaxed), N, "strlen");
    assert_eq!(memcpys.load(Ordering::Relaxed), N, "memcpy");
    assert_eq!(clocks.load(Ordering::Relaxed), N, "clock_gettime");
    assert_eq!(callocs.load(Ordering::Relaxed), N, "calloc");
    assert_eq!(calloc_returns.load(Ordering::Relaxed), N, "calloc returns");
    // Each pointer was freed once, by this thread, after it was stored.
    assert_eq!(frees.load(Ordering::Relaxed), N, "free");
    assert_eq!(reg.len(), 0);
}

#[test]
fn free_of_distinct_pointers_is_counted_exactly() {
    let _g = serial();
    let reg = Live::global().registry();
    // All allocated first (distinct addresses), then freed: each address
    // is freed by this test exactly once while the probe is on.
    let ptrs: Vec<u64> = (0..N)
        // SAFETY: malloc of a small block; freed below.
        .map(|_| unsafe { libc::malloc(48) } as u64)
        .collect();
    assert!(ptrs.iter().all(|&p| p != 0));
    let set: Arc<std::collections::HashSet<u64>> = Arc::new(ptrs.iter().copied().collect());
    assert_eq!(set.len(), N as usize);
    let frees = Arc::new(AtomicU64::new(0));
    // Only inside the freeing loop: after it, this thread's own allocations
    // (unregistration's) may get the same addresses back and free them.
    let window = Arc::new(AtomicBool::new(false));
    let (mine, open) = (Arc::clone(&set), Arc::clone(&window));
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let probe = counting("free", &frees, move |regs| {
        // SAFETY: as above (the handler may call the C library).
        open.load(Ordering::Relaxed)
            && regs.arg(0).is_some_and(|a| mine.contains(&a))
            && unsafe { libc::gettid() } == me
    });
    register(reg, &probe, "free");
    let stop = Arc::new(AtomicBool::new(false));
    let threads = noise(&stop);
    let (_, _, free) = allocator();
    window.store(true, Ordering::Relaxed);
    for &p in &ptrs {
        // SAFETY: allocated above, freed once.
        unsafe { free(p as *mut libc::c_void) };
    }
    window.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    reg.unregister(&probe).unwrap();
    assert_eq!(frees.load(Ordering::Relaxed), N);
}

#[test]
fn system_call_wrappers_take_probes_and_survive_hits() {
    let _g = serial();
    let reg = Live::global().registry();
    let probes: Vec<(&str, Kprobe)> = [
        "mmap",
        "munmap",
        "mprotect",
        "getpid",
        "sigprocmask",
        "syscall",
    ]
    .into_iter()
    .map(|name| (name, Kprobe::symbol(name, 0).build()))
    .collect();
    for (name, p) in &probes {
        register(reg, p, name);
    }
    for _ in 0..10 {
        // SAFETY: an anonymous page mapped, protected and unmapped; a
        // signal mask read and set back; getpid and a raw getpid.
        unsafe {
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(page, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ), 0);
            assert_eq!(libc::munmap(page, 4096), 0);
            let mut old: libc::sigset_t = std::mem::zeroed();
            assert_eq!(
                libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut old),
                0
            );
            assert_eq!(
                libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()),
                0
            );
            assert_eq!(
                libc::getpid() as libc::c_long,
                libc::syscall(libc::SYS_getpid)
            );
        }
    }
    for (name, p) in &probes {
        reg.unregister(p).unwrap();
        assert!(p.hits() >= 10, "{name}: {} hits", p.hits());
    }
}

#[test]
fn the_runtime_s_own_c_library_calls_are_nested_traps_counted_missed() {
    let _g = serial();
    let reg = Live::global().registry();
    // A thread's first trap reads errno's location (a C-library call, past
    // the trap flag): with a probe there, that is a nested trap.
    let errno = Kprobe::symbol("__errno_location", 0).build();
    register(reg, &errno, "__errno_location");
    // A thread's first trap arms its reader slot's release at exit
    // (pthread_setspecific), past the flag too.
    let setspecific = Kprobe::symbol("pthread_setspecific", 0).build();
    register(reg, &setspecific, "pthread_setspecific");
    let unique = std::ffi::CString::new("nested").unwrap();
    let unique_at = unique.as_ptr() as u64;
    let hits = Arc::new(AtomicU64::new(0));
    let in_trap_seen = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&in_trap_seen);
    let h = Arc::clone(&hits);
    let strlen_probe = Kprobe::symbol("strlen", 0)
        .pre(move |_p, regs| {
            if regs.arg(0) == Some(unique_at) {
                h.fetch_add(1, Ordering::Relaxed);
                seen.store(in_trap(), Ordering::Relaxed);
            }
            Action::Continue
        })
        .build();
    register(reg, &strlen_probe, "strlen");
    let strlen = black_box(libc::strlen as StrLen);
    let run = move || {
        for _ in 0..N {
            // SAFETY: a valid C string.
            assert_eq!(
                unsafe { strlen(black_box(unique_at as *const libc::c_char)) },
                6
            );
        }
    };
    run();
    // New threads: their first trap claims and arms a reader slot.
    for _ in 0..4 {
        std::thread::spawn(run).join().unwrap();
    }
    reg.unregister(&strlen_probe).unwrap();
    reg.unregister(&errno).unwrap();
    reg.unregister(&setspecific).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 5 * N);
    assert!(
        in_trap_seen.load(Ordering::Relaxed),
        "handlers run inside the trap flag"
    );
    println!(
        "__errno_location: {} hits, {} missed; pthread_setspecific: {} hits, {} missed",
        errno.hits(),
        errno.nmissed(),
        setspecific.hits(),
        setspecific.nmissed()
    );
    // One errno lookup per thread's first trap (the four new threads at
    // least), each nested in the runtime's own trap handling: counted
    // missed, never recursed into. Not one per trap: the location is
    // recorded per thread.
    assert!(errno.nmissed() >= 4, "{}", errno.nmissed());
    assert!(errno.nmissed() < N, "{}", errno.nmissed());
    assert!(setspecific.nmissed() >= 4, "{}", setspecific.nmissed());
    assert!(!in_trap(), "the flag is down outside trap handling");
}
