//! `rtn-signed-max:i<b>:g<size>` (or `:ch0`): round to nearest with llama.cpp's signed-max
//! scale (Q4_0's rule at any width): each group's largest-magnitude weight maps exactly to
//! the lowest code `−2^(b−1)`, so no weight sits on the rounding tie PyTorch's
//! `max|x| / 7.5` puts it on, and the code range is used asymmetrically toward the big
//! weight's side. Stored in the symmetric grouped int-N format (zero point 0; the scale
//! may be negative).

use super::{Algorithm, LayerInput};
use crate::nn::format::grouped::Grouped;
use crate::nn::format::WeightFormat;
use crate::quant::rtn_variants::{group_columns, signed_max, tie_count};
use crate::quant::{Mode, QTensor, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

pub const PREFIX: &str = "rtn-signed-max:";

#[derive(Debug, Clone, PartialEq)]
pub struct RtnSignedMax(pub Scheme);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix(PREFIX)?;
    Some(parse_scheme(rest).map(|sc| Arc::new(RtnSignedMax(sc)) as Arc<dyn Algorithm>))
}

fn parse_scheme(rest: &str) -> Result<Scheme> {
    let help = "use rtn-signed-max:i<bits>:g<size> or :ch0, e.g. rtn-signed-max:i4:g64";
    if rest.split(':').any(|p| matches!(p, "affine" | "asym")) {
        bail!("signed-max is symmetric (zero point 0): {help}");
    }
    let sc: Scheme = rest
        .parse()
        .with_context(|| format!("in '{PREFIX}{rest}': {help}"))?;
    if !sc.signed || sc.bits < 2 {
        bail!("signed-max needs signed codes of 2 to 8 bits: {help}");
    }
    super::ensure_row_grouped(&sc, "signed-max", help)?;
    Ok(sc.symmetric())
}

impl Algorithm for RtnSignedMax {
    fn spec(&self) -> String {
        let s = self.0.to_string();
        format!("{PREFIX}{}", s.replacen(":sym", "", 1))
    }

    fn label(&self) -> String {
        format!("int{}", self.0.bits)
    }

    fn nominal_bits(&self) -> u32 {
        self.0.bits as u32
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let w = layer.weight_f32()?;
        let (rows, cols) = w.dims2()?;
        let group = group_columns(self.0.granularity, cols).context("row groups")?;
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        let (codes, params) = signed_max(&v, rows, cols, self.0.bits, group)
            .with_context(|| format!("layer {}", layer.name))?;
        let ties = tie_count(
            &v,
            rows,
            cols,
            group,
            &params.scale,
            &vec![0.0; params.len()],
        );
        debug_assert_eq!(self.0.mode, Mode::Symmetric);
        let q = QTensor {
            scheme: self.0,
            codes: Tensor::from_vec(codes, (rows, cols), &Device::Cpu)?,
            params,
        };
        Ok(Arc::new(Grouped::new(q).with_ties(Some(ties))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_bad_ones_are_refused() {
        for s in ["rtn-signed-max:i4:g64", "rtn-signed-max:i3:ch0"] {
            let a = parse(s).unwrap().unwrap();
            assert_eq!(a.spec(), s);
        }
        assert_eq!(
            parse("rtn-signed-max:i4:sym:g32").unwrap().unwrap().spec(),
            "rtn-signed-max:i4:g32"
        );
        for bad in [
            "rtn-signed-max:u4:g64",
            "rtn-signed-max:i4:affine:g64",
            "rtn-signed-max:i4:tensor",
            "rtn-signed-max:i4:ch1",
            "rtn-signed-max:i4:g64:reduce",
            "rtn-signed-max:x",
        ] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
        assert!(parse("w:i4:g64").is_none());
    }
}
