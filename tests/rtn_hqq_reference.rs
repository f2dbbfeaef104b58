//! quantlab's RTN variants and HQQ against the float64 references of
//! `scripts/rtn_reference.py` and `scripts/hqq_reference.py` (fixtures in tests/fixtures),
//! and the grouped format they write, end to end on a ragged layer.

use candle_core::{Device, Tensor};
use quantlab::nn::algo::LayerInput;
use quantlab::nn::format::grouped::Grouped;
use quantlab::nn::format::WeightFormat;
use quantlab::quant::hqq::{self, HqqParams};
use quantlab::quant::rtn_variants::{clip_grid, clip_search, signed_max, ClipObjective};
use quantlab::quant::{quantize_with, Scheme};
use serde_json::Value;
use std::sync::Arc;

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn dims(f: &Value) -> (usize, usize, usize) {
    let u = |k: &str| f[k].as_u64().unwrap() as usize;
    (u("rows"), u("cols"), u("group"))
}

/// Positions where the codes differ, each of which must be a reference near-tie (a value
/// whose quotient is within 1e-5 of a half integer in f64, where f32 arithmetic may round
/// the other way).
fn mismatches_outside_ties(got: &[i64], want: &[i64], ties: &[i64]) -> Vec<usize> {
    assert_eq!(got.len(), want.len());
    (0..got.len())
        .filter(|&i| got[i] != want[i] && !ties.contains(&(i as i64)))
        .collect()
}

#[test]
fn signed_max_matches_the_f64_reference() {
    let f = fixture("rtn_reference.json");
    let (rows, cols, group) = dims(&f);
    let w = f32s(&f["weights"]);
    for bits in [4u8, 3] {
        let r = &f["signed_max"][format!("i{bits}")];
        let (codes, params) = signed_max(&w, rows, cols, bits, group).unwrap();
        let got: Vec<i64> = codes.iter().map(|&c| c as i8 as i64).collect();
        let bad = mismatches_outside_ties(&got, &ints(&r["codes"]), &ints(&r["near_ties"]));
        assert!(bad.is_empty(), "{bits} bits: codes differ at {bad:?}");
        // d = m / −2^(b−1) is exact in f32 and f64 alike (a power-of-two divisor).
        assert_eq!(params.scale, f32s(&r["scale"]), "{bits} bits");
        assert!(params.zero_point.iter().all(|&z| z == 0));
    }
}

#[test]
fn clip_search_matches_the_f64_reference() {
    let f = fixture("rtn_reference.json");
    let (rows, cols, _) = dims(&f);
    let w = f32s(&f["weights"]);
    let t = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
    let grid = clip_grid();
    // The grid is the reference's (1.00 down to 0.20 in hundredths).
    let want_grid = f64s(&f["grid"]);
    assert_eq!(grid.len(), want_grid.len());
    for (a, b) in grid.iter().zip(&want_grid) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }
    for (spec, rtn, objective) in [
        ("i4:sym", "i4:sym:g64", ClipObjective::Mse),
        ("u3:affine", "u3:affine:g64", ClipObjective::Mse),
        ("i2:sym", "i2:sym:g64", ClipObjective::Mse),
        ("i3:sym:x2", "i3:sym:g64", ClipObjective::X2),
    ] {
        let r = &f["clip"][spec];
        let scheme: Scheme = rtn.parse().unwrap();
        let (params, alphas) = clip_search(&w, rows, cols, &scheme, &grid, objective).unwrap();
        let best = ints(&r["best"]);
        let candidates = r["errors"].as_array().unwrap();
        let mut same = vec![false; best.len()];
        for (g, a) in alphas.iter().enumerate() {
            let idx = grid.iter().position(|x| x == a).unwrap() as i64;
            // The factor chosen in f32 is one whose f64 error is within 1e-4 of the best.
            let ok = candidates[g]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c[0].as_i64().unwrap() == idx);
            assert!(
                ok,
                "{spec} group {g}: factor index {idx}, reference {}",
                best[g]
            );
            same[g] = idx == best[g];
        }
        let differing = same.iter().filter(|s| !**s).count();
        assert!(
            differing <= 2,
            "{spec}: {differing} groups chose another factor"
        );
        // Codes of the groups that chose the reference's factor match except at ties.
        let q = quantize_with(&t, &scheme, params).unwrap();
        let got = q.codes_i32().unwrap();
        let want = ints(&r["codes"]);
        let ties = ints(&r["near_ties"]);
        let gpr = cols.div_ceil(64);
        for i in 0..got.len() {
            let (o, p) = (i / cols, i % cols);
            let g = o * gpr + p / 64;
            if same[g] && got[i] as i64 != want[i] {
                assert!(
                    ties.contains(&(i as i64)),
                    "{spec}: code {i} differs off a tie"
                );
            }
        }
    }
}

#[test]
fn pytorch_symmetric_rtn_counts_the_ties_the_reference_counts() {
    let f = fixture("rtn_reference.json");
    let (rows, cols, _) = dims(&f);
    let w = f32s(&f["weights"]);
    let t = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
    for bits in [4, 3] {
        let want = f["pytorch_sym_ties"][format!("i{bits}")]["ties"]
            .as_u64()
            .unwrap() as usize;
        let scheme: Scheme = format!("i{bits}:sym:g64").parse().unwrap();
        let g = Grouped::quantize(&t, &scheme, "layer").unwrap();
        assert_eq!(g.ties(), Some(want), "{bits} bits");
        // Nearly every group's largest weight: 32 groups.
        assert!(want > 20, "{want}");
    }
}

#[test]
fn hqq_matches_the_f64_reference() {
    let f = fixture("hqq_reference.json");
    let (rows, cols, group) = dims(&f);
    let w = f32s(&f["weights"]);
    for bits in [4u8, 3, 2] {
        let r = &f["bits"][bits.to_string()];
        let h = hqq::quantize(&w, rows, cols, bits, group, &HqqParams::default()).unwrap();
        // The early stop fires at the same iteration: the per-iteration errors differ by
        // rounding only (checked below), far less than the gaps the stop compares.
        assert_eq!(
            h.iterations as u64,
            r["iterations"].as_u64().unwrap(),
            "{bits}"
        );
        let errors = f64s(&r["errors"]);
        assert!(
            (h.first_error - errors[0]).abs() <= 1e-6 * errors[0],
            "{bits}"
        );
        let best = errors.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!((h.best_error - best).abs() <= 1e-5 * best, "{bits}");
        // Scale 1/s with s = (2^b − 1)/(max − min): three f32 roundings, ≤ 2e-7 each.
        for (a, b) in h.scale.iter().zip(f64s(&r["scale"])) {
            assert!(
                ((*a as f64) - b).abs() <= 1e-6 * b.abs(),
                "{bits}: {a} vs {b}"
            );
        }
        // Zero: a mean of `group` f32 terms of size up to ~2^b per iteration, each rounded
        // at ~6e-8 relative, carried through ≤ 20 iterations that do not amplify it
        // (the codes agree, so the update is the same affine map): 2^b · 20 · 1e-6 bounds it.
        let tol = (1u32 << bits) as f64 * 20.0 * 1e-6;
        for (g, (a, b)) in h.zero.iter().zip(f64s(&r["zero"])).enumerate() {
            assert!(
                ((*a as f64) - b).abs() <= tol,
                "{bits} group {g}: {a} vs {b}"
            );
        }
        let got: Vec<i64> = h.codes.iter().map(|&c| c as i64).collect();
        let bad = mismatches_outside_ties(&got, &ints(&r["codes"]), &ints(&r["near_ties"]));
        assert!(bad.is_empty(), "{bits} bits: codes differ at {bad:?}");
    }
}

/// A ragged `[rows, cols]` layer through a plan method, checked against decoding its
/// stored parts by hand, multiplied on every path, and saved and loaded again.
fn check_layer(method: &str, rows: usize, cols: usize, group: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64 * 1000 + cols as u64);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let u: f32 = rng.gen_range(-1.0..1.0);
            u * u * u * 0.2
        })
        .collect();
    let dense: Arc<dyn WeightFormat> = Arc::new(
        quantlab::nn::format::dense::Dense::new(
            Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap(),
        )
        .unwrap(),
    );
    let algo = quantlab::nn::registry::parse_algorithm(method).unwrap();
    let f = algo
        .apply(&LayerInput {
            name: "l",
            weight: &dense,
            calibration: None,
        })
        .unwrap();
    let g = f.as_any().downcast_ref::<Grouped>().unwrap();
    assert!(g.ties().is_some(), "{method}");
    // Decode by hand from what the format stores.
    let codes = g.q.codes_i32().unwrap();
    let scale = &g.q.params.scale;
    let zero: Vec<f32> = match g.float_zero() {
        Some(z) => z.to_vec(),
        None => g.q.params.zero_point.iter().map(|&z| z as f32).collect(),
    };
    let per_row = cols.div_ceil(group);
    assert_eq!(scale.len(), rows * per_row, "{method}");
    let want: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let k = (i / cols) * per_row + (i % cols) / group;
            (codes[i] as f32 - zero[k]) * scale[k]
        })
        .collect();
    let deq = f
        .dequantize()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(deq, want, "{method}");
    // The quantized weights are close to the originals (a few steps at most).
    let max_step = scale.iter().map(|s| s.abs()).fold(0f32, f32::max);
    for (a, b) in deq.iter().zip(&w) {
        assert!((a - b).abs() <= 4.0 * max_step, "{method}: {a} vs {b}");
    }
    // forward (1, few and many rows) against x · Ŵᵀ in f64.
    for m in [1usize, 5, 40] {
        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let xt = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
        let y = f
            .forward(&xt, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for r in 0..m {
            for o in 0..rows {
                let (mut e, mut mag) = (0f64, 0f64);
                for p in 0..cols {
                    let t = x[r * cols + p] as f64 * want[o * cols + p] as f64;
                    e += t;
                    mag += t.abs();
                }
                let tol = (cols as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-12;
                let got = y[r * rows + o] as f64;
                assert!((got - e).abs() <= tol, "{method} m={m}: {got} vs {e}");
            }
        }
    }
    // Stored bytes are what the tensors hold; the loader gives back the same weight.
    let tensors = f.tensors("l").unwrap();
    let bytes: usize = tensors.iter().map(|t| t.tensor.bytes.len()).sum();
    assert_eq!(bytes, f.stored_bytes(), "{method}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("l.safetensors");
    quantlab::load::write_safetensors(&file, &tensors, Default::default()).unwrap();
    let mut src = quantlab::load::SafetensorsSource::open(std::slice::from_ref(&file)).unwrap();
    let mut parts = quantlab::nn::format::StoredParts::new("l", &mut src);
    let back = Grouped::load((rows, cols), &f.meta(), &mut parts, &Device::Cpu).unwrap();
    let bg = back.as_any().downcast_ref::<Grouped>().unwrap();
    assert_eq!(bg.ties(), g.ties(), "{method}");
    assert_eq!(back.describe(), f.describe());
    assert_eq!(
        back.dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        deq,
        "{method}"
    );
}

#[test]
fn every_variant_stores_decodes_multiplies_and_reloads() {
    for (method, rows, cols, group) in [
        ("rtn-signed-max:i4:g64", 7, 200, 64),
        ("rtn-signed-max:i3:ch0", 5, 77, 77),
        ("rtn-signed-max:i8:g32", 3, 96, 32),
        ("rtn-clip:i4:sym:g64", 7, 200, 64),
        ("rtn-clip:u3:affine:g32", 9, 100, 32),
        ("rtn-clip:u2:affine:ch0", 4, 50, 50),
        ("rtn-clip:i3:sym:g32:x2", 5, 100, 32),
        ("hqq:u4:g64", 7, 192, 64),
        ("hqq:u3:g32", 5, 96, 32),
        ("hqq:u2:ch0", 6, 77, 77),
        // Groups of 16: no kernel layout, the real zero points decode on the fallback.
        ("hqq:u4:g16", 3, 48, 16),
        ("w:i4:sym:g64", 7, 200, 64),
    ] {
        check_layer(method, rows, cols, group);
    }
    // HQQ needs groups that divide the row.
    let dense: Arc<dyn WeightFormat> = Arc::new(
        quantlab::nn::format::dense::Dense::new(
            Tensor::zeros((2, 100), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap(),
    );
    let e = quantlab::nn::registry::parse_algorithm("hqq:u4:g64")
        .unwrap()
        .apply(&LayerInput {
            name: "l",
            weight: &dense,
            calibration: None,
        })
        .unwrap_err();
    assert!(format!("{e:#}").contains("divides"), "{e:#}");
}
