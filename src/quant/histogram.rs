//! A streaming histogram whose range grows with the data: when a batch falls outside
//! the current range, the old counts are spread over the wider bins in proportion to
//! overlap (PyTorch's HistogramObserver does the same), so calibration needs one pass.

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub lo: f32,
    pub hi: f32,
    pub counts: Vec<f64>,
    /// Keep 0 as the left edge (for |x| histograms, whose thresholds are measured from 0).
    anchor_zero: bool,
}

impl Histogram {
    pub fn new(bins: usize) -> Self {
        Histogram {
            lo: 0.0,
            hi: 0.0,
            counts: vec![0.0; bins],
            anchor_zero: false,
        }
    }

    /// A histogram whose range always starts at 0 (values must be non-negative).
    pub fn from_zero(bins: usize) -> Self {
        Histogram {
            anchor_zero: true,
            ..Self::new(bins)
        }
    }

    pub fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    pub fn bin_width(&self) -> f64 {
        (self.hi as f64 - self.lo as f64) / self.counts.len() as f64
    }

    /// Left edge of bin i (i may equal the bin count: the right end).
    pub fn edge(&self, i: usize) -> f64 {
        self.lo as f64 + self.bin_width() * i as f64
    }

    /// Adds values, widening the range first if they fall outside it.
    pub fn add(&mut self, values: &[f32]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in values {
            if !v.is_finite() {
                bail!("calibration data contains a non-finite value ({v}): check the model's inputs and weights");
            }
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if self.anchor_zero {
            lo = lo.min(0.0);
        }
        if self.total() == 0.0 {
            self.lo = lo;
            self.hi = if hi > lo {
                hi
            } else {
                lo + f32::EPSILON.max(lo.abs() * 1e-6)
            };
        } else if lo < self.lo || hi > self.hi {
            self.rebin(lo.min(self.lo), hi.max(self.hi));
        }
        let n = self.counts.len();
        let (base, width) = (self.lo as f64, self.bin_width());
        for &v in values {
            let i = (((v as f64 - base) / width) as usize).min(n - 1);
            self.counts[i] += 1.0;
        }
        Ok(())
    }

    fn rebin(&mut self, lo: f32, hi: f32) {
        let n = self.counts.len();
        let old = std::mem::replace(&mut self.counts, vec![0.0; n]);
        let (old_lo, old_w) = (self.lo as f64, self.bin_width());
        self.lo = lo;
        self.hi = hi;
        let (new_lo, new_w) = (lo as f64, self.bin_width());
        for (i, &c) in old.iter().enumerate() {
            if c == 0.0 {
                continue;
            }
            let (a, b) = (old_lo + old_w * i as f64, old_lo + old_w * (i + 1) as f64);
            let first = (((a - new_lo) / new_w) as usize).min(n - 1);
            let last = (((b - new_lo) / new_w) as usize).min(n - 1);
            for j in first..=last {
                let (ja, jb) = (new_lo + new_w * j as f64, new_lo + new_w * (j + 1) as f64);
                let overlap = (b.min(jb) - a.max(ja)).max(0.0);
                let share = if first == last { 1.0 } else { overlap / old_w };
                self.counts[j] += c * share;
            }
        }
    }

    /// The value below which `q` (0..=1) of the mass lies, interpolating inside a bin.
    pub fn quantile(&self, q: f64) -> f64 {
        let target = q.clamp(0.0, 1.0) * self.total();
        let mut acc = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            if acc + c >= target && c > 0.0 {
                let frac = (target - acc) / c;
                return self.edge(i) + frac * self.bin_width();
            }
            acc += c;
        }
        self.hi as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_rebinning_conserve_mass() {
        let mut h = Histogram::new(4);
        h.add(&[0.0, 1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!((h.lo, h.hi), (0.0, 4.0));
        assert_eq!(h.counts, vec![1.0, 1.0, 1.0, 2.0]);
        h.add(&[8.0]).unwrap();
        assert_eq!((h.lo, h.hi), (0.0, 8.0));
        // old bins of width 1 fold pairwise into bins of width 2
        assert_eq!(h.counts, vec![2.0, 3.0, 0.0, 1.0]);
        assert_eq!(h.total(), 6.0);
    }

    #[test]
    fn quantile_interpolates() {
        let mut h = Histogram::new(10);
        let v: Vec<f32> = (0..1000).map(|i| i as f32 / 999.0 * 10.0).collect();
        h.add(&v).unwrap();
        assert!((h.quantile(0.5) - 5.0).abs() < 0.02);
        assert!(h.add(&[f32::NAN]).is_err());
    }
}
