//! Finding and loading models: a local directory, a file inside one, or a Hugging Face
//! hub id resolved through the local hub cache (`$HF_HOME/hub`, the layout `hf-hub` and
//! `huggingface-cli` write). No hub is reachable from these machines, so a hub id that is
//! not cached is an error that says how to get it.

pub mod gguf;
pub mod marian_tokenizer;
pub mod spm;
pub mod tokenizer;

use crate::arch::llama::{Llama, LoadAs};
use crate::arch::mlp::Mlp;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};
use tokenizer::TextTokenizer;

/// A model directory found from a user's spec.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    resolve_with_cache(spec, &hf_hub::Cache::from_env())
}

pub fn resolve_with_cache(spec: &str, cache: &hf_hub::Cache) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.is_file() {
        return Ok(p
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")));
    }
    let looks_like_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if !looks_like_id {
        bail!("model '{spec}' is neither a directory nor a file, nor a hub id like 'org/name'");
    }
    let repo = cache.model(spec.to_string());
    match repo.get("config.json") {
        Some(cfg) => Ok(cfg.parent().context("cached config.json has no folder")?.to_path_buf()),
        None => bail!(
            "model '{spec}' is not a local path and is not in the Hugging Face cache at {}; no hub is reachable from here: \
             download it where one is (huggingface-cli download {spec}) and copy the cache, or pass a local directory",
            cache.path().display()
        ),
    }
}

/// A JSON file (config.json, generation_config.json, ...), with errors naming it.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Total size on disk of some weight files.
fn files_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// The `model_type` field of a directory's config.json.
pub fn model_type(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let v = read_json(&path)?;
    v.get("model_type")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .with_context(|| format!("{} has no 'model_type'", path.display()))
}

/// The safetensors files of a checkpoint: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no 'weight_map'", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            bail!(
                "shard {} listed in {} is missing",
                missing.display(),
                index.display()
            );
        }
        return Ok(files);
    }
    bail!(
        "{} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )
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
/// Hugging Face directory / hub id (config.json + safetensors + tokenizer.json).
pub fn load_llm(spec: &str, load_as: LoadAs, device: &Device) -> Result<LoadedLlm> {
    let p = Path::new(spec);
    let gguf_path = if p.is_file() && p.extension().is_some_and(|e| e == "gguf") {
        Some(p.to_path_buf())
    } else if p.is_dir() && !p.join("config.json").is_file() {
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
            1 => Some(found.remove(0)),
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
    } else {
        None
    };
    if let Some(path) = gguf_path {
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
    let disk_bytes = files_bytes(&safetensors_files(&dir)?);
    Ok(LoadedLlm {
        model,
        tokenizer,
        source: dir,
        disk_bytes,
    })
}

/// A MarianMT model with its tokenizer and generation defaults.
pub struct LoadedMarian {
    pub model: crate::arch::marian::Marian,
    pub tokenizer: marian_tokenizer::MarianTokenizer,
    pub generation: crate::eval::seq2seq::GenerateConfig,
    pub source: PathBuf,
    /// Bytes of the weight files on disk.
    pub disk_bytes: u64,
}

/// Loads a Hugging Face MarianMT directory or cached hub id: config.json, weights
/// (safetensors, sharded or not, or pytorch_model.bin), source.spm/target.spm/vocab.json and
/// generation_config.json.
pub fn load_marian(spec: &str, device: &Device) -> Result<LoadedMarian> {
    let dir = resolve_model_dir(spec)?;
    let kind = model_type(&dir)?;
    if kind != "marian" {
        bail!("{} is a '{kind}' model, not MarianMT", dir.display());
    }
    let model = crate::arch::marian::load_dir(&dir, device)?;
    let tokenizer = marian_tokenizer::MarianTokenizer::from_dir(&dir)?;
    if tokenizer.vocab_size() > model.cfg.vocab_size {
        bail!(
            "{}: vocab.json has {} entries but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    let generation = crate::eval::seq2seq::GenerateConfig::for_model(&dir, &model.cfg)?;
    let weight_files = match safetensors_files(&dir) {
        Ok(f) => f,
        Err(_) => vec![dir.join("pytorch_model.bin")],
    };
    let disk_bytes = files_bytes(&weight_files);
    Ok(LoadedMarian {
        model,
        tokenizer,
        generation,
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
#[derive(Debug, Clone)]
pub enum AnyModel {
    Mlp(Mlp),
}

/// Loads a model from a directory, file or hub id, dispatching on config.json's `model_type`.
pub fn load_model(spec: &str, device: &Device) -> Result<AnyModel> {
    let dir = resolve_model_dir(spec)?;
    match model_type(&dir)?.as_str() {
        "mlp" => Ok(AnyModel::Mlp(Mlp::load(&dir, device)?)),
        other => bail!(
            "model type '{other}' in {} is not supported yet (supported: mlp)",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_hub_ids_through_the_cache_layout() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), r#"{"model_type": "mlp"}"#).unwrap();
        let cache = hf_hub::Cache::new(root.path().to_path_buf());
        let dir = resolve_with_cache("org/tiny", &cache).unwrap();
        assert_eq!(dir, snap);
        assert_eq!(model_type(&dir).unwrap(), "mlp");
        let e = resolve_with_cache("org/absent", &cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("org/absent") && e.contains("cache"), "{e}");
        assert!(resolve_with_cache("./nope", &cache).is_err());
        // A local directory wins.
        assert_eq!(
            resolve_with_cache(root.path().to_str().unwrap(), &cache).unwrap(),
            root.path()
        );
    }
}
