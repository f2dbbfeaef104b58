//! Layer sensitivity on the tiny Llama of `tests/fixtures/llama-tiny`: the resumed forward
//! pass (cached f32 hidden states, only the blocks after the quantized layer recomputed)
//! against the model's ordinary forward pass with that layer quantized; weights restored;
//! the command's resumable file, heat map, and a budget plan that runs.

use candle_core::Device;
use quantlab::arch::llama::Llama;
use quantlab::eval::perplexity::{self, Protocol};
use quantlab::lab::budget;
use quantlab::lab::sensitivity::{self, BaseCache, Granularity};
use quantlab::lab::sweep::Config;
use quantlab::nn::{HasLinears, Method};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/llama-tiny"
    ))
}

fn model() -> Llama {
    Llama::from_hf_dir(&dir(), &Device::Cpu).unwrap()
}

/// Two windows of ragged token ids (not multiples of anything), scored on their second half.
fn windows() -> Vec<perplexity::Window> {
    let ids: Vec<u32> = (0..74u32).map(|i| (i * 37 + 11) % 384).collect();
    perplexity::windows(
        &ids,
        Protocol::LlamaCpp {
            ctx: 37,
            bos: false,
        },
        None,
        None,
    )
    .unwrap()
}

/// KL values are float32 log-probabilities summed in f64: the two paths run the same
/// arithmetic on the same inputs, so they agree to rounding of the output layer's sums.
const TOL: f64 = 1e-6;

#[test]
fn resumed_evaluation_equals_the_full_forward_pass_for_every_unit() {
    let mut m = model();
    let base = BaseCache::build(&m, &windows(), 0).unwrap();
    assert_eq!(base.positions(), 2 * 18);
    // Unquantized: no divergence either way.
    let e = base.evaluate_full(&m).unwrap();
    assert!(e.mean_kl.abs() < 1e-7 && e.top1_agreement == 1.0, "{e:?}");
    let before = base.evaluate_from(&m, quantlab::arch::llama::Stage { block: 0, half: 0 });
    assert!(before.unwrap().mean_kl.abs() < 1e-7);
    for g in [Granularity::Layer, Granularity::Block, Granularity::Type] {
        let units = sensitivity::units(&m, g);
        let expect = match g {
            Granularity::Layer => 14,
            Granularity::Block => 2,
            Granularity::Type => 7,
        };
        assert_eq!(units.len(), expect, "{g:?}");
        for u in &units {
            for spec in ["w:i2:sym:g16", "w:i4:sym:g32"] {
                let method: Method = spec.parse().unwrap();
                let ((fast, full), layers) =
                    sensitivity::with_unit_quantized(&mut m, u, &method, |m| {
                        Ok((base.evaluate_from(m, u.start)?, base.evaluate_full(m)?))
                    })
                    .unwrap();
                assert_eq!(layers.len(), u.layers.len());
                assert!(
                    full.mean_kl > 0.0,
                    "{} {spec}: quantizing changes the output",
                    u.pattern
                );
                let d = (fast.mean_kl - full.mean_kl).abs();
                assert!(
                    d <= TOL * (1.0 + full.mean_kl),
                    "{} {spec}: resumed {} vs full {}",
                    u.pattern,
                    fast.mean_kl,
                    full.mean_kl
                );
                assert!((fast.mean_nll - full.mean_nll).abs() < 1e-5);
                assert_eq!(fast.top1_agreement, full.top1_agreement);
            }
        }
    }
    // Every weight was put back.
    let e = base.evaluate_full(&m).unwrap();
    assert!(e.mean_kl.abs() < 1e-7, "restored: {e:?}");
    assert!(m.linears().iter().all(|l| l.method.to_string() == "f32"));
}

/// Quantizing a unit whose start is later than its first layer would be wrong: the start
/// must be the first half-block reading any of its layers.
#[test]
fn units_start_where_their_first_layer_is_read() {
    let m = model();
    for u in sensitivity::units(&m, Granularity::Layer) {
        let half = if u.pattern.contains(".mlp.") { 1 } else { 0 };
        assert_eq!(u.start.half, half, "{}", u.pattern);
    }
    let types = sensitivity::units(&m, Granularity::Type);
    assert!(types
        .iter()
        .all(|u| u.start.block == 0 && u.layers.len() == 2));
    assert!(sensitivity::units(&m, Granularity::Layer)
        .iter()
        .all(|u| u.pattern != "lm_head"));
}

#[test]
fn the_pass_resumes_plots_and_feeds_a_budget_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let settings = vec![
        Config {
            family: "rtn sym g32".into(),
            bits: 2,
            method: "w:i2:sym:g32".into(),
        },
        Config {
            family: "rtn sym g32".into(),
            bits: 4,
            method: "w:i4:sym:g32".into(),
        },
    ];
    let spec = sensitivity::SensitivitySpec {
        model: dir().display().to_string(),
        text: text.clone(),
        tokens: 64,
        ctx: 32,
        kl_top_k: 0,
        settings,
        granularity: Granularity::Layer,
        out: tmp.path().join("s.jsonl"),
        measure: true,
        progress: false,
    };
    let (rows, t) = sensitivity::run(&spec).unwrap();
    assert_eq!((rows.len(), t.measured, t.resumed), (28, 28, 0));
    assert!(rows.iter().all(|r| r.mean_kl > 0.0 && r.bytes > 0));
    // 2-bit costs more KL than 4-bit on most layers, and fewer bytes.
    let worse = rows
        .chunks(2)
        .filter(|p| p[0].mean_kl > p[1].mean_kl && p[0].bytes < p[1].bytes)
        .count();
    assert!(worse >= 10, "{worse} of 14");
    let (again, t) = sensitivity::run(&spec).unwrap();
    assert_eq!((t.measured, t.resumed), (0, 28));
    assert_eq!(again, rows);
    // Heat map: one panel per setting, blocks × layer types.
    let png = tmp.path().join("h.png");
    sensitivity::heat_map(&rows).write(&png).unwrap();
    assert!(std::fs::read(&png)
        .unwrap()
        .starts_with(b"\x89PNG\r\n\x1a\n"));
    let svg = sensitivity::heat_map(&rows).svg().unwrap();
    assert!(svg.contains("down") && svg.contains("rtn sym g32 2-bit"));
    // A plan at 4 bits per weight parses, fits, and names every layer.
    let p = budget::Problem::from_rows(&rows, true).unwrap();
    let s = budget::solve(&p.items, budget::budget_for_bits(&p.items, 4.0)).unwrap();
    let plan: quantlab::nn::Plan = p.plan_text(&s).parse().unwrap();
    assert!(s.bytes as f64 * 8.0 / budget::params(&p.items) as f64 <= 4.0);
    assert!(plan.method_for("lm_head").is_keep());
    for l in model().linears() {
        if l.name != "lm_head" {
            assert!(!plan.method_for(&l.name).is_keep(), "{}", l.name);
        }
    }
    let (types, _) = p.tensor_types(&s).unwrap();
    assert_eq!(types.lines().count(), 14);
    assert!(types.starts_with("blk\\.0\\.attn_q\\.weight=q"), "{types}");
}
