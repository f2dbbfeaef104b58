//! Quantized checkpoints as directories: `model.safetensors` holding every linear layer in
//! its stored format (packed codes, scales, zero points; see `nn::checkpoint` for the
//! layout) and the other tensors in f32, the source's config and tokenizer files, and a
//! README summary. Written into a temporary sibling directory and renamed into place, so a
//! killed run leaves no half-written checkpoint.

use crate::load::{raw_f32, write_safetensors, NamedTensor};
use crate::nn::{LayerSummary, QLinear};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::nn::checkpoint::PLAN_KEY;
/// Metadata key holding the source model.
pub const SOURCE_KEY: &str = "quantlab.source";

/// Everything a quantized checkpoint directory holds.
pub struct Checkpoint<'a> {
    pub linears: Vec<&'a QLinear>,
    /// Tensors that are not linear layers, by name (embeddings, norms), stored in f32.
    pub dense: Vec<(String, Tensor)>,
    /// Files copied as they are (config.json, tokenizer files...).
    pub copy: Vec<PathBuf>,
    /// Files written from memory: (file name, contents).
    pub write: Vec<(String, Vec<u8>)>,
    pub plan: String,
    pub source: String,
}

/// Writes `ck` as the directory `out`, which must not exist yet. Returns the bytes of
/// `model.safetensors`.
pub fn write_dir(out: &Path, ck: &Checkpoint) -> Result<u64> {
    if out.exists() {
        bail!(
            "{} already exists: remove it or choose another --out",
            out.display()
        );
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("creating folder {}", parent.display()))?;
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .context("--out needs a folder name")?;
    let tmp = parent.join(format!(".{name}.partial{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // Errors name the folder asked for, not the temporary one.
    let result = fill(&tmp, ck)
        .with_context(|| format!("writing checkpoint {}", out.display()))
        .and_then(|bytes| {
            std::fs::rename(&tmp, out)
                .with_context(|| format!("moving {} into place", out.display()))?;
            Ok(bytes)
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn fill(dir: &Path, ck: &Checkpoint) -> Result<u64> {
    let mut tensors: Vec<NamedTensor> = Vec::new();
    for (name, t) in &ck.dense {
        tensors.push(NamedTensor {
            name: name.clone(),
            tensor: raw_f32(t)?,
        });
    }
    for l in &ck.linears {
        tensors.extend(l.stored_tensors()?);
    }
    let mut meta: HashMap<String, String> = crate::nn::checkpoint::layers_metadata(&ck.linears)?
        .into_iter()
        .collect();
    meta.insert("format".into(), "pt".into());
    meta.insert(PLAN_KEY.into(), ck.plan.clone());
    meta.insert(SOURCE_KEY.into(), ck.source.clone());
    let bytes = write_safetensors(&dir.join("model.safetensors"), &tensors, meta)?;
    for f in &ck.copy {
        let name = f.file_name().context("copied file without a name")?;
        std::fs::copy(f, dir.join(name))
            .with_context(|| format!("copying {} into the checkpoint", f.display()))?;
    }
    for (name, contents) in &ck.write {
        std::fs::write(dir.join(name), contents)
            .with_context(|| format!("writing {name} into the checkpoint"))?;
    }
    std::fs::write(dir.join("README.md"), readme(ck, bytes))?;
    Ok(bytes)
}

/// A human summary: source, plan, per-layer formats and sizes.
fn readme(ck: &Checkpoint, bytes: u64) -> String {
    let mut s = format!(
        "# Quantized by quantlab\n\nSource: `{}`\n\nPlan: `{}`\n\n`model.safetensors`: {bytes} bytes. \
         Load it with any quantlab command (`--model THIS_DIR`); `quantlab inspect THIS_DIR` lists the layers.\n\n\
         | layer | method | format | bits/weight | bytes |\n|---|---|---|---|---|\n",
        ck.source, ck.plan
    );
    for l in &ck.linears {
        let sum = LayerSummary::of(l);
        s += &format!(
            "| {} | {} | {} | {:.3} | {} |\n",
            sum.name,
            sum.method,
            sum.describe,
            sum.bits_per_weight(),
            sum.bytes
        );
    }
    s
}

/// The config and tokenizer files of a Hugging Face style directory that exist.
pub fn side_files(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect()
}
