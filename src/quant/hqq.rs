//! HQQ (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models"):
//! calibration-free affine quantization whose zero point per group is found by a proximal
//! solver of `min ‖W − Ŵ‖_p^p` (p < 1, robust to outliers), the scale fixed at the group's
//! min–max value. This follows mobiusml/hqq's default path (`Quantizer.quantize` with
//! `optimize=True` and `optimize_weights_proximal_legacy`):
//!
//! * codes `0 ..= 2^b − 1`; HQQ works with the inverse scale `s⁻¹ = (2^b − 1)/(max − min)`
//!   (clamped at 2·10⁴, also for constant groups) and zero `z = −min·s⁻¹`, rounded to an
//!   integer for 4 bits only (its `round_zero` default);
//! * each iteration: `q = clamp(round(W·s⁻¹ + z))`, `Ŵ = (q − z)/s⁻¹`, `W_e =
//!   shrink_p(W − Ŵ, β)` with `shrink_p(x) = sign(x)·relu(|x| − |x|^(p−1)/β)`, then
//!   `z ← mean_group(q − (W − W_e)·s⁻¹)` and `β ← κ·β`;
//! * early stop on the mean `|W − Ŵ|` of the whole layer (measured before the zero
//!   update): the first iteration that does not improve it ends the loop, keeping the
//!   zero it just computed, as the reference does;
//! * defaults `p = 0.7`, `β = 10`, `κ = 1.01`, 20 iterations; rounding half to even
//!   (`torch.round`); groups of consecutive columns of a row (`axis=1`), the only grouping
//!   the row-grouped int-N format stores.
//!
//! Arithmetic is f32 as on HQQ's CPU path; sums use f64 (torch sums f32 pairwise), which
//! moves results by rounding only.

use anyhow::{bail, Result};
use rayon::prelude::*;

/// The solver's parameters (HQQ's `opt_params`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HqqParams {
    pub lp_norm: f32,
    pub beta: f64,
    pub kappa: f64,
    pub iters: usize,
}

impl Default for HqqParams {
    fn default() -> Self {
        HqqParams {
            lp_norm: 0.7,
            beta: 10.0,
            kappa: 1.01,
            iters: 20,
        }
    }
}

/// A layer quantized by HQQ: value `(q − zero)·scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hqq {
    /// Unsigned codes, row-major `[rows, cols]`.
    pub codes: Vec<u8>,
    /// Dequantization scale per group (`1 / s⁻¹`).
    pub scale: Vec<f32>,
    /// The solved (real) zero point per group.
    pub zero: Vec<f32>,
    /// Iterations run (the last one did not improve the error when fewer than `iters`).
    pub iterations: usize,
    /// Mean `|W − Ŵ|` of the first iteration (plain min–max RTN with HQQ's zero) and of the
    /// best one.
    pub first_error: f64,
    pub best_error: f64,
}

/// Quantizes a row-major `[rows, cols]` matrix with one (scale, zero) per `group`
/// consecutive columns of a row (`group` must divide `cols`, as HQQ requires).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    p: &HqqParams,
) -> Result<Hqq> {
    if rows == 0 || cols == 0 || w.len() != rows * cols {
        bail!(
            "expected a non-empty [{rows}, {cols}] matrix, got {} values",
            w.len()
        );
    }
    if !(1..=8).contains(&bits) {
        bail!("HQQ takes 1 to 8 bits, not {bits}");
    }
    if group == 0 || !cols.is_multiple_of(group) {
        bail!("HQQ needs a group size that divides the row length {cols} (got {group})");
    }
    if let Some(v) = w.iter().find(|v| !v.is_finite()) {
        bail!("the matrix holds {v}: quantization needs finite numbers");
    }
    if !(p.lp_norm > 0.0 && p.lp_norm <= 1.0) || p.beta <= 0.0 || p.kappa <= 1.0 || p.iters == 0 {
        bail!("HQQ parameters out of range: {p:?}");
    }
    let max_v = ((1u32 << bits) - 1) as f32;
    let n = w.len() / group;
    // Inverse scale and initial zero per group.
    let (mut inv, mut zero): (Vec<f32>, Vec<f32>) = w
        .par_chunks(group)
        .map(|g| {
            let lo = g.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // max_v / 0 is +inf, clamped like any other large inverse scale.
            let s = (max_v / (hi - lo)).min(2e4);
            let z = -lo * s;
            (s, if bits == 4 { z.round_ties_even() } else { z })
        })
        .unzip();
    let q_of = |x: f32, s: f32, z: f32| (x * s + z).round_ties_even().clamp(0.0, max_v);
    let mut beta = p.beta;
    let mut best = f64::INFINITY;
    let mut first = f64::NAN;
    let mut iterations = 0;
    for it in 0..p.iters {
        iterations = it + 1;
        let thr = (1.0 / beta) as f32;
        // Per group: Σ|W − Ŵ| and the updated zero.
        let (abs_err, new_zero): (Vec<f64>, Vec<f32>) = w
            .par_chunks(group)
            .zip(inv.par_iter().zip(zero.par_iter()))
            .map(|(g, (&s, &z))| {
                let (mut e, mut acc) = (0f64, 0f64);
                for &x in g {
                    let q = q_of(x, s, z);
                    let r = (q - z) / s;
                    let d = x - r;
                    e += d.abs() as f64;
                    let shrunk =
                        d.signum() * (d.abs() - thr * d.abs().powf(p.lp_norm - 1.0)).max(0.0);
                    acc += (q - (x - shrunk) * s) as f64;
                }
                (e, (acc / g.len() as f64) as f32)
            })
            .unzip();
        zero = new_zero;
        beta *= p.kappa;
        let err = abs_err.iter().sum::<f64>() / w.len() as f64;
        if it == 0 {
            first = err;
        }
        if err < best {
            best = err;
        } else {
            break;
        }
    }
    let mut codes = vec![0u8; w.len()];
    codes
        .par_chunks_mut(group)
        .zip(w.par_chunks(group))
        .zip(inv.par_iter().zip(zero.par_iter()))
        .for_each(|((c, g), (&s, &z))| {
            for (c, &x) in c.iter_mut().zip(g) {
                *c = q_of(x, s, z) as u8;
            }
        });
    for s in inv.iter_mut() {
        *s = 1.0 / *s;
    }
    debug_assert_eq!(inv.len(), n);
    Ok(Hqq {
        codes,
        scale: inv,
        zero,
        iterations,
        first_error: first,
        best_error: best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn mean_abs_error(w: &[f32], h: &Hqq, group: usize) -> f64 {
        w.iter()
            .enumerate()
            .map(|(i, &x)| {
                let g = i / group;
                (x - (h.codes[i] as f32 - h.zero[g]) * h.scale[g]).abs() as f64
            })
            .sum::<f64>()
            / w.len() as f64
    }

    #[test]
    fn the_solver_lowers_the_error_of_min_max_rtn() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (rows, cols) = (16, 128);
        // Heavy-tailed weights (the case HQQ's p < 1 norm is for).
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let u: f32 = rng.gen_range(-1.0..1.0);
                u * u * u * 0.1
            })
            .collect();
        for bits in [4u8, 3, 2] {
            let h = quantize(&w, rows, cols, bits, 64, &HqqParams::default()).unwrap();
            assert!(h.iterations >= 2, "{bits}: {}", h.iterations);
            assert!(h.best_error < h.first_error, "{bits}: {h:?}");
            let max = (1u32 << bits) - 1;
            assert!(h.codes.iter().all(|&c| c as u32 <= max));
            // The stored codes use the zero of the last update (which HQQ keeps even
            // when that iteration did not improve): still close to the best error.
            let e = mean_abs_error(&w, &h, 64);
            assert!(e < h.first_error * 1.05, "{bits}: {e} vs {}", h.first_error);
            let one = HqqParams {
                iters: 1,
                ..HqqParams::default()
            };
            assert_eq!(
                quantize(&w, rows, cols, bits, 64, &one).unwrap().iterations,
                1
            );
        }
    }

    #[test]
    fn constant_groups_and_bad_input() {
        // A constant group: inverse scale clamps at 2e4, codes stay in range.
        let w = [0.5f32; 64];
        let h = quantize(&w, 1, 64, 4, 32, &HqqParams::default()).unwrap();
        assert_eq!(h.scale[0], 1.0 / 2e4);
        for (i, &c) in h.codes.iter().enumerate() {
            let v = (c as f32 - h.zero[i / 32]) * h.scale[i / 32];
            assert!((v - 0.5).abs() < 1e-3, "{v}");
        }
        let p = HqqParams::default();
        assert!(quantize(&w, 1, 64, 4, 48, &p).is_err());
        assert!(quantize(&w, 1, 64, 9, 32, &p).is_err());
        assert!(quantize(&[f32::NAN; 64], 1, 64, 4, 32, &p).is_err());
        assert!(quantize(&w, 2, 64, 4, 32, &p).is_err());
    }
}
