//! SmolLM2 against independent references recorded by `scripts/smollm_reference.py`
//! (transformers on the GPU machine, float32, TF32 off): tokenizer ids on the whole
//! WikiText-2 test file, per-chunk perplexity under both protocols, last-word outcomes.
//!
//! Needs the GGUF: `scripts/fetch-smollm2.sh` (CI runs it), or `QUANTLAB_LLM=PATH`.

use quantlab::arch::llama::LoadAs;
use quantlab::eval::lastword;
use quantlab::eval::lm::{self, KlMode};
use quantlab::eval::perplexity::{self, Protocol};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::OnceLock;

fn model_path() -> String {
    let p = std::env::var("QUANTLAB_LLM")
        .unwrap_or_else(|_| format!("{}/models/smollm2-135m", env!("CARGO_MANIFEST_DIR")));
    assert!(
        PathBuf::from(&p).exists(),
        "SmolLM2 GGUF not found at {p}: run scripts/fetch-smollm2.sh (or set QUANTLAB_LLM)"
    );
    p
}

fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        let p = format!(
            "{}/tests/fixtures/smollm_reference.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    })
}

fn wikitext() -> String {
    let data = quantlab::data::DataDir::resolve(None).unwrap();
    std::fs::read_to_string(data.require("wikitext-2/test.txt", "").unwrap()).unwrap()
}

fn reference_model() -> &'static lm::PreparedLlm {
    static M: OnceLock<lm::PreparedLlm> = OnceLock::new();
    M.get_or_init(|| {
        lm::prepare(
            &model_path(),
            LoadAs::F32,
            None,
            None,
            &candle_core::Device::Cpu,
        )
        .unwrap()
    })
}

fn ids() -> &'static Vec<u32> {
    static I: OnceLock<Vec<u32>> = OnceLock::new();
    I.get_or_init(|| reference_model().llm.tokenizer.encode(&wikitext()).unwrap())
}

#[test]
fn tokenizer_matches_hf_on_the_whole_wikitext_test_file() {
    let r = &reference()["tokens"];
    let ids = ids();
    assert_eq!(ids.len() as u64, r["count"].as_u64().unwrap());
    let head: Vec<u32> = r["head"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(&ids[..head.len()], &head[..]);
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let sha = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(sha, r["sha256_u32le"].as_str().unwrap());
    let tok = &reference_model().llm.tokenizer;
    for p in r["probes"].as_array().unwrap() {
        let want: Vec<u32> = p["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let text = p["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "probe {text:?}");
    }
}

fn check_windows(protocol: Protocol, key: &str, field: &str, n: usize) {
    let m = reference_model();
    let r = &reference()[key][field];
    let bar = indicatif::ProgressBar::hidden();
    let got = perplexity::perplexity(
        &m.llm.model,
        ids(),
        protocol,
        m.llm.tokenizer.bos,
        Some(n),
        1,
        &bar,
        |_, _, _| Ok(()),
    )
    .unwrap();
    for (i, (g, w)) in got.window_nll.iter().zip(r.as_array().unwrap()).enumerate() {
        let w = w.as_f64().unwrap();
        // Per-window NLL sums agree to 0.05% (f32 accumulation order differs).
        assert!((g - w).abs() / w < 5e-4, "{key} window {i}: {g} vs {w}");
    }
    assert_eq!(got.windows, n);
}

#[test]
fn perplexity_matches_transformers_llama_cpp_protocol() {
    check_windows(
        Protocol::LlamaCpp {
            ctx: 512,
            bos: false,
        },
        "llama_cpp_512",
        "chunk_nll",
        2,
    );
}

#[test]
fn perplexity_matches_transformers_with_bos() {
    check_windows(
        Protocol::LlamaCpp {
            ctx: 512,
            bos: true,
        },
        "llama_cpp_512_bos",
        "chunk_nll",
        1,
    );
}

#[test]
fn perplexity_matches_transformers_strided_protocol() {
    check_windows(
        Protocol::Strided {
            max_len: 1024,
            stride: 512,
        },
        "strided_1024_512",
        "window_nll",
        2,
    );
}

#[test]
fn last_word_outcomes_match_transformers() {
    let m = reference_model();
    let r = &reference()["last_word"];
    let ex = lastword::wikitext_examples(&wikitext(), 40);
    assert_eq!(ex.len() as u64, r["examples"].as_u64().unwrap());
    let mut differ = 0;
    let n = 12;
    for (e, want) in ex.iter().zip(r["first"].as_array().unwrap()).take(n) {
        let o = lastword::score(&m.llm.model, &m.llm.tokenizer, e, 1024).unwrap();
        assert_eq!(
            o.target_tokens as u64,
            want["target_tokens"].as_u64().unwrap()
        );
        differ += (o.within(1) != want["top1"].as_bool().unwrap()) as usize;
        differ += (o.within(5) != want["top5"].as_bool().unwrap()) as usize;
    }
    assert!(
        differ <= 1,
        "{differ} of {n} outcomes differ from transformers"
    );
}

#[test]
fn kept_ggml_weights_stay_close_to_the_reference() {
    // Q4_1 kept and run by candle's quantized kernels (activations quantized to Q8):
    // same weights as the f32 reference up to activation rounding.
    let q = lm::prepare(
        &model_path(),
        LoadAs::Ggml,
        None,
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let short: Vec<u32> = ids()[..128].to_vec();
    let bar = indicatif::ProgressBar::hidden();
    let proto = Protocol::LlamaCpp {
        ctx: 128,
        bos: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let kl_path = dir.path().join("base.kld");
    let base = lm::score(
        reference_model(),
        &short,
        proto,
        None,
        &KlMode::Save(kl_path.clone(), 0),
        &bar,
    )
    .unwrap();
    let s = lm::score(&q, &short, proto, None, &KlMode::Compare(kl_path), &bar).unwrap();
    let kl = s.kl.unwrap();
    assert_eq!(kl.positions, 63);
    assert!(kl.mean_kl() < 0.02, "mean KL {}", kl.mean_kl());
    assert!(kl.top1_agreement() > 0.9, "{}", kl.top1_agreement());
    let rel = (s.ppl.perplexity() / base.ppl.perplexity() - 1.0).abs();
    assert!(
        rel < 0.05,
        "{} vs {}",
        s.ppl.perplexity(),
        base.ppl.perplexity()
    );
    assert!(q.weight_bytes() < reference_model().weight_bytes() / 2);
}

#[test]
fn sweep_appends_rows_and_resumes_without_rerunning() {
    use quantlab::lab::sweep;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.jsonl");
    let data = quantlab::data::DataDir::resolve(None).unwrap();
    let spec = sweep::SweepSpec {
        device: candle_core::Device::Cpu,
        model: model_path(),
        load_as: LoadAs::F32,
        configs: sweep::expand(&["rtn".into()], &[8, 2], &["64".into()], "sym").unwrap(),
        layers: sweep::Layers::Ffn,
        text: data.require("wikitext-2/test.txt", "").unwrap(),
        protocol: Protocol::LlamaCpp {
            ctx: 64,
            bos: false,
        },
        max_chunks: Some(1),
        out: out.clone(),
        kl: true,
        calibration: Default::default(),
        progress: false,
    };
    let rows = sweep::run(&spec).unwrap();
    assert_eq!(rows.len(), 3);
    let (base, i8, i2) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(base.bits_per_weight, 32.0);
    // int8 g64: 8 bits + one f32 scale per 64 weights = 8.5 bits per weight.
    assert!(
        (i8.bits_per_weight - 8.5).abs() < 1e-9,
        "{}",
        i8.bits_per_weight
    );
    assert!(i8.mean_kl.unwrap() < i2.mean_kl.unwrap());
    assert!(base.perplexity < i2.perplexity);
    assert_eq!(sweep::read_rows(&out).unwrap(), rows);
    // Running again measures nothing new and appends nothing.
    let again = sweep::run(&spec).unwrap();
    assert_eq!(again, rows);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
}
