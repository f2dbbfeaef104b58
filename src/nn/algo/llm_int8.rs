//! `llm.int8[:<threshold>]`: LLM.int8() as bitsandbytes' `Linear8bitLt` (threshold 6.0 by
//! default): int8 weights per output row, input columns holding a value with
//! `|x| ≥ threshold` multiplied in floating point, the rest in int8 per row
//! (`nn::format::llm_int8`).

use super::{Algorithm, LayerInput};
use crate::nn::format::llm_int8::{check_threshold, LlmInt8, DEFAULT_THRESHOLD};
use crate::nn::format::WeightFormat;
use anyhow::{Context, Result};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlmInt8Algorithm {
    pub threshold: f32,
}

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix("llm.int8")?;
    Some((|| {
        let threshold = match rest {
            "" => DEFAULT_THRESHOLD,
            r => {
                let t = r.strip_prefix(':').with_context(|| {
                    format!("unknown method '{s}': use llm.int8 or llm.int8:<threshold>")
                })?;
                t.parse::<f32>()
                    .with_context(|| format!("llm.int8 threshold '{t}' is not a number"))?
            }
        };
        check_threshold(threshold)?;
        Ok(Arc::new(LlmInt8Algorithm { threshold }) as Arc<dyn Algorithm>)
    })())
}

impl Algorithm for LlmInt8Algorithm {
    fn spec(&self) -> String {
        if self.threshold == DEFAULT_THRESHOLD {
            "llm.int8".into()
        } else {
            format!("llm.int8:{}", self.threshold)
        }
    }

    fn label(&self) -> String {
        "llm.int8".into()
    }

    fn nominal_bits(&self) -> u32 {
        8
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        Ok(Arc::new(LlmInt8::quantize(
            &layer.weight_f32()?,
            self.threshold,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(parse("llm.int8").unwrap().unwrap().spec(), "llm.int8");
        assert_eq!(parse("llm.int8:6").unwrap().unwrap().spec(), "llm.int8");
        assert_eq!(
            parse("llm.int8:4.5").unwrap().unwrap().spec(),
            "llm.int8:4.5"
        );
        for bad in [
            "llm.int8:",
            "llm.int8:x",
            "llm.int8:0",
            "llm.int8:-1",
            "llm.int8x",
        ] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
        assert!(parse("dynamic-int8").is_none());
    }
}
