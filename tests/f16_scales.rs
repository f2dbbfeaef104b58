//! f16 group scales (`:f16-scales` on `w:` RTN and GPTQ): the codes are rounded with the
//! f16 scale that is stored, checked against a plain-loop reference (f64 scale from the
//! group's range, rounded to f16 by the `half` crate, codes `clamp(round_half_even(w/s))`),
//! on ragged shapes; GPTQ with a diagonal Hessian equals RTN code for code; stored bytes
//! are 2 per group less than with f32 scales and equal what the tensors hold.

use candle_core::{Device, Tensor};
use quantlab::nn::algo::LayerInput;
use quantlab::nn::format::grouped::Grouped;
use quantlab::nn::format::WeightFormat;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn weight(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| {
            let u: f32 = rng.gen_range(-1.0..1.0);
            u * u * u * 0.3
        })
        .collect()
}

fn apply(
    method: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    hessian: Option<Vec<f64>>,
) -> Arc<dyn WeightFormat> {
    let dense: Arc<dyn WeightFormat> = Arc::new(
        quantlab::nn::format::dense::Dense::new(
            Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap(),
        )
        .unwrap(),
    );
    let calibration = hessian.map(|h| quantlab::nn::calib::Calibration {
        rows: 100,
        hessian: Some(h),
        ..Default::default()
    });
    quantlab::nn::registry::parse_algorithm(method)
        .unwrap()
        .apply(&LayerInput {
            name: "l",
            weight: &dense,
            calibration: calibration.as_ref(),
        })
        .unwrap()
}

/// Half an f16 step at `s` (f16 has 10 fraction bits).
fn half_ulp(s: f64) -> f64 {
    let e = s.abs().log2().floor().max(-14.0);
    2f64.powf(e - 11.0)
}

/// Codes for bits `b` signed symmetric, PyTorch's convention, in plain loops; `None` for
/// weights within 1e-4 steps of a rounding tie (either code is right there).
fn reference(w: &[f32], cols: usize, group: usize, bits: u32) -> (Vec<f64>, Vec<Option<i32>>) {
    let (qmin, qmax) = (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1);
    let per_row = cols.div_ceil(group);
    let rows = w.len() / cols;
    let mut scales = Vec::new();
    let mut codes = vec![None; w.len()];
    for r in 0..rows {
        for g in 0..per_row {
            let (c0, c1) = (g * group, ((g + 1) * group).min(cols));
            let amax = w[r * cols + c0..r * cols + c1]
                .iter()
                .fold(0f64, |m, &x| m.max((x as f64).abs()));
            let s64 = amax / ((qmax - qmin) as f64 / 2.0);
            let s16 = half::f16::from_f64(s64).to_f64();
            scales.push(s64);
            for c in c0..c1 {
                let q = w[r * cols + c] as f64 / s16;
                if (q - q.floor() - 0.5).abs() > 1e-4 {
                    codes[r * cols + c] = Some((q.round() as i32).clamp(qmin, qmax));
                }
            }
        }
    }
    (scales, codes)
}

#[test]
fn rtn_with_f16_scales_matches_the_reference_and_stores_two_bytes_a_group() {
    for (rows, cols, group, bits) in [
        (7usize, 200usize, 64usize, 4u32),
        (5, 100, 32, 3),
        (1, 70, 64, 2),
        (9, 77, 77, 3),
    ] {
        let w = weight(rows, cols, (rows * cols) as u64);
        let gran = if group == cols {
            "ch0".to_string()
        } else {
            format!("g{group}")
        };
        let f = apply(
            &format!("w:i{bits}:sym:{gran}:f16-scales"),
            &w,
            rows,
            cols,
            None,
        );
        let g = f.as_any().downcast_ref::<Grouped>().unwrap();
        assert!(g.has_f16_scales());
        let (want_s, want_c) = reference(&w, cols, group, bits);
        for (s, r) in g.q.params.scale.iter().zip(&want_s) {
            assert_eq!(
                half::f16::from_f32(*s).to_f32(),
                *s,
                "stored scale is an f16 value"
            );
            assert!((*s as f64 - r).abs() <= half_ulp(*r) * 1.001, "{s} vs {r}");
        }
        let codes = g.q.codes_i32().unwrap();
        for (i, (c, r)) in codes.iter().zip(&want_c).enumerate() {
            if let Some(r) = r {
                assert_eq!(c, r, "{bits} bits, weight {i}");
            }
        }
        // Same codes and stored form as f32 scales, less 2 bytes a group.
        let f32s = apply(&format!("w:i{bits}:sym:{gran}"), &w, rows, cols, None);
        let groups = rows * cols.div_ceil(group);
        assert_eq!(f.stored_bytes() + 2 * groups, f32s.stored_bytes());
        let tensors = f.tensors("l").unwrap();
        let bytes: usize = tensors.iter().map(|t| t.tensor.bytes.len()).sum();
        assert_eq!(bytes, f.stored_bytes());
        assert_eq!(f.meta()["scale"], "f16");
        // Reload: same weight, still f16 scales.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("l.safetensors");
        quantlab::load::write_safetensors(&file, &tensors, Default::default()).unwrap();
        let mut src = quantlab::load::SafetensorsSource::open(std::slice::from_ref(&file)).unwrap();
        let mut parts = quantlab::nn::format::StoredParts::new("l", &mut src);
        let back = Grouped::load((rows, cols), &f.meta(), &mut parts, &Device::Cpu).unwrap();
        assert_eq!(back.stored_bytes(), f.stored_bytes());
        assert_eq!(back.describe(), f.describe());
        let deq = |x: &Arc<dyn WeightFormat>| {
            x.dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(deq(&back), deq(&f));
        // The decoded weights are (code × scale) exactly.
        let per_row = cols.div_ceil(group);
        for (i, v) in deq(&f).iter().enumerate() {
            let k = (i / cols) * per_row + (i % cols) / group;
            assert_eq!(*v, codes[i] as f32 * g.q.params.scale[k]);
        }
    }
}

#[test]
fn gptq_with_f16_scales_is_rtn_with_f16_scales_on_a_diagonal_hessian() {
    let (rows, cols) = (6usize, 150usize);
    let w = weight(rows, cols, 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut h = vec![0.0; cols * cols];
    for i in 0..cols {
        h[i * cols + i] = rng.gen_range(0.5..2.0);
    }
    for spec in ["i3:sym:g64", "i4:sym:g32"] {
        let g = apply(
            &format!("gptq:{spec}:f16-scales"),
            &w,
            rows,
            cols,
            Some(h.clone()),
        );
        let r = apply(&format!("w:{spec}:f16-scales"), &w, rows, cols, None);
        let (g, r) = (
            g.as_any().downcast_ref::<Grouped>().unwrap(),
            r.as_any().downcast_ref::<Grouped>().unwrap(),
        );
        assert!(g.has_f16_scales());
        assert_eq!(g.q.params, r.q.params, "{spec}");
        assert_eq!(g.q.codes_i32().unwrap(), r.q.codes_i32().unwrap(), "{spec}");
    }
    // A full Hessian: the scales are still f16 values, the result differs from RTN.
    let x: Vec<f64> = (0..200 * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut h = vec![0.0; cols * cols];
    for n in 0..200 {
        for i in 0..cols {
            for j in 0..cols {
                h[i * cols + j] += 2.0 / 200.0 * x[n * cols + i] * x[n * cols + j];
            }
        }
    }
    let g = apply("gptq:i3:sym:g64:f16-scales", &w, rows, cols, Some(h));
    let g = g.as_any().downcast_ref::<Grouped>().unwrap();
    assert!(g
        .q
        .params
        .scale
        .iter()
        .all(|s| half::f16::from_f32(*s).to_f32() == *s));
}

#[test]
fn unrounded_scales_are_refused_as_f16() {
    let w = Tensor::from_slice(&weight(2, 64, 1), (2, 64), &Device::Cpu).unwrap();
    let g = Grouped::quantize(&w, &"i4:sym:g64".parse().unwrap(), "l").unwrap();
    assert!(g.with_f16_scales().is_err());
}
