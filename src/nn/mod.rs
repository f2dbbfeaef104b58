//! The quantized linear layer and what configures it: stored weight formats (`format/`),
//! the algorithms that produce them (`algo/`), the registry that names both, calibration
//! statistics, per-layer plans, and the integer kernels.

pub mod algo;
pub mod calib;
pub mod checkpoint;
pub mod cuda;
pub mod cuda_lt;
pub mod format;
pub mod kernels;
pub mod method;
pub mod plan;
pub mod qlinear;
pub mod registry;
pub mod rows;
pub mod scaling;

pub use method::Method;
pub use plan::Plan;
pub use qlinear::QLinear;

use anyhow::{Context, Result};
use candle_core::Tensor;

/// A model whose linear layers a plan can reach.
pub trait HasLinears {
    fn linears(&self) -> Vec<&QLinear>;
    fn linears_mut(&mut self) -> Vec<&mut QLinear>;
    /// Groups of layers that read the output of one normalization (e.g. `input_layernorm`
    /// → q, k, v): the unit activation-aware methods (AWQ, SmoothQuant) scale together.
    /// Empty for models that do not declare them (the post-norm Marian, the MLP).
    fn norm_groups(&self) -> Vec<NormGroup> {
        Vec::new()
    }
    /// Every group a per-input-channel scale can be folded into, in model order: the norm
    /// groups, plus groups fed by a linear layer's output rows where the model declares them
    /// (Llama: up_proj → down_proj; v_proj → o_proj without GQA).
    fn scale_groups(&self) -> Vec<scaling::ScaleGroup> {
        self.norm_groups()
            .into_iter()
            .map(|g| scaling::ScaleGroup {
                input: scaling::ScaleSite::Norm(g.norm),
                linears: g.linears,
            })
            .collect()
    }
    /// Mutable access to one of [`Self::scale_groups`], for folding scales into it.
    fn scale_group_mut(&mut self, group: &scaling::ScaleGroup) -> Result<scaling::GroupMut<'_>> {
        anyhow::bail!(
            "this model cannot fold scales into group {}",
            group.describe()
        )
    }
}

/// A normalization and the projections that read its output.
#[derive(Debug, Clone, PartialEq)]
pub struct NormGroup {
    /// The norm's tensor name (`model.layers.0.input_layernorm`).
    pub norm: String,
    /// Names of the linear layers fed by it.
    pub linears: Vec<String>,
}

/// What a plan did to one layer.
#[derive(Debug, Clone)]
pub struct LayerSummary {
    pub name: String,
    pub method: Method,
    /// The stored format's id and description (`intn`, `i4:sym:g64`).
    pub format: &'static str,
    pub describe: String,
    pub params: usize,
    pub bytes: usize,
    /// Weights that sat exactly on a rounding tie when quantized, where the format
    /// records it (metadata `ties` of the grouped int-N format).
    pub ties: Option<usize>,
}

impl LayerSummary {
    pub fn of(l: &QLinear) -> Self {
        LayerSummary {
            name: l.name.clone(),
            method: l.method.clone(),
            format: l.weight.id(),
            describe: l.weight.describe(),
            params: l.num_params(),
            bytes: l.stored_bytes(),
            ties: l
                .weight
                .meta()
                .get("ties")
                .and_then(|t| t.as_u64())
                .map(|t| t as usize),
        }
    }

    /// Stored bits per weight, scales and zero points included.
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// Bits per weight over the layers not held in f32; 32 when every layer is.
pub fn quantized_bits_per_weight(layers: &[LayerSummary]) -> f64 {
    let q: Vec<&LayerSummary> = layers
        .iter()
        .filter(|l| l.format != format::dense::ID)
        .collect();
    if q.is_empty() {
        return 32.0;
    }
    let p: usize = q.iter().map(|l| l.params).sum();
    let b: usize = q.iter().map(|l| l.bytes).sum();
    b as f64 * 8.0 / p.max(1) as f64
}

/// Prints a warning for each plan rule that matches no layer of `model`; refuses a plan
/// that matches none ([`Plan::check_layers`]).
fn warn_unmatched_rules<M: HasLinears>(model: &M, plan: &Plan) -> Result<()> {
    let linears = model.linears();
    for w in plan.check_layers(linears.iter().map(|l| l.name.as_str()))? {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// Applies a plan. Layers whose algorithm needs statistics of its inputs start gathering
/// them, `calibrate` pushes calibration data through the model once (each layer keeps only
/// its own running statistics), then every layer is converted.
///
/// Plans with activation-aware scaling (SmoothQuant, AWQ) fold their scales into the f32
/// model between calibration and conversion ([`scaling::fold_groups`]); layers whose
/// statistics cannot follow the scaling (a per-tensor input range) are calibrated again.
pub fn apply_plan<M: HasLinears>(
    model: &mut M,
    plan: &Plan,
    mut calibrate: impl FnMut(&M) -> Result<()>,
) -> Result<Vec<LayerSummary>> {
    warn_unmatched_rules(model, plan)?;
    let mut needs_calibration = false;
    for l in model.linears() {
        let needs = plan.method_for(&l.name).algorithm().needs();
        if !needs.is_empty() {
            l.start_calibration(&needs);
            needs_calibration = true;
        }
    }
    if needs_calibration {
        calibrate(model)?;
    }
    let mut stats = std::collections::HashMap::new();
    for l in model.linears() {
        if let Some(c) = l.take_calibration()? {
            stats.insert(l.name.clone(), c);
        }
    }
    if scaling::plan_scales(plan) {
        let again = scaling::fold_groups(model, plan, &mut stats)?;
        if !again.is_empty() {
            for l in model
                .linears()
                .into_iter()
                .filter(|l| again.contains(&l.name))
            {
                l.start_calibration(&plan.method_for(&l.name).algorithm().needs());
            }
            calibrate(model)?;
            for l in model.linears() {
                if let Some(c) = l.take_calibration()? {
                    stats.insert(l.name.clone(), c);
                }
            }
        }
    }
    let mut out = Vec::new();
    for l in model.linears_mut() {
        let m = plan.method_for(&l.name);
        l.convert(&m, stats.get(&l.name))?;
        out.push(LayerSummary::of(l));
    }
    Ok(out)
}

/// Receives a model's calibration stages (see [`CalibrateInStages`]): the model feeds the
/// inputs of a group of layers, then asks for them to be converted before it computes what
/// follows them with the converted weights.
pub trait StageSink {
    /// Whether `layer`'s algorithm needs statistics of its inputs (a model may skip a stage
    /// no layer needs, such as the output layer's).
    fn wants(&self, layer: &QLinear) -> bool;
    /// One batch `[rows, in]` of the inputs all of `layers` read (observed once for them).
    fn observe(&mut self, layers: &[&QLinear], x: &Tensor) -> Result<()>;
    /// Converts `layers` with the plan, from the statistics observed for them.
    fn convert(&mut self, layers: &mut [&mut QLinear]) -> Result<()>;
}

/// A model that can calibrate stage by stage (GPTQ's `true_sequential`): each group of
/// layers sees inputs computed by the layers before it *after* those were quantized.
/// The stage structure is the model's knowledge; [`apply_plan_in_stages`] drives it.
pub trait CalibrateInStages: HasLinears {
    /// One calibration sample in the model's own form (a window of token ids for an LLM).
    type Input;
    /// Runs every calibration input through the model stage by stage, calling `sink` to
    /// observe each stage's inputs and convert its layers. Layers it never hands to
    /// [`StageSink::convert`] are converted afterwards, without statistics.
    fn calibrate_in_stages(
        &mut self,
        inputs: &[Self::Input],
        sink: &mut dyn StageSink,
    ) -> Result<()>;
}

/// Applies a plan; when some layer's algorithm asks for sequential calibration
/// ([`Algorithm::sequential`](algo::Algorithm::sequential)), the model calibrates stage by
/// stage on `inputs`, converting each stage's layers as soon as their statistics are in
/// (all layers of a stage, whatever their method, so later stages see the quantized model).
/// Otherwise this is [`apply_plan`] with `calibrate_once`.
pub fn apply_plan_in_stages<M: CalibrateInStages>(
    model: &mut M,
    plan: &Plan,
    inputs: &[M::Input],
    calibrate_once: impl FnMut(&M) -> Result<()>,
) -> Result<Vec<LayerSummary>> {
    let sequential = model
        .linears()
        .iter()
        .any(|l| plan.method_for(&l.name).algorithm().sequential());
    if !sequential {
        return apply_plan(model, plan, calibrate_once);
    }
    warn_unmatched_rules(model, plan)?;
    if inputs.is_empty() {
        anyhow::bail!("this plan needs calibration data: pass --calibration FILE (text)");
    }
    let start = std::time::Instant::now();
    let mut sink = PlanSink {
        plan,
        collectors: Vec::new(),
        converted: std::collections::HashSet::new(),
    };
    model.calibrate_in_stages(inputs, &mut sink)?;
    let converted = sink.converted;
    let mut out = Vec::new();
    for l in model.linears_mut() {
        if !converted.contains(&l.name) {
            let m = plan.method_for(&l.name);
            if !m.algorithm().needs().is_empty() {
                anyhow::bail!(
                    "layer {}: {m} needs calibration statistics, but the model's calibration stages do not reach it",
                    l.name
                );
            }
            l.convert(&m, None)?;
        }
        out.push(LayerSummary::of(l));
    }
    eprintln!(
        "sequential calibration on {} samples: {:.1} s",
        inputs.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// The [`StageSink`] of a plan: one statistics collector per stage group (layers that read
/// the same inputs share it), conversion by the plan's rule for each layer.
struct PlanSink<'a> {
    plan: &'a Plan,
    /// (first layer's name, collector) of the groups being observed.
    collectors: Vec<(String, calib::Collector)>,
    converted: std::collections::HashSet<String>,
}

impl PlanSink<'_> {
    fn needs(&self, layers: &[&QLinear]) -> Vec<calib::Statistic> {
        let mut out = Vec::new();
        for l in layers {
            for s in self.plan.method_for(&l.name).algorithm().needs() {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out
    }
}

impl StageSink for PlanSink<'_> {
    fn wants(&self, layer: &QLinear) -> bool {
        !self
            .plan
            .method_for(&layer.name)
            .algorithm()
            .needs()
            .is_empty()
    }

    fn observe(&mut self, layers: &[&QLinear], x: &Tensor) -> Result<()> {
        let Some(first) = layers.first() else {
            return Ok(());
        };
        let needs = self.needs(layers);
        if needs.is_empty() {
            return Ok(());
        }
        let i = match self.collectors.iter().position(|(n, _)| *n == first.name) {
            Some(i) => i,
            None => {
                let c = calib::Collector::new(&needs, first.in_features);
                self.collectors.push((first.name.clone(), c));
                self.collectors.len() - 1
            }
        };
        self.collectors[i]
            .1
            .observe(x)
            .with_context(|| format!("calibrating layer {}", first.name))
    }

    fn convert(&mut self, layers: &mut [&mut QLinear]) -> Result<()> {
        let Some(first) = layers.first() else {
            return Ok(());
        };
        let calibration = match self.collectors.iter().position(|(n, _)| *n == first.name) {
            Some(i) => Some(
                self.collectors
                    .swap_remove(i)
                    .1
                    .finish()
                    .with_context(|| format!("calibrating layer {}", first.name))?,
            ),
            None => None,
        };
        for l in layers.iter_mut() {
            let m = self.plan.method_for(&l.name);
            let c = if m.algorithm().needs().is_empty() {
                None
            } else {
                calibration.as_ref()
            };
            l.convert(&m, c)?;
            self.converted.insert(l.name.clone());
        }
        Ok(())
    }
}

/// What a plan would need before any weight is read: whether some rule asks for
/// calibration statistics.
pub fn plan_needs_calibration(plan: &Plan) -> bool {
    plan.rules
        .iter()
        .any(|r| !r.method.algorithm().needs().is_empty())
}
