//! Dense f32 weights: candle's matmul on any device, and row-by-row dot products on the
//! CPU for a few activation rows (decoding), where the matmul's fixed cost dominates.

use super::{named, StoredParts, WeightFormat};
use crate::load::{raw_f32, NamedTensor};
use crate::nn::rows::{self, RowSource};
use anyhow::Result;
use candle_core::{CpuStorage, DType, Device, Tensor};
use std::any::Any;
use std::sync::Arc;

pub const ID: &str = "f32";

#[derive(Debug, Clone)]
pub struct Dense {
    /// `[out, in]` f32.
    pub weight: Tensor,
}

impl Dense {
    pub fn new(weight: Tensor) -> Result<Self> {
        Ok(Dense {
            weight: weight.to_dtype(DType::F32)?,
        })
    }

    pub fn load(
        shape: (usize, usize),
        _meta: &serde_json::Value,
        parts: &mut StoredParts,
        device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let v = parts.f32("weight", shape.0 * shape.1)?;
        crate::load::ensure_finite_values(&v, &parts.what("weight"))?;
        Ok(Arc::new(Dense::new(Tensor::from_vec(v, shape, device)?)?))
    }
}

pub use crate::nn::rows::forward_rows_or_matmul;

impl WeightFormat for Dense {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        "fp32".into()
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    fn device(&self) -> Device {
        self.weight.device().clone()
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (o, i) = self.shape();
        forward_rows_or_matmul(
            x,
            bias,
            (o, i),
            |f| {
                rows::with_cpu_slice(&self.weight, o * i, CpuStorage::as_slice::<f32>, |w| {
                    f(&RowSource::F32(w))
                })
            },
            || Ok(self.weight.clone()),
        )
    }

    fn dequantize(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }

    fn forward_is_dequantized_matmul(&self) -> bool {
        true
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        Ok(Arc::new(Dense {
            weight: self.weight.to_device(device)?,
        }))
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        Ok(vec![named(prefix, "weight", raw_f32(&self.weight)?)])
    }

    fn stored_bytes(&self) -> usize {
        self.weight.elem_count() * 4
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
