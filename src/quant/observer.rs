//! Calibration observers: they watch activations batch by batch and propose the
//! (min, max) range that static quantization will use.

use super::histogram::Histogram;
use super::params::QParams;
use super::scheme::Scheme;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Bins used by the histogram-based observers (TensorRT and PyTorch use 2048).
pub const HISTOGRAM_BINS: usize = 2048;

/// Which observer to build; parsed from `minmax`, `ema`, `percentile:99.99`, `mse`, `entropy`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObserverKind {
    MinMax,
    /// PyTorch's MovingAverageMinMaxObserver, averaging constant c: r ← r + c·(batch − r).
    MovingAverage {
        averaging_constant: f32,
    },
    Percentile {
        percentile: f64,
    },
    /// Range minimising the expected squared quantization error of the histogram.
    Mse,
    /// TensorRT-style KL-divergence threshold search on the |x| histogram (symmetric range).
    Entropy,
}

impl fmt::Display for ObserverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObserverKind::MinMax => write!(f, "minmax"),
            ObserverKind::MovingAverage { averaging_constant } => {
                write!(f, "ema:{averaging_constant}")
            }
            ObserverKind::Percentile { percentile } => write!(f, "percentile:{percentile}"),
            ObserverKind::Mse => write!(f, "mse"),
            ObserverKind::Entropy => write!(f, "entropy"),
        }
    }
}

impl FromStr for ObserverKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |default: f64| -> Result<f64> {
            match arg {
                None => Ok(default),
                Some(a) => a
                    .parse()
                    .map_err(|_| anyhow::anyhow!("invalid number '{a}' in observer '{s}'")),
            }
        };
        Ok(match name {
            "minmax" => ObserverKind::MinMax,
            "ema" | "moving_average" => {
                let c = num(0.01)? as f32;
                if !(c > 0.0 && c <= 1.0) {
                    bail!("averaging constant must be in (0, 1], got {c}");
                }
                ObserverKind::MovingAverage {
                    averaging_constant: c,
                }
            }
            "percentile" => {
                let p = num(99.99)?;
                if !(p > 50.0 && p <= 100.0) {
                    bail!("percentile must be in (50, 100], got {p}");
                }
                ObserverKind::Percentile { percentile: p }
            }
            "mse" => ObserverKind::Mse,
            "entropy" | "kl" => ObserverKind::Entropy,
            _ => {
                bail!("unknown observer '{s}': use minmax, ema[:c], percentile[:p], mse or entropy")
            }
        })
    }
}

/// A streaming range estimator for one activation tensor.
#[derive(Debug, Clone)]
pub struct Observer {
    kind: ObserverKind,
    scheme: Scheme,
    batches: usize,
    min: f32,
    max: f32,
    hist: Histogram,
    abs_hist: Histogram,
}

impl Observer {
    /// `scheme` is the target: the MSE and entropy searches depend on its bit width.
    pub fn new(kind: ObserverKind, scheme: Scheme) -> Self {
        Observer {
            kind,
            scheme,
            batches: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            hist: Histogram::new(HISTOGRAM_BINS),
            abs_hist: Histogram::from_zero(HISTOGRAM_BINS),
        }
    }

    pub fn kind(&self) -> ObserverKind {
        self.kind
    }

    pub fn observe(&mut self, x: &Tensor) -> Result<()> {
        let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.observe_slice(&v)
    }

    pub fn observe_slice(&mut self, v: &[f32]) -> Result<()> {
        if v.is_empty() {
            return Ok(());
        }
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &x in v {
            if !x.is_finite() {
                bail!(
                    "calibration batch {} contains a non-finite value ({x})",
                    self.batches
                );
            }
            lo = lo.min(x);
            hi = hi.max(x);
        }
        match self.kind {
            ObserverKind::MovingAverage {
                averaging_constant: c,
            } if self.batches > 0 => {
                self.min += c * (lo - self.min);
                self.max += c * (hi - self.max);
            }
            _ => {
                self.min = self.min.min(lo);
                self.max = self.max.max(hi);
            }
        }
        match self.kind {
            ObserverKind::Percentile { .. } | ObserverKind::Mse => self.hist.add(v)?,
            ObserverKind::Entropy => {
                let a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
                self.abs_hist.add(&a)?;
            }
            _ => {}
        }
        self.batches += 1;
        Ok(())
    }

    /// The calibrated (min, max).
    pub fn range(&self) -> Result<(f32, f32)> {
        if self.batches == 0 {
            bail!(
                "observer ({}) saw no data: give calibration at least one non-empty batch",
                self.kind
            );
        }
        Ok(match self.kind {
            ObserverKind::MinMax | ObserverKind::MovingAverage { .. } => (self.min, self.max),
            ObserverKind::Percentile { percentile } => {
                let tail = (100.0 - percentile) / 100.0;
                (
                    self.hist.quantile(tail) as f32,
                    self.hist.quantile(1.0 - tail) as f32,
                )
            }
            ObserverKind::Mse => mse_range(&self.hist, self.scheme.qrange()),
            ObserverKind::Entropy => {
                let levels = if self.scheme.signed {
                    1usize << (self.scheme.bits - 1)
                } else {
                    1usize << self.scheme.bits
                };
                let t = entropy_threshold(&self.abs_hist.counts, levels.min(HISTOGRAM_BINS));
                let amax = self.abs_hist.edge(t) as f32;
                if self.min >= 0.0 {
                    (0.0, amax)
                } else {
                    (-amax, amax)
                }
            }
        })
    }

    /// Quantization parameters for the calibrated range under the target scheme.
    pub fn qparams(&self) -> Result<QParams> {
        let (lo, hi) = self.range()?;
        QParams::from_ranges(&self.scheme, &[lo], &[hi])
    }
}

/// Expected squared error of quantizing the histogram's mass onto a uniform grid over [a, b]:
/// rounding noise step²/12 for mass inside, squared distance to the clip edge outside.
/// Uses prefix sums so every candidate pair costs O(1).
fn mse_range(h: &Histogram, (qmin, qmax): (i32, i32)) -> (f32, f32) {
    let n = h.counts.len();
    let w = h.bin_width();
    let centre = |i: usize| h.edge(i) + w / 2.0;
    // prefix sums of count, count·c, count·c²
    let mut p0 = vec![0.0; n + 1];
    let mut p1 = vec![0.0; n + 1];
    let mut p2 = vec![0.0; n + 1];
    for i in 0..n {
        let (c, x) = (h.counts[i], centre(i));
        p0[i + 1] = p0[i] + c;
        p1[i + 1] = p1[i] + c * x;
        p2[i + 1] = p2[i] + c * x * x;
    }
    let levels = (qmax - qmin) as f64;
    let mut best = (f64::INFINITY, 0usize, n);
    for a in 0..n {
        for b in (a + 1)..=n {
            let (lo, hi) = (h.edge(a), h.edge(b));
            let step = (hi - lo) / levels;
            let inside = (p0[b] - p0[a]) * step * step / 12.0;
            // Σ c (x − lo)² over bins left of a, and Σ c (x − hi)² right of b
            let left = p2[a] - 2.0 * lo * p1[a] + lo * lo * p0[a];
            let (r0, r1, r2) = (p0[n] - p0[b], p1[n] - p1[b], p2[n] - p2[b]);
            let right = r2 - 2.0 * hi * r1 + hi * hi * r0;
            let err = inside + left + right;
            if err < best.0 {
                best = (err, a, b);
            }
        }
    }
    (h.edge(best.1) as f32, h.edge(best.2) as f32)
}

/// TensorRT's entropy calibration: for each candidate threshold bin i ≥ `levels`, compare the
/// clipped reference distribution P (outliers folded into the last bin) with Q, P squeezed into
/// `levels` bins and expanded back over P's non-empty bins; return the i with the smallest
/// KL(P‖Q) (the last one on ties). The threshold is the right edge of bin i − 1.
pub fn entropy_threshold(hist: &[f64], levels: usize) -> usize {
    let n = hist.len();
    if levels >= n {
        return n;
    }
    let mut best = (f64::INFINITY, n);
    for i in levels..=n {
        let mut p: Vec<f64> = hist[..i].to_vec();
        p[i - 1] += hist[i..].iter().sum::<f64>();
        let merged = i / levels;
        let mut q = vec![0.0; i];
        for j in 0..levels {
            let start = j * merged;
            let stop = if j == levels - 1 { i } else { start + merged };
            let mass: f64 = hist[start..stop].iter().sum();
            let nonzero = p[start..stop].iter().filter(|&&v| v != 0.0).count();
            if nonzero > 0 {
                for k in start..stop {
                    if p[k] != 0.0 {
                        q[k] = mass / nonzero as f64;
                    }
                }
            }
        }
        let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
        if sp == 0.0 || sq == 0.0 {
            continue;
        }
        let mut kl = 0.0;
        for k in 0..i {
            if p[k] > 0.0 {
                let (pk, qk) = (p[k] / sp, q[k] / sq);
                kl += if qk > 0.0 {
                    pk * (pk / qk).ln()
                } else {
                    f64::INFINITY
                };
            }
        }
        if kl <= best.0 {
            best = (kl, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme_u8() -> Scheme {
        Scheme::new(8, false).unwrap()
    }

    #[test]
    fn minmax_and_moving_average_by_hand() {
        let mut o = Observer::new(ObserverKind::MinMax, scheme_u8());
        o.observe_slice(&[-1.0, 2.0]).unwrap();
        o.observe_slice(&[0.0, 4.0]).unwrap();
        assert_eq!(o.range().unwrap(), (-1.0, 4.0));
        let mut e = Observer::new(
            ObserverKind::MovingAverage {
                averaging_constant: 0.5,
            },
            scheme_u8(),
        );
        e.observe_slice(&[-1.0, 2.0]).unwrap();
        e.observe_slice(&[0.0, 4.0]).unwrap();
        assert_eq!(e.range().unwrap(), (-0.5, 3.0));
    }

    #[test]
    fn percentile_equals_the_hand_computed_histogram_quantile() {
        // 0, 1, ..., 9999 plus one outlier at 20480: the histogram spans [0, 20480] in 2048
        // bins of width 10 exactly, bins 0..999 hold 10 values each (density 1 per unit),
        // bin 2047 holds the outlier, and the total is N = 10001. Interpolating inside a
        // bin, the q-quantile is then q·N itself while q·N < 10000:
        //   99.9: lo = 0.001 · 10001 = 10.001, hi = 0.999 · 10001 = 9990.999
        //   99.0: lo = 0.01 · 10001 = 100.01, hi = 0.99 · 10001 = 9900.99
        // A median would give 5000.5 and min/max (0, 20480); even numpy's sample percentiles
        // at 99.9 (10.0, 9990.0) are outside the tolerances below.
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        v.push(20480.0);
        for (p, lo_want, hi_want) in [(99.9, 10.001, 9990.999), (99.0, 100.01, 9900.99)] {
            let kind = ObserverKind::Percentile { percentile: p };
            let mut one = Observer::new(kind, scheme_u8());
            one.observe_slice(&v).unwrap();
            // The same data in three batches: the first already spans the full range, so
            // no rebinning happens and every batch must land in the same counts.
            let mut three = Observer::new(kind, scheme_u8());
            let (outlier, bulk) = v.split_last().unwrap();
            let mut first = bulk[..3000].to_vec();
            first.push(*outlier);
            three.observe_slice(&first).unwrap();
            three.observe_slice(&bulk[3000..7000]).unwrap();
            three.observe_slice(&bulk[7000..]).unwrap();
            for (label, o) in [("one batch", &one), ("three batches", &three)] {
                let (lo, hi) = o.range().unwrap();
                // f32 spacing near 10 000 is 2^-10 ≈ 0.001; near 10 it is ~1e-6
                assert!(
                    (lo - lo_want).abs() < 1e-4 && (hi - hi_want).abs() < 1e-3,
                    "percentile {p}, {label}: ({lo}, {hi}), want ({lo_want}, {hi_want})"
                );
            }
        }
    }

    /// Squared error of fake-quantizing `v` with the scheme over [lo, hi], in f64.
    fn fake_quant_mse(v: &[f32], s: &Scheme, lo: f32, hi: f32) -> f64 {
        let p = QParams::from_ranges(s, &[lo], &[hi]).unwrap();
        let (qmin, qmax) = s.qrange();
        let (scale, zp) = (p.scale[0], p.zero_point[0]);
        v.iter()
            .map(|&x| {
                let q = ((x / scale).round() as i32 + zp).clamp(qmin, qmax);
                let d = ((q - zp) as f32 * scale - x) as f64;
                d * d
            })
            .sum::<f64>()
            / v.len() as f64
    }

    #[test]
    fn mse_range_beats_minmax_with_outliers() {
        let s = Scheme::new(4, false).unwrap();
        // a triangle-shaped bulk in [0, 1] plus a few far outliers
        let mut v: Vec<f32> = (0..20_000)
            .map(|i| {
                (((i * 7919) % 1000) as f32 / 1000.0 + ((i * 104729) % 1000) as f32 / 1000.0) / 2.0
            })
            .collect();
        v.extend([20.0, 25.0, 30.0]);
        let mut o = Observer::new(ObserverKind::Mse, s);
        for chunk in v.chunks(5000) {
            o.observe_slice(chunk).unwrap();
        }
        let (lo, hi) = o.range().unwrap();
        let minmax = fake_quant_mse(&v, &s, 0.0, 30.0);
        let chosen = fake_quant_mse(&v, &s, lo, hi);
        assert!(hi < 30.0, "MSE search should clip the outliers, got {hi}");
        assert!(chosen < minmax / 2.0, "chosen {chosen} vs minmax {minmax}");
    }

    #[test]
    fn entropy_keeps_full_range_for_uniform_data() {
        // Uniform |x|: every clip loses information, so the full range is best.
        let hist = vec![10.0; 2048];
        assert_eq!(entropy_threshold(&hist, 128), 2048);
    }

    /// Recorded by `scripts/entropy_reference.py` (independent float64 Python).
    #[test]
    fn entropy_matches_python_reference() {
        let mut h: Vec<f64> = (0..2048)
            .map(|i| (1000.0 * (-(i as f64) / 150.0).exp()).floor())
            .collect();
        for v in &mut h[300..320] {
            *v += 40.0;
        }
        h[2000] += 3.0;
        assert_eq!(entropy_threshold(&h, 128), 1151);
    }

    #[test]
    fn entropy_clips_a_long_tail() {
        let mut o = Observer::new(
            ObserverKind::Entropy,
            Scheme::new(8, true).unwrap().symmetric(),
        );
        // Laplace-like bulk within |x| < ~5 plus a single outlier at 100
        let mut v: Vec<f32> = (1..50_000)
            .map(|i| {
                let u = i as f32 / 50_000.0;
                let m = -(1.0 - u).ln();
                if i % 2 == 0 {
                    m
                } else {
                    -m
                }
            })
            .collect();
        v.push(100.0);
        o.observe_slice(&v).unwrap();
        let (lo, hi) = o.range().unwrap();
        assert_eq!(lo, -hi);
        assert!(hi > 3.0 && hi < 40.0, "threshold {hi}");
    }

    #[test]
    fn parsing_and_empty_observers() {
        assert_eq!(
            "percentile:99.9".parse::<ObserverKind>().unwrap(),
            ObserverKind::Percentile { percentile: 99.9 }
        );
        assert!("percentile:20".parse::<ObserverKind>().is_err());
        assert!("bogus".parse::<ObserverKind>().is_err());
        let o = Observer::new(ObserverKind::MinMax, scheme_u8());
        assert!(o.range().is_err());
    }
}
