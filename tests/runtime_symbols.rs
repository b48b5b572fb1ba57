//! Probes placed by name on the live runtime (issue 11): offsets are checked
//! against the function's extent, symbols follow `dlopen`/`dlclose`, a name
//! defined in two objects is an error unless qualified (`object:name`), and
//! IFUNC functions (`strlen`, `memcpy`, `strcmp`) resolve to the
//! implementation the loader chose. Every test takes the binary's serial
//! lock (they share the SIGTRAP handler and the registry).

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
fn build_library(file: &str, source: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rcu-registry-symbols-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{file}.c"));
    let so = dir.join(file);
    std::fs::write(&c, source).unwrap();
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(&c)
        .output()
        .expect("running cc");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
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
    let krp = Kretprobe::<()>::symbol("fx_both")
        .maxactive(4)
        .handler(|_, _, _| {})
        .build()
        .unwrap();
    assert_eq!(reg.register_kretprobe(&krp), Err(ambiguous));
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
