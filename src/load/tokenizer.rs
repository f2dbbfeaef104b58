//! Text tokenizers for the LLMs: Hugging Face `tokenizer.json`, or a byte-level BPE rebuilt
//! from a GGUF file's metadata with the pre-tokenizer the model was trained with.

use super::gguf::Gguf;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::str::FromStr;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// A tokenizer plus the special ids the evaluation protocols need.
pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether the vocabulary asks for BOS at the start of a sequence.
    pub add_bos: bool,
    /// What the pre-tokenizer is, for reports.
    pub pre: String,
}

/// GGUF token types (llama.cpp `llama_token_type`): 3 = control, 4 = user defined.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

impl TextTokenizer {
    /// Token ids of `text`, without any special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` with the special tokens and
    /// BOS policy, which [`Self::from_hf_dir`] reads back to the same tokenizer.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        for (name, bytes) in self.hf_files()? {
            crate::quant::io::write_atomically(&dir.join(name), &bytes)?;
        }
        Ok(())
    }

    /// The contents of `tokenizer.json` and `tokenizer_config.json`.
    pub fn hf_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let cfg = serde_json::json!({
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
            "add_bos_token": self.add_bos,
            "quantlab_pre_tokenizer": self.pre,
        });
        Ok(vec![
            ("tokenizer.json".into(), json.into_bytes()),
            (
                "tokenizer_config.json".into(),
                serde_json::to_string_pretty(&cfg)?.into_bytes(),
            ),
        ])
    }

    /// Loads `tokenizer.json` (and BOS/EOS from `tokenizer_config.json` when present).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = super::read_text(&path, super::MAX_JSON_BYTES)?;
        let inner = Tokenizer::from_str(&text)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let special = |key: &str| {
            cfg.get(key)
                .and_then(|v| {
                    v.as_str()
                        .or_else(|| v.get("content").and_then(|c| c.as_str()))
                })
                .and_then(|t| inner.token_to_id(t))
        };
        let (bos, eos) = (special("bos_token"), special("eos_token"));
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(TextTokenizer {
            inner,
            bos,
            eos,
            add_bos,
            pre: cfg
                .get("quantlab_pre_tokenizer")
                .and_then(|v| v.as_str())
                .unwrap_or("tokenizer.json")
                .into(),
        })
    }

    /// Rebuilds the tokenizer from `tokenizer.ggml.*` metadata. Only GPT-2 style byte-level
    /// BPE is supported; the `smollm` (and `starcoder`/`refact`) pre-tokenizers split every
    /// digit on its own before the GPT-2 regex, as SmolLM2's own tokenizer.json does.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!(
                "GGUF {}: tokenizer model '{model}' is not supported (only byte-level BPE 'gpt2')",
                g.path.display()
            );
        }
        let file = g.path.display();
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            bail!(
                "GGUF {file}: 'tokenizer.ggml.tokens' is empty: a working model needs a vocabulary"
            );
        }
        if tokens.len() > u32::MAX as usize {
            bail!("GGUF {file}: 'tokenizer.ggml.tokens' holds more than 2^32 tokens");
        }
        if g.has("llama.vocab_size") {
            let rows = g.usize("llama.vocab_size")?;
            if tokens.len() > rows {
                bail!(
                    "GGUF {file}: 'tokenizer.ggml.tokens' holds {} tokens, more than 'llama.vocab_size' {rows} (the embedding rows)",
                    tokens.len()
                );
            }
        }
        let merges = g.strings("tokenizer.ggml.merges")?;
        let types = if g.has("tokenizer.ggml.token_type") {
            let t = g.ints("tokenizer.ggml.token_type")?;
            if t.len() != tokens.len() {
                bail!(
                    "GGUF {file}: 'tokenizer.ggml.token_type' has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                );
            }
            t
        } else {
            vec![1; tokens.len()]
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        // A merge whose parts or result are not tokens makes the BPE builder fail with
        // only the merged text; name the entry and the file instead.
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (a, b) = m.split_once(' ').with_context(|| {
                    format!("GGUF {file}: 'tokenizer.ggml.merges' entry #{i} '{m}' is not two space-separated tokens: the vocabulary is corrupt")
                })?;
                for t in [a.to_string(), b.to_string(), format!("{a}{b}")] {
                    if !vocab.contains_key(&t) {
                        bail!(
                            "GGUF {file}: 'tokenizer.ggml.merges' entry #{i} '{m}' needs token '{t}', which 'tokenizer.ggml.tokens' lacks: the vocabulary is corrupt"
                        );
                    }
                }
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow::anyhow!("building BPE from {}: {e}", g.path.display()))?;
        let pre = if g.has("tokenizer.ggml.pre") {
            g.string("tokenizer.ggml.pre")?
        } else {
            "default".into()
        };
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre.as_str() {
            "smollm" | "starcoder" | "refact" => Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])
            .into(),
            "default" | "gpt2" | "gpt-2" => byte_level.into(),
            other => bail!(
                "GGUF {}: pre-tokenizer '{other}' is not supported (supported: smollm, starcoder, refact, gpt2, default)",
                g.path.display()
            ),
        };
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
        // Every special id the metadata gives must be a token.
        let id = |key: &str| -> Result<Option<u32>> {
            if !g.has(key) {
                return Ok(None);
            }
            let id = g.usize(key)?;
            if id >= tokens.len() {
                bail!(
                    "GGUF {file}: metadata '{key}' is {id}, outside the vocabulary of {} tokens ('tokenizer.ggml.tokens')",
                    tokens.len()
                );
            }
            Ok(Some(id as u32))
        };
        for key in [
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.seperator_token_id",
            "tokenizer.ggml.eot_token_id",
        ] {
            id(key)?;
        }
        Ok(TextTokenizer {
            inner,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos: g.bool_or("tokenizer.ggml.add_bos_token", false)?,
            pre,
        })
    }
}
