//! A signal frame's x87 state, marked unused again when it is (x86_64).
//!
//! # Why
//!
//! The processor tracks which `xsave` state components are in use
//! (XINUSE, read with `xgetbv` ECX = 1): the x87 bit is clear until the
//! thread executes an x87 instruction. The jump stubs (`jump/stubs.rs`)
//! read it: a mid-function optimized probe whose thread has no x87 state in
//! use saves `xmm0-15` by moves (a few ns); otherwise it must save
//! everything with `xsave64` (about 100 ns here).
//!
//! The kernel defeats that. Delivering a signal, it saves the thread's
//! state into the signal frame and always marks x87 and SSE as present in
//! the frame's `xsave` header (for legacy code that edits the frame's
//! `fxsave` area); `rt_sigreturn` restores from the frame, so the x87
//! state is loaded, not initialised, and the processor marks it in use. One
//! signal, and the thread's XINUSE x87 bit stays set for good (`fninit`
//! does not clear it). Every probe is a trap before it is optimized, and
//! the quiescence proofs signal every thread, so without this every thread
//! of a process the runtime serves would take the full save.
//!
//! # What
//!
//! [`settle_x87`] runs on the runtime's own signal frames (the SIGTRAP
//! handler, the quiescence signal's) just before they return. When the
//! frame's x87 state is exactly its initial configuration (control word
//! `0x037f`; status, tag, opcode, instruction and data pointers 0; all
//! eight registers 0: what a thread that never ran an x87 instruction
//! has), it clears the x87 bit of the frame's `xsave` header, so
//! `rt_sigreturn` initialises the x87 state instead of loading it. The
//! thread resumes with the same state, bit for bit, and with XINUSE's x87
//! bit clear. Any other x87 state (the thread has used it) is left alone:
//! that thread's mid-function probes pay the full save, as before.
//!
//! Signals the runtime does not handle (the program's own) still set the
//! bit; `docs::limitations` says so.

/// `magic1` of the kernel's `struct _fpx_sw_bytes`, at byte 464 of the
/// frame's `fxsave` area: an `xsave` header follows the legacy area.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// Offset of the header's `XSTATE_BV` (the legacy area is 512 bytes).
const XSTATE_BV: usize = 512;
/// The x87 part of the legacy area, as little-endian words: FCW, FSW,
/// FTW, a reserved byte and FOP (bytes 0..8), FIP (8..16), FDP (16..24;
/// 24..32 are MXCSR and its mask, the SSE component's), then the eight
/// 16-byte register slots (32..160). In the initial configuration the
/// first word is FCW's `0x037f` (`fninit`'s) and every other word is 0.
const X87_INIT_WORD0: u64 = 0x037f;

/// Marks the frame's x87 state unused when it is in its initial
/// configuration (module docs). Async-signal-safe: loads and one store in
/// the frame, no call.
///
/// # Safety
/// `uc` is the `ucontext_t` the kernel passed to the calling signal
/// handler, and the frame is not in use by anything else.
#[inline]
pub(crate) unsafe fn settle_x87(uc: *mut libc::ucontext_t) {
    // SAFETY: the caller's contract: a valid ucontext.
    let fx = unsafe { (*uc).uc_mcontext.fpregs }.cast::<u8>();
    if fx.is_null() {
        return;
    }
    // The kernel's frame: `fpregs` points at the 512-byte `fxsave` area;
    // with magic1 in its software-reserved bytes, the 64-byte `xsave`
    // header follows it. Unaligned loads of plain integers, one store.
    // SAFETY: reads inside the frame's fxsave area (see above).
    let magic1 = unsafe { fx.add(464).cast::<u32>().read_unaligned() };
    if magic1 != FP_XSTATE_MAGIC1 {
        return;
    }
    // Word loads: this runs on every trap.
    // SAFETY: as above: bytes 0..8 of the area.
    if unsafe { fx.cast::<u64>().read_unaligned() } != X87_INIT_WORD0 {
        return;
    }
    // Words 1 and 2 (FIP, FDP), then 4..20 (the registers).
    for k in (1..3).chain(4..20) {
        // SAFETY: as above: a word of 8..24 or 32..160 of the area.
        if unsafe { fx.add(8 * k).cast::<u64>().read_unaligned() } != 0 {
            return;
        }
    }
    // SAFETY: the header's first word, inside the frame (magic1 says the
    // header is there).
    unsafe {
        let bv = fx.add(XSTATE_BV).cast::<u64>();
        bv.write_unaligned(bv.read_unaligned() & !1);
    }
}
