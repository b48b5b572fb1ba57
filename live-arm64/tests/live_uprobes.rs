//! Live uprobes in this process on arm64: the C library probed by
//! `libc.so.6:SYMBOL` (found through the loader's list and the file on
//! disk), every call counted from several threads, return values seen by
//! return handlers (the return hijacked to a `brk` in an XOL slot), and a
//! uprobe on a library not loaded yet installed by `dlopen` (the loader
//! watch's breakpoint at the dynamic linker's `r_brk`).
//!
//! Live uprobes need the dynamic linker's rendezvous (the loader watch), so
//! these tests run in the dynamically linked build (`scripts/test-arm64
//! --dynamic`, `qemu-aarch64 -L /`); in the static one each prints why it
//! is skipped. Natively (x86_64) they run as well.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rcu_registry::probes::runtime::LiveUprobes;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeTarget};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live uprobes, or `None` (with the reason printed) in a statically
/// linked binary, which has no dynamic linker to watch.
fn live() -> Option<&'static LiveUprobes> {
    let linked_statically = cfg!(target_feature = "crt-static");
    match LiveUprobes::global() {
        Ok(l) => Some(l),
        Err(e) if linked_statically => {
            println!(
                "skipped: statically linked ({e}); run scripts/test-arm64 --dynamic for live uprobes"
            );
            None
        }
        Err(e) => panic!("live uprobes in a dynamically linked binary: {e}"),
    }
}

/// `getppid` through the C library's exported function (what a probe on
/// `libc.so.6:getppid` sees), never inlined into a raw system call.
fn getppid() -> libc::pid_t {
    // SAFETY: getppid has no preconditions.
    unsafe { std::hint::black_box(libc::getppid as unsafe extern "C" fn() -> libc::pid_t)() }
}

#[test]
fn every_call_of_a_c_library_function_is_counted_from_two_threads() {
    let _g = serial();
    let Some(live) = live() else { return };
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let c = Consumer::builder()
        .handler(move |_hit, _regs| {
            // SeqCst: read after the threads are joined; no pairing needed.
            h.fetch_add(1, Ordering::SeqCst);
            ConsumerAction::Continue
        })
        .build();
    let target = UprobeTarget::parse("libc.so.6:getppid").unwrap();
    let resolved = live.register(&target, &c).unwrap();
    let parent = getppid();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..1_000 {
                    assert_eq!(getppid(), parent);
                }
            });
        }
    });
    live.unregister(resolved.key(), &c).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 2_001);
    for _ in 0..10 {
        getppid();
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2_001,
        "no hit after unregister"
    );
}

#[test]
fn a_return_handler_sees_each_return_value() {
    let _g = serial();
    let Some(live) = live() else { return };
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = Arc::clone(&seen);
    let c = Consumer::builder()
        .handler(|_, _| ConsumerAction::Continue)
        .ret_handler(move |_ret, regs| s.lock().unwrap().push(regs.retval()))
        .build();
    let target = UprobeTarget::parse("libc.so.6:getppid").unwrap();
    let resolved = live.register(&target, &c).unwrap();
    let parent = getppid() as u64;
    for _ in 0..4 {
        assert_eq!(getppid() as u64, parent);
    }
    live.unregister(resolved.key(), &c).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![parent; 5]);
}

/// `dlopen`, `dlsym`, `dlclose` of a C library by name.
struct Lib(*mut libc::c_void);

impl Lib {
    fn open(name: &std::ffi::CStr) -> Lib {
        // SAFETY: a valid C string; RTLD_NOW resolves everything up front.
        let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW) };
        assert!(!h.is_null(), "dlopen {name:?}");
        Lib(h)
    }

    fn sym(&self, name: &std::ffi::CStr) -> *mut libc::c_void {
        // SAFETY: a live handle and a valid C string.
        let f = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        assert!(!f.is_null(), "dlsym {name:?}");
        f
    }
}

impl Drop for Lib {
    fn drop(&mut self) {
        // SAFETY: the handle from `open`, closed once.
        unsafe { libc::dlclose(self.0) };
    }
}

#[test]
fn a_uprobe_on_a_library_not_loaded_yet_is_installed_by_dlopen() {
    let _g = serial();
    let Some(live) = live() else { return };
    // libm is not among this binary's needed libraries: the probe waits
    // for the loader watch to report it.
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let c = Consumer::builder()
        .handler(move |_hit, _regs| {
            h.fetch_add(1, Ordering::SeqCst);
            ConsumerAction::Continue
        })
        .build();
    let target = UprobeTarget::parse("libm.so.6:cbrt").unwrap();
    let resolved = live.register(&target, &c).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let maps = || std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(!maps().contains("/libm.so.6"), "libm is not loaded yet");
    let lib = Lib::open(c"libm.so.6");
    assert!(maps().contains("/libm.so.6"));
    let cbrt = lib.sym(c"cbrt");
    // SAFETY: `cbrt` is libm's `double cbrt(double)`.
    let cbrt: extern "C" fn(f64) -> f64 = unsafe { std::mem::transmute(cbrt) };
    for i in 1..=100 {
        let x = f64::from(i * i * i);
        assert!((cbrt(std::hint::black_box(x)) - f64::from(i)).abs() < 1e-9);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 100, "every call after dlopen");
    live.unregister(resolved.key(), &c).unwrap();
    cbrt(8.0);
    assert_eq!(hits.load(Ordering::SeqCst), 100);
    drop(lib);
}
