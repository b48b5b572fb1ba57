//! Live uprobes in this process (issue 12): targets by file and symbol,
//! installed in the real mappings, libraries loaded later included (before
//! their constructors run), forgotten at `dlclose`, the C library probed by
//! `libc.so.6:SYMBOL`, return values seen by return handlers, a fork child
//! that keeps counting, and bad input refused with nothing changed.
//! Fixture libraries are built with `cc` by the tests.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod dl_support;

use dl_support::Lib;
use rcu_registry::probes::kprobe::Kprobe;
use rcu_registry::probes::runtime::{Live, LiveUprobes};
use rcu_registry::probes::uprobe::{
    Consumer, ConsumerAction, ResolvedTarget, UprobeKey, UprobeTarget,
};
use rcu_registry::probes::ProbeError;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn live() -> &'static LiveUprobes {
    LiveUprobes::global().expect("live uprobes in a dynamically linked test binary")
}

/// Builds `lib<name>.so`: `int f(int x)` returns `x + k` (through a call
/// the compiler cannot fold), `int g(int x)` returns `f(x) * 2`, and a
/// constructor calls `f(1000)` once.
fn fixture(name: &str, k: i32) -> PathBuf {
    dl_support::build_so(
        "uprobes",
        &format!("lib{name}.so"),
        &format!(
            "__attribute__((noinline)) int f(int x) {{ __asm__ volatile(\"\"); return x + {k}; }}\n\
             __attribute__((noinline)) int g(int x) {{ return f(x) * 2; }}\n\
             int ctor_saw;\n\
             __attribute__((constructor)) static void init(void) {{ ctor_saw = f(1000); }}\n"
        ),
        &[],
    )
}

fn dir() -> PathBuf {
    dl_support::fixture_dir("uprobes")
}

fn mapped(path: &Path) -> bool {
    dl_support::is_mapped(path)
}

/// A consumer counting hits whose first argument is in `args` (all hits
/// when `args` is empty).
fn counting(hits: &Arc<AtomicU64>, args: Vec<u64>) -> Consumer {
    let h = Arc::clone(hits);
    Consumer::builder()
        .handler(move |_hit, regs| {
            if args.is_empty() || regs.arg(0).is_some_and(|a| args.contains(&a)) {
                h.fetch_add(1, Ordering::SeqCst);
            }
            ConsumerAction::Continue
        })
        .build()
}

fn code_at(addr: u64, n: usize) -> Vec<u8> {
    // SAFETY: `addr` is mapped code of a loaded library (the caller holds
    // its handle), readable.
    unsafe { std::slice::from_raw_parts(addr as *const u8, n) }.to_vec()
}

#[test]
fn a_probe_registered_before_dlopen_counts_every_call_the_constructor_included() {
    let _g = serial();
    let so = fixture("upbefore", 1);
    let hits = Arc::new(AtomicU64::new(0));
    let c = counting(&hits, Vec::new());
    let target = UprobeTarget::symbol(so.to_str().unwrap(), "f");
    let resolved = live().register(&target, &c).unwrap();
    assert!(!mapped(&so));
    let lib = Lib::open(&so);
    // The constructor's call was probed: installed before it ran.
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let f = lib.func(c"f");
    for x in 0..100 {
        assert_eq!(f(x), x + 1);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 101);
    // Unregistered while loaded: the bytes are the file's again.
    let at = f as usize as u64;
    assert_eq!(code_at(at, 1), vec![0xcc]);
    live().unregister(resolved.key(), &c).unwrap();
    let file = std::fs::read(&so).unwrap();
    let off = resolved.offset as usize;
    assert_eq!(code_at(at, 8), file[off..off + 8].to_vec());
    for x in 0..10 {
        assert_eq!(f(x), x + 1);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 101);
    lib.close();
}

/// The fixture `lib<name>.so` (`f(x) = x + k`) with a counting uprobe on
/// its `f`, registered before it is loaded: the path, the count, the
/// consumer and the resolved target.
fn counted_f(name: &str, k: i32) -> (PathBuf, Arc<AtomicU64>, Consumer, ResolvedTarget) {
    let so = fixture(name, k);
    let hits = Arc::new(AtomicU64::new(0));
    let c = counting(&hits, Vec::new());
    let resolved = live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "f"), &c)
        .unwrap();
    (so, hits, c, resolved)
}

#[test]
fn load_unload_cycles_keep_counting_and_the_registry_forgets_each_unload() {
    let _g = serial();
    let (so, hits, c, resolved) = counted_f("upcycle", 2);
    let space = live().space_id();
    let mut expect = 0;
    for round in 0..10 {
        let lib = Lib::open(&so);
        expect += 1; // the constructor
        let f = lib.func(c"f");
        for x in 0..round {
            assert_eq!(f(x), x + 2);
        }
        expect += round as u64;
        assert_eq!(hits.load(Ordering::SeqCst), expect, "round {round}");
        let at = f as usize as u64;
        assert_eq!(
            live().registry().installed_at(space, at),
            Some(resolved.key())
        );
        lib.close();
        assert!(!mapped(&so));
        // Forgotten before dlclose returned.
        assert_eq!(live().registry().installed_at(space, at), None);
    }
    live().unregister(resolved.key(), &c).unwrap();
}

#[test]
fn a_return_handler_sees_the_return_value() {
    let _g = serial();
    let so = fixture("upret", 3);
    let seen: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let s = Arc::clone(&seen);
    let c = Consumer::builder()
        .handler(|_, _| ConsumerAction::Continue)
        .ret_handler(move |ret, regs| {
            s.lock().unwrap().push((ret.func, regs.retval()));
        })
        .build();
    let lib = Lib::open(&so);
    let resolved = live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "g"), &c)
        .unwrap();
    let g = lib.func(c"g");
    for x in 0..5 {
        assert_eq!(g(x), (x + 3) * 2);
    }
    let got = seen.lock().unwrap().clone();
    let gaddr = g as usize as u64;
    assert_eq!(
        got,
        (0..5)
            .map(|x| (gaddr, ((x + 3) * 2) as u64))
            .collect::<Vec<_>>()
    );
    live().unregister(resolved.key(), &c).unwrap();
    lib.close();
}

#[test]
fn the_c_library_is_probed_by_name_and_counted_exactly() {
    let _g = serial();
    // qsort's first argument is the array: count our arrays only (other
    // threads of the test harness may sort too).
    let mut arrays: Vec<[i32; 3]> = (0..50).map(|i| [3 + i, 1, 2]).collect();
    let ptrs: Vec<u64> = arrays.iter().map(|a| a.as_ptr() as u64).collect();
    let hits = Arc::new(AtomicU64::new(0));
    let c = counting(&hits, ptrs);
    let resolved = live()
        .register(&UprobeTarget::parse("libc.so.6:qsort").unwrap(), &c)
        .unwrap();
    extern "C" fn cmp(a: *const libc::c_void, b: *const libc::c_void) -> libc::c_int {
        // SAFETY: qsort passes pointers to two elements of our i32 arrays.
        unsafe { (*(a as *const i32)).cmp(&*(b as *const i32)) as libc::c_int }
    }
    for a in arrays.iter_mut() {
        // SAFETY: a valid array of 3 i32 and a matching comparator.
        unsafe { libc::qsort(a.as_mut_ptr().cast(), 3, 4, Some(cmp)) };
        assert_eq!(a[0], 1);
    }
    live().unregister(resolved.key(), &c).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 50);
}

#[test]
fn a_fork_child_keeps_counting() {
    let _g = serial();
    let so = fixture("upfork", 4);
    let hits = Arc::new(AtomicU64::new(0));
    let c = counting(&hits, Vec::new());
    let lib = Lib::open(&so);
    let resolved = live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "f"), &c)
        .unwrap();
    let f = lib.func(c"f");
    // SAFETY: the child calls, checks and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let before = hits.load(Ordering::SeqCst);
        let ok = (0..20).all(|x| f(x) == x + 4);
        let ok = ok && hits.load(Ordering::SeqCst) == before + 20;
        // SAFETY: ends the child without the parent's exit hooks.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child did not count its calls"
    );
    assert_eq!(f(1), 5);
    live().unregister(resolved.key(), &c).unwrap();
    lib.close();
}

#[test]
fn a_kprobe_and_a_uprobe_never_share_a_byte() {
    let _g = serial();
    let so = fixture("upboth", 5);
    let lib = Lib::open(&so);
    let f = lib.func(c"f");
    let at = f as usize as u64;
    let original = code_at(at, 8);
    // A kprobe first: the uprobe is refused, nothing changes.
    let kp = Kprobe::at(at).build();
    Live::global().registry().register(&kp).unwrap();
    let patched = code_at(at, 8);
    let hits = Arc::new(AtomicU64::new(0));
    let c = counting(&hits, Vec::new());
    let target = UprobeTarget::symbol(so.to_str().unwrap(), "f");
    let err = live().register(&target, &c).unwrap_err();
    assert!(
        matches!(&err, ProbeError::HeldBy { addr, holder } if *addr == at && holder.contains("kprobe")),
        "{err:?}"
    );
    assert_eq!(code_at(at, 8), patched);
    assert_eq!(f(1), 6);
    assert_eq!(kp.hits(), 1);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    Live::global().registry().unregister(&kp).unwrap();
    assert_eq!(code_at(at, 8), original);
    // A uprobe first: the kprobe is refused.
    let resolved = live().register(&target, &c).unwrap();
    let kp = Kprobe::at(at).build();
    let err = Live::global().registry().register(&kp).unwrap_err();
    assert!(
        matches!(&err, ProbeError::HeldBy { addr, holder } if *addr == at && holder.contains("uprobe")),
        "{err:?}"
    );
    assert_eq!(f(1), 6);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    live().unregister(resolved.key(), &c).unwrap();
    assert_eq!(code_at(at, 8), original);
    lib.close();
}

#[test]
fn a_uprobe_installed_nowhere_yet_is_refused_at_a_kprobes_byte_with_the_holder_named() {
    let _g = serial();
    let so = fixture("upadopt", 7);
    let lib = Lib::open(&so);
    let f = lib.func(c"f");
    let at = f as usize as u64;
    let original = code_at(at, 8);
    let target = UprobeTarget::symbol(so.to_str().unwrap(), "f");
    // A consumer that wants no space: the uprobe exists (its original
    // bytes known from the file) but is installed nowhere.
    let nowhere = Consumer::builder()
        .handler(|_, _| ConsumerAction::Continue)
        .filter(|_| false)
        .build();
    let resolved = live().register(&target, &nowhere).unwrap();
    assert_eq!(code_at(at, 8), original);
    // A kprobe takes the byte.
    let kp = Kprobe::at(at).build();
    Live::global().registry().register(&kp).unwrap();
    // A consumer that wants this space: installing finds the kprobe's int3,
    // which is named, never taken for the uprobe's own (install.rs asks
    // for a holder before it treats a breakpoint as one it inherited).
    let hits = Arc::new(AtomicU64::new(0));
    let c = counting(&hits, Vec::new());
    let err = live().register(&target, &c).unwrap_err();
    assert!(matches!(err, ProbeError::HeldBy { .. }), "{err:?}");
    assert_eq!(f(1), 8);
    assert_eq!(kp.hits(), 1, "the kprobe still fires");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    Live::global().registry().unregister(&kp).unwrap();
    live().unregister(resolved.key(), &nowhere).unwrap();
    assert_eq!(code_at(at, 8), original);
    lib.close();
}

/// Whether an error is the expected kind.
type IsError = fn(&ProbeError) -> bool;

#[test]
fn bad_targets_are_refused_with_nothing_changed() {
    let _g = serial();
    let so = fixture("upbad", 6);
    let lib = Lib::open(&so);
    let f = lib.func(c"f");
    let at = f as usize as u64;
    let bytes = code_at(at, 16);
    let before = live().registry().len();
    let c = counting(&Arc::new(AtomicU64::new(0)), Vec::new());
    let notelf = dir().join("notelf.so");
    std::fs::write(&notelf, b"not an ELF file at all").unwrap();
    let cases: Vec<(String, IsError)> = vec![
        (format!("{}:f", dir().join("missing.so").display()), |e| {
            matches!(e, ProbeError::TargetFile { .. })
        }),
        (format!("{}:f", notelf.display()), |e| {
            matches!(e, ProbeError::TargetFile { .. })
        }),
        (format!("{}:no_such_function", so.display()), |e| {
            matches!(e, ProbeError::SymbolNotInFile { .. })
        }),
        (format!("{}:0x7fffffff", so.display()), |e| {
            matches!(e, ProbeError::NotInCode { .. })
        }),
        (format!("{}:f+1000", so.display()), |e| {
            matches!(e, ProbeError::OffsetPastEnd { .. })
        }),
    ];
    for (text, want) in &cases {
        let err = live()
            .register(&UprobeTarget::parse(text).unwrap(), &c)
            .unwrap_err();
        assert!(want(&err), "{text}: {err:?}");
        assert_eq!(live().registry().len(), before, "{text}");
        assert_eq!(code_at(at, 16), bytes, "{text}");
    }
    // Inside an instruction: find an offset that is not a boundary.
    let mut refused_inside = false;
    for off in 1..8 {
        let t = UprobeTarget::symbol(so.to_str().unwrap(), "f").offset(off);
        match live().register(&t, &c) {
            Err(ProbeError::NotOnInstructionBoundary { .. }) => {
                refused_inside = true;
                break;
            }
            Err(e) => panic!("f+{off}: {e:?}"),
            Ok(r) => live().unregister(r.key(), &c).unwrap(),
        }
    }
    assert!(
        refused_inside,
        "no offset inside an instruction in f's first bytes"
    );
    assert_eq!(code_at(at, 16), bytes);
    // A return handler away from a function entry.
    let ret = Consumer::builder().ret_handler(|_, _| {}).build();
    let t = UprobeTarget::symbol(so.to_str().unwrap(), "g");
    let key = live().resolver().resolve(&t).unwrap().key();
    let inside = UprobeKey {
        offset: key.offset + 4,
        ..key
    };
    let err = live()
        .registry()
        .register_in_function(inside, key.offset, &ret)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::NotAtFunctionEntry { .. } | ProbeError::NotOnInstructionBoundary { .. }
        ),
        "{err:?}"
    );
    assert_eq!(live().registry().len(), before);
    assert_eq!(f(1), 7);
    lib.close();
}

#[test]
fn a_hit_inside_a_handler_runs_no_handler_and_counts_missed() {
    let _g = serial();
    let so = fixture("upnested", 8);
    let lib = Lib::open(&so);
    let f = lib.func(c"f");
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    // The handler calls the probed function itself: that hit is nested in
    // the handler and must not run the handler again.
    let c = Consumer::builder()
        .handler(move |_, _| {
            h.fetch_add(1, Ordering::SeqCst);
            assert_eq!(f(100), 108);
            ConsumerAction::Continue
        })
        .build();
    let resolved = live()
        .register(&UprobeTarget::symbol(so.to_str().unwrap(), "f"), &c)
        .unwrap();
    let before = live().registry().nmissed(resolved.key());
    for x in 0..10 {
        assert_eq!(f(x), x + 8);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 10);
    assert_eq!(live().registry().nmissed(resolved.key()) - before, 10);
    live().unregister(resolved.key(), &c).unwrap();
    lib.close();
}

/// The start of the lowest mapping of `path` in this process.
fn base_of(path: &Path) -> Option<u64> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.ends_with(path.to_str().unwrap()))
        .filter_map(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .min()
}

/// A library loaded again at another address (its old range held by a
/// placeholder mapping, so the loader cannot reuse it) is probed again
/// there: the uprobe registered once counts calls at both addresses, the
/// registry maps the new range only, and the bytes at the new address are
/// the file's after the unregistration.
#[test]
fn a_library_loaded_again_at_another_address_is_probed_there() {
    let _g = serial();
    let (so, hits, c, resolved) = counted_f("upmoved", 3);
    let space = live().space_id();
    let lib = Lib::open(&so);
    let first_base = base_of(&so).unwrap();
    let f = lib.func(c"f");
    for x in 0..5 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1 + 5);
    let old_f = f as usize as u64;
    // From its first byte to its last (the loader maps the whole span).
    let end = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.ends_with(so.to_str().unwrap()))
        .filter_map(|l| {
            let (_, b) = l.split_whitespace().next()?.split_once('-')?;
            u64::from_str_radix(b, 16).ok()
        })
        .max()
        .unwrap();
    let span = end - first_base;
    lib.close();
    assert!(!mapped(&so));
    // Hold the old range: the next load must go elsewhere.
    // SAFETY: a fresh anonymous mapping over a range nothing maps (the
    // library was just unmapped); `MAP_FIXED_NOREPLACE` fails rather than
    // replace anything.
    let hold = unsafe {
        libc::mmap(
            first_base as *mut libc::c_void,
            span as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if hold == libc::MAP_FAILED || hold as u64 != first_base {
        eprintln!("skipping the move: the old range could not be held ({hold:?})");
        live().unregister(resolved.key(), &c).unwrap();
        return;
    }
    let lib = Lib::open(&so);
    let second_base = base_of(&so).unwrap();
    assert_ne!(second_base, first_base, "the loader reused the held range");
    let f = lib.func(c"f");
    let new_f = f as usize as u64;
    assert_ne!(new_f, old_f);
    // Installed at the new address before the constructor ran; nothing
    // is recorded at the old one.
    assert_eq!(hits.load(Ordering::SeqCst), 6 + 1);
    assert_eq!(
        live().registry().installed_at(space, new_f),
        Some(resolved.key())
    );
    assert_eq!(live().registry().installed_at(space, old_f), None);
    for x in 0..7 {
        assert_eq!(f(x), x + 3);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 7 + 7);
    live().unregister(resolved.key(), &c).unwrap();
    let file = std::fs::read(&so).unwrap();
    let off = resolved.offset as usize;
    assert_eq!(code_at(new_f, 8), file[off..off + 8].to_vec());
    f(1);
    assert_eq!(hits.load(Ordering::SeqCst), 14);
    lib.close();
    // SAFETY: our placeholder mapping, unused.
    unsafe { libc::munmap(hold, span as usize) };
}
