//! KL divergence to a base model and top-1 agreement, like llama.cpp's
//! `--kl-divergence-base` / `--kl-divergence`: the base model's log-probabilities at every
//! scored position are stored once, then each quantized model is compared against them.
//!
//! To keep files small the base distribution is stored as its `k` most likely tokens plus
//! one bucket for the remaining mass (`k = 0` stores the whole vocabulary). KL is then
//! computed between the two coarse-grained distributions, which is exact when `k` covers
//! the vocabulary and otherwise a lower bound (coarse-graining never increases KL).
//! Each position also stores the base's log-probability of the token that actually came
//! next, which Δp and the perplexity ratio need (format 2; format 1 files lack it and are
//! refused). The file ends with an FNV-1a checksum of everything before it, verified on
//! read, so a damaged file fails loudly instead of giving a wrong KL.

use super::perplexity::Window;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

const MAGIC: &[u8; 8] = b"QLKLD002";
/// Format 1: no target log-probs, no checksum.
const MAGIC_V1: &[u8; 8] = b"QLKLD001";

/// What the stored positions were computed on; a comparison refuses a mismatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseHeader {
    pub model: String,
    pub protocol: String,
    /// FNV-1a hash of the scored windows' token ids.
    pub tokens_hash: u64,
    pub positions: usize,
    pub top_k: usize,
    pub vocab: usize,
}

/// One scored position of the base model.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseRow {
    pub ids: Vec<u32>,
    pub log_probs: Vec<f32>,
    /// log of the probability mass outside `ids` (−inf when none).
    pub log_rest: f32,
    /// Log-probability of the token that came next in the text (the scored target).
    pub target_lp: f32,
}

/// FNV-1a over token ids, to tie a base file to its text and protocol.
pub fn hash_tokens(acc: u64, ids: &[u32]) -> u64 {
    let mut h = acc;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

pub const HASH_SEED: u64 = 0xcbf29ce484222325;

/// FNV-1a over bytes (the base file's checksum; also used for text hashes).
pub fn fnv1a(acc: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(acc, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// The base row of one log-prob vector whose next token was `target`.
pub fn base_row(lp: &[f32], top_k: usize, target: u32) -> BaseRow {
    let k = if top_k == 0 {
        lp.len()
    } else {
        top_k.min(lp.len())
    };
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let by_prob_desc =
        |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_prob_desc);
        idx.truncate(k);
    }
    idx.sort_by(by_prob_desc);
    let log_probs: Vec<f32> = idx.iter().map(|&i| lp[i as usize]).collect();
    let kept: f64 = log_probs.iter().map(|&l| (l as f64).exp()).sum();
    let rest = (1.0 - kept).max(0.0);
    BaseRow {
        ids: idx,
        log_probs,
        log_rest: if k == lp.len() || rest <= 0.0 {
            f32::NEG_INFINITY
        } else {
            rest.ln() as f32
        },
        target_lp: lp.get(target as usize).copied().unwrap_or(f32::NAN),
    }
}

/// KL(base ‖ other) over the base row's buckets, and whether the argmaxes agree.
pub fn compare_row(base: &BaseRow, other: &[f32]) -> (f64, bool) {
    let mut kl = 0.0;
    let mut other_kept = 0.0;
    for (&id, &lp) in base.ids.iter().zip(&base.log_probs) {
        let lq = other[id as usize] as f64;
        other_kept += lq.exp();
        let p = (lp as f64).exp();
        if p > 0.0 {
            kl += p * (lp as f64 - lq);
        }
    }
    if base.log_rest.is_finite() {
        let p_rest = (base.log_rest as f64).exp();
        let q_rest = (1.0 - other_kept).max(1e-30);
        kl += p_rest * (base.log_rest as f64 - q_rest.ln());
    }
    let argmax = other
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i as u32);
    (kl.max(0.0), argmax == base.ids.first().copied())
}

/// Rows of a `[positions, vocab]` log-prob tensor.
pub fn rows(log_probs: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(log_probs
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?)
}

/// Base rows collected in memory, then written at once (atomically).
pub struct BaseWriter {
    pub top_k: usize,
    pub rows: Vec<BaseRow>,
    pub tokens_hash: u64,
}

impl BaseWriter {
    pub fn new(top_k: usize) -> Self {
        BaseWriter {
            top_k,
            rows: Vec::new(),
            tokens_hash: HASH_SEED,
        }
    }

    /// Adds the rows of one window (`log_probs[k]` predicts `w.tokens[w.first_scored + k + 1]`).
    pub fn add_window(&mut self, w: &Window, log_probs: &Tensor) -> Result<()> {
        self.tokens_hash = hash_tokens(self.tokens_hash, &w.tokens);
        let targets = &w.tokens[w.first_scored + 1..];
        let rows = rows(log_probs)?;
        if rows.len() != targets.len() {
            bail!(
                "{} log-prob rows for {} scored positions",
                rows.len(),
                targets.len()
            );
        }
        for (r, &t) in rows.iter().zip(targets) {
            self.rows.push(base_row(r, self.top_k, t));
        }
        Ok(())
    }

    pub fn write(&self, path: &Path, model: &str, protocol: &str, vocab: usize) -> Result<()> {
        let header = BaseHeader {
            model: model.to_string(),
            protocol: protocol.to_string(),
            tokens_hash: self.tokens_hash,
            positions: self.rows.len(),
            top_k: self.top_k,
            vocab,
        };
        let json = serde_json::to_vec(&header)?;
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
        buf.extend_from_slice(&json);
        for r in &self.rows {
            buf.extend_from_slice(&(r.ids.len() as u32).to_le_bytes());
            for id in &r.ids {
                buf.extend_from_slice(&id.to_le_bytes());
            }
            for lp in &r.log_probs {
                buf.extend_from_slice(&lp.to_le_bytes());
            }
            buf.extend_from_slice(&r.log_rest.to_le_bytes());
            buf.extend_from_slice(&r.target_lp.to_le_bytes());
        }
        let sum = fnv1a(HASH_SEED, &buf);
        buf.extend_from_slice(&sum.to_le_bytes());
        crate::quant::io::write_atomically(path, &buf)
    }
}

/// Reads a base file written by [`BaseWriter::write`].
pub fn read_base(path: &Path) -> Result<(BaseHeader, Vec<BaseRow>)> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| {
            format!(
                "cannot open KL base file {} (write it first with --save-logprobs on the unquantized model)",
                path.display()
            )
        })?
        .read_to_end(&mut bytes)?;
    let corrupt = || {
        format!(
            "{} is not a quantlab KL base file (or is truncated)",
            path.display()
        )
    };
    if bytes.len() >= 8 && &bytes[..8] == MAGIC_V1 {
        bail!(
            "{} is a KL base file of format 1 (an older quantlab: no target-token log-probs, no checksum); \
             re-save it with `perplexity --save-logprobs` on the base model (a sweep or lab writes its own base again when its base row is re-measured)",
            path.display()
        );
    }
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        bail!(corrupt());
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let stored = u64::from_le_bytes(tail.try_into().expect("8 bytes"));
    if fnv1a(HASH_SEED, body) != stored {
        bail!(
            "KL base file {} fails its checksum (damaged or changed after it was written); \
             re-save it with `perplexity --save-logprobs` on the base model (a sweep or lab writes its own base again when its base row is re-measured)",
            path.display()
        );
    }
    let bytes = body;
    let mut pos = 8;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = bytes.get(pos..pos + n).with_context(corrupt)?;
        pos += n;
        Ok(s)
    };
    let u32_at = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
    let json_len = u32_at(take(4)?) as usize;
    let header: BaseHeader = serde_json::from_slice(take(json_len)?).with_context(corrupt)?;
    let mut rows = Vec::with_capacity(header.positions);
    for _ in 0..header.positions {
        let k = u32_at(take(4)?) as usize;
        if k > header.vocab {
            bail!(corrupt());
        }
        let ids: Vec<u32> = take(4 * k)?.chunks_exact(4).map(u32_at).collect();
        let log_probs: Vec<f32> = take(4 * k)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let log_rest = f32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let target_lp = f32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        rows.push(BaseRow {
            ids,
            log_probs,
            log_rest,
            target_lp,
        });
    }
    if pos != bytes.len() {
        bail!(corrupt());
    }
    Ok((header, rows))
}

/// Running KL statistics against a base file.
#[derive(Debug, Clone, Default)]
pub struct KlStats {
    pub positions: usize,
    pub kl_sum: f64,
    pub kl_max: f64,
    pub agree: usize,
}

impl KlStats {
    pub fn add(&mut self, kl: f64, agree: bool) {
        self.positions += 1;
        self.kl_sum += kl;
        self.kl_max = self.kl_max.max(kl);
        self.agree += agree as usize;
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions.max(1) as f64
    }

    pub fn top1_agreement(&self) -> f64 {
        self.agree as f64 / self.positions.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax(x: &[f64]) -> Vec<f32> {
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = x.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|v| (v - z) as f32).collect()
    }

    #[test]
    fn full_vocab_kl_matches_the_definition() {
        let p = log_softmax(&[1.0, 2.0, 0.5, -1.0]);
        let q = log_softmax(&[1.5, 1.0, 0.5, 0.0]);
        let want: f64 = p
            .iter()
            .zip(&q)
            .map(|(a, b)| (*a as f64).exp() * (*a as f64 - *b as f64))
            .sum();
        let (kl, agree) = compare_row(&base_row(&p, 0, 0), &q);
        assert!((kl - want).abs() < 1e-6, "{kl} vs {want}");
        assert!(!agree, "argmax 1 vs 0");
        let (kl, agree) = compare_row(&base_row(&p, 0, 0), &p);
        assert!(kl.abs() < 1e-7 && agree);
    }

    #[test]
    fn top_k_kl_is_the_coarse_grained_kl() {
        let p = log_softmax(&[1.0, 2.0, 0.5, -1.0, 0.2]);
        let q = log_softmax(&[1.5, 1.0, 0.5, 0.0, -0.3]);
        let row = base_row(&p, 2, 0);
        assert_eq!(row.ids, [1, 0]);
        // Buckets {1}, {0}, {2,3,4} computed by hand in f64.
        let pe: Vec<f64> = p.iter().map(|v| (*v as f64).exp()).collect();
        let qe: Vec<f64> = q.iter().map(|v| (*v as f64).exp()).collect();
        let (pr, qr) = (pe[2] + pe[3] + pe[4], qe[2] + qe[3] + qe[4]);
        let want =
            pe[1] * (pe[1] / qe[1]).ln() + pe[0] * (pe[0] / qe[0]).ln() + pr * (pr / qr).ln();
        let (kl, _) = compare_row(&row, &q);
        assert!((kl - want).abs() < 1e-6, "{kl} vs {want}");
        let (full, _) = compare_row(&base_row(&p, 0, 0), &q);
        assert!(kl <= full + 1e-9);
    }

    #[test]
    fn base_files_round_trip_and_reject_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.kld");
        let mut w = BaseWriter::new(3);
        let flat: Vec<f32> = [
            log_softmax(&[1.0, 2.0, 3.0, 4.0, 5.0]),
            log_softmax(&[0.0, 0.0, 1.0, 0.0, 0.0]),
        ]
        .concat();
        let lp = Tensor::from_vec(flat, (2, 5), &candle_core::Device::Cpu).unwrap();
        let win = Window {
            tokens: vec![1, 2, 3],
            first_scored: 0,
        };
        w.add_window(&win, &lp).unwrap();
        w.write(&path, "m", "p", 5).unwrap();
        let (h, rows) = read_base(&path).unwrap();
        assert_eq!(h.positions, 2);
        assert_eq!(h.tokens_hash, hash_tokens(HASH_SEED, &[1, 2, 3]));
        assert_eq!(rows, w.rows);
        std::fs::write(&path, b"not a base file").unwrap();
        assert!(read_base(&path)
            .unwrap_err()
            .to_string()
            .contains("base.kld"));
        assert!(read_base(&dir.path().join("absent")).is_err());
    }
}
