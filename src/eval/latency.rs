//! Wall-clock latency with warm-up excluded: mean, standard deviation, p50, p95.

use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyStats {
    pub mean_ms: f64,
    pub std_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub runs: usize,
}

impl LatencyStats {
    /// Statistics of samples in milliseconds (sample standard deviation, n − 1).
    pub fn from_samples(samples: &[f64]) -> Result<Self> {
        if samples.is_empty() {
            bail!("no latency samples");
        }
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let var = if samples.len() > 1 {
            samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        // nearest-rank percentiles
        let pct = |p: f64| sorted[((p * n).ceil() as usize).clamp(1, sorted.len()) - 1];
        Ok(LatencyStats {
            mean_ms: mean,
            std_ms: var.sqrt(),
            p50_ms: pct(0.5),
            p95_ms: pct(0.95),
            runs: samples.len(),
        })
    }
}

/// Runs `f` `warmup` times untimed, then `runs` times timed.
pub fn measure(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<LatencyStats> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    LatencyStats::from_samples(&samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_by_hand() {
        let s = LatencyStats::from_samples(&[1.0, 2.0, 3.0, 4.0, 10.0]).unwrap();
        assert_eq!(s.mean_ms, 4.0);
        // Σ(x−4)² = 9+4+1+0+36 = 50; /4 = 12.5
        assert!((s.std_ms - 12.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.p50_ms, 3.0);
        assert_eq!(s.p95_ms, 10.0);
        assert!(LatencyStats::from_samples(&[]).is_err());
    }

    #[test]
    fn measure_counts_runs_not_warmup() {
        let mut calls = 0;
        let s = measure(3, 5, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 8);
        assert_eq!(s.runs, 5);
    }
}
