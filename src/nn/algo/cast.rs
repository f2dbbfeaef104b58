//! `f32`, `f16`, `bf16`: the weight cast to a float type (PyTorch's dynamic fp16 stores
//! half weights and computes in f32).

use super::{Algorithm, LayerInput};
use crate::nn::format::{dense::Dense, half::Half, WeightFormat};
use anyhow::Result;
use candle_core::DType;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cast(pub DType);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let t = match s {
        "f32" | "fp32" | "none" => DType::F32,
        "f16" | "fp16" => DType::F16,
        "bf16" => DType::BF16,
        _ => return None,
    };
    Some(Ok(Arc::new(Cast(t))))
}

impl Algorithm for Cast {
    fn spec(&self) -> String {
        match self.0 {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => "f32",
        }
        .into()
    }

    fn label(&self) -> String {
        match self.0 {
            DType::F16 => "fp16",
            DType::BF16 => "bf16",
            _ => "fp32",
        }
        .into()
    }

    fn nominal_bits(&self) -> u32 {
        if self.0 == DType::F32 {
            32
        } else {
            16
        }
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let w = layer.weight_f32()?;
        Ok(match self.0 {
            DType::F32 => Arc::new(Dense::new(w)?),
            t => Arc::new(Half::new(&w, t)?),
        })
    }
}
