//! Fixture shared libraries for the live tests: C sources built with the
//! target's C compiler ([`target_cc`]) into a per-process temporary
//! directory, opened with `dlopen`. The arm64 suite (`live-arm64`, run
//! under qemu-aarch64) includes this file too.

#![allow(dead_code)]

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// `<tmp>/rcu-registry-<tag>-<pid>`, created.
pub fn fixture_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rcu-registry-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The C compiler that builds code for the architecture this test runs as:
/// `cc`, except for an aarch64 test run under qemu-user on another host,
/// which runs the host's programs (its `cc` builds for the host) and finds
/// the cross compiler `aarch64-linux-gnu-gcc` on the `PATH` (natively on
/// arm64 that name, when present, is the native compiler: right as well).
pub fn target_cc() -> &'static str {
    const CROSS: &str = "aarch64-linux-gnu-gcc";
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if cfg!(target_arch = "aarch64") && on_path(CROSS) {
        CROSS
    } else {
        "cc"
    }
}

/// Builds `file` (a shared object) in [`fixture_dir`]`(tag)` from `source`
/// with `<`[`target_cc`]`> -shared -fPIC -O1` and `extra` arguments.
pub fn build_so(tag: &str, file: &str, source: &str, extra: &[&str]) -> PathBuf {
    build(tag, file, "c", source, extra)
}

/// [`build_so`] from assembly (`.s`, GNU syntax): a library of 100,000
/// generated functions assembles in a second where `cc` takes minutes.
pub fn build_asm_so(tag: &str, file: &str, source: &str) -> PathBuf {
    build(tag, file, "s", source, &[])
}

fn build(tag: &str, file: &str, ext: &str, source: &str, extra: &[&str]) -> PathBuf {
    let dir = fixture_dir(tag);
    let src = dir.join(format!("{file}.{ext}"));
    let so = dir.join(file);
    std::fs::write(&src, source).unwrap();
    let cc = target_cc();
    let out = std::process::Command::new(cc)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(&src)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// Whether a mapping of `path` is in `/proc/self/maps`.
pub fn is_mapped(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.ends_with(path.to_str().unwrap()))
}

/// A `dlopen` handle.
pub struct Lib(pub *mut libc::c_void);

// SAFETY: a dlopen handle may be used and closed from any thread.
unsafe impl Send for Lib {}
// SAFETY: as above; dlsym on a handle is thread-safe.
unsafe impl Sync for Lib {}

/// The fixtures' function type.
pub type IntFn = extern "C" fn(i32) -> i32;

impl Lib {
    /// `dlopen(path, RTLD_NOW | RTLD_LOCAL)`.
    pub fn open(path: &Path) -> Lib {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen {path:?}");
        Lib(h)
    }

    /// The fixture's `int name(int)`.
    pub fn func(&self, name: &CStr) -> IntFn {
        // SAFETY: a live handle and a valid C string.
        let p = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        assert!(!p.is_null(), "dlsym {name:?}");
        // SAFETY: the fixtures' functions are `int (int)`.
        unsafe { std::mem::transmute::<*mut libc::c_void, IntFn>(p) }
    }

    /// `dlclose`; no pointer into the library may be used afterwards.
    pub fn close(self) {
        // SAFETY: a handle from dlopen, closed once.
        assert_eq!(unsafe { libc::dlclose(self.0) }, 0);
    }
}

/// The source of the batch fixtures: `n` functions `int fI(int x)`
/// returning `x + I`, none inlined or folded into another.
pub fn adders_source(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "__attribute__((noinline)) int f{i}(int x) {{ __asm__ volatile(\"\"); return x + {i}; }}\n"
            )
        })
        .collect()
}

/// An [`adders_source`] fixture's `fI`.
pub fn adder(lib: &Lib, i: usize) -> IntFn {
    lib.func(&CString::new(format!("f{i}")).unwrap())
}

/// Calls each of the `n` adders `fI(I)` `I % spread + 1` times, checking
/// every result; the calls made to each.
pub fn call_each(lib: &Lib, n: usize, spread: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let f = adder(lib, i);
            let times = i % spread + 1;
            for _ in 0..times {
                assert_eq!(f(i as i32), 2 * i as i32);
            }
            times as u64
        })
        .collect()
}

/// Every counter's value (`SeqCst`: the tests' handler counters, read
/// after the calls; no pairing needed).
pub fn snapshot(counts: &[AtomicU64]) -> Vec<u64> {
    counts.iter().map(|c| c.load(Ordering::SeqCst)).collect()
}

/// The source of a fixture of `int NAME(int x)` functions returning `x +
/// K` for each `(NAME, K)`, each `mov eax, edi; add eax, K; ret` laid out
/// byte by byte (five bytes of two relocatable instructions before the
/// `ret`: what a jump-optimized probe displaces), 16-byte aligned.
pub fn add_k_source(funcs: &[(&str, u8)]) -> String {
    let mut s = String::from("__asm__(\n    \".text\\n\"\n");
    for (name, k) in funcs {
        s.push_str(&format!(
            "    \".p2align 4\\n.globl {name}\\n.type {name},@function\\n{name}:\\n\"\n    \
             \".byte 0x89, 0xf8, 0x83, 0xc0, {k:#04x}, 0xc3\\n.size {name}, . - {name}\\n\"\n"
        ));
    }
    s.push_str(");\n");
    s
}

/// The bytes of an [`add_k_source`] function adding `k`.
pub const fn add_k_bytes(k: u8) -> [u8; 6] {
    [0x89, 0xf8, 0x83, 0xc0, k, 0xc3]
}
