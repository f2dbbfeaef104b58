//! Where a number came from: the code (version, git commit), the machine (CPU and its SIMD
//! features or the GPU, kernels, threads, activation dtype) and the inputs (dataset file
//! and its SHA-256, tokenizer, protocol, calibration data, seed). Every result row carries
//! one, in full in JSON and as one footer line in markdown, so a number read months later
//! (or from another machine) can be traced and compared honestly.

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// quantlab's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this binary was built from (`build.rs`): short hash, `-dirty` when
/// tracked files differed from it, `unknown` when built without git.
pub const GIT: &str = env!("QUANTLAB_GIT");

/// A file an input came from and the SHA-256 of its bytes (a path alone may name another
/// text tomorrow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    pub file: String,
    pub sha256: String,
}

impl DataFile {
    /// Reads and hashes `path`.
    pub fn of(path: &Path) -> Result<Self> {
        Ok(DataFile {
            file: path.display().to_string(),
            sha256: sha256_file(path)?,
        })
    }

    /// The first 12 hex digits, for footers.
    pub fn short(&self) -> &str {
        &self.sha256[..self.sha256.len().min(12)]
    }
}

/// What calibrated weights were calibrated on: a row measured on other data is another
/// measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    pub file: String,
    /// SHA-256 of the file's bytes, in hex.
    pub text_hash: String,
    pub samples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

impl CalibrationRecord {
    /// Reads and hashes the calibration `text` (windows of `seqlen` tokens, `samples` of
    /// them, drawn with `seed`). Takes the fields, not `eval`'s spec, so that `report`
    /// does not depend on `eval` (which reports through it).
    pub fn of(text: &std::path::Path, samples: usize, seqlen: usize, seed: u64) -> Result<Self> {
        Ok(CalibrationRecord {
            file: text.display().to_string(),
            text_hash: sha256_file(text)
                .with_context(|| format!("calibration text {}", text.display()))?,
            samples,
            seqlen,
            seed,
        })
    }
}

/// The provenance of one result row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub quantlab: String,
    pub git: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The CPU model (from /proc/cpuinfo where there is one).
    pub cpu: String,
    /// SIMD features the kernels can use, as /proc/cpuinfo spells them.
    pub cpu_features: String,
    /// The kernel family chosen at run time (`avx512`, `avx2`, `portable`).
    pub kernels: String,
    pub threads: usize,
    /// Activation dtype of LLM runs (absent where a command has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DataFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
    /// A seed the numbers depend on (training, data order, random input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Provenance {
    /// The code and machine of this process running on `device`; inputs are added by the
    /// command that knows them.
    pub fn here(device: &Device) -> Self {
        use crate::nn::kernels::{isa, Isa};
        Provenance {
            quantlab: VERSION.to_string(),
            git: GIT.to_string(),
            device: crate::device::describe(device),
            cpu: cpu_model(),
            cpu_features: isa::cpu_flags().join(" "),
            kernels: Isa::selected().name().to_string(),
            threads: rayon::current_num_threads(),
            dtype: None,
            dataset: None,
            tokenizer: None,
            protocol: None,
            calibration: None,
            seed: None,
        }
    }

    /// One line for markdown footers: everything, shortened.
    pub fn footer(&self) -> String {
        let mut s = format!(
            "provenance: quantlab {} ({}), {}",
            self.quantlab, self.git, self.device
        );
        if self.device == "cpu" {
            s += &format!(" {} [{}]", self.cpu, self.cpu_features);
        }
        s += &format!(", kernels {}, {} threads", self.kernels, self.threads);
        if let Some(d) = &self.dtype {
            s += &format!(", {d}");
        }
        if let Some(d) = &self.dataset {
            s += &format!("; data {} (sha256 {})", d.file, d.short());
        }
        if let Some(t) = &self.tokenizer {
            s += &format!("; tokenizer {t}");
        }
        if let Some(p) = &self.protocol {
            s += &format!("; {p}");
        }
        if let Some(c) = &self.calibration {
            s += &format!(
                "; calibration {} (sha256 {}), {}×{} tokens, seed {}",
                c.file,
                &c.text_hash[..c.text_hash.len().min(12)],
                c.samples,
                c.seqlen,
                c.seed
            );
        }
        if let Some(seed) = self.seed {
            s += &format!("; seed {seed}");
        }
        s
    }
}

/// A tokenizer as rows record it: its kind, vocabulary size, BOS policy, and the SHA-256
/// of the ids it gave for the scored text (what actually decides the numbers).
pub fn tokenizer_id(tok: &crate::load::tokenizer::TextTokenizer, ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    let digest = hex(&h.finalize());
    format!(
        "{} vocab {}, bos {}{}, {} ids sha256 {}",
        tok.pre,
        tok.vocab_size(),
        tok.bos.map_or("none".to_string(), |b| b.to_string()),
        if tok.add_bos { " (added)" } else { "" },
        ids.len(),
        &digest[..16]
    )
}

/// SHA-256 of a file's bytes, streamed (texts and calibration sets can be large).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of bytes, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CPU's model name, or the architecture where /proc/cpuinfo is not there.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_code_machine_and_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.txt");
        std::fs::write(&f, "abc").unwrap();
        let d = DataFile::of(&f).unwrap();
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex(b"abc"), d.sha256);
        let mut p = Provenance::here(&Device::Cpu);
        assert!(!p.git.is_empty() && p.threads >= 1);
        p.dataset = Some(d);
        p.seed = Some(7);
        let line = p.footer();
        assert!(
            line.contains("ba7816bf8f01") && line.contains("seed 7"),
            "{line}"
        );
        let back: Provenance = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(sha256_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }
}
