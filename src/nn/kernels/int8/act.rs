//! Activation quantization to u8: PyTorch's affine convention, written so the compiler
//! vectorises it (fixed-width lanes, no early exits), into rows padded for the kernels.

/// Lanes of the vectorisable loops (one AVX2 register of f32).
const LANES: usize = 8;

/// u8 affine parameters for a batch of activations: PyTorch's convention (range widened
/// to contain 0, zero point rounded half to even, scale at least f32 epsilon).
pub fn activation_qparams_u8(min: f32, max: f32) -> (f32, i32) {
    let lo = min.min(0.0);
    let hi = max.max(0.0);
    let scale = ((hi - lo) / 255.0).max(f32::EPSILON);
    let zp = (0.0 - (lo / scale).round_ties_even()) as i32;
    (scale, zp.clamp(0, 255))
}

/// min and max of a slice (±∞ for an empty one). NaNs are skipped; callers that need
/// finite data check with [`all_finite`] first.
pub fn min_max(x: &[f32]) -> (f32, f32) {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lo[l] = lo[l].min(c[l]);
            hi[l] = hi[l].max(c[l]);
        }
    }
    let mut l = lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let mut h = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in rest {
        l = l.min(v);
        h = h.max(v);
    }
    (l, h)
}

/// Whether every value is finite (no NaN, no ±∞).
pub fn all_finite(x: &[f32]) -> bool {
    let mut bad = [false; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            bad[l] |= !c[l].is_finite();
        }
    }
    !bad.iter().any(|&b| b) && rest.iter().all(|v| v.is_finite())
}

/// One value quantized: `clamp(round_half_even(x · inv) + zp, 0, 255)`, PyTorch's
/// `quantize_val`. The clamp leaves an integer in [0, 255] (or NaN, which both casts map
/// to 0), so going through i32 gives the same byte and lets the loop vectorise.
#[inline(always)]
fn q(v: f32, inv: f32, zp: f32) -> u8 {
    ((v * inv).round_ties_even() + zp).clamp(0.0, 255.0) as i32 as u8
}

/// `x` quantized with one (scale, zero point).
pub fn quantize_u8(x: &[f32], scale: f32, zp: i32) -> Vec<u8> {
    let mut out = vec![0u8; x.len()];
    quantize_into(x, scale, zp, &mut out);
    out
}

fn quantize_into(x: &[f32], scale: f32, zp: i32, out: &mut [u8]) {
    let inv = 1.0f32 / scale;
    let zp = zp as f32;
    let n = x.len().min(out.len());
    let (x, out) = (&x[..n], &mut out[..n]);
    let split = n - n % LANES;
    for (o, c) in out[..split]
        .chunks_exact_mut(LANES)
        .zip(x[..split].chunks_exact(LANES))
    {
        for l in 0..LANES {
            o[l] = q(c[l], inv, zp);
        }
    }
    for (o, &v) in out[split..].iter_mut().zip(&x[split..]) {
        *o = q(v, inv, zp);
    }
}

/// Quantized activation rows as the kernels read them: `m` rows of `stride` bytes (the
/// packed weight's `kp`; columns past `k` are 0), with one (scale, zero point) per row.
#[derive(Debug, Clone)]
pub struct ActRows {
    pub m: usize,
    pub k: usize,
    pub stride: usize,
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    pub zero_point: Vec<i32>,
}

impl ActRows {
    /// `x` (`m` rows of `k`) quantized with one (scale, zero point) for all rows: PyTorch's
    /// per-tensor dynamic and static int8.
    pub fn per_tensor(x: &[f32], m: usize, k: usize, stride: usize, scale: f32, zp: i32) -> Self {
        Self::per_row(x, m, k, stride, &vec![scale; m], &vec![zp; m])
    }

    /// `x` quantized row by row with `scale[i]`, `zero_point[i]` (per-token quantization).
    /// Panics on inconsistent sizes (the callers derive them from one tensor shape).
    pub fn per_row(
        x: &[f32],
        m: usize,
        k: usize,
        stride: usize,
        scale: &[f32],
        zero_point: &[i32],
    ) -> Self {
        assert!(x.len() == m * k && stride >= k, "activation buffer size");
        assert!(
            scale.len() == m && zero_point.len() == m,
            "one (scale, zp) per row"
        );
        let mut codes = vec![0u8; m * stride];
        if k > 0 {
            for (i, (dst, src)) in codes
                .chunks_exact_mut(stride)
                .zip(x.chunks_exact(k))
                .enumerate()
            {
                quantize_into(src, scale[i], zero_point[i], &mut dst[..k]);
            }
        }
        ActRows {
            m,
            k,
            stride,
            codes,
            scale: scale.to_vec(),
            zero_point: zero_point.to_vec(),
        }
    }
}
