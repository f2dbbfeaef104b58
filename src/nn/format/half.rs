//! f16 / bf16 weights (PyTorch's dynamic fp16): stored in half precision, multiplied in
//! f32 — decoded row by row for a few activation rows, as a whole matrix otherwise.

use super::{meta_str, named, StoredParts, WeightFormat};
use crate::load::{NamedTensor, RawTensor};
use crate::nn::rows::{self, forward_rows_or_matmul, RowSource};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Device, Tensor};
use std::any::Any;
use std::sync::Arc;

pub const ID: &str = "half";

#[derive(Debug, Clone)]
pub struct Half {
    /// `[out, in]` in F16 or BF16.
    pub weight: Tensor,
}

impl Half {
    pub fn new(weight: &Tensor, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F16 | DType::BF16) {
            bail!("half weights are f16 or bf16, not {dtype:?}");
        }
        Ok(Half {
            weight: weight.to_dtype(dtype)?,
        })
    }

    fn dtype_name(&self) -> &'static str {
        if self.weight.dtype() == DType::F16 {
            "f16"
        } else {
            "bf16"
        }
    }

    pub fn load(
        shape: (usize, usize),
        meta: &serde_json::Value,
        parts: &mut StoredParts,
        device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let (dtype, st) = match meta_str(meta, "dtype", parts.layer)? {
            "f16" => (DType::F16, safetensors::Dtype::F16),
            "bf16" => (DType::BF16, safetensors::Dtype::BF16),
            other => bail!("layer {}: unknown half dtype '{other}'", parts.layer),
        };
        let what = parts.what("weight");
        let bytes = parts
            .get("weight")?
            .to_bytes(&what, st, shape.0 * shape.1)?;
        let w = Tensor::from_raw_buffer(&bytes, dtype, &[shape.0, shape.1], device)?;
        crate::load::checked_f32(&what, "the checkpoint", w.clone())?;
        Ok(Arc::new(Half { weight: w }))
    }
}

impl WeightFormat for Half {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        if self.weight.dtype() == DType::F16 {
            "fp16".into()
        } else {
            "bf16".into()
        }
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    fn device(&self) -> Device {
        self.weight.device().clone()
    }

    /// Off the CPU, activations already in the weight's dtype multiply directly (bf16
    /// cuBLAS, as transformers runs a bf16 model).
    fn native_input(&self, dtype: DType) -> bool {
        dtype == DType::F32 || (!self.weight.device().is_cpu() && dtype == self.weight.dtype())
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if x.dtype() == self.weight.dtype() && !x.device().is_cpu() {
            let y = x.matmul(&self.weight.t()?)?;
            return Ok(match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                None => y,
            });
        }
        let (o, i) = self.shape();
        forward_rows_or_matmul(
            x,
            bias,
            (o, i),
            |f| {
                rows::with_cpu_slice(
                    &self.weight,
                    o * i,
                    CpuStorage::as_slice::<half::f16>,
                    |w| f(&RowSource::Half(w)),
                )
            },
            || self.dequantize(),
        )
    }

    fn dequantize(&self) -> Result<Tensor> {
        let (o, i) = self.shape();
        let decoded = rows::with_cpu_slice(
            &self.weight,
            o * i,
            CpuStorage::as_slice::<half::f16>,
            |w| RowSource::Half(w).decode_all(o, i),
        );
        match decoded {
            Some(v) => Ok(Tensor::from_vec(v, (o, i), &self.weight.device().clone())?),
            None => Ok(self.weight.to_dtype(DType::F32)?),
        }
    }

    fn forward_is_dequantized_matmul(&self) -> bool {
        true
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        Ok(Arc::new(Half {
            weight: self.weight.to_device(device)?,
        }))
    }

    fn meta(&self) -> serde_json::Value {
        serde_json::json!({ "dtype": self.dtype_name() })
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        let flat = self.weight.flatten_all()?;
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match self.weight.dtype() {
            DType::F16 => (
                safetensors::Dtype::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            _ => (
                safetensors::Dtype::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        };
        let (o, i) = self.shape();
        Ok(vec![named(
            prefix,
            "weight",
            RawTensor::new(dtype, vec![o, i], bytes),
        )])
    }

    fn stored_bytes(&self) -> usize {
        self.weight.elem_count() * 2
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
