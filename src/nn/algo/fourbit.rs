//! `nf4` / `fp4` `[:b<block>][:dq]`: bitsandbytes' 4-bit code books with block-wise absmax.

use super::{Algorithm, LayerInput};
use crate::nn::format::fourbit::FourBitWeight;
use crate::nn::format::WeightFormat;
use crate::quant::FourBitSpec;
use anyhow::Result;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct FourBitAlgorithm(pub FourBitSpec);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    FourBitSpec::parse(s)
        .transpose()
        .map(|r| r.map(|f| Arc::new(FourBitAlgorithm(f)) as Arc<dyn Algorithm>))
}

impl Algorithm for FourBitAlgorithm {
    fn spec(&self) -> String {
        let s = &self.0;
        let mut out = self.label();
        if s.blocksize != crate::quant::codebook::DEFAULT_BLOCKSIZE {
            out += &format!(":b{}", s.blocksize);
        }
        if s.double_quant {
            out += ":dq";
        }
        out
    }

    fn label(&self) -> String {
        format!("{:?}", self.0.kind).to_lowercase()
    }

    fn nominal_bits(&self) -> u32 {
        4
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let w = layer.weight_f32()?;
        let s = &self.0;
        Ok(Arc::new(FourBitWeight::quantize(
            &w,
            s.kind,
            s.blocksize,
            s.double_quant,
        )?))
    }
}
