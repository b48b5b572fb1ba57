//! The live runtime refuses to probe its own trap path: every function the
//! SIGTRAP handler, the kretprobe trampoline and their dyn-call targets can
//! reach through direct calls before the thread's trap flag is up (or on
//! the missed path, with it up), whoever defines it (this crate, `core`,
//! `std`). That path calls no C-library function at all, so the C library
//! stays probeable: the set of exported library functions refused is
//! checked to be exactly what is listed (the unwinder's resume) and printed
//! with its size before issue 11's change.
//!
//! The reachable set is computed here by a walk independent of the
//! runtime's own (`callgraph.rs`): a linear sweep of each function's ELF
//! extent, following direct `call`/`jmp`/`jcc` targets outside it and calls
//! through read-only pointer slots (the GOT), from roots found through
//! public means (the handler from `sigaction`, the trampoline's address,
//! the trait methods by path). It is simpler than the runtime's walk (only
//! code with a symbol; a stripped C library's internals are not checked
//! here), so it checks the runtime's set from below: every function it finds
//! must be refused. Then every one of them is offered to the live registry
//! at its entry, and must come back `RefusedTarget` with its bytes
//! unchanged.

mod runtime_support;

use std::collections::{BTreeMap, HashSet};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, OpKind};
use rcu_registry::__internals::runtime::callgraph::{
    dying_path, flag_up, settled_tls, DYNAMIC_TLS_ACCESS, FLAG_UP_ENTRIES,
};
use rcu_registry::__internals::runtime::refuse;
use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::symbols::{Function, ProcessSymbols};
use rcu_registry::probes::runtime::{trampoline_address, Live};
use rcu_registry::probes::runtime::{InProcess, RefusedRange};
use rcu_registry::probes::ProbeError;
use runtime_support::*;

/// The SIGTRAP handler as the kernel knows it.
fn installed_handler() -> u64 {
    // SAFETY: all-zero is a valid sigaction; a null new action only reads.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    assert_eq!(
        unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) },
        0
    );
    cur.sa_sigaction as u64
}

/// The trap path's entry points: the handler the kernel has installed and
/// the trampoline, found without the runtime's help, and the targets of the
/// handler's two `dyn` calls made before the re-entrancy flag, from the
/// runtime's root list. Their addresses must come from the library itself:
/// a small method whose address is taken here may get a second, local copy
/// in this test crate, which the trap path never runs. The list is checked
/// by name.
fn roots(symbols: &ProcessSymbols) -> Vec<u64> {
    let listed = refuse::trap_path_roots();
    let name = |a: u64| {
        symbols
            .function_at(a)
            .map(|f| f.name.clone())
            .unwrap_or_default()
    };
    let names: Vec<String> = listed.iter().map(|r| name(r.addr)).collect();
    for wanted in [
        "TrapDispatcher for rcu_registry::probes::kprobe::registry::KprobeRegistry<A,T>>::on_breakpoint",
        "TrapDispatcher for rcu_registry::probes::kprobe::registry::KprobeRegistry<A,T>>::on_step",
        "<rcu_registry::probes::runtime::context::ThreadMemory as rcu_registry::probes::arch::DataMemory>::read",
        "<rcu_registry::probes::runtime::context::ThreadMemory as rcu_registry::probes::arch::DataMemory>::write",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(wanted)),
            "no root named ...{wanted}: {names:#?}"
        );
    }
    let mut roots = vec![installed_handler(), trampoline_address()];
    roots.extend(listed.iter().map(|r| r.addr));
    roots
}

/// The pointer in a read-only slot (a GOT entry after RELRO), if `slot` is
/// one.
fn constant_slot(slot: u64) -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let perms = maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next()?, f.next()?);
        let (s, e) = range.split_once('-')?;
        let (s, e) = (
            u64::from_str_radix(s, 16).ok()?,
            u64::from_str_radix(e, 16).ok()?,
        );
        (s..e).contains(&slot).then(|| perms.to_string())
    })?;
    if !perms.starts_with("r-") {
        return None;
    }
    Some(u64::from_le_bytes(code(slot, 8).try_into().unwrap()))
}

/// Every function with a symbol reachable from `roots` by direct calls and
/// jumps (and calls through read-only slots), each with the function that
/// first reached it. Functions on a dying path, the runtime's flag-up
/// entries (code that runs only with the thread's trap flag up) and the
/// standard access of thread-locals settled in static TLS are included
/// but not walked into (the runtime's documented policy). Targets without a symbol
/// (an IFUNC's selected implementation in a stripped C library) are
/// collected in `unnamed` with the function that calls them, not walked.
fn reachable_with_unnamed(
    symbols: &ProcessSymbols,
    roots: &[u64],
    unnamed: &mut BTreeMap<u64, u64>,
) -> BTreeMap<u64, (Function, Option<u64>)> {
    walk_from(symbols, roots, unnamed, true)
}

/// The walk of [`reachable_with_unnamed`]; `stop` false walks into dying
/// paths and flag-up entries too.
fn walk_from(
    symbols: &ProcessSymbols,
    roots: &[u64],
    unnamed: &mut BTreeMap<u64, u64>,
    stop: bool,
) -> BTreeMap<u64, (Function, Option<u64>)> {
    let mut found: BTreeMap<u64, (Function, Option<u64>)> = BTreeMap::new();
    let mut work: Vec<(u64, Option<u64>)> = roots.iter().map(|&r| (r, None)).collect();
    let mut slots: HashSet<u64> = HashSet::new();
    while let Some((addr, from)) = work.pop() {
        let Some(f) = symbols.function_at(addr) else {
            if let Some(from) = from {
                unnamed.entry(addr).or_insert(from);
            }
            continue;
        };
        if found.contains_key(&f.start) {
            continue;
        }
        found.insert(f.start, (f.clone(), from));
        if stop
            && (dying_path(&f.name).is_some()
                || flag_up(&f.name).is_some()
                || settled_tls(&f.name).is_some())
        {
            continue;
        }
        let (start, end) = (f.start, f.start + f.size);
        let bytes = code(start, f.size as usize);
        let mut decoder = Decoder::with_ip(64, &bytes, start, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut insn);
            let target = match insn.flow_control() {
                FlowControl::Call
                | FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch
                    if insn.op0_kind() == OpKind::NearBranch64 =>
                {
                    Some(insn.near_branch_target())
                }
                FlowControl::IndirectCall | FlowControl::IndirectBranch
                    if insn.op0_kind() == OpKind::Memory && insn.is_ip_rel_memory_operand() =>
                {
                    let slot = insn.ip_rel_memory_address();
                    if slots.insert(slot) {
                        constant_slot(slot)
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let Some(t) = target.filter(|t| !(start..end).contains(t)) {
                work.push((t, Some(start)));
            }
        }
    }
    found
}

/// [`reachable_with_unnamed`], functions with a symbol only.
fn reachable(symbols: &ProcessSymbols, roots: &[u64]) -> BTreeMap<u64, (Function, Option<u64>)> {
    reachable_with_unnamed(symbols, roots, &mut BTreeMap::new())
}

fn name_at(found: &BTreeMap<u64, (Function, Option<u64>)>, at: u64) -> String {
    found
        .get(&at)
        .map_or_else(|| format!("{at:#x}"), |(f, _)| f.name.clone())
}

/// How the trap path reaches `at`, outermost last.
fn chain(found: &BTreeMap<u64, (Function, Option<u64>)>, mut at: u64) -> String {
    let mut names = vec![name_at(found, at)];
    while let Some((_, Some(from))) = found.get(&at) {
        if names.len() > 40 {
            break;
        }
        at = *from;
        names.push(name_at(found, at));
    }
    names.join(" <- ")
}

#[test]
fn every_function_the_trap_path_reaches_is_refused_at_its_entry_and_left_unchanged() {
    let _g = serial();
    let live = Live::global();
    let reg = live.registry();
    let found = reachable(live.symbols(), &roots(live.symbols()));
    let outside: Vec<&Function> = found
        .values()
        .map(|(f, _)| f)
        .filter(|f| !f.name.contains("rcu_registry::"))
        .collect();
    println!(
        "independent walk: {} functions reachable, {} outside this crate",
        found.len(),
        outside.len()
    );
    for f in outside.iter().take(12) {
        println!("  e.g. {}", chain(&found, f.start));
    }
    // The walk found the C library calls the trap path makes (getpid,
    // process_vm_readv, syscall...) and, in debug builds, core/std generics:
    // the hand-named set of old missed the latter.
    assert!(
        !outside.is_empty(),
        "the trap path calls code outside this crate; a walk that finds none is broken"
    );

    let graph = refuse::trap_path(live.symbols());
    let mut by_error: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (f, _) in found.values() {
        assert!(
            graph.function_at(f.start).is_some(),
            "the runtime's walk missed {}",
            chain(&found, f.start)
        );
        assert!(
            reg.text().refused_at(f.start, 1).is_some(),
            "{} is not refused",
            chain(&found, f.start)
        );
        let before = code(f.start, f.size.min(32) as usize);
        let p = Kprobe::at(f.start).build();
        match reg.register(&p) {
            Err(ProbeError::RefusedTarget { addr, what }) => {
                assert_eq!(addr, f.start);
                *by_error.entry(what).or_default() += 1;
            }
            Ok(()) => {
                reg.unregister(&p).unwrap();
                panic!("probing {} was accepted", chain(&found, f.start));
            }
            Err(e) => panic!(
                "probing {} gave {e:?}, not RefusedTarget",
                chain(&found, f.start)
            ),
        }
        assert_eq!(code(f.start, f.size.min(32) as usize), before, "{}", f.name);
        assert!(!p.is_registered());
    }
    reg.commit();
    println!("refused by reason: {by_error:#?}");
    assert_eq!(reg.len(), 0);
}

#[test]
fn the_walk_finds_reachable_code_the_crate_name_rule_alone_would_let_through() {
    let _g = serial();
    let live = Live::global();
    let found = reachable(live.symbols(), &roots(live.symbols()));
    // What a name rule refuses: this crate's functions, and the trampoline
    // by address.
    let trampoline = live
        .symbols()
        .function_at(trampoline_address())
        .expect("the trampoline has a sized symbol");
    let by_name = InProcess::default().refuse_all(
        live.symbols()
            .functions()
            .iter()
            .filter(|f| f.name.contains("rcu_registry::") || f.start == trampoline.start)
            .map(|f| RefusedRange {
                start: f.start,
                end: f.start + f.size,
                what: refuse::RUNTIME_CODE,
            }),
    );
    let missed: Vec<&Function> = found
        .values()
        .map(|(f, _)| f)
        .filter(|f| by_name.refused_at(f.start, 1).is_none())
        .collect();
    assert!(
        !missed.is_empty(),
        "every reachable function is named after this crate: the walk proves nothing here"
    );
    for f in &missed {
        let r = live
            .registry()
            .text()
            .refused_at(f.start, 1)
            .unwrap_or_else(|| panic!("{} is reachable but not refused", f.name));
        assert!(
            r.what == refuse::TRAP_PATH_CALLEE || r.what == refuse::DYING_PATH,
            "{}: {}",
            f.name,
            r.what
        );
    }
    println!(
        "{} reachable functions outside the crate-name rule, all refused by the walk; e.g. {:?}",
        missed.len(),
        missed.iter().take(8).map(|f| &f.name).collect::<Vec<_>>()
    );
}

#[test]
fn code_without_a_symbol_that_the_trap_path_calls_is_refused_too() {
    let live = Live::global();
    let mut unnamed = BTreeMap::new();
    let found = reachable_with_unnamed(live.symbols(), &roots(live.symbols()), &mut unnamed);
    let graph = refuse::trap_path(live.symbols());
    for (&at, &from) in &unnamed {
        let how = chain(&found, from);
        assert!(
            graph.function_at(at).is_some(),
            "the runtime's walk missed {at:#x} <- {how}"
        );
        assert!(
            live.registry().text().refused_at(at, 1).is_some(),
            "{at:#x} <- {how} is not refused"
        );
    }
    println!(
        "{} entry points without a symbol (IFUNC implementations, C library internals) refused",
        unnamed.len()
    );
}

/// Exported library functions (outside the executable) among `addrs`, by
/// name, sorted.
fn library_functions(live: &Live, addrs: impl Iterator<Item = u64>) -> Vec<String> {
    let exe = &live.symbols().objects()[0].0;
    let mut libs: Vec<String> = addrs
        .filter_map(|a| live.symbols().function_at(a))
        .filter(|f| &f.object != exe)
        .map(|f| f.name.clone())
        .collect();
    libs.sort_unstable();
    libs.dedup();
    libs
}

/// How many exported library functions the runtime refused as "code the
/// trap path calls" before the trap path was made C-library free (issue
/// 11, debug build: `free`, `calloc`, `mmap`, `clock_gettime`, `strlen`,
/// `getpid`, `syscall`...).
const LIBRARY_FUNCTIONS_REFUSED_BEFORE: usize = 53;

/// What remains refused outside the executable, and why: the unwinder's
/// `_Unwind_Resume` (libgcc, not the C library), which landing pads call
/// while a panic unwinds. The trap path's functions have landing pads (to
/// drop a step token, a read guard); a panic there ends the process (the
/// handler is `extern "C"`), so it is a dying path: refused at its entry,
/// not walked.
const STILL_REFUSED: [&str; 1] = ["_Unwind_Resume"];

#[test]
fn the_runtime_reports_what_its_walk_cost() {
    let live = Live::global();
    let graph = refuse::trap_path(live.symbols());
    let s = graph.stats();
    println!("trap path walk: {s:#?}");
    let libs = library_functions(live, graph.reached().iter().map(|r| r.start));
    println!(
        "exported library functions refused: {} (before the trap path was made C-library \
         free: {LIBRARY_FUNCTIONS_REFUSED_BEFORE}): {libs:?}",
        libs.len()
    );
    let mut callers: Vec<String> = graph
        .indirect_calls()
        .iter()
        .map(|&site| {
            live.symbols()
                .function_at(site)
                .map_or_else(|| "(no symbol)".to_string(), |f| f.name.clone())
        })
        .collect();
    callers.dedup();
    println!("indirect calls the walk stops at, by function: {callers:#?}");
    assert_eq!(s.truncated, 0, "a descent ran away: {s:?}");
    assert!(s.symbols > 0 && s.instructions > 0 && s.bytes > 0);
    assert_eq!(
        s.symbols + s.anonymous,
        graph.reached().len(),
        "every reached piece of code is counted once"
    );
    // The trap path calls no C-library function: nothing in the C library
    // is refused, and outside the executable only the listed dying entry.
    for name in &libs {
        let f = live.symbols().function(name).expect("a refused function");
        assert!(
            STILL_REFUSED.contains(&name.as_str()),
            "{name} ({}) is refused as trap-path code: {}",
            f.object,
            graph
                .path_to(f.start)
                .iter()
                .map(|&(_, s)| live
                    .symbols()
                    .function_at(s)
                    .map_or_else(|| format!("{s:#x}"), |f| f.name.clone()))
                .collect::<Vec<_>>()
                .join(" <- ")
        );
        let r = graph.function_at(f.start).unwrap();
        assert!(r.stopped.is_some(), "{name} is walked into");
    }
    // Descents into code without a symbol stay out of the C library (a PLT
    // stub of the executable at most), but for the signal return
    // trampoline, a root.
    let exe = &live.symbols().objects()[0].0;
    let restorer: Vec<u64> = refuse::trap_path_roots()
        .iter()
        .filter(|r| r.what == refuse::SIGNAL_RETURN)
        .map(|r| r.addr)
        .collect();
    for r in graph
        .reached()
        .iter()
        .filter(|r| r.name.is_none() && !restorer.contains(&r.start))
    {
        let obj = live
            .symbols()
            .objects()
            .iter()
            .filter(|(_, bias)| *bias <= r.start)
            .max_by_key(|(_, bias)| *bias)
            .map(|(p, _)| p.clone());
        assert_eq!(obj.as_ref(), Some(exe), "a descent at {:#x}", r.start);
    }
}

#[test]
fn the_flag_up_entries_are_where_the_c_library_calls_are() {
    let live = Live::global();
    let graph = refuse::trap_path(live.symbols());
    let entries: Vec<u64> = graph
        .reached()
        .iter()
        .filter(|r| r.name.as_deref().is_some_and(|n| flag_up(n).is_some()))
        .map(|r| r.start)
        .collect();
    assert_eq!(
        entries.len(),
        FLAG_UP_ENTRIES.len(),
        "every flag-up entry is on the trap path (renamed or inlined?)"
    );
    // Walked into, the flag-up code reaches the C library: that is what the
    // boundary keeps off the trap path.
    let past = walk_from(live.symbols(), &entries, &mut BTreeMap::new(), false);
    let libs = library_functions(live, past.keys().copied());
    println!(
        "past the trap flag the runtime reaches {} exported library functions \
         (probeable now: a hit there is a nested trap, counted missed): {libs:?}",
        libs.len()
    );
    for wanted in ["__errno_location", "pthread_setspecific"] {
        assert!(libs.iter().any(|l| l == wanted), "{wanted} not in {libs:?}");
        let f = live.symbols().function(wanted).unwrap();
        assert!(
            live.registry().text().refused_at(f.start, 1).is_none(),
            "{wanted} is still refused"
        );
    }
}

#[inline(never)]
fn ordinary_function(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(7) ^ 3
}

#[test]
fn ordinary_functions_are_still_accepted_and_probed() {
    let _g = serial();
    let live = Live::global();
    let reg = live.registry();
    let graph = refuse::trap_path(live.symbols());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for at in [
        addr(rtp_add1),
        ordinary_function as *const () as usize as u64,
    ] {
        assert!(graph.function_at(at).is_none());
        assert!(reg.text().refused_at(at, 1).is_none());
        let h = std::sync::Arc::clone(&hits);
        let p = Kprobe::at(at)
            .pre(move |_p, _regs| {
                h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Action::Continue
            })
            .build();
        reg.register(&p).unwrap();
        let f = std::hint::black_box(rtp_add1 as Func);
        // SAFETY: rtp_add1 is a complete C-ABI function.
        assert_eq!(unsafe { f(41) }, 42);
        assert_eq!(ordinary_function(6), (6 * 7) ^ 3);
        assert_eq!(p.hits(), 1);
        reg.unregister(&p).unwrap();
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn the_thread_locals_are_settled_and_their_standard_access_is_refused_but_not_walked_into() {
    let _g = serial();
    let live = Live::global();
    // An executable's thread-locals are in static TLS: proven at the
    // runtime's start, every one settled.
    assert!(
        settled_tls(DYNAMIC_TLS_ACCESS).is_some(),
        "the thread-locals were not settled"
    );
    let graph = refuse::trap_path(live.symbols());
    let stops: Vec<_> = graph
        .reached()
        .iter()
        .filter(|r| r.name.as_deref() == Some(DYNAMIC_TLS_ACCESS))
        .collect();
    // Reached (the out-of-line fallback of `with`), never walked into, and
    // refused as this crate's code.
    assert!(!stops.is_empty(), "the walk never met {DYNAMIC_TLS_ACCESS}");
    for r in &stops {
        assert!(r.stopped.is_some(), "{r:?}");
        assert!(live.registry().text().refused_at(r.start, 1).is_some());
    }
    // The trap path's roots do not include the loader's thread-local
    // access here (it is needed only where the proof fails in a shared
    // object).
    assert!(refuse::trap_path_roots()
        .iter()
        .all(|r| r.what != refuse::LOADER_TLS_ACCESS));
}
