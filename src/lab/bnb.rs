//! The bitsandbytes study on an LLM (SmolLM2-135M by default): f32, LLM.int8(), FP4, NF4
//! and NF4 with double quantization, next to whole-model and FFN-only 8-bit RTN and W8A8
//! (per-token dynamic and static per-tensor): size, prefill and decode throughput (as
//! `quantlab bench` measures them), perplexity and KL to the f32 model; then LLM.int8's
//! outlier columns per layer over the perplexity run.

use crate::arch::llama::LoadAs;
use crate::eval::lm::{self, CalibrationSpec, KlMode, PreparedLlm};
use crate::eval::perplexity::Protocol;
use crate::eval::speed::{self, SpeedTest};
use crate::nn::format::llm_int8::LlmInt8;
use crate::nn::HasLinears;
use crate::report::{Cell, Report, Table};
use anyhow::Result;
use candle_core::Device;
use std::path::PathBuf;
use std::time::Instant;

pub struct BnbLabConfig {
    pub model: String,
    /// Scored text (WikiText-2 test by default).
    pub text: PathBuf,
    pub ctx: usize,
    pub max_chunks: usize,
    /// Calibration windows for the static W8A8 row.
    pub calibration: CalibrationSpec,
    /// Prompt tokens of the prefill test (`pp N`) and steps of the decode test (`tg N`).
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub reps: usize,
    pub progress: bool,
    pub device: Device,
}

/// The rows: label and plan. lm_head stays f32 everywhere, as bitsandbytes' integration
/// keeps it (`llm_int8_skip_modules`), so every row quantizes the same layers.
pub const ROWS: [(&str, &str); 9] = [
    ("f32", "keep"),
    ("LLM.int8() (threshold 6.0)", "lm_head=keep;*=llm.int8"),
    ("FP4 (b64)", "lm_head=keep;*=fp4"),
    ("NF4 (b64)", "lm_head=keep;*=nf4"),
    ("NF4 + double quant", "lm_head=keep;*=nf4:dq"),
    ("8-bit RTN, whole model", "lm_head=keep;*=w:i8:sym:ch0"),
    ("8-bit RTN, FFN only", "*.mlp.*=w:i8:sym:ch0"),
    ("W8A8 dynamic per token", "lm_head=keep;*=w8a8:token"),
    ("W8A8 static per tensor", "lm_head=keep;*=w8a8:tensor"),
];

fn mb(bytes: usize) -> Cell {
    Cell::f(bytes as f64 / 1e6, 2)
}

pub fn run(cfg: &BnbLabConfig) -> Result<Report> {
    let started = Instant::now();
    let text = lm::read_text(&cfg.text)?;
    let protocol = Protocol::LlamaCpp {
        ctx: cfg.ctx,
        bos: false,
    };
    let pp = SpeedTest::Prompt(cfg.prompt_tokens);
    let tg = SpeedTest::Generate(cfg.gen_tokens);
    let mut t = Table::new(
        "bnb",
        "bitsandbytes study: 8-bit and 4-bit next to RTN and W8A8",
        &[
            "method",
            "plan",
            "weights MB",
            "bits per weight",
            &format!("prefill tokens/s ({})", pp.name()),
            "prefill std",
            &format!("decode tokens/s ({})", tg.name()),
            "decode std",
            "perplexity",
            "ppl vs f32 %",
            "mean KL",
            "seconds",
        ],
    );
    let kl_path = std::env::temp_dir().join(format!("quantlab-bnb-{}.kld", std::process::id()));
    let mut ids = Vec::new();
    let mut base_ppl = None;
    let mut outliers = None;
    for (i, (label, plan)) in ROWS.iter().enumerate() {
        let row_start = Instant::now();
        if cfg.progress {
            eprintln!("{label}: {plan}");
        }
        let p = lm::prepare(
            &cfg.model,
            LoadAs::F32,
            Some(plan),
            Some(&cfg.calibration),
            &cfg.device,
        )?;
        if ids.is_empty() {
            ids = p.llm.tokenizer.encode(&text)?;
        }
        let mode = if i == 0 {
            KlMode::Save(kl_path.clone(), 256)
        } else {
            KlMode::Compare(kl_path.clone())
        };
        let bar = crate::progress::bar(0, label, cfg.progress);
        let s = lm::score(&p, &ids, protocol, Some(cfg.max_chunks), &mode, &bar);
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&kl_path);
                return Err(e);
            }
        };
        // Outlier columns over the perplexity run only (the speed tests come after).
        if outliers.is_none() {
            outliers = outlier_table(&p);
        }
        let prefill = speed::measure(&p.llm.model, pp, cfg.reps, 0)?;
        let decode = speed::measure(&p.llm.model, tg, cfg.reps, 0)?;
        let ppl = s.ppl.perplexity();
        let base = *base_ppl.get_or_insert(ppl);
        t.push(vec![
            (*label).into(),
            (*plan).into(),
            mb(p.weight_bytes()),
            Cell::f(p.linear_bits_per_weight(), 2),
            Cell::f(prefill.mean(), 1),
            Cell::f(prefill.std(), 1),
            Cell::f(decode.mean(), 1),
            Cell::f(decode.std(), 1),
            Cell::f(ppl, 3),
            Cell::f((ppl / base - 1.0) * 100.0, 2),
            match &s.kl {
                Some(k) => Cell::f(k.mean_kl(), 5),
                None => Cell::Missing,
            },
            Cell::f(row_start.elapsed().as_secs_f64(), 1),
        ]);
    }
    let _ = std::fs::remove_file(&kl_path);
    t.note(format!(
        "perplexity: {}, {protocol}, first {} chunks; mean KL to the f32 row (top-256 log-probs).",
        cfg.text.display(),
        cfg.max_chunks
    ));
    t.note(format!(
        "throughput as `quantlab bench`: {} = one forward over {} random tokens, {} = {} one-token steps from an empty cache; mean and std of {} timed runs after one warm-up, batch 1. CPU kernels: {}.",
        pp.name(),
        cfg.prompt_tokens,
        tg.name(),
        cfg.gen_tokens,
        cfg.reps,
        crate::nn::kernels::isa::describe()
    ));
    t.note("LLM.int8(): bitsandbytes' Linear8bitLt (int8 weights per row, input columns with |x| >= 6 in f32 with the dequantized weights, the rest int8 per row); FP4/NF4: bitsandbytes' code books, absmax per 64 weights (double quant: absmax as 8-bit codes + f32 per 256). 8-bit RTN: int8 weights per channel (PyTorch symmetric), f32 activations. W8A8: int8 weights per channel (absmax/127) and int8 activations, per token at run time or one static scale per layer.");
    t.note(format!(
        "static W8A8 calibration: {} windows of {} tokens from {} (seed {}).",
        cfg.calibration.samples,
        cfg.calibration.seqlen,
        cfg.calibration.text.display(),
        cfg.calibration.seed
    ));
    t.note(format!(
        "lab run time: {:.0} s.",
        started.elapsed().as_secs_f64()
    ));
    let mut tables = vec![t];
    tables.extend(outliers);
    Ok(Report {
        tables,
        notes: vec![],
    })
}

/// LLM.int8's outlier columns per layer (`None` when no layer is LLM.int8): one row per
/// block (`model.layers.N`), one column per projection, each cell the percentage of input
/// columns held in f32, averaged over the forward calls.
pub fn outlier_table(p: &PreparedLlm) -> Option<Table> {
    let mut cells: Vec<(String, String, f64, f64)> = Vec::new();
    for l in p.llm.model.linears() {
        if let Some(w) = l.weight.as_any().downcast_ref::<LlmInt8>() {
            let s = w.outlier_stats();
            let (block, proj) = split_layer_name(&l.name);
            cells.push((block, proj, s.fraction * 100.0, s.mean_columns));
        }
    }
    if cells.is_empty() {
        return None;
    }
    let mut projs: Vec<String> = Vec::new();
    let mut blocks: Vec<String> = Vec::new();
    for (b, pr, _, _) in &cells {
        if !projs.contains(pr) {
            projs.push(pr.clone());
        }
        if !blocks.contains(b) {
            blocks.push(b.clone());
        }
    }
    let mut headers = vec!["layer".to_string()];
    headers.extend(projs.iter().cloned());
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t = Table::new(
        "bnb_outliers",
        "LLM.int8(): input columns multiplied in f32, % of the layer's inputs (mean columns per call)",
        &header_refs,
    );
    for b in &blocks {
        let mut row: Vec<Cell> = vec![b.clone().into()];
        for pr in &projs {
            row.push(
                match cells.iter().find(|(cb, cp, _, _)| cb == b && cp == pr) {
                    Some((_, _, pct, cols)) => Cell::Text(format!("{pct:.2} ({cols:.1})")),
                    None => Cell::Missing,
                },
            );
        }
        t.push(row);
    }
    let mean = cells.iter().map(|c| c.2).sum::<f64>() / cells.len() as f64;
    t.note(format!(
        "averaged over the perplexity run's forward calls (one call per scored window); a column is an outlier when any of its values has |x| >= the threshold. Mean over the {} layers: {mean:.3} %. q/k/v and gate/up read the same input, so their columns agree.",
        cells.len()
    ));
    Some(t)
}

/// `model.layers.3.self_attn.q_proj` → (`model.layers.3`, `self_attn.q_proj`); names
/// without a numbered block are their own row.
fn split_layer_name(name: &str) -> (String, String) {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.iter().position(|s| s.parse::<usize>().is_ok()) {
        Some(i) if i + 1 < parts.len() => (parts[..=i].join("."), parts[i + 1..].join(".")),
        _ => (name.to_string(), "layer".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_split_into_block_and_projection() {
        assert_eq!(
            split_layer_name("model.layers.12.mlp.down_proj"),
            ("model.layers.12".into(), "mlp.down_proj".into())
        );
        assert_eq!(
            split_layer_name("lm_head"),
            ("lm_head".into(), "layer".into())
        );
    }

    #[test]
    fn every_row_plan_parses() {
        for (_, plan) in ROWS {
            plan.parse::<crate::nn::Plan>().unwrap();
        }
    }
}
