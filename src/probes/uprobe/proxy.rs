//! [`ProxyReturns`]: the return stack of a thread whose hits another
//! thread serves.
//!
//! The registry keeps tracked calls per *calling* thread (`bindings.rs`).
//! A tracer of other processes serves every traced thread's hits on its own
//! thread: without a stack per traced thread, their calls would mix on one
//! stack, and one thread's entry would drop another's calls as abandoned
//! (their return then finds nothing and dies of the trampoline's trap). A
//! `ProxyReturns` is kept by the tracer for each traced thread and put in
//! place for the length of one hit or return
//! ([`UprobeRegistry::serving`]); it also lists the thread's calls in
//! flight, whose return addresses a detach or a `fork` child's clean-up
//! writes back.

use std::marker::PhantomData;

use super::bindings;
use super::registry::UprobeRegistry;
use super::retpool::Held;
use super::space::{AddressSpace, SpaceId};
use crate::probes::arch::Arch;
use crate::probes::reentry::UprobeScope;
use crate::rcu::Flavor;

/// The return stack of one traced thread in one space of one registry,
/// held between its hits by the thread that serves them (not `Send`: the
/// stack is only ever touched by that thread).
#[derive(Debug)]
pub struct ProxyReturns {
    registry: u64,
    space: SpaceId,
    held: Option<Held>,
    _one_thread: PhantomData<*const ()>,
}

/// A call in flight: where its return address is kept and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallInFlight {
    /// The stack pointer the call returns with (on x86_64 the return
    /// address, now the trampoline's, is the word below it).
    pub ret_sp: u64,
    /// The caller's real return address.
    pub real_ret: u64,
}

impl ProxyReturns {
    /// The thread's calls in flight, oldest first.
    pub fn calls(&self) -> Vec<CallInFlight> {
        let Some(held) = self.held else {
            return Vec::new();
        };
        // SAFETY: this value holds the stack (claimed by the registry for
        // it, not given back) and only its owner's thread touches it.
        unsafe {
            held.with_frames(|frames| {
                frames
                    .iter()
                    .map(|f| CallInFlight {
                        ret_sp: f.ret_sp,
                        real_ret: f.real_ret,
                    })
                    .collect()
            })
        }
    }
}

impl Drop for ProxyReturns {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            // SAFETY: held by this value only (taken out of the table after
            // each hit), dropped here for good; a registry already gone has
            // marked its pool and the give-back frees it.
            unsafe { held.release_anywhere() };
        }
    }
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// An empty return stack for a thread of `space` whose hits the calling
    /// thread will serve.
    pub fn proxy_returns(&self, space: SpaceId) -> ProxyReturns {
        ProxyReturns {
            registry: self.returns.id,
            space,
            held: None,
            _one_thread: PhantomData,
        }
    }

    /// Runs `f` (a hit or a return in `proxy`'s space, served for the thread
    /// `proxy` belongs to) with `proxy`'s stack as the calling thread's
    /// stack for this registry and that space; a stack claimed during `f`
    /// goes back into `proxy`.
    ///
    /// # Panics
    /// `proxy` was made by another registry.
    pub fn serving<R>(&self, proxy: &mut ProxyReturns, f: impl FnOnce() -> R) -> R {
        assert_eq!(proxy.registry, self.returns.id, "another registry's stack");
        {
            // The table is reached only with the re-entrancy flag up; it
            // comes down for `f`, whose hit raises it itself.
            let _scope = UprobeScope::enter();
            if let Some(held) = proxy.held.take() {
                if !bindings::install(proxy.registry, proxy.space, held) {
                    // The serving thread has a stack of its own for this
                    // space (it cannot: it runs in another process); kept.
                    proxy.held = Some(held);
                }
            }
        }
        let out = f();
        let _scope = UprobeScope::enter();
        if let Some(held) = bindings::uninstall(proxy.registry, proxy.space) {
            debug_assert!(proxy.held.is_none());
            proxy.held = Some(held);
        }
        out
    }
}
