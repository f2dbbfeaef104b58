//! Layer sensitivity: the KL divergence to the f32 model (and the perplexity change) when
//! only one layer — or one block, or one layer type across blocks — is quantized, for every
//! setting, on a small token budget.
//!
//! Quantizing one unit changes nothing before the first block half that reads it, so the
//! f32 model's hidden state at the input of every half-block (attention, feed-forward) is
//! computed once and kept; each measurement converts the unit's weights in place, resumes
//! the forward pass from the first affected half, compares the log-probabilities with the
//! stored base rows ([`crate::eval::kl`]), and puts the f32 weights back. A layer in block
//! `i` costs `30 - i` blocks of compute instead of 30, plus the output layer.
//!
//! Rows go to a JSON-lines file as soon as measured, keyed by everything that determines
//! the number (model, text hash, tokens, window, top-k, unit, method), so a rerun resumes.

use crate::arch::llama::{Llama, LoadAs, Stage};
use crate::eval::kl::{self, BaseRow};
use crate::eval::lm::CalibrationSpec;
use crate::eval::perplexity::{self, Protocol, Window};
use crate::lab::sweep::Config;
use crate::nn::calib::{Calibration, Statistic};
use crate::nn::{HasLinears, LayerSummary, Method, Plan};
use crate::report::provenance::CalibrationRecord;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What one measurement quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    /// Each linear layer of the blocks alone.
    Layer,
    /// All linear layers of one block together.
    Block,
    /// One layer type (`q_proj`, ..., `down_proj`) in every block together.
    Type,
}

/// A set of layers quantized together, named by the plan pattern that selects them.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Plan pattern (`model.layers.3.mlp.down_proj`, `model.layers.3.*`, `*.mlp.down_proj`).
    pub pattern: String,
    pub layers: Vec<String>,
    /// The first half-block that reads one of the layers: the forward pass resumes here.
    pub start: Stage,
}

/// The block linear layers of `model`, grouped by `g` (lm_head is never a unit: the
/// uniform baselines keep it in f32).
pub fn units(model: &Llama, g: Granularity) -> Vec<Unit> {
    let layers: Vec<(String, Stage)> = model
        .linears()
        .iter()
        .filter_map(|l| model.stage_of(&l.name).map(|s| (l.name.clone(), s)))
        .collect();
    let suffix = |name: &str| -> String {
        let rest = name.strip_prefix("model.layers.").unwrap_or(name);
        rest.split_once('.').map_or(rest, |(_, s)| s).to_string()
    };
    let mut out: Vec<Unit> = Vec::new();
    for (name, stage) in layers {
        let pattern = match g {
            Granularity::Layer => name.clone(),
            Granularity::Block => format!("model.layers.{}.*", stage.block),
            Granularity::Type => format!("*.{}", suffix(&name)),
        };
        match out.iter_mut().find(|u| u.pattern == pattern) {
            Some(u) => {
                u.layers.push(name);
                u.start = u.start.min(stage);
            }
            None => out.push(Unit {
                pattern,
                layers: vec![name],
                start: stage,
            }),
        }
    }
    out
}

/// The f32 model's hidden states at every half-block input, and its output distributions,
/// for a set of windows.
pub struct BaseCache {
    /// `states[s][w]`: input of stage `s` (`2 * block + half`) for window `w`;
    /// `states[2 * blocks][w]` is the last block's output.
    states: Vec<Vec<Vec<f32>>>,
    /// Base rows of every scored position of every window.
    rows: Vec<Vec<BaseRow>>,
    windows: Vec<Window>,
    base_nll: f64,
}

/// What one perturbed model gives on the windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    pub mean_kl: f64,
    pub max_kl: f64,
    pub top1_agreement: f64,
    /// Mean negative log-likelihood of the scored next tokens.
    pub mean_nll: f64,
}

impl BaseCache {
    /// Runs the (f32) model once over `windows`, keeping every stage's input. Positions
    /// `first_scored .. len - 1` of each window are compared (as `perplexity` scores them).
    pub fn build(model: &Llama, windows: &[Window], top_k: usize) -> Result<Self> {
        if windows.is_empty() || windows.iter().any(|w| w.scored() == 0) {
            bail!("sensitivity needs at least one window with a scored position");
        }
        let stages = 2 * model.num_blocks();
        let mut states = vec![Vec::with_capacity(windows.len()); stages + 1];
        let mut rows = Vec::with_capacity(windows.len());
        let mut nll = 0.0;
        for w in windows {
            let mut x = model.embed_window(&w.tokens)?;
            for (s, slot) in states.iter_mut().enumerate().take(stages) {
                slot.push(x.clone());
                model.run_stage(stage(s), &mut x)?;
            }
            let lp = head(model, w, &x)?;
            states[stages].push(x);
            nll += perplexity::window_nll(w, &lp)?;
            rows.push(
                kl::rows(&lp)?
                    .iter()
                    .enumerate()
                    // Row k is position first_scored + k, which predicts the next token.
                    .map(|(k, r)| kl::base_row(r, top_k, w.tokens[w.first_scored + k + 1]))
                    .collect(),
            );
        }
        Ok(BaseCache {
            states,
            rows,
            windows: windows.to_vec(),
            base_nll: nll / scored(windows) as f64,
        })
    }

    /// Replaces the cached stage inputs with those of `model` (the base rows stay the f32
    /// model's), so that later [`Self::evaluate_from`] calls measure changes *around*
    /// `model` — a background plan — rather than around the f32 model. Returns `model`'s
    /// own evaluation (the background's KL to f32).
    pub fn restate(&mut self, model: &Llama) -> Result<Eval> {
        let stages = 2 * model.num_blocks();
        if self.states.len() != stages + 1 {
            bail!("the cached states are of another model");
        }
        let mut sink = EvalSink::default();
        for (i, w) in self.windows.iter().enumerate() {
            let mut x = model.embed_window(&w.tokens)?;
            for s in 0..stages {
                self.states[s][i].clone_from(&x);
                model.run_stage(stage(s), &mut x)?;
            }
            sink.add(&self.rows[i], w, &head(model, w, &x)?)?;
            self.states[stages][i] = x;
        }
        Ok(sink.finish(self.positions()))
    }

    /// Mean next-token NLL of the f32 model.
    pub fn base_nll(&self) -> f64 {
        self.base_nll
    }

    /// Positions compared per evaluation.
    pub fn positions(&self) -> usize {
        scored(&self.windows)
    }

    /// Evaluates `model` (equal to the cached one before `start`) by resuming at `start`.
    pub fn evaluate_from(&self, model: &Llama, start: Stage) -> Result<Eval> {
        let stages = 2 * model.num_blocks();
        if self.states.len() != stages + 1 {
            bail!("the cached states are of another model");
        }
        let mut sink = EvalSink::default();
        for (i, w) in self.windows.iter().enumerate() {
            let mut x = self.states[start.index()][i].clone();
            for s in start.index()..stages {
                model.run_stage(stage(s), &mut x)?;
            }
            sink.add(&self.rows[i], w, &head(model, w, &x)?)?;
        }
        Ok(sink.finish(self.positions()))
    }

    /// Evaluates `model` with its ordinary forward pass from the tokens (no cached state),
    /// as `perplexity` runs it: the reference the resumed evaluation is tested against.
    pub fn evaluate_full(&self, model: &Llama) -> Result<Eval> {
        let mut sink = EvalSink::default();
        for (i, w) in self.windows.iter().enumerate() {
            sink.add(&self.rows[i], w, &perplexity::window_log_probs(model, w)?)?;
        }
        Ok(sink.finish(self.positions()))
    }
}

/// Log-probabilities `[scored, vocab]` of a window's scored positions from its last hidden
/// states (only those rows go through the output layer).
fn head(model: &Llama, w: &Window, x: &[f32]) -> Result<Tensor> {
    let hs = model.cfg.hidden_size;
    model.head_log_probs(&x[w.first_scored * hs..(w.first_scored + w.scored()) * hs])
}

fn stage(s: usize) -> Stage {
    Stage {
        block: s / 2,
        half: s % 2,
    }
}

fn scored(windows: &[Window]) -> usize {
    windows.iter().map(Window::scored).sum()
}

#[derive(Default)]
struct EvalSink {
    kl: kl::KlStats,
    nll: f64,
}

impl EvalSink {
    fn add(&mut self, base: &[BaseRow], w: &Window, lp: &Tensor) -> Result<()> {
        for (b, r) in base.iter().zip(kl::rows(lp)?) {
            let (d, agree) = kl::compare_row(b, &r);
            self.kl.add(d, agree);
        }
        self.nll += perplexity::window_nll(w, lp)?;
        Ok(())
    }

    fn finish(self, positions: usize) -> Eval {
        Eval {
            mean_kl: self.kl.mean_kl(),
            max_kl: self.kl.kl_max,
            top1_agreement: self.kl.top1_agreement(),
            mean_nll: self.nll / positions.max(1) as f64,
        }
    }
}

/// Converts `unit`'s layers with `method`, runs `f` on the model, and restores the layers
/// as they were (also when `f` or a conversion fails). Returns `f`'s result and the
/// converted layers' summaries (stored bytes of the real format). Methods that need
/// statistics of their inputs (GPTQ) take them from `stats` (see [`gather_statistics`]).
pub fn with_unit_quantized<R>(
    model: &mut Llama,
    unit: &Unit,
    method: &Method,
    stats: Option<&Statistics>,
    f: impl FnOnce(&Llama) -> Result<R>,
) -> Result<(R, Vec<LayerSummary>)> {
    check_per_layer(method)?;
    let needs = !method.algorithm().needs().is_empty();
    if needs && stats.is_none() {
        bail!("{method} needs calibration statistics: sensitivity gathers them when a setting asks for them (--calib-samples, --calibration)");
    }
    let mut saved = Vec::new();
    let mut summaries = Vec::new();
    let mut result = Ok(());
    for l in model.linears_mut() {
        if unit.layers.contains(&l.name) {
            saved.push((l.name.clone(), l.weight.clone(), l.method.clone()));
            let c = match stats.filter(|_| needs) {
                Some(s) => match s.get(&l.name) {
                    Some(c) => Some(c),
                    None => {
                        result = Err(anyhow::anyhow!(
                            "no calibration statistics for layer {}",
                            l.name
                        ));
                        break;
                    }
                },
                None => None,
            };
            if let Err(e) = l.convert(method, c) {
                result = Err(e.context(format!("quantizing {} with {method}", l.name)));
                break;
            }
            summaries.push(LayerSummary::of(l));
        }
    }
    let out = result.and_then(|()| f(model));
    for l in model.linears_mut() {
        if let Some((_, w, m)) = saved.iter().find(|(n, _, _)| *n == l.name) {
            l.set_weight(w.clone());
            l.method = m.clone();
        }
    }
    Ok((out?, summaries))
}

/// Statistics of every layer's inputs, by layer name.
pub type Statistics = HashMap<String, Calibration>;

/// Refuses methods that cannot be measured one layer at a time: activation-aware scaling
/// (AWQ, SmoothQuant) folds a scale into the layers that share an input and the norm
/// before them, which a single-layer conversion cannot do.
fn check_per_layer(method: &Method) -> Result<()> {
    if method.algorithm().group_scaling().is_some() {
        bail!("{method} folds scales across a group of layers (and their norm), so it cannot be measured one layer at a time; sensitivity takes per-layer methods (rtn, rtn-signed-max, rtn-clip, hqq, gptq, nf4/fp4, GGML types, f16)");
    }
    Ok(())
}

/// Runs the calibration windows through `model` as it stands (the f32 model: GPTQ's
/// statistics for a single-layer change are those of the unquantized inputs) and returns
/// each layer's statistics `needs`. One pass for all layers, instead of the sequential
/// pass the final plan gets (`apply_plan_in_stages`): a measurement changes one layer,
/// so the inputs it sees are the f32 model's up to that layer.
pub fn gather_statistics(
    llm: &crate::model::LoadedLlm,
    needs: &[Statistic],
    spec: &CalibrationSpec,
    progress: bool,
) -> Result<Statistics> {
    let ids = llm
        .tokenizer
        .encode(&crate::eval::lm::read_text(&spec.text)?)?;
    if spec.seqlen > llm.model.cfg.max_position_embeddings {
        bail!(
            "--calib-seqlen {} is longer than the model's context ({} positions)",
            spec.seqlen,
            llm.model.cfg.max_position_embeddings
        );
    }
    let windows = crate::eval::lm::calibration_windows(&ids, spec.samples, spec.seqlen, spec.seed)
        .with_context(|| format!("calibration text {}", spec.text.display()))?;
    statistics_of(&llm.model, needs, &windows, progress)
}

/// [`gather_statistics`] on given windows of token ids.
pub fn statistics_of(
    m: &Llama,
    needs: &[Statistic],
    windows: &[Vec<u32>],
    progress: bool,
) -> Result<Statistics> {
    if windows.is_empty() {
        bail!("calibration needs at least one window");
    }
    for l in m.linears() {
        l.start_calibration(needs);
    }
    let bar = crate::progress::bar(windows.len() as u64, "calibrate", progress);
    for w in windows {
        let ids = Tensor::from_vec(w.clone(), (1, w.len()), &m.device)?;
        m.forward(&ids, &mut m.new_cache(), true)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut out = HashMap::new();
    for l in m.linears() {
        if let Some(c) = l.take_calibration()? {
            out.insert(l.name.clone(), c);
        }
    }
    Ok(out)
}

/// One measurement, as stored in the JSON-lines file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    /// The text file and the FNV-1a hash of the token ids measured.
    pub text: String,
    pub tokens_hash: String,
    pub tokens: usize,
    pub ctx: usize,
    pub kl_top_k: usize,
    pub granularity: Granularity,
    /// The unit's plan pattern.
    pub unit: String,
    pub layers: usize,
    /// Plan method and legend family of the setting.
    pub method: String,
    pub family: String,
    pub bits: u32,
    pub params: usize,
    /// Stored bytes of the unit's layers in this setting (scales and zero points included).
    pub bytes: usize,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub top1_agreement: f64,
    pub base_perplexity: f64,
    pub perplexity: f64,
    pub seconds: f64,
    /// The background plan every other layer was quantized with (in-context sensitivity:
    /// the row's KL is that of the background with this unit changed); absent: f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
    /// The background plan's own KL on the same tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background_kl: Option<f64>,
    /// Calibration data of the statistics (GPTQ's Hessians), where the setting or the
    /// background needed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
}

type RowKey = (
    String,
    String,
    usize,
    usize,
    usize,
    String,
    String,
    Option<String>,
    Option<CalibrationRecord>,
);

impl Row {
    fn key(&self) -> RowKey {
        (
            self.model.clone(),
            self.tokens_hash.clone(),
            self.tokens,
            self.ctx,
            self.kl_top_k,
            self.unit.clone(),
            self.method.clone(),
            self.background.clone(),
            self.calibration.clone(),
        )
    }

    pub fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// Reads a JSON-lines file of rows (missing file: none).
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read sensitivity file {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{} line {}: not a sensitivity row (a file of another command?)",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// A sensitivity pass.
pub struct SensitivitySpec {
    pub model: String,
    pub text: PathBuf,
    /// Tokens measured: `tokens / ctx` consecutive windows from the start of the text.
    pub tokens: usize,
    pub ctx: usize,
    pub kl_top_k: usize,
    pub settings: Vec<Config>,
    pub granularity: Granularity,
    pub out: PathBuf,
    /// Measure what the file lacks (false: report only what it holds).
    pub measure: bool,
    pub progress: bool,
    /// Calibration windows for settings (or a background) that need statistics (GPTQ),
    /// gathered once on the f32 model.
    pub calibration: Option<CalibrationSpec>,
    /// In-context sensitivity: quantize every layer with this plan first, then measure each
    /// unit × setting as a change of that one unit from the background (linearised around
    /// the operating point instead of around f32).
    pub background: Option<String>,
}

/// Where the time of a pass went.
#[derive(Debug, Clone, Default)]
pub struct Timing {
    pub load_s: f64,
    /// Gathering calibration statistics (GPTQ's Hessians) on the f32 model.
    pub calibrate_s: f64,
    pub base_s: f64,
    pub quantize_s: f64,
    pub forward_s: f64,
    pub measured: usize,
    pub resumed: usize,
}

/// Runs (or resumes) a pass; returns every row of this pass's key, old and new.
pub fn run(spec: &SensitivitySpec) -> Result<(Vec<Row>, Timing)> {
    let mut timing = Timing::default();
    if spec.ctx < 4 || spec.tokens < spec.ctx {
        bail!(
            "--tokens {} must hold at least one --ctx {} window (of 4 or more tokens)",
            spec.tokens,
            spec.ctx
        );
    }
    if spec.settings.is_empty() {
        bail!("no settings to measure: give --methods and --bits");
    }
    let methods: Vec<Method> = spec
        .settings
        .iter()
        .map(|c| c.method.parse())
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let mut llm = crate::model::load_llm(&spec.model, LoadAs::F32, &Device::Cpu)?;
    let text = crate::eval::lm::read_text(&spec.text)?;
    let ids = llm.tokenizer.encode(&text)?;
    let n = spec.tokens / spec.ctx;
    if ids.len() < n * spec.ctx {
        bail!(
            "{} has {} tokens, fewer than --tokens {}",
            spec.text.display(),
            ids.len(),
            n * spec.ctx
        );
    }
    let windows = perplexity::windows(
        &ids,
        Protocol::LlamaCpp {
            ctx: spec.ctx,
            bos: false,
        },
        None,
        Some(n),
    )?;
    let hash = windows
        .iter()
        .fold(kl::HASH_SEED, |h, w| kl::hash_tokens(h, &w.tokens));
    let model_name = llm.source.display().to_string();
    timing.load_s = t0.elapsed().as_secs_f64();
    let units = units(&llm.model, spec.granularity);
    let background: Option<Plan> = spec
        .background
        .as_deref()
        .map(|b| b.parse().with_context(|| format!("in --background '{b}'")))
        .transpose()?;
    // Statistics every setting (and the background) needs, gathered once.
    let mut needs: Vec<Statistic> = Vec::new();
    let bg_methods: Vec<Method> = background
        .as_ref()
        .map(|p| p.rules.iter().map(|r| r.method.clone()).collect())
        .unwrap_or_default();
    for m in methods.iter().chain(&bg_methods) {
        check_per_layer(m)?;
        for s in m.algorithm().needs() {
            if !needs.contains(&s) {
                needs.push(s);
            }
        }
    }
    let calibration = match (&spec.calibration, needs.is_empty()) {
        (_, true) => None,
        (Some(c), false) => Some(c),
        (None, false) => {
            bail!("a setting or the background needs calibration statistics: give calibration data")
        }
    };
    let record = calibration
        .map(|c| CalibrationRecord::of(&c.text, c.samples, c.seqlen, c.seed))
        .transpose()?;
    let key_of = |unit: &str, method: &str| {
        (
            model_name.clone(),
            format!("{hash:016x}"),
            n * spec.ctx,
            spec.ctx,
            spec.kl_top_k,
            unit.to_string(),
            method.to_string(),
            spec.background.clone(),
            record.clone(),
        )
    };
    let old: Vec<Row> = read_rows(&spec.out)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut todo = Vec::new();
    for u in &units {
        for (c, m) in spec.settings.iter().zip(&methods) {
            let k = key_of(&u.pattern, &c.method);
            match old.iter().find(|r| r.key() == k) {
                Some(r) => {
                    rows.push(r.clone());
                    timing.resumed += 1;
                }
                None => todo.push((u, c, m)),
            }
        }
    }
    if todo.is_empty() || !spec.measure {
        return Ok((rows, timing));
    }
    let stats = match calibration {
        Some(c) => {
            let t = Instant::now();
            let s = gather_statistics(&llm, &needs, c, spec.progress)?;
            timing.calibrate_s = t.elapsed().as_secs_f64();
            Some(s)
        }
        None => None,
    };
    let t0 = Instant::now();
    let mut base = BaseCache::build(&llm.model, &windows, spec.kl_top_k)?;
    timing.base_s = t0.elapsed().as_secs_f64();
    // The background: every layer converted by its plan (statistics of the f32 model's
    // inputs, in one pass), then the cached stage inputs recomputed through it.
    let mut background_eval = None;
    if let Some(plan) = &background {
        let t = Instant::now();
        for l in llm.model.linears_mut() {
            let m = plan.method_for(&l.name);
            let c = stats
                .as_ref()
                .filter(|_| !m.algorithm().needs().is_empty())
                .and_then(|s| s.get(&l.name));
            l.convert(&m, c)
                .with_context(|| format!("background plan on layer {}", l.name))?;
        }
        background_eval = Some(base.restate(&llm.model)?);
        timing.base_s += t.elapsed().as_secs_f64();
    }
    if let Some(dir) = spec.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.out)
        .with_context(|| format!("cannot open {}", spec.out.display()))?;
    let bar = crate::progress::bar(todo.len() as u64, "sensitivity", spec.progress);
    for (u, c, m) in todo {
        let t = Instant::now();
        let mut forward_s = 0.0;
        // A unit already at this setting in the background changes nothing: its KL is
        // the background's (measured once by `restate`).
        let unchanged = background.as_ref().is_some_and(|p| {
            u.layers
                .iter()
                .all(|l| p.method_for(l).to_string() == m.to_string())
        });
        let (e, layers) = with_unit_quantized(&mut llm.model, u, m, stats.as_ref(), |model| {
            if unchanged {
                return Ok(background_eval.expect("a background was measured"));
            }
            let t = Instant::now();
            let e = base.evaluate_from(model, u.start);
            forward_s = t.elapsed().as_secs_f64();
            e
        })?;
        let seconds = t.elapsed().as_secs_f64();
        timing.forward_s += forward_s;
        timing.quantize_s += seconds - forward_s;
        timing.measured += 1;
        let row = Row {
            model: model_name.clone(),
            text: spec.text.display().to_string(),
            tokens_hash: format!("{hash:016x}"),
            tokens: n * spec.ctx,
            ctx: spec.ctx,
            kl_top_k: spec.kl_top_k,
            granularity: spec.granularity,
            unit: u.pattern.clone(),
            layers: u.layers.len(),
            method: c.method.clone(),
            family: c.family.clone(),
            bits: c.bits,
            params: layers.iter().map(|l| l.params).sum(),
            bytes: layers.iter().map(|l| l.bytes).sum(),
            mean_kl: e.mean_kl,
            max_kl: e.max_kl,
            top1_agreement: e.top1_agreement,
            base_perplexity: base.base_nll().exp(),
            perplexity: e.mean_nll.exp(),
            seconds,
            background: spec.background.clone(),
            background_kl: background_eval.map(|e| e.mean_kl),
            calibration: record.clone(),
        };
        writeln!(file, "{}", serde_json::to_string(&row)?)?;
        file.flush()?;
        rows.push(row);
        bar.inc(1);
        bar.set_message(format!("{} {}", u.pattern, c.method));
    }
    bar.finish_and_clear();
    // Units in model order, settings in the order given.
    let order = |r: &Row| {
        (
            units.iter().position(|u| u.pattern == r.unit),
            spec.settings.iter().position(|c| c.method == r.method),
        )
    };
    rows.sort_by_key(order);
    Ok((rows, timing))
}

/// The heat map of rows (units × settings): for single layers one panel per setting with
/// blocks as rows and layer types as columns; otherwise one column per setting.
pub fn heat_map(rows: &[Row]) -> crate::report::plot::HeatMap {
    use crate::report::plot::{HeatMap, Panel};
    let mut methods: Vec<(String, String)> = Vec::new();
    for r in rows {
        if !methods.iter().any(|(m, _)| *m == r.method) {
            methods.push((r.method.clone(), format!("{} {}-bit", r.family, r.bits)));
        }
    }
    let layer_like = rows.iter().all(|r| r.granularity == Granularity::Layer);
    let split = |u: &str| -> Option<(usize, String)> {
        let rest = u.strip_prefix("model.layers.")?;
        let (b, t) = rest.split_once('.')?;
        Some((b.parse().ok()?, t.rsplit('.').next()?.to_string()))
    };
    if layer_like && rows.iter().all(|r| split(&r.unit).is_some()) {
        let mut types: Vec<String> = Vec::new();
        let mut blocks = 0;
        for r in rows {
            let (b, t) = split(&r.unit).expect("checked");
            blocks = blocks.max(b + 1);
            if !types.contains(&t) {
                types.push(t);
            }
        }
        let panels = methods
            .iter()
            .map(|(m, label)| {
                let mut cells = vec![vec![None; types.len()]; blocks];
                for r in rows.iter().filter(|r| r.method == *m) {
                    let (b, t) = split(&r.unit).expect("checked");
                    let j = types.iter().position(|x| *x == t).expect("listed");
                    cells[b][j] = Some(r.mean_kl);
                }
                Panel {
                    title: label.clone(),
                    cells,
                }
            })
            .collect();
        return HeatMap {
            title: "Sensitivity: mean KL to f32 with only that layer quantized".into(),
            row_label: "block".into(),
            col_label: "layer".into(),
            row_names: (0..blocks).map(|b| b.to_string()).collect(),
            col_names: types
                .iter()
                .map(|t| t.trim_end_matches("_proj").to_string())
                .collect(),
            panels,
            value_label: "mean KL (nats, log colour scale)".into(),
        };
    }
    let mut units: Vec<String> = Vec::new();
    for r in rows {
        if !units.contains(&r.unit) {
            units.push(r.unit.clone());
        }
    }
    let cells = units
        .iter()
        .map(|u| {
            methods
                .iter()
                .map(|(m, _)| {
                    rows.iter()
                        .find(|r| r.unit == *u && r.method == *m)
                        .map(|r| r.mean_kl)
                })
                .collect()
        })
        .collect();
    HeatMap {
        title: "Sensitivity: mean KL to f32 with only that unit quantized".into(),
        row_label: "unit".into(),
        col_label: "setting".into(),
        row_names: units,
        col_names: methods.iter().map(|(_, l)| l.clone()).collect(),
        panels: vec![Panel {
            title: String::new(),
            cells,
        }],
        value_label: "mean KL (nats, log colour scale)".into(),
    }
}
