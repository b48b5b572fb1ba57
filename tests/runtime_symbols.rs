//! Probes placed by name on the live runtime (issue 11): offsets are checked
//! against the function's extent, symbols follow `dlopen`/`dlclose`, a name
//! defined in two objects is an error unless qualified (`object:name`), and
//! IFUNC functions (`strlen`, `memcpy`, `strcmp`) resolve to the
//! implementation the loader chose. Every test takes the binary's serial
//! lock (they share the SIGTRAP handler and the registry).

mod dl_support;
mod runtime_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::probes::kprobe::{Action, Kprobe, KprobeBuilder, Kretprobe};
use rcu_registry::probes::runtime::Live;
use rcu_registry::probes::ProbeError;
use runtime_support::*;

fn live() -> &'static Live {
    Live::global()
}

fn counting(probe: KprobeBuilder, count: &Arc<AtomicU64>) -> Kprobe {
    let c = Arc::clone(count);
    probe
        .pre(move |_p, _regs| {
            // Relaxed: a counter read after the calls joined.
            c.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build()
}

#[test]
fn offsets_past_the_end_of_a_function_are_refused_and_change_nothing() {
    let _g = serial();
    let reg = live().registry();
    let start = addr(rtp_add1);
    let next = addr(rtp_push);
    let size = live().symbols().function("rtp_add1").unwrap().size;
    assert_eq!(size, 6, "rtp_add1 is 6 bytes");
    assert!(
        next > start + size,
        "rtp_push follows rtp_add1 after padding"
    );
    let sites = reg.sites();
    let before = code(start, (next - start + 8) as usize);
    for offset in [size, next - start, u64::MAX, u64::MAX - start + 1] {
        let probe = Kprobe::symbol("rtp_add1", offset).build();
        assert_eq!(
            reg.register(&probe),
            Err(ProbeError::OffsetPastEnd {
                name: "rtp_add1".into(),
                size,
                offset,
            }),
            "offset {offset:#x}"
        );
        assert!(!probe.is_registered());
        assert_eq!(code(start, before.len()), before, "offset {offset:#x}");
        assert_eq!(reg.sites(), sites, "offset {offset:#x}");
    }
    // An offset inside the function is checked as before: the middle of
    // `add eax, 1` is not on an instruction boundary.
    let probe = Kprobe::symbol("rtp_add1", 3).build();
    assert!(matches!(
        reg.register(&probe),
        Err(ProbeError::NotOnInstructionBoundary { .. })
    ));
    // The last byte inside (`ret`) is a target, and counts exactly.
    let hits = Arc::new(AtomicU64::new(0));
    let probe = counting(Kprobe::symbol("rtp_add1", size - 1), &hits);
    reg.register(&probe).unwrap();
    assert_eq!(probe.address(), Some(start + size - 1));
    for x in 0..10 {
        assert_eq!(call(rtp_add1, x), x + 1);
    }
    reg.unregister(&probe).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 10);
    assert_eq!(code(start, before.len()), before);
}

/// A shared library built from `source` with `cc -shared -fPIC` into this
/// process's temp directory.
// Not inlined: `object_qualifiers_pick_one_c_library_function` looks it up
// by name in this binary's symbols.
#[inline(never)]
fn build_library(file: &str, source: &str) -> std::path::PathBuf {
    dl_support::build_so("symbols", file, source, &[])
}

/// A library handle from `dlopen`.
struct Library(*mut libc::c_void);

impl Library {
    fn open(path: &std::path::Path) -> Library {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; the fixture has no constructors.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen {path:?}");
        Library(h)
    }

    /// The fixture's `int f(int)` called `name`.
    fn function(&self, name: &std::ffi::CStr) -> extern "C" fn(i32) -> i32 {
        // SAFETY: a live handle and a valid C string.
        let p = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        assert!(!p.is_null(), "dlsym {name:?}");
        // SAFETY: every fixture function is `int f(int)`.
        unsafe { std::mem::transmute::<*mut libc::c_void, extern "C" fn(i32) -> i32>(p) }
    }

    fn close(self) {
        // SAFETY: a handle from dlopen, closed once; no function pointer
        // into it is used afterwards.
        assert_eq!(unsafe { libc::dlclose(self.0) }, 0);
    }
}

/// Whether any loaded object's path is `path`.
fn is_mapped(path: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.ends_with(path.to_str().unwrap()))
}

#[test]
fn libraries_loaded_later_are_probed_by_name_and_forgotten_when_unloaded() {
    let _g = serial();
    let live = live();
    let reg = live.registry();
    // Symbols are loaded before the libraries exist.
    let _ = live.current_symbols();
    let a_path = build_library(
        "libfxa.so",
        "int fx_both(int x) { return x + 1; }\nint fx_a_only(int x) { return x * 2; }\n",
    );
    let b_path = build_library("libfxb.so", "int fx_both(int x) { return x + 2; }\n");
    let a = Library::open(&a_path);
    let b = Library::open(&b_path);
    let a_both = std::hint::black_box(a.function(c"fx_both"));
    let a_only = std::hint::black_box(a.function(c"fx_a_only"));
    let b_both = std::hint::black_box(b.function(c"fx_both"));

    // A name only the new library defines.
    let hits = Arc::new(AtomicU64::new(0));
    let probe = counting(Kprobe::symbol("fx_a_only", 0), &hits);
    reg.register(&probe).unwrap();
    assert_eq!(probe.address(), Some(a_only as usize as u64));
    for x in 0..7 {
        assert_eq!(a_only(x), 2 * x);
        assert_eq!(a_both(x), x + 1);
    }
    reg.unregister(&probe).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 7);

    // A name both define: an error listing both, for kprobes and
    // kretprobes alike; nothing registered.
    let sites = reg.sites();
    let ambiguous = ProbeError::AmbiguousSymbol {
        name: "fx_both".into(),
        objects: vec![
            a_path.to_str().unwrap().to_string(),
            b_path.to_str().unwrap().to_string(),
        ],
    };
    let probe = Kprobe::symbol("fx_both", 0).build();
    assert_eq!(reg.register(&probe), Err(ambiguous.clone()));
    let krp = Kretprobe::symbol("fx_both", 0)
        .maxactive(4)
        .handler(|_, _, _| {})
        .build()
        .unwrap();
    assert_eq!(reg.register(&krp), Err(ambiguous));
    assert_eq!(reg.sites(), sites);

    // Qualified by file name or by path: exactly that object's function.
    let b_path_str = b_path.to_str().unwrap().to_string();
    for q in [
        "libfxb.so:fx_both".to_string(),
        format!("{b_path_str}:fx_both"),
    ] {
        let hits = Arc::new(AtomicU64::new(0));
        let probe = counting(Kprobe::symbol(q.clone(), 0), &hits);
        reg.register(&probe).unwrap();
        assert_eq!(probe.address(), Some(b_both as usize as u64), "{q}");
        for x in 0..5 {
            assert_eq!(b_both(x), x + 2);
            assert_eq!(a_both(x), x + 1);
        }
        reg.unregister(&probe).unwrap();
        assert_eq!(hits.load(Ordering::Relaxed), 5, "{q}");
    }
    // A qualifier is a whole file name or path suffix, not any suffix.
    assert!(matches!(
        reg.register(&Kprobe::symbol("fxb.so:fx_both", 0).build()),
        Err(ProbeError::UnknownSymbol { .. })
    ));

    // Unloaded: the names are gone.
    a.close();
    b.close();
    assert!(
        !is_mapped(&a_path) && !is_mapped(&b_path),
        "dlclose unmapped the fixtures"
    );
    for name in ["fx_a_only", "fx_both", "libfxa.so:fx_both"] {
        assert_eq!(
            reg.register(&Kprobe::symbol(name, 0).build()),
            Err(ProbeError::UnknownSymbol { name: name.into() }),
        );
    }
    assert!(live.current_symbols().function("fx_a_only").is_none());
    assert_eq!(reg.sites(), sites);
    let _ = std::fs::remove_dir_all(a_path.parent().unwrap());
}

#[test]
fn object_qualifiers_pick_one_c_library_function() {
    let _g = serial();
    let syms = live().current_symbols();
    let qsort = syms.function("qsort").expect("qsort is in the C library");
    assert!(qsort.object.ends_with("/libc.so.6"), "{qsort:?}");
    assert_eq!(syms.find("libc.so.6:qsort"), Ok(qsort));
    assert_eq!(syms.find(&format!("{}:qsort", qsort.object)), Ok(qsort));
    // Rust paths keep their `::`.
    let own = syms
        .functions()
        .iter()
        .find(|f| f.name.ends_with("runtime_symbols::build_library"))
        .expect("this test's own function");
    assert_eq!(syms.find(&own.name), Ok(own));
    // Qualified by an object that does not define it: unknown.
    assert_eq!(
        syms.find("libgcc_s.so.1:qsort"),
        Err(ProbeError::UnknownSymbol {
            name: "libgcc_s.so.1:qsort".into()
        })
    );
}

/// `dlsym(RTLD_DEFAULT, name)`: for an IFUNC, the implementation the
/// loader chose.
fn dlsym_default(name: &std::ffi::CStr) -> u64 {
    // SAFETY: dlsym with RTLD_DEFAULT and a valid C string.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
    assert_ne!(p, 0, "dlsym {name:?}");
    p
}

/// Registers a counting kprobe on `name`, runs `calls` (which must call
/// the function exactly `n` times), unregisters and checks the count and
/// that the text is back.
fn count_calls(name: &str, at: u64, n: u64, calls: impl Fn()) {
    let reg = live().registry();
    let hits = Arc::new(AtomicU64::new(0));
    let probe = counting(Kprobe::symbol(name, 0), &hits);
    let before = code(at, 16);
    reg.register(&probe)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(probe.address(), Some(at), "{name}");
    calls();
    reg.unregister(&probe).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), n, "{name}");
    assert_eq!(code(at, 16), before, "{name}");
}

#[test]
fn an_ifunc_in_a_stripped_library_resolves_to_the_chosen_implementation() {
    let _g = serial();
    // Stripped: no .symtab, the implementation has no symbol; its extent
    // comes from the unwind table.
    let dir_lib = build_library(
        "libfxifunc.so",
        "static int fx_impl_slow(int x) { return x + 10; }\n\
         static int fx_impl_fast(int x) { return x * 5 + 1; }\n\
         static void *fx_pick(void) { return (void *)fx_impl_fast; }\n\
         int fx_ifunc(int) __attribute__((ifunc(\"fx_pick\")));\n\
         int fx_slow(int x) { return fx_impl_slow(x); }\n",
    );
    let out = std::process::Command::new("strip")
        .arg(&dir_lib)
        .output()
        .expect("running strip");
    assert!(out.status.success());
    let lib = Library::open(&dir_lib);
    let f = std::hint::black_box(lib.function(c"fx_ifunc"));
    let at = f as usize as u64;
    let syms = live().current_symbols();
    let func = syms.find("fx_ifunc").unwrap();
    assert!(func.ifunc && func.start == at, "{func:?} vs {at:#x}");
    assert!(func.size >= 4 && func.size < 64, "{func:?}");
    assert_eq!(syms.function_at(at + func.size - 1), Some(func));
    count_calls("fx_ifunc", at, 9, || {
        for x in 0..9 {
            assert_eq!(f(x), x * 5 + 1);
        }
    });
    // Also by address (found through the same extent).
    let hits = Arc::new(AtomicU64::new(0));
    let probe = counting(Kprobe::at(at), &hits);
    live().registry().register(&probe).unwrap();
    assert_eq!(f(3), 16);
    live().registry().unregister(&probe).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 1);
    lib.close();
    let _ = std::fs::remove_dir_all(dir_lib.parent().unwrap());
}

/// The string `call_once` passes to `strlen` and `strcmp` (first argument).
static ABC: &std::ffi::CStr = c"abc";
/// `call_once`'s `memcpy` destination.
static DST: [AtomicU64; 1] = [AtomicU64::new(0)];

/// The first argument `call_once` passes to `name`: what a probe counts.
fn marker(name: &str) -> u64 {
    if name == "memcpy" {
        DST.as_ptr() as u64
    } else {
        ABC.as_ptr() as u64
    }
}

/// Calls the C library's `strlen`, `memcpy` or `strcmp` at `at` once, with
/// [`marker`] as the first argument.
fn call_once(name: &str, at: u64) {
    type StrLen = extern "C" fn(*const libc::c_char) -> usize;
    type MemCpy = extern "C" fn(*mut libc::c_void, *const libc::c_void, usize) -> *mut libc::c_void;
    type StrCmp = extern "C" fn(*const libc::c_char, *const libc::c_char) -> libc::c_int;
    match name {
        "strlen" => {
            // SAFETY: dlsym's strlen has this C signature.
            let f =
                std::hint::black_box(unsafe { std::mem::transmute::<usize, StrLen>(at as usize) });
            assert_eq!(f(ABC.as_ptr()), 3);
        }
        "memcpy" => {
            // SAFETY: dlsym's memcpy has this C signature.
            let f =
                std::hint::black_box(unsafe { std::mem::transmute::<usize, MemCpy>(at as usize) });
            let src = 0x0102_0304_0506_0708u64;
            f(
                DST.as_ptr().cast_mut().cast(),
                (&src as *const u64).cast(),
                8,
            );
            assert_eq!(DST[0].load(Ordering::Relaxed), src);
        }
        _ => {
            // SAFETY: dlsym's strcmp has this C signature.
            let f =
                std::hint::black_box(unsafe { std::mem::transmute::<usize, StrCmp>(at as usize) });
            assert_eq!(f(ABC.as_ptr(), c"abc".as_ptr()), 0);
        }
    }
}

#[test]
fn c_library_ifuncs_resolve_to_what_dlsym_gives() {
    let _g = serial();
    let syms = live().current_symbols();
    let reg = live().registry();
    // strlen, memcpy and strcmp: the trap path calls no C-library function
    // (the walk in refuse.rs proves it), so they take probes, by name and by
    // the implementation's address, and count exactly the calls made with
    // this test's argument (the runtime and the harness call them too).
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    for name in ["strlen", "memcpy", "strcmp"] {
        let at = dlsym_default(&c(name));
        let func = syms.find(name).unwrap();
        assert!(
            func.ifunc && func.start == at,
            "{name}: {func:?} vs {at:#x}"
        );
        assert!(func.object.ends_with("/libc.so.6"), "{func:?}");
        let before = code(at, 16);
        let sites = reg.sites();
        let mark = marker(name);
        for builder in [Kprobe::symbol(name, 0), Kprobe::at(at)] {
            let mine = Arc::new(AtomicU64::new(0));
            let m = Arc::clone(&mine);
            let probe = builder
                .pre(move |_p, regs| {
                    if regs.arg(0) == Some(mark) {
                        m.fetch_add(1, Ordering::Relaxed);
                    }
                    Action::Continue
                })
                .build();
            if let Err(e) = reg.register(&probe) {
                panic!("{name}: {e}");
            }
            call_once(name, at);
            call_once(name, at);
            reg.unregister(&probe).unwrap();
            assert_eq!(mine.load(Ordering::Relaxed), 2, "{name}");
            assert_eq!(code(at, 16), before, "{name}");
            assert_eq!(reg.sites(), sites, "{name}");
        }
    }
    // Other IFUNCs: exact counts through dlsym's function pointers (the
    // handler calls nothing).
    type Spn = extern "C" fn(*const libc::c_char, *const libc::c_char) -> usize;
    type CaseCmp = extern "C" fn(*const libc::c_char, *const libc::c_char) -> libc::c_int;
    type WcsLen = extern "C" fn(*const libc::wchar_t) -> usize;
    let at = dlsym_default(c"strspn");
    // SAFETY: dlsym's strspn has this C signature.
    let strspn = std::hint::black_box(unsafe { std::mem::transmute::<usize, Spn>(at as usize) });
    count_calls("strspn", at, 4, || {
        for _ in 0..4 {
            assert_eq!(strspn(c"aabbc".as_ptr(), c"ab".as_ptr()), 4);
        }
    });
    let at = dlsym_default(c"strcasecmp");
    // SAFETY: dlsym's strcasecmp has this C signature.
    let strcasecmp =
        std::hint::black_box(unsafe { std::mem::transmute::<usize, CaseCmp>(at as usize) });
    count_calls("strcasecmp", at, 3, || {
        for _ in 0..3 {
            assert_eq!(strcasecmp(c"Probe".as_ptr(), c"pROBE".as_ptr()), 0);
        }
    });
    let at = dlsym_default(c"wcslen");
    // SAFETY: dlsym's wcslen has this C signature.
    let wcslen = std::hint::black_box(unsafe { std::mem::transmute::<usize, WcsLen>(at as usize) });
    let wide: Vec<libc::wchar_t> = "wide\0".chars().map(|c| c as libc::wchar_t).collect();
    count_calls("wcslen", at, 6, || {
        for _ in 0..6 {
            assert_eq!(wcslen(wide.as_ptr()), 4);
        }
    });
}
