use super::gemm::{block, Acc, Tile, MR, NP};
use super::pack::{KGROUP, PANEL};
use super::*;
use crate::nn::kernels::Isa;

/// The reference: a plain i32 triple loop over row-major operands, sharing no code with
/// the kernels (no packing, no tiles).
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

/// The reference epilogue, written out from the definition.
#[allow(clippy::too_many_arguments)]
fn reference_output(
    acc: &[i32],
    m: usize,
    n: usize,
    sa: &[f32],
    za: &[i32],
    sw: &[f32],
    rs: &[i32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let centred = acc[i * n + j] - za[i] * rs[j];
            let mut v = sa[i] * sw[j] * centred as f32;
            if let Some(b) = bias {
                v += b[j];
            }
            y[i * n + j] = v;
        }
    }
    y
}

/// The integer sums of every tile of up to `step` panels (`NP`: the tiled GEMM; 1: the
/// decode walk), through the micro-kernel of `isa` only.
fn sums_with(isa: Isa, a: &ActRows, w: &PackedI8, step: usize) -> Vec<i32> {
    let (m, n) = (a.m, w.n);
    let mut out = vec![0i32; m * n];
    let ps = w.panel_stride();
    let mut acc: Acc = [[0; NP * PANEL]; MR];
    for p0 in (0..w.panels()).step_by(step) {
        let np = step.min(w.panels() - p0);
        for r0 in (0..m).step_by(MR) {
            let nr = MR.min(m - r0);
            let tile = Tile {
                a: &a.codes[r0 * a.stride..(r0 + nr) * a.stride],
                stride: a.stride,
                w: &w.data()[p0 * ps..(p0 + np) * ps],
                panel_stride: ps,
                groups: w.kp / KGROUP,
            };
            block(isa, &tile, nr, np, &mut acc);
            for r in 0..nr {
                for j in p0 * PANEL..((p0 + np) * PANEL).min(n) {
                    out[(r0 + r) * n + j] = acc[r][j - p0 * PANEL];
                }
            }
        }
    }
    out
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

/// Codes already quantized, wrapped as kernel input rows with the given per-row params.
fn rows_from_codes(codes: &[u8], m: usize, k: usize, kp: usize, sa: &[f32], za: &[i32]) -> ActRows {
    let mut padded = vec![0u8; m * kp];
    for i in 0..m {
        padded[i * kp..i * kp + k].copy_from_slice(&codes[i * k..(i + 1) * k]);
    }
    ActRows {
        m,
        k,
        stride: kp,
        codes: padded,
        scale: sa.to_vec(),
        zero_point: za.to_vec(),
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
fn packing_puts_four_k_of_sixteen_channels_together() {
    // 17 channels × 7 k: two panels, kp = 8.
    let (n, k) = (17, 7);
    let w: Vec<i8> = (0..n * k).map(|i| (i % 100) as i8).collect();
    let p = PackedI8::new(&w, n, k);
    assert_eq!((p.kp, p.panels(), p.panel_stride()), (8, 2, 128));
    let d = p.data();
    // channel 3, k = 6 → panel 0, group 1, byte 3·4 + 2
    assert_eq!(d[64 + 3 * 4 + 2], w[3 * k + 6]);
    // channel 16, k = 4 → panel 1, group 1, channel 0, byte 0
    assert_eq!(d[128 + 64], w[16 * k + 4]);
    // padding: k = 7 and channels 17..32 are zero
    assert_eq!(d[64 + 3 * 4 + 3], 0);
    assert!(d[128 + 4..128 + 64].iter().all(|&v| v == 0));
    assert_eq!(
        p.row_sum[16],
        w[16 * k..17 * k].iter().map(|&v| v as i32).sum::<i32>()
    );
}

#[test]
fn every_kernel_equals_a_scalar_reference_on_ragged_shapes() {
    let paths = Isa::available();
    eprintln!("int8 paths checked against the scalar reference: {paths:?}");
    assert_eq!(paths[0], Isa::Portable);
    // m, k, n off every vector width and block: m = 1 (GEMV), tiles of 4 rows (AVX2: pairs),
    // k not a multiple of 4, 16 or 64, n not a multiple of 16 or of the 64-channel tile;
    // then shapes over the threading thresholds, split by panels (decode, m <= 4:
    // m·n·kp >= 2^18; 4 < m < 16: >= 2^22) and by rows (m >= 16, m·n·kp >= 2^19, with a
    // ragged last task). The decode walk (m <= 4, n·kp >= 2^18) reads one panel at a time
    // and must give the same bits as the tiles.
    let mut shapes = Vec::new();
    for m in [1, 2, 3, 5, 9] {
        for k in [1, 3, 7, 33, 65, 257] {
            for n in [1, 5, 16, 17, 70] {
                shapes.push((m, k, n));
            }
        }
    }
    shapes.extend([
        (1, 1537, 577),
        (1, 577, 7300),
        (2, 577, 460),
        (3, 1025, 300),
        (5, 577, 230),
        (4, 1537, 17),
        (9, 300, 301),
        (9, 700, 701),
        (33, 100, 200),
        (64, 784, 256),
        (17, 1000, 65),
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
        // Per-row activation params and per-channel weight scales and bias.
        let sa: Vec<f32> = (0..m).map(|_| (next() % 1000 + 1) as f32 / 3e4).collect();
        let za: Vec<i32> = (0..m).map(|_| (next() % 256) as i32).collect();
        let sw: Vec<f32> = (0..n).map(|_| (next() % 1000 + 1) as f32 / 7e4).collect();
        let bias: Vec<f32> = (0..n).map(|_| (next() % 2001) as f32 / 1e3 - 1.0).collect();
        for (data, a, w) in [
            ("random", &random_a, &random_w),
            ("extreme", &extreme_a, &extreme_w),
        ] {
            let want = scalar_reference(a, m, k, w, n);
            if data == "extreme" {
                assert_eq!(want, vec![255 * -128 * k as i32; m * n]);
            }
            let packed = PackedI8::new(w, n, k);
            let rows = rows_from_codes(a, m, k, packed.kp, &sa, &za);
            let rs: Vec<i32> = (0..n)
                .map(|j| (0..k).map(|p| w[j * k + p] as i32).sum())
                .collect();
            for &isa in &paths {
                for step in [NP, 1] {
                    assert_eq!(
                        sums_with(isa, &rows, &packed, step),
                        want,
                        "{isa:?} micro-kernel, {step}-panel tiles, {data} codes, shape {m}x{k}x{n}"
                    );
                }
                for b in [None, Some(&bias[..])] {
                    let y = gemm_u8_i8_f32_with(isa, &rows, &packed, &sw, b);
                    let r = reference_output(&want, m, n, &sa, &za, &sw, &rs, b);
                    // Bit-identical: the same f32 operations in the same order.
                    let same = y.iter().zip(&r).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(
                        same && y.len() == r.len(),
                        "{isa:?} gemm, {data} codes, shape {m}x{k}x{n}, bias {}",
                        b.is_some()
                    );
                }
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
    // half to even: 0.5 → 0, 1.5 → 2, 2.5 → 2, -0.5 → 0 (+ zp 10); NaN → 0, ∞ → 255
    let q = quantize_u8(
        &[
            0.5,
            1.5,
            2.5,
            -0.5,
            f32::NAN,
            f32::INFINITY,
            -1e9,
            300.0,
            1.0,
        ],
        1.0,
        10,
    );
    assert_eq!(q, vec![10, 12, 12, 10, 0, 255, 0, 255, 11]);
}

#[test]
fn vectorised_quantization_and_min_max_equal_the_scalar_definition() {
    let mut next = stream(7);
    for len in [0usize, 1, 7, 8, 9, 31, 1000] {
        let x: Vec<f32> = (0..len)
            .map(|_| (next() % 100_000) as f32 / 1000.0 - 37.0)
            .collect();
        let (lo, hi) = min_max(&x);
        let want = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        assert_eq!((lo, hi), want);
        let (s, z) = activation_qparams_u8(lo, hi);
        let q = quantize_u8(&x, s, z);
        for (&v, &c) in x.iter().zip(&q) {
            let r = ((v * (1.0 / s)).round_ties_even() + z as f32).clamp(0.0, 255.0) as u8;
            assert_eq!(c, r);
        }
        assert!(act::all_finite(&x));
    }
    let mut x = vec![0.0f32; 17];
    x[12] = f32::NAN;
    assert!(!act::all_finite(&x));
    assert!(!act::all_finite(&[1.0, f32::NEG_INFINITY]));
}

#[test]
fn per_row_activation_rows_pad_and_keep_their_params() {
    let x = [0.0f32, 1.0, 2.0, -1.0, 0.5, 4.0];
    let r = ActRows::per_row(&x, 2, 3, 4, &[1.0, 0.5], &[0, 10]);
    assert_eq!(r.codes, vec![0, 1, 2, 0, 8, 11, 18, 0]);
    assert_eq!(
        (r.scale.clone(), r.zero_point.clone()),
        (vec![1.0, 0.5], vec![0, 10])
    );
    let t = ActRows::per_tensor(&x, 2, 3, 4, 1.0, 1);
    assert_eq!(t.codes, vec![1, 2, 3, 0, 0, 1, 5, 0]);
    assert_eq!(t.zero_point, vec![1, 1]);
}

#[test]
fn every_activation_path_equals_the_scalar_definition() {
    let mut next = stream(11);
    let specials = [
        0.5f32,
        -0.5,
        1.5,
        2.5,
        -2.5,
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e30,
        127.5,
        128.5,
        254.5,
    ];
    for len in [0usize, 1, 7, 8, 9, 17, 64, 1001] {
        let x: Vec<f32> = (0..len)
            .map(|_| match next() % 10 {
                0 => specials[(next() % specials.len() as u64) as usize],
                _ => (next() % 200_000) as f32 / 997.0 - 100.0,
            })
            .collect();
        let finite: Vec<f32> = x.iter().copied().filter(|v| v.is_finite()).collect();
        for (scale, zp) in [(1.0f32, 0), (0.5, 128), (0.0371, 255), (3.0, 17)] {
            let mut want = vec![0u8; len];
            for (w, &v) in want.iter_mut().zip(&x) {
                *w = ((v * (1.0 / scale)).round_ties_even() + zp as f32).clamp(0.0, 255.0) as u8;
            }
            let mut got = vec![0u8; len];
            act::quantize_into_portable(&x, scale, zp, &mut got);
            assert_eq!(got, want, "portable, len {len}");
            #[cfg(target_arch = "x86_64")]
            if Isa::detected() >= Isa::Avx2 {
                let mut got = vec![0u8; len];
                // SAFETY: AVX2 detected.
                unsafe { act::x86::quantize_into(&x, scale, zp, &mut got) };
                assert_eq!(got, want, "avx2, len {len}, scale {scale}, zp {zp}");
            }
        }
        let fold = |v: &[f32]| {
            v.iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                })
        };
        assert_eq!(act::min_max_portable(&x), fold(&x));
        assert_eq!(min_max(&x), fold(&x));
        assert_eq!(
            act::finite_range(&x).is_some(),
            x.iter().all(|v| v.is_finite())
        );
        #[cfg(target_arch = "x86_64")]
        if Isa::detected() >= Isa::Avx2 {
            // SAFETY: AVX2 detected.
            let (l, h, all) = unsafe { act::x86::min_max_finite(&finite) };
            assert!(all);
            let (fl, fh) = fold(&finite);
            // equal up to the sign of a zero
            assert!(l == fl && h == fh, "{l} {h} vs {fl} {fh}");
            let (_, _, all) = unsafe { act::x86::min_max_finite(&x) };
            assert_eq!(all, x.iter().all(|v| v.is_finite()));
        }
    }
}
