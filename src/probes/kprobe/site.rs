//! The writer's side of one probed address: the handles of its probes by
//! slot of the published member list, counts that keep every writer
//! operation O(1), and the two ways a list is replaced (growth, compaction).
//!
//! See the module docs of `table.rs` ("Member lists") for what readers see
//! and the costs.

// `std`'s Arc even under loom (see `kretprobe.rs`).
use std::sync::Arc;

use smallvec::{smallvec, SmallVec};

use super::probe::Kprobe;
use super::table::{Members, Site, SiteExec};

/// Least capacity of a copied list: a site that got a second probe is
/// likely to get a few more.
const GROWN_MEMBER_SLOTS: usize = 4;
use crate::probes::error::CodeBytes;
use crate::probes::text::TextIdentity;

/// The writer-side view of one probed address (registry mutex held for
/// every access).
pub(crate) struct SiteState {
    pub(crate) node: *mut Site,
    /// The registry's handles, indexed like the slots of the published
    /// list (`None`: removed since the last compaction, slot null).
    /// Registration order.
    /// Inline for one probe (most sites' only one): no allocation.
    members: SmallVec<[Option<Kprobe>; 1]>,
    /// `Some` entries of `members`.
    live: usize,
    /// Live members that are enabled.
    enabled: usize,
    /// A member with a post handler was removed since the last commit: the
    /// next commit must start a new post epoch and wait for the steps of
    /// the old one (which may still run that post handler; `table.rs`,
    /// "wait for post handlers"). A compaction in between does not clear
    /// it: steps that started on the replaced list still count.
    removed_post: bool,
    /// Queued in `Writer::dirty` (removals since the last commit).
    pub(crate) dirty: bool,
    pub(crate) exec: Arc<SiteExec>,
    /// The bytes the breakpoint replaces.
    pub(crate) orig: CodeBytes,
    /// Whether the breakpoint is written.
    pub(crate) armed: bool,
    /// What was mapped at the address when the site was prepared: the text
    /// is written only while it still is (see "Text that goes away" in the
    /// module docs of `kprobe`).
    pub(crate) text_id: TextIdentity,
    /// The XOL slot, when hits run the instruction there boosted (a copy
    /// of `exec`'s plan, where the last removal finds it without a miss).
    pub(crate) boosted_slot: Option<u64>,
}

impl SiteState {
    /// A site whose node (already holding a list with `first` in slot 0)
    /// is `node`.
    pub(crate) fn new(
        node: *mut Site,
        first: Kprobe,
        exec: Arc<SiteExec>,
        orig: CodeBytes,
        armed: bool,
        text_id: TextIdentity,
    ) -> Self {
        first.set_slot(0);
        let enabled = usize::from(first.is_enabled());
        let members = smallvec![Some(first)];
        let boosted_slot = exec.plan.filter(|p| p.boostable).map(|p| p.slot_addr);
        SiteState {
            node,
            members,
            live: 1,
            enabled,
            removed_post: false,
            dirty: false,
            exec,
            orig,
            armed,
            text_id,
            boosted_slot,
        }
    }

    /// Whether `probe` is one of this site's members (a site whose text
    /// went away and a fresh one at the same address have different
    /// members).
    pub(crate) fn holds(&self, probe: &Kprobe) -> bool {
        self.members
            .get(probe.slot())
            .and_then(Option::as_ref)
            .is_some_and(|h| h.ptr_eq(probe))
    }

    /// The site's probes in registration order.
    pub(crate) fn probes(&self) -> impl Iterator<Item = &Kprobe> {
        self.members.iter().flatten()
    }

    /// Number of probes.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Number of enabled probes.
    pub(crate) fn enabled(&self) -> usize {
        self.enabled
    }

    /// A member was enabled (`true`) or disabled.
    pub(crate) fn enabled_changed(&mut self, on: bool) {
        if on {
            self.enabled += 1;
        } else {
            self.enabled -= 1;
        }
    }

    fn list(&self) -> &Members {
        // SAFETY: the node and its current list are live while the site is
        // in the writer's map (freed only through a retirement that removed
        // it from there, or replaced by this state's own methods).
        unsafe { &*(*self.node).members_ptr() }
    }

    /// Appends `probe` (O(1) amortized). Returns the list it replaced when
    /// the published one was full (grown to twice the live probes, removed
    /// slots dropped): the caller retires it.
    pub(crate) fn push(&mut self, probe: Kprobe) -> Option<*mut Members> {
        self.live += 1;
        self.enabled += usize::from(probe.is_enabled());
        if self.members.len() < self.list().capacity() {
            probe.set_slot(self.members.len());
            self.list().push(&probe);
            self.members.push(Some(probe));
            return None;
        }
        self.members.push(Some(probe));
        Some(self.compact())
    }

    /// Removes `probe` (a member) in O(1): its slot in the published list
    /// is cleared, or marked if it has a post handler (unless it is the
    /// site's last probe). Returns the registry's handle on it.
    pub(crate) fn remove(&mut self, probe: &Kprobe) -> Kprobe {
        let i = probe.slot();
        let handle = self.members[i]
            .take()
            .filter(|h| h.ptr_eq(probe))
            .expect("a registered probe is in its recorded slot");
        if self.live > 1 {
            self.list().remove(i, handle.has_post());
        }
        // The last probe's slot is left alone: the caller unlinks the site
        // and retires its list whole, so a hit that still finds the site
        // runs the probe (as it would have before the removal) or, once the
        // site is unlinked, finds nothing.
        self.live -= 1;
        if handle.is_enabled() {
            self.enabled -= 1;
        }
        self.removed_post |= handle.has_post();
        handle
    }

    /// Whether the commit finishing this site's removals should compact
    /// it: when removed slots are at least half the list (so that a
    /// commit's copy is paid for by the removals since the last one).
    pub(crate) fn wants_compaction(&self) -> bool {
        let removed = self.members.len() - self.live;
        removed > 0 && 2 * removed >= self.members.len()
    }

    /// If a member with a post handler was removed since the last commit:
    /// starts the site's next post epoch and returns the old one's parity,
    /// whose steps the committer waits out after its grace period. Writer
    /// mutex held.
    pub(crate) fn take_post_wait(&mut self) -> Option<(Arc<SiteExec>, usize)> {
        if !std::mem::take(&mut self.removed_post) {
            return None;
        }
        Some((Arc::clone(&self.exec), self.exec.bump_epoch()))
    }

    /// Publishes a copy of the list without removed slots, with room for
    /// as many probes again (at least four), and returns the
    /// replaced list for the caller to retire. O(probes).
    pub(crate) fn compact(&mut self) -> *mut Members {
        self.members.retain(|m| m.is_some());
        let capacity = (2 * self.live).max(GROWN_MEMBER_SLOTS);
        // Keeps the writer's memory O(probes) after mass removals.
        if self.members.capacity() > 2 * capacity {
            self.members.shrink_to_fit();
        }
        for (i, p) in self.probes().enumerate() {
            p.set_slot(i);
        }
        let probes = self.members.iter().map(|m| m.as_ref().expect("retained"));
        let new = Members::new(probes, capacity, &self.exec);
        // SAFETY: the node is live (see `list`); writer mutex held.
        unsafe { &*self.node }.replace_members(new)
    }
}
