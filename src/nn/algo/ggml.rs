//! GGML block types by name (`q8_0`, `q4_0`, `q4_k`...), quantized by candle as llama.cpp's
//! reference quantizers do.

use super::{Algorithm, LayerInput};
use crate::nn::format::ggml::{ggml_name, parse_ggml_type, Ggml};
use crate::nn::format::WeightFormat;
use anyhow::Result;
use candle_core::quantized::GgmlDType;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GgmlAlgorithm(pub GgmlDType);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    parse_ggml_type(s).map(|t| Ok(Arc::new(GgmlAlgorithm(t)) as Arc<dyn Algorithm>))
}

impl Algorithm for GgmlAlgorithm {
    fn spec(&self) -> String {
        ggml_name(self.0).into()
    }

    fn label(&self) -> String {
        self.spec()
    }

    fn nominal_bits(&self) -> u32 {
        use GgmlDType as G;
        match self.0 {
            G::Q8_0 | G::Q8_1 | G::Q8K => 8,
            G::Q6K => 6,
            G::Q5_0 | G::Q5_1 | G::Q5K => 5,
            G::Q4_0 | G::Q4_1 | G::Q4K => 4,
            G::Q3K => 3,
            G::Q2K => 2,
            G::F16 | G::BF16 => 16,
            G::F32 => 32,
        }
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let w = layer.weight_f32()?;
        Ok(Arc::new(Ggml::quantize(&w, self.0, layer.name)?))
    }
}
