//! `fp8[:channel|:tensor][:dyn]`: weights rounded to FP8 E4M3 with an `amax / 448` scale
//! per output channel (default) or per tensor, as torchao's float8 weight-only and vLLM's
//! FP8 checkpoints store them; `:dyn` also casts each call's activations to E4M3 per token
//! (W8A8-FP8, vLLM's dynamic scheme), emulated with f32 accumulation.

use super::{Algorithm, LayerInput};
use crate::nn::format::{fp8::Fp8, WeightFormat};
use crate::quant::fp8::Fp8Scaling;
use anyhow::{bail, Result};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fp8Method {
    pub scaling: Fp8Scaling,
    pub dynamic_activations: bool,
}

const HELP: &str = "fp8[:channel|:tensor][:dyn], e.g. fp8, fp8:tensor, fp8:dyn";

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let mut parts = s.split(':');
    if !matches!(parts.next(), Some("fp8" | "fp8_e4m3" | "e4m3")) {
        return None;
    }
    let mut m = Fp8Method {
        scaling: Fp8Scaling::PerChannel,
        dynamic_activations: false,
    };
    for p in parts {
        match p {
            "channel" | "ch" | "ch0" => m.scaling = Fp8Scaling::PerChannel,
            "tensor" => m.scaling = Fp8Scaling::PerTensor,
            "dyn" | "a8" => m.dynamic_activations = true,
            other => {
                return Some(Err(anyhow::anyhow!(
                    "unknown fp8 option '{other}' in '{s}': {HELP}"
                )))
            }
        }
    }
    Some(Ok(Arc::new(m)))
}

impl Algorithm for Fp8Method {
    fn spec(&self) -> String {
        let mut s = String::from("fp8");
        if self.scaling == Fp8Scaling::PerTensor {
            s.push_str(":tensor");
        }
        if self.dynamic_activations {
            s.push_str(":dyn");
        }
        s
    }

    fn label(&self) -> String {
        if self.dynamic_activations {
            "w8a8-fp8".into()
        } else {
            "fp8".into()
        }
    }

    fn nominal_bits(&self) -> u32 {
        8
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let w = layer.weight_f32()?;
        if w.dims().len() != 2 {
            bail!("fp8: layer {} is not a matrix", layer.name);
        }
        Ok(Arc::new(Fp8::quantize(
            &w,
            self.scaling,
            self.dynamic_activations,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use crate::nn::registry::parse_algorithm;

    #[test]
    fn spellings_round_trip_and_bad_options_are_named() {
        for s in ["fp8", "fp8:tensor", "fp8:dyn", "fp8:tensor:dyn"] {
            assert_eq!(parse_algorithm(s).unwrap().spec(), s);
        }
        assert_eq!(parse_algorithm("fp8:ch").unwrap().spec(), "fp8");
        let err = parse_algorithm("fp8:e5m2").unwrap_err().to_string();
        assert!(
            err.contains("e5m2") && err.contains("fp8[:channel"),
            "{err}"
        );
    }
}
