//! Last-word accuracy (the LAMBADA task): given a passage without its last word, does the
//! model's greedy continuation reproduce that word?
//!
//! LAMBADA itself (`{"text": ...}` per line) is read when available. Here, where no dataset
//! hub is reachable, an equivalent set is built from WikiText-2 with this rule (the same in
//! `scripts/smollm_reference.py`): every non-empty line that is not a heading (`= ... =`) is
//! a passage; it is split on single spaces; trailing tokens that are not purely ASCII
//! letters (WikiText's ` .`, ` "`, ` @-@ `...) are dropped; the passage is kept when the
//! remaining last word has at least 3 letters and at least 40 words precede it. Context =
//! those preceding words joined by spaces, target = a space plus the word.
//!
//! Scoring is teacher-forced in one forward pass: the word counts as top-k correct when
//! each of its tokens ranks within the top k at its position (for k = 1 this is exactly
//! "greedy decoding reproduces the word").

use crate::arch::llama::Llama;
use crate::load::tokenizer::TextTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub context: String,
    pub target: String,
}

fn is_word(w: &str) -> bool {
    !w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic())
}

/// Passages of a WikiText-style file, by the rule in the module docs.
pub fn wikitext_examples(text: &str, min_context_words: usize) -> Vec<Example> {
    let mut out = Vec::new();
    for line in text.split('\n') {
        let s = line.trim();
        if s.is_empty() || s.starts_with('=') {
            continue;
        }
        let mut words: Vec<&str> = s.split(' ').collect();
        while words.last().is_some_and(|w| !is_word(w)) {
            words.pop();
        }
        match words.last() {
            Some(last) if words.len() > min_context_words && last.len() >= 3 => {
                out.push(Example {
                    context: words[..words.len() - 1].join(" "),
                    target: format!(" {last}"),
                });
            }
            _ => {}
        }
    }
    out
}

/// LAMBADA jsonl: each line `{"text": passage}`; the target is the last space-separated word.
pub fn lambada_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read LAMBADA file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let passage = v
            .get("text")
            .and_then(|t| t.as_str())
            .with_context(|| format!("{} line {}: no \"text\" field", path.display(), i + 1))?;
        let (context, word) = passage
            .trim_end()
            .rsplit_once(' ')
            .with_context(|| format!("{} line {}: passage has one word", path.display(), i + 1))?;
        out.push(Example {
            context: context.to_string(),
            target: format!(" {word}"),
        });
    }
    if out.is_empty() {
        bail!("{} holds no passages", path.display());
    }
    Ok(out)
}

/// The outcome for one example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub target_tokens: usize,
    /// The worst rank (0 = most likely) over the word's tokens.
    pub worst_rank: usize,
}

impl Outcome {
    pub fn within(&self, k: usize) -> bool {
        self.worst_rank < k
    }
}

/// Scores one example; the context is cut to its last `max_context` tokens.
pub fn score(
    model: &Llama,
    tok: &TextTokenizer,
    ex: &Example,
    max_context: usize,
) -> Result<Outcome> {
    let ctx = tok.encode(&ex.context)?;
    let tgt = tok.encode(&ex.target)?;
    if ctx.is_empty() || tgt.is_empty() {
        bail!("last-word example with an empty context or target: {ex:?}");
    }
    let ctx = &ctx[ctx.len().saturating_sub(max_context)..];
    let seq: Vec<u32> = ctx.iter().chain(&tgt).copied().collect();
    let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &model.device)?;
    let logits = model.forward(&ids, &mut model.new_cache(), false)?;
    let rows = logits
        .squeeze(0)?
        .narrow(0, ctx.len() - 1, tgt.len())?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    let mut worst = 0;
    for (row, &t) in rows.iter().zip(&tgt) {
        let v = row[t as usize];
        let rank = row.iter().filter(|&&x| x > v).count();
        worst = worst.max(rank);
    }
    Ok(Outcome {
        target_tokens: tgt.len(),
        worst_rank: worst,
    })
}

#[derive(Debug, Clone, Default)]
pub struct Accuracy {
    pub examples: usize,
    pub top1: usize,
    pub top5: usize,
    pub seconds: f64,
    pub tokens: usize,
}

impl Accuracy {
    pub fn top1_pct(&self) -> f64 {
        100.0 * self.top1 as f64 / self.examples.max(1) as f64
    }
    pub fn top5_pct(&self) -> f64 {
        100.0 * self.top5 as f64 / self.examples.max(1) as f64
    }
}

/// Top-1 / top-5 accuracy over `examples`.
pub fn accuracy(
    model: &Llama,
    tok: &TextTokenizer,
    examples: &[Example],
    max_context: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Accuracy> {
    if examples.is_empty() {
        bail!("no last-word examples to score");
    }
    progress.set_length(examples.len() as u64);
    let start = std::time::Instant::now();
    let mut acc = Accuracy::default();
    for ex in examples {
        let o = score(model, tok, ex, max_context)?;
        acc.examples += 1;
        acc.top1 += o.within(1) as usize;
        acc.top5 += o.within(5) as usize;
        acc.tokens += o.target_tokens;
        progress.inc(1);
    }
    progress.finish_and_clear();
    acc.seconds = start.elapsed().as_secs_f64();
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikitext_rule() {
        let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
        let long = words.join(" ");
        let text = format!(
            " = Heading = \n\n {long} the Cathedral . \n {long} to . \n short passage here . \n {long} 1 @,@ 000 <unk> end \" \n"
        );
        let ex = wikitext_examples(&text, 40);
        assert_eq!(ex.len(), 2, "{ex:?}");
        assert_eq!(ex[0].target, " Cathedral");
        assert_eq!(ex[0].context, format!("{long} the"));
        // `<unk>` is not a word, but it is not trailing either: only the tail is dropped.
        assert_eq!(ex[1].target, " end");
        assert!(ex[1].context.ends_with("<unk>"));
    }

    #[test]
    fn lambada_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.jsonl");
        std::fs::write(&p, "{\"text\": \"he opened the door\"}\n\n").unwrap();
        let ex = lambada_examples(&p).unwrap();
        assert_eq!(
            ex,
            [Example {
                context: "he opened the".into(),
                target: " door".into()
            }]
        );
        std::fs::write(&p, "{\"txt\": 1}\n").unwrap();
        assert!(lambada_examples(&p)
            .unwrap_err()
            .to_string()
            .contains("text"));
    }
}
