//! Scale migration between a layer group's producer and its consumers, the step both
//! SmoothQuant and AWQ rest on. For per-input-channel scales `s > 0`,
//! `y = (x / s) · (W · diag(s))ᵀ` equals `x · Wᵀ`: dividing the producer's output channel
//! `j` by `s_j` (a norm's weight, or a feeding linear layer's output row) and multiplying
//! column `j` of every consumer's weight by `s_j` leaves the model's function unchanged in
//! exact arithmetic (f32 rounds each product once more), while moving magnitude between
//! activations and weights before either is quantized.
//!
//! The model says which groups exist and hands out mutable access to one group
//! ([`HasLinears::scale_groups`], [`HasLinears::scale_group_mut`]); algorithms say which
//! scales to use ([`GroupScaling`]); [`fold_groups`] runs them between calibration and
//! conversion in [`super::apply_plan`].

use super::calib::{Calibration, Statistic};
use super::format::{dense::Dense, WeightFormat};
use super::{HasLinears, Plan, QLinear};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// What produces a group's input.
#[derive(Debug, Clone, PartialEq)]
pub enum ScaleSite {
    /// A normalization's weight vector, by tensor name (`model.layers.0.input_layernorm`).
    Norm(String),
    /// A linear layer whose output rows are the consumers' input channels
    /// (`mlp.up_proj` → `mlp.down_proj`, through the elementwise SiLU(gate)·up).
    Linear(String),
}

/// A producer and the linear layers that read its output (all with the same inputs).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleGroup {
    pub input: ScaleSite,
    pub linears: Vec<String>,
}

impl ScaleGroup {
    pub fn describe(&self) -> String {
        let p = match &self.input {
            ScaleSite::Norm(n) | ScaleSite::Linear(n) => n,
        };
        format!("{p} -> {}", self.linears.join(", "))
    }
}

/// Mutable access to the producer of a group's input.
pub enum Producer<'a> {
    /// A norm's weight `[in]` (a bias, where the norm has one, scales the same way).
    Norm(&'a mut Tensor),
    Linear(&'a mut QLinear),
}

/// One group's producer and consumers, borrowed from the model together.
pub struct GroupMut<'a> {
    pub producer: Producer<'a>,
    pub linears: Vec<&'a mut QLinear>,
}

/// Scales an algorithm derives for a group from its weights and input statistics.
pub trait GroupScaling: Send + Sync {
    /// Layers of one group must agree on this (the algorithm's spec without per-layer parts).
    fn key(&self) -> String;
    /// Whether groups fed by a linear layer (up → down) are scaled too (AWQ), or only the
    /// norm-fed ones (SmoothQuant).
    fn scales_linear_fed(&self) -> bool;
    /// Per-input-channel scales `> 0` for `group`: `weights` are its linears' f32 weights
    /// in order, `input` the calibration statistics of their (shared) input.
    fn scales(
        &self,
        group: &ScaleGroup,
        weights: &[Tensor],
        input: &Calibration,
    ) -> Result<Vec<f32>>;
}

/// Checks `s` against a width and that every entry is finite and positive.
fn check_scales(s: &[f32], width: usize, what: &str) -> Result<()> {
    if s.len() != width {
        bail!("{what}: {} scales for {width} input channels", s.len());
    }
    if let Some(v) = s.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
        bail!("{what}: scale {v} is not finite and positive");
    }
    Ok(())
}

/// The layer's weight as f32, refused unless it is held as plain f32: folding into an
/// already quantized weight would silently re-quantize it.
fn dense_weight(l: &QLinear) -> Result<Tensor> {
    if l.weight.id() != super::format::dense::ID {
        bail!(
            "layer {}: scale folding needs f32 weights, it holds {} (load the model as f32)",
            l.name,
            l.weight.describe()
        );
    }
    l.weight_f32()
}

fn set_dense(l: &mut QLinear, w: Tensor) -> Result<()> {
    let device = l.weight.device();
    let w: Arc<dyn WeightFormat> = Arc::new(Dense::new(w)?);
    l.set_weight(w.to_device(&device)?);
    Ok(())
}

/// Folds `s` into a group: the producer's output channel `j` divided by `s[j]`, column `j`
/// of every consumer multiplied by `s[j]`.
pub fn fold(group: GroupMut, s: &[f32]) -> Result<()> {
    let GroupMut { producer, linears } = group;
    let Some(first) = linears.first() else {
        bail!("a scale group needs at least one linear layer");
    };
    let width = first.in_features;
    check_scales(s, width, &format!("scaling into {}", first.name))?;
    // Validate everything before changing anything.
    for l in &linears {
        if l.in_features != width {
            bail!(
                "layer {} reads {} channels, the group {width}",
                l.name,
                l.in_features
            );
        }
        dense_weight(l)?;
    }
    match producer {
        Producer::Norm(w) => {
            if w.dims() != [width] {
                bail!("norm of shape {:?} feeds {width} channels", w.dims());
            }
            let inv = Tensor::from_iter(s.iter().map(|v| 1.0 / v), w.device())?;
            *w = w.mul(&inv.to_dtype(w.dtype())?)?;
        }
        Producer::Linear(p) => {
            if p.out_features != width {
                bail!(
                    "layer {} has {} outputs, its consumers read {width}",
                    p.name,
                    p.out_features
                );
            }
            let w = dense_weight(p)?;
            let col = Tensor::from_slice(s, (width, 1), w.device())?;
            let w = w.broadcast_div(&col)?;
            if let Some(b) = &mut p.bias {
                *b = b.div(&Tensor::from_slice(s, width, b.device())?)?;
            }
            set_dense(p, w)?;
        }
    }
    for l in linears {
        let w = dense_weight(l)?;
        let row = Tensor::from_slice(s, (1, width), w.device())?;
        set_dense(l, w.broadcast_mul(&row)?)?;
    }
    Ok(())
}

/// The f32 weight of layer `name`.
fn weight_of<M: HasLinears>(model: &M, name: &str) -> Result<Tensor> {
    let l = model
        .linears()
        .into_iter()
        .find(|l| l.name == name)
        .with_context(|| format!("the model has no linear layer {name}"))?;
    dense_weight(l)
}

/// Scales and folds every group whose layers all use one [`GroupScaling`] in `plan`, in
/// the model's order, and rescales those layers' statistics to their new inputs. Groups no
/// layer of which scales are left alone; a group only some of whose layers scale is an
/// error (its shared input can only be scaled once). Returns the layers whose algorithms
/// now lack a statistic that could not be rescaled (they need another calibration pass).
pub fn fold_groups<M: HasLinears>(
    model: &mut M,
    plan: &Plan,
    stats: &mut HashMap<String, Calibration>,
) -> Result<Vec<String>> {
    let mut scaled = Vec::new();
    for g in model.scale_groups() {
        let methods: Vec<_> = g.linears.iter().map(|n| plan.method_for(n)).collect();
        let scalers: Vec<_> = methods
            .iter()
            .map(|m| m.algorithm().group_scaling())
            .collect();
        if scalers.iter().all(Option::is_none) {
            continue;
        }
        let keys: Vec<Option<String>> = scalers.iter().map(|s| s.map(|s| s.key())).collect();
        if keys.iter().any(|k| k != &keys[0]) {
            let listed: Vec<String> = g
                .linears
                .iter()
                .zip(&methods)
                .map(|(n, m)| format!("{n}={m}"))
                .collect();
            bail!(
                "the layers of group {} read one input, so activation-aware scaling needs the same scaling on all of them, got {}",
                g.describe(),
                listed.join(", ")
            );
        }
        let sc = scalers[0].expect("all scale");
        if matches!(g.input, ScaleSite::Linear(_)) && !sc.scales_linear_fed() {
            continue;
        }
        let weights = g
            .linears
            .iter()
            .map(|n| weight_of(model, n))
            .collect::<Result<Vec<_>>>()?;
        let input = stats.get(&g.linears[0]).with_context(|| {
            format!(
                "layer {}: no calibration statistics for scaling",
                g.linears[0]
            )
        })?;
        let s = sc
            .scales(&g, &weights, input)
            .with_context(|| format!("scales for group {}", g.describe()))?;
        fold(model.scale_group_mut(&g)?, &s)
            .with_context(|| format!("folding scales into group {}", g.describe()))?;
        for n in &g.linears {
            if let Some(c) = stats.get_mut(n) {
                c.rescale_inputs(&s)?;
            }
            scaled.push(n.clone());
        }
    }
    Ok(scaled
        .into_iter()
        .filter(|n| {
            let needs = plan.method_for(n).algorithm().needs();
            let c = stats.get(n);
            !needs
                .iter()
                .all(|s: &Statistic| c.is_some_and(|c| c.has(s)))
        })
        .collect())
}

/// Whether some rule of `plan` names an algorithm that scales groups.
pub fn plan_scales(plan: &Plan) -> bool {
    plan.rules
        .iter()
        .any(|r| r.method.algorithm().group_scaling().is_some())
}
