//! Integer kernels for int8 linear layers: activations quantized to u8, weights held as
//! i8, products accumulated in i32. Products of u8 and i8 fit in i16, which lets the
//! compiler use packed multiply-add instructions; no saturation is possible, so the
//! full u8 range is used (PyTorch's `reduce_range` exists only for VPMADDUBSW).

use rayon::prelude::*;

/// u8 affine parameters for a batch of activations: PyTorch's convention (range widened
/// to contain 0, zero point rounded half to even, scale at least f32 epsilon).
pub fn activation_qparams_u8(min: f32, max: f32) -> (f32, i32) {
    let lo = min.min(0.0);
    let hi = max.max(0.0);
    let scale = ((hi - lo) / 255.0).max(f32::EPSILON);
    let zp = (0.0 - (lo / scale).round_ties_even()) as i32;
    (scale, zp.clamp(0, 255))
}

/// min and max of a slice (the caller has checked it is non-empty and finite).
pub fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// `q = clamp(round_half_even(x · (1/scale)) + zp, 0, 255)`, as PyTorch's `quantize_val`.
pub fn quantize_u8(x: &[f32], scale: f32, zp: i32) -> Vec<u8> {
    let inv = 1.0f32 / scale;
    let zp = zp as f32;
    x.iter()
        .map(|&v| ((v * inv).round_ties_even() + zp).clamp(0.0, 255.0) as u8)
        .collect()
}

#[inline]
fn dot_u8_i8(a: &[u8], b: &[i8]) -> i32 {
    let mut acc = 0i32;
    // Chunks of 32 give the vectoriser a fixed trip count for the inner loop.
    let (ac, ar) = a.split_at(a.len() - a.len() % 32);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(32).zip(bc.chunks_exact(32)) {
        let mut s = 0i32;
        for i in 0..32 {
            s += ((x[i] as i16) * (y[i] as i16)) as i32;
        }
        acc += s;
    }
    for (&x, &y) in ar.iter().zip(br) {
        acc += ((x as i16) * (y as i16)) as i32;
    }
    acc
}

/// `C[m, n] = Σ_k A[m, k] · W[n, k]` with A u8 `[m, k]`, W i8 `[n, k]` (PyTorch's weight layout).
pub fn gemm_u8_i8(a: &[u8], m: usize, k: usize, w: &[i8], n: usize) -> Vec<i32> {
    assert_eq!(a.len(), m * k, "activation buffer size");
    assert_eq!(w.len(), n * k, "weight buffer size");
    let mut out = vec![0i32; m * n];
    let row = |(i, o): (usize, &mut [i32])| {
        let ar = &a[i * k..(i + 1) * k];
        for (j, c) in o.iter_mut().enumerate() {
            *c = dot_u8_i8(ar, &w[j * k..(j + 1) * k]);
        }
    };
    // Threads only pay off once there is real work to split.
    if m * n * k >= 1 << 20 && m > 1 {
        out.par_chunks_mut(n).enumerate().for_each(row);
    } else {
        out.chunks_mut(n).enumerate().for_each(row);
    }
    out
}

/// Per-output-row sums of the weight codes, needed to remove the activation zero point:
/// Σ_k (a − za)·w = Σ_k a·w − za·Σ_k w.
pub fn row_sums_i8(w: &[i8], n: usize, k: usize) -> Vec<i32> {
    (0..n)
        .map(|j| w[j * k..(j + 1) * k].iter().map(|&v| v as i32).sum())
        .collect()
}

/// Turns i32 accumulators back into f32 outputs:
/// `y = sa · sw[j] · (acc − za · rowsum[j]) + bias[j]`.
pub fn requantize_f32(
    acc: &[i32],
    n: usize,
    a_scale: f32,
    a_zp: i32,
    w_scale: &[f32],
    row_sum: &[i32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(acc.len());
    for row in acc.chunks(n) {
        for j in 0..n {
            let centred = row[j] - a_zp * row_sum[j];
            let mut y = a_scale * w_scale[j] * centred as f32;
            if let Some(b) = bias {
                y += b[j];
            }
            out.push(y);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_a_plain_triple_loop() {
        let (m, k, n) = (3, 70, 5);
        let a: Vec<u8> = (0..m * k).map(|i| (i * 37 % 256) as u8).collect();
        let w: Vec<i8> = (0..n * k)
            .map(|i| ((i * 91 % 256) as i32 - 128) as i8)
            .collect();
        let c = gemm_u8_i8(&a, m, k, &w, n);
        for i in 0..m {
            for j in 0..n {
                let want: i64 = (0..k)
                    .map(|p| a[i * k + p] as i64 * w[j * k + p] as i64)
                    .sum();
                assert_eq!(c[i * n + j] as i64, want);
            }
        }
        // extremes: 255 * -128 over k terms
        let a = vec![255u8; 64];
        let w = vec![-128i8; 64];
        assert_eq!(gemm_u8_i8(&a, 1, 64, &w, 1), vec![255 * -128 * 64]);
    }

    #[test]
    fn activation_params_and_quantization_by_hand() {
        // range [-1, 3]: scale 4/255, zp = -round(-63.75) = 64
        let (s, z) = activation_qparams_u8(-1.0, 3.0);
        assert_eq!((s, z), (4.0 / 255.0, 64));
        let q = quantize_u8(&[-1.0, 0.0, 3.0, 10.0], s, z);
        assert_eq!(q, vec![0, 64, 255, 255]);
    }

    #[test]
    fn requantize_removes_the_zero_point() {
        // one input [a] = [2] with scale 0.5, zp 1 -> real 0.5; weight code 4, scale 0.25 -> real 1.0
        let acc = gemm_u8_i8(&[2], 1, 1, &[4], 1);
        let y = requantize_f32(
            &acc,
            1,
            0.5,
            1,
            &[0.25],
            &row_sums_i8(&[4], 1, 1),
            Some(&[0.1]),
        );
        assert!((y[0] - (0.5 * 1.0 + 0.1)).abs() < 1e-7);
    }
}
