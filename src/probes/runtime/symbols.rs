//! [`ProcessSymbols`]: the functions of the running process, from the ELF
//! symbol tables of every loaded object.
//!
//! # Where the addresses come from
//!
//! `dl_iterate_phdr` lists every object the dynamic loader mapped (the
//! executable first, then the shared libraries) with its *load bias*: the
//! difference between the addresses in the file and where the object is
//! mapped. A position-independent executable is loaded at a random base, so
//! its symbols' `st_value` are offsets that the bias turns into run-time
//! addresses; for a non-PIE executable the bias is zero. Each object's file
//! (the executable's is `/proc/self/exe`) is parsed with the `object` crate:
//! its `.symtab` when present (local functions included), else its
//! `.dynsym` (exported functions only, e.g. a stripped C library). The vDSO
//! has no file and is skipped.
//!
//! # Names
//!
//! Every function is found under its raw (mangled) name and, for Rust
//! symbols, under its demangled path without the hash
//! (`demo::workload::parse`). Zero-sized symbols are skipped: a probe
//! address must be checked against the function's extent.
//!
//! Loading reads and parses files: call it at set-up, not in a trap.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::Arc;

use object::{Object, ObjectSymbol, SymbolKind};

use crate::probes::resolve::{Symbol, SymbolResolver};

/// One function of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Demangled name without the hash (the raw name for non-Rust symbols).
    pub name: String,
    /// The symbol as it is in the file.
    pub raw: String,
    /// Run-time address of the first instruction.
    pub start: u64,
    /// Size in bytes (at least 1).
    pub size: u64,
    /// Path of the object that defines it.
    pub object: Arc<str>,
}

impl Function {
    /// As the registry's [`Symbol`].
    pub fn symbol(&self) -> Symbol {
        Symbol {
            start: self.start,
            size: self.size,
        }
    }

    /// Whether `addr` is inside the function.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr - self.start < self.size
    }
}

struct Inner {
    /// Sorted by start address.
    by_addr: Vec<Function>,
    /// Raw and demangled names to indices in `by_addr` (first object wins).
    by_name: HashMap<String, usize>,
    objects: Vec<(Arc<str>, u64)>,
}

/// The functions of the running process. Cheap to clone (shared).
#[derive(Clone)]
pub struct ProcessSymbols {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessSymbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSymbols")
            .field("functions", &self.inner.by_addr.len())
            .field("objects", &self.inner.objects)
            .finish()
    }
}

/// An object the loader mapped: its path and load bias.
struct Loaded {
    path: String,
    bias: u64,
}

/// `dl_iterate_phdr` callback: records one loaded object.
///
/// # Safety
/// `info` must be valid for the call and `data` must point to a live
/// `Vec<Loaded>` nobody else accesses during the iteration.
unsafe extern "C" fn collect_object(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `Vec<Loaded>` `loaded_objects` passed, alive and
    // exclusively ours for the iteration; `info` is valid for this call.
    let (out, info) = unsafe { (&mut *data.cast::<Vec<Loaded>>(), &*info) };
    let name = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: the loader gives a NUL-terminated name.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    };
    out.push(Loaded {
        path: name,
        bias: info.dlpi_addr,
    });
    0
}

fn loaded_objects() -> Vec<Loaded> {
    let mut out: Vec<Loaded> = Vec::new();
    // SAFETY: the callback matches dl_iterate_phdr's signature and only
    // touches `out` through the pointer we pass.
    unsafe { libc::dl_iterate_phdr(Some(collect_object), (&mut out as *mut Vec<Loaded>).cast()) };
    if let Some(first) = out.first_mut() {
        if first.path.is_empty() {
            first.path = "/proc/self/exe".into();
        }
    }
    out.retain(|o| !o.path.is_empty() && std::path::Path::new(&o.path).exists());
    out
}

/// Demangled name without the hash, or `None` for non-Rust symbols.
fn demangle(raw: &str) -> Option<String> {
    let d = rustc_demangle::try_demangle(raw).ok()?;
    Some(format!("{d:#}"))
}

fn add_object(path: &str, bias: u64, funcs: &mut Vec<Function>) -> std::io::Result<()> {
    let data = std::fs::read(path)?;
    let file = object::File::parse(&*data)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let object: Arc<str> = Arc::from(path);
    let mut add = |sym: object::Symbol<'_, '_>| {
        if sym.kind() != SymbolKind::Text || !sym.is_definition() || sym.size() == 0 {
            return;
        }
        let Ok(raw) = sym.name() else { return };
        if raw.is_empty() {
            return;
        }
        funcs.push(Function {
            name: demangle(raw).unwrap_or_else(|| raw.to_string()),
            raw: raw.to_string(),
            start: sym.address().wrapping_add(bias),
            size: sym.size(),
            object: Arc::clone(&object),
        });
    };
    let mut any = false;
    for sym in file.symbols() {
        any = true;
        add(sym);
    }
    if !any {
        for sym in file.dynamic_symbols() {
            add(sym);
        }
    }
    Ok(())
}

impl ProcessSymbols {
    /// The functions of every object loaded in the process.
    ///
    /// # Errors
    /// If the executable itself cannot be read or parsed (a library that
    /// cannot is skipped).
    pub fn load() -> std::io::Result<ProcessSymbols> {
        Self::load_filtered(|_| true)
    }

    /// The functions of the executable only (faster: no libraries).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_executable() -> std::io::Result<ProcessSymbols> {
        let mut first = true;
        Self::load_filtered(move |_| std::mem::take(&mut first))
    }

    fn load_filtered(mut keep: impl FnMut(&str) -> bool) -> std::io::Result<ProcessSymbols> {
        let mut funcs = Vec::new();
        let mut objects = Vec::new();
        for (i, o) in loaded_objects().into_iter().enumerate() {
            if !keep(&o.path) {
                continue;
            }
            match add_object(&o.path, o.bias, &mut funcs) {
                Ok(()) => objects.push((Arc::from(o.path.as_str()), o.bias)),
                Err(e) if i == 0 => return Err(e),
                Err(_) => {}
            }
        }
        Ok(Self::from_functions(funcs, objects))
    }

    fn from_functions(mut funcs: Vec<Function>, objects: Vec<(Arc<str>, u64)>) -> ProcessSymbols {
        // Stable: among aliases at one address the first object's come first.
        funcs.sort_by_key(|f| f.start);
        let mut by_name = HashMap::with_capacity(funcs.len() * 2);
        for (i, f) in funcs.iter().enumerate() {
            by_name.entry(f.raw.clone()).or_insert(i);
            by_name.entry(f.name.clone()).or_insert(i);
        }
        ProcessSymbols {
            inner: Arc::new(Inner {
                by_addr: funcs,
                by_name,
                objects,
            }),
        }
    }

    /// The function called `name` (raw or demangled without hash).
    pub fn function(&self, name: &str) -> Option<&Function> {
        self.inner
            .by_name
            .get(name)
            .map(|&i| &self.inner.by_addr[i])
    }

    /// The function containing `addr` (the innermost, when symbols nest).
    pub fn function_at(&self, addr: u64) -> Option<&Function> {
        let at = self.inner.by_addr.partition_point(|f| f.start <= addr);
        self.inner.by_addr[..at]
            .iter()
            .rev()
            .take(8)
            .find(|f| f.contains(addr))
    }

    /// Every function, by address.
    pub fn functions(&self) -> &[Function] {
        &self.inner.by_addr
    }

    /// The objects whose symbols were loaded: path and load bias.
    pub fn objects(&self) -> &[(Arc<str>, u64)] {
        &self.inner.objects
    }
}

impl SymbolResolver for ProcessSymbols {
    fn lookup(&self, name: &str) -> Option<Symbol> {
        self.function(name).map(Function::symbol)
    }

    fn function_containing(&self, addr: u64) -> Option<Symbol> {
        self.function_at(addr).map(Function::symbol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn a_function_to_find(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3)
    }

    #[test]
    fn our_own_functions_resolve_to_their_run_time_address() {
        let syms = ProcessSymbols::load_executable().unwrap();
        let addr = a_function_to_find as fn(u64) -> u64 as usize as u64;
        let f = syms
            .function_at(addr)
            .expect("the function containing our own code");
        assert_eq!(f.start, addr, "{f:?}");
        assert!(f.name.ends_with("a_function_to_find"), "{}", f.name);
        assert_eq!(syms.function(&f.name).map(|g| g.start), Some(addr));
        assert_eq!(syms.function(&f.raw).map(|g| g.start), Some(addr));
        assert_eq!(syms.lookup(&f.name), Some(f.symbol()));
        assert_eq!(a_function_to_find(2), 6);
    }

    #[test]
    fn c_library_functions_resolve_when_libraries_are_loaded() {
        let syms = ProcessSymbols::load().unwrap();
        let getpid = syms.function("getpid").expect("getpid is exported by libc");
        // dlsym agrees on where getpid is.
        // SAFETY: dlsym with RTLD_DEFAULT and a valid C string.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
        assert_eq!(getpid.start, p);
        assert!(syms.objects().len() >= 2);
    }

    #[test]
    fn unknown_names_and_unmapped_addresses_resolve_to_nothing() {
        let syms = ProcessSymbols::load_executable().unwrap();
        assert!(syms.function("no_such_function_anywhere").is_none());
        assert!(syms.function_at(16).is_none());
    }
}
