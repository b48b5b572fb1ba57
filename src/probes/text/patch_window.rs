//! [`PatchWindow`]: tells a trap handler whether the `int3` a thread hit is
//! the transient one of a multi-byte patch.
//!
//! A sequence count, odd while a patch is in progress (with the patched
//! address beside it), brackets the handler's byte read like a seqlock reader:
//! only a stable, even sequence with an `int3` in place is judged foreign;
//! every other outcome resumes the thread, which is always safe. The loom
//! model is `loom-tests/tests/text_patch.rs`.
//!
//! Why two separate checks would kill the process:
//! [`crate::docs::algorithms::live_runtime`].

use crate::sync::atomic::{fence, AtomicU64, Ordering};

/// The x86 breakpoint, the byte the int3-first protocol parks threads on.
pub const INT3: u8 = 0xcc;

/// The in-progress marker of int3-first patches.
///
/// Patchers call [`open`](PatchWindow::open) and
/// [`close`](PatchWindow::close) around each patch, one patch at a time
/// (they hold a lock); trap handlers call
/// [`transient_int3_at`](PatchWindow::transient_int3_at). A sequence count,
/// odd while a patch is in progress, brackets the handler's read of the
/// code byte like a seqlock reader, so a patch at the same address ending
/// or beginning while the handler looks never makes it call the patcher's
/// own `int3` foreign (two separate checks could: "no patch in progress"
/// between two patches, then the next patch's `int3`).
#[derive(Debug)]
pub struct PatchWindow {
    /// Odd while a patch is in progress; bumped on both edges.
    seq: AtomicU64,
    /// The address being patched, meaningful while `seq` is odd.
    at: AtomicU64,
}

impl PatchWindow {
    /// A window with no patch in progress.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        PatchWindow {
            seq: AtomicU64::new(0),
            at: AtomicU64::new(0),
        }
    }

    /// A window with no patch in progress (loom atomics are not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        PatchWindow {
            seq: AtomicU64::new(0),
            at: AtomicU64::new(0),
        }
    }

    /// Marks a patch at `addr` as in progress. Call before the `int3` is
    /// written, with patches serialized by the caller.
    pub fn open(&self, addr: u64) {
        // Relaxed: published by the Release increment right after.
        self.at.store(addr, Ordering::Relaxed);
        // Release: the address is visible to a handler that sees the odd
        // sequence (its Acquire load in `transient_int3_at`).
        self.seq.fetch_add(1, Ordering::Release);
        // The odd sequence must be visible before the int3 can be executed:
        // a thread that traps on it and then reads an even, stable sequence
        // would call it foreign. Orders the increment before the caller's
        // byte store; pairs with the handler's loads.
        fence(Ordering::SeqCst);
    }

    /// Ends the patch opened last. Call after its final byte is written.
    pub fn close(&self) {
        // Release: the restored bytes are ordered before the even value, so
        // a handler that reads the sequence even and unchanged around its
        // byte read saw the final byte (pairs with its Acquire fence).
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// Whether a trap on an unclaimed `int3` at `addr` may be the transient
    /// one of a patch (in progress, or finished since the thread trapped):
    /// then the thread must be resumed at the same address. `read_byte`
    /// reads the code byte at `addr` (`None` if unreadable). Async-signal-
    /// safe if `read_byte` is: two or three atomic loads and a fence.
    pub fn transient_int3_at(&self, addr: u64, read_byte: impl FnOnce() -> Option<u8>) -> bool {
        if addr == 0 {
            return false;
        }
        // Acquire pairs with the Release increment in `open`: an odd value
        // makes that patch's address visible.
        let before = self.seq.load(Ordering::Acquire);
        if before & 1 == 1 && self.at.load(Ordering::Relaxed) == addr {
            return true;
        }
        let byte = read_byte();
        // Orders the byte read before the second sequence load (a seqlock
        // reader's read barrier); pairs with the Release increment in
        // `close` and the fence in `open`.
        fence(Ordering::Acquire);
        let after = self.seq.load(Ordering::Relaxed);
        if before != after || before & 1 == 1 {
            // A patch started or finished while we looked, or one is running
            // at another address: resume and look again on the next trap.
            return true;
        }
        match byte {
            Some(b) => b != INT3,
            None => false,
        }
    }
}

impl Default for PatchWindow {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    //! The verdicts with the window opened and closed by hand around (or
    //! inside) the byte read, on a window of the test's own.

    use super::*;

    const AT: u64 = 0x7357_0000;

    #[test]
    fn a_stable_int3_with_no_patch_anywhere_is_foreign() {
        assert!(!PatchWindow::new().transient_int3_at(AT, || Some(INT3)));
    }

    #[test]
    fn a_byte_that_is_no_longer_int3_means_the_patch_finished() {
        assert!(PatchWindow::new().transient_int3_at(AT, || Some(0xb8)));
    }

    #[test]
    fn unreadable_code_is_not_claimed() {
        assert!(!PatchWindow::new().transient_int3_at(AT, || None));
    }

    #[test]
    fn a_patch_in_progress_at_the_address_is_transient() {
        let w = PatchWindow::new();
        w.open(AT);
        assert!(w.transient_int3_at(AT, || Some(INT3)));
    }

    #[test]
    fn a_patch_in_progress_elsewhere_defers_the_verdict() {
        let w = PatchWindow::new();
        w.open(AT + 16);
        assert!(w.transient_int3_at(AT, || Some(INT3)));
        w.close();
        assert!(!w.transient_int3_at(AT, || Some(INT3)));
    }

    /// The race the separate checks lost: no patch is in progress when the
    /// handler looks, then the *next* patch at the same address writes its
    /// `int3` before the handler reads the byte.
    #[test]
    fn the_next_patch_starting_during_the_look_is_transient_not_foreign() {
        let w = PatchWindow::new();
        assert!(w.transient_int3_at(AT, || {
            w.open(AT);
            Some(INT3)
        }));
    }

    /// And the mirror image: a whole patch starts and finishes while the
    /// handler reads.
    #[test]
    fn a_patch_completing_during_the_look_resumes_the_thread() {
        let w = PatchWindow::new();
        assert!(w.transient_int3_at(AT, || {
            w.open(AT);
            w.close();
            Some(INT3)
        }));
    }
}
