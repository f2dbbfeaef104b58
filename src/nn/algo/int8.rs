//! `dynamic-int8` and `static-int8[:observer]`: int8 weights per output channel with u8
//! activations, quantized per call or from a range calibrated by an observer.

use super::{Algorithm, LayerInput};
use crate::nn::calib::Statistic;
use crate::nn::format::int8::{static_qparams, ActQuant, Int8};
use crate::nn::format::WeightFormat;
use crate::quant::ObserverKind;
use anyhow::{bail, Result};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Int8Algorithm {
    Dynamic,
    Static(ObserverKind),
}

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    if matches!(s, "dynamic-int8" | "dint8") {
        return Some(Ok(Arc::new(Int8Algorithm::Dynamic)));
    }
    let rest = s.strip_prefix("static-int8")?;
    Some((|| {
        let obs = match rest.strip_prefix(':') {
            Some(o) => o.parse()?,
            None if rest.is_empty() => ObserverKind::MinMax,
            None => bail!("unknown method '{s}'"),
        };
        Ok(Arc::new(Int8Algorithm::Static(obs)) as Arc<dyn Algorithm>)
    })())
}

impl Algorithm for Int8Algorithm {
    fn spec(&self) -> String {
        match self {
            Int8Algorithm::Dynamic => "dynamic-int8".into(),
            Int8Algorithm::Static(o) => format!("static-int8:{o}"),
        }
    }

    fn label(&self) -> String {
        "qint8".into()
    }

    fn nominal_bits(&self) -> u32 {
        8
    }

    fn needs(&self) -> Vec<Statistic> {
        match self {
            Int8Algorithm::Dynamic => vec![],
            Int8Algorithm::Static(o) => vec![Statistic::InputRange(*o)],
        }
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let act = match self {
            Int8Algorithm::Dynamic => ActQuant::Dynamic,
            Int8Algorithm::Static(_) => {
                let range = layer.calibration.and_then(|c| c.input_range);
                let (scale, zero_point) = static_qparams(layer.name, range)?;
                ActQuant::Static { scale, zero_point }
            }
        };
        let w = layer.weight_f32()?;
        Ok(Arc::new(Int8::quantize(&w, act)?))
    }
}
