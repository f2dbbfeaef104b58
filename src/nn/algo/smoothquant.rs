//! `sq[:<alpha>]+<inner>` (e.g. `sq:0.5+w8a8:token`): SmoothQuant. Before any layer is
//! converted, each norm → projections group gets `s_j = max|X_j|^α / max|W_j|^(1−α)`
//! (`quant::smooth`) folded into the norm and the projections' columns
//! (`nn::scaling`); then every layer is converted by the inner method, which sees the
//! smoothed weight and statistics of the smoothed inputs. Only norm-fed groups are
//! smoothed, as in mit-han-lab/smoothquant's `smooth_lm` for Llama. The inner method is any
//! other plan method (W8A8 per token or per tensor, `dynamic-int8`, `w:i8:sym:ch0`...);
//! an inner method with a per-tensor input range is calibrated again on the smoothed model.

use super::{Algorithm, LayerInput};
use crate::nn::calib::{Calibration, Statistic};
use crate::nn::format::WeightFormat;
use crate::nn::scaling::{GroupScaling, ScaleGroup};
use crate::quant::smooth;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// SmoothQuant's default migration strength.
pub const DEFAULT_ALPHA: f64 = 0.5;

#[derive(Debug, Clone)]
pub struct SmoothQuant {
    pub alpha: f64,
    pub inner: Arc<dyn Algorithm>,
}

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s
        .strip_prefix("smoothquant")
        .or_else(|| s.strip_prefix("sq"))?;
    if !(rest.is_empty() || rest.starts_with(':') || rest.starts_with('+')) {
        return None;
    }
    Some((|| {
        let (head, inner) = rest.split_once('+').with_context(|| {
            format!("'{s}': SmoothQuant needs an inner method, e.g. sq:0.5+w8a8:token")
        })?;
        let alpha = match head.strip_prefix(':') {
            None if head.is_empty() => DEFAULT_ALPHA,
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|a| (0.0..=1.0).contains(a))
                .with_context(|| format!("'{s}': alpha '{a}' is not a number in [0, 1]"))?,
            None => bail!("'{s}': use sq[:<alpha>]+<method>"),
        };
        let inner = crate::nn::registry::parse_algorithm(inner)
            .with_context(|| format!("inner method of '{s}'"))?;
        if inner.group_scaling().is_some() || inner.keeps_layer() {
            bail!(
                "'{s}': the inner method must quantize the layer without scaling it again (got {})",
                inner.spec()
            );
        }
        Ok(Arc::new(SmoothQuant { alpha, inner }) as Arc<dyn Algorithm>)
    })())
}

impl Algorithm for SmoothQuant {
    fn spec(&self) -> String {
        format!("sq:{}+{}", self.alpha, self.inner.spec())
    }

    fn label(&self) -> String {
        self.inner.label()
    }

    fn nominal_bits(&self) -> u32 {
        self.inner.nominal_bits()
    }

    fn needs(&self) -> Vec<Statistic> {
        let mut n = vec![Statistic::InputChannelAbsMax];
        for s in self.inner.needs() {
            if !n.contains(&s) {
                n.push(s);
            }
        }
        n
    }

    fn group_scaling(&self) -> Option<&dyn GroupScaling> {
        Some(self)
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        self.inner.apply(layer)
    }
}

impl GroupScaling for SmoothQuant {
    fn key(&self) -> String {
        format!("sq:{}", self.alpha)
    }

    fn scales_linear_fed(&self) -> bool {
        false
    }

    fn scales(
        &self,
        group: &ScaleGroup,
        weights: &[Tensor],
        input: &Calibration,
    ) -> Result<Vec<f32>> {
        let act = input.channel_absmax.as_deref().with_context(|| {
            format!(
                "group {}: no activation maxima were gathered",
                group.describe()
            )
        })?;
        smooth::scales(act, &smooth::column_absmax(weights)?, self.alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        for (s, spec) in [
            ("sq+dynamic-int8", "sq:0.5+dynamic-int8"),
            ("sq:0.75+w:i8:sym:ch0", "sq:0.75+w:i8:sym:ch0"),
            ("smoothquant:0.25+static-int8", "sq:0.25+static-int8:minmax"),
        ] {
            let a = parse(s).unwrap().unwrap();
            assert_eq!(a.spec(), spec);
            assert_eq!(parse(&a.spec()).unwrap().unwrap().spec(), spec);
        }
        let st = parse("sq+static-int8").unwrap().unwrap();
        assert_eq!(st.needs().len(), 2);
        assert!(parse("squid").is_none());
        for bad in [
            "sq",
            "sq:0.5",
            "sq:1.5+dynamic-int8",
            "sq:x+dynamic-int8",
            "sq+keep",
            "sq+sq+dynamic-int8",
            "sq+int9",
        ] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
    }
}
