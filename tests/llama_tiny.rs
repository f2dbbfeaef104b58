//! A tiny random Llama written by transformers 5.17 (`tests/fixtures/llama-tiny`, made by
//! `scripts/llama_tiny_reference.py`: GQA 4/2 heads, head_dim 16, rope_theta 50000, llama3
//! rope scaling with original context 32, untied lm_head, byte-level BPE tokenizer with BOS)
//! against transformers' own numbers for it (float32 on CPU, eager attention):
//! tokenizer ids, rotary frequencies, full-sequence logits, KV-cache decoding, greedy output.
//!
//! Needs nothing outside the repository.

use candle_core::{Device, Tensor};
use quantlab::arch::llama::{Llama, LlamaConfig, LoadAs, RopeScaling};
use quantlab::eval::lm;
use quantlab::load::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Largest |ours - transformers| allowed on a logit or log-probability. The reference is
/// rounded to 1e-5; float32 differences in summation order are ~1e-6 here.
const TOL: f32 = 1e-4;
/// Largest difference allowed between cached (one token at a time) and full-pass logits:
/// the matmul shapes differ, so float32 sums round differently (7.9e-6 seen here).
const CACHE_TOL: f32 = 5e-5;

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/llama-tiny"
    ))
}

fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap())
            .unwrap()
    })
}

fn model() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| Llama::from_hf_dir(&dir(), &Device::Cpu).unwrap())
}

fn tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| TextTokenizer::from_hf_dir(&dir()).unwrap())
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn prompts() -> &'static [Value] {
    reference()["prompts"].as_array().unwrap()
}

/// Logits `[seq, vocab]` of `ids` from one pass over a fresh cache.
fn full_logits(ids: &[u32]) -> Vec<Vec<f32>> {
    let m = model();
    let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &m.device).unwrap();
    let logits = m.forward(&x, &mut m.new_cache(), false).unwrap();
    logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

fn log_softmax_rows(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|r| {
            let max = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + r.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32;
            r.iter().map(|v| v - lse).collect()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row lengths differ");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn config_reads_transformers_5_rope_parameters() {
    let c = &model().cfg;
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (384, 64, 128, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4, 2, 16)
    );
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 256);
    // transformers 5 writes these inside "rope_parameters", not as top-level keys.
    assert_eq!(c.rope_theta, 50000.0);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        })
    );
}

/// The fixture's config.json with its rope settings replaced by `rope`.
fn config_with(rope: &[(&str, Value)]) -> Result<LlamaConfig, String> {
    let mut v = quantlab::load::read_json(&dir().join("config.json")).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    for (k, x) in rope {
        o.insert(k.to_string(), x.clone());
    }
    LlamaConfig::from_hf_json(&v).map_err(|e| e.to_string())
}

#[test]
fn config_reads_rope_settings_in_both_layouts() {
    use serde_json::json;
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 32,
    };
    // transformers < 5: top-level rope_theta and rope_scaling ("type" or "rope_type").
    let old = config_with(&[
        ("rope_theta", json!(50000.0)),
        (
            "rope_scaling",
            json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        ),
    ])
    .unwrap();
    assert_eq!((old.rope_theta, old.rope_scaling), (50000.0, Some(llama3)));
    let old_plain = config_with(&[
        ("rope_theta", json!(100000.0)),
        ("rope_scaling", Value::Null),
    ])
    .unwrap();
    assert_eq!(
        (old_plain.rope_theta, old_plain.rope_scaling),
        (100000.0, None)
    );
    // transformers 5, unscaled: rope_type "default" inside rope_parameters.
    let new_plain = config_with(&[(
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 100000.0}),
    )])
    .unwrap();
    assert_eq!(
        (new_plain.rope_theta, new_plain.rope_scaling),
        (100000.0, None)
    );
    let linear = config_with(&[(
        "rope_parameters",
        json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    )])
    .unwrap();
    assert_eq!(
        linear.rope_scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
    // Neither: Llama's default theta.
    assert_eq!(config_with(&[]).unwrap().rope_theta, 10000.0);
    let err = config_with(&[(
        "rope_parameters",
        json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
    )])
    .unwrap_err();
    assert!(err.contains("'yarn' is not supported"), "{err}");
}

#[test]
fn rotary_frequencies_equal_transformers_llama3_scaling() {
    let r = reference();
    let theirs: Vec<f64> = r["inv_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let unscaled: Vec<f64> = r["inv_freq_unscaled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(r["attention_scaling"].as_f64(), Some(1.0));
    let ours = model().cfg.inv_freq();
    assert_eq!(ours.len(), theirs.len());
    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        // transformers computes these in float32.
        assert!(
            ((o - t) / t).abs() < 1e-6,
            "inv_freq[{i}]: ours {o}, transformers {t}"
        );
    }
    // The fixture is only a test of llama3 scaling if all three bands occur: the highest
    // frequency kept, one smoothed, the rest divided by the factor.
    assert_eq!(theirs[0], unscaled[0]);
    let ratio = unscaled[1] / theirs[1];
    assert!(ratio > 1.5 && ratio < 7.5, "band 1 ratio {ratio}");
    for i in 2..theirs.len() {
        assert!(((unscaled[i] / theirs[i]) - 8.0).abs() < 1e-4);
    }
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let tok = tokenizer();
    let r = reference();
    assert_eq!(tok.bos, Some(r["bos_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.eos, Some(r["eos_id"].as_u64().unwrap() as u32));
    assert!(tok.add_bos);
    assert_eq!(tok.vocab_size(), model().cfg.vocab_size);
    let recs = prompts().iter().chain(r["probes"].as_array().unwrap());
    let mut n = 0;
    for rec in recs {
        let text = rec["text"].as_str().unwrap();
        let plain = ids_of(&rec["ids_no_special"]);
        let with_bos = ids_of(&rec["ids"]);
        assert_eq!(tok.encode(text).unwrap(), plain, "{text:?} without BOS");
        // BOS as quantlab adds it (the add_bos flag) and as tokenizer.json's post-processor does.
        let mut ours = vec![tok.bos.unwrap()];
        ours.extend(&plain);
        assert_eq!(ours, with_bos, "{text:?} with BOS");
        let enc = tok.inner.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), &with_bos[..], "{text:?} post-processed");
        assert_eq!(
            tok.decode(&with_bos).unwrap(),
            rec["decoded"].as_str().unwrap(),
            "{text:?} decoded"
        );
        n += 1;
    }
    assert_eq!(n, 10);
}

#[test]
fn logits_equal_transformers() {
    let mut checked = 0;
    let (mut worst_logit, mut worst_lp) = (0f32, 0f32);
    for rec in prompts() {
        let Some(rows) = rec["logits"].as_array() else {
            continue;
        };
        let theirs: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        let ids = ids_of(&rec["ids"]);
        let ours = full_logits(&ids);
        let d = max_abs_diff(&ours, &theirs);
        let dl = max_abs_diff(&log_softmax_rows(&ours), &log_softmax_rows(&theirs));
        eprintln!(
            "{} tokens: max |logit diff| {d:.2e}, max |log-prob diff| {dl:.2e}",
            ids.len()
        );
        assert!(d <= TOL, "{:?}: logits differ by {d}", rec["text"]);
        assert!(dl <= TOL, "{:?}: log-probs differ by {dl}", rec["text"]);
        // Also through the library's own log-softmax.
        let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        let lp = Llama::log_softmax(
            &model()
                .forward(&x, &mut model().new_cache(), false)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        assert!(max_abs_diff(&lp, &log_softmax_rows(&theirs)) <= TOL);
        worst_logit = worst_logit.max(d);
        worst_lp = worst_lp.max(dl);
        checked += ids.len();
    }
    eprintln!("max over {checked} positions: logits {worst_logit:.2e}, log-probs {worst_lp:.2e}");
    assert!(
        checked > 100,
        "only {checked} positions have reference logits"
    );
    // The longest prompt runs past the 32 positions of the original rope context.
    assert!(prompts().iter().any(|p| ids_of(&p["ids"]).len() > 32));
}

/// Logits from feeding `ids` in chunks of the given sizes through one cache.
fn chunked_logits(ids: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
    let m = model();
    let mut cache = m.new_cache();
    let mut rows = Vec::new();
    let mut at = 0;
    for &n in chunks {
        let x = Tensor::from_vec(ids[at..at + n].to_vec(), (1, n), &m.device).unwrap();
        let l = m.forward(&x, &mut cache, false).unwrap();
        rows.extend(l.squeeze(0).unwrap().to_vec2::<f32>().unwrap());
        at += n;
        assert_eq!(cache.len(), at);
    }
    assert_eq!(at, ids.len());
    rows
}

#[test]
fn kv_cache_decoding_equals_the_full_pass_at_every_position() {
    let mut worst = 0f32;
    for rec in prompts() {
        // The prompt and its greedy continuation: up to 83 positions.
        let mut ids = ids_of(&rec["ids"]);
        ids.extend(ids_of(&rec["greedy_new"]));
        let full = full_logits(&ids);
        let n = ids.len();
        let one_by_one = chunked_logits(&ids, &vec![1; n]);
        // A prefill, then single tokens, then a multi-token chunk at an offset (the causal
        // mask with cached keys in front).
        let half = n / 2;
        let mut mixed = vec![half];
        mixed.extend(vec![1; 5]);
        mixed.push(n - half - 5);
        let mixed = chunked_logits(&ids, &mixed);
        for (label, got) in [
            ("one token at a time", &one_by_one),
            ("mixed chunks", &mixed),
        ] {
            let d = max_abs_diff(got, &full);
            assert!(d <= CACHE_TOL, "{:?} {label}: {d}", rec["text"]);
            worst = worst.max(d);
        }
        // last_only gives the last row of the full pass.
        let m = model();
        let x = Tensor::from_vec(ids.clone(), (1, n), &m.device).unwrap();
        let last = m
            .forward(&x, &mut m.new_cache(), true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(max_abs_diff(&[last], &full[n - 1..]) <= CACHE_TOL);
    }
    eprintln!("max |cached - full| logit difference: {worst:.2e}");
}

#[test]
fn greedy_generation_equals_transformers_generate() {
    let spec = dir().to_string_lossy().into_owned();
    let prepared = lm::prepare(&spec, LoadAs::F32, None, None, &Device::Cpu).unwrap();
    for rec in prompts() {
        let prompt = ids_of(&rec["ids"]);
        let want = ids_of(&rec["greedy_new"]);
        let max_new = want.len();
        assert_eq!(max_new, 24);
        // transformers keeps the EOS it stops on; lm::greedy stops before it.
        let eos = tokenizer().eos.unwrap();
        let want_no_eos: Vec<u32> = want.iter().copied().take_while(|&t| t != eos).collect();
        let got = lm::greedy(&prepared, &prompt, max_new).unwrap().tokens;
        assert_eq!(got, want_no_eos, "{:?}", rec["text"]);
        // The recorded margins say no step was a near-tie that rounding could flip.
        let min_margin = rec["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
        assert!(min_margin > 10.0 * TOL as f64);
        assert_eq!(
            tokenizer().decode(&got).unwrap(),
            rec["greedy_decoded"].as_str().unwrap()
        );
    }
}

#[test]
fn norm_groups_name_each_norm_and_the_projections_it_feeds() {
    use quantlab::nn::HasLinears;
    let g = model().norm_groups();
    // Two groups per block plus the final norm; every name is a real tensor or layer.
    assert_eq!(g.len(), 2 * 2 + 1);
    assert_eq!(g[0].norm, "model.layers.0.input_layernorm");
    assert_eq!(
        g[0].linears,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"
        ]
    );
    assert_eq!(g[3].norm, "model.layers.1.post_attention_layernorm");
    assert_eq!(
        g[3].linears,
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    );
    assert_eq!(g[4].norm, "model.norm");
    assert_eq!(g[4].linears, ["lm_head"]);
    let dense: Vec<String> = model()
        .dense_tensors()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let layers: Vec<String> = model().linears().iter().map(|l| l.name.clone()).collect();
    for group in &g {
        assert!(
            dense.contains(&format!("{}.weight", group.norm)),
            "{}",
            group.norm
        );
        for l in &group.linears {
            assert!(layers.contains(l), "{l}");
        }
    }
}

#[test]
fn batched_perplexity_equals_one_window_at_a_time() {
    use quantlab::eval::perplexity::{perplexity, Protocol};
    let m = model();
    // Ids from the fixture's prompts, repeated to make several equal chunks of 8 tokens.
    let mut ids: Vec<u32> = prompts().iter().flat_map(|p| ids_of(&p["ids"])).collect();
    while ids.len() < 60 {
        ids.extend_from_within(..);
    }
    let protocol = Protocol::LlamaCpp { ctx: 8, bos: false };
    let bar = indicatif::ProgressBar::hidden();
    let run = |batch: usize| {
        let mut rows = Vec::new();
        let r = perplexity(m, &ids, protocol, None, None, batch, &bar, |i, _, lp| {
            rows.push((i, lp.to_vec2::<f32>().unwrap()));
            Ok(())
        })
        .unwrap();
        (r, rows)
    };
    let (one, rows1) = run(1);
    assert!(one.windows >= 5, "{} windows", one.windows);
    for batch in [2, 3, 64] {
        let (b, rows_b) = run(batch);
        assert_eq!(b.windows, one.windows);
        assert_eq!(b.scored_tokens, one.scored_tokens);
        for (x, y) in one.window_nll.iter().zip(&b.window_nll) {
            assert!((x - y).abs() < 1e-3, "batch {batch}: nll {x} vs {y}");
        }
        assert_eq!(rows_b.len(), rows1.len());
        for ((i, a), (j, c)) in rows1.iter().zip(&rows_b) {
            assert_eq!(i, j);
            assert!(max_abs_diff(a, c) < CACHE_TOL, "batch {batch}, window {i}");
        }
    }
    let e = perplexity(m, &ids, protocol, None, None, 0, &bar, |_, _, _| Ok(()));
    assert!(e.unwrap_err().to_string().contains("--batch"));
}
