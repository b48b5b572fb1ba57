//! What the tests share: the fixture program (built here with `cc`), the
//! binary, JSON lines, a process's memory and state.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const RCU_TRACE: &str = env!("CARGO_BIN_EXE_rcu-trace");

/// Why this machine cannot run the traced tests, if it cannot: they
/// print it and return (never a silent pass).
pub fn cannot_trace() -> Option<String> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Some("the ptrace engine is x86_64 Linux only".into());
    }
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        if v.trim() == "3" {
            return Some("kernel.yama.ptrace_scope is 3: no process may be traced".into());
        }
    }
    if Command::new("cc").arg("--version").output().is_err() {
        return Some("no C compiler (cc) to build the fixture".into());
    }
    None
}

/// Returns from the test (printing why) when tracing is impossible here.
macro_rules! need_tracing {
    () => {
        if let Some(why) = common::cannot_trace() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// For helpers: panics (a test forgot `need_tracing!`) where the macro
/// would have returned.
pub fn need_tracing_or_panic() {
    if let Some(why) = cannot_trace() {
        panic!("call need_tracing!() first: {why}");
    }
}

/// A directory of this test binary's own.
pub fn dir() -> PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("rcu-trace-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

/// The fixture program (`tests/fixture.c`), built once per test binary.
pub fn fixture() -> PathBuf {
    static F: OnceLock<PathBuf> = OnceLock::new();
    F.get_or_init(|| {
        let out = dir().join("fixture");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture.c");
        let st = Command::new("cc")
            .args(["-O1", "-g", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("cc runs");
        assert!(st.success(), "building the fixture");
        out
    })
    .clone()
}

/// `fixture` as a spec's PATH.
pub fn fx() -> String {
    fixture().to_str().unwrap().to_string()
}

/// A fresh path in [`dir`] (not created).
pub fn path(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // Relaxed: a counter for unique names.
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir().join(format!("{name}-{n}"))
}

/// The JSON objects among `out`'s lines (the program's own lines, which
/// do not start with `{`, are left out).
pub fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The summary object of `probe`.
pub fn probe<'a>(objs: &'a [Value], probe: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["type"] == "probe" && o["probe"] == probe)
        .unwrap_or_else(|| panic!("no probe {probe} in {objs:#?}"))
}

/// The summary objects of every probe.
pub fn probes(objs: &[Value]) -> Vec<&Value> {
    objs.iter().filter(|o| o["type"] == "probe").collect()
}

/// The file offset of `name` in the fixture, as `--list` gives it.
pub fn offset_of(name: &str) -> u64 {
    let out = Command::new(RCU_TRACE)
        .args(["--json", "--list", &format!("{}:{name}", fx())])
        .output()
        .unwrap();
    assert!(out.status.success());
    let objs = json_lines(&out.stdout);
    assert_eq!(objs.len(), 1, "{objs:?}");
    objs[0]["offset"].as_u64().unwrap()
}

/// Where file offset `offset` of `file` is mapped in `pid`.
pub fn vaddr_in(pid: u32, file: &Path, offset: u64) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let want = file.canonicalize().unwrap();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || Path::new(f[5]) != want {
            continue;
        }
        let (lo, hi) = f[0].split_once('-').unwrap();
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).unwrap(),
            u64::from_str_radix(hi, 16).unwrap(),
        );
        let off = u64::from_str_radix(f[2], 16).unwrap();
        if offset >= off && offset - off < hi - lo {
            return lo + (offset - off);
        }
    }
    panic!(
        "offset {offset:#x} of {} not mapped in {pid}",
        file.display()
    )
}

/// `len` bytes of `pid`'s memory at `addr`.
pub fn mem(pid: u32, addr: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, addr).unwrap();
    b
}

/// `len` bytes of `file` at `offset`.
pub fn file_bytes(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

/// A field of `/proc/pid/status`.
pub fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap()
}

/// Whether `pid` runs untraced and not stopped (`R` or `S`, no tracer).
pub fn runs_untraced(pid: u32) -> bool {
    let state = status_field(pid, "State:");
    status_field(pid, "TracerPid:") == "0" && (state.starts_with('R') || state.starts_with('S'))
}

/// Waits for `path` to exist. The deadline only turns a hang into a
/// failure; nothing depends on how fast it comes.
pub fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never came", path.display());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A child process, killed and reaped if a test fails first.
pub struct Running(pub Child);

impl Running {
    /// Starts `cmd` with its standard streams piped.
    pub fn start(cmd: &mut Command) -> Running {
        Running(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// The fixture in its `gate` mode: waits (sleeping) for `go`, then
    /// `fx_work(i)`, `i` in `0..n`, in each of `threads` threads, writes
    /// the sum to `done` and waits for `stop`.
    pub fn gate(go: &Path, done: &Path, stop: &Path, n: u32, threads: u32) -> Running {
        Running::start(Command::new(fixture()).args([
            "gate".as_ref(),
            go.as_os_str(),
            done.as_os_str(),
            stop.as_os_str(),
            n.to_string().as_ref(),
            threads.to_string().as_ref(),
        ]))
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `child`'s standard error line by line until one contains
/// `needle`; returns the lines read. Byte by byte: nothing past that line
/// is taken from the pipe.
pub fn stderr_until(child: &mut Child, needle: &str) -> Vec<String> {
    use std::io::Read;
    let err = child.stderr.as_mut().unwrap();
    let mut lines = Vec::new();
    let mut line = Vec::new();
    let mut b = [0u8];
    loop {
        let n = err.read(&mut b).unwrap();
        assert!(n > 0, "stderr closed before `{needle}`: {lines:?}");
        if b[0] != b'\n' {
            line.push(b[0]);
            continue;
        }
        let l = String::from_utf8_lossy(&line).into_owned();
        line.clear();
        let hit = l.contains(needle);
        lines.push(l);
        if hit {
            return lines;
        }
    }
}

/// Creates its file when dropped: a fixture waiting for it ends even if
/// a test fails first (one no longer this test's child cannot be killed
/// by a guard holding it).
pub struct CreateOnDrop(pub PathBuf);

impl Drop for CreateOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"");
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill with plain integers.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0);
}
