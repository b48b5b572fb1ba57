//! A jump detour: the per-site bytes an optimized probe's `jmp` lands in,
//! and the shared stub and Rust half they call.
//!
//! # Layout of one detour (one 64-byte slot within +/-2 GiB of the site)
//!
//! ```text
//!  0  lea rsp, [rsp - 128]      step over the red zone, touch nothing
//!  5  call qword [rip + 45]     -> the stub (address at 56); pushes 11
//! 11  <relocated displaced instructions>
//!     jmp rel32 <probe + len>   back past the displaced bytes
//!     int3 ...                  padding
//! 48  dq &'static JumpSlot      what the Rust half needs (site, registry, state)
//! 56  dq stub
//! ```
//!
//! `lea` and `call` change no flag. The code below the probed function's
//! stack pointer, down to 128 bytes, is its red zone (a leaf function keeps
//! data there without moving `rsp`); the detour writes nothing there: the
//! `call` pushes at `rsp - 136` and the stub saves below that.
//!
//! The two shared stubs the detour calls, and the frame they build, are in
//! `jump/stubs.rs`.
//!
//! # The Rust half
//!
//! [`jump_entry`] raises the runtime's trap flag (`in_trap.rs`: a probe hit
//! inside runs no handler), takes the [`Regs`] the stub built (IP = the probed address, SP =
//! the probed code's), and calls the hit path of the registry the slot
//! names (`sites.rs`:
//! [`KprobeRegistry::on_jump_hit`](crate::probes::kprobe::KprobeRegistry::on_jump_hit)
//! or [`UprobeRegistry::on_jump_hit`](crate::probes::uprobe::UprobeRegistry::on_jump_hit)),
//! with the slot's state as `live`. Handlers run
//! on the thread's own stack, outside any signal handler. A changed stack
//! pointer is ignored; of the flags only the status flags and DF are taken
//! back.

use super::sites::JumpSites;
use super::stubs::Stub;
use crate::probes::arch::Regs;
use crate::probes::kprobe::JumpHit;
use crate::probes::runtime::in_trap::TrapScope;
use crate::sync::atomic::AtomicBool;

/// Bytes of a detour (one slot of the detour area).
pub(crate) const DETOUR_BYTES: usize = 64;
/// Offset of the relocated instructions: the `call`'s return address.
pub(crate) const RELOCATED_AT: u64 = 11;
/// Offset of the `&'static JumpSlot` word.
const SLOT_WORD: usize = 48;
/// Offset of the stub's address.
const STUB_WORD: usize = 56;
/// Room for the relocated instructions and the jump back.
const CODE_ROOM: usize = SLOT_WORD - RELOCATED_AT as usize;

/// Flags a pre handler may change: CF, PF, AF, ZF, SF, DF, OF (never TF,
/// IF, AC or the others `popfq` would act on).
const HANDLER_FLAGS: u64 = 0xed5;

/// The code addresses of the Rust half (the functions a thread runs
/// between its read section and the return into a detour), for the
/// quiescence wait that retires detours; their extents come from the
/// symbol table.
pub(crate) fn entry_functions() -> [u64; 2] {
    [
        jump_entry as *const () as usize as u64,
        entering as *const () as usize as u64,
    ]
}

/// What a detour's Rust half needs to know about its site. Leaked: one per
/// address ever optimized by a registry, reused when it is optimized again,
/// so that a detour refilled for the same address holds the same bytes.
pub(crate) struct JumpSlot {
    /// The probed address.
    pub(crate) addr: u64,
    /// The registry whose hit path the detour runs (kprobes, or the live
    /// uprobes: `sites.rs`).
    pub(crate) registry: &'static dyn JumpSites,
    /// Whether the site's `jmp` is (about to be) written: a hit that reads
    /// false redirects to the probed address (`kprobe/jump.rs`).
    pub(crate) live: AtomicBool,
}

impl std::fmt::Debug for JumpSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JumpSlot")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

/// The bytes of the detour at `at` for a site whose relocated displaced
/// instructions are `relocated`, jumping back to `resume`. `None` if they
/// do not fit or `resume` is out of `rel32` reach.
pub(crate) fn detour_bytes(
    at: u64,
    relocated: &[u8],
    resume: u64,
    slot: &'static JumpSlot,
    stub: Stub,
) -> Option<[u8; DETOUR_BYTES]> {
    if relocated.len() + 5 > CODE_ROOM {
        return None;
    }
    let mut b = [0xccu8; DETOUR_BYTES];
    b[..5].copy_from_slice(&[0x48, 0x8d, 0x64, 0x24, 0x80]);
    let call_disp = (STUB_WORD as u64 - RELOCATED_AT) as u32;
    b[5..7].copy_from_slice(&[0xff, 0x15]);
    b[7..11].copy_from_slice(&call_disp.to_le_bytes());
    let mut i = RELOCATED_AT as usize;
    b[i..i + relocated.len()].copy_from_slice(relocated);
    i += relocated.len();
    let next = at + i as u64 + 5;
    let rel = i32::try_from(resume.wrapping_sub(next) as i64).ok()?;
    b[i] = 0xe9;
    b[i + 1..i + 5].copy_from_slice(&rel.to_le_bytes());
    let slot_ptr = slot as *const JumpSlot as usize as u64;
    b[SLOT_WORD..SLOT_WORD + 8].copy_from_slice(&slot_ptr.to_le_bytes());
    b[STUB_WORD..STUB_WORD + 8].copy_from_slice(&stub.address().to_le_bytes());
    Some(b)
}

/// The `jmp rel32` from `addr` to the detour at `detour`, or `None` out of
/// reach.
pub(crate) fn jump_to(addr: u64, detour: u64) -> Option<[u8; 5]> {
    let rel = i32::try_from(detour.wrapping_sub(addr + 5) as i64).ok()?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

/// The stubs' call (see the module docs). `regs` is the [`Regs`] the stub
/// built on its stack; the detour's return address is the word above it.
pub(super) extern "C" fn jump_entry(regs: *mut Regs) {
    let scope = TrapScope::enter();
    let missed = scope.is_none().then(super::super::in_trap::nested);
    entering(regs);
    drop(missed);
    drop(scope);
}

/// [`jump_entry`] with the trap flag up.
#[inline(never)]
extern "C" fn entering(regs: *mut Regs) {
    // SAFETY: the stub passes the `Regs` it built on its own stack, fully
    // written, aligned, referenced by nothing else during the call.
    let regs = unsafe { &mut *regs };
    // SAFETY: the word just above `Regs` in the stub's frame is the
    // detour's return address (module docs), part of the same frame.
    let ret = unsafe { &mut *(regs as *mut Regs).add(1).cast::<u64>() };
    let detour = *ret - RELOCATED_AT;
    let slot_word = (detour + SLOT_WORD as u64) as *const u64;
    // The return address is the detour's byte 11 (only detours call the
    // stubs), and the detour is not freed while a thread is in its stub
    // (`jump.rs`, "Freeing a detour").
    // SAFETY: the slot word of a live detour holds a leaked `&'static JumpSlot`.
    let slot: &'static JumpSlot = unsafe { &*(slot_word.read() as *const JumpSlot) };
    let flags = regs.flags;
    regs.ip = slot.addr;
    let hit = super::super::signal::abort_on_panic(
        "rcu-registry: a probe handler panicked in a jump detour; a panic cannot \
         unwind through it, so the process aborts (see the handler contract: \
         rcu_registry::docs::patterns)",
        || {
            // The slot's state is read inside the registry's read section
            // (`sites.rs`).
            slot.registry.jump_hit(slot, regs)
        },
    );
    match hit {
        // Nothing ran and nothing changed: back to the probed address.
        JumpHit::Redirect => *ret = slot.addr,
        JumpHit::Skip => *ret = regs.ip,
        JumpHit::Continue => {}
    }
    // The stub restores the general registers from `regs` (a changed `sp`
    // is ignored) and the flags from `regs.flags`: only those a handler may
    // change are taken from it.
    regs.flags = (flags & !HANDLER_FLAGS) | (regs.flags & HANDLER_FLAGS);
}
