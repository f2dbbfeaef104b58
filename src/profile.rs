//! Where a forward pass spends its time, per section, when `QUANTLAB_PROFILE=1`: each
//! section synchronises the device before and after (so GPU work is charged to the section
//! that queued it), which slows the run; off by default, at the cost of one flag check.

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Whether `QUANTLAB_PROFILE` is set to something other than `0`.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("QUANTLAB_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty()))
}

/// Runs `f`, charging its wall time to `name` when profiling.
pub fn section<T>(device: &Device, name: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let _ = device.synchronize();
    let t = Instant::now();
    let out = f();
    let _ = device.synchronize();
    let mut m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = m.entry(name).or_insert((0.0, 0));
    e.0 += t.elapsed().as_secs_f64();
    e.1 += 1;
    out
}

/// The totals so far as `section: seconds (calls)` lines, largest first; empty when off.
pub fn report() -> String {
    let m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    v.iter()
        .map(|(k, (s, n))| format!("{k:>14}: {s:8.3} s ({n} calls)\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_run_their_closure_and_report_is_sorted() {
        assert_eq!(section(&Device::Cpu, "x", || 41 + 1), 42);
        // With profiling off (the test environment), nothing is recorded.
        if !enabled() {
            assert!(report().is_empty());
        }
    }
}
