//! Stored weight formats: what a quantization algorithm produces and a layer multiplies
//! with. Each format is one file holding its data, its forward kernels per device, its
//! dequantization, its serialization and its exact byte count; `nn::registry` maps the ids
//! written in checkpoint metadata back to each format's loader.

pub mod dense;
pub mod fourbit;
pub mod ggml;
pub mod grouped;
pub mod half;
pub mod int8;
pub mod llm_int8;

use crate::load::{NamedTensor, RawTensor, TensorSource};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

/// A `[out, in]` weight matrix in some stored form.
pub trait WeightFormat: Debug + Send + Sync {
    /// The id written to checkpoints (`f32`, `int8`, `intn`, `fourbit`, ...): the registry
    /// key of this format's loader.
    fn id(&self) -> &'static str;
    /// Short dtype label for tables (`fp32`, `qint8`, `int4`, `nf4`, `q4_0`).
    fn label(&self) -> String;
    /// What `inspect` prints: the label with its parameters (`int4 sym g64`).
    fn describe(&self) -> String {
        self.label()
    }
    /// `(out, in)`.
    fn shape(&self) -> (usize, usize);
    /// The device the stored data lives on.
    fn device(&self) -> Device;
    /// `x [m, in] · Wᵀ (+ bias)` → `[m, out]`, f32, on `x`'s device.
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;
    /// The weight as f32 `[out, in]`, exactly the values `forward` multiplies with.
    fn dequantize(&self) -> Result<Tensor>;
    /// Whether `forward` is, by definition, `x · dequantize()ᵀ`, so a layer may cache the
    /// dequantized matrix and multiply with it instead (same numbers, more memory).
    fn forward_is_dequantized_matmul(&self) -> bool {
        false
    }
    /// The same weight with its data on `device`; a clear error naming the format where
    /// this build has no kernel for it there.
    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>>;
    /// Parameters needed to read the tensors back (scheme, block size...), as JSON.
    fn meta(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The tensors this weight serializes to, named `<prefix>.<part>`.
    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>>;
    /// Bytes of those tensors, by arithmetic (equal to what [`Self::tensors`] writes).
    fn stored_bytes(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
}

/// Reads the tensors a format wrote; errors name the layer and the part.
pub struct StoredParts<'a> {
    pub layer: &'a str,
    src: &'a mut dyn TensorSource,
}

impl<'a> StoredParts<'a> {
    pub fn new(layer: &'a str, src: &'a mut dyn TensorSource) -> Self {
        StoredParts { layer, src }
    }

    pub fn has(&self, part: &str) -> bool {
        self.src.has(&format!("{}.{part}", self.layer))
    }

    pub fn get(&mut self, part: &str) -> Result<RawTensor> {
        self.src.raw(&format!("{}.{part}", self.layer))
    }

    pub fn what(&self, part: &str) -> String {
        format!("tensor '{}.{part}' in {}", self.layer, self.src.origin())
    }

    pub fn f32(&mut self, part: &str, numel: usize) -> Result<Vec<f32>> {
        let what = self.what(part);
        self.get(part)?.to_f32(&what, numel)
    }
}

/// `<prefix>.<part>` as a stored tensor.
pub fn named(prefix: &str, part: &str, tensor: RawTensor) -> NamedTensor {
    NamedTensor {
        name: format!("{prefix}.{part}"),
        tensor,
    }
}

/// The error for a format this build cannot run on a device.
pub fn cpu_only(label: &str, device: &Device) -> Result<Arc<dyn WeightFormat>> {
    bail!(
        "{label} runs on cpu only in this build (asked for {device:?}): use a dense or GGML format on this device, or --device cpu"
    )
}

/// A CPU-only format staying where it is: itself on the CPU, [`cpu_only`]'s error elsewhere.
pub fn keep_on_cpu<F: WeightFormat + Clone + 'static>(
    f: &F,
    label: &str,
    device: &Device,
) -> Result<Arc<dyn WeightFormat>> {
    if !device.is_cpu() {
        return cpu_only(label, device);
    }
    Ok(Arc::new(f.clone()))
}

/// A JSON field of a format's metadata, or an error naming the layer.
pub fn meta_str<'m>(meta: &'m serde_json::Value, key: &str, layer: &str) -> Result<&'m str> {
    meta.get(key).and_then(|v| v.as_str()).ok_or_else(|| {
        anyhow::anyhow!("layer {layer}: format metadata lacks '{key}' (the checkpoint is corrupt)")
    })
}
