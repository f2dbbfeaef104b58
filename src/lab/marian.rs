//! The lab's translation table: a MarianMT model in fp32, dynamic int8, dynamic fp16,
//! weight-only int4 and NF4, with BLEU, its change against fp32, size, per-sentence latency
//! and throughput on Multi30k test_2016_flickr.

use crate::eval::bleu::BLEU_SIGNATURE;
use crate::eval::mt::{self, PreparedMarian};
use crate::eval::seq2seq::{GenerateConfig, Overrides};
use crate::report::{Cell, Report, Table};
use anyhow::Result;
use candle_core::Device;

pub struct MarianLabConfig {
    pub model: String,
    pub src: Vec<String>,
    pub refs: Vec<String>,
    pub decoding: Overrides,
    pub batch_size: usize,
    /// Sentences timed one at a time for the latency column.
    pub latency_sentences: usize,
    pub progress: bool,
    pub device: Device,
}

/// The table's rows: label and plan. Every `nn.Linear` of the model is quantized, the output
/// projection included, as torch's `quantize_dynamic({nn.Linear})` does; embeddings stay f32.
pub const ROWS: [(&str, &str); 5] = [
    ("fp32", "*=f32"),
    ("dynamic int8", "*=dynamic-int8"),
    ("dynamic fp16", "*=f16"),
    ("weight-only int4 (g64)", "*=w:i4:sym:g64"),
    ("NF4 (b64)", "*=nf4"),
];

fn prepare(cfg: &MarianLabConfig, plan: &str) -> Result<(PreparedMarian, GenerateConfig)> {
    let p = mt::prepare(&cfg.model, Some(plan), None, &cfg.device)?;
    let g = cfg.decoding.apply(&p.generation)?;
    Ok((p, g))
}

pub fn run(cfg: &MarianLabConfig) -> Result<Report> {
    let mut t = Table::new(
        "marian",
        "MarianMT en-de (Multi30k test_2016_flickr): quantization vs BLEU, size, speed",
        &[
            "weights",
            "plan",
            "BLEU",
            "diff vs fp32 %",
            "chrF",
            "size MB",
            "latency ms / sentence (std)",
            "samples/s",
        ],
    );
    let mut base_bleu = None;
    let mut label = String::new();
    let timed = &cfg.src[..cfg.latency_sentences.min(cfg.src.len())];
    for (name, plan) in ROWS {
        if cfg.progress {
            eprintln!("{name}: {plan}");
        }
        let (p, g) = prepare(cfg, plan)?;
        label = g.label();
        let run = mt::evaluate(&p, &cfg.src, &cfg.refs, &g, cfg.batch_size, cfg.progress)?;
        let lat = mt::sentence_latency(&p, timed, &g)?;
        let base = *base_bleu.get_or_insert(run.bleu.score);
        t.push(vec![
            name.into(),
            plan.into(),
            Cell::f(run.bleu.score, 2),
            Cell::f(100.0 * (run.bleu.score - base) / base, 1),
            Cell::f(run.chrf, 2),
            Cell::f(p.weight_bytes() as f64 / 1e6, 2),
            Cell::Text(format!("{:.1} ({:.1})", lat.mean_ms, lat.std_ms)),
            Cell::f(run.sentences_per_second(), 1),
        ]);
    }
    t.note(format!(
        "{} sentences, decoding: {label}; BLEU {BLEU_SIGNATURE} (sacrebleu defaults), chrF nc:6 nw:0.",
        cfg.src.len()
    ));
    t.note(format!(
        "latency: mean (std) wall time to translate one sentence alone (batch 1) over the first {} sentences, one warm-up excluded; samples/s: all sentences in padded batches of {}, 2 CPU threads.",
        timed.len(),
        cfg.batch_size
    ));
    t.note(format!(
        "CPU kernels: {}.",
        crate::nn::kernels::isa::describe()
    ));
    t.note("size: weights as held in memory: linear layers as stored (scales included) plus the f32 embedding table and norms; quantizing lm_head unties it from the embedding table, so it then adds its own bytes.");
    t.note("dynamic int8 = int8 per-channel weights, activations quantized per batch at run time, i32 accumulation; dynamic fp16 = fp16 weights, f32 compute; int4 = symmetric round-to-nearest, groups of 64; NF4 = bitsandbytes' 4-bit normal float, blocks of 64 with f32 absmax.");
    t.note("The lab's published figures (opus-mt en-sk, CPU): BLEU 37.07 -> 35.85 with dynamic int8 (-3.3%), size 301.9 MB -> 200.6 MB.");
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}
