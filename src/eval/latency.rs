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
    let mut stats = measure_interleaved(warmup, runs, &mut [&mut f])?;
    Ok(stats.remove(0))
}

/// Timed calls of one function per turn in [`measure_interleaved`].
const TURN: usize = 10;

/// Times several functions in turns: after `warmup` untimed rounds, each turn gives every
/// function one untimed call (its weights back in cache after the others ran; none when
/// there is one function) and up to
/// [`TURN`] timed ones, until each has `runs`. Each function's samples then span the same
/// stretch of time: on a shared machine the load drifts within seconds, and rows timed one
/// after another saw different loads (MNIST lab B64 p50s moved 30% between runs of one binary).
pub fn measure_interleaved(
    warmup: usize,
    runs: usize,
    fs: &mut [&mut dyn FnMut() -> Result<()>],
) -> Result<Vec<LatencyStats>> {
    for _ in 0..warmup {
        for f in fs.iter_mut() {
            f()?;
        }
    }
    let mut samples = vec![Vec::with_capacity(runs); fs.len()];
    let rewarm = fs.len() > 1;
    for start in (0..runs).step_by(TURN) {
        for (f, s) in fs.iter_mut().zip(&mut samples) {
            if rewarm {
                f()?;
            }
            for _ in start..(start + TURN).min(runs) {
                let t = Instant::now();
                f()?;
                s.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    samples
        .iter()
        .map(|s| LatencyStats::from_samples(s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_runs_take_turns_and_count_runs_not_warmup() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut a = || {
            order.borrow_mut().push('a');
            Ok(())
        };
        let mut b = || {
            order.borrow_mut().push('b');
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        };
        // One warm-up round, then turns of one untimed and up to TURN timed calls each.
        let stats = measure_interleaved(1, TURN + 2, &mut [&mut a, &mut b]).unwrap();
        let (a1, b1) = ("a".repeat(TURN + 1), "b".repeat(TURN + 1));
        let want = format!("ab{a1}{b1}aaabbb");
        assert_eq!(order.borrow().iter().collect::<String>(), want);
        assert_eq!(stats.len(), 2);
        assert!(stats.iter().all(|s| s.runs == TURN + 2));
        assert!(stats[1].p50_ms >= 2.0 && stats[0].p50_ms < stats[1].p50_ms);
        let mut failing = || -> Result<()> { anyhow::bail!("broken row") };
        let err = measure_interleaved(0, 2, &mut [&mut failing]).unwrap_err();
        assert!(err.to_string().contains("broken row"));
    }

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
