//! The quantized linear layer and what configures it: stored weight formats (`format/`),
//! the algorithms that produce them (`algo/`), the registry that names both, calibration
//! statistics, per-layer plans, and the integer kernels.

pub mod algo;
pub mod calib;
pub mod checkpoint;
pub mod format;
pub mod kernels;
pub mod method;
pub mod plan;
pub mod qlinear;
pub mod registry;
pub mod rows;

pub use method::Method;
pub use plan::Plan;
pub use qlinear::QLinear;

use anyhow::Result;

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

/// Applies a plan. Layers whose algorithm needs statistics of its inputs start gathering
/// them, `calibrate` pushes calibration data through the model once (each layer keeps only
/// its own running statistics), then every layer is converted.
pub fn apply_plan<M: HasLinears>(
    model: &mut M,
    plan: &Plan,
    calibrate: impl FnOnce(&M) -> Result<()>,
) -> Result<Vec<LayerSummary>> {
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
    let mut out = Vec::new();
    for l in model.linears_mut() {
        let m = plan.method_for(&l.name);
        let calibration = l.take_calibration()?;
        l.convert(&m, calibration.as_ref())?;
        out.push(LayerSummary::of(l));
    }
    Ok(out)
}

/// What a plan would need before any weight is read: whether some rule asks for
/// calibration statistics.
pub fn plan_needs_calibration(plan: &Plan) -> bool {
    plan.rules
        .iter()
        .any(|r| !r.method.algorithm().needs().is_empty())
}
