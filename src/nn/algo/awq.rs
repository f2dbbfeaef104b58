//! `awq:<scheme>[:noscale][:noclip]` (e.g. `awq:i4:sym:g64`, AutoAWQ's default is
//! `awq:u4:affine:g128`): activation-aware weight quantization. Before any layer is
//! converted, every group (norm → projections, up → down, v → o without GQA) gets the
//! scales of AWQ's grid search folded in (`quant::awq::search_scales`, `nn::scaling`);
//! then each layer's weight groups are clipped by AWQ's clip search (not q/k projections,
//! as AutoAWQ: their outputs meet in a softmax, where output MSE misleads) and quantized
//! by round-to-nearest into the grouped int-N format, so the same kernels run it.
//!
//! Statistics: mean |x| per channel and the second moment `XᵀX / N` of each layer's
//! inputs over all calibration tokens (the searches' errors are quadratic forms in it).
//! `noscale` / `noclip` switch a search off, for ablations.

use super::{Algorithm, LayerInput};
use crate::nn::calib::{Calibration, Statistic};
use crate::nn::format::grouped::Grouped;
use crate::nn::format::WeightFormat;
use crate::nn::scaling::{GroupScaling, ScaleGroup};
use crate::quant::{awq, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Awq {
    pub scheme: Scheme,
    pub scale: bool,
    pub clip: bool,
}

pub fn parse(s: &str) -> Option<Result<Arc<dyn Algorithm>>> {
    let rest = s.strip_prefix("awq:")?;
    Some((|| {
        let mut parts: Vec<&str> = rest.split(':').collect();
        let (mut scale, mut clip) = (true, true);
        while let Some(&last) = parts.last() {
            match last {
                "noscale" => scale = false,
                "noclip" => clip = false,
                _ => break,
            }
            parts.pop();
        }
        let scheme: Scheme = parts
            .join(":")
            .parse()
            .with_context(|| format!("in '{s}': use awq:<scheme>[:noscale][:noclip]"))?;
        awq::group_cols(&scheme, 1).with_context(|| format!("in '{s}'"))?;
        Ok(Arc::new(Awq {
            scheme,
            scale,
            clip,
        }) as Arc<dyn Algorithm>)
    })())
}

/// Layers AutoAWQ does not clip (`avoid_clipping`): attention scores, not outputs, matter.
fn skip_clip(name: &str) -> bool {
    name.ends_with("q_proj") || name.ends_with("k_proj")
}

/// `G = XᵀX / N` from the calibration Hessian `2 XᵀX / N`.
fn gram(c: &Calibration, what: &str) -> Result<Vec<f64>> {
    let h = c
        .hessian
        .as_ref()
        .with_context(|| format!("{what}: no input second moment was gathered"))?;
    Ok(h.iter().map(|v| v / 2.0).collect())
}

impl Algorithm for Awq {
    fn spec(&self) -> String {
        let mut s = format!("awq:{}", self.scheme);
        if !self.scale {
            s.push_str(":noscale");
        }
        if !self.clip {
            s.push_str(":noclip");
        }
        s
    }

    fn label(&self) -> String {
        format!(
            "{}{}",
            if self.scheme.signed { "int" } else { "uint" },
            self.scheme.bits
        )
    }

    fn nominal_bits(&self) -> u32 {
        self.scheme.bits as u32
    }

    fn needs(&self) -> Vec<Statistic> {
        vec![Statistic::InputHessian, Statistic::InputChannelAbsMean]
    }

    fn group_scaling(&self) -> Option<&dyn GroupScaling> {
        self.scale.then_some(self as &dyn GroupScaling)
    }

    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>> {
        let mut w = layer.weight_f32()?;
        if self.clip && !skip_clip(layer.name) {
            let c = layer
                .calibration
                .with_context(|| format!("layer {}: AWQ needs calibration data", layer.name))?;
            let g: Vec<f32> = gram(c, layer.name)?.iter().map(|&v| v as f32).collect();
            let found = awq::search_clip(&w, &g, &self.scheme, awq::N_GRID, awq::MAX_SHRINK)
                .with_context(|| format!("clip search of layer {}", layer.name))?;
            w = found.weight;
        }
        Ok(Arc::new(Grouped::quantize(&w, &self.scheme, layer.name)?))
    }
}

impl GroupScaling for Awq {
    fn key(&self) -> String {
        self.spec()
    }

    fn scales_linear_fed(&self) -> bool {
        true
    }

    fn scales(
        &self,
        group: &ScaleGroup,
        weights: &[Tensor],
        input: &Calibration,
    ) -> Result<Vec<f32>> {
        let x_mean = input
            .channel_absmean
            .as_deref()
            .context("no mean |x| per channel was gathered")?;
        let cols = x_mean.len();
        let g = awq::gram_tensor(&gram(input, &group.describe())?, cols, weights[0].device())?;
        let found = awq::search_scales(weights, x_mean, &g, &self.scheme, awq::N_GRID)?;
        if std::env::var_os("QUANTLAB_AWQ_LOG").is_some() {
            eprintln!(
                "awq {}: ratio {:.2}, loss {:.4e} (ratio 0: {:.4e})",
                group.describe(),
                found.ratios[found.best],
                found.losses[found.best],
                found.losses[0]
            );
        }
        if found.scales.len() != cols {
            bail!(
                "scale search returned {} scales for {cols} channels",
                found.scales.len()
            );
        }
        Ok(found.scales)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        for s in [
            "awq:i4:sym:g64",
            "awq:u4:affine:g128",
            "awq:i3:affine:ch0:noclip",
            "awq:i4:sym:g32:noscale",
        ] {
            assert_eq!(parse(s).unwrap().unwrap().spec(), s);
        }
        assert_eq!(
            parse("awq:i4:g64").unwrap().unwrap().spec(),
            "awq:i4:affine:g64"
        );
        for bad in [
            "awq:",
            "awq:i4:sym:tensor",
            "awq:i9:sym:g64",
            "awq:i4:sym:g64:nope",
        ] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
        assert!(parse("w:i4:sym:g64").is_none());
        let a = parse("awq:i4:sym:g64").unwrap().unwrap();
        assert!(a.group_scaling().is_some());
        assert!(parse("awq:i4:sym:g64:noscale")
            .unwrap()
            .unwrap()
            .group_scaling()
            .is_none());
    }
}
