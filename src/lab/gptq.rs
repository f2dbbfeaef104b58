//! `lab gptq`: the GPTQ study for SmolLM2 (AutoGPTQ, int8/int4/int2, group 64, 100
//! calibration samples): last-word top-1/top-5 accuracy, decode tokens/s and memory of GPTQ
//! next to round-to-nearest at the same bits, and the study's two plots: accuracy against
//! memory, speed against memory.

use crate::arch::llama::LoadAs;
use crate::eval::lastword;
use crate::eval::lm::{self, CalibrationSpec, PreparedLlm};
use crate::report::plot::{LinePlot, Series};
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Result};
use candle_core::Device;
use std::path::PathBuf;

pub struct GptqLabConfig {
    pub model: String,
    /// Text of the last-word passages (WikiText-2 test by default).
    pub text: PathBuf,
    pub lambada: Option<PathBuf>,
    pub last_word_examples: usize,
    pub decode_tokens: usize,
    /// Bit widths (the study: 8, 4, 2).
    pub bits: Vec<u8>,
    pub group: usize,
    pub act_order: bool,
    pub calibration: CalibrationSpec,
    /// Where the two SVG plots go (none drawn when unset).
    pub plot_dir: Option<PathBuf>,
    pub progress: bool,
    pub device: Device,
}

/// One measured row.
struct Row {
    method: &'static str,
    bits: Option<u8>,
    mb: f64,
    top1: f64,
    top5: f64,
    tps: f64,
}

/// Decode speed: greedy tokens after a fixed prompt, warm-up step excluded.
fn decode_tokens_per_s(p: &PreparedLlm, prompt: &[u32], n: usize) -> Result<f64> {
    lm::greedy(p, &prompt[..prompt.len().min(8)], 1)?;
    let g = lm::greedy(p, prompt, n)?;
    Ok(g.tokens.len() as f64 / g.decode_s.max(1e-9))
}

pub fn run(cfg: &GptqLabConfig) -> Result<Report> {
    if cfg.bits.is_empty() {
        bail!("lab gptq: give at least one bit width (--bits 8,4,2)");
    }
    let text = lm::read_text(&cfg.text)?;
    let all = match &cfg.lambada {
        Some(f) => lastword::lambada_examples(f)?,
        None => lastword::wikitext_examples(&text, 40),
    };
    let examples: Vec<_> = all.into_iter().take(cfg.last_word_examples).collect();
    if examples.is_empty() {
        bail!(
            "no last-word passages in {}: give a longer text or --lambada FILE",
            cfg.text.display()
        );
    }
    let mut t = Table::new(
        "gptq_lab",
        "SmolLM2-135M: GPTQ vs round-to-nearest (weight-only, symmetric, per group)",
        &[
            "method",
            "plan",
            "weights MB",
            "bits per weight",
            "last-word top-1 %",
            "last-word top-5 %",
            "decode tokens/s",
            "quantize s",
        ],
    );
    let g = cfg.group;
    let ao = if cfg.act_order { ":act-order" } else { "" };
    let mut plans: Vec<(&'static str, Option<u8>, String)> = vec![("f32", None, "keep".into())];
    for &b in &cfg.bits {
        plans.push(("rtn", Some(b), format!("lm_head=keep;*=w:i{b}:sym:g{g}")));
        plans.push((
            "gptq",
            Some(b),
            format!("lm_head=keep;*=gptq:i{b}:sym:g{g}{ao}"),
        ));
    }
    let mut rows = Vec::new();
    let mut prompt = Vec::new();
    for (method, bits, plan) in &plans {
        if cfg.progress {
            eprintln!("{method}: {plan}");
        }
        let start = std::time::Instant::now();
        let mut p = lm::prepare(
            &cfg.model,
            LoadAs::F32,
            Some(plan),
            Some(&cfg.calibration),
            &cfg.device,
        )?;
        let quantize_s = start.elapsed().as_secs_f64();
        if prompt.is_empty() {
            let ids = p.llm.tokenizer.encode(&text)?;
            prompt = ids[..64.min(ids.len())].to_vec();
        }
        let tps = decode_tokens_per_s(&p, &prompt, cfg.decode_tokens)?;
        // Accuracy does not depend on where the dequantized weights live: cache them.
        p.llm.model.set_cache_dequantized(true);
        let bar = crate::progress::bar(0, method, cfg.progress);
        let acc = lastword::accuracy(&p.llm.model, &p.llm.tokenizer, &examples, 1024, &bar)?;
        let row = Row {
            method,
            bits: *bits,
            mb: p.weight_bytes() as f64 / 1e6,
            top1: acc.top1_pct(),
            top5: acc.top5_pct(),
            tps,
        };
        t.push(vec![
            match bits {
                Some(b) => format!("{method} int{b} g{g}"),
                None => "f32".into(),
            }
            .into(),
            plan.as_str().into(),
            Cell::f(row.mb, 2),
            Cell::f(p.linear_bits_per_weight(), 2),
            Cell::f(row.top1, 1),
            Cell::f(row.top5, 1),
            Cell::f(row.tps, 1),
            Cell::f(quantize_s, 1),
        ]);
        rows.push(row);
    }
    let c = &cfg.calibration;
    t.note(format!(
        "GPTQ: {} calibration windows of {} tokens from {} (seed {}, sha256 {}), Hessians gathered block by block through the already quantized layers (true_sequential), dampening 1% of the mean diagonal, blocks of 128 columns{}; quantize s = load + calibration + conversion.",
        c.samples,
        c.seqlen,
        c.text.display(),
        c.seed,
        crate::report::provenance::sha256_file(&c.text)
            .map(|h| h[..16].to_string())
            .unwrap_or_else(|_| "?".into()),
        if cfg.act_order { ", act-order with static groups" } else { "" }
    ));
    t.note(format!(
        "last word: first {} passages of {}; correct when every token of the word ranks within the top 1 / top 5.",
        examples.len(),
        match &cfg.lambada {
            Some(f) => f.display().to_string(),
            None => format!("{} (the WikiText-2 rule of src/eval/lastword.rs)", cfg.text.display()),
        }
    ));
    t.note(format!(
        "decode: greedy, {} new tokens after a 64-token prompt, batch 1, CPU ({}). Weights MB: linear layers as stored plus the f32 embedding table and norms. The study (SmolLM-135M, AutoGPTQ, RTX 3090): int2 0.18% / 0.82%, int4 5.24% / 8.88%, int8 5.48% / 9.8% top-1 / top-5; 87.57 / 114.53 / 168.44 MB; ~1420 tokens/s.",
        cfg.decode_tokens,
        crate::nn::kernels::isa::describe()
    ));
    let mut notes = Vec::new();
    if let Some(dir) = &cfg.plot_dir {
        std::fs::create_dir_all(dir)?;
        let f32_row = rows.iter().find(|r| r.bits.is_none());
        let series = |method: &str, y: fn(&Row) -> f64| Series {
            name: method.to_string(),
            points: rows
                .iter()
                .filter(|r| r.method == method)
                .map(|r| (r.mb, y(r)))
                .collect(),
        };
        let acc = LinePlot {
            title: "Last-word accuracy against memory".into(),
            x_label: "weights MB".into(),
            y_label: "last-word accuracy %".into(),
            series: vec![
                Series {
                    name: "gptq top-1".into(),
                    ..series("gptq", |r| r.top1)
                },
                Series {
                    name: "gptq top-5".into(),
                    ..series("gptq", |r| r.top5)
                },
                Series {
                    name: "rtn top-1".into(),
                    ..series("rtn", |r| r.top1)
                },
                Series {
                    name: "rtn top-5".into(),
                    ..series("rtn", |r| r.top5)
                },
            ],
            baseline: f32_row.map(|r| (r.top1, "f32 top-1".to_string())),
            log_y: false,
        };
        let speed = LinePlot {
            title: "Decode speed against memory".into(),
            x_label: "weights MB".into(),
            y_label: "decode tokens/s".into(),
            series: vec![series("gptq", |r| r.tps), series("rtn", |r| r.tps)],
            baseline: f32_row.map(|r| (r.tps, "f32".to_string())),
            log_y: false,
        };
        for (name, plot) in [("gptq_accuracy", acc), ("gptq_speed", speed)] {
            for ext in ["svg", "png"] {
                let path = dir.join(format!("{name}.{ext}"));
                plot.write(&path)?;
                notes.push(format!("plot: {}", path.display()));
            }
        }
    }
    Ok(Report {
        tables: vec![t],
        notes,
    })
}
