//! The number of `Live` registries is bounded by the dispatcher table
//! (issue 11): the one past the bound is a typed error, not a panic, and
//! the ones built still work. Its own binary: it fills the process's table.

mod runtime_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcu_registry::probes::kprobe::{Action, Kprobe};
use rcu_registry::probes::runtime::{Live, LiveError, MAX_DISPATCHERS};
use runtime_support::*;

#[test]
fn the_live_past_the_dispatcher_table_is_an_error_not_a_panic() {
    let _g = serial();
    let lives: Vec<&'static Live> = (0..MAX_DISPATCHERS)
        .map(|i| Live::new().unwrap_or_else(|e| panic!("Live {i}: {e}")))
        .collect();
    for _ in 0..2 {
        match std::panic::catch_unwind(Live::new) {
            Ok(Err(LiveError::TooManyDispatchers { max })) => assert_eq!(max, MAX_DISPATCHERS),
            Ok(Err(e)) => panic!("wrong error: {e}"),
            Ok(Ok(_)) => panic!("a Live past {MAX_DISPATCHERS} was built"),
            Err(_) => panic!("Live::new panicked past {MAX_DISPATCHERS}"),
        }
    }
    let e = Live::new().unwrap_err();
    assert!(e.to_string().contains(&MAX_DISPATCHERS.to_string()), "{e}");
    let io: std::io::Error = e.into();
    assert_eq!(io.kind(), std::io::ErrorKind::Other);
    // The last one built still probes.
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let probe = Kprobe::at(addr(rtp_mul3))
        .pre(move |_, _| {
            // Relaxed: read after the calls.
            h.fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
        .build();
    let reg = lives.last().unwrap().registry();
    reg.register(&probe).unwrap();
    for x in 0..5 {
        assert_eq!(call(rtp_mul3, x), 3 * x);
    }
    reg.unregister(&probe).unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 5);
}
