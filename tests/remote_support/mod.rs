//! The fixture program of the remote tests and bench (`fixture.c`), built
//! with `cc` into a per-process temporary directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `<tmp>/rcu-registry-remote-<pid>`, created.
pub fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("rcu-registry-remote-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture program, built once per process.
pub fn fixture() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/remote_support/fixture.c");
            let exe = dir().join("fixture");
            let out = Command::new("cc")
                .args(["-O1", "-pthread", "-o"])
                .arg(&exe)
                .arg(&src)
                .arg("-ldl")
                .output()
                .expect("running cc");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            exe
        })
        .clone()
}

/// A library the fixture opens: `lib_add(x) = x + 5`.
pub fn fixture_lib() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = dir().join("lib.c");
            std::fs::write(
                &src,
                "__attribute__((noinline)) long lib_add(long x) { return x + 5; }\n",
            )
            .unwrap();
            let so = dir().join("libremotefix.so");
            let out = Command::new("cc")
                .args(["-shared", "-fPIC", "-O1", "-o"])
                .arg(&so)
                .arg(&src)
                .output()
                .expect("running cc");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            so
        })
        .clone()
}

/// A program started untraced, killed and reaped if a test fails first.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
