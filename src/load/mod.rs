//! Finding and loading models: a local directory, a file inside one, or a Hugging Face
//! hub id resolved through the local hub cache (`$HF_HOME/hub`, the layout `hf-hub` and
//! `huggingface-cli` write). No hub is reachable from these machines, so a hub id that is
//! not cached is an error that says how to get it.

pub mod gguf;
pub mod gguf_check;
pub mod marian_tokenizer;
pub mod sniff;
pub mod source;
pub mod spm;
pub mod tokenizer;

pub use source::{
    checked_f32, ensure_finite_values, raw_f32, read_input_tensor, write_safetensors, NamedTensor,
    PickleSource, RawTensor, SafetensorsSource, TensorSource,
};

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A model directory found from a user's spec.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    resolve_with_cache(spec, &hf_hub::Cache::from_env())
}

pub fn resolve_with_cache(spec: &str, cache: &hf_hub::Cache) -> Result<PathBuf> {
    let p = Path::new(spec);
    sniff::ensure_not_dangling(p)?;
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

/// Fails when `spec` names a file (not a folder) that is a GGUF, safetensors, ... file,
/// saying what it is and `needs` (what the command wants instead). A dangling symbolic link
/// is reported as one.
pub fn expect_model_folder(spec: &str, needs: &str) -> Result<()> {
    let p = Path::new(spec);
    sniff::ensure_not_dangling(p)?;
    if sniff::kind_of_file(p) == Some(sniff::FileKind::Gguf) {
        bail!("{spec} is a GGUF file; {needs}");
    }
    Ok(())
}

/// A JSON file (config.json, generation_config.json, ...), with errors naming it.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_text(path, MAX_JSON_BYTES)?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Largest JSON file read whole (configs, vocab.json, tokenizer_config.json): 64 MiB, ten
/// times a large tokenizer.json.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// A UTF-8 text file of at most `max` bytes, read whole; errors name the file (and say when
/// it is a broken symbolic link, or too large to be what it claims).
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    use std::io::Read;
    sniff::ensure_not_dangling(path)?;
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        bail!(
            "{} is {len} bytes, more than the {max} accepted for this kind of file",
            path.display()
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} is more than the {max} bytes accepted", path.display());
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 text (bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Total size on disk of some weight files.
pub fn files_bytes(files: &[PathBuf]) -> u64 {
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

/// The tensors of a Hugging Face style checkpoint directory: `model.safetensors`, the
/// shards of `model.safetensors.index.json`, or `pytorch_model.bin`.
pub fn open_checkpoint(dir: &Path) -> Result<Box<dyn TensorSource>> {
    let bin = dir.join("pytorch_model.bin");
    match safetensors_files(dir) {
        Ok(files) => Ok(Box::new(SafetensorsSource::open(&files)?)),
        Err(_) if bin.is_file() => Ok(Box::new(PickleSource::open(&bin)?)),
        Err(e) => Err(e.context("no pytorch_model.bin either")),
    }
}

/// The weight files of a checkpoint directory (for sizes on disk).
pub fn checkpoint_files(dir: &Path) -> Vec<PathBuf> {
    match safetensors_files(dir) {
        Ok(f) => f,
        Err(_) => vec![dir.join("pytorch_model.bin")],
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
