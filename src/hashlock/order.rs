//! Debug-build checking of the stripe lock order.
//!
//! The rule: a thread may block on stripe `j` of an array only if every stripe
//! of that array it already holds has an index below `j`; a violation panics
//! before the lock is touched. The per-thread table is plain `Cell`s, so a
//! signal handler cannot make it panic, and a full table can miss a violation
//! but never report a false one. Release builds compile all of this away.
//!
//! Why the rule prevents deadlock and how the check works:
//! [`crate::docs::algorithms::hashed_locks`].

#[cfg(debug_assertions)]
mod imp {
    use core::cell::Cell;

    /// Guards tracked per thread. A pair plus an `all` on a few arrays fits
    /// with room to spare; beyond that, guards go unchecked (not wrong).
    const TRACKED: usize = 16;

    /// Marks a free table entry; array ids are addresses, never 0.
    const FREE: usize = 0;

    struct HeldTable {
        /// `(array id, highest stripe held by one guard)`; `FREE` ids unused.
        entries: [Cell<(usize, usize)>; TRACKED],
    }

    // Not `const { .. }`: loom's `thread_local!` does not accept it. The
    // table needs no destructor, so std still allocates nothing for it.
    crate::sync::thread_local! {
        #[allow(clippy::missing_const_for_thread_local)]
        static HELD: HeldTable = HeldTable {
            entries: [const { Cell::new((FREE, 0)) }; TRACKED],
        };
    }

    /// Panics if this thread holds a stripe of `array` at or above `lowest`.
    #[inline]
    pub(crate) fn check(array: usize, lowest: usize) {
        let conflict = HELD
            .try_with(|table| {
                table
                    .entries
                    .iter()
                    .map(Cell::get)
                    .filter(|&(id, top)| id == array && top >= lowest)
                    .map(|(_, top)| top)
                    .max()
            })
            .ok()
            .flatten();
        if let Some(held) = conflict {
            violation(held, lowest);
        }
    }

    #[cold]
    #[inline(never)]
    fn violation(held: usize, wanted: usize) -> ! {
        panic!(
            "hashlock lock-order violation: this thread holds stripe {held} of this array \
             and would block on stripe {wanted}; stripes must be taken in increasing index \
             order (take several at once with lock_pair or lock_all)"
        );
    }

    /// One live guard's entry in this thread's table; removed on drop.
    #[derive(Debug)]
    pub(crate) struct Held {
        array: usize,
        top: usize,
        /// False when the table was full and nothing was recorded.
        tracked: bool,
        /// The table is per thread, so the record must not change threads.
        _not_send: core::marker::PhantomData<*const ()>,
    }

    /// Records that this thread now holds stripes of `array` up to `top`.
    #[inline]
    pub(crate) fn record(array: usize, top: usize) -> Held {
        debug_assert_ne!(array, FREE);
        let tracked = HELD
            .try_with(|table| {
                let slot = table.entries.iter().find(|e| e.get().0 == FREE);
                slot.map(|e| e.set((array, top))).is_some()
            })
            .unwrap_or(false);
        Held {
            array,
            top,
            tracked,
            _not_send: core::marker::PhantomData,
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            if !self.tracked {
                return;
            }
            let mine = (self.array, self.top);
            // Equal entries are interchangeable (same array, same top), so
            // freeing any one of them is freeing ours.
            let _ = HELD.try_with(|table| {
                if let Some(e) = table.entries.iter().find(|e| e.get() == mine) {
                    e.set((FREE, 0));
                }
            });
        }
    }
}

#[cfg(not(debug_assertions))]
mod imp {
    /// Release builds track nothing.
    #[derive(Debug)]
    pub(crate) struct Held;

    #[inline(always)]
    pub(crate) fn check(_array: usize, _lowest: usize) {}

    #[inline(always)]
    pub(crate) fn record(_array: usize, _top: usize) -> Held {
        Held
    }
}

pub(crate) use imp::{check, record, Held};
