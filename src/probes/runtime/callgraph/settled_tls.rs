//! The walk's rule for thread-locals: the standard access of a settled
//! [`TrapLocal`](crate::sync::TrapLocal) is not on the trap path.
//!
//! # Why stop there
//!
//! Every thread-local of this crate is a `TrapLocal` (`sync/trap_local.rs`):
//! its `with` reaches the value at the thread pointer plus a settled
//! offset, or, while that offset is 0, through the standard thread-local
//! in the out-of-line [`DYNAMIC_TLS_ACCESS`] function. In a shared library
//! that function calls the loader's `__tls_get_addr`, whose slow paths
//! lock, allocate and report errors (`malloc`, `realloc`, `free`,
//! `strerror`, `getenv`, ...). Once `probes/runtime/trap_tls.rs` has
//! proven static TLS and settled every `TrapLocal` of the object
//! (`crate::sync::all_settled`), before the walk and before any probe can
//! be placed, no offset is 0 again, and that branch never runs: the walk
//! refuses the function (it is this crate's) but does not follow it. Not
//! proven (an object loaded with `dlopen`, another C library), the walk
//! goes into it, and, since it reaches the loader only through the
//! `LocalKey`'s accessor (an indirect call), also starts from the loader's
//! `__tls_get_addr` in a shared object (`refuse.rs`), refusing what that
//! reaches: the hazard is real then.
//!
//! # How it is recognised
//!
//! By its demangled name, one generic function whatever the value's type
//! (every instance is the same code over a different key).

/// The standard access every unsettled `TrapLocal` takes (module docs).
pub const DYNAMIC_TLS_ACCESS: &str =
    "rcu_registry::sync::trap_local::TrapLocal<T>::dynamic_address";

/// Why a function is not walked into, if it is the standard thread-local
/// access and every thread-local of this object is settled (module docs).
pub fn settled_tls(name: &str) -> Option<&'static str> {
    (name == DYNAMIC_TLS_ACCESS && crate::sync::all_settled()).then_some(
        "the thread-locals' standard access, never taken once they are settled in static TLS",
    )
}
