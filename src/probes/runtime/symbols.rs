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
//! # IFUNC symbols
//!
//! `strlen`, `memcpy`, `strcmp` and many more C-library functions are
//! `STT_GNU_IFUNC` symbols: their value is a resolver the loader calls
//! once to pick an implementation for this CPU (`__strlen_avx2`). Such a
//! name resolves to that implementation: `dlsym` on the defining object
//! (the address every call through the PLT reaches; the loader calls the
//! resolver, not us). Its extent is its own symbol's if the object has a
//! `.symtab`, else the `.eh_frame` entry that covers it (stripped
//! libraries keep their unwind tables): from the implementation's address
//! to the end of that entry. An IFUNC whose implementation has neither is
//! left out (unknown, never guessed). The resolver itself has no name.
//!
//! # Names
//!
//! Every function is found under its raw (mangled) name and, for Rust
//! symbols, under its demangled path without the hash
//! (`demo::workload::parse`). Zero-sized symbols are skipped: a probe
//! address must be checked against the function's extent.
//!
//! A name defined in several objects (a function of a `dlopen`ed plugin
//! that the executable also has, `_init` in every object) is not resolved
//! to one of them silently: [`ProcessSymbols::find`] reports
//! [`ProbeError::AmbiguousSymbol`] listing the objects, and
//! `object:name` picks one (`object` is the object's file name or a suffix
//! of its path: `libc.so.6:qsort`, `x86_64-linux-gnu/libc.so.6:qsort`).
//! Within one object the lowest address wins, as before.
//!
//! # Libraries loaded later
//!
//! A [`ProcessSymbols`] is a snapshot. [`LiveSymbols`], the resolver of
//! the live registry, refreshes it lazily: before each lookup it compares
//! the loader's `dlpi_adds`/`dlpi_subs` counters (objects ever loaded and
//! unloaded, from `dl_iterate_phdr`) with the snapshot's and, if they
//! moved, builds a new snapshot that re-reads only the objects it has not
//! parsed before and drops the ones unloaded.
//!
//! Loading reads and parses files: call it at set-up, not in a trap.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::Arc;

use object::{Object, ObjectSection, ObjectSymbol, SymbolFlags, SymbolKind};

use crate::probes::resolve::{Symbol, SymbolResolver};
use crate::probes::ProbeError;
use crate::rcu::RcuCell;

mod fde_extents;

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
    /// Named after an IFUNC symbol (`strlen`, `memcpy`): `start` and
    /// `size` are those of the implementation the loader chose for this
    /// process (see the module docs).
    pub ifunc: bool,
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

/// The functions one object contributed (kept to reuse on a refresh).
struct ObjectFunctions {
    path: Arc<str>,
    bias: u64,
    /// The file as it was read: a file replaced on disk and loaded again at
    /// the same address is read again.
    stamp: Option<FileStamp>,
    funcs: Vec<Function>,
}

/// Device, inode, size and modification time of a file.
type FileStamp = (u64, u64, u64, i64, i64);

fn file_stamp(path: &str) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

struct Inner {
    /// Sorted by start address.
    by_addr: Vec<Function>,
    /// Raw and demangled names to indices in `by_addr`: the lowest address
    /// in each object that defines the name, one per object.
    by_name: HashMap<String, Vec<usize>>,
    objects: Vec<(Arc<str>, u64)>,
    /// Per object, for [`ProcessSymbols::refreshed`].
    parsed: Vec<Arc<ObjectFunctions>>,
    /// The executable's own path (its object is read as `/proc/self/exe`),
    /// for `object:name` qualifiers.
    exe: Option<String>,
    /// The loader's counters when the snapshot was taken.
    counters: Option<LoaderCounters>,
    /// Only the executable was loaded: never refreshed.
    executable_only: bool,
}

/// The functions of the running process: a snapshot. Cheap to clone
/// (shared).
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

/// The loader's `dlpi_adds` and `dlpi_subs`: objects loaded and unloaded
/// since the process started. Equal counters, same objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LoaderCounters {
    adds: u64,
    subs: u64,
}

/// `dl_iterate_phdr` callback: reads the counters from the first object
/// and stops.
///
/// # Safety
/// `info` must be valid for the call and `data` must point to a live
/// `Option<LoaderCounters>` nobody else accesses during the iteration.
unsafe extern "C" fn read_counters(
    info: *mut libc::dl_phdr_info,
    size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `Option` `loader_counters` passed, alive and
    // exclusively ours; `info` is valid for this call.
    let (out, info) = unsafe { (&mut *data.cast::<Option<LoaderCounters>>(), &*info) };
    // The counters exist only if the loader's structure is long enough.
    if size >= std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8 {
        *out = Some(LoaderCounters {
            adds: info.dlpi_adds,
            subs: info.dlpi_subs,
        });
    }
    1
}

/// The loader's counters now (`None`: this loader keeps none, and every
/// lookup of a [`LiveSymbols`] refreshes).
fn loader_counters() -> Option<LoaderCounters> {
    let mut out: Option<LoaderCounters> = None;
    // SAFETY: the callback matches dl_iterate_phdr's signature and only
    // touches `out` through the pointer we pass.
    unsafe {
        libc::dl_iterate_phdr(
            Some(read_counters),
            (&mut out as *mut Option<LoaderCounters>).cast(),
        )
    };
    out
}

/// Whether the qualifier `q` of `q:name` names the object at `path`: its
/// whole path, or a suffix of it that starts a path component.
fn object_matches(path: &str, q: &str) -> bool {
    !q.is_empty()
        && path.ends_with(q)
        && (path.len() == q.len()
            || q.starts_with('/')
            || path[..path.len() - q.len()].ends_with('/'))
}

/// Splits `object:name` at its first lone `:` (one not part of a `::`
/// path separator); `None` for a name without one.
fn split_qualified(query: &str) -> Option<(&str, &str)> {
    let b = query.as_bytes();
    let i = (0..b.len())
        .find(|&i| b[i] == b':' && (i == 0 || b[i - 1] != b':') && b.get(i + 1) != Some(&b':'))?;
    Some((&query[..i], &query[i + 1..]))
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

/// `STT_GNU_IFUNC`: the symbol's value is a resolver that returns the
/// implementation to use.
const STT_GNU_IFUNC: u8 = 10;

/// Whether `sym` is a defined IFUNC symbol (which `object` does not count
/// as a definition).
fn is_ifunc(sym: &object::Symbol<'_, '_>) -> bool {
    matches!(sym.flags(), SymbolFlags::Elf { st_info, .. } if st_info & 0xf == STT_GNU_IFUNC)
        && sym.section_index().is_some()
}

/// The address `dlsym` gives for `name` in the object at `path` (the
/// executable if `exe`): for an IFUNC symbol, the implementation the
/// loader's resolver chose, as every call through the PLT reaches it.
fn dlsym_in(path: &str, exe: bool, name: &str) -> Option<u64> {
    let name = std::ffi::CString::new(name).ok()?;
    let path = std::ffi::CString::new(path).ok()?;
    // SAFETY: valid C strings. RTLD_NOLOAD only finds an object already
    // loaded (it runs no constructor) and takes a reference, dropped below.
    let handle = unsafe {
        libc::dlopen(
            if exe { std::ptr::null() } else { path.as_ptr() },
            libc::RTLD_LAZY | libc::RTLD_NOLOAD,
        )
    };
    if handle.is_null() {
        return None;
    }
    // SAFETY: a live handle and a valid C string. The object's own
    // definition comes first in its lookup scope.
    let addr = unsafe { libc::dlsym(handle, name.as_ptr()) } as u64;
    // SAFETY: the reference dlopen took above, given back once.
    unsafe { libc::dlclose(handle) };
    (addr != 0).then_some(addr)
}

/// The functions of the object at `path`, mapped with `bias` (`exe`: the
/// executable).
fn parse_object(path: &str, bias: u64, exe: bool) -> std::io::Result<ObjectFunctions> {
    let stamp = file_stamp(path);
    let data = std::fs::read(path)?;
    let file = object::File::parse(&*data)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let object: Arc<str> = Arc::from(path);
    let mut funcs = Vec::new();
    let mut ifuncs: Vec<String> = Vec::new();
    let mut add = |sym: object::Symbol<'_, '_>| {
        let Ok(raw) = sym.name() else { return };
        if raw.is_empty() || sym.kind() != SymbolKind::Text {
            return;
        }
        if is_ifunc(&sym) {
            ifuncs.push(raw.to_string());
            return;
        }
        if !sym.is_definition() || sym.size() == 0 {
            return;
        }
        funcs.push(Function {
            name: demangle(raw).unwrap_or_else(|| raw.to_string()),
            raw: raw.to_string(),
            start: sym.address().wrapping_add(bias),
            size: sym.size(),
            object: Arc::clone(&object),
            ifunc: false,
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
    if !ifuncs.is_empty() {
        ifuncs.sort_unstable();
        ifuncs.dedup();
        // The implementations' extents: their own (local) symbol if the
        // object has a `.symtab`, else the unwind table's entry.
        let extents = file
            .section_by_name(".eh_frame")
            .and_then(|s| Some(fde_extents::fde_extents(s.data().ok()?, s.address())))
            .unwrap_or_default();
        for raw in ifuncs {
            let Some(start) = dlsym_in(path, exe, &raw) else {
                continue;
            };
            let size = match funcs.iter().find(|f| f.start == start) {
                Some(own) => Some(own.size),
                None => fde_extents::containing(&extents, start.wrapping_sub(bias))
                    .map(|(s, n)| s.wrapping_add(bias).wrapping_add(n) - start),
            };
            let Some(size) = size else { continue };
            funcs.push(Function {
                name: demangle(&raw).unwrap_or_else(|| raw.clone()),
                raw,
                start,
                size,
                object: Arc::clone(&object),
                ifunc: true,
            });
        }
    }
    Ok(ObjectFunctions {
        path: object,
        bias,
        stamp,
        funcs,
    })
}

impl ProcessSymbols {
    /// The functions of every object loaded in the process.
    ///
    /// # Errors
    /// If the executable itself cannot be read or parsed (a library that
    /// cannot is skipped).
    pub fn load() -> std::io::Result<ProcessSymbols> {
        Self::build(false, &[])
    }

    /// The functions of the executable only (faster: no libraries).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_executable() -> std::io::Result<ProcessSymbols> {
        Self::build(true, &[])
    }

    /// A snapshot of the objects loaded now, reusing the functions of
    /// `known` objects (same path and bias) instead of re-reading them.
    fn build(
        executable_only: bool,
        known: &[Arc<ObjectFunctions>],
    ) -> std::io::Result<ProcessSymbols> {
        // Read before listing the objects: an object loaded in between is
        // in the snapshot under older counters, which only costs one more
        // refresh later.
        let counters = loader_counters();
        let mut parsed = Vec::new();
        for (i, o) in loaded_objects().into_iter().enumerate() {
            if executable_only && i > 0 {
                break;
            }
            if let Some(k) = known.iter().find(|k| {
                *k.path == *o.path
                    && k.bias == o.bias
                    && k.stamp.is_some()
                    && k.stamp == file_stamp(&o.path)
            }) {
                parsed.push(Arc::clone(k));
                continue;
            }
            match parse_object(&o.path, o.bias, i == 0) {
                Ok(f) => parsed.push(Arc::new(f)),
                Err(e) if i == 0 => return Err(e),
                Err(_) => {}
            }
        }
        let exe = std::env::current_exe()
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        Ok(Self::from_objects(parsed, exe, counters, executable_only))
    }

    fn from_objects(
        parsed: Vec<Arc<ObjectFunctions>>,
        exe: Option<String>,
        counters: Option<LoaderCounters>,
        executable_only: bool,
    ) -> ProcessSymbols {
        let mut funcs: Vec<Function> = parsed
            .iter()
            .flat_map(|o| o.funcs.iter().cloned())
            .collect();
        // Stable: among aliases at one address the first object's come first.
        funcs.sort_by_key(|f| f.start);
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::with_capacity(funcs.len() * 2);
        for (i, f) in funcs.iter().enumerate() {
            for name in [&f.raw, &f.name] {
                let at = by_name.entry(name.clone()).or_default();
                // One per object: the IFUNC's implementation (what calls
                // reach; a same-named plain symbol is an older version,
                // `memcpy@GLIBC_2.2.5`), else the lowest address (`funcs`
                // is by address).
                match at
                    .iter_mut()
                    .find(|j| Arc::ptr_eq(&funcs[**j].object, &f.object))
                {
                    Some(j) if f.ifunc && !funcs[*j].ifunc => *j = i,
                    Some(_) => {}
                    None => at.push(i),
                }
            }
        }
        let objects = parsed
            .iter()
            .map(|o| (Arc::clone(&o.path), o.bias))
            .collect();
        ProcessSymbols {
            inner: Arc::new(Inner {
                by_addr: funcs,
                by_name,
                objects,
                parsed,
                exe,
                counters,
                executable_only,
            }),
        }
    }

    /// This snapshot if the loader has loaded and unloaded nothing since it
    /// was taken, else a new one (only new objects are read).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn refreshed(&self) -> std::io::Result<ProcessSymbols> {
        let now = loader_counters();
        if self.inner.executable_only || (now.is_some() && now == self.inner.counters) {
            return Ok(self.clone());
        }
        Self::build(false, &self.inner.parsed)
    }

    /// Whether `f` is defined by the object `q` names (see
    /// [`object_matches`]; the executable also by its own path).
    fn defined_by(&self, f: &Function, q: &str) -> bool {
        object_matches(&f.object, q)
            || (Some(&f.object) == self.inner.objects.first().map(|o| &o.0)
                && self
                    .inner
                    .exe
                    .as_deref()
                    .is_some_and(|exe| object_matches(exe, q)))
    }

    /// The function `query` names: a raw or demangled name, or
    /// `object:name` (see the module docs).
    ///
    /// # Errors
    /// - [`ProbeError::UnknownSymbol`]: no loaded object defines it;
    /// - [`ProbeError::AmbiguousSymbol`]: several objects define it (and no
    ///   qualifier, or one matching several of them, was given).
    pub fn find(&self, query: &str) -> Result<&Function, ProbeError> {
        let unknown = || ProbeError::UnknownSymbol {
            name: query.to_string(),
        };
        let (name, candidates): (&str, Vec<usize>) = match self.inner.by_name.get(query) {
            Some(at) => (query, at.clone()),
            None => {
                let (q, name) = split_qualified(query).ok_or_else(unknown)?;
                let at = self.inner.by_name.get(name).ok_or_else(unknown)?;
                let at = at
                    .iter()
                    .copied()
                    .filter(|&i| self.defined_by(&self.inner.by_addr[i], q))
                    .collect();
                (name, at)
            }
        };
        match candidates[..] {
            [] => Err(unknown()),
            [i] => Ok(&self.inner.by_addr[i]),
            _ => {
                // In load order, as the loader lists them.
                let mut objects: Vec<&Arc<str>> = candidates
                    .iter()
                    .map(|&i| &self.inner.by_addr[i].object)
                    .collect();
                objects.sort_by_key(|o| {
                    self.inner
                        .objects
                        .iter()
                        .position(|(p, _)| Arc::ptr_eq(p, o))
                });
                Err(ProbeError::AmbiguousSymbol {
                    name: name.to_string(),
                    objects: objects.iter().map(|o| o.to_string()).collect(),
                })
            }
        }
    }

    /// The function `name` names, if exactly one (see [`find`](Self::find)).
    pub fn function(&self, name: &str) -> Option<&Function> {
        self.find(name).ok()
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

    fn resolve(&self, name: &str) -> Result<Symbol, ProbeError> {
        self.find(name).map(Function::symbol)
    }
}

/// The process's symbols, kept current: a [`ProcessSymbols`] snapshot
/// refreshed lazily when the loader has loaded or unloaded an object since
/// (see the module docs). The live registry's resolver. Cheap to clone
/// (shared).
#[derive(Clone)]
pub struct LiveSymbols {
    /// Replaced by a refresh; readers clone the snapshot under a read
    /// section (no lock: a child after `fork` never waits for it).
    current: Arc<RcuCell<ProcessSymbols>>,
}

impl std::fmt::Debug for LiveSymbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LiveSymbols")
            .field(&self.snapshot())
            .finish()
    }
}

impl LiveSymbols {
    /// Kept current from `initial` on.
    pub fn new(initial: ProcessSymbols) -> LiveSymbols {
        LiveSymbols {
            current: Arc::new(RcuCell::new(initial)),
        }
    }

    /// The snapshot as it is, without refreshing.
    fn snapshot(&self) -> ProcessSymbols {
        let guard = self.current.domain().read();
        self.current
            .load(&guard)
            .cloned()
            .expect("a LiveSymbols cell is never empty")
    }

    /// The symbols now: refreshed first if objects were loaded or unloaded
    /// since the last look (if that refresh fails, the previous snapshot).
    pub fn current(&self) -> ProcessSymbols {
        let snap = self.snapshot();
        match snap.refreshed() {
            Ok(fresh) if !Arc::ptr_eq(&fresh.inner, &snap.inner) => {
                // Two refreshes racing both publish a snapshot at least as
                // new as the counters they read; a stale one is replaced on
                // the next look, whose counters differ from it.
                self.current.replace(fresh.clone());
                fresh
            }
            _ => snap,
        }
    }
}

impl SymbolResolver for LiveSymbols {
    fn lookup(&self, name: &str) -> Option<Symbol> {
        self.current().lookup(name)
    }

    fn function_containing(&self, addr: u64) -> Option<Symbol> {
        self.current().function_containing(addr)
    }

    fn resolve(&self, name: &str) -> Result<Symbol, ProbeError> {
        self.current().resolve(name)
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
    fn qualifiers_split_at_a_lone_colon_and_match_whole_path_components() {
        assert_eq!(
            split_qualified("libc.so.6:qsort"),
            Some(("libc.so.6", "qsort"))
        );
        assert_eq!(split_qualified("/a/b.so:f"), Some(("/a/b.so", "f")));
        assert_eq!(split_qualified("demo::work::parse"), None);
        assert_eq!(
            split_qualified("app:demo::work::parse"),
            Some(("app", "demo::work::parse"))
        );
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        assert!(object_matches(libc, "libc.so.6"));
        assert!(object_matches(libc, "x86_64-linux-gnu/libc.so.6"));
        assert!(object_matches(libc, libc));
        assert!(!object_matches(libc, "c.so.6"));
        assert!(!object_matches(libc, ""));
        assert!(!object_matches(libc, "libc.so"));
    }

    #[test]
    fn a_snapshot_is_kept_while_the_loader_changes_nothing() {
        let syms = ProcessSymbols::load().unwrap();
        let again = syms.refreshed().unwrap();
        // (Unless another test of this binary loaded a library meanwhile.)
        if loader_counters() == syms.inner.counters {
            assert!(Arc::ptr_eq(&syms.inner, &again.inner));
        }
        assert!(syms.inner.counters.is_some(), "glibc keeps dlpi_adds/subs");
    }

    #[test]
    fn unknown_names_and_unmapped_addresses_resolve_to_nothing() {
        let syms = ProcessSymbols::load_executable().unwrap();
        assert!(syms.function("no_such_function_anywhere").is_none());
        assert!(syms.function_at(16).is_none());
    }
}
