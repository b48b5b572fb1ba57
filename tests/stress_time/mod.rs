//! How long a time-bounded stress or torture test runs, shared by the test
//! files (each includes it with `mod stress_time;`).

use std::time::Duration;

/// `$var` seconds (fractions allowed; `default_secs` when unset or not a
/// number), and never less than `ci_min_secs` when `CI=true` (what
/// `scripts/test-all` sets, so CI runs every stress test at its CI length).
pub fn stress_duration(var: &str, default_secs: f64, ci_min_secs: f64) -> Duration {
    let mut secs = std::env::var(var)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(default_secs);
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        secs = secs.max(ci_min_secs);
    }
    Duration::from_secs_f64(secs)
}
