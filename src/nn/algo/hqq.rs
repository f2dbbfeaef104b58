//! `hqq:u<b>:g<size>` (or `:ch0`): HQQ, calibration-free half-quadratic optimisation of
//! each group's zero point with the min–max scale (mobiusml/hqq's defaults; the solver is
//! `quant::hqq`). Codes are unsigned `0..2^b−1` as HQQ stores them, with a real zero point
//! per group: the grouped int-N format with f32 zero points.

use super::{Algorithm, LayerInput};
use crate::nn::format::grouped::Grouped;
use crate::nn::format::WeightFormat;
use crate::quant::hqq::{self, HqqParams};
use crate::quant::rtn_variants::{group_columns, tie_count};
use crate::quant::{Mode, QParams, QTensor, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

pub const PREFIX: &str = "hqq:";

#[derive(Debug, Clone, PartialEq)]
pub struct Hqq(pub Scheme);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix(PREFIX)?;
    Some(parse_scheme(rest).map(|sc| Arc::new(Hqq(sc)) as Arc<dyn Algorithm>))
}

fn parse_scheme(rest: &str) -> Result<Scheme> {
    let help = "use hqq:u<bits>:g<size> or hqq:u<bits>:ch0, e.g. hqq:u4:g64 (HQQ stores unsigned codes with a real zero point)";
    if rest.split(':').any(|p| matches!(p, "sym" | "symmetric")) {
        bail!("HQQ is affine (it solves for the zero point): {help}");
    }
    let sc: Scheme = rest
        .parse()
        .with_context(|| format!("in '{PREFIX}{rest}': {help}"))?;
    if sc.signed {
        bail!("HQQ's codes are unsigned: {help}");
    }
    super::ensure_row_grouped(&sc, "HQQ", help)?;
    Ok(sc.affine())
}

impl Algorithm for Hqq {
    fn spec(&self) -> String {
        format!("{PREFIX}{}", self.0.to_string().replacen(":affine", "", 1))
    }

    fn label(&self) -> String {
        format!("uint{}", self.0.bits)
    }

    fn nominal_bits(&self) -> u32 {
        self.0.bits as u32
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let w = layer.weight_f32()?;
        let (rows, cols) = w.dims2()?;
        let group = group_columns(self.0.granularity, cols).context("row groups")?;
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        let h = hqq::quantize(&v, rows, cols, self.0.bits, group, &HqqParams::default())
            .with_context(|| format!("layer {}", layer.name))?;
        let ties = tie_count(&v, rows, cols, group, &h.scale, &h.zero);
        debug_assert_eq!(self.0.mode, Mode::Affine);
        let n = h.scale.len();
        let q = QTensor {
            scheme: self.0,
            codes: Tensor::from_vec(h.codes, (rows, cols), &Device::Cpu)?,
            params: QParams {
                scale: h.scale,
                zero_point: vec![0; n],
            },
        };
        Ok(Arc::new(
            Grouped::with_float_zero(q, h.zero)?.with_ties(Some(ties)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_bad_ones_are_refused() {
        for s in ["hqq:u4:g64", "hqq:u3:ch0", "hqq:u2:g128"] {
            assert_eq!(parse(s).unwrap().unwrap().spec(), s);
        }
        assert_eq!(
            parse("hqq:u4:affine:g64").unwrap().unwrap().spec(),
            "hqq:u4:g64"
        );
        for bad in [
            "hqq:i4:g64",
            "hqq:u4:sym:g64",
            "hqq:u4:tensor",
            "hqq:u4:g64:reduce",
            "hqq:4",
        ] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
    }
}
