//! Language-model evaluation shared by the `perplexity`, `sweep` and `lab smollm`
//! commands: load, apply a plan, measure perplexity / KL / sizes.

use super::kl::{self, BaseWriter, KlStats};
use super::perplexity::{self, PerplexityResult, Protocol};
use super::stats::{self, ChunkTokens};
use crate::arch::llama::LoadAs;
use crate::model::{load_llm, LoadedLlm};
use crate::nn::{apply_plan_in_stages, HasLinears, LayerSummary, Plan};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// A loaded model with a plan applied.
pub struct PreparedLlm {
    pub llm: LoadedLlm,
    pub layers: Vec<LayerSummary>,
    pub plan: String,
}

impl PreparedLlm {
    /// Bytes of all weights as held in memory: linear layers as stored, plus the f32
    /// embedding table and norms. A tied output layer is counted once per copy held.
    pub fn weight_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes).sum::<usize>() + self.llm.model.dense_bytes()
    }

    /// Parameters and bytes of the linear layers only (what a plan changes).
    pub fn linear_params_bytes(&self) -> (usize, usize) {
        (
            self.layers.iter().map(|l| l.params).sum(),
            self.layers.iter().map(|l| l.bytes).sum(),
        )
    }

    /// Bits per weight over the quantized linear layers (those not held in f32); 32 when
    /// every layer is f32.
    pub fn linear_bits_per_weight(&self) -> f64 {
        crate::nn::quantized_bits_per_weight(&self.layers)
    }
}

/// Where calibration inputs come from: seeded random windows of a text (GPTQ's recipe:
/// `samples` windows of `seqlen` tokens at uniformly drawn offsets).
#[derive(Debug, Clone)]
pub struct CalibrationSpec {
    pub text: PathBuf,
    pub samples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

/// More calibration tokens than this is a mistake, not a plan.
const MAX_CALIBRATION_TOKENS: usize = 1 << 24;

impl CalibrationSpec {
    pub fn new(text: PathBuf, samples: usize, seqlen: usize, seed: u64) -> Result<Self> {
        if samples == 0 {
            bail!("--calib-samples must be at least 1");
        }
        if seqlen < 2 {
            bail!("--calib-seqlen must be at least 2 tokens");
        }
        if samples.saturating_mul(seqlen) > MAX_CALIBRATION_TOKENS {
            bail!(
                "--calib-samples {samples} x --calib-seqlen {seqlen} is more than {MAX_CALIBRATION_TOKENS} calibration tokens"
            );
        }
        Ok(CalibrationSpec {
            text,
            samples,
            seqlen,
            seed,
        })
    }
}

/// `samples` windows of `seqlen` tokens from `ids`, at offsets drawn with `seed`.
pub fn calibration_windows(
    ids: &[u32],
    samples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    use rand::{Rng, SeedableRng};
    if ids.len() < seqlen {
        bail!(
            "the calibration text has {} tokens, fewer than --calib-seqlen {seqlen}",
            ids.len()
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok((0..samples)
        .map(|_| {
            let start = rng.gen_range(0..=ids.len() - seqlen);
            ids[start..start + seqlen].to_vec()
        })
        .collect())
}

/// Loads `spec` and applies `plan`, feeding `calibration` windows through the model first
/// when some rule needs statistics of its layers' inputs.
pub fn prepare(
    spec: &str,
    load_as: LoadAs,
    plan: Option<&str>,
    calibration: Option<&CalibrationSpec>,
    device: &Device,
) -> Result<PreparedLlm> {
    let plan_text = plan.unwrap_or("keep").to_string();
    let plan: Plan = plan_text
        .parse()
        .with_context(|| format!("in --plan '{plan_text}'"))?;
    let mut llm = load_llm(spec, load_as, device)?;
    let windows = match calibration {
        Some(c) if crate::nn::plan_needs_calibration(&plan) => {
            if c.seqlen > llm.model.cfg.max_position_embeddings {
                bail!(
                    "--calib-seqlen {} is longer than the model's context ({} positions)",
                    c.seqlen,
                    llm.model.cfg.max_position_embeddings
                );
            }
            let ids = llm.tokenizer.encode(&read_text(&c.text)?)?;
            calibration_windows(&ids, c.samples, c.seqlen, c.seed)
                .with_context(|| format!("calibration text {}", c.text.display()))?
        }
        _ => Vec::new(),
    };
    // Sequential methods (GPTQ) calibrate block by block through the quantized model;
    // the others in one pass over the unquantized model.
    let layers = apply_plan_in_stages(&mut llm.model, &plan, &windows, |m| {
        if windows.is_empty() {
            bail!("this plan needs calibration data: pass --calibration FILE (text), or use a weight-only or dynamic method");
        }
        let bar = crate::progress::bar(windows.len() as u64, "calibrate", true);
        for w in &windows {
            let ids = candle_core::Tensor::from_vec(w.clone(), (1, w.len()), &m.device)?;
            m.forward(&ids, &mut m.new_cache(), true)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(())
    })?;
    if layers.is_empty() || llm.model.linears().is_empty() {
        bail!("the model has no linear layers");
    }
    let dtype = crate::device::activation_dtype(device);
    let layers = if dtype == llm.model.dtype() {
        layers
    } else {
        llm.model.set_dtype(dtype)?;
        llm.model
            .linears()
            .into_iter()
            .map(crate::nn::LayerSummary::of)
            .collect()
    };
    Ok(PreparedLlm {
        llm,
        layers,
        plan: plan_text,
    })
}

/// Reads a text file whole (perplexity protocols tokenize the file as one string).
pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read text file {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("text file {} is empty", path.display());
    }
    Ok(text)
}

/// What to do with base log-probs while measuring perplexity.
pub enum KlMode {
    None,
    /// Store the base model's distributions to this file (top-k, 0 = all).
    Save(PathBuf, usize),
    /// Compare with a stored base file.
    Compare(PathBuf),
}

pub struct LmScores {
    pub ppl: PerplexityResult,
    pub kl: Option<KlStats>,
    /// Per-token scores of each window (with base scores when comparing with a base).
    pub chunks: Vec<ChunkTokens>,
    /// Header of the KL base compared with, if any.
    pub base: Option<kl::BaseHeader>,
}

/// Extras of the `perplexity` command: progress lines and early stopping.
#[derive(Debug, Clone, Default)]
pub struct ScoreOptions {
    /// Print one line per chunk to stderr (llama.cpp's layout).
    pub chunk_lines: bool,
    /// Stop once the 95% CI half-width of the mean KL (with a base) or of the mean NLL
    /// (without), from chunk-level standard errors, is at most this.
    pub until_ci: Option<f64>,
}

/// Fewest chunks before `--until-ci` may stop: a standard error from fewer chunks is
/// itself too uncertain to trust.
pub const UNTIL_CI_MIN_CHUNKS: usize = 8;

/// Perplexity of a prepared model, with KL against (or saving) a base file.
pub fn score(
    p: &PreparedLlm,
    ids: &[u32],
    protocol: Protocol,
    max_windows: Option<usize>,
    kl_mode: &KlMode,
    progress: &indicatif::ProgressBar,
) -> Result<LmScores> {
    score_batched(p, ids, protocol, max_windows, 1, kl_mode, progress)
}

/// [`score`] with `batch` windows per forward pass (GPU throughput; same numbers).
pub fn score_batched(
    p: &PreparedLlm,
    ids: &[u32],
    protocol: Protocol,
    max_windows: Option<usize>,
    batch: usize,
    kl_mode: &KlMode,
    progress: &indicatif::ProgressBar,
) -> Result<LmScores> {
    score_with(
        p,
        ids,
        protocol,
        max_windows,
        batch,
        kl_mode,
        &ScoreOptions::default(),
        progress,
    )
}

/// [`score_batched`] with per-chunk lines and early stopping.
#[allow(clippy::too_many_arguments)]
pub fn score_with(
    p: &PreparedLlm,
    ids: &[u32],
    protocol: Protocol,
    max_windows: Option<usize>,
    batch: usize,
    kl_mode: &KlMode,
    opts: &ScoreOptions,
    progress: &indicatif::ProgressBar,
) -> Result<LmScores> {
    let model_name = p.llm.source.display().to_string();
    let bos = p.llm.tokenizer.bos;
    let ws = perplexity::windows(ids, protocol, bos, max_windows)?;
    // Per-window work of each mode, run by one scoring loop.
    enum Sink {
        None,
        Save(BaseWriter),
        Compare(Vec<kl::BaseRow>, KlStats, usize),
    }
    let mut base_header = None;
    let mut sink = match kl_mode {
        KlMode::None => Sink::None,
        KlMode::Save(_, top_k) => Sink::Save(BaseWriter::new(*top_k)),
        KlMode::Compare(path) => {
            let (header, rows) = kl::read_base(path)?;
            // Check the text and protocol before spending time on the model.
            let hash = ws
                .iter()
                .fold(kl::HASH_SEED, |h, w| kl::hash_tokens(h, &w.tokens));
            let positions: usize = ws.iter().map(|w| w.scored()).sum();
            if header.tokens_hash != hash || header.positions != positions {
                bail!(
                    "KL base {} was computed on other tokens or another protocol ({}, {} positions; this run: {protocol}, {positions} positions): \
                     use the same text, --ctx, --bos and --max-chunks as when it was saved",
                    path.display(),
                    header.protocol,
                    header.positions
                );
            }
            if header.vocab != p.llm.model.cfg.vocab_size {
                bail!(
                    "KL base {} has a vocabulary of {} tokens, this model {}",
                    path.display(),
                    header.vocab,
                    p.llm.model.cfg.vocab_size
                );
            }
            base_header = Some(header);
            Sink::Compare(rows, KlStats::default(), 0)
        }
    };
    let mut chunks: Vec<ChunkTokens> = Vec::with_capacity(ws.len());
    if opts.chunk_lines {
        progress
            .suspend(|| eprintln!("{}", stats::chunk_header(matches!(sink, Sink::Compare(..)))));
    }
    let ppl = perplexity::perplexity_of_windows(
        &p.llm.model,
        &ws,
        protocol,
        batch,
        !matches!(sink, Sink::None),
        progress,
        |_, win, lp, nll| {
            let mut chunk = ChunkTokens::default();
            let lp = || lp.context("log-probabilities of the window");
            match &mut sink {
                Sink::None => nll.iter().for_each(|&v| chunk.push(v, None)),
                Sink::Save(w) => {
                    w.add_window(win, lp()?)?;
                    nll.iter().for_each(|&v| chunk.push(v, None));
                }
                Sink::Compare(rows, stats, next) => {
                    for (r, &v) in kl::rows(lp()?)?.iter().zip(nll) {
                        let base = &rows[*next];
                        let (d, agree) = kl::compare_row(base, r);
                        stats.add(d, agree);
                        chunk.push(v, Some((-(base.target_lp as f64), d, agree)));
                        *next += 1;
                    }
                }
            }
            chunks.push(chunk);
            if opts.chunk_lines {
                let line = stats::chunk_line(&chunks);
                progress.suspend(|| eprintln!("{line}"));
            }
            Ok(opts
                .until_ci
                .and_then(|x| until_ci_reached(&chunks, x, ws.len())))
        },
    )?;
    let kl = match (sink, kl_mode) {
        (Sink::Save(w), KlMode::Save(path, _)) => {
            if ppl.stopped_early.is_some() {
                bail!("--until-ci cannot be used with --save-logprobs (a base covers the whole protocol)");
            }
            w.write(
                path,
                &model_name,
                &protocol.to_string(),
                p.llm.model.cfg.vocab_size,
            )?;
            None
        }
        (Sink::Compare(_, stats, _), _) => Some(stats),
        _ => None,
    };
    Ok(LmScores {
        ppl,
        kl,
        chunks,
        base: base_header,
    })
}

/// `Some(why)` once the 95% CI half-width (1.96 chunk-level standard errors) of mean KL
/// (with a base) or mean NLL (without) is at most `x`, after at least
/// [`UNTIL_CI_MIN_CHUNKS`] chunks and before the last one.
pub fn until_ci_reached(chunks: &[ChunkTokens], x: f64, total: usize) -> Option<String> {
    if chunks.len() < UNTIL_CI_MIN_CHUNKS || chunks.len() >= total {
        return None;
    }
    let with_base = chunks.iter().all(|c| c.has_base());
    let sums: Vec<f64> = chunks
        .iter()
        .map(|c| {
            if with_base {
                c.kl.iter().sum()
            } else {
                c.nll.iter().sum()
            }
        })
        .collect();
    let counts: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
    let half = 1.959963984540054 * stats::chunk_se(&sums, &counts);
    (half <= x).then(|| {
        format!(
            "stopped after {} of {total} chunks: the 95% CI half-width of the mean {} (1.96 x its chunk-level standard error) is {half:.5} <= --until-ci {x}",
            chunks.len(),
            if with_base { "KL" } else { "NLL (ln perplexity)" }
        )
    })
}

/// Tokens from greedy decoding, and how long prefill and decode took.
pub struct Generated {
    pub tokens: Vec<u32>,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Greedy continuation of `prompt` with the KV cache (stops at EOS).
pub fn greedy(p: &PreparedLlm, prompt: &[u32], max_new: usize) -> Result<Generated> {
    let m = &p.llm.model;
    let mut cache = m.new_cache();
    let start = std::time::Instant::now();
    let input = candle_core::Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &m.device)?;
    let mut logits = m.forward(&input, &mut cache, true)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let mut tokens = Vec::new();
    for _ in 0..max_new {
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        if Some(next) == p.llm.tokenizer.eos {
            break;
        }
        tokens.push(next);
        let input = candle_core::Tensor::from_vec(vec![next], (1, 1), &m.device)?;
        logits = m.forward(&input, &mut cache, true)?;
    }
    Ok(Generated {
        tokens,
        prefill_s,
        decode_s: start.elapsed().as_secs_f64(),
    })
}

/// Peak resident memory of this process, from /proc (Linux); None elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
