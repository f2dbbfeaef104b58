//! Perplexity-vs-bits sweeps: one configuration per (method, bits, grouping), each row
//! appended to a JSON-lines file as soon as it is measured, so an interrupted sweep
//! resumes where it stopped and nothing measured is lost.

use crate::arch::llama::LoadAs;
use crate::eval::lm::{self, CalibrationSpec, KlMode};
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

impl Config {
    /// The plan this configuration runs with on `layers` (the baseline keeps everything).
    pub fn plan(&self, layers: Layers) -> String {
        if self.method == "keep" {
            "keep".to_string()
        } else {
            layers.plan(&self.method)
        }
    }
}

/// One grouping of `--groups`: `ch` (one scale per output row) or a group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    Channel,
    Group(usize),
}

impl Grouping {
    fn parse(s: &str) -> Result<Self> {
        if s == "ch" {
            return Ok(Grouping::Channel);
        }
        match s.parse::<usize>() {
            Ok(g) if g > 0 => Ok(Grouping::Group(g)),
            _ => bail!("--groups takes 'ch' or group sizes of at least 1, not '{s}'"),
        }
    }

    /// The scheme suffix: `ch0` or `g<size>`.
    fn scheme(self) -> String {
        match self {
            Grouping::Channel => "ch0".into(),
            Grouping::Group(g) => format!("g{g}"),
        }
    }

    /// The legend suffix: `ch` or `g<size>`.
    fn label(self) -> String {
        match self {
            Grouping::Channel => "ch".into(),
            Grouping::Group(g) => format!("g{g}"),
        }
    }
}

/// What one `--methods` name expands to at one (bits, grouping, mode): the plan method
/// and the plot family, or `None` where the method has no such configuration.
type SpecFn = fn(u32, Grouping, &str) -> Option<(String, String)>;

/// One `--methods` name.
struct MethodExpansion {
    name: &'static str,
    /// Expanded once per `--bits` (false: once per grouping, at the method's own bits).
    over_bits: bool,
    spec: SpecFn,
}

/// The sweep's method names, one row each (a new method is one line here).
const METHODS: &[MethodExpansion] = &[
    MethodExpansion {
        name: "rtn",
        over_bits: true,
        spec: |b, g, m| {
            Some((
                format!("w:i{b}:{m}:{}", g.scheme()),
                format!("rtn {m} {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "rtn-signed-max",
        over_bits: true,
        spec: |b, g, _| {
            Some((
                format!("rtn-signed-max:i{b}:{}", g.scheme()),
                format!("rtn-signed-max {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "rtn-clip",
        over_bits: true,
        spec: |b, g, m| {
            Some((
                format!("rtn-clip:i{b}:{m}:{}", g.scheme()),
                format!("rtn-clip {m} {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "rtn-clip-x2",
        over_bits: true,
        spec: |b, g, m| {
            Some((
                format!("rtn-clip:i{b}:{m}:{}:x2", g.scheme()),
                format!("rtn-clip-x2 {m} {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "hqq",
        over_bits: true,
        spec: |b, g, _| {
            Some((
                format!("hqq:u{b}:{}", g.scheme()),
                format!("hqq {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "gptq",
        over_bits: true,
        spec: |b, g, m| {
            Some((
                format!("gptq:i{b}:{m}:{}", g.scheme()),
                format!("gptq {m} {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "gptq:act-order",
        over_bits: true,
        spec: |b, g, m| {
            Some((
                format!("gptq:i{b}:{m}:{}:act-order", g.scheme()),
                format!("gptq:act-order {m} {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "awq",
        over_bits: true,
        spec: |b, g, m| {
            Some((
                format!("awq:i{b}:{m}:{}", g.scheme()),
                format!("awq {m} {}", g.label()),
            ))
        },
    },
    MethodExpansion {
        name: "nf4",
        over_bits: false,
        spec: |_, g, _| four_bit("nf4", "", g),
    },
    MethodExpansion {
        name: "fp4",
        over_bits: false,
        spec: |_, g, _| four_bit("fp4", "", g),
    },
    MethodExpansion {
        name: "nf4:dq",
        over_bits: false,
        spec: |_, g, _| four_bit("nf4", ":dq", g),
    },
    MethodExpansion {
        name: "fp4:dq",
        over_bits: false,
        spec: |_, g, _| four_bit("fp4", ":dq", g),
    },
];

/// NF4/FP4 use a group size as their block size (no per-channel form).
fn four_bit(kind: &str, dq: &str, g: Grouping) -> Option<(String, String)> {
    match g {
        Grouping::Channel => None,
        Grouping::Group(b) => Some((format!("{kind}:b{b}{dq}"), format!("{kind}{dq} b{b}"))),
    }
}

/// Expands `--methods` × `--bits` × `--groups` into configurations (baseline first).
/// Names in [`METHODS`] expand over groupings (and bits where they take them); anything
/// else is taken as one method spec (`q4_k`, `f16`, `w:u3:affine:g128`...).
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
    let groupings = groups
        .iter()
        .map(|g| Grouping::parse(g))
        .collect::<Result<Vec<_>>>()?;
    for m in methods {
        let Some(e) = METHODS.iter().find(|e| e.name == m) else {
            let parsed: crate::nn::Method =
                m.parse().with_context(|| format!("in --methods '{m}'"))?;
            out.push(Config {
                family: m.to_string(),
                bits: parsed.nominal_bits(),
                method: m.to_string(),
            });
            continue;
        };
        for &g in &groupings {
            let widths: &[u32] = if e.over_bits { bits } else { &[0] };
            for &b in widths {
                if let Some((method, family)) = (e.spec)(b, g, mode) {
                    let nominal = if e.over_bits {
                        b
                    } else {
                        method.parse::<crate::nn::Method>()?.nominal_bits()
                    };
                    out.push(Config {
                        family,
                        bits: nominal,
                        method,
                    });
                }
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
    /// The calibration data, for rows whose method gathered statistics (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
}

/// What a calibrated row was calibrated on: a row measured on other data is another row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    pub file: String,
    /// FNV-1a 64 of the file's bytes, in hex (the path alone may name another text).
    pub text_hash: String,
    pub samples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

impl CalibrationRecord {
    /// Reads and hashes the calibration text of `spec`.
    pub fn of(spec: &CalibrationSpec) -> Result<Self> {
        let bytes = std::fs::read(&spec.text)
            .with_context(|| format!("reading calibration text {}", spec.text.display()))?;
        Ok(CalibrationRecord {
            file: spec.text.display().to_string(),
            text_hash: format!("{:016x}", fnv1a(&bytes)),
            samples: spec.samples,
            seqlen: spec.seqlen,
            seed: spec.seed,
        })
    }
}

/// FNV-1a, 64 bits.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl Row {
    /// What makes two rows the same measurement (for resuming).
    #[allow(clippy::type_complexity)]
    fn key(&self) -> (&str, &str, Option<usize>, &str, Option<&CalibrationRecord>) {
        (
            &self.model,
            &self.protocol,
            self.max_chunks,
            &self.plan,
            self.calibration.as_ref(),
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
    /// Where calibration text comes from; read only for plans that need statistics.
    pub calibration: crate::eval::prepare::Calibration,
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
    // Resolved (and the text hashed) at the first configuration that calibrates.
    let mut calib: Option<(CalibrationSpec, CalibrationRecord)> = None;
    for (i, c) in spec.configs.iter().enumerate() {
        let plan = c.plan(spec.layers);
        let parsed: crate::nn::Plan = plan
            .parse()
            .with_context(|| format!("sweep plan '{plan}'"))?;
        let calibration = if crate::nn::plan_needs_calibration(&parsed) {
            if calib.is_none() {
                let s = spec.calibration.text_spec()?;
                let r = CalibrationRecord::of(&s)?;
                calib = Some((s, r));
            }
            calib.as_ref()
        } else {
            None
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
            calibration: calibration.map(|(_, r)| r.clone()),
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
        let mut p = lm::prepare(
            &spec.model,
            spec.load_as,
            Some(&plan),
            calibration.map(|(s, _)| s),
            &device,
        )?;
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
        let c = expand(
            &["rtn-signed-max".into(), "rtn-clip".into(), "hqq".into()],
            &[4, 3],
            &["64".into()],
            "affine",
        )
        .unwrap();
        let methods: Vec<&str> = c.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(
            methods,
            [
                "keep",
                "rtn-signed-max:i4:g64",
                "rtn-signed-max:i3:g64",
                "rtn-clip:i4:affine:g64",
                "rtn-clip:i3:affine:g64",
                "hqq:u4:g64",
                "hqq:u3:g64"
            ]
        );
        assert_eq!(c[5].family, "hqq g64");
        assert!(expand(&["rtn".into()], &[9], &["64".into()], "sym").is_err());
        assert!(expand(&["bogus".into()], &[4], &["64".into()], "sym").is_err());
        assert!(expand(&["rtn".into()], &[4], &["64".into()], "weird").is_err());
        assert!(expand(&["rtn".into()], &[4], &["x".into()], "sym").is_err());
        assert!(expand(&["rtn".into()], &[4], &["0".into()], "sym").is_err());
        // NF4 has no per-channel form: `ch` is skipped for it, not an error.
        let c = expand(
            &["nf4:dq".into()],
            &[4],
            &["ch".into(), "128".into()],
            "sym",
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[1].method.as_str(), c[1].family.as_str()),
            ("nf4:b128:dq", "nf4:dq b128")
        );
    }

    #[test]
    fn rows_on_other_calibration_data_are_other_rows() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("calib.txt");
        std::fs::write(&text, "some calibration text").unwrap();
        let spec = CalibrationSpec::new(text.clone(), 4, 16, 0).unwrap();
        let a = CalibrationRecord::of(&spec).unwrap();
        assert_eq!(
            a.text_hash,
            format!("{:016x}", fnv1a(b"some calibration text"))
        );
        let b =
            CalibrationRecord::of(&CalibrationSpec::new(text.clone(), 4, 16, 1).unwrap()).unwrap();
        std::fs::write(&text, "other calibration text").unwrap();
        let c = CalibrationRecord::of(&spec).unwrap();
        assert_ne!(a.text_hash, c.text_hash);
        let row = |cal: Option<CalibrationRecord>| Row {
            model: "m".into(),
            protocol: "p".into(),
            max_chunks: None,
            layers: Layers::All,
            family: "f".into(),
            bits: 8,
            method: "static-int8".into(),
            plan: "*=static-int8".into(),
            bits_per_weight: 8.0,
            weights_mb: 1.0,
            perplexity: 1.0,
            mean_kl: None,
            top1_agreement: None,
            scored_tokens: 1,
            seconds: 1.0,
            calibration: cal,
        };
        let ra = row(Some(a.clone()));
        assert_eq!(ra.key(), row(Some(a)).key());
        assert_ne!(ra.key(), row(Some(b)).key());
        assert_ne!(ra.key(), row(Some(c)).key());
        assert_ne!(ra.key(), row(None).key());
        // Rows written before calibration was recorded still read (as uncalibrated).
        let mut v = serde_json::to_value(row(None)).unwrap();
        assert!(v.get("calibration").is_none());
        v.as_object_mut().unwrap().remove("calibration");
        assert_eq!(serde_json::from_value::<Row>(v).unwrap(), row(None));
        let back: Row = serde_json::from_str(&serde_json::to_string(&ra).unwrap()).unwrap();
        assert_eq!(back, ra);
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
            calibration: None,
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
    fn gptq_and_awq_expand_like_rtn() {
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
        let awq = expand(
            &["awq".into()],
            &[4],
            &["ch".into(), "128".into()],
            "affine",
        )
        .unwrap();
        let awq: Vec<(&str, &str)> = awq[1..]
            .iter()
            .map(|c| (c.family.as_str(), c.method.as_str()))
            .collect();
        assert_eq!(
            awq,
            [
                ("awq affine ch", "awq:i4:affine:ch0"),
                ("awq affine g128", "awq:i4:affine:g128")
            ]
        );
    }
}
