//! Where functions start in code without symbols: the loaded objects'
//! unwind index (`.eh_frame_hdr`).
//!
//! # Why
//!
//! A stripped C library has no symbol for its internal functions, so the
//! walk descends into them instruction by instruction. GCC emits nothing
//! after a call to a `noreturn` function (`abort`, `__libc_fatal`, the
//! malloc error reporter): the next byte is the next function. A descent
//! that assumes every call returns would fall through into that unrelated
//! function and from there into half the library. Every function compiled
//! with unwind information (all of glibc) has a frame description entry,
//! and the loader maps a sorted index of their start addresses
//! (`PT_GNU_EH_FRAME`). A descent never *falls through* into an address in
//! that index: only a jump or a call gets there.
//!
//! # Format
//!
//! `.eh_frame_hdr` is: version (1), the encodings of the `.eh_frame`
//! pointer, of the entry count and of the table, the pointer, the count,
//! then `count` pairs (start, entry) sorted by start. Only the encodings
//! every GNU linker writes are read (pointer `pcrel|sdata4`, count
//! `udata4`, table `datarel|sdata4`, relative to the header); an object
//! with another layout contributes no starts, which only makes the descent
//! more conservative.

use std::ffi::c_void;

use crate::probes::runtime::in_process::read_text;

/// `DW_EH_PE_pcrel | DW_EH_PE_sdata4`.
const PCREL_SDATA4: u8 = 0x1b;
/// `DW_EH_PE_udata4`.
const UDATA4: u8 = 0x03;
/// `DW_EH_PE_datarel | DW_EH_PE_sdata4`.
const DATAREL_SDATA4: u8 = 0x3b;
/// Header bytes before the table: 4 encoding bytes, pointer, count.
const HEADER: u64 = 12;
/// Bytes per table entry (two `sdata4`).
const ENTRY: u64 = 8;

/// `dl_iterate_phdr` callback: collects each object's `PT_GNU_EH_FRAME`.
///
/// # Safety
/// `info` must be valid for the call and `data` must point to a live
/// `Vec<u64>` nobody else accesses during the iteration.
unsafe extern "C" fn collect_header(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `Vec<u64>` `fde_starts` passed, alive and
    // exclusively ours for the iteration; `info` is valid for this call.
    let (out, info) = unsafe { (&mut *data.cast::<Vec<u64>>(), &*info) };
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: the loader gives `dlpi_phnum` program headers at `dlpi_phdr`.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    for ph in phdrs {
        if ph.p_type == libc::PT_GNU_EH_FRAME {
            out.push(info.dlpi_addr.wrapping_add(ph.p_vaddr));
        }
    }
    0
}

fn read_bytes<const N: usize>(addr: u64) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    read_text(addr, &mut b).ok()?;
    Some(b)
}

/// The function starts one `.eh_frame_hdr` at `hdr` lists.
fn starts_in(hdr: u64, out: &mut Vec<u64>) {
    let Some([version, ptr_enc, count_enc, table_enc]) = read_bytes::<4>(hdr) else {
        return;
    };
    if version != 1 || ptr_enc != PCREL_SDATA4 || count_enc != UDATA4 || table_enc != DATAREL_SDATA4
    {
        return;
    }
    let Some(count) = read_bytes::<4>(hdr + 8).map(u32::from_le_bytes) else {
        return;
    };
    let mut table = vec![0u8; (u64::from(count) * ENTRY) as usize];
    if read_text(hdr + HEADER, &mut table).is_err() {
        return;
    }
    out.extend(table.chunks_exact(ENTRY as usize).map(|e| {
        let rel = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        hdr.wrapping_add_signed(i64::from(rel))
    }));
}

/// Every function start the loaded objects' unwind indexes list, sorted.
pub(super) fn fde_starts() -> Vec<u64> {
    let mut headers: Vec<u64> = Vec::new();
    // SAFETY: the callback matches dl_iterate_phdr's signature and only
    // touches `headers` through the pointer we pass.
    unsafe { libc::dl_iterate_phdr(Some(collect_header), (&mut headers as *mut Vec<u64>).cast()) };
    let mut starts = Vec::new();
    for h in headers {
        starts_in(h, &mut starts);
    }
    starts.sort_unstable();
    starts.dedup();
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unwind_index_lists_the_c_library_functions_entry_points() {
        let starts = fde_starts();
        // SAFETY: dlsym with RTLD_DEFAULT and a valid C string.
        let getpid = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
        assert!(starts.binary_search(&getpid).is_ok(), "{getpid:#x}");
        let ours = fde_starts as fn() -> Vec<u64> as usize as u64;
        assert!(starts.binary_search(&ours).is_ok());
        assert!(starts.windows(2).all(|w| w[0] < w[1]));
    }
}
