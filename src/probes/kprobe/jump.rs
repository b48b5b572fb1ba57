//! The registry's side of jump-optimized probes: the hit path a detour
//! calls, the hook that puts a site back on the trap path before the
//! registry touches it, and what the optimizer may read of a site.
//!
//! # Two ways into the same handlers
//!
//! An optimized site has a `jmp` to its detour where the `int3` was. The
//! detour saves the registers and calls
//! [`on_jump_hit`](KprobeRegistry::on_jump_hit), which does what
//! [`on_breakpoint`](KprobeRegistry::on_breakpoint) does up to the displaced
//! instruction: one lookup under an `Rcu` read guard, the pre handlers of the
//! enabled members in order with `regs.ip` at the probed address (or
//! `nmissed` on a thread already in a handler), kretprobe entries hijacking
//! the return address. It then says where to go: run the relocated
//! instructions ([`JumpHit::Continue`]; a changed `regs.ip` is discarded,
//! as after [`Action::Continue`](crate::probes::outcome::Action)), resume at
//! `regs.ip` ([`JumpHit::Skip`]), or go back to the probed address and trap
//! ([`JumpHit::Redirect`]: the site is no longer optimized, or gone, and
//! nothing ran).
//!
//! # The state check, and why it is inside the read section
//!
//! The caller passes `live`, which reads the detour's state. It is called
//! inside the read section, before the lookup. The optimizer clears the
//! state (after putting the `int3` back) and waits for a grace period before
//! it adds a member the detour cannot serve (a post handler): a hit whose
//! section began before the wait saw the old member list; one that began
//! after sees the cleared state and redirects to the `int3`, where the trap
//! path runs pre and post handlers. No hit runs a pre handler whose post
//! handler it will not run.
//!
//! # The hook
//!
//! The registry writes and decodes a site's text assuming an `int3` (or the
//! original bytes) is there. Before it does anything an optimized site's
//! `jmp` would confuse (restore the original byte, decode a function that
//! holds one, add a member with a post handler), it calls
//! [`JumpHook::to_trap_path`] with the writer mutex held; the optimizer puts
//! the sites back on the trap path first (`runtime/jump.rs`). The hook, the
//! outcome and the candidate are shared with uprobes (`probes/jump_sites.rs`).

use std::sync::Arc;

use super::probe::{Action, Handlers};
use super::registry::{KprobeRegistry, Writer};
use super::table::SiteExec;
use super::this_thread::ThisThread;
use crate::probes::arch::{Arch, DataMemory, Regs};
use crate::probes::jump_sites::{DetourCell, JumpCandidate};
use crate::probes::text::TextMemory;
use crate::sync::atomic::Ordering;

pub use crate::probes::jump_sites::{JumpHit, JumpHook};

// A kprobe site's trap hits read their detour from the site's exec
// (`hit.rs`); holding it keeps the exec (not the site's membership) alive.
impl crate::probes::jump_sites::ResumeCell for SiteExec {
    fn set_resume(&self, _addr: u64, resume: u64) {
        // Release pairs with the Acquire load in `hit`: a trap hit that
        // sees the address sees the detour's bytes, written before.
        self.detour.store(resume, Ordering::Release);
    }

    fn cell_id(&self) -> usize {
        self as *const SiteExec as usize
    }
}

impl<A: Arch, T: TextMemory> KprobeRegistry<A, T> {
    /// The hit path of a jump detour (module docs). `live` reads the
    /// detour's state inside the read section; `regs` are the registers at
    /// the probed address. Allocates nothing, takes no lock (kretprobe
    /// entries: the instance table as on the trap path, see
    /// `instances.rs`), makes no
    /// system call. Hits are counted in per-CPU slots without a locked
    /// instruction (`probes/percpu.rs`).
    #[inline]
    pub fn on_jump_hit(
        &self,
        addr: u64,
        regs: &mut Regs,
        mem: &mut dyn DataMemory,
        live: impl FnOnce() -> bool,
    ) -> JumpHit {
        let guard = self.rcu.read_in_trap();
        if !live() {
            return JumpHit::Redirect;
        }
        let Some(site) = self.table.lookup(addr, &guard) else {
            return JumpHit::Redirect;
        };
        let members = site.members(&guard);
        let len = members.len();
        let saved_ip = regs.ip;
        regs.ip = addr;
        let me = ThisThread::get();
        let scope = me.enter_handlers();
        if scope.is_none() {
            for i in 0..len {
                match members.get(i) {
                    Some(p) if p.is_enabled() => p.count_missed(),
                    _ => {}
                }
            }
            regs.ip = saved_ip;
            return JumpHit::Continue;
        }
        for i in 0..len {
            let Some(p) = members.get(i) else { continue };
            if !p.is_enabled() {
                continue;
            }
            // A member with a post handler joins only after the optimizer
            // cleared `live` and waited for a grace period (module docs).
            debug_assert!(!p.has_post(), "a post handler reached a jump detour");
            p.count_hit();
            let action = match &p.inner.handlers {
                Handlers::Plain { .. } => p.run_pre(regs),
                Handlers::Return(r) => {
                    self.track_call(&**r, regs, mem, me);
                    Action::Continue
                }
            };
            if action == Action::SkipInstruction {
                return JumpHit::Skip;
            }
        }
        regs.ip = saved_ip;
        JumpHit::Continue
    }

    /// Every live site as the optimizer needs it.
    #[cfg_attr(
        not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
        allow(dead_code)
    )]
    pub(crate) fn jump_candidates(&self, w: &Writer) -> Vec<JumpCandidate> {
        w.sites
            .iter()
            .map(|(&addr, st)| {
                let needs_trap = st.probes().any(|p| p.has_post());
                let opted_out = st.probes().any(|p| p.jump_opt_out());
                if st.armed && !needs_trap && !opted_out {
                    // A site the pass may optimize: its hits may soon cost
                    // nanoseconds (`probes/percpu.rs`).
                    st.probes().for_each(super::Kprobe::count_per_cpu);
                }
                (addr, st, needs_trap, opted_out)
            })
            .map(|(addr, st, needs_trap, opted_out)| JumpCandidate {
                addr,
                armed: st.armed,
                needs_trap,
                opted_out,
                slot: st.exec.plan.as_ref().map(|p| p.slot_addr),
                text_id: st.text_id,
                detour: DetourCell::new(addr, Arc::clone(&st.exec) as _),
            })
            .collect()
    }

    /// The function bytes `[start, start + buf.len())` as the compiler left
    /// them: read from the text, with the original bytes put back wherever
    /// an armed site's breakpoint is (other writes, such as an optimizer's
    /// `jmp`, are the caller's to undo). Writer mutex held.
    #[cfg_attr(
        not(all(target_os = "linux", target_arch = "x86_64", not(loom))),
        allow(dead_code)
    )]
    pub(crate) fn original_text(
        &self,
        w: &Writer,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), crate::probes::ProbeError> {
        self.text.read(start, buf)?;
        let end = start + buf.len() as u64;
        let bp = self.arch.breakpoint();
        for (&a, st) in w.sites.range(start..end) {
            let at = (a - start) as usize;
            if !st.armed || !buf[at..].starts_with(bp) {
                continue;
            }
            let orig = st.orig.as_slice();
            let n = orig.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&orig[..n]);
        }
        Ok(())
    }
}
