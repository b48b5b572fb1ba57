//! Checks run in a `fork` child, the verdict handed back as its exit
//! status (the child has only the forking thread: nothing of the test
//! harness may run there, so no panic crosses back).

/// Forks; the child runs `checks` and leaves with `_exit(0)` if they hold,
/// `_exit(1)` if not; the parent waits for it and fails with `what` unless
/// it exited with 0. `checks` must do only what is safe in the child of a
/// multi-threaded process (the runtime's and the domains' own fork
/// handlers make them usable there) and must not unwind.
pub fn run_in_fork_child(what: &str, checks: impl FnOnce() -> bool) {
    // SAFETY: the child runs `checks` (the caller's contract above) and
    // leaves with _exit; the test harness's other threads do not exist in
    // it.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = checks();
        // SAFETY: ends the child without running the parent's destructors
        // or atexit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    assert!(pid > 0, "fork");
    // A bounded wait (a failure detector: a passing child exits in
    // milliseconds): a child stuck in the emulator itself is killed and
    // reported instead of hanging the suite.
    let mut status = 0;
    let start = std::time::Instant::now();
    loop {
        // SAFETY: polls our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "waitpid");
        if start.elapsed() > std::time::Duration::from_secs(120) {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("{what}: the child hung for 120 s (killed)");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what} (status {status:#x})"
    );
}
