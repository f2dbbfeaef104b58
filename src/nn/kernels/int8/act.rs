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

use crate::nn::kernels::Isa;

/// min and max of a slice (±∞ for an empty one). NaNs are skipped; callers that need
/// finite data check with [`all_finite`] first.
pub fn min_max(x: &[f32]) -> (f32, f32) {
    match min_max_finite(x) {
        Some((l, h, true)) => (l, h),
        // NaN lanes would hide values from the vector min/max: the scalar rule skips them.
        _ => min_max_portable(x),
    }
}

/// min, max and whether every value is finite, in one pass with the selected path.
/// `None` from the fast path means "recompute": only the portable definition is used then.
fn min_max_finite(x: &[f32]) -> Option<(f32, f32, bool)> {
    #[cfg(target_arch = "x86_64")]
    if Isa::selected() >= Isa::Avx2 {
        // SAFETY: AVX2 is detected (Isa::selected never exceeds Isa::detected).
        return Some(unsafe { x86::min_max_finite(x) });
    }
    let _ = x;
    None
}

/// The range of finite data: `Some((min, max))`, or `None` when a value is NaN or ±∞.
pub fn finite_range(x: &[f32]) -> Option<(f32, f32)> {
    let (lo, hi, finite) = match min_max_finite(x) {
        Some(t) => t,
        None => {
            let (l, h) = min_max_portable(x);
            (l, h, all_finite(x))
        }
    };
    finite.then_some((lo, hi))
}

/// min and max, portable (the compiler cannot vectorise `f32::min`'s NaN rule; fine here).
pub(super) fn min_max_portable(x: &[f32]) -> (f32, f32) {
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
    #[cfg(target_arch = "x86_64")]
    if Isa::selected() >= Isa::Avx2 {
        // SAFETY: AVX2 is detected (Isa::selected never exceeds Isa::detected).
        return unsafe { x86::quantize_into(x, scale, zp, out) };
    }
    quantize_into_portable(x, scale, zp, out)
}

/// The scalar definition, lane by lane.
pub(super) fn quantize_into_portable(x: &[f32], scale: f32, zp: i32, out: &mut [u8]) {
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

/// AVX2 versions of the two passes over the activations (the compiler does not vectorise
/// `f32::min` or the saturating float-to-int cast on its own).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{quantize_into_portable, LANES};
    use std::arch::x86_64::*;

    /// min, max and all-finite in one pass. For finite data min/max equal the portable
    /// fold (up to the sign of a zero, which no quantization parameter depends on).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn min_max_finite(x: &[f32]) -> (f32, f32, bool) {
        let split = x.len() - x.len() % LANES;
        let mut lo = _mm256_set1_ps(f32::INFINITY);
        let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let inf = _mm256_set1_ps(f32::INFINITY);
        let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        let mut i = 0;
        while i < split {
            // SAFETY: i + 8 <= split <= x.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
            // |v| < ∞ is false for ±∞ and NaN.
            finite = _mm256_and_ps(
                finite,
                _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(v, abs_mask), inf),
            );
            i += LANES;
        }
        let mut l = [0f32; LANES];
        let mut h = [0f32; LANES];
        // SAFETY: the arrays hold 8 f32.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        let mut all = _mm256_movemask_ps(finite) == 0xff;
        let (mut lo, mut hi) = (
            l.iter().fold(f32::INFINITY, |a, &b| a.min(b)),
            h.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        );
        for &v in &x[split..] {
            lo = lo.min(v);
            hi = hi.max(v);
            all &= v.is_finite();
        }
        (lo, hi, all)
    }

    /// [`quantize_into_portable`], 8 values at a time: the same multiply, round to nearest
    /// even, add and clamp (`max(·, 0)` first maps NaN to 0 as the scalar cast does).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_into(x: &[f32], scale: f32, zp: i32, out: &mut [u8]) {
        let n = x.len().min(out.len());
        let split = n - n % LANES;
        let inv = _mm256_set1_ps(1.0f32 / scale);
        let zpv = _mm256_set1_ps(zp as f32);
        let (zero, top) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
        let mut i = 0;
        while i < split {
            // SAFETY: i + 8 <= split <= x.len(), out.len().
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v, inv),
            );
            let c = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zpv), zero), top);
            let q = _mm256_cvttps_epi32(c);
            let w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            let b = _mm_packus_epi16(w, w);
            // SAFETY: 8 bytes at out[i..i + 8].
            unsafe { _mm_storel_epi64(out.as_mut_ptr().add(i) as *mut __m128i, b) };
            i += LANES;
        }
        quantize_into_portable(&x[split..n], scale, zp, &mut out[split..n]);
    }
}
