//! Which functions the trap path calls only on its way to ending the
//! process, and so are refused at their entry but not walked into.
//!
//! # Why stop there
//!
//! A panic in the trap path ends the process (the SIGTRAP handler is
//! `extern "C"`: unwinding out of it aborts), `abort` ends it, and the
//! runtime's fatal report ends in `abort`. That code runs at most once per
//! process. Walking it would refuse most of `std`: the panic hook formats
//! (`core::fmt`), allocates (`malloc`), captures backtraces, and unwinding
//! runs the whole of `libgcc_s`. Those are fair probe targets for a user.
//! The worst a probe there can do is turn the abort message into a crash
//! one call deeper (a trap nested in a dying trap path).
//!
//! # How they are recognised
//!
//! By name, which is how the standard library spells its cold paths:
//! `core::panicking`/`std::panicking`, helpers whose last path segment
//! starts with `panic` or ends in `_fail`/`_failed` (bounds, slice,
//! `unwrap`/`expect` failures), the allocation-failure handlers,
//! `std::process::abort`; in the C library `abort`, `__assert_fail` and the
//! fortify/stack-protector reports; the unwinder's entry points; and the
//! runtime's own `signal::fatal*`. A stripped C library's internal fatal
//! paths have no name and are walked (which only refuses more).

/// Why a function the trap path calls is refused but not walked into, if
/// it is one that only leads to the end of the process (module docs):
/// the `core`/`std`/`alloc` panic machinery and its `*_fail` helpers,
/// allocation-failure handlers, `abort` and the C library's fatal-error
/// reports, and the runtime's own fatal-error report.
pub fn dying_path(name: &str) -> Option<&'static str> {
    const PANIC: &str = "panics (the trap path's panic ends the process)";
    const ABORT: &str = "aborts the process";
    const FATAL: &str = "reports a fatal runtime error and aborts";
    const UNWIND: &str = "unwinds a panic (landing pads end in it)";
    let std_crate = ["core::", "std::", "alloc::"]
        .iter()
        .any(|c| name.starts_with(c));
    if std_crate {
        if name.starts_with("core::panicking::") || name.starts_with("std::panicking::") {
            return Some(PANIC);
        }
        let last = name.rsplit("::").next().unwrap_or(name);
        if last.starts_with("panic")
            || last.ends_with("_fail")
            || last.ends_with("_failed")
            || last == "handle_alloc_error"
            || last == "handle_error"
            || last == "capacity_overflow"
        {
            return Some(PANIC);
        }
        if name == "std::process::abort" || name.ends_with("::abort_internal") {
            return Some(ABORT);
        }
        return None;
    }
    match name {
        "_Unwind_Resume" | "_Unwind_RaiseException" | "__rust_start_panic" | "rust_panic" => {
            Some(UNWIND)
        }
        "abort" | "__assert_fail" | "__stack_chk_fail" | "__fortify_fail" | "__libc_fatal"
        | "__chk_fail" => Some(ABORT),
        n if n.starts_with("rcu_registry::probes::runtime::signal::fatal") => Some(FATAL),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_panic_machinery_and_abort_are_dying_paths_and_ordinary_code_is_not() {
        for name in [
            "core::panicking::panic_fmt",
            "core::panicking::panic_const::panic_const_add_overflow",
            "std::panicking::begin_panic::{{closure}}",
            "core::slice::index::slice_end_index_len_fail",
            "core::result::unwrap_failed",
            "core::option::expect_failed",
            "core::cell::panic_already_borrowed",
            "alloc::alloc::handle_alloc_error",
            "abort",
            "_Unwind_Resume",
            "rcu_registry::probes::runtime::signal::fatal_message",
        ] {
            assert!(dying_path(name).is_some(), "{name}");
        }
        for name in [
            "core::fmt::write",
            "memcpy",
            "malloc",
            "std::sys::pal::unix::thread_local::key::racy::LazyKey::lazy_init",
            "rcu_registry::rcu::Rcu::read",
            "rcu_registry::probes::runtime::signal::handle_sigtrap",
        ] {
            assert_eq!(dying_path(name), None, "{name}");
        }
    }
}
