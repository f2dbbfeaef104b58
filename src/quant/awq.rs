//! AWQ's two searches (Lin et al. 2024; casper-hansen/AutoAWQ `awq/quantize/quantizer.py`),
//! on tensors and statistics only.
//!
//! * Scale search (`_search_best_scale`, duo scaling): for ratios `α = i / n_grid`,
//!   `s = x_mean^α / (w_mean^(1−α) + 1e-4)` (floored at 1e-4), normalised by
//!   `sqrt(max s · min s)`; each candidate quantizes `W · diag(s)` and is scored by the
//!   mean squared error of the group's outputs, `x · (Q(W s) / s − W)ᵀ`, over the
//!   calibration inputs; the best `α`'s scales win.
//! * Clip search (`_search_best_clip`): per output row and weight group, the clip range
//!   `±shrink · max|w|` for shrink 1, 1 − 1/n_grid, … down to 1 − max_shrink, scored by the
//!   squared error of that group's partial products `x_g · (Q(clip(w_g)) − w_g)` over the
//!   calibration inputs.
//!
//! Both errors are quadratic forms in the inputs' second moment `G = XᵀX / N`: the mean
//! over N rows of `(x · d)²` is `dᵀ G d`. So the searches read `G` (gathered once over all
//! calibration tokens) instead of stored activation rows: the same numbers as AutoAWQ's
//! loss on the same inputs, at a cost that does not grow with the token count. Unlike
//! AutoAWQ, the scale search scores the linear layers' own outputs, not the enclosing
//! module's (attention, MLP), so it needs no model code.

use super::scheme::{Granularity, Scheme};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Grid points of both searches (AutoAWQ's `n_grid`).
pub const N_GRID: usize = 20;
/// The clip search shrinks the range down to `1 − MAX_SHRINK` (AutoAWQ's `max_shrink`).
pub const MAX_SHRINK: f64 = 0.5;

/// Columns sharing one quantization range within a row: the group size, or the whole row
/// for per-output-channel schemes. Other granularities mix rows and are refused.
pub fn group_cols(scheme: &Scheme, cols: usize) -> Result<usize> {
    match scheme.granularity {
        Granularity::PerGroup { size } if size > 0 => Ok(size.min(cols)),
        Granularity::PerChannel { axis: 0 } => Ok(cols),
        _ => bail!("AWQ needs a per-group (g<N>) or per-output-channel (ch0) scheme, got {scheme}"),
    }
}

fn host(w: &Tensor) -> Result<(usize, usize, Vec<f32>)> {
    let (r, c) = w.dims2()?;
    Ok((
        r,
        c,
        w.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// AutoAWQ's `w_mean`: `|w_ij| / (max |w| over w_ij's group + 1e-6)`, averaged over the
/// rows of all `weights` (concatenated by rows), per column.
pub fn weight_mean(weights: &[Tensor], group: usize) -> Result<Vec<f64>> {
    let mut sum: Vec<f64> = Vec::new();
    let mut rows = 0usize;
    for w in weights {
        let (r, c, v) = host(w)?;
        if sum.is_empty() {
            sum = vec![0.0; c];
        } else if sum.len() != c {
            bail!(
                "weights of {} and {c} input columns in one group",
                sum.len()
            );
        }
        for row in v.chunks(c) {
            for (g, seg) in row.chunks(group).enumerate() {
                let m = seg.iter().fold(0f32, |a, x| a.max(x.abs())) as f64 + 1e-6;
                for (j, x) in seg.iter().enumerate() {
                    sum[g * group + j] += x.abs() as f64 / m;
                }
            }
        }
        rows += r;
    }
    if rows == 0 {
        bail!("no weight rows");
    }
    Ok(sum.into_iter().map(|s| s / rows as f64).collect())
}

/// The duo-scaling candidate of ratio `alpha`, normalised by `sqrt(max · min)`.
pub fn duo_scales(x_mean: &[f32], w_mean: &[f64], alpha: f64) -> Vec<f32> {
    let s: Vec<f64> = x_mean
        .iter()
        .zip(w_mean)
        .map(|(&x, &w)| ((x as f64).powf(alpha) / (w.powf(1.0 - alpha) + 1e-4)).max(1e-4))
        .collect();
    let (lo, hi) = s
        .iter()
        .fold((f64::INFINITY, 0f64), |(l, h), &v| (l.min(v), h.max(v)));
    let norm = (hi * lo).sqrt();
    s.iter()
        .map(|&v| {
            let r = (v / norm) as f32;
            if r.is_finite() && r > 0.0 {
                r
            } else {
                1.0
            }
        })
        .collect()
}

/// `Σ_i d_iᵀ G d_i` over the rows `d_i` of `d` (`[out, in]`): the summed (over outputs)
/// mean squared output error of `x · dᵀ` for inputs with second moment `G` (`[in, in]`).
pub fn output_sq_error(d: &Tensor, g: &Tensor) -> Result<f64> {
    let dg = d.matmul(g)?;
    let v = (dg * d)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().map(|&x| x as f64).sum())
}

/// The second moment `G` as an f32 tensor `[in, in]` from row-major f64 values.
pub fn gram_tensor(gram: &[f64], cols: usize, device: &Device) -> Result<Tensor> {
    if gram.len() != cols * cols {
        bail!(
            "a second-moment matrix of {} entries for {cols} inputs",
            gram.len()
        );
    }
    let v: Vec<f32> = gram.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, (cols, cols), device)?)
}

/// What the scale search tried and chose.
#[derive(Debug, Clone)]
pub struct ScaleSearch {
    pub ratios: Vec<f64>,
    /// Mean squared output error per output element, per ratio.
    pub losses: Vec<f64>,
    pub best: usize,
    pub scales: Vec<f32>,
}

/// AWQ's scale search for the layers `weights` (`[out_k, in]`, one shared input) with
/// per-channel `x_mean = mean |x|` and second moment `gram` (`[in, in]`, f32 tensor).
pub fn search_scales(
    weights: &[Tensor],
    x_mean: &[f32],
    gram: &Tensor,
    scheme: &Scheme,
    n_grid: usize,
) -> Result<ScaleSearch> {
    let Some(first) = weights.first() else {
        bail!("no weights to scale");
    };
    let cols = first.dim(1)?;
    if x_mean.len() != cols || gram.dims() != [cols, cols] {
        bail!(
            "input statistics of {} channels for weights of {cols} columns",
            x_mean.len()
        );
    }
    if n_grid == 0 {
        bail!("the scale search needs at least one grid point");
    }
    let w_mean = weight_mean(weights, group_cols(scheme, cols)?)?;
    let outputs: usize = weights.iter().map(|w| w.dim(0).unwrap_or(0)).sum();
    let device = first.device();
    let (mut ratios, mut losses) = (Vec::new(), Vec::new());
    let (mut best, mut best_loss, mut best_scales) = (0, f64::INFINITY, Vec::new());
    for i in 0..n_grid {
        let alpha = i as f64 / n_grid as f64;
        let s = duo_scales(x_mean, &w_mean, alpha);
        let row = Tensor::from_slice(&s, (1, cols), device)?;
        let mut loss = 0.0;
        for w in weights {
            let q = super::fake_quantize(&w.broadcast_mul(&row)?, scheme)?;
            let d = (q.broadcast_div(&row)? - w)?;
            loss += output_sq_error(&d, gram)?;
        }
        let loss = loss / outputs as f64;
        if loss < best_loss {
            (best, best_loss, best_scales) = (i, loss, s);
        }
        ratios.push(alpha);
        losses.push(loss);
    }
    if !best_loss.is_finite() {
        bail!("every scale candidate gave a non-finite error (losses {losses:?})");
    }
    Ok(ScaleSearch {
        ratios,
        losses,
        best,
        scales: best_scales,
    })
}

/// What the clip search chose.
#[derive(Debug, Clone)]
pub struct ClipSearch {
    /// The weight with each (row, group) clamped to its chosen range.
    pub weight: Tensor,
    /// The chosen shrink factor per (row, group), row-major.
    pub shrink: Vec<f32>,
}

/// AWQ's clip search for one weight `[out, in]` with input second moment `gram` (row-major
/// `[in, in]`): `steps = round(max_shrink · n_grid)` candidate ranges per (row, group).
pub fn search_clip(
    w: &Tensor,
    gram: &[f32],
    scheme: &Scheme,
    n_grid: usize,
    max_shrink: f64,
) -> Result<ClipSearch> {
    let (rows, cols, wv) = host(w)?;
    if gram.len() != cols * cols {
        bail!(
            "a second-moment matrix of {} entries for {cols} inputs",
            gram.len()
        );
    }
    if n_grid == 0 || !(0.0..1.0).contains(&max_shrink) {
        bail!("clip search needs n_grid > 0 and max_shrink in [0, 1)");
    }
    let gs = group_cols(scheme, cols)?;
    let ng = cols.div_ceil(gs);
    let amax: Vec<f32> = wv
        .chunks(cols)
        .flat_map(|r| {
            r.chunks(gs)
                .map(|g| g.iter().fold(0f32, |a, x| a.max(x.abs())))
        })
        .collect();
    let steps = ((max_shrink * n_grid as f64).round() as usize).max(1);
    let mut best_err = vec![f64::INFINITY; rows * ng];
    let mut best_shrink = vec![1f32; rows * ng];
    for step in 0..steps {
        let shrink = (1.0 - step as f64 / n_grid as f64) as f32;
        let clipped = clip(&wv, cols, gs, &amax, |_| shrink);
        let t = Tensor::from_vec(clipped, (rows, cols), &Device::Cpu)?;
        let q = super::fake_quantize(&t, scheme)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let errs: Vec<f64> = q
            .par_chunks(cols)
            .zip(wv.par_chunks(cols))
            .flat_map_iter(|(qr, wr)| {
                (0..ng).map(move |g| {
                    let (a, b) = (g * gs, ((g + 1) * gs).min(cols));
                    let d: Vec<f32> = (a..b).map(|j| qr[j] - wr[j]).collect();
                    quad_form(&d, gram, cols, a)
                })
            })
            .collect();
        for (k, e) in errs.into_iter().enumerate() {
            if e < best_err[k] {
                best_err[k] = e;
                best_shrink[k] = shrink;
            }
        }
    }
    let clipped = clip(&wv, cols, gs, &amax, |k| best_shrink[k]);
    Ok(ClipSearch {
        weight: Tensor::from_vec(clipped, (rows, cols), w.device())?,
        shrink: best_shrink,
    })
}

/// `w` with (row, group) `k` clamped to `±amax[k] · shrink(k)`.
fn clip(
    w: &[f32],
    cols: usize,
    gs: usize,
    amax: &[f32],
    shrink: impl Fn(usize) -> f32,
) -> Vec<f32> {
    let ng = cols.div_ceil(gs);
    let mut out = w.to_vec();
    for (r, row) in out.chunks_mut(cols).enumerate() {
        for (g, seg) in row.chunks_mut(gs).enumerate() {
            let k = r * ng + g;
            let m = amax[k] * shrink(k);
            for x in seg {
                *x = x.clamp(-m, m);
            }
        }
    }
    out
}

/// `dᵀ G_gg d` for the diagonal block of `G` (`cols` wide) starting at row/column `at`.
fn quad_form(d: &[f32], gram: &[f32], cols: usize, at: usize) -> f64 {
    let n = d.len();
    let mut acc = 0f64;
    for (a, &da) in d.iter().enumerate() {
        let row = &gram[(at + a) * cols + at..(at + a) * cols + at + n];
        let t: f32 = row.iter().zip(d).map(|(g, x)| g * x).sum();
        acc += da as f64 * t as f64;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_mean_by_hand() {
        let w = Tensor::new(&[[1f32, -2.0, 4.0], [0.5, 0.5, -1.0]], &Device::Cpu).unwrap();
        // Groups of 2 (ragged last group of 1): row 0 → [1/2, 2/2 | 4/4], row 1 → [1, 1 | 1].
        let m = weight_mean(&[w], 2).unwrap();
        let want = [(0.5 + 1.0) / 2.0, (1.0 + 1.0) / 2.0, 1.0];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{m:?}");
        }
    }

    #[test]
    fn duo_scales_are_normalised() {
        let s = duo_scales(&[1.0, 4.0, 16.0], &[1.0, 1.0, 1.0], 0.5);
        // x^0.5 / (1 + 1e-4) = (1, 2, 4)/1.0001, normalised by sqrt(4 · 1) = 2 (the 1.0001 cancels).
        for (a, b) in s.iter().zip([0.5, 1.0, 2.0]) {
            assert!((a - b).abs() < 1e-6, "{s:?}");
        }
        // Ratio 0 ignores the activations: 1 / (w + 1e-4).
        let s0 = duo_scales(&[1.0, 100.0], &[0.25, 1.0], 0.0);
        assert!((s0[0] / s0[1] - 1.0001 / 0.2501).abs() < 1e-5, "{s0:?}");
    }

    #[test]
    fn quadratic_form_is_the_mean_squared_partial_product() {
        // Rows x: G = XᵀX / N; dᵀ G d = mean (x · d)².
        let x = [[1f32, 2.0, -1.0], [0.5, -1.0, 3.0]];
        let mut g = vec![0f32; 9];
        for r in &x {
            for a in 0..3 {
                for b in 0..3 {
                    g[a * 3 + b] += r[a] * r[b] / 2.0;
                }
            }
        }
        let d = [0.25f32, -0.5];
        // The block of columns 1..3.
        let want: f64 = x
            .iter()
            .map(|r| ((r[1] * d[0] + r[2] * d[1]) as f64).powi(2))
            .sum::<f64>()
            / 2.0;
        assert!((quad_form(&d, &g, 3, 1) - want).abs() < 1e-6);
    }

    #[test]
    fn bad_schemes_and_shapes_are_errors() {
        let w = Tensor::ones((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let per_tensor: Scheme = "i4:sym:tensor".parse().unwrap();
        assert!(group_cols(&per_tensor, 4).is_err());
        let g2: Scheme = "i4:sym:g2".parse().unwrap();
        assert!(search_clip(&w, &[0.0; 9], &g2, 20, 0.5).is_err());
        let gram = Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(search_scales(&[w], &[1.0; 4], &gram, &g2, 20).is_err());
    }
}
