//! Perplexity-vs-bits sweeps: one configuration per (method, bits, grouping), each row
//! appended to a JSON-lines file as soon as it is measured, so an interrupted sweep
//! resumes where it stopped and nothing measured is lost.

use crate::arch::llama::LoadAs;
use crate::eval::lm::{self, KlMode};
use crate::eval::perplexity::Protocol;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Which linear layers a sweep quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layers {
    /// Every linear layer of the transformer blocks (lm_head and embeddings stay f32).
    All,
    /// Only the feed-forward layers (`*.mlp.*`).
    Ffn,
    /// Only the attention projections (`*.self_attn.*`).
    Attn,
    /// Every linear layer including lm_head.
    Everything,
}

impl Layers {
    /// The plan applying `method` to these layers.
    pub fn plan(self, method: &str) -> String {
        match self {
            Layers::All => format!("lm_head=keep;*={method}"),
            Layers::Ffn => format!("*.mlp.*={method}"),
            Layers::Attn => format!("*.self_attn.*={method}"),
            Layers::Everything => format!("*={method}"),
        }
    }
}

/// One configuration of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Family for the plot legend: `f32`, `rtn sym ch`, `rtn sym g64`, `nf4 b64`, `q4_k`...
    pub family: String,
    /// Nominal code bits (32 for the baseline).
    pub bits: u32,
    pub method: String,
}

/// Expands `--methods` × `--bits` × `--groups` into configurations (baseline first).
/// `rtn` expands over bits and groups; `nf4`/`fp4` use each numeric group as block size;
/// anything else is taken as one method spec (`q4_k`, `f16`, `w:u3:affine:g128`...).
pub fn expand(
    methods: &[String],
    bits: &[u32],
    groups: &[String],
    mode: &str,
) -> Result<Vec<Config>> {
    let mut out = vec![Config {
        family: "f32".into(),
        bits: 32,
        method: "keep".into(),
    }];
    if !matches!(mode, "sym" | "affine") {
        bail!("--mode must be sym or affine, not '{mode}'");
    }
    for m in methods {
        match m.as_str() {
            "rtn" => {
                for g in groups {
                    let gran = if g == "ch" {
                        "ch0".to_string()
                    } else {
                        format!("g{g}")
                    };
                    for &b in bits {
                        out.push(Config {
                            family: format!(
                                "rtn {mode} {}",
                                if g == "ch" {
                                    "ch".into()
                                } else {
                                    format!("g{g}")
                                }
                            ),
                            bits: b,
                            method: format!("w:i{b}:{mode}:{gran}"),
                        });
                    }
                }
            }
            // GPTQ over the same grid as rtn (needs calibration data: sequential Hessians).
            "gptq" | "gptq:act-order" => {
                let ao = if m.ends_with(":act-order") {
                    ":act-order"
                } else {
                    ""
                };
                for g in groups {
                    let gran = if g == "ch" {
                        "ch0".to_string()
                    } else {
                        format!("g{g}")
                    };
                    for &b in bits {
                        out.push(Config {
                            family: format!("{m} {mode} {}", if g == "ch" { "ch" } else { g }),
                            bits: b,
                            method: format!("gptq:i{b}:{mode}:{gran}{ao}"),
                        });
                    }
                }
            }
            // AWQ: the same schemes as rtn (needs calibration data).
            "awq" => {
                for g in groups {
                    let gran = if g == "ch" {
                        "ch0".into()
                    } else {
                        format!("g{g}")
                    };
                    for &b in bits {
                        out.push(Config {
                            family: format!("awq {mode} {}", gran.replace("ch0", "ch")),
                            bits: b,
                            method: format!("awq:i{b}:{mode}:{gran}"),
                        });
                    }
                }
            }
            "nf4" | "fp4" | "nf4:dq" | "fp4:dq" => {
                for g in groups.iter().filter(|g| *g != "ch") {
                    let (kind, dq) = m.split_once(':').map_or((m.as_str(), ""), |(k, d)| (k, d));
                    let method = if dq.is_empty() {
                        format!("{kind}:b{g}")
                    } else {
                        format!("{kind}:b{g}:dq")
                    };
                    out.push(Config {
                        family: format!("{m} b{g}"),
                        bits: 4,
                        method,
                    });
                }
            }
            other => {
                let parsed: crate::nn::Method = other
                    .parse()
                    .with_context(|| format!("in --methods '{other}'"))?;
                out.push(Config {
                    family: other.to_string(),
                    bits: parsed.nominal_bits(),
                    method: other.to_string(),
                });
            }
        }
    }
    for c in &out {
        c.method
            .parse::<crate::nn::Method>()
            .with_context(|| format!("sweep configuration {}", c.method))?;
    }
    Ok(out)
}

/// One measured row, as stored in the JSON-lines file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub protocol: String,
    pub max_chunks: Option<usize>,
    pub layers: Layers,
    pub family: String,
    pub bits: u32,
    pub method: String,
    pub plan: String,
    pub bits_per_weight: f64,
    pub weights_mb: f64,
    pub perplexity: f64,
    pub mean_kl: Option<f64>,
    pub top1_agreement: Option<f64>,
    pub scored_tokens: usize,
    pub seconds: f64,
}

impl Row {
    /// What makes two rows the same measurement (for resuming).
    fn key(&self) -> (String, String, Option<usize>, String) {
        (
            self.model.clone(),
            self.protocol.clone(),
            self.max_chunks,
            self.plan.clone(),
        )
    }
}

/// Reads the rows already in a sweep file (a missing file is an empty sweep). A torn line
/// from an interrupted write (unparsable and not closed by `}`) is skipped, since its
/// configuration simply runs again; any other bad line is an error.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut rows = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Row>(line) {
            Ok(r) => rows.push(r),
            Err(_) if !line.trim_end().ends_with('}') => {}
            Err(e) => bail!(
                "{} line {} is not a sweep row ({e}); move the file away or fix it",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(rows)
}

/// Appends one row and flushes it to disk.
pub fn append_row(path: &Path, row: &Row) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // A torn previous line (no newline) would glue onto this one: start on a fresh line.
    let needs_newline = {
        use std::io::{Read, Seek, SeekFrom};
        let mut r = std::fs::File::open(path)?;
        let len = r.seek(SeekFrom::End(0))?;
        let mut last = [0u8; 1];
        len > 0 && {
            r.seek(SeekFrom::End(-1))?;
            r.read_exact(&mut last)?;
            last[0] != b'\n'
        }
    };
    let mut line = String::new();
    if needs_newline {
        line.push('\n');
    }
    line.push_str(&serde_json::to_string(row)?);
    line.push('\n');
    f.write_all(line.as_bytes())?;
    f.sync_data()?;
    Ok(())
}

pub struct SweepSpec {
    pub model: String,
    pub device: Device,
    pub load_as: LoadAs,
    pub configs: Vec<Config>,
    pub layers: Layers,
    pub text: PathBuf,
    pub protocol: Protocol,
    pub max_chunks: Option<usize>,
    pub out: PathBuf,
    /// Compare every row with the baseline's distributions (KL, top-1 agreement).
    pub kl: bool,
    pub progress: bool,
}

/// Runs the configurations not yet in `out`; returns every row of this sweep (old and new).
pub fn run(spec: &SweepSpec) -> Result<Vec<Row>> {
    let text = lm::read_text(&spec.text)?;
    let device = spec.device.clone();
    let existing = read_rows(&spec.out)?;
    let protocol = spec.protocol.to_string();
    let model_name = spec.model.clone();
    let kl_path = spec.out.with_extension("base.kld");
    let mut rows = Vec::new();
    let mut ids: Option<Vec<u32>> = None;
    for (i, c) in spec.configs.iter().enumerate() {
        let plan = if c.method == "keep" {
            "keep".to_string()
        } else {
            spec.layers.plan(&c.method)
        };
        let probe = Row {
            model: model_name.clone(),
            protocol: protocol.clone(),
            max_chunks: spec.max_chunks,
            layers: spec.layers,
            family: c.family.clone(),
            bits: c.bits,
            method: c.method.clone(),
            plan: plan.clone(),
            bits_per_weight: 0.0,
            weights_mb: 0.0,
            perplexity: 0.0,
            mean_kl: None,
            top1_agreement: None,
            scored_tokens: 0,
            seconds: 0.0,
        };
        let is_base = i == 0;
        let base_needed = spec.kl && is_base && !kl_path.exists();
        if let Some(done) = existing.iter().find(|r| r.key() == probe.key()) {
            if !base_needed {
                rows.push(done.clone());
                continue;
            }
        }
        if spec.progress {
            eprintln!("[{}/{}] {}", i + 1, spec.configs.len(), plan);
        }
        let mut p = lm::prepare(&spec.model, spec.load_as, Some(&plan), None, &device)?;
        p.llm.model.set_cache_dequantized(true);
        let ids = match &ids {
            Some(v) => v,
            None => ids.insert(p.llm.tokenizer.encode(&text)?),
        };
        let mode = match (spec.kl, is_base) {
            (false, _) => KlMode::None,
            (true, true) => KlMode::Save(kl_path.clone(), 256),
            (true, false) => KlMode::Compare(kl_path.clone()),
        };
        let bar = crate::progress::bar(0, &c.family, spec.progress);
        let s = lm::score(&p, ids, spec.protocol, spec.max_chunks, &mode, &bar)?;
        let row = Row {
            bits_per_weight: p.linear_bits_per_weight(),
            weights_mb: p.weight_bytes() as f64 / 1e6,
            perplexity: s.ppl.perplexity(),
            mean_kl: s.kl.as_ref().map(|k| k.mean_kl()),
            top1_agreement: s.kl.as_ref().map(|k| k.top1_agreement()),
            scored_tokens: s.ppl.scored_tokens,
            seconds: s.ppl.seconds,
            ..probe
        };
        if !existing.iter().any(|r| r.key() == row.key()) {
            append_row(&spec.out, &row)?;
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_methods_bits_and_groups() {
        let c = expand(
            &["rtn".into(), "nf4".into(), "q4_k".into()],
            &[8, 4],
            &["ch".into(), "64".into()],
            "sym",
        )
        .unwrap();
        let methods: Vec<&str> = c.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(
            methods,
            [
                "keep",
                "w:i8:sym:ch0",
                "w:i4:sym:ch0",
                "w:i8:sym:g64",
                "w:i4:sym:g64",
                "nf4:b64",
                "q4_k"
            ]
        );
        assert_eq!(c[6].bits, 4);
        assert!(expand(&["rtn".into()], &[9], &["64".into()], "sym").is_err());
        assert!(expand(&["bogus".into()], &[4], &["64".into()], "sym").is_err());
        assert!(expand(&["rtn".into()], &[4], &["64".into()], "weird").is_err());
    }

    #[test]
    fn rows_append_and_resume_across_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        assert!(read_rows(&p).unwrap().is_empty());
        let row = Row {
            model: "m".into(),
            protocol: "p".into(),
            max_chunks: Some(2),
            layers: Layers::Ffn,
            family: "rtn sym g64".into(),
            bits: 4,
            method: "w:i4:sym:g64".into(),
            plan: Layers::Ffn.plan("w:i4:sym:g64"),
            bits_per_weight: 4.5,
            weights_mb: 1.0,
            perplexity: 20.0,
            mean_kl: None,
            top1_agreement: None,
            scored_tokens: 510,
            seconds: 1.0,
        };
        append_row(&p, &row).unwrap();
        // An interrupted write leaves half a line; it is ignored and then isolated.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"model\": \"m\", \"prot").unwrap();
        assert_eq!(read_rows(&p).unwrap(), std::slice::from_ref(&row));
        append_row(&p, &row).unwrap();
        assert_eq!(read_rows(&p).unwrap(), [row.clone(), row.clone()]);
        std::fs::write(&p, "{\"not\": \"a row\"}\n").unwrap();
        let e = read_rows(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(row.plan, "*.mlp.*=w:i4:sym:g64");
    }

    #[test]
    fn gptq_expands_like_rtn() {
        let c = expand(
            &["gptq".into(), "gptq:act-order".into()],
            &[4, 3],
            &["64".into()],
            "sym",
        )
        .unwrap();
        let methods: Vec<&str> = c.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(
            methods,
            [
                "keep",
                "gptq:i4:sym:g64",
                "gptq:i3:sym:g64",
                "gptq:i4:sym:g64:act-order",
                "gptq:i3:sym:g64:act-order"
            ]
        );
        for m in &methods[1..] {
            assert!(m.parse::<crate::nn::Method>().is_ok(), "{m}");
        }
    }
}
