//! FP8 E4M3 (the `float8_e4m3fn` of PyTorch, OCP FP8 and the H100/H200 tensor cores): one
//! sign bit, four exponent bits (bias 7), three mantissa bits, no infinities, one NaN code
//! per sign (`S.1111.111`); largest finite value 448, smallest normal 2⁻⁶, subnormal step
//! 2⁻⁹. Values are scaled into that range first (per output channel or per tensor, as
//! torchao/vLLM do: `scale = amax / 448`), then rounded to nearest, ties to even, with
//! saturation at ±448 (torchao clamps before its cast, since the plain cast gives NaN).

use anyhow::{bail, Result};

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The value of an E4M3 code; NaN for the two NaN codes.
pub fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = (code >> 3) & 0x0f;
    let man = (code & 0x07) as f32;
    if exp == 0x0f && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        man * 2f32.powi(-9)
    } else {
        (8.0 + man) * 2f32.powi(exp as i32 - 10)
    };
    sign * magnitude
}

/// The 256 decoded values, for table lookups in kernels.
pub fn decode_table() -> [f32; 256] {
    std::array::from_fn(|c| decode(c as u8))
}

/// `x` rounded to the nearest E4M3 value (ties to even), saturating at ±448; NaN is
/// refused by the callers (weights are checked finite before quantizing).
pub fn encode(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    // The spacing of representable values around `a`: 2^(e-3) in the binade [2^e, 2^(e+1))
    // for normal values, 2^-9 below the smallest normal 2^-6. Dividing by a power of two is
    // exact, so rounding the quotient is rounding `a` itself.
    let e = if a >= 2f32.powi(-6) {
        ((a.to_bits() >> 23) as i32 - 127).clamp(-6, 8)
    } else {
        -6
    };
    let step = 2f32.powi(e - 3);
    let q = (a / step).round_ties_even() * step;
    let q = q.min(E4M3_MAX);
    if q == 0.0 {
        return sign;
    }
    // Rounding may carry into the next binade (e.g. 15.5 steps → 16): re-read the exponent.
    let code = if q < 2f32.powi(-6) {
        (q / 2f32.powi(-9)) as u8
    } else {
        let e = (q.to_bits() >> 23) as i32 - 127;
        let man = (q / 2f32.powi(e - 3)) as u8 - 8;
        (((e + 7) as u8) << 3) | man
    };
    sign | code
}

/// Where the scale of an FP8 weight is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Scaling {
    /// One scale per output row (`amax(row) / 448`).
    PerChannel,
    /// One scale for the whole tensor.
    PerTensor,
}

/// `[rows, cols]` values as E4M3 codes with their f32 scales (`rows` of them per channel,
/// one per tensor): value ≈ `decode(code) · scale`. An all-zero row gets scale 1.
pub fn quantize_matrix(
    w: &[f32],
    rows: usize,
    cols: usize,
    scaling: Fp8Scaling,
) -> Result<(Vec<u8>, Vec<f32>)> {
    if w.len() != rows * cols {
        bail!(
            "fp8: {} values for a {rows}x{cols} matrix (expected {})",
            w.len(),
            rows * cols
        );
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        bail!(
            "fp8: the weight holds a non-finite value ({}) at row {}, column {}",
            w[i],
            i / cols.max(1),
            i % cols.max(1)
        );
    }
    let scale_of = |vals: &[f32]| {
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax > 0.0 {
            amax / E4M3_MAX
        } else {
            1.0
        }
    };
    let scales = match scaling {
        Fp8Scaling::PerChannel => w.chunks(cols.max(1)).map(scale_of).collect(),
        Fp8Scaling::PerTensor => vec![scale_of(w)],
    };
    let codes = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = scales[if scales.len() == 1 { 0 } else { i / cols }];
            encode(v / s)
        })
        .collect();
    Ok((codes, scales))
}

/// One activation row fake-quantized to E4M3 with its own dynamic scale (`amax / 448`,
/// vLLM's per-token FP8), in place: what an FP8 × FP8 GEMM multiplies with.
pub fn fake_quantize_row(x: &mut [f32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return;
    }
    let s = amax / E4M3_MAX;
    for v in x.iter_mut() {
        *v = decode(encode(*v / s)) * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of a code from its definition, in f64, sharing nothing with `decode`.
    fn reference(code: u8) -> Option<f64> {
        let s = if code >> 7 == 1 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 15) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return None;
        }
        Some(if e == 0 {
            s * m / 8.0 * 2f64.powi(-6)
        } else {
            s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        })
    }

    #[test]
    fn decode_matches_the_definition_on_every_code() {
        for c in 0..=255u8 {
            match reference(c) {
                Some(v) => assert_eq!(decode(c) as f64, v, "code {c:#04x}"),
                None => assert!(decode(c).is_nan()),
            }
        }
        assert_eq!(decode(0x7e), 448.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x08), 2f32.powi(-6));
    }

    #[test]
    fn every_finite_code_round_trips() {
        for c in 0..=255u8 {
            if let Some(v) = reference(c) {
                assert_eq!(encode(v as f32), c, "value {v}");
            }
        }
    }

    /// Brute force: the nearest finite code in f64, ties to the even mantissa.
    fn nearest(x: f64) -> f64 {
        let x = x.clamp(-448.0, 448.0);
        let mut best = (f64::INFINITY, 0.0, 0u8);
        for c in 0..=255u8 {
            let Some(v) = reference(c) else { continue };
            let d = (v - x).abs();
            let better = d < best.0 || (d == best.0 && c & 1 == 0 && best.2 & 1 == 1);
            if better {
                best = (d, v, c);
            }
        }
        best.1
    }

    #[test]
    fn encode_rounds_to_nearest_even_and_saturates() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut values: Vec<f32> = (0..20_000)
            .map(|_| {
                let mag = 2f64.powf(rng.gen_range(-12.0..10.0));
                (if rng.gen::<bool>() { -mag } else { mag }) as f32
            })
            .collect();
        // Every exact midpoint between neighbouring codes: the tie cases.
        let finite: Vec<f64> = (0..=0x7eu8).filter_map(reference).collect();
        values.extend(finite.windows(2).map(|w| ((w[0] + w[1]) / 2.0) as f32));
        values.extend([500.0, -1e9, 464.0, 448.0, 0.0, -0.0]);
        for v in values {
            let got = decode(encode(v)) as f64;
            assert_eq!(got, nearest(v as f64), "x = {v:e}");
        }
    }

    /// Codes recorded with ml_dtypes' float8_e4m3fn (torch's rounding) by
    /// `scripts/fp8_reference.py`, after torchao's clamp to ±448.
    #[test]
    fn codes_match_the_recorded_ml_dtypes_cast() {
        let f: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/fp8_e4m3.json")).unwrap();
        let bits = |k: &str| -> Vec<f32> {
            f[k].as_array()
                .unwrap()
                .iter()
                .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
                .collect()
        };
        let codes = |k: &str| -> Vec<u8> {
            f[k].as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_u64().unwrap() as u8)
                .collect()
        };
        let (vals, want) = (bits("values_f32_bits"), codes("codes"));
        assert!(vals.len() > 1000);
        for (v, c) in vals.iter().zip(&want) {
            // ml_dtypes keeps the sign of zero; so do we.
            assert_eq!(encode(*v), *c, "x = {v:e}");
        }
        let (w, s) = (bits("matrix_f32_bits"), bits("matrix_scale_f32_bits"));
        let (got_codes, got_scales) = quantize_matrix(&w, 4, 40, Fp8Scaling::PerChannel).unwrap();
        assert_eq!(got_scales, s);
        assert_eq!(got_codes, codes("matrix_codes"));
    }

    #[test]
    fn quantize_matrix_scales_per_channel_and_refuses_nan() {
        let w = [1.0, -2.0, 0.5, 0.0, 0.0, 0.0];
        let (codes, scales) = quantize_matrix(&w, 2, 3, Fp8Scaling::PerChannel).unwrap();
        assert_eq!(scales, vec![2.0 / 448.0, 1.0]);
        assert_eq!(decode(codes[1]) * scales[0], -2.0);
        assert_eq!(codes[3..], [0, 0, 0]);
        let (_, s) = quantize_matrix(&w, 2, 3, Fp8Scaling::PerTensor).unwrap();
        assert_eq!(s, vec![2.0 / 448.0]);
        let err = quantize_matrix(&[1.0, f32::NAN], 1, 2, Fp8Scaling::PerTensor).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }
}
