//! Scale folding (`nn::scaling`), SmoothQuant and AWQ: folding keeps the tiny Llama's
//! function, both methods run through `apply_plan`, and their searches match the float64
//! reference scripts (`scripts/smoothquant_reference.py`, `scripts/awq_reference.py`).

use candle_core::{Device, Tensor};
use quantlab::arch::llama::Llama;
use quantlab::nn::calib::{Calibration, Collector, Statistic};
use quantlab::nn::scaling::{self, GroupMut, Producer, ScaleGroup, ScaleSite};
use quantlab::nn::{apply_plan, HasLinears, Method, Plan, QLinear};
use quantlab::quant::{awq, Scheme};
use serde_json::Value;
use std::cell::Cell;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn tiny() -> Llama {
    Llama::from_hf_dir(&fixture("llama-tiny"), &Device::Cpu).unwrap()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| floats(r).iter().map(|&x| x as f32).collect())
        .collect();
    let (r, c) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (r, c), &Device::Cpu).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// Token windows of the tiny model's vocabulary for calibration.
fn windows() -> Vec<Vec<u32>> {
    (0..4u32)
        .map(|w| (0..24u32).map(|i| (i * 7 + w * 13 + 3) % 200).collect())
        .collect()
}

fn calibrate(m: &Llama) -> anyhow::Result<()> {
    for w in windows() {
        let ids = Tensor::from_vec(w.clone(), (1, w.len()), &m.device)?;
        m.forward(&ids, &mut m.new_cache(), false)?;
    }
    Ok(())
}

fn logits(m: &Llama) -> Vec<f32> {
    let w: Vec<u32> = (0..20u32).map(|i| (i * 11 + 5) % 200).collect();
    let ids = Tensor::from_vec(w, (1, 20), &m.device).unwrap();
    m.forward(&ids, &mut m.new_cache(), false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_tiny_llama_declares_norm_and_linear_fed_groups() {
    let m = tiny();
    let g = m.scale_groups();
    // Per block: input_layernorm, post_attention_layernorm, up -> down (GQA 4/2: no v -> o);
    // then the final norm.
    assert_eq!(g.len(), 2 * 3 + 1, "{g:?}");
    assert_eq!(
        g[2],
        ScaleGroup {
            input: ScaleSite::Linear("model.layers.0.mlp.up_proj".into()),
            linears: vec!["model.layers.0.mlp.down_proj".into()],
        }
    );
    assert!(!g
        .iter()
        .any(|x| x.input == ScaleSite::Linear("model.layers.0.self_attn.v_proj".into())));
    assert_eq!(g[6].linears, ["lm_head"]);
}

/// Folding random scales into every group leaves the logits unchanged up to f32 rounding:
/// each scaled product `(x_j / s_j)(w_ij s_j)` rounds twice more (~1e-7 relative each),
/// amplified by at most the depth of the 2-block model; logits here are O(1), the
/// reference test's own tolerance is 1e-4.
#[test]
fn folding_random_scales_keeps_the_model_function() {
    let mut m = tiny();
    let before = logits(&m);
    let mut rng = 12345u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as f64 / (1u64 << 31) as f64
    };
    for g in m.scale_groups() {
        let width = m
            .linears()
            .into_iter()
            .find(|l| l.name == g.linears[0])
            .unwrap()
            .in_features;
        // Scales from 1/4 to 4.
        let s: Vec<f32> = (0..width)
            .map(|_| 4f64.powf(2.0 * next() - 1.0) as f32)
            .collect();
        scaling::fold(m.scale_group_mut(&g).unwrap(), &s).unwrap();
    }
    let after = logits(&m);
    let d = max_diff(&before, &after);
    assert!(d < 1e-4, "logits moved by {d}");
    assert!(
        before != after,
        "the weights really changed (rounding differs)"
    );
}

#[test]
fn folding_refuses_bad_scales_and_quantized_layers() {
    let mut m = tiny();
    let g = m.scale_groups()[0].clone();
    let e = scaling::fold(m.scale_group_mut(&g).unwrap(), &[1.0; 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 scales"), "{e}");
    let e = scaling::fold(m.scale_group_mut(&g).unwrap(), &[0.0; 64])
        .unwrap_err()
        .to_string();
    assert!(e.contains("positive"), "{e}");
    let mut l = QLinear::new(
        "x",
        Tensor::ones((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
        None,
    )
    .unwrap();
    l.convert(&"w:i8:sym:ch0".parse().unwrap(), None).unwrap();
    let mut norm = Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = scaling::fold(
        GroupMut {
            producer: Producer::Norm(&mut norm),
            linears: vec![&mut l],
        },
        &[2.0; 8],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("f32 weights"), "{e}");
    // Nothing was changed by the refused fold.
    assert_eq!(norm.to_vec1::<f32>().unwrap(), [1.0; 8]);
}

/// SmoothQuant with an f32 "inner method" is a pure rescaling: the plan runs calibration,
/// folds the scales, and the model computes the same logits.
#[test]
fn smoothquant_through_apply_plan() {
    let base = logits(&tiny());
    let mut m = tiny();
    let calls = Cell::new(0);
    let plan: Plan = "*=sq:0.5+f32".parse().unwrap();
    apply_plan(&mut m, &plan, |m| {
        calls.set(calls.get() + 1);
        calibrate(m)
    })
    .unwrap();
    assert_eq!(calls.get(), 1);
    let d = max_diff(&base, &logits(&m));
    assert!(d < 1e-4, "logits moved by {d}");
    let norm = m
        .dense_tensors()
        .into_iter()
        .find(|(n, _)| n == "model.layers.0.input_layernorm.weight")
        .unwrap()
        .1;
    let orig = tiny()
        .dense_tensors()
        .into_iter()
        .find(|(n, _)| n == "model.layers.0.input_layernorm.weight")
        .unwrap()
        .1;
    assert_ne!(
        norm.to_vec1::<f32>().unwrap(),
        orig.to_vec1::<f32>().unwrap(),
        "the norm was smoothed"
    );
    // A per-tensor static range cannot follow the scaling: calibrated again after folding.
    let mut m = tiny();
    calls.set(0);
    let plan: Plan = "lm_head=keep;*=sq:0.5+static-int8".parse().unwrap();
    apply_plan(&mut m, &plan, |m| {
        calls.set(calls.get() + 1);
        calibrate(m)
    })
    .unwrap();
    assert_eq!(calls.get(), 2);
    // The same as smoothing in f32 first, then calibrating static int8 on the smoothed
    // model: the second pass saw the smoothed inputs.
    let mut two = tiny();
    apply_plan(
        &mut two,
        &"lm_head=keep;*=sq:0.5+f32".parse().unwrap(),
        calibrate,
    )
    .unwrap();
    apply_plan(
        &mut two,
        &"lm_head=keep;*=static-int8".parse().unwrap(),
        calibrate,
    )
    .unwrap();
    // Layers outside the smoothed groups (o, down) keep their first-pass ranges, whose
    // inputs differ from the smoothed model's by f32 rounding only: a range a few ulp off
    // may move a rounding boundary, far less than the quantization error itself.
    let (one, two) = (logits(&m), logits(&two));
    let (d_two, d_base) = (max_diff(&one, &two), max_diff(&one, &base));
    eprintln!("sq static: one pass vs two {d_two}, vs f32 {d_base}");
    assert!(d_two < 0.05 * d_base, "{d_two} vs {d_base}");
    // Only some layers of a group scaled: an error naming the group.
    let plan: Plan = "*.q_proj=sq:0.5+dynamic-int8;*=dynamic-int8"
        .parse()
        .unwrap();
    let e = apply_plan(&mut tiny(), &plan, calibrate).unwrap_err();
    assert!(format!("{e:#}").contains("input_layernorm"), "{e:#}");
}

/// AWQ end to end: every layer lands in the grouped int-N format, and the result is closer
/// to the f32 logits than RTN of the same scheme on this model and calibration text.
#[test]
fn awq_through_apply_plan() {
    let base = logits(&tiny());
    let err = |plan: &str| {
        let mut m = tiny();
        apply_plan(&mut m, &plan.parse().unwrap(), calibrate).unwrap();
        for l in m.linears() {
            assert_eq!(l.weight.id(), "intn", "{plan}: {}", l.name);
        }
        let l = logits(&m);
        base.iter()
            .zip(&l)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
    };
    let rtn = err("*=w:i3:sym:g16");
    let awq = err("*=awq:i3:sym:g16");
    let clip_only = err("*=awq:i3:sym:g16:noscale");
    eprintln!("squared logit error: rtn {rtn:.4}, awq {awq:.4}, clip only {clip_only:.4}");
    assert!(awq < rtn, "awq {awq} vs rtn {rtn}");
    assert!(clip_only < rtn, "clip only {clip_only} vs rtn {rtn}");
    let m: Method = "awq:i3:sym:g16".parse().unwrap();
    assert_eq!(m.to_string(), "awq:i3:sym:g16");
}

fn collect(x: &Tensor, needs: &[Statistic]) -> Calibration {
    let mut c = Collector::new(needs, x.dim(1).unwrap());
    // Two batches, as calibration windows arrive.
    let n = x.dim(0).unwrap();
    c.observe(&x.narrow(0, 0, n / 2).unwrap()).unwrap();
    c.observe(&x.narrow(0, n / 2, n - n / 2).unwrap()).unwrap();
    c.finish().unwrap()
}

#[test]
fn smoothquant_scales_match_the_reference() {
    let f = json("sq_scales.json");
    let x = matrix(&f["x"]);
    let weights: Vec<Tensor> = f["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(matrix)
        .collect();
    let norm: Vec<f32> = floats(&f["norm"]).iter().map(|&v| v as f32).collect();
    let cal = collect(&x, &[Statistic::InputChannelAbsMax]);
    let group = ScaleGroup {
        input: ScaleSite::Norm("n".into()),
        linears: vec!["q".into(), "k".into(), "v".into()],
    };
    for r in f["results"].as_array().unwrap() {
        let alpha = r["alpha"].as_f64().unwrap();
        let m: Method = format!("sq:{alpha}+dynamic-int8").parse().unwrap();
        let s = m
            .algorithm()
            .group_scaling()
            .unwrap()
            .scales(&group, &weights, &cal)
            .unwrap();
        // f64 formula rounded once to f32: within 2^-24 relative, plus the inputs' own
        // f32 rounding (exact here: the fixture's inputs are f32 values).
        for (a, b) in s.iter().zip(floats(&r["scales"])) {
            assert!(rel(*a as f64, b) < 1e-6, "alpha {alpha}: {a} vs {b}");
        }
        // Fold into a norm and the three projections: the norm / s, and the activations'
        // and weights' maxima meet where alpha puts them.
        let mut n = Tensor::new(norm.as_slice(), &Device::Cpu).unwrap();
        let mut ls: Vec<QLinear> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| QLinear::new(&format!("l{i}"), w.clone(), None).unwrap())
            .collect();
        scaling::fold(
            GroupMut {
                producer: Producer::Norm(&mut n),
                linears: ls.iter_mut().collect(),
            },
            &s,
        )
        .unwrap();
        for (a, b) in n.to_vec1::<f32>().unwrap().iter().zip(floats(&r["norm"])) {
            assert!(rel(*a as f64, b) < 1e-6, "{a} vs {b}");
        }
        let ws: Vec<Tensor> = ls.iter().map(|l| l.weight_f32().unwrap()).collect();
        let wmax = quantlab::quant::smooth::column_absmax(&ws).unwrap();
        let mut c = cal.clone();
        c.rescale_inputs(&s).unwrap();
        let act = c.channel_absmax.unwrap();
        for j in 0..s.len() {
            let want_w = floats(&r["w_after"])[j];
            if want_w > 1e-4 {
                assert!(rel(wmax[j] as f64, want_w) < 1e-5, "{j}");
            }
            assert!(
                (act[j] as f64 - floats(&r["act_after"])[j]).abs() < 1e-5 * (1.0 + act[j] as f64)
            );
        }
    }
}

#[test]
fn awq_searches_match_the_reference() {
    let f = json("awq_search.json");
    let x = matrix(&f["x"]);
    let weights: Vec<Tensor> = f["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(matrix)
        .collect();
    let cal = collect(
        &x,
        &[Statistic::InputHessian, Statistic::InputChannelAbsMean],
    );
    let cols = x.dim(1).unwrap();
    let gram = |c: &Calibration| -> Vec<f64> {
        c.hessian
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v / 2.0)
            .collect()
    };
    let group = ScaleGroup {
        input: ScaleSite::Norm("n".into()),
        linears: vec!["a".into(), "b".into()],
    };
    for r in f["results"].as_array().unwrap() {
        let name = r["scheme"].as_str().unwrap();
        let scheme: Scheme = name.parse().unwrap();
        let g = awq::gram_tensor(&gram(&cal), cols, &Device::Cpu).unwrap();
        let found = awq::search_scales(
            &weights,
            cal.channel_absmean.as_deref().unwrap(),
            &g,
            &scheme,
            awq::N_GRID,
        )
        .unwrap();
        // The loss from the second moment (f32 products summed in f64) against the
        // reference's float64 loss on the rows: well within 1e-3 relative.
        for (i, (a, b)) in found.losses.iter().zip(floats(&r["losses"])).enumerate() {
            assert!(rel(*a, b) < 1e-3, "{name} ratio {i}: {a} vs {b}");
        }
        assert_eq!(found.best as u64, r["best"].as_u64().unwrap(), "{name}");
        for (a, b) in found.scales.iter().zip(floats(&r["scales"])) {
            assert!(rel(*a as f64, b) < 1e-5, "{name}: {a} vs {b}");
        }
        // The algorithm's own group scaling is this search.
        let m: Method = format!("awq:{name}").parse().unwrap();
        let s = m
            .algorithm()
            .group_scaling()
            .unwrap()
            .scales(&group, &weights, &cal)
            .unwrap();
        assert_eq!(s, found.scales);
        // Clip search on the folded weights and rescaled statistics.
        let mut c = cal.clone();
        c.rescale_inputs(&s).unwrap();
        let gf: Vec<f32> = gram(&c).iter().map(|&v| v as f32).collect();
        let row = Tensor::from_slice(&s, (1, cols), &Device::Cpu).unwrap();
        for (k, w) in weights.iter().enumerate() {
            let ws = w.broadcast_mul(&row).unwrap();
            let clip = awq::search_clip(&ws, &gf, &scheme, awq::N_GRID, awq::MAX_SHRINK).unwrap();
            let want: Vec<f32> = floats(&r["shrink"][k]).iter().map(|&v| v as f32).collect();
            let differ = clip
                .shrink
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differ, 0, "{name} layer {k}: {:?} vs {want:?}", clip.shrink);
            assert!(
                clip.shrink.iter().any(|&v| v < 1.0),
                "some group is clipped"
            );
        }
    }
}
