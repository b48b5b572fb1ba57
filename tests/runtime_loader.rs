//! The loader watch (issue 12's loader hook): every `dlopen`/`dlclose` is
//! reported from inside the dynamic linker, a new library before its
//! constructors run, an unloaded one before `dlclose` returns, dependencies
//! in the same change, and in a `fork` child too. Fixture libraries are
//! built with `cc` by the tests.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod dl_support;

use dl_support::Lib;
use object::{Object, ObjectSymbol};
use rcu_registry::probes::runtime::{LoadedObject, LoaderEvent, LoaderWatch};
use rcu_registry::probes::uprobe::FileId;

/// Tests in this binary share the loader; each uses its own fixtures but
/// the counters they compare are process-wide.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn watch() -> &'static LoaderWatch {
    LoaderWatch::global().expect("this test binary is dynamically linked")
}

fn dir() -> PathBuf {
    dl_support::fixture_dir("loader")
}

/// Builds `lib<name>.so` from `source`, with extra `cc` arguments.
fn build(name: &str, source: &str, extra: &[&str]) -> PathBuf {
    dl_support::build_so("loader", &format!("lib{name}.so"), source, extra)
}

/// A fixture whose constructor sets `ctor_ran` and whose `f` adds `k`.
fn ctor_library(name: &str, k: i32) -> PathBuf {
    build(
        name,
        &format!(
            "int ctor_ran = 0;\n\
             __attribute__((constructor)) static void init(void) {{ ctor_ran = 1; }}\n\
             int f(int x) {{ return x + {k}; }}\n"
        ),
        &[],
    )
}

/// The link-time address of `symbol` in the ELF file at `path`.
fn symbol_vaddr(path: &Path, symbol: &str) -> u64 {
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.symbols()
        .chain(file.dynamic_symbols())
        .find(|s| s.name() == Ok(symbol))
        .unwrap_or_else(|| panic!("{symbol} in {path:?}"))
        .address()
}

fn file_id(path: &Path) -> FileId {
    let st = std::fs::metadata(path).unwrap();
    FileId {
        dev: st.dev(),
        inode: st.ino(),
    }
}

fn open(path: &Path) -> Lib {
    Lib::open(path)
}

fn close(h: Lib) {
    h.close();
}

fn mapped(path: &Path) -> bool {
    dl_support::is_mapped(path)
}

/// What a subscriber saw of one object name.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// Loaded: the bias, `ctor_ran` as it was then (if the object has
    /// one), the file, whether it was mapped.
    Loaded {
        base: u64,
        ctor_ran: Option<i32>,
        file: Option<FileId>,
        mapped: bool,
    },
    /// Unloaded: whether it was still mapped.
    Unloaded { mapped: bool },
}

/// Events by object name.
type Log = Arc<Mutex<HashMap<String, Vec<Seen>>>>;

/// Records the events of objects whose name is in `names` (with the
/// `ctor_ran` link-time address if it has one).
fn recorder(
    names: &[(PathBuf, Option<u64>)],
) -> (Log, impl Fn(LoaderEvent<'_>) + Send + Sync + 'static) {
    let log: Log = Arc::default();
    let names: Vec<(String, Option<u64>)> = names
        .iter()
        .map(|(p, v)| (p.to_str().unwrap().to_string(), *v))
        .collect();
    let l = Arc::clone(&log);
    let f = move |ev: LoaderEvent<'_>| {
        let o: &LoadedObject = match ev {
            LoaderEvent::Loaded(o) | LoaderEvent::Unloaded(o) => o,
        };
        let Some((_, ctor)) = names.iter().find(|(n, _)| *n == o.name) else {
            return;
        };
        let is_mapped = mapped(Path::new(&o.name));
        let seen = match ev {
            LoaderEvent::Loaded(o) => Seen::Loaded {
                base: o.base,
                // SAFETY: the object is mapped (the loader reports it
                // after mapping) and `ctor_ran` is an `int` in its data.
                ctor_ran: ctor
                    .map(|v| unsafe { std::ptr::read_volatile((o.base + v) as *const i32) }),
                file: o.file,
                mapped: is_mapped,
            },
            LoaderEvent::Unloaded(_) => Seen::Unloaded { mapped: is_mapped },
        };
        l.lock()
            .unwrap()
            .entry(o.name.clone())
            .or_default()
            .push(seen);
    };
    (log, f)
}

#[test]
fn a_library_is_reported_before_its_constructors_run_and_gone_before_dlclose_returns() {
    let _g = serial();
    let so = ctor_library("lwctor", 1);
    let ctor = symbol_vaddr(&so, "ctor_ran");
    let (log, f) = recorder(&[(so.clone(), Some(ctor))]);
    let _sub = watch().subscribe(f);
    assert!(!mapped(&so));
    let before = watch().stats();

    let h = open(&so);
    let events = log.lock().unwrap().get(so.to_str().unwrap()).cloned();
    let Some(events) = events else {
        panic!("no event for {so:?}");
    };
    let [Seen::Loaded {
        base,
        ctor_ran,
        file,
        mapped: was_mapped,
    }] = events[..]
    else {
        panic!("{events:?}");
    };
    // Mapped, its constructor not yet run; it has run when dlopen returns.
    assert!(was_mapped);
    assert_eq!(ctor_ran, Some(0), "the event came after the constructor");
    // SAFETY: the library is loaded; `ctor_ran` is an int in it.
    assert_eq!(unsafe { *((base + ctor) as *const i32) }, 1);
    assert_eq!(file, Some(file_id(&so)));
    // The list the watch keeps has it, with an executable segment holding `f`.
    let now = watch().objects();
    let o = now.iter().find(|o| o.name == so.to_str().unwrap()).unwrap();
    let fsym = symbol_vaddr(&so, "f");
    assert!(o
        .segments
        .iter()
        .any(|s| s.exec && s.vaddr.contains(&(base + fsym))));
    let maps = o.file_mappings();
    let m = maps
        .iter()
        .find(|m| m.vaddr.contains(&(base + fsym)))
        .unwrap();
    assert_eq!(m.file, file_id(&so));

    close(h);
    assert!(!mapped(&so));
    let events = log.lock().unwrap()[so.to_str().unwrap()].clone();
    assert_eq!(events.len(), 2, "{events:?}");
    // Unlisted only once unmapped, and reported before dlclose returned.
    assert_eq!(events[1], Seen::Unloaded { mapped: false });
    assert!(!watch()
        .objects()
        .iter()
        .any(|o| o.name == so.to_str().unwrap()));
    let after = watch().stats();
    assert!(after.hits >= before.hits + 4, "{before:?} {after:?}");
    assert!(after.loaded > before.loaded && after.unloaded > before.unloaded);
}

#[test]
fn a_new_subscriber_first_gets_the_current_list() {
    let _g = serial();
    let seen: Arc<Mutex<Vec<LoadedObject>>> = Arc::default();
    let s = Arc::clone(&seen);
    let sub = watch().subscribe(move |ev| {
        if let LoaderEvent::Loaded(o) = ev {
            s.lock().unwrap().push(o.clone());
        }
    });
    let replay = seen.lock().unwrap().clone();
    drop(sub);
    assert_eq!(replay, watch().objects());
    // The executable (empty name, holds this function), the C library with
    // its file, the loader itself.
    let here = a_new_subscriber_first_gets_the_current_list as fn() as usize as u64;
    assert!(replay.iter().any(|o| o.contains(here) && o.name.is_empty()));
    let libc_obj = replay
        .iter()
        .find(|o| o.name.contains("libc.so.6"))
        .unwrap();
    assert_eq!(libc_obj.file, Some(file_id(Path::new(&libc_obj.name))));
    let rv = watch().rendezvous();
    assert!(replay.iter().any(|o| o.contains(rv.r_brk)));
    // A dropped subscription hears nothing more.
    let so = ctor_library("lwquiet", 2);
    let n = seen.lock().unwrap().len();
    close(open(&so));
    assert_eq!(seen.lock().unwrap().len(), n);
}

#[test]
fn a_dependency_comes_and_goes_with_the_object_that_needs_it() {
    let _g = serial();
    let dep = build("lwdep", "int dep(int x) { return x * 3; }\n", &[]);
    let top = build(
        "lwtop",
        "int dep(int); int top(int x) { return dep(x) + 1; }\n",
        &[
            "-L",
            dir().to_str().unwrap(),
            "-llwdep",
            &format!("-Wl,-rpath,{}", dir().display()),
        ],
    );
    let (log, f) = recorder(&[(dep.clone(), None), (top.clone(), None)]);
    let _sub = watch().subscribe(f);
    let h = open(&top);
    close(h);
    let log = log.lock().unwrap();
    for so in [&dep, &top] {
        let ev = &log[so.to_str().unwrap()];
        assert!(
            matches!(
                ev[..],
                [
                    Seen::Loaded { mapped: true, .. },
                    Seen::Unloaded { mapped: false }
                ]
            ),
            "{so:?}: {ev:?}"
        );
    }
}

#[test]
fn load_and_unload_cycles_on_two_threads_are_each_reported_once_in_order() {
    let _g = serial();
    let libs = [ctor_library("lwcycle0", 10), ctor_library("lwcycle1", 20)];
    let ctors: Vec<u64> = libs.iter().map(|p| symbol_vaddr(p, "ctor_ran")).collect();
    let (log, f) = recorder(&[
        (libs[0].clone(), Some(ctors[0])),
        (libs[1].clone(), Some(ctors[1])),
    ]);
    let _sub = watch().subscribe(f);
    const ROUNDS: usize = 40;
    let calls = AtomicU64::new(0);
    std::thread::scope(|s| {
        for (i, so) in libs.iter().enumerate() {
            let calls = &calls;
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    let h = open(so);
                    // SAFETY: a live handle and a valid C string.
                    let p = unsafe { libc::dlsym(h.0, c"f".as_ptr()) };
                    assert!(!p.is_null());
                    // SAFETY: the fixture's `f` is `int f(int)`.
                    let fp: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(p) };
                    assert_eq!(fp(1), 1 + 10 * (i as i32 + 1));
                    calls.fetch_add(1, Ordering::Relaxed);
                    close(h);
                }
            });
        }
    });
    assert_eq!(calls.load(Ordering::Relaxed), 2 * ROUNDS as u64);
    let log = log.lock().unwrap();
    for so in &libs {
        let ev = &log[so.to_str().unwrap()];
        assert_eq!(ev.len(), 2 * ROUNDS, "{so:?}");
        for pair in ev.chunks(2) {
            assert!(
                matches!(
                    pair,
                    [
                        Seen::Loaded {
                            ctor_ran: Some(0),
                            mapped: true,
                            ..
                        },
                        Seen::Unloaded { mapped: false }
                    ]
                ),
                "{so:?}: {pair:?}"
            );
        }
    }
    // The watch's list is the loader's list.
    let names = |v: Vec<LoadedObject>| {
        let mut n: Vec<(u64, String)> = v.into_iter().map(|o| (o.base, o.name)).collect();
        n.sort();
        n
    };
    let mut fresh = Vec::new();
    let sub = watch().subscribe(|_| {});
    drop(sub);
    fresh.extend(watch().objects());
    assert!(!fresh
        .iter()
        .any(|o| libs.iter().any(|l| o.name == l.to_str().unwrap())));
    assert_eq!(names(fresh), names(watch().objects()));
}

#[test]
fn a_fork_child_hears_its_own_loads() {
    let _g = serial();
    let so = ctor_library("lwfork", 5);
    let ctor = symbol_vaddr(&so, "ctor_ran");
    let (log, f) = recorder(&[(so.clone(), Some(ctor))]);
    let _sub = watch().subscribe(f);
    // SAFETY: the child only dlopens, checks and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let h = open(&so);
        let ok = matches!(
            log.lock()
                .unwrap()
                .get(so.to_str().unwrap())
                .map(|v| &v[..]),
            Some([Seen::Loaded {
                ctor_ran: Some(0),
                ..
            }])
        );
        close(h);
        let ok = ok
            && matches!(
                log.lock().unwrap()[so.to_str().unwrap()][..],
                [Seen::Loaded { .. }, Seen::Unloaded { mapped: false }]
            );
        // SAFETY: ends the child without running the parent's exit hooks.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "the child missed its load");
    // The parent saw nothing of the child's loads.
    assert!(!log.lock().unwrap().contains_key(so.to_str().unwrap()));
}

/// The system call thread `tid` of this process is blocked in, if any.
fn blocked_in(tid: libc::pid_t) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Waits for child `pid` up to a minute (a hang detector, not a latency
/// bound: the child needs milliseconds); kills it and fails after that.
fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    for _ in 0..6000 {
        // SAFETY: polls our own child.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => std::thread::sleep(std::time::Duration::from_millis(10)),
            p if p == pid => return status,
            p => panic!("waitpid: {p}"),
        }
    }
    // SAFETY: our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    panic!("the child hung (the watch's lock was held across fork)");
}

#[test]
fn a_fork_while_another_thread_is_inside_a_subscriber_leaves_the_child_a_usable_watch() {
    let _g = serial();
    let slow = ctor_library("lwslow", 3);
    let later = ctor_library("lwlater", 4);
    // SAFETY: gettid has no preconditions.
    let main_tid = unsafe { libc::gettid() };
    let parent = std::process::id();
    let inside = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (i2, f2) = (Arc::clone(&inside), Arc::clone(&forked));
    let slow_name = slow.to_str().unwrap().to_string();
    let later_name = later.to_str().unwrap().to_string();
    let child_heard = Arc::new(AtomicU64::new(0));
    let heard = Arc::clone(&child_heard);
    let _sub = watch().subscribe(move |ev| match ev {
        // Holds the watch's lock until the fork is over, so the child is
        // born with it held by a thread it does not have. (If the forking
        // thread is seen blocked in a futex, a prepare handler is waiting
        // for this lock: let it have it rather than hang the parent.)
        // (In the child the change is reported again, as documented: the
        // thread that saw it did not publish it. Do not wait there.)
        LoaderEvent::Loaded(o) if o.name == slow_name && std::process::id() == parent => {
            i2.store(true, Ordering::SeqCst);
            while !f2.load(Ordering::SeqCst) && blocked_in(main_tid) != Some(libc::SYS_futex) {
                std::thread::yield_now();
            }
        }
        LoaderEvent::Loaded(o) if o.name == later_name => {
            heard.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    });
    let loader = std::thread::spawn(move || open(&slow));
    while !inside.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // SAFETY: the child only dlopens, checks and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let h = open(&later);
        let ok = child_heard.load(Ordering::SeqCst) == 1;
        close(h);
        // SAFETY: ends the child without running the parent's exit hooks.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    forked.store(true, Ordering::SeqCst);
    close(loader.join().unwrap());
    let status = wait_child(pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "the child missed its load");
}

extern "C" {
    fn dlmopen(
        lmid: libc::c_long,
        filename: *const libc::c_char,
        flags: libc::c_int,
    ) -> *mut libc::c_void;
}

/// `LM_ID_NEWLM` from `<dlfcn.h>`.
const LM_ID_NEWLM: libc::c_long = -1;

#[test]
fn an_object_loaded_into_another_namespace_is_not_reported_as_documented() {
    let _g = serial();
    // No C library dependency: a new namespace would load a second one.
    let so = build("lwns", "int g(int x) { return x + 7; }\n", &["-nostdlib"]);
    let (log, f) = recorder(&[(so.clone(), None)]);
    let _sub = watch().subscribe(f);
    let before = watch().stats();
    let c = CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    let h = unsafe { dlmopen(LM_ID_NEWLM, c.as_ptr(), libc::RTLD_NOW) };
    if h.is_null() {
        println!("SKIP: dlmopen(LM_ID_NEWLM) failed here; namespaces not checked");
        return;
    }
    let hits = watch().stats().hits - before.hits;
    close(Lib(h));
    // The loader announced the change (the rendezvous is shared by every
    // namespace), but `dl_iterate_phdr` lists the caller's namespace only:
    // the object is not reported (the module docs say so).
    assert!(hits >= 1, "no rendezvous hit for dlmopen");
    assert!(!log.lock().unwrap().contains_key(so.to_str().unwrap()));
    assert!(!watch()
        .objects()
        .iter()
        .any(|o| o.name == so.to_str().unwrap()));
}

#[test]
fn the_watch_is_the_loaded_list_a_target_resolver_searches_first() {
    use rcu_registry::probes::uprobe::{FoundBy, LibrarySearch, TargetResolver, UprobeTarget};
    let _g = serial();
    // A library only this process knows (not in any search path): found
    // by its file name because it is loaded, and only while it is.
    let so = ctor_library("lwresolve", 6);
    let name = format!("{}:f", so.file_name().unwrap().to_str().unwrap());
    let target = UprobeTarget::parse(&name).unwrap();
    let resolver = TargetResolver::with_search(LibrarySearch::nowhere()).with_loaded(watch());
    assert!(resolver.resolve(&target).is_err());
    let h = open(&so);
    let r = resolver.resolve(&target).unwrap();
    assert_eq!(r.found_by, FoundBy::Loaded);
    assert_eq!(r.path, so);
    assert_eq!(r.file, file_id(&so));
    // Its file offset is where the loader mapped `f`.
    // SAFETY: a live handle and a valid C string.
    let f = unsafe { libc::dlsym(h.0, c"f".as_ptr()) } as u64;
    let o = watch()
        .objects()
        .into_iter()
        .find(|o| o.name == so.to_str().unwrap())
        .unwrap();
    let m = o.file_mappings();
    let m = m.iter().find(|m| m.vaddr.contains(&f)).unwrap();
    assert_eq!(m.offset_of(f), Some(r.key().offset));
    close(h);
    assert!(resolver.resolve(&target).is_err());
}
