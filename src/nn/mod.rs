//! The quantized linear layer, its kernels, and the per-layer plan that configures it.

pub mod kernels;
pub mod method;
pub mod plan;
pub mod qlinear;
pub mod rows;

pub use method::Method;
pub use plan::Plan;
pub use qlinear::QLinear;

use anyhow::Result;

/// A model whose linear layers a plan can reach.
pub trait HasLinears {
    fn linears(&self) -> Vec<&QLinear>;
    fn linears_mut(&mut self) -> Vec<&mut QLinear>;
}

/// What a plan did to one layer.
#[derive(Debug, Clone)]
pub struct LayerSummary {
    pub name: String,
    pub method: Method,
    pub params: usize,
    pub bytes: usize,
}

impl LayerSummary {
    /// Stored bits per weight, scales and zero points included.
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// Bits per weight over the layers a plan quantized (those not held in f32); 32 when none
/// was.
pub fn quantized_bits_per_weight(layers: &[LayerSummary]) -> f64 {
    let q: Vec<&LayerSummary> = layers
        .iter()
        .filter(|l| !matches!(l.method, Method::F32 | Method::Keep))
        .collect();
    if q.is_empty() {
        return 32.0;
    }
    let p: usize = q.iter().map(|l| l.params).sum();
    let b: usize = q.iter().map(|l| l.bytes).sum();
    b as f64 * 8.0 / p.max(1) as f64
}

/// Applies a plan: layers whose method is static int8 are calibrated first by running
/// `calibrate` (which should push calibration batches through the model), then every
/// layer is converted.
pub fn apply_plan<M: HasLinears>(
    model: &mut M,
    plan: &Plan,
    calibrate: impl FnOnce(&M) -> Result<()>,
) -> Result<Vec<LayerSummary>> {
    let mut needs_calibration = false;
    for l in model.linears() {
        if let Method::StaticInt8(obs) = plan.method_for(&l.name) {
            l.start_calibration(obs);
            needs_calibration = true;
        }
    }
    if needs_calibration {
        calibrate(model)?;
    }
    let mut out = Vec::new();
    for l in model.linears_mut() {
        let m = plan.method_for(&l.name);
        l.convert(&m)?;
        out.push(LayerSummary {
            name: l.name.clone(),
            method: l.method.clone(),
            params: l.num_params(),
            bytes: l.stored_bytes()?,
        });
    }
    Ok(out)
}
