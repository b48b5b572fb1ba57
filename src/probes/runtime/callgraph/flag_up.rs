//! The trap path's boundary: functions that run only with the thread's
//! trap flag raised by their caller, where the walk stops.
//!
//! # Why stop there
//!
//! The SIGTRAP handler and the kretprobe trampoline's Rust half raise the
//! thread's trap flag before anything else (`runtime/in_trap.rs`). A probe
//! hit in code that runs only after that is a nested trap: it finds the
//! flag up and takes the missed path (the nested SIGTRAP handler, which is
//! walked), never recursing. Such code may call the C library: `errno`'s
//! location, arming the `Rcu` reader slot's release at thread exit
//! (`pthread_setspecific`), the probe handlers, the kretprobe return path
//! (its spin lock's back-off yields with `sched_yield`). So the walk does
//! not follow it, and the C library it reaches stays probeable.
//!
//! What such code shares with the nested path is walked from there. The
//! boundary functions are this crate's, so they stay refused by the
//! crate-name rule.
//!
//! # How they are recognised
//!
//! By exact symbol name, a short fixed list: each is `#[inline(never)]`
//! and called only after the flag went up (`signal.rs`, `trampoline.rs`,
//! the uprobe and kprobe hit paths say so where they call it). A function added to the trap path before
//! the flag that calls the C library is therefore walked, and
//! `tests/runtime_refuse.rs` fails on the C-library function it reaches.

/// The functions the walk stops at because they run only with the trap
/// flag up (module docs).
pub const FLAG_UP_ENTRIES: [&str; 4] = [
    "rcu_registry::probes::runtime::signal::handle_outer_trap",
    "rcu_registry::probes::runtime::trampoline::returning",
    // A uprobe hit's return tracking runs only once the hit raised the
    // uprobe family's handler flag itself, which a nested trap never does
    // (`in_trap::nested` holds both families' flags up): so only in an
    // outer trap, past the trap flag. (Its thread's first call arms the
    // return stacks' exit key with `pthread_setspecific`.)
    "rcu_registry::probes::uprobe::returns::<impl rcu_registry::probes::uprobe::registry::UprobeRegistry<A,S,F>>::track_return",
    // A kretprobe's entry on a trap hit, likewise: only once the hit raised
    // the kprobe family's handler flag itself, which a nested trap never
    // does. (Filing the thread's first instance arms the instance tables'
    // exit flush with `pthread_setspecific`.)
    "rcu_registry::probes::kprobe::hit::<impl rcu_registry::probes::kprobe::registry::KprobeRegistry<A,T>>::return_entry",
];

/// Why a function is not walked into, if it is a flag-up entry (module
/// docs).
pub fn flag_up(name: &str) -> Option<&'static str> {
    FLAG_UP_ENTRIES
        .contains(&name)
        .then_some("runs only with the thread's trap flag up (a probe hit there is missed)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_entries_are_flag_up() {
        for name in FLAG_UP_ENTRIES {
            assert!(flag_up(name).is_some());
        }
        for name in [
            "rcu_registry::probes::runtime::signal::handle_sigtrap",
            "rcu_registry::probes::runtime::signal::handle_nested_trap",
            "rcu_registry::probes::runtime::trampoline::trampoline_return",
            "pthread_setspecific",
        ] {
            assert_eq!(flag_up(name), None, "{name}");
        }
    }
}
