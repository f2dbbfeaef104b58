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

/// From this many activation rows on, the AVX2 kernel's widening of the weights pays off.
const AVX2_MIN_ROWS: usize = 16;

/// `C[m, n] = Σ_k A[m, k] · W[n, k]` with A u8 `[m, k]`, W i8 `[n, k]` (PyTorch's weight layout).
pub fn gemm_u8_i8(a: &[u8], m: usize, k: usize, w: &[i8], n: usize) -> Vec<i32> {
    assert_eq!(a.len(), m * k, "activation buffer size");
    assert_eq!(w.len(), n * k, "weight buffer size");
    #[cfg(target_arch = "x86_64")]
    if m >= AVX2_MIN_ROWS && super::Isa::selected() >= super::Isa::Avx2 {
        return avx2::gemm(a, m, k, w, n);
    }
    gemm_u8_i8_portable(a, m, k, w, n)
}

fn gemm_u8_i8_portable(a: &[u8], m: usize, k: usize, w: &[i8], n: usize) -> Vec<i32> {
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

/// An exact u8 × i8 → i32 matrix product on AVX2: both operands widened to i16, products
/// summed in pairs by VPMADDWD (|255 · −128| · 2 fits i32, so nothing saturates), with a
/// 2 × 4 register block of accumulators so each load feeds several multiply-adds.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Columns per VPMADDWD step (16 × i16 = 256 bits).
    const STEP: usize = 16;
    /// Weight rows handled by one task.
    const BLOCK: usize = 64;

    /// Rows widened to i16, each padded with zeros to `kp` columns.
    fn widen<T: Copy>(
        src: &[T],
        rows: usize,
        k: usize,
        kp: usize,
        f: impl Fn(T) -> i16,
    ) -> Vec<i16> {
        let mut out = vec![0i16; rows * kp];
        for r in 0..rows {
            for (d, &v) in out[r * kp..r * kp + k]
                .iter_mut()
                .zip(&src[r * k..(r + 1) * k])
            {
                *d = f(v);
            }
        }
        out
    }

    pub fn gemm(a: &[u8], m: usize, k: usize, w: &[i8], n: usize) -> Vec<i32> {
        let kp = k.div_ceil(STEP) * STEP;
        let a16 = widen(a, m, k, kp, |v| v as i16);
        let firsts: Vec<usize> = (0..n).step_by(BLOCK).collect();
        let parts: Vec<Vec<i32>> = firsts
            .par_iter()
            .map(|&first| {
                let nb = (first + BLOCK).min(n) - first;
                let w16 = widen(&w[first * k..(first + nb) * k], nb, k, kp, |v| v as i16);
                let mut part = vec![0i32; m * nb];
                // SAFETY: `Isa::detected()` confirmed AVX2 before `gemm` was called.
                unsafe { block(&a16, m, &w16, nb, kp, &mut part) };
                part
            })
            .collect();
        let mut out = vec![0i32; m * n];
        for (&first, part) in firsts.iter().zip(&parts) {
            let nb = part.len() / m;
            for i in 0..m {
                out[i * n + first..i * n + first + nb].copy_from_slice(&part[i * nb..(i + 1) * nb]);
            }
        }
        out
    }

    /// `out[i, j] = a[i] · w[j]` for all `m` activation rows and `nb` weight rows.
    #[target_feature(enable = "avx2")]
    unsafe fn block(a: &[i16], m: usize, w: &[i16], nb: usize, kp: usize, out: &mut [i32]) {
        assert!(a.len() >= m * kp && w.len() >= nb * kp && out.len() >= m * nb);
        let load = |v: &[i16], off: usize| {
            // SAFETY: every caller passes off + STEP <= v.len() (rows are kp long, kp % STEP == 0).
            unsafe { _mm256_loadu_si256(v.as_ptr().add(off) as *const __m256i) }
        };
        let mut i = 0;
        while i + 2 <= m {
            let mut j = 0;
            while j + 4 <= nb {
                let mut acc = [_mm256_setzero_si256(); 8];
                let mut p = 0;
                while p < kp {
                    let a0 = load(a, i * kp + p);
                    let a1 = load(a, (i + 1) * kp + p);
                    for c in 0..4 {
                        let wc = load(w, (j + c) * kp + p);
                        acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(a0, wc));
                        acc[4 + c] = _mm256_add_epi32(acc[4 + c], _mm256_madd_epi16(a1, wc));
                    }
                    p += STEP;
                }
                for c in 0..4 {
                    out[i * nb + j + c] = hsum(acc[c]);
                    out[(i + 1) * nb + j + c] = hsum(acc[4 + c]);
                }
                j += 4;
            }
            for jj in j..nb {
                out[i * nb + jj] = dot(a, i * kp, w, jj * kp, kp);
                out[(i + 1) * nb + jj] = dot(a, (i + 1) * kp, w, jj * kp, kp);
            }
            i += 2;
        }
        if i < m {
            for jj in 0..nb {
                out[i * nb + jj] = dot(a, i * kp, w, jj * kp, kp);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    fn dot(a: &[i16], ao: usize, w: &[i16], wo: usize, kp: usize) -> i32 {
        assert!(ao + kp <= a.len() && wo + kp <= w.len());
        let mut acc = _mm256_setzero_si256();
        let mut p = 0;
        while p < kp {
            // SAFETY: p + STEP <= kp, and both rows have kp elements from their offsets.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_si256(a.as_ptr().add(ao + p) as *const __m256i),
                    _mm256_loadu_si256(w.as_ptr().add(wo + p) as *const __m256i),
                )
            };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y));
            p += STEP;
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
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

    /// The reference: a plain i32 triple loop, sharing no code with the kernels.
    fn scalar_reference(a: &[u8], m: usize, k: usize, w: &[i8], n: usize) -> Vec<i32> {
        let mut c = vec![0i32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0i32;
                for p in 0..k {
                    s += a[i * k + p] as i32 * w[j * k + p] as i32;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    type Gemm = fn(&[u8], usize, usize, &[i8], usize) -> Vec<i32>;

    /// Every kernel this machine can run, detected at run time: the portable one always,
    /// the dispatcher (what QLinear calls), and each SIMD kernel the CPU supports.
    fn available_paths() -> Vec<(&'static str, Gemm)> {
        #[allow(unused_mut)]
        let mut paths: Vec<(&'static str, Gemm)> =
            vec![("portable", gemm_u8_i8_portable), ("dispatch", gemm_u8_i8)];
        #[cfg(target_arch = "x86_64")]
        if super::super::Isa::detected() >= super::super::Isa::Avx2 {
            paths.push(("avx2", avx2::gemm));
        }
        paths
    }

    /// splitmix64: a seeded stream, so failures reproduce.
    fn stream(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn scalar_reference_by_hand() {
        // [[1, 2, 3], [255, 0, 1]] · [[1, -1, 2], [-128, 0, 127]]ᵀ
        let a = [1u8, 2, 3, 255, 0, 1];
        let w = [1i8, -1, 2, -128, 0, 127];
        assert_eq!(
            scalar_reference(&a, 2, 3, &w, 2),
            vec![1 - 2 + 6, -128 + 381, 255 + 2, 255 * -128 + 127]
        );
    }

    #[test]
    fn every_kernel_equals_a_scalar_reference_on_ragged_shapes() {
        let paths = available_paths();
        let names: Vec<&str> = paths.iter().map(|p| p.0).collect();
        // No SIMD kernel on this machine still leaves the portable one (and the dispatcher)
        // against the reference; the log says which kernels ran.
        eprintln!("int8 gemm paths checked against the scalar reference: {names:?}");
        assert_eq!(names[0], "portable");
        // m, k, n off every vector width and block (AVX2: 16 columns per step, 2 × 4
        // register blocks, 64 weight rows per task; portable: 32-column chunks), the
        // dispatcher's AVX2 threshold (16 rows, hit exactly once), and two larger shapes that cross the
        // portable kernel's threading threshold (m·n·k ≥ 2^20) and the AVX2 task block.
        let mut shapes = Vec::new();
        for m in [1, 3, 17] {
            for k in [1, 7, 33, 257] {
                for n in [1, 5, 19] {
                    shapes.push((m, k, n));
                }
            }
        }
        shapes.extend([
            (17, 70, 130),
            (32, 256, 257),
            (19, 5, 3),
            (16, 33, 5),
            (17, 257, 257),
        ]);
        let mut next = stream(0x5EED);
        let mut checks = 0;
        for &(m, k, n) in &shapes {
            // Random codes with the extremes forced in often, then all-extreme codes
            // (255 · -128 in every product: the largest sums the kernels must hold).
            let random_a: Vec<u8> = (0..m * k)
                .map(|_| match next() % 8 {
                    0 => 255,
                    1 => 0,
                    _ => next() as u8,
                })
                .collect();
            let random_w: Vec<i8> = (0..n * k)
                .map(|_| match next() % 8 {
                    0 => -128,
                    1 => 127,
                    _ => next() as i8,
                })
                .collect();
            let extreme_a = vec![255u8; m * k];
            let extreme_w = vec![-128i8; n * k];
            for (data, a, w) in [
                ("random", &random_a, &random_w),
                ("extreme", &extreme_a, &extreme_w),
            ] {
                let want = scalar_reference(a, m, k, w, n);
                if data == "extreme" {
                    assert_eq!(want, vec![255 * -128 * k as i32; m * n]);
                }
                for (name, gemm) in &paths {
                    assert_eq!(
                        gemm(a, m, k, w, n),
                        want,
                        "{name} kernel, {data} codes, shape {m}x{k}x{n}"
                    );
                    checks += 1;
                }
            }
        }
        // Every path met the reference on every shape and data set: nothing was skipped.
        assert_eq!(checks, 2 * shapes.len() * paths.len());
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
