//! Round-to-nearest variants on a row-major `[rows, cols]` f32 matrix with one (scale,
//! zero point) per `group` consecutive columns of a row: llama.cpp's signed-max scale,
//! an MSE-optimal clipping search over the PyTorch-convention scale, and the count of
//! rounding ties. Plain slices in, codes and [`QParams`] out, in the layout
//! [`super::QTensor`] holds (parameter `o · groups_per_row + k` for group `k` of row `o`).

use super::params::QParams;
use super::scheme::{Convention, Granularity, Scheme};
use anyhow::{bail, Result};
use rayon::prelude::*;

/// Columns per group of a scheme on a `[rows, cols]` matrix: `0` for one pair for the whole
/// matrix, `cols` per output row; `None` for granularities a row-grouped format cannot hold.
pub fn group_columns(g: Granularity, cols: usize) -> Option<usize> {
    match g {
        Granularity::PerTensor => Some(0),
        Granularity::PerChannel { axis: 0 } => Some(cols),
        Granularity::PerGroup { size } => Some(size.min(cols)),
        Granularity::PerChannel { .. } => None,
    }
}

/// Groups per row (`group == 0`: the whole matrix is one group, counted once).
fn groups_per_row(cols: usize, group: usize) -> usize {
    if group == 0 {
        1
    } else {
        cols.div_ceil(group)
    }
}

/// Number of (scale, zero point) pairs.
fn param_count(rows: usize, cols: usize, group: usize) -> usize {
    if group == 0 {
        1
    } else {
        rows * groups_per_row(cols, group)
    }
}

/// Parameter index of element `(o, p)`.
fn param_of(o: usize, p: usize, cols: usize, group: usize) -> usize {
    if group == 0 {
        0
    } else {
        o * groups_per_row(cols, group) + p / group
    }
}

fn check_shape(w: &[f32], rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 || w.len() != rows * cols {
        bail!(
            "expected a non-empty [{rows}, {cols}] matrix, got {} values",
            w.len()
        );
    }
    if let Some(v) = w.iter().find(|v| !v.is_finite()) {
        bail!("the matrix holds {v}: quantization needs finite numbers");
    }
    Ok(())
}

/// Weights that sit exactly on a rounding tie: the correctly rounded f32 `x / s + z` is an
/// odd multiple of ½. Such a weight's code depends on the rounding rule and on the last bit
/// of how the quotient is computed (`x · (1/s)` rounds ±1 ulp off `x / s`); PyTorch's
/// symmetric scale `max|x| / 7.5` puts every group's largest weight there. `zero` holds one
/// zero point per parameter (0 for symmetric signed codes).
pub fn tie_count(
    w: &[f32],
    rows: usize,
    cols: usize,
    group: usize,
    scale: &[f32],
    zero: &[f32],
) -> usize {
    let n = param_count(rows, cols, group);
    assert!(
        w.len() == rows * cols && scale.len() >= n && zero.len() >= n,
        "tie_count: sizes disagree"
    );
    w.par_chunks(cols)
        .enumerate()
        .map(|(o, row)| {
            row.iter()
                .enumerate()
                .filter(|&(p, &x)| {
                    let i = param_of(o, p, cols, group);
                    let v = x / scale[i] + zero[i];
                    v.is_finite() && v - v.floor() == 0.5
                })
                .count()
        })
        .sum()
}

/// llama.cpp's signed-max scale (`quantize_row_q4_0_ref`, generalised to `bits`): the
/// group's largest-magnitude weight `m` (the first one, on equal magnitudes) maps exactly to
/// `−2^(b−1)` with `d = m / −2^(b−1)` (negative when `m` is positive), codes
/// `min(2^b − 1, trunc(x · (1/d) + 2^(b−1) + ½)) − 2^(b−1)` (round half up), all in f32 as
/// there. Codes are signed `[−2^(b−1), 2^(b−1) − 1]` with zero point 0, so the symmetric
/// grouped format holds them as they are; only the scale's sign is new.
pub fn signed_max(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
) -> Result<(Vec<u8>, QParams)> {
    check_shape(w, rows, cols)?;
    if !(2..=8).contains(&bits) {
        bail!("signed-max needs 2 to 8 bits, not {bits}");
    }
    if group == 0 {
        bail!("signed-max takes one scale per group or per row, not per tensor");
    }
    let half = (1i32 << (bits - 1)) as f32;
    let nmax = (1i32 << bits) - 1;
    let gpr = groups_per_row(cols, group);
    let mut codes = vec![0u8; rows * cols];
    let mut scale = vec![0f32; rows * gpr];
    codes
        .par_chunks_mut(cols)
        .zip(scale.par_chunks_mut(gpr))
        .zip(w.par_chunks(cols))
        .for_each(|((crow, srow), wrow)| {
            for ((cg, s), wg) in crow
                .chunks_mut(group)
                .zip(srow.iter_mut())
                .zip(wrow.chunks(group))
            {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in wg {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -half;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (c, &v) in cg.iter_mut().zip(wg) {
                    // `as i32` truncates toward zero as C's `(int8_t)` cast does; the sum
                    // is at least ½ − ulp, so truncation is a floor here.
                    let n = ((v * id + (half + 0.5)) as i32).clamp(0, nmax);
                    *c = (n - half as i32) as i8 as u8;
                }
                *s = d;
            }
        });
    let zero_point = vec![0; scale.len()];
    Ok((codes, QParams { scale, zero_point }))
}

/// Shrink factors the clipping search tries: 1.00 down to 0.20 in steps of 0.01. The
/// MSE-optimal factor of a 64-weight group measured on Gaussian, Laplace and Student-t(3)
/// samples (scripts/rtn_reference.py notes) has its median at 0.92–0.96 for 4 bits,
/// 0.77–0.86 for 3 bits and 0.52–0.66 for 2 bits, with 1% of groups down to 0.76 / 0.54 /
/// 0.24; 0.01 steps leave the error within a hair of the continuous optimum (the error is
/// flat near its minimum). 1.00 first: it is plain RTN, and ties keep the larger range.
pub fn clip_grid() -> Vec<f32> {
    (0..=80).map(|i| 1.0 - i as f32 / 100.0).collect()
}

/// What the clipping search minimises per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipObjective {
    /// `Σ (x − x̂)²`: the weight MSE.
    Mse,
    /// `Σ x²·(x − x̂)²`: llama.cpp's `make_qx_quants` weighting (`rmse_type` 1), which
    /// keeps the large weights exact rather than trade them for the many small ones.
    X2,
}

/// Per group, the range shrink factor (from `grid`) whose PyTorch-convention parameters of
/// the shrunk range `[α·min, α·max]` give the least error (`objective`) under the
/// scheme's own quantization (`clamp(round_half_even(x · (1/s)) + z)`, as
/// [`super::quantize_with`] computes it). Returns the chosen parameters and factors.
pub fn clip_search(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    grid: &[f32],
    objective: ClipObjective,
) -> Result<(QParams, Vec<f32>)> {
    check_shape(w, rows, cols)?;
    if scheme.convention != Convention::Pytorch {
        bail!("the clipping search shrinks PyTorch-convention ranges; the handout convention is not supported");
    }
    if grid.is_empty() || grid.iter().any(|a| !(*a > 0.0 && *a <= 1.0)) {
        bail!("clip shrink factors must lie in (0, 1]");
    }
    let Some(group) = group_columns(scheme.granularity, cols) else {
        bail!("the clipping search needs groups along a row, per row or per tensor");
    };
    let n = param_count(rows, cols, group);
    let (mut lo, mut hi) = (vec![f32::INFINITY; n], vec![f32::NEG_INFINITY; n]);
    for (o, row) in w.chunks(cols).enumerate() {
        for (p, &x) in row.iter().enumerate() {
            let i = param_of(o, p, cols, group);
            lo[i] = lo[i].min(x);
            hi[i] = hi[i].max(x);
        }
    }
    // Candidate parameters for every group, one set per shrink factor.
    let candidates = grid
        .iter()
        .map(|&a| {
            let l: Vec<f32> = lo.iter().map(|v| v * a).collect();
            let h: Vec<f32> = hi.iter().map(|v| v * a).collect();
            QParams::from_ranges(scheme, &l, &h)
        })
        .collect::<Result<Vec<_>>>()?;
    let (qmin, qmax) = scheme.qrange();
    let (qmin, qmax) = (qmin as f32, qmax as f32);
    // Squared error of group `i` (its values `xs`) under candidate `c`.
    let error = |c: &QParams, i: usize, xs: &mut dyn Iterator<Item = f32>| -> f64 {
        let (s, z) = (c.scale[i], c.zero_point[i] as f32);
        let inv = 1.0f32 / s;
        xs.map(|x| {
            let q = ((x * inv).round_ties_even() + z).clamp(qmin, qmax);
            let e = (x - (q - z) * s) as f64;
            match objective {
                ClipObjective::Mse => e * e,
                ClipObjective::X2 => (x as f64) * (x as f64) * e * e,
            }
        })
        .sum()
    };
    let best: Vec<usize> = if group == 0 {
        let errs: Vec<f64> = candidates
            .par_iter()
            .map(|c| error(c, 0, &mut w.iter().copied()))
            .collect();
        vec![argmin_first(&errs)]
    } else {
        let gpr = groups_per_row(cols, group);
        (0..n)
            .into_par_iter()
            .map(|i| {
                let (o, k) = (i / gpr, i % gpr);
                let start = o * cols + k * group;
                let end = o * cols + ((k + 1) * group).min(cols);
                let xs = &w[start..end];
                let errs: Vec<f64> = candidates
                    .iter()
                    .map(|c| error(c, i, &mut xs.iter().copied()))
                    .collect();
                argmin_first(&errs)
            })
            .collect()
    };
    let scale = best
        .iter()
        .enumerate()
        .map(|(i, &b)| candidates[b].scale[i])
        .collect();
    let zero_point = best
        .iter()
        .enumerate()
        .map(|(i, &b)| candidates[b].zero_point[i])
        .collect();
    let alphas = best.iter().map(|&b| grid[b]).collect();
    Ok((QParams { scale, zero_point }, alphas))
}

/// Index of the smallest value, the first one on equal values.
fn argmin_first(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &e) in v.iter().enumerate() {
        if e < v[best] {
            best = i;
        }
    }
    best
}

/// Zero points as f32 (for [`tie_count`]): the integer ones of a scheme's parameters.
pub fn zero_points_f32(params: &QParams) -> Vec<f32> {
    params.zero_point.iter().map(|&z| z as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_max_maps_the_largest_magnitude_to_the_lowest_code() {
        // One row, groups of 4 (the last ragged: 2 values).
        let w = [0.1f32, -0.4, 0.2, 0.3, 0.8, -0.2, 0.0, 0.0, -0.5, 0.25];
        let (codes, p) = signed_max(&w, 1, 10, 4, 4).unwrap();
        let q: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
        // Group 0: max −0.4 → d = 0.05, codes x/d rounded half up: 2, −8, 4, 6.
        assert_eq!(p.scale[0], -0.4f32 / -8.0);
        assert_eq!(&q[..4], &[2, -8, 4, 6]);
        // Group 1: max +0.8 → d = −0.1 (negative); 0.8 → −8, −0.2 → 2; zeros → 0.
        assert_eq!(p.scale[1], 0.8f32 / -8.0);
        assert_eq!(&q[4..8], &[-8, 2, 0, 0]);
        // Group 2: max −0.5 → d = 0.0625; 0.25/0.0625 = 4.
        assert_eq!(&q[8..], &[-8, 4]);
        assert_eq!(p.zero_point, vec![0; 3]);
        // Round half up: x/d = 2.5 → 3 and −2.5 → −2 (llama.cpp's `trunc(x + 8.5)`).
        let w = [-0.8f32, 0.25, -0.25, 0.0];
        let (codes, _) = signed_max(&w, 1, 4, 4, 4).unwrap();
        let q: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
        assert_eq!(q, [-8, 3, -2, 0]);
        // The opposite extreme clamps to the top code (x/d = +8 → 7).
        let (codes, _) = signed_max(&[1.0, -1.0], 1, 2, 4, 2).unwrap();
        assert_eq!(codes.iter().map(|&c| c as i8).collect::<Vec<_>>(), [-8, 7]);
        // An all-zero group: scale 0, codes 0.
        let (codes, p) = signed_max(&[0.0; 4], 2, 2, 3, 2).unwrap();
        assert_eq!(codes, [0; 4]);
        assert_eq!(p.scale, [0.0, 0.0]);
        assert!(signed_max(&[1.0, f32::NAN], 1, 2, 4, 2).is_err());
        assert!(signed_max(&[1.0; 3], 1, 2, 4, 2).is_err());
        assert!(signed_max(&[1.0; 2], 1, 2, 4, 0).is_err());
    }

    #[test]
    fn ties_are_counted_where_the_quotient_is_a_half_integer() {
        // Exactly representable quotients: scale 0.5, x = 0.25 → 0.5, x = 0.75 → 1.5.
        let w = [0.25f32, 0.75, 0.5, -0.25, 1.0, 0.1];
        assert_eq!(tie_count(&w, 2, 3, 3, &[0.5, 0.5], &[0.0, 0.0]), 3);
        // A zero point of 0.5 moves the ties.
        assert_eq!(tie_count(&w, 2, 3, 3, &[0.5, 0.5], &[0.5, 0.0]), 2);
        // Per tensor (group 0): one pair.
        assert_eq!(tie_count(&w, 2, 3, 0, &[0.5], &[0.0]), 3);
    }

    #[test]
    fn clipping_never_loses_to_plain_rtn_and_shrinks_outliers() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
        use rand::Rng;
        let (rows, cols) = (7, 100);
        let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        w[3] = 8.0; // one outlier group
        for spec in [
            "i4:sym:g32",
            "u3:affine:g24",
            "i2:sym:ch0",
            "u4:affine:tensor",
        ] {
            let s: Scheme = spec.parse().unwrap();
            let grid = clip_grid();
            let (p, alphas) = clip_search(&w, rows, cols, &s, &grid, ClipObjective::Mse).unwrap();
            let t = candle_core::Tensor::from_slice(&w, (rows, cols), &candle_core::Device::Cpu)
                .unwrap();
            let mse = |params: QParams| {
                let d = super::super::quantize_with(&t, &s, params)
                    .unwrap()
                    .dequantize()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                d.iter()
                    .zip(&w)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
            };
            let plain = super::super::uniform::qparams_for(&t, &s).unwrap();
            let (e_clip, e_plain) = (mse(p.clone()), mse(plain.clone()));
            assert!(e_clip <= e_plain, "{spec}: {e_clip} > {e_plain}");
            // α = 1 is plain RTN exactly.
            let (p1, _) = clip_search(&w, rows, cols, &s, &[1.0], ClipObjective::X2).unwrap();
            assert_eq!(p1, plain, "{spec}");
            if s.bits <= 3 {
                assert!(alphas.iter().any(|&a| a < 1.0), "{spec}");
                assert!(e_clip < e_plain, "{spec}");
            }
        }
        let s: Scheme = "i4:sym:g32:handout".parse().unwrap();
        assert!(clip_search(&w, rows, cols, &s, &clip_grid(), ClipObjective::Mse).is_err());
        let s: Scheme = "i4:sym:g32".parse().unwrap();
        assert!(clip_search(&w, rows, cols, &s, &[1.5], ClipObjective::Mse).is_err());
    }
}
