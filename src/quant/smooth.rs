//! SmoothQuant's migration strength (Xiao et al. 2023, mit-han-lab/smoothquant
//! `smooth_ln_fcs_llama_like`): per input channel `s_j = max|X_j|^α / max|W_j|^(1−α)`,
//! the weight maximum taken over every row of every linear layer that reads the channel.
//! Dividing the activations by `s` and multiplying the weights' columns by it moves
//! outlier magnitude from activations (hard to quantize per tensor or per token) into
//! weights (quantized per output channel), by an amount `α` sets.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

/// SmoothQuant's floor for the weight maxima and for the scales themselves.
pub const CLAMP: f64 = 1e-5;

/// `max |W_ij|` over the rows `i` of all `weights` (`[out_k, in]` each), per column `j`.
pub fn column_absmax(weights: &[Tensor]) -> Result<Vec<f32>> {
    let mut out: Option<Vec<f32>> = None;
    for w in weights {
        let m = w.abs()?.max(D::Minus2)?.to_vec1::<f32>()?;
        match &mut out {
            None => out = Some(m),
            Some(o) if o.len() == m.len() => {
                for (a, b) in o.iter_mut().zip(m) {
                    *a = a.max(b);
                }
            }
            Some(o) => bail!(
                "weights of {} and {} input columns in one group",
                o.len(),
                m.len()
            ),
        }
    }
    match out {
        Some(o) => Ok(o),
        None => bail!("no weights to take column maxima of"),
    }
}

/// The smoothing scales from per-channel activation maxima and weight column maxima.
/// Computed in f64, rounded once to f32.
pub fn scales(act_absmax: &[f32], weight_absmax: &[f32], alpha: f64) -> Result<Vec<f32>> {
    if !(0.0..=1.0).contains(&alpha) {
        bail!("SmoothQuant alpha {alpha} is outside [0, 1]");
    }
    if act_absmax.len() != weight_absmax.len() {
        bail!(
            "{} activation maxima for {} weight columns",
            act_absmax.len(),
            weight_absmax.len()
        );
    }
    act_absmax
        .iter()
        .zip(weight_absmax)
        .map(|(&a, &w)| {
            if !(a.is_finite() && w.is_finite() && a >= 0.0 && w >= 0.0) {
                bail!("channel maxima must be finite and non-negative (got {a}, {w})");
            }
            let w = (w as f64).max(CLAMP);
            let s = (a as f64).powf(alpha) / w.powf(1.0 - alpha);
            Ok(s.max(CLAMP) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed_scales() {
        let w1 = Tensor::new(&[[1f32, -4.0, 0.0], [-2.0, 1.0, 0.0]], &Device::Cpu).unwrap();
        let w2 = Tensor::new(&[[0.5f32, 9.0, 0.0]], &Device::Cpu).unwrap();
        let wm = column_absmax(&[w1, w2]).unwrap();
        assert_eq!(wm, [2.0, 9.0, 0.0]);
        let s = scales(&[8.0, 1.0, 3.0], &wm, 0.5).unwrap();
        // sqrt(8 / 2) = 2, sqrt(1 / 9) = 1/3, sqrt(3) / sqrt(1e-5) (weight floor).
        assert!((s[0] - 2.0).abs() < 1e-6 && (s[1] - 1.0 / 3.0).abs() < 1e-6);
        assert!((s[2] as f64 - (3.0f64 / 1e-5).sqrt()).abs() < 1e-2);
        // alpha 1: activation maxima; a zero activation channel gets the floor.
        assert_eq!(scales(&[8.0, 0.0], &[2.0, 9.0], 1.0).unwrap(), [8.0, 1e-5]);
        assert!(scales(&[1.0], &[1.0], 1.5).is_err());
        assert!(scales(&[1.0, 2.0], &[1.0], 0.5).is_err());
        assert!(scales(&[f32::NAN], &[1.0], 0.5).is_err());
    }
}
