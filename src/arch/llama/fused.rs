//! Fused projections for the CPU forward pass: q/k/v read one normed input, and so do
//! gate/up, so each group runs as one product over a weight that stacks their output rows
//! (`WeightFormat::concat_rows`): 4 products per block instead of 7 (211 → 121 per token
//! for SmolLM2), one activation quantization for q/k/v instead of three, one split over the
//! threads instead of three.
//!
//! Rows are independent in every format that stacks, so each output element is the number
//! the separate layer gives, bit for bit. The stacked weight is built on the first forward
//! pass that can use it, after any plan has been applied, and lives only here: the separate
//! layers stay what is quantized, saved, reported and calibrated. A layer that gathers
//! statistics, or runs through a dequantized copy, runs separately; so do parts whose
//! formats or parameters differ (q int4, k int8).

use crate::nn::format::dense::StackedPanels;
use crate::nn::format::WeightFormat;
use crate::nn::QLinear;
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::sync::{Arc, Mutex, Weak};

/// Rows from which a stacked f32 product writes each part's output in place (below, one
/// product whose output is cut apart: fewer splits over the threads for a decode step).
const SPLIT_ROWS: usize = 16;

/// Environment switch: `QUANTLAB_FUSE=off` (or `0`) runs q/k/v and gate/up separately.
pub const FUSE_ENV: &str = "QUANTLAB_FUSE";

/// Whether fusion is on by default (`QUANTLAB_FUSE` unset, or anything but `off`/`0`).
pub fn fuse_by_default() -> bool {
    !matches!(
        std::env::var(FUSE_ENV).as_deref(),
        Ok("off" | "0" | "false")
    )
}

/// A stacked weight and bias, with what it was built from.
struct Entry {
    /// The parts' weights (weak: they only identify, a weak pointer keeps its address from
    /// being reused) and bias ids.
    parts: Vec<(Weak<dyn WeightFormat>, Option<candle_core::TensorId>)>,
    /// `None` when the parts do not stack.
    fused: Option<Stacked>,
}

#[derive(Clone)]
pub(super) struct Stacked {
    pub weight: Arc<dyn WeightFormat>,
    pub bias: Option<Tensor>,
    /// Output columns of each part, in order.
    pub widths: Vec<usize>,
}

impl Entry {
    fn key(layers: &[&QLinear]) -> Vec<(Weak<dyn WeightFormat>, Option<candle_core::TensorId>)> {
        layers
            .iter()
            .map(|l| (Arc::downgrade(&l.weight), l.bias.as_ref().map(Tensor::id)))
            .collect()
    }

    fn matches(&self, layers: &[&QLinear]) -> bool {
        self.parts.len() == layers.len()
            && self.parts.iter().zip(layers).all(|((w, b), l)| {
                std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(&l.weight))
                    && *b == l.bias.as_ref().map(Tensor::id)
            })
    }

    fn build(layers: &[&QLinear]) -> Self {
        Entry {
            parts: Self::key(layers),
            fused: stack(layers),
        }
    }
}

/// The layers' weights and biases stacked, where every part allows it.
fn stack(layers: &[&QLinear]) -> Option<Stacked> {
    let (first, rest) = layers.split_first()?;
    if rest.is_empty() {
        return None;
    }
    let others: Vec<&dyn WeightFormat> = rest.iter().map(|l| l.weight.as_ref()).collect();
    let weight = first.weight.concat_rows(&others)?;
    let bias = if layers.iter().all(|l| l.bias.is_none()) {
        None
    } else {
        // Stacked only when every part has one: a missing bias is not a zero one (adding
        // 0.0 turns −0.0 into +0.0).
        let bs: Option<Vec<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        Some(Tensor::cat(&bs?, 0).ok()?)
    };
    let widths: Vec<usize> = layers.iter().map(|l| l.out_features).collect();
    if weight.shape() != (widths.iter().sum(), first.in_features) {
        return None;
    }
    Some(Stacked {
        weight,
        bias,
        widths,
    })
}

/// One group's stacked weight, built on first use and rebuilt when a part changes.
#[derive(Default)]
pub(super) struct Fusion {
    slot: Mutex<Option<Entry>>,
}

impl Fusion {
    /// The stacked weight for `layers` as they are now; `None` when they must run
    /// separately.
    pub fn get(&self, layers: &[&QLinear]) -> Option<Stacked> {
        if !layers.iter().all(|l| l.forwards_through_format()) {
            return None;
        }
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|e| e.matches(layers)) {
            *slot = Some(Entry::build(layers));
        }
        slot.as_ref().and_then(|e| e.fused.clone())
    }

    /// Drops the stacked weight (its parts are about to change).
    pub fn clear(&mut self) {
        *self.slot.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// `x [t, in]` through each of `layers`, as host rows `[t, out_j]` per layer: one product
/// over the stacked weight when `fusion` gives one (and `on`), one per layer otherwise.
pub(super) fn project(
    fusion: &Fusion,
    on: bool,
    layers: &[&QLinear],
    x: &Tensor,
    t: usize,
) -> Result<Vec<Vec<f32>>> {
    let host = super::partial::host;
    let stacked = if on { fusion.get(layers) } else { None };
    let Some(s) = stacked else {
        return layers.iter().map(|l| host(&l.forward(x)?)).collect();
    };
    // Many rows (a prefill) of an f32 stack: each part's output written in place, not the
    // stacked output copied to the host and then cut apart (two copies of 8 MB per block
    // for a 512-token window). Decoding keeps one product (one split over the threads).
    if t >= SPLIT_ROWS && s.bias.is_none() {
        if let Some(sp) = s.weight.as_any().downcast_ref::<StackedPanels>() {
            let parts = crate::nn::rows::with_cpu_slice(
                x,
                x.elem_count(),
                candle_core::CpuStorage::as_slice::<f32>,
                |xs| sp.forward_split(xs, t, &s.widths),
            );
            if let Some(Some(parts)) = parts {
                return Ok(parts);
            }
        }
    }
    let y = s.weight.forward(x, s.bias.as_ref()).with_context(|| {
        let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        format!("layers {} (stacked)", names.join(" + "))
    })?;
    let y = host(&y)?;
    Ok(split_columns(&y, t, &s.widths))
}

/// Row-major `[t, Σ widths]` as one row-major `[t, w]` buffer per width.
fn split_columns(y: &[f32], t: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let mut out: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(t * w)).collect();
    for row in y.chunks_exact(total).take(t) {
        let mut at = 0;
        for (o, &w) in out.iter_mut().zip(widths) {
            o.extend_from_slice(&row[at..at + w]);
            at += w;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_columns_keeps_rows_in_order() {
        let y: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let parts = split_columns(&y, 2, &[3, 1, 2]);
        assert_eq!(parts[0], [0., 1., 2., 6., 7., 8.]);
        assert_eq!(parts[1], [3., 9.]);
        assert_eq!(parts[2], [4., 5., 10., 11.]);
    }
}
