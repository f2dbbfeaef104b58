//! How far a quantized tensor is from its original, in the measures users compare.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

/// Error of an approximation against a reference, accumulated in f64.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ErrorStats {
    pub mean_abs: f64,
    pub max_abs: f64,
    pub mse: f64,
    /// Signal-to-quantization-noise ratio, 10·log10(Σx² / Σ(x−x̂)²); infinite when exact.
    pub sqnr_db: f64,
}

impl ErrorStats {
    pub fn between(reference: &Tensor, approx: &Tensor) -> Result<Self> {
        if reference.dims() != approx.dims() {
            bail!(
                "cannot compare tensors of shapes {:?} and {:?}",
                reference.dims(),
                approx.dims()
            );
        }
        let r = reference
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let a = approx
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::between_slices(&r, &a)
    }

    pub fn between_slices(reference: &[f32], approx: &[f32]) -> Result<Self> {
        if reference.is_empty() || reference.len() != approx.len() {
            bail!(
                "error statistics need two non-empty slices of equal length (got {} and {})",
                reference.len(),
                approx.len()
            );
        }
        let (mut sum_abs, mut max_abs, mut sum_sq, mut signal) = (0f64, 0f64, 0f64, 0f64);
        for (&x, &y) in reference.iter().zip(approx) {
            // The difference is taken in f32, as PyTorch's `(x - y).abs()` would.
            let d = (x - y).abs() as f64;
            sum_abs += d;
            max_abs = max_abs.max(d);
            sum_sq += d * d;
            signal += (x as f64) * (x as f64);
        }
        let n = reference.len() as f64;
        let sqnr_db = if sum_sq == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (signal / sum_sq).log10()
        };
        Ok(ErrorStats {
            mean_abs: sum_abs / n,
            max_abs,
            mse: sum_sq / n,
            sqnr_db,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed() {
        let s = ErrorStats::between_slices(&[1.0, -2.0, 3.0, 0.0], &[1.0, -1.5, 2.0, 0.0]).unwrap();
        assert_eq!(s.mean_abs, 1.5 / 4.0);
        assert_eq!(s.max_abs, 1.0);
        assert_eq!(s.mse, 1.25 / 4.0);
        // signal 14, noise 1.25
        assert!((s.sqnr_db - 10.0 * (14.0f64 / 1.25).log10()).abs() < 1e-12);
        let exact = ErrorStats::between_slices(&[1.0], &[1.0]).unwrap();
        assert!(exact.sqnr_db.is_infinite());
        assert!(ErrorStats::between_slices(&[], &[]).is_err());
    }
}
