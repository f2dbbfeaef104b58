//! `rtn-clip:<scheme>[:x2]` (e.g. `rtn-clip:i4:sym:g64`, `rtn-clip:u3:affine:g128:x2`):
//! round to nearest with an error-optimal clipping range per group. Each group tries the
//! PyTorch-convention parameters of its range shrunk by a factor from 1.00 down to 0.20
//! (steps of 0.01; why that grid: `quant::rtn_variants::clip_grid`) and keeps the one with
//! the least squared weight error — or, with `:x2`, the least `x²`-weighted squared error
//! as llama.cpp's `make_qx_quants` weighs it — the idea of searching the scale instead of
//! taking it from the max, on the PyTorch scheme, so at factor 1 it is `w:` RTN exactly.
//! Stored in the grouped int-N format.

use super::{Algorithm, LayerInput};
use crate::nn::format::grouped::Grouped;
use crate::nn::format::WeightFormat;
use crate::quant::rtn_variants::{clip_grid, clip_search, zero_points_f32, ClipObjective};
use crate::quant::{Convention, Granularity, Scheme};
use anyhow::{bail, Context, Result};
use std::sync::Arc;

pub const PREFIX: &str = "rtn-clip:";

#[derive(Debug, Clone, PartialEq)]
pub struct RtnClip(pub Scheme, pub ClipObjective);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix(PREFIX)?;
    let (rest, objective) = match rest.strip_suffix(":x2") {
        Some(r) => (r, ClipObjective::X2),
        None => (rest, ClipObjective::Mse),
    };
    Some(parse_scheme(rest).map(|sc| Arc::new(RtnClip(sc, objective)) as Arc<dyn Algorithm>))
}

fn parse_scheme(rest: &str) -> Result<Scheme> {
    let help =
        "use rtn-clip:<i|u><bits>:<sym|affine>:<g<size>|ch0|tensor>, e.g. rtn-clip:i4:sym:g64";
    let sc: Scheme = rest
        .parse()
        .with_context(|| format!("in '{PREFIX}{rest}': {help}"))?;
    if sc.convention != Convention::Pytorch {
        bail!("rtn-clip shrinks PyTorch-convention ranges: drop ':handout' ({help})");
    }
    if matches!(sc.granularity, Granularity::PerChannel { axis } if axis != 0) {
        bail!("rtn-clip groups along rows: {help}");
    }
    Ok(sc)
}

impl Algorithm for RtnClip {
    fn spec(&self) -> String {
        let x2 = match self.1 {
            ClipObjective::Mse => "",
            ClipObjective::X2 => ":x2",
        };
        format!("{PREFIX}{}{x2}", self.0)
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
        let w = layer.weight_f32()?;
        self.0
            .validate_for_shape(w.dims())
            .with_context(|| format!("layer {} cannot use {}", layer.name, self.0))?;
        let (rows, cols) = w.dims2()?;
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        let (params, _) = clip_search(&v, rows, cols, &self.0, &clip_grid(), self.1)
            .with_context(|| format!("layer {}", layer.name))?;
        let ties = Grouped::count_ties(&w, &params.scale, &zero_points_f32(&params), &self.0)?;
        let q = crate::quant::quantize_with(&w, &self.0, params)?;
        Ok(Arc::new(Grouped::new(q).with_ties(ties)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_bad_ones_are_refused() {
        for s in [
            "rtn-clip:i4:sym:g64",
            "rtn-clip:u3:affine:ch0",
            "rtn-clip:u2:affine:tensor",
        ] {
            assert_eq!(parse(s).unwrap().unwrap().spec(), s);
        }
        for bad in [
            "rtn-clip:i4:sym:ch1",
            "rtn-clip:i4:sym:g64:handout",
            "rtn-clip:q4",
        ] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
        assert!(parse("rtn-signed-max:i4:g64").is_none());
    }
}
