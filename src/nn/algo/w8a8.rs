//! `w8a8:token` and `w8a8:tensor[:observer]`: int8 weights per output channel (symmetric,
//! `absmax / 127`) with int8 activations, the two baselines SmoothQuant is compared with:
//! activations quantized per token (row) at run time, or with one static per-tensor scale
//! from calibration (symmetric: `absmax / 127` of the calibrated range, zero point 0).
//! Both multiply on the int8 kernels (`nn::kernels::int8`).

use super::{Algorithm, LayerInput};
use crate::nn::calib::Statistic;
use crate::nn::format::int8::{symmetric_scale, ActQuant, Int8, SYMMETRIC_ZERO_POINT};
use crate::nn::format::WeightFormat;
use crate::quant::ObserverKind;
use anyhow::{bail, Context, Result};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum W8A8 {
    /// Per-token activation scales, computed per call.
    Token,
    /// One activation scale per layer, from the calibrated input range.
    Tensor(ObserverKind),
}

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix("w8a8")?;
    Some((|| {
        let a = match rest {
            ":token" => W8A8::Token,
            ":tensor" => W8A8::Tensor(ObserverKind::MinMax),
            r => match r.strip_prefix(":tensor:") {
                Some(o) => W8A8::Tensor(o.parse()?),
                None => bail!("unknown method '{s}': use w8a8:token or w8a8:tensor[:observer]"),
            },
        };
        Ok(Arc::new(a) as Arc<dyn Algorithm>)
    })())
}

/// The static symmetric activation (scale, zero point) of a calibrated range: the larger
/// magnitude over 127, codes offset by 128 on the u8 kernels (int8 range [-128, 127]).
pub fn static_symmetric(layer: &str, range: Option<(f32, f32)>) -> Result<(f32, i32)> {
    let (lo, hi) = range.with_context(|| {
        format!("layer {layer}: w8a8:tensor needs calibration data first (no observer ran)")
    })?;
    Ok((symmetric_scale(hi.max(-lo)), SYMMETRIC_ZERO_POINT))
}

impl Algorithm for W8A8 {
    fn spec(&self) -> String {
        match self {
            W8A8::Token => "w8a8:token".into(),
            W8A8::Tensor(ObserverKind::MinMax) => "w8a8:tensor".into(),
            W8A8::Tensor(o) => format!("w8a8:tensor:{o}"),
        }
    }

    fn label(&self) -> String {
        "w8a8".into()
    }

    fn nominal_bits(&self) -> u32 {
        8
    }

    fn needs(&self) -> Vec<Statistic> {
        match self {
            W8A8::Token => vec![],
            W8A8::Tensor(o) => vec![Statistic::InputRange(*o)],
        }
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let act = match self {
            W8A8::Token => ActQuant::PerToken,
            W8A8::Tensor(_) => {
                let range = layer.calibration.and_then(|c| c.input_range);
                let (scale, zero_point) = static_symmetric(layer.name, range)?;
                ActQuant::Static { scale, zero_point }
            }
        };
        Ok(Arc::new(Int8::quantize_absmax(&layer.weight_f32()?, act)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_bad_ones_are_errors() {
        for s in ["w8a8:token", "w8a8:tensor", "w8a8:tensor:percentile:99.9"] {
            let a = parse(s).unwrap().unwrap();
            assert_eq!(a.spec(), s);
        }
        assert!(parse("w8a8").unwrap().is_err());
        assert!(parse("w8a8:row").unwrap().is_err());
        assert!(parse("w8a8:tensor:nope").unwrap().is_err());
        assert!(parse("w:i8:sym:ch0").is_none());
        assert_eq!(parse("w8a8:token").unwrap().unwrap().needs(), vec![]);
    }

    #[test]
    fn static_scale_is_the_larger_magnitude_over_127() {
        assert_eq!(
            static_symmetric("l", Some((-2.54, 1.0))).unwrap(),
            (2.54 / 127.0, 128)
        );
        assert!(static_symmetric("l", None)
            .unwrap_err()
            .to_string()
            .contains("calibration"));
    }
}
