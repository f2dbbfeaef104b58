//! `gptq:<scheme>[:act-order][:damp=<f>][:block=<n>][:f16-scales]`: GPTQ (`quant::gptq`) on
//! the layer's input Hessian, stored in the grouped int-N format (`gptq:i4:sym:g64:act-order`);
//! `:f16-scales` fits and stores the group scales as f16 (2 bytes a group, as GPTQ
//! checkpoints store them).
//! Its Hessians are gathered sequentially: each layer's inputs flow through the layers
//! quantized before it (GPTQ's `true_sequential`), where the model supports it.

use super::{Algorithm, LayerInput};
use crate::nn::calib::Statistic;
use crate::nn::format::grouped::Grouped;
use crate::nn::format::WeightFormat;
use crate::quant::gptq::{gptq, GptqConfig, DEFAULT_BLOCK, DEFAULT_DAMP};
use crate::quant::Scheme;
use anyhow::{bail, Context, Result};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Gptq(pub GptqConfig);

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix("gptq:")?;
    Some(parse_rest(rest).map(|c| Arc::new(Gptq(c)) as Arc<dyn Algorithm>))
}

fn parse_rest(rest: &str) -> Result<GptqConfig> {
    let help = "expected gptq:<scheme>[:act-order][:damp=<fraction>][:block=<columns>][:f16-scales], e.g. gptq:i4:sym:g64:act-order";
    let mut scheme_parts = Vec::new();
    let (mut act_order, mut damp, mut block) = (false, DEFAULT_DAMP, DEFAULT_BLOCK);
    let mut f16_scales = false;
    for p in rest.split(':') {
        if p == "act-order" || p == "actorder" {
            act_order = true;
        } else if p == crate::nn::format::grouped::F16_SCALES {
            f16_scales = true;
        } else if let Some(v) = p.strip_prefix("damp=") {
            damp = v
                .parse()
                .ok()
                .filter(|d: &f64| d.is_finite() && *d >= 0.0)
                .with_context(|| format!("invalid dampening '{v}' in 'gptq:{rest}': a fraction of the mean Hessian diagonal, e.g. 0.01"))?;
        } else if let Some(v) = p.strip_prefix("block=") {
            block = v.parse().ok().filter(|&b: &usize| b > 0).with_context(|| {
                format!("invalid block size '{v}' in 'gptq:{rest}': a positive number of columns")
            })?;
        } else {
            scheme_parts.push(p);
        }
    }
    let scheme: Scheme = scheme_parts
        .join(":")
        .parse()
        .with_context(|| format!("in 'gptq:{rest}': {help}"))?;
    match scheme.granularity {
        crate::quant::Granularity::PerGroup { .. }
        | crate::quant::Granularity::PerChannel { axis: 0 } => {}
        _ => bail!("'gptq:{rest}': GPTQ needs per-group (:g<size>) or per-row (:ch0) scales"),
    }
    Ok(GptqConfig {
        scheme,
        damp,
        block,
        act_order,
        f16_scales,
    })
}

impl Algorithm for Gptq {
    fn spec(&self) -> String {
        let c = &self.0;
        let mut s = format!("gptq:{}", c.scheme);
        if c.act_order {
            s.push_str(":act-order");
        }
        if c.damp != DEFAULT_DAMP {
            s.push_str(&format!(":damp={}", c.damp));
        }
        if c.block != DEFAULT_BLOCK {
            s.push_str(&format!(":block={}", c.block));
        }
        if c.f16_scales {
            s.push(':');
            s.push_str(crate::nn::format::grouped::F16_SCALES);
        }
        s
    }

    fn label(&self) -> String {
        let s = &self.0.scheme;
        format!("{}{}", if s.signed { "int" } else { "uint" }, s.bits)
    }

    fn nominal_bits(&self) -> u32 {
        self.0.scheme.bits as u32
    }

    fn needs(&self) -> Vec<Statistic> {
        vec![Statistic::InputHessian]
    }

    fn sequential(&self) -> bool {
        true
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let h = layer
            .calibration
            .and_then(|c| c.hessian.as_ref())
            .with_context(|| {
                format!(
                    "layer {}: GPTQ needs the Hessian of its inputs (calibration data)",
                    layer.name
                )
            })?;
        let w = layer.weight_f32()?;
        let (rows, cols) = w.dims2()?;
        self.0
            .scheme
            .validate_for_shape(&[rows, cols])
            .with_context(|| format!("layer {} cannot use {}", layer.name, self.0.scheme))?;
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        let out = gptq(&data, rows, cols, h, &self.0)
            .with_context(|| format!("GPTQ on layer {}", layer.name))?;
        let g = Grouped::new(out.q);
        Ok(Arc::new(if self.0.f16_scales {
            g.with_f16_scales()
                .with_context(|| format!("layer {}", layer.name))?
        } else {
            g
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::nn::Method;

    #[test]
    fn spellings_round_trip_and_bad_ones_fail() {
        for s in [
            "gptq:i4:sym:g64",
            "gptq:u3:affine:g128:act-order",
            "gptq:i4:sym:ch0:damp=0.05:block=64",
            "gptq:i3:sym:g64:f16-scales",
        ] {
            assert_eq!(s.parse::<Method>().unwrap().to_string(), s);
        }
        assert_eq!(
            "gptq:i4:sym:g64:damp=0.01:block=128:actorder"
                .parse::<Method>()
                .unwrap()
                .to_string(),
            "gptq:i4:sym:g64:act-order"
        );
        for bad in [
            "gptq:i4:sym",
            "gptq:i4:sym:g64:damp=-1",
            "gptq:i4:sym:g64:block=0",
            "gptq:i9:g64",
            "gptq:i4:sym:ch1",
        ] {
            assert!(bad.parse::<Method>().is_err(), "{bad}");
        }
    }
}
