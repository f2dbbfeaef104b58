//! Greedy and beam-search decoding for encoder–decoder models, with the semantics of
//! transformers' `generate` (5.x): the same logits processors (bad words, minimum length,
//! forced EOS at the last position), the same beam bookkeeping (2 × num_beams candidates per
//! step, finished hypotheses scored by sum of log-probs / generated_length^length_penalty,
//! the `early_stopping` heuristics), and the same f32 arithmetic, so outputs match token for
//! token up to floating-point ties.

use crate::arch::marian::{DecoderState, Marian, MarianConfig};
use crate::load::marian_tokenizer::{MarianTokenizer, Side};
use crate::nn::kernels::llm_f32::{log_softmax_into, max as max_ignoring_nan};
use crate::nn::rows::with_cpu_slice;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::Value;
use std::path::Path;

/// transformers' `early_stopping`: `False` (stop when the best running beam cannot beat the
/// worst finished one at its current length), `True` (stop once num_beams hypotheses are
/// finished), `Never` (the canonical bound, with max_length when length_penalty > 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    False,
    True,
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "false" | "no" => Self::False,
            "true" | "yes" => Self::True,
            "never" => Self::Never,
            _ => bail!("early stopping '{s}' must be true, false or never"),
        })
    }
}

/// Decoding settings, named as in `generation_config.json`.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub num_beams: usize,
    /// Maximum decoder length, the start token included (transformers' `max_length`).
    pub max_length: usize,
    pub min_length: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub bad_words_ids: Vec<Vec<u32>>,
    pub forced_eos_token_id: Option<u32>,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub decoder_start_token_id: u32,
    /// The decoder's positions (max_position_embeddings): the longest output possible.
    pub max_positions: usize,
    /// The decoder's vocabulary size (a beam search needs 2 × num_beams candidates).
    pub vocab: usize,
}

/// Most beams a search may use: each beam is a decoder row holding its own self-attention
/// cache for every sentence of a batch, and transformers' search ranks 2 × beams candidates.
pub const MAX_BEAMS: usize = 256;

/// `n` beams are possible: 1 to [`MAX_BEAMS`], and 2 × n candidates within the vocabulary.
fn check_beams(n: usize, vocab: usize) -> Result<()> {
    let max = MAX_BEAMS.min(vocab / 2).max(1);
    if n == 0 || n > max {
        bail!(
            "{n} beams: 1 to {max} are possible (at most {MAX_BEAMS}, and 2 × beams candidates must fit in the {vocab}-token vocabulary)"
        );
    }
    Ok(())
}

impl GenerateConfig {
    /// The model's defaults: `generation_config.json` where present, else `config.json`'s
    /// generation fields, else transformers' defaults. Values that cannot work are refused
    /// with the key and the file named: `num_beams` 0 or beyond [`MAX_BEAMS`], a
    /// `max_length` past the decoder's positions, token ids outside the vocabulary.
    pub fn for_model(dir: &Path, cfg: &MarianConfig) -> Result<Self> {
        let read = |name: &str| -> Result<Value> {
            let p = dir.join(name);
            if p.is_file() {
                crate::load::read_json(&p)
            } else {
                Ok(Value::Null)
            }
        };
        let gen = read("generation_config.json")?;
        let config = read("config.json")?;
        // The value of `k` and the file it came from.
        let field = |k: &str| -> Option<(&Value, String)> {
            [(&gen, "generation_config.json"), (&config, "config.json")]
                .into_iter()
                .find_map(|(v, f)| {
                    v.get(k)
                        .filter(|x| !x.is_null())
                        .map(|x| (x, dir.join(f).display().to_string()))
                })
        };
        let int = |k: &str, d: usize| -> Result<usize> {
            match field(k) {
                None => Ok(d),
                Some((v, file)) => v
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .with_context(|| {
                        format!("{file}: '{k}' must be a non-negative integer, found {v}")
                    }),
            }
        };
        let vocab = cfg.decoder_vocab_size;
        let bad_words_ids = match field("bad_words_ids") {
            Some((v, file)) => {
                let ids =
                    serde_json::from_value::<Vec<Vec<u32>>>(v.clone()).with_context(|| {
                        format!("{file}: 'bad_words_ids' must be a list of lists of token ids")
                    })?;
                if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
                    bail!(
                        "{file}: 'bad_words_ids' holds token id {bad}, outside the vocabulary (decoder_vocab_size {vocab})"
                    );
                }
                ids
            }
            // transformers bans nothing unless the config says so (opus-mt configs ban pad).
            None => Vec::new(),
        };
        // Special ids a generation config may repeat must be tokens too (the decoder's
        // own ids come from config.json, already checked when it was read).
        for k in [
            "eos_token_id",
            "pad_token_id",
            "decoder_start_token_id",
            "forced_eos_token_id",
            "bos_token_id",
        ] {
            if let Some(v) = gen.get(k).filter(|v| !v.is_null()) {
                let file = dir.join("generation_config.json");
                let ids: Vec<u64> = match v {
                    Value::Array(a) => a.iter().map(|x| x.as_u64()).collect::<Option<_>>(),
                    x => x.as_u64().map(|i| vec![i]),
                }
                .with_context(|| {
                    format!("{}: '{k}' must be a token id, found {v}", file.display())
                })?;
                if let Some(id) = ids.iter().find(|&&i| i >= vocab as u64) {
                    bail!(
                        "{}: '{k}' is {id}, outside the vocabulary (decoder_vocab_size {vocab})",
                        file.display()
                    );
                }
            }
        }
        let early_stopping = match field("early_stopping") {
            Some((Value::Bool(true), _)) => EarlyStopping::True,
            Some((Value::String(s), file)) => s.parse().with_context(|| file.clone())?,
            _ => EarlyStopping::False,
        };
        let num_beams = int("num_beams", 1)?;
        if let Some((_, file)) = field("num_beams") {
            check_beams(num_beams, vocab).with_context(|| format!("'num_beams' in {file}"))?;
        }
        let max_length = int("max_length", 20)?;
        if let Some((_, file)) = field("max_length") {
            // The start token plus max_length - 1 fed tokens, each needing a position.
            if max_length < 2 || max_length - 1 > cfg.max_position_embeddings {
                bail!(
                    "{file}: 'max_length' {max_length} must be 2 to {} (the decoder has max_position_embeddings {} positions)",
                    cfg.max_position_embeddings + 1,
                    cfg.max_position_embeddings
                );
            }
        }
        let length_penalty = match field("length_penalty") {
            None => 1.0,
            Some((v, file)) => v.as_f64().filter(|x| x.is_finite()).with_context(|| {
                format!("{file}: 'length_penalty' must be a finite number, found {v}")
            })?,
        };
        Ok(Self {
            num_beams,
            max_length,
            min_length: int("min_length", 0)?,
            length_penalty,
            early_stopping,
            bad_words_ids,
            forced_eos_token_id: cfg.forced_eos_token_id,
            eos_token_id: cfg.eos_token_id,
            pad_token_id: cfg.pad_token_id,
            decoder_start_token_id: cfg.decoder_start_token_id,
            max_positions: cfg.max_position_embeddings,
            vocab,
        })
    }

    /// Sets `max_length` from a number of new tokens, as `max_new_tokens` does.
    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_length = n + 1;
        self
    }

    /// Applies the logits processors to one row of scores; `seq` holds the decoder tokens so
    /// far (start token included).
    fn process(&self, scores: &mut [f32], seq: &[u32]) {
        let cur_len = seq.len();
        if cur_len < self.min_length {
            scores[self.eos_token_id as usize] = f32::NEG_INFINITY;
        }
        for bad in &self.bad_words_ids {
            let Some((&last, prefix)) = bad.split_last() else {
                continue;
            };
            if seq.ends_with(prefix) && (last as usize) < scores.len() {
                scores[last as usize] = f32::NEG_INFINITY;
            }
        }
        if let Some(eos) = self.forced_eos_token_id {
            if cur_len + 1 == self.max_length {
                scores.fill(f32::NEG_INFINITY);
                scores[eos as usize] = 0.0;
            }
        }
    }
}

/// Changes to a model's generation defaults (the `translate`/`eval`/`lab` decoding flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Beams (1 = greedy).
    pub num_beams: Option<usize>,
    /// Most tokens generated per sentence (EOS included).
    pub max_new_tokens: Option<usize>,
    /// Beam scores are divided by length^length_penalty.
    pub length_penalty: Option<f64>,
    /// Beam search stopping rule.
    pub early_stopping: Option<EarlyStopping>,
}

impl Overrides {
    /// `defaults` with these changes, checked.
    pub fn apply(&self, defaults: &GenerateConfig) -> Result<GenerateConfig> {
        let mut cfg = defaults.clone();
        if let Some(n) = self.num_beams {
            check_beams(n, cfg.vocab).context("--num-beams")?;
            cfg.num_beams = n;
        }
        if let Some(n) = self.max_new_tokens {
            if n == 0 || n > cfg.max_positions {
                bail!(
                    "--max-new-tokens {n}: 1 to {} are possible (the model's context, max_position_embeddings, is {} positions)",
                    cfg.max_positions,
                    cfg.max_positions
                );
            }
            cfg = cfg.with_max_new_tokens(n);
        }
        if let Some(lp) = self.length_penalty {
            if !lp.is_finite() {
                bail!("--length-penalty must be a finite number");
            }
            cfg.length_penalty = lp;
        }
        if let Some(e) = self.early_stopping {
            cfg.early_stopping = e;
        }
        Ok(cfg)
    }
}

impl GenerateConfig {
    /// A short description, e.g. `beam 4 (lp 1, early False), max 128 new`.
    pub fn label(&self) -> String {
        let max = self.max_length - 1;
        if self.num_beams == 1 {
            format!("greedy, max {max} new")
        } else {
            format!(
                "beam {} (lp {}, early {:?}), max {max} new",
                self.num_beams, self.length_penalty, self.early_stopping
            )
        }
    }
}

/// One output: the generated ids (start token excluded, EOS included when produced) and,
/// for beam search, the sequence score transformers reports (`sequences_scores`).
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub ids: Vec<u32>,
    pub score: f32,
}

/// Pads source id lists into `[n, s]` ids and a 1/0 mask.
fn pad_batch(model: &Marian, src: &[Vec<u32>], pad: u32) -> Result<(Tensor, Tensor)> {
    let s = src.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(src.len() * s);
    let mut mask = Vec::with_capacity(src.len() * s);
    for row in src {
        ids.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, s - row.len())),
        );
        mask.extend((0..s).map(|i| u32::from(i < row.len())));
    }
    let dev = model.device();
    Ok((
        Tensor::from_vec(ids, (src.len(), s), dev)?,
        Tensor::from_vec(mask, (src.len(), s), dev)?,
    ))
}

/// Decodes one batch of source id lists (each ending with EOS) with `cfg`.
///
/// On the CPU the whole decode runs on one of rayon's worker threads (see [`on_rayon_worker`]).
pub fn generate(model: &Marian, src: &[Vec<u32>], cfg: &GenerateConfig) -> Result<Vec<Hypothesis>> {
    if model.device().is_cpu() {
        on_rayon_worker(|| generate_here(model, src, cfg))
    } else {
        generate_here(model, src, cfg)
    }
}

/// Runs `f` on a worker thread of rayon's global pool (directly when already on one).
/// A decode step alternates short serial work (beam bookkeeping, candle's small ops) with
/// rayon-parallel products and log-softmax. Called from outside the pool, every parallel
/// op is injected into it and the calling thread sleeps until it is done, so with
/// rayon's two workers on a 2-core machine three threads take turns on two cores (the
/// workers spin looking for work while the caller runs its serial part). On a worker, the
/// parallel ops are plain `join`s: the caller's thread takes its own half of the work and
/// only the other worker waits in between. `QUANTLAB_DECODE_POOL=off` keeps the calling
/// thread (for A/B timing); the arithmetic is the same either way.
fn on_rayon_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| {
        std::env::var("QUANTLAB_DECODE_POOL").is_ok_and(|v| v == "off" || v == "0")
    });
    if off || rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

fn generate_here(
    model: &Marian,
    src: &[Vec<u32>],
    cfg: &GenerateConfig,
) -> Result<Vec<Hypothesis>> {
    if src.is_empty() {
        return Ok(Vec::new());
    }
    if cfg.max_length < 2 {
        bail!(
            "max_length {} leaves no room for a generated token",
            cfg.max_length
        );
    }
    let (ids, mask) = pad_batch(model, src, cfg.pad_token_id)?;
    let (encoded, src_mask) = model.encode(&ids, &mask)?;
    let mut state = model.start_decoding(&encoded, &src_mask)?;
    if cfg.num_beams == 1 {
        greedy(model, &mut state, src.len(), cfg)
    } else {
        let rows: Vec<usize> = (0..src.len())
            .flat_map(|i| std::iter::repeat_n(i, cfg.num_beams))
            .collect();
        state.select_rows(&rows)?;
        beam_search(model, &mut state, src.len(), cfg)
    }
}

/// Next-token scores of the last token of each row, written into `out` as `[rows, vocab]`
/// row-major (a buffer reused from step to step); returns `vocab`. Log-probabilities come
/// from [`log_softmax_into`] (the polynomial `exp`, within 2 ulp of libm's: not candle's
/// op chain bit for bit, but the full test set translates to the same text, see the README).
fn step(
    model: &Marian,
    state: &mut DecoderState,
    last: &[u32],
    log_probs: bool,
    out: &mut Vec<f32>,
) -> Result<usize> {
    let ids = Tensor::from_vec(last.to_vec(), (last.len(), 1), model.device())?;
    let logits = model.decode(state, &ids)?;
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let n = logits.elem_count();
    if n != last.len() * vocab {
        bail!(
            "decoder returned {:?} for {} rows",
            logits.dims(),
            last.len()
        );
    }
    out.resize(n, 0.0);
    let pick = candle_core::CpuStorage::as_slice::<f32>;
    let written = with_cpu_slice(&logits, n, pick, |x| write_scores(x, out, vocab, log_probs));
    if written.is_none() {
        // Another device or layout: the logits come to the host first.
        let host = logits.flatten_all()?.to_vec1::<f32>()?;
        write_scores(&host, out, vocab, log_probs);
    }
    Ok(vocab)
}

/// `out ← x`, or its row-wise log-softmax (rows of `vocab`); both of one length.
fn write_scores(x: &[f32], out: &mut [f32], vocab: usize, log_probs: bool) {
    if log_probs {
        log_softmax_into(x, out, vocab);
    } else {
        out.copy_from_slice(x);
    }
}

fn greedy(
    model: &Marian,
    state: &mut DecoderState,
    n: usize,
    cfg: &GenerateConfig,
) -> Result<Vec<Hypothesis>> {
    let mut seqs: Vec<Vec<u32>> = vec![vec![cfg.decoder_start_token_id]; n];
    let mut active: Vec<usize> = (0..n).collect();
    let mut scores = Vec::new();
    while !active.is_empty() {
        let last: Vec<u32> = active.iter().map(|&i| *seqs[i].last().unwrap()).collect();
        let vocab = step(model, state, &last, false, &mut scores)?;
        let mut keep = Vec::with_capacity(active.len());
        for (row, (&i, s)) in active.iter().zip(scores.chunks_mut(vocab)).enumerate() {
            cfg.process(s, &seqs[i]);
            let next = argmax(s);
            seqs[i].push(next);
            if next != cfg.eos_token_id && seqs[i].len() < cfg.max_length {
                keep.push(row);
            }
        }
        if keep.len() != active.len() && !keep.is_empty() {
            state.select_rows(&keep)?;
        }
        active = keep.iter().map(|&r| active[r]).collect();
    }
    Ok(seqs
        .into_iter()
        .map(|s| Hypothesis {
            ids: s[1..].to_vec(),
            score: 0.0,
        })
        .collect())
}

/// The first index of the largest value (torch.argmax's choice on ties).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' stand-in for "impossible" in beam bookkeeping.
const NEG: f32 = -1.0e9;

/// Values per block of [`top_k_scores`]'s scan: a block whose largest value cannot enter
/// the best `k` is skipped after one vectorised maximum.
const TOP_K_BLOCK: usize = 64;

/// `best` ← the `k` largest `row[t] + base` with their `t`, best first, ties to the lower
/// `t` (the candidates transformers' `topk` over one beam yields). Equal to inserting every
/// value in turn (`scan`), which it does for the first block; later blocks are scanned only
/// when their largest value could enter: `x + base` rounds monotonically in `x`, so no value
/// of a block whose maximum `m` has `m + base <= best[k - 1]` enters (entry needs more than
/// the current k-th score).
fn top_k_scores(row: &[f32], base: f32, k: usize, best: &mut Vec<(f32, u32)>) {
    best.clear();
    let scan = |best: &mut Vec<(f32, u32)>, from: usize, block: &[f32]| {
        for (j, &lp) in block.iter().enumerate() {
            let s = lp + base;
            if best.len() < k || s > best[k - 1].0 {
                let pos = best.partition_point(|&(x, _)| x >= s);
                best.insert(pos, (s, (from + j) as u32));
                best.truncate(k);
            }
        }
    };
    for (i, block) in row.chunks(TOP_K_BLOCK).enumerate() {
        if best.len() == k && max_ignoring_nan(block) + base <= best[k - 1].0 {
            continue;
        }
        scan(best, i * TOP_K_BLOCK, block);
    }
}

/// The beam state of one sentence.
struct Beams {
    running: Vec<(Vec<u32>, f32)>,
    finished: Vec<(Vec<u32>, f32, bool)>,
    improvable: bool,
    done: bool,
}

impl Beams {
    fn new(cfg: &GenerateConfig) -> Self {
        let nb = cfg.num_beams;
        let start = vec![cfg.decoder_start_token_id];
        Self {
            running: (0..nb)
                .map(|b| (start.clone(), if b == 0 { 0.0 } else { NEG }))
                .collect(),
            finished: (0..nb).map(|_| (start.clone(), NEG, false)).collect(),
            improvable: true,
            done: false,
        }
    }

    /// One step given the log-probs of each running beam (`[num_beams, vocab]` row-major,
    /// processed in place); returns the parent beam of each new running beam.
    fn advance(&mut self, logp: &mut [f32], vocab: usize, cfg: &GenerateConfig) -> Vec<usize> {
        let nb = cfg.num_beams;
        let k = 2 * nb;
        let cur_len = self.running[0].0.len();
        // Top-k over beams × vocab of accumulated scores: each beam's own top k suffices.
        let mut cands: Vec<(f32, usize, u32)> = Vec::with_capacity(nb * k);
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        for (b, row) in logp.chunks_mut(vocab).enumerate() {
            cfg.process(row, &self.running[b].0);
            top_k_scores(row, self.running[b].1, k, &mut best);
            cands.extend(best.iter().map(|&(s, t)| (s, b, t)));
        }
        cands.sort_by(|x, y| {
            y.0.total_cmp(&x.0)
                .then((x.1 * vocab + x.2 as usize).cmp(&(y.1 * vocab + y.2 as usize)))
        });
        cands.truncate(k);
        let hits: Vec<bool> = cands
            .iter()
            .map(|&(_, _, t)| t == cfg.eos_token_id || cur_len + 1 >= cfg.max_length)
            .collect();
        // Next running beams: the best candidates that did not stop.
        let mut order: Vec<(f32, usize)> = cands
            .iter()
            .zip(&hits)
            .enumerate()
            .map(|(i, (c, &h))| (c.0 + if h { NEG } else { 0.0 }, i))
            .collect();
        order.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let seq_of = |c: &(f32, usize, u32), running: &[(Vec<u32>, f32)]| {
            let mut s = running[c.1].0.clone();
            s.push(c.2);
            s
        };
        let parents: Vec<usize> = order[..nb].iter().map(|&(_, i)| cands[i].1).collect();
        let new_running: Vec<(Vec<u32>, f32)> = order[..nb]
            .iter()
            .map(|&(s, i)| (seq_of(&cands[i], &self.running), s))
            .collect();
        // Finished hypotheses: candidates among the top nb that stopped, length-normalized.
        let denom = (cur_len as f64).powf(cfg.length_penalty) as f32;
        let full = self.finished.iter().all(|f| f.2) && cfg.early_stopping == EarlyStopping::True;
        let mut merged: Vec<(f32, usize, bool)> = self
            .finished
            .iter()
            .enumerate()
            .map(|(j, f)| (f.1, j, f.2))
            .collect();
        for (i, c) in cands.iter().enumerate() {
            let just_finished = hits[i] && i < nb;
            let mut s = c.0 / denom;
            if full {
                s += NEG;
            }
            if !self.improvable {
                s += NEG;
            }
            if !just_finished {
                s += NEG;
            }
            merged.push((s, nb + i, just_finished));
        }
        merged.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let finished = merged[..nb]
            .iter()
            .map(|&(s, j, f)| {
                let seq = if j < nb {
                    self.finished[j].0.clone()
                } else {
                    seq_of(&cands[j - nb], &self.running)
                };
                (seq, s, f)
            })
            .collect();
        self.finished = finished;
        self.running = new_running;
        // Can a running beam still beat the worst finished one?
        let cur_len = cur_len + 1;
        let best_len = if cfg.early_stopping == EarlyStopping::Never && cfg.length_penalty > 0.0 {
            cfg.max_length - 1
        } else {
            cur_len - 1
        };
        let best_possible = self.running[0].1 / (best_len as f64).powf(cfg.length_penalty) as f32;
        let worst = self
            .finished
            .iter()
            .map(|f| f.1)
            .fold(f32::INFINITY, f32::min);
        self.improvable &= self
            .finished
            .iter()
            .any(|f| best_possible > if f.2 { worst } else { NEG });
        let all_finished = self.finished.iter().all(|f| f.2);
        self.done = !self.improvable
            || (all_finished && cfg.early_stopping == EarlyStopping::True)
            || hits.iter().all(|&h| h);
        parents
    }
}

fn beam_search(
    model: &Marian,
    state: &mut DecoderState,
    n: usize,
    cfg: &GenerateConfig,
) -> Result<Vec<Hypothesis>> {
    let nb = cfg.num_beams;
    let mut beams: Vec<Beams> = (0..n).map(|_| Beams::new(cfg)).collect();
    let mut active: Vec<usize> = (0..n).collect();
    let mut scores = Vec::new();
    while !active.is_empty() {
        let last: Vec<u32> = active
            .iter()
            .flat_map(|&i| beams[i].running.iter().map(|r| *r.0.last().unwrap()))
            .collect();
        let vocab = step(model, state, &last, true, &mut scores)?;
        let mut rows = Vec::with_capacity(active.len() * nb);
        let mut still = Vec::with_capacity(active.len());
        for (slot, (&i, logp)) in active.iter().zip(scores.chunks_mut(nb * vocab)).enumerate() {
            let parents = beams[i].advance(logp, vocab, cfg);
            if !beams[i].done {
                rows.extend(parents.iter().map(|&p| slot * nb + p));
                still.push(i);
            }
        }
        if !still.is_empty() {
            state.select_rows(&rows)?;
        }
        active = still;
    }
    Ok(beams
        .into_iter()
        .map(|b| {
            let (seq, score, _) = &b.finished[0];
            Hypothesis {
                ids: seq[1..].to_vec(),
                score: *score,
            }
        })
        .collect())
}

/// A translated sentence: its text, generated ids and (beam search) sequence score.
#[derive(Debug, Clone)]
pub struct Translation {
    pub text: String,
    pub ids: Vec<u32>,
    pub score: f32,
}

/// Translates `texts` in order, `batch` sentences at a time (padded, as transformers batches).
pub fn translate(
    model: &Marian,
    tokenizer: &MarianTokenizer,
    texts: &[String],
    cfg: &GenerateConfig,
    batch: usize,
    progress: bool,
) -> Result<Vec<Translation>> {
    let bar = crate::progress::bar(texts.len() as u64, "translate", progress);
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        let src: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| tokenizer.encode(t, Side::Source))
            .collect();
        for h in generate(model, &src, cfg)? {
            out.push(Translation {
                text: tokenizer.decode(&h.ids),
                ids: h.ids,
                score: h.score,
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan `top_k_scores` replaced: every value inserted in turn.
    fn top_k_naive(row: &[f32], base: f32, k: usize) -> Vec<(f32, u32)> {
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        for (t, &lp) in row.iter().enumerate() {
            let s = lp + base;
            if best.len() < k || s > best[k - 1].0 {
                let pos = best.partition_point(|&(x, _)| x >= s);
                best.insert(pos, (s, t as u32));
                best.truncate(k);
            }
        }
        best
    }

    fn bits(v: &[(f32, u32)]) -> Vec<(u32, u32)> {
        v.iter().map(|&(s, t)| (s.to_bits(), t)).collect()
    }

    #[test]
    fn top_k_scores_equals_inserting_every_value() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut best = Vec::new();
        for case in 0..400 {
            let len = [8, 15, 64, 65, 200, 1000, 15258][case % 7];
            let k = [1, 2, 8, 8, 16][case % 5].min(len);
            // Coarse values make ties; a large base makes distinct values round together.
            let coarse = case % 3 == 0;
            let mut row: Vec<f32> = (0..len)
                .map(|_| {
                    let x = -20.0 * next();
                    if coarse {
                        x.round()
                    } else {
                        x
                    }
                })
                .collect();
            if case % 4 == 1 {
                for t in (0..len).step_by(3) {
                    row[t] = f32::NEG_INFINITY;
                }
            }
            if case % 5 == 2 {
                row[len / 2] = f32::NAN;
            }
            // The best values late in the row, so early blocks must be revisited never.
            if case % 6 == 5 {
                row[len - 1] = 1.0;
            }
            let base = [0.0, -3.25, NEG, -1234.567][case % 4];
            top_k_scores(&row, base, k, &mut best);
            assert_eq!(
                bits(&best),
                bits(&top_k_naive(&row, base, k)),
                "case {case}: {len} values, k {k}, base {base}"
            );
        }
    }

    #[test]
    fn block_max_ignores_nan_and_finds_the_tail() {
        let mut v = vec![-1.0f32; 37];
        v[3] = f32::NAN;
        v[36] = 5.0;
        assert_eq!(max_ignoring_nan(&v), 5.0);
        v[36] = -2.0;
        v[20] = 4.0;
        assert_eq!(max_ignoring_nan(&v), 4.0);
        assert_eq!(max_ignoring_nan(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }
}
