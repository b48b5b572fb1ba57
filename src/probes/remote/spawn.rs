//! Starting a command under the tracer, stopped at its first instruction:
//! `fork`, the child stops itself (`SIGSTOP`) before `execve`, the tracer
//! seizes it and lets it run into the `exec`, whose event stop is the first
//! instruction of the new image (the dynamic linker's entry, before any
//! library is loaded and before `main`).
//!
//! Everything the child needs (path, argument and environment strings) is
//! prepared before `fork`: a child of a multi-threaded process may only
//! make async-signal-safe calls (`chdir`, `raise`, `execve`, `write`,
//! `_exit`) until it `exec`s.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::ptrace::{self, Stop, Tid};

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// `cmd`'s program as `execvp` would find it: a name with a `/` as it is
/// (under `cmd`'s directory if relative), else the first executable file
/// of that name in `PATH` (`cmd`'s own if it sets one).
fn find_program(cmd: &Command, env: &[(OsString, OsString)]) -> io::Result<PathBuf> {
    let program = Path::new(cmd.get_program());
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(match cmd.get_current_dir() {
            Some(dir) if program.is_relative() => dir.join(program),
            _ => program.to_path_buf(),
        });
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            let Ok(c) = cstring(p.as_os_str()) else {
                return false;
            };
            // SAFETY: a valid C string.
            p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not found in PATH", program.display()),
            )
        })
}

/// The environment `cmd` would run with: this process's, changed as `cmd`
/// says (`Command::env_clear` cannot be seen through its getters and is not
/// honoured).
fn environment(cmd: &Command) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        env.retain(|(key, _)| key != k);
        if let Some(v) = v {
            env.push((k.to_os_string(), v.to_os_string()));
        }
    }
    env
}

/// Starts `cmd` traced by this thread and returns its pid, stopped at the
/// `exec` event (its first instruction). `PTRACE_O_EXITKILL`: if the tracer
/// dies, the command dies with it (a spawned command never runs on with
/// breakpoints and nobody to serve them).
pub(super) fn spawn(cmd: &Command) -> io::Result<Tid> {
    let env = environment(cmd);
    let program = find_program(cmd, &env)?;
    if let Some(machine) = super::tracer::foreign_machine(&program) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            super::tracer::ForeignMachine(machine),
        ));
    }
    let path = cstring(program.as_os_str())?;
    let mut argv: Vec<CString> = vec![cstring(cmd.get_program())?];
    for a in cmd.get_args() {
        argv.push(cstring(a)?);
    }
    let envp: Vec<CString> = env
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
        })
        .collect::<io::Result<_>>()?;
    let dir = cmd
        .get_current_dir()
        .map(|d| cstring(d.as_os_str()))
        .transpose()?;
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain([std::ptr::null()])
            .collect()
    };
    let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
    // SAFETY: the child makes only async-signal-safe calls on memory
    // prepared above (see the module docs) and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: the child: C strings and pointer arrays prepared before
        // the fork; `_exit` never returns.
        unsafe {
            if let Some(d) = &dir {
                if libc::chdir(d.as_ptr()) != 0 {
                    libc::_exit(126);
                }
            }
            libc::raise(libc::SIGSTOP);
            libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
            libc::_exit(127);
        }
    }
    match seize_child(pid) {
        Ok(()) => Ok(pid),
        Err(e) => {
            // SAFETY: our own child; reaped below.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = ptrace::wait(pid, 0);
            Err(e)
        }
    }
}

/// Seizes the child stopped before its `execve` and runs it to the `exec`
/// event stop.
fn seize_child(pid: Tid) -> io::Result<()> {
    // The child's own SIGSTOP (not traced yet: an ordinary stop).
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` is a live c_int.
    if unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) } != pid
        || !libc::WIFSTOPPED(status)
    {
        return Err(io::Error::other("the child did not stop before exec"));
    }
    ptrace::seize(pid, libc::PTRACE_O_EXITKILL)?;
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    loop {
        let Some((_, status)) = ptrace::wait(pid, 0)? else {
            continue;
        };
        match ptrace::decode(status) {
            Stop::Event {
                event: libc::PTRACE_EVENT_EXEC,
                ..
            } => return Ok(()),
            Stop::Event { .. } => ptrace::cont(pid, 0)?,
            // SIGCONT and the leftover SIGSTOP: not for the program.
            Stop::Signal(libc::SIGCONT | libc::SIGSTOP) => ptrace::cont(pid, 0)?,
            Stop::Signal(sig) => ptrace::cont(pid, sig)?,
            Stop::Exited(code) => {
                return Err(io::Error::other(format!(
                    "the command could not be started (it exited with {code} before exec)"
                )))
            }
            Stop::Killed(sig) => {
                return Err(io::Error::other(format!(
                    "the command was killed by signal {sig} before exec"
                )))
            }
        }
    }
}
