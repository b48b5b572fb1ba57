//! The objects the dynamic linker has loaded, as one consistent list:
//! name, load bias, `PT_LOAD` segments and the file each one maps.
//!
//! [`LoadedObjects::read`] takes the list with `dl_iterate_phdr`, which
//! holds the loader's list lock (`dl_load_write_lock` in glibc) while it
//! walks, so an object is listed only while all of its segments are mapped
//! (glibc unmaps an object and unlinks it under that lock). The files come
//! from `/proc/self/maps`: the device and inode of what is mapped, not of
//! whatever the path names on disk now.

use std::ffi::CStr;
use std::ops::Range;

use crate::probes::runtime::maps::Maps;
use crate::probes::uprobe::{FileId, FileMapping};

/// One `PT_LOAD` segment of a loaded object, at its run-time address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// Run-time addresses the segment occupies in memory (`p_vaddr` plus
    /// the load bias, `p_memsz` long; not page-rounded).
    pub vaddr: Range<u64>,
    /// File offset of the segment's first byte (`p_offset`).
    pub file_offset: u64,
    /// Bytes backed by the file (`p_filesz`); the rest up to `p_memsz` is
    /// zero-filled memory.
    pub file_size: u64,
    /// Readable (`PF_R`).
    pub read: bool,
    /// Writable (`PF_W`).
    pub write: bool,
    /// Executable (`PF_X`).
    pub exec: bool,
}

/// An object in the dynamic linker's list: the executable, a library, the
/// vDSO or the loader itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedObject {
    /// The name the loader records (`l_name`): the path it opened for a
    /// library, empty for the main executable, `linux-vdso.so.1` for the
    /// vDSO.
    pub name: String,
    /// The load bias (`l_addr`): run-time address minus link-time address.
    pub base: u64,
    /// Its `PT_LOAD` segments, in program-header order.
    pub segments: Vec<LoadSegment>,
    /// The file its first segment maps, as the kernel names it (device and
    /// inode from `/proc/self/maps`); `None` for the vDSO and for an object
    /// whose mapping has no file.
    pub file: Option<FileId>,
}

impl LoadedObject {
    /// The executable segments as file mappings (what a uprobe registry's
    /// `on_mmap` takes), page-aligned as the kernel maps them. Empty when
    /// the object has no file.
    pub fn file_mappings(&self) -> Vec<FileMapping> {
        let Some(file) = self.file else {
            return Vec::new();
        };
        self.segments
            .iter()
            .filter(|s| s.exec && s.file_size > 0)
            .map(|s| {
                let page = page_size();
                let skew = s.vaddr.start % page;
                FileMapping {
                    vaddr: s.vaddr.start - skew..s.vaddr.start + s.file_size,
                    file,
                    file_offset: s.file_offset - skew,
                }
            })
            .collect()
    }

    /// Whether `addr` lies in one of the object's segments.
    pub fn contains(&self, addr: u64) -> bool {
        self.segments.iter().any(|s| s.vaddr.contains(&addr))
    }

    /// The identity used to tell one load from another: the bias and the
    /// name (two namespaces may load one file at two biases; one bias is
    /// reused only after the object there was unloaded).
    pub(crate) fn key(&self) -> (u64, &str) {
        (self.base, &self.name)
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The loader's list at one moment, with its load and unload counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LoadedObjects {
    pub(crate) objects: Vec<LoadedObject>,
    /// `dlpi_adds`: objects loaded since the process started.
    pub(crate) adds: u64,
    /// `dlpi_subs`: objects unloaded since the process started.
    pub(crate) subs: u64,
}

/// What one `dl_iterate_phdr` pass collects.
#[derive(Default)]
struct Collect {
    objects: Vec<LoadedObject>,
    counters: Option<(u64, u64)>,
}

impl LoadedObjects {
    /// The loader's list now, each object's file looked up in
    /// `/proc/self/maps`.
    ///
    /// Allocates and reads a file: call it from ordinary code, or from a
    /// breakpoint handler that interrupted code known not to hold the
    /// allocator's locks (the loader's rendezvous function).
    pub(crate) fn read() -> LoadedObjects {
        let (adds, subs) = counters();
        let mut c = Collect::default();
        // SAFETY: the callback matches dl_iterate_phdr's signature and only
        // touches the `Collect` passed as `data`, which outlives the call.
        unsafe {
            libc::dl_iterate_phdr(Some(collect), (&mut c as *mut Collect).cast());
        }
        let (adds, subs) = c.counters.unwrap_or((adds, subs));
        let maps = Maps::read().unwrap_or_default();
        for o in &mut c.objects {
            o.file = o
                .segments
                .first()
                .and_then(|s| maps.find(s.vaddr.start))
                .filter(|m| m.inode != 0)
                .map(|m| FileId {
                    dev: m.device,
                    inode: m.inode,
                });
        }
        LoadedObjects {
            objects: c.objects,
            adds,
            subs,
        }
    }

    /// Objects in `self` that `before` does not have (loaded since), and
    /// objects of `before` that `self` does not have (unloaded since).
    pub(crate) fn diff<'a>(
        &'a self,
        before: &'a LoadedObjects,
    ) -> (Vec<&'a LoadedObject>, Vec<&'a LoadedObject>) {
        let has = |list: &[LoadedObject], o: &LoadedObject| list.iter().any(|x| x.key() == o.key());
        let loaded = self
            .objects
            .iter()
            .filter(|o| !has(&before.objects, o))
            .collect();
        let unloaded = before
            .objects
            .iter()
            .filter(|o| !has(&self.objects, o))
            .collect();
        (loaded, unloaded)
    }
}

/// The loader's `(adds, subs)` counters, without building the list.
pub(crate) fn counters() -> (u64, u64) {
    let mut out: Option<(u64, u64)> = None;
    // SAFETY: the callback matches dl_iterate_phdr's signature and only
    // writes the `Option` passed as `data`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(first_counters),
            (&mut out as *mut Option<(u64, u64)>).cast(),
        );
    }
    out.unwrap_or((0, 0))
}

/// Bytes of `dl_phdr_info` up to and including `dlpi_subs`: a loader that
/// passes a smaller `size` has no counters.
const WITH_COUNTERS: usize =
    std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + std::mem::size_of::<libc::c_ulonglong>();

/// `dl_iterate_phdr` callback: the counters of the first object, then stop.
///
/// # Safety
/// `info` valid for the call; `data` a live `Option<(u64, u64)>` nobody else
/// touches during the iteration.
unsafe extern "C" fn first_counters(
    info: *mut libc::dl_phdr_info,
    size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: per the contract above.
    let (out, info) = unsafe { (&mut *data.cast::<Option<(u64, u64)>>(), &*info) };
    if size >= WITH_COUNTERS {
        *out = Some((info.dlpi_adds, info.dlpi_subs));
    }
    1
}

/// `dl_iterate_phdr` callback: records one object.
///
/// # Safety
/// `info` valid for the call; `data` a live `Collect` nobody else touches
/// during the iteration.
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: per the contract above.
    let (out, info) = unsafe { (&mut *data.cast::<Collect>(), &*info) };
    if out.counters.is_none() && size >= WITH_COUNTERS {
        out.counters = Some((info.dlpi_adds, info.dlpi_subs));
    }
    let name = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: the loader gives a NUL-terminated name, valid for the call.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    };
    let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
        &[]
    } else {
        // SAFETY: the loader describes `dlpi_phnum` program headers at
        // `dlpi_phdr`, mapped while the object is listed.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let bias = info.dlpi_addr;
    let segments = phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_LOAD)
        .map(|p| {
            let start = bias.wrapping_add(p.p_vaddr);
            LoadSegment {
                vaddr: start..start.wrapping_add(p.p_memsz),
                file_offset: p.p_offset,
                file_size: p.p_filesz,
                read: p.p_flags & libc::PF_R != 0,
                write: p.p_flags & libc::PF_W != 0,
                exec: p.p_flags & libc::PF_X != 0,
            }
        })
        .collect();
    out.objects.push(LoadedObject {
        name,
        base: bias,
        segments,
        file: None,
    });
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_holds_this_executable_and_the_c_library_with_their_files() {
        let now = LoadedObjects::read();
        let here = the_list_holds_this_executable_and_the_c_library_with_their_files as fn()
            as usize as u64;
        let exe = now.objects.iter().find(|o| o.contains(here)).unwrap();
        let exec = exe
            .segments
            .iter()
            .find(|s| s.vaddr.contains(&here))
            .unwrap();
        assert!(exec.exec && exec.read && !exec.write);
        use std::os::unix::fs::MetadataExt;
        let st = std::fs::metadata("/proc/self/exe").unwrap();
        assert_eq!(
            exe.file,
            Some(FileId {
                dev: st.dev(),
                inode: st.ino()
            })
        );
        let libc_obj = now
            .objects
            .iter()
            .find(|o| o.name.contains("libc.so"))
            .unwrap();
        assert!(libc_obj.file.is_some());
        let maps = libc_obj.file_mappings();
        assert!(!maps.is_empty());
        // `getpid` is in libc's executable mapping, at the file offset the
        // mapping says.
        let getpid = libc::getpid as unsafe extern "C" fn() -> libc::pid_t as usize as u64;
        let m = maps.iter().find(|m| m.vaddr.contains(&getpid)).unwrap();
        let off = m.offset_of(getpid).unwrap();
        assert_eq!(m.vaddr_of(off), Some(getpid));
        assert!(now.adds >= now.objects.len() as u64);
        assert_eq!(counters(), (now.adds, now.subs));
    }

    #[test]
    fn diff_names_what_came_and_what_went() {
        let obj = |name: &str, base: u64| LoadedObject {
            name: name.into(),
            base,
            segments: Vec::new(),
            file: None,
        };
        let before = LoadedObjects {
            objects: vec![obj("", 0x1000), obj("/a.so", 0x7000)],
            ..Default::default()
        };
        let after = LoadedObjects {
            objects: vec![obj("", 0x1000), obj("/b.so", 0x7000)],
            ..Default::default()
        };
        let (came, went) = after.diff(&before);
        assert_eq!(came, vec![&obj("/b.so", 0x7000)]);
        assert_eq!(went, vec![&obj("/a.so", 0x7000)]);
        let (came, went) = after.diff(&after);
        assert!(came.is_empty() && went.is_empty());
    }
}
