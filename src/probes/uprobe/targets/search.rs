//! Where a bare library name is looked for, in the dynamic linker's order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::elf;

use super::ldcache;

/// An ELF file's class, byte order and machine: what the dynamic linker
/// checks before it takes a library found by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ElfKind {
    /// `ELFCLASS64` (else `ELFCLASS32`).
    pub class64: bool,
    /// `ELFDATA2LSB` (else `ELFDATA2MSB`).
    pub little_endian: bool,
    /// `e_machine` (`EM_X86_64` is 62, `EM_AARCH64` 183).
    pub machine: u16,
}

impl ElfKind {
    /// This process's: the class, byte order and machine it was built for.
    pub fn host() -> ElfKind {
        let machine = if cfg!(target_arch = "x86_64") {
            elf::EM_X86_64
        } else if cfg!(target_arch = "aarch64") {
            elf::EM_AARCH64
        } else if cfg!(target_arch = "x86") {
            elf::EM_386
        } else if cfg!(target_arch = "riscv64") {
            elf::EM_RISCV
        } else {
            // Whatever the executable itself is.
            return std::fs::read("/proc/self/exe")
                .ok()
                .and_then(|d| super::elf_index::elf_kind(&d))
                .unwrap_or(ElfKind {
                    class64: cfg!(target_pointer_width = "64"),
                    little_endian: cfg!(target_endian = "little"),
                    machine: elf::EM_NONE,
                });
        };
        ElfKind {
            class64: cfg!(target_pointer_width = "64"),
            little_endian: cfg!(target_endian = "little"),
            machine,
        }
    }

    /// The flags an `ld.so.cache` entry carries for libraries of this kind
    /// (glibc's `_dl_cache_check_flags`), when known.
    pub(super) fn cache_flags(&self) -> Option<u32> {
        match (self.class64, self.machine) {
            (true, elf::EM_X86_64) => Some(ldcache::FLAG_ELF_LIBC6 | ldcache::FLAG_X8664_LIB64),
            (true, elf::EM_AARCH64) => Some(ldcache::FLAG_ELF_LIBC6 | ldcache::FLAG_AARCH64_LIB64),
            (false, elf::EM_386) => Some(ldcache::FLAG_ELF_LIBC6),
            _ => None,
        }
    }
}

/// The objects already loaded in the process a target is for, in load
/// order: a bare library name matches one of them first (by file name or
/// `DT_SONAME`), as `dlopen` of a loaded library returns it.
///
/// The live runtime implements it over `dl_iterate_phdr`; a `Vec` of paths
/// is a fixed list.
pub trait LoadedObjects: Send + Sync {
    /// The paths of the loaded objects, in load order.
    fn loaded_paths(&self) -> Vec<PathBuf>;
}

impl LoadedObjects for Vec<PathBuf> {
    fn loaded_paths(&self) -> Vec<PathBuf> {
        self.clone()
    }
}

impl<T: LoadedObjects + ?Sized> LoadedObjects for &T {
    fn loaded_paths(&self) -> Vec<PathBuf> {
        (**self).loaded_paths()
    }
}

impl<T: LoadedObjects + ?Sized> LoadedObjects for Arc<T> {
    fn loaded_paths(&self) -> Vec<PathBuf> {
        (**self).loaded_paths()
    }
}

/// How a target's file was found.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FoundBy {
    /// The target named a path (it has a `/`).
    Path,
    /// A loaded object ([`LoadedObjects`]) whose file name or `DT_SONAME`
    /// is the name.
    Loaded,
    /// In this extra directory ([`LibrarySearch::directories`]:
    /// `LD_LIBRARY_PATH` by default).
    Directory(PathBuf),
    /// Through the dynamic linker's cache.
    LdSoCache,
    /// In this default directory.
    DefaultDirectory(PathBuf),
}

/// Where bare library names are looked for, after the loaded objects, in
/// this order: [`directories`](Self::directories), the
/// [`cache`](Self::cache) file, the [`default_directories`](Self::default_directories).
/// Only files of [`kind`](Self::kind) are taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibrarySearch {
    /// Searched first, in order, as the loader searches `LD_LIBRARY_PATH`.
    pub directories: Vec<PathBuf>,
    /// The linker's cache (`None`: not used).
    pub cache: Option<PathBuf>,
    /// Searched last, in order.
    pub default_directories: Vec<PathBuf>,
    /// The ELF class, byte order and machine a library must have.
    pub kind: ElfKind,
}

impl LibrarySearch {
    /// The glibc loader's search for this process, as far as it does not
    /// depend on the object asking (no `DT_RPATH` / `DT_RUNPATH`):
    /// `LD_LIBRARY_PATH` (as this process's environment has it now),
    /// `/etc/ld.so.cache`, then `/lib/x86_64-linux-gnu`,
    /// `/usr/lib/x86_64-linux-gnu` (the multiarch directories of this
    /// machine's triple), `/lib64`, `/usr/lib64`, `/lib`, `/usr/lib`.
    pub fn system() -> LibrarySearch {
        let directories = std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        LibrarySearch {
            directories,
            cache: Some(PathBuf::from("/etc/ld.so.cache")),
            default_directories: default_directories(),
            kind: ElfKind::host(),
        }
    }

    /// Nowhere: only loaded objects and explicit paths resolve. Add
    /// places by setting the fields.
    pub fn nowhere() -> LibrarySearch {
        LibrarySearch {
            directories: Vec::new(),
            cache: None,
            default_directories: Vec::new(),
            kind: ElfKind::host(),
        }
    }
}

impl Default for LibrarySearch {
    fn default() -> Self {
        LibrarySearch::system()
    }
}

/// The loader's trusted directories for this machine.
fn default_directories() -> Vec<PathBuf> {
    let triple = if cfg!(target_arch = "x86_64") {
        Some("x86_64-linux-gnu")
    } else if cfg!(target_arch = "aarch64") {
        Some("aarch64-linux-gnu")
    } else if cfg!(target_arch = "x86") {
        Some("i386-linux-gnu")
    } else {
        None
    };
    let mut out = Vec::new();
    if let Some(t) = triple {
        out.push(Path::new("/lib").join(t));
        out.push(Path::new("/usr/lib").join(t));
    }
    if cfg!(target_pointer_width = "64") {
        out.push(PathBuf::from("/lib64"));
        out.push(PathBuf::from("/usr/lib64"));
    }
    out.push(PathBuf::from("/lib"));
    out.push(PathBuf::from("/usr/lib"));
    out
}
