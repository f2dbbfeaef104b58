//! Stored weight formats: what a quantization algorithm produces and a layer multiplies
//! with. Each format is one file holding its data, its forward kernels per device, its
//! dequantization, its serialization and its exact byte count; `nn::registry` maps the ids
//! written in checkpoint metadata back to each format's loader.

pub mod dense;
pub mod fourbit;
pub mod fp8;
pub mod ggml;
pub mod grouped;
pub mod half;
pub mod int8;
pub mod llm_int8;
pub mod on_device;
pub mod packed_cuda;
pub mod tensor_core;

/// Largest |a − b| over two tensors of one shape, as f32 (the formats' tests compare
/// their products with it).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| {
            d.abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()
        })
        .expect("max |a - b| of two tensors of one shape")
}

use crate::load::{NamedTensor, RawTensor, TensorSource};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
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
    /// Whether `forward` takes activations of `dtype` as they are; others are converted
    /// to f32 first (and the output back to the input's dtype) by the layer.
    fn native_input(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }
    /// The same weight computing in `dtype` on its device, where the format has a choice
    /// (a device copy dequantized to bf16 instead of f32); `None` when it has none.
    fn with_compute_dtype(&self, _dtype: DType) -> Result<Option<Arc<dyn WeightFormat>>> {
        Ok(None)
    }
    /// How `forward` quantizes its input activations before the integer product, so a
    /// device without this format's kernel can emulate it ([`on_device::Dequantized`]).
    /// A format that does not say cannot be emulated (an error, never a wrong number).
    fn input_quant(&self) -> InputQuant {
        InputQuant::Unknown
    }
    /// Parameters needed to read the tensors back (scheme, block size...), as JSON.
    fn meta(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The tensors this weight serializes to, named `<prefix>.<part>`.
    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>>;
    /// Bytes of those tensors, by arithmetic (equal to what [`Self::tensors`] writes).
    fn stored_bytes(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
    /// This weight's output rows followed by those of `rest`, as one weight whose
    /// `forward` gives every output element exactly the number the part holding that row
    /// gives (rows are independent): the forward engine multiplies q/k/v, and gate/up, in
    /// one product. `None` (the default) where the parts do not all share this format and
    /// its parameters, or the format does not concatenate. The result is for the forward
    /// pass only: what is saved and reported stays the separate layers.
    fn concat_rows(&self, _rest: &[&dyn WeightFormat]) -> Option<Arc<dyn WeightFormat>> {
        None
    }
    /// The packed codes on a GPU for the fused decode GEMV, where this weight keeps them
    /// (`on_device::Dequantized`), so a model can stack layers that read the same input.
    fn packed_gemv(&self) -> Option<Arc<packed_cuda::PackedWeight>> {
        None
    }
}

/// `first` and `rest` as the concrete format `F`, all with the same input width, for
/// [`WeightFormat::concat_rows`]; `None` if one is another format or width.
pub fn same_format<'a, F: 'static>(
    first: &'a F,
    rest: &[&'a dyn WeightFormat],
    in_features: usize,
) -> Option<Vec<&'a F>> {
    let mut out = vec![first];
    for w in rest {
        if w.shape().1 != in_features {
            return None;
        }
        out.push(w.as_any().downcast_ref::<F>()?);
    }
    Some(out)
}

/// A format's activation quantization, as a device emulating it must reproduce it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputQuant {
    /// Weight-only: activations multiply as they are.
    None,
    /// u8 codes from each call's own min/max over the whole input (PyTorch's dynamic).
    U8PerTensor,
    /// u8 codes with a calibrated (scale, zero point).
    U8Fixed { scale: f32, zero_point: i32 },
    /// Symmetric int8 codes per row (token): `round(x · (1/absmax) · 127)` clamped to ±127,
    /// scale `absmax / 127` (bitsandbytes' vector-wise quantization).
    I8PerRow,
    /// FP8 E4M3 per row (token) with scale `amax / 448` (vLLM's dynamic W8A8-FP8).
    Fp8PerRow,
    /// Not described: the format has no emulation on other devices.
    Unknown,
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

/// A format whose kernels are CPU-only: itself on the CPU; on another device, emulated
/// there by a dequantized f32 copy ([`on_device::Dequantized`]; the layer may switch it to
/// bf16/f16 with [`WeightFormat::with_compute_dtype`]).
pub fn keep_on_cpu<F: WeightFormat + Clone + 'static>(
    f: &F,
    label: &str,
    device: &Device,
) -> Result<Arc<dyn WeightFormat>> {
    if device.is_cpu() {
        return Ok(Arc::new(f.clone()));
    }
    let host: Arc<dyn WeightFormat> = Arc::new(f.clone());
    let d = on_device::Dequantized::wrap(host, device, DType::F32)
        .map_err(|e| anyhow::anyhow!("{label} on {device:?}: {e:#}"))?;
    Ok(Arc::new(d))
}

/// A JSON field of a format's metadata, or an error naming the layer.
pub fn meta_str<'m>(meta: &'m serde_json::Value, key: &str, layer: &str) -> Result<&'m str> {
    meta.get(key).and_then(|v| v.as_str()).ok_or_else(|| {
        anyhow::anyhow!("layer {layer}: format metadata lacks '{key}' (the checkpoint is corrupt)")
    })
}
