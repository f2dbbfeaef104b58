//! `w:<scheme>[:f16-scales]`: weight-only round-to-nearest with a uniform scheme
//! (`w:i4:sym:g64`); `:f16-scales` rounds the scales to f16 before the weights are rounded
//! with them and stores them as f16 (2 bytes a group).

use super::{Algorithm, LayerInput};
use crate::nn::format::grouped::Grouped;
use crate::nn::format::WeightFormat;
use crate::quant::Scheme;
use anyhow::Result;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Rtn(pub Scheme);

/// RTN with f16 group scales (`w:<scheme>:f16-scales`).
#[derive(Debug, Clone, PartialEq)]
pub struct RtnF16Scales(pub Scheme);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix("w:")?;
    let suffix = format!(":{}", crate::nn::format::grouped::F16_SCALES);
    Some(match rest.strip_suffix(suffix.as_str()) {
        Some(scheme) => scheme
            .parse::<Scheme>()
            .map(|sc| Arc::new(RtnF16Scales(sc)) as Arc<dyn Algorithm>),
        None => rest
            .parse::<Scheme>()
            .map(|sc| Arc::new(Rtn(sc)) as Arc<dyn Algorithm>),
    })
}

impl Algorithm for RtnF16Scales {
    fn spec(&self) -> String {
        format!("w:{}:{}", self.0, crate::nn::format::grouped::F16_SCALES)
    }

    fn label(&self) -> String {
        Rtn(self.0).label()
    }

    fn nominal_bits(&self) -> u32 {
        self.0.bits as u32
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        Ok(Arc::new(Grouped::quantize_f16_scales(
            &layer.weight_f32()?,
            &self.0,
            layer.name,
        )?))
    }
}

impl Algorithm for Rtn {
    fn spec(&self) -> String {
        format!("w:{}", self.0)
    }

    fn label(&self) -> String {
        format!(
            "{}{}",
            if self.0.signed { "int" } else { "uint" },
            self.0.bits
        )
    }

    fn nominal_bits(&self) -> u32 {
        self.0.bits as u32
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        Ok(Arc::new(Grouped::quantize(
            &layer.weight_f32()?,
            &self.0,
            layer.name,
        )?))
    }
}
