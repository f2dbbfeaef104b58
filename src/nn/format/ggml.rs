//! GGML block types (llama.cpp's Q8_0, Q4_0, Q4_K...): kept as candle's quantized tensor
//! (what is stored and what other devices use). On the CPU, Q8_0, Q4_0 and Q4_1 are also
//! repacked once into quantlab's own kernel layout and multiplied by
//! `kernels::ggml_blocks` (AVX-512 VNNI / AVX2 / portable); every other type and device
//! goes through candle's `QMatMul` (activations quantized to Q8 blocks on the fly).
//! `QUANTLAB_GGML_KERNEL=candle` sends every type through candle's `QMatMul` (to compare).

use super::{meta_str, named, StoredParts, WeightFormat};
use crate::load::{NamedTensor, RawTensor};
use crate::nn::kernels::ggml_blocks::{self, BlockKind, Packed};
use crate::nn::kernels::Isa;
use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::any::Any;
use std::sync::Arc;

pub const ID: &str = "ggml";

/// The GGML types a plan can name, with their llama.cpp spelling.
pub const GGML_TYPES: [(&str, GgmlDType); 11] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
    ("q8_k", GgmlDType::Q8K),
];

/// llama.cpp's name of a GGML type (`q4_k`), also for the float types.
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q8_1 => "q8_1",
        other => GGML_TYPES
            .iter()
            .find(|(_, d)| *d == other)
            .map(|(n, _)| *n)
            .unwrap_or("?"),
    }
}

/// The GGML type named `name` (`q4_k`, `Q4K`, `Q4_K`).
pub fn parse_ggml_type(name: &str) -> Option<GgmlDType> {
    let lower = name
        .to_ascii_lowercase()
        .replace("k", "_k")
        .replace("__", "_");
    GGML_TYPES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, t)| *t)
}

#[derive(Debug, Clone)]
pub struct Ggml {
    pub q: Arc<QTensor>,
    /// Built once: candle's matmul over the quantized tensor.
    matmul: QMatMul,
    /// Built once for Q8_0/Q4_0/Q4_1 on the CPU: the blocks in the layout of the selected
    /// kernel path (`ggml_blocks::Packed`).
    packed: Option<Arc<Packed>>,
}

/// Environment switch: `QUANTLAB_GGML_KERNEL=candle` keeps candle's `QMatMul` for every type.
pub const KERNEL_ENV: &str = "QUANTLAB_GGML_KERNEL";

/// Whether quantlab's own block kernels are on (`QUANTLAB_GGML_KERNEL` unset or `quantlab`).
pub fn own_kernels() -> bool {
    !matches!(std::env::var(KERNEL_ENV).as_deref(), Ok(v) if v.eq_ignore_ascii_case("candle"))
}

fn block_kind(t: GgmlDType) -> Option<BlockKind> {
    match t {
        GgmlDType::Q8_0 => Some(BlockKind::Q8_0),
        GgmlDType::Q4_0 => Some(BlockKind::Q4_0),
        GgmlDType::Q4_1 => Some(BlockKind::Q4_1),
        _ => None,
    }
}

impl Ggml {
    pub fn new(q: QTensor) -> Result<Self> {
        let packed = match block_kind(q.dtype()) {
            Some(kind) if q.device().is_cpu() && own_kernels() => {
                let (n, k) = q.shape().dims2()?;
                Some(Arc::new(Packed::from_ggml(
                    Isa::selected(),
                    kind,
                    &q.data()?,
                    n,
                    k,
                )?))
            }
            _ => None,
        };
        let q = Arc::new(q);
        Ok(Ggml {
            matmul: QMatMul::from_arc(q.clone())?,
            q,
            packed,
        })
    }

    /// The kernel this layer runs: `quantlab` (own block kernels) or `candle`.
    pub fn kernel(&self) -> &'static str {
        if self.packed.is_some() {
            "quantlab"
        } else {
            "candle"
        }
    }

    /// `x · Wᵀ` through `ggml_blocks` (f32 input on the CPU with the packed weight).
    fn forward_packed(&self, w: &Packed, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            bail!("ggml forward: a scalar input");
        };
        if k != w.k() {
            bail!("ggml forward: input has {k} features, the weight {}", w.k());
        }
        let m: usize = lead.iter().product();
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let y = ggml_blocks::matmul(w, &xs, m);
        let mut shape = lead.to_vec();
        shape.push(w.n());
        Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
    }

    /// Quantizes an f32 `[out, in]` weight; the input width must tile the type's block.
    pub fn quantize(w: &Tensor, t: GgmlDType, layer: &str) -> Result<Self> {
        let (_, in_features) = w.dims2()?;
        let block = t.block_size();
        if !in_features.is_multiple_of(block) {
            bail!(
                "layer {layer} cannot use {}: its {in_features} input features are not a multiple of the {block}-element block",
                ggml_name(t)
            );
        }
        Self::new(QTensor::quantize(w, t)?)
    }

    pub fn load(
        shape: (usize, usize),
        meta: &serde_json::Value,
        parts: &mut StoredParts,
        device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let name = meta_str(meta, "type", parts.layer)?;
        let t = parse_ggml_type(name)
            .ok_or_else(|| anyhow::anyhow!("layer {}: unknown GGML type '{name}'", parts.layer))?;
        if !shape.1.is_multiple_of(t.block_size()) {
            bail!(
                "layer {}: {name} needs a multiple of {} input features",
                parts.layer,
                t.block_size()
            );
        }
        let expect = shape.0 * shape.1 / t.block_size() * t.type_size();
        let what = parts.what("weight_ggml");
        let bytes = parts
            .get("weight_ggml")?
            .to_bytes(&what, safetensors::Dtype::U8, expect)?;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            t,
            &bytes,
            vec![shape.0, shape.1],
            device,
        )?;
        Ok(Arc::new(Ggml::new(q)?))
    }
}

impl WeightFormat for Ggml {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        ggml_name(self.q.dtype()).into()
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.q.shape().dims();
        (d[0], d[1])
    }

    fn device(&self) -> Device {
        self.q.device()
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = match &self.packed {
            Some(w) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                self.forward_packed(w, x)?
            }
            _ => self.matmul.forward(x)?,
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn dequantize(&self) -> Result<Tensor> {
        Ok(self.q.dequantize(&self.q.device())?)
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        if device.same_device(&self.q.device()) {
            return Ok(Arc::new(self.clone()));
        }
        let data = self.q.data()?;
        let (o, i) = self.shape();
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.q.dtype(),
            &data,
            vec![o, i],
            device,
        )?;
        Ok(Arc::new(Ggml::new(q)?))
    }

    fn meta(&self) -> serde_json::Value {
        serde_json::json!({ "type": ggml_name(self.q.dtype()) })
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        Ok(vec![named(
            prefix,
            "weight_ggml",
            RawTensor::u8s(self.q.data()?.into_owned()),
        )])
    }

    fn stored_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// The parts' blocks stacked, for parts of one GGML type on the CPU (a row is a whole
    /// number of blocks, so rows concatenate as bytes).
    fn concat_rows(&self, rest: &[&dyn WeightFormat]) -> Option<Arc<dyn WeightFormat>> {
        let (_, i) = self.shape();
        let parts = super::same_format(self, rest, i)?;
        let t = self.q.dtype();
        if parts
            .iter()
            .any(|p| p.q.dtype() != t || !p.q.device().is_cpu())
        {
            return None;
        }
        let mut bytes = Vec::new();
        for p in &parts {
            bytes.extend_from_slice(&p.q.data().ok()?);
        }
        let o = parts.iter().map(|p| p.shape().0).sum();
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            t,
            &bytes,
            vec![o, i],
            &Device::Cpu,
        )
        .ok()?;
        Some(Arc::new(Ggml::new(q).ok()?))
    }
}
