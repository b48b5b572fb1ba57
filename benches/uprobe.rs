//! Benchmark of the uprobe hit path against its peer in the same run:
//! `on_breakpoint` on an emulated `nop` (space → mapping → (file, offset) →
//! hit cache, or the uprobe tree when the uprobe has no slot → consumer
//! list, all lock-free in an `Srcu` read section, one counting handler,
//! the emulation) against the same work through a registry behind one
//! `RwLock` (the space's mappings and a `HashMap<(FileId, u64), _>` of
//! uprobes), at 1 and 2 threads, 1,000 uprobes in one file mapped by one
//! space. The same registry with its hit cache off (every hit walks the
//! uprobe tree) runs too, to show what the cache saves.
//!
//! A second group measures a uretprobe call: the entry hit on a function
//! whose consumer has a return handler (the hit, the return-address hijack,
//! the instance pushed on the thread's stack) plus the return through the
//! trampoline (instance popped, uprobe looked up again, return handler run,
//! real return address restored). Its peer does the same under the same
//! `RwLock` registry with the return instances in one
//! `Mutex<HashMap<(thread, space), Vec<_>>>`, the obvious way to keep them.
//!
//! The ratios are printed at the end. Run:
//! `cargo bench --bench uprobe -- --warm-up-time 1 --measurement-time 2`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[path = "common/samples.rs"]
mod samples;
use samples::{median_ns, on_threads, record};

use criterion::{BenchmarkId, Criterion};
use rcu_registry::probes::arch::{Arch, DataMemory, Insn, NoDataMemory, Regs, X86_64};
use rcu_registry::probes::kprobe::ThreadKey;
use rcu_registry::probes::outcome::ReturnOutcome;
use rcu_registry::probes::text::Image;
use rcu_registry::probes::uprobe::UprobeFinished;
use rcu_registry::probes::uprobe::{
    AddressSpace, Consumer, ConsumerAction, FileId, FileMapping, SpaceId, UprobeKey, UprobeOutcome,
    UprobeRegistry, DEFAULT_HIT_CACHE_SLOTS,
};
use rcu_registry::probes::xol::{XolAllocator, XolArena};
use rcu_registry::probes::ProbeError;
use rcu_registry::rcu::{Flavor, Rcu, Srcu};

const BASE: u64 = 0x40_0000;
const FILE: FileId = FileId { dev: 8, inode: 42 };
const UPROBES: usize = 1000;
/// Bytes between probed offsets (a `nop` at each, `nop`s between).
const SPACING: u64 = 16;
/// Offset stride between consecutive hits: coprime with the uprobe count,
/// so a thread visits every uprobe in a scattered order.
const HIT_STRIDE: usize = 389;
const SPACE: SpaceId = SpaceId(1);
/// The space's uretprobe trampoline.
const TRAMPOLINE: u64 = 0x7fff_1000_0000;
/// Where the simulated calls come from, and the stack pointer at entry.
const CALLER: u64 = 0x9000_0000;
const ENTRY_SP: u64 = 0x10_0000;

struct Space {
    text: Image,
    xol: XolArena,
}

impl AddressSpace for Space {
    type Text = Image;
    fn id(&self) -> SpaceId {
        SPACE
    }
    fn text(&self) -> &Image {
        &self.text
    }
    fn xol(&self) -> &dyn XolAllocator {
        &self.xol
    }
    fn mappings(&self) -> Vec<FileMapping> {
        vec![mapping()]
    }
    fn return_trampoline(&self) -> Option<u64> {
        Some(TRAMPOLINE)
    }
}

fn mapping() -> FileMapping {
    FileMapping {
        vaddr: BASE..BASE + UPROBES as u64 * SPACING,
        file: FILE,
        file_offset: 0,
    }
}

fn offset(i: usize) -> u64 {
    i as u64 * SPACING
}

/// One thread's stack: the return address word at [`ENTRY_SP`].
struct Slot(u64);

impl DataMemory for Slot {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        if addr != ENTRY_SP || buf.len() != 8 {
            return NoDataMemory.read(addr, buf);
        }
        buf.copy_from_slice(&self.0.to_le_bytes());
        Ok(())
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        if addr != ENTRY_SP || bytes.len() != 8 {
            return NoDataMemory.write(addr, bytes);
        }
        self.0 = u64::from_le_bytes(bytes.try_into().unwrap());
        Ok(())
    }
}

type Reg<F = Srcu> = UprobeRegistry<X86_64, Space, F>;

fn registry<F: Flavor>(domain: F) -> Reg<F> {
    registry_with(domain, DEFAULT_HIT_CACHE_SLOTS, |_| {
        Consumer::new(|_, regs| {
            black_box(regs.ip);
            ConsumerAction::Continue
        })
    })
}

/// A registry whose every uprobe is a function entry with a consumer that
/// has only a return handler.
fn ret_registry() -> Reg {
    registry_with(Srcu::new(), DEFAULT_HIT_CACHE_SLOTS, |_| {
        Consumer::builder()
            .ret_handler(|r, _| {
                black_box(r.retval);
            })
            .build()
    })
}

/// A plain registry whose hits all walk the uprobe tree.
fn tree_only_registry() -> Reg {
    registry_with(Srcu::new(), 0, |_| {
        Consumer::new(|_, regs| {
            black_box(regs.ip);
            ConsumerAction::Continue
        })
    })
}

fn registry_with<F: Flavor>(
    domain: F,
    cache_slots: usize,
    consumer: impl Fn(usize) -> Consumer,
) -> Reg<F> {
    let reg = Reg::with_domain(X86_64, domain).with_hit_cache_slots(cache_slots);
    let space = Arc::new(Space {
        text: Image::new(BASE, vec![0x90; UPROBES * SPACING as usize]),
        xol: XolArena::new(0x7fff_0000_0000, 4, X86_64::XOL_SLOT_SIZE),
    });
    reg.on_mmap(&space, mapping()).unwrap();
    for i in 0..UPROBES {
        // One consumer per uprobe, as the peer has one handler per uprobe
        // (a shared consumer's hit counter would bounce between threads).
        let c = consumer(i);
        // Every offset is named its own function's entry (return handlers
        // need one; for the plain consumers it only adds a trivial
        // boundary check at registration).
        reg.register_in_function(
            UprobeKey {
                file: FILE,
                offset: offset(i),
            },
            offset(i),
            &c,
        )
        .unwrap();
    }
    reg
}

/// A peer consumer's handler.
type PeerHandler = Box<dyn Fn(&mut Regs) + Send + Sync>;

/// The peer: one reader-writer lock over the mappings and the uprobes.
struct PeerUprobe {
    insn: Insn,
    hits: AtomicU64,
    consumers: Vec<PeerHandler>,
}

struct Peer {
    maps: HashMap<SpaceId, Vec<FileMapping>>,
    uprobes: HashMap<(FileId, u64), Arc<PeerUprobe>>,
}

fn peer() -> RwLock<Peer> {
    let mut uprobes = HashMap::new();
    for i in 0..UPROBES {
        let vaddr = BASE + offset(i);
        let insn = X86_64.analyze(vaddr, &[0x90]).unwrap();
        let handler: PeerHandler = Box::new(|regs| {
            black_box(regs.ip);
        });
        uprobes.insert(
            (FILE, offset(i)),
            Arc::new(PeerUprobe {
                insn,
                hits: AtomicU64::new(0),
                consumers: vec![handler],
            }),
        );
    }
    RwLock::new(Peer {
        maps: HashMap::from([(SPACE, vec![mapping()])]),
        uprobes,
    })
}

fn peer_hit(
    peer: &RwLock<Peer>,
    space: SpaceId,
    regs: &mut Regs,
    mem: &mut dyn DataMemory,
) -> bool {
    let vaddr = X86_64.trap_address(regs);
    let p = peer.read().unwrap();
    let Some(maps) = p.maps.get(&space) else {
        return false;
    };
    let Some((file, off)) = maps
        .iter()
        .find_map(|m| m.offset_of(vaddr).map(|o| (m.file, o)))
    else {
        return false;
    };
    let Some(u) = p.uprobes.get(&(file, off)) else {
        return false;
    };
    regs.ip = vaddr;
    u.hits.fetch_add(1, Ordering::Relaxed);
    for c in &u.consumers {
        c(regs);
    }
    X86_64.emulate(&u.insn, regs, mem).unwrap();
    true
}

/// One hit through a registry under test.
type HitFn<'a> = dyn Fn(&mut Regs) + Sync + 'a;

fn bench_hit(c: &mut Criterion) {
    let reg = registry(Srcu::new());
    let reg_rcu = registry(Rcu::new());
    let reg_tree = tree_only_registry();
    let peer = peer();
    let mut g = c.benchmark_group("uprobe_hit_lookup");
    for threads in [1usize, 2] {
        let contenders: [(&str, &str, &HitFn); 4] = [
            ("srcu_seqtree", "tree", &|regs| {
                let out = reg.on_breakpoint(SPACE, regs, &mut NoDataMemory);
                assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Emulated)));
            }),
            // The same registry in an `Rcu` domain (handlers may not sleep):
            // shows what the sleepable read section costs.
            ("rcu_seqtree", "tree_rcu", &|regs| {
                let out = reg_rcu.on_breakpoint(SPACE, regs, &mut NoDataMemory);
                assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Emulated)));
            }),
            // The same registry without its hit cache: every hit walks the
            // 1,000-entry uprobe tree (what the cache saves).
            ("srcu_seqtree_no_cache", "tree_walk", &|regs| {
                let out = reg_tree.on_breakpoint(SPACE, regs, &mut NoDataMemory);
                assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Emulated)));
            }),
            ("rwlock_hashmap", "rwlock", &|regs| {
                assert!(peer_hit(&peer, SPACE, regs, &mut NoDataMemory));
            }),
        ];
        for (name, short, hit) in contenders {
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| {
                    let elapsed = on_threads(threads, iters, false, |t, n| {
                        let mut k = t * 7;
                        for _ in 0..n {
                            k = (k + HIT_STRIDE) % UPROBES;
                            let mut regs = Regs {
                                ip: BASE + offset(k) + 1,
                                ..Regs::default()
                            };
                            hit(&mut regs);
                            black_box(regs.ip);
                        }
                    });
                    record(&format!("hit/{short}/{threads}"), elapsed, iters)
                })
            });
        }
    }
    g.finish();
}

/// The peer's return instances: one lock over every thread's stacks.
#[derive(Clone, Copy)]
struct PeerInst {
    key: (FileId, u64),
    ret_sp: u64,
    real_ret: u64,
}

type PeerStacks = Mutex<HashMap<(ThreadKey, SpaceId), Vec<PeerInst>>>;

/// The peer's uretprobe entry: lookup under the read lock, hijack, push
/// the instance under the instances lock, emulate.
fn peer_entry(peer: &RwLock<Peer>, stacks: &PeerStacks, regs: &mut Regs, mem: &mut Slot) {
    let vaddr = X86_64.trap_address(regs);
    let p = peer.read().unwrap();
    let maps = &p.maps[&SPACE];
    let (file, off) = maps
        .iter()
        .find_map(|m| m.offset_of(vaddr).map(|o| (m.file, o)))
        .unwrap();
    let u = &p.uprobes[&(file, off)];
    regs.ip = vaddr;
    u.hits.fetch_add(1, Ordering::Relaxed);
    let ret_sp = X86_64.stack_pointer_at_return(regs);
    let real_ret = X86_64.hijack_return(regs, mem, TRAMPOLINE).unwrap();
    stacks
        .lock()
        .unwrap()
        .entry((ThreadKey::current(), SPACE))
        .or_default()
        .push(PeerInst {
            key: (file, off),
            ret_sp,
            real_ret,
        });
    X86_64.emulate(&u.insn, regs, mem).unwrap();
}

/// The peer's return: pop under the instances lock, run the return
/// handlers under the read lock, restore the real return address.
fn peer_return(peer: &RwLock<Peer>, stacks: &PeerStacks, regs: &mut Regs) -> u64 {
    let inst = {
        let mut s = stacks.lock().unwrap();
        let v = s.get_mut(&(ThreadKey::current(), SPACE)).unwrap();
        assert_eq!(v.last().unwrap().ret_sp, regs.sp);
        v.pop().unwrap()
    };
    let retval = X86_64.return_value(regs);
    let p = peer.read().unwrap();
    if let Some(u) = p.uprobes.get(&inst.key) {
        for c in &u.consumers {
            black_box(retval);
            c(regs);
        }
    }
    regs.ip = inst.real_ret;
    inst.real_ret
}

/// One call through a registry under test: the entry trap at `func`, then
/// the return into the trampoline.
type CallFn<'a> = dyn Fn(u64, &mut Slot) + Sync + 'a;

fn bench_ret(c: &mut Criterion) {
    let reg = ret_registry();
    let peer = peer();
    let stacks: PeerStacks = Mutex::new(HashMap::new());
    let mut g = c.benchmark_group("uretprobe_entry_return");
    for threads in [1usize, 2] {
        let contenders: [(&str, &str, &CallFn); 2] = [
            ("srcu_seqtree_thread_stack", "tree", &|func, stack| {
                let mut regs = Regs {
                    ip: func + 1,
                    sp: ENTRY_SP,
                    ..Regs::default()
                };
                let out = reg.on_breakpoint(SPACE, &mut regs, stack);
                assert!(matches!(out, UprobeOutcome::Done(UprobeFinished::Emulated)));
                assert_eq!(stack.0, TRAMPOLINE);
                let mut at_ret = Regs {
                    ip: TRAMPOLINE,
                    sp: ENTRY_SP + 8,
                    ..Regs::default()
                };
                let out = reg.on_return(SPACE, &mut at_ret);
                assert_eq!(out, ReturnOutcome::Returned { to: CALLER });
            }),
            ("rwlock_hashmap_mutex_stacks", "rwlock", &|func, stack| {
                let mut regs = Regs {
                    ip: func + 1,
                    sp: ENTRY_SP,
                    ..Regs::default()
                };
                peer_entry(&peer, &stacks, &mut regs, stack);
                assert_eq!(stack.0, TRAMPOLINE);
                let mut at_ret = Regs {
                    ip: TRAMPOLINE,
                    sp: ENTRY_SP + 8,
                    ..Regs::default()
                };
                assert_eq!(peer_return(&peer, &stacks, &mut at_ret), CALLER);
            }),
        ];
        for (name, short, call) in contenders {
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| {
                    let elapsed = on_threads(threads, iters, false, |t, n| {
                        let mut k = t * 7;
                        let mut stack = Slot(0);
                        for _ in 0..n {
                            k = (k + HIT_STRIDE) % UPROBES;
                            stack.0 = CALLER;
                            call(BASE + offset(k), &mut stack);
                        }
                    });
                    record(&format!("ret/{short}/{threads}"), elapsed, iters)
                })
            });
        }
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_hit(&mut c);
    bench_ret(&mut c);
    c.final_summary();
    println!("\nuprobe ratios (median wall time per iteration; >1 = ours faster):");
    for t in [1, 2] {
        ratio(
            "hit path, rwlock+hashmap / srcu+seqtree",
            "hit/rwlock",
            "hit/tree",
            t,
        );
        ratio(
            "hit path, rwlock+hashmap / rcu+seqtree (same registry, Rcu domain)",
            "hit/rwlock",
            "hit/tree_rcu",
            t,
        );
        ratio(
            "hit path, rwlock+hashmap / srcu+seqtree without the hit cache",
            "hit/rwlock",
            "hit/tree_walk",
            t,
        );
        ratio(
            "hit path, srcu+seqtree without / with the hit cache (>1 = the cache's gain)",
            "hit/tree_walk",
            "hit/tree",
            t,
        );
    }
    for t in [1, 2] {
        ratio(
            "uretprobe entry+return, rwlock+hashmap+mutex / srcu+seqtree+thread stack",
            "ret/rwlock",
            "ret/tree",
            t,
        );
        ratio(
            "uretprobe entry+return / plain uprobe hit (ours, >1 = the return's cost)",
            "ret/tree",
            "hit/tree",
            t,
        );
    }
}

/// Prints `num / den` of the medians recorded as `{num}/{threads}` and
/// `{den}/{threads}`.
fn ratio(label: &str, num: &str, den: &str, threads: usize) {
    match (
        median_ns(&format!("{num}/{threads}")),
        median_ns(&format!("{den}/{threads}")),
    ) {
        (Some(n), Some(d)) => println!(
            "  {label}, {threads} thread(s): {:.2}x ({n:.1} ns vs {d:.1} ns)",
            n / d
        ),
        _ => println!("  {label}, {threads} thread(s): not measured"),
    }
}
