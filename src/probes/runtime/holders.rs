//! Who holds a breakpoint in this process's text.
//!
//! Several registries patch the same text (the kprobe registries of every
//! [`Live`](super::Live), the live uprobes). Each writes a breakpoint only
//! over the original byte it read, so a second registry at an address
//! finds the first one's `int3`. To say whose it is, each registry files a
//! lookup here under an owner id, and its [`InProcess`](super::InProcess)
//! carries that id: [`holder_at`] asks every *other* owner's lookup. The
//! lookups are lock-free reads of the registries' tables (they may run while
//! the asking registry holds its writer lock); this list's mutex is taken
//! only at registration conflicts and when a registry is built.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A registry's answer to "is the breakpoint at this address yours?": its
/// name if so.
pub(crate) type Lookup = Box<dyn Fn(u64) -> Option<String> + Send + Sync>;

static HOLDERS: Mutex<Vec<(u64, Lookup)>> = Mutex::new(Vec::new());
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// A fresh owner id (0 is "no owner": a text memory that asks everyone).
pub(crate) fn new_owner() -> u64 {
    // Relaxed: only uniqueness matters.
    NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
}

/// Files `owner`'s lookup (for the life of the process: live registries
/// are never freed).
pub(crate) fn add(owner: u64, lookup: Lookup) {
    HOLDERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((owner, lookup));
}

/// The name of the registry other than `asker` that holds a breakpoint at
/// `addr`, if any.
pub(crate) fn holder_at(addr: u64, asker: u64) -> Option<String> {
    let holders = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
    holders
        .iter()
        .filter(|(owner, _)| *owner != asker)
        .find_map(|(_, lookup)| lookup(addr))
}
