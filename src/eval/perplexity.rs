//! Perplexity over a token stream, under llama.cpp's protocol (consecutive chunks, only
//! the second half of each scored) or Hugging Face's strided sliding window.

use crate::arch::llama::Llama;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::fmt;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protocol {
    /// `llama-perplexity`: consecutive `ctx`-token chunks; each chunk's first token is
    /// replaced by BOS when `bos`; the logits at positions `ctx/2 .. ctx-1` are scored.
    LlamaCpp { ctx: usize, bos: bool },
    /// transformers' perplexity guide: windows of `max_len` tokens every `stride` tokens,
    /// scoring only the tokens not scored by an earlier window.
    Strided { max_len: usize, stride: usize },
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::LlamaCpp { ctx, bos } => write!(
                f,
                "llama.cpp chunks of {ctx}, second half scored, {}",
                if *bos { "BOS first" } else { "no BOS" }
            ),
            Protocol::Strided { max_len, stride } => {
                write!(f, "HF strided, max length {max_len}, stride {stride}")
            }
        }
    }
}

/// One forward pass: its tokens, and the first position whose next-token prediction counts.
/// Positions `first_scored .. tokens.len() - 1` predict `tokens[j + 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub tokens: Vec<u32>,
    pub first_scored: usize,
}

impl Window {
    pub fn scored(&self) -> usize {
        self.tokens.len() - 1 - self.first_scored
    }
}

/// Splits `ids` into the protocol's windows (at most `max_windows`).
pub fn windows(
    ids: &[u32],
    protocol: Protocol,
    bos_id: Option<u32>,
    max_windows: Option<usize>,
) -> Result<Vec<Window>> {
    let limit = max_windows.unwrap_or(usize::MAX);
    if limit == 0 {
        bail!("--max-chunks must be at least 1");
    }
    let mut out = Vec::new();
    match protocol {
        Protocol::LlamaCpp { ctx, bos } => {
            if ctx < 4 {
                bail!("context {ctx} is too short (at least 4 tokens)");
            }
            if ids.len() < ctx {
                bail!(
                    "the text has {} tokens, fewer than one {ctx}-token chunk; use a longer text or a smaller --ctx",
                    ids.len()
                );
            }
            let bos_id = match (bos, bos_id) {
                (true, None) => bail!("--bos was asked for but the vocabulary has no BOS token"),
                (_, b) => b,
            };
            for c in ids.chunks_exact(ctx).take(limit) {
                let mut tokens = c.to_vec();
                if bos {
                    tokens[0] = bos_id.expect("checked above");
                }
                out.push(Window {
                    tokens,
                    first_scored: ctx / 2,
                });
            }
        }
        Protocol::Strided { max_len, stride } => {
            if stride == 0 || stride > max_len || max_len < 2 {
                bail!("strided perplexity needs 0 < stride <= max length (got stride {stride}, max length {max_len})");
            }
            if ids.len() < 2 {
                bail!("the text has fewer than 2 tokens");
            }
            let mut prev_end = 0;
            let mut begin = 0;
            while begin < ids.len() && out.len() < limit {
                let end = (begin + max_len).min(ids.len());
                let target_len = end - prev_end;
                let len = end - begin;
                // The window's first token has no prediction; targets start at index 1.
                let first_target = (len - target_len).max(1);
                out.push(Window {
                    tokens: ids[begin..end].to_vec(),
                    first_scored: first_target - 1,
                });
                prev_end = end;
                if end == ids.len() {
                    break;
                }
                begin += stride;
            }
        }
    }
    Ok(out)
}

/// Log-probabilities of the scored positions of one window: `rows[k]` is the
/// distribution at position `first_scored + k`, over the vocabulary.
pub fn window_log_probs(model: &Llama, w: &Window) -> Result<Tensor> {
    let ids = Tensor::from_vec(w.tokens.clone(), (1, w.tokens.len()), &model.device)?;
    let mut cache = model.new_cache();
    // Logits from the first scored position on (the output layer is the largest matmul).
    let logits = model.forward_tail(&ids, &mut cache, w.tokens.len() - w.first_scored)?;
    let scored = logits.narrow(1, 0, w.scored())?.squeeze(0)?;
    Llama::log_softmax(&scored)
}

#[derive(Debug, Clone)]
pub struct PerplexityResult {
    pub protocol: Protocol,
    pub windows: usize,
    pub scored_tokens: usize,
    pub tokens_processed: usize,
    /// Σ −log p(target), per window.
    pub window_nll: Vec<f64>,
    /// −log p(target) per scored position, per window.
    pub token_nll: Vec<Vec<f64>>,
    /// Why the run ended before the protocol's last window (`--until-ci`), if it did.
    pub stopped_early: Option<String>,
    /// Wall time of each window's forward pass and scoring.
    pub window_seconds: Vec<f64>,
    pub seconds: f64,
}

impl PerplexityResult {
    pub fn nll_sum(&self) -> f64 {
        self.window_nll.iter().sum()
    }

    pub fn mean_nll(&self) -> f64 {
        self.nll_sum() / self.scored_tokens.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Prompt-processing throughput.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens_processed as f64 / self.seconds.max(1e-9)
    }
}

/// Σ −log p(target) over a window's scored positions, from its log-prob rows.
pub fn window_nll(w: &Window, log_probs: &Tensor) -> Result<f64> {
    Ok(token_nll(w, log_probs)?.iter().sum())
}

/// −log p(target) at each of a window's scored positions, from its log-prob rows.
pub fn token_nll(w: &Window, log_probs: &Tensor) -> Result<Vec<f64>> {
    let targets: Vec<u32> = w.tokens[w.first_scored + 1..].to_vec();
    let t = Tensor::from_vec(targets, (w.scored(), 1), log_probs.device())?;
    let picked = log_probs.gather(&t, 1)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(bad) = picked.iter().position(|v| !v.is_finite()) {
        bail!(
            "the model produced a non-finite log-probability at scored position {bad}; its weights or activations overflowed"
        );
    }
    Ok(picked.iter().map(|&v| -(v as f64)).collect())
}

/// Log-probabilities of the scored positions of `ws` (windows of equal length and
/// equal first scored position) run as one batch: one tensor per window, as
/// [`window_log_probs`] gives it.
pub fn batch_log_probs(model: &Llama, ws: &[&Window]) -> Result<Vec<Tensor>> {
    let Some(first) = ws.first() else {
        return Ok(Vec::new());
    };
    if ws.len() == 1 {
        return Ok(vec![window_log_probs(model, first)?]);
    }
    let (t, f) = (first.tokens.len(), first.first_scored);
    if ws
        .iter()
        .any(|w| w.tokens.len() != t || w.first_scored != f)
    {
        bail!("windows of one batch must have the same length and scored positions");
    }
    let ids: Vec<u32> = ws.iter().flat_map(|w| w.tokens.iter().copied()).collect();
    let ids = Tensor::from_vec(ids, (ws.len(), t), &model.device)?;
    let mut cache = model.new_cache();
    let logits = model.forward_tail(&ids, &mut cache, t - f)?;
    let scored = logits.narrow(1, 0, first.scored())?;
    let (b, r, v) = scored.dims3()?;
    let lp = crate::profile::section(&model.device, "log_softmax", || {
        Llama::log_softmax(&scored.reshape((b * r, v))?)
    })?;
    (0..b).map(|i| Ok(lp.narrow(0, i * r, r)?)).collect()
}

/// −log p(target) at each scored position of `ws` (windows of equal length and equal
/// first scored position, as for [`batch_log_probs`]) with the fused NLL kernel: per row
/// a logsumexp and the target's logit, no log-probability tensor. `None` where the fused
/// kernels do not run (a GPU with `QUANTLAB_FUSED=0`). On the CPU the values are
/// bit-identical to [`batch_log_probs`] + [`token_nll`] (`llm_f32::target_log_probs`);
/// skipping the log-probability tensor saves a pass over the logits and 50 MB written per
/// SmolLM2 chunk.
pub fn batch_nll_fused(model: &Llama, ws: &[&Window]) -> Result<Option<Vec<Vec<f64>>>> {
    let Some(first) = ws.first() else {
        return Ok(Some(Vec::new()));
    };
    let cuda = crate::nn::cuda::enabled(&model.device);
    if !cuda && !model.device.is_cpu() {
        return Ok(None);
    }
    let (t, f) = (first.tokens.len(), first.first_scored);
    if ws
        .iter()
        .any(|w| w.tokens.len() != t || w.first_scored != f)
    {
        bail!("windows of one batch must have the same length and scored positions");
    }
    let ids: Vec<u32> = ws.iter().flat_map(|w| w.tokens.iter().copied()).collect();
    let ids = Tensor::from_vec(ids, (ws.len(), t), &model.device)?;
    let mut cache = model.new_cache();
    let rows = t - f;
    // Every row of the tail, so the logits need no copy; the last row of each window has
    // no target (a dummy 0, dropped below).
    let targets: Vec<u32> = ws
        .iter()
        .flat_map(|w| (0..rows).map(move |k| w.tokens.get(f + 1 + k).copied().unwrap_or(0)))
        .collect();
    // The CPU pass of one window: the output layer and the log-softmax fused (no logits).
    let fused_head = if cuda {
        None
    } else {
        model.tail_target_log_probs(&ids, &mut cache, rows, &targets)?
    };
    let (nll, r) = match fused_head {
        Some(lp) => (lp.iter().map(|&l| -l).collect(), rows),
        None => {
            cache = model.new_cache();
            nll_of_logits(model, cuda, &ids, &mut cache, rows, &targets)?
        }
    };
    let mut out = Vec::with_capacity(ws.len());
    for (i, w) in ws.iter().enumerate() {
        let row = &nll[i * r..i * r + w.scored()];
        if let Some(bad) = row.iter().position(|v| !v.is_finite()) {
            bail!(
                "the model produced a non-finite log-probability at scored position {bad}; its weights or activations overflowed"
            );
        }
        out.push(row.iter().map(|&v| v as f64).collect());
    }
    Ok(Some(out))
}

/// −log p(target) per row of the tail's logits (the unfused CPU path and the GPU's fused
/// NLL kernel), and the rows per window.
fn nll_of_logits(
    model: &Llama,
    cuda: bool,
    ids: &Tensor,
    cache: &mut crate::arch::llama::KvCache,
    rows: usize,
    targets: &[u32],
) -> Result<(Vec<f32>, usize)> {
    let logits = model.forward_tail(ids, cache, rows)?;
    let (b, r, v) = logits.dims3()?;
    let nll = crate::profile::section(&model.device, "nll fused", || -> Result<Vec<f32>> {
        if !cuda {
            return cpu_nll_rows(&logits, v, targets);
        }
        let targets = Tensor::from_vec(targets.to_vec(), b * r, &model.device)?;
        let nll = crate::nn::cuda::nll_rows(&logits.reshape((b * r, v))?, &targets)?;
        Ok(nll.to_vec1::<f32>()?)
    })?;
    Ok((nll, r))
}

/// −log p(target) per row of CPU logits (`[.., v]`, converted to f32 as
/// [`Llama::log_softmax`] does), as `f32` like the fused GPU kernel's output.
fn cpu_nll_rows(logits: &Tensor, v: usize, targets: &[u32]) -> Result<Vec<f32>> {
    use crate::nn::kernels::llm_f32;
    let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let n = logits.elem_count();
    let lp = crate::nn::rows::with_cpu_slice(
        &logits,
        n,
        candle_core::CpuStorage::as_slice::<f32>,
        |x| llm_f32::target_log_probs(x, v, targets),
    )
    .ok_or_else(|| anyhow::anyhow!("logits are not a CPU f32 buffer"))?;
    Ok(lp.iter().map(|&l| -l).collect())
}

/// Perplexity of `model` on `ids`, `batch` windows per forward pass where they have the
/// same shape (the numbers do not depend on `batch`, up to float summation order). `each`
/// is called with every window's log-prob rows, in order (for KL divergence and agreement
/// against a base model).
#[allow(clippy::too_many_arguments)]
pub fn perplexity(
    model: &Llama,
    ids: &[u32],
    protocol: Protocol,
    bos_id: Option<u32>,
    max_windows: Option<usize>,
    batch: usize,
    progress: &indicatif::ProgressBar,
    mut each: impl FnMut(usize, &Window, &Tensor) -> Result<()>,
) -> Result<PerplexityResult> {
    let ws = windows(ids, protocol, bos_id, max_windows)?;
    perplexity_of_windows(
        model,
        &ws,
        protocol,
        batch,
        true,
        progress,
        |i, w, lp, _| {
            let lp = lp.context("log-probabilities were asked for")?;
            each(i, w, lp).map(|_| None)
        },
    )
}

/// [`perplexity`] over given windows; `each` also gets the window's per-token NLLs and
/// returns `Some(reason)` to stop the run after the current batch of windows. Without
/// `log_probs`, `each` may get `None` for the log-prob rows: the NLLs then come from the
/// fused kernel where it runs (a GPU), without a log-softmax over the vocabulary.
pub fn perplexity_of_windows(
    model: &Llama,
    ws: &[Window],
    protocol: Protocol,
    batch: usize,
    log_probs: bool,
    progress: &indicatif::ProgressBar,
    mut each: impl FnMut(usize, &Window, Option<&Tensor>, &[f64]) -> Result<Option<String>>,
) -> Result<PerplexityResult> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    progress.set_length(ws.len() as u64);
    let start = Instant::now();
    let mut window_nll_sums = Vec::with_capacity(ws.len());
    let mut token_nlls = Vec::with_capacity(ws.len());
    let mut stopped_early = None;
    let (mut scored, mut processed) = (0, 0);
    let mut window_seconds = Vec::with_capacity(ws.len());
    let mut i = 0;
    while i < ws.len() {
        // The next run of up to `batch` windows of one shape.
        let mut j = i + 1;
        while j < ws.len()
            && j - i < batch
            && ws[j].tokens.len() == ws[i].tokens.len()
            && ws[j].first_scored == ws[i].first_scored
        {
            j += 1;
        }
        let t = Instant::now();
        let group: Vec<&Window> = ws[i..j].iter().collect();
        let fused = if log_probs {
            None
        } else {
            batch_nll_fused(model, &group)?
        };
        let (lps, nlls) = match fused {
            Some(nlls) => (Vec::new(), nlls),
            None => {
                let lps = batch_log_probs(model, &group)?;
                let mut nlls = Vec::with_capacity(group.len());
                crate::profile::section(&model.device, "nll", || -> Result<()> {
                    for (w, lp) in group.iter().zip(&lps) {
                        nlls.push(token_nll(w, lp)?);
                    }
                    Ok(())
                })?;
                (lps, nlls)
            }
        };
        let per_window = t.elapsed().as_secs_f64() / group.len() as f64;
        for (k, (w, nll)) in group.iter().zip(nlls).enumerate() {
            window_nll_sums.push(nll.iter().sum());
            window_seconds.push(per_window);
            if let Some(why) = each(i + k, w, lps.get(k), &nll)? {
                stopped_early.get_or_insert(why);
            }
            token_nlls.push(nll);
            scored += w.scored();
            processed += w.tokens.len();
        }
        progress.inc(group.len() as u64);
        progress.set_message(format!(
            "ppl {:.3}",
            (window_nll_sums.iter().sum::<f64>() / scored as f64).exp()
        ));
        i = j;
        if stopped_early.is_some() {
            break;
        }
    }
    progress.finish_and_clear();
    Ok(PerplexityResult {
        protocol,
        windows: window_nll_sums.len(),
        scored_tokens: scored,
        tokens_processed: processed,
        window_nll: window_nll_sums,
        token_nll: token_nlls,
        stopped_early,
        window_seconds,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_windows_score_the_second_half() {
        let ids: Vec<u32> = (0..20).collect();
        let ws = windows(&ids, Protocol::LlamaCpp { ctx: 8, bos: false }, None, None).unwrap();
        assert_eq!(ws.len(), 2, "the ragged tail is dropped, as llama.cpp does");
        assert_eq!(ws[1].tokens, (8..16).collect::<Vec<_>>());
        assert_eq!(ws[0].first_scored, 4);
        assert_eq!(ws[0].scored(), 3, "positions 4,5,6 predict tokens 5,6,7");
        let ws = windows(
            &ids,
            Protocol::LlamaCpp { ctx: 8, bos: true },
            Some(99),
            Some(1),
        )
        .unwrap();
        assert_eq!(ws.len(), 1);
        assert_eq!(ws[0].tokens[0], 99);
        assert_eq!(ws[0].tokens[1], 1);
        assert!(windows(&ids, Protocol::LlamaCpp { ctx: 8, bos: true }, None, None).is_err());
        assert!(windows(
            &ids[..5],
            Protocol::LlamaCpp { ctx: 8, bos: false },
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn strided_windows_score_every_token_once() {
        // transformers' guide with max_length 6, stride 4 over 13 tokens: windows
        // [0,6) [4,10) [8,13); targets 1..6, 6..10, 10..13.
        let ids: Vec<u32> = (0..13).collect();
        let ws = windows(
            &ids,
            Protocol::Strided {
                max_len: 6,
                stride: 4,
            },
            None,
            None,
        )
        .unwrap();
        assert_eq!(ws.len(), 3);
        let targets: Vec<u32> = ws
            .iter()
            .flat_map(|w| w.tokens[w.first_scored + 1..].to_vec())
            .collect();
        assert_eq!(targets, (1..13).collect::<Vec<_>>());
        assert_eq!(ws[1].tokens, (4..10).collect::<Vec<_>>());
        assert!(windows(
            &ids,
            Protocol::Strided {
                max_len: 4,
                stride: 5
            },
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn window_nll_picks_the_targets() {
        let w = Window {
            tokens: vec![0, 1, 2],
            first_scored: 0,
        };
        // Rows: position 0 predicts token 1, position 1 predicts token 2.
        let lp = Tensor::new(
            &[[-3.0f32, -0.5, -2.0], [-1.0, -1.5, -0.25]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!((window_nll(&w, &lp).unwrap() - 0.75).abs() < 1e-6);
    }
}
