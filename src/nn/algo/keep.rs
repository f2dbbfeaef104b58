//! `keep`: leave the layer as loaded (f32, or a GGML type kept from a GGUF file).

use super::{Algorithm, LayerInput};
use crate::nn::format::WeightFormat;
use anyhow::Result;
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
pub struct Keep;

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    (s == "keep").then(|| Ok(Arc::new(Keep) as Arc<dyn Algorithm>))
}

impl Algorithm for Keep {
    fn spec(&self) -> String {
        "keep".into()
    }

    fn label(&self) -> String {
        "as loaded".into()
    }

    fn nominal_bits(&self) -> u32 {
        32
    }

    fn keeps_layer(&self) -> bool {
        true
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        Ok(layer.weight.clone())
    }
}
