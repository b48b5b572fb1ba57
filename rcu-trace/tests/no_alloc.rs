//! The hit path allocates nothing: the recorder's entry and return, as an
//! engine calls them at each hit (counts, the latency pairing and
//! histogram, and the Chrome trace's buffered writes), run under a counting
//! global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use rcu_registry::probes::uprobe::{FileId, UprobeKey};
use rcu_trace::record::{Options, Recorder, Thread};
use rcu_trace::resolve::{Plan, Probe};
use rcu_trace::spec::{Kind, Spec};

thread_local! {
    /// Allocations made by this thread while counting.
    static COUNTING: Cell<Option<u64>> = const { Cell::new(None) };
}

struct Counting;

// SAFETY: every call goes to the system allocator unchanged; the counter
// is a thread-local cell touched without allocating.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        COUNTING.with(|c| c.set(c.get().map(|n| n + 1)));
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: a pointer this allocator (the system's) gave.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        COUNTING.with(|c| c.set(c.get().map(|k| k + 1)));
        // SAFETY: as `dealloc` and `alloc`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    COUNTING.with(|c| c.set(Some(0)));
    f();
    COUNTING.with(|c| c.replace(None)).unwrap()
}

fn plan() -> Plan {
    let key = |offset| UprobeKey {
        file: FileId { dev: 1, inode: 2 },
        offset,
    };
    let probe = |spec, kind, label: &str, offset| Probe {
        spec,
        kind,
        label: label.to_string(),
        function: Some("f".into()),
        path: PathBuf::from("/x"),
        offset,
        keys: vec![(key(offset), Some(offset))],
    };
    Plan {
        specs: vec![
            Spec::parse("uprobe:/x:f").unwrap(),
            Spec::parse("uretprobe:/x:g").unwrap(),
        ],
        probes: vec![
            probe(0, Kind::Entry, "uprobe:/x:f", 0x10),
            probe(1, Kind::Return, "uretprobe:/x:g", 0x20),
        ],
    }
}

#[test]
fn counting_pairing_and_the_chrome_trace_allocate_nothing_per_hit() {
    let trace = std::env::temp_dir().join(format!("rcu-trace-no-alloc-{}", std::process::id()));
    let rec = Recorder::new(
        &plan(),
        Options::default(),
        Some(std::fs::File::create(&trace).unwrap()),
    )
    .unwrap();
    let who = Thread { pid: 7, tid: 8 };
    let args = [1, 2, 3, 4, 5, 6];
    // Warm: the first calls may set up thread-locals (the clock).
    rec.entry(0, 1, who, 0x7000, &args);
    let n = allocations(|| {
        for i in 0..20_000u64 {
            let sp = 0x7ffd_0000_0000 - (i % 64) * 0x40;
            rec.entry(0, 1, who, sp, &args);
            rec.entry(1, 1, who, sp, &args);
            rec.ret(1, 1, who, sp + 8, i);
        }
    });
    assert_eq!(n, 0, "the hit path allocated {n} times");
    let rows = rec.rows();
    assert_eq!(rows[0].calls(), 20_001);
    assert_eq!((rows[1].calls(), rows[1].returns()), (20_000, 20_000));
    assert_eq!(rows[1].unmatched(), 0);
    assert_eq!(rows[1].latency().unwrap().snapshot().total(), 20_000);
    rec.finish().unwrap();
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    assert_eq!(events.len(), 20_001 + 2 * 20_000);
    std::fs::remove_file(&trace).unwrap();
}
