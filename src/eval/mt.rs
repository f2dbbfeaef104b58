//! Machine translation measurements: a MarianMT model prepared by a plan, translated over a
//! test set for BLEU/chrF, and its per-sentence latency.

use crate::eval::bleu::{corpus_bleu, corpus_chrf, Bleu};
use crate::eval::latency::LatencyStats;
use crate::eval::seq2seq::{translate, GenerateConfig, Translation};
use crate::model::{load_marian, LoadedMarian};
use crate::nn::{apply_plan, HasLinears, LayerSummary, Plan};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::time::Instant;

/// A loaded MarianMT model after a plan was applied.
pub struct PreparedMarian {
    pub mt: LoadedMarian,
    /// Decoding defaults from the model's `generation_config.json`.
    pub generation: GenerateConfig,
    pub layers: Vec<LayerSummary>,
    pub plan: String,
}

impl PreparedMarian {
    /// Bytes of the model as held: linear layers as stored, embeddings and norms in f32; a
    /// still-tied f32 output projection shares the embedding table and adds only its bias.
    pub fn weight_bytes(&self) -> usize {
        let linears: usize = self.layers.iter().map(|l| l.bytes).sum();
        let tied = if self.mt.model.lm_head_is_tied() {
            let head = self
                .mt
                .model
                .linears()
                .into_iter()
                .find(|l| l.name == "lm_head");
            head.map_or(0, |l| l.num_params() * 4)
        } else {
            0
        };
        linears - tied + self.mt.model.dense_bytes()
    }
}

/// Loads `spec` and applies `plan`; static int8 layers are calibrated by translating
/// `calibration` sentences (greedy) through the model.
pub fn prepare(
    spec: &str,
    plan: Option<&str>,
    calibration: Option<&[String]>,
    device: &Device,
) -> Result<PreparedMarian> {
    let plan_text = plan.unwrap_or("keep").to_string();
    let parsed: Plan = plan_text
        .parse()
        .with_context(|| format!("in --plan '{plan_text}'"))?;
    let mut mt = load_marian(spec, device)?;
    let generation = GenerateConfig::for_model(&mt.source, &mt.model.cfg)?;
    let tokenizer = mt.tokenizer.clone();
    let layers = apply_plan(&mut mt.model, &parsed, |m| {
        let text = calibration.context(
            "static int8 needs calibration sentences: pass --calibration FILE (source-language lines)",
        )?;
        let mut cfg = generation.clone();
        cfg.num_beams = 1;
        translate(m, &tokenizer, text, &cfg, 16, false)?;
        Ok(())
    })?;
    Ok(PreparedMarian {
        mt,
        generation,
        layers,
        plan: plan_text,
    })
}

/// Translations of a test set with their corpus scores and the wall time they took.
pub struct BleuRun {
    pub translations: Vec<Translation>,
    pub bleu: Bleu,
    pub chrf: f64,
    pub seconds: f64,
}

impl BleuRun {
    pub fn sentences_per_second(&self) -> f64 {
        self.translations.len() as f64 / self.seconds.max(1e-9)
    }
}

/// Translates `src` in batches and scores the output against `refs`.
pub fn evaluate(
    p: &PreparedMarian,
    src: &[String],
    refs: &[String],
    cfg: &GenerateConfig,
    batch: usize,
    progress: bool,
) -> Result<BleuRun> {
    if src.len() != refs.len() {
        bail!(
            "{} source lines but {} reference lines: the files must be aligned line by line",
            src.len(),
            refs.len()
        );
    }
    let start = Instant::now();
    let translations = translate(&p.mt.model, &p.mt.tokenizer, src, cfg, batch, progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let hyps: Vec<String> = translations.iter().map(|t| t.text.clone()).collect();
    Ok(BleuRun {
        bleu: corpus_bleu(&hyps, refs)?,
        chrf: corpus_chrf(&hyps, refs)?,
        translations,
        seconds,
    })
}

/// Latency of translating one sentence at a time (batch 1) over `src`, the first sentence
/// translated once beforehand as warm-up and not counted.
pub fn sentence_latency(
    p: &PreparedMarian,
    src: &[String],
    cfg: &GenerateConfig,
) -> Result<LatencyStats> {
    let Some(first) = src.first() else {
        bail!("no sentences to time");
    };
    translate(
        &p.mt.model,
        &p.mt.tokenizer,
        std::slice::from_ref(first),
        cfg,
        1,
        false,
    )?;
    let mut ms = Vec::with_capacity(src.len());
    for s in src {
        let t = Instant::now();
        translate(
            &p.mt.model,
            &p.mt.tokenizer,
            std::slice::from_ref(s),
            cfg,
            1,
            false,
        )?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    LatencyStats::from_samples(&ms)
}
