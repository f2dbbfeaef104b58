//! Every perplexity protocol in one command (`perplexity --protocols all`), so a number
//! from a paper or another tool can be set against the matching one here.
//!
//! - `llama-bos` / `llama`: llama.cpp's chunks of `--ctx` tokens, second half scored, with
//!   and without BOS in the first position (two passes: the first token differs);
//! - `hf-strided`: transformers' guide, windows of MAX_LEN every STRIDE (`--strided`,
//!   default 1024:512), each token scored once;
//! - `gptq`: GPTQ's evaluation: the token stream cut into non-overlapping 2048-token
//!   windows (ragged tail dropped), every position after the first scored, no BOS;
//! - `lm-eval`: lm-evaluation-harness's `wikitext` task: the text split into documents
//!   (articles: a level-1 heading ` = Title = ` starts one), each tokenized on its own and
//!   scored whole by rolling windows (`loglikelihood_rolling`: the first window starts with
//!   a prefix token — BOS, else EOS — and each later window predicts the next
//!   `--lm-eval-max-len` tokens with one token of context, the last one filled up to the
//!   full length with earlier tokens); word perplexity = exp(Σ NLL / words), byte
//!   perplexity = exp(Σ NLL / UTF-8 bytes), bits per byte = Σ NLL / (bytes · ln 2), words
//!   counted as lm-eval does, `len(re.split(r"\s+", page))` on the document as stored.
//!
//! Deviations from lm-eval: it scores the *raw* WikiText (wikitext-2-raw-v1, detokenized by
//! its `wikitext_detokenizer`) with a window of the model's full context (8192 for SmolLM2);
//! here the text file is scored as it is (the shared WikiText-2 is the tokenized v1 with
//! `<unk>`) and the window is `--lm-eval-max-len` (default 2048) to bound memory.
//!
//! Windows are forward passes; protocols whose windows coincide (same tokens and scored
//! positions) share them — each distinct window runs once.

use super::perplexity::{self, Protocol, Window};
use crate::arch::llama::Llama;
use crate::report::{Cell, Table};
use anyhow::{bail, Result};
use std::collections::HashMap;

/// GPTQ's evaluation window (its `seqlen` for LLaMA / OPT).
pub const GPTQ_SEQLEN: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProtocolName {
    LlamaBos,
    Llama,
    HfStrided,
    Gptq,
    LmEval,
}

pub const ALL: [ProtocolName; 5] = [
    ProtocolName::LlamaBos,
    ProtocolName::Llama,
    ProtocolName::HfStrided,
    ProtocolName::Gptq,
    ProtocolName::LmEval,
];

impl ProtocolName {
    pub fn key(self) -> &'static str {
        match self {
            ProtocolName::LlamaBos => "llama-bos",
            ProtocolName::Llama => "llama",
            ProtocolName::HfStrided => "hf-strided",
            ProtocolName::Gptq => "gptq",
            ProtocolName::LmEval => "lm-eval",
        }
    }
}

/// `all` or a comma-separated list of protocol names.
pub fn parse_list(s: &str) -> Result<Vec<ProtocolName>> {
    if s.trim() == "all" {
        return Ok(ALL.to_vec());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match ALL.iter().find(|p| p.key() == part) {
            Some(p) if !out.contains(p) => out.push(*p),
            Some(_) => {}
            None => bail!(
                "unknown protocol '{part}' in --protocols: use all or a list of {}",
                ALL.map(|p| p.key()).join(", ")
            ),
        }
    }
    if out.is_empty() {
        bail!("--protocols is empty");
    }
    Ok(out)
}

/// Splits a WikiText-style file into articles: a line ` = Title = ` (one `=` on each side)
/// starts a document; text before the first heading is its own document. Documents that
/// are only whitespace are dropped.
pub fn documents(text: &str) -> Vec<&str> {
    let mut starts = vec![0];
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if pos > 0 && is_title(t) {
            starts.push(pos);
        }
        pos += line.len();
    }
    starts.push(text.len());
    starts
        .windows(2)
        .map(|w| &text[w[0]..w[1]])
        .filter(|d| !d.trim().is_empty())
        .collect()
}

fn is_title(t: &str) -> bool {
    t.len() > 4 && t.starts_with("= ") && t.ends_with(" =") && !t.starts_with("= =")
}

/// Words as lm-eval counts them: `len(re.split(r"\s+", doc))` — whitespace runs + 1, so
/// leading and trailing whitespace each add an empty piece.
pub fn lm_eval_words(doc: &str) -> usize {
    let mut runs = 0;
    let mut in_ws = false;
    for c in doc.chars() {
        let ws = c.is_whitespace();
        if ws && !in_ws {
            runs += 1;
        }
        in_ws = ws;
    }
    runs + 1
}

/// lm-eval's rolling windows of one document (`get_rolling_token_windows` with
/// `context_len = 1`, made disjoint), as [`Window`]s whose scored positions predict each
/// token of `doc` exactly once.
pub fn rolling_windows(doc: &[u32], prefix: u32, max_len: usize) -> Vec<Window> {
    let mut out = Vec::new();
    if doc.is_empty() || max_len == 0 {
        return out;
    }
    let first = max_len.min(doc.len());
    let mut tokens = Vec::with_capacity(first + 1);
    tokens.push(prefix);
    tokens.extend_from_slice(&doc[..first]);
    out.push(Window {
        tokens,
        first_scored: 0,
    });
    let mut predicted = first;
    while predicted < doc.len() {
        let n = (doc.len() - predicted).min(max_len);
        let end = predicted + n;
        // Input doc[end - max_len - 1 .. end - 1] plus the last target.
        let begin = end - max_len - 1;
        out.push(Window {
            tokens: doc[begin..end].to_vec(),
            first_scored: max_len - n,
        });
        predicted = end;
    }
    out
}

/// One protocol's windows and what its row reports.
pub struct ProtocolWindows {
    pub name: ProtocolName,
    pub description: String,
    pub bos_policy: String,
    pub windows: Vec<Window>,
    /// Words and UTF-8 bytes of the scored documents (lm-eval only).
    pub words_bytes: Option<(usize, usize)>,
}

/// What the protocols need besides the token stream.
pub struct ProtocolInputs<'a> {
    pub text: &'a str,
    pub ids: &'a [u32],
    pub encode: &'a dyn Fn(&str) -> Result<Vec<u32>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub ctx: usize,
    pub strided: Option<(usize, usize)>,
    pub lm_eval_max_len: usize,
    pub max_windows: Option<usize>,
    pub model_ctx: usize,
}

pub fn build(name: ProtocolName, inp: &ProtocolInputs) -> Result<ProtocolWindows> {
    let llama = |bos: bool| -> Result<ProtocolWindows> {
        let p = Protocol::LlamaCpp { ctx: inp.ctx, bos };
        Ok(ProtocolWindows {
            name,
            description: p.to_string(),
            bos_policy: if bos {
                "BOS replaces each chunk's first token".into()
            } else {
                "no BOS".into()
            },
            windows: perplexity::windows(inp.ids, p, inp.bos, inp.max_windows)?,
            words_bytes: None,
        })
    };
    match name {
        ProtocolName::LlamaBos => llama(true),
        ProtocolName::Llama => llama(false),
        ProtocolName::HfStrided => {
            let (max_len, stride) = inp.strided.unwrap_or((1024, 512));
            let p = Protocol::Strided { max_len, stride };
            Ok(ProtocolWindows {
                name,
                description: p.to_string(),
                bos_policy: "no BOS".into(),
                windows: perplexity::windows(inp.ids, p, inp.bos, inp.max_windows)?,
                words_bytes: None,
            })
        }
        ProtocolName::Gptq => {
            if inp.model_ctx < GPTQ_SEQLEN {
                bail!(
                    "the gptq protocol needs {GPTQ_SEQLEN}-token windows; the model has {} positions",
                    inp.model_ctx
                );
            }
            if inp.ids.len() < GPTQ_SEQLEN {
                bail!("the text has fewer than {GPTQ_SEQLEN} tokens (the gptq protocol)");
            }
            let windows = inp
                .ids
                .chunks_exact(GPTQ_SEQLEN)
                .take(inp.max_windows.unwrap_or(usize::MAX))
                .map(|c| Window {
                    tokens: c.to_vec(),
                    first_scored: 0,
                })
                .collect();
            Ok(ProtocolWindows {
                name,
                description: format!(
                    "GPTQ: non-overlapping {GPTQ_SEQLEN}-token windows, all positions after the first scored"
                ),
                bos_policy: "no BOS".into(),
                windows,
                words_bytes: None,
            })
        }
        ProtocolName::LmEval => {
            let max_len = inp.lm_eval_max_len;
            if max_len < 2 || max_len + 1 > inp.model_ctx {
                bail!(
                    "--lm-eval-max-len {max_len} must be between 2 and the model's context - 1 ({})",
                    inp.model_ctx.saturating_sub(1)
                );
            }
            let (prefix, policy) = match (inp.bos, inp.eos) {
                (Some(b), _) => (b, format!("prefix token BOS ({b}) before each document")),
                (None, Some(e)) => (e, format!("prefix token EOS ({e}) before each document")),
                _ => {
                    bail!("the lm-eval protocol needs a BOS or EOS token as the documents' prefix")
                }
            };
            let limit = inp.max_windows.unwrap_or(usize::MAX);
            let (mut windows, mut words, mut bytes, mut docs) = (Vec::new(), 0, 0, 0);
            for doc in documents(inp.text) {
                let ids = (inp.encode)(doc)?;
                let ws = rolling_windows(&ids, prefix, max_len);
                // Whole documents only, so words and bytes match the scored tokens.
                if docs > 0 && windows.len() + ws.len() > limit {
                    break;
                }
                windows.extend(ws);
                words += lm_eval_words(doc);
                bytes += doc.len();
                docs += 1;
            }
            Ok(ProtocolWindows {
                name,
                description: format!(
                    "lm-eval wikitext: {docs} documents, rolling windows of {max_len}"
                ),
                bos_policy: policy,
                windows,
                words_bytes: Some((words, bytes)),
            })
        }
    }
}

/// NLL sums of distinct windows, so protocols that share a window run it once.
#[derive(Default)]
pub struct WindowCache {
    nll: HashMap<(u64, usize, usize), f64>,
    pub passes: usize,
    pub tokens_processed: usize,
}

impl WindowCache {
    fn key(w: &Window) -> (u64, usize, usize) {
        (
            super::kl::hash_tokens(super::kl::HASH_SEED, &w.tokens),
            w.tokens.len(),
            w.first_scored,
        )
    }

    /// Σ NLL of the window, running it only if no earlier protocol did.
    pub fn nll(&mut self, model: &Llama, w: &Window) -> Result<(f64, bool)> {
        let k = Self::key(w);
        if let Some(v) = self.nll.get(&k) {
            return Ok((*v, false));
        }
        let lp = perplexity::window_log_probs(model, w)?;
        let v = perplexity::window_nll(w, &lp)?;
        self.nll.insert(k, v);
        self.passes += 1;
        self.tokens_processed += w.tokens.len();
        Ok((v, true))
    }
}

/// Runs each protocol (sharing coinciding windows) and tabulates them.
pub fn run(
    model: &Llama,
    protocols: &[ProtocolWindows],
    tokenizer: &str,
    progress: &indicatif::ProgressBar,
) -> Result<Table> {
    let mut t = Table::new(
        "protocols",
        "Perplexity under each protocol",
        &[
            "protocol",
            "tokenizer",
            "BOS policy",
            "windows",
            "new forward passes",
            "tokens scored",
            "token perplexity",
            "word perplexity",
            "byte perplexity",
            "bits per byte",
            "seconds",
        ],
    );
    let mut cache = WindowCache::default();
    progress.set_length(protocols.iter().map(|p| p.windows.len() as u64).sum());
    for p in protocols {
        let start = std::time::Instant::now();
        let (mut nll, mut scored, mut new) = (0.0, 0, 0);
        for w in &p.windows {
            let (v, ran) = cache.nll(model, w)?;
            nll += v;
            scored += w.scored();
            new += ran as usize;
            progress.inc(1);
        }
        let (word, byte, bpb) = match p.words_bytes {
            Some((words, bytes)) if words > 0 && bytes > 0 => (
                Cell::f((nll / words as f64).exp(), 4),
                Cell::f((nll / bytes as f64).exp(), 5),
                Cell::f(nll / (bytes as f64 * std::f64::consts::LN_2), 5),
            ),
            _ => (Cell::Missing, Cell::Missing, Cell::Missing),
        };
        t.push(vec![
            p.name.key().into(),
            tokenizer.into(),
            p.bos_policy.clone().into(),
            p.windows.len().into(),
            new.into(),
            scored.into(),
            Cell::f((nll / scored.max(1) as f64).exp(), 4),
            word,
            byte,
            bpb,
            Cell::f(start.elapsed().as_secs_f64(), 1),
        ]);
        t.note(format!("{}: {}", p.name.key(), p.description));
    }
    progress.finish_and_clear();
    t.note(format!(
        "{} forward passes over {} tokens in all; windows that coincide across protocols run once",
        cache.passes, cache.tokens_processed
    ));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_windows_predict_every_token_once() {
        let doc: Vec<u32> = (10..21).collect(); // 11 tokens
        let ws = rolling_windows(&doc, 0, 4);
        let targets: Vec<u32> = ws
            .iter()
            .flat_map(|w| w.tokens[w.first_scored + 1..].to_vec())
            .collect();
        assert_eq!(targets, doc);
        assert_eq!(ws[0].tokens, [0, 10, 11, 12, 13]);
        // Second window: one token of context (13), predicts 14..17.
        assert_eq!(ws[1].tokens, [13, 14, 15, 16, 17]);
        assert_eq!(ws[1].first_scored, 0);
        // Last: predicts 18..20, filled with earlier context up to 4 inputs.
        assert_eq!(ws[2].tokens, [16, 17, 18, 19, 20]);
        assert_eq!(ws[2].first_scored, 1);
        assert!(ws.iter().all(|w| w.tokens.len() <= 5));
    }

    #[test]
    fn documents_split_at_level_one_headings_and_words_count_like_python() {
        let text = " \n = A = \n \n x y \n = = B = = \n z \n = C = \n w\n";
        let d = documents(text);
        assert_eq!(d.len(), 2);
        assert!(d[0].starts_with(" = A ="), "{:?}", d[0]);
        assert!(d[0].contains("= = B = ="));
        assert_eq!(d[1], " = C = \n w\n");
        // re.split(r"\s+", " = C = \n w\n") → ['', '=', 'C', '=', 'w', '']
        assert_eq!(lm_eval_words(d[1]), 6);
        assert_eq!(lm_eval_words("a"), 1);
        assert!(parse_list("llama,gptq").unwrap() == [ProtocolName::Llama, ProtocolName::Gptq]);
        assert!(parse_list("bogus").is_err());
    }
}
