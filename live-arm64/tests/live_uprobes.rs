//! Live uprobes in this process on arm64: the C library probed by
//! `libc.so.6:SYMBOL` (found through the loader's list and the file on
//! disk), every call counted from several threads, return values seen by
//! return handlers (the return hijacked to a `brk` in an XOL slot), and a
//! uprobe on a library not loaded yet installed by `dlopen` (the loader
//! watch's breakpoint at the dynamic linker's `r_brk`); fixture libraries
//! (built by the test with the cross compiler, `dl_support`) probed while
//! loaded and across `dlclose`: pending again when unloaded, installed
//! again by the next `dlopen`, counted exactly; `register_many` and
//! `unregister_many` batches on them.
//!
//! Live uprobes need the dynamic linker's rendezvous (the loader watch), so
//! these tests run in the dynamically linked build (`scripts/test-arm64
//! --dynamic`, `qemu-aarch64 -L /`); in the static one each prints why it
//! is skipped. Natively (x86_64) they run as well.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rcu_registry::probes::runtime::LiveUprobes;
use rcu_registry::probes::uprobe::{Consumer, ConsumerAction, UprobeKey, UprobeTarget};

// The x86_64 suite's fixture builder, shared: it picks the cross compiler
// when this test is an aarch64 binary run under qemu-user.
#[path = "../../tests/dl_support/mod.rs"]
mod dl_support;

use dl_support::{adder as func, snapshot};

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

/// `lib<name>.so`: `int fI(int x)` returns `x + I` for I in 0..`n`
/// (`dl_support::adders_source`), and a constructor calls `f0(1000)` once
/// per load.
fn fixture(name: &str, n: usize) -> PathBuf {
    let src = dl_support::adders_source(n)
        + "int ctor_saw;\n__attribute__((constructor)) static void init(void) { ctor_saw = f0(1000); }\n";
    dl_support::build_so("arm64-uprobes", &format!("lib{name}.so"), &src, &[])
}

/// The first instruction word at `addr`.
fn word_at(addr: u64) -> [u8; 4] {
    // SAFETY: `addr` is mapped code of a library the caller holds open.
    unsafe { (addr as *const [u8; 4]).read_volatile() }
}

/// The first instruction word of the function at file offset `offset`,
/// as the file holds it.
fn file_word(so: &Path, offset: u64) -> [u8; 4] {
    let file = std::fs::read(so).unwrap();
    file[offset as usize..offset as usize + 4]
        .try_into()
        .unwrap()
}

/// A consumer counting each hit in `counts[first argument]` (the
/// constructor's `f0(1000)` in `ctor`).
fn per_arg(counts: &Arc<Vec<AtomicU64>>, ctor: &Arc<AtomicU64>) -> Consumer {
    let (c, k) = (Arc::clone(counts), Arc::clone(ctor));
    Consumer::builder()
        .handler(move |_hit, regs| {
            // The `int` argument is `w0`: the upper half of `x0` is not
            // the caller's to define. SeqCst: read by the test thread after
            // the calls; no pairing needed.
            match regs.arg(0).map(|a| a as u32) {
                Some(1000) => {
                    k.fetch_add(1, Ordering::SeqCst);
                }
                Some(a) => {
                    if let Some(slot) = c.get(a as usize) {
                        slot.fetch_add(1, Ordering::SeqCst);
                    }
                }
                None => {}
            }
            ConsumerAction::Continue
        })
        .build()
}

fn counters(n: usize) -> Arc<Vec<AtomicU64>> {
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

#[test]
fn a_uprobe_on_a_library_unloaded_by_dlclose_is_pending_again_and_each_dlopen_installs_it() {
    let _g = serial();
    let Some(live) = live() else { return };
    let so = fixture("updlclose", 2);
    let counts = counters(2);
    let ctor = Arc::new(AtomicU64::new(0));
    let c = per_arg(&counts, &ctor);
    let space = live.space_id();
    let errors = live.stats().install_errors;
    // Registered while loaded: installed at once.
    let lib = dl_support::Lib::open(&so);
    let r = live
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "f0"), &c)
        .unwrap();
    let original = file_word(&so, r.offset);
    let mut expect = 0;
    let mut lib = Some(lib);
    for round in 0..4u64 {
        // Round 0 probes the first load (registered after its constructor
        // ran); every later round a new load, which installed the uprobe
        // before its constructor's call of f0.
        let l = lib.take().unwrap_or_else(|| dl_support::Lib::open(&so));
        assert_eq!(ctor.load(Ordering::SeqCst), round, "round {round}");
        let f0 = func(&l, 0);
        let at = f0 as usize as u64;
        assert_ne!(word_at(at), original, "round {round}: the brk is in");
        assert_eq!(live.registry().installed_at(space, at), Some(r.key()));
        for _ in 0..round + 3 {
            assert_eq!(f0(0), 0);
        }
        expect += round + 3;
        assert_eq!(counts[0].load(Ordering::SeqCst), expect, "round {round}");
        l.close();
        // Unloaded: forgotten before dlclose returned, pending again.
        assert!(!dl_support::is_mapped(&so), "round {round}");
        assert_eq!(live.registry().installed_at(space, at), None);
    }
    // Unregistered while loaded: the file's word again, nothing counted.
    let l = dl_support::Lib::open(&so);
    let f0 = func(&l, 0);
    live.unregister(r.key(), &c).unwrap();
    assert_eq!(word_at(f0 as usize as u64), original);
    assert_eq!(f0(0), 0);
    assert_eq!(counts[0].load(Ordering::SeqCst), expect);
    assert_eq!(snapshot(&counts)[1], 0, "f1 was never probed");
    assert_eq!(live.stats().install_errors, errors);
    l.close();
}

/// Functions in the batch fixture.
const N: usize = 16;

fn targets(so: &Path) -> Vec<UprobeTarget> {
    (0..N)
        .map(|i| UprobeTarget::symbol(so.to_str().unwrap(), format!("f{i}")))
        .collect()
}

/// Every function's first word, as loaded and as the file holds it.
fn words(lib: &dl_support::Lib, so: &Path, keys: &[UprobeKey]) -> (Vec<[u8; 4]>, Vec<[u8; 4]>) {
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            (
                word_at(func(lib, i) as usize as u64),
                file_word(so, k.offset),
            )
        })
        .unzip()
}

/// Removes the batch `keys` of consumer `c` with one `unregister_many`.
fn unregister_all(live: &LiveUprobes, keys: &[UprobeKey], c: &Consumer) {
    let pairs: Vec<(UprobeKey, &Consumer)> = keys.iter().map(|k| (*k, c)).collect();
    assert_eq!(live.unregister_many(&pairs), Ok(keys.len()));
}

/// With no uprobe on it, every function of the loaded `lib` starts with
/// the file's word, and calling each leaves the counts at `want`.
fn assert_unprobed(
    lib: &dl_support::Lib,
    so: &Path,
    keys: &[UprobeKey],
    counts: &[AtomicU64],
    want: &[u64],
) {
    let (loaded, file) = words(lib, so, keys);
    assert_eq!(loaded, file);
    dl_support::call_each(lib, keys.len(), 3);
    assert_eq!(snapshot(counts), want);
}

#[test]
fn a_batch_on_a_loaded_library_counts_each_call_and_unregister_many_restores_every_word() {
    let _g = serial();
    let Some(live) = live() else { return };
    let so = fixture("upbatchloaded", N);
    let lib = dl_support::Lib::open(&so);
    let counts = counters(N);
    let ctor = Arc::new(AtomicU64::new(0));
    let c = per_arg(&counts, &ctor);
    let before = live.registry().len();
    let keys: Vec<UprobeKey> = live
        .register_many(&targets(&so), &c)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(live.registry().len(), before + N);
    let (loaded, file) = words(&lib, &so, &keys);
    for i in 0..N {
        assert_ne!(loaded[i], file[i], "f{i}: the brk is in");
    }
    let want = dl_support::call_each(&lib, N, 3);
    assert_eq!(snapshot(&counts), want);
    // One batch out: every word is the file's again, nothing counts.
    unregister_all(live, &keys, &c);
    assert_eq!(live.registry().len(), before);
    assert_unprobed(&lib, &so, &keys, &counts, &want);
    assert_eq!(ctor.load(Ordering::SeqCst), 0);
    lib.close();
}

#[test]
fn a_batch_registered_before_dlopen_is_installed_by_each_load_across_dlclose() {
    let _g = serial();
    let Some(live) = live() else { return };
    let so = fixture("upbatchpending", N);
    let counts = counters(N);
    let ctor = Arc::new(AtomicU64::new(0));
    let c = per_arg(&counts, &ctor);
    let errors = live.stats().install_errors;
    let keys: Vec<UprobeKey> = live
        .register_many(&targets(&so), &c)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(!dl_support::is_mapped(&so));
    let mut want = vec![0; N];
    for round in 0..3 {
        let lib = dl_support::Lib::open(&so);
        // Installed before the constructor's call of f0.
        assert_eq!(ctor.load(Ordering::SeqCst), round + 1, "round {round}");
        for (w, n) in want.iter_mut().zip(dl_support::call_each(&lib, N, 3)) {
            *w += n;
        }
        assert_eq!(snapshot(&counts), want, "round {round}");
        lib.close();
        assert!(!dl_support::is_mapped(&so), "round {round}");
    }
    assert_eq!(live.stats().install_errors, errors);
    // Removed while unloaded, then loaded: nothing installed, nothing counts.
    unregister_all(live, &keys, &c);
    let lib = dl_support::Lib::open(&so);
    assert_unprobed(&lib, &so, &keys, &counts, &want);
    assert_eq!(ctor.load(Ordering::SeqCst), 3);
    lib.close();
}
