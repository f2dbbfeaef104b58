//! `w:<scheme>`: weight-only round-to-nearest with a uniform scheme (`w:i4:sym:g64`).

use super::{Algorithm, LayerInput};
use crate::nn::format::grouped::Grouped;
use crate::nn::format::WeightFormat;
use crate::quant::Scheme;
use anyhow::Result;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Rtn(pub Scheme);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix("w:")?;
    Some(
        rest.parse::<Scheme>()
            .map(|sc| Arc::new(Rtn(sc)) as Arc<dyn Algorithm>),
    )
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
