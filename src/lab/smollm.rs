//! The lab's two SmolLM tables:
//! (a) f32 vs whole-model 8-bit vs FFN-only 8-bit: size, latency, perplexity;
//! (b) int8 / int4 / int2 (group 64): last-word top-1/top-5, decode tokens/s, memory.

use crate::arch::llama::LoadAs;
use crate::eval::lastword;
use crate::eval::latency::LatencyStats;
use crate::eval::lm::{self, KlMode, PreparedLlm};
use crate::eval::perplexity::Protocol;
use crate::report::{Cell, Report, Table};
use anyhow::Result;
use candle_core::Device;
use std::path::PathBuf;

pub struct SmollmLabConfig {
    pub model: String,
    pub text: PathBuf,
    pub max_chunks: usize,
    pub last_word_examples: usize,
    pub lambada: Option<PathBuf>,
    pub decode_tokens: usize,
    pub progress: bool,
    pub device: Device,
}

const PROTOCOL: Protocol = Protocol::LlamaCpp {
    ctx: 512,
    bos: false,
};

fn mb(bytes: usize) -> Cell {
    Cell::f(bytes as f64 / 1e6, 2)
}

fn prepare(cfg: &SmollmLabConfig, plan: &str, load_as: LoadAs) -> Result<PreparedLlm> {
    lm::prepare(&cfg.model, load_as, Some(plan), None, &cfg.device)
}

/// Decode speed: greedy tokens after a fixed prompt, warm-up step excluded.
fn decode_tokens_per_s(p: &PreparedLlm, prompt: &[u32], n: usize) -> Result<f64> {
    lm::greedy(p, &prompt[..prompt.len().min(8)], 1)?;
    let g = lm::greedy(p, prompt, n)?;
    Ok(g.tokens.len() as f64 / g.decode_s.max(1e-9))
}

pub fn run(cfg: &SmollmLabConfig) -> Result<Report> {
    let text = lm::read_text(&cfg.text)?;
    let mut a = Table::new(
        "smollm_a",
        "SmolLM2-135M: f32 vs 8-bit (whole model, FFN only)",
        &[
            "model",
            "plan",
            "weights MB",
            "bits per weight",
            "latency ms / 512 tokens (std)",
            "prefill tokens/s",
            "perplexity",
            "mean KL",
        ],
    );
    let rows_a = [
        ("f32", "keep"),
        ("8-bit, whole model", "*=dynamic-int8"),
        ("8-bit, FFN only", "*.mlp.*=dynamic-int8"),
    ];
    let kl_path = std::env::temp_dir().join(format!("quantlab-smollm-{}.kld", std::process::id()));
    let mut ids = Vec::new();
    for (i, (label, plan)) in rows_a.iter().enumerate() {
        if cfg.progress {
            eprintln!("(a) {label}: {plan}");
        }
        let p = prepare(cfg, plan, LoadAs::F32)?;
        if ids.is_empty() {
            ids = p.llm.tokenizer.encode(&text)?;
        }
        let mode = if i == 0 {
            KlMode::Save(kl_path.clone(), 256)
        } else {
            KlMode::Compare(kl_path.clone())
        };
        let bar = crate::progress::bar(0, label, cfg.progress);
        let s = lm::score(&p, &ids, PROTOCOL, Some(cfg.max_chunks), &mode, &bar)?;
        let window_ms: Vec<f64> = s.ppl.window_seconds.iter().map(|x| x * 1e3).collect();
        let lat = LatencyStats::from_samples(&window_ms)?;
        a.push(vec![
            (*label).into(),
            (*plan).into(),
            mb(p.weight_bytes()),
            Cell::f(p.linear_bits_per_weight(), 2),
            Cell::Text(format!("{:.0} ({:.0})", lat.mean_ms, lat.std_ms)),
            Cell::f(s.ppl.tokens_per_second(), 1),
            Cell::f(s.ppl.perplexity(), 3),
            match &s.kl {
                Some(k) => Cell::f(k.mean_kl(), 4),
                None => Cell::Missing,
            },
        ]);
    }
    let _ = std::fs::remove_file(&kl_path);
    a.note(format!(
        "perplexity: WikiText-2 test, {PROTOCOL}, first {} chunks; latency = mean wall time of one 512-token forward pass over those chunks; 8-bit = dynamic int8 (int8 per-channel weights, u8 activations per batch, i32 accumulation).",
        cfg.max_chunks
    ));
    a.note(format!(
        "CPU kernels: {}.",
        crate::nn::kernels::isa::describe()
    ));
    a.note("weights MB: linear layers as stored plus the f32 embedding table (28.3 MB) and norms; the tied lm_head is a separate layer here.");

    let mut b = Table::new(
        "smollm_b",
        "SmolLM2-135M: weight-only bit widths (group 64)",
        &[
            "weights",
            "plan",
            "weights MB",
            "bits per weight",
            "last-word top-1 %",
            "last-word top-5 %",
            "decode tokens/s",
        ],
    );
    let all = match &cfg.lambada {
        Some(f) => lastword::lambada_examples(f)?,
        None => lastword::wikitext_examples(&text, 40),
    };
    let examples: Vec<_> = all.into_iter().take(cfg.last_word_examples).collect();
    let rows_b: [(&str, &str, LoadAs); 6] = [
        ("f32", "keep", LoadAs::F32),
        ("int8 g64", "lm_head=keep;*=w:i8:sym:g64", LoadAs::F32),
        ("int4 g64", "lm_head=keep;*=w:i4:sym:g64", LoadAs::F32),
        ("int2 g64", "lm_head=keep;*=w:i2:sym:g64", LoadAs::F32),
        ("GGML q8_0", "lm_head=keep;*=q8_0", LoadAs::F32),
        ("GGML q4_0", "lm_head=keep;*=q4_0", LoadAs::F32),
    ];
    let prompt: Vec<u32> = ids[..64.min(ids.len())].to_vec();
    for (label, plan, load_as) in rows_b {
        if cfg.progress {
            eprintln!("(b) {label}: {plan}");
        }
        let mut p = prepare(cfg, plan, load_as)?;
        let tps = decode_tokens_per_s(&p, &prompt, cfg.decode_tokens)?;
        // Accuracy does not depend on where the dequantized weights live: cache them.
        p.llm.model.set_cache_dequantized(true);
        let bar = crate::progress::bar(0, label, cfg.progress);
        let acc = lastword::accuracy(&p.llm.model, &p.llm.tokenizer, &examples, 1024, &bar)?;
        b.push(vec![
            label.into(),
            plan.into(),
            mb(p.weight_bytes()),
            Cell::f(p.linear_bits_per_weight(), 2),
            Cell::f(acc.top1_pct(), 1),
            Cell::f(acc.top5_pct(), 1),
            Cell::f(tps, 1),
        ]);
    }
    b.note(format!(
        "last word: first {} passages of {}; correct when every token of the word ranks within the top 1 / top 5 (top 1 = greedy decoding reproduces it).",
        examples.len(),
        match &cfg.lambada {
            Some(f) => f.display().to_string(),
            None => "the WikiText-2 test rule (src/eval/lastword.rs)".into(),
        }
    ));
    b.note(format!(
        "decode: greedy, {} new tokens after a 64-token prompt, KV cache, batch 1, 2 CPU threads. int-N rows multiply straight from their codes, one weight row at a time (src/nn/rows.rs: no f32 copy, memory stays at the stored size); GGML rows run candle's quantized kernels.",
        cfg.decode_tokens
    ));
    if let Some(rss) = lm::peak_rss_bytes() {
        b.note(format!(
            "peak resident memory of the whole run: {:.0} MB",
            rss as f64 / 1e6
        ));
    }
    b.note(
        "No unquantized SmolLM is reachable here: f32 = weights dequantized from the Q4_1 GGUF.",
    );
    Ok(Report {
        tables: vec![a, b],
        notes: vec![],
    })
}
