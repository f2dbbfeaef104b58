//! What a sweep row's number depends on, so a resumed sweep never reuses a row measured
//! under other conditions (it once printed perplexity 1.165, measured on another text, for
//! a text whose perplexity is 45).
//!
//! A row is reused only when its [`RunKey`] equals the run's (and, for calibrated methods,
//! its calibration record is the same). A file holding rows of another key is refused with
//! the fields that differ and how to proceed (`--fresh` or another `--out`): a sweep file
//! holds one sweep, never a mix.
//!
//! The model is identified by its files' path, size and modification time, not by a hash
//! of their bytes: hashing a multi-gigabyte GGUF on every resume would cost seconds to
//! minutes, and any rewrite of a weight file (a new download, a re-quantization) changes
//! its size or mtime. The texts are hashed (SHA-256): they are small, and a path alone
//! names whatever is there today. The tokenizer is covered by the model files (GGUF
//! metadata or tokenizer.json) and, in each measured row, by the SHA-256 of the token ids
//! it produced (`Row::tokens`), compared when a resumed run loads the model.

use super::sweep::Layers;
use crate::report::provenance::{sha256_file, sha256_hex};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything but the plan (and calibration) that decides a sweep row's numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunKey {
    /// The model as given (`--model`).
    pub model: String,
    /// Its files: canonical path, size and mtime (see the module notes).
    pub model_files: String,
    /// `--load-as`: how GGUF weights are materialised before quantizing.
    pub load_as: String,
    /// The evaluation text and the SHA-256 of its bytes.
    pub text: String,
    pub text_sha256: String,
    /// Protocol: context length, BOS policy or strided window.
    pub protocol: String,
    pub max_chunks: Option<usize>,
    pub layers: Layers,
    /// Whether rows carry KL / top-1 against the baseline.
    pub kl: bool,
    /// Device and activation dtype.
    pub device: String,
    pub dtype: String,
}

impl RunKey {
    /// The fields in which `self` (a file's rows) and `now` (this run) differ, each as
    /// `name: file value → this run's value`. How the model and text were named (`model`,
    /// `text`) is recorded but not compared: the same files named by another path give
    /// the same numbers, and the model's files and the text's hash are compared instead.
    pub fn differences(&self, now: &RunKey) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: {a} → {b}"));
            }
        };
        cmp(
            "model files",
            self.model_files.clone(),
            now.model_files.clone(),
        );
        cmp("--load-as", self.load_as.clone(), now.load_as.clone());
        cmp(
            format!("text sha256 ({} → {})", self.text, now.text).as_str(),
            self.text_sha256.clone(),
            now.text_sha256.clone(),
        );
        cmp("protocol", self.protocol.clone(), now.protocol.clone());
        let chunks = |c: Option<usize>| c.map_or("all".to_string(), |n| n.to_string());
        cmp(
            "--max-chunks",
            chunks(self.max_chunks),
            chunks(now.max_chunks),
        );
        cmp(
            "--layers",
            format!("{:?}", self.layers),
            format!("{:?}", now.layers),
        );
        cmp("--kl", self.kl.to_string(), now.kl.to_string());
        cmp("device", self.device.clone(), now.device.clone());
        cmp("dtype", self.dtype.clone(), now.dtype.clone());
        out
    }
}

/// The model's files as the key records them: a GGUF file's canonical path, size and
/// mtime; for a folder, the same of each regular file in it, hashed into one line.
pub fn model_files(spec: &str) -> Result<String> {
    if let Some(f) = crate::model::gguf_path(spec)? {
        return file_stamp(&f);
    }
    let dir = crate::load::resolve_model_dir(spec)?;
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut listing = String::new();
    for f in &files {
        listing += &file_stamp(f)?;
        listing.push('\n');
    }
    let canon = dir.canonicalize().unwrap_or(dir);
    Ok(format!(
        "{} ({} files, stamps sha256 {})",
        canon.display(),
        files.len(),
        &sha256_hex(listing.as_bytes())[..16]
    ))
}

/// `path size mtime` of one file (mtime in nanoseconds since the epoch).
fn file_stamp(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Ok(format!(
        "{} size {} mtime {mtime}",
        canon.display(),
        meta.len()
    ))
}

/// The key of a sweep of `spec` (hashes the text, stats the model files).
pub fn of(spec: &super::sweep::SweepSpec) -> Result<RunKey> {
    Ok(RunKey {
        model: spec.model.clone(),
        model_files: model_files(&spec.model)?,
        load_as: format!("{:?}", spec.load_as).to_lowercase(),
        text: spec.text.display().to_string(),
        text_sha256: sha256_file(&spec.text)
            .with_context(|| format!("evaluation text {}", spec.text.display()))?,
        protocol: spec.protocol.to_string(),
        max_chunks: spec.max_chunks,
        layers: spec.layers,
        kl: spec.kl,
        device: crate::device::describe(&spec.device),
        dtype: crate::device::dtype_name(crate::device::activation_dtype(&spec.device)).into(),
    })
}
