//! The uprobe registry's side of jump-optimized probes: the hit path a
//! detour calls, the hook that puts a site back on the trap path before
//! the registry touches its text, the trap path's "resume in the detour",
//! and what the optimizer reads of the installs.
//!
//! # Two ways into the same consumers
//!
//! An optimized install has a `jmp` to its detour where the `int3` was. The
//! detour saves the registers and calls
//! [`on_jump_hit`](UprobeRegistry::on_jump_hit), which does what the trap
//! path (`hit.rs`) does up to the displaced instruction: the same lock-free
//! lookups in one read section of the domain, the consumers in
//! registration order with `regs.ip` at the probed address (or `nmissed`
//! on a thread already running uprobe handlers), the return address
//! hijacked for return handlers (the return itself still traps on the
//! space's trampoline). It then says where to go ([`JumpHit`]). A lookup
//! that raced writers, or a detour no longer live, redirects to the probed
//! address with nothing run: the `int3` (or the original code) is there.
//!
//! # Trap hits while a detour exists
//!
//! Between the detour's creation and its site's return to the trap path, a
//! trap hit on the install's `int3` resumes in the detour (the relocated
//! displaced instructions) instead of completing the instruction itself:
//! boosted or single-stepped, it would resume inside the displaced bytes,
//! which the optimizer is about to overwrite. The uprobe holds one
//! `(address, resume)` pair for this ([`ResumeCell`]), so at most one
//! install of a uprobe is optimized at a time (a file mapped twice: the
//! second is refused with `JumpRefusal::SharedUprobe`). The optimizer
//! waits a grace period between clearing the pair and pointing it at
//! another address, so a trap hit that read the resume address reads the
//! address it belongs to.
//!
//! # The hook
//!
//! Before the registry writes or restores a breakpoint (and decodes the
//! function before it for a boundary check), or adds a consumer that opted
//! out of optimization
//! ([`ConsumerBuilder::jump_opt_out`](super::ConsumerBuilder::jump_opt_out)),
//! it calls [`JumpHook::to_trap_path`] with the file's stripe held (and no
//! read section open); the optimizer puts the sites concerned back on the
//! trap path first (`runtime/jump.rs`), waiting for no grace period (the
//! dynamic linker's thread may wait for the stripe inside a read section).
//! A hit already in a detour that then finds an opted-out consumer
//! redirects to the `int3` with nothing run. A writer keeps the
//! optimizer's lock from its hook until its bytes are written
//! (`jump_to_trap_held`, `jump_hold`), so no pass writes in between: a
//! removal until the original bytes are back; a registration from before
//! it reads any text (its read-ahead, the boundary check) until its
//! breakpoints are written, putting back the sites it meets under that
//! one hold (otherwise a pass that collected its candidates before could
//! write its `jmp`'s displacement where the install then reads "the
//! original instruction"). Text just mapped (`on_mmap`)
//! or gone (`on_munmap`) needs no hook: nothing optimized is in it, and the
//! optimizer's next pass forgets a site whose text went, writing nothing
//! (its writes check the text's identity and bytes). The hook addresses
//! are those of every space: a registry with a hook serves one (the live
//! process).

use std::ops::Range;

use super::consumer::{ConsumerAction, UprobeHit};
use super::registry::{slice, Uprobe, UprobeRegistry};
use super::space::{AddressSpace, SpaceId, UprobeKey};
use crate::probes::arch::{Arch, DataMemory, Regs};
use crate::probes::jump_sites::{
    DetourCell, JumpCandidate, JumpHit, JumpHold, JumpHook, ResumeCell,
};
use crate::probes::reentry::UprobeScope;
use crate::probes::text::{TextIdentity, TextMemory};
use crate::probes::ProbeError;
use crate::rcu::Flavor;
use crate::seqtree::EntryHandle;
use crate::sync::atomic::Ordering;

impl<F: Flavor> Uprobe<F> {
    /// Where a trap hit at `vaddr` resumes instead of completing the
    /// displaced instruction (0: it completes it). Lock-free, no call.
    #[inline]
    pub(crate) fn jump_resume(&self, vaddr: u64) -> u64 {
        // Acquire pairs with the Release store in `set_resume`: a hit that
        // sees the address sees the detour's bytes and `detour_at`.
        let resume = self.detour.load(Ordering::Acquire);
        // Relaxed: ordered by the Acquire load above (module docs: the
        // pair changes address only after a grace period).
        if resume != 0 && self.detour_at.load(Ordering::Relaxed) == vaddr {
            resume
        } else {
            0
        }
    }
}

/// A uprobe's resume cell, as the optimizer holds it: the handle keeps the
/// uprobe (not its membership in the tree) alive.
struct UprobeCell<F: Flavor>(EntryHandle<UprobeKey, Uprobe<F>, F>);

impl<F: Flavor + 'static> ResumeCell for UprobeCell<F> {
    fn set_resume(&self, addr: u64, resume: u64) {
        let up = self.0.value();
        if resume == 0 {
            // Relaxed: read by the optimizer only, which makes every change.
            if up.detour_at.load(Ordering::Relaxed) == addr {
                // Release pairs with the Acquire load in `jump_resume`.
                up.detour.store(0, Ordering::Release);
            }
            return;
        }
        // Relaxed: published by the Release store below.
        up.detour_at.store(addr, Ordering::Relaxed);
        // Release pairs with the Acquire load in `jump_resume`.
        up.detour.store(resume, Ordering::Release);
    }

    fn cell_id(&self) -> usize {
        self.0.value() as *const Uprobe<F> as usize
    }
}

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// Calls a jump optimizer's hook before the registry restores original
    /// bytes at `ranges` (see `uprobe/jump.rs`): the optimizer writes nothing until the returned
    /// hold is dropped, so the caller's restore cannot meet a `jmp` (or its
    /// tail) a pass wrote after the hook ([`JumpHook::to_trap_path_held`]).
    /// The caller holds the files' stripes and no read section, writes its
    /// bytes and drops the hold, waiting for no grace period meanwhile.
    pub(super) fn jump_to_trap_held(&self, ranges: &[Range<u64>]) -> Option<JumpHold<'_>> {
        self.jump_hook.as_ref().map(|h| h.to_trap_path_held(ranges))
    }

    /// A registration's hold of the jump optimizer, taken before it reads
    /// any text and dropped once its breakpoints are written: no pass
    /// writes meanwhile, and the installs put the sites they meet back on
    /// the trap path under it (`install.rs`, `jump_before_install`).
    /// `None` without a hook. The caller holds the files' stripes and no
    /// read section, and waits for no grace period until it drops it.
    pub(super) fn jump_hold(&self) -> Option<JumpHold<'_>> {
        self.jump_to_trap_held(&[])
    }

    /// The registry with a jump optimizer's hook (see `uprobe/jump.rs`):
    /// called before the registry touches text the optimizer may have
    /// rewritten.
    pub fn with_jump_hook(mut self, hook: std::sync::Arc<dyn JumpHook>) -> Self {
        self.jump_hook = Some(hook);
        self
    }

    /// The hit path of a jump detour (module docs) at `vaddr` in `space`.
    /// `live` reads the detour's state inside the read section; `regs` are
    /// the registers at the probed address. Allocates nothing, takes no
    /// lock, makes no system call.
    #[inline]
    pub fn on_jump_hit(
        &self,
        space: SpaceId,
        vaddr: u64,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        live: impl FnOnce() -> bool,
    ) -> JumpHit {
        let guard = self.domain.read_in_trap();
        if !live() {
            return JumpHit::Redirect;
        }
        let Ok((st, key, up, _)) = self.resolve_with::<true>(&guard, space, vaddr) else {
            return JumpHit::Redirect;
        };
        let saved_ip = regs.ip;
        regs.ip = vaddr;
        let Some(_scope) = UprobeScope::enter() else {
            up.count_missed();
            regs.ip = saved_ip;
            return JumpHit::Continue;
        };
        let hit = UprobeHit { space, vaddr, key };
        let list = slice(up.consumers.load(&guard));
        // A consumer that opted out joined after the hook put the `int3`
        // back (module docs): the trap runs it, with the others.
        if list.iter().any(|m| m.jump_opt_out()) {
            regs.ip = saved_ip;
            return JumpHit::Redirect;
        }
        let mut wants_return = false;
        for m in list {
            let ran = m.run(&hit, regs);
            if ran.action == ConsumerAction::SkipInstruction {
                return JumpHit::Skip;
            }
            wants_return |= ran.wants_return;
        }
        if wants_return {
            let last_seq = list.last().map_or(0, |m| m.seq);
            self.track_return(st, up, key, vaddr, last_seq, regs, mem);
        }
        regs.ip = saved_ip;
        JumpHit::Continue
    }

    /// Every install in `space` as the optimizer needs it.
    #[cfg_attr(
        not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
        allow(dead_code)
    )]
    pub(crate) fn jump_candidates(&self, space: SpaceId) -> Vec<JumpCandidate>
    where
        F: 'static,
    {
        let g = self.domain.read();
        let Some(st) = self.spaces.get(&g, &space) else {
            return Vec::new();
        };
        let maps = slice(st.maps.load(&g));
        let text = st.space.text();
        let bp = self.arch.breakpoint();
        let mut out = Vec::new();
        for (&vaddr, install) in st.installs.iter(&g) {
            let Some(map) = maps.iter().find(|m| m.vaddr.contains(&vaddr)) else {
                continue;
            };
            let Some(up) = self.uprobes.get_handle(&install.key) else {
                continue;
            };
            let opted_out = slice(up.consumers.load(&g))
                .iter()
                .any(|c| c.jump_opt_out());
            // Armed: the install's breakpoint is written (a record is
            // published before its write), or the optimizer has the site
            // (its resume cell is set from before its first write until
            // after its last: the text holds the `int3` or its `jmp`).
            let mut first = [0u8; 1];
            let armed = up.jump_resume(vaddr) != 0
                || (bp.len() == 1 && text.read(vaddr, &mut first).is_ok() && first == bp);
            out.push(JumpCandidate {
                addr: vaddr,
                armed,
                needs_trap: false,
                opted_out,
                slot: install.plan.map(|p| p.slot_addr),
                text_id: TextIdentity {
                    device: map.file.dev,
                    inode: map.file.inode,
                    bias: map.vaddr.start.wrapping_sub(map.file_offset),
                },
                detour: DetourCell::new(vaddr, std::sync::Arc::new(UprobeCell(up))),
            });
        }
        out
    }

    /// The bytes `[start, start + buf.len())` of `space` as the file holds
    /// them: read from the text, with the original byte put back wherever
    /// an install's breakpoint is (other writes, such as an optimizer's
    /// `jmp`, are the caller's to undo).
    #[cfg_attr(
        not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
        allow(dead_code)
    )]
    pub(crate) fn original_text(
        &self,
        space: SpaceId,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), ProbeError> {
        let g = self.domain.read();
        let Some(st) = self.spaces.get(&g, &space) else {
            return Err(ProbeError::TextGone { addr: start });
        };
        st.space.text().read(start, buf)?;
        let end = start + buf.len() as u64;
        let bp = self.arch.breakpoint();
        for (&a, install) in st.installs.range(&g, start..end) {
            let at = (a - start) as usize;
            if !buf[at..].starts_with(bp) {
                continue;
            }
            let orig = install.insn.bytes();
            let n = bp.len().min(orig.len()).min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&orig[..n]);
        }
        Ok(())
    }
}
