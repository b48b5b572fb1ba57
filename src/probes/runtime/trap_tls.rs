//! Proving that this crate's thread-locals are in static TLS, so the trap
//! path reaches them without the dynamic loader (`sync/trap_local.rs`).
//!
//! # Why a proof
//!
//! A [`TrapLocal`](crate::sync::TrapLocal) may be reached at a fixed
//! offset from the thread pointer only if the object holding this crate
//! keeps its thread-locals at that same offset on every thread: glibc's
//! static TLS, where the loader places the blocks of every object loaded
//! with the program (the executable, `LD_PRELOAD`, `DT_NEEDED`) and of an
//! object loaded later that asks for it. An object loaded with `dlopen`
//! (the `rcu-trace` agent injected with `-p`) gets, on each thread, a
//! block the loader allocates on the thread's first access: no fixed
//! offset, and an allocation the trap path must not make.
//!
//! # The proof
//!
//! glibc's `dl_iterate_phdr` reports each object's block for the calling
//! thread (`dlpi_tls_data`), or null if that thread has none allocated. A
//! thread starts with its static blocks allocated and its dynamic ones
//! not. So a fresh thread (a bare `pthread_create` whose start routine
//! reads its thread pointer and calls `dl_iterate_phdr`, touching no
//! thread-local of this crate) that finds this object's block allocated,
//! at the same offset from its thread pointer as the calling thread's,
//! proves a static block: the offset is the one the loader fixed for the
//! object, for every thread. Anything else (null, another offset, no
//! thread, another C library) proves nothing, and the thread-locals stay
//! on the standard access, which the walk then follows into the loader.
//!
//! Run once per process, before the trap path is walked ([`settle`]).

use std::ffi::c_void;
use std::sync::OnceLock;

use crate::sync::thread_pointer;

/// What one look at the object's block found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Block {
    /// A code address of this crate, to find its object by.
    code: u64,
    /// The object's load bias (found: non-zero `modid`).
    bias: u64,
    /// Its TLS module id (0: none found).
    modid: usize,
    /// Its block on the calling thread (0: not allocated).
    data: u64,
    /// The calling thread's thread pointer.
    tp: u64,
    /// The object is a shared object (not the main program, whose name
    /// `dl_iterate_phdr` gives as empty).
    shared: bool,
}

/// `dl_iterate_phdr` callback: fills the `Block` `data` points to for the
/// object whose loaded segments hold its `code`. Touches no thread-local.
///
/// # Safety
/// `info` valid for the call; `data` points to a `Block` nobody else uses
/// during the iteration.
// SAFETY: an unsafe fn: its callers keep the contract above.
unsafe extern "C" fn find_block(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: the caller's contract.
    let (out, info) = unsafe { (&mut *data.cast::<Block>(), &*info) };
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: the loader gives `dlpi_phnum` program headers at `dlpi_phdr`.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    let bias = info.dlpi_addr;
    let holds = phdrs.iter().any(|ph| {
        let start = bias.wrapping_add(ph.p_vaddr);
        ph.p_type == libc::PT_LOAD && start <= out.code && out.code - start < ph.p_memsz
    });
    if !holds {
        return 0;
    }
    out.bias = bias;
    // SAFETY: the loader gives a NUL-terminated name (empty for the main
    // program) or null.
    out.shared = !info.dlpi_name.is_null() && unsafe { *info.dlpi_name } != 0;
    out.modid = info.dlpi_tls_modid;
    out.data = info.dlpi_tls_data as u64;
    1
}

/// The calling thread's look at the object holding `code`.
fn look(code: u64) -> Block {
    let mut b = Block {
        code,
        tp: thread_pointer() as u64,
        ..Block::default()
    };
    // SAFETY: the callback matches dl_iterate_phdr's signature and only
    // touches `b` through the pointer we pass.
    unsafe { libc::dl_iterate_phdr(Some(find_block), (&mut b as *mut Block).cast()) };
    b
}

/// The fresh thread's start routine: [`look`] and nothing else.
extern "C" fn fresh_look(arg: *mut c_void) -> *mut c_void {
    // SAFETY: `arg` is the `Block` `fresh_thread_look` owns and waits on.
    let b = unsafe { &mut *arg.cast::<Block>() };
    *b = look(b.code);
    std::ptr::null_mut()
}

/// [`look`] from a thread created for it (`None` if none could be).
fn fresh_thread_look(code: u64) -> Option<Block> {
    let mut b = Block {
        code,
        ..Block::default()
    };
    // SAFETY: all-zero is a valid pthread_t to be written by create.
    let mut thread: libc::pthread_t = unsafe { std::mem::zeroed() };
    // SAFETY: `fresh_look` has the start routine's signature; `b` outlives
    // the thread (joined below before `b` is read or dropped).
    let r = unsafe {
        libc::pthread_create(
            &mut thread,
            std::ptr::null(),
            fresh_look,
            (&mut b as *mut Block).cast(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: joins the thread just created, once.
    let r = unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
    (r == 0).then_some(b)
}

/// Whether this crate's thread-locals are in static TLS (module docs).
fn static_tls() -> bool {
    if !crate::sync::SETTLES {
        return false;
    }
    let code = static_tls as fn() -> bool as usize as u64;
    // This thread's block allocated first (a dynamic one would be now).
    let _ = super::in_trap::in_trap();
    let here = look(code);
    if here.modid == 0 || here.data == 0 {
        return false;
    }
    let Some(there) = fresh_thread_look(code) else {
        return false;
    };
    there.modid == here.modid
        && there.data != 0
        && there.data.wrapping_sub(there.tp) == here.data.wrapping_sub(here.tp)
}

/// Proves static TLS (module docs) and, if proven, settles every
/// [`TrapLocal`](crate::sync::TrapLocal) of this object: from then on the
/// trap path reaches them without a call. Once per process; returns
/// whether they are settled.
pub(crate) fn settle() -> bool {
    state().settled
}

/// Whether the trap path may call the loader's `__tls_get_addr`: this
/// crate is in a shared object (where a thread-local's standard access is
/// that call) and its thread-locals are not settled. The walk then starts
/// from `__tls_get_addr` too (`refuse.rs`): the standard access reaches it
/// through the `LocalKey`'s accessor, an indirect call the walk cannot
/// follow.
pub(crate) fn loader_on_trap_path() -> bool {
    let s = state();
    s.shared && !s.settled
}

/// What was found, once.
#[derive(Clone, Copy)]
struct State {
    settled: bool,
    shared: bool,
}

fn state() -> State {
    static STATE: OnceLock<State> = OnceLock::new();
    *STATE.get_or_init(|| {
        let code = state as fn() -> State as usize as u64;
        let proven = static_tls();
        if proven {
            // SAFETY: static TLS proven just above.
            unsafe { crate::sync::settle_all() };
        }
        let here = look(code);
        State {
            settled: proven,
            // Unknown (no object found): as a shared object, which only
            // refuses more.
            shared: here.shared || here.bias == 0 && here.modid == 0,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executables_thread_locals_are_proven_static_and_all_settled() {
        if !crate::sync::SETTLES {
            eprintln!("skipped: the proof is for x86_64 and aarch64 glibc");
            return;
        }
        assert!(settle());
        assert!(crate::sync::all_settled());
        assert!(crate::probes::runtime::trap_thread::settled_for_test());
    }

    #[test]
    fn every_const_thread_local_of_the_crate_registered_itself() {
        if !crate::sync::SETTLES {
            eprintln!("skipped: registration is for x86_64 and aarch64 glibc");
            return;
        }
        // Declarations in the sources: each `const_thread_local!` use
        // (the reentry flag macro's one use is the uprobe family's flag; the
        // kprobe family's is a field of `kprobe/this_thread.rs`'s block).
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut uses = 0;
        let mut stack = vec![std::path::PathBuf::from(root)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    let n = text
                        .lines()
                        .filter(|l| {
                            l.trim_start()
                                .starts_with("crate::sync::const_thread_local! {")
                                || l.trim_start()
                                    .starts_with("$crate::sync::const_thread_local! {")
                        })
                        .count();
                    uses += n;
                }
            }
        }
        // A floor that the scan found the declarations at all (11 when the
        // kprobe paths' were merged into one block).
        assert!(uses >= 9, "{uses}");
        assert_eq!(crate::sync::registered(), uses);
    }
}
