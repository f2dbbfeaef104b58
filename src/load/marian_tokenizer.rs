//! The MarianMT tokenizer: two SentencePiece models (source and target) whose pieces are
//! mapped to model ids through `vocab.json`, exactly as transformers' `MarianTokenizer` does.
//!
//! Encoding: a leading language code `>>xx<<` is split off and kept as one token, the rest
//! is segmented by the side's SentencePiece model, each piece is looked up in vocab.json
//! (pieces it lacks become `<unk>`), and `</s>` is appended. Decoding drops special tokens,
//! joins the pieces, turns `▁` into spaces and trims.

use super::spm::{SentencePiece, SPACE_SYMBOL};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Which SentencePiece model segments the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

#[derive(Debug, Clone)]
pub struct MarianTokenizer {
    source: SentencePiece,
    target: SentencePiece,
    vocab: HashMap<String, u32>,
    pieces_by_id: HashMap<u32, String>,
    pub eos_id: u32,
    pub unk_id: u32,
    pub pad_id: u32,
    /// Ids that decoding with `skip_special_tokens` drops.
    special_ids: Vec<u32>,
}

impl MarianTokenizer {
    /// Reads `source.spm`, `target.spm`, `vocab.json` and (optionally) `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let need = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} is missing: a Marian tokenizer needs source.spm, target.spm and vocab.json in {}",
                    p.display(),
                    dir.display()
                )
            }
        };
        let source = SentencePiece::open(&need("source.spm")?)?;
        let target = SentencePiece::open(&need("target.spm")?)?;
        let vocab_path = need("vocab.json")?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.exists() || config_path.is_symlink() {
            super::read_json(&config_path)?
        } else {
            serde_json::Value::Null
        };
        if config.get("separate_vocabs").and_then(|v| v.as_bool()) == Some(true) {
            bail!(
                "{}: tokenizers with separate source and target vocabularies are not supported",
                dir.display()
            );
        }
        let vocab: HashMap<String, u32> =
            serde_json::from_str(&super::read_text(&vocab_path, super::MAX_JSON_BYTES)?)
                .with_context(|| {
                    format!(
                        "{} is not a JSON object of piece -> id",
                        vocab_path.display()
                    )
                })?;
        let token = |key: &str, default: &str| -> Result<u32> {
            let name = config.get(key).and_then(|v| v.as_str()).unwrap_or(default);
            vocab.get(name).copied().with_context(|| {
                format!(
                    "{} has no entry for the {key} '{name}'",
                    vocab_path.display()
                )
            })
        };
        let eos_id = token("eos_token", "</s>")?;
        let unk_id = token("unk_token", "<unk>")?;
        let pad_id = token("pad_token", "<pad>")?;
        let pieces_by_id = vocab.iter().map(|(k, &v)| (v, k.clone())).collect();
        Ok(Self {
            source,
            target,
            vocab,
            pieces_by_id,
            eos_id,
            unk_id,
            pad_id,
            special_ids: vec![eos_id, unk_id, pad_id],
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Fails unless every id of vocab.json is below `model_vocab` (the model's embedding
    /// rows), naming the first entry that is not: a larger id would index past the table.
    pub fn check_ids_within(&self, model_vocab: usize, dir: &Path) -> Result<()> {
        if let Some((piece, id)) = self
            .vocab
            .iter()
            .filter(|(_, &id)| id as usize >= model_vocab)
            .min_by_key(|(_, &id)| id)
        {
            bail!(
                "{}: entry '{piece}' has id {id}, outside the model's vocabulary (vocab_size {model_vocab} in config.json)",
                dir.join("vocab.json").display()
            );
        }
        Ok(())
    }

    fn id_of(&self, piece: &str) -> u32 {
        self.vocab.get(piece).copied().unwrap_or(self.unk_id)
    }

    /// Ids of `text` on one side, `</s>` appended (what `tokenizer(text)` / `text_target=` give).
    pub fn encode(&self, text: &str, side: Side) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut text = text;
        if let Some(end) = text.strip_prefix(">>").and_then(|_| text.find("<<")) {
            ids.push(self.id_of(&text[..end + 2]));
            text = &text[end + 2..];
        }
        let spm = match side {
            Side::Source => &self.source,
            Side::Target => &self.target,
        };
        ids.extend(spm.encode(text).iter().map(|s| self.id_of(&s.text)));
        ids.push(self.eos_id);
        ids
    }

    /// The pieces of some ids (for display and debugging).
    pub fn pieces(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|id| {
                self.pieces_by_id
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| "<unk>".into())
            })
            .collect()
    }

    /// Text of generated ids, special tokens skipped (`decode(ids, skip_special_tokens=True)`).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        for id in ids {
            if self.special_ids.contains(id) {
                continue;
            }
            if let Some(p) = self.pieces_by_id.get(id) {
                out.push_str(p);
            }
        }
        out.replace(SPACE_SYMBOL, " ").trim().to_string()
    }
}
