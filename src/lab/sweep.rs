//! Perplexity-vs-bits sweeps: one configuration per (method, bits, grouping), each row
//! appended to a JSON-lines file as soon as it is measured, so an interrupted sweep
//! resumes where it stopped and nothing measured is lost.

use crate::arch::llama::LoadAs;
use crate::eval::lm::{self, CalibrationSpec, KlMode};
use crate::eval::perplexity::Protocol;
use crate::lab::sweep_key::RunKey;
use crate::report::Provenance;
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
    /// Everything else the number depends on (absent only in files from before keys:
    /// such files are refused on resume, since what they measured cannot be told).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RunKey>,
    /// The tokenizer and the SHA-256 of the ids it gave for the text
    /// ([`provenance::tokenizer_id`](crate::report::provenance::tokenizer_id)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<String>,
    /// Code, machine and inputs of the measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

pub use crate::report::provenance::CalibrationRecord;

impl Row {
    /// What makes a row the measurement of a configuration within one key.
    fn same_config(&self, plan: &str) -> bool {
        self.plan == plan
    }
}

/// A sweep file's rows, and where a torn last line (an interrupted write: no final
/// newline, not a row) starts, if there is one.
struct Parsed {
    rows: Vec<Row>,
    torn_at: Option<u64>,
}

/// The rule every JSON-lines reader of quantlab follows: a last line without its newline
/// that does not parse is a torn write (resuming truncates it); any other line that is
/// not a row is refused, naming file:line and the fix. Blank lines are skipped.
fn parse_rows(path: &Path) -> Result<Option<Parsed>> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        bail!(
            "{} is a directory, not a sweep file: give a file name (--out runs/sweep.jsonl)",
            path.display()
        );
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut rows = Vec::new();
    let mut torn_at = None;
    let mut start = 0usize;
    let mut lineno = 0usize;
    while start < bytes.len() {
        lineno += 1;
        let (end, complete) = match bytes[start..].iter().position(|&b| b == b'\n') {
            Some(i) => (start + i, true),
            None => (bytes.len(), false),
        };
        let line = &bytes[start..end];
        let parsed = std::str::from_utf8(line)
            .map_err(|_| anyhow::anyhow!("not valid UTF-8"))
            .and_then(|l| {
                if l.trim().is_empty() {
                    Ok(None)
                } else {
                    serde_json::from_str::<Row>(l)
                        .map(Some)
                        .map_err(anyhow::Error::from)
                }
            });
        match parsed {
            Ok(Some(r)) => rows.push(r),
            Ok(None) => {}
            Err(_) if !complete => torn_at = Some(start as u64),
            Err(e) => bail!(
                "{}:{lineno} is not a sweep row ({e}). Fix or delete that line, or start over with --fresh (or another --out)",
                path.display()
            ),
        }
        start = end + 1;
    }
    Ok(Some(Parsed { rows, torn_at }))
}

/// Reads the rows of a sweep file (a missing file is an empty sweep). A torn last line is
/// refused here (readers do not repair); [`resume_rows`] repairs it.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    match parse_rows(path)? {
        None => Ok(Vec::new()),
        Some(Parsed { torn_at: Some(_), .. }) => bail!(
            "{} ends with a torn line (an interrupted write): re-run the sweep that writes it to repair and finish it",
            path.display()
        ),
        Some(p) => Ok(p.rows),
    }
}

/// Reads a sweep file to resume it: a torn last line is cut off (said on stderr), so the
/// next row starts on a line of its own.
pub fn resume_rows(path: &Path) -> Result<Vec<Row>> {
    let Some(p) = parse_rows(path)? else {
        return Ok(Vec::new());
    };
    if let Some(at) = p.torn_at {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("repairing {}", path.display()))?;
        let len = f.metadata()?.len();
        f.set_len(at)
            .with_context(|| format!("repairing {}", path.display()))?;
        f.sync_all()?;
        eprintln!(
            "{}: removed a torn last line ({} bytes, an interrupted write); its configuration runs again",
            path.display(),
            len - at
        );
    }
    Ok(p.rows)
}

/// Appends one row and flushes it to disk. The file must end with a complete line (resume
/// repairs a torn one first).
pub fn append_row(path: &Path, row: &Row) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut line = serde_json::to_string(row)?;
    line.push('\n');
    (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let len = f.seek(SeekFrom::End(0))?;
        if len > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                bail!("it ends with a torn line; re-run the sweep to repair it");
            }
        }
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.sync_data()) {
            // A partial append (disk full) is cut off again: the file stays whole rows.
            let _ = f.set_len(len);
            return Err(e.into());
        }
        Ok(())
    })()
    .with_context(|| format!("appending a row to {}", path.display()))
}

/// Removes a sweep's files (`--fresh`): the rows, the stored KL base and a shard manifest.
pub fn start_fresh(out: &Path) -> Result<()> {
    for p in [
        out.to_path_buf(),
        out.with_extension("base.kld"),
        out.with_extension("manifest.json"),
    ] {
        match std::fs::remove_file(&p) {
            Ok(()) => eprintln!("--fresh: removed {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("--fresh: removing {}", p.display())),
        }
    }
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

/// How to get past a refused resume.
const FRESH_HINT: &str =
    "pass --fresh to measure everything again into it, or choose another --out";

/// Refuses `existing` rows (of the file `out`) measured under another key than `key`.
fn check_key(out: &Path, existing: &[Row], key: &RunKey) -> Result<()> {
    for (i, r) in existing.iter().enumerate() {
        match &r.key {
            None => bail!(
                "{} holds rows written before rows recorded what they were measured on (row {}): they cannot be resumed safely; {FRESH_HINT}",
                out.display(),
                i + 1
            ),
            Some(k) if !k.differences(key).is_empty() => bail!(
                "{} holds rows measured under other conditions than this run ({}); its rows cannot be mixed with this run's: {FRESH_HINT}",
                out.display(),
                k.differences(key).join("; ")
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Runs the configurations not yet in `out`; returns every row of this sweep (old and new).
/// Refuses a file whose rows were measured under another [`RunKey`] or calibration.
pub fn run(spec: &SweepSpec) -> Result<Vec<Row>> {
    let text = lm::read_text(&spec.text)?;
    if spec.max_chunks == Some(0) {
        bail!(
            "--max-chunks 0 scores nothing: give at least 1 (or drop it to score the whole text)"
        );
    }
    if spec.configs.is_empty() {
        bail!("the sweep has no configurations: give --methods");
    }
    let key = super::sweep_key::of(spec)?;
    let device = spec.device.clone();
    let existing = resume_rows(&spec.out)?;
    check_key(&spec.out, &existing, &key)?;
    let protocol = spec.protocol.to_string();
    let model_name = spec.model.clone();
    let kl_path = spec.out.with_extension("base.kld");
    // Plans and calibration first, so a refusal comes before any measuring.
    let mut calib: Option<(CalibrationSpec, CalibrationRecord)> = None;
    let mut planned = Vec::with_capacity(spec.configs.len());
    for c in &spec.configs {
        let plan = c.plan(spec.layers);
        let parsed: crate::nn::Plan = plan
            .parse()
            .with_context(|| format!("sweep plan '{plan}'"))?;
        let calibrated = crate::nn::plan_needs_calibration(&parsed);
        if calibrated && calib.is_none() {
            let s = spec.calibration.text_spec()?;
            let r = CalibrationRecord::of(&s.text, s.samples, s.seqlen, s.seed)?;
            calib = Some((s, r));
        }
        let record = calib.as_ref().filter(|_| calibrated).map(|(_, r)| r);
        if let Some(done) = existing.iter().find(|r| r.same_config(&plan)) {
            if done.calibration.as_ref() != record {
                bail!(
                    "{} holds the row of {plan} calibrated on other data ({} → {}); {FRESH_HINT}",
                    spec.out.display(),
                    describe_calibration(done.calibration.as_ref()),
                    describe_calibration(record)
                );
            }
        }
        planned.push((plan, calibrated));
    }
    // Every configuration against the model's layer shapes, before the first measurement
    // (a group that does not divide a row must not stop a sweep halfway).
    {
        let m = crate::model::load_llm(&spec.model, spec.load_as, &candle_core::Device::Cpu)?;
        let plans: Vec<String> = planned.iter().map(|(p, _)| p.clone()).collect();
        check_shapes(&m.model, &plans)?;
    }
    let mut provenance = Provenance::here(&device);
    provenance.dtype = Some(key.dtype.clone());
    provenance.dataset = Some(crate::report::provenance::DataFile {
        file: key.text.clone(),
        sha256: key.text_sha256.clone(),
    });
    provenance.protocol = Some(protocol.clone());
    let mut rows = Vec::new();
    let mut ids: Option<(Vec<u32>, String)> = None;
    for (i, (c, (plan, calibrated))) in spec.configs.iter().zip(planned).enumerate() {
        let calibration = calib.as_ref().filter(|_| calibrated);
        let is_base = i == 0;
        let done = existing.iter().find(|r| r.same_config(&plan));
        // The stored base is trusted only next to its row: a base file without one may be
        // left from another run of this --out.
        let base_needed =
            spec.kl && is_base && !(kl_path.exists() && done.is_some_and(|r| r.method == "keep"));
        if let Some(done) = done {
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
        let (ids, tokens) = match &ids {
            Some(v) => v,
            None => {
                let v = p.llm.tokenizer.encode(&text)?;
                let t = crate::report::provenance::tokenizer_id(&p.llm.tokenizer, &v);
                if let Some(r) = existing.iter().find(|r| r.tokens.as_ref() != Some(&t)) {
                    bail!(
                        "{} holds rows whose text was tokenized differently ({} → {t}): the tokenizer changed; {FRESH_HINT}",
                        spec.out.display(),
                        r.tokens.as_deref().unwrap_or("not recorded")
                    );
                }
                ids.insert((v, t))
            }
        };
        let mode = match (spec.kl, is_base) {
            (false, _) => KlMode::None,
            (true, true) => KlMode::Save(kl_path.clone(), 256),
            (true, false) => KlMode::Compare(kl_path.clone()),
        };
        let bar = crate::progress::bar(0, &c.family, spec.progress);
        let s = lm::score(&p, ids, spec.protocol, spec.max_chunks, &mode, &bar)?;
        let mut prov = provenance.clone();
        prov.tokenizer = Some(tokens.clone());
        prov.calibration = calibration.map(|(_, r)| r.clone());
        prov.seed = calibration.map(|(s, _)| s.seed);
        let row = Row {
            model: model_name.clone(),
            protocol: protocol.clone(),
            max_chunks: spec.max_chunks,
            layers: spec.layers,
            family: c.family.clone(),
            bits: c.bits,
            method: c.method.clone(),
            plan: plan.clone(),
            bits_per_weight: p.linear_bits_per_weight(),
            weights_mb: p.weight_bytes() as f64 / 1e6,
            perplexity: s.ppl.perplexity(),
            mean_kl: s.kl.as_ref().map(|k| k.mean_kl()),
            top1_agreement: s.kl.as_ref().map(|k| k.top1_agreement()),
            scored_tokens: s.ppl.scored_tokens,
            seconds: s.ppl.seconds,
            calibration: calibration.map(|(_, r)| r.clone()),
            key: Some(key.clone()),
            tokens: Some(tokens.clone()),
            provenance: Some(prov),
        };
        match done {
            // The base measured again (its stored distributions were missing): the row
            // already in the file stays the row.
            Some(d) => rows.push(d.clone()),
            None => {
                append_row(&spec.out, &row)?;
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Applies every plan's method to a small synthetic weight of each layer's row length
/// (a few rows: groups run along rows), with stand-in statistics for calibrated methods,
/// so that a method that cannot take a layer's shape is refused before anything is
/// measured, naming the configuration and the layer.
pub fn check_shapes(model: &impl crate::nn::HasLinears, plans: &[String]) -> Result<()> {
    use crate::nn::algo::LayerInput;
    use crate::nn::format::{dense::Dense, WeightFormat};
    let mut checked: Vec<(String, usize, usize)> = Vec::new();
    for plan in plans {
        let parsed: crate::nn::Plan = plan.parse()?;
        for l in model.linears() {
            let method = parsed.method_for(&l.name);
            let alg = method.algorithm();
            if alg.keeps_layer() {
                continue;
            }
            let (rows, cols) = (l.out_features.min(4), l.in_features);
            let key = (method.to_string(), rows, cols);
            if checked.contains(&key) {
                continue;
            }
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 500.0)
                .collect();
            let weight: std::sync::Arc<dyn WeightFormat> = std::sync::Arc::new(Dense::new(
                candle_core::Tensor::from_vec(w, (rows, cols), &candle_core::Device::Cpu)?,
            )?);
            let needs = alg.needs();
            let calibration = (!needs.is_empty()).then(|| stand_in_statistics(&needs, cols));
            alg.apply(&LayerInput {
                name: &l.name,
                weight: &weight,
                calibration: calibration.as_ref(),
            })
            .with_context(|| {
                format!(
                    "sweep configuration '{plan}' cannot quantize layer {} ([{}, {cols}]); nothing was measured",
                    l.name, l.out_features
                )
            })?;
            checked.push(key);
        }
    }
    Ok(())
}

/// Statistics of unit-variance, uncorrelated inputs, for [`check_shapes`].
fn stand_in_statistics(
    needs: &[crate::nn::calib::Statistic],
    cols: usize,
) -> crate::nn::calib::Calibration {
    use crate::nn::calib::Statistic;
    let mut c = crate::nn::calib::Calibration {
        rows: cols.max(1),
        ..Default::default()
    };
    for s in needs {
        match s {
            Statistic::InputRange(_) => c.input_range = Some((-1.0, 1.0)),
            Statistic::InputHessian => {
                let mut h = vec![0.0; cols * cols];
                for i in 0..cols {
                    h[i * cols + i] = 2.0;
                }
                c.hessian = Some(h);
            }
            Statistic::InputChannelAbsMax => c.channel_absmax = Some(vec![1.0; cols]),
            Statistic::InputChannelAbsMean => c.channel_absmean = Some(vec![0.8; cols]),
        }
    }
    c
}

fn describe_calibration(c: Option<&CalibrationRecord>) -> String {
    match c {
        None => "none".into(),
        Some(c) => format!(
            "{} sha256 {}, {} samples × {} tokens, seed {}",
            c.file,
            &c.text_hash[..c.text_hash.len().min(12)],
            c.samples,
            c.seqlen,
            c.seed
        ),
    }
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

    fn row() -> Row {
        Row {
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
            key: None,
            tokens: None,
            provenance: None,
        }
    }

    #[test]
    fn calibration_records_hash_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("calib.txt");
        std::fs::write(&text, "abc").unwrap();
        let spec = CalibrationSpec::new(text.clone(), 4, 16, 0).unwrap();
        let a = CalibrationRecord::of(&spec.text, spec.samples, spec.seqlen, spec.seed).unwrap();
        assert_eq!(
            a.text_hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(&text, "abd").unwrap();
        assert_ne!(
            CalibrationRecord::of(&spec.text, spec.samples, spec.seqlen, spec.seed)
                .unwrap()
                .text_hash,
            a.text_hash
        );
        let mut r = row();
        r.calibration = Some(a);
        let back: Row = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn torn_last_lines_are_repaired_and_corrupt_lines_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        assert!(read_rows(&p).unwrap().is_empty());
        let row = row();
        append_row(&p, &row).unwrap();
        let whole = std::fs::read(&p).unwrap();
        // An interrupted write leaves half a line: readers refuse, resume cuts it off.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"model\": \"m\", \"prot").unwrap();
        let e = read_rows(&p).unwrap_err().to_string();
        assert!(e.contains("torn"), "{e}");
        assert!(append_row(&p, &row).is_err());
        assert_eq!(resume_rows(&p).unwrap(), std::slice::from_ref(&row));
        assert_eq!(std::fs::read(&p).unwrap(), whole);
        append_row(&p, &row).unwrap();
        assert_eq!(read_rows(&p).unwrap(), [row.clone(), row.clone()]);
        // A bad line anywhere else: refused with file:line and the fix, by both.
        let mut text = String::from_utf8(whole).unwrap();
        text += "{\"not\": \"a row\"}\n";
        text += &serde_json::to_string(&row).unwrap();
        text += "\n";
        std::fs::write(&p, &text).unwrap();
        for e in [read_rows(&p).unwrap_err(), resume_rows(&p).unwrap_err()] {
            let e = e.to_string();
            assert!(e.contains("s.jsonl:2") && e.contains("--fresh"), "{e}");
        }
        // A torn line that got its newline later (older quantlab) is a middle line too.
        std::fs::write(&p, "{\"model\": \"m\", \"prot\n").unwrap();
        assert!(resume_rows(&p).unwrap_err().to_string().contains(":1"));
        assert_eq!(row.plan, "*.mlp.*=w:i4:sym:g64");
    }

    #[test]
    fn resumes_refuse_rows_of_another_key() {
        let key = RunKey {
            model: "m".into(),
            model_files: "m size 1 mtime 2".into(),
            load_as: "f32".into(),
            text: "t.txt".into(),
            text_sha256: "aa".into(),
            protocol: "p".into(),
            max_chunks: Some(2),
            layers: Layers::All,
            kl: false,
            device: "cpu".into(),
            dtype: "f32".into(),
        };
        let mut r = row();
        let out = Path::new("runs/x.jsonl");
        let e = check_key(out, std::slice::from_ref(&r), &key).unwrap_err();
        assert!(e.to_string().contains("--fresh"), "{e}");
        r.key = Some(key.clone());
        check_key(out, std::slice::from_ref(&r), &key).unwrap();
        let mut other = key.clone();
        other.text_sha256 = "bb".into();
        other.protocol = "q".into();
        let e = check_key(out, &[r], &other).unwrap_err().to_string();
        assert!(
            e.contains("text sha256 (t.txt → t.txt): aa → bb") && e.contains("protocol: p → q"),
            "{e}"
        );
        assert!(
            e.contains("runs/x.jsonl") && e.contains("another --out"),
            "{e}"
        );
    }

    /// HQQ g48 cannot take the tiny Llama's 64-wide rows (as g128 cannot take SmolLM2's
    /// 576): refused before any measuring,
    /// naming the configuration and a layer; calibrated methods are checked with stand-in
    /// statistics; plans that fit pass.
    #[test]
    fn configurations_are_checked_against_the_layer_shapes_first() {
        let dir = std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llama-tiny"
        ));
        let m = crate::arch::llama::Llama::from_hf_dir(&dir, &candle_core::Device::Cpu).unwrap();
        let ok = [
            "keep",
            "lm_head=keep;*=w:i4:sym:g64",
            "lm_head=keep;*=hqq:u4:g64",
            "lm_head=keep;*=gptq:i3:sym:g64:f16-scales",
            "lm_head=keep;*=awq:i4:sym:g64",
        ]
        .map(String::from);
        check_shapes(&m, &ok).unwrap();
        let bad = ["lm_head=keep;*=w:i4:sym:g64", "lm_head=keep;*=hqq:u4:g48"].map(String::from);
        let e = format!("{:#}", check_shapes(&m, &bad).unwrap_err());
        assert!(e.contains("hqq:u4:g48") && e.contains("self_attn"), "{e}");
        assert!(e.contains("divides"), "{e}");
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
