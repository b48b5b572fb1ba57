//! Installing and removing one uprobe's breakpoint in one address space.
//!
//! Invariant: the install record is published (in the space's install tree and
//! the uprobe's install list) *before* the breakpoint is written, so a thread
//! that traps on it always finds it; on removal, the install's owner of its XOL
//! slot is dropped only after a grace period (shared on re-install,
//! `xolshare.rs`). Callers hold the uprobe's file stripe (`registry.rs`).
//!
//! Install and uninstall, in full: [`crate::docs::algorithms::uprobes`].

use super::registry::{Install, Placed, SpaceState, Uprobe, UprobeRegistry};
use super::space::{AddressSpace, FileMapping, UprobeKey};
use crate::probes::arch::{Arch, Insn, InsnClass, XolPlan, MAX_INSN_BYTES};
use crate::probes::error::CodeBytes;
use crate::probes::text::TextMemory;
use crate::probes::ProbeError;
use crate::rcu::Flavor;
use crate::sync::Arc;

/// An install done by a registration in progress: space, address, whether
/// a breakpoint was written (undone on failure).
pub(super) type Done<S, F> = (Arc<SpaceState<S, F>>, u64, bool);

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// Installs `key`'s breakpoint at `vaddr` in `st`. Returns whether a
    /// byte was written (`false`: our breakpoint was already there, which
    /// counts as success: the space inherited the patched text, e.g. a
    /// forked copy or a re-mapping of text still holding it, and the
    /// uprobe must still be found when it traps).
    pub(super) fn install(
        &self,
        up: &Uprobe<F>,
        st: &SpaceState<S, F>,
        key: UprobeKey,
        vaddr: u64,
        map: &FileMapping,
    ) -> Result<bool, ProbeError> {
        if st.installs.contains_key(&vaddr) {
            return Ok(false);
        }
        let text = st.space.text();
        let bp = self.arch.breakpoint();
        let avail = (map.vaddr.end - vaddr) as usize;
        let n = self.arch.max_insn_len().min(avail).min(MAX_INSN_BYTES);
        let mut buf = [0u8; MAX_INSN_BYTES];
        text.read(vaddr, &mut buf[..n])?;
        let mut known = up.orig.lock().unwrap_or_else(|p| p.into_inner());
        let ours_there = n >= bp.len() && &buf[..bp.len()] == bp;
        if ours_there {
            // Another registry's breakpoint is never taken for ours.
            if let Some(holder) = text.holder_at(vaddr) {
                return Err(ProbeError::HeldBy {
                    addr: vaddr,
                    holder,
                });
            }
        }
        let code: [u8; MAX_INSN_BYTES] = match &*known {
            Some(o) => {
                let o = o.as_slice();
                if !ours_there && buf[..o.len().min(n)] != o[..o.len().min(n)] {
                    return Err(ProbeError::AlreadyPatched {
                        addr: vaddr,
                        expected: CodeBytes::new(&o[..o.len().min(n)]),
                        found: CodeBytes::new(&buf[..n]),
                    });
                }
                let mut c = [0u8; MAX_INSN_BYTES];
                c[..o.len()].copy_from_slice(o);
                c
            }
            None if ours_there => {
                // First sight of this offset and a breakpoint already there:
                // nobody we know put it; the original is unknowable.
                return Err(ProbeError::AlreadyPatched {
                    addr: vaddr,
                    expected: CodeBytes::new(&[]),
                    found: CodeBytes::new(&buf[..n]),
                });
            }
            None => buf,
        };
        if let (None, Some(f)) = (&*known, up.func_offset) {
            self.check_boundary(st, key, map, f, vaddr)?;
        }
        let insn = self.arch.analyze(vaddr, &code[..n])?;
        let plan = self.plan(st, &insn)?;
        let rec = Install { key, insn, plan };
        // Publish the record, then write the breakpoint: a thread that
        // traps on it always finds the record.
        st.installs.insert(vaddr, rec);
        let id = st.space.id();
        up.update_placed(
            Some(Placed {
                space: id,
                vaddr,
                install: rec,
            }),
            None,
        );
        if !ours_there {
            let written = text
                .write(vaddr, &code[..bp.len()], bp)
                .and_then(|()| text.sync_icache(vaddr, bp.len()));
            if let Err(e) = written {
                let _ = text.write(vaddr, bp, &code[..bp.len()]);
                up.update_placed(None, Some((id, vaddr)));
                st.installs.remove(&vaddr);
                self.free_slot_later(st, plan);
                return Err(e);
            }
        }
        if known.is_none() {
            *known = Some(CodeBytes::new(&code[..insn.len as usize]));
        }
        Ok(!ours_there)
    }

    /// Decodes from the function start to `vaddr` in `st`'s text.
    #[cold]
    fn check_boundary(
        &self,
        st: &SpaceState<S, F>,
        key: UprobeKey,
        map: &FileMapping,
        func_offset: u64,
        vaddr: u64,
    ) -> Result<(), ProbeError> {
        let Some(func) = map.vaddr_of(func_offset).filter(|&f| f <= vaddr) else {
            return Err(ProbeError::OffsetOutsideMapping {
                offset: func_offset,
                start: map.file_range().start,
                end: map.file_range().end,
            });
        };
        let end = (vaddr + self.arch.max_insn_len() as u64).min(map.vaddr.end);
        let mut bytes = vec![0u8; (end - func) as usize];
        st.space.text().read(func, &mut bytes)?;
        // Our breakpoints on the way decode as the bytes they replaced.
        let g = self.domain.read();
        let lo = UprobeKey {
            file: key.file,
            offset: func_offset,
        };
        for (k, u) in self.uprobes.range(&g, lo..key) {
            let o = u.orig.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(o), Some(at)) = (&*o, map.vaddr_of(k.offset)) {
                let i = (at - func) as usize;
                let o = o.as_slice();
                let m = o.len().min(bytes.len() - i);
                bytes[i..i + m].copy_from_slice(&o[..m]);
            }
        }
        self.arch.check_boundary(func, &bytes, vaddr)
    }

    /// An XOL slot and plan for `insn` unless it is emulated: the slot of
    /// an earlier install at this address that is still waiting for its
    /// grace period when the plan for it is byte for byte what it holds
    /// (`xolshare.rs`), else a fresh one.
    fn plan(&self, st: &SpaceState<S, F>, insn: &Insn) -> Result<Option<XolPlan>, ProbeError> {
        if matches!(insn.class, InsnClass::Emulated(_)) {
            return Ok(None);
        }
        if let Some(p) = st
            .xol_shares
            .share(insn.addr, |slot| self.arch.plan_xol(insn, slot))
        {
            return Ok(Some(p));
        }
        let xol = st.space.xol();
        let slot = match xol.alloc(insn.addr) {
            Ok(s) => s,
            Err(ProbeError::XolExhausted { .. }) => {
                // Slots of removed installs come back through domain
                // callbacks after a grace period: wait for those queued.
                self.reclaim_slots();
                xol.alloc(insn.addr)?
            }
            Err(e) => return Err(e),
        };
        match self
            .arch
            .plan_xol(insn, slot)
            .and_then(|p| xol.fill(slot, p.slot_bytes()).map(|()| p))
        {
            Ok(p) => {
                st.xol_shares.adopt(&p);
                Ok(Some(p))
            }
            Err(e) => {
                xol.free(slot);
                Err(e)
            }
        }
    }

    /// Runs the queued slot frees (waits for a grace period).
    #[cold]
    fn reclaim_slots(&self) {
        self.domain.barrier();
    }

    /// Gives up the install's owner of its plan's slot after a grace
    /// period: a hit that found the record may still be about to step
    /// through it. The slot is freed when no other install shares it.
    fn free_slot_later(&self, st: &SpaceState<S, F>, plan: Option<XolPlan>) {
        if let Some(p) = plan {
            st.xol_shares.release_later(&self.domain, &st.space, &p);
        }
    }

    /// Removes the installs in `done` (those that wrote get their bytes back).
    pub(super) fn undo_installs(&self, up: &Uprobe<F>, done: &[Done<S, F>]) {
        for (st, vaddr, wrote) in done {
            self.uninstall(up, st, *vaddr, *wrote);
        }
    }

    /// Restores the original bytes at `vaddr` (if `write`) and drops the
    /// record. A breakpoint someone else already replaced is left alone.
    pub(super) fn uninstall(&self, up: &Uprobe<F>, st: &SpaceState<S, F>, vaddr: u64, write: bool) {
        let Some(rec) = st.installs.get_cloned(&vaddr) else {
            return;
        };
        if write {
            let bp = self.arch.breakpoint();
            let o = up.orig.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(o) = &*o {
                let text = st.space.text();
                if text.write(vaddr, bp, &o.as_slice()[..bp.len()]).is_ok() {
                    let _ = text.sync_icache(vaddr, bp.len());
                }
            }
        }
        up.update_placed(None, Some((st.space.id(), vaddr)));
        st.installs.remove(&vaddr);
        self.free_slot_later(st, rec.plan);
    }
}
