//! The model registry: finds a model from a user's spec (a directory, a file, a hub id in
//! the local cache, or a quantized checkpoint written by `quantlab quantize --out`),
//! dispatches on its kind and builds it from `arch/` with its tokenizer. Sits above `arch/`
//! and `load/`; knows nothing of evaluation.

pub mod save;

use crate::arch::llama::{Llama, LoadAs};
use crate::arch::marian::Marian;
use crate::arch::mlp::Mlp;
use crate::load::marian_tokenizer::MarianTokenizer;
use crate::load::tokenizer::TextTokenizer;
use crate::load::{
    checkpoint_files, files_bytes, gguf, model_type, resolve_model_dir, safetensors_files,
};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// The kinds of model quantlab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Llm,
    Marian,
    Mlp,
}

/// A model's kind, from config.json's `model_type` (or a `.gguf` file: an LLM).
pub fn kind_of(spec: &str) -> Result<Kind> {
    if gguf_path(spec)?.is_some() {
        return Ok(Kind::Llm);
    }
    let dir = resolve_model_dir(spec)?;
    match model_type(&dir)?.as_str() {
        "llama" | "mistral" => Ok(Kind::Llm),
        "marian" => Ok(Kind::Marian),
        "mlp" => Ok(Kind::Mlp),
        other => bail!(
            "model type '{other}' in {} is not supported (supported: llama, mistral, marian, mlp)",
            dir.display()
        ),
    }
}

/// A `.gguf` file named by `spec`, or the single one in a directory without config.json.
pub fn gguf_path(spec: &str) -> Result<Option<PathBuf>> {
    let p = Path::new(spec);
    if p.is_file() && p.extension().is_some_and(|e| e == "gguf") {
        return Ok(Some(p.to_path_buf()));
    }
    if !p.is_dir() || p.join("config.json").is_file() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(p)
        .with_context(|| format!("listing {}", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 => bail!(
            "{} holds neither config.json nor a .gguf file (for SmolLM2 run scripts/fetch-smollm2.sh)",
            p.display()
        ),
        1 => Ok(Some(found.remove(0))),
        _ => bail!(
            "{} holds several .gguf files; name one: {}",
            p.display(),
            found
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A language model with its tokenizer, and where it came from.
pub struct LoadedLlm {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    /// The file or directory loaded.
    pub source: PathBuf,
    /// Bytes of the weight files on disk.
    pub disk_bytes: u64,
}

/// Loads a Llama-family LLM from a `.gguf` file, a directory holding one `.gguf`, or a
/// Hugging Face directory / hub id (config.json + safetensors + tokenizer.json), quantized
/// by quantlab or not.
pub fn load_llm(spec: &str, load_as: LoadAs, device: &Device) -> Result<LoadedLlm> {
    if let Some(path) = gguf_path(spec)? {
        let mut g = gguf::Gguf::open(&path)?;
        let tokenizer = TextTokenizer::from_gguf(&g)?;
        let model = Llama::from_gguf(&mut g, load_as, device)?;
        let disk_bytes = std::fs::metadata(&path)?.len();
        return Ok(LoadedLlm {
            model,
            tokenizer,
            source: path,
            disk_bytes,
        });
    }
    let dir = resolve_model_dir(spec)?;
    let kind = model_type(&dir)?;
    if !matches!(kind.as_str(), "llama" | "mistral") {
        bail!(
            "{} is a '{kind}' model, not a Llama-family LLM",
            dir.display()
        );
    }
    let model = Llama::from_hf_dir(&dir, device)?;
    let tokenizer = TextTokenizer::from_hf_dir(&dir)?;
    // Ids past the embedding table would only fail mid-run; refuse at load.
    if tokenizer.vocab_size() > model.cfg.vocab_size {
        bail!(
            "{}: tokenizer.json has {} tokens but config.json's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    let disk_bytes = files_bytes(&safetensors_files(&dir)?);
    Ok(LoadedLlm {
        model,
        tokenizer,
        source: dir,
        disk_bytes,
    })
}

/// A MarianMT model with its tokenizer.
pub struct LoadedMarian {
    pub model: Marian,
    pub tokenizer: MarianTokenizer,
    pub source: PathBuf,
    /// Bytes of the weight files on disk.
    pub disk_bytes: u64,
}

/// Loads a Hugging Face MarianMT directory or cached hub id: config.json, weights
/// (safetensors, sharded or not, or pytorch_model.bin), source.spm/target.spm/vocab.json.
pub fn load_marian(spec: &str, device: &Device) -> Result<LoadedMarian> {
    let dir = resolve_model_dir(spec)?;
    let kind = model_type(&dir)?;
    if kind != "marian" {
        bail!("{} is a '{kind}' model, not MarianMT", dir.display());
    }
    let model = crate::arch::marian::load_dir(&dir, device)?;
    let tokenizer = MarianTokenizer::from_dir(&dir)?;
    if tokenizer.vocab_size() > model.cfg.vocab_size {
        bail!(
            "{}: vocab.json has {} entries but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    tokenizer.check_ids_within(model.cfg.vocab_size.min(model.cfg.decoder_vocab_size), &dir)?;
    let disk_bytes = files_bytes(&checkpoint_files(&dir));
    Ok(LoadedMarian {
        model,
        tokenizer,
        source: dir,
        disk_bytes,
    })
}

/// The environment variable naming the MarianMT model used by default.
pub const MARIAN_ENV: &str = "QUANTLAB_MARIAN";

/// The default MarianMT model: `$QUANTLAB_MARIAN`, else the shared
/// `marian-multi30k-en-de` next to the data folder (`../shared/models/`).
pub fn default_marian_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(MARIAN_ENV) {
        return Ok(PathBuf::from(p));
    }
    let data = crate::data::DataDir::resolve(None)?;
    let dir = data.root.join("../models/marian-multi30k-en-de");
    if !dir.join("config.json").is_file() {
        bail!(
            "no MarianMT model at {}: pass --model DIR or set {MARIAN_ENV}=DIR",
            dir.display()
        );
    }
    Ok(dir.canonicalize().unwrap_or(dir))
}

/// Any model quantlab can load.
pub enum AnyModel {
    Llm(Box<LoadedLlm>),
    Marian(Box<LoadedMarian>),
    Mlp(Mlp),
}

/// Loads a model of any kind from a directory, file or hub id.
pub fn load_model(spec: &str, device: &Device) -> Result<AnyModel> {
    Ok(match kind_of(spec)? {
        Kind::Llm => AnyModel::Llm(Box::new(load_llm(spec, LoadAs::F32, device)?)),
        Kind::Marian => AnyModel::Marian(Box::new(load_marian(spec, device)?)),
        Kind::Mlp => AnyModel::Mlp(Mlp::load(&resolve_model_dir(spec)?, device)?),
    })
}
