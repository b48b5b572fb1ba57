//! Probes placed by name on the live runtime (issue 11): offsets are checked
//! against the function's extent, symbols follow `dlopen`/`dlclose`, a name
//! defined in two objects is an error unless qualified (`object:name`), and
//! IFUNC functions (`strlen`, `memcpy`, `strcmp`) resolve to the
//! implementation the loader chose. Every test takes the binary's serial
//! lock (they share the SIGTRAP handler and the registry).

mod runtime_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::probes::kprobe::{Action, Kprobe, KprobeBuilder};
use rcu_registry::probes::runtime::Live;
use rcu_registry::probes::ProbeError;
use runtime_support::*;

fn live() -> &'static Live {
    Live::global()
}

fn counting(probe: KprobeBuilder, count: &Arc<AtomicU64>) -> Kprobe {
    let c = Arc::clone(count);
    probe
        .pre(move |_p, _regs| {
            // Relaxed: a counter read after the calls joined.
            c.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build()
}

#[test]
fn offsets_past_the_end_of_a_function_are_refused_and_change_nothing() {
    let _g = serial();
    let reg = live().registry();
    let start = addr(rtp_add1);
    let next = addr(rtp_push);
    let size = live().symbols().function("rtp_add1").unwrap().size;
    assert_eq!(size, 6, "rtp_add1 is 6 bytes");
    assert!(
        next > start + size,
        "rtp_push follows rtp_add1 after padding"
    );
    let sites = reg.sites();
    let before = code(start, (next - start + 8) as usize);
    for offset in [size, next - start, u64::MAX, u64::MAX - start + 1] {
        let probe = Kprobe::symbol("rtp_add1", offset).build();
        assert_eq!(
            reg.register(&probe),
            Err(ProbeError::OffsetPastEnd {
                name: "rtp_add1".into(),
                size,
                offset,
            }),
            "offset {offset:#x}"
        );
        assert!(!probe.is_registered());
        assert_eq!(code(start, before.len()), before, "offset {offset:#x}");
        assert_eq!(reg.sites(), sites, "offset {offset:#x}");
    }
    // An offset inside the function is checked as before: the middle of
    // `add eax, 1` is not on an instruction boundary.
    let probe = Kprobe::symbol("rtp_add1", 3).build();
    assert!(matches!(
        reg.register(&probe),
        Err(ProbeError::NotOnInstructionBoundary { .. })
    ));
    // The last byte inside (`ret`) is a target, and counts exactly.
    let hits = Arc::new(AtomicU64::new(0));
    let probe = counting(Kprobe::symbol("rtp_add1", size - 1), &hits);
    reg.register(&probe).unwrap();
    assert_eq!(probe.address(), Some(start + size - 1));
    for x in 0..10 {
        assert_eq!(call(rtp_add1, x), x + 1);
    }
    reg.unregister(&probe).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 10);
    assert_eq!(code(start, before.len()), before);
}
