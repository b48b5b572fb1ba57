//! **Not part of the API: no semver promise.** Items that are public only so
//! that this crate's tests, benchmarks and loom models (`tests/`, `benches/`,
//! `loom-tests/`) can reach them: the layout constants, protocol tables,
//! counters and invariant checks they inspect. Any of it may change or go in
//! any release; nothing here is documented for users (`#[doc(hidden)]`).
//!
//! This is the one path for such items: the public modules export only what
//! a user of the library needs. The module mirrors where each item lives
//! (`__internals::runtime::...` is the live runtime's). It sits above every
//! layer, so it may re-export from any of them.

/// The RCU domains' test hooks.
#[cfg(not(loom))]
pub mod rcu {
    use crate::rcu::{Rcu, Srcu};

    /// Gauges a test reads to force an interleaving instead of guessing it
    /// from timing (hold a reader until every caller arrived, stall grace
    /// periods until the callback throttle engaged). Relaxed loads: a gauge
    /// says that something happened, and orders nothing else.
    pub trait DomainGauges {
        /// `synchronize()` callers that have taken their grace-period
        /// snapshot and not yet returned.
        fn sync_waiters(&self) -> usize;
        /// Callers of `call` waiting right now because the backlog passed
        /// the high watermark.
        fn throttled_callers(&self) -> usize;
    }

    impl DomainGauges for Rcu {
        fn sync_waiters(&self) -> usize {
            Rcu::sync_waiters(self)
        }
        fn throttled_callers(&self) -> usize {
            Rcu::throttled_callers(self)
        }
    }

    /// An `Srcu` domain's open read sections, for the test of what a guard
    /// leaked on an exiting thread does (the handler contract's `Srcu`
    /// clause).
    pub trait SrcuSections {
        /// Sections begun minus sections ended, every thread's.
        fn open_sections(&self) -> usize;
    }

    impl SrcuSections for Srcu {
        fn open_sections(&self) -> usize {
            Srcu::open_sections(self)
        }
    }

    /// Makes the RCU domains run their fallback for a kernel without
    /// `membarrier` (readers issue real fences, updaters a `SeqCst` fence)
    /// in this process from now on, for tests on machines whose kernel (or
    /// emulator: qemu-user passes the call through) has it. MUST be called
    /// before any domain is created or used, the live runtime's included:
    /// returns false, and changes nothing, when `membarrier` is already in
    /// use (it is never taken back while readers may rely on it).
    pub fn force_membarrier_fallback() -> bool {
        crate::sys::refuse_membarrier()
    }

    /// Whether the domains' readers rely on `membarrier` right now (false
    /// before the first domain registered it, and under
    /// [`force_membarrier_fallback`]).
    pub fn membarrier_in_use() -> bool {
        crate::sys::membarrier_available()
    }

    impl DomainGauges for Srcu {
        fn sync_waiters(&self) -> usize {
            Srcu::sync_waiters(self)
        }
        fn throttled_callers(&self) -> usize {
            Srcu::throttled_callers(self)
        }
    }
}

/// The seqtree's test hooks.
pub mod seqtree {
    use crate::rcu::Flavor;
    use crate::seqtree::{LatchTree, SeqTree};

    /// A minimal RCU domain whose grace periods the loom models drive by
    /// hand (built for tests and loom only).
    #[cfg(any(test, loom))]
    pub mod model_domain {
        pub use crate::seqtree::model_domain::*;
    }

    /// Structural self-checks of the trees, for tests.
    pub trait CheckInvariants {
        /// Checks the red-black invariants, search order, parent links and
        /// the entry count (both copies of a [`LatchTree`]). Takes the
        /// writer lock.
        ///
        /// # Errors
        /// A description of the first violation found.
        fn check_invariants(&self) -> Result<(), String>;
    }

    impl<K, V, F> CheckInvariants for SeqTree<K, V, F>
    where
        K: Ord + Send + 'static,
        V: Send + 'static,
        F: Flavor,
    {
        fn check_invariants(&self) -> Result<(), String> {
            self.validate()
        }
    }

    impl<K, V, F> CheckInvariants for LatchTree<K, V, F>
    where
        K: Ord + Send + 'static,
        V: Send + 'static,
        F: Flavor,
    {
        fn check_invariants(&self) -> Result<(), String> {
            self.validate()
        }
    }
}

/// The kprobe registry's memory counters.
pub mod kprobe {
    pub use crate::probes::kprobe::deferred::RetiredLists;

    use crate::probes::arch::Arch;
    use crate::probes::kprobe::KprobeRegistry;
    use crate::probes::text::TextMemory;

    /// What tests read of a [`KprobeRegistry`]'s deferred frees.
    pub trait RetiredListCounts {
        /// Member lists replaced by registrations (a probe joining an
        /// address) or left by a failed registration: how many were
        /// retired, how many freed. They are freed a grace period after
        /// their retirement by the RCU domain's callback worker (a list on
        /// which a single-step is still in flight waits for it; see
        /// [`RetiredLists::waiting_for_steps`]). After
        /// [`Rcu::barrier`](crate::rcu::Rcu::barrier) on the registry's
        /// domain, every list retired before it whose steps completed is
        /// freed.
        fn retired_lists(&self) -> RetiredLists;
    }

    impl<A: Arch, T: TextMemory> RetiredListCounts for KprobeRegistry<A, T> {
        fn retired_lists(&self) -> RetiredLists {
            self.retired_list_counts()
        }
    }
}

/// The int3-first patch protocol's in-progress marker, for its loom model.
pub mod text {
    pub use crate::probes::text::patch_window::{PatchWindow, INT3};
}

/// The quiescence ack protocol of the live runtime's `quiesce`, for its
/// loom model.
pub mod quiesce_ack {
    pub use crate::probes::quiesce_ack::{Ack, AckTable, Round};
}

/// The live runtime's tuning constants, diagnostics and the code it refuses
/// to patch, for its tests.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64"),
    not(loom)
))]
pub mod runtime {
    pub use crate::probes::runtime::dispatch::steps_in_flight;
    pub use crate::probes::runtime::in_process::core_sync_method;
    pub use crate::probes::runtime::in_trap::in_trap;
    #[cfg(target_arch = "x86_64")]
    pub use crate::probes::runtime::jump::stubs::{
        set_upper_check, set_vector_width, upper_check, vector_width, UpperCheck,
    };
    pub use crate::probes::runtime::maps::{force_maps_full_read, maps_query_method};
    pub use crate::probes::runtime::quiesce::{
        quiesce_signal, QUIESCE_ACKS_PER_ROUND, QUIESCE_RESEND_INTERVAL,
        QUIESCE_SIGNAL_BLOCKED_AFTER,
    };
    #[cfg(target_arch = "x86_64")]
    pub use crate::probes::runtime::trampoline::{xsave_plan, XsavePlan};
    pub use crate::probes::runtime::xol::{XOL_CHUNK_BYTES, XOL_CHUNK_REACH};

    /// The trap path's call graph, found by walking its machine code.
    pub mod callgraph {
        pub use crate::probes::runtime::callgraph::*;
    }

    /// The code the live runtime refuses to patch, and why.
    pub mod refuse {
        pub use crate::probes::runtime::refuse::*;
    }

    /// The text loads and stores that survive an unmapped page.
    pub mod poke {
        pub use crate::probes::runtime::poke::{load_byte, store_byte};
    }

    /// The live uprobes' optimizer hooks: a pass paused with its lock held,
    /// a `fork` handler about to take that lock.
    #[cfg(target_arch = "x86_64")]
    pub mod uprobe_jump {
        pub use crate::probes::runtime::uprobes::jump::{set_fork_hook, set_pass_hook};
    }
}
